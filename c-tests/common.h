/* Shared helpers of the C tests: loud checks and a C-implemented memory driver with
 * fault injection, an in-flight counter and a release counter. */
#ifndef COWBACKUP_TEST_COMMON_H
#define COWBACKUP_TEST_COMMON_H

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cowbackup.h"

extern int test_failures;

/* Print what is being checked. */
#define SAY(...) do { printf("[%s] ", test_name); printf(__VA_ARGS__); printf("\n"); fflush(stdout); } while (0)

/* Fail loudly (and count it) when cond is false. */
#define CHECK(cond) do { \
    if (!(cond)) { \
        fprintf(stderr, "FAIL %s:%d: %s (last error: \"%s\")\n", __FILE__, __LINE__, #cond, cowbackup_last_error()); \
        test_failures++; \
    } } while (0)

/* Check that expr returns want (0 or -errno). */
#define CHECK_RC(expr, want) do { \
    int rc_ = (expr); \
    if (rc_ != (want)) { \
        fprintf(stderr, "FAIL %s:%d: %s returned %d (%s), want %d (%s); last error: \"%s\"\n", __FILE__, __LINE__, \
                #expr, rc_, strerror(-rc_), (want), strerror(-(want)), cowbackup_last_error()); \
        test_failures++; \
    } } while (0)

/* Check that expr fails with -err and that cowbackup_last_error() now names fn. */
#define CHECK_ERR(expr, err, fn) do { \
    int rc_ = (expr); \
    const char *msg_ = cowbackup_last_error(); \
    if (rc_ != -(err)) { \
        fprintf(stderr, "FAIL %s:%d: %s returned %d, want %d (%s); last error: \"%s\"\n", __FILE__, __LINE__, \
                #expr, rc_, -(err), strerror(err), msg_); \
        test_failures++; \
    } else if (msg_ == NULL || strstr(msg_, fn) == NULL) { \
        fprintf(stderr, "FAIL %s:%d: %s: last error \"%s\" does not name %s\n", __FILE__, __LINE__, #expr, \
                msg_ ? msg_ : "(null)", fn); \
        test_failures++; \
    } } while (0)

/* Abort the test program at once (for setup failures that make the rest meaningless). */
#define REQUIRE(cond) do { \
    if (!(cond)) { \
        fprintf(stderr, "FATAL %s:%d: %s (last error: \"%s\")\n", __FILE__, __LINE__, #cond, cowbackup_last_error()); \
        exit(1); \
    } } while (0)

/* End of main: print the verdict and return the exit code. */
int test_finish(void);

/* A memory block device implemented in C. */
typedef struct cmem {
    uint8_t *data;
    uint64_t size;
    pthread_mutex_t lock;   /* protects data when `locked` */
    int locked;             /* take `lock` in every op (0: the library must serialize) */
    unsigned slow_us;       /* sleep this long inside each read/write */
    uint64_t data_end;      /* block_status: DATA below, ZERO from here (0: all DATA) */
    /* Fault injection: a read (write, write_zeroes) overlapping [off, off + len) returns
     * -read_errno (-write_errno) while that is non-zero. */
    _Atomic int read_errno, write_errno;
    uint64_t read_fail_off, read_fail_len, write_fail_off, write_fail_len;
    /* Observations. */
    atomic_int inflight, max_inflight;
    atomic_int released;
    atomic_ulong reads, writes;
} cmem;

extern const char *test_name;
extern const cowbackup_driver_ops cmem_ops;

/* A new cmem of size bytes, every byte `fill`; locked = 1. */
cmem *cmem_new(uint64_t size, uint8_t fill);
/* Free the memory (after the driver's release, or when no driver was made). */
void cmem_destroy(cmem *m);
/* Make a driver over m with the full ops table; REQUIREs success. */
cowbackup_driver *cmem_driver(cmem *m, uint32_t flags);
/* Fill buf with pseudo-random bytes from *seed. */
void fill_random(uint8_t *buf, size_t len, uint64_t *seed);
uint64_t next_random(uint64_t *seed);
/* Read a whole driver into a new buffer (REQUIREs success). */
uint8_t *read_all(cowbackup_driver *d, uint64_t size);
/* Query a job (REQUIREs success). */
cowbackup_job_info query(cowbackup_job *job);
/* Poll until the job is in `state` or has ended; gives up after timeout_ms. */
cowbackup_job_info wait_state(cowbackup_job *job, uint32_t state, int timeout_ms);
/* Name of a state, for messages. */
const char *state_name(uint32_t state);
/* Offset of the first difference of a and b, or -1. */
long long first_diff(const uint8_t *a, const uint8_t *b, uint64_t len);
void sleep_ms(int ms);

#endif
