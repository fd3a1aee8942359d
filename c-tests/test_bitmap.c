/* Dirty bitmaps from C: tracking, merge, persistence across reopen, the errors of create and
 * open (-EEXIST, -ENOENT, -EBUSY, -EBADMSG), bad input, and marks from several threads. */
#include "common.h"

#include <fcntl.h>
#include <unistd.h>

const char *test_name = "bitmap";

#define BAD_PTR ((void *)0x5eed)
#define SENTINEL 0x5a5a5a5a5a5a5a5aULL
#define G COWBACKUP_BITMAP_DEFAULT_GRANULARITY
#define MIB (1024ULL * 1024)

static char dir[64];

static void path_in_dir(char *out, size_t n, const char *name)
{
    snprintf(out, n, "%s/%s", dir, name);
}

/* The dirty extents of bm, as "off+len ..." in granules, for messages and checks. */
static void extents(const cowbackup_bitmap *bm, char *out, size_t n)
{
    uint64_t from = 0, off = 0, len = 0;
    size_t used = 0;
    out[0] = 0;
    for (;;) {
        REQUIRE(cowbackup_bitmap_next_dirty(bm, from, &off, &len) == 0);
        if (len == 0)
            break;
        used += snprintf(out + used, n - used, "%s%llu+%llu", used ? " " : "", (unsigned long long)(off / G),
                         (unsigned long long)(len / G));
        REQUIRE(used < n);
        from = off + len;
    }
}

#define CHECK_EXTENTS(bm, want) do { \
    char got_[256]; \
    extents((bm), got_, sizeof got_); \
    if (strcmp(got_, (want)) != 0) { \
        fprintf(stderr, "FAIL %s:%d: extents \"%s\", want \"%s\"\n", __FILE__, __LINE__, got_, (want)); \
        test_failures++; \
    } } while (0)

static cowbackup_bitmap_info info_of(const cowbackup_bitmap *bm)
{
    cowbackup_bitmap_info i;
    memset(&i, 0xa5, sizeof i);
    REQUIRE(cowbackup_bitmap_query(bm, &i) == 0);
    return i;
}

static void tracking(void)
{
    SAY("tracking: inside a granule, across a boundary, disabled, clear, unaligned end");
    cowbackup_bitmap *bm = NULL;
    uint64_t size = 100 * G + 1000;
    CHECK_RC(cowbackup_bitmap_new(size, G, &bm), 0);
    REQUIRE(bm);
    cowbackup_bitmap_info i = info_of(bm);
    CHECK(i.size == size && i.granularity == G && i.count == 0 && i.generation == 0);
    CHECK(i.flags == COWBACKUP_BITMAP_RECORDING);
    CHECK(i.reserved32 == 0 && i.reserved[0] == 0 && i.reserved[5] == 0);

    CHECK_RC(cowbackup_bitmap_mark(bm, 3 * G + 4096, 4096), 0);
    CHECK_EXTENTS(bm, "3+1");
    CHECK_RC(cowbackup_bitmap_mark(bm, 6 * G - 100, 200), 0);
    CHECK_EXTENTS(bm, "3+1 5+2");
    CHECK(info_of(bm).count == 3 * G);
    CHECK_RC(cowbackup_bitmap_mark(bm, 4 * G, 0), 0); /* len 0: nothing */
    CHECK_EXTENTS(bm, "3+1 5+2");

    CHECK_RC(cowbackup_bitmap_disable(bm), 0);
    CHECK(info_of(bm).flags == 0);
    CHECK_RC(cowbackup_bitmap_mark(bm, 50 * G, 1), 0);
    CHECK_EXTENTS(bm, "3+1 5+2");
    CHECK_RC(cowbackup_bitmap_enable(bm), 0);

    CHECK_RC(cowbackup_bitmap_mark(bm, size - 1, 1), 0);
    CHECK(info_of(bm).count == 3 * G + 1000);
    uint64_t off = SENTINEL, len = SENTINEL;
    CHECK_RC(cowbackup_bitmap_next_dirty(bm, 7 * G, &off, &len), 0);
    CHECK(off == 100 * G && len == 1000);
    CHECK_RC(cowbackup_bitmap_next_dirty(bm, 5 * G + 10, &off, &len), 0);
    CHECK(off == 5 * G + 10 && len == 2 * G - 10);
    CHECK_RC(cowbackup_bitmap_next_dirty(bm, size, &off, &len), 0);
    CHECK(off == size && len == 0);

    CHECK_RC(cowbackup_bitmap_clear(bm), 0);
    i = info_of(bm);
    CHECK(i.count == 0 && i.generation == 1);
    CHECK_EXTENTS(bm, "");
    CHECK_RC(cowbackup_bitmap_clear(bm), 0);
    CHECK(info_of(bm).generation == 1); /* nothing removed */
    cowbackup_bitmap_free(bm);
}

