/*
 * nbdkit-cowbackup-filter: a live, point-in-time backup of the disk that nbdkit serves.
 *
 *   nbdkit --filter=cowbackup file disk.img backup=/backup/disk.raw [speed=64M] ...
 *
 * When nbdkit starts (before it accepts the first client) the filter starts a cowbackup job
 * that copies the plugin's disk into a new sparse file `backup=PATH` in the background. Every
 * client pwrite / zero / trim first calls cowbackup_cow_before_write(), which copies the old
 * contents of the clusters it touches into the backup, so the backup ends up holding the disk
 * exactly as it was served at start-up, whatever the clients write meanwhile. The result is
 * written next to the backup, atomically, in `PATH.status`: `running` while the job runs, then
 * one line `completed` or `failed: <reason>`. `bitmap=PATH` keeps a persistent, crash-safe
 * dirty bitmap of every write the daemon serves; `sync=bitmap` makes the job an incremental
 * backup of the clusters that bitmap holds.
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
 * happens in .after_fork. Configuration errors (a backup PATH that exists, bad values) are
 * still reported before that, in .config / .config_complete, so nbdkit fails at once with a
 * clear message. nbdkit may chdir("/") when it forks: paths are made absolute at .config.
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
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <nbdkit-filter.h>

#include "cowbackup.h"

/* Configuration (set on the main thread before .after_fork, read-only afterwards). */
static char *backup_path;        /* backup=, absolute; NULL: no backup (bitmap only) */
static char *status_path;        /* backup_path + ".status" */
static bool backup_overwrite;    /* backup-overwrite=true */
static char *bitmap_path;        /* bitmap=, absolute; NULL: none */
static uint64_t bitmap_granularity = COWBACKUP_BITMAP_DEFAULT_GRANULARITY;
static uint32_t bitmap_mode = COWBACKUP_BITMAP_MODE_ON_SUCCESS;
static uint32_t sync_mode = COWBACKUP_SYNC_FULL;
static uint64_t cluster_size;    /* 0: the library's default */
static uint64_t speed;           /* bytes/s, 0: unlimited */
static uint32_t workers;         /* 0: the library's default */
static uint32_t on_cbw_error = COWBACKUP_CBW_BREAK_GUEST_WRITE;
static uint32_t on_source_error = COWBACKUP_ERROR_REPORT;
static uint32_t on_target_error = COWBACKUP_ERROR_REPORT;

/* Set on the main thread by .get_ready/.after_fork, before any connection or job thread. */
static bool serialize_plugin;    /* thread model below PARALLEL: see plugin_lock */
static nbdkit_next *job_next;    /* the job's shared, read-only context into the plugin */
static uint64_t disk_size;
static cowbackup_job *job;       /* NULL without backup=; freed in .cleanup */
static cowbackup_bitmap *bitmap; /* NULL without bitmap=; freed in .cleanup */

/* Serializes every call into the plugin when serialize_plugin is set. */
static pthread_mutex_t plugin_lock = PTHREAD_MUTEX_INITIALIZER;

/* The job's end and messages, written by job threads, read at .cleanup. */
static pthread_mutex_t state_lock = PTHREAD_MUTEX_INITIALIZER;
static char last_job_error[512];  /* the last background error message (trace), "" if none; state_lock */
static bool stopping;             /* .cleanup cancels the job; state_lock */
static unsigned progress_step;    /* last progress tenth reported; state_lock */
static struct timespec job_started; /* CLOCK_MONOTONIC at start; set before the job runs */
static bool job_published;        /* `job` is set (start_job after backup_start); state_lock */
static pthread_cond_t job_published_cond = PTHREAD_COND_INITIALIZER;

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

static void cowbackup_unload(void)
{
    free(backup_path);
    free(status_path);
    free(bitmap_path);
}

/* ---------------------------------------------------------------------------------------
 * Configuration
 */

static int parse_u64_size(const char *key, const char *value, uint64_t *out)
{
    int64_t r = nbdkit_parse_size(value);
    if (r < 0)
        return -1; /* nbdkit_parse_size reported it */
    (void)key;
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
    nbdkit_error("cowbackup: %s=%s: unknown value", key, value);
    return -1;
}

static int parse_error_action(const char *key, const char *value, uint32_t *out)
{
    static const char *const names[] = { "report", "ignore", "stop", "enospc" };
    static const uint32_t values[] = { COWBACKUP_ERROR_REPORT, COWBACKUP_ERROR_IGNORE,
                                       COWBACKUP_ERROR_STOP, COWBACKUP_ERROR_ENOSPC };
    return parse_choice(key, value, names, values, 4, out);
}

