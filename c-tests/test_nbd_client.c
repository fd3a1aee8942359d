/* cowbackup_nbd_open against a real NBD server (nbdkit's memory plugin, else qemu-nbd on a
 * sparse file): read, write, discard, block_status and flush through the
 * driver, a read-only open, bad URIs (-EINVAL, nothing opened), and a backup from a C
 * driver into the export, read back. Exits 77 (meson: skipped), saying why, when neither
 * server is installed. */
#include "common.h"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <signal.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

const char *test_name = "nbd_client";
extern char **environ;

#define SIZE (16u << 20)

static int have(const char *tool)
{
    char cmd[256];
    snprintf(cmd, sizeof cmd, "%s --version >/dev/null 2>&1", tool);
    return system(cmd) == 0;
}

/* The Unix socket `path` accepts a connection now. */
static int accepts(const char *path)
{
    struct sockaddr_un a = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof a.sun_path)
        return 0;
    strcpy(a.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    if (fd < 0)
        return 0;
    int ok = connect(fd, (struct sockaddr *)&a, sizeof a) == 0;
    close(fd);
    return ok;
}

/* Start the server on `sock`; wait (at most 20 s) until it accepts connections. */
static pid_t start_server(const char *dir, const char *sock)
{
    char image[512], size[32];
    snprintf(size, sizeof size, "size=%u", SIZE);
    pid_t pid;
    int rc;
    if (have("nbdkit")) {
        char *argv[] = {"nbdkit", "-f", "-U", (char *)sock, "memory", size, NULL};
        rc = posix_spawnp(&pid, "nbdkit", NULL, NULL, argv, environ);
    } else {
        snprintf(image, sizeof image, "%s/image.raw", dir);
        FILE *f = fopen(image, "w");
        REQUIRE(f && ftruncate(fileno(f), SIZE) == 0);
        fclose(f);
        char *argv[] = {"qemu-nbd", "-f", "raw", "--persistent", "--shared=4", "-k", (char *)sock, image, NULL};
        rc = posix_spawnp(&pid, "qemu-nbd", NULL, NULL, argv, environ);
    }
    REQUIRE(rc == 0);
    /* Ready when it accepts a connection: the socket file exists as soon as the server
     * binds, before it listens (a connect then is refused). Both servers take several
     * clients (nbdkit; qemu-nbd --persistent), so the probe costs nothing. */
    for (int i = 0; i < 2000; i++) {
        if (accepts(sock))
            return pid;
        sleep_ms(10);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    REQUIRE(!"the NBD server did not create its socket within 20 s");
    return -1;
}

static void stop_server(pid_t pid)
{
    kill(pid, SIGTERM);
    for (int i = 0; i < 1000; i++) {
        if (waitpid(pid, NULL, WNOHANG) == pid)
            return;
        sleep_ms(10);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

static void bad_input(void)
{
    cowbackup_driver *d = NULL;
    SAY("bad URIs and arguments: -EINVAL with a message, nothing opened");
    const char *bad[] = {"", "disk.img", "http://host/x", "nbd://", "nbd+unix:///x", "nbds://host/x",
                         "nbd://host/x?bogus=1", "nbd://host:99999/x"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK_ERR(cowbackup_nbd_open(bad[i], 0, &d), EINVAL, "cowbackup_nbd_open");
        CHECK(strstr(cowbackup_last_error(), "NBD URI") != NULL);
    }
    CHECK(d == NULL);
    CHECK_ERR(cowbackup_nbd_open(NULL, 0, &d), EINVAL, "cowbackup_nbd_open");
    CHECK_ERR(cowbackup_nbd_open("nbd://localhost/x", 0, NULL), EINVAL, "cowbackup_nbd_open");
    CHECK_ERR(cowbackup_nbd_open("nbd://localhost/x", 0x80, &d), EINVAL, "cowbackup_nbd_open");
    CHECK_ERR(cowbackup_nbd_open("nbd+unix:///x?socket=/nonexistent/nbd.sock", 0, &d), ENOENT,
              "cowbackup_nbd_open");
    CHECK(d == NULL);
}

int main(void)
{
    bad_input();
    if (!have("nbdkit") && !have("qemu-nbd")) {
        printf("SKIPPED: neither nbdkit nor qemu-nbd is installed (scripts/deps.sh installs nbdkit)\n");
        return 77;
    }
    char dir[] = "/tmp/cowbackup-nbd-XXXXXX";
    REQUIRE(mkdtemp(dir) != NULL);
    char sock[600], uri[700];
    snprintf(sock, sizeof sock, "%s/nbd.sock", dir);
    snprintf(uri, sizeof uri, "nbd+unix:///?socket=%s", sock);
    pid_t server = start_server(dir, sock);

    cowbackup_driver *d = NULL;
    SAY("open %s read-write", uri);
    CHECK_RC(cowbackup_nbd_open(uri, COWBACKUP_OPEN_WRITE, &d), 0);
    REQUIRE(d != NULL);
    uint64_t size = 0;
    CHECK_RC(cowbackup_driver_size(d, &size), 0);
    CHECK(size == SIZE);

    SAY("write, read back, discard, block_status, flush");
    uint64_t seed = 42;
    size_t n = 3u << 20;
    uint8_t *data = malloc(n), *back = malloc(n);
    REQUIRE(data && back);
    fill_random(data, n, &seed);
    CHECK_RC(cowbackup_driver_write(d, 1u << 20, data, n), 0);
    CHECK_RC(cowbackup_driver_read(d, 1u << 20, back, n), 0);
    CHECK(first_diff(data, back, n) == -1);
    uint64_t pnum = 0;
    uint32_t status = 0;
    CHECK_RC(cowbackup_driver_block_status(d, 1u << 20, 1u << 20, &pnum, &status), 0);
    CHECK(status & COWBACKUP_STATUS_DATA);
    CHECK_RC(cowbackup_driver_flush(d), 0);
    /* Discard the last 2 MiB of the data: they read back as zeroes (nbdkit memory frees
     * them, qemu-nbd punches a hole). */
    CHECK_RC(cowbackup_driver_discard(d, 2u << 20, 2u << 20), 0);
    CHECK_RC(cowbackup_driver_read(d, 1u << 20, back, n), 0);
    memset(data + (1u << 20), 0, 2u << 20);
    CHECK(first_diff(data, back, n) == -1);
    CHECK_RC(cowbackup_driver_block_status(d, 8u << 20, 8u << 20, &pnum, &status), 0);
    CHECK(status & COWBACKUP_STATUS_ZERO);
    CHECK(pnum > 0 && pnum <= (8u << 20));
    CHECK_RC(cowbackup_driver_flush(d), 0);
    CHECK_ERR(cowbackup_driver_read(d, SIZE - 1, back, 2), EINVAL, "cowbackup_driver_read");

    SAY("a read-only open refuses writes with -EROFS");
    cowbackup_driver *ro = NULL;
    CHECK_RC(cowbackup_nbd_open(uri, 0, &ro), 0);
    if (ro) {
        CHECK_ERR(cowbackup_driver_write(ro, 0, data, 4096), EROFS, "cowbackup_driver_write");
        CHECK(strstr(cowbackup_last_error(), "read-only") != NULL);
        CHECK_RC(cowbackup_driver_read(ro, 1u << 20, back, 4096), 0);
        CHECK(first_diff(data, back, 4096) == -1);
        cowbackup_driver_free(ro);
    }

    SAY("a backup from a C driver into the export (zero clusters: write_zeroes)");
    cmem *m = cmem_new(SIZE, 0);
    fill_random(m->data, SIZE / 2, &seed);
    cowbackup_driver *src = cmem_driver(m, 0);
    cowbackup_options *o = cowbackup_options_new();
    REQUIRE(o != NULL);
    CHECK_RC(cowbackup_options_set_workers(o, 4), 0);
    cowbackup_job *job = NULL;
    CHECK_RC(cowbackup_backup_start(src, d, o, &job), 0);
    cowbackup_options_free(o);
    if (job) {
        CHECK_RC(cowbackup_job_wait(job), 0);
        cowbackup_job_free(job);
        uint8_t *all = read_all(d, SIZE);
        CHECK(first_diff(all, m->data, SIZE) == -1);
        free(all);
    }
    cowbackup_driver_free(src);
    CHECK(atomic_load(&m->released) == 1);
    cmem_destroy(m);
    cowbackup_driver_free(d);
    free(data);
    free(back);

    SAY("a dead server: requests fail with an errno, never hang");
    CHECK_RC(cowbackup_nbd_open(uri, COWBACKUP_OPEN_WRITE, &d), 0);
    stop_server(server);
    if (d) {
        uint8_t b[4096];
        int rc = cowbackup_driver_read(d, 0, b, sizeof b);
        CHECK(rc == -ECONNRESET || rc == -EPIPE || rc == -ECONNREFUSED || rc == -ENOENT || rc == -EIO);
        CHECK(strstr(cowbackup_last_error(), "NBD") != NULL);
        cowbackup_driver_free(d);
    }
    unlink(sock);
    rmdir(dir);
    return test_finish();
}
