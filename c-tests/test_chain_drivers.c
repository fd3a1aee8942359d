/* cowbackup_chain_open_drivers: a backup chain whose targets the caller gives (for RBD
 * images, NBD exports, devices; here files moved away from their manifests and a memory
 * copy, so the test needs no Ceph). A full backup and two incrementals of a file with
 * writes between them; the images are moved so cowbackup_chain_open no longer finds them;
 * each prefix opened with the targets given reads, and restores by a job, as its point in
 * time; the caller's target handles are freed at once (the chain keeps its references);
 * COWBACKUP_CHAIN_VERIFY on a damaged memory copy; bad input: NULL arrays, elements and
 * out, n = 0, unknown flags, a target of another size, a wrong order (-EINVAL naming the
 * function or the link; *out never written on error). */
#include "common.h"

#include <sys/stat.h>
#include <unistd.h>

const char *test_name = "chain_drivers";

#define KiB 1024
#define MiB (1024 * 1024)
#define CS (64 * KiB)
#define SIZE (2 * MiB)

static char dir[] = "/tmp/cowbackup-chain-drivers-XXXXXX";
static char manifests[3][256];
static char images[3][320];

static void path_in_dir(char *out, size_t n, const char *name)
{
    snprintf(out, n, "%s/%s", dir, name);
}

/* One backup of src to bI.img with manifest bI.manifest. */
static void backup(cowbackup_driver *src, cowbackup_bitmap *bm, int i, uint32_t sync)
{
    char name[32];
    snprintf(name, sizeof name, "b%d.img", i);
    path_in_dir(images[i], sizeof images[i], name);
    snprintf(name, sizeof name, "b%d.manifest", i);
    path_in_dir(manifests[i], sizeof manifests[i], name);
    cowbackup_driver *t = NULL;
    REQUIRE(cowbackup_file_create(images[i], SIZE, 0, &t) == 0);
    cowbackup_options *o = cowbackup_options_new();
    REQUIRE(o != NULL);
    CHECK_RC(cowbackup_options_set_sync(o, sync), 0);
    CHECK_RC(cowbackup_options_set_bitmap(o, bm, COWBACKUP_BITMAP_MODE_ON_SUCCESS), 0);
    CHECK_RC(cowbackup_options_set_manifest(o, manifests[i]), 0);
    CHECK_RC(cowbackup_options_set_disk_id(o, "c-drivers"), 0);
    cowbackup_job *job = NULL;
    REQUIRE(cowbackup_backup_start(src, t, o, &job) == 0);
    CHECK_RC(cowbackup_job_wait(job), 0);
    cowbackup_job_free(job);
    cowbackup_options_free(o);
    cowbackup_driver_free(t);
}

/* The three moved images, opened read-only. */
static void open_targets(cowbackup_driver *t[3])
{
    for (int i = 0; i < 3; i++) {
        t[i] = NULL;
        REQUIRE(cowbackup_file_open(images[i], 0, &t[i]) == 0);
    }
}

static void free_targets(cowbackup_driver *t[3])
{
    for (int i = 0; i < 3; i++)
        cowbackup_driver_free(t[i]);
}

