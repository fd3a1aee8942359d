/* Callbacks and re-entrancy (capi/README.md, "Callbacks and re-entrancy").
 *
 * The matrix: from each kind of callback, each job function either works or returns
 * -EDEADLK (free: refused, the job cancelled but not freed), within a time limit, and
 * never crashes. One fresh job per cell. The expected outcomes are the README's table,
 * cell for cell: this test reads the table from the README and fails when the two differ.
 * Also: cowbackup_job_free in the completion callback of a job that main is freeing, and
 * COWBACKUP_DRIVER_SERIALIZE ops calling their own driver (-EDEADLK instead of a hang).
 *
 * A watchdog thread aborts the program with a message when a step hangs, so a deadlock
 * fails the test instead of stalling CI. */
#include "common.h"

#include <time.h>
#include <unistd.h>

const char *test_name = "reentry";

/* Report a failed check with a message of its own. */
#define FAILF(...) do { fprintf(stderr, "FAIL " __VA_ARGS__); fputc('\n', stderr); test_failures++; } while (0)

#define KiB 1024
#define MiB (1024 * 1024)
#define SIZE ((uint64_t)MiB)
#define CLUSTER ((uint64_t)64 * KiB)
/* A range not yet copied when a cell acts: the last cluster (one worker copies from the
 * start and is held back by a speed limit; the hook cells write exactly this range). */
#define UNCOPIED (SIZE - CLUSTER)
/* A range main copies through the hook before a cell acts: already copied. */
#define COPIED (8 * CLUSTER)
#define NEW_SPEED ((uint64_t)1 << 30)

enum kind { WORKER_OP, HOOK_OP, WORKER_TRACE, HOOK_TRACE, COMPLETION, NKINDS };
enum fn { F_QUERY, F_PAUSE, F_RESUME, F_CANCEL, F_SET_SPEED, F_COW, F_WAIT, F_FREE, NFNS };

/* The first cell of each row of the README's table starts with these. */
static const char *const kind_label[NKINDS] = { "(a)", "(b)", "(c)", "(d)", "(e)" };
static const char *const kind_desc[NKINDS] = {
    "driver op of the background copy",
    "driver op inside cowbackup_cow_before_write",
    "trace callback of the background copy",
    "trace callback inside cowbackup_cow_before_write",
    "completion callback",
};
/* The README's column headers, in order. */
static const char *const fn_name[NFNS] = {
    "query", "pause", "resume", "cancel", "set_speed", "cow_before_write", "wait", "free",
};

/* capi/README.md, "Callbacks and re-entrancy", the matrix: the same cells, word for word.
 * "0": returns 0; "-EDEADLK", "-EBUSY": returns that; "result": returns the job's result;
 * "refused": the job is cancelled and not freed, the last error says EDEADLK.
 * cow_before_write is of a range not yet copied (of a copied range: 0 in every row). */
static const char *const expected[NKINDS][NFNS] = {
    /*               query pause     resume    cancel set_speed cow_before_write wait        free */
    [WORKER_OP]    = { "0", "0",      "0",      "0",   "0",      "-EDEADLK",      "-EDEADLK", "refused" },
    [HOOK_OP]      = { "0", "0",      "0",      "0",   "0",      "-EDEADLK",      "-EDEADLK", "refused" },
    [WORKER_TRACE] = { "0", "0",      "0",      "0",   "0",      "-EDEADLK",      "-EDEADLK", "refused" },
    [HOOK_TRACE]   = { "0", "0",      "0",      "0",   "0",      "-EDEADLK",      "-EDEADLK", "refused" },
    [COMPLETION]   = { "0", "-EBUSY", "-EBUSY", "0",   "0",      "0",             "result",   "refused" },
};

static pthread_t main_thread;

/* ---- watchdog ---------------------------------------------------------------------- */

