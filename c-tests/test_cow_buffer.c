/* cowbackup_options_set_cow_buffer: the hook keeps old data in memory and returns without
 * writing the target; a worker writes it. Checked through C drivers: the hook succeeds
 * while the target fails (the failure reaches the job, under the target policy), host
 * threads writing during the backup still get the exact point in time, and bad input is
 * rejected. */
#include "common.h"

#include <pthread.h>

const char *test_name = "cow_buffer";

#define MiB (1024 * 1024)
#define KiB 1024
static const uint64_t size = 8 * MiB;
static const uint64_t cs = 64 * KiB;

/* A random source, an empty target (C drivers over memory), the point in time, options. */
struct setup {
    cmem *sm, *tm;
    uint8_t *want;
    cowbackup_driver *src, *dst;
    cowbackup_options *o;
    cowbackup_job *job;
};

static struct setup setup(uint64_t seed)
{
    struct setup s;
    s.sm = cmem_new(size, 0);
    s.tm = cmem_new(size, 0);
    fill_random(s.sm->data, size, &seed);
    s.want = malloc(size);
    REQUIRE(s.want != NULL);
    memcpy(s.want, s.sm->data, size);
    s.src = cmem_driver(s.sm, 0);
    s.dst = cmem_driver(s.tm, 0);
    s.o = cowbackup_options_new();
    s.job = NULL;
    return s;
}

/* The target equals the point in time; free everything. */
static void check_target_and_free(struct setup *s)
{
    uint8_t *got = read_all(s->dst, size);
    long long d = first_diff(got, s->want, size);
    if (d >= 0)
        SAY("target differs from the point in time at byte %lld", d);
    CHECK(d < 0);
    free(got);
    free(s->want);
    cowbackup_job_free(s->job);
    cowbackup_options_free(s->o);
    cowbackup_driver_free(s->src);
    cowbackup_driver_free(s->dst);
    cmem_destroy(s->sm);
    cmem_destroy(s->tm);
}

static void bad_input(void)
{
    CHECK_ERR(cowbackup_options_set_cow_buffer(NULL, MiB), EINVAL, "cowbackup_options_set_cow_buffer");
    /* sync None has no workers to write saved data: rejected at start, nothing written. */
    cmem *sm = cmem_new(size, 0x5a), *tm = cmem_new(size, 0);
    cowbackup_driver *src = cmem_driver(sm, 0), *dst = cmem_driver(tm, 0);
    cowbackup_options *o = cowbackup_options_new();
    CHECK_RC(cowbackup_options_set_sync(o, COWBACKUP_SYNC_NONE), 0);
    CHECK_RC(cowbackup_options_set_cow_buffer(o, MiB), 0);
    cowbackup_job *job = NULL;
    CHECK_ERR(cowbackup_backup_start(src, dst, o, &job), EINVAL, "cowbackup_backup_start");
    CHECK(job == NULL);
    CHECK(strstr(cowbackup_last_error(), "cow_buffer") != NULL);
    CHECK(atomic_load(&tm->writes) == 0);
    cowbackup_options_free(o);
    cowbackup_driver_free(src);
    cowbackup_driver_free(dst);
    cmem_destroy(sm);
    cmem_destroy(tm);
}

/* The target fails writes of the last cluster with -EIO. Without a buffer the hook on
 * that cluster returns -EIO (BreakGuestWrite); with one it returns 0 at once, and the
 * worker's write of the saved data pauses the job (Stop). After the fault is gone and
 * the job resumed, the backup holds the old data, though the host has overwritten it. */