static int cowbackup_config(nbdkit_next_config *next, nbdkit_backend *nxdata,
                            const char *key, const char *value)
{
    if (strcmp(key, "backup") == 0) {
        free(backup_path);
        /* nbdkit may chdir("/") when it daemonizes: keep the path as the user meant it. */
        if ((backup_path = nbdkit_absolute_path(value)) == NULL)
            return -1;
        return 0;
    }
    if (strcmp(key, "backup-overwrite") == 0) {
        int r = nbdkit_parse_bool(value);
        if (r < 0)
            return -1;
        backup_overwrite = r;
        return 0;
    }
    if (strcmp(key, "bitmap") == 0) {
        free(bitmap_path);
        if ((bitmap_path = nbdkit_absolute_path(value)) == NULL)
            return -1;
        return 0;
    }
    if (strcmp(key, "bitmap-granularity") == 0)
        return parse_u64_size(key, value, &bitmap_granularity);
    if (strcmp(key, "bitmap-mode") == 0) {
        static const char *const names[] = { "on-success", "always", "never" };
        static const uint32_t values[] = { COWBACKUP_BITMAP_MODE_ON_SUCCESS,
                                           COWBACKUP_BITMAP_MODE_ALWAYS,
                                           COWBACKUP_BITMAP_MODE_NEVER };
        return parse_choice(key, value, names, values, 3, &bitmap_mode);
    }
    if (strcmp(key, "sync") == 0) {
        static const char *const names[] = { "full", "top", "bitmap" };
        static const uint32_t values[] = { COWBACKUP_SYNC_FULL, COWBACKUP_SYNC_TOP,
                                           COWBACKUP_SYNC_BITMAP };
        return parse_choice(key, value, names, values, 3, &sync_mode);
    }
    if (strcmp(key, "cluster-size") == 0)
        return parse_u64_size(key, value, &cluster_size);
    if (strcmp(key, "speed") == 0)
        return parse_u64_size(key, value, &speed);
    if (strcmp(key, "workers") == 0)
        return nbdkit_parse_uint32_t("workers", value, &workers);
    if (strcmp(key, "on-cbw-error") == 0) {
        static const char *const names[] = { "break-guest-write", "break-snapshot" };
        static const uint32_t values[] = { COWBACKUP_CBW_BREAK_GUEST_WRITE,
                                           COWBACKUP_CBW_BREAK_SNAPSHOT };
        return parse_choice(key, value, names, values, 2, &on_cbw_error);
    }
    if (strcmp(key, "on-source-error") == 0)
        return parse_error_action(key, value, &on_source_error);
    if (strcmp(key, "on-target-error") == 0)
        return parse_error_action(key, value, &on_target_error);
    return next(nxdata, key, value);
}

static int cowbackup_config_complete(nbdkit_next_config_complete *next, nbdkit_backend *nxdata)
{
    struct stat st;

    if (!backup_path && !bitmap_path) {
        nbdkit_error("cowbackup: backup=PATH (a new file for the backup) or bitmap=PATH "
                     "(change tracking) is required");
        return -1;
    }
    if (backup_path) {
        /* The job creates PATH with O_EXCL (cowbackup_file_create) in .after_fork; checking
         * here too makes nbdkit fail at start-up, before it daemonizes, with this message. */
        if (lstat(backup_path, &st) == 0 && !backup_overwrite) {
            nbdkit_error("cowbackup: backup=%s already exists: refusing to overwrite it "
                         "(remove it, choose another path, or add backup-overwrite=true)",
                         backup_path);
            return -1;
        }
        if (lstat(backup_path, &st) == 0 && !S_ISREG(st.st_mode)) {
            nbdkit_error("cowbackup: backup=%s exists and is not a regular file", backup_path);
            return -1;
        }
        if (asprintf(&status_path, "%s.status", backup_path) < 0) {
            nbdkit_error("cowbackup: asprintf: %m");
            return -1;
        }
    } else if (sync_mode != COWBACKUP_SYNC_FULL || speed || cluster_size || workers) {
        nbdkit_error("cowbackup: sync=, speed=, cluster-size= and workers= need backup=PATH");
        return -1;
    }
    if (sync_mode == COWBACKUP_SYNC_BITMAP) {
        if (!bitmap_path) {
            nbdkit_error("cowbackup: sync=bitmap needs bitmap=PATH (the bitmap kept by an "
                         "earlier run)");
            return -1;
        }
        if (stat(bitmap_path, &st) < 0) {
            nbdkit_error("cowbackup: sync=bitmap: bitmap=%s: %m (an incremental backup needs "
                         "the bitmap of an earlier run; start with sync=full)", bitmap_path);
            return -1;
        }
    }
    if (bitmap_mode == COWBACKUP_BITMAP_MODE_NEVER && sync_mode != COWBACKUP_SYNC_BITMAP) {
        nbdkit_error("cowbackup: bitmap-mode=never needs sync=bitmap");
        return -1;
    }
    return next(nxdata);
}

