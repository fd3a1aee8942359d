/*
 * nbdkit-cowbackup-filter: a live, point-in-time backup of the disk that nbdkit serves.
 *
 *   nbdkit --filter=cowbackup file disk.img backup=/backup/disk.raw [speed=64M] ...
 *
 * When nbdkit starts (before it accepts the first client) the filter starts a cowbackup job
 * that copies the plugin's disk into a new sparse file `backup=PATH` in the background. Every
 * client pwrite / zero / trim first calls cowbackup_cow_before_write(), which copies the old
 * contents of the clusters it touches into the backup, so the backup ends up holding the disk
 * exactly as it was served at start-up, whatever the clients write meanwhile. Next to the
 * backup, each replaced atomically (a new temporary file, fsync, rename, fsync of the
 * directory):
 *   - `PATH.status`: `running`, then `running N%` (bytes done / bytes to process, at most
 *     once a second) while the job runs, then one line `completed` or `failed: <reason>`;
 *   - `PATH.extents`: the job's copy set, byte extents "offset length" (the format of
 *     examples/incremental.rs): what a restore applies from this backup over the earlier
 *     ones of the chain (the whole disk for sync=full|top).
 * `bitmap=PATH` keeps a persistent, crash-safe dirty bitmap of every write the daemon serves;
 * `sync=bitmap` makes the job an incremental backup of the clusters that bitmap holds.
 * `control=PATH` adds a QMP socket (control.c) that starts, controls and watches backups at
 * any time while nbdkit serves (blockdev-backup, query-jobs, job-*, bitmaps, pull mode); the
 * start-up job of backup= is then its job "backup0". Every job's source is one driver
 * (source_driver) on the shared context below; client writes take hook_lock (filter.h) for
 * reading, so a job started by the control thread (which takes it for writing) has a point in
 * time between writes.
 *
 * Files: every file the filter creates is 0600 (umask 077 around the library's creates; the
 * filter's own temporary files are opened 0600 with O_CREAT | O_EXCL | O_NOFOLLOW under a
 * random name, so a symlink or a file planted by another user is never followed nor used).
 * The backup is created with O_EXCL at PATH; with backup-overwrite=true it is created under
 * a new temporary name and renamed over PATH once the job has started: the check ("is PATH
 * a file I may replace?") and the replacement are one rename, which replaces a symlink
 * planted at PATH instead of following it. A start-up failure removes what this run
 * created (the backup, a new bitmap), so the corrected command can be run again as it is.
 *
 * Fails loudly, also in daemon mode: every parameter is checked in .config (the library's
 * own setters judge the values) and .config_complete (the backup's directory, PATH, the
 * bitmap file: opened and checked, then closed again), before nbdkit forks. What needs the
 * plugin (the disk's size: a bitmap of another disk) or the job itself can only fail in
 * .after_fork, after nbdkit has forked and its parent would already have exited 0. So the
 * filter makes the parent wait for the daemon's verdict, as a daemon's readiness
 * notification: .get_ready (last call before the fork) makes a pipe and registers a
 * pthread_atfork handler and an atexit handler; nbdkit's parent calls exit(0) right after
 * the fork, and the atexit handler reads the pipe until the daemon's .after_fork writes its
 * verdict: "ready" (the job runs and PATH.status says `running`) lets the exit go on with 0;
 * an error message is printed on the parent's stderr (the daemon's own stderr is /dev/null
 * and its log is syslog) and the parent exits 1; a daemon that dies first (a plugin's
 * .after_fork failed) also makes it exit 1. The daemon itself exits (nbdkit does, when
 * .after_fork fails): no daemon is left. With -f (or --run, -s, socket activation) there
 * is no such fork and .after_fork's failure is nbdkit's own exit status.
 *
 * Design: the job's own path to the plugin.
 *   nbdkit's `next` of a filter callback is a per-connection context: it is valid only while
 *   that connection lives, and the job outlives every connection (it starts before the
 *   first). So in .after_fork the filter opens a *shared* backend context of its own with
 *   nbdkit_next_context_open(backend, readonly=1, "", shared=1) (nbdkit >= 1.30), prepares
 *   it, and builds the job's source driver (cowbackup_driver_new) on it: the driver's read op
 *   is that context's pread, block_status its extents. The context lives from .after_fork to
 *   .cleanup, which frees the job first and then finalizes and closes the context. It is
 *   read-only: cowbackup never writes its source, and the reads must not go through the
 *   hook anyway (they are the backup's own reads).
 *
 * Why .after_fork and not .config_complete / .get_ready: without --foreground nbdkit forks
 * to become a daemon after .get_ready; the job's threads (and the bitmap's file lock) must
 * belong to the process that serves, so everything that starts threads or takes locks
 * happens in .after_fork. nbdkit may chdir("/") when it forks: paths are made absolute at
 * .config.
 *
 * Threads (which callback runs where):
 *   - .config, .config_complete, .get_ready, .after_fork, .cleanup: nbdkit's main thread.
 *   - .open, .pwrite, .zero, .trim, .pread, ... : nbdkit's connection worker threads, many
 *     at once (the filter is fully parallel). The hook (and so the source driver's read op
 *     and the target's writes for the clusters it copies) runs on these threads.
 *   - the source driver's ops: the job's workers `cowbackup-<id>-<n>` (background copy), the
 *     job thread (none for the source), or a connection thread inside the hook; on the main
 *     thread inside cowbackup_backup_start (block_status, when the new target reads zeroes).
 *   - job_completed (the completion callback) and most trace events: the job's threads;
 *     trace events of the hook: the connection thread that called it.
 *   - the progress thread (started in .after_fork, joined in .cleanup): `running N%`.
 *   So every op is thread-safe: it only calls the shared context, which nbdkit allows from
 *   any thread. When the plugin is not fully parallel (final thread model below PARALLEL),
 *   nbdkit serializes client requests but knows nothing of the job's threads: then every
 *   call into the plugin made by this filter (the clients' and the job's) is serialized by
 *   `plugin_lock`. The lock is never held across the hook: the hook's copy reads the source
 *   through the same lock.
 *
 * Limits: the job backs up the default export (""); connections to other export names are
 * refused (they could be other disks). Plugins that cannot open a second handle while a
 * client is connected cannot be used (the job's shared context is such a second handle).
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <nbdkit-filter.h>

#include "cowbackup.h"
#include "filter.h"

/* The library's default cluster size (DESIGN: 65536), for the copy set of PATH.extents. */
#define DEFAULT_CLUSTER_SIZE 65536u
/* The longest suffix the filter adds to PATH's last component: ".extents.tmp-XXXXXXXX". */
#define LONGEST_SUFFIX (sizeof ".extents.tmp-XXXXXXXX" - 1)

/* Configuration (set on the main thread before .after_fork, read-only afterwards). */
static cowbackup_options *opts;  /* the job's options, each value checked by the library's
                                    setter in .config; NULL until the first */
static char *backup_path;        /* backup=, absolute; NULL: no backup (bitmap only) */
static char *status_path;        /* backup_path + ".status" */
static char *extents_path;       /* backup_path + ".extents" */
static bool backup_overwrite;    /* backup-overwrite=true */
char *bitmap_path;               /* bitmap=, absolute; NULL: none */
static uint64_t bitmap_granularity = COWBACKUP_BITMAP_DEFAULT_GRANULARITY;
static uint32_t bitmap_mode = COWBACKUP_BITMAP_MODE_ON_SUCCESS;
static uint32_t sync_mode = COWBACKUP_SYNC_FULL;
uint64_t cluster_size = DEFAULT_CLUSTER_SIZE;
static uint64_t speed;           /* bytes/s, 0: unlimited (for the log) */
static unsigned seen_keys;       /* bit i: keys[i] was given (each key at most once) */

/* Set on the main thread by .get_ready/.after_fork, before any connection or job thread. */
static bool serialize_plugin;    /* thread model below PARALLEL: see plugin_lock */
static nbdkit_next *job_next;    /* the job's shared, read-only context into the plugin */
uint64_t disk_size;
static cowbackup_job *job;       /* NULL without backup=; freed in .cleanup */
cowbackup_bitmap *bitmap;        /* NULL without bitmap=; freed in .cleanup */
cowbackup_driver *source_driver; /* the jobs' source: the plugin through job_next (owns it);
                                    NULL without backup= and control=; freed in .cleanup */
static bool bitmap_created;      /* this run created bitmap_path (removed if the start fails) */
static char startup_error[1024]; /* why .after_fork failed: for the waiting parent */

/* Serializes every call into the plugin when serialize_plugin is set. */
static pthread_mutex_t plugin_lock = PTHREAD_MUTEX_INITIALIZER;

