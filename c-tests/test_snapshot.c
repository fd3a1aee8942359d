/* The snapshot view from C: image fleecing (QEMU iotest), a read-only view that outlives its
 * job, on_cbw_error with a full scratch target, pull mode with a bitmap, discard on a view and
 * on C drivers (the `discard` op, older ops tables), push mode with discard_source, and the
 * new driver calls (block_status, discard, flush) with bad input. */
#include "common.h"

#include <stddef.h>
#include <unistd.h>

const char *test_name = "snapshot";

#define C64 (64 * 1024ULL)
#define MIB (1024ULL * 1024)
#define BAD_PTR ((void *)0x5eed)
#define SENTINEL 0x5a5a5a5a5a5a5a5aULL

/* ---- A cmem driver with a discard op (counts what it receives, zeroes the range) ---- */

static atomic_ulong discard_calls, discard_bytes;
static _Atomic int discard_errno;
static uint64_t discard_first_off = UINT64_MAX, discard_first_len;

static int dev_discard(void *opaque, uint64_t offset, uint64_t len)
{
    cmem *m = opaque;
    int err = atomic_load(&discard_errno);
    if (offset + len > m->size || len == 0)
        return -EINVAL; /* the library must never ask this */
    if (err)
        return -err;
    pthread_mutex_lock(&m->lock);
    memset(m->data + offset, 0, len);
    if (atomic_fetch_add(&discard_calls, 1) == 0) {
        discard_first_off = offset;
        discard_first_len = len;
    }
    pthread_mutex_unlock(&m->lock);
    atomic_fetch_add(&discard_bytes, len);
    return 0;
}

static cowbackup_driver_ops discard_ops;

static void reset_discards(void)
{
    atomic_store(&discard_calls, 0);
    atomic_store(&discard_bytes, 0);
    atomic_store(&discard_errno, 0);
    discard_first_off = UINT64_MAX;
    discard_first_len = 0;
}

static cowbackup_driver *discard_driver(cmem *m)
{
    cowbackup_driver *d = NULL;
    REQUIRE(cowbackup_driver_new(&discard_ops, sizeof(discard_ops), m, m->size, 0, &d) == 0 && d);
    return d;
}

/* Every byte of buf[0..len) is v. */
static int all_are(const uint8_t *buf, uint64_t len, uint8_t v)
{
    for (uint64_t i = 0; i < len; i++)
        if (buf[i] != v)
            return 0;
    return 1;
}

/* Read one cluster of d and check that every byte is v. */
static void check_cluster(cowbackup_driver *d, uint64_t c, uint8_t v)
{
    static uint8_t buf[C64];
    memset(buf, 0xee, sizeof buf);
    CHECK_RC(cowbackup_driver_read(d, c * C64, buf, C64), 0);
    if (!all_are(buf, C64, v)) {
        fprintf(stderr, "FAIL: cluster %llu reads 0x%02x..., want 0x%02x\n", (unsigned long long)c, buf[0], v);
        test_failures++;
    }
}

/* The host's write path: hook, then write `len` bytes of `v` at `off` of src. */
static int host_write(cowbackup_job *job, cowbackup_driver *src, uint64_t off, uint64_t len, uint8_t v)
{
    static uint8_t buf[2 * C64];
    REQUIRE(len <= sizeof buf);
    int rc = cowbackup_cow_before_write(job, off, len);
    if (rc < 0)
        return rc;
    memset(buf, v, len);
    return cowbackup_driver_write(src, off, buf, len);
}

static cowbackup_options *none_opts(void)
{
    cowbackup_options *o = cowbackup_options_new();
    REQUIRE(o);
    REQUIRE(cowbackup_options_set_sync(o, COWBACKUP_SYNC_NONE) == 0);
    return o;
}

/* ---- image-fleecing ---- */