#define cowbackup_config_help \
    "backup=PATH              New file to back the disk up into (point in time: start-up).\n" \
    "backup-overwrite=BOOL    Replace an existing regular file at PATH (default false).\n" \
    "sync=full|top|bitmap     What to copy (default full; bitmap: incremental from bitmap=).\n" \
    "bitmap=PATH              Persistent dirty bitmap of all writes (created if missing).\n" \
    "bitmap-granularity=SIZE  Granule of a new bitmap (default 64K).\n" \
    "bitmap-mode=on-success|always|never  What the job does with the bitmap at its end.\n" \
    "cluster-size=SIZE        Copy unit (power of 2, 4K..64M; default 64K).\n" \
    "speed=SIZE               Background copy limit in bytes/s (default 0: unlimited).\n" \
    "workers=N                Background copy threads.\n" \
    "on-cbw-error=break-guest-write|break-snapshot  A failed copy-before-write fails the\n" \
    "                         client's write (default) or the backup.\n" \
    "on-source-error=, on-target-error=report|ignore|stop|enospc  Background copy errors."

static int cowbackup_get_ready(int thread_model)
{
    serialize_plugin = thread_model != NBDKIT_THREAD_MODEL_PARALLEL;
    if (serialize_plugin)
        nbdkit_debug("cowbackup: thread model %d: calls into the plugin are serialized",
                     thread_model);
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * PATH.status: one line, replaced atomically: written into PATH.status.tmp, fsync'ed,
 * renamed over PATH.status, and the directory fsync'ed; a reader sees the old line or the
 * new one, never a torn one. The backup often fills its filesystem (a failure we must still
 * report): so right after writing "running", reserve_status() allocates the next
 * PATH.status.tmp (fallocate), and the final line is written into that reserved space.
 */

static int fsync_dir_of(const char *path)
{
    char dir[PATH_MAX];
    const char *slash = strrchr(path, '/');
    if (!slash)
        return 0; /* absolute paths only (nbdkit_absolute_path) */
    size_t n = slash == path ? 1 : (size_t)(slash - path);
    if (n >= sizeof dir)
        return 0;
    memcpy(dir, path, n);
    dir[n] = '\0';
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0)
        return -1;
    int r = fsync(dfd);
    close(dfd);
    return r;
}

/* The name of the temporary file (malloc'ed), NULL with nbdkit_error on failure. */
static char *status_tmp_path(void)
{
    char *tmp;
    if (asprintf(&tmp, "%s.tmp", status_path) < 0) {
        nbdkit_error("cowbackup: asprintf: %m");
        return NULL;
    }
    return tmp;
}

