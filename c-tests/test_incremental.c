/* Incremental backups and consistency groups from C: cowbackup_options_set_bitmap, the
 * rejections of cowbackup_backup_start (SYNC_BITMAP without a bitmap, NEVER with FULL/TOP, a
 * bitmap of another size, a busy bitmap), an incremental that copies exactly the dirty
 * clusters and leaves only the writes made during it in the bitmap, and
 * cowbackup_backup_start_group: success with grouped completion, a failing member (the
 * other is cancelled, both bitmaps unchanged), and bad input (nothing started, jobs_out
 * untouched, bitmaps not busy). Every wait is bounded. */
#include "common.h"

#include <time.h>

const char *test_name = "incremental";

#define BAD_PTR ((void *)0x5eed)
#define CL 65536ULL                 /* cluster size and granularity */
#define NCL 256ULL                  /* clusters of the devices */
#define SIZE (NCL * CL)             /* 16 MiB */
#define WAIT_MS 60000

/* Regression check of a core bug (fixed): a start refused with -EBUSY must leave the bitmap
 * of the job holding it busy. */
/* --- a C driver over a cmem whose first read touching [off, off + len) waits for release ---- */

typedef struct gate {
    cmem *m;
    uint64_t off, len;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int used, reached, released;
    int fail; /* the gated read returns -EIO once released */
    atomic_int freed;
} gate;

static void deadline_in(struct timespec *ts, int ms)
{
    clock_gettime(CLOCK_REALTIME, ts);
    ts->tv_sec += ms / 1000;
    ts->tv_nsec += (long)(ms % 1000) * 1000000L;
    if (ts->tv_nsec >= 1000000000L) {
        ts->tv_sec++;
        ts->tv_nsec -= 1000000000L;
    }
}

static int gate_read(void *opaque, uint64_t offset, void *buf, size_t len)
{
    gate *g = opaque;
    int fail = 0;
    pthread_mutex_lock(&g->lock);
    if (!g->used && offset < g->off + g->len && g->off < offset + len) {
        g->used = 1;
        g->reached = 1;
        pthread_cond_broadcast(&g->cond);
        struct timespec ts;
        deadline_in(&ts, 30000);
        while (!g->released)
            if (pthread_cond_timedwait(&g->cond, &g->lock, &ts) != 0)
                break;
        fail = g->fail || !g->released;
    }
    pthread_mutex_unlock(&g->lock);
    return fail ? -EIO : cmem_ops.read(g->m, offset, buf, len);
}

static int gate_write(void *opaque, uint64_t offset, const void *buf, size_t len)
{
    return cmem_ops.write(((gate *)opaque)->m, offset, buf, len);
}

static int gate_write_zeroes(void *opaque, uint64_t offset, uint64_t len)
{
    return cmem_ops.write_zeroes(((gate *)opaque)->m, offset, len);
}

static int gate_flush(void *opaque)
{
    return cmem_ops.flush(((gate *)opaque)->m);
}

static void gate_release_op(void *opaque)
{
    atomic_fetch_add(&((gate *)opaque)->freed, 1);
}

static const cowbackup_driver_ops gate_ops = {
    .read = gate_read,
    .write = gate_write,
    .write_zeroes = gate_write_zeroes,
    .flush = gate_flush,
    .release = gate_release_op,
};

static gate *gate_new(cmem *m, uint64_t cluster)
{
    gate *g = calloc(1, sizeof *g);
    REQUIRE(g != NULL);
    g->m = m;
    g->off = cluster * CL;
    g->len = CL;
    pthread_mutex_init(&g->lock, NULL);
    pthread_cond_init(&g->cond, NULL);
    return g;
}

static cowbackup_driver *gate_driver(gate *g)
{
    cowbackup_driver *d = NULL;
    REQUIRE(cowbackup_driver_new(&gate_ops, sizeof gate_ops, g, g->m->size, 0, &d) == 0 && d);
    return d;
}

/* Wait (bounded) until the gated read has started; 1 when it has. */
static int gate_wait_reached(gate *g, int ms)
{
    struct timespec ts;
    deadline_in(&ts, ms);
    pthread_mutex_lock(&g->lock);
    while (!g->reached)
        if (pthread_cond_timedwait(&g->cond, &g->lock, &ts) != 0)
            break;
    int r = g->reached;
    pthread_mutex_unlock(&g->lock);
    return r;
}

static void gate_open(gate *g, int fail)
{
    pthread_mutex_lock(&g->lock);
    g->fail = fail;
    g->released = 1;
    pthread_cond_broadcast(&g->cond);
    pthread_mutex_unlock(&g->lock);
}

static void gate_destroy(gate *g)
{
    pthread_cond_destroy(&g->cond);
    pthread_mutex_destroy(&g->lock);
    free(g);
}

/* --- helpers ------------------------------------------------------------------------- */