static void fleecing(void)
{
    SAY("image-fleecing: 0x11, 0x22 at clusters 0 and 2 before the job, 0x33 at 0 and 5 through the hook");
    uint64_t size = 64 * C64;
    cowbackup_driver *src = NULL, *scratch = NULL, *view = BAD_PTR;
    CHECK_RC(cowbackup_memory_new(size, &src), 0);
    CHECK_RC(cowbackup_memory_new(size, &scratch), 0);
    uint8_t *buf = malloc(size);
    REQUIRE(buf && src && scratch);
    memset(buf, 0x11, size);
    memset(buf, 0x22, C64);
    memset(buf + 2 * C64, 0x22, C64);
    CHECK_RC(cowbackup_driver_write(src, 0, buf, size), 0);

    cowbackup_options *o = none_opts();
    cowbackup_job *job = NULL;
    CHECK_RC(cowbackup_backup_start(src, scratch, o, &job), 0);
    cowbackup_options_free(o);
    REQUIRE(job);
    CHECK_RC(cowbackup_job_snapshot(job, &view), 0);
    REQUIRE(view && view != BAD_PTR);
    uint64_t vsize = 0;
    CHECK_RC(cowbackup_driver_size(view, &vsize), 0);
    CHECK(vsize == size);

    /* Reading the whole view copies nothing. */
    memset(buf, 0, size);
    CHECK_RC(cowbackup_driver_read(view, 0, buf, size), 0);
    CHECK(all_are(buf, C64, 0x22) && all_are(buf + C64, C64, 0x11) && all_are(buf + 2 * C64, C64, 0x22));
    CHECK(all_are(buf + 3 * C64, size - 3 * C64, 0x11));
    cowbackup_job_info i = query(job);
    CHECK(i.bytes_copied == 0 && i.cow_bytes == 0);

    CHECK_RC(host_write(job, src, 0, C64, 0x33), 0);
    CHECK_RC(host_write(job, src, 5 * C64, C64, 0x33), 0);
    check_cluster(view, 0, 0x22);
    check_cluster(view, 2, 0x22);
    check_cluster(view, 5, 0x11);
    check_cluster(view, 7, 0x11);
    check_cluster(src, 0, 0x33);
    check_cluster(src, 5, 0x33);
    i = query(job);
    CHECK(i.cow_bytes == 2 * C64 && i.state == COWBACKUP_JOB_RUNNING);

    /* Status of the image: the memory source and the scratch clusters hold data. */
    uint64_t pnum = SENTINEL;
    uint32_t status = 0xdead;
    CHECK_RC(cowbackup_driver_block_status(view, 0, size, &pnum, &status), 0);
    CHECK(pnum >= 1 && pnum <= size && status == COWBACKUP_STATUS_DATA);

    SAY("the view is read-only, ranges are checked, flush is a no-op");
    uint8_t b[16] = { 0 };
    CHECK_ERR(cowbackup_driver_write(view, 0, b, sizeof b), EROFS, "cowbackup_driver_write");
    CHECK_ERR(cowbackup_driver_read(view, size - 1, b, 2), EINVAL, "cowbackup_driver_read");
    CHECK_ERR(cowbackup_driver_read(view, UINT64_MAX, b, 2), EINVAL, "cowbackup_driver_read");
    CHECK_ERR(cowbackup_driver_discard(view, size, 1), EINVAL, "cowbackup_driver_discard");
    pnum = SENTINEL;
    status = 0xdead;
    CHECK_ERR(cowbackup_driver_block_status(view, size - 1, 2, &pnum, &status), EINVAL,
              "cowbackup_driver_block_status");
    CHECK_ERR(cowbackup_driver_block_status(view, 0, 0, &pnum, &status), EINVAL, "cowbackup_driver_block_status");
    CHECK(pnum == SENTINEL && status == 0xdead); /* out-params untouched on failure */
    CHECK_RC(cowbackup_driver_flush(view), 0);

    SAY("complete: the job ends COMPLETED, the view goes stale");
    CHECK_RC(cowbackup_job_complete(job), 0);
    CHECK_RC(cowbackup_job_wait(job), 0);
    CHECK(query(job).state == COWBACKUP_JOB_COMPLETED);
    CHECK_ERR(cowbackup_driver_read(view, 0, b, sizeof b), ESTALE, "cowbackup_driver_read");
    CHECK_ERR(cowbackup_driver_block_status(view, 0, 1, &pnum, &status), ESTALE, "cowbackup_driver_block_status");
    CHECK_ERR(cowbackup_job_complete(job), EBUSY, "cowbackup_job_complete");
    cowbackup_driver *late = BAD_PTR;
    CHECK_ERR(cowbackup_job_snapshot(job, &late), ESTALE, "cowbackup_job_snapshot");
    CHECK(late == BAD_PTR);
    /* The scratch holds the old data of the two clusters the hook copied. */
    check_cluster(scratch, 0, 0x22);
    check_cluster(scratch, 5, 0x11);

    cowbackup_driver_free(view);
    cowbackup_job_free(job);

    SAY("complete is for sync=NONE jobs only");
    cowbackup_driver *t2 = NULL;
    CHECK_RC(cowbackup_memory_new(size, &t2), 0);
    CHECK_RC(cowbackup_backup_start(src, t2, NULL, &job), 0);
    CHECK_ERR(cowbackup_job_complete(job), EINVAL, "cowbackup_job_complete");
    CHECK_RC(cowbackup_job_wait(job), 0);
    cowbackup_job_free(job);
    cowbackup_driver_free(t2);
    cowbackup_driver_free(src);
    cowbackup_driver_free(scratch);
    free(buf);
}

