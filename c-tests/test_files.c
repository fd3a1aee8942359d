/* File drivers: cowbackup_file_create never destroys an existing file unless asked
 * (COWBACKUP_CREATE_OVERWRITE); "the target reads as zeroes" is decided from the file when the
 * job starts, not remembered from its creation (issue 16, defect 1: another handle had
 * written 0xEE over a fresh target and the backup "completed" with the 0xEE left in it);
 * cowbackup_file_open refuses FIFOs, sockets, directories and character devices at once,
 * without blocking (issue 16, defect 6); error messages name the path and say what to do. */
#include "common.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

const char *test_name = "files";

#define MiB (1024 * 1024)
#define KiB 1024

static char dir[] = "/tmp/cowbackup-files-XXXXXX";

static void path_in_dir(char *out, size_t n, const char *name)
{
    snprintf(out, n, "%s/%s", dir, name);
}

static void write_file(const char *path, uint8_t byte, size_t len)
{
    uint8_t *buf = malloc(len);
    REQUIRE(buf != NULL);
    memset(buf, byte, len);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    REQUIRE(fd >= 0);
    REQUIRE(write(fd, buf, len) == (ssize_t)len);
    close(fd);
    free(buf);
}

/* 1 when the file at path is exactly len bytes of `byte`. */
static int file_is(const char *path, uint8_t byte, size_t len)
{
    struct stat st;
    if (stat(path, &st) != 0 || (size_t)st.st_size != len)
        return 0;
    uint8_t *buf = malloc(len);
    REQUIRE(buf != NULL);
    int fd = open(path, O_RDONLY);
    REQUIRE(fd >= 0);
    int ok = read(fd, buf, len) == (ssize_t)len;
    close(fd);
    for (size_t i = 0; ok && i < len; i++)
        ok = buf[i] == byte;
    free(buf);
    return ok;
}

