/*
 * The README's C example as a complete program: a disk whose write path calls the
 * copy-before-write hook, a backup started while a thread keeps writing, and a check that
 * the backup is the disk as it was when the backup started.
 *
 * The part between the "README" markers is the README's snippet, verbatim (scripts/test-c.sh
 * checks that they agree, and builds this file with the README's pkg-config commands).
 *
 * Build against a meson build dir:
 *   export PKG_CONFIG_PATH=$PWD/build/meson-uninstalled
 *   cc -pthread quickstart.c $(pkg-config --cflags --libs cowbackup) -o quickstart
 *   LD_LIBRARY_PATH=$PWD/build ./quickstart [DIR]
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* README begin */
#include <cowbackup.h>
#include <errno.h>
#include <pthread.h>

struct disk {
    cowbackup_driver *drv;   /* e.g. cowbackup_file_open("disk.img", COWBACKUP_OPEN_WRITE, &drv) */
    pthread_rwlock_t lock;   /* writes hold it shared; starting or ending a backup, exclusive */
    cowbackup_job *backup;   /* NULL when no backup runs; changed only under the exclusive lock */
};

/* The write path, on any thread: the hook first, then the write. */
int disk_write(struct disk *d, uint64_t off, const void *buf, size_t len)
{
    int ret = 0;
    pthread_rwlock_rdlock(&d->lock);
    if (d->backup)
        ret = cowbackup_cow_before_write(d->backup, off, len); /* < 0: fail the write, the backup stays valid */
    if (ret == 0)
        ret = cowbackup_driver_write(d->drv, off, buf, len);
    pthread_rwlock_unlock(&d->lock);
    return ret;
}

/* Start a backup into a new file: its point in time is now; writes go on meanwhile. */
int disk_backup_start(struct disk *d, const char *path)
{
    cowbackup_driver *target = NULL;
    uint64_t size = 0;
    int ret = cowbackup_driver_size(d->drv, &size);
    if (ret == 0)
        ret = cowbackup_file_create(path, size, 0, &target); /* -EEXIST: never overwrites a file */
    pthread_rwlock_wrlock(&d->lock);                          /* no write in flight at the start */
    if (ret == 0)
        ret = d->backup ? -EBUSY : cowbackup_backup_start(d->drv, target, NULL, &d->backup);
    pthread_rwlock_unlock(&d->lock);
    cowbackup_driver_free(target); /* NULL is fine; the job holds its own reference */
    return ret;                    /* a negative errno: cowbackup_last_error() says why */
}

/* Wait for the end (from the thread that started it): 0 when the file is the disk as it was. */
int disk_backup_finish(struct disk *d)
{
    int ret = cowbackup_job_wait(d->backup); /* writes go on meanwhile */
    pthread_rwlock_wrlock(&d->lock);
    cowbackup_job *job = d->backup;
    d->backup = NULL;
    pthread_rwlock_unlock(&d->lock);
    cowbackup_job_free(job);
    return ret;
}
/* README end */

#define SIZE (16u << 20)
#define CHUNK 4096u
#define MAX_WRITES (1u << 16)

/* The guest's writes, in order: where, what, and a logical clock before and after each. */
static struct logged { uint64_t off, begin, end; uint8_t fill; } wlog[MAX_WRITES];
static atomic_uint nwrites;
static atomic_ulong clock_;
static atomic_int stop_writing;

/* A guest: random 4 KiB writes through disk_write until told to stop (or the log is full). */
static void *writer(void *arg)
{
    struct disk *d = arg;
    uint8_t buf[CHUNK];
    uint64_t seed = 42;
    for (unsigned i = 0; i < MAX_WRITES && !atomic_load(&stop_writing); i++) {
        seed = seed * 6364136223846793005u + 1442695040888963407u;
        struct logged w = { .off = (seed >> 20) % (SIZE / CHUNK) * CHUNK, .fill = (uint8_t)(seed >> 56) | 1 };
        memset(buf, w.fill, sizeof buf);
        w.begin = atomic_fetch_add(&clock_, 1);
        int ret = disk_write(d, w.off, buf, sizeof buf);
        w.end = atomic_fetch_add(&clock_, 1);
        if (ret < 0) {
            fprintf(stderr, "quickstart: write failed: %s\n", cowbackup_last_error());
            return (void *)1;
        }
        wlog[i] = w;
        atomic_store(&nwrites, i + 1);
    }
    return NULL;
}