static int limit_s = 20;                       /* per step; x5 under valgrind */
static _Atomic long long deadline_ms;          /* 0: nothing running */
static _Atomic(const char *) step = "";        /* what is running (a static string) */
static atomic_int watchdog_stop;
static char cell_names[NKINDS][NFNS][96];      /* written before the watchdog starts */

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void *watchdog(void *arg)
{
    (void)arg;
    while (!atomic_load(&watchdog_stop)) {
        long long d = atomic_load(&deadline_ms);
        if (d != 0 && now_ms() > d) {
            fprintf(stderr, "FATAL [reentry] %s did not finish within %d s: it hangs (a deadlock?)\n",
                    atomic_load(&step), limit_s);
            fflush(stderr);
            abort();
        }
        sleep_ms(20);
    }
    return NULL;
}

static void begin_step(const char *name)
{
    atomic_store(&step, name);
    atomic_store(&deadline_ms, now_ms() + (long long)limit_s * 1000);
}

static void end_step(void)
{
    atomic_store(&deadline_ms, 0);
}

/* ---- thread names ------------------------------------------------------------------ */

static void thread_name(char *buf, size_t len)
{
    buf[0] = '\0';
    pthread_getname_np(pthread_self(), buf, len);
}

/* "cowbackup-<id>-<n>" */
static int is_worker_name(const char *name)
{
    unsigned long long id;
    unsigned n;
    int end = -1;
    return sscanf(name, "cowbackup-%llu-%u%n", &id, &n, &end) == 2 && end > 0 && name[end] == '\0';
}

/* "cowbackup-<id>" */
static int is_job_thread_name(const char *name)
{
    unsigned long long id;
    int end = -1;
    return sscanf(name, "cowbackup-%llu%n", &id, &end) == 1 && end > 0 && name[end] == '\0';
}

static int on_main(void)
{
    return pthread_equal(pthread_self(), main_thread);
}

/* ---- one cell ---------------------------------------------------------------------- */

struct cell {
    enum kind kind;
    enum fn fn;
    cmem *sm, *tm;                       /* source (behind the cell's ops) and target memory */
    _Atomic(cowbackup_job *) job;        /* published by main once started */
    atomic_int claimed;                  /* the first matching callback acts */
    atomic_int done;                     /* it has acted; the fields below are written */
    atomic_int cb_ret;                   /* COMPLETION: the ret the callback got */
    int rc;                              /* what the call returned (free: 0) */
    int rc_copied;                       /* F_COW: cow_before_write of the copied range */
    long long call_ms;                   /* how long the call took */
    char msg[512];                       /* cowbackup_last_error() after the call */
    char thread[32];                     /* the thread the callback ran on */
    int thread_ok;                       /* ... is the one the README says */
    cowbackup_job_info info;             /* F_QUERY */
};

/* Call the cell's function on its job, from inside the callback. */
static void act(struct cell *c)
{
    cowbackup_job *job = atomic_load(&c->job);
    thread_name(c->thread, sizeof c->thread);
    switch (c->kind) {
    case WORKER_OP:
    case WORKER_TRACE:
        c->thread_ok = !on_main() && is_worker_name(c->thread);
        break;
    case HOOK_OP:
    case HOOK_TRACE:
        c->thread_ok = on_main();
        break;
    case COMPLETION:
        c->thread_ok = !on_main() && is_job_thread_name(c->thread);
        break;
    default:
        break;
    }
    /* A known message first: successful calls do not clear the last error. */
    cowbackup_job_query(NULL, NULL);
    long long t0 = now_ms();
    switch (c->fn) {
    case F_QUERY: c->rc = cowbackup_job_query(job, &c->info); break;
    case F_PAUSE: c->rc = cowbackup_job_pause(job); break;
    case F_RESUME: c->rc = cowbackup_job_resume(job); break;
    case F_CANCEL: c->rc = cowbackup_job_cancel(job); break;
    case F_SET_SPEED: c->rc = cowbackup_job_set_speed(job, NEW_SPEED); break;
    case F_COW: c->rc = cowbackup_cow_before_write(job, UNCOPIED, CLUSTER); break;
    case F_WAIT: c->rc = cowbackup_job_wait(job); break;
    case F_FREE: cowbackup_job_free(job); c->rc = 0; break;
    default: break;
    }
    c->call_ms = now_ms() - t0;
    snprintf(c->msg, sizeof c->msg, "%s", cowbackup_last_error());
    if (c->fn == F_COW)
        c->rc_copied = cowbackup_cow_before_write(job, COPIED, CLUSTER);
    atomic_store(&c->done, 1);
}

