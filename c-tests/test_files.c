/* File drivers: cowbackup_file_create never destroys an existing file unless asked
 * (COWBACKUP_CREATE_OVERWRITE); "the target reads as zeroes" is decided from the file when the
 * job starts, not remembered from its creation (issue 16, defect 1: another handle had
 * written 0xEE over a fresh target and the backup "completed" with the 0xEE left in it);
 * cowbackup_file_open refuses FIFOs, sockets, directories and character devices at once,
 * without blocking (issue 16, defect 6); error messages name the path and say what to do.
 * Issue 23, files no one else can hijack: backups and bitmap files are 0600 whatever the umask
 * (or exactly the mode asked for with the _mode functions), a symlink at the path is never
 * followed (-EEXIST; -ELOOP with COWBACKUP_CREATE_OVERWRITE), a file planted by another,
 * unprivileged user (cbatk, created with useradd; skipped with the reason when not root) is
 * never adopted and OVERWRITE replaces it by rename, and a failed create leaves no temporary
 * file behind. */
#include "common.h"

#include <dirent.h>
#include <fcntl.h>
#include <grp.h>
#include <pwd.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
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

static mode_t mode_of(const char *path)
{
    struct stat st;
    REQUIRE(lstat(path, &st) == 0);
    return st.st_mode & 07777;
}

/* Number of entries of `d` that look like a temporary file of the library. */
static int leftovers(const char *d)
{
    DIR *dp = opendir(d);
    REQUIRE(dp != NULL);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(dp)) != NULL)
        if (strstr(e->d_name, "cowbackup-tmp") != NULL) {
            fprintf(stderr, "leftover temporary file: %s/%s\n", d, e->d_name);
            n++;
        }
    closedir(dp);
    return n;
}

static void modes_are_exact_whatever_the_umask(void)
{
    const mode_t masks[] = { 0, 022, 077 };
    for (size_t i = 0; i < sizeof masks / sizeof masks[0]; i++) {
        SAY("umask %03o: cowbackup_file_create and cowbackup_bitmap_create make 0600 files; the _mode "
            "functions exactly the mode asked for", (unsigned)masks[i]);
        mode_t old = umask(masks[i]);
        char b[512], bm[512], w[512], wbm[512];
        snprintf(b, sizeof b, "%s/backup-%03o.raw", dir, (unsigned)masks[i]);
        snprintf(bm, sizeof bm, "%s/disk-%03o.bitmap", dir, (unsigned)masks[i]);
        snprintf(w, sizeof w, "%s/wide-%03o.raw", dir, (unsigned)masks[i]);
        snprintf(wbm, sizeof wbm, "%s/wide-%03o.bitmap", dir, (unsigned)masks[i]);
        cowbackup_driver *d = NULL;
        cowbackup_bitmap *m = NULL;
        CHECK_RC(cowbackup_file_create(b, MiB, 0, &d), 0);
        cowbackup_driver_free(d);
        CHECK_RC(cowbackup_bitmap_create(bm, MiB, 65536, &m), 0);
        cowbackup_bitmap_free(m);
        CHECK(mode_of(b) == COWBACKUP_FILE_MODE_DEFAULT && mode_of(b) == 0600);
        CHECK(mode_of(bm) == 0600);
        d = NULL;
        CHECK_RC(cowbackup_file_create_mode(w, MiB, COWBACKUP_OPEN_DIRECT, 0640, &d), 0);
        cowbackup_driver_free(d);
        CHECK(mode_of(w) == 0640);
        m = NULL;
        CHECK_RC(cowbackup_bitmap_create_mode(wbm, MiB, 65536, 0644, &m), 0);
        cowbackup_bitmap_free(m);
        CHECK(mode_of(wbm) == 0644);
        SAY("umask %03o: COWBACKUP_CREATE_OVERWRITE of a 0666 file makes a 0600 file", (unsigned)masks[i]);
        REQUIRE(chmod(w, 0666) == 0);
        d = NULL;
        CHECK_RC(cowbackup_file_create(w, MiB, COWBACKUP_CREATE_OVERWRITE, &d), 0);
        cowbackup_driver_free(d);
        CHECK(mode_of(w) == 0600);
        umask(old);
        unlink(b), unlink(bm), unlink(w), unlink(wbm);
    }
    SAY("a mode with bits outside 0777: -EINVAL, nothing created");
    char bad[512];
    path_in_dir(bad, sizeof bad, "setuid.raw");
    cowbackup_driver *d = NULL;
    cowbackup_bitmap *m = NULL;
    CHECK_ERR(cowbackup_file_create_mode(bad, MiB, 0, 04755, &d), EINVAL, "cowbackup_file_create_mode");
    CHECK_ERR(cowbackup_bitmap_create_mode(bad, MiB, 65536, 01777, &m), EINVAL, "cowbackup_bitmap_create_mode");
    CHECK_ERR(cowbackup_file_create_mode(NULL, MiB, 0, 0600, &d), EINVAL, "cowbackup_file_create_mode");
    CHECK_ERR(cowbackup_file_create_mode(bad, MiB, 0, 0600, NULL), EINVAL, "cowbackup_file_create_mode");
    CHECK_ERR(cowbackup_bitmap_create_mode(NULL, MiB, 65536, 0600, &m), EINVAL, "cowbackup_bitmap_create_mode");
    CHECK(d == NULL && m == NULL);
    CHECK(access(bad, F_OK) != 0);
    CHECK(leftovers(dir) == 0);
}