static void hook_succeeds_while_the_target_fails(void)
{
    struct setup s = setup(11);
    const uint64_t off = size - cs;
    s.tm->write_fail_off = off;
    s.tm->write_fail_len = cs;
    atomic_store(&s.tm->write_errno, EIO);
    s.tm->slow_us = 2000; /* the worker is far from the last cluster when the hook comes */
    CHECK_RC(cowbackup_options_set_workers(s.o, 1), 0);
    CHECK_RC(cowbackup_options_set_max_chunk(s.o, cs), 0);
    CHECK_RC(cowbackup_options_set_on_target_error(s.o, COWBACKUP_ERROR_STOP), 0);
    CHECK_RC(cowbackup_options_set_cow_buffer(s.o, MiB), 0);
    REQUIRE(cowbackup_backup_start(s.src, s.dst, s.o, &s.job) == 0);
    CHECK_RC(cowbackup_cow_before_write(s.job, off, cs), 0);
    /* The host's write goes ahead. */
    pthread_mutex_lock(&s.sm->lock);
    memset(s.sm->data + off, 0xEE, cs);
    pthread_mutex_unlock(&s.sm->lock);
    cowbackup_job_info info = wait_state(s.job, COWBACKUP_JOB_PAUSED, 20000);
    CHECK(info.state == COWBACKUP_JOB_PAUSED);
    CHECK(info.error == -EIO);
    atomic_store(&s.tm->write_errno, 0);
    s.tm->slow_us = 0;
    CHECK_RC(cowbackup_job_resume(s.job), 0);
    CHECK_RC(cowbackup_job_wait(s.job), 0);
    check_target_and_free(&s);
}

struct writer {
    cowbackup_job *job;
    cmem *sm;
    atomic_int *stop;
    uint64_t seed;
    int failures;
};

/* A host thread: hook, then write, at random, until told to stop. */
static void *writer_main(void *arg)
{
    struct writer *w = arg;
    uint8_t *buf = malloc(3 * cs);
    if (!buf) {
        w->failures++;
        return NULL;
    }
    while (!atomic_load(w->stop)) {
        uint64_t len = 1 + next_random(&w->seed) % (3 * cs);
        uint64_t off = next_random(&w->seed) % (size - len);
        fill_random(buf, len, &w->seed);
        if (cowbackup_cow_before_write(w->job, off, len) != 0) {
            w->failures++;
            break;
        }
        pthread_mutex_lock(&w->sm->lock);
        memcpy(w->sm->data + off, buf, len);
        pthread_mutex_unlock(&w->sm->lock);
    }
    free(buf);
    return NULL;
}

/* Three host threads write during a backup into a slow target through a small buffer
 * (hooks both save and copy): the target is exactly the point in time. */
static void concurrent_writers_get_the_point_in_time(void)
{
    struct setup s = setup(12);
    s.tm->slow_us = 100;
    CHECK_RC(cowbackup_options_set_cow_buffer(s.o, 256 * KiB), 0);
    CHECK_RC(cowbackup_options_set_max_chunk(s.o, 256 * KiB), 0);
    REQUIRE(cowbackup_backup_start(s.src, s.dst, s.o, &s.job) == 0);
    /* Paused until the writers' hooks have copied (they work while the job is paused): on a
     * loaded machine the whole backup could otherwise end before a writer thread runs. */
    CHECK_RC(cowbackup_job_pause(s.job), 0);
    atomic_int stop = 0;
    struct writer w[3];
    pthread_t th[3];
    for (int i = 0; i < 3; i++) {
        w[i] = (struct writer){ .job = s.job, .sm = s.sm, .stop = &stop, .seed = 100 + (uint64_t)i };
        REQUIRE(pthread_create(&th[i], NULL, writer_main, &w[i]) == 0);
    }
    for (int i = 0; i < 10000 && query(s.job).cow_requests < 3; i++)
        sleep_ms(1);
    CHECK_RC(cowbackup_job_resume(s.job), 0);
    int rc = cowbackup_job_wait(s.job);
    atomic_store(&stop, 1);
    for (int i = 0; i < 3; i++) {
        pthread_join(th[i], NULL);
        CHECK(w[i].failures == 0);
    }
    CHECK_RC(rc, 0);
    cowbackup_job_info info = query(s.job);
    CHECK(info.state == COWBACKUP_JOB_COMPLETED);
    CHECK(info.cow_requests > 0);
    check_target_and_free(&s);
}

int main(void)
{
    bad_input();
    hook_succeeds_while_the_target_fails();
    concurrent_writers_get_the_point_in_time();
    return test_finish();
}