static void merge(void)
{
    SAY("merge: {1,2} + {2,3} into {7}; across granularities; different sizes rejected");
    cowbackup_bitmap *a, *b, *dst, *coarse, *other;
    REQUIRE(cowbackup_bitmap_new(64 * MIB, G, &a) == 0);
    REQUIRE(cowbackup_bitmap_new(64 * MIB, G, &b) == 0);
    REQUIRE(cowbackup_bitmap_new(64 * MIB, G, &dst) == 0);
    CHECK_RC(cowbackup_bitmap_mark(a, G, 2 * G), 0);
    CHECK_RC(cowbackup_bitmap_mark(b, 2 * G, 2 * G), 0);
    CHECK_RC(cowbackup_bitmap_mark(dst, 7 * G, 1), 0);
    CHECK_RC(cowbackup_bitmap_merge(dst, a), 0);
    CHECK_RC(cowbackup_bitmap_merge(dst, b), 0);
    CHECK_EXTENTS(dst, "1+3 7+1");
    CHECK_EXTENTS(a, "1+2");
    CHECK(info_of(dst).generation == 0);

    /* 64 KiB granules into 1 MiB ones: granule 1..3 and 7 are in the first MiB. */
    REQUIRE(cowbackup_bitmap_new(64 * MIB, MIB, &coarse) == 0);
    CHECK_RC(cowbackup_bitmap_merge(coarse, dst), 0);
    CHECK(info_of(coarse).count == MIB);

    REQUIRE(cowbackup_bitmap_new(32 * MIB, G, &other) == 0);
    CHECK_RC(cowbackup_bitmap_mark(other, 0, 1), 0);
    CHECK_ERR(cowbackup_bitmap_merge(dst, other), EINVAL, "cowbackup_bitmap_merge");
    CHECK_EXTENTS(dst, "1+3 7+1"); /* unchanged */
    cowbackup_bitmap_free(a);
    cowbackup_bitmap_free(b);
    cowbackup_bitmap_free(dst);
    cowbackup_bitmap_free(coarse);
    cowbackup_bitmap_free(other);
}

static void persistence(void)
{
    SAY("persistence: create, mark, free, reopen; uuid and generation kept; -EEXIST, -ENOENT, -EBUSY");
    char path[128], missing[128];
    path_in_dir(path, sizeof path, "disk.bitmap");
    path_in_dir(missing, sizeof missing, "missing.bitmap");
    cowbackup_bitmap *bm = NULL, *again = BAD_PTR;
    CHECK_RC(cowbackup_bitmap_create(path, 8ULL << 30, 4096, &bm), 0);
    REQUIRE(bm);
    cowbackup_bitmap_info i = info_of(bm);
    CHECK(i.flags == (COWBACKUP_BITMAP_RECORDING | COWBACKUP_BITMAP_PERSISTENT));
    uint8_t uuid[16];
    memcpy(uuid, i.uuid, 16);
    CHECK_RC(cowbackup_bitmap_mark(bm, 4096 * 10, 4096 * 3), 0);
    CHECK_RC(cowbackup_bitmap_mark(bm, (8ULL << 30) - 1, 1), 0);
    CHECK_ERR(cowbackup_bitmap_open(path, &again), EBUSY, "cowbackup_bitmap_open");
    CHECK_ERR(cowbackup_bitmap_create(path, 1 << 20, 4096, &again), EEXIST, "cowbackup_bitmap_create");
    CHECK(again == BAD_PTR);
    cowbackup_bitmap_free(bm);

    bm = NULL;
    CHECK_RC(cowbackup_bitmap_open(path, &bm), 0);
    REQUIRE(bm);
    i = info_of(bm);
    CHECK(memcmp(i.uuid, uuid, 16) == 0);
    CHECK(i.count == 4 * 4096 && i.generation == 0);
    CHECK_RC(cowbackup_bitmap_clear(bm), 0);
    CHECK_RC(cowbackup_bitmap_mark(bm, 0, 1), 0);
    CHECK_RC(cowbackup_bitmap_disable(bm), 0);
    cowbackup_bitmap_free(bm);
    CHECK_RC(cowbackup_bitmap_open(path, &bm), 0);
    i = info_of(bm);
    CHECK(i.count == 4096 && i.generation == 1 && i.flags == COWBACKUP_BITMAP_PERSISTENT);
    cowbackup_bitmap_free(bm);

    again = BAD_PTR;
    CHECK_ERR(cowbackup_bitmap_open(missing, &again), ENOENT, "cowbackup_bitmap_open");
    CHECK(again == BAD_PTR);
}