static cowbackup_bitmap_info binfo(const cowbackup_bitmap *bm)
{
    cowbackup_bitmap_info i;
    REQUIRE(cowbackup_bitmap_query(bm, &i) == 0);
    return i;
}

static int is_busy(const cowbackup_bitmap *bm)
{
    return (binfo(bm).flags & COWBACKUP_BITMAP_BUSY) != 0;
}

/* The dirty clusters of bm as "0 15 16" (bm's granularity must be CL). */
static void dirty_list(const cowbackup_bitmap *bm, char *out, size_t n)
{
    uint64_t from = 0, off, len;
    size_t used = 0;
    out[0] = 0;
    for (;;) {
        REQUIRE(cowbackup_bitmap_next_dirty(bm, from, &off, &len) == 0);
        if (len == 0)
            break;
        for (uint64_t c = off / CL; c < (off + len + CL - 1) / CL; c++) {
            used += snprintf(out + used, n - used, "%s%llu", used ? " " : "", (unsigned long long)c);
            REQUIRE(used < n);
        }
        from = off + len;
    }
}

#define CHECK_DIRTY(bm, want) do { \
    char got_[1024]; \
    dirty_list((bm), got_, sizeof got_); \
    if (strcmp(got_, (want)) != 0) { \
        fprintf(stderr, "FAIL %s:%d: dirty clusters \"%s\", want \"%s\"\n", __FILE__, __LINE__, got_, (want)); \
        test_failures++; \
    } } while (0)

static void mark_clusters(cowbackup_bitmap *bm, const uint64_t *cs, size_t n)
{
    for (size_t i = 0; i < n; i++)
        REQUIRE(cowbackup_bitmap_mark(bm, cs[i] * CL, CL) == 0);
}

/* The host's write path: mark, hook, write (random data) for each cluster. */
static void host_write(cowbackup_bitmap *bm, cowbackup_job *job, cowbackup_driver *src, const uint64_t *cs,
                       size_t n, uint64_t *seed)
{
    uint8_t *buf = malloc(CL);
    REQUIRE(buf);
    for (size_t i = 0; i < n; i++) {
        fill_random(buf, CL, seed);
        CHECK_RC(cowbackup_bitmap_mark(bm, cs[i] * CL, CL), 0);
        CHECK_RC(cowbackup_cow_before_write(job, cs[i] * CL, CL), 0);
        CHECK_RC(cowbackup_driver_write(src, cs[i] * CL, buf, CL), 0);
    }
    free(buf);
}

/* Wait (bounded) for the job to end, then its result; a job still running after the bound
 * is a failure, and is cancelled so that the wait returns. */
static int finish(cowbackup_job *job)
{
    cowbackup_job_info i = wait_state(job, COWBACKUP_JOB_COMPLETED, WAIT_MS);
    if (i.state != COWBACKUP_JOB_COMPLETED && i.state != COWBACKUP_JOB_FAILED && i.state != COWBACKUP_JOB_CANCELLED) {
        fprintf(stderr, "FAIL: job still %s after %d ms: cancelling it\n", state_name(i.state), WAIT_MS);
        test_failures++;
        cowbackup_job_cancel(job);
    }
    return cowbackup_job_wait(job);
}

static cmem *random_cmem(uint64_t seed)
{
    cmem *m = cmem_new(SIZE, 0);
    fill_random(m->data, SIZE, &seed);
    return m;
}

static const uint64_t G1[] = { 0, 15, 16, 128, 129, 254 }; /* dirty before the job */
static const uint64_t G2[] = { 1, 14, 130, 255 };          /* written during it, outside G1 */
#define N(a) (sizeof(a) / sizeof((a)[0]))

/* --- cowbackup_options_set_bitmap and the rejections of backup_start ----------------------- */