/* ---- the view outlives the job handle ---- */

static void outlives_job(void)
{
    SAY("a view outlives its job: free the drivers and the job, read (ESTALE), then free the view");
    uint64_t size = 16 * C64;
    cmem *ms = cmem_new(size, 0x44), *mt = cmem_new(size, 0);
    cowbackup_driver *src = cmem_driver(ms, 0), *scratch = cmem_driver(mt, 0), *view = NULL, *view2 = NULL;
    cowbackup_options *o = none_opts();
    cowbackup_job *job = NULL;
    CHECK_RC(cowbackup_backup_start(src, scratch, o, &job), 0);
    cowbackup_options_free(o);
    REQUIRE(job);
    CHECK_RC(cowbackup_job_snapshot(job, &view), 0);
    CHECK_RC(cowbackup_job_snapshot(job, &view2), 0);
    REQUIRE(view && view2);
    CHECK_RC(cowbackup_cow_before_write(job, 3 * C64, 1), 0);
    check_cluster(view, 3, 0x44);
    cowbackup_driver_free(src);
    cowbackup_driver_free(scratch);
    cowbackup_job_free(job); /* running: cancelled */
    CHECK(atomic_load(&ms->released) == 0 && atomic_load(&mt->released) == 0);
    uint8_t b[8];
    CHECK_ERR(cowbackup_driver_read(view, 0, b, sizeof b), ESTALE, "cowbackup_driver_read");
    CHECK_ERR(cowbackup_driver_discard(view, 0, C64), ESTALE, "cowbackup_driver_discard");
    cowbackup_driver_free(view);
    CHECK(atomic_load(&ms->released) == 0); /* view2 still holds them */
    CHECK_ERR(cowbackup_driver_read(view2, 3 * C64, b, sizeof b), ESTALE, "cowbackup_driver_read");
    cowbackup_driver_free(view2);
    CHECK(atomic_load(&ms->released) == 1 && atomic_load(&mt->released) == 1);
    cmem_destroy(ms);
    cmem_destroy(mt);
}

/* ---- on_cbw_error with a scratch target failing ENOSPC ---- */

