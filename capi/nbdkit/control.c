/*
 * The filter's control socket: `control=PATH`, QEMU's QMP on a Unix socket, so backups of the
 * served disk start, pause, go on, end and are watched at any time while nbdkit serves it
 * (QEMU's blockdev-backup / query-jobs / job-* / block-dirty-bitmap-* / nbd-server-start +
 * block-export-add, and its events JOB_STATUS_CHANGE, BLOCK_JOB_COMPLETED, BLOCK_JOB_ERROR,
 * BLOCK_JOB_CANCELLED).
 *
 * Wire format (QEMU's docs/interop/qmp-spec): the server sends the greeting
 * {"QMP": {"version": ..., "capabilities": []}}; the client sends JSON objects
 * {"execute": NAME, "arguments": {...}, "id": ANY} (newlines between them optional); each
 * gets {"return": ...} or {"error": {"class", "desc"}} with the same "id". Until
 * qmp_capabilities, every other command fails with class CommandNotFound. Events
 * {"event", "data", "timestamp": {"seconds", "microseconds"}} go to every negotiated client.
 *
 * Threads: one control thread (started in .after_fork, joined in .cleanup) accepts clients,
 * reads, runs the commands and writes the replies, with poll() and non-blocking sockets:
 * a client that sends nothing, or never reads, blocks nobody. Events are made on the job
 * threads (trace and completion callbacks) and queued into each client's output buffer
 * (clients_lock), then the control thread is woken through a pipe.
 *
 * Limits (a hostile local client must not crash or block the daemon): at most MAX_CLIENTS
 * clients at once (one more is told so and closed), a message at most MAX_MSG bytes (a longer
 * one closes the connection after an error), a client's unsent output at most MAX_OUT bytes
 * (a client that does not read its replies and events is disconnected), a client that has not
 * negotiated within NEGOTIATE_TIMEOUT seconds is closed, JSON nesting at most JSON_MAX_DEPTH.
 * Malformed JSON, a non-object, an unknown command, unknown, missing or mistyped arguments get
 * a QMP error and change nothing.
 *
 * Locks, in order: hook_lock (write; the control thread only) -> jobs_lock -> clients_lock.
 * Library calls that may run callbacks (cowbackup_job_free, _cancel, backup_start) are made
 * with neither jobs_lock nor clients_lock held.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <nbdkit-filter.h>

#include "filter.h"
#include "json.h"

#define MAX_CLIENTS 8
#define MAX_MSG (64 * 1024)
#define MAX_OUT (1024 * 1024)
#define NEGOTIATE_TIMEOUT 30
#define CLOSE_LINGER 5
#define MAX_BITMAPS 16
#define MAX_EXPORTS 16
#define MAX_NAME 128

/* Append a string literal. */
#define jb_lit(b, lit) jb_raw((b), (lit), sizeof(lit) - 1)

/* ---- state ---- */

static char *control_path;        /* control=, absolute */
static int listen_fd = -1;
static dev_t sock_dev;            /* the socket file we bound (removed at the end if still it) */
static ino_t sock_ino;
static int wake_pipe[2] = { -1, -1 };
static pthread_t control_thread;
static bool thread_started;
static volatile bool stop_flag;   /* clients_lock */

/* A backup job as QMP sees it. The record outlives its job handle's callbacks: it is freed
 * only after cowbackup_job_free returned. */
struct qjob {
    char id[MAX_NAME];
    cowbackup_job *job;           /* owned (the start-up job's: owned by cowbackup.c) */
    bool startup;
    bool auto_dismiss;
    /* jobs_lock: */
    char status[16];              /* QMP JobStatus of the last JOB_STATUS_CHANGE */
    bool ended;                   /* the completion callback ran */
    int ret;                      /* its result */
    char error[1024];             /* the job's error text ("" if none) */
    char last_error[512];         /* the last error trace message */
    bool published;               /* the start is done with the record */
};

static pthread_mutex_t jobs_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t jobs_cond = PTHREAD_COND_INITIALIZER;
static struct qjob *startup_rec;  /* backup=: "backup0"; set in .after_fork */
static bool startup_dismissed;    /* control thread only */
static struct qjob *cur;          /* the control socket's job; hook_lock for the pointer
                                     (written under the write lock by the control thread) */

struct qbitmap {
    char name[MAX_NAME];
    cowbackup_bitmap *bm;
};
/* block-dirty-bitmap-add's bitmaps: hook_lock (written under the write lock). */
static struct qbitmap bitmaps[MAX_BITMAPS];
static size_t n_bitmaps;

/* object-add's objects (control thread only): QEMU's tls-creds-x509 (a directory with
 * ca-cert.pem, server-cert.pem + server-key.pem or client-cert.pem + client-key.pem) and
 * authz-simple (one client identity), used by nbd-server-start's tls-creds / tls-authz and by
 * blockdev-backup's tls-creds for an nbds:// target. */
#define MAX_OBJECTS 16
static struct {
    char id[MAX_NAME];
    bool authz;                   /* authz-simple; else tls-creds-x509 */
    char dir[PATH_MAX];           /* tls-creds-x509: its directory */
    bool server;                  /* endpoint: server (default) or client */
    bool verify_peer;             /* verify-peer (default true) */
    char identity[512];           /* authz-simple: the identity */
} objects[MAX_OBJECTS];
static size_t n_objects;
static int find_object(const char *id);

/* blockdev-add's nodes (control thread only): named backup targets. */
#define MAX_NODES 16
static struct {
    char name[MAX_NAME];
    char target[PATH_MAX + 64];   /* an absolute path (an existing file) or an NBD URI */
    char creds[MAX_NAME];         /* nbd with tls-creds: the tls-creds-x509 object */
} nodes[MAX_NODES];
static size_t n_nodes;

static int find_node(const char *name)
{
    for (size_t i = 0; name && i < n_nodes; i++)
        if (strcmp(nodes[i].name, name) == 0)
            return (int)i;
    return -1;
}

/* Pull mode (control thread only). */
static cowbackup_nbd_server *nbd_server;
static struct {
    char id[MAX_NAME];
    char name[MAX_NAME];
} exports[MAX_EXPORTS];
static size_t n_exports;

struct client {
    int fd;
    bool negotiated;              /* written under clients_lock (read by event emitters) */
    bool closing;                 /* close once the output is sent (or at once if it can't);
                                     written under clients_lock */
    time_t since;                 /* connected */
    time_t closing_at;            /* control thread: when `closing` was first seen (0: not) */
    char msg[MAX_MSG];
    size_t msg_len;
    struct json_frame frame;
    struct json_buf out;          /* clients_lock */
};
static pthread_mutex_t clients_lock = PTHREAD_MUTEX_INITIALIZER;
static struct client *clients[MAX_CLIENTS];

/* ---- configuration ---- */

int control_config(const char *value)
{
    if (control_path) {
        nbdkit_error("cowbackup: control= is given twice: give it once");
        return -1;
    }
    if (value[0] == '\0') {
        nbdkit_error("cowbackup: control= is empty: give the path of a new Unix socket");
        return -1;
    }
    char *abs = nbdkit_absolute_path(value);
    if (!abs)
        return -1;
    if (strlen(abs) >= sizeof ((struct sockaddr_un *)0)->sun_path) {
        nbdkit_error("cowbackup: control=%s: the path is too long for a Unix socket (at most "
                     "%zu bytes)", value, sizeof ((struct sockaddr_un *)0)->sun_path - 1);
        free(abs);
        return -1;
    }
    control_path = abs;
    return 0;
}

bool control_configured(void)
{
    return control_path != NULL;
}

/* An existing path: a socket of ours nobody listens on is stale (removed at the bind);
 * anything else is refused. Returns 0 (free or stale), -1 with the error logged. */
static int check_socket_path(char *err, size_t errlen, bool remove_stale)
{
    struct stat st;
    if (lstat(control_path, &st) < 0) {
        if (errno == ENOENT)
            return 0;
        snprintf(err, errlen, "cowbackup: control=%s: %s", control_path, strerror(errno));
        return -1;
    }
    if (!S_ISSOCK(st.st_mode)) {
        snprintf(err, errlen, "cowbackup: control=%s exists and is not a socket: refusing to "
                 "replace it (remove it or choose another path)", control_path);
        return -1;
    }
    if (st.st_uid != geteuid()) {
        snprintf(err, errlen, "cowbackup: control=%s is a socket of another user (uid %u): "
                 "refusing to replace it", control_path, (unsigned)st.st_uid);
        return -1;
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(err, errlen, "cowbackup: socket: %s", strerror(errno));
        return -1;
    }
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    strcpy(sa.sun_path, control_path);
    int r = connect(fd, (struct sockaddr *)&sa, sizeof sa);
    close(fd);
    if (r == 0) {
        snprintf(err, errlen, "cowbackup: control=%s: a server is listening there (another "
                 "nbdkit?): choose another path", control_path);
        return -1;
    }
    if (remove_stale && unlink(control_path) < 0 && errno != ENOENT) {
        snprintf(err, errlen, "cowbackup: control=%s: cannot remove the stale socket: %s",
                 control_path, strerror(errno));
        return -1;
    }
    return 0;
}

int control_check(void)
{
    char err[512];
    if (check_socket_path(err, sizeof err, false) < 0) {
        nbdkit_error("%s", err);
        return -1;
    }
    char dir[PATH_MAX];
    const char *slash = strrchr(control_path, '/');
    size_t n = slash == control_path ? 1 : (size_t)(slash - control_path);
    memcpy(dir, control_path, n);
    dir[n] = '\0';
    struct stat st;
    if (stat(dir, &st) < 0 || !S_ISDIR(st.st_mode)) {
        nbdkit_error("cowbackup: control=%s: the directory %s does not exist", control_path,
                     dir);
        return -1;
    }
    return 0;
}

void control_unload(void)
{
    free(control_path);
    control_path = NULL;
}

/* ---- output ---- */

static void timestamp(struct json_buf *b)
{
    struct timeval tv;
    gettimeofday(&tv, NULL);
    jb_printf(b, "\"timestamp\": {\"seconds\": %lld, \"microseconds\": %ld}",
              (long long)tv.tv_sec, (long)tv.tv_usec);
}

static void wake(void)
{
    if (wake_pipe[1] >= 0) {
        char c = 1;
        ssize_t r = write(wake_pipe[1], &c, 1); /* full pipe: already woken */
        (void)r;
    }
}

/* Append a complete message (and "\r\n", as QEMU) to a client's output; clients_lock held. */
static void client_queue(struct client *c, const char *msg, size_t len)
{
    if (c->closing && c->out.failed)
        return;
    jb_raw(&c->out, msg, len);
    jb_lit(&c->out, "\r\n");
    if (c->out.failed) {
        /* It does not read: drop it (the control thread closes it). */
        c->closing = true;
    }
}

/* An event to every negotiated client. Any thread. `data`: a JSON object text. */
static void emit_event(const char *name, const char *data)
{
    struct json_buf b;
    jb_init(&b, MAX_OUT);
    jb_printf(&b, "{\"event\": \"%s\", \"data\": %s, ", name, data);
    timestamp(&b);
    jb_lit(&b, "}");
    if (b.failed) {
        jb_free(&b);
        return;
    }
    pthread_mutex_lock(&clients_lock);
    bool any = false;
    for (int i = 0; i < MAX_CLIENTS; i++)
        if (clients[i] && clients[i]->negotiated && !clients[i]->closing) {
            client_queue(clients[i], b.data, b.len);
            any = true;
        }
    pthread_mutex_unlock(&clients_lock);
    jb_free(&b);
    if (any)
        wake();
}