static void options(void)
{
    SAY("options_set_bitmap: NULL options, bad modes, NULL bitmap clears, the options' own reference");
    cowbackup_bitmap *bm;
    REQUIRE(cowbackup_bitmap_new(SIZE, CL, &bm) == 0);
    cowbackup_options *o = cowbackup_options_new();
    REQUIRE(o);
    CHECK_ERR(cowbackup_options_set_bitmap(NULL, bm, COWBACKUP_BITMAP_MODE_ON_SUCCESS), EINVAL,
              "cowbackup_options_set_bitmap");
    const uint32_t bad[] = { 3, 99, UINT32_MAX };
    for (size_t k = 0; k < N(bad); k++)
        CHECK_ERR(cowbackup_options_set_bitmap(o, bm, bad[k]), EINVAL, "unknown bitmap mode");
    CHECK_RC(cowbackup_options_set_bitmap(o, NULL, 99), 0); /* NULL bitmap: the mode is ignored */
    CHECK_RC(cowbackup_options_set_sync(o, COWBACKUP_SYNC_BITMAP), 0);

    cowbackup_driver *src, *tgt;
    REQUIRE(cowbackup_memory_new(SIZE, &src) == 0 && cowbackup_memory_new(SIZE, &tgt) == 0);
    cowbackup_job *job = BAD_PTR;

    /* Set, then cleared with NULL: SYNC_BITMAP has no bitmap again. */
    CHECK_RC(cowbackup_options_set_bitmap(o, bm, COWBACKUP_BITMAP_MODE_ALWAYS), 0);
    CHECK_RC(cowbackup_options_set_bitmap(o, NULL, COWBACKUP_BITMAP_MODE_ON_SUCCESS), 0);
    CHECK_ERR(cowbackup_backup_start(src, tgt, o, &job), EINVAL, "cowbackup_backup_start");
    CHECK(strstr(cowbackup_last_error(), "bitmap") != NULL);
    CHECK(job == BAD_PTR);
    /* A bad mode leaves the options as they were (here: a bitmap set before). */
    CHECK_RC(cowbackup_options_set_bitmap(o, bm, COWBACKUP_BITMAP_MODE_ON_SUCCESS), 0);
    CHECK_ERR(cowbackup_options_set_bitmap(o, bm, 7), EINVAL, "cowbackup_options_set_bitmap");

    /* The options hold their own reference: the handle may be freed before the start. */
    uint8_t *data = malloc(CL);
    REQUIRE(data);
    uint64_t seed = 11;
    fill_random(data, CL, &seed);
    REQUIRE(cowbackup_driver_write(src, 7 * CL, data, CL) == 0);
    REQUIRE(cowbackup_bitmap_mark(bm, 7 * CL + 100, 1) == 0);
    cowbackup_bitmap_free(bm);
    job = NULL;
    CHECK_RC(cowbackup_backup_start(src, tgt, o, &job), 0);
    REQUIRE(job);
    CHECK_RC(finish(job), 0);
    cowbackup_job_info i = query(job);
    CHECK(i.bytes_copied == CL && i.bytes_skipped == SIZE - CL);
    uint8_t *got = read_all(tgt, SIZE);
    CHECK(memcmp(got + 7 * CL, data, CL) == 0);
    free(got);
    free(data);
    cowbackup_job_free(job);
    cowbackup_options_free(o); /* drops the last reference to the bitmap (valgrind: no leak) */
    cowbackup_driver_free(src);
    cowbackup_driver_free(tgt);
}