static void cbw_enospc(uint32_t action)
{
    int guest = action == COWBACKUP_CBW_BREAK_GUEST_WRITE;
    SAY("scratch full (ENOSPC), %s", guest ? "BREAK_GUEST_WRITE" : "BREAK_SNAPSHOT");
    uint64_t size = 16 * C64;
    cmem *mt = cmem_new(size, 0);
    mt->write_fail_off = 0;
    mt->write_fail_len = size;
    atomic_store(&mt->write_errno, ENOSPC);
    cowbackup_driver *src = NULL, *scratch = cmem_driver(mt, 0), *view = NULL;
    CHECK_RC(cowbackup_memory_new(size, &src), 0);
    uint8_t *buf = malloc(size);
    REQUIRE(buf && src);
    memset(buf, 0x11, size);
    CHECK_RC(cowbackup_driver_write(src, 0, buf, size), 0);
    cowbackup_options *o = none_opts();
    CHECK_RC(cowbackup_options_set_on_cbw_error(o, action), 0);
    cowbackup_job *job = NULL;
    CHECK_RC(cowbackup_backup_start(src, scratch, o, &job), 0);
    cowbackup_options_free(o);
    REQUIRE(job);
    CHECK_RC(cowbackup_job_snapshot(job, &view), 0);
    REQUIRE(view);
    uint8_t b[16];
    if (guest) {
        /* The hook fails, so the host fails its write: source and view keep the old data. */
        CHECK_RC(host_write(job, src, C64, 10, 0x33), -ENOSPC);
        check_cluster(view, 1, 0x11);
        check_cluster(src, 1, 0x11);
        cowbackup_job_info i = query(job);
        CHECK(i.state == COWBACKUP_JOB_RUNNING && i.error == 0);
        /* Room again: the retried write copies the old data first. */
        atomic_store(&mt->write_errno, 0);
        CHECK_RC(host_write(job, src, C64, 10, 0x33), 0);
        check_cluster(view, 1, 0x11);
        check_cluster(scratch, 1, 0x11);
        CHECK_RC(cowbackup_job_cancel(job), 0);
        CHECK_RC(cowbackup_job_wait(job), -ECANCELED);
        CHECK_ERR(cowbackup_driver_read(view, 0, b, sizeof b), ESTALE, "cowbackup_driver_read");
    } else {
        /* The hook returns 0 (the write goes on) and the job fails with ENOSPC. */
        CHECK_RC(host_write(job, src, C64, 10, 0x33), 0);
        CHECK_RC(cowbackup_job_wait(job), -ENOSPC);
        cowbackup_job_info i = query(job);
        CHECK(i.state == COWBACKUP_JOB_FAILED && i.error == -ENOSPC);
        CHECK_ERR(cowbackup_driver_read(view, 0, b, sizeof b), ENOSPC, "cowbackup_driver_read");
        CHECK_ERR(cowbackup_driver_read(view, C64, b, sizeof b), ENOSPC, "cowbackup_driver_read");
    }
    cowbackup_driver_free(view);
    cowbackup_job_free(job);
    cowbackup_driver_free(src);
    cowbackup_driver_free(scratch);
    cmem_destroy(mt);
    free(buf);
}

/* ---- pull mode ---- */

