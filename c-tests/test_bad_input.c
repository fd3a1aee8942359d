/* Bad input to every function: the documented negative errno, a message naming the function
 * in cowbackup_last_error(), no crash, out-parameters untouched. Every path is under a fresh
 * temporary directory (mkdtemp), "missing" ones included: nothing is assumed absent (a machine
 * had a /nonexistent), nothing is created outside it, and it is removed at the end. */
#include "common.h"

#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

const char *test_name = "bad_input";

#define BAD_PTR ((void *)0x5eed)

/* The test's temporary directory (made by main, under $TMPDIR or /tmp) and paths inside it. */
static char tmpdir[1024];

static const char *in_tmp(const char *name)
{
    static char paths[8][2048];
    static int next;
    char *p = paths[next++ % 8];
    int n = snprintf(p, sizeof paths[0], "%s/%s", tmpdir, name);
    REQUIRE(n > 0 && (size_t)n < sizeof paths[0]);
    return p;
}

static int exists(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0;
}

/* Remove the temporary directory; every entry left in it is reported (a refused call must
 * not have created a file) and removed. */
static void remove_tmpdir(void)
{
    DIR *d = opendir(tmpdir);
    REQUIRE(d != NULL);
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        fprintf(stderr, "FAIL: %s/%s was left behind\n", tmpdir, e->d_name);
        test_failures++;
        unlinkat(dirfd(d), e->d_name, 0);
    }
    closedir(d);
    CHECK(rmdir(tmpdir) == 0);
}
#define SENTINEL 0x5a5a5a5a5a5a5a5aULL

static int bad_block_status_pnum0(void *opaque, uint64_t offset, uint64_t len, uint64_t *pnum, uint32_t *status)
{
    (void)opaque, (void)offset, (void)len;
    *pnum = 0;
    *status = COWBACKUP_STATUS_DATA;
    return 0;
}

static int bad_block_status_bits(void *opaque, uint64_t offset, uint64_t len, uint64_t *pnum, uint32_t *status)
{
    (void)opaque, (void)offset;
    *pnum = len;
    *status = 0x80;
    return 0;
}

static int big_block_status(void *opaque, uint64_t offset, uint64_t len, uint64_t *pnum, uint32_t *status)
{
    (void)opaque, (void)offset;
    *pnum = len + 1000000; /* clamped */
    *status = COWBACKUP_STATUS_DATA;
    return 0;
}

