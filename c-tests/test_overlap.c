/* QEMU iotest 056's overlapping writes, through the C API: the second write must not copy
 * again the cluster the first one already copied. */
#include "common.h"

const char *test_name = "overlap";

#define MiB (1024 * 1024)
#define KiB 1024

static void hook_and_write(cowbackup_job *job, cowbackup_driver *src, uint64_t off, uint64_t len, uint8_t byte)
{
    uint8_t *buf = malloc(len);
    REQUIRE(buf != NULL);
    memset(buf, byte, len);
    CHECK_RC(cowbackup_cow_before_write(job, off, len), 0);
    CHECK_RC(cowbackup_driver_write(src, off, buf, len), 0);
    free(buf);
}

int main(void)
{
    const uint64_t size = 2 * MiB;
    cmem *sm = cmem_new(size, 0x42), *tm = cmem_new(size, 0);
    cowbackup_driver *src = cmem_driver(sm, 0), *dst = cmem_driver(tm, 0);
    cowbackup_options *o = cowbackup_options_new();
    CHECK_RC(cowbackup_options_set_cluster_size(o, 64 * KiB), 0);
    CHECK_RC(cowbackup_options_set_workers(o, 1), 0);
    CHECK_RC(cowbackup_options_set_max_chunk(o, 64 * KiB), 0);
    CHECK_RC(cowbackup_options_set_speed(o, 1), 0); /* background copy held back */
    cowbackup_job *job = NULL;
    REQUIRE(cowbackup_backup_start(src, dst, o, &job) == 0);
    CHECK_RC(cowbackup_job_pause(job), 0);

    SAY("hook + write 0x23 at [1 MiB + 64 KiB, +64 KiB): one cow request of 64 KiB");
    hook_and_write(job, src, MiB + 64 * KiB, 64 * KiB, 0x23);
    cowbackup_job_info info = query(job);
    CHECK(info.cow_requests == 1);
    CHECK(info.cow_bytes == 64 * KiB);

    SAY("hook + write 0x66 at [1 MiB, 2 MiB): the middle cluster is not copied again");
    hook_and_write(job, src, MiB, MiB, 0x66);
    info = query(job);
    printf("[%s] cow_requests %llu, cow_bytes %llu\n", test_name, (unsigned long long)info.cow_requests,
           (unsigned long long)info.cow_bytes);
    CHECK(info.cow_requests == 2);
    CHECK(info.cow_bytes == 1 * MiB);

    SAY("resume, wait: completed, the target reads 0x42 everywhere");
    CHECK_RC(cowbackup_job_set_speed(job, 0), 0);
    CHECK_RC(cowbackup_job_resume(job), 0);
    CHECK_RC(cowbackup_job_wait(job), 0);
    info = query(job);
    CHECK(info.state == COWBACKUP_JOB_COMPLETED);
    CHECK(info.offset == size && info.bytes_copied == size);
    uint8_t *t = read_all(dst, size);
    uint64_t bad = 0, first = 0;
    for (uint64_t i = 0; i < size; i++)
        if (t[i] != 0x42 && bad++ == 0)
            first = i;
    CHECK(bad == 0);
    if (bad)
        fprintf(stderr, "%llu bytes of the target are not 0x42, the first at %llu\n", (unsigned long long)bad,
                (unsigned long long)first);
    free(t);
    CHECK(sm->data[MiB] == 0x66 && sm->data[MiB + 64 * KiB] == 0x66 && sm->data[MiB - 1] == 0x42);

    cowbackup_job_free(job);
    cowbackup_options_free(o);
    cowbackup_driver_free(src);
    cowbackup_driver_free(dst);
    cmem_destroy(sm);
    cmem_destroy(tm);
    return test_finish();
}
