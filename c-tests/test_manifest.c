/* Manifests, verify and backup chains through the C ABI: a full backup and two
 * incrementals of a file with writes between them, read back through cowbackup_chain_open
 * and restored by a job with the chain as source; cowbackup_verify with its report and
 * on_mismatch callback after one flipped byte; COWBACKUP_CHAIN_VERIFY; broken chains and
 * bad input (-EINVAL naming the function, -EEXIST, -EBADMSG). */
#include "common.h"

#include <unistd.h>

const char *test_name = "manifest";

#define KiB 1024
#define MiB (1024 * 1024)
#define CS (64 * KiB)
#define SIZE (2 * MiB)

static char dir[] = "/tmp/cowbackup-manifest-XXXXXX";
static char paths[8][256];

static void path_in_dir(char *out, size_t n, const char *name)
{
    snprintf(out, n, "%s/%s", dir, name);
}

/* One backup of src to NAME.img with manifest NAME.manifest (kept in paths[i]). */
static void backup(cowbackup_driver *src, cowbackup_bitmap *bm, int i, uint32_t sync)
{
    char img[256], name[32];
    snprintf(name, sizeof name, "b%d.img", i);
    path_in_dir(img, sizeof img, name);
    snprintf(name, sizeof name, "b%d.manifest", i);
    path_in_dir(paths[i], sizeof paths[i], name);
    cowbackup_driver *t = NULL;
    REQUIRE(cowbackup_file_create(img, SIZE, 0, &t) == 0);
    cowbackup_options *o = cowbackup_options_new();
    REQUIRE(o != NULL);
    CHECK_RC(cowbackup_options_set_sync(o, sync), 0);
    CHECK_RC(cowbackup_options_set_bitmap(o, bm, COWBACKUP_BITMAP_MODE_ON_SUCCESS), 0);
    CHECK_RC(cowbackup_options_set_manifest(o, paths[i]), 0);
    CHECK_RC(cowbackup_options_set_disk_id(o, "c-disk"), 0);
    cowbackup_job *job = NULL;
    REQUIRE(cowbackup_backup_start(src, t, o, &job) == 0);
    CHECK_RC(cowbackup_job_wait(job), 0);
    cowbackup_job_free(job);
    cowbackup_options_free(o);
    cowbackup_driver_free(t);
}

static int bad_calls;
static uint64_t bad_off, bad_len;

static int on_mismatch(void *opaque, uint64_t off, uint64_t len)
{
    (void)opaque;
    bad_calls++;
    bad_off = off;
    bad_len = len;
    return 0;
}

