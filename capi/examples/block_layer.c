/*
 * A small C "block layer" that takes a point-in-time backup of its disk image while writing
 * to it: the pattern for hooking cowbackup into an existing storage stack.
 *
 *   - the block layer owns an image file (its own fd, pread/pwrite);
 *   - it exposes the image to cowbackup as a C driver (cowbackup_driver_ops);
 *   - its write function calls cowbackup_cow_before_write() before every write, and fails
 *     the write when the hook fails (the result is a negative errno, like the block layer's);
 *   - a backup into a new sparse image file runs while the guest keeps writing;
 *   - at the end, the backup is compared with the image as it was at the start.
 *
 * Build: cc -std=c11 block_layer.c $(pkg-config --cflags --libs cowbackup) -lpthread
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cowbackup.h"

#define IMAGE_SIZE (8u << 20)

/* The block layer's device state. */
struct blk {
    int fd;
    uint64_t size;
    cowbackup_job *backup; /* NULL when no backup runs */
};

static int blk_pread(struct blk *b, uint64_t off, void *buf, size_t len)
{
    ssize_t n = pread(b->fd, buf, len, (off_t)off);
    return n == (ssize_t)len ? 0 : n < 0 ? -errno : -EIO;
}

static int blk_pwrite_raw(struct blk *b, uint64_t off, const void *buf, size_t len)
{
    ssize_t n = pwrite(b->fd, buf, len, (off_t)off);
    return n == (ssize_t)len ? 0 : n < 0 ? -errno : -EIO;
}

/* The guest write path: copy-before-write hook first, then the write. */
static int blk_pwrite(struct blk *b, uint64_t off, const void *buf, size_t len)
{
    if (b->backup) {
        int ret = cowbackup_cow_before_write(b->backup, off, len);
        if (ret < 0)
            return ret; /* fail the guest write; the snapshot stays valid */
    }
    return blk_pwrite_raw(b, off, buf, len);
}

/* cowbackup_driver_ops over the block layer's device (called from library threads too:
 * pread/pwrite on one fd are thread-safe). */
static int op_read(void *opaque, uint64_t offset, void *buf, size_t len)
{
    return blk_pread(opaque, offset, buf, len);
}

static int op_write(void *opaque, uint64_t offset, const void *buf, size_t len)
{
    /* cowbackup never writes its source; a raw write, not through the hook */
    return blk_pwrite_raw(opaque, offset, buf, len);
}

static int op_flush(void *opaque)
{
    struct blk *b = opaque;
    return fdatasync(b->fd) < 0 ? -errno : 0;
}

static void on_complete(void *opaque, int ret)
{
    (void)opaque;
    printf("block_layer: backup finished (library thread): %d %s\n", ret, ret ? strerror(-ret) : "ok");
}

static int fail(const char *what, int ret)
{
    fprintf(stderr, "block_layer: %s failed: %s (%s)\n", what, strerror(-ret), cowbackup_last_error());
    return 1;
}

int main(void)
{
    char dir[] = "/tmp/cowbackup-example-XXXXXX";
    if (!mkdtemp(dir))
        return perror("mkdtemp"), 1;
    char image[256], backup[256];
    snprintf(image, sizeof image, "%s/disk.raw", dir);
    snprintf(backup, sizeof backup, "%s/backup.raw", dir);

    /* The block layer's disk: an image file with some content. */
    struct blk b = { .fd = open(image, O_RDWR | O_CREAT | O_TRUNC, 0600), .size = IMAGE_SIZE };
    if (b.fd < 0 || ftruncate(b.fd, IMAGE_SIZE) < 0)
        return perror(image), 1;
    uint8_t *data = malloc(IMAGE_SIZE), *check = malloc(IMAGE_SIZE);
    if (!data || !check)
        return 1;
    for (uint32_t i = 0; i < IMAGE_SIZE; i++)
        data[i] = (uint8_t)(i * 7 + i / 4096);
    memset(data + (2u << 20), 0, 1u << 20); /* a zero MiB: written as zeroes, sparse */
    if (blk_pwrite(&b, 0, data, IMAGE_SIZE) < 0)
        return 1;

    /* Expose it to cowbackup and create the backup target. */
    static const cowbackup_driver_ops ops = { .read = op_read, .write = op_write, .flush = op_flush };
    cowbackup_driver *src = NULL, *dst = NULL;
    int ret = cowbackup_driver_new(&ops, sizeof ops, &b, b.size, 0, &src);
    if (ret < 0)
        return fail("cowbackup_driver_new", ret);
    ret = cowbackup_file_create(backup, b.size, 0, &dst);
    if (ret < 0)
        return fail("cowbackup_file_create", ret);

    /* Start the backup: the point in time is now. */
    cowbackup_options *opts = cowbackup_options_new();
    cowbackup_options_set_speed(opts, 16u << 20); /* leave bandwidth to the guest */
    cowbackup_options_set_completion(opts, on_complete, NULL);
    ret = cowbackup_backup_start(src, dst, opts, &b.backup);
    cowbackup_options_free(opts);
    if (ret < 0)
        return fail("cowbackup_backup_start", ret);

    /* The guest keeps writing meanwhile. */
    uint8_t buf[3000];
    for (int i = 0; i < 500; i++) {
        memset(buf, 0xa0 + i % 16, sizeof buf);
        uint64_t off = ((uint64_t)i * 2654435761u) % (IMAGE_SIZE - sizeof buf);
        if ((ret = blk_pwrite(&b, off, buf, sizeof buf)) < 0)
            return fail("guest write", ret);
    }

    cowbackup_job_set_speed(b.backup, 0);
    ret = cowbackup_job_wait(b.backup);
    if (ret < 0)
        return fail("backup", ret);
    cowbackup_job_info info;
    cowbackup_job_query(b.backup, &info);
    printf("block_layer: %llu bytes: %llu copied, %llu zero; %llu copy-before-write requests (%llu bytes)\n",
           (unsigned long long)info.len, (unsigned long long)info.bytes_copied,
           (unsigned long long)info.bytes_zero, (unsigned long long)info.cow_requests,
           (unsigned long long)info.cow_bytes);
    cowbackup_job_free(b.backup);
    b.backup = NULL;

    /* Verify: the backup is the disk as it was at the start, not as it is now. */
    ret = cowbackup_driver_read(dst, 0, check, IMAGE_SIZE);
    if (ret < 0)
        return fail("cowbackup_driver_read", ret);
    int ok = memcmp(check, data, IMAGE_SIZE) == 0;
    blk_pread(&b, 0, check, IMAGE_SIZE);
    int changed = memcmp(check, data, IMAGE_SIZE) != 0;
    printf("block_layer: backup %s the point-in-time image; the disk %s since\n",
           ok ? "equals" : "DIFFERS FROM", changed ? "changed" : "DID NOT CHANGE");

    cowbackup_driver_free(src);
    cowbackup_driver_free(dst);
    close(b.fd);
    unlink(image);
    unlink(backup);
    rmdir(dir);
    free(data);
    free(check);
    return ok && changed ? 0 : 1;
}
