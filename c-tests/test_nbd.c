/* The NBD server through the C API: start on a Unix socket, export a memory driver and a
 * bitmap, read the export back with a minimal NBD client written here on a raw socket
 * (fixed newstyle, NBD_OPT_LIST, NBD_OPT_GO, NBD_CMD_READ/WRITE/DISC), then the bad-input
 * rules: -EINVAL/-ENOENT/-EEXIST with messages, nothing changed, a user's file never removed. */
#include "common.h"

#include <stdbool.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

const char *test_name = "nbd";

#define SIZE (1u << 20)

static void put32(uint8_t *p, uint32_t v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; }
static void put16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = v; }
static void put64(uint8_t *p, uint64_t v) { put32(p, v >> 32); put32(p + 4, (uint32_t)v); }
static uint32_t get32(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint64_t get64(const uint8_t *p) { return (uint64_t)get32(p) << 32 | get32(p + 4); }

static bool sock_read_all(int fd, void *buf, size_t len) {
    uint8_t *p = buf;
    while (len > 0) {
        ssize_t n = read(fd, p, len);
        if (n <= 0) return false;
        p += n;
        len -= (size_t)n;
    }
    return true;
}

static bool sock_write_all(int fd, const void *buf, size_t len) {
    const uint8_t *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n <= 0) return false;
        p += n;
        len -= (size_t)n;
    }
    return true;
}

static int connect_unix(const char *path) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    REQUIRE(fd >= 0);
    struct timeval tv = { .tv_sec = 30 };
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
    REQUIRE(connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0);
    return fd;
}

static void send_option(int fd, uint32_t opt, const void *data, uint32_t len) {
    uint8_t h[16];
    memcpy(h, "IHAVEOPT", 8);
    put32(h + 8, opt);
    put32(h + 12, len);
    REQUIRE(sock_write_all(fd, h, 16) && sock_write_all(fd, data, len));
}

/* Read one option reply; its data (at most cap bytes kept) and type. */
static uint32_t read_reply(int fd, uint32_t opt, uint8_t *data, uint32_t cap, uint32_t *len) {
    uint8_t h[20];
    REQUIRE(sock_read_all(fd, h, 20));
    CHECK(get64(h) == 0x0003e889045565a9ULL);
    CHECK(get32(h + 8) == opt);
    *len = get32(h + 16);
    REQUIRE(*len <= cap);
    REQUIRE(sock_read_all(fd, data, *len));
    return get32(h + 12);
}

/* Handshake, LIST (expects `disk`), GO `disk`: the connected socket; *size and *flags. */
static int nbd_connect(const char *path, uint64_t *size, uint16_t *flags) {
    int fd = connect_unix(path);
    uint8_t g[18];
    REQUIRE(sock_read_all(fd, g, 18));
    CHECK(memcmp(g, "NBDMAGICIHAVEOPT", 16) == 0);
    CHECK(get16(g + 16) & 1); /* fixed newstyle */
    uint8_t cf[4];
    put32(cf, 1 | 2); /* C_FIXED_NEWSTYLE | C_NO_ZEROES */
    REQUIRE(sock_write_all(fd, cf, 4));

    send_option(fd, 3 /* LIST */, NULL, 0);
    uint8_t data[256];
    uint32_t len;
    bool listed = false;
    for (;;) {
        uint32_t t = read_reply(fd, 3, data, sizeof(data), &len);
        if (t == 1) break; /* ACK */
        CHECK(t == 2);     /* SERVER */
        if (len >= 8 && get32(data) == 4 && memcmp(data + 4, "disk", 4) == 0) listed = true;
    }
    CHECK(listed);

    uint8_t go[4 + 4 + 2];
    put32(go, 4);
    memcpy(go + 4, "disk", 4);
    put16(go + 8, 0);
    send_option(fd, 7 /* GO */, go, sizeof(go));
    for (;;) {
        uint32_t t = read_reply(fd, 7, data, sizeof(data), &len);
        if (t == 1) break;
        CHECK(t == 3); /* INFO */
        if (t == 3 && len == 12 && get16(data) == 0) { /* NBD_INFO_EXPORT */
            *size = get64(data + 2);
            *flags = get16(data + 10);
        }
    }
    return fd;
}