/* A callback of the cell's kind, on the right thread: act once. On a library thread, first
 * wait until main has published the job (the job may call back before
 * cowbackup_backup_start has returned the handle); on main, the job is always published
 * when it matters (the callers check). */
static void maybe_act(struct cell *c)
{
    if (atomic_load(&c->claimed))
        return;
    if (!on_main())
        while (atomic_load(&c->job) == NULL)
            sleep_ms(1);
    if (atomic_exchange(&c->claimed, 1))
        return;
    act(c);
}

/* The source: cmem behind ops whose opaque is the cell. */
static int src_read(void *opaque, uint64_t offset, void *buf, size_t len)
{
    struct cell *c = opaque;
    if ((c->kind == WORKER_OP && !on_main()) || (c->kind == HOOK_OP && on_main() && atomic_load(&c->job)))
        maybe_act(c);
    return cmem_ops.read(c->sm, offset, buf, len);
}

static int src_write(void *opaque, uint64_t offset, const void *buf, size_t len)
{
    struct cell *c = opaque;
    return cmem_ops.write(c->sm, offset, buf, len);
}

static int src_flush(void *opaque)
{
    struct cell *c = opaque;
    return cmem_ops.flush(c->sm);
}

static void src_release(void *opaque)
{
    struct cell *c = opaque;
    cmem_ops.release(c->sm);
}

static const cowbackup_driver_ops src_ops = {
    .read = src_read,
    .write = src_write,
    .flush = src_flush,
    .release = src_release,
};

static void on_trace(void *opaque, const cowbackup_trace_event *e)
{
    struct cell *c = opaque;
    if (c->kind == WORKER_TRACE && e->kind == COWBACKUP_TRACE_CHUNK && !e->hook)
        maybe_act(c);
    if (c->kind == HOOK_TRACE && e->kind == COWBACKUP_TRACE_HOOK_BEGIN && on_main() && atomic_load(&c->job))
        maybe_act(c);
}

static void on_complete(void *opaque, int ret)
{
    struct cell *c = opaque;
    atomic_store(&c->cb_ret, ret);
    if (c->kind == COMPLETION)
        maybe_act(c);
}

static int is_terminal(uint32_t state)
{
    return state == COWBACKUP_JOB_COMPLETED || state == COWBACKUP_JOB_FAILED || state == COWBACKUP_JOB_CANCELLED;
}

/* The function a -EDEADLK message must name. */
static const char *c_function(enum fn f)
{
    return f == F_COW ? "cowbackup_cow_before_write" : f == F_WAIT ? "cowbackup_job_wait" : "cowbackup_job_free";
}