int main(void)
{
    REQUIRE(mkdtemp(dir) != NULL);
    char srcp[256];
    path_in_dir(srcp, sizeof srcp, "src.img");
    cowbackup_driver *src = NULL;
    REQUIRE(cowbackup_file_create(srcp, SIZE, 0, &src) == 0);
    uint64_t seed = 7;
    uint8_t *buf = malloc(SIZE);
    REQUIRE(buf != NULL);
    fill_random(buf, SIZE / 2, &seed);
    REQUIRE(cowbackup_driver_write(src, 0, buf, SIZE / 2) == 0);
    cowbackup_bitmap *bm = NULL;
    REQUIRE(cowbackup_bitmap_new(SIZE, CS, &bm) == 0);

    uint8_t *pit[3];
    for (int i = 0; i < 3; i++) {
        pit[i] = read_all(src, SIZE);
        backup(src, bm, i, i == 0 ? COWBACKUP_SYNC_FULL : COWBACKUP_SYNC_BITMAP);
        /* Host writes after the backup: data and zeroes, marked in the bitmap. */
        for (int w = 0; w < 8; w++) {
            uint64_t off = (next_random(&seed) % (SIZE / 4096 - 4)) * 4096;
            fill_random(buf, 8192, &seed);
            if (w % 3 == 0)
                memset(buf, 0, 8192);
            REQUIRE(cowbackup_driver_write(src, off, buf, 8192) == 0);
            REQUIRE(cowbackup_bitmap_mark(bm, off, 8192) == 0);
        }
    }
    /* Each prefix of the chain reads, and restores, as its newest point in time. */
    for (int n = 1; n <= 3; n++) {
        const char *list[3] = {paths[0], paths[1], paths[2]};
        cowbackup_driver *chain = NULL;
        CHECK_RC(cowbackup_chain_open(list, n, COWBACKUP_CHAIN_VERIFY, &chain), 0);
        if (!chain)
            continue;
        uint8_t *got = read_all(chain, SIZE);
        CHECK(first_diff(got, pit[n - 1], SIZE) < 0);
        free(got);
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
    /* consolidate full + incr1 into one backup; [it, incr2] reads as the newest point in time. */
    {
        char ci[256], cm[256];
        path_in_dir(ci, sizeof ci, "c.img");
        path_in_dir(cm, sizeof cm, "c.manifest");
        const char *two[2] = {paths[0], paths[1]};
        CHECK_RC(cowbackup_chain_consolidate(two, 2, ci, cm), 0);
        CHECK_ERR(cowbackup_chain_consolidate(two, 2, ci, cm), EEXIST, "cowbackup_chain_consolidate");
        CHECK_ERR(cowbackup_chain_consolidate(two, 0, ci, cm), EINVAL, "cowbackup_chain_consolidate");
        const char *merged[2] = {cm, paths[2]};
        cowbackup_driver *chain = NULL;
        CHECK_RC(cowbackup_chain_open(merged, 2, COWBACKUP_CHAIN_VERIFY, &chain), 0);
        if (chain) {
            uint8_t *got = read_all(chain, SIZE);
            CHECK(first_diff(got, pit[2], SIZE) < 0);
            free(got);
            cowbackup_driver_free(chain);
        }
    }
    /* verify: clean, then one flipped byte named by the callback and the report. */
    char img0[256];
    path_in_dir(img0, sizeof img0, "b0.img");
    cowbackup_driver *t0 = NULL;
    REQUIRE(cowbackup_file_open(img0, COWBACKUP_OPEN_WRITE, &t0) == 0);
    cowbackup_verify_report rep;
    memset(&rep, 0xff, sizeof rep);
    CHECK_RC(cowbackup_verify(paths[0], t0, NULL, NULL, &rep, sizeof rep), 0);
    CHECK(rep.clusters_checked == SIZE / CS && rep.bytes_checked == SIZE && rep.mismatched_clusters == 0);
    uint8_t b;
    REQUIRE(cowbackup_driver_read(t0, 5 * CS + 9, &b, 1) == 0);
    b ^= 0x10;
    REQUIRE(cowbackup_driver_write(t0, 5 * CS + 9, &b, 1) == 0);
    CHECK_ERR(cowbackup_verify(paths[0], t0, on_mismatch, NULL, &rep, sizeof rep), EBADMSG, "cowbackup_verify");
    CHECK(bad_calls == 1 && bad_off == 5 * CS && bad_len == CS && rep.mismatched_clusters == 1);
    cowbackup_driver *chain = NULL;
    const char *one[1] = {paths[0]};
    CHECK_RC(cowbackup_chain_open(one, 1, COWBACKUP_CHAIN_VERIFY, &chain), 0);
    uint8_t *cl = malloc(CS);
    REQUIRE(cl != NULL);
    if (chain) {
        CHECK_ERR(cowbackup_driver_read(chain, 5 * CS, cl, CS), EBADMSG, "cowbackup_driver_read");
        CHECK_RC(cowbackup_driver_read(chain, 6 * CS, cl, CS), 0);
        cowbackup_driver_free(chain);
    }
    /* Broken chains and bad input. */
    const char *gap[2] = {paths[0], paths[2]};
    chain = NULL;
    CHECK_ERR(cowbackup_chain_open(gap, 2, 0, &chain), EINVAL, "link 1");
    CHECK(chain == NULL);
    const char *incr_first[2] = {paths[1], paths[2]};
    CHECK_ERR(cowbackup_chain_open(incr_first, 2, 0, &chain), EINVAL, "link 0");
    CHECK_ERR(cowbackup_chain_open(gap, 0, 0, &chain), EINVAL, "cowbackup_chain_open");
    CHECK_ERR(cowbackup_chain_open(gap, 2, 0x80, &chain), EINVAL, "cowbackup_chain_open");
    CHECK_ERR(cowbackup_chain_open(gap, 2, 0, NULL), EINVAL, "cowbackup_chain_open");
    CHECK_ERR(cowbackup_verify(NULL, t0, NULL, NULL, NULL, 0), EINVAL, "cowbackup_verify");
    CHECK_ERR(cowbackup_options_set_manifest(NULL, "x"), EINVAL, "cowbackup_options_set_manifest");
    CHECK_ERR(cowbackup_options_set_disk_id(NULL, "x"), EINVAL, "cowbackup_options_set_disk_id");
    cowbackup_options *o = cowbackup_options_new();
    CHECK_ERR(cowbackup_options_set_disk_id(o, ""), EINVAL, "cowbackup_options_set_disk_id");
    /* A manifest is never written over an existing file. */
    CHECK_RC(cowbackup_options_set_manifest(o, paths[0]), 0);
    cowbackup_driver *t = NULL;
    char xp[256];
    path_in_dir(xp, sizeof xp, "x.img");
    REQUIRE(cowbackup_file_create(xp, SIZE, 0, &t) == 0);
    cowbackup_job *job = NULL;
    CHECK_RC(cowbackup_backup_start(src, t, o, &job), -EEXIST);
    CHECK(job == NULL);
    /* A damaged manifest. */
    FILE *f = fopen(paths[2], "r+b");
    REQUIRE(f != NULL);
    fseek(f, -3, SEEK_END);
    fputc('!', f);
    fclose(f);
    const char *all[3] = {paths[0], paths[1], paths[2]};
    CHECK_ERR(cowbackup_chain_open(all, 3, 0, &chain), EBADMSG, "damaged");
    cowbackup_options_free(o);
    cowbackup_driver_free(t);
    cowbackup_driver_free(t0);
    cowbackup_driver_free(src);
    cowbackup_bitmap_free(bm);
    for (int i = 0; i < 3; i++)
        free(pit[i]);
    free(buf);
    free(cl);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0)
        SAY("could not remove %s", dir);
    return test_finish();
}