/* Held for reading across each client write, for writing by the control thread (filter.h). */
pthread_rwlock_t hook_lock = PTHREAD_RWLOCK_WRITER_NONRECURSIVE_INITIALIZER_NP;

/* The job's end and messages, written by job threads, read at .cleanup. */
static pthread_mutex_t state_lock = PTHREAD_MUTEX_INITIALIZER;
static char last_job_error[512];  /* the last background error message (trace), "" if none; state_lock */
static bool stopping;             /* .cleanup cancels the job; state_lock */
static struct timespec job_started; /* CLOCK_MONOTONIC at start; set before the job runs */
static bool job_published;        /* start_job is done with the job (kept or freed); state_lock */
static bool start_failed;         /* start_job freed the job again: no status from its end; state_lock */
static pthread_cond_t job_published_cond = PTHREAD_COND_INITIALIZER;
static bool progress_stop;        /* the progress thread ends; state_lock */
static pthread_cond_t progress_cond; /* CLOCK_MONOTONIC; signalled with progress_stop */
static pthread_t progress_thread;
static bool progress_started;     /* main thread only */

/* PATH.status writes (any thread): one at a time; nothing after the final line. */
static pthread_mutex_t status_lock = PTHREAD_MUTEX_INITIALIZER;
static bool status_final;         /* `completed` / `failed: ...` is written; status_lock */
static int reserve_fd = -1;       /* a temporary file holding space for the final line; status_lock */
static char *reserve_name;        /* its name; status_lock */

/* The parent's wait for the daemon's verdict (see the top). Set in .get_ready on the main
 * thread; the fork handlers run in the forking thread. */
static int ready_pipe[2] = { -1, -1 };
static pid_t armed_pid;           /* the process that made the pipe (nbdkit before it forks) */
static bool forked;               /* the first fork after .get_ready has happened */
static bool daemon_child;         /* this process is that fork's child */

static void lock_plugin(void)
{
    if (serialize_plugin)
        pthread_mutex_lock(&plugin_lock);
}

static void unlock_plugin(void)
{
    if (serialize_plugin)
        pthread_mutex_unlock(&plugin_lock);
}

/* hook_lock around a client write; only with control= (without it the set of jobs and
 * bitmaps never changes after start-up: nothing to wait for). */
static void hook_rdlock(void)
{
    if (control_configured())
        pthread_rwlock_rdlock(&hook_lock);
}

static void hook_unlock(void)
{
    if (control_configured())
        pthread_rwlock_unlock(&hook_lock);
}

/* A start-up failure: nbdkit's log, and the message the waiting parent prints. */
static void startup_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void startup_fail(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(startup_error, sizeof startup_error, fmt, ap);
    va_end(ap);
    nbdkit_error("%s", startup_error);
}

/* ---------------------------------------------------------------------------------------
 * Configuration
 */

/* The filter's keys; seen_keys has one bit per entry. */
static const char *const keys[] = {
    "backup", "backup-overwrite", "bitmap", "bitmap-granularity", "bitmap-mode", "sync",
    "cluster-size", "speed", "workers", "on-cbw-error", "on-source-error", "on-target-error",
    "control",
};
enum { K_BACKUP, K_OVERWRITE, K_BITMAP, K_GRANULARITY, K_BITMAP_MODE, K_SYNC, K_CLUSTER_SIZE,
       K_SPEED, K_WORKERS, K_CBW_ERROR, K_SOURCE_ERROR, K_TARGET_ERROR, K_CONTROL, K_COUNT };

static bool seen(int k)
{
    return seen_keys & (1u << k);
}

static int parse_size(const char *key, const char *value, uint64_t *out)
{
    int64_t r = nbdkit_parse_size(value);
    if (r < 0) {
        /* nbdkit_parse_size said why; say which parameter. */
        nbdkit_error("cowbackup: %s=%s: not a size (bytes, or with a suffix: 64K, 1M, ...)",
                     key, value);
        return -1;
    }
    *out = (uint64_t)r;
    return 0;
}

static int parse_choice(const char *key, const char *value, const char *const *names,
                        const uint32_t *values, size_t n, uint32_t *out)
{
    for (size_t i = 0; i < n; i++) {
        if (strcmp(value, names[i]) == 0) {
            *out = values[i];
            return 0;
        }
    }
    char list[256] = "";
    for (size_t i = 0; i < n; i++)
        snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", i ? ", " : "",
                 names[i]);
    nbdkit_error("cowbackup: %s=%s: unknown value (one of: %s)", key, value, list);
    return -1;
}

static int parse_error_action(const char *key, const char *value, uint32_t *out)
{
    static const char *const names[] = { "report", "ignore", "stop", "enospc" };
    static const uint32_t values[] = { COWBACKUP_ERROR_REPORT, COWBACKUP_ERROR_IGNORE,
                                       COWBACKUP_ERROR_STOP, COWBACKUP_ERROR_ENOSPC };
    return parse_choice(key, value, names, values, 4, out);
}

/* The library's verdict on an option value: 0, or -1 with its message. */
static int library_says(int r, const char *key, const char *value)
{
    if (r == 0)
        return 0;
    nbdkit_error("cowbackup: %s=%s: %s", key, value, cowbackup_last_error());
    return -1;
}

/* A path parameter: absolute (nbdkit may chdir("/") when it daemonizes), not empty, and
 * with room for the suffixes the filter adds to its last component. */
static int parse_path(const char *key, const char *value, char **out)
{
    if (value[0] == '\0') {
        nbdkit_error("cowbackup: %s= is empty: give the path of a file", key);
        return -1;
    }
    char *abs = nbdkit_absolute_path(value);
    if (!abs)
        return -1;
    const char *base = strrchr(abs, '/') + 1;
    size_t len = strlen(abs);
    if (*base == '\0' || abs[len - 1] == '/') {
        nbdkit_error("cowbackup: %s=%s names a directory, not a file", key, value);
        free(abs);
        return -1;
    }
    if (strlen(base) + LONGEST_SUFFIX > NAME_MAX || len + LONGEST_SUFFIX >= PATH_MAX) {
        nbdkit_error("cowbackup: %s=%s: the name is too long (at most %zu bytes for the file "
                     "name and %zu for the path, to leave room for the .status and .extents "
                     "files beside it)", key, value, (size_t)NAME_MAX - LONGEST_SUFFIX,
                     (size_t)PATH_MAX - 1 - LONGEST_SUFFIX);
        free(abs);
        return -1;
    }
    *out = abs;
    return 0;
}

static int cowbackup_config(nbdkit_next_config *next, nbdkit_backend *nxdata,
                            const char *key, const char *value)
{
    int k;
    for (k = 0; k < K_COUNT && strcmp(key, keys[k]) != 0; k++)
        ;
    if (k == K_COUNT)
        return next(nxdata, key, value);
    if (seen(k)) {
        nbdkit_error("cowbackup: %s= is given twice (%s=%s): give it once", key, key, value);
        return -1;
    }
    seen_keys |= 1u << k;
    if (!opts && !(opts = cowbackup_options_new())) {
        nbdkit_error("cowbackup: cowbackup_options_new: out of memory");
        return -1;
    }

    uint64_t u64;
    uint32_t u32;
    switch (k) {
    case K_BACKUP:
        return parse_path(key, value, &backup_path);
    case K_OVERWRITE: {
        int r = nbdkit_parse_bool(value);
        if (r < 0) {
            nbdkit_error("cowbackup: %s=%s: not a boolean (true or false)", key, value);
            return -1;
        }
        backup_overwrite = r;
        return 0;
    }
    case K_BITMAP:
        return parse_path(key, value, &bitmap_path);
    case K_GRANULARITY: {
        /* The library judges the granularity: a one-granule bitmap in memory. */
        cowbackup_bitmap *probe = NULL;
        if (parse_size(key, value, &u64) < 0)
            return -1;
        if (u64 == 0) {
            nbdkit_error("cowbackup: %s=%s: must not be 0", key, value);
            return -1;
        }
        if (library_says(cowbackup_bitmap_new(u64, u64, &probe), key, value) < 0)
            return -1;
        cowbackup_bitmap_free(probe);
        bitmap_granularity = u64;
        return 0;
    }
    case K_BITMAP_MODE: {
        static const char *const names[] = { "on-success", "always", "never" };
        static const uint32_t values[] = { COWBACKUP_BITMAP_MODE_ON_SUCCESS,
                                           COWBACKUP_BITMAP_MODE_ALWAYS,
                                           COWBACKUP_BITMAP_MODE_NEVER };
        return parse_choice(key, value, names, values, 3, &bitmap_mode);
    }
    case K_SYNC: {
        static const char *const names[] = { "full", "top", "bitmap" };
        static const uint32_t values[] = { COWBACKUP_SYNC_FULL, COWBACKUP_SYNC_TOP,
                                           COWBACKUP_SYNC_BITMAP };
        if (parse_choice(key, value, names, values, 3, &sync_mode) < 0)
            return -1;
        return library_says(cowbackup_options_set_sync(opts, sync_mode), key, value);
    }
    case K_CLUSTER_SIZE:
        if (parse_size(key, value, &u64) < 0 ||
            library_says(cowbackup_options_set_cluster_size(opts, u64), key, value) < 0)
            return -1;
        cluster_size = u64;
        return 0;
    case K_SPEED:
        if (parse_size(key, value, &u64) < 0 ||
            library_says(cowbackup_options_set_speed(opts, u64), key, value) < 0)
            return -1;
        speed = u64;
        return 0;
    case K_WORKERS:
        if (nbdkit_parse_uint32_t("cowbackup: workers", value, &u32) < 0)
            return -1;
        return library_says(cowbackup_options_set_workers(opts, u32), key, value);
    case K_CBW_ERROR: {
        static const char *const names[] = { "break-guest-write", "break-snapshot" };
        static const uint32_t values[] = { COWBACKUP_CBW_BREAK_GUEST_WRITE,
                                           COWBACKUP_CBW_BREAK_SNAPSHOT };
        if (parse_choice(key, value, names, values, 2, &u32) < 0)
            return -1;
        return library_says(cowbackup_options_set_on_cbw_error(opts, u32), key, value);
    }
    case K_SOURCE_ERROR:
        if (parse_error_action(key, value, &u32) < 0)
            return -1;
        return library_says(cowbackup_options_set_on_source_error(opts, u32), key, value);
    case K_TARGET_ERROR:
        if (parse_error_action(key, value, &u32) < 0)
            return -1;
        return library_says(cowbackup_options_set_on_target_error(opts, u32), key, value);
    case K_CONTROL:
        return control_config(value);
    }
    return next(nxdata, key, value);
}