/* JOB_STATUS_CHANGE when the status changes; jobs_lock held. */
static void set_status(struct qjob *q, const char *status)
{
    if (strcmp(q->status, status) == 0)
        return;
    snprintf(q->status, sizeof q->status, "%s", status);
    struct json_buf d;
    jb_init(&d, 4096);
    jb_lit(&d, "{\"id\": ");
    jb_cstr(&d, q->id);
    jb_printf(&d, ", \"status\": \"%s\"}", status);
    if (!d.failed)
        emit_event("JOB_STATUS_CHANGE", d.data);
    jb_free(&d);
}

/* ---- job callbacks (job threads) ---- */

static const char *state_status(uint32_t s)
{
    switch (s) {
    case COWBACKUP_JOB_CREATED: return "created";
    case COWBACKUP_JOB_RUNNING: return "running";
    case COWBACKUP_JOB_PAUSED: return "paused";
    default: return NULL; /* the end: the completion callback says it */
    }
}

static void job_trace_event(struct qjob *q, const cowbackup_trace_event *ev)
{
    if (ev->kind == COWBACKUP_TRACE_STATE) {
        const char *s = state_status(ev->to_state);
        pthread_mutex_lock(&jobs_lock);
        /* Before the start is published it reports "created", then the state it finds. */
        if (s && !q->ended && q->published)
            set_status(q, s);
        pthread_mutex_unlock(&jobs_lock);
    } else if (ev->kind == COWBACKUP_TRACE_ERROR) {
        const char *action;
        switch (ev->action) {
        case COWBACKUP_TRACE_ACTION_IGNORE: action = "ignore"; break;
        case COWBACKUP_TRACE_ACTION_STOP: action = "stop"; break;
        case COWBACKUP_TRACE_ACTION_BREAK_GUEST_WRITE: return; /* the client's write fails */
        default: action = "report"; break;
        }
        pthread_mutex_lock(&jobs_lock);
        snprintf(q->last_error, sizeof q->last_error, "%s", ev->message);
        pthread_mutex_unlock(&jobs_lock);
        /* QEMU's operation: "read" (source) or "write" (target). */
        bool target = strstr(ev->message, "target") != NULL;
        struct json_buf d;
        jb_init(&d, 8192);
        jb_lit(&d, "{\"device\": ");
        jb_cstr(&d, q->id);
        jb_printf(&d, ", \"operation\": \"%s\", \"action\": \"%s\", \"nospace\": %s, "
                  "\"reason\": ", target ? "write" : "read", action,
                  ev->error == -ENOSPC ? "true" : "false");
        jb_cstr(&d, ev->message);
        jb_lit(&d, "}");
        if (!d.failed)
            emit_event("BLOCK_JOB_ERROR", d.data);
        jb_free(&d);
    }
}

static void job_end(struct qjob *q, int ret, const char *why)
{
    cowbackup_job_info info;
    memset(&info, 0, sizeof info);
    if (q->job)
        cowbackup_job_query(q->job, &info);
    pthread_mutex_lock(&jobs_lock);
    q->ended = true;
    q->ret = ret;
    if (ret == 0)
        q->error[0] = '\0';
    else if (why)
        snprintf(q->error, sizeof q->error, "%s", why);
    else if (ret == -ECANCELED)
        snprintf(q->error, sizeof q->error, "Job canceled%s%s",
                 q->last_error[0] ? ": " : "", q->last_error);
    else
        snprintf(q->error, sizeof q->error, "%s%s%s", strerror(-ret),
                 q->last_error[0] ? ": " : "", q->last_error);
    if (ret != 0)
        set_status(q, "aborting");
    else
        set_status(q, "pending");
    struct json_buf d;
    jb_init(&d, 8192);
    jb_lit(&d, "{\"type\": \"backup\", \"device\": ");
    jb_cstr(&d, q->id);
    jb_printf(&d, ", \"len\": %" PRIu64 ", \"offset\": %" PRIu64 ", \"speed\": %" PRIu64,
              info.len, info.offset, info.speed);
    if (ret != 0 && ret != -ECANCELED) {
        jb_lit(&d, ", \"error\": ");
        jb_cstr(&d, q->error);
    }
    jb_lit(&d, "}");
    if (!d.failed)
        emit_event(ret == -ECANCELED ? "BLOCK_JOB_CANCELLED" : "BLOCK_JOB_COMPLETED", d.data);
    jb_free(&d);
    set_status(q, "concluded");
    if (q->auto_dismiss)
        set_status(q, "null");
    pthread_cond_broadcast(&jobs_cond);
    pthread_mutex_unlock(&jobs_lock);
}

static void qjob_trace(void *opaque, const cowbackup_trace_event *ev)
{
    job_trace_event(opaque, ev);
}

static void qjob_completed(void *opaque, int ret)
{
    struct qjob *q = opaque;
    /* A job that ends at once may get here before the start set q->job. */
    pthread_mutex_lock(&jobs_lock);
    while (!q->published)
        pthread_cond_wait(&jobs_cond, &jobs_lock);
    pthread_mutex_unlock(&jobs_lock);
    job_end(q, ret, NULL);
}

/* The start-up job (cowbackup.c). */
void control_startup_job(cowbackup_job *j)
{
    if (!control_path)
        return;
    struct qjob *q = calloc(1, sizeof *q);
    if (!q)
        return; /* query-jobs then does not list it */
    snprintf(q->id, sizeof q->id, "backup0");
    q->job = j;
    q->startup = true;
    q->published = true;
    snprintf(q->status, sizeof q->status, "running");
    pthread_mutex_lock(&jobs_lock);
    startup_rec = q;
    pthread_mutex_unlock(&jobs_lock);
}

void control_startup_trace(const cowbackup_trace_event *ev)
{
    pthread_mutex_lock(&jobs_lock);
    struct qjob *q = startup_rec;
    pthread_mutex_unlock(&jobs_lock);
    if (q)
        job_trace_event(q, ev);
}

void control_startup_completed(int ret, const char *line)
{
    pthread_mutex_lock(&jobs_lock);
    struct qjob *q = startup_rec;
    pthread_mutex_unlock(&jobs_lock);
    if (q)
        job_end(q, ret, ret == 0 ? NULL : line);
}

/* ---- the write path (connection threads, hook_lock held for reading) ---- */

int control_before_write(const char *what, uint32_t count, uint64_t offset, int *err)
{
    for (size_t i = 0; i < n_bitmaps; i++) {
        int r = cowbackup_bitmap_mark(bitmaps[i].bm, offset, count);
        if (r < 0) {
            nbdkit_error("cowbackup: %s of %" PRIu32 " bytes at %" PRIu64 " refused: bitmap "
                         "%s: mark failed: %s", what, count, offset, bitmaps[i].name,
                         cowbackup_last_error());
            *err = -r;
            return -1;
        }
    }
    if (cur && cur->job) {
        int r = cowbackup_cow_before_write(cur->job, offset, count);
        if (r < 0) {
            nbdkit_error("cowbackup: %s of %" PRIu32 " bytes at %" PRIu64 " refused: "
                         "copy-before-write (job %s) failed: %s", what, count, offset,
                         cur->id, cowbackup_last_error());
            *err = -r;
            return -1;
        }
    }
    return 0;
}

/* ---- commands ---- */

struct reply {
    struct json_buf ret;          /* the "return" value (JSON text), or empty: {} */
    const char *err_class;        /* NULL: success */
    char desc[1024];
};

static int error_reply(struct reply *r, const char *cls, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int error_reply(struct reply *r, const char *cls, const char *fmt, ...)
{
    r->err_class = cls;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->desc, sizeof r->desc, fmt, ap);
    va_end(ap);
    return -1;
}

static int generic(struct reply *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int generic(struct reply *r, const char *fmt, ...)
{
    r->err_class = "GenericError";
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->desc, sizeof r->desc, fmt, ap);
    va_end(ap);
    return -1;
}

/* Argument checking, as QEMU's QAPI visitor words it. A spec: "name:t" with t one of
 * s (string), i (integer >= 0), b (bool), a (array), o (object), and a leading '!' for a
 * required argument. */
static int check_args(struct reply *r, const struct json *args, const char *const *spec)
{
    for (const struct json *m = args ? args->child : NULL; m; m = m->next) {
        bool known = false;
        for (const char *const *s = spec; *s; s++) {
            const char *name = **s == '!' ? *s + 1 : *s;
            size_t n = strcspn(name, ":");
            if (strlen(m->key) == n && strncmp(m->key, name, n) == 0) {
                known = true;
                char t = name[n + 1];
                bool ok;
                uint64_t u;
                switch (t) {
                case 's': ok = m->type == JSON_STRING; break;
                case 'i': ok = json_u64(m, &u); break;
                case 'b': ok = m->type == JSON_TRUE || m->type == JSON_FALSE; break;
                case 'a': ok = m->type == JSON_ARRAY; break;
                case '?': ok = true; break;
                default: ok = m->type == JSON_OBJECT; break;
                }
                if (!ok)
                    return generic(r, "Invalid parameter type for '%.100s', expected: %s",
                                   m->key, t == 's' ? "string" : t == 'i' ? "integer" :
                                   t == 'b' ? "boolean" : t == 'a' ? "array" : "object");
                break;
            }
        }
        if (!known)
            return generic(r, "Parameter '%.100s' is unexpected", m->key);
    }
    for (const char *const *s = spec; *s; s++) {
        if (**s != '!')
            continue;
        char name[64];
        snprintf(name, sizeof name, "%.*s", (int)strcspn(*s + 1, ":"), *s + 1);
        if (!json_get(args, name))
            return generic(r, "Parameter '%s' is missing", name);
    }
    return 0;
}

static const char *arg_str(const struct json *args, const char *key)
{
    const struct json *v = json_get(args, key);
    return v ? v->str : NULL;
}

static bool arg_bool(const struct json *args, const char *key, bool dflt)
{
    const struct json *v = json_get(args, key);
    return v ? v->type == JSON_TRUE : dflt;
}

static bool valid_name(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n >= MAX_NAME)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '_' || c == '.'))
            return false;
    }
    return true;
}

/* A job by its id (query-jobs lists it); control thread. */
static bool job_listed(struct qjob *q);
static struct qjob *find_job(const char *id)
{
    if (cur && strcmp(cur->id, id) == 0 && job_listed(cur))
        return cur;
    if (startup_rec && !startup_dismissed && strcmp(startup_rec->id, id) == 0)
        return startup_rec;
    return NULL;
}

static struct qbitmap *find_bitmap(const char *name)
{
    for (size_t i = 0; i < n_bitmaps; i++)
        if (strcmp(bitmaps[i].name, name) == 0)
            return &bitmaps[i];
    return NULL;
}

/* The start-up bitmap= answers to its path and to its file name. */
static bool is_startup_bitmap(const char *name)
{
    if (!bitmap || !bitmap_path)
        return false;
    return strcmp(name, bitmap_path) == 0 || strcmp(name, strrchr(bitmap_path, '/') + 1) == 0;
}