static void symlinks_are_never_followed(void)
{
    char victim[512], link[512], dangling[512], nowhere[512];
    path_in_dir(victim, sizeof victim, "victim.db");
    path_in_dir(link, sizeof link, "link.raw");
    path_in_dir(dangling, sizeof dangling, "dangling.raw");
    path_in_dir(nowhere, sizeof nowhere, "created-through-the-link");
    write_file(victim, 0x42, 19);
    REQUIRE(symlink(victim, link) == 0);
    REQUIRE(symlink(nowhere, dangling) == 0);
    cowbackup_driver *d = NULL;
    cowbackup_bitmap *m = NULL;

    SAY("a symlink at the path: -EEXIST; with COWBACKUP_CREATE_OVERWRITE -ELOOP; the file it points to is untouched");
    CHECK_ERR(cowbackup_file_create(link, MiB, 0, &d), EEXIST, "cowbackup_file_create");
    CHECK_ERR(cowbackup_file_create(link, MiB, COWBACKUP_CREATE_OVERWRITE, &d), ELOOP, "symbolic link");
    CHECK(contains(cowbackup_last_error(), link));
    CHECK_ERR(cowbackup_file_create_mode(link, MiB, COWBACKUP_CREATE_OVERWRITE | COWBACKUP_OPEN_DIRECT, 0644, &d),
              ELOOP, "cowbackup_file_create_mode");
    CHECK_ERR(cowbackup_bitmap_create(link, MiB, 65536, &m), EEXIST, "cowbackup_bitmap_create");
    CHECK(file_is(victim, 0x42, 19));
    CHECK(mode_of(victim) == 0600);
    struct stat st;
    CHECK(lstat(link, &st) == 0 && S_ISLNK(st.st_mode));

    SAY("a dangling symlink: -EEXIST / -ELOOP, nothing is created where it points");
    CHECK_ERR(cowbackup_file_create(dangling, MiB, 0, &d), EEXIST, "cowbackup_file_create");
    CHECK_ERR(cowbackup_file_create(dangling, MiB, COWBACKUP_CREATE_OVERWRITE, &d), ELOOP, "cowbackup_file_create");
    CHECK_ERR(cowbackup_bitmap_create(dangling, MiB, 65536, &m), EEXIST, "cowbackup_bitmap_create");
    CHECK(access(nowhere, F_OK) != 0);
    CHECK(d == NULL && m == NULL);
    CHECK(leftovers(dir) == 0);
    unlink(link), unlink(dangling), unlink(victim);
}

static void failed_creates_leave_nothing_behind(void)
{
    char path[512];
    path_in_dir(path, sizeof path, "too-big.raw");
    cowbackup_driver *d = NULL;
    SAY("sizing fails (UINT64_MAX bytes): an error, nothing at the path, no temporary file");
    int rc = cowbackup_file_create(path, UINT64_MAX, 0, &d);
    CHECK(rc == -EFBIG || rc == -EINVAL);
    CHECK(access(path, F_OK) != 0);
    SAY("the same with COWBACKUP_CREATE_OVERWRITE over a file: the old file stays as it was");
    write_file(path, 0x33, 4 * KiB);
    rc = cowbackup_file_create(path, UINT64_MAX, COWBACKUP_CREATE_OVERWRITE, &d);
    CHECK(rc == -EFBIG || rc == -EINVAL);
    CHECK(file_is(path, 0x33, 4 * KiB));
    CHECK(d == NULL);
    CHECK(leftovers(dir) == 0);
    unlink(path);
}

/* The unprivileged attacker cbatk (created when missing): 0 and its ids, or -1 with the reason. */
static int attacker(uid_t *uid, gid_t *gid, const char **why)
{
    if (geteuid() != 0) {
        *why = "not root: cannot act as a second user";
        return -1;
    }
    for (int i = 0; i < 20; i++) {
        struct passwd *pw = getpwnam("cbatk");
        if (pw != NULL) {
            *uid = pw->pw_uid, *gid = pw->pw_gid;
            return 0;
        }
        /* Several test programs may add it at once: useradd then fails on its lock; retry. */
        if (system("useradd -M -s /bin/sh cbatk >/dev/null 2>&1") == -1)
            break;
        usleep(100 * 1000);
    }
    *why = "cannot create the user cbatk (useradd)";
    return -1;
}