static void pull_mode(void)
{
    SAY("pull mode: bitmap {0, 2}; cluster 5 is -EACCES; complete -> the bitmap holds the writes made meanwhile");
    uint64_t size = 16 * C64;
    cowbackup_driver *src = NULL, *scratch = NULL, *view = NULL;
    CHECK_RC(cowbackup_memory_new(size, &src), 0);
    CHECK_RC(cowbackup_memory_new(size, &scratch), 0);
    uint8_t *buf = malloc(size);
    REQUIRE(buf && src && scratch);
    memset(buf, 0x11, size);
    CHECK_RC(cowbackup_driver_write(src, 0, buf, size), 0);
    cowbackup_bitmap *bm = NULL;
    CHECK_RC(cowbackup_bitmap_new(size, C64, &bm), 0);
    REQUIRE(bm);
    CHECK_RC(cowbackup_bitmap_mark(bm, 0, 1), 0);
    CHECK_RC(cowbackup_bitmap_mark(bm, 2 * C64, C64), 0);
    cowbackup_options *o = none_opts();
    CHECK_RC(cowbackup_options_set_bitmap(o, bm, COWBACKUP_BITMAP_MODE_ON_SUCCESS), 0);
    cowbackup_job *job = NULL;
    CHECK_RC(cowbackup_backup_start(src, scratch, o, &job), 0);
    cowbackup_options_free(o);
    REQUIRE(job);
    CHECK_RC(cowbackup_job_snapshot(job, &view), 0);
    REQUIRE(view);
    uint8_t b[16];
    CHECK_ERR(cowbackup_driver_read(view, 5 * C64, b, sizeof b), EACCES, "cowbackup_driver_read");
    CHECK_ERR(cowbackup_driver_read(view, 0, buf, 3 * C64), EACCES, "cowbackup_driver_read"); /* fails whole */
    uint64_t pnum = SENTINEL;
    uint32_t status = 0xdead;
    CHECK_ERR(cowbackup_driver_block_status(view, 5 * C64, C64, &pnum, &status), EACCES,
              "cowbackup_driver_block_status");
    CHECK_RC(cowbackup_driver_block_status(view, 0, size, &pnum, &status), 0);
    CHECK(pnum == C64 && status == COWBACKUP_STATUS_DATA); /* stops before cluster 1 */

    /* The host's write path: mark, hook, write. */
    CHECK_RC(cowbackup_bitmap_mark(bm, 2 * C64, 10), 0);
    CHECK_RC(host_write(job, src, 2 * C64, 10, 0x33), 0);
    CHECK_RC(cowbackup_bitmap_mark(bm, 7 * C64, 10), 0);
    CHECK_RC(host_write(job, src, 7 * C64, 10, 0x33), 0);
    check_cluster(view, 0, 0x11);
    check_cluster(view, 2, 0x11);
    cowbackup_job_info i = query(job);
    CHECK(i.cow_bytes == C64); /* cluster 2 only: 7 is outside the bitmap */

    CHECK_RC(cowbackup_job_complete(job), 0);
    CHECK_RC(cowbackup_job_wait(job), 0);
    uint64_t off = 0, len = 0;
    CHECK_RC(cowbackup_bitmap_next_dirty(bm, 0, &off, &len), 0);
    CHECK(off == 2 * C64 && len == C64);
    CHECK_RC(cowbackup_bitmap_next_dirty(bm, off + len, &off, &len), 0);
    CHECK(off == 7 * C64 && len == C64);
    CHECK_RC(cowbackup_bitmap_next_dirty(bm, off + len, &off, &len), 0);
    CHECK(len == 0);
    cowbackup_driver_free(view);
    cowbackup_job_free(job);
    cowbackup_bitmap_free(bm);
    cowbackup_driver_free(src);
    cowbackup_driver_free(scratch);
    free(buf);
}

/* ---- discard: on a view, on C drivers ---- */