static cowbackup_bitmap *lookup_bitmap(const char *name)
{
    if (is_startup_bitmap(name))
        return bitmap;
    struct qbitmap *b = find_bitmap(name);
    return b ? b->bm : NULL;
}

/* Still running (or paused): neither its completion callback ran nor the library says it
 * ended. */
static bool job_running(struct qjob *q)
{
    if (!q || !q->job)
        return false;
    pthread_mutex_lock(&jobs_lock);
    bool r = !q->ended;
    pthread_mutex_unlock(&jobs_lock);
    cowbackup_job_info info;
    if (r && cowbackup_job_query(q->job, &info) == 0 && info.state != COWBACKUP_JOB_CREATED &&
        info.state != COWBACKUP_JOB_RUNNING && info.state != COWBACKUP_JOB_PAUSED)
        r = false;
    return r;
}

/* Listed by query-jobs (a concluded job with auto-dismiss is gone). */
static bool job_listed(struct qjob *q)
{
    if (!q)
        return false;
    pthread_mutex_lock(&jobs_lock);
    bool r = !(q->ended && q->auto_dismiss);
    pthread_mutex_unlock(&jobs_lock);
    return r;
}

static void job_info_json(struct json_buf *b, struct qjob *q, bool block_job)
{
    cowbackup_job_info info;
    memset(&info, 0, sizeof info);
    if (q->job)
        cowbackup_job_query(q->job, &info);
    pthread_mutex_lock(&jobs_lock);
    char status[16], error[1024];
    snprintf(status, sizeof status, "%s", q->status);
    snprintf(error, sizeof error, "%s", q->ended && q->ret != 0 ? q->error : "");
    pthread_mutex_unlock(&jobs_lock);
    if (!block_job) {
        jb_lit(b, "{\"id\": ");
        jb_cstr(b, q->id);
        jb_printf(b, ", \"type\": \"backup\", \"status\": \"%s\", \"current-progress\": %"
                  PRIu64 ", \"total-progress\": %" PRIu64, status, info.offset, info.len);
    } else {
        jb_lit(b, "{\"type\": \"backup\", \"device\": ");
        jb_cstr(b, q->id);
        jb_printf(b, ", \"len\": %" PRIu64 ", \"offset\": %" PRIu64 ", \"busy\": %s, "
                  "\"paused\": %s, \"speed\": %" PRIu64 ", \"io-status\": \"ok\", "
                  "\"ready\": false, \"status\": \"%s\", \"auto-finalize\": true, "
                  "\"auto-dismiss\": %s", info.len, info.offset,
                  strcmp(status, "running") == 0 ? "true" : "false",
                  strcmp(status, "paused") == 0 ? "true" : "false", info.speed, status,
                  q->auto_dismiss ? "true" : "false");
    }
    if (error[0]) {
        jb_lit(b, ", \"error\": ");
        jb_cstr(b, error);
    }
    jb_lit(b, "}");
}

static int cmd_query_jobs(struct reply *r, const struct json *args, bool block_jobs)
{
    static const char *const spec[] = { NULL };
    if (check_args(r, args, spec) < 0)
        return -1;
    jb_lit(&r->ret, "[");
    bool first = true;
    struct qjob *list[2] = { startup_dismissed ? NULL : startup_rec, cur };
    for (int i = 0; i < 2; i++) {
        if (!list[i] || !job_listed(list[i]))
            continue;
        if (block_jobs && !job_running(list[i]))
            continue; /* query-block-jobs: active jobs only */
        if (!first)
            jb_lit(&r->ret, ", ");
        first = false;
        job_info_json(&r->ret, list[i], block_jobs);
    }
    jb_lit(&r->ret, "]");
    return 0;
}

/* A job named by `key` (id, or device for the block-job-* commands). */
static struct qjob *job_arg(struct reply *r, const struct json *args, const char *key)
{
    const char *id = arg_str(args, key);
    struct qjob *q = find_job(id);
    if (!q)
        error_reply(r, "DeviceNotActive", "No job with id '%.200s'", id);
    return q;
}

static int job_op(struct reply *r, const struct json *args, const char *key, const char *verb)
{
    char req[32];
    snprintf(req, sizeof req, "!%s:s", key);
    const char *spec_id[] = { req, NULL };
    const char *spec_speed[] = { req, "!speed:i", NULL };
    const char *spec_cancel[] = { req, "force:b", NULL }; /* block-job-cancel's force */
    bool is_speed = strcmp(verb, "set-speed") == 0;
    bool block_cancel = strcmp(key, "device") == 0 && strcmp(verb, "cancel") == 0;
    if (check_args(r, args, is_speed ? spec_speed : block_cancel ? spec_cancel : spec_id) < 0)
        return -1;
    struct qjob *q = job_arg(r, args, key);
    if (!q)
        return -1;
    if (strcmp(verb, "dismiss") == 0) {
        if (job_running(q))
            return generic(r, "Job '%s' in state '%s' cannot accept command verb 'dismiss'",
                           q->id, q->status);
        pthread_mutex_lock(&jobs_lock);
        set_status(q, "null");
        pthread_mutex_unlock(&jobs_lock);
        if (q == startup_rec) {
            startup_dismissed = true;
        } else {
            pthread_rwlock_wrlock(&hook_lock);
            cur = NULL;
            pthread_rwlock_unlock(&hook_lock);
            cowbackup_job_free(q->job);
            free(q);
        }
        return 0;
    }
    if (!job_running(q))
        return generic(r, "Job '%s' in state '%s' cannot accept command verb '%s'", q->id,
                       q->status, verb);
    int ret;
    if (strcmp(verb, "pause") == 0)
        ret = cowbackup_job_pause(q->job);
    else if (strcmp(verb, "resume") == 0)
        ret = cowbackup_job_resume(q->job);
    else if (strcmp(verb, "cancel") == 0)
        ret = cowbackup_job_cancel(q->job);
    else if (strcmp(verb, "complete") == 0)
        ret = cowbackup_job_complete(q->job);
    else {
        uint64_t speed = 0;
        json_u64(json_get(args, "speed"), &speed);
        ret = cowbackup_job_set_speed(q->job, speed);
    }
    if (ret < 0) {
        if (strcmp(verb, "complete") == 0 && ret == -EINVAL)
            return generic(r, "Job '%s' in state '%s' cannot accept command verb 'complete' "
                           "(only a sync=none job is completed by the client; the others "
                           "complete when their copy is done)", q->id, q->status);
        return generic(r, "Job '%s': %s failed: %s", q->id, verb, cowbackup_last_error());
    }
    return 0;
}

static int parse_choice(struct reply *r, const struct json *args, const char *key,
                        const char *const *names, const uint32_t *values, uint32_t *out)
{
    const char *v = arg_str(args, key);
    if (!v)
        return 0;
    for (int i = 0; names[i]; i++)
        if (strcmp(v, names[i]) == 0) {
            *out = values[i];
            return 0;
        }
    return generic(r, "Parameter '%s' does not accept value '%.100s'", key, v);
}

/* The copy set of a file target (TARGET.extents), as the start-up backup's PATH.extents:
 * computed under hook_lock (write) right before the start. */
static int copy_set(struct json_buf *t, const char *target, uint32_t sync,
                    cowbackup_bitmap *bm, uint64_t cluster)
{
    const char *base = strrchr(target, '/') + 1;
    jb_printf(t, "# cowbackup copy set of %s: byte extents \"offset length\", in order "
              "(image size %" PRIu64 ", cluster %" PRIu64 ", sync=%s)\n", base, disk_size,
              cluster, sync == COWBACKUP_SYNC_BITMAP ? "bitmap" :
              sync == COWBACKUP_SYNC_TOP ? "top" : "full");
    jb_printf(t, "# restore: apply every byte of these extents after the earlier backups "
              "of the chain;\n# a hole in %s inside an extent is zeroes; outside the "
              "extents the file means nothing\n", base);
    if (sync != COWBACKUP_SYNC_BITMAP) {
        jb_printf(t, "0 %" PRIu64 "\n", disk_size);
        return t->failed ? -1 : 0;
    }
    uint64_t from = 0, run_start = 0, run_end = 0;
    bool have = false;
    while (from < disk_size) {
        uint64_t off, len;
        if (cowbackup_bitmap_next_dirty(bm, from, &off, &len) < 0)
            return -1;
        if (len == 0)
            break;
        uint64_t s = off / cluster * cluster;
        uint64_t e = (off + len + cluster - 1) / cluster * cluster;
        if (e > disk_size)
            e = disk_size;
        if (have && s <= run_end) {
            if (e > run_end)
                run_end = e;
        } else {
            if (have)
                jb_printf(t, "%" PRIu64 " %" PRIu64 "\n", run_start, run_end - run_start);
            run_start = s, run_end = e, have = true;
        }
        from = off + len;
    }
    if (have)
        jb_printf(t, "%" PRIu64 " %" PRIu64 "\n", run_start, run_end - run_start);
    return t->failed ? -1 : 0;
}

static bool is_uri(const char *t)
{
    return strncmp(t, "nbd://", 6) == 0 || strncmp(t, "nbd+unix://", 11) == 0 ||
           strncmp(t, "nbds://", 7) == 0 || strncmp(t, "nbds+unix://", 12) == 0;
}