static void rejections(void)
{
    SAY("backup_start: SYNC_BITMAP without a bitmap, NEVER with FULL/TOP, wrong size: -EINVAL; busy: -EBUSY");
    cowbackup_driver *src, *tgt, *t2;
    REQUIRE(cowbackup_memory_new(SIZE, &src) == 0 && cowbackup_memory_new(SIZE, &tgt) == 0);
    REQUIRE(cowbackup_memory_new(SIZE, &t2) == 0);
    cowbackup_bitmap *bm, *half;
    REQUIRE(cowbackup_bitmap_new(SIZE, CL, &bm) == 0 && cowbackup_bitmap_new(SIZE / 2, CL, &half) == 0);
    mark_clusters(bm, G1, N(G1));
    cowbackup_options *o = cowbackup_options_new();
    REQUIRE(o);
    cowbackup_job *job = BAD_PTR;

    CHECK_RC(cowbackup_options_set_sync(o, COWBACKUP_SYNC_BITMAP), 0);
    CHECK_ERR(cowbackup_backup_start(src, tgt, o, &job), EINVAL, "cowbackup_backup_start");
    CHECK(strstr(cowbackup_last_error(), "needs a dirty bitmap") != NULL);

    const uint32_t syncs[] = { COWBACKUP_SYNC_FULL, COWBACKUP_SYNC_TOP };
    for (size_t k = 0; k < N(syncs); k++) {
        CHECK_RC(cowbackup_options_set_sync(o, syncs[k]), 0);
        CHECK_RC(cowbackup_options_set_bitmap(o, bm, COWBACKUP_BITMAP_MODE_NEVER), 0);
        CHECK_ERR(cowbackup_backup_start(src, tgt, o, &job), EINVAL, "cowbackup_backup_start");
        CHECK(!is_busy(bm));
    }

    CHECK_RC(cowbackup_options_set_sync(o, COWBACKUP_SYNC_BITMAP), 0);
    CHECK_RC(cowbackup_options_set_bitmap(o, half, COWBACKUP_BITMAP_MODE_ON_SUCCESS), 0);
    CHECK_ERR(cowbackup_backup_start(src, tgt, o, &job), EINVAL, "cowbackup_backup_start");
    CHECK(strstr(cowbackup_last_error(), "dirty bitmap covers") != NULL);
    CHECK(!is_busy(half));
    CHECK(job == BAD_PTR);
    CHECK_DIRTY(bm, "0 15 16 128 129 254");
    CHECK(binfo(bm).generation == 0);

    /* Busy: a pull-mode job (SYNC_NONE) holds the bitmap until cancelled. */
    cowbackup_job *holder = NULL;
    CHECK_RC(cowbackup_options_set_sync(o, COWBACKUP_SYNC_NONE), 0);
    CHECK_RC(cowbackup_options_set_bitmap(o, bm, COWBACKUP_BITMAP_MODE_ON_SUCCESS), 0);
    CHECK_RC(cowbackup_backup_start(src, tgt, o, &holder), 0);
    REQUIRE(holder);
    CHECK(is_busy(bm));
    CHECK_ERR(cowbackup_bitmap_clear(bm), EBUSY, "cowbackup_bitmap_clear");
    CHECK_ERR(cowbackup_bitmap_disable(bm), EBUSY, "cowbackup_bitmap_disable");
    CHECK_ERR(cowbackup_bitmap_enable(bm), EBUSY, "cowbackup_bitmap_enable");
    cowbackup_bitmap *other;
    REQUIRE(cowbackup_bitmap_new(SIZE, CL, &other) == 0);
    CHECK_RC(cowbackup_bitmap_mark(other, 200 * CL, 1), 0);
    CHECK_ERR(cowbackup_bitmap_merge(bm, other), EBUSY, "cowbackup_bitmap_merge");
    CHECK_RC(cowbackup_bitmap_merge(other, bm), 0); /* a busy bitmap may be merged from */
    CHECK_DIRTY(other, "0 15 16 128 129 200 254");
    cowbackup_bitmap_free(other);
    CHECK_RC(cowbackup_options_set_sync(o, COWBACKUP_SYNC_BITMAP), 0);
    CHECK_ERR(cowbackup_backup_start(src, t2, o, &job), EBUSY, "cowbackup_backup_start");
    CHECK(job == BAD_PTR);
    CHECK(is_busy(bm));
    CHECK_RC(cowbackup_job_cancel(holder), 0);
    CHECK_RC(finish(holder), -ECANCELED);
    CHECK(!is_busy(bm));
    CHECK_DIRTY(bm, "0 15 16 128 129 254"); /* a cancelled job gives everything back */
    CHECK(binfo(bm).generation == 0);
    cowbackup_job_free(holder);

    cowbackup_options_free(o);
    cowbackup_bitmap_free(bm);
    cowbackup_bitmap_free(half);
    cowbackup_driver_free(src);
    cowbackup_driver_free(tgt);
    cowbackup_driver_free(t2);
}

/* --- an incremental backup -------------------------------------------------------------- */

static void incremental(uint32_t sync)
{
    SAY("%s with a bitmap (ON_SUCCESS): copies %s, the bitmap keeps only the writes made during the job",
        sync == COWBACKUP_SYNC_BITMAP ? "SYNC_BITMAP" : "SYNC_FULL",
        sync == COWBACKUP_SYNC_BITMAP ? "exactly the dirty clusters" : "everything");
    cmem *m = random_cmem(sync + 1);
    uint8_t *before = malloc(SIZE);
    REQUIRE(before);
    memcpy(before, m->data, SIZE);
    gate *g = gate_new(m, 128);
    cowbackup_driver *src = gate_driver(g), *tgt;
    REQUIRE(cowbackup_memory_new(SIZE, &tgt) == 0);
    cowbackup_bitmap *bm;
    REQUIRE(cowbackup_bitmap_new(SIZE, CL, &bm) == 0);
    mark_clusters(bm, G1, N(G1));
    cowbackup_options *o = cowbackup_options_new();
    REQUIRE(o);
    CHECK_RC(cowbackup_options_set_sync(o, sync), 0);
    CHECK_RC(cowbackup_options_set_bitmap(o, bm, COWBACKUP_BITMAP_MODE_ON_SUCCESS), 0);
    CHECK_RC(cowbackup_options_set_workers(o, 1), 0);
    CHECK_RC(cowbackup_options_set_max_chunk(o, CL), 0);
    cowbackup_job *job = NULL;
    CHECK_RC(cowbackup_backup_start(src, tgt, o, &job), 0);
    REQUIRE(job);
    cowbackup_options_free(o);
    CHECK(is_busy(bm));
    /* The worker is in the read of cluster 128: the host writes meanwhile. */
    CHECK(gate_wait_reached(g, 30000));
    uint64_t seed = 99;
    host_write(bm, job, src, G2, N(G2), &seed);
    CHECK_DIRTY(bm, "0 1 14 15 16 128 129 130 254 255"); /* frozen + new marks while busy */
    gate_open(g, 0);
    CHECK_RC(finish(job), 0);
    cowbackup_job_info i = query(job);
    CHECK(i.state == COWBACKUP_JOB_COMPLETED);
    if (sync == COWBACKUP_SYNC_BITMAP) {
        CHECK(i.bytes_copied + i.bytes_zero == N(G1) * CL);
        CHECK(i.bytes_skipped == SIZE - N(G1) * CL);
    } else {
        CHECK(i.bytes_copied + i.bytes_zero == SIZE && i.bytes_skipped == 0);
    }
    CHECK(i.offset == SIZE && i.bytes_failed == 0);
    uint8_t *got = read_all(tgt, SIZE);
    for (uint64_t c = 0; c < NCL; c++) {
        int in_g1 = 0;
        for (size_t k = 0; k < N(G1); k++)
            in_g1 |= G1[k] == c;
        if (sync == COWBACKUP_SYNC_FULL || in_g1) {
            if (memcmp(got + c * CL, before + c * CL, CL) != 0) {
                fprintf(stderr, "FAIL: cluster %llu of the target is not the point-in-time data\n",
                        (unsigned long long)c);
                test_failures++;
            }
        } else {
            static const uint8_t zero[CL];
            CHECK(memcmp(got + c * CL, zero, CL) == 0); /* skipped: never written */
        }
    }
    CHECK(!is_busy(bm));
    CHECK_DIRTY(bm, "1 14 130 255");
    CHECK(binfo(bm).generation == 1);
    free(got);
    free(before);
    cowbackup_job_free(job);
    cowbackup_driver_free(src);
    cowbackup_driver_free(tgt);
    cowbackup_bitmap_free(bm);
    CHECK(atomic_load(&g->freed) == 1);
    gate_destroy(g);
    cmem_destroy(m);
}

