/* Trace events through the C API: every kind arrives, with its fields and a message, on
 * the thread that caused it; the hook's fast path emits nothing. */
#include "common.h"

const char *test_name = "trace";

#define MiB (1024 * 1024)
#define KiB 1024

static atomic_int kinds[6];
static atomic_int bad_events;
static atomic_int hook_chunks, hook_end_eio, break_guest_write, states_paused, states_completed;
static _Atomic uint64_t zero_bytes;

static void on_trace(void *opaque, const cowbackup_trace_event *e)
{
    if (opaque != (void *)&kinds || e == NULL || e->message == NULL || e->kind > COWBACKUP_TRACE_ERROR) {
        atomic_fetch_add(&bad_events, 1);
        return;
    }
    atomic_fetch_add(&kinds[e->kind], 1);
    switch (e->kind) {
    case COWBACKUP_TRACE_CHUNK:
        if (e->hook)
            atomic_fetch_add(&hook_chunks, 1);
        if (strncmp(e->message, "backup_chunk_copied job=", 24) != 0)
            atomic_fetch_add(&bad_events, 1);
        break;
    case COWBACKUP_TRACE_ZERO:
        atomic_fetch_add(&zero_bytes, e->len);
        break;
    case COWBACKUP_TRACE_HOOK_END:
        if (e->error == -EIO)
            atomic_fetch_add(&hook_end_eio, 1);
        break;
    case COWBACKUP_TRACE_ERROR:
        if (e->action == COWBACKUP_TRACE_ACTION_BREAK_GUEST_WRITE && e->error == -EIO && e->len > 0)
            atomic_fetch_add(&break_guest_write, 1);
        break;
    case COWBACKUP_TRACE_STATE:
        if (e->from_state == COWBACKUP_JOB_RUNNING && e->to_state == COWBACKUP_JOB_PAUSED)
            atomic_fetch_add(&states_paused, 1);
        if (e->to_state == COWBACKUP_JOB_COMPLETED)
            atomic_fetch_add(&states_completed, 1);
        break;
    }
}

int main(void)
{
    const uint64_t size = 2 * MiB;
    cmem *sm = cmem_new(size, 0x42), *tm = cmem_new(size, 0);
    memset(sm->data + size - 256 * KiB, 0, 256 * KiB); /* four zero clusters at the end */
    cowbackup_driver *src = cmem_driver(sm, 0), *dst = cmem_driver(tm, 0);
    cowbackup_options *o = cowbackup_options_new();
    REQUIRE(o != NULL);
    CHECK_ERR(cowbackup_options_set_trace(NULL, on_trace, NULL), EINVAL, "cowbackup_options_set_trace");
    CHECK_RC(cowbackup_options_set_trace(o, on_trace, (void *)&kinds), 0);
    CHECK_RC(cowbackup_options_set_workers(o, 1), 0);
    CHECK_RC(cowbackup_options_set_max_chunk(o, 64 * KiB), 0);
    CHECK_RC(cowbackup_options_set_speed(o, 1), 0); /* background copy held back */
    cowbackup_job *job = NULL;
    REQUIRE(cowbackup_backup_start(src, dst, o, &job) == 0);

    SAY("a hook whose target write fails: HOOK_BEGIN, ERROR (break-guest-write), HOOK_END -EIO");
    tm->write_fail_off = MiB;
    tm->write_fail_len = 1;
    atomic_store(&tm->write_errno, EIO);
    CHECK_ERR(cowbackup_cow_before_write(job, MiB, 4096), EIO, "target");
    atomic_store(&tm->write_errno, 0);
    SAY("the retried hook copies: a CHUNK event with hook = 1; the fast path emits nothing");
    CHECK_RC(cowbackup_cow_before_write(job, MiB, 4096), 0);
    int begins = atomic_load(&kinds[COWBACKUP_TRACE_HOOK_BEGIN]);
    CHECK_RC(cowbackup_cow_before_write(job, MiB, 4096), 0);
    CHECK(atomic_load(&kinds[COWBACKUP_TRACE_HOOK_BEGIN]) == begins);

    SAY("pause, resume, full speed, wait: STATE events, CHUNKs, ZERO runs of 256 KiB in all");
    CHECK_RC(cowbackup_job_pause(job), 0);
    CHECK_RC(cowbackup_job_resume(job), 0);
    CHECK_RC(cowbackup_job_set_speed(job, 0), 0);
    CHECK_RC(cowbackup_job_wait(job), 0);
    printf("[%s] events: state %d chunk %d zero %d hook_begin %d hook_end %d error %d; zero bytes %llu\n", test_name,
           kinds[0], kinds[1], kinds[2], kinds[3], kinds[4], kinds[5], (unsigned long long)zero_bytes);
    CHECK(atomic_load(&bad_events) == 0);
    CHECK(atomic_load(&kinds[COWBACKUP_TRACE_HOOK_BEGIN]) == 2);
    CHECK(atomic_load(&kinds[COWBACKUP_TRACE_HOOK_END]) == 2);
    CHECK(atomic_load(&hook_end_eio) == 1);
    CHECK(atomic_load(&break_guest_write) == 1);
    CHECK(atomic_load(&hook_chunks) == 1);
    CHECK(atomic_load(&kinds[COWBACKUP_TRACE_CHUNK]) >= 2);
    CHECK(atomic_load(&zero_bytes) == 256 * KiB);
    CHECK(atomic_load(&states_paused) == 1);
    CHECK(atomic_load(&states_completed) == 1);
    CHECK(first_diff(tm->data, sm->data, size) == -1);

    cowbackup_job_free(job);
    cowbackup_options_free(o);
    cowbackup_driver_free(src);
    cowbackup_driver_free(dst);
    cmem_destroy(sm);
    cmem_destroy(tm);
    return test_finish();
}
