/* Lifecycle of every object: version, options, drivers (memory, file, C), jobs (completed,
 * cancelled, freed while running, sync NONE and TOP), completion callback, *_free(NULL). */
#include "common.h"

#include <unistd.h>

const char *test_name = "lifecycle";

struct completion {
    atomic_int calls;
    atomic_int ret;
    pthread_t caller;
    atomic_int on_main_thread;
};

static pthread_t main_thread;

static void on_complete(void *opaque, int ret)
{
    struct completion *c = opaque;
    atomic_store(&c->ret, ret);
    atomic_store(&c->on_main_thread, pthread_equal(pthread_self(), main_thread) ? 1 : 0);
    atomic_fetch_add(&c->calls, 1);
}

/* cowbackup_job_wait may return just before the callback runs (it runs after the final
 * state is set); cowbackup_job_free waits for it. Give it a moment. */
static int calls_after_wait(struct completion *c)
{
    for (int i = 0; i < 500 && atomic_load(&c->calls) == 0; i++)
        sleep_ms(10);
    return atomic_load(&c->calls);
}

static void version(void)
{
    char want[64];
    snprintf(want, sizeof want, "%d.%d.%d", COWBACKUP_VERSION_MAJOR, COWBACKUP_VERSION_MINOR,
             COWBACKUP_VERSION_PATCH);
    SAY("cowbackup_version() \"%s\" equals the header's COWBACKUP_VERSION_* \"%s\"", cowbackup_version(), want);
    CHECK(strcmp(cowbackup_version(), want) == 0);
    CHECK(cowbackup_last_error() != NULL);
}

static void free_null(void)
{
    SAY("*_free(NULL) does nothing");
    cowbackup_driver_free(NULL);
    cowbackup_options_free(NULL);
    cowbackup_job_free(NULL);
}

static void options_and_drivers(void)
{
    SAY("options new/set/free; memory, file and C drivers new/size/read/write/free");
    cowbackup_options *o = cowbackup_options_new();
    CHECK(o != NULL);
    CHECK_RC(cowbackup_options_set_cluster_size(o, 4096), 0);
    CHECK_RC(cowbackup_options_set_sync(o, COWBACKUP_SYNC_TOP), 0);
    CHECK_RC(cowbackup_options_set_workers(o, 64), 0);
    CHECK_RC(cowbackup_options_set_max_chunk(o, 1 << 30), 0);
    CHECK_RC(cowbackup_options_set_speed(o, 12345), 0);
    CHECK_RC(cowbackup_options_set_on_source_error(o, COWBACKUP_ERROR_IGNORE), 0);
    CHECK_RC(cowbackup_options_set_on_target_error(o, COWBACKUP_ERROR_ENOSPC), 0);
    CHECK_RC(cowbackup_options_set_on_cbw_error(o, COWBACKUP_CBW_BREAK_SNAPSHOT), 0);
    CHECK_RC(cowbackup_options_set_cbw_timeout(o, 1000), 0);
    CHECK_RC(cowbackup_options_set_cbw_timeout(o, 0), 0);
    CHECK_RC(cowbackup_options_set_target_is_zero(o, 1), 0);
    CHECK_RC(cowbackup_options_set_completion(o, on_complete, NULL), 0);
    CHECK_RC(cowbackup_options_set_completion(o, NULL, NULL), 0);
    cowbackup_options_free(o);

    cowbackup_driver *m = NULL;
    uint64_t size = 0;
    CHECK_RC(cowbackup_memory_new(1 << 20, &m), 0);
    CHECK_RC(cowbackup_driver_size(m, &size), 0);
    CHECK(size == 1 << 20);
    uint8_t buf[1000], back[1000];
    memset(buf, 0xab, sizeof buf);
    CHECK_RC(cowbackup_driver_write(m, 12345, buf, sizeof buf), 0);
    CHECK_RC(cowbackup_driver_read(m, 12345, back, sizeof back), 0);
    CHECK(memcmp(buf, back, sizeof buf) == 0);
    cowbackup_driver_free(m);

    char path[] = "/tmp/cowbackup-lifecycle-XXXXXX";
    int fd = mkstemp(path);
    REQUIRE(fd >= 0);
    close(fd);
    cowbackup_driver *f = NULL;
    /* mkstemp made the file: replacing it needs COWBACKUP_CREATE_OVERWRITE (-EEXIST otherwise) */
    CHECK_ERR(cowbackup_file_create(path, 3 << 20, 0, &f), EEXIST, "cowbackup_file_create");
    CHECK_RC(cowbackup_file_create(path, 3 << 20, COWBACKUP_CREATE_OVERWRITE, &f), 0);
    CHECK_RC(cowbackup_driver_write(f, 4096, buf, sizeof buf), 0);
    cowbackup_driver_free(f);
    f = NULL;
    CHECK_RC(cowbackup_file_open(path, 0, &f), 0);
    CHECK_RC(cowbackup_driver_size(f, &size), 0);
    CHECK(size == 3 << 20);
    memset(back, 0, sizeof back);
    CHECK_RC(cowbackup_driver_read(f, 4096, back, sizeof back), 0);
    CHECK(memcmp(buf, back, sizeof buf) == 0);
    SAY("a read-only file refuses writes with a negative errno");
    int rc = cowbackup_driver_write(f, 0, buf, 10);
    CHECK(rc < 0);
    cowbackup_driver_free(f);
    unlink(path);

    cmem *cm = cmem_new(8192, 0);
    cowbackup_driver *c = cmem_driver(cm, 0);
    CHECK_RC(cowbackup_driver_write(c, 100, buf, 50), 0);
    CHECK(cm->data[100] == 0xab && cm->data[149] == 0xab && cm->data[150] == 0);
    CHECK(atomic_load(&cm->released) == 0);
    SAY("a C driver's release runs once, at cowbackup_driver_free");
    cowbackup_driver_free(c);
    CHECK(atomic_load(&cm->released) == 1);
    cmem_destroy(cm);
}