static void run_cell(enum kind k, enum fn f)
{
    const char *name = cell_names[k][f];
    const char *want = expected[k][f];
    begin_step(name);
    struct cell *c = calloc(1, sizeof *c);
    REQUIRE(c != NULL);
    c->kind = k;
    c->fn = f;
    c->sm = cmem_new(SIZE, 0x5a);
    c->tm = cmem_new(SIZE, 0);
    cowbackup_driver *src = NULL;
    REQUIRE(cowbackup_driver_new(&src_ops, sizeof src_ops, c, SIZE, 0, &src) == 0);
    cowbackup_driver *dst = cmem_driver(c->tm, 0);

    cowbackup_options *o = cowbackup_options_new();
    REQUIRE(o != NULL);
    CHECK_RC(cowbackup_options_set_cluster_size(o, CLUSTER), 0);
    CHECK_RC(cowbackup_options_set_max_chunk(o, CLUSTER), 0);
    CHECK_RC(cowbackup_options_set_workers(o, 1), 0);
    /* Held back (one chunk, then a wait of hours) so UNCOPIED stays uncopied; the
     * completion row needs the job to end by itself. */
    CHECK_RC(cowbackup_options_set_speed(o, k == COMPLETION ? 0 : 1), 0);
    if (k == WORKER_TRACE || k == HOOK_TRACE)
        CHECK_RC(cowbackup_options_set_trace(o, on_trace, c), 0);
    if (k == COMPLETION)
        CHECK_RC(cowbackup_options_set_completion(o, on_complete, c), 0);
    cowbackup_job *job = NULL;
    REQUIRE(cowbackup_backup_start(src, dst, o, &job) == 0);
    cowbackup_options_free(o);
    /* The job holds the last references: its free must run release. */
    cowbackup_driver_free(src);
    cowbackup_driver_free(dst);

    CHECK_RC(cowbackup_cow_before_write(job, COPIED, CLUSTER), 0);
    atomic_store(&c->job, job);
    if (k == HOOK_OP || k == HOOK_TRACE) {
        /* The hook itself works whatever its callback did (a cancel makes it a no-op). */
        CHECK_RC(cowbackup_cow_before_write(job, UNCOPIED, CLUSTER), 0);
        if (!atomic_load(&c->done))
            FAILF("%s: the callback did not run on the hook's thread", name);
    } else {
        while (!atomic_load(&c->done))
            sleep_ms(1);
    }
    if (!atomic_load(&c->done)) {
        end_step();
        return; /* leaks this cell: the test has failed anyway */
    }

    printf("[%s] %-70s -> %-9s (%s, thread \"%s\", %lld ms)\n", test_name, name, want,
           f == F_FREE ? "void" : c->rc == 0 ? "0" : strerror(-c->rc), c->thread, c->call_ms);
    fflush(stdout);
    if (!c->thread_ok)
        FAILF("%s: ran on thread \"%s\", not the one the README says", name, c->thread);
    if (c->call_ms > (long long)limit_s * 1000 / 4)
        FAILF("%s: the call took %lld ms", name, c->call_ms);

    /* The outcome, as the table says. */
    int ok = 1;
    if (strcmp(want, "0") == 0) {
        ok = c->rc == 0;
    } else if (strcmp(want, "-EDEADLK") == 0) {
        ok = c->rc == -EDEADLK && strstr(c->msg, c_function(f)) != NULL && strstr(c->msg, "inside") != NULL;
    } else if (strcmp(want, "-EBUSY") == 0) {
        ok = c->rc == -EBUSY;
    } else if (strcmp(want, "result") == 0) {
        ok = c->rc == atomic_load(&c->cb_ret);
    } else if (strcmp(want, "refused") == 0) {
        ok = strstr(c->msg, "cowbackup_job_free") != NULL &&
             (strstr(c->msg, "EDEADLK") != NULL || strstr(c->msg, "deadlock") != NULL) &&
             strstr(c->msg, "not freed") != NULL;
    } else {
        ok = 0;
    }
    if (!ok)
        FAILF("%s: want %s, got %d (%s); last error there: \"%s\"", name, want, c->rc, strerror(-c->rc), c->msg);
    if (f == F_COW)
        CHECK_RC(c->rc_copied, 0); /* an already copied range: 0 in every row */

    /* What the call did, seen from main (the handle is still valid after a refused free). */
    cowbackup_job_info info = query(job);
    int live = k != COMPLETION;
    switch (f) {
    case F_QUERY:
        CHECK(c->info.state == (live ? COWBACKUP_JOB_RUNNING : COWBACKUP_JOB_COMPLETED));
        CHECK(c->info.len == SIZE);
        break;
    case F_PAUSE:
        if (live)
            CHECK(info.state == COWBACKUP_JOB_PAUSED);
        break;
    case F_SET_SPEED:
        if (live)
            CHECK(info.speed == NEW_SPEED);
        break;
    default:
        break;
    }

    /* Clean end, from main: cancel, wait, free; release has run when free returns. */
    int cancelled = live && (f == F_CANCEL || f == F_FREE);
    CHECK_RC(cowbackup_job_cancel(job), 0);
    int r = cowbackup_job_wait(job);
    if (cancelled)
        CHECK_RC(r, -ECANCELED);
    else if (!live)
        CHECK_RC(r, 0);
    else
        CHECK(r == 0 || r == -ECANCELED);
    CHECK(is_terminal(query(job).state));
    if (k == COMPLETION)
        CHECK(atomic_load(&c->cb_ret) == 0);
    CHECK(atomic_load(&c->sm->released) == 0 && atomic_load(&c->tm->released) == 0);
    cowbackup_job_free(job);
    CHECK(atomic_load(&c->sm->released) == 1 && atomic_load(&c->tm->released) == 1);
    cmem_destroy(c->sm);
    cmem_destroy(c->tm);
    free(c);
    end_step();
}