static int cmd_blockdev_backup(struct reply *r, const struct json *args)
{
    static const char *const spec[] = {
        "job-id:s", "device:s", "!target:s", "!sync:s", "speed:i", "bitmap:s",
        "bitmap-mode:s", "compress:b", "on-source-error:s", "on-target-error:s",
        "auto-finalize:b", "auto-dismiss:b", "filter-node-name:s", "manifest:s", "mode:s",
        "cluster-size:i", "tls-creds:s", NULL };
    if (check_args(r, args, spec) < 0)
        return -1;
    const char *target = arg_str(args, "target");
    const char *device = arg_str(args, "device");
    const char *job_id = arg_str(args, "job-id");
    const char *bitmap_name = arg_str(args, "bitmap");
    const char *mode = arg_str(args, "mode");
    if (!job_id)
        job_id = device ? device : "backup";
    if (!valid_name(job_id))
        return generic(r, "Invalid job ID '%.100s' (letters, digits, '-', '_', '.'; at most "
                       "%d bytes)", job_id, MAX_NAME - 1);
    if (!source_driver)
        return generic(r, "the filter has no source for a backup (internal error)");
    if (arg_bool(args, "compress", false))
        return generic(r, "compress: not supported (targets are raw images)");
    if (!arg_bool(args, "auto-finalize", true))
        return generic(r, "auto-finalize=false: not supported (jobs finalize themselves)");
#ifndef HAVE_COWBACKUP_MANIFEST
    if (json_get(args, "manifest"))
        return generic(r, "manifest: not supported by this build of the library (no "
                       "cowbackup_options_set_manifest)");
#endif
    const char *manifest = arg_str(args, "manifest");
    if (manifest && manifest[0] != '/')
        return generic(r, "manifest '%.200s': give an absolute path of a new file", manifest);
    if (mode && strcmp(mode, "existing") != 0 && strcmp(mode, "absolute-paths") != 0)
        return generic(r, "Parameter 'mode' does not accept value '%.100s' (existing: write "
                       "into an existing image of the disk's size; absolute-paths: create "
                       "a new file, the default)", mode);
    bool existing = mode && strcmp(mode, "existing") == 0;
    /* A node made by blockdev-add: an existing file, or an NBD export. */
    const char *node_creds = NULL;
    int node = find_node(target);
    if (node >= 0) {
        target = nodes[node].target;
        existing = !is_uri(target);
        node_creds = nodes[node].creds[0] ? nodes[node].creds : NULL;
        if (mode || json_get(args, "tls-creds"))
            return generic(r, "target '%s' is a node (blockdev-add): give mode and tls-creds "
                           "there", nodes[node].name);
    }

    static const char *const sync_names[] = { "full", "top", "none", "bitmap", "incremental",
                                              NULL };
    static const uint32_t sync_values[] = { COWBACKUP_SYNC_FULL, COWBACKUP_SYNC_TOP,
                                            COWBACKUP_SYNC_NONE, COWBACKUP_SYNC_BITMAP,
                                            COWBACKUP_SYNC_BITMAP };
    static const char *const bm_names[] = { "on-success", "always", "never", NULL };
    static const uint32_t bm_values[] = { COWBACKUP_BITMAP_MODE_ON_SUCCESS,
                                          COWBACKUP_BITMAP_MODE_ALWAYS,
                                          COWBACKUP_BITMAP_MODE_NEVER };
    static const char *const err_names[] = { "report", "ignore", "stop", "enospc", "auto",
                                             NULL };
    static const uint32_t err_values[] = { COWBACKUP_ERROR_REPORT, COWBACKUP_ERROR_IGNORE,
                                           COWBACKUP_ERROR_STOP, COWBACKUP_ERROR_ENOSPC,
                                           COWBACKUP_ERROR_REPORT };
    uint32_t sync = 0, bm_mode = COWBACKUP_BITMAP_MODE_ON_SUCCESS;
    uint32_t on_src = COWBACKUP_ERROR_REPORT, on_tgt = COWBACKUP_ERROR_REPORT;
    if (parse_choice(r, args, "sync", sync_names, sync_values, &sync) < 0 ||
        parse_choice(r, args, "bitmap-mode", bm_names, bm_values, &bm_mode) < 0 ||
        parse_choice(r, args, "on-source-error", err_names, err_values, &on_src) < 0 ||
        parse_choice(r, args, "on-target-error", err_names, err_values, &on_tgt) < 0)
        return -1;
    if (json_get(args, "bitmap-mode") && !bitmap_name)
        return generic(r, "Cannot specify bitmap sync mode without a bitmap");
    if (sync == COWBACKUP_SYNC_BITMAP && !bitmap_name)
        return generic(r, "must provide a valid bitmap name for 'bitmap' sync mode");
    cowbackup_bitmap *bm = NULL;
    if (bitmap_name && !(bm = lookup_bitmap(bitmap_name)))
        return error_reply(r, "GenericError", "Dirty bitmap '%.200s' not found", bitmap_name);
    if (bm) {
        cowbackup_bitmap_info bi;
        if (cowbackup_bitmap_query(bm, &bi) == 0 && (bi.flags & COWBACKUP_BITMAP_BUSY))
            return generic(r, "Bitmap '%.200s' is currently in use by another operation and "
                           "cannot be used", bitmap_name);
    }
    if (startup_rec && !startup_dismissed && job_running(startup_rec))
        return generic(r, "a backup of this disk is already running (job '%s', started by "
                       "backup=): wait for it to conclude, or job-cancel it", startup_rec->id);
    if (cur && job_running(cur))
        return generic(r, "a backup of this disk is already running (job '%s'): one at a "
                       "time; wait for it to conclude, or job-cancel it", cur->id);
    if (startup_rec && !startup_dismissed && strcmp(startup_rec->id, job_id) == 0)
        return generic(r, "Job ID '%s' already in use", job_id);

    cowbackup_options *o = cowbackup_options_new();
    if (!o)
        return generic(r, "out of memory");
    uint64_t u64, cluster = cluster_size;
    int ret = 0;
    if (json_u64(json_get(args, "cluster-size"), &u64)) {
        cluster = u64;
        ret = cowbackup_options_set_cluster_size(o, u64);
    }
    if (ret == 0)
        ret = cowbackup_options_set_cluster_size(o, cluster);
    if (ret == 0 && json_u64(json_get(args, "speed"), &u64))
        ret = cowbackup_options_set_speed(o, u64);
    if (ret == 0)
        ret = cowbackup_options_set_sync(o, sync);
    if (ret == 0)
        ret = cowbackup_options_set_on_source_error(o, on_src);
    if (ret == 0)
        ret = cowbackup_options_set_on_target_error(o, on_tgt);
    if (ret == 0 && bm)
        ret = cowbackup_options_set_bitmap(o, bm, bm_mode);
#ifdef HAVE_COWBACKUP_MANIFEST
    if (ret == 0 && manifest)
        ret = cowbackup_options_set_manifest(o, manifest);
#endif
    if (ret < 0) {
        generic(r, "%s", cowbackup_last_error());
        cowbackup_options_free(o);
        return -1;
    }

    /* The target. */
    cowbackup_driver *dst = NULL;
    bool created = false;
    if (is_uri(target)) {
        const char *creds = node_creds ? node_creds : arg_str(args, "tls-creds");
        if (strncmp(target, "nbds", 4) != 0 && creds) {
            cowbackup_options_free(o);
            return generic(r, "tls-creds is for an nbds:// target");
        }
        if (strncmp(target, "nbds", 4) == 0) {
#ifdef HAVE_COWBACKUP_TLS
            int k = find_object(creds);
            if (!creds || k < 0 || objects[k].authz || objects[k].server) {
                cowbackup_options_free(o);
                return generic(r, "target %.200s: tls-creds must name a tls-creds-x509 object "
                               "with endpoint=client (object-add)", target);
            }
            char ca[PATH_MAX + 16], cert[PATH_MAX + 16], key[PATH_MAX + 16];
            snprintf(ca, sizeof ca, "%s/ca-cert.pem", objects[k].dir);
            snprintf(cert, sizeof cert, "%s/client-cert.pem", objects[k].dir);
            snprintf(key, sizeof key, "%s/client-key.pem", objects[k].dir);
            bool have_cert = access(cert, F_OK) == 0;
            ret = cowbackup_nbd_open_tls(target, COWBACKUP_OPEN_WRITE, ca,
                                         have_cert ? cert : NULL, have_cert ? key : NULL,
                                         &dst);
#else
            cowbackup_options_free(o);
            return generic(r, "target %.200s: TLS (nbds://) is not supported by this build "
                           "of the library (no cowbackup_nbd_open_tls)", target);
#endif
        } else {
            ret = cowbackup_nbd_open(target, COWBACKUP_OPEN_WRITE, &dst);
        }
    } else if (target[0] != '/') {
        cowbackup_options_free(o);
        return generic(r, "target '%.200s': give an absolute path of a new file, or an "
                       "nbd:// or nbd+unix:// URI", target);
    } else if (existing) {
        ret = cowbackup_file_open(target, COWBACKUP_OPEN_WRITE, &dst);
    } else {
        mode_t old = umask(077);
        ret = cowbackup_file_create(target, disk_size, 0, &dst);
        umask(old);
        created = ret == 0;
        if (ret == -EEXIST) {
            cowbackup_options_free(o);
            return generic(r, "target %.200s already exists: refusing to overwrite it (remove "
                           "it, choose another path, or pass \"mode\": \"existing\" to write "
                           "into it)", target);
        }
    }
    if (ret < 0) {
        generic(r, "target %.200s: %s", target, cowbackup_last_error());
        cowbackup_options_free(o);
        return -1;
    }
    uint64_t tsize = 0;
    if (cowbackup_driver_size(dst, &tsize) < 0 || tsize != disk_size) {
        generic(r, "target %.200s has %" PRIu64 " bytes, the disk %" PRIu64 ": a backup "
                "target has the disk's size", target, tsize, disk_size);
        goto fail;
    }

    struct qjob *q = calloc(1, sizeof *q);
    if (!q) {
        generic(r, "out of memory");
        goto fail;
    }
    snprintf(q->id, sizeof q->id, "%s", job_id);
    q->auto_dismiss = arg_bool(args, "auto-dismiss", false);
    if (cowbackup_options_set_completion(o, qjob_completed, q) < 0 ||
        cowbackup_options_set_trace(o, qjob_trace, q) < 0) {
        generic(r, "%s", cowbackup_last_error());
        free(q);
        goto fail;
    }

    /* The point in time: no client write in flight (hook_lock drains them). */
    struct json_buf extents;
    jb_init(&extents, (size_t)1 << 30);
    bool want_extents = !is_uri(target) && sync != COWBACKUP_SYNC_NONE;
    struct qjob *old = cur;
    pthread_rwlock_wrlock(&hook_lock);
    if (want_extents && copy_set(&extents, target, sync, bm, cluster) < 0) {
        pthread_rwlock_unlock(&hook_lock);
        generic(r, "cannot list the copy set for %.200s.extents: %s", target,
                extents.failed ? "out of memory" : cowbackup_last_error());
        jb_free(&extents);
        free(q);
        goto fail;
    }
    cowbackup_job *j = NULL;
    ret = cowbackup_backup_start(source_driver, dst, o, &j);
    if (ret == 0) {
        q->job = j;
        cur = q;
    }
    pthread_rwlock_unlock(&hook_lock);
    cowbackup_options_free(o);
    o = NULL;
    if (ret < 0) {
        generic(r, "blockdev-backup: %s", cowbackup_last_error());
        jb_free(&extents);
        free(q);
        goto fail;
    }
    pthread_mutex_lock(&jobs_lock);
    set_status(q, "created");
    q->published = true;
    pthread_cond_broadcast(&jobs_cond);
    /* The job's first state events may have come before the record had a status. */
    cowbackup_job_info info;
    if (!q->ended && cowbackup_job_query(j, &info) == 0 && state_status(info.state))
        set_status(q, state_status(info.state));
    pthread_mutex_unlock(&jobs_lock);
    cowbackup_driver_free(dst);
    dst = NULL;
    if (old) { /* the previous job, concluded: its record goes */
        pthread_mutex_lock(&jobs_lock);
        set_status(old, "null");
        pthread_mutex_unlock(&jobs_lock);
        cowbackup_job_free(old->job);
        free(old);
    }
    if (want_extents) {
        char *ext_path = NULL, *tmp = NULL;
        int fd = -1;
        if (asprintf(&ext_path, "%s.extents", target) < 0)
            ext_path = NULL;
        if (!ext_path || (fd = create_temp(ext_path, &tmp)) < 0 ||
            replace_file(fd, tmp, ext_path, extents.data, extents.len) < 0) {
            int e = errno;
            cowbackup_job_cancel(j);
            generic(r, "cannot write %.200s.extents (the copy set for a restore): %s; the "
                    "job %s is cancelled", target, strerror(e), q->id);
            free(ext_path);
            free(tmp);
            jb_free(&extents);
            return -1;
        }
        free(ext_path);
        free(tmp);
    }
    jb_free(&extents);
    jb_lit(&r->ret, "{}");
    nbdkit_debug("cowbackup: control: job %s started: backup into %s", q->id, target);
    return 0;

fail:
    cowbackup_options_free(o);
    cowbackup_driver_free(dst);
    if (created)
        unlink(target); /* ours, new, never written by a job */
    return -1;
}

