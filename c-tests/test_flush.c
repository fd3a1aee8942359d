/* The job's final flush of the target, seen by a C driver: DESIGN "At the end the job flushes
 * the target". The target's ops number every completed write and write_zeroes and every flush
 * in one sequence; the job must flush exactly once, after its last write (background copy,
 * zeroes and the hook's copies), before the completion callback runs and before
 * cowbackup_job_wait returns. Sync FULL and TOP, into a target that does not read zeroes. */
#include "common.h"

const char *test_name = "flush";

/* A cmem target whose write, write_zeroes and flush ops are recorded. */
typedef struct rec_counts {
    uint64_t seq;         /* the last sequence number given out */
    uint64_t last_write;  /* sequence number of the last completed write or write_zeroes (0: none) */
    uint64_t first_flush; /* sequence number of the first flush (0: none) */
    unsigned writes, zeroes, flushes;
    uint64_t callback;    /* sequence number of the completion callback (0: not yet) */
    unsigned callbacks, flushes_at_callback;
    int callback_ret;
} rec_counts;

typedef struct rec {
    cmem *m;
    pthread_mutex_t lock; /* protects s */
    rec_counts s;
} rec;

static uint64_t next_seq(rec *r) /* with r->lock held */
{
    return ++r->s.seq;
}

static int rec_read(void *opaque, uint64_t offset, void *buf, size_t len)
{
    rec *r = opaque;
    return cmem_ops.read(r->m, offset, buf, len);
}

static int rec_write(void *opaque, uint64_t offset, const void *buf, size_t len)
{
    rec *r = opaque;
    int ret = cmem_ops.write(r->m, offset, buf, len);
    pthread_mutex_lock(&r->lock);
    r->s.last_write = next_seq(r);
    r->s.writes++;
    pthread_mutex_unlock(&r->lock);
    return ret;
}

static int rec_write_zeroes(void *opaque, uint64_t offset, uint64_t len)
{
    rec *r = opaque;
    int ret = cmem_ops.write_zeroes(r->m, offset, len);
    pthread_mutex_lock(&r->lock);
    r->s.last_write = next_seq(r);
    r->s.zeroes++;
    pthread_mutex_unlock(&r->lock);
    return ret;
}

static int rec_flush(void *opaque)
{
    rec *r = opaque;
    pthread_mutex_lock(&r->lock);
    uint64_t s = next_seq(r);
    if (r->s.first_flush == 0)
        r->s.first_flush = s;
    r->s.flushes++;
    pthread_mutex_unlock(&r->lock);
    return cmem_ops.flush(r->m);
}

static int rec_block_status(void *opaque, uint64_t offset, uint64_t len, uint64_t *pnum, uint32_t *status)
{
    rec *r = opaque;
    return cmem_ops.block_status(r->m, offset, len, pnum, status);
}

static const cowbackup_driver_ops rec_ops = {
    .read = rec_read,
    .write = rec_write,
    .write_zeroes = rec_write_zeroes,
    .flush = rec_flush,
    .block_status = rec_block_status,
};

static void on_complete(void *opaque, int ret)
{
    rec *r = opaque;
    pthread_mutex_lock(&r->lock);
    r->s.callback = next_seq(r);
    r->s.callbacks++;
    r->s.flushes_at_callback = r->s.flushes;
    r->s.callback_ret = ret;
    pthread_mutex_unlock(&r->lock);
}