/* ---- free in the completion callback of a job main is freeing ------------------------ */

struct cfree {
    _Atomic(cowbackup_job *) job;
    atomic_int calls;
    atomic_int ret;
    char msg[512];
};

static void free_in_completion(void *opaque, int ret)
{
    struct cfree *c = opaque;
    cowbackup_job_query(NULL, NULL); /* a known message first */
    cowbackup_job_free(atomic_load(&c->job));
    snprintf(c->msg, sizeof c->msg, "%s", cowbackup_last_error());
    atomic_store(&c->ret, ret);
    atomic_fetch_add(&c->calls, 1);
}

static void completion_frees_during_free(void)
{
    SAY("main frees a running job; its completion callback (-ECANCELED), run inside that free, frees it too: "
        "refused, and main's free completes with release run");
    begin_step("free in the completion callback of a job main is freeing");
    struct cfree c = { 0 };
    cmem *sm = cmem_new(SIZE, 0x33), *tm = cmem_new(SIZE, 0);
    cowbackup_driver *src = cmem_driver(sm, 0), *dst = cmem_driver(tm, 0);
    cowbackup_options *o = cowbackup_options_new();
    REQUIRE(o != NULL);
    CHECK_RC(cowbackup_options_set_sync(o, COWBACKUP_SYNC_NONE), 0); /* runs until cancelled */
    CHECK_RC(cowbackup_options_set_completion(o, free_in_completion, &c), 0);
    cowbackup_job *job = NULL;
    REQUIRE(cowbackup_backup_start(src, dst, o, &job) == 0);
    atomic_store(&c.job, job);
    cowbackup_options_free(o);
    cowbackup_driver_free(src);
    cowbackup_driver_free(dst);
    CHECK_RC(cowbackup_cow_before_write(job, 0, 4096), 0);
    cowbackup_job_free(job);
    CHECK(atomic_load(&c.calls) == 1);
    CHECK(atomic_load(&c.ret) == -ECANCELED);
    if (strstr(c.msg, "cowbackup_job_free: refused (EDEADLK)") == NULL)
        FAILF("the free in the callback was not refused: \"%s\"", c.msg);
    CHECK(atomic_load(&sm->released) == 1 && atomic_load(&tm->released) == 1);
    cmem_destroy(sm);
    cmem_destroy(tm);
    end_step();
}

/* ---- COWBACKUP_DRIVER_SERIALIZE: an op calling its own driver ------------------------ */

struct sdev {
    cmem *m;
    cowbackup_driver *self;           /* the driver's own handle */
    cowbackup_job *job;               /* when set, the write op calls this job's hook first */
    atomic_int arm_read, arm_write;   /* the next read (write) op calls its own driver once */
    atomic_int nested_done;
    int nested_rc;                    /* what that call (or the hook) returned */
    char msg[512];                    /* and the last error then */
    char thread[32];                  /* on this thread */
};

static void nested_call(struct sdev *s, int write)
{
    uint8_t buf[512];
    memset(buf, 0x77, sizeof buf);
    cowbackup_job_query(NULL, NULL); /* a known message first */
    s->nested_rc = write ? cowbackup_driver_write(s->self, 0, buf, sizeof buf)
                         : cowbackup_driver_read(s->self, 0, buf, sizeof buf);
    snprintf(s->msg, sizeof s->msg, "%s", cowbackup_last_error());
    thread_name(s->thread, sizeof s->thread);
    atomic_store(&s->nested_done, 1);
}