static void damage(void)
{
    SAY("damage: a flipped byte in the header or a page, a truncated file, junk: -EBADMSG");
    char path[128];
    path_in_dir(path, sizeof path, "damaged.bitmap");
    cowbackup_bitmap *bm = NULL;
    REQUIRE(cowbackup_bitmap_create(path, 1ULL << 30, 4096, &bm) == 0);
    REQUIRE(cowbackup_bitmap_mark(bm, 12345, 1) == 0);
    cowbackup_bitmap_free(bm);
    const off_t spots[] = { 20, 600, 4096 + 100, 4096 + 512 + 3 };
    for (size_t k = 0; k < sizeof spots / sizeof spots[0]; k++) {
        int fd = open(path, O_RDWR);
        REQUIRE(fd >= 0);
        uint8_t c;
        REQUIRE(pread(fd, &c, 1, spots[k]) == 1);
        c ^= 0x40;
        REQUIRE(pwrite(fd, &c, 1, spots[k]) == 1);
        cowbackup_bitmap *out = BAD_PTR;
        CHECK_ERR(cowbackup_bitmap_open(path, &out), EBADMSG, "damaged");
        CHECK(out == BAD_PTR);
        c ^= 0x40; /* repair */
        REQUIRE(pwrite(fd, &c, 1, spots[k]) == 1);
        close(fd);
    }
    CHECK_RC(cowbackup_bitmap_open(path, &bm), 0);
    CHECK(info_of(bm).count == 4096);
    cowbackup_bitmap_free(bm);
    REQUIRE(truncate(path, 4096) == 0);
    CHECK_ERR(cowbackup_bitmap_open(path, &bm), EBADMSG, "truncated");
    char junk[128];
    path_in_dir(junk, sizeof junk, "junk");
    FILE *f = fopen(junk, "w");
    REQUIRE(f);
    fputs("not a bitmap at all", f);
    fclose(f);
    CHECK_ERR(cowbackup_bitmap_open(junk, &bm), EBADMSG, "cowbackup_bitmap_open");
    unlink(junk);
    unlink(path);
}

