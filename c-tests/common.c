#include "common.h"

#include <time.h>
#include <unistd.h>

int test_failures = 0;

int test_finish(void)
{
    if (test_failures) {
        printf("[%s] FAILED: %d check(s) failed\n", test_name, test_failures);
        return 1;
    }
    printf("[%s] all checks passed\n", test_name);
    return 0;
}

void sleep_ms(int ms)
{
    struct timespec ts = { ms / 1000, (long)(ms % 1000) * 1000000L };
    nanosleep(&ts, NULL);
}

static int overlaps(uint64_t off, uint64_t len, uint64_t foff, uint64_t flen)
{
    return flen && off < foff + flen && foff < off + len;
}

static void enter(cmem *m)
{
    int now = atomic_fetch_add(&m->inflight, 1) + 1;
    int max = atomic_load(&m->max_inflight);
    while (now > max && !atomic_compare_exchange_weak(&m->max_inflight, &max, now)) {
    }
    if (m->locked)
        pthread_mutex_lock(&m->lock);
}

static void leave(cmem *m)
{
    if (m->locked)
        pthread_mutex_unlock(&m->lock);
    atomic_fetch_sub(&m->inflight, 1);
}

static int cmem_read(void *opaque, uint64_t offset, void *buf, size_t len)
{
    cmem *m = opaque;
    int err = atomic_load(&m->read_errno);
    if (offset + len > m->size)
        return -EINVAL; /* the library must never ask this */
    if (err && overlaps(offset, len, m->read_fail_off, m->read_fail_len))
        return -err;
    enter(m);
    if (m->slow_us)
        usleep(m->slow_us);
    memcpy(buf, m->data + offset, len);
    atomic_fetch_add(&m->reads, 1);
    leave(m);
    return 0;
}

static int cmem_write(void *opaque, uint64_t offset, const void *buf, size_t len)
{
    cmem *m = opaque;
    int err = atomic_load(&m->write_errno);
    if (offset + len > m->size)
        return -EINVAL;
    if (err && overlaps(offset, len, m->write_fail_off, m->write_fail_len))
        return -err;
    enter(m);
    if (m->slow_us)
        usleep(m->slow_us);
    memcpy(m->data + offset, buf, len);
    atomic_fetch_add(&m->writes, 1);
    leave(m);
    return 0;
}

static int cmem_write_zeroes(void *opaque, uint64_t offset, uint64_t len)
{
    cmem *m = opaque;
    int err = atomic_load(&m->write_errno);
    if (offset + len > m->size)
        return -EINVAL;
    if (err && overlaps(offset, len, m->write_fail_off, m->write_fail_len))
        return -err;
    enter(m);
    memset(m->data + offset, 0, len);
    leave(m);
    return 0;
}

static int cmem_flush(void *opaque)
{
    (void)opaque;
    return 0;
}

static int cmem_block_status(void *opaque, uint64_t offset, uint64_t len, uint64_t *pnum, uint32_t *status)
{
    cmem *m = opaque;
    if (m->data_end == 0 || offset + len <= m->data_end) {
        *pnum = len;
        *status = COWBACKUP_STATUS_DATA;
    } else if (offset < m->data_end) {
        *pnum = m->data_end - offset;
        *status = COWBACKUP_STATUS_DATA;
    } else {
        *pnum = len;
        *status = COWBACKUP_STATUS_ZERO;
    }
    return 0;
}

static void cmem_release(void *opaque)
{
    cmem *m = opaque;
    atomic_fetch_add(&m->released, 1);
}

const cowbackup_driver_ops cmem_ops = {
    .read = cmem_read,
    .write = cmem_write,
    .write_zeroes = cmem_write_zeroes,
    .flush = cmem_flush,
    .block_status = cmem_block_status,
    .release = cmem_release,
};

cmem *cmem_new(uint64_t size, uint8_t fill)
{
    cmem *m = calloc(1, sizeof(*m));
    REQUIRE(m != NULL);
    m->data = malloc(size);
    REQUIRE(m->data != NULL);
    memset(m->data, fill, size);
    m->size = size;
    m->locked = 1;
    pthread_mutex_init(&m->lock, NULL);
    return m;
}

void cmem_destroy(cmem *m)
{
    if (!m)
        return;
    pthread_mutex_destroy(&m->lock);
    free(m->data);
    free(m);
}

cowbackup_driver *cmem_driver(cmem *m, uint32_t flags)
{
    cowbackup_driver *d = NULL;
    int rc = cowbackup_driver_new(&cmem_ops, sizeof(cmem_ops), m, m->size, flags, &d);
    REQUIRE(rc == 0 && d != NULL);
    return d;
}

uint64_t next_random(uint64_t *seed)
{
    /* splitmix64 */
    uint64_t z = (*seed += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void fill_random(uint8_t *buf, size_t len, uint64_t *seed)
{
    for (size_t i = 0; i < len; i += 8) {
        uint64_t r = next_random(seed);
        size_t n = len - i < 8 ? len - i : 8;
        memcpy(buf + i, &r, n);
    }
}

uint8_t *read_all(cowbackup_driver *d, uint64_t size)
{
    uint8_t *buf = malloc(size);
    REQUIRE(buf != NULL);
    REQUIRE(cowbackup_driver_read(d, 0, buf, size) == 0);
    return buf;
}

cowbackup_job_info query(cowbackup_job *job)
{
    cowbackup_job_info info;
    REQUIRE(cowbackup_job_query(job, &info) == 0);
    return info;
}

cowbackup_job_info wait_state(cowbackup_job *job, uint32_t state, int timeout_ms)
{
    cowbackup_job_info info = query(job);
    for (int t = 0; t < timeout_ms && info.state != state && info.state != COWBACKUP_JOB_COMPLETED &&
                    info.state != COWBACKUP_JOB_FAILED && info.state != COWBACKUP_JOB_CANCELLED;
         t += 10) {
        sleep_ms(10);
        info = query(job);
    }
    return info;
}

const char *state_name(uint32_t state)
{
    switch (state) {
    case COWBACKUP_JOB_CREATED: return "CREATED";
    case COWBACKUP_JOB_RUNNING: return "RUNNING";
    case COWBACKUP_JOB_PAUSED: return "PAUSED";
    case COWBACKUP_JOB_COMPLETED: return "COMPLETED";
    case COWBACKUP_JOB_FAILED: return "FAILED";
    case COWBACKUP_JOB_CANCELLED: return "CANCELLED";
    default: return "?";
    }
}

long long first_diff(const uint8_t *a, const uint8_t *b, uint64_t len)
{
    for (uint64_t i = 0; i < len; i++)
        if (a[i] != b[i])
            return (long long)i;
    return -1;
}