static int sdev_read(void *opaque, uint64_t offset, void *buf, size_t len)
{
    struct sdev *s = opaque;
    if (atomic_exchange(&s->arm_read, 0))
        nested_call(s, 0);
    return cmem_ops.read(s->m, offset, buf, len);
}

static int sdev_write(void *opaque, uint64_t offset, const void *buf, size_t len)
{
    struct sdev *s = opaque;
    if (s->job) {
        /* A block layer whose write op calls the hook of a job backing up this very driver. */
        cowbackup_job_query(NULL, NULL);
        s->nested_rc = cowbackup_cow_before_write(s->job, offset, len);
        snprintf(s->msg, sizeof s->msg, "%s", cowbackup_last_error());
        atomic_store(&s->nested_done, 1);
        if (s->nested_rc < 0)
            return s->nested_rc; /* fail the write: the backup stays valid */
    }
    if (atomic_exchange(&s->arm_write, 0))
        nested_call(s, 1);
    return cmem_ops.write(s->m, offset, buf, len);
}

static int sdev_flush(void *opaque)
{
    struct sdev *s = opaque;
    return cmem_ops.flush(s->m);
}

static void sdev_release(void *opaque)
{
    struct sdev *s = opaque;
    cmem_ops.release(s->m);
}

static const cowbackup_driver_ops sdev_ops = {
    .read = sdev_read,
    .write = sdev_write,
    .flush = sdev_flush,
    .release = sdev_release,
};

static struct sdev *sdev_new(uint64_t size, uint8_t fill, uint32_t flags)
{
    struct sdev *s = calloc(1, sizeof *s);
    REQUIRE(s != NULL);
    s->m = cmem_new(size, fill);
    REQUIRE(cowbackup_driver_new(&sdev_ops, sizeof sdev_ops, s, size, flags, &s->self) == 0);
    return s;
}

static void sdev_free(struct sdev *s)
{
    cowbackup_driver_free(s->self);
    CHECK(atomic_load(&s->m->released) == 1);
    cmem_destroy(s->m);
    free(s);
}

static void serialize_direct(uint32_t flags)
{
    int ser = flags == COWBACKUP_DRIVER_SERIALIZE;
    SAY("%s: an op calling cowbackup_driver_read/_write on its own handle %s",
        ser ? "COWBACKUP_DRIVER_SERIALIZE" : "no flags", ser ? "gets -EDEADLK at once" : "is just a call");
    begin_step(ser ? "a serialized driver's op calling its own handle" : "an op calling its own handle");
    struct sdev *s = sdev_new(64 * KiB, 0x11, flags);
    uint8_t buf[4096];
    for (int write = 0; write < 2; write++) {
        atomic_store(&s->nested_done, 0);
        atomic_store(write ? &s->arm_write : &s->arm_read, 1);
        memset(buf, 0x22, sizeof buf);
        if (write)
            CHECK_RC(cowbackup_driver_write(s->self, 4096, buf, sizeof buf), 0);
        else
            CHECK_RC(cowbackup_driver_read(s->self, 4096, buf, sizeof buf), 0);
        CHECK(atomic_load(&s->nested_done) == 1);
        const char *fn = write ? "cowbackup_driver_write" : "cowbackup_driver_read";
        if (ser) {
            CHECK_RC(s->nested_rc, -EDEADLK);
            if (strstr(s->msg, fn) == NULL || strstr(s->msg, "EDEADLK") == NULL ||
                strstr(s->msg, "COWBACKUP_DRIVER_SERIALIZE") == NULL)
                FAILF("nested %s: message \"%s\"", fn, s->msg);
        } else {
            CHECK_RC(s->nested_rc, 0);
        }
    }
    /* The refused nested write wrote nothing; the unserialized one did. The outer calls worked,
     * and the driver works again after a refusal. */
    CHECK_RC(cowbackup_driver_read(s->self, 0, buf, sizeof buf), 0);
    CHECK(buf[0] == (ser ? 0x11 : 0x77) && buf[511] == (ser ? 0x11 : 0x77) && buf[512] == 0x11);
    CHECK(s->m->data[4096] == 0x22 && s->m->data[8191] == 0x22);
    sdev_free(s);
    end_step();
}