/* A request; the simple reply's error (data read into buf for a successful read). */
static uint32_t request(int fd, uint16_t cmd, uint64_t off, uint32_t len, void *buf) {
    uint8_t r[28];
    put32(r, 0x25609513);
    put16(r + 4, 0);
    put16(r + 6, cmd);
    put64(r + 8, 0x1234 + off);
    put64(r + 16, off);
    put32(r + 24, len);
    REQUIRE(sock_write_all(fd, r, 28));
    if (cmd == 1) REQUIRE(sock_write_all(fd, buf, len));
    uint8_t h[16];
    REQUIRE(sock_read_all(fd, h, 16));
    CHECK(get32(h) == 0x67446698);
    CHECK(get64(h + 8) == 0x1234 + off);
    uint32_t err = get32(h + 4);
    if (cmd == 0 && err == 0) REQUIRE(sock_read_all(fd, buf, len));
    return err;
}

int main(void) {
    char dir[] = "/tmp/cowbackup-nbd-XXXXXX";
    REQUIRE(mkdtemp(dir) != NULL);
    char sock[256], addr[300], file[256];
    snprintf(sock, sizeof(sock), "%s/s.sock", dir);
    snprintf(addr, sizeof(addr), "unix:%s", sock);
    snprintf(file, sizeof(file), "%s/precious", dir);

    cowbackup_driver *mem = NULL;
    REQUIRE(cowbackup_memory_new(SIZE, &mem) == 0);
    uint8_t *pattern = malloc(SIZE);
    REQUIRE(pattern != NULL);
    for (size_t i = 0; i < SIZE; i++) pattern[i] = (uint8_t)(i * 7 + (i >> 12));
    CHECK_RC(cowbackup_driver_write(mem, 0, pattern, SIZE), 0);
    cowbackup_bitmap *bm = NULL;
    REQUIRE(cowbackup_bitmap_new(SIZE, 65536, &bm) == 0);
    CHECK_RC(cowbackup_bitmap_mark(bm, 0, 4096), 0);

    SAY("start on %s, export a memory driver and a bitmap", addr);
    cowbackup_nbd_server *srv = NULL;
    CHECK_RC(cowbackup_nbd_server_start(addr, &srv), 0);
    REQUIRE(srv != NULL);
    CHECK(strcmp(cowbackup_nbd_server_address(srv), addr) == 0);
    CHECK_RC(cowbackup_nbd_server_add(srv, "disk", mem, 0), 0);
    CHECK_RC(cowbackup_nbd_server_add_bitmap(srv, "disk", "b0", bm), 0);
    /* The server holds its own references. */
    cowbackup_bitmap_free(bm);

    SAY("read it back with a raw NBD client");
    uint64_t size = 0;
    uint16_t flags = 0;
    int fd = nbd_connect(sock, &size, &flags);
    CHECK(size == SIZE);
    CHECK(flags & 2);        /* READ_ONLY */
    CHECK(flags & (1 << 8)); /* CAN_MULTI_CONN */
    uint8_t *buf = malloc(65536);
    REQUIRE(buf != NULL);
    CHECK(request(fd, 0, 4096, 65536, buf) == 0);
    CHECK(memcmp(buf, pattern + 4096, 65536) == 0);
    CHECK(request(fd, 0, SIZE - 100, 4096, buf) == 22); /* past the end: NBD_EINVAL */
    CHECK(request(fd, 1, 0, 16, buf) == 1);             /* read-only: NBD_EPERM */
    CHECK(request(fd, 0, SIZE - 16, 16, buf) == 0);     /* still usable */
    CHECK(memcmp(buf, pattern + SIZE - 16, 16) == 0);
    uint8_t disc[28] = { 0 };
    put32(disc, 0x25609513);
    put16(disc + 6, 2);
    CHECK(sock_write_all(fd, disc, 28));
    close(fd);

    SAY("bad input: -EINVAL / -ENOENT / -EEXIST with a message, nothing changed");
    cowbackup_nbd_server *none = NULL;
    CHECK_ERR(cowbackup_nbd_server_start(NULL, &none), EINVAL, "cowbackup_nbd_server_start");
    CHECK_ERR(cowbackup_nbd_server_start(addr, NULL), EINVAL, "cowbackup_nbd_server_start");
    CHECK_ERR(cowbackup_nbd_server_start("carrier-pigeon:1", &none), EINVAL, "cowbackup_nbd_server_start");
    CHECK_ERR(cowbackup_nbd_server_start(addr, &none), EADDRINUSE, "cowbackup_nbd_server_start");
    FILE *f = fopen(file, "w");
    REQUIRE(f != NULL);
    fputs("keep me", f);
    fclose(f);
    char faddr[300];
    snprintf(faddr, sizeof(faddr), "unix:%s", file);
    CHECK_ERR(cowbackup_nbd_server_start(faddr, &none), EEXIST, "cowbackup_nbd_server_start");
    struct stat st;
    CHECK(stat(file, &st) == 0 && S_ISREG(st.st_mode) && st.st_size == 7);
    CHECK(none == NULL);
    CHECK_ERR(cowbackup_nbd_server_add(NULL, "x", mem, 0), EINVAL, "cowbackup_nbd_server_add");
    CHECK_ERR(cowbackup_nbd_server_add(srv, NULL, mem, 0), EINVAL, "cowbackup_nbd_server_add");
    CHECK_ERR(cowbackup_nbd_server_add(srv, "x", NULL, 0), EINVAL, "cowbackup_nbd_server_add");
    CHECK_ERR(cowbackup_nbd_server_add(srv, "x", mem, 0x80), EINVAL, "cowbackup_nbd_server_add");
    CHECK_ERR(cowbackup_nbd_server_add(srv, "disk", mem, 0), EEXIST, "cowbackup_nbd_server_add");
    cowbackup_bitmap *small = NULL;
    REQUIRE(cowbackup_bitmap_new(SIZE / 2, 65536, &small) == 0);
    CHECK_ERR(cowbackup_nbd_server_add_bitmap(srv, "disk", "b1", small), EINVAL, "cowbackup_nbd_server_add_bitmap");
    CHECK_ERR(cowbackup_nbd_server_add_bitmap(srv, "nope", "b1", small), ENOENT, "cowbackup_nbd_server_add_bitmap");
    CHECK_ERR(cowbackup_nbd_server_add_bitmap(srv, "disk", NULL, small), EINVAL, "cowbackup_nbd_server_add_bitmap");
    cowbackup_bitmap_free(small);
    CHECK_ERR(cowbackup_nbd_server_remove(srv, "nope"), ENOENT, "cowbackup_nbd_server_remove");
    CHECK_ERR(cowbackup_nbd_server_remove(NULL, "disk"), EINVAL, "cowbackup_nbd_server_remove");
    CHECK(cowbackup_nbd_server_address(NULL) == NULL);

    SAY("a writable export: a write lands in the driver");
    cowbackup_driver *rw = NULL;
    REQUIRE(cowbackup_memory_new(SIZE, &rw) == 0);
    CHECK_RC(cowbackup_nbd_server_remove(srv, "disk"), 0);
    CHECK_RC(cowbackup_nbd_server_add(srv, "disk", rw, COWBACKUP_NBD_WRITABLE), 0);
    fd = nbd_connect(sock, &size, &flags);
    CHECK(!(flags & 2));
    memcpy(buf, "hello, nbd", 10);
    CHECK(request(fd, 1, 8192, 10, buf) == 0);
    CHECK(request(fd, 3, 0, 0, buf) == 0); /* FLUSH */
    uint8_t back[10];
    CHECK_RC(cowbackup_driver_read(rw, 8192, back, 10), 0);
    CHECK(memcmp(back, "hello, nbd", 10) == 0);

    SAY("TCP on port 0: the bound port is reported");
    cowbackup_nbd_server *tcp = NULL;
    CHECK_RC(cowbackup_nbd_server_start("tcp:127.0.0.1:0", &tcp), 0);
    if (tcp) {
        const char *a = cowbackup_nbd_server_address(tcp);
        CHECK(strncmp(a, "tcp:127.0.0.1:", 14) == 0 && strcmp(a, "tcp:127.0.0.1:0") != 0);
    }
    cowbackup_nbd_server_stop(tcp);

    SAY("stop with a client connected: it is disconnected, the socket file removed");
    cowbackup_nbd_server_stop(srv);
    uint8_t c;
    CHECK(read(fd, &c, 1) <= 0);
    close(fd);
    CHECK(access(sock, F_OK) != 0);
    cowbackup_nbd_server_stop(NULL);

    cowbackup_driver_free(mem);
    cowbackup_driver_free(rw);
    free(buf);
    free(pattern);
    unlink(file);
    rmdir(dir);
    return test_finish();
}