static int write_status(const char *line)
{
    char *tmp;
    int fd = -1, ret = -1;

    if (!status_path)
        return 0;
    if (!(tmp = status_tmp_path()))
        return -1;
    /* Reuse the reserved file's blocks when it is there (no O_TRUNC: its space stays
     * allocated until the line is in), else create it. */
    fd = open(tmp, O_WRONLY | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        goto out;
    size_t len = strlen(line);
    char buf[1100];
    if (len > sizeof buf - 2)
        len = sizeof buf - 2;
    memcpy(buf, line, len);
    buf[len++] = '\n';
    if (pwrite(fd, buf, len, 0) != (ssize_t)len || ftruncate(fd, (off_t)len) < 0 ||
        fsync(fd) < 0)
        goto out;
    if (close(fd) < 0) {
        fd = -1;
        goto out;
    }
    fd = -1;
    if (rename(tmp, status_path) < 0)
        goto out;
    fsync_dir_of(status_path);
    ret = 0;
out:
    if (ret < 0) {
        nbdkit_error("cowbackup: cannot write \"%s\" into %s: %m", line, status_path);
        unlink(tmp);
    }
    if (fd >= 0)
        close(fd);
    free(tmp);
    return ret;
}

/* Allocate PATH.status.tmp for the final line while the filesystem has room. */
static int reserve_status(void)
{
    char *tmp;
    if (!status_path || !(tmp = status_tmp_path()))
        return status_path ? -1 : 0;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    int r = fd < 0 ? -1 : posix_fallocate(fd, 0, 4096);
    if (fd >= 0 && r == 0)
        r = fsync(fd);
    if (r != 0) {
        if (r > 0)
            errno = r;
        nbdkit_error("cowbackup: cannot reserve space for %s: %m", tmp);
        if (fd >= 0)
            unlink(tmp);
    }
    if (fd >= 0)
        close(fd);
    free(tmp);
    return r == 0 ? 0 : -1;
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
        break;
    case COWBACKUP_TRACE_STATE:
        nbdkit_debug("cowbackup: %s", ev->message);
        break;
    case COWBACKUP_TRACE_CHUNK:
    case COWBACKUP_TRACE_ZERO: {
        /* Progress in tenths. `job` is set once cowbackup_backup_start has returned on the
         * main thread; events before that (zero runs found at start) are not counted. */
        cowbackup_job *j = __atomic_load_n(&job, __ATOMIC_ACQUIRE);
        cowbackup_job_info info;
        if (!j || cowbackup_job_query(j, &info) < 0 || info.len == 0)
            return;
        unsigned step = (unsigned)(info.offset * 10 / info.len);
        pthread_mutex_lock(&state_lock);
        bool report = step > progress_step;
        if (report)
            progress_step = step;
        pthread_mutex_unlock(&state_lock);
        if (report)
            nbdkit_debug("cowbackup: progress %u%%: %" PRIu64 " of %" PRIu64 " bytes done "
                         "(%" PRIu64 " copied, %" PRIu64 " zero, %" PRIu64 " skipped), "
                         "%" PRIu64 " copy-before-write requests",
                         step * 10, info.offset, info.len, info.bytes_copied, info.bytes_zero,
                         info.bytes_skipped, info.cow_requests);
        break;
    }
    default:
        break;
    }
}

/* The completion callback: on the job thread, once, after the final state is set (or inside
 * cowbackup_job_free in .cleanup, with -ECANCELED, when nbdkit stops first). */
static void job_completed(void *opaque, int ret)
{
    (void)opaque;
    /* A job that ends at once (an empty bitmap) may get here before start_job has stored
     * its handle: wait for it (start_job never waits for the job, so this cannot block). */
    pthread_mutex_lock(&state_lock);
    while (!job_published)
        pthread_cond_wait(&job_published_cond, &state_lock);
    pthread_mutex_unlock(&state_lock);
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
    write_status(line);
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
        r = cowbackup_bitmap_create(bitmap_path, disk_size, bitmap_granularity, &bitmap);
        if (r == 0)
            nbdkit_debug("cowbackup: created bitmap %s (granularity %" PRIu64 ")", bitmap_path,
                         bitmap_granularity);
    }
    if (r < 0) {
        nbdkit_error("cowbackup: bitmap=%s: %s", bitmap_path, cowbackup_last_error());
        return -1;
    }
    cowbackup_bitmap_info bi;
    if (cowbackup_bitmap_query(bitmap, &bi) < 0 || bi.size != disk_size) {
        nbdkit_error("cowbackup: bitmap=%s covers %" PRIu64 " bytes, the disk has %" PRIu64
                     ": it belongs to another disk", bitmap_path, bi.size, disk_size);
        cowbackup_bitmap_free(bitmap);
        bitmap = NULL;
        return -1;
    }
    nbdkit_debug("cowbackup: bitmap %s: %" PRIu64 " dirty bytes, generation %" PRIu64,
                 bitmap_path, bi.count, bi.generation);
    return 0;
}