static void serialize_in_job(void)
{
    SAY("COWBACKUP_DRIVER_SERIALIZE source: its read op on a worker calls its own handle: -EDEADLK, the job completes");
    begin_step("a serialized source's op on a worker calling its own handle");
    struct sdev *s = sdev_new(SIZE, 0x44, COWBACKUP_DRIVER_SERIALIZE);
    memset(s->m->data + SIZE / 2, 0x45, SIZE / 2);
    cmem *tm = cmem_new(SIZE, 0);
    cowbackup_driver *dst = cmem_driver(tm, 0);
    atomic_store(&s->arm_read, 1);
    cowbackup_job *job = NULL;
    REQUIRE(cowbackup_backup_start(s->self, dst, NULL, &job) == 0);
    CHECK_RC(cowbackup_job_wait(job), 0);
    CHECK(atomic_load(&s->nested_done) == 1);
    CHECK_RC(s->nested_rc, -EDEADLK);
    CHECK(is_worker_name(s->thread));
    CHECK(strstr(s->msg, "cowbackup_driver_read") != NULL && strstr(s->msg, "EDEADLK") != NULL);
    CHECK(first_diff(tm->data, s->m->data, SIZE) == -1);
    cowbackup_job_free(job);
    cowbackup_driver_free(dst);
    sdev_free(s);
    cmem_destroy(tm);
    end_step();
}

static void serialize_block_layer(void)
{
    SAY("COWBACKUP_DRIVER_SERIALIZE source whose write op calls the hook of a job on it: the hook's copy gets "
        "-EDEADLK, the write fails, the backup stays exact");
    begin_step("a serialized source's write op calling the hook of its own job");
    struct sdev *s = sdev_new(SIZE, 0x55, COWBACKUP_DRIVER_SERIALIZE);
    for (uint64_t i = 0; i < SIZE; i += 4096)
        s->m->data[i] = (uint8_t)(i >> 12);
    uint8_t *snapshot = malloc(SIZE);
    REQUIRE(snapshot != NULL);
    memcpy(snapshot, s->m->data, SIZE);
    cmem *tm = cmem_new(SIZE, 0);
    cowbackup_driver *dst = cmem_driver(tm, 0);
    cowbackup_options *o = cowbackup_options_new();
    REQUIRE(o != NULL);
    CHECK_RC(cowbackup_options_set_cluster_size(o, CLUSTER), 0);
    CHECK_RC(cowbackup_options_set_max_chunk(o, CLUSTER), 0);
    CHECK_RC(cowbackup_options_set_workers(o, 1), 0);
    CHECK_RC(cowbackup_options_set_speed(o, 1), 0); /* keep the worker off UNCOPIED */
    cowbackup_job *job = NULL;
    REQUIRE(cowbackup_backup_start(s->self, dst, o, &job) == 0);
    cowbackup_options_free(o);
    s->job = job;
    uint8_t buf[4096];
    memset(buf, 0xee, sizeof buf);
    int rc = cowbackup_driver_write(s->self, UNCOPIED, buf, sizeof buf);
    CHECK_RC(rc, -EDEADLK);
    CHECK(atomic_load(&s->nested_done) == 1);
    CHECK_RC(s->nested_rc, -EDEADLK);
    if (strstr(s->msg, "cowbackup_cow_before_write") == NULL || strstr(s->msg, "EDEADLK") == NULL)
        FAILF("the hook's message: \"%s\"", s->msg);
    CHECK(first_diff(s->m->data, snapshot, SIZE) == -1); /* the write did not happen */
    s->job = NULL;
    CHECK_RC(cowbackup_job_set_speed(job, 0), 0);
    CHECK_RC(cowbackup_job_wait(job), 0);
    CHECK(first_diff(tm->data, snapshot, SIZE) == -1);
    cowbackup_job_free(job);
    cowbackup_driver_free(dst);
    sdev_free(s);
    cmem_destroy(tm);
    free(snapshot);
    end_step();
}

