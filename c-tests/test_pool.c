/* cowbackup_pool_new / cowbackup_options_set_pool: many jobs copied by the threads of one
 * pool. Sixteen jobs over C drivers share a pool of two threads while host threads write
 * into four of the sources through the hook: every target is its point in time. The pool
 * handle and the options are freed while the jobs still run (the jobs hold their own
 * references). Bad input is rejected with -EINVAL and a message. */
#include "common.h"

#include <pthread.h>

const char *test_name = "pool";

#define MiB (1024 * 1024)
#define KiB 1024
#define JOBS 16
static const uint64_t size = 4 * MiB;

static void bad_input(void)
{
    cowbackup_pool *p = (cowbackup_pool *)0x1;
    CHECK_ERR(cowbackup_pool_new(0, COWBACKUP_WORKER_PRIORITY_NORMAL, &p), EINVAL, "pool threads");
    CHECK(p == (cowbackup_pool *)0x1); /* out-parameter untouched on failure */
    CHECK_ERR(cowbackup_pool_new(257, COWBACKUP_WORKER_PRIORITY_NORMAL, &p), EINVAL, "pool threads");
    CHECK_ERR(cowbackup_pool_new(2, 99, &p), EINVAL, "cowbackup_pool_new");
    CHECK_ERR(cowbackup_pool_new(2, COWBACKUP_WORKER_PRIORITY_NORMAL, NULL), EINVAL, "cowbackup_pool_new");
    CHECK_ERR(cowbackup_options_set_pool(NULL, NULL), EINVAL, "cowbackup_options_set_pool");
    cowbackup_pool_free(NULL);
    /* Setting NULL clears a pool set before. */
    cowbackup_pool *pool = NULL;
    REQUIRE(cowbackup_pool_new(1, COWBACKUP_WORKER_PRIORITY_LOW, &pool) == 0);
    cowbackup_options *o = cowbackup_options_new();
    CHECK_RC(cowbackup_options_set_pool(o, pool), 0);
    CHECK_RC(cowbackup_options_set_pool(o, NULL), 0);
    cowbackup_options_free(o);
    cowbackup_pool_free(pool);
}

struct writer {
    cowbackup_job *job;
    cmem *sm;
    atomic_int *stop;
    uint64_t seed;
    int failures;
    int writes;
};

/* A host thread: hook, then write, at random, until told to stop. */
static void *writer_main(void *arg)
{
    struct writer *w = arg;
    uint8_t buf[64 * KiB];
    while (!atomic_load(w->stop)) {
        uint64_t len = 1 + next_random(&w->seed) % sizeof buf;
        uint64_t off = next_random(&w->seed) % (size - len);
        fill_random(buf, len, &w->seed);
        if (cowbackup_cow_before_write(w->job, off, len) != 0) {
            w->failures++;
            break;
        }
        pthread_mutex_lock(&w->sm->lock);
        memcpy(w->sm->data + off, buf, len);
        pthread_mutex_unlock(&w->sm->lock);
        w->writes++;
    }
    return NULL;
}

static void jobs_share_a_pool(void)
{
    cowbackup_pool *pool = NULL;
    REQUIRE(cowbackup_pool_new(2, COWBACKUP_WORKER_PRIORITY_NORMAL, &pool) == 0);
    cowbackup_options *o = cowbackup_options_new();
    CHECK_RC(cowbackup_options_set_pool(o, pool), 0);
    CHECK_RC(cowbackup_options_set_speed(o, 8 * MiB), 0); /* all running at once */
    cmem *sm[JOBS], *tm[JOBS];
    uint8_t *want[JOBS];
    cowbackup_driver *src[JOBS], *dst[JOBS];
    cowbackup_job *job[JOBS];
    for (int i = 0; i < JOBS; i++) {
        uint64_t seed = 1000 + (uint64_t)i;
        sm[i] = cmem_new(size, 0);
        tm[i] = cmem_new(size, 0);
        fill_random(sm[i]->data, size, &seed);
        want[i] = malloc(size);
        REQUIRE(want[i] != NULL);
        memcpy(want[i], sm[i]->data, size);
        src[i] = cmem_driver(sm[i], 0);
        dst[i] = cmem_driver(tm[i], 0);
        REQUIRE(cowbackup_backup_start(src[i], dst[i], o, &job[i]) == 0);
    }
    /* The jobs hold the pool and copied the options. */
    cowbackup_pool_free(pool);
    cowbackup_options_free(o);
    atomic_int stop = 0;
    struct writer w[4];
    pthread_t th[4];
    for (int i = 0; i < 4; i++) {
        w[i] = (struct writer){ .job = job[i * 4], .sm = sm[i * 4], .stop = &stop, .seed = 7 + (uint64_t)i };
        REQUIRE(pthread_create(&th[i], NULL, writer_main, &w[i]) == 0);
    }
    sleep_ms(200);
    for (int i = 0; i < JOBS; i++)
        CHECK_RC(cowbackup_job_set_speed(job[i], 0), 0);
    for (int i = 0; i < JOBS; i++)
        CHECK_RC(cowbackup_job_wait(job[i]), 0);
    atomic_store(&stop, 1);
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        CHECK(w[i].failures == 0);
    }
    for (int i = 0; i < JOBS; i++) {
        CHECK(query(job[i]).state == COWBACKUP_JOB_COMPLETED);
        uint8_t *got = read_all(dst[i], size);
        long long d = first_diff(got, want[i], size);
        if (d >= 0)
            SAY("job %d: target differs from the point in time at byte %lld", i, d);
        CHECK(d < 0);
        free(got);
        free(want[i]);
        cowbackup_job_free(job[i]);
        cowbackup_driver_free(src[i]);
        cowbackup_driver_free(dst[i]);
        cmem_destroy(sm[i]);
        cmem_destroy(tm[i]);
    }
}

int main(void)
{
    bad_input();
    jobs_share_a_pool();
    return test_finish();
}