/* The directory of an absolute path must exist, be a directory and take new files. */
static int check_directory(const char *key, const char *path)
{
    char dir[PATH_MAX];
    const char *slash = strrchr(path, '/');
    size_t n = slash == path ? 1 : (size_t)(slash - path);
    memcpy(dir, path, n);
    dir[n] = '\0';
    struct stat st;
    if (stat(dir, &st) < 0) {
        nbdkit_error("cowbackup: %s=%s: the directory %s: %m%s", key, path, dir,
                     errno == ENOENT ? " (create it first)" : "");
        return -1;
    }
    if (!S_ISDIR(st.st_mode)) {
        nbdkit_error("cowbackup: %s=%s: %s is not a directory", key, path, dir);
        return -1;
    }
    if (faccessat(AT_FDCWD, dir, W_OK | X_OK, AT_EACCESS) < 0) {
        nbdkit_error("cowbackup: %s=%s: cannot create files in %s: %m", key, path, dir);
        return -1;
    }
    return 0;
}

/* A file the filter replaces by rename (PATH.status, PATH.extents): anything but a
 * directory may be there (a symlink is replaced, not followed). */
static int check_replaceable(const char *path)
{
    struct stat st;
    if (lstat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
        nbdkit_error("cowbackup: %s is a directory: the filter writes a file there "
                     "(remove it or choose another backup=)", path);
        return -1;
    }
    if (lstat(path, &st) < 0 && errno != ENOENT) {
        nbdkit_error("cowbackup: %s: %m", path);
        return -1;
    }
    return 0;
}

static int check_backup_path(void)
{
    struct stat st;
    if (check_directory("backup", backup_path) < 0)
        return -1;
    if (lstat(backup_path, &st) == 0) {
        if (!backup_overwrite) {
            nbdkit_error("cowbackup: backup=%s already exists: refusing to overwrite it "
                         "(remove it, choose another path, or add backup-overwrite=true)",
                         backup_path);
            return -1;
        }
        if (!S_ISREG(st.st_mode)) {
            nbdkit_error("cowbackup: backup=%s exists and is not a regular file (%s): "
                         "backup-overwrite=true replaces only a regular file", backup_path,
                         S_ISLNK(st.st_mode) ? "a symbolic link" : S_ISDIR(st.st_mode) ?
                         "a directory" : S_ISBLK(st.st_mode) ? "a block device" :
                         S_ISCHR(st.st_mode) ? "a character device" : "a special file");
            return -1;
        }
    } else if (errno != ENOENT) {
        nbdkit_error("cowbackup: backup=%s: %m", backup_path);
        return -1;
    }
    if (asprintf(&status_path, "%s.status", backup_path) < 0 ||
        asprintf(&extents_path, "%s.extents", backup_path) < 0) {
        nbdkit_error("cowbackup: asprintf: %m");
        return -1;
    }
    return check_replaceable(status_path) < 0 || check_replaceable(extents_path) < 0 ? -1 : 0;
}

/* bitmap=: an existing file is opened (header, checksums, lock) and closed again; the
 * daemon opens it for good in .after_fork and checks its size against the disk's. */
static int check_bitmap_path(void)
{
    struct stat st;
    if (backup_path && (strcmp(bitmap_path, backup_path) == 0 ||
                        strcmp(bitmap_path, status_path) == 0 ||
                        strcmp(bitmap_path, extents_path) == 0)) {
        nbdkit_error("cowbackup: bitmap=%s is the backup or one of its files", bitmap_path);
        return -1;
    }
    if (stat(bitmap_path, &st) < 0) {
        if (errno != ENOENT) {
            nbdkit_error("cowbackup: bitmap=%s: %m", bitmap_path);
            return -1;
        }
        if (sync_mode == COWBACKUP_SYNC_BITMAP) {
            nbdkit_error("cowbackup: sync=bitmap: bitmap=%s: %m (an incremental backup needs "
                         "the bitmap of an earlier run; start with sync=full)", bitmap_path);
            return -1;
        }
        return check_directory("bitmap", bitmap_path); /* created in .after_fork */
    }
    if (!S_ISREG(st.st_mode)) {
        nbdkit_error("cowbackup: bitmap=%s is not a regular file", bitmap_path);
        return -1;
    }
    cowbackup_bitmap *bm = NULL;
    cowbackup_bitmap_info bi;
    if (cowbackup_bitmap_open(bitmap_path, &bm) < 0) {
        nbdkit_error("cowbackup: bitmap=%s: %s", bitmap_path, cowbackup_last_error());
        return -1;
    }
    int r = cowbackup_bitmap_query(bm, &bi);
    cowbackup_bitmap_free(bm);
    if (r < 0) {
        nbdkit_error("cowbackup: bitmap=%s: %s", bitmap_path, cowbackup_last_error());
        return -1;
    }
    if (seen(K_GRANULARITY) && bi.granularity != bitmap_granularity) {
        nbdkit_error("cowbackup: bitmap=%s exists with granularity %" PRIu64 ", not "
                     "bitmap-granularity=%" PRIu64 " (the granularity applies to a new bitmap)",
                     bitmap_path, bi.granularity, bitmap_granularity);
        return -1;
    }
    return 0;
}

static int cowbackup_config_complete(nbdkit_next_config_complete *next, nbdkit_backend *nxdata)
{
    if (!backup_path && !bitmap_path && !control_configured()) {
        nbdkit_error("cowbackup: backup=PATH (a new file for the backup), bitmap=PATH "
                     "(change tracking) or control=PATH (a QMP socket) is required");
        return -1;
    }
    if (!backup_path && (seen(K_OVERWRITE) || seen(K_SYNC) || seen(K_CLUSTER_SIZE) ||
                         seen(K_SPEED) || seen(K_WORKERS) || seen(K_CBW_ERROR) ||
                         seen(K_SOURCE_ERROR) || seen(K_TARGET_ERROR) ||
                         seen(K_BITMAP_MODE))) {
        nbdkit_error("cowbackup: backup-overwrite=, sync=, cluster-size=, speed=, workers=, "
                     "bitmap-mode= and on-*-error= configure a backup: they need backup=PATH");
        return -1;
    }
    if (!bitmap_path && (seen(K_GRANULARITY) || seen(K_BITMAP_MODE))) {
        nbdkit_error("cowbackup: bitmap-granularity= and bitmap-mode= need bitmap=PATH");
        return -1;
    }
    if (sync_mode == COWBACKUP_SYNC_BITMAP && !bitmap_path) {
        nbdkit_error("cowbackup: sync=bitmap needs bitmap=PATH (the bitmap kept by an "
                     "earlier run)");
        return -1;
    }
    if (bitmap_mode == COWBACKUP_BITMAP_MODE_NEVER && sync_mode != COWBACKUP_SYNC_BITMAP) {
        nbdkit_error("cowbackup: bitmap-mode=never needs sync=bitmap");
        return -1;
    }
    if (backup_path && check_backup_path() < 0)
        return -1;
    if (bitmap_path && check_bitmap_path() < 0)
        return -1;
    if (control_configured() && control_check() < 0)
        return -1;
    return next(nxdata);
}