static int cmd_bitmap(struct reply *r, const struct json *args, const char *verb)
{
    static const char *const spec_add[] = { "!node:s", "!name:s", "granularity:i",
                                            "persistent:b", "disabled:b", NULL };
    static const char *const spec[] = { "!node:s", "!name:s", NULL };
    bool add = strcmp(verb, "add") == 0;
    if (check_args(r, args, add ? spec_add : spec) < 0)
        return -1;
    const char *name = arg_str(args, "name");
    if (add) {
        if (!valid_name(name))
            return generic(r, "Invalid bitmap name '%.100s' (letters, digits, '-', '_', '.'; "
                           "at most %d bytes)", name, MAX_NAME - 1);
        if (find_bitmap(name) || is_startup_bitmap(name))
            return generic(r, "Bitmap already exists: %s", name);
        if (arg_bool(args, "persistent", false))
            return generic(r, "persistent bitmaps: give the filter's bitmap=PATH parameter "
                           "(a crash-safe bitmap file); block-dirty-bitmap-add makes bitmaps "
                           "in memory");
        if (n_bitmaps == MAX_BITMAPS)
            return generic(r, "too many bitmaps (at most %d)", MAX_BITMAPS);
        uint64_t gran = COWBACKUP_BITMAP_DEFAULT_GRANULARITY;
        json_u64(json_get(args, "granularity"), &gran);
        cowbackup_bitmap *bm = NULL;
        if (cowbackup_bitmap_new(disk_size, gran, &bm) < 0)
            return generic(r, "%s", cowbackup_last_error());
        if (arg_bool(args, "disabled", false))
            cowbackup_bitmap_disable(bm);
        pthread_rwlock_wrlock(&hook_lock);
        snprintf(bitmaps[n_bitmaps].name, MAX_NAME, "%s", name);
        bitmaps[n_bitmaps].bm = bm;
        n_bitmaps++;
        pthread_rwlock_unlock(&hook_lock);
        jb_lit(&r->ret, "{}");
        return 0;
    }
    cowbackup_bitmap *bm = lookup_bitmap(name);
    if (!bm)
        return generic(r, "Dirty bitmap '%.200s' not found", name);
    cowbackup_bitmap_info bi;
    if (cowbackup_bitmap_query(bm, &bi) == 0 && (bi.flags & COWBACKUP_BITMAP_BUSY))
        return generic(r, "Bitmap '%.200s' is currently in use by another operation and "
                       "cannot be used", name);
    int ret = 0;
    if (strcmp(verb, "remove") == 0) {
        if (bm == bitmap)
            return generic(r, "Bitmap '%.200s' is the filter's bitmap= file: it lives as "
                           "long as nbdkit (use block-dirty-bitmap-clear)", name);
        struct qbitmap *b = find_bitmap(name);
        pthread_rwlock_wrlock(&hook_lock);
        *b = bitmaps[--n_bitmaps];
        pthread_rwlock_unlock(&hook_lock);
        cowbackup_bitmap_free(bm);
    } else if (strcmp(verb, "clear") == 0) {
        ret = cowbackup_bitmap_clear(bm);
    } else if (strcmp(verb, "enable") == 0) {
        ret = cowbackup_bitmap_enable(bm);
    } else {
        ret = cowbackup_bitmap_disable(bm);
    }
    if (ret < 0)
        return generic(r, "%s", cowbackup_last_error());
    jb_lit(&r->ret, "{}");
    return 0;
}

/* nbd-server-start's addr: QMP's SocketAddressLegacy ({"type", "data": {...}}) or the flat
 * SocketAddress ({"type", "path"|"host","port"}). */
static int socket_address(struct reply *r, const struct json *addr, char *out, size_t n)
{
    const char *type = arg_str(addr, "type");
    const struct json *data = json_get(addr, "data");
    if (data && data->type != JSON_OBJECT)
        return generic(r, "Invalid parameter type for 'addr.data', expected: object");
    const struct json *d = data ? data : addr;
    for (const struct json *m = addr->child; m; m = m->next)
        if (strcmp(m->key, "type") != 0 && (data ? strcmp(m->key, "data") != 0 :
            strcmp(m->key, "path") != 0 && strcmp(m->key, "host") != 0 &&
            strcmp(m->key, "port") != 0))
            return generic(r, "Parameter 'addr.%.100s' is unexpected", m->key);
    if (!type || json_get(addr, "type")->type != JSON_STRING)
        return generic(r, "Parameter 'addr.type' is missing");
    const struct json *path = json_get(d, "path"), *host = json_get(d, "host"),
                      *port = json_get(d, "port");
    if (strcmp(type, "unix") == 0) {
        if (!path || path->type != JSON_STRING)
            return generic(r, "Parameter 'addr.path' is missing");
        if (path->str[0] != '/')
            return generic(r, "addr.path: give an absolute path");
        if ((size_t)snprintf(out, n, "unix:%s", path->str) >= n)
            return generic(r, "addr.path: too long");
        return 0;
    }
    if (strcmp(type, "inet") == 0) {
        if (!host || host->type != JSON_STRING)
            return generic(r, "Parameter 'addr.host' is missing");
        char portbuf[32];
        uint64_t p;
        if (port && port->type == JSON_STRING)
            snprintf(portbuf, sizeof portbuf, "%.20s", port->str);
        else if (port && json_u64(port, &p) && p <= 65535)
            snprintf(portbuf, sizeof portbuf, "%" PRIu64, p);
        else if (!port)
            snprintf(portbuf, sizeof portbuf, "10809");
        else
            return generic(r, "Invalid parameter type for 'addr.port', expected: string");
        if ((size_t)snprintf(out, n, "tcp:%s:%s", host->str, portbuf) >= n)
            return generic(r, "addr.host: too long");
        return 0;
    }
    return generic(r, "addr.type '%.50s': unix or inet", type);
}

static int find_object(const char *id)
{
    for (size_t i = 0; id && i < n_objects; i++)
        if (strcmp(objects[i].id, id) == 0)
            return (int)i;
    return -1;
}

/* object-add: qom-type tls-creds-x509 (dir, endpoint, verify-peer) or authz-simple
 * (identity), QEMU's names; the files are read when a server or a connection uses them. */
static int cmd_object_add(struct reply *r, const struct json *args)
{
    static const char *const spec[] = { "!qom-type:s", "!id:s", "dir:s", "endpoint:s",
                                        "verify-peer:b", "identity:s", "priority:s",
                                        "sanity-check:b", "loaded:b", NULL };
    if (check_args(r, args, spec) < 0)
        return -1;
    const char *type = arg_str(args, "qom-type"), *id = arg_str(args, "id");
    bool authz = strcmp(type, "authz-simple") == 0;
    if (!authz && strcmp(type, "tls-creds-x509") != 0)
        return generic(r, "object type '%.100s' is not supported (tls-creds-x509, "
                       "authz-simple)", type);
    if (!valid_name(id))
        return generic(r, "Invalid object id '%.100s'", id);
    if (find_object(id) >= 0)
        return generic(r, "attempt to add duplicate property '%s' to object (type "
                       "'container')", id);
    if (n_objects == MAX_OBJECTS)
        return generic(r, "too many objects (at most %d)", MAX_OBJECTS);
    const char *dir = arg_str(args, "dir"), *endpoint = arg_str(args, "endpoint");
    const char *identity = arg_str(args, "identity");
    if (authz) {
        if (!identity)
            return generic(r, "Parameter 'identity' is missing");
        if (dir || endpoint || json_get(args, "verify-peer"))
            return generic(r, "authz-simple takes an identity only");
        if (strlen(identity) >= sizeof objects[0].identity)
            return generic(r, "identity too long");
    } else {
        if (!dir || dir[0] != '/')
            return generic(r, "tls-creds-x509: 'dir' (an absolute directory with ca-cert.pem, "
                           "server-cert.pem and server-key.pem, or client-cert.pem and "
                           "client-key.pem) is required");
        if (strlen(dir) >= PATH_MAX - 32)
            return generic(r, "dir too long");
        if (identity)
            return generic(r, "Parameter 'identity' is unexpected");
        if (endpoint && strcmp(endpoint, "server") != 0 && strcmp(endpoint, "client") != 0)
            return generic(r, "Parameter 'endpoint' does not accept value '%.50s'", endpoint);
    }
    size_t k = n_objects++;
    memset(&objects[k], 0, sizeof objects[k]);
    snprintf(objects[k].id, MAX_NAME, "%s", id);
    objects[k].authz = authz;
    if (authz) {
        snprintf(objects[k].identity, sizeof objects[k].identity, "%s", identity);
    } else {
        snprintf(objects[k].dir, sizeof objects[k].dir, "%s", dir);
        objects[k].server = !endpoint || strcmp(endpoint, "server") == 0;
        objects[k].verify_peer = arg_bool(args, "verify-peer", true);
    }
    jb_lit(&r->ret, "{}");
    return 0;
}

static int cmd_object_del(struct reply *r, const struct json *args)
{
    static const char *const spec[] = { "!id:s", NULL };
    if (check_args(r, args, spec) < 0)
        return -1;
    int k = find_object(arg_str(args, "id"));
    if (k < 0)
        return generic(r, "object '%.200s' not found", arg_str(args, "id"));
    objects[k] = objects[--n_objects];
    jb_lit(&r->ret, "{}");
    return 0;
}

static int socket_address(struct reply *r, const struct json *addr, char *out, size_t n);

/* blockdev-add: a named target for blockdev-backup, as QEMU's drivers spell it: `file`
 * (`filename`: an existing image of the disk's size, written into), `raw` over a `file`
 * (inline or a node name), `nbd` (`server`: SocketAddress, `export`, `tls-creds`). Nothing is
 * opened until a backup uses it. */