static void unaligned_granules(void)
{
    SAY("4 KiB granules, 64 KiB clusters, an unaligned device end: the clusters overlapping dirty granules");
    uint64_t size = SIZE - 1000;
    cowbackup_driver *src, *tgt;
    REQUIRE(cowbackup_memory_new(size, &src) == 0 && cowbackup_memory_new(size, &tgt) == 0);
    uint8_t *data = malloc(size);
    REQUIRE(data);
    uint64_t seed = 5;
    fill_random(data, size, &seed);
    REQUIRE(cowbackup_driver_write(src, 0, data, size) == 0);
    cowbackup_bitmap *bm;
    REQUIRE(cowbackup_bitmap_new(size, 4096, &bm) == 0);
    CHECK_RC(cowbackup_bitmap_mark(bm, 3, 1), 0);                /* cluster 0 */
    CHECK_RC(cowbackup_bitmap_mark(bm, CL + 60 * 1024, 8192), 0); /* clusters 1 and 2 */
    CHECK_RC(cowbackup_bitmap_mark(bm, size - 1, 1), 0);          /* the last, partial cluster */
    cowbackup_options *o = cowbackup_options_new();
    REQUIRE(o);
    CHECK_RC(cowbackup_options_set_sync(o, COWBACKUP_SYNC_BITMAP), 0);
    CHECK_RC(cowbackup_options_set_bitmap(o, bm, COWBACKUP_BITMAP_MODE_ON_SUCCESS), 0);
    cowbackup_job *job = NULL;
    CHECK_RC(cowbackup_backup_start(src, tgt, o, &job), 0);
    REQUIRE(job);
    CHECK_RC(finish(job), 0);
    cowbackup_job_info i = query(job);
    uint64_t want = 3 * CL + (CL - 1000);
    CHECK(i.bytes_copied + i.bytes_zero == want && i.bytes_skipped == size - want);
    uint8_t *got = read_all(tgt, size);
    CHECK(memcmp(got, data, 3 * CL) == 0);
    CHECK(memcmp(got + (NCL - 1) * CL, data + (NCL - 1) * CL, CL - 1000) == 0);
    CHECK(got[3 * CL] == 0 && got[(NCL - 1) * CL - 1] == 0);
    uint64_t off = 1, len = 1;
    CHECK_RC(cowbackup_bitmap_next_dirty(bm, 0, &off, &len), 0);
    CHECK(len == 0 && off == size);
    free(got);
    free(data);
    cowbackup_job_free(job);
    cowbackup_options_free(o);
    cowbackup_bitmap_free(bm);
    cowbackup_driver_free(src);
    cowbackup_driver_free(tgt);
}

/* --- consistency groups ------------------------------------------------------------------ */

static cowbackup_options *bitmap_options(cowbackup_bitmap *bm, uint32_t mode)
{
    cowbackup_options *o = cowbackup_options_new();
    REQUIRE(o);
    REQUIRE(cowbackup_options_set_sync(o, COWBACKUP_SYNC_BITMAP) == 0);
    REQUIRE(cowbackup_options_set_bitmap(o, bm, mode) == 0);
    REQUIRE(cowbackup_options_set_workers(o, 1) == 0);
    return o;
}