static void discard(void)
{
    SAY("discard on a view: whole clusters leave the copy set, the scratch C driver's discard op frees them");
    uint64_t size = 32 * C64;
    cmem *ms = cmem_new(size, 0x55), *mt = cmem_new(size, 0);
    cowbackup_driver *src = cmem_driver(ms, 0), *scratch = discard_driver(mt), *view = NULL;
    cowbackup_options *o = none_opts();
    cowbackup_job *job = NULL;
    CHECK_RC(cowbackup_backup_start(src, scratch, o, &job), 0);
    cowbackup_options_free(o);
    REQUIRE(job);
    CHECK_RC(cowbackup_job_snapshot(job, &view), 0);
    REQUIRE(view);
    reset_discards();
    CHECK_RC(host_write(job, src, 0, 100, 0x66), 0);
    CHECK(mt->data[0] == 0x55); /* the old data is in the scratch */
    CHECK_RC(cowbackup_driver_discard(view, 0, 16 * C64), 0);
    CHECK(atomic_load(&discard_calls) == 1 && discard_first_off == 0 && discard_first_len == 16 * C64);
    CHECK(mt->data[0] == 0);
    uint64_t cow = query(job).cow_bytes;
    CHECK_RC(host_write(job, src, 0, 2 * C64, 0x66), 0);
    CHECK(query(job).cow_bytes == cow); /* discarded: not copied again */
    uint8_t b[16];
    CHECK_ERR(cowbackup_driver_read(view, 100, b, sizeof b), EACCES, "cowbackup_driver_read");
    check_cluster(view, 16, 0x55);
    /* Unaligned: no whole cluster inside, nothing discarded. */
    CHECK_RC(cowbackup_driver_discard(view, 16 * C64 + 1, C64), 0);
    CHECK(atomic_load(&discard_calls) == 1);
    check_cluster(view, 16, 0x55);
    CHECK_RC(cowbackup_driver_discard(view, 0, 0), 0);
    CHECK_RC(cowbackup_job_cancel(job), 0);
    cowbackup_job_wait(job);
    cowbackup_driver_free(view);
    cowbackup_job_free(job);
    cowbackup_driver_free(src);
    cowbackup_driver_free(scratch);
    cmem_destroy(ms);
    cmem_destroy(mt);

    SAY("discard on C drivers: the op gets the exact range; NULL op or an older ops table: no-op, 0");
    cmem *m = cmem_new(size, 0x77);
    cowbackup_driver *d = discard_driver(m);
    reset_discards();
    CHECK_RC(cowbackup_driver_discard(d, 4096, 8192), 0);
    CHECK(atomic_load(&discard_calls) == 1 && discard_first_off == 4096 && discard_first_len == 8192);
    CHECK(m->data[4096] == 0 && m->data[4095] == 0x77 && m->data[4096 + 8192] == 0x77);
    CHECK_RC(cowbackup_driver_discard(d, 0, 0), 0); /* len 0: the op is not called */
    CHECK(atomic_load(&discard_calls) == 1);
    CHECK_ERR(cowbackup_driver_discard(d, size - 1, 2), EINVAL, "cowbackup_driver_discard");
    CHECK_ERR(cowbackup_driver_discard(d, UINT64_MAX, 2), EINVAL, "cowbackup_driver_discard");
    atomic_store(&discard_errno, EIO);
    CHECK_ERR(cowbackup_driver_discard(d, 0, 4096), EIO, "cowbackup_driver_discard");
    atomic_store(&discard_errno, 0);
    CHECK_RC(cowbackup_driver_flush(d), 0);
    cowbackup_driver_free(d);

    /* A caller compiled before the discard op: its table ends at `release`. Whatever lies
     * past its ops_size is not read (here a discard op that must not be called). */
    reset_discards();
    CHECK_RC(cowbackup_driver_new(&discard_ops, offsetof(cowbackup_driver_ops, discard), m, size, 0, &d), 0);
    CHECK_RC(cowbackup_driver_discard(d, 0, C64), 0);
    CHECK(atomic_load(&discard_calls) == 0 && m->data[4096 + 8192] == 0x77);
    cowbackup_driver_free(d);
    /* The plain cmem table (discard NULL). */
    d = cmem_driver(m, 0);
    CHECK_RC(cowbackup_driver_discard(d, 0, C64), 0);
    CHECK(atomic_load(&discard_calls) == 0);
    cowbackup_driver_free(d);
    cmem_destroy(m);
}

/* ---- block_status and flush on other drivers ---- */

static void status_and_flush(void)
{
    SAY("block_status of C, memory and file drivers; flush");
    uint64_t size = 32 * C64;
    cmem *m = cmem_new(size, 1);
    m->data_end = 8 * C64;
    cowbackup_driver *d = cmem_driver(m, 0);
    uint64_t pnum = SENTINEL;
    uint32_t status = 0xdead;
    CHECK_RC(cowbackup_driver_block_status(d, 0, size, &pnum, &status), 0);
    CHECK(pnum == 8 * C64 && status == COWBACKUP_STATUS_DATA);
    CHECK_RC(cowbackup_driver_block_status(d, pnum, size - pnum, &pnum, &status), 0);
    CHECK(pnum == 24 * C64 && status == COWBACKUP_STATUS_ZERO);
    CHECK_RC(cowbackup_driver_flush(d), 0);
    cowbackup_driver_free(d);
    cmem_destroy(m);

    cowbackup_driver *mem = NULL;
    CHECK_RC(cowbackup_memory_new(size, &mem), 0);
    CHECK_RC(cowbackup_driver_block_status(mem, 0, size, &pnum, &status), 0);
    CHECK(pnum == size && status == COWBACKUP_STATUS_ZERO);
    uint8_t b[100];
    memset(b, 9, sizeof b);
    CHECK_RC(cowbackup_driver_write(mem, MIB - 50, b, sizeof b), 0);
    CHECK_RC(cowbackup_driver_block_status(mem, MIB - 10, 20, &pnum, &status), 0);
    CHECK(pnum == 20 && status == COWBACKUP_STATUS_DATA);
    CHECK_RC(cowbackup_driver_discard(mem, 0, size), 0);
    CHECK_RC(cowbackup_driver_block_status(mem, 0, size, &pnum, &status), 0);
    CHECK(pnum == size && status == COWBACKUP_STATUS_ZERO);
    CHECK_RC(cowbackup_driver_flush(mem), 0);
    cowbackup_driver_free(mem);

    char path[] = "/tmp/cowbackup-snapshot-XXXXXX";
    int fd = mkstemp(path);
    REQUIRE(fd >= 0);
    close(fd);
    cowbackup_driver *f = NULL;
    CHECK_RC(cowbackup_file_create(path, size, COWBACKUP_CREATE_OVERWRITE, &f), 0);
    REQUIRE(f);
    CHECK_RC(cowbackup_driver_write(f, C64, b, sizeof b), 0);
    CHECK_RC(cowbackup_driver_flush(f), 0);
    CHECK_RC(cowbackup_driver_block_status(f, C64, C64, &pnum, &status), 0);
    CHECK(status & COWBACKUP_STATUS_DATA);
    CHECK_RC(cowbackup_driver_discard(f, 0, size), 0);
    CHECK_RC(cowbackup_driver_block_status(f, 0, size, &pnum, &status), 0);
    CHECK(pnum == size && status == COWBACKUP_STATUS_ZERO);
    cowbackup_driver_free(f);
    CHECK_RC(cowbackup_file_open(path, 0, &f), 0);
    CHECK_ERR(cowbackup_driver_discard(f, 0, C64), EBADF, "cowbackup_driver_discard");
    cowbackup_driver_free(f);
    unlink(path);
}