static void drivers(void)
{
    cowbackup_driver *d = BAD_PTR;
    SAY("cowbackup_memory_new: size 0, size > 1 TiB, NULL out");
    CHECK_ERR(cowbackup_memory_new(0, &d), EINVAL, "cowbackup_memory_new");
    CHECK_ERR(cowbackup_memory_new(UINT64_MAX, &d), EINVAL, "cowbackup_memory_new");
    CHECK_ERR(cowbackup_memory_new(4096, NULL), EINVAL, "cowbackup_memory_new");
    CHECK(d == BAD_PTR);

    SAY("cowbackup_file_open/create: NULL path, unknown flags, missing file, size 0, NULL out");
    const char *missing_dir = in_tmp("missing");          /* never created */
    const char *missing_file = in_tmp("missing.img");     /* never created */
    const char *in_missing_dir = in_tmp("missing/x.img"); /* its directory does not exist */
    const char *refused = in_tmp("refused.img");          /* every create of it is refused */
    CHECK(!exists(missing_dir) && !exists(missing_file));
    CHECK_ERR(cowbackup_file_open(NULL, 0, &d), EINVAL, "cowbackup_file_open");
    CHECK_ERR(cowbackup_file_open(tmpdir, 0x80, &d), EINVAL, "cowbackup_file_open");
    CHECK_ERR(cowbackup_file_open(missing_file, 0, &d), ENOENT, "cowbackup_file_open");
    CHECK_ERR(cowbackup_file_open(in_missing_dir, 0, &d), ENOENT, "cowbackup_file_open");
    CHECK_ERR(cowbackup_file_open(tmpdir, 0, &d), EINVAL, "not a regular file");
    CHECK_ERR(cowbackup_file_open(missing_file, 0, NULL), EINVAL, "cowbackup_file_open");
    CHECK_ERR(cowbackup_file_create(NULL, 4096, 0, &d), EINVAL, "cowbackup_file_create");
    CHECK_ERR(cowbackup_file_create(refused, 0, 0, &d), EINVAL, "cowbackup_file_create");
    CHECK_ERR(cowbackup_file_create(refused, 4096, 0x10, &d), EINVAL, "cowbackup_file_create");
    CHECK_ERR(cowbackup_file_create(refused, 4096, 0, NULL), EINVAL, "cowbackup_file_create");
    CHECK_ERR(cowbackup_file_create(in_missing_dir, 4096, 0, &d), ENOENT, "cowbackup_file_create");
    CHECK(d == BAD_PTR);
    SAY("the refused calls created nothing");
    CHECK(!exists(refused) && !exists(missing_file) && !exists(missing_dir));

    SAY("cowbackup_driver_new: NULL ops/out, bad ops_size, NULL read/write, size 0, unknown flags");
    cmem *m = cmem_new(65536, 0);
    cowbackup_driver_ops no_read = cmem_ops, no_write = cmem_ops;
    no_read.read = NULL;
    no_write.write = NULL;
    CHECK_ERR(cowbackup_driver_new(NULL, sizeof cmem_ops, m, 65536, 0, &d), EINVAL, "cowbackup_driver_new");
    CHECK_ERR(cowbackup_driver_new(&cmem_ops, sizeof cmem_ops, m, 65536, 0, NULL), EINVAL, "cowbackup_driver_new");
    CHECK_ERR(cowbackup_driver_new(&cmem_ops, 0, m, 65536, 0, &d), EINVAL, "cowbackup_driver_new");
    CHECK_ERR(cowbackup_driver_new(&cmem_ops, sizeof(void *), m, 65536, 0, &d), EINVAL, "cowbackup_driver_new");
    CHECK_ERR(cowbackup_driver_new(&cmem_ops, 2 * sizeof(void *) - 1, m, 65536, 0, &d), EINVAL, "cowbackup_driver_new");
    CHECK_ERR(cowbackup_driver_new(&cmem_ops, 1 << 20, m, 65536, 0, &d), EINVAL, "cowbackup_driver_new");
    CHECK_ERR(cowbackup_driver_new(&no_read, sizeof cmem_ops, m, 65536, 0, &d), EINVAL, "cowbackup_driver_new");
    CHECK_ERR(cowbackup_driver_new(&no_write, sizeof cmem_ops, m, 65536, 0, &d), EINVAL, "cowbackup_driver_new");
    CHECK_ERR(cowbackup_driver_new(&cmem_ops, sizeof cmem_ops, m, 0, 0, &d), EINVAL, "cowbackup_driver_new");
    CHECK_ERR(cowbackup_driver_new(&cmem_ops, sizeof cmem_ops, m, 65536, 2, &d), EINVAL, "cowbackup_driver_new");
    CHECK_ERR(cowbackup_driver_new(&cmem_ops, sizeof cmem_ops, m, 65536, UINT32_MAX, &d), EINVAL, "cowbackup_driver_new");
    CHECK(d == BAD_PTR);
    CHECK(atomic_load(&m->released) == 0); /* failed creation: the caller keeps opaque */

    SAY("cowbackup_driver_size/read/write: NULL driver/buf/out, past the end, overflow near UINT64_MAX");
    cowbackup_driver *c = cmem_driver(m, 0);
    uint64_t size = SENTINEL;
    uint8_t buf[64];
    CHECK_ERR(cowbackup_driver_size(NULL, &size), EINVAL, "cowbackup_driver_size");
    CHECK_ERR(cowbackup_driver_size(c, NULL), EINVAL, "cowbackup_driver_size");
    CHECK(size == SENTINEL);
    CHECK_ERR(cowbackup_driver_read(NULL, 0, buf, 1), EINVAL, "cowbackup_driver_read");
    CHECK_ERR(cowbackup_driver_read(c, 0, NULL, 1), EINVAL, "cowbackup_driver_read");
    CHECK_ERR(cowbackup_driver_read(c, 65536 - 10, buf, 11), EINVAL, "cowbackup_driver_read");
    CHECK_ERR(cowbackup_driver_read(c, 65537, buf, 0), EINVAL, "cowbackup_driver_read");
    CHECK_ERR(cowbackup_driver_read(c, UINT64_MAX - 5, buf, 10), EINVAL, "cowbackup_driver_read");
    CHECK_ERR(cowbackup_driver_read(c, UINT64_MAX, buf, 1), EINVAL, "cowbackup_driver_read");
    CHECK_RC(cowbackup_driver_read(c, 65536, NULL, 0), 0);
    CHECK_RC(cowbackup_driver_read(c, 65536 - 64, buf, 64), 0);
    CHECK_ERR(cowbackup_driver_write(NULL, 0, buf, 1), EINVAL, "cowbackup_driver_write");
    CHECK_ERR(cowbackup_driver_write(c, 0, NULL, 1), EINVAL, "cowbackup_driver_write");
    CHECK_ERR(cowbackup_driver_write(c, 65536 - 10, buf, 11), EINVAL, "cowbackup_driver_write");
    CHECK_ERR(cowbackup_driver_write(c, UINT64_MAX - 5, buf, 10), EINVAL, "cowbackup_driver_write");
    CHECK(atomic_load(&m->writes) == 0);
    cowbackup_driver_free(c);
    CHECK(atomic_load(&m->released) == 1);
    cmem_destroy(m);
}