static void group_success(void)
{
    SAY("group of 2: one point in time, no job COMPLETED before both copied, both bitmaps synced");
    cmem *ma = random_cmem(21), *mb = random_cmem(22);
    uint8_t *before_a = malloc(SIZE), *before_b = malloc(SIZE);
    REQUIRE(before_a && before_b);
    memcpy(before_a, ma->data, SIZE);
    memcpy(before_b, mb->data, SIZE);
    gate *g = gate_new(mb, 129);
    cowbackup_driver *srcs[2] = { cmem_driver(ma, 0), gate_driver(g) }, *tgts[2];
    REQUIRE(cowbackup_memory_new(SIZE, &tgts[0]) == 0 && cowbackup_memory_new(SIZE, &tgts[1]) == 0);
    cowbackup_bitmap *bma, *bmb;
    REQUIRE(cowbackup_bitmap_new(SIZE, CL, &bma) == 0 && cowbackup_bitmap_new(SIZE, CL, &bmb) == 0);
    mark_clusters(bma, G1, 3);      /* 0 15 16 */
    mark_clusters(bmb, G1 + 3, 3);  /* 128 129 254 */
    const cowbackup_options *opts[2] = { bitmap_options(bma, COWBACKUP_BITMAP_MODE_ON_SUCCESS),
                                         bitmap_options(bmb, COWBACKUP_BITMAP_MODE_ON_SUCCESS) };
    cowbackup_job *jobs[2] = { NULL, NULL };
    CHECK_RC(cowbackup_backup_start_group(2, srcs, tgts, opts, jobs), 0);
    REQUIRE(jobs[0] && jobs[1]);
    for (int k = 0; k < 2; k++)
        cowbackup_options_free((cowbackup_options *)opts[k]);
    CHECK(is_busy(bma) && is_busy(bmb));
    CHECK(gate_wait_reached(g, 30000));
    uint64_t seed = 3;
    const uint64_t wa[] = { 15, 40 }, wb[] = { 2 };
    host_write(bma, jobs[0], srcs[0], wa, 2, &seed);
    host_write(bmb, jobs[1], srcs[1], wb, 1, &seed);
    /* Job 0 has copied all it has to, but may not complete while job 1 is still copying. */
    cowbackup_job_info i0 = query(jobs[0]);
    for (int t = 0; t < 10000 && i0.offset != SIZE; t += 10) {
        sleep_ms(10);
        i0 = query(jobs[0]);
    }
    CHECK(i0.offset == SIZE);
    sleep_ms(200);
    i0 = query(jobs[0]);
    CHECK(i0.state != COWBACKUP_JOB_COMPLETED);
    gate_open(g, 0);
    CHECK_RC(finish(jobs[0]), 0);
    CHECK_RC(finish(jobs[1]), 0);
    uint8_t *got = read_all(tgts[0], SIZE);
    for (size_t k = 0; k < 3; k++)
        CHECK(memcmp(got + G1[k] * CL, before_a + G1[k] * CL, CL) == 0);
    free(got);
    got = read_all(tgts[1], SIZE);
    for (size_t k = 3; k < 6; k++)
        CHECK(memcmp(got + G1[k] * CL, before_b + G1[k] * CL, CL) == 0);
    free(got);
    CHECK_DIRTY(bma, "15 40");
    CHECK_DIRTY(bmb, "2");
    CHECK(!is_busy(bma) && !is_busy(bmb));
    for (int k = 0; k < 2; k++) {
        cowbackup_job_free(jobs[k]);
        cowbackup_driver_free(srcs[k]);
        cowbackup_driver_free(tgts[k]);
    }
    cowbackup_bitmap_free(bma);
    cowbackup_bitmap_free(bmb);
    gate_destroy(g);
    cmem_destroy(ma);
    cmem_destroy(mb);
    free(before_a);
    free(before_b);
}

