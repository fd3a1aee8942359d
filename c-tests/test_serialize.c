/* COWBACKUP_DRIVER_SERIALIZE really serializes a driver's ops; release runs exactly once,
 * after job free and driver free in either order; an older, shorter ops table works. */
#include "common.h"

const char *test_name = "serialize";

#define MiB (1024 * 1024)

struct host {
    cowbackup_job *job;
    cowbackup_driver *src;
    uint64_t seed;
};

static void *host_writes(void *arg)
{
    struct host *h = arg;
    uint8_t buf[5000];
    for (int i = 0; i < 40; i++) {
        uint64_t off = next_random(&h->seed) % (8 * MiB - sizeof buf);
        fill_random(buf, sizeof buf, &h->seed);
        if (cowbackup_cow_before_write(h->job, off, sizeof buf) == 0)
            cowbackup_driver_write(h->src, off, buf, sizeof buf);
    }
    return NULL;
}

/* Run a job with 8 workers and 4 host threads; return the max in-flight ops seen on source and target. */
static void run(uint32_t flags, int *max_src, int *max_dst)
{
    const uint64_t size = 8 * MiB;
    cmem *sm = cmem_new(size, 0x31), *tm = cmem_new(size, 0);
    sm->locked = tm->locked = 0; /* no lock of their own: only the library may serialize */
    sm->slow_us = tm->slow_us = 300;
    uint8_t *snapshot = malloc(size);
    REQUIRE(snapshot != NULL);
    memcpy(snapshot, sm->data, size);
    cowbackup_driver *src = cmem_driver(sm, flags), *dst = cmem_driver(tm, flags);
    cowbackup_options *o = cowbackup_options_new();
    CHECK_RC(cowbackup_options_set_workers(o, 8), 0);
    CHECK_RC(cowbackup_options_set_max_chunk(o, 65536), 0);
    cowbackup_job *job = NULL;
    REQUIRE(cowbackup_backup_start(src, dst, o, &job) == 0);
    pthread_t th[4];
    struct host h[4];
    for (int i = 0; i < 4; i++) {
        h[i] = (struct host){ job, src, 100 + (uint64_t)i };
        REQUIRE(pthread_create(&th[i], NULL, host_writes, &h[i]) == 0);
    }
    for (int i = 0; i < 4; i++)
        pthread_join(th[i], NULL);
    CHECK_RC(cowbackup_job_wait(job), 0);
    CHECK(first_diff(tm->data, snapshot, size) == -1);
    *max_src = atomic_load(&sm->max_inflight);
    *max_dst = atomic_load(&tm->max_inflight);
    cowbackup_job_free(job);
    cowbackup_options_free(o);
    cowbackup_driver_free(src);
    cowbackup_driver_free(dst);
    cmem_destroy(sm);
    cmem_destroy(tm);
    free(snapshot);
}

static void serialize(void)
{
    int s, d;
    SAY("without SERIALIZE, 8 workers + 4 host threads overlap in the driver (the counter can see it)");
    run(0, &s, &d);
    printf("[%s] max in flight: source %d, target %d\n", test_name, s, d);
    CHECK(s > 1 || d > 1);
    SAY("with COWBACKUP_DRIVER_SERIALIZE, never more than one op in flight per driver");
    run(COWBACKUP_DRIVER_SERIALIZE, &s, &d);
    printf("[%s] max in flight: source %d, target %d\n", test_name, s, d);
    CHECK(s == 1 && d == 1);
}

static void release_once(int job_first)
{
    SAY("release exactly once: %s", job_first ? "job freed, then drivers" : "drivers freed, then job");
    cmem *sm = cmem_new(MiB, 1), *tm = cmem_new(MiB, 0);
    cowbackup_driver *src = cmem_driver(sm, COWBACKUP_DRIVER_SERIALIZE), *dst = cmem_driver(tm, 0);
    cowbackup_job *job = NULL;
    REQUIRE(cowbackup_backup_start(src, dst, NULL, &job) == 0);
    CHECK_RC(cowbackup_job_wait(job), 0);
    if (job_first) {
        cowbackup_job_free(job);
        CHECK(atomic_load(&sm->released) == 0 && atomic_load(&tm->released) == 0);
        cowbackup_driver_free(src);
        CHECK(atomic_load(&sm->released) == 1 && atomic_load(&tm->released) == 0);
        cowbackup_driver_free(dst);
    } else {
        cowbackup_driver_free(src);
        cowbackup_driver_free(dst);
        CHECK(atomic_load(&sm->released) == 0 && atomic_load(&tm->released) == 0);
        cowbackup_job_free(job);
    }
    CHECK(atomic_load(&sm->released) == 1 && atomic_load(&tm->released) == 1);
    cmem_destroy(sm);
    cmem_destroy(tm);
}

static void old_ops_table(void)
{
    SAY("an older caller's table (read and write only) works; ops past ops_size are not called");
    cmem *sm = cmem_new(MiB, 9), *tm = cmem_new(MiB, 0);
    cowbackup_driver *src = NULL, *dst = NULL;
    /* The full table, with release, but announced as only read + write. */
    CHECK_RC(cowbackup_driver_new(&cmem_ops, 2 * sizeof(void *), sm, MiB, 0, &src), 0);
    CHECK_RC(cowbackup_driver_new(&cmem_ops, 2 * sizeof(void *), tm, MiB, 0, &dst), 0);
    memset(sm->data + 4096, 0, 65536 * 2); /* zero clusters: written with the default write_zeroes */
    memset(tm->data, 0xff, MiB);
    cowbackup_job *job = NULL;
    REQUIRE(cowbackup_backup_start(src, dst, NULL, &job) == 0);
    CHECK_RC(cowbackup_job_wait(job), 0);
    CHECK(first_diff(tm->data, sm->data, MiB) == -1);
    cowbackup_job_free(job);
    cowbackup_driver_free(src);
    cowbackup_driver_free(dst);
    CHECK(atomic_load(&sm->released) == 0 && atomic_load(&tm->released) == 0);
    cmem_destroy(sm);
    cmem_destroy(tm);

    SAY("a newer caller's longer table: accepted when the unknown ops are NULL, -ENOTSUP otherwise");
    struct {
        cowbackup_driver_ops ops;
        void (*future)(void);
    } newer = { cmem_ops, NULL };
    cmem *m = cmem_new(4096, 0);
    cowbackup_driver *d = NULL;
    CHECK_RC(cowbackup_driver_new(&newer.ops, sizeof newer, m, 4096, 0, &d), 0);
    cowbackup_driver_free(d);
    CHECK(atomic_load(&m->released) == 1);
    newer.future = (void (*)(void))abort;
    d = (cowbackup_driver *)0x1;
    CHECK_ERR(cowbackup_driver_new(&newer.ops, sizeof newer, m, 4096, 0, &d), ENOTSUP, "cowbackup_driver_new");
    CHECK(d == (cowbackup_driver *)0x1);
    CHECK(atomic_load(&m->released) == 1);
    cmem_destroy(m);
}

int main(void)
{
    serialize();
    release_once(1);
    release_once(0);
    old_ops_table();
    return test_finish();
}