static int cmd_blockdev_add(struct reply *r, const struct json *args)
{
    static const char *const spec[] = {
        "!driver:s", "!node-name:s", "filename:s", "file:?", "server:o", "export:s",
        "tls-creds:s", "read-only:b", "auto-read-only:b", "discard:s", "cache:o", "aio:s",
        "detect-zeroes:s", "locking:s", "force-share:b", NULL };
    if (check_args(r, args, spec) < 0)
        return -1;
    const char *driver = arg_str(args, "driver"), *name = arg_str(args, "node-name");
    if (!valid_name(name))
        return generic(r, "Invalid node-name: '%.100s'", name);
    if (find_node(name) >= 0)
        return generic(r, "Duplicate nodes with node-name='%s'", name);
    if (n_nodes == MAX_NODES)
        return generic(r, "too many nodes (at most %d)", MAX_NODES);
    if (arg_bool(args, "read-only", false))
        return generic(r, "a backup target is written: read-only is refused");
    char target[PATH_MAX + 64] = "", creds[MAX_NAME] = "";
    const struct json *file = json_get(args, "file");
    if (strcmp(driver, "raw") == 0 && file) {
        if (file->type == JSON_STRING) {
            int k = find_node(file->str);
            if (k < 0)
                return generic(r, "Cannot find device='' nor node-name='%.100s'", file->str);
            snprintf(target, sizeof target, "%s", nodes[k].target);
            snprintf(creds, sizeof creds, "%s", nodes[k].creds);
        } else if (file->type == JSON_OBJECT) {
            const char *fd = arg_str(file, "driver"), *fn = arg_str(file, "filename");
            if (!fd || strcmp(fd, "file") != 0 || !fn)
                return generic(r, "raw: 'file' must be {\"driver\": \"file\", "
                               "\"filename\": PATH} or a node name");
            if (fn[0] != '/' || strlen(fn) >= PATH_MAX)
                return generic(r, "filename '%.200s': give an absolute path", fn);
            snprintf(target, sizeof target, "%s", fn);
        } else {
            return generic(r, "Invalid parameter type for 'file', expected: object or string");
        }
    } else if (strcmp(driver, "file") == 0 || strcmp(driver, "host_device") == 0) {
        const char *fn = arg_str(args, "filename");
        if (!fn)
            return generic(r, "Parameter 'filename' is missing");
        if (fn[0] != '/' || strlen(fn) >= PATH_MAX)
            return generic(r, "filename '%.200s': give an absolute path", fn);
        snprintf(target, sizeof target, "%s", fn);
    } else if (strcmp(driver, "nbd") == 0) {
        const struct json *server = json_get(args, "server");
        if (!server)
            return generic(r, "Parameter 'server' is missing");
        char addr[PATH_MAX + 16];
        if (socket_address(r, server, addr, sizeof addr) < 0)
            return -1;
        const char *exp = arg_str(args, "export") ? arg_str(args, "export") : "";
        const char *tls = arg_str(args, "tls-creds");
        if (strchr(exp, '?') || strchr(exp, '#') || strchr(exp, '%') || strlen(exp) > 1024)
            return generic(r, "export '%.100s': not supported in a target", exp);
        int len;
        if (strncmp(addr, "unix:", 5) == 0)
            len = snprintf(target, sizeof target, "%s:///%s?socket=%s",
                           tls ? "nbds+unix" : "nbd+unix", exp, addr + 5);
        else
            len = snprintf(target, sizeof target, "%s://%s/%s", tls ? "nbds" : "nbd",
                           addr + 4, exp);
        if (len < 0 || (size_t)len >= sizeof target)
            return generic(r, "nbd: address too long");
        if (tls)
            snprintf(creds, sizeof creds, "%s", tls);
    } else {
        return generic(r, "driver '%.50s' is not supported for a backup target (file, raw "
                       "over file, nbd: e.g. a qcow2 image served by qemu-nbd)", driver);
    }
    snprintf(nodes[n_nodes].name, MAX_NAME, "%s", name);
    snprintf(nodes[n_nodes].target, sizeof nodes[0].target, "%s", target);
    snprintf(nodes[n_nodes].creds, MAX_NAME, "%s", creds);
    n_nodes++;
    jb_lit(&r->ret, "{}");
    return 0;
}

static int cmd_blockdev_del(struct reply *r, const struct json *args)
{
    static const char *const spec[] = { "!node-name:s", NULL };
    if (check_args(r, args, spec) < 0)
        return -1;
    int k = find_node(arg_str(args, "node-name"));
    if (k < 0)
        return generic(r, "Failed to find node with node-name='%.200s'",
                       arg_str(args, "node-name"));
    nodes[k] = nodes[--n_nodes];
    jb_lit(&r->ret, "{}");
    return 0;
}

static int cmd_nbd_server_start(struct reply *r, const struct json *args)
{
    static const char *const spec[] = { "!addr:o", "tls-creds:s", "tls-authz:s",
                                        "max-connections:i", NULL };
    if (check_args(r, args, spec) < 0)
        return -1;
    const char *creds = arg_str(args, "tls-creds"), *authz = arg_str(args, "tls-authz");
#ifndef HAVE_COWBACKUP_TLS
    if (creds || authz)
        return generic(r, "tls-creds: TLS is not supported by this build of the library (no "
                       "cowbackup_nbd_server_options_*)");
#endif
    if (authz && !creds)
        return generic(r, "tls-authz needs tls-creds");
    if (nbd_server)
        return generic(r, "NBD server already running");
    char addr[PATH_MAX + 16];
    if (socket_address(r, json_get(args, "addr"), addr, sizeof addr) < 0)
        return -1;
    int ret;
    mode_t old = umask(077);
#ifdef HAVE_COWBACKUP_TLS
    cowbackup_nbd_server_options *so = cowbackup_nbd_server_options_new();
    if (!so) {
        umask(old);
        return generic(r, "out of memory");
    }
    ret = 0;
    uint64_t maxc;
    if (json_u64(json_get(args, "max-connections"), &maxc) && maxc > 0)
        ret = cowbackup_nbd_server_options_set_limits(so, maxc > 65536 ? 65536 : (uint32_t)maxc,
                                                      300000);
    if (ret == 0 && creds) {
        int k = find_object(creds);
        if (k < 0 || objects[k].authz || !objects[k].server) {
            cowbackup_nbd_server_options_free(so);
            umask(old);
            return generic(r, "No TLS credentials with id '%.200s' (object-add qom-type="
                           "tls-creds-x509 with endpoint=server)", creds);
        }
        char ca[PATH_MAX + 16], cert[PATH_MAX + 16], key[PATH_MAX + 16];
        snprintf(ca, sizeof ca, "%s/ca-cert.pem", objects[k].dir);
        snprintf(cert, sizeof cert, "%s/server-cert.pem", objects[k].dir);
        snprintf(key, sizeof key, "%s/server-key.pem", objects[k].dir);
        ret = cowbackup_nbd_server_options_set_tls(so, cert, key,
                                                   objects[k].verify_peer ? ca : NULL);
    }
    if (ret == 0 && authz) {
        int k = find_object(authz);
        if (k < 0 || !objects[k].authz) {
            cowbackup_nbd_server_options_free(so);
            umask(old);
            return generic(r, "No authorization object with id '%.200s' (object-add "
                           "qom-type=authz-simple)", authz);
        }
        ret = cowbackup_nbd_server_options_allow(so, objects[k].identity);
    }
    if (ret == 0)
        ret = cowbackup_nbd_server_start_with(addr, so, &nbd_server);
    cowbackup_nbd_server_options_free(so);
#else
    ret = cowbackup_nbd_server_start(addr, &nbd_server);
#endif
    umask(old);
    if (ret < 0) {
        nbd_server = NULL;
        return generic(r, "nbd-server-start: %s", cowbackup_last_error());
    }
    n_exports = 0;
    jb_lit(&r->ret, "{}");
    return 0;
}

static int cmd_nbd_server_stop(struct reply *r, const struct json *args)
{
    static const char *const spec[] = { NULL };
    if (check_args(r, args, spec) < 0)
        return -1;
    if (!nbd_server)
        return generic(r, "NBD server not running");
    cowbackup_nbd_server_stop(nbd_server);
    nbd_server = NULL;
    n_exports = 0;
    jb_lit(&r->ret, "{}");
    return 0;
}

static int cmd_block_export_add(struct reply *r, const struct json *args)
{
    static const char *const spec[] = { "!type:s", "!id:s", "!node-name:s", "name:s",
                                        "writable:b", "writethrough:b", "description:s",
                                        "bitmaps:a", "allocation-depth:b", "fixed-iothread:b",
                                        "iothread:s", NULL };
    if (check_args(r, args, spec) < 0)
        return -1;
    if (strcmp(arg_str(args, "type"), "nbd") != 0)
        return generic(r, "block-export-add: type '%.50s' is not supported (nbd only)",
                       arg_str(args, "type"));
    if (!nbd_server)
        return generic(r, "NBD server not running: nbd-server-start first");
    if (arg_bool(args, "writable", false))
        return generic(r, "writable: the point-in-time view of a backup is read-only");
    const char *id = arg_str(args, "id"), *node = arg_str(args, "node-name");
    const char *name = arg_str(args, "name") ? arg_str(args, "name") : node;
    if (!valid_name(id))
        return generic(r, "Invalid export id '%.100s'", id);
    if (strlen(name) >= MAX_NAME)
        return generic(r, "export name too long (at most %d bytes)", MAX_NAME - 1);
    for (size_t i = 0; i < n_exports; i++)
        if (strcmp(exports[i].id, id) == 0)
            return generic(r, "Block export id '%s' is already in use", id);
    if (n_exports == MAX_EXPORTS)
        return generic(r, "too many exports (at most %d)", MAX_EXPORTS);
    /* node-name: the backup job whose point-in-time view is exported (its id; any name
     * when one job runs). */
    struct qjob *q = find_job(node);
    if (!q && cur && job_running(cur))
        q = cur;
    if (!q && startup_rec && !startup_dismissed && job_running(startup_rec))
        q = startup_rec;
    if (!q || !job_running(q))
        return generic(r, "Cannot find device=%.100s nor node_name=%.100s (node-name names a "
                       "running backup job: its point-in-time view is exported)", node, node);
    const struct json *bms = json_get(args, "bitmaps");
    cowbackup_bitmap *bmlist[MAX_BITMAPS + 1];
    const char *bmnames[MAX_BITMAPS + 1];
    size_t nbm = 0;
    for (const struct json *b = bms ? bms->child : NULL; b; b = b->next) {
        if (b->type != JSON_STRING)
            return generic(r, "Invalid parameter type for 'bitmaps[]', expected: string "
                           "(a bitmap name)");
        if (nbm == MAX_BITMAPS + 1)
            return generic(r, "too many bitmaps");
        if (!(bmlist[nbm] = lookup_bitmap(b->str)))
            return generic(r, "Bitmap '%.200s' is not found", b->str);
        bmnames[nbm++] = b->str;
    }
    cowbackup_driver *view = NULL;
    if (cowbackup_job_snapshot(q->job, &view) < 0)
        return generic(r, "job %s: %s", q->id, cowbackup_last_error());
    int ret = cowbackup_nbd_server_add(nbd_server, name, view, 0);
    cowbackup_driver_free(view);
    if (ret < 0)
        return generic(r, "block-export-add: %s", cowbackup_last_error());
    for (size_t i = 0; i < nbm; i++) {
        if (cowbackup_nbd_server_add_bitmap(nbd_server, name, bmnames[i], bmlist[i]) < 0) {
            generic(r, "block-export-add: bitmap %s: %s", bmnames[i], cowbackup_last_error());
            cowbackup_nbd_server_remove(nbd_server, name);
            return -1;
        }
    }
    snprintf(exports[n_exports].id, MAX_NAME, "%s", id);
    snprintf(exports[n_exports].name, MAX_NAME, "%s", name);
    n_exports++;
    jb_lit(&r->ret, "{}");
    return 0;
}

static int cmd_block_export_del(struct reply *r, const struct json *args)
{
    static const char *const spec[] = { "!id:s", "mode:s", NULL };
    if (check_args(r, args, spec) < 0)
        return -1;
    const char *id = arg_str(args, "id");
    for (size_t i = 0; i < n_exports; i++) {
        if (strcmp(exports[i].id, id) == 0) {
            if (nbd_server)
                cowbackup_nbd_server_remove(nbd_server, exports[i].name);
            exports[i] = exports[--n_exports];
            jb_lit(&r->ret, "{}");
            return 0;
        }
    }
    return generic(r, "Export '%.200s' is not found", id);
}