static void group_failure(void)
{
    SAY("group of 2, the second job's source fails: first CANCELLED, second FAILED, both bitmaps unchanged");
    const uint32_t modes[] = { COWBACKUP_BITMAP_MODE_ON_SUCCESS, COWBACKUP_BITMAP_MODE_ALWAYS, COWBACKUP_BITMAP_MODE_NEVER };
    for (size_t k = 0; k < N(modes); k++) {
        cmem *ma = random_cmem(31), *mb = random_cmem(32);
        atomic_store(&mb->read_errno, EIO);
        mb->read_fail_off = 0;
        mb->read_fail_len = SIZE; /* every read of the second source fails */
        cowbackup_driver *srcs[2] = { cmem_driver(ma, 0), cmem_driver(mb, 0) }, *tgts[2];
        REQUIRE(cowbackup_memory_new(SIZE, &tgts[0]) == 0 && cowbackup_memory_new(SIZE, &tgts[1]) == 0);
        cowbackup_bitmap *bma, *bmb;
        REQUIRE(cowbackup_bitmap_new(SIZE, CL, &bma) == 0 && cowbackup_bitmap_new(SIZE, CL, &bmb) == 0);
        mark_clusters(bma, G1, N(G1));
        mark_clusters(bmb, G2, N(G2));
        const cowbackup_options *opts[2] = { bitmap_options(bma, modes[k]), bitmap_options(bmb, modes[k]) };
        cowbackup_job *jobs[2] = { NULL, NULL };
        CHECK_RC(cowbackup_backup_start_group(2, srcs, tgts, opts, jobs), 0);
        REQUIRE(jobs[0] && jobs[1]);
        CHECK_RC(finish(jobs[1]), -EIO);
        CHECK_RC(finish(jobs[0]), -ECANCELED);
        CHECK(query(jobs[0]).state == COWBACKUP_JOB_CANCELLED);
        CHECK(query(jobs[1]).state == COWBACKUP_JOB_FAILED && query(jobs[1]).error == -EIO);
        /* ON_SUCCESS and NEVER: everything back. ALWAYS: what was not copied, i.e. for the
         * failed job everything, for the cancelled one at least what it had not copied; the
         * group rule "every bitmap goes back as for a failure" is checked on bmb exactly. */
        CHECK_DIRTY(bmb, "1 14 130 255");
        if (modes[k] != COWBACKUP_BITMAP_MODE_ALWAYS) {
            CHECK_DIRTY(bma, "0 15 16 128 129 254");
            CHECK(binfo(bma).generation == 0);
        }
        CHECK(binfo(bmb).generation == 0);
        CHECK(!is_busy(bma) && !is_busy(bmb));
        for (int j = 0; j < 2; j++) {
            cowbackup_job_free(jobs[j]);
            cowbackup_options_free((cowbackup_options *)opts[j]);
            cowbackup_driver_free(srcs[j]);
            cowbackup_driver_free(tgts[j]);
        }
        cowbackup_bitmap_free(bma);
        cowbackup_bitmap_free(bmb);
        cmem_destroy(ma);
        cmem_destroy(mb);
    }
}