/* ---- the README's table ------------------------------------------------------------- */

#ifdef COWBACKUP_SOURCE_ROOT
/* Split a markdown table row into trimmed cells, in place; returns how many. */
static int split_row(char *line, char **cells, int max)
{
    int n = 0;
    char *bar = strchr(line, '|');
    while (bar != NULL && n < max) {
        char *start = bar + 1;
        char *next = strchr(start, '|');
        if (next == NULL)
            break;
        *next = '\0'; /* ends this cell; the next one starts after it */
        while (*start == ' ')
            start++;
        char *end = start + strlen(start);
        while (end > start && end[-1] == ' ')
            *--end = '\0';
        cells[n++] = start;
        bar = next;
    }
    return n;
}
#endif

static void check_readme_table(void)
{
#ifndef COWBACKUP_SOURCE_ROOT
    SAY("the README's table: not checked (built without COWBACKUP_SOURCE_ROOT)");
#else
    const char *path = COWBACKUP_SOURCE_ROOT "/capi/README.md";
    SAY("this test's table is the table of %s, \"Callbacks and re-entrancy\"", path);
    FILE *f = fopen(path, "r");
    REQUIRE(f != NULL);
    char line[2048];
    int in_section = 0, header = 0, seen[NKINDS] = { 0 };
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "## ", 3) == 0)
            in_section = strcmp(line, "## Callbacks and re-entrancy\n") == 0;
        if (!in_section || line[0] != '|')
            continue;
        char *cells[16];
        int n = split_row(line, cells, 16);
        if (n > 0 && strncmp(cells[0], "callback", 8) == 0) {
            header++;
            CHECK(n == NFNS + 1);
            for (int i = 0; i < NFNS && i + 1 < n; i++)
                if (strcmp(cells[i + 1], fn_name[i]) != 0)
                    FAILF("README column %d is \"%s\", the test's is \"%s\"", i + 1, cells[i + 1], fn_name[i]);
            continue;
        }
        for (int k = 0; k < NKINDS; k++) {
            if (n == 0 || strncmp(cells[0], kind_label[k], 3) != 0)
                continue;
            seen[k]++;
            CHECK(n == NFNS + 1);
            for (int i = 0; i < NFNS && i + 1 < n; i++)
                if (strcmp(cells[i + 1], expected[k][i]) != 0)
                    FAILF("README row %s, %s: \"%s\", the test's table: \"%s\"", kind_label[k], fn_name[i],
                          cells[i + 1], expected[k][i]);
        }
    }
    fclose(f);
    CHECK(header == 1);
    for (int k = 0; k < NKINDS; k++)
        if (seen[k] != 1)
            FAILF("README row %s found %d times", kind_label[k], seen[k]);
#endif
}

int main(void)
{
    main_thread = pthread_self();
    const char *preload = getenv("LD_PRELOAD");
    if (preload && strstr(preload, "vgpreload"))
        limit_s *= 5; /* valgrind */
    for (int k = 0; k < NKINDS; k++)
        for (int f = 0; f < NFNS; f++)
            snprintf(cell_names[k][f], sizeof cell_names[k][f], "%s %s: %s", kind_label[k], kind_desc[k],
                     fn_name[f]);
    pthread_t wd;
    REQUIRE(pthread_create(&wd, NULL, watchdog, NULL) == 0);

    check_readme_table();
    for (int k = 0; k < NKINDS; k++) {
        SAY("%s %s: every job function works or returns -EDEADLK, at once", kind_label[k], kind_desc[k]);
        for (int f = 0; f < NFNS; f++)
            run_cell((enum kind)k, (enum fn)f);
    }
    completion_frees_during_free();
    serialize_direct(COWBACKUP_DRIVER_SERIALIZE);
    serialize_direct(0);
    serialize_in_job();
    serialize_block_layer();

    atomic_store(&watchdog_stop, 1);
    pthread_join(wd, NULL);
    return test_finish();
}