static void options(void)
{
    SAY("every options setter: NULL options -EINVAL");
    CHECK_ERR(cowbackup_options_set_cluster_size(NULL, 65536), EINVAL, "cowbackup_options_set_cluster_size");
    CHECK_ERR(cowbackup_options_set_sync(NULL, 0), EINVAL, "cowbackup_options_set_sync");
    CHECK_ERR(cowbackup_options_set_speed(NULL, 0), EINVAL, "cowbackup_options_set_speed");
    CHECK_ERR(cowbackup_options_set_workers(NULL, 1), EINVAL, "cowbackup_options_set_workers");
    CHECK_ERR(cowbackup_options_set_max_chunk(NULL, 65536), EINVAL, "cowbackup_options_set_max_chunk");
    CHECK_ERR(cowbackup_options_set_on_source_error(NULL, 0), EINVAL, "cowbackup_options_set_on_source_error");
    CHECK_ERR(cowbackup_options_set_on_target_error(NULL, 0), EINVAL, "cowbackup_options_set_on_target_error");
    CHECK_ERR(cowbackup_options_set_on_cbw_error(NULL, 0), EINVAL, "cowbackup_options_set_on_cbw_error");
    CHECK_ERR(cowbackup_options_set_cbw_timeout(NULL, 0), EINVAL, "cowbackup_options_set_cbw_timeout");
    CHECK_ERR(cowbackup_options_set_target_is_zero(NULL, 0), EINVAL, "cowbackup_options_set_target_is_zero");
    CHECK_ERR(cowbackup_options_set_completion(NULL, NULL, NULL), EINVAL, "cowbackup_options_set_completion");

    SAY("bad cluster sizes, sync modes, bitmap modes, workers, max_chunk, actions, booleans");
    cowbackup_options *o = cowbackup_options_new();
    REQUIRE(o != NULL);
    const uint64_t bad_clusters[] = { 0, 1, 3, 2048, 4095, 65537, 128ULL << 20, 1ULL << 63, UINT64_MAX };
    for (size_t i = 0; i < sizeof bad_clusters / sizeof bad_clusters[0]; i++)
        CHECK_ERR(cowbackup_options_set_cluster_size(o, bad_clusters[i]), EINVAL, "cowbackup_options_set_cluster_size");
    CHECK_ERR(cowbackup_options_set_sync(o, 4), EINVAL, "cowbackup_options_set_sync");
    CHECK_ERR(cowbackup_options_set_sync(o, UINT32_MAX), EINVAL, "cowbackup_options_set_sync");
    CHECK_ERR(cowbackup_options_set_bitmap(NULL, NULL, 0), EINVAL, "cowbackup_options_set_bitmap");
    {
        cowbackup_bitmap *bm = NULL;
        REQUIRE(cowbackup_bitmap_new(1 << 20, 65536, &bm) == 0);
        CHECK_ERR(cowbackup_options_set_bitmap(o, bm, 3), EINVAL, "cowbackup_options_set_bitmap");
        CHECK_ERR(cowbackup_options_set_bitmap(o, bm, UINT32_MAX), EINVAL, "cowbackup_options_set_bitmap");
        cowbackup_bitmap_free(bm);
    }
    CHECK_ERR(cowbackup_options_set_workers(o, 0), EINVAL, "cowbackup_options_set_workers");
    CHECK_ERR(cowbackup_options_set_workers(o, 65), EINVAL, "cowbackup_options_set_workers");
    CHECK_ERR(cowbackup_options_set_workers(o, UINT32_MAX), EINVAL, "cowbackup_options_set_workers");
    CHECK_ERR(cowbackup_options_set_max_chunk(o, 0), EINVAL, "cowbackup_options_set_max_chunk");
    CHECK_ERR(cowbackup_options_set_max_chunk(o, 4095), EINVAL, "cowbackup_options_set_max_chunk");
    CHECK_ERR(cowbackup_options_set_max_chunk(o, (1ULL << 30) + 1), EINVAL, "cowbackup_options_set_max_chunk");
    CHECK_ERR(cowbackup_options_set_on_source_error(o, 4), EINVAL, "cowbackup_options_set_on_source_error");
    CHECK_ERR(cowbackup_options_set_on_target_error(o, UINT32_MAX), EINVAL, "cowbackup_options_set_on_target_error");
    CHECK_ERR(cowbackup_options_set_on_cbw_error(o, 2), EINVAL, "cowbackup_options_set_on_cbw_error");
    CHECK_ERR(cowbackup_options_set_target_is_zero(o, 2), EINVAL, "cowbackup_options_set_target_is_zero");

    SAY("failed setters changed nothing: a job with these options runs with the defaults");
    cowbackup_driver *s = NULL, *t = NULL;
    REQUIRE(cowbackup_memory_new(1 << 20, &s) == 0 && cowbackup_memory_new(1 << 20, &t) == 0);
    cowbackup_job *job = NULL;
    CHECK_RC(cowbackup_backup_start(s, t, o, &job), 0);
    CHECK_RC(cowbackup_job_wait(job), 0);
    cowbackup_job_free(job);
    /* COWBACKUP_SYNC_BITMAP is a valid mode, but a job needs a bitmap for it. */
    CHECK_RC(cowbackup_options_set_sync(o, COWBACKUP_SYNC_BITMAP), 0);
    job = NULL;
    CHECK_ERR(cowbackup_backup_start(s, t, o, &job), EINVAL, "needs a dirty bitmap");
    CHECK(job == NULL);
    cowbackup_driver_free(s);
    cowbackup_driver_free(t);
    cowbackup_options_free(o);
}