/* transaction: QEMU's atomic group of actions, for the usual pairs (a new bitmap and the
 * full backup that starts its chain; a bitmap clear and a backup). The actions run in order;
 * when one fails, the ones before are undone (an added bitmap removed, a cleared bitmap
 * given its bits back, a started backup cancelled) and the error is the failed action's.
 * Writes between two actions are in both (a bitmap added just before a full backup holds a
 * few writes the backup has too: an incremental then copies them again, never misses one). */
static int cmd_transaction(struct reply *r, const struct json *args)
{
    static const char *const spec[] = { "!actions:a", "properties:o", NULL };
    if (check_args(r, args, spec) < 0)
        return -1;
    const struct json *actions = json_get(args, "actions");
    enum { MAX_ACTIONS = 16 };
    struct {
        int kind; /* 0 bitmap-add, 1 bitmap-clear, 2 backup */
        char name[MAX_NAME];
        cowbackup_bitmap *saved;
    } done[MAX_ACTIONS];
    size_t n = 0;
    int ret = 0;
    if (actions->len > MAX_ACTIONS)
        return generic(r, "transaction: at most %d actions", MAX_ACTIONS);
    for (const struct json *a = actions->child; a && ret == 0; a = a->next) {
        static const char *const aspec[] = { "!type:s", "data:o", NULL };
        if (a->type != JSON_OBJECT) {
            ret = generic(r, "Invalid parameter type for 'actions[]', expected: object");
            break;
        }
        if ((ret = check_args(r, a, aspec)) < 0)
            break;
        const char *type = arg_str(a, "type");
        const struct json *data = json_get(a, "data");
        const char *name = arg_str(data, "name");
        if (strcmp(type, "block-dirty-bitmap-add") == 0) {
            if ((ret = cmd_bitmap(r, data, "add")) == 0) {
                done[n].kind = 0;
                snprintf(done[n].name, MAX_NAME, "%s", name);
                done[n++].saved = NULL;
            }
        } else if (strcmp(type, "block-dirty-bitmap-clear") == 0) {
            cowbackup_bitmap *bm = name ? lookup_bitmap(name) : NULL;
            cowbackup_bitmap *copy = NULL;
            cowbackup_bitmap_info bi;
            if (bm && cowbackup_bitmap_query(bm, &bi) == 0 &&
                (cowbackup_bitmap_new(bi.size, bi.granularity, &copy) < 0 ||
                 cowbackup_bitmap_merge(copy, bm) < 0)) {
                cowbackup_bitmap_free(copy);
                ret = generic(r, "transaction: cannot keep a copy of bitmap %s: %s", name,
                              cowbackup_last_error());
                break;
            }
            if ((ret = cmd_bitmap(r, data, "clear")) == 0) {
                done[n].kind = 1;
                snprintf(done[n].name, MAX_NAME, "%s", name);
                done[n++].saved = copy;
            } else {
                cowbackup_bitmap_free(copy);
            }
        } else if (strcmp(type, "blockdev-backup") == 0) {
            if ((ret = cmd_blockdev_backup(r, data)) == 0) {
                done[n].kind = 2;
                done[n++].saved = NULL;
            }
        } else {
            ret = generic(r, "transaction: action type '%.100s' is not supported "
                          "(block-dirty-bitmap-add, block-dirty-bitmap-clear, "
                          "blockdev-backup)", type);
        }
        if (ret == 0) {
            jb_free(&r->ret);
            jb_init(&r->ret, MAX_OUT / 2);
        }
    }
    /* Undo (on failure) or drop the saved copies (on success), last first. */
    while (n > 0) {
        n--;
        if (ret < 0) {
            if (done[n].kind == 0) {
                struct qbitmap *b = find_bitmap(done[n].name);
                if (b) {
                    cowbackup_bitmap *bm = b->bm;
                    pthread_rwlock_wrlock(&hook_lock);
                    *b = bitmaps[--n_bitmaps];
                    pthread_rwlock_unlock(&hook_lock);
                    cowbackup_bitmap_free(bm);
                }
            } else if (done[n].kind == 1) {
                cowbackup_bitmap *bm = lookup_bitmap(done[n].name);
                if (bm)
                    cowbackup_bitmap_merge(bm, done[n].saved);
            } else if (cur && cur->job) {
                cowbackup_job_cancel(cur->job);
            }
        }
        cowbackup_bitmap_free(done[n].saved);
    }
    if (ret == 0)
        jb_lit(&r->ret, "{}");
    return ret;
}

static const char *const commands[] = {
    "qmp_capabilities", "query-version", "query-commands", "blockdev-backup", "query-jobs",
    "query-block-jobs", "job-pause", "job-resume", "job-cancel", "job-complete", "job-dismiss",
    "block-job-pause", "block-job-resume", "block-job-cancel", "block-job-complete",
    "block-job-set-speed", "block-dirty-bitmap-add", "block-dirty-bitmap-remove",
    "block-dirty-bitmap-clear", "block-dirty-bitmap-enable", "block-dirty-bitmap-disable",
    "nbd-server-start", "nbd-server-stop", "block-export-add", "block-export-del",
    "object-add", "object-del", "transaction", "blockdev-add", "blockdev-del", NULL };

static int dispatch(struct client *c, struct reply *r, const char *cmd, const struct json *args)
{
    static const char *const none[] = { NULL };
    if (strcmp(cmd, "qmp_capabilities") == 0) {
        if (c->negotiated)
            return error_reply(r, "CommandNotFound", "Capabilities negotiation is already "
                               "complete, command ignored");
        static const char *const spec[] = { "enable:a", NULL };
        if (check_args(r, args, spec) < 0)
            return -1;
        const struct json *en = json_get(args, "enable");
        if (en && en->child)
            return generic(r, "Capability '%.50s' not available",
                           en->child->type == JSON_STRING ? en->child->str : "?");
        pthread_mutex_lock(&clients_lock);
        c->negotiated = true;
        pthread_mutex_unlock(&clients_lock);
        jb_lit(&r->ret, "{}");
        return 0;
    }
    if (!c->negotiated)
        return error_reply(r, "CommandNotFound", "Expecting capabilities negotiation with "
                           "'qmp_capabilities'");
    if (strcmp(cmd, "query-version") == 0) {
        if (check_args(r, args, none) < 0)
            return -1;
        jb_printf(&r->ret, "{\"qemu\": {\"major\": %d, \"minor\": %d, \"micro\": %d}, "
                  "\"package\": \"cowbackup %s\"}", COWBACKUP_VERSION_MAJOR,
                  COWBACKUP_VERSION_MINOR, COWBACKUP_VERSION_PATCH, cowbackup_version());
        return 0;
    }
    if (strcmp(cmd, "query-commands") == 0) {
        if (check_args(r, args, none) < 0)
            return -1;
        jb_lit(&r->ret, "[");
        for (int i = 0; commands[i]; i++)
            jb_printf(&r->ret, "%s{\"name\": \"%s\"}", i ? ", " : "", commands[i]);
        jb_lit(&r->ret, "]");
        return 0;
    }
    if (strcmp(cmd, "blockdev-backup") == 0)
        return cmd_blockdev_backup(r, args);
    if (strcmp(cmd, "query-jobs") == 0)
        return cmd_query_jobs(r, args, false);
    if (strcmp(cmd, "query-block-jobs") == 0)
        return cmd_query_jobs(r, args, true);
    if (strncmp(cmd, "job-", 4) == 0 && strcmp(cmd, "job-set-speed") != 0) {
        for (int i = 0; commands[i]; i++)
            if (strcmp(commands[i], cmd) == 0)
                return job_op(r, args, "id", cmd + 4);
    }
    if (strncmp(cmd, "block-job-", 10) == 0) {
        for (int i = 0; commands[i]; i++)
            if (strcmp(commands[i], cmd) == 0)
                return job_op(r, args, "device", cmd + 10);
    }
    if (strncmp(cmd, "block-dirty-bitmap-", 19) == 0) {
        for (int i = 0; commands[i]; i++)
            if (strcmp(commands[i], cmd) == 0)
                return cmd_bitmap(r, args, cmd + 19);
    }
    if (strcmp(cmd, "nbd-server-start") == 0)
        return cmd_nbd_server_start(r, args);
    if (strcmp(cmd, "nbd-server-stop") == 0)
        return cmd_nbd_server_stop(r, args);
    if (strcmp(cmd, "block-export-add") == 0)
        return cmd_block_export_add(r, args);
    if (strcmp(cmd, "block-export-del") == 0)
        return cmd_block_export_del(r, args);
    if (strcmp(cmd, "object-add") == 0)
        return cmd_object_add(r, args);
    if (strcmp(cmd, "transaction") == 0)
        return cmd_transaction(r, args);
    if (strcmp(cmd, "blockdev-add") == 0)
        return cmd_blockdev_add(r, args);
    if (strcmp(cmd, "blockdev-del") == 0)
        return cmd_blockdev_del(r, args);
    if (strcmp(cmd, "object-del") == 0)
        return cmd_object_del(r, args);
    return error_reply(r, "CommandNotFound", "The command %.100s has not been found", cmd);
}

/* One framed message from a client: parse, run, reply. */
static void handle_message(struct client *c, const char *text, size_t len)
{
    struct reply r = { .err_class = NULL };
    jb_init(&r.ret, MAX_OUT / 2);
    struct json_doc doc = { 0 };
    char perr[256];
    const struct json *id = NULL;
    if (json_parse(text, len, &doc, perr, sizeof perr) < 0) {
        generic(&r, "JSON parse error, %s", perr);
    } else if (doc.root->type != JSON_OBJECT) {
        generic(&r, "QMP input must be a JSON object");
    } else {
        id = json_get(doc.root, "id");
        const struct json *exec = json_get(doc.root, "execute");
        const struct json *oob = json_get(doc.root, "exec-oob");
        const struct json *args = json_get(doc.root, "arguments");
        const char *bad = NULL;
        for (const struct json *m = doc.root->child; m; m = m->next)
            if (strcmp(m->key, "execute") && strcmp(m->key, "arguments") &&
                strcmp(m->key, "id") && strcmp(m->key, "exec-oob"))
                bad = m->key;
        if (bad)
            generic(&r, "QMP input member '%.100s' is unexpected", bad);
        else if (oob)
            generic(&r, "QMP input member 'exec-oob': out-of-band execution is not "
                    "supported");
        else if (!exec)
            generic(&r, "QMP input lacks member 'execute'");
        else if (exec->type != JSON_STRING)
            generic(&r, "QMP input member 'execute' must be a string");
        else if (args && args->type != JSON_OBJECT)
            generic(&r, "QMP input member 'arguments' must be an object");
        else
            dispatch(c, &r, exec->str, args);
    }
    struct json_buf out;
    jb_init(&out, MAX_OUT);
    if (r.err_class) {
        jb_printf(&out, "{\"error\": {\"class\": \"%s\", \"desc\": ", r.err_class);
        jb_cstr(&out, r.desc);
        jb_lit(&out, "}}");
    } else {
        jb_lit(&out, "{\"return\": ");
        if (r.ret.failed)
            jb_lit(&out, "{}");
        else if (r.ret.len)
            jb_raw(&out, r.ret.data, r.ret.len);
        else
            jb_lit(&out, "{}");
        jb_lit(&out, "}");
    }
    if (id && !out.failed) {
        out.len--; /* reopen the object */
        jb_lit(&out, ", \"id\": ");
        jb_value(&out, id);
        jb_lit(&out, "}");
    }
    if (!out.failed) {
        pthread_mutex_lock(&clients_lock);
        client_queue(c, out.data, out.len);
        pthread_mutex_unlock(&clients_lock);
    }
    if (r.err_class)
        nbdkit_debug("cowbackup: control: error: %s", r.desc);
    jb_free(&out);
    jb_free(&r.ret);
    json_free(&doc);
}