int main(void)
{
    REQUIRE(mkdtemp(dir) != NULL);
    char srcp[256];
    path_in_dir(srcp, sizeof srcp, "src.img");
    cowbackup_driver *src = NULL;
    REQUIRE(cowbackup_file_create(srcp, SIZE, 0, &src) == 0);
    uint64_t seed = 11;
    uint8_t *buf = malloc(SIZE);
    REQUIRE(buf != NULL);
    fill_random(buf, SIZE, &seed);
    memset(buf + SIZE / 2, 0, SIZE / 4);
    REQUIRE(cowbackup_driver_write(src, 0, buf, SIZE) == 0);
    cowbackup_bitmap *bm = NULL;
    REQUIRE(cowbackup_bitmap_new(SIZE, CS, &bm) == 0);
    uint8_t *pit[3];
    for (int i = 0; i < 3; i++) {
        pit[i] = read_all(src, SIZE);
        backup(src, bm, i, i == 0 ? COWBACKUP_SYNC_FULL : COWBACKUP_SYNC_BITMAP);
        for (int w = 0; w < 8; w++) {
            uint64_t off = (next_random(&seed) % (SIZE / 4096 - 4)) * 4096;
            fill_random(buf, 8192, &seed);
            if (w % 3 == 0)
                memset(buf, 0, 8192);
            REQUIRE(cowbackup_driver_write(src, off, buf, 8192) == 0);
            REQUIRE(cowbackup_bitmap_mark(bm, off, 8192) == 0);
        }
    }
    /* Move the images away: the manifests' target no longer finds them. */
    char moved[256];
    path_in_dir(moved, sizeof moved, "moved");
    REQUIRE(mkdir(moved, 0700) == 0);
    for (int i = 0; i < 3; i++) {
        char to[300];
        snprintf(to, sizeof to, "%s/b%d.img", moved, i);
        REQUIRE(rename(images[i], to) == 0);
        snprintf(images[i], sizeof images[i], "%s", to);
    }
    const char *list[3] = {manifests[0], manifests[1], manifests[2]};
    cowbackup_driver *chain = NULL;
    CHECK_ERR(cowbackup_chain_open(list, 3, 0, &chain), ENOENT, "link 0");
    CHECK(chain == NULL);

    /* Each prefix with the targets given reads, and restores, as its point in time. The
     * caller frees its target handles right after the call: the chain holds its own. */
    for (int n = 1; n <= 3; n++) {
        cowbackup_driver *t[3];
        open_targets(t);
        chain = NULL;
        CHECK_RC(cowbackup_chain_open_drivers(list, t, n, COWBACKUP_CHAIN_VERIFY, &chain), 0);
        free_targets(t);
        if (!chain)
            continue;
        uint64_t size = 0;
        CHECK_RC(cowbackup_driver_size(chain, &size), 0);
        CHECK(size == SIZE);
        uint8_t *got = read_all(chain, SIZE);
        CHECK(first_diff(got, pit[n - 1], SIZE) < 0);
        free(got);
        /* Read-only. */
        CHECK_RC(cowbackup_driver_write(chain, 0, pit[0], 512), -EROFS);
        char rp[256], name[32];
        snprintf(name, sizeof name, "restore%d.img", n);
        path_in_dir(rp, sizeof rp, name);
        cowbackup_driver *r = NULL;
        REQUIRE(cowbackup_file_create(rp, SIZE, 0, &r) == 0);
        cowbackup_job *job = NULL;
        CHECK_RC(cowbackup_backup_start(chain, r, NULL, &job), 0);
        if (job) {
            CHECK_RC(cowbackup_job_wait(job), 0);
            cowbackup_job_free(job);
            got = read_all(r, SIZE);
            CHECK(first_diff(got, pit[n - 1], SIZE) < 0);
            free(got);
        }
        cowbackup_driver_free(r);
        cowbackup_driver_free(chain);
    }

    /* Verify-on-read on a given target: a memory copy of the full backup with one byte
     * flipped in cluster 5 (random data): that cluster fails with -EBADMSG, others read. */
    {
        cowbackup_driver *t[3];
        open_targets(t);
        uint8_t *img0 = read_all(t[0], SIZE);
        img0[5 * CS + 9] ^= 0x10;
        cowbackup_driver *mem = NULL;
        REQUIRE(cowbackup_memory_new(SIZE, &mem) == 0);
        REQUIRE(cowbackup_driver_write(mem, 0, img0, SIZE) == 0);
        cowbackup_driver *one[1] = {mem};
        chain = NULL;
        CHECK_RC(cowbackup_chain_open_drivers(list, one, 1, COWBACKUP_CHAIN_VERIFY, &chain), 0);
        uint8_t *cl = malloc(CS);
        REQUIRE(cl != NULL);
        if (chain) {
            CHECK_ERR(cowbackup_driver_read(chain, 5 * CS, cl, CS), EBADMSG, "cowbackup_driver_read");
            CHECK_RC(cowbackup_driver_read(chain, 6 * CS, cl, CS), 0);
            CHECK(memcmp(cl, pit[0] + 6 * CS, CS) == 0);
            cowbackup_driver_free(chain);
        }
        /* Without the flag the damaged bytes read as they are. */
        chain = NULL;
        CHECK_RC(cowbackup_chain_open_drivers(list, one, 1, 0, &chain), 0);
        if (chain) {
            CHECK_RC(cowbackup_driver_read(chain, 5 * CS, cl, CS), 0);
            CHECK(memcmp(cl, img0 + 5 * CS, CS) == 0);
            cowbackup_driver_free(chain);
        }
        cowbackup_driver_free(mem);
        free(cl);
        free(img0);

        /* Bad input: nothing is opened and *out is not written. */
        cowbackup_driver *const sentinel = (cowbackup_driver *)(uintptr_t)0x1;
        chain = sentinel;
        CHECK_ERR(cowbackup_chain_open_drivers(NULL, t, 3, 0, &chain), EINVAL, "cowbackup_chain_open_drivers");
        CHECK_ERR(cowbackup_chain_open_drivers(list, NULL, 3, 0, &chain), EINVAL, "cowbackup_chain_open_drivers");
        CHECK_ERR(cowbackup_chain_open_drivers(list, t, 0, 0, &chain), EINVAL, "cowbackup_chain_open_drivers");
        CHECK_ERR(cowbackup_chain_open_drivers(list, t, 3, 0x80, &chain), EINVAL, "cowbackup_chain_open_drivers");
        CHECK_ERR(cowbackup_chain_open_drivers(list, t, 3, 0, NULL), EINVAL, "cowbackup_chain_open_drivers");
        const char *null_path[3] = {manifests[0], NULL, manifests[2]};
        CHECK_ERR(cowbackup_chain_open_drivers(null_path, t, 3, 0, &chain), EINVAL, "manifest_paths[1]");
        cowbackup_driver *null_target[3] = {t[0], t[1], NULL};
        CHECK_ERR(cowbackup_chain_open_drivers(list, null_target, 3, 0, &chain), EINVAL, "targets[2]");
        /* Targets in the wrong order for their manifests: the sizes fit, the link check
         * is on the manifests; manifests in the wrong order: the link is named. */
        const char *swapped[3] = {manifests[0], manifests[2], manifests[1]};
        CHECK_ERR(cowbackup_chain_open_drivers(swapped, t, 3, 0, &chain), EINVAL, "link 1");
        const char *incr_first[2] = {manifests[1], manifests[2]};
        CHECK_ERR(cowbackup_chain_open_drivers(incr_first, t + 1, 2, 0, &chain), EINVAL, "link 0");
        /* A target of another size than its manifest says. */
        cowbackup_driver *small = NULL;
        REQUIRE(cowbackup_memory_new(SIZE - CS, &small) == 0);
        cowbackup_driver *with_small[3] = {t[0], small, t[2]};
        CHECK_ERR(cowbackup_chain_open_drivers(list, with_small, 3, 0, &chain), EINVAL, "link 1");
        /* A missing manifest keeps its errno. */
        char nope[256];
        path_in_dir(nope, sizeof nope, "nope.manifest");
        const char *missing[1] = {nope};
        CHECK_ERR(cowbackup_chain_open_drivers(missing, t, 1, 0, &chain), ENOENT, "nope.manifest");
        CHECK(chain == sentinel);
        cowbackup_driver_free(small);
        free_targets(t);
    }

    cowbackup_driver_free(src);
    cowbackup_bitmap_free(bm);
    for (int i = 0; i < 3; i++)
        free(pit[i]);
    free(buf);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0)
        SAY("could not remove %s", dir);
    return test_finish();
}