/* Run `script` with sh -c as uid:gid in a child; 1 when it exited 0. */
static int as_user(uid_t uid, gid_t gid, const char *script)
{
    fflush(stdout);
    pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        if (setgroups(0, NULL) != 0 || setgid(gid) != 0 || setuid(uid) != 0)
            _exit(99);
        execl("/bin/sh", "sh", "-c", script, (char *)NULL);
        _exit(98);
    }
    int status;
    REQUIRE(waitpid(pid, &status, 0) == pid);
    return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

static void another_users_files_are_never_adopted(void)
{
    uid_t uid;
    gid_t gid;
    const char *why;
    if (attacker(&uid, &gid, &why) != 0) {
        SAY("SKIP the attacks by a second user: %s", why);
        return;
    }
    /* A shared directory like /tmp (1777) and a root-owned victim elsewhere. */
    char shared[] = "/tmp/cowbackup-files-shared-XXXXXX";
    REQUIRE(mkdtemp(shared) != NULL);
    REQUIRE(chmod(shared, 01777) == 0);
    char victim[512], planted[512], link[512], bmp[512], script[4096];
    path_in_dir(victim, sizeof victim, "root-owned.db");
    write_file(victim, 0x52, 19);
    snprintf(planted, sizeof planted, "%s/planted.raw", shared);
    snprintf(link, sizeof link, "%s/link.raw", shared);
    snprintf(bmp, sizeof bmp, "%s/planted.bitmap", shared);
    snprintf(script, sizeof script, "umask 000 && printf mine > '%s' && printf mine > '%s' && ln -s '%s' '%s'",
             planted, bmp, victim, link);
    SAY("cbatk plants a 0666 file, a bitmap file and a symlink to a root-owned file in a 1777 directory");
    REQUIRE(as_user(uid, gid, script));

    cowbackup_driver *d = NULL;
    cowbackup_bitmap *m = NULL;
    SAY("without COWBACKUP_CREATE_OVERWRITE: -EEXIST, cbatk's files are not adopted");
    CHECK_ERR(cowbackup_file_create(planted, MiB, 0, &d), EEXIST, "cowbackup_file_create");
    CHECK_ERR(cowbackup_file_create(link, MiB, 0, &d), EEXIST, "cowbackup_file_create");
    CHECK_ERR(cowbackup_bitmap_create(bmp, MiB, 65536, &m), EEXIST, "cowbackup_bitmap_create");

    SAY("COWBACKUP_CREATE_OVERWRITE through cbatk's symlink: -ELOOP, the root-owned file is untouched");
    CHECK_ERR(cowbackup_file_create(link, MiB, COWBACKUP_CREATE_OVERWRITE, &d), ELOOP, "cowbackup_file_create");
    CHECK(file_is(victim, 0x52, 19));

    SAY("COWBACKUP_CREATE_OVERWRITE over cbatk's file (held open): a new root-owned 0600 file, cbatk's keeps "
        "\"mine\" and cbatk cannot read or write the backup");
    int held = open(planted, O_RDONLY);
    REQUIRE(held >= 0);
    CHECK_RC(cowbackup_file_create(planted, MiB, COWBACKUP_CREATE_OVERWRITE, &d), 0);
    REQUIRE(d != NULL);
    CHECK_RC(cowbackup_driver_write(d, 0, "DISK-CONTENT", 12), 0);
    CHECK_RC(cowbackup_driver_flush(d), 0);
    cowbackup_driver_free(d);
    struct stat st;
    CHECK(lstat(planted, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == 0 && (st.st_mode & 07777) == 0600);
    char old[16] = { 0 };
    CHECK(pread(held, old, sizeof old, 0) == 4 && memcmp(old, "mine", 4) == 0);
    close(held);
    snprintf(script, sizeof script, "cat '%s' >/dev/null 2>&1", planted);
    CHECK(!as_user(uid, gid, script));
    snprintf(script, sizeof script, "{ printf x >> '%s'; } 2>/dev/null", planted);
    CHECK(!as_user(uid, gid, script));
    CHECK(leftovers(shared) == 0);

    unlink(planted), unlink(link), unlink(bmp), unlink(victim);
    CHECK(rmdir(shared) == 0);
}

int main(void)
{
    REQUIRE(mkdtemp(dir) != NULL);
    create_refuses_existing_files();
    fresh_target_is_checked_on_the_file();
    open_refuses_non_files_without_blocking();
    messages_say_what_to_do();
    modes_are_exact_whatever_the_umask();
    symlinks_are_never_followed();
    failed_creates_leave_nothing_behind();
    another_users_files_are_never_adopted();
    rmdir(dir);
    return test_finish();
}