/* ---- the control thread ---- */

static void send_greeting(struct client *c)
{
    char g[256];
    int n = snprintf(g, sizeof g, "{\"QMP\": {\"version\": {\"qemu\": {\"major\": %d, \"minor\": "
                     "%d, \"micro\": %d}, \"package\": \"cowbackup %s\"}, \"capabilities\": "
                     "[]}}", COWBACKUP_VERSION_MAJOR, COWBACKUP_VERSION_MINOR,
                     COWBACKUP_VERSION_PATCH, cowbackup_version());
    client_queue(c, g, (size_t)n);
}

static void accept_client(void)
{
    int fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0)
        return;
    pthread_mutex_lock(&clients_lock);
    int slot = -1;
    for (int i = 0; i < MAX_CLIENTS && slot < 0; i++)
        if (!clients[i])
            slot = i;
    struct client *c = slot >= 0 ? calloc(1, sizeof *c) : NULL;
    if (!c) {
        pthread_mutex_unlock(&clients_lock);
        static const char busy[] = "{\"error\": {\"class\": \"GenericError\", \"desc\": \"too "
                                   "many clients on the control socket\"}}\r\n";
        ssize_t w = send(fd, busy, sizeof busy - 1, MSG_NOSIGNAL | MSG_DONTWAIT);
        (void)w;
        close(fd);
        return;
    }
    c->fd = fd;
    c->since = time(NULL);
    jb_init(&c->out, MAX_OUT);
    send_greeting(c);
    clients[slot] = c;
    pthread_mutex_unlock(&clients_lock);
}

static void close_client(int i)
{
    pthread_mutex_lock(&clients_lock);
    struct client *c = clients[i];
    clients[i] = NULL;
    pthread_mutex_unlock(&clients_lock);
    if (!c)
        return;
    close(c->fd);
    jb_free(&c->out);
    free(c);
}

/* Send what can be sent without blocking; clients_lock held. Returns -1 when the peer is
 * gone. */
static int flush_client(struct client *c)
{
    while (c->out.len > 0) {
        ssize_t w = send(c->fd, c->out.data, c->out.len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return 0;
        if (w <= 0)
            return -1;
        memmove(c->out.data, c->out.data + w, c->out.len - (size_t)w);
        c->out.len -= (size_t)w;
    }
    return 0;
}

static bool client_closing(struct client *c)
{
    pthread_mutex_lock(&clients_lock);
    bool r = c->closing;
    pthread_mutex_unlock(&clients_lock);
    return r;
}

/* Read what is there; -1: close the client. */
static int read_client(struct client *c)
{
    char buf[16384];
    ssize_t n = recv(c->fd, buf, sizeof buf, MSG_DONTWAIT);
    if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
        return 0;
    if (n < 0)
        return -1;
    if (n == 0) {
        /* The peer is done sending (maybe only half-closed, waiting for its replies): close
         * once they are sent. */
        pthread_mutex_lock(&clients_lock);
        c->closing = true;
        pthread_mutex_unlock(&clients_lock);
        return 0;
    }
    for (ssize_t i = 0; i < n && !client_closing(c); i++) {
        char ch = buf[i];
        bool ws = ch == ' ' || ch == '\t' || ch == '\r' || ch == '\n';
        if (!c->frame.started && c->frame.depth == 0 && ws && c->msg_len == 0)
            continue;
        if (c->msg_len == MAX_MSG) {
            static const char too_long[] = "{\"error\": {\"class\": \"GenericError\", \"desc\": "
                "\"JSON parse error, message longer than 65536 bytes: connection closed\"}}";
            pthread_mutex_lock(&clients_lock);
            client_queue(c, too_long, sizeof too_long - 1);
            c->closing = true;
            pthread_mutex_unlock(&clients_lock);
            return 0;
        }
        c->msg[c->msg_len++] = ch;
        if (json_frame_byte(&c->frame, ch)) {
            handle_message(c, c->msg, c->msg_len);
            c->msg_len = 0;
        }
    }
    return 0;
}

static void *control_main(void *arg)
{
    (void)arg;
    struct pollfd pfd[MAX_CLIENTS + 2];
    int idx[MAX_CLIENTS + 2];
    for (;;) {
        pthread_mutex_lock(&clients_lock);
        bool stop = stop_flag;
        int n = 0;
        pfd[n++] = (struct pollfd){ .fd = wake_pipe[0], .events = POLLIN };
        pfd[n++] = (struct pollfd){ .fd = listen_fd, .events = POLLIN };
        time_t now = time(NULL);
        for (int i = 0; i < MAX_CLIENTS; i++) {
            struct client *c = clients[i];
            if (!c)
                continue;
            if (!c->negotiated && now - c->since > NEGOTIATE_TIMEOUT)
                c->closing = true, c->out.len = 0;
            if (c->closing && !c->closing_at)
                c->closing_at = now;
            /* A closing client gets CLOSE_LINGER seconds to read what is left. */
            if (flush_client(c) < 0 || (c->closing && (c->out.len == 0 || c->out.failed ||
                                                       now - c->closing_at > CLOSE_LINGER))) {
                pthread_mutex_unlock(&clients_lock);
                close_client(i);
                pthread_mutex_lock(&clients_lock);
                continue;
            }
            idx[n] = i;
            pfd[n++] = (struct pollfd){ .fd = c->fd, .events = (short)((c->closing ? 0 : POLLIN) |
                                        (c->out.len ? POLLOUT : 0)) };
        }
        pthread_mutex_unlock(&clients_lock);
        if (stop)
            break;
        int r = poll(pfd, (nfds_t)n, 1000);
        if (r < 0 && errno != EINTR)
            break;
        if (r <= 0)
            continue;
        if (pfd[0].revents & POLLIN) {
            char drain[64];
            while (read(wake_pipe[0], drain, sizeof drain) > 0)
                ;
        }
        if (pfd[1].revents & POLLIN)
            accept_client();
        for (int k = 2; k < n; k++) {
            struct client *c = clients[idx[k]];
            if (!c)
                continue;
            if (pfd[k].revents & (POLLERR | POLLNVAL)) {
                close_client(idx[k]);
                continue;
            }
            if ((pfd[k].revents & (POLLIN | POLLHUP)) && read_client(c) < 0) {
                close_client(idx[k]);
                continue;
            }
        }
    }
    for (int i = 0; i < MAX_CLIENTS; i++)
        close_client(i);
    return NULL;
}

int control_start(char *err, size_t errlen)
{
    if (!control_path)
        return 0;
    if (check_socket_path(err, errlen, true) < 0)
        return -1;
    if (pipe2(wake_pipe, O_CLOEXEC | O_NONBLOCK) < 0) {
        snprintf(err, errlen, "cowbackup: pipe2: %s", strerror(errno));
        return -1;
    }
    listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (listen_fd < 0) {
        snprintf(err, errlen, "cowbackup: socket: %s", strerror(errno));
        return -1;
    }
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    strcpy(sa.sun_path, control_path);
    /* 0600 from the start: bind creates the file with the umask applied (main thread,
     * before any thread that creates files). bind never follows nor replaces what is at
     * the path (EADDRINUSE). */
    mode_t old = umask(0177);
    int r = bind(listen_fd, (struct sockaddr *)&sa, sizeof sa);
    int e = errno;
    umask(old);
    if (r < 0) {
        snprintf(err, errlen, "cowbackup: control=%s: bind: %s%s", control_path, strerror(e),
                 e == EADDRINUSE ? " (something appeared there since the check: nothing was "
                 "replaced)" : "");
        close(listen_fd);
        listen_fd = -1;
        return -1;
    }
    struct stat st;
    if (lstat(control_path, &st) == 0) {
        sock_dev = st.st_dev, sock_ino = st.st_ino;
        if ((st.st_mode & 077) != 0) /* a filesystem that ignores the umask */
            chmod(control_path, 0600);
    }
    if (listen(listen_fd, 16) < 0) {
        snprintf(err, errlen, "cowbackup: control=%s: listen: %s", control_path,
                 strerror(errno));
        goto fail;
    }
    return 0;
fail:
    close(listen_fd);
    listen_fd = -1;
    unlink(control_path);
    return -1;
}

/* .after_fork, once the start-up job (if any) is registered: clients are served from now on
 * (they queue in the listen backlog until then). */
int control_run(char *err, size_t errlen)
{
    if (listen_fd < 0)
        return 0;
    int r = pthread_create(&control_thread, NULL, control_main, NULL);
    if (r != 0) {
        snprintf(err, errlen, "cowbackup: cannot start the control thread: %s", strerror(r));
        return -1;
    }
    thread_started = true;
    nbdkit_debug("cowbackup: control socket %s (QMP)", control_path);
    return 0;
}

/* .cleanup, first: no command runs afterwards; the clients are gone. */
void control_stop(void)
{
    if (thread_started) {
        pthread_mutex_lock(&clients_lock);
        stop_flag = true;
        pthread_mutex_unlock(&clients_lock);
        wake();
        pthread_join(control_thread, NULL);
        thread_started = false;
    }
    if (listen_fd >= 0) {
        close(listen_fd);
        listen_fd = -1;
        struct stat st;
        if (lstat(control_path, &st) == 0 && S_ISSOCK(st.st_mode) && st.st_dev == sock_dev &&
            st.st_ino == sock_ino)
            unlink(control_path);
    }
    if (nbd_server) {
        cowbackup_nbd_server_stop(nbd_server);
        nbd_server = NULL;
    }
    /* The control socket's job: cancelled and freed (its callbacks run in the free). */
    pthread_rwlock_wrlock(&hook_lock);
    struct qjob *q = cur;
    cur = NULL;
    pthread_rwlock_unlock(&hook_lock);
    if (q) {
        cowbackup_job_free(q->job);
        free(q);
    }
}

/* .cleanup, last (after the start-up job is freed). */
void control_free(void)
{
    pthread_rwlock_wrlock(&hook_lock);
    size_t n = n_bitmaps;
    n_bitmaps = 0;
    pthread_rwlock_unlock(&hook_lock);
    for (size_t i = 0; i < n; i++)
        cowbackup_bitmap_free(bitmaps[i].bm);
    pthread_mutex_lock(&jobs_lock);
    struct qjob *q = startup_rec;
    startup_rec = NULL;
    pthread_mutex_unlock(&jobs_lock);
    free(q);
    for (int i = 0; i < 2; i++)
        if (wake_pipe[i] >= 0) {
            close(wake_pipe[i]);
            wake_pipe[i] = -1;
        }
}
