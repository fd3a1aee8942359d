/* 8 host threads write random data at random unaligned offsets through the hook (hook, then
 * write) into a C memory driver while the job copies it into another C memory driver; the
 * target must equal the source as it was at start, byte for byte. */
#include "common.h"

const char *test_name = "stress";

#define THREADS 8
#define WRITES 250

struct writer {
    cowbackup_job *job;
    cowbackup_driver *src;
    uint64_t size, cluster, seed;
    int failures;
};

static void *writer(void *arg)
{
    struct writer *w = arg;
    uint8_t *buf = malloc(3 * w->cluster);
    REQUIRE(buf != NULL);
    for (int i = 0; i < WRITES; i++) {
        uint64_t off = next_random(&w->seed) % w->size;
        uint64_t len = 1 + next_random(&w->seed) % (3 * w->cluster);
        if (len > w->size - off)
            len = w->size - off;
        fill_random(buf, len, &w->seed);
        int rc = cowbackup_cow_before_write(w->job, off, len);
        if (rc != 0) {
            fprintf(stderr, "FAIL hook(%llu, %llu) = %d: %s\n", (unsigned long long)off, (unsigned long long)len, rc,
                    cowbackup_last_error());
            w->failures++;
            continue; /* a failed hook means: do not write */
        }
        rc = cowbackup_driver_write(w->src, off, buf, len);
        if (rc != 0) {
            fprintf(stderr, "FAIL write = %d: %s\n", rc, cowbackup_last_error());
            w->failures++;
        }
    }
    free(buf);
    return NULL;
}

static void round_(uint64_t size, uint64_t cluster, uint32_t workers, uint64_t speed, uint64_t seed)
{
    SAY("%d threads x %d writes, size %llu, cluster %llu, %u workers, speed %llu B/s", THREADS, WRITES,
        (unsigned long long)size, (unsigned long long)cluster, workers, (unsigned long long)speed);
    cmem *sm = cmem_new(size, 0), *tm = cmem_new(size, 0);
    fill_random(sm->data, size, &seed);
    /* A few zero clusters, so that zero detection is part of the run. */
    memset(sm->data + cluster, 0, 2 * cluster);
    uint8_t *snapshot = malloc(size);
    REQUIRE(snapshot != NULL);
    memcpy(snapshot, sm->data, size);
    memset(tm->data, 0xcc, size);

    cowbackup_driver *src = cmem_driver(sm, 0), *dst = cmem_driver(tm, 0);
    cowbackup_options *o = cowbackup_options_new();
    CHECK_RC(cowbackup_options_set_cluster_size(o, cluster), 0);
    CHECK_RC(cowbackup_options_set_workers(o, workers), 0);
    CHECK_RC(cowbackup_options_set_max_chunk(o, 4 * cluster), 0);
    CHECK_RC(cowbackup_options_set_speed(o, speed), 0);
    cowbackup_job *job = NULL;
    REQUIRE(cowbackup_backup_start(src, dst, o, &job) == 0);
    cowbackup_options_free(o);

    pthread_t th[THREADS];
    struct writer w[THREADS];
    for (int i = 0; i < THREADS; i++) {
        w[i] = (struct writer){ job, src, size, cluster, seed * 1000 + (uint64_t)i, 0 };
        REQUIRE(pthread_create(&th[i], NULL, writer, &w[i]) == 0);
    }
    for (int i = 0; i < THREADS; i++) {
        pthread_join(th[i], NULL);
        CHECK(w[i].failures == 0);
    }
    cowbackup_job_info info = query(job);
    printf("[%s] writers done: job %s, %llu/%llu bytes done, %llu cow requests (%llu bytes)\n", test_name,
           state_name(info.state), (unsigned long long)info.offset, (unsigned long long)info.len,
           (unsigned long long)info.cow_requests, (unsigned long long)info.cow_bytes);
    CHECK(info.cow_requests > 0); /* the writers really raced the background copy */
    CHECK_RC(cowbackup_job_set_speed(job, 0), 0);
    CHECK_RC(cowbackup_job_wait(job), 0);
    info = query(job);
    CHECK(info.state == COWBACKUP_JOB_COMPLETED);
    CHECK(info.offset == size);
    long long d = first_diff(tm->data, snapshot, size);
    if (d >= 0)
        fprintf(stderr, "target differs from the point-in-time copy at offset %lld\n", d);
    CHECK(d == -1);
    CHECK(first_diff(sm->data, snapshot, size) != -1); /* the source did change meanwhile */

    cowbackup_job_free(job);
    cowbackup_driver_free(src);
    cowbackup_driver_free(dst);
    CHECK(atomic_load(&sm->released) == 1 && atomic_load(&tm->released) == 1);
    cmem_destroy(sm);
    cmem_destroy(tm);
    free(snapshot);
}

int main(void)
{
    round_(16 << 20, 65536, 4, 8 << 20, 1);
    round_(4 << 20, 4096, 2, 2 << 20, 2);
    round_((8 << 20) + 12345, 16384, 8, 4 << 20, 3); /* partial last cluster */
    return test_finish();
}