#define cowbackup_config_help \
    "backup=PATH              New file to back the disk up into (point in time: start-up).\n" \
    "                         Beside it: PATH.status (running N%, completed, failed: ...)\n" \
    "                         and PATH.extents (the copy set, for a restore).\n" \
    "backup-overwrite=BOOL    Replace an existing regular file at PATH (default false).\n" \
    "sync=full|top|bitmap     What to copy (default full; bitmap: incremental from bitmap=).\n" \
    "bitmap=PATH              Persistent dirty bitmap of all writes (created if missing).\n" \
    "bitmap-granularity=SIZE  Granule of a new bitmap (default 64K).\n" \
    "bitmap-mode=on-success|always|never  What the job does with the bitmap at its end.\n" \
    "cluster-size=SIZE        Copy unit (power of 2, 4K..64M; default 64K).\n" \
    "speed=SIZE               Background copy limit in bytes/s (default 0: unlimited).\n" \
    "workers=N                Background copy threads (1..64, default 2).\n" \
    "on-cbw-error=break-guest-write|break-snapshot  A failed copy-before-write fails the\n" \
    "                         client's write (default) or the backup.\n" \
    "on-source-error=, on-target-error=report|ignore|stop|enospc  Background copy errors.\n" \
    "control=PATH             A QMP socket (0600) to start and control backups at run time."

/* ---------------------------------------------------------------------------------------
 * The parent's wait for the daemon's verdict (see the top).
 */

static void atfork_parent(void)
{
    if (getpid() == armed_pid)
        forked = true;
}

static void atfork_child(void)
{
    /* `forked` is the parent's value at the fork: false only for the first fork. */
    if (!forked && ready_pipe[0] >= 0) {
        forked = true;
        daemon_child = true;
        close(ready_pipe[0]);
        ready_pipe[0] = -1;
    }
}

/* atexit, in every process; acts only in nbdkit's parent right after it forked the daemon
 * (nbdkit's --run parent has reaped its child by the time it exits: nothing to wait for,
 * unless children are reaped automatically: then the child's verdict is read all the same,
 * and a captive nbdkit that started says "ready"). */
static void wait_for_daemon(void)
{
    if (getpid() != armed_pid || !forked || ready_pipe[0] < 0)
        return;
    struct sigaction sa;
    bool autoreap = sigaction(SIGCHLD, NULL, &sa) == 0 &&
                    (sa.sa_handler == SIG_IGN || (sa.sa_flags & SA_NOCLDWAIT));
    int status;
    if (waitpid(-1, &status, WNOHANG) < 0 && !autoreap)
        return;
    close(ready_pipe[1]);
    ready_pipe[1] = -1;
    /* The verdict ends with a NUL; EOF without one: the daemon died first. */
    char msg[sizeof startup_error + 40];
    size_t n = 0;
    while (n < sizeof msg - 1 && (n == 0 || !memchr(msg, '\0', n))) {
        ssize_t r = read(ready_pipe[0], msg + n, sizeof msg - 1 - n);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        n += (size_t)r;
    }
    msg[n] = '\0';
    if (n > 0 && msg[0] == 'R')
        return; /* ready: nbdkit's exit(0) goes on */
    fflush(stdout);
    if (n > 0) {
        /* "E<pid> <message>": the daemon exits at once (nbdkit does when .after_fork fails);
         * return only once it is gone (bounded: a daemon stuck in its exit is killed). */
        char *text = msg + 1;
        long pid = strtol(text, &text, 10);
        fprintf(stderr, "nbdkit: %s\n", *text == ' ' ? text + 1 : text);
        fflush(stderr);
        bool gone = pid <= 0;
        for (int i = 0; !gone && i < 300; i++) {
            pid_t w = waitpid((pid_t)pid, &status, WNOHANG);
            /* Reaped, or not ours to reap (auto-reaped) and no longer there. */
            gone = w == (pid_t)pid || (w < 0 && kill((pid_t)pid, 0) < 0);
            if (!gone)
                usleep(100 * 1000);
        }
        if (!gone) {
            kill((pid_t)pid, SIGKILL);
            waitpid((pid_t)pid, &status, 0);
        }
        _exit(EXIT_FAILURE);
    }
    else
        fprintf(stderr, "nbdkit: the server exited during start-up, before the cowbackup "
                "filter was ready (a plugin or filter failed: see nbdkit's log, syslog in "
                "daemon mode, or run with -f)\n");
    fflush(stderr);
    _exit(EXIT_FAILURE);
}

/* In .after_fork: tell the waiting parent (if any) how the start went. */
static void send_verdict(bool ok)
{
    if (daemon_child && ready_pipe[1] >= 0) {
        char msg[sizeof startup_error + 32];
        int n = ok ? snprintf(msg, sizeof msg, "R")
                   : snprintf(msg, sizeof msg, "E%ld %s", (long)getpid(),
                              startup_error[0] ? startup_error : "cowbackup: start-up failed");
        if (n > (int)sizeof msg - 1)
            n = (int)sizeof msg - 1;
        /* With its NUL: the end of the verdict (a child of a plugin may keep the pipe open). */
        size_t len = (size_t)n + 1, done = 0;
        while (done < len) {
            ssize_t w = write(ready_pipe[1], msg + done, len - done);
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0)
                break;
            done += (size_t)w;
        }
    }
    for (int i = 0; i < 2; i++) {
        if (ready_pipe[i] >= 0)
            close(ready_pipe[i]);
        ready_pipe[i] = -1;
    }
}

