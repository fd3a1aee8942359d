/* NBD over TLS in C: cowbackup_nbd_server_options_* + cowbackup_nbd_server_start_with with
 * a throwaway PKI made by openssl (CA, server certificate, client certificates for alice and
 * bob), cowbackup_nbd_open_tls as alice (allowed), bob (not on the allow-list), without a
 * certificate (refused), plaintext cowbackup_nbd_open (refused: TLS required), the
 * insecure-address rule (-EPERM), the 0600 Unix socket, and bad input (-EINVAL, nothing
 * changed). Exits 77 (meson: skipped), saying why, when openssl is not installed. */
#include "common.h"

#include <stdarg.h>
#include <sys/stat.h>
#include <unistd.h>

const char *test_name = "nbd_tls";

#define SIZE (4u << 20)

static char dir[] = "/tmp/cowbackup-nbdtls-XXXXXX";

static void sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void sh(const char *fmt, ...)
{
    char cmd[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    char full[4200];
    snprintf(full, sizeof full, "cd %s && (%s) >/dev/null 2>&1", dir, cmd);
    if (system(full) != 0) {
        fprintf(stderr, "FATAL: %s\n", cmd);
        exit(1);
    }
}

static const char *f(const char *name)
{
    static char bufs[8][600];
    static int i;
    char *b = bufs[i++ % 8];
    snprintf(b, 600, "%s/%s", dir, name);
    return b;
}

static void make_pki(void)
{
    const char *ec = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
    sh("openssl req -x509 %s -keyout ca-key.pem -out ca-cert.pem -days 2 -subj '/CN=test CA' "
       "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign", ec);
    sh("printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' > server.ext");
    sh("openssl req %s -keyout server-key.pem -out server.csr -subj '/O=cowbackup/CN=localhost'", ec);
    sh("openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial "
       "-out server-cert.pem -days 2 -extfile server.ext");
    sh("printf 'extendedKeyUsage=clientAuth\\n' > client.ext");
    const char *who[] = {"alice", "bob"};
    for (int i = 0; i < 2; i++) {
        sh("openssl req %s -keyout %s-key.pem -out %s.csr -subj '/O=cowbackup/CN=%s'", ec, who[i], who[i], who[i]);
        sh("openssl x509 -req -in %s.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial "
           "-out %s-cert.pem -days 2 -extfile client.ext", who[i], who[i]);
    }
}

int main(void)
{
    if (system("openssl version >/dev/null 2>&1") != 0) {
        printf("SKIPPED: openssl is not installed (scripts/deps.sh installs it)\n");
        return 77;
    }
    REQUIRE(mkdtemp(dir) != NULL);
    make_pki();

    SAY("bad input: -EINVAL with a message, nothing changed");
    cowbackup_nbd_server_options *o = cowbackup_nbd_server_options_new();
    REQUIRE(o != NULL);
    CHECK_ERR(cowbackup_nbd_server_options_set_tls(NULL, f("server-cert.pem"), f("server-key.pem"), NULL), EINVAL,
              "cowbackup_nbd_server_options_set_tls");
    CHECK_ERR(cowbackup_nbd_server_options_set_tls(o, NULL, f("server-key.pem"), NULL), EINVAL,
              "cowbackup_nbd_server_options_set_tls");
    CHECK_ERR(cowbackup_nbd_server_options_set_tls(o, f("nope.pem"), f("server-key.pem"), NULL), ENOENT,
              "cowbackup_nbd_server_options_set_tls");
    CHECK_ERR(cowbackup_nbd_server_options_set_tls(o, f("server-cert.pem"), f("alice-key.pem"), NULL), EINVAL,
              "cowbackup_nbd_server_options_set_tls");
    CHECK_ERR(cowbackup_nbd_server_options_allow(o, "garbage"), EINVAL, "cowbackup_nbd_server_options_allow");
    CHECK_ERR(cowbackup_nbd_server_options_allow(NULL, "CN=alice"), EINVAL, "cowbackup_nbd_server_options_allow");
    CHECK_ERR(cowbackup_nbd_server_options_set_limits(o, 0, 1000), EINVAL, "cowbackup_nbd_server_options_set_limits");
    CHECK_ERR(cowbackup_nbd_server_options_set_limits(o, 4, 0), EINVAL, "cowbackup_nbd_server_options_set_limits");
    CHECK_ERR(cowbackup_nbd_server_options_set_insecure(NULL, true), EINVAL,
              "cowbackup_nbd_server_options_set_insecure");
    cowbackup_nbd_server_options_free(NULL);

    SAY("a non-loopback TCP address without TLS: -EPERM unless insecure");
    cowbackup_nbd_server *s = NULL;
    CHECK_ERR(cowbackup_nbd_server_start("tcp:0.0.0.0:0", &s), EPERM, "cowbackup_nbd_server_start");
    CHECK_ERR(cowbackup_nbd_server_start_with("tcp:0.0.0.0:0", o, &s), EPERM, "cowbackup_nbd_server_start_with");
    CHECK(s == NULL);
    CHECK_RC(cowbackup_nbd_server_options_set_insecure(o, true), 0);
    CHECK_RC(cowbackup_nbd_server_start_with("tcp:0.0.0.0:0", o, &s), 0);
    cowbackup_nbd_server_stop(s);
    s = NULL;
    CHECK_RC(cowbackup_nbd_server_options_set_insecure(o, false), 0);

    SAY("an allow-list without TLS with a CA: -EINVAL at start");
    cowbackup_nbd_server_options *o2 = cowbackup_nbd_server_options_new();
    REQUIRE(o2 != NULL);
    CHECK_RC(cowbackup_nbd_server_options_allow(o2, "CN=alice"), 0);
    char addr2[700];
    snprintf(addr2, sizeof addr2, "unix:%s", f("s2.sock"));
    CHECK_ERR(cowbackup_nbd_server_start_with(addr2, o2, &s), EINVAL, "cowbackup_nbd_server_start_with");
    CHECK_RC(cowbackup_nbd_server_options_set_tls(o2, f("server-cert.pem"), f("server-key.pem"), NULL), 0);
    CHECK_ERR(cowbackup_nbd_server_start_with(addr2, o2, &s), EINVAL, "cowbackup_nbd_server_start_with");
    CHECK(s == NULL);
    cowbackup_nbd_server_options_free(o2);

    SAY("TLS with client certificates, allow-list: alice by DN");
    CHECK_RC(cowbackup_nbd_server_options_set_tls(o, f("server-cert.pem"), f("server-key.pem"), f("ca-cert.pem")), 0);
    CHECK_ERR(cowbackup_nbd_server_options_allow(o, "sha256:1234"), EINVAL, "cowbackup_nbd_server_options_allow");
    CHECK_RC(cowbackup_nbd_server_options_allow(o, "CN=alice,O=cowbackup"), 0);
    CHECK_RC(cowbackup_nbd_server_options_set_limits(o, 8, 60000), 0);
    char addr[700];
    snprintf(addr, sizeof addr, "unix:%s", f("s.sock"));
    CHECK_RC(cowbackup_nbd_server_start_with(addr, o, &s), 0);
    REQUIRE(s != NULL);
    cowbackup_nbd_server_options_free(o); /* the server copied them */
    struct stat st;
    CHECK(stat(f("s.sock"), &st) == 0 && (st.st_mode & 0777) == 0600);

    cowbackup_driver *mem = NULL;
    CHECK_RC(cowbackup_memory_new(SIZE, &mem), 0);
    uint64_t seed = 5;
    uint8_t *data = malloc(SIZE), *back = malloc(SIZE);
    REQUIRE(data && back);
    fill_random(data, SIZE, &seed);
    CHECK_RC(cowbackup_driver_write(mem, 0, data, SIZE), 0);
    CHECK_RC(cowbackup_nbd_server_add(s, "disk", mem, COWBACKUP_NBD_WRITABLE), 0);
    cowbackup_driver_free(mem);

    char uri[800];
    snprintf(uri, sizeof uri, "nbds+unix:///disk?socket=%s", f("s.sock"));
    cowbackup_driver *d = NULL;
    SAY("cowbackup_nbd_open_tls as alice: read and write over TLS");
    CHECK_RC(cowbackup_nbd_open_tls(uri, COWBACKUP_OPEN_WRITE, f("ca-cert.pem"), f("alice-cert.pem"),
                                    f("alice-key.pem"), &d), 0);
    REQUIRE(d != NULL);
    CHECK_RC(cowbackup_driver_read(d, 0, back, SIZE), 0);
    CHECK(first_diff(data, back, SIZE) == -1);
    memset(data, 0x5a, 65536);
    CHECK_RC(cowbackup_driver_write(d, 0, data, 65536), 0);
    CHECK_RC(cowbackup_driver_flush(d), 0);
    CHECK_RC(cowbackup_driver_read(d, 0, back, 65536), 0);
    CHECK(first_diff(data, back, 65536) == -1);
    cowbackup_driver_free(d);

    SAY("bob (not allowed), no certificate, plaintext: refused, nothing opened");
    d = NULL;
    CHECK(cowbackup_nbd_open_tls(uri, 0, f("ca-cert.pem"), f("bob-cert.pem"), f("bob-key.pem"), &d) < 0);
    CHECK(cowbackup_nbd_open_tls(uri, 0, f("ca-cert.pem"), NULL, NULL, &d) < 0);
    char plain[800];
    snprintf(plain, sizeof plain, "nbd+unix:///disk?socket=%s", f("s.sock"));
    CHECK_ERR(cowbackup_nbd_open(plain, 0, &d), EACCES, "cowbackup_nbd_open");
    CHECK(strstr(cowbackup_last_error(), "TLS") != NULL);
    CHECK_ERR(cowbackup_nbd_open_tls(uri, 0, NULL, NULL, NULL, &d), EINVAL, "cowbackup_nbd_open_tls");
    CHECK_ERR(cowbackup_nbd_open_tls(uri, 0, f("ca-cert.pem"), f("alice-cert.pem"), NULL, &d), EINVAL,
              "cowbackup_nbd_open_tls");
    CHECK_ERR(cowbackup_nbd_open_tls(plain, 0, f("ca-cert.pem"), NULL, NULL, &d), EINVAL, "cowbackup_nbd_open_tls");
    CHECK_ERR(cowbackup_nbd_open_tls(uri, 0x80, f("ca-cert.pem"), NULL, NULL, &d), EINVAL, "cowbackup_nbd_open_tls");
    CHECK(d == NULL);

    cowbackup_nbd_server_stop(s);
    free(data);
    free(back);
    char cmd[700];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    CHECK(system(cmd) == 0);
    return test_finish();
}