/* ---- push mode: a second job whose source is the view, with discard_source ---- */

struct writer {
    cowbackup_job *job;
    cowbackup_driver *src;
    uint64_t size;
    atomic_int stop;
    atomic_int writes;
    int failed;
};

static void *writer_main(void *arg)
{
    struct writer *w = arg;
    uint64_t seed = 42;
    uint8_t buf[8192];
    while (!atomic_load(&w->stop)) {
        uint64_t len = 1 + next_random(&seed) % sizeof buf;
        uint64_t off = next_random(&seed) % (w->size - len);
        fill_random(buf, len, &seed);
        if (cowbackup_cow_before_write(w->job, off, len) != 0 || cowbackup_driver_write(w->src, off, buf, len) != 0) {
            w->failed = 1;
            break;
        }
        atomic_fetch_add(&w->writes, 1);
        sleep_ms(1);
    }
    return NULL;
}

static void push(void)
{
    SAY("push: a FULL job from the view with discard_source while the host writes; the scratch ends empty");
    uint64_t size = 64 * C64;
    cmem *ms = cmem_new(size, 0), *mt = cmem_new(size, 0), *mb = cmem_new(size, 0);
    uint64_t seed = 7;
    fill_random(ms->data, size, &seed);
    uint8_t *pit = malloc(size);
    REQUIRE(pit);
    memcpy(pit, ms->data, size);
    mb->slow_us = 20000; /* a slow backup target: the host writes meanwhile */
    cowbackup_driver *src = cmem_driver(ms, 0), *scratch = discard_driver(mt), *backup = cmem_driver(mb, 0);
    cowbackup_driver *view = NULL;
    cowbackup_options *o = none_opts();
    cowbackup_job *fleece = NULL, *job = NULL;
    CHECK_RC(cowbackup_backup_start(src, scratch, o, &fleece), 0);
    REQUIRE(fleece);
    CHECK_RC(cowbackup_job_snapshot(fleece, &view), 0);
    REQUIRE(view);
    CHECK_RC(cowbackup_options_set_sync(o, COWBACKUP_SYNC_FULL), 0);
    CHECK_ERR(cowbackup_options_set_discard_source(o, 2), EINVAL, "cowbackup_options_set_discard_source");
    CHECK_ERR(cowbackup_options_set_discard_source(NULL, 1), EINVAL, "cowbackup_options_set_discard_source");
    CHECK_RC(cowbackup_options_set_discard_source(o, 1), 0);
    CHECK_RC(cowbackup_options_set_max_chunk(o, 4 * C64), 0);
    reset_discards();
    struct writer w = { .job = fleece, .src = src, .size = size };
    pthread_t t;
    REQUIRE(pthread_create(&t, NULL, writer_main, &w) == 0);
    while (atomic_load(&w.writes) < 5 && !w.failed)
        sleep_ms(1);
    CHECK_RC(cowbackup_backup_start(view, backup, o, &job), 0);
    cowbackup_options_free(o);
    REQUIRE(job);
    CHECK_RC(cowbackup_job_wait(job), 0);
    atomic_store(&w.stop, 1);
    pthread_join(t, NULL);
    CHECK(!w.failed);
    cowbackup_job_info i = query(fleece);
    SAY("%d host writes, %llu bytes copied into the scratch, %lu discard calls", atomic_load(&w.writes),
        (unsigned long long)i.cow_bytes, (unsigned long)atomic_load(&discard_calls));
    CHECK(i.cow_bytes > 0);
    long long at = first_diff(mb->data, pit, size);
    CHECK(at < 0);
    if (at >= 0)
        fprintf(stderr, "the pushed backup differs from the point in time at byte %lld\n", at);
    /* Every cluster was discarded once, and so released from the scratch: all zero again. */
    CHECK(atomic_load(&discard_bytes) == size);
    CHECK(all_are(mt->data, size, 0));
    CHECK_RC(cowbackup_job_complete(fleece), 0);
    CHECK_RC(cowbackup_job_wait(fleece), 0);
    CHECK(all_are(mt->data, size, 0));
    cowbackup_job_free(job);
    cowbackup_driver_free(view);
    cowbackup_job_free(fleece);
    cowbackup_driver_free(src);
    cowbackup_driver_free(scratch);
    cowbackup_driver_free(backup);
    cmem_destroy(ms);
    cmem_destroy(mt);
    cmem_destroy(mb);
    free(pit);
}