static int start_job(void)
{
    cowbackup_driver *src = NULL, *dst = NULL;
    cowbackup_options *o = NULL;
    int r;
    const char *what = "cowbackup_driver_new (source)";

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

    r = cowbackup_driver_new(&ops, sizeof ops, job_next, disk_size, 0, &src);
    if (r < 0)
        goto fail;
    /* From here the driver owns job_next: source_release closes it. */
    job_next = NULL;

    what = "backup=";
    r = cowbackup_file_create(backup_path, disk_size,
                              backup_overwrite ? COWBACKUP_CREATE_OVERWRITE : 0, &dst);
    if (r < 0)
        goto fail;

    what = "options";
    r = -ENOMEM;
    if (!(o = cowbackup_options_new()))
        goto fail;
    if ((r = cowbackup_options_set_sync(o, sync_mode)) < 0 ||
        (cluster_size && (r = cowbackup_options_set_cluster_size(o, cluster_size)) < 0) ||
        (r = cowbackup_options_set_speed(o, speed)) < 0 ||
        (workers && (r = cowbackup_options_set_workers(o, workers)) < 0) ||
        (r = cowbackup_options_set_on_cbw_error(o, on_cbw_error)) < 0 ||
        (r = cowbackup_options_set_on_source_error(o, on_source_error)) < 0 ||
        (r = cowbackup_options_set_on_target_error(o, on_target_error)) < 0 ||
        (r = cowbackup_options_set_completion(o, job_completed, NULL)) < 0 ||
        (r = cowbackup_options_set_trace(o, job_trace, NULL)) < 0 ||
        (bitmap && (r = cowbackup_options_set_bitmap(o, bitmap, bitmap_mode)) < 0))
        goto fail;

    /* Status first: once the job runs, its completion may replace the line at any time. */
    if (write_status("running") < 0 || reserve_status() < 0) {
        r = -EIO;
        what = "status file";
        goto fail;
    }
    what = "cowbackup_backup_start";
    cowbackup_job *j = NULL;
    clock_gettime(CLOCK_MONOTONIC, &job_started);
    r = cowbackup_backup_start(src, dst, o, &j);
    if (r < 0)
        goto fail;
    __atomic_store_n(&job, j, __ATOMIC_RELEASE);
    pthread_mutex_lock(&state_lock);
    job_published = true;
    pthread_cond_broadcast(&job_published_cond);
    pthread_mutex_unlock(&state_lock);
    cowbackup_options_free(o);
    cowbackup_driver_free(src); /* the job holds its own references */
    cowbackup_driver_free(dst);
    nbdkit_debug("cowbackup: backup of %" PRIu64 " bytes into %s started (sync=%u, speed=%" PRIu64
                 " B/s)", disk_size, backup_path, sync_mode, speed);
    return 0;

fail:;
    char line[1024];
    snprintf(line, sizeof line, "failed: %s: %s", what,
             r == -ENOMEM && !o ? strerror(ENOMEM) : cowbackup_last_error());
    nbdkit_error("cowbackup: backup %s %s", backup_path, line);
    write_status(line);
    cowbackup_options_free(o);
    cowbackup_driver_free(src);
    cowbackup_driver_free(dst);
    return -1;
}

static int cowbackup_after_fork(nbdkit_backend *backend)
{
    /* The job's own context into the plugin, shared by every connection (see the top). */
    nbdkit_next *next = nbdkit_next_context_open(backend, 1, "", 1);
    if (!next) {
        nbdkit_error("cowbackup: cannot open a context into the plugin for the backup job");
        return -1;
    }
    lock_plugin();
    int r = next->prepare(next);
    int64_t size = r < 0 ? -1 : next->get_size(next);
    unlock_plugin();
    if (r < 0 || size < 0) {
        nbdkit_error("cowbackup: cannot prepare the backup job's context into the plugin");
        if (r >= 0)
            next->finalize(next);
        nbdkit_next_context_close(next);
        return -1;
    }
    disk_size = (uint64_t)size;
    job_next = next;

    if (bitmap_path && open_bitmap() < 0)
        goto out;
    if (backup_path)
        r = start_job();
    else
        r = 0; /* bitmap only: the context is not needed */
out:
    /* Still ours when no source driver took it (bitmap only, or a failure). */
    if (job_next) {
        job_next->finalize(job_next);
        nbdkit_next_context_close(job_next);
        job_next = NULL;
    }
    return bitmap_path && !bitmap ? -1 : r;
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
    return 0;
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
    if (before_write("write", count, offset, err) < 0)
        return -1;
    lock_plugin();
    int r = next->pwrite(next, buf, count, offset, flags, err);
    unlock_plugin();
    return r;
}

static int cowbackup_zero(nbdkit_next *next, void *handle, uint32_t count, uint64_t offset,
                          uint32_t flags, int *err)
{
    (void)handle;
    if (before_write("zero", count, offset, err) < 0)
        return -1;
    lock_plugin();
    int r = next->zero(next, count, offset, flags, err);
    unlock_plugin();
    return r;
}

static int cowbackup_trim(nbdkit_next *next, void *handle, uint32_t count, uint64_t offset,
                          uint32_t flags, int *err)
{
    (void)handle;
    if (before_write("trim", count, offset, err) < 0)
        return -1;
    lock_plugin();
    int r = next->trim(next, count, offset, flags, err);
    unlock_plugin();
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