static int contains(const char *s, const char *part)
{
    return s != NULL && strstr(s, part) != NULL;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void create_refuses_existing_files(void)
{
    char path[512];
    path_in_dir(path, sizeof path, "source.img");
    write_file(path, 0x5a, 100 * KiB);
    static char sentinel;
    cowbackup_driver *const untouched = (cowbackup_driver *)&sentinel; /* out stays untouched on failure */
    cowbackup_driver *d = untouched;

    SAY("cowbackup_file_create over an existing file: -EEXIST, the message names the path, the file is unchanged");
    CHECK_ERR(cowbackup_file_create(path, MiB, 0, &d), EEXIST, "cowbackup_file_create");
    CHECK(contains(cowbackup_last_error(), path));
    CHECK(contains(cowbackup_last_error(), "COWBACKUP_CREATE_OVERWRITE"));
    CHECK_ERR(cowbackup_file_create(path, MiB, COWBACKUP_OPEN_WRITE | COWBACKUP_OPEN_DIRECT, &d), EEXIST,
              "cowbackup_file_create");
    CHECK(d == untouched);
    CHECK(file_is(path, 0x5a, 100 * KiB));

    SAY("unknown flag bits: -EINVAL, nothing changed; COWBACKUP_CREATE_OVERWRITE is refused by cowbackup_file_open");
    CHECK(COWBACKUP_CREATE_OVERWRITE != COWBACKUP_OPEN_WRITE && COWBACKUP_CREATE_OVERWRITE != COWBACKUP_OPEN_DIRECT);
    CHECK_ERR(cowbackup_file_create(path, MiB, COWBACKUP_CREATE_OVERWRITE | 8, &d), EINVAL, "unknown flags");
    CHECK_ERR(cowbackup_file_create(path, MiB, 0x80000000u, &d), EINVAL, "cowbackup_file_create");
    CHECK_ERR(cowbackup_file_open(path, COWBACKUP_CREATE_OVERWRITE, &d), EINVAL, "cowbackup_file_open");
    CHECK(d == untouched);
    CHECK(file_is(path, 0x5a, 100 * KiB));

    SAY("with COWBACKUP_CREATE_OVERWRITE the file is replaced: new size, reads as zeroes");
    d = NULL;
    CHECK_RC(cowbackup_file_create(path, MiB, COWBACKUP_CREATE_OVERWRITE, &d), 0);
    REQUIRE(d != NULL);
    uint64_t size = 0;
    CHECK_RC(cowbackup_driver_size(d, &size), 0);
    CHECK(size == MiB);
    CHECK(file_is(path, 0, MiB));
    cowbackup_driver_free(d);
    unlink(path);

    SAY("a fresh path is created; a second create of it fails with -EEXIST");
    d = NULL;
    CHECK_RC(cowbackup_file_create(path, MiB, 0, &d), 0);
    cowbackup_driver *d2 = NULL;
    CHECK_ERR(cowbackup_file_create(path, MiB, 0, &d2), EEXIST, "cowbackup_file_create");
    CHECK(d2 == NULL);
    cowbackup_driver_free(d);
    unlink(path);
}

/* Issue 16, defect 1: the two-handle scenario, checked byte for byte. */
static void fresh_target_is_checked_on_the_file(void)
{
    const uint64_t size = 8 * MiB;
    char src_path[512], dst_path[512];
    path_in_dir(src_path, sizeof src_path, "mostly-zero.img");
    path_in_dir(dst_path, sizeof dst_path, "target.img");

    /* A mostly-zero source: holes, plus a few clusters of data. */
    cowbackup_driver *src = NULL;
    REQUIRE(cowbackup_file_create(src_path, size, 0, &src) == 0);
    uint8_t *buf = malloc(64 * KiB);
    REQUIRE(buf != NULL);
    uint64_t seed = 16;
    for (uint64_t off = 0; off < size; off += MiB + 192 * KiB) {
        fill_random(buf, 64 * KiB, &seed);
        CHECK_RC(cowbackup_driver_write(src, off, buf, 64 * KiB), 0);
    }

    SAY("cowbackup_file_create(T); a second handle cowbackup_file_open(T, WRITE) writes 0xEE over all of it");
    cowbackup_driver *created = NULL, *other = NULL;
    REQUIRE(cowbackup_file_create(dst_path, size, 0, &created) == 0);
    REQUIRE(cowbackup_file_open(dst_path, COWBACKUP_OPEN_WRITE, &other) == 0);
    memset(buf, 0xEE, 64 * KiB);
    for (uint64_t off = 0; off < size; off += 64 * KiB)
        CHECK_RC(cowbackup_driver_write(other, off, buf, 64 * KiB), 0);
    cowbackup_driver_free(other);
    free(buf);

    SAY("a backup into the first handle: the target equals the source byte for byte (no 0xEE left)");
    cowbackup_job *job = NULL;
    REQUIRE(cowbackup_backup_start(src, created, NULL, &job) == 0);
    CHECK_RC(cowbackup_job_wait(job), 0);
    cowbackup_job_info info = query(job);
    CHECK(info.state == COWBACKUP_JOB_COMPLETED);
    cowbackup_job_free(job);
    uint8_t *want = read_all(src, size), *got = read_all(created, size);
    long long at = first_diff(want, got, size);
    if (at >= 0)
        fprintf(stderr, "FAIL: target differs from the source at %lld: 0x%02x, want 0x%02x\n", at, got[at], want[at]);
    CHECK(at < 0);
    /* And through the file itself, not only through the handle. */
    int fd = open(dst_path, O_RDONLY);
    REQUIRE(fd >= 0);
    CHECK(pread(fd, got, size, 0) == (ssize_t)size);
    close(fd);
    CHECK(first_diff(want, got, size) < 0);
    free(want);
    free(got);

    SAY("a fresh target nobody wrote to is still detected: zero clusters are left as holes");
    cowbackup_driver_free(created);
    unlink(dst_path);
    REQUIRE(cowbackup_file_create(dst_path, size, 0, &created) == 0);
    REQUIRE(cowbackup_backup_start(src, created, NULL, &job) == 0);
    CHECK_RC(cowbackup_job_wait(job), 0);
    cowbackup_job_free(job);
    struct stat st;
    REQUIRE(stat(dst_path, &st) == 0);
    printf("[%s] fresh target: %lld of %llu bytes allocated\n", test_name, (long long)st.st_blocks * 512,
           (unsigned long long)size);
    CHECK((uint64_t)st.st_blocks * 512 < size / 2);
    cowbackup_driver_free(created);
    cowbackup_driver_free(src);
    unlink(dst_path);
    unlink(src_path);
}

/* Issue 16, defect 6: a FIFO (and other non-files) must be refused at once. */
static void open_refuses_non_files_without_blocking(void)
{
    char fifo[512], sock[512];
    path_in_dir(fifo, sizeof fifo, "fifo");
    path_in_dir(sock, sizeof sock, "sock");
    REQUIRE(mkfifo(fifo, 0600) == 0);
    int sfd = socket(AF_UNIX, SOCK_STREAM, 0);
    REQUIRE(sfd >= 0);
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    REQUIRE(strlen(sock) < sizeof sa.sun_path);
    strcpy(sa.sun_path, sock);
    REQUIRE(bind(sfd, (struct sockaddr *)&sa, sizeof sa) == 0);

    /* If the call blocked, SIGALRM would kill the test (a failure) instead of hanging it. */
    alarm(60);
    const struct { const char *path, *what; } cases[] = {
        { fifo, "FIFO" }, { sock, "socket" }, { dir, "directory" }, { "/dev/null", "character device" },
    };
    const uint32_t flags[] = { 0, COWBACKUP_OPEN_WRITE, COWBACKUP_OPEN_WRITE | COWBACKUP_OPEN_DIRECT };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        SAY("cowbackup_file_open(%s: %s): -EINVAL at once, the message says what it is", cases[i].path, cases[i].what);
        for (size_t f = 0; f < sizeof flags / sizeof flags[0]; f++) {
            cowbackup_driver *d = NULL;
            double t = now_s();
            CHECK_ERR(cowbackup_file_open(cases[i].path, flags[f], &d), EINVAL, "cowbackup_file_open");
            CHECK(now_s() - t < 5.0);
            CHECK(contains(cowbackup_last_error(), cases[i].what));
            CHECK(contains(cowbackup_last_error(), cases[i].path));
            CHECK(d == NULL);
        }
    }
    SAY("cowbackup_file_create on a FIFO: -EEXIST; with COWBACKUP_CREATE_OVERWRITE: -EINVAL (only files are replaced)");
    cowbackup_driver *d = NULL;
    CHECK_ERR(cowbackup_file_create(fifo, MiB, 0, &d), EEXIST, "cowbackup_file_create");
    CHECK_ERR(cowbackup_file_create(fifo, MiB, COWBACKUP_CREATE_OVERWRITE, &d), EINVAL, "FIFO");
    CHECK_ERR(cowbackup_file_create(dir, MiB, COWBACKUP_CREATE_OVERWRITE, &d), EINVAL, "directory");
    CHECK(d == NULL);
    struct stat st;
    CHECK(stat(fifo, &st) == 0 && S_ISFIFO(st.st_mode));
    alarm(0);
    close(sfd);
    unlink(sock);
    unlink(fifo);
}

