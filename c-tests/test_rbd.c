/* cowbackup_rbd_open: bad arguments (-EINVAL with a message, nothing opened) in every build;
 * a library built without the RBD driver says so (-ENOTSUP). With COWBACKUP_RBD_CONF and
 * COWBACKUP_RBD_SPEC set (a conf file and a writable "rbd:POOL/IMAGE" of at least 16 MiB, e.g.
 * from scripts/ceph-up.sh), also: write, read back, flush, a read-only open refusing writes,
 * and a backup from a C driver into the image, read back. */
#include "common.h"

#include <stdlib.h>

const char *test_name = "rbd";

#define SIZE (16u << 20)

/* 1 when the library has the RBD driver. */
static int have_rbd(void)
{
    cowbackup_driver *d = NULL;
    int rc = cowbackup_rbd_open("rbd:p/i", "/nonexistent/ceph.conf", 0, &d);
    CHECK(d == NULL);
    if (rc == -ENOTSUP) {
        CHECK(strstr(cowbackup_last_error(), "without the RBD driver") != NULL);
        return 0;
    }
    CHECK_ERR(rc, ENOENT, "cowbackup_rbd_open");
    CHECK(strstr(cowbackup_last_error(), "rbd:p/i") != NULL);
    return 1;
}

static void bad_input(int rbd)
{
    cowbackup_driver *d = NULL;
    SAY("bad specs and arguments: -EINVAL with a message, nothing opened");
    CHECK_ERR(cowbackup_rbd_open(NULL, NULL, 0, &d), EINVAL, "cowbackup_rbd_open");
    CHECK_ERR(cowbackup_rbd_open("rbd:p/i", NULL, 0, NULL), EINVAL, "cowbackup_rbd_open");
    CHECK_ERR(cowbackup_rbd_open("rbd:p/i", NULL, 0x80, &d), EINVAL, "cowbackup_rbd_open");
    if (rbd) {
        const char *bad[] = {"", "p/i", "rbd:", "rbd:p", "rbd:a/b/c/d", "rbd:p/i@", "rbd:p/i:id=",
                             "rbd:p/i:conf=/etc/ceph/ceph.conf", "rbd:p/i:x=y"};
        for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
            CHECK_ERR(cowbackup_rbd_open(bad[i], NULL, 0, &d), EINVAL, "cowbackup_rbd_open");
            CHECK(strstr(cowbackup_last_error(), "invalid RBD spec") != NULL);
        }
        CHECK_ERR(cowbackup_rbd_open("rbd:p/i@snap", NULL, COWBACKUP_OPEN_WRITE, &d), EROFS, "cowbackup_rbd_open");
    }
    CHECK(d == NULL);
}

static void live(const char *conf, const char *spec)
{
    cowbackup_driver *d = NULL, *ro = NULL;
    SAY("open %s read-write", spec);
    CHECK_RC(cowbackup_rbd_open(spec, conf, COWBACKUP_OPEN_WRITE, &d), 0);
    REQUIRE(d != NULL);
    uint64_t size = 0;
    CHECK_RC(cowbackup_driver_size(d, &size), 0);
    REQUIRE(size >= SIZE);
    uint64_t seed = 7;
    size_t n = 3u << 20;
    uint8_t *data = malloc(n), *back = malloc(n);
    REQUIRE(data && back);
    fill_random(data, n, &seed);
    CHECK_RC(cowbackup_driver_write(d, (1u << 20) + 5, data, n), 0);
    CHECK_RC(cowbackup_driver_read(d, (1u << 20) + 5, back, n), 0);
    CHECK(memcmp(data, back, n) == 0);
    CHECK_RC(cowbackup_driver_flush(d), 0);

    SAY("read-only open: writes fail with -EROFS, naming the image");
    CHECK_RC(cowbackup_rbd_open(spec, conf, 0, &ro), 0);
    CHECK_ERR(cowbackup_driver_write(ro, 0, data, 512), EROFS, "cowbackup_driver_write");
    CHECK(strstr(cowbackup_last_error(), "rbd:") != NULL);
    cowbackup_driver_free(ro);

    SAY("backup of a C memory driver into the image");
    cmem *m = cmem_new(SIZE, 0);
    REQUIRE(m != NULL);
    fill_random(m->data, SIZE / 2, &seed);
    cowbackup_driver *src = cmem_driver(m, 0);
    cowbackup_job *job = NULL;
    CHECK_RC(cowbackup_backup_start(src, d, NULL, &job), 0);
    REQUIRE(job != NULL);
    CHECK_RC(cowbackup_job_wait(job), 0);
    cowbackup_job_free(job);
    uint8_t *all = read_all(d, SIZE);
    REQUIRE(all != NULL);
    CHECK(first_diff(all, m->data, SIZE) < 0);
    free(all);
    cowbackup_driver_free(src);
    cmem_destroy(m);
    cowbackup_driver_free(d);
    free(data);
    free(back);
}

int main(void)
{
    int rbd = have_rbd();
    bad_input(rbd);
    const char *conf = getenv("COWBACKUP_RBD_CONF"), *spec = getenv("COWBACKUP_RBD_SPEC");
    if (rbd && conf && spec) {
        live(conf, spec);
    } else {
        SAY("no live image: %s", rbd ? "COWBACKUP_RBD_CONF and COWBACKUP_RBD_SPEC are not set"
                                       : "the library was built without the RBD driver");
    }
    return test_finish();
}