static void run(uint32_t sync, const char *name)
{
    SAY("sync %s: one flush of the target, after its last write, before the callback and wait's return", name);
    const uint64_t size = (4 << 20) + 4097, cluster = 65536;
    uint64_t seed = 42;
    cmem *sm = cmem_new(size, 0);
    fill_random(sm->data, size, &seed);
    /* Zero clusters in the data (written as zeroes), and under TOP an unallocated tail. */
    for (uint64_t off = 0; off + cluster <= size; off += 4 * cluster)
        memset(sm->data + off, 0, cluster);
    if (sync == COWBACKUP_SYNC_TOP)
        sm->data_end = 3 << 20; /* the tail reads as ZERO, not DATA: skipped, zeroed in the target */
    if (sm->data_end)
        memset(sm->data + sm->data_end, 0, size - sm->data_end);
    uint8_t *before = malloc(size);
    REQUIRE(before != NULL);
    memcpy(before, sm->data, size);

    rec r = { .m = cmem_new(size, 0xee) }; /* a dirty target: zero clusters must be written */
    pthread_mutex_init(&r.lock, NULL);
    cowbackup_driver *src = cmem_driver(sm, 0), *dst = NULL;
    REQUIRE(cowbackup_driver_new(&rec_ops, sizeof rec_ops, &r, size, 0, &dst) == 0);
    cowbackup_options *o = cowbackup_options_new();
    REQUIRE(o != NULL);
    CHECK_RC(cowbackup_options_set_sync(o, sync), 0);
    CHECK_RC(cowbackup_options_set_speed(o, 16 << 20), 0);
    CHECK_RC(cowbackup_options_set_max_chunk(o, 256 << 10), 0);
    CHECK_RC(cowbackup_options_set_completion(o, on_complete, &r), 0);
    cowbackup_job *job = NULL;
    REQUIRE(cowbackup_backup_start(src, dst, o, &job) == 0);
    cowbackup_options_free(o);

    /* The host writes through the hook while the job runs: some copies are the hook's. */
    uint8_t buf[8192];
    for (int i = 0; i < 32; i++) {
        uint64_t off = next_random(&seed) % (size - sizeof buf);
        CHECK_RC(cowbackup_cow_before_write(job, off, sizeof buf), 0);
        fill_random(buf, sizeof buf, &seed);
        pthread_mutex_lock(&sm->lock);
        memcpy(sm->data + off, buf, sizeof buf);
        pthread_mutex_unlock(&sm->lock);
    }
    /* Bounded: fail instead of hanging when the job does not end. */
    cowbackup_job_info info = wait_state(job, COWBACKUP_JOB_COMPLETED, 60000);
    CHECK(info.state == COWBACKUP_JOB_COMPLETED);
    if (info.state != COWBACKUP_JOB_COMPLETED) {
        fprintf(stderr, "FAIL: the job is %s, not COMPLETED, after 60 s\n", state_name(info.state));
        exit(1);
    }
    CHECK_RC(cowbackup_job_wait(job), 0);
    pthread_mutex_lock(&r.lock);
    uint64_t wait_returned = next_seq(&r);
    rec_counts seen = r.s;
    pthread_mutex_unlock(&r.lock);

    printf("[%s] %u writes, %u write_zeroes, %u flush(es); last write #%llu, flush #%llu, callback #%llu, "
           "wait returned #%llu; %llu hook copies\n",
           test_name, seen.writes, seen.zeroes, seen.flushes, (unsigned long long)seen.last_write,
           (unsigned long long)seen.first_flush, (unsigned long long)seen.callback,
           (unsigned long long)wait_returned, (unsigned long long)info.cow_requests);
    CHECK(info.cow_requests > 0);
    CHECK(info.bytes_zero > 0);
    CHECK(seen.writes > 0 && seen.zeroes > 0);
    CHECK(seen.flushes == 1);
    CHECK(seen.first_flush > seen.last_write);
    CHECK(seen.callbacks == 1 && seen.callback_ret == 0);
    CHECK(seen.flushes_at_callback == 1);
    CHECK(seen.callback > seen.first_flush);
    CHECK(wait_returned > seen.callback);
    uint8_t *got = read_all(dst, size);
    long long d = first_diff(got, before, size);
    if (d >= 0)
        fprintf(stderr, "FAIL: the target differs from the point in time at byte %lld\n", d);
    CHECK(d == -1);
    free(got);

    cowbackup_job_free(job);
    cowbackup_driver_free(src);
    cowbackup_driver_free(dst);
    pthread_mutex_lock(&r.lock);
    CHECK(r.s.flushes == 1); /* nothing flushes again after the end, nor at free */
    pthread_mutex_unlock(&r.lock);
    pthread_mutex_destroy(&r.lock);
    cmem_destroy(r.m);
    cmem_destroy(sm);
    free(before);
}

int main(void)
{
    run(COWBACKUP_SYNC_FULL, "FULL");
    run(COWBACKUP_SYNC_TOP, "TOP");
    return test_finish();
}