static int fail(const char *what, int ret)
{
    fprintf(stderr, "quickstart: %s: %s (%s)\n", what, strerror(-ret), cowbackup_last_error());
    return 1;
}

int main(int argc, char **argv)
{
    char tmp[] = "/tmp/cowbackup-quickstart-XXXXXX";
    const char *dir = argc > 1 ? argv[1] : mkdtemp(tmp);
    if (!dir)
        return perror("mkdtemp"), 1;
    char disk_path[512], backup_path[512];
    snprintf(disk_path, sizeof disk_path, "%s/disk.img", dir);
    snprintf(backup_path, sizeof backup_path, "%s/backup.img", dir);
    printf("quickstart: libcowbackup %s, files in %s\n", cowbackup_version(), dir);

    /* The disk, with known contents: every MiB filled with its index (even bytes). */
    struct disk d = { .backup = NULL };
    pthread_rwlock_init(&d.lock, NULL);
    int ret = cowbackup_file_create(disk_path, SIZE, 0, &d.drv);
    if (ret < 0)
        return fail("cowbackup_file_create", ret);
    uint8_t *state = malloc(SIZE), *got = malloc(SIZE);
    if (!state || !got)
        return 1;
    for (uint32_t i = 0; i < SIZE; i++)
        state[i] = (uint8_t)((i >> 20) * 2);
    if ((ret = disk_write(&d, 0, state, SIZE)) < 0)
        return fail("disk_write", ret);

    /* A guest keeps writing before, while and after the backup starts. */
    pthread_t guest;
    if (pthread_create(&guest, NULL, writer, &d) != 0)
        return 1;
    usleep(20 * 1000);
    unsigned long c0 = atomic_fetch_add(&clock_, 1);
    ret = disk_backup_start(&d, backup_path);
    unsigned long c1 = atomic_fetch_add(&clock_, 1);
    if (ret == 0) {
        usleep(50 * 1000);
        ret = disk_backup_finish(&d);
    }
    atomic_store(&stop_writing, 1);
    void *werr = NULL;
    pthread_join(guest, &werr);
    if (ret < 0)
        return fail("backup", ret);
    if (werr)
        return 1;

    /* The backup holds exactly the writes done before the start: a prefix of the guest's
     * writes, at least those that ended before disk_backup_start was called and at most those
     * begun before it returned (one write can straddle the call). */
    cowbackup_driver *b = NULL;
    if ((ret = cowbackup_file_open(backup_path, 0, &b)) < 0)
        return fail("cowbackup_file_open", ret);
    if ((ret = cowbackup_driver_read(b, 0, got, SIZE)) < 0)
        return fail("cowbackup_driver_read", ret);
    cowbackup_driver_free(b);
    unsigned n = atomic_load(&nwrites), lo = 0, hi = 0;
    while (lo < n && wlog[lo].end < c0)
        lo++;
    while (hi < n && wlog[hi].begin < c1)
        hi++;
    int ok = 0;
    for (unsigned k = 0; k <= hi && !ok; k++) {
        if (k > 0)
            memset(state + wlog[k - 1].off, wlog[k - 1].fill, CHUNK);
        ok = k >= lo && memcmp(state, got, SIZE) == 0;
    }
    printf("quickstart: %u writes, %u before the backup started (%u undecided): the backup %s\n", n, lo, hi - lo,
           ok ? "is the disk as it was at the start" : "DIFFERS from the disk at the start");

    cowbackup_driver_free(d.drv);
    pthread_rwlock_destroy(&d.lock);
    unlink(disk_path);
    unlink(backup_path);
    if (argc <= 1)
        rmdir(dir);
    free(state);
    free(got);
    return ok && n > hi ? 0 : 1;
}