/* ---- bad input ---- */

static void bad_input(void)
{
    SAY("NULL arguments: -EINVAL, out-parameters untouched");
    cowbackup_driver *d = NULL, *v = BAD_PTR;
    CHECK_RC(cowbackup_memory_new(C64, &d), 0);
    cowbackup_job *job = NULL;
    cowbackup_driver *t = NULL;
    CHECK_RC(cowbackup_memory_new(C64, &t), 0);
    cowbackup_options *o = none_opts();
    CHECK_RC(cowbackup_backup_start(d, t, o, &job), 0);
    cowbackup_options_free(o);
    CHECK_ERR(cowbackup_job_snapshot(NULL, &v), EINVAL, "cowbackup_job_snapshot");
    CHECK(v == BAD_PTR);
    CHECK_ERR(cowbackup_job_snapshot(job, NULL), EINVAL, "cowbackup_job_snapshot");
    CHECK_ERR(cowbackup_job_complete(NULL), EINVAL, "cowbackup_job_complete");
    uint64_t pnum = SENTINEL;
    uint32_t status = 0xdead;
    CHECK_ERR(cowbackup_driver_block_status(NULL, 0, 1, &pnum, &status), EINVAL, "cowbackup_driver_block_status");
    CHECK_ERR(cowbackup_driver_block_status(d, 0, 1, NULL, &status), EINVAL, "cowbackup_driver_block_status");
    CHECK_ERR(cowbackup_driver_block_status(d, 0, 1, &pnum, NULL), EINVAL, "cowbackup_driver_block_status");
    CHECK(pnum == SENTINEL && status == 0xdead);
    CHECK_ERR(cowbackup_driver_discard(NULL, 0, 1), EINVAL, "cowbackup_driver_discard");
    CHECK_ERR(cowbackup_driver_flush(NULL), EINVAL, "cowbackup_driver_flush");
    CHECK_RC(cowbackup_job_complete(job), 0);
    CHECK_RC(cowbackup_job_wait(job), 0);
    cowbackup_job_free(job);
    cowbackup_driver_free(d);
    cowbackup_driver_free(t);
}

int main(void)
{
    discard_ops = cmem_ops;
    discard_ops.discard = dev_discard;
    fleecing();
    outlives_job();
    cbw_enospc(COWBACKUP_CBW_BREAK_GUEST_WRITE);
    cbw_enospc(COWBACKUP_CBW_BREAK_SNAPSHOT);
    pull_mode();
    discard();
    status_and_flush();
    push();
    bad_input();
    return test_finish();
}