static void bad_input(void)
{
    SAY("bad input: NULL handles and out-parameters, bad geometry, ranges past the end");
    cowbackup_bitmap *bm = BAD_PTR;
    char path[128];
    path_in_dir(path, sizeof path, "bad.bitmap");
    CHECK_ERR(cowbackup_bitmap_new(0, G, &bm), EINVAL, "cowbackup_bitmap_new");
    CHECK_ERR(cowbackup_bitmap_new(MIB, 0, &bm), EINVAL, "granularity");
    CHECK_ERR(cowbackup_bitmap_new(MIB, 256, &bm), EINVAL, "granularity");
    CHECK_ERR(cowbackup_bitmap_new(MIB, 3 * 4096, &bm), EINVAL, "granularity");
    CHECK_ERR(cowbackup_bitmap_new(MIB, 4ULL << 30, &bm), EINVAL, "granularity");
    CHECK_ERR(cowbackup_bitmap_new(MIB, G, NULL), EINVAL, "cowbackup_bitmap_new");
    CHECK_ERR(cowbackup_bitmap_create(NULL, MIB, G, &bm), EINVAL, "cowbackup_bitmap_create");
    CHECK_ERR(cowbackup_bitmap_create(path, MIB, G, NULL), EINVAL, "cowbackup_bitmap_create");
    CHECK_ERR(cowbackup_bitmap_create(path, MIB, 1000, &bm), EINVAL, "cowbackup_bitmap_create");
    CHECK(access(path, F_OK) != 0); /* nothing created */
    CHECK_ERR(cowbackup_bitmap_create("/nonexistent-dir/x.bitmap", MIB, G, &bm), ENOENT, "cowbackup_bitmap_create");
    CHECK_ERR(cowbackup_bitmap_open(NULL, &bm), EINVAL, "cowbackup_bitmap_open");
    CHECK_ERR(cowbackup_bitmap_open(path, NULL), EINVAL, "cowbackup_bitmap_open");
    CHECK(bm == BAD_PTR);

    CHECK_ERR(cowbackup_bitmap_mark(NULL, 0, 1), EINVAL, "cowbackup_bitmap_mark");
    CHECK_ERR(cowbackup_bitmap_clear(NULL), EINVAL, "cowbackup_bitmap_clear");
    CHECK_ERR(cowbackup_bitmap_enable(NULL), EINVAL, "cowbackup_bitmap_enable");
    CHECK_ERR(cowbackup_bitmap_disable(NULL), EINVAL, "cowbackup_bitmap_disable");
    cowbackup_bitmap_info info;
    CHECK_ERR(cowbackup_bitmap_query(NULL, &info), EINVAL, "cowbackup_bitmap_query");
    uint64_t off = SENTINEL, len = SENTINEL;
    CHECK_ERR(cowbackup_bitmap_next_dirty(NULL, 0, &off, &len), EINVAL, "cowbackup_bitmap_next_dirty");

    REQUIRE(cowbackup_bitmap_new(MIB, 4096, &bm) == 0);
    CHECK_ERR(cowbackup_bitmap_mark(bm, MIB, 1), EINVAL, "past the end");
    CHECK_ERR(cowbackup_bitmap_mark(bm, MIB - 1, 2), EINVAL, "cowbackup_bitmap_mark");
    CHECK_ERR(cowbackup_bitmap_mark(bm, UINT64_MAX, 1), EINVAL, "cowbackup_bitmap_mark");
    CHECK_ERR(cowbackup_bitmap_mark(bm, 4096, UINT64_MAX), EINVAL, "cowbackup_bitmap_mark");
    CHECK(info_of(bm).count == 0); /* nothing recorded */
    CHECK_ERR(cowbackup_bitmap_merge(NULL, bm), EINVAL, "cowbackup_bitmap_merge");
    CHECK_ERR(cowbackup_bitmap_merge(bm, NULL), EINVAL, "cowbackup_bitmap_merge");
    CHECK_ERR(cowbackup_bitmap_query(bm, NULL), EINVAL, "cowbackup_bitmap_query");
    CHECK_ERR(cowbackup_bitmap_next_dirty(bm, 0, NULL, &len), EINVAL, "cowbackup_bitmap_next_dirty");
    CHECK_ERR(cowbackup_bitmap_next_dirty(bm, 0, &off, NULL), EINVAL, "cowbackup_bitmap_next_dirty");
    CHECK(off == SENTINEL && len == SENTINEL);
    cowbackup_bitmap_free(bm);
    cowbackup_bitmap_free(NULL);
}

struct marker {
    cowbackup_bitmap *bm;
    unsigned id;
};

static void *mark_thread(void *arg)
{
    struct marker *m = arg;
    for (uint64_t i = 0; i < 200; i++)
        if (cowbackup_bitmap_mark(m->bm, ((i * 4 + m->id) * 4096) + 17, 100) != 0)
            return (void *)1;
    return NULL;
}

static void threads(void)
{
    SAY("marks from 4 threads on a persistent bitmap, all durable");
    char path[128];
    path_in_dir(path, sizeof path, "threads.bitmap");
    cowbackup_bitmap *bm;
    REQUIRE(cowbackup_bitmap_create(path, 1ULL << 30, 4096, &bm) == 0);
    pthread_t t[4];
    struct marker m[4];
    for (unsigned k = 0; k < 4; k++) {
        m[k].bm = bm;
        m[k].id = k;
        REQUIRE(pthread_create(&t[k], NULL, mark_thread, &m[k]) == 0);
    }
    for (unsigned k = 0; k < 4; k++) {
        void *r;
        pthread_join(t[k], &r);
        CHECK(r == NULL);
    }
    cowbackup_bitmap_free(bm);
    REQUIRE(cowbackup_bitmap_open(path, &bm) == 0);
    uint64_t off, len;
    CHECK_RC(cowbackup_bitmap_next_dirty(bm, 0, &off, &len), 0);
    CHECK(off == 0 && len == 800 * 4096);
    cowbackup_bitmap_free(bm);
    unlink(path);
}

int main(void)
{
    snprintf(dir, sizeof dir, "/tmp/cowbackup-bitmap-XXXXXX");
    REQUIRE(mkdtemp(dir) != NULL);
    tracking();
    merge();
    persistence();
    damage();
    bad_input();
    threads();
    char path[128];
    path_in_dir(path, sizeof path, "disk.bitmap");
    unlink(path);
    rmdir(dir);
    return test_finish();
}