static int cowbackup_get_ready(int thread_model)
{
    serialize_plugin = thread_model != NBDKIT_THREAD_MODEL_PARALLEL;
    if (serialize_plugin)
        nbdkit_debug("cowbackup: thread model %d: calls into the plugin are serialized",
                     thread_model);
    /* The last call before nbdkit may fork into the background. */
    static bool registered;
    if (pipe2(ready_pipe, O_CLOEXEC) < 0) {
        nbdkit_error("cowbackup: pipe2: %m");
        return -1;
    }
    armed_pid = getpid();
    if (!registered) {
        int r = pthread_atfork(NULL, atfork_parent, atfork_child);
        if (r != 0 || atexit(wait_for_daemon) != 0) {
            nbdkit_error("cowbackup: cannot register the start-up handlers: %s",
                         strerror(r ? r : ENOMEM));
            return -1;
        }
        registered = true;
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * Files beside the backup: PATH.status and PATH.extents, each written into a new temporary
 * file (random name, O_CREAT | O_EXCL | O_NOFOLLOW, 0600), fsync'ed, renamed over its name
 * and the directory fsync'ed: a reader sees the old contents or the new, never a torn file,
 * and a name planted by someone else is never opened. The backup often fills its
 * filesystem (a failure we must still report): so right after writing "running",
 * reserve_status() allocates a temporary file for the final line while there is room.
 */

static int fsync_dir_of(const char *path)
{
    char dir[PATH_MAX];
    const char *slash = strrchr(path, '/');
    size_t n = slash == path ? 1 : (size_t)(slash - path);
    memcpy(dir, path, n);
    dir[n] = '\0';
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0)
        return -1;
    int r = fsync(dfd);
    close(dfd);
    return r;
}

/* A new file `path`.tmp-XXXXXXXX (random), ours alone: returns its fd and *name (malloc'ed),
 * or -1 with errno. */
int create_temp(const char *path, char **name)
{
    for (int attempt = 0; attempt < 16; attempt++) {
        uint32_t rnd;
        if (getrandom(&rnd, sizeof rnd, 0) != sizeof rnd)
            rnd = (uint32_t)getpid() * 2654435761u ^ (uint32_t)attempt ^ (uint32_t)time(NULL);
        if (asprintf(name, "%s.tmp-%08" PRIx32, path, rnd) < 0)
            return -1;
        int fd = open(*name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
        if (fd >= 0) {
            if (fchmod(fd, 0600) == 0) /* exactly 0600, whatever the umask */
                return fd;
            int e = errno;
            close(fd);
            unlink(*name);
            errno = e;
        }
        int e = errno;
        free(*name);
        *name = NULL;
        errno = e;
        if (e != EEXIST)
            return -1;
    }
    errno = EEXIST;
    return -1;
}

/* Write `len` bytes into the temporary file fd (from offset 0, trimmed to them), fsync,
 * close, rename it to `path`, fsync the directory. Consumes fd; on failure unlinks `tmp`. */
int replace_file(int fd, const char *tmp, const char *path, const char *data, size_t len)
{
    size_t done = 0;
    while (done < len) {
        ssize_t w = pwrite(fd, data + done, len - done, (off_t)done);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            goto fail;
        done += (size_t)w;
    }
    if (ftruncate(fd, (off_t)len) < 0 || fsync(fd) < 0)
        goto fail;
    if (close(fd) < 0) {
        fd = -1;
        goto fail;
    }
    fd = -1;
    if (rename(tmp, path) < 0)
        goto fail;
    fsync_dir_of(path);
    return 0;
fail:;
    int e = errno;
    if (fd >= 0)
        close(fd);
    unlink(tmp);
    errno = e;
    return -1;
}

/* Replace PATH.status with `line`. `final`: the job's end (or a failed start); no line
 * replaces it afterwards. Progress lines are best effort (quiet when the disk is full). */
static int write_status(const char *line, bool final)
{
    if (!status_path)
        return 0;
    int ret = 0;
    pthread_mutex_lock(&status_lock);
    if (status_final)
        goto out;
    char *tmp = NULL;
    int fd;
    if (final && reserve_fd >= 0) {
        fd = reserve_fd, tmp = reserve_name;
        reserve_fd = -1, reserve_name = NULL;
    } else if ((fd = create_temp(status_path, &tmp)) < 0) {
        ret = -1;
        if (final || strncmp(line, "running ", 8) != 0)
            nbdkit_error("cowbackup: cannot write \"%s\" into %s: cannot create a file "
                         "beside it: %m", line, status_path);
        goto out;
    }
    char buf[1100];
    size_t len = strlen(line);
    if (len > sizeof buf - 2)
        len = sizeof buf - 2;
    memcpy(buf, line, len);
    buf[len++] = '\n';
    if (replace_file(fd, tmp, status_path, buf, len) < 0) {
        ret = -1;
        nbdkit_error("cowbackup: cannot write \"%s\" into %s: %m", line, status_path);
    } else if (final) {
        status_final = true;
    }
    free(tmp);
out:
    pthread_mutex_unlock(&status_lock);
    return ret;
}

/* Allocate a temporary file for the final line while the filesystem has room. */
static int reserve_status(void)
{
    int ret = 0;
    pthread_mutex_lock(&status_lock);
    if (reserve_fd < 0) {
        char *tmp = NULL;
        int fd = create_temp(status_path, &tmp);
        int r = fd < 0 ? errno : posix_fallocate(fd, 0, 4096);
        if (r == 0 && fsync(fd) < 0)
            r = errno;
        if (r != 0) {
            nbdkit_error("cowbackup: cannot reserve space for %s: %s", status_path,
                         strerror(r));
            if (fd >= 0) {
                close(fd);
                unlink(tmp);
            }
            free(tmp);
            ret = -1;
        } else {
            reserve_fd = fd, reserve_name = tmp;
        }
    }
    pthread_mutex_unlock(&status_lock);
    return ret;
}

static void drop_reserve(void)
{
    pthread_mutex_lock(&status_lock);
    if (reserve_fd >= 0) {
        close(reserve_fd);
        unlink(reserve_name);
    }
    free(reserve_name);
    reserve_fd = -1, reserve_name = NULL;
    pthread_mutex_unlock(&status_lock);
}

static void cowbackup_unload(void)
{
    drop_reserve();
    cowbackup_options_free(opts);
    free(backup_path);
    free(status_path);
    free(extents_path);
    free(bitmap_path);
    control_unload();
}

/* A growing text buffer for PATH.extents. */
struct text {
    char *data;
    size_t len, cap;
};

static int text_add(struct text *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int text_add(struct text *t, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(t->data ? t->data + t->len : NULL, t->data ? t->cap - t->len : 0,
                          fmt, ap);
        va_end(ap);
        if (n < 0)
            return -1;
        if (t->data && t->len + (size_t)n < t->cap) {
            t->len += (size_t)n;
            return 0;
        }
        size_t cap = t->cap ? t->cap * 2 : 4096;
        while (cap < t->len + (size_t)n + 1)
            cap *= 2;
        char *d = realloc(t->data, cap);
        if (!d)
            return -1;
        t->data = d, t->cap = cap;
    }
}

/* The job's copy set as the library will fix it at start: the whole disk, or (sync=bitmap)
 * the clusters overlapping the bitmap's dirty granules, adjacent ones merged, the last
 * clipped to the disk. Written into a new temporary file beside PATH.extents (renamed over
 * it once the job runs); returns its fd-less name, NULL with startup_fail on failure. */
static char *write_extents_tmp(void)
{
    struct text t = { 0 };
    char *tmp = NULL;
    const char *base = strrchr(backup_path, '/') + 1;
    char info[256];
    int fd = -1;

    if (sync_mode == COWBACKUP_SYNC_BITMAP) {
        cowbackup_bitmap_info bi;
        if (cowbackup_bitmap_query(bitmap, &bi) < 0)
            goto fail_lib;
        snprintf(info, sizeof info, "image size %" PRIu64 ", cluster %" PRIu64 ", sync=bitmap, "
                 "bitmap generation %" PRIu64 " with %" PRIu64 " dirty bytes at the start",
                 disk_size, cluster_size, bi.generation, bi.count);
    } else {
        snprintf(info, sizeof info, "image size %" PRIu64 ", cluster %" PRIu64 ", sync=%s",
                 disk_size, cluster_size, sync_mode == COWBACKUP_SYNC_TOP ? "top" : "full");
    }
    if (text_add(&t, "# cowbackup copy set of %s: byte extents \"offset length\", in order "
                 "(%s)\n", base, info) < 0 ||
        text_add(&t, "# restore: apply every byte of these extents after the earlier backups "
                 "of the chain;\n") < 0 ||
        text_add(&t, "# a hole in %s inside an extent is zeroes; outside the extents the file "
                 "means nothing\n", base) < 0)
        goto fail_mem;
    if (sync_mode != COWBACKUP_SYNC_BITMAP) {
        if (text_add(&t, "0 %" PRIu64 "\n", disk_size) < 0)
            goto fail_mem;
    } else {
        uint64_t from = 0, run_start = 0, run_end = 0;
        bool have = false;
        while (from < disk_size) {
            uint64_t off, len;
            if (cowbackup_bitmap_next_dirty(bitmap, from, &off, &len) < 0)
                goto fail_lib;
            if (len == 0)
                break;
            uint64_t s = off / cluster_size * cluster_size;
            uint64_t e = (off + len + cluster_size - 1) / cluster_size * cluster_size;
            if (e > disk_size)
                e = disk_size;
            if (have && s <= run_end) {
                if (e > run_end)
                    run_end = e;
            } else {
                if (have && text_add(&t, "%" PRIu64 " %" PRIu64 "\n", run_start,
                                     run_end - run_start) < 0)
                    goto fail_mem;
                run_start = s, run_end = e, have = true;
            }
            from = off + len;
        }
        if (have && text_add(&t, "%" PRIu64 " %" PRIu64 "\n", run_start,
                             run_end - run_start) < 0)
            goto fail_mem;
    }
    if ((fd = create_temp(extents_path, &tmp)) < 0) {
        startup_fail("cowbackup: backup %s failed: cannot create a file beside %s: %m",
                     backup_path, extents_path);
        goto out;
    }
    /* Written and synced now; renamed to PATH.extents once the job has started. */
    size_t done = 0;
    errno = 0;
    while (done < t.len) {
        ssize_t w = write(fd, t.data + done, t.len - done);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            break;
        done += (size_t)w;
    }
    int err = done < t.len ? (errno ? errno : EIO) : fsync(fd) < 0 ? errno : 0;
    if (close(fd) < 0 && !err)
        err = errno;
    if (err) {
        startup_fail("cowbackup: backup %s failed: cannot write %s: %s", backup_path, tmp,
                     strerror(err));
        unlink(tmp);
        free(tmp);
        tmp = NULL;
    }
    goto out;
fail_mem:
    startup_fail("cowbackup: backup %s failed: out of memory for the copy set", backup_path);
    goto out;
fail_lib:
    startup_fail("cowbackup: backup %s failed: bitmap=%s: %s", backup_path, bitmap_path,
                 cowbackup_last_error());
out:
    free(t.data);
    return tmp;
}

/* ---------------------------------------------------------------------------------------
 * The job's source driver: the plugin, through the shared context job_next.
 * Ops run on job threads and on connection threads (inside the hook): see the top comment.
 */

/* nbdkit passes counts as uint32_t; the library asks for at most max_chunk at a time, but
 * split anyway. */
#define MAX_PLUGIN_REQUEST (32u << 20)

static int source_read(void *opaque, uint64_t offset, void *buf, size_t len)
{
    nbdkit_next *next = opaque;
    while (len > 0) {
        uint32_t n = len > MAX_PLUGIN_REQUEST ? MAX_PLUGIN_REQUEST : (uint32_t)len;
        int err = 0;
        lock_plugin();
        int r = next->pread(next, buf, n, offset, 0, &err);
        unlock_plugin();
        if (r < 0)
            return err > 0 ? -err : -EIO;
        buf = (char *)buf + n;
        offset += n;
        len -= n;
    }
    return 0;
}

static int source_write(void *opaque, uint64_t offset, const void *buf, size_t len)
{
    /* cowbackup never writes its source; the context is read-only anyway. */
    (void)opaque, (void)offset, (void)buf, (void)len;
    return -EROFS;
}

static int source_block_status(void *opaque, uint64_t offset, uint64_t len, uint64_t *pnum,
                               uint32_t *status)
{
    nbdkit_next *next = opaque;
    uint32_t count = len > (1u << 30) ? (1u << 30) : (uint32_t)len;
    struct nbdkit_extents *exts = nbdkit_extents_new(offset, offset + count);
    if (!exts)
        return -ENOMEM;
    int err = 0;
    lock_plugin();
    int r = next->extents(next, count, offset, 0, exts, &err);
    unlock_plugin();
    if (r < 0) {
        nbdkit_extents_free(exts);
        return err > 0 ? -err : -EIO;
    }
    if (nbdkit_extents_count(exts) == 0) {
        nbdkit_extents_free(exts);
        return -EIO;
    }
    struct nbdkit_extent e = nbdkit_get_extent(exts, 0);
    nbdkit_extents_free(exts);
    if (e.offset > offset || e.offset + e.length <= offset)
        return -EIO;
    uint64_t n = e.offset + e.length - offset;
    *pnum = n < count ? n : count;
    /* A hole that does not read as zeroes is treated as data (copied). */
    *status = (e.type & NBDKIT_EXTENT_ZERO) ? COWBACKUP_STATUS_ZERO : COWBACKUP_STATUS_DATA;
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * Job callbacks: on the job's threads (and the hook's connection thread for hook events).
 */

static void job_trace(void *opaque, const cowbackup_trace_event *ev)
{
    (void)opaque;
    switch (ev->kind) {
    case COWBACKUP_TRACE_ERROR:
        if (ev->action == COWBACKUP_TRACE_ACTION_BREAK_GUEST_WRITE)
            return; /* the failed client write reports it (filter_write) */
        nbdkit_error("cowbackup: %s", ev->message);
        pthread_mutex_lock(&state_lock);
        snprintf(last_job_error, sizeof last_job_error, "%s", ev->message);
        pthread_mutex_unlock(&state_lock);
        control_startup_trace(ev);
        break;
    case COWBACKUP_TRACE_STATE:
        nbdkit_debug("cowbackup: %s", ev->message);
        control_startup_trace(ev);
        break;
    default:
        break;
    }
}

/* The completion callback: on the job thread, once, after the final state is set (or inside
 * cowbackup_job_free in .cleanup, with -ECANCELED, when nbdkit stops first). */
static void job_completed(void *opaque, int ret)
{
    (void)opaque;
    /* A job that ends at once (an empty bitmap) may get here before start_job is done with
     * it: wait (start_job never waits for the job, so this cannot block for long). */
    pthread_mutex_lock(&state_lock);
    while (!job_published)
        pthread_cond_wait(&job_published_cond, &state_lock);
    bool ignore = start_failed;
    progress_stop = true;
    pthread_cond_broadcast(&progress_cond);
    pthread_mutex_unlock(&state_lock);
    if (ignore)
        return; /* start_job cancelled it and reports why */
    cowbackup_job *j = __atomic_load_n(&job, __ATOMIC_ACQUIRE);
    cowbackup_job_info info;
    memset(&info, 0, sizeof info);
    if (j)
        cowbackup_job_query(j, &info);

    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    double secs = (double)(now.tv_sec - job_started.tv_sec) +
                  (double)(now.tv_nsec - job_started.tv_nsec) / 1e9;

    char line[1024];
    pthread_mutex_lock(&state_lock);
    if (ret == 0) {
        snprintf(line, sizeof line, "completed");
    } else if (ret == -ECANCELED) {
        snprintf(line, sizeof line, "failed: cancelled%s (%" PRIu64 " of %" PRIu64 " bytes "
                 "done)%s%s", stopping ? ": nbdkit stopped before the backup completed" : "",
                 info.offset, info.len, last_job_error[0] ? "; last error: " : "",
                 last_job_error);
    } else {
        snprintf(line, sizeof line, "failed: %s%s%s", strerror(-ret),
                 last_job_error[0] ? ": " : "", last_job_error);
    }
    pthread_mutex_unlock(&state_lock);

    if (ret == 0)
        nbdkit_debug("cowbackup: backup %s completed: %" PRIu64 " bytes: %" PRIu64 " copied, "
                     "%" PRIu64 " zero, %" PRIu64 " skipped; %" PRIu64 " copy-before-write "
                     "requests (%" PRIu64 " bytes); in %.3f s (%.1f MiB/s)", backup_path,
                     info.len, info.bytes_copied, info.bytes_zero, info.bytes_skipped,
                     info.cow_requests, info.cow_bytes, secs,
                     secs > 0 ? (double)info.len / secs / 1048576.0 : 0.0);
    else
        nbdkit_error("cowbackup: backup %s %s", backup_path, line);
    write_status(line, true);
    control_startup_completed(ret, line);
}

/* The progress thread: every second, `running N%` into PATH.status when N changed (bytes
 * done / bytes to process), and a line in nbdkit's log at every tenth. Ends with
 * progress_stop (the job's end, or .cleanup). */
static void *progress_main(void *arg)
{
    (void)arg;
    int last_pct = -1;
    unsigned last_tenth = 0;
    struct timespec until;
    clock_gettime(CLOCK_MONOTONIC, &until);
    pthread_mutex_lock(&state_lock);
    while (!progress_stop) {
        until.tv_sec += 1;
        while (!progress_stop &&
               pthread_cond_timedwait(&progress_cond, &state_lock, &until) != ETIMEDOUT)
            ;
        if (progress_stop)
            break;
        pthread_mutex_unlock(&state_lock);
        cowbackup_job *j = __atomic_load_n(&job, __ATOMIC_ACQUIRE);
        cowbackup_job_info info;
        if (j && cowbackup_job_query(j, &info) == 0 &&
            (info.state == COWBACKUP_JOB_RUNNING || info.state == COWBACKUP_JOB_PAUSED)) {
            int pct = info.len ? (int)(info.offset * 100 / info.len) : 0;
            if (pct != last_pct) {
                char line[32];
                snprintf(line, sizeof line, "running %d%%", pct);
                if (write_status(line, false) == 0)
                    last_pct = pct;
            }
            unsigned tenth = info.len ? (unsigned)(info.offset * 10 / info.len) : 0;
            if (tenth > last_tenth) {
                last_tenth = tenth;
                nbdkit_debug("cowbackup: progress %u%%: %" PRIu64 " of %" PRIu64 " bytes done "
                             "(%" PRIu64 " copied, %" PRIu64 " zero, %" PRIu64 " skipped), "
                             "%" PRIu64 " copy-before-write requests", tenth * 10, info.offset,
                             info.len, info.bytes_copied, info.bytes_zero, info.bytes_skipped,
                             info.cow_requests);
            }
        }
        pthread_mutex_lock(&state_lock);
    }
    pthread_mutex_unlock(&state_lock);
    return NULL;
}

static void stop_progress(void)
{
    if (!progress_started)
        return;
    pthread_mutex_lock(&state_lock);
    progress_stop = true;
    pthread_cond_broadcast(&progress_cond);
    pthread_mutex_unlock(&state_lock);
    pthread_join(progress_thread, NULL);
    progress_started = false;
}

/* Before the job exists (its end signals the condition variable). */
static int init_progress_cond(void)
{
    pthread_condattr_t attr;
    int r = pthread_condattr_init(&attr);
    if (r == 0) {
        r = pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
        if (r == 0)
            r = pthread_cond_init(&progress_cond, &attr);
        pthread_condattr_destroy(&attr);
    }
    if (r != 0)
        startup_fail("cowbackup: pthread_cond_init: %s", strerror(r));
    return r == 0 ? 0 : -1;
}

static int start_progress(void)
{
    int r = pthread_create(&progress_thread, NULL, progress_main, NULL);
    if (r != 0) {
        errno = r;
        return -1;
    }
    progress_started = true;
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * Start-up and shutdown (main thread).
 */

static void source_release(void *opaque)
{
    /* The last reference to the source driver is gone: no op runs any more. */
    nbdkit_next *next = opaque;
    next->finalize(next);
    nbdkit_next_context_close(next);
}

static int open_bitmap(void)
{
    int r = cowbackup_bitmap_open(bitmap_path, &bitmap);
    if (r == -ENOENT) {
        mode_t old = umask(077); /* 0600 */
        r = cowbackup_bitmap_create(bitmap_path, disk_size, bitmap_granularity, &bitmap);
        umask(old);
        if (r == 0) {
            bitmap_created = true;
            nbdkit_debug("cowbackup: created bitmap %s (granularity %" PRIu64 ")", bitmap_path,
                         bitmap_granularity);
        }
    }
    if (r < 0) {
        startup_fail("cowbackup: bitmap=%s: %s", bitmap_path, cowbackup_last_error());
        return -1;
    }
    cowbackup_bitmap_info bi;
    if (cowbackup_bitmap_query(bitmap, &bi) < 0 || bi.size != disk_size) {
        startup_fail("cowbackup: bitmap=%s covers %" PRIu64 " bytes, the disk has %" PRIu64
                     ": it belongs to another disk (nothing was changed)", bitmap_path, bi.size,
                     disk_size);
        cowbackup_bitmap_free(bitmap);
        bitmap = NULL;
        return -1;
    }
    nbdkit_debug("cowbackup: bitmap %s: %" PRIu64 " dirty bytes, generation %" PRIu64,
                 bitmap_path, bi.count, bi.generation);
    return 0;
}

/* The backup's target: a new file at PATH (O_EXCL), or with backup-overwrite=true a new
 * file under a temporary name beside it, renamed over PATH once the job runs. 0600. */
static int create_target(cowbackup_driver **dst, char **created)
{
    mode_t old = umask(077);
    int r = -EEXIST;
    bool oom = false;
    if (!backup_overwrite) {
        r = cowbackup_file_create(backup_path, disk_size, 0, dst);
        if (r == 0 && !(*created = strdup(backup_path)))
            r = -ENOMEM, oom = true;
    } else {
        for (int attempt = 0; attempt < 16 && r == -EEXIST; attempt++) {
            uint32_t rnd;
            if (getrandom(&rnd, sizeof rnd, 0) != sizeof rnd)
                rnd = (uint32_t)getpid() * 2654435761u ^ (uint32_t)attempt;
            free(*created);
            *created = NULL;
            if (asprintf(created, "%s.tmp-%08" PRIx32, backup_path, rnd) < 0) {
                *created = NULL;
                r = -ENOMEM, oom = true;
                break;
            }
            r = cowbackup_file_create(*created, disk_size, 0, dst);
        }
    }
    umask(old);
    if (r < 0) {
        if (oom)
            startup_fail("cowbackup: backup %s failed: out of memory", backup_path);
        else if (r == -EEXIST && !backup_overwrite)
            startup_fail("cowbackup: backup=%s already exists: refusing to overwrite it "
                         "(remove it, choose another path, or add backup-overwrite=true)",
                         backup_path);
        else
            startup_fail("cowbackup: backup %s failed: %s", backup_path,
                         cowbackup_last_error());
        if (*dst) { /* only the strdup failed: PATH is ours, new */
            cowbackup_driver_free(*dst);
            *dst = NULL;
            unlink(backup_path);
        }
        free(*created);
        *created = NULL;
        return -1;
    }
    return 0;
}

/* The jobs' source driver on job_next (which it then owns: source_release closes it). */
static int make_source_driver(void)
{
    /* The ops table lives as long as the driver: static. */
    static cowbackup_driver_ops ops = {
        .read = source_read,
        .write = source_write,
        .release = source_release,
    };
    lock_plugin();
    int can_extents = job_next->can_extents(job_next);
    unlock_plugin();
    if (can_extents > 0)
        ops.block_status = source_block_status;

    int r = cowbackup_driver_new(&ops, sizeof ops, job_next, disk_size, 0, &source_driver);
    if (r < 0) {
        source_driver = NULL;
        startup_fail("cowbackup: the source driver: %s", cowbackup_last_error());
        return -1;
    }
    /* From here the driver owns job_next: source_release closes it. */
    job_next = NULL;
    return 0;
}

static int start_job(void)
{
    cowbackup_driver *src = source_driver, *dst = NULL;
    char *target_name = NULL, *extents_tmp = NULL;
    cowbackup_job *j = NULL;
    int r;

    if (init_progress_cond() < 0 || !(extents_tmp = write_extents_tmp()))
        goto fail;
    if (create_target(&dst, &target_name) < 0)
        goto fail;
    if ((r = cowbackup_options_set_completion(opts, job_completed, NULL)) < 0 ||
        (r = cowbackup_options_set_trace(opts, job_trace, NULL)) < 0 ||
        (bitmap && (r = cowbackup_options_set_bitmap(opts, bitmap, bitmap_mode)) < 0)) {
        startup_fail("cowbackup: backup %s failed: options: %s", backup_path,
                     cowbackup_last_error());
        goto fail;
    }

    /* Status first: once the job runs, its completion may replace the line at any time. */
    if (write_status("running", false) < 0 || reserve_status() < 0) {
        startup_fail("cowbackup: backup %s failed: cannot write %s (see the message before)",
                     backup_path, status_path);
        goto fail;
    }
    clock_gettime(CLOCK_MONOTONIC, &job_started);
    r = cowbackup_backup_start(src, dst, opts, &j);
    if (r < 0) {
        j = NULL;
        startup_fail("cowbackup: backup %s failed: %s", backup_path, cowbackup_last_error());
        goto fail;
    }
    /* The job runs: its files take their names (the job's end waits for job_published). */
    if (rename(extents_tmp, extents_path) < 0) {
        startup_fail("cowbackup: backup %s failed: rename %s to %s: %m", backup_path,
                     extents_tmp, extents_path);
        goto fail_started;
    }
    free(extents_tmp);
    extents_tmp = NULL;
    if (backup_overwrite && rename(target_name, backup_path) < 0) {
        startup_fail("cowbackup: backup %s failed: backup-overwrite=true: rename %s over "
                     "it: %m", backup_path, target_name);
        goto fail_started;
    }
    fsync_dir_of(backup_path);
    __atomic_store_n(&job, j, __ATOMIC_RELEASE);
    control_startup_job(j); /* before its end can be reported (job_published) */
    pthread_mutex_lock(&state_lock);
    job_published = true;
    pthread_cond_broadcast(&job_published_cond);
    pthread_mutex_unlock(&state_lock);
    cowbackup_driver_free(dst); /* the job holds its own reference */
    free(target_name);
    if (start_progress() < 0)
        nbdkit_error("cowbackup: cannot start the progress thread (%m): PATH.status says "
                     "\"running\" without a percentage until the end");
    nbdkit_debug("cowbackup: backup of %" PRIu64 " bytes into %s started (sync=%u, speed=%" PRIu64
                 " B/s)", disk_size, backup_path, sync_mode, speed);
    return 0;

fail_started:
    /* The job's end must not write the status: this start failed. */
    pthread_mutex_lock(&state_lock);
    start_failed = true;
    job_published = true;
    pthread_cond_broadcast(&job_published_cond);
    pthread_mutex_unlock(&state_lock);
    cowbackup_job_free(j); /* cancels it and waits */
fail:
    (void)src;
    cowbackup_driver_free(dst);
    if (target_name)
        unlink(target_name); /* ours, created by this run */
    if (extents_tmp)
        unlink(extents_tmp);
    free(target_name);
    free(extents_tmp);
    return -1;
}

static int cowbackup_after_fork(nbdkit_backend *backend)
{
    int r = -1;
    /* The job's own context into the plugin, shared by every connection (see the top). */
    nbdkit_next *next = nbdkit_next_context_open(backend, 1, "", 1);
    if (!next) {
        startup_fail("cowbackup: cannot open a context into the plugin for the backup job");
        goto out;
    }
    lock_plugin();
    int p = next->prepare(next);
    int64_t size = p < 0 ? -1 : next->get_size(next);
    unlock_plugin();
    if (p < 0 || size < 0) {
        startup_fail("cowbackup: cannot prepare the backup job's context into the plugin");
        if (p >= 0)
            next->finalize(next);
        nbdkit_next_context_close(next);
        goto out;
    }
    disk_size = (uint64_t)size;
    job_next = next;

    if (bitmap_path && open_bitmap() < 0)
        goto out;
    /* bitmap only: the context is not needed */
    if ((backup_path || control_configured()) && make_source_driver() < 0)
        goto out;
    /* The control socket before the job's threads: its bind sets the umask. */
    if (control_start(startup_error, sizeof startup_error) < 0) {
        nbdkit_error("%s", startup_error);
        goto out;
    }
    r = backup_path ? start_job() : 0;
    if (r == 0 && control_run(startup_error, sizeof startup_error) < 0) {
        nbdkit_error("%s", startup_error);
        r = -1;
        if (backup_path) { /* the job runs: cancelled (its status says so), freed */
            cowbackup_job *j = __atomic_load_n(&job, __ATOMIC_ACQUIRE);
            stop_progress();
            cowbackup_job_free(j);
            __atomic_store_n(&job, NULL, __ATOMIC_RELEASE);
        }
    }
    if (r < 0) {
        control_stop();
        control_free();
    }
out:
    /* Still ours when no source driver took it (bitmap only, or a failure). */
    if (job_next) {
        job_next->finalize(job_next);
        nbdkit_next_context_close(job_next);
        job_next = NULL;
    }
    if (r < 0 && source_driver) {
        cowbackup_driver_free(source_driver);
        source_driver = NULL;
    }
    if (r < 0 && bitmap) {
        /* nbdkit exits: a bitmap made by this run goes too (the retry makes it again). */
        cowbackup_bitmap_free(bitmap);
        bitmap = NULL;
        if (bitmap_created)
            unlink(bitmap_path);
    }
    if (r < 0 && backup_path) {
        /* Why, beside the backup too (nbdkit's log has it from startup_fail). */
        char line[sizeof startup_error + 16];
        const char *why = startup_error;
        if (strncmp(why, "cowbackup: ", 11) == 0)
            why += 11;
        snprintf(line, sizeof line, "failed: %s", why);
        write_status(line, true);
        drop_reserve();
    }
    send_verdict(r == 0);
    return r;
}

static void cowbackup_cleanup(nbdkit_backend *backend)
{
    (void)backend;
    /* Every connection has closed. A job still running is cancelled: its completion callback
     * writes "failed: cancelled ..." (inside cowbackup_job_free). Then the source driver's
     * last reference goes and source_release closes the context. */
    pthread_mutex_lock(&state_lock);
    stopping = true;
    pthread_mutex_unlock(&state_lock);
    stop_progress();
    control_stop(); /* no command runs any more; its job is cancelled and freed */
    /* `job` stays set during the free: its completion callback and trace events (inside
     * the job, allowed during the free) query it. No connection is left to run the hook. */
    cowbackup_job *j = __atomic_load_n(&job, __ATOMIC_ACQUIRE);
    if (j) {
        cowbackup_job_info info;
        if (cowbackup_job_query(j, &info) == 0 && info.state != COWBACKUP_JOB_COMPLETED &&
            info.state != COWBACKUP_JOB_FAILED && info.state != COWBACKUP_JOB_CANCELLED)
            nbdkit_debug("cowbackup: nbdkit stops: cancelling the backup (%" PRIu64 " of %"
                         PRIu64 " bytes done)", info.offset, info.len);
        cowbackup_job_free(j);
        __atomic_store_n(&job, NULL, __ATOMIC_RELEASE);
    }
    control_free();
    cowbackup_driver_free(source_driver); /* its last reference: closes the context */
    source_driver = NULL;
    drop_reserve();
    if (bitmap) {
        cowbackup_bitmap_free(bitmap); /* every mark that returned is already durable */
        bitmap = NULL;
    }
}

/* ---------------------------------------------------------------------------------------
 * Connections (nbdkit's worker threads).
 */

static void *cowbackup_open(nbdkit_next_open *next, nbdkit_context *nxdata, int readonly,
                            const char *exportname, int is_tls)
{
    (void)is_tls;
    if (exportname[0] != '\0') {
        nbdkit_error("cowbackup: only the default export \"\" is backed up; export \"%s\" "
                     "refused", exportname);
        return NULL;
    }
    if (next(nxdata, readonly, exportname) == -1)
        return NULL;
    return NBDKIT_HANDLE_NOT_NEEDED;
}

/* Before every change to [offset, offset + count): mark the bitmap (durable when it
 * returns), then the copy-before-write hook. On failure the client's request fails with the
 * errno, nothing is written, and the backup stays exact. */
static int before_write(const char *what, uint32_t count, uint64_t offset, int *err)
{
    if (bitmap) {
        int r = cowbackup_bitmap_mark(bitmap, offset, count);
        if (r < 0) {
            nbdkit_error("cowbackup: %s of %" PRIu32 " bytes at %" PRIu64 " refused: "
                         "bitmap mark failed: %s", what, count, offset, cowbackup_last_error());
            *err = -r;
            return -1;
        }
    }
    cowbackup_job *j = __atomic_load_n(&job, __ATOMIC_ACQUIRE);
    if (j) {
        int r = cowbackup_cow_before_write(j, offset, count);
        if (r < 0) {
            nbdkit_error("cowbackup: %s of %" PRIu32 " bytes at %" PRIu64 " refused: "
                         "copy-before-write failed: %s", what, count, offset,
                         cowbackup_last_error());
            *err = -r;
            return -1;
        }
    }
    return control_before_write(what, count, offset, err);
}

static int cowbackup_pread(nbdkit_next *next, void *handle, void *buf, uint32_t count,
                           uint64_t offset, uint32_t flags, int *err)
{
    (void)handle;
    lock_plugin();
    int r = next->pread(next, buf, count, offset, flags, err);
    unlock_plugin();
    return r;
}

static int cowbackup_pwrite(nbdkit_next *next, void *handle, const void *buf, uint32_t count,
                            uint64_t offset, uint32_t flags, int *err)
{
    (void)handle;
    /* The whole write under hook_lock (read): a job starts between writes (filter.h). */
    hook_rdlock();
    int r = before_write("write", count, offset, err);
    if (r == 0) {
        lock_plugin();
        r = next->pwrite(next, buf, count, offset, flags, err);
        unlock_plugin();
    }
    hook_unlock();
    return r;
}

static int cowbackup_zero(nbdkit_next *next, void *handle, uint32_t count, uint64_t offset,
                          uint32_t flags, int *err)
{
    (void)handle;
    /* The whole write under hook_lock (read): a job starts between writes (filter.h). */
    hook_rdlock();
    int r = before_write("zero", count, offset, err);
    if (r == 0) {
        lock_plugin();
        r = next->zero(next, count, offset, flags, err);
        unlock_plugin();
    }
    hook_unlock();
    return r;
}

static int cowbackup_trim(nbdkit_next *next, void *handle, uint32_t count, uint64_t offset,
                          uint32_t flags, int *err)
{
    (void)handle;
    /* The whole write under hook_lock (read): a job starts between writes (filter.h). */
    hook_rdlock();
    int r = before_write("trim", count, offset, err);
    if (r == 0) {
        lock_plugin();
        r = next->trim(next, count, offset, flags, err);
        unlock_plugin();
    }
    hook_unlock();
    return r;
}

static int cowbackup_flush(nbdkit_next *next, void *handle, uint32_t flags, int *err)
{
    (void)handle;
    lock_plugin();
    int r = next->flush(next, flags, err);
    unlock_plugin();
    return r;
}

static int cowbackup_extents(nbdkit_next *next, void *handle, uint32_t count, uint64_t offset,
                             uint32_t flags, struct nbdkit_extents *extents, int *err)
{
    (void)handle;
    lock_plugin();
    int r = next->extents(next, count, offset, flags, extents, err);
    unlock_plugin();
    return r;
}

static int cowbackup_cache(nbdkit_next *next, void *handle, uint32_t count, uint64_t offset,
                           uint32_t flags, int *err)
{
    (void)handle;
    lock_plugin();
    int r = next->cache(next, count, offset, flags, err);
    unlock_plugin();
    return r;
}

static struct nbdkit_filter filter = {
    .name = "cowbackup",
    .longname = "nbdkit cowbackup filter",
    .description = "Point-in-time backup of the served disk with copy-before-write",
    .unload = cowbackup_unload,
    .config = cowbackup_config,
    .config_complete = cowbackup_config_complete,
    .config_help = cowbackup_config_help,
    .get_ready = cowbackup_get_ready,
    .after_fork = cowbackup_after_fork,
    .cleanup = cowbackup_cleanup,
    .open = cowbackup_open,
    .pread = cowbackup_pread,
    .pwrite = cowbackup_pwrite,
    .zero = cowbackup_zero,
    .trim = cowbackup_trim,
    .flush = cowbackup_flush,
    .extents = cowbackup_extents,
    .cache = cowbackup_cache,
};

NBDKIT_REGISTER_FILTER(filter)