static void completed_job(void)
{
    SAY("a job completes: wait returns 0 (twice), state COMPLETED, progress full, callback once with 0 on a library thread");
    const uint64_t size = 4 << 20;
    cmem *sm = cmem_new(size, 0x5a);
    cowbackup_driver *src = cmem_driver(sm, 0);
    cowbackup_driver *dst = NULL;
    CHECK_RC(cowbackup_memory_new(size, &dst), 0);
    struct completion comp = { 0 };
    cowbackup_options *o = cowbackup_options_new();
    CHECK_RC(cowbackup_options_set_completion(o, on_complete, &comp), 0);
    cowbackup_job *job = NULL;
    CHECK_RC(cowbackup_backup_start(src, dst, o, &job), 0);
    cowbackup_options_free(o); /* the job copied them */
    REQUIRE(job != NULL);
    CHECK_RC(cowbackup_job_wait(job), 0);
    CHECK_RC(cowbackup_job_wait(job), 0);
    cowbackup_job_info info = query(job);
    CHECK(info.state == COWBACKUP_JOB_COMPLETED);
    CHECK(info.error == 0);
    CHECK(info.len == size && info.offset == size);
    CHECK(info.bytes_copied == size);
    for (int i = 0; i < 8; i++)
        CHECK(info.reserved[i] == 0);
    CHECK(calls_after_wait(&comp) == 1);
    CHECK(atomic_load(&comp.ret) == 0);
    CHECK(atomic_load(&comp.on_main_thread) == 0);
    SAY("pause/resume of an ended job: -EBUSY; cancel: 0; the hook is a no-op");
    CHECK_ERR(cowbackup_job_pause(job), EBUSY, "cowbackup_job_pause");
    CHECK_ERR(cowbackup_job_resume(job), EBUSY, "cowbackup_job_resume");
    CHECK_RC(cowbackup_job_cancel(job), 0);
    CHECK_RC(cowbackup_cow_before_write(job, 0, size), 0);
    uint8_t *t = read_all(dst, size);
    CHECK(first_diff(t, sm->data, size) == -1);
    free(t);
    cowbackup_job_free(job);
    CHECK(atomic_load(&comp.calls) == 1);
    cowbackup_driver_free(src);
    cowbackup_driver_free(dst);
    CHECK(atomic_load(&sm->released) == 1);
    cmem_destroy(sm);
}

static void cancelled_job(void)
{
    SAY("cancel: wait returns -ECANCELED, state CANCELLED, callback -ECANCELED, hook a no-op");
    const uint64_t size = 4 << 20;
    cowbackup_driver *src = NULL, *dst = NULL;
    CHECK_RC(cowbackup_memory_new(size, &src), 0);
    CHECK_RC(cowbackup_memory_new(size, &dst), 0);
    /* Data in every cluster: an all-zero source into a target reading zeroes has nothing to
     * copy, and such a job can complete before the pause below (it did under valgrind). */
    uint8_t *fill = malloc(size);
    REQUIRE(fill != NULL);
    memset(fill, 0xab, size);
    CHECK_RC(cowbackup_driver_write(src, 0, fill, size), 0);
    free(fill);
    struct completion comp = { 0 };
    cowbackup_options *o = cowbackup_options_new();
    CHECK_RC(cowbackup_options_set_speed(o, 1), 0);
    CHECK_RC(cowbackup_options_set_completion(o, on_complete, &comp), 0);
    cowbackup_job *job = NULL;
    CHECK_RC(cowbackup_backup_start(src, dst, o, &job), 0);
    cowbackup_options_free(o);
    CHECK_RC(cowbackup_job_pause(job), 0);
    CHECK(query(job).state == COWBACKUP_JOB_PAUSED);
    CHECK_RC(cowbackup_job_resume(job), 0);
    CHECK(query(job).state == COWBACKUP_JOB_RUNNING);
    CHECK_RC(cowbackup_job_set_speed(job, 2), 0);
    CHECK(query(job).speed == 2);
    CHECK_RC(cowbackup_job_cancel(job), 0);
    CHECK_ERR(cowbackup_job_wait(job), ECANCELED, "cowbackup_job_wait");
    CHECK(query(job).state == COWBACKUP_JOB_CANCELLED);
    CHECK(calls_after_wait(&comp) == 1);
    CHECK(atomic_load(&comp.ret) == -ECANCELED);
    CHECK_RC(cowbackup_cow_before_write(job, 0, size), 0);
    cowbackup_job_free(job);
    cowbackup_driver_free(src);
    cowbackup_driver_free(dst);
}