static void jobs(void)
{
    const uint64_t size = 1 << 20;
    cowbackup_driver *s = NULL, *t = NULL, *small = NULL;
    REQUIRE(cowbackup_memory_new(size, &s) == 0 && cowbackup_memory_new(size, &t) == 0);
    REQUIRE(cowbackup_memory_new(size / 2, &small) == 0);
    cowbackup_job *job = BAD_PTR;

    SAY("cowbackup_backup_start: NULL source/target/out, source == target, sizes differ, same file twice");
    CHECK_ERR(cowbackup_backup_start(NULL, t, NULL, &job), EINVAL, "cowbackup_backup_start");
    CHECK_ERR(cowbackup_backup_start(s, NULL, NULL, &job), EINVAL, "cowbackup_backup_start");
    CHECK_ERR(cowbackup_backup_start(s, t, NULL, NULL), EINVAL, "cowbackup_backup_start");
    CHECK_ERR(cowbackup_backup_start(s, s, NULL, &job), EINVAL, "same device");
    CHECK_ERR(cowbackup_backup_start(s, small, NULL, &job), EINVAL, "differ in size");
    CHECK_ERR(cowbackup_backup_start(small, s, NULL, &job), EINVAL, "differ in size");
    char path[2048];
    int n = snprintf(path, sizeof path, "%s/same-XXXXXX", tmpdir);
    REQUIRE(n > 0 && (size_t)n < sizeof path);
    int fd = mkstemp(path);
    REQUIRE(fd >= 0);
    close(fd);
    cowbackup_driver *f1 = NULL, *f2 = NULL;
    REQUIRE(cowbackup_file_create(path, size, COWBACKUP_CREATE_OVERWRITE, &f1) == 0);
    REQUIRE(cowbackup_file_open(path, COWBACKUP_OPEN_WRITE, &f2) == 0);
    CHECK_ERR(cowbackup_backup_start(f1, f2, NULL, &job), EINVAL, "same file");
    cowbackup_driver_free(f1);
    cowbackup_driver_free(f2);
    CHECK(unlink(path) == 0);
    CHECK(job == BAD_PTR);

    SAY("bad block_status answers: pnum 0 and unknown bits fail the start (-EIO); pnum > len is clamped");
    cmem *m = cmem_new(size, 1);
    cowbackup_driver_ops ops = cmem_ops;
    cowbackup_options *top = cowbackup_options_new();
    REQUIRE(cowbackup_options_set_sync(top, COWBACKUP_SYNC_TOP) == 0);
    cowbackup_driver *c = NULL;
    ops.block_status = bad_block_status_pnum0;
    REQUIRE(cowbackup_driver_new(&ops, sizeof ops, m, size, 0, &c) == 0);
    CHECK_ERR(cowbackup_backup_start(c, t, top, &job), EIO, "answered 0 bytes");
    cowbackup_driver_free(c);
    ops.block_status = bad_block_status_bits;
    REQUIRE(cowbackup_driver_new(&ops, sizeof ops, m, size, 0, &c) == 0);
    CHECK_ERR(cowbackup_backup_start(c, t, top, &job), EIO, "unknown status bits");
    cowbackup_driver_free(c);
    CHECK(job == BAD_PTR);
    ops.block_status = big_block_status;
    REQUIRE(cowbackup_driver_new(&ops, sizeof ops, m, size, 0, &c) == 0);
    CHECK_RC(cowbackup_backup_start(c, t, top, &job), 0);
    CHECK_RC(cowbackup_job_wait(job), 0);
    CHECK(query(job).bytes_copied == size);
    cowbackup_job_free(job);
    cowbackup_driver_free(c);
    CHECK(atomic_load(&m->released) == 3);
    cmem_destroy(m);
    cowbackup_options_free(top);

    SAY("job functions with NULL job / NULL info; hook ranges past the end or overflowing");
    CHECK_ERR(cowbackup_cow_before_write(NULL, 0, 0), EINVAL, "cowbackup_cow_before_write");
    CHECK_ERR(cowbackup_job_pause(NULL), EINVAL, "cowbackup_job_pause");
    CHECK_ERR(cowbackup_job_resume(NULL), EINVAL, "cowbackup_job_resume");
    CHECK_ERR(cowbackup_job_cancel(NULL), EINVAL, "cowbackup_job_cancel");
    CHECK_ERR(cowbackup_job_set_speed(NULL, 0), EINVAL, "cowbackup_job_set_speed");
    CHECK_ERR(cowbackup_job_wait(NULL), EINVAL, "cowbackup_job_wait");
    cowbackup_job_info info;
    memset(&info, 0x5a, sizeof info);
    CHECK_ERR(cowbackup_job_query(NULL, &info), EINVAL, "cowbackup_job_query");
    cowbackup_options *slow = cowbackup_options_new();
    REQUIRE(cowbackup_options_set_speed(slow, 1) == 0);
    job = NULL;
    REQUIRE(cowbackup_backup_start(s, t, slow, &job) == 0);
    cowbackup_options_free(slow);
    CHECK_ERR(cowbackup_job_query(job, NULL), EINVAL, "cowbackup_job_query");
    CHECK(info.state == 0x5a5a5a5a && info.len == SENTINEL);
    CHECK_ERR(cowbackup_cow_before_write(job, size - 1, 2), EINVAL, "cowbackup_cow_before_write");
    CHECK_ERR(cowbackup_cow_before_write(job, size + 1, 0), EINVAL, "cowbackup_cow_before_write");
    CHECK_ERR(cowbackup_cow_before_write(job, UINT64_MAX, 1), EINVAL, "cowbackup_cow_before_write");
    CHECK_ERR(cowbackup_cow_before_write(job, 4096, UINT64_MAX - 100), EINVAL, "cowbackup_cow_before_write");
    CHECK(query(job).cow_requests == 0);
    CHECK_RC(cowbackup_cow_before_write(job, size, 0), 0);
    CHECK_RC(cowbackup_cow_before_write(job, 0, 0), 0);
    CHECK(query(job).cow_requests == 0);
    cowbackup_job_free(job);

    cowbackup_driver_free(s);
    cowbackup_driver_free(t);
    cowbackup_driver_free(small);
}

int main(void)
{
    const char *base = getenv("TMPDIR");
    int n = snprintf(tmpdir, sizeof tmpdir, "%s/cowbackup-bad-input-XXXXXX", base && *base ? base : "/tmp");
    REQUIRE(n > 0 && (size_t)n < sizeof tmpdir);
    REQUIRE(mkdtemp(tmpdir) != NULL);
    SAY("cowbackup_last_error() is never NULL");
    CHECK(cowbackup_last_error() != NULL);
    drivers();
    options();
    jobs();
    SAY("the temporary directory %s holds nothing left behind; removed", tmpdir);
    remove_tmpdir();
    return test_finish();
}