static void group_bad_input(void)
{
    SAY("group bad input: -EINVAL (or -EBUSY), nothing started, jobs_out untouched, bitmaps not busy");
    cmem *ma = random_cmem(41), *mb = random_cmem(42), *mt0 = cmem_new(SIZE, 0), *mt1 = cmem_new(SIZE, 0);
    cowbackup_driver *a = cmem_driver(ma, 0), *b = cmem_driver(mb, 0);
    cowbackup_driver *t0 = cmem_driver(mt0, 0), *t1 = cmem_driver(mt1, 0), *small;
    REQUIRE(cowbackup_memory_new(SIZE / 2, &small) == 0);
    cowbackup_bitmap *bma, *bmb;
    REQUIRE(cowbackup_bitmap_new(SIZE, CL, &bma) == 0 && cowbackup_bitmap_new(SIZE, CL, &bmb) == 0);
    mark_clusters(bma, G1, N(G1));
    mark_clusters(bmb, G2, N(G2));
    cowbackup_options *oa = bitmap_options(bma, COWBACKUP_BITMAP_MODE_ON_SUCCESS);
    cowbackup_options *ob = bitmap_options(bmb, COWBACKUP_BITMAP_MODE_ON_SUCCESS);
    cowbackup_options *ob_nobm = cowbackup_options_new();
    REQUIRE(ob_nobm && cowbackup_options_set_sync(ob_nobm, COWBACKUP_SYNC_BITMAP) == 0);

    cowbackup_driver *srcs[2] = { a, b }, *tgts[2] = { t0, t1 };
    cowbackup_driver *null_src[2] = { a, NULL }, *null_tgt[2] = { t0, NULL };
    cowbackup_driver *same_tgt[2] = { t0, t0 }, *small_tgt[2] = { t0, small };
    const cowbackup_options *opts[2] = { oa, ob }, *same_bm[2] = { oa, oa }, *no_bm[2] = { oa, ob_nobm };
    cowbackup_job *jobs[2];

#define BAD_GROUP(call, err, words) do { \
        jobs[0] = BAD_PTR; \
        jobs[1] = BAD_PTR; \
        CHECK_ERR(call, err, "cowbackup_backup_start_group"); \
        CHECK(strstr(cowbackup_last_error(), words) != NULL); \
        CHECK(jobs[0] == BAD_PTR && jobs[1] == BAD_PTR); \
        CHECK(!is_busy(bma) && !is_busy(bmb)); \
        CHECK_DIRTY(bma, "0 15 16 128 129 254"); \
        CHECK_DIRTY(bmb, "1 14 130 255"); \
    } while (0)

    BAD_GROUP(cowbackup_backup_start_group(0, srcs, tgts, opts, jobs), EINVAL, "n is 0");
    BAD_GROUP(cowbackup_backup_start_group(2, NULL, tgts, opts, jobs), EINVAL, "NULL");
    BAD_GROUP(cowbackup_backup_start_group(2, srcs, NULL, opts, jobs), EINVAL, "NULL");
    BAD_GROUP(cowbackup_backup_start_group(2, srcs, tgts, opts, NULL), EINVAL, "jobs_out");
    BAD_GROUP(cowbackup_backup_start_group(2, null_src, tgts, opts, jobs), EINVAL, "sources[1]");
    BAD_GROUP(cowbackup_backup_start_group(2, srcs, null_tgt, opts, jobs), EINVAL, "targets[1]");
    BAD_GROUP(cowbackup_backup_start_group(2, srcs, same_tgt, opts, jobs), EINVAL, "same target");
    BAD_GROUP(cowbackup_backup_start_group(2, srcs, tgts, same_bm, jobs), EINVAL, "same bitmap");
    BAD_GROUP(cowbackup_backup_start_group(2, srcs, small_tgt, opts, jobs), EINVAL, "job 1");
    BAD_GROUP(cowbackup_backup_start_group(2, srcs, tgts, no_bm, jobs), EINVAL, "job 1");

    /* A bitmap held by another job: -EBUSY for the group, the first entry's bitmap freed. */
    cowbackup_bitmap *held;
    cowbackup_driver *hs, *ht;
    REQUIRE(cowbackup_bitmap_new(SIZE, CL, &held) == 0);
    REQUIRE(cowbackup_memory_new(SIZE, &hs) == 0 && cowbackup_memory_new(SIZE, &ht) == 0);
    cowbackup_options *oh = cowbackup_options_new();
    REQUIRE(oh && cowbackup_options_set_sync(oh, COWBACKUP_SYNC_NONE) == 0);
    REQUIRE(cowbackup_options_set_bitmap(oh, held, COWBACKUP_BITMAP_MODE_ON_SUCCESS) == 0);
    cowbackup_job *holder = NULL;
    REQUIRE(cowbackup_backup_start(hs, ht, oh, &holder) == 0);
    cowbackup_options *ob_held = bitmap_options(held, COWBACKUP_BITMAP_MODE_ON_SUCCESS);
    const cowbackup_options *busy_opts[2] = { oa, ob_held };
    BAD_GROUP(cowbackup_backup_start_group(2, srcs, tgts, busy_opts, jobs), EBUSY, "job 1");
    CHECK(is_busy(held));
    CHECK_RC(cowbackup_job_cancel(holder), 0);
    CHECK_RC(finish(holder), -ECANCELED);
    cowbackup_job_free(holder);

    /* Nothing was read or written by any of the refused groups. */
    CHECK(atomic_load(&ma->reads) == 0 && atomic_load(&mb->reads) == 0);
    CHECK(atomic_load(&mt0->writes) == 0 && atomic_load(&mt1->writes) == 0);

    /* opts NULL (defaults: full backups) and the corrected inputs work. */
    CHECK_RC(cowbackup_backup_start_group(2, srcs, tgts, NULL, jobs), 0);
    for (int k = 0; k < 2; k++) {
        CHECK_RC(finish(jobs[k]), 0);
        cowbackup_job_free(jobs[k]);
    }
    CHECK(memcmp(mt0->data, ma->data, SIZE) == 0 && memcmp(mt1->data, mb->data, SIZE) == 0);
    const cowbackup_options *one_null[2] = { oa, NULL };
    CHECK_RC(cowbackup_backup_start_group(2, srcs, tgts, one_null, jobs), 0);
    for (int k = 0; k < 2; k++) {
        CHECK_RC(finish(jobs[k]), 0);
        cowbackup_job_free(jobs[k]);
    }
    CHECK_DIRTY(bma, "");
    CHECK_DIRTY(bmb, "1 14 130 255");

    cowbackup_options *all[] = { oa, ob, ob_nobm, oh, ob_held };
    for (size_t k = 0; k < N(all); k++)
        cowbackup_options_free(all[k]);
    cowbackup_driver *drivers[] = { a, b, t0, t1, small, hs, ht };
    for (size_t k = 0; k < N(drivers); k++)
        cowbackup_driver_free(drivers[k]);
    cowbackup_bitmap_free(bma);
    cowbackup_bitmap_free(bmb);
    cowbackup_bitmap_free(held);
    cmem *mems[] = { ma, mb, mt0, mt1 };
    for (size_t k = 0; k < N(mems); k++) {
        CHECK(atomic_load(&mems[k]->released) == 1);
        cmem_destroy(mems[k]);
    }
}

int main(void)
{
    options();
    rejections();
    incremental(COWBACKUP_SYNC_BITMAP);
    incremental(COWBACKUP_SYNC_FULL);
    unaligned_granules();
    group_success();
    group_failure();
    group_bad_input();
    return test_finish();
}