static void free_running_job(void)
{
    SAY("free of a running job: drivers freed first, job_free cancels, waits, calls back -ECANCELED, releases the C drivers");
    const uint64_t size = 8 << 20;
    cmem *sm = cmem_new(size, 0x11), *tm = cmem_new(size, 0);
    cowbackup_driver *src = cmem_driver(sm, 0), *dst = cmem_driver(tm, 0);
    struct completion comp = { 0 };
    cowbackup_options *o = cowbackup_options_new();
    CHECK_RC(cowbackup_options_set_speed(o, 1), 0);
    CHECK_RC(cowbackup_options_set_completion(o, on_complete, &comp), 0);
    cowbackup_job *job = NULL;
    CHECK_RC(cowbackup_backup_start(src, dst, o, &job), 0);
    cowbackup_options_free(o);
    cowbackup_driver_free(src);
    cowbackup_driver_free(dst);
    CHECK(atomic_load(&sm->released) == 0 && atomic_load(&tm->released) == 0);
    CHECK(query(job).state == COWBACKUP_JOB_RUNNING);
    CHECK(atomic_load(&comp.calls) == 0);
    cowbackup_job_free(job);
    CHECK(atomic_load(&comp.calls) == 1);
    CHECK(atomic_load(&comp.ret) == -ECANCELED);
    CHECK(atomic_load(&sm->released) == 1 && atomic_load(&tm->released) == 1);
    cmem_destroy(sm);
    cmem_destroy(tm);
}

static void sync_none_and_top(void)
{
    SAY("sync NONE: no background copy; the hook copies; cancel ends it");
    const uint64_t size = 2 << 20;
    cmem *sm = cmem_new(size, 0x77), *tm = cmem_new(size, 0);
    cowbackup_driver *src = cmem_driver(sm, 0), *dst = cmem_driver(tm, 0);
    cowbackup_options *o = cowbackup_options_new();
    CHECK_RC(cowbackup_options_set_sync(o, COWBACKUP_SYNC_NONE), 0);
    cowbackup_job *job = NULL;
    CHECK_RC(cowbackup_backup_start(src, dst, o, &job), 0);
    sleep_ms(50);
    CHECK(query(job).bytes_copied == 0);
    CHECK_RC(cowbackup_cow_before_write(job, 70000, 10), 0);
    cowbackup_job_info info = query(job);
    CHECK(info.cow_requests == 1 && info.cow_bytes == 65536);
    CHECK(tm->data[65536] == 0x77 && tm->data[131071] == 0x77 && tm->data[131072] == 0 && tm->data[0] == 0);
    CHECK_RC(cowbackup_job_cancel(job), 0);
    CHECK_ERR(cowbackup_job_wait(job), ECANCELED, "cowbackup_job_wait");
    cowbackup_job_free(job);

    SAY("sync TOP: only what block_status calls DATA is copied, the rest skipped");
    sm->data_end = size / 2;
    memset(tm->data, 0xee, size);
    CHECK_RC(cowbackup_options_set_sync(o, COWBACKUP_SYNC_TOP), 0);
    CHECK_RC(cowbackup_backup_start(src, dst, o, &job), 0);
    CHECK_RC(cowbackup_job_wait(job), 0);
    info = query(job);
    CHECK(info.bytes_skipped == size / 2);
    CHECK(info.bytes_copied == size / 2);
    CHECK(tm->data[0] == 0x77 && tm->data[size / 2 - 1] == 0x77);
    /* The unallocated half reads as zero in the source: the target gets zeroes there. */
    CHECK(tm->data[size / 2] == 0 && tm->data[size - 1] == 0);
    cowbackup_job_free(job);
    cowbackup_options_free(o);
    cowbackup_driver_free(src);
    cowbackup_driver_free(dst);
    CHECK(atomic_load(&sm->released) == 1 && atomic_load(&tm->released) == 1);
    cmem_destroy(sm);
    cmem_destroy(tm);
}

int main(void)
{
    main_thread = pthread_self();
    version();
    free_null();
    options_and_drivers();
    completed_job();
    cancelled_job();
    free_running_job();
    sync_none_and_top();
    return test_finish();
}