static void messages_say_what_to_do(void)
{
    char path[512], missing[512];
    path_in_dir(path, sizeof path, "ro.img");
    path_in_dir(missing, sizeof missing, "missing.img");
    write_file(path, 0x11, 64 * KiB);

    SAY("cowbackup_file_open of a missing file: -ENOENT naming the path once");
    cowbackup_driver *d = NULL;
    CHECK_ERR(cowbackup_file_open(missing, 0, &d), ENOENT, "cowbackup_file_open");
    const char *msg = cowbackup_last_error();
    CHECK(contains(msg, missing));
    const char *first = strstr(msg, missing);
    CHECK(first != NULL && strstr(first + 1, missing) == NULL); /* the path appears once */

    SAY("a write through a read-only file driver: -EBADF, and the message says to open with COWBACKUP_OPEN_WRITE");
    REQUIRE(cowbackup_file_open(path, 0, &d) == 0);
    uint8_t byte = 0x22;
    CHECK_ERR(cowbackup_driver_write(d, 0, &byte, 1), EBADF, "cowbackup_driver_write");
    CHECK(contains(cowbackup_last_error(), "read-only"));
    CHECK(contains(cowbackup_last_error(), "COWBACKUP_OPEN_WRITE"));
    CHECK(contains(cowbackup_last_error(), path));
    cowbackup_driver_free(d);
    CHECK(file_is(path, 0x11, 64 * KiB));
    unlink(path);

    SAY("a hook range past the end: the message names the function once (no \"cow_before_write\" repeated)");
    cowbackup_driver *s = NULL, *t = NULL;
    REQUIRE(cowbackup_memory_new(MiB, &s) == 0 && cowbackup_memory_new(MiB, &t) == 0);
    cowbackup_job *job = NULL;
    REQUIRE(cowbackup_backup_start(s, t, NULL, &job) == 0);
    CHECK_ERR(cowbackup_cow_before_write(job, MiB, 1), EINVAL, "cowbackup_cow_before_write: range");
    CHECK(strstr(cowbackup_last_error(), ": cow_before_write") == NULL);
    CHECK_RC(cowbackup_job_wait(job), 0);
    cowbackup_job_free(job);
    cowbackup_driver_free(s);
    cowbackup_driver_free(t);
}

int main(void)
{
    REQUIRE(mkdtemp(dir) != NULL);
    create_refuses_existing_files();
    fresh_target_is_checked_on_the_file();
    open_refuses_non_files_without_blocking();
    messages_say_what_to_do();
    rmdir(dir);
    return test_finish();
}
