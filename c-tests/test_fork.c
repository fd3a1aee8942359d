/* fork() with a running job (issue 16, defect 8): jobs do not survive into the child.
 * The child frees its copies of the handles (as an exit-time cleanup would) and exits:
 * nothing is printed, nothing hangs, nothing crashes; the parent's job completes exact. */
#include <sys/wait.h>
#include <unistd.h>

#include "common.h"

const char *test_name = "fork";

int main(void)
{
    const uint64_t size = 8u << 20;
    cmem *src = cmem_new(size, 0);
    uint64_t seed = 7;
    fill_random(src->data, size, &seed);
    uint8_t *before = malloc(size);
    REQUIRE(before);
    memcpy(before, src->data, size);
    cmem *dst = cmem_new(size, 0xEE);
    cowbackup_driver *s = cmem_driver(src, 0), *t = cmem_driver(dst, 0);
    cowbackup_options *o = cowbackup_options_new();
    REQUIRE(o);
    CHECK_RC(cowbackup_options_set_speed(o, 16u << 20), 0); /* still running at the fork */
    cowbackup_job *job = NULL;
    CHECK_RC(cowbackup_backup_start(s, t, o, &job), 0);
    REQUIRE(job);
    cowbackup_options_free(o);

    int errpipe[2];
    REQUIRE(pipe(errpipe) == 0);
    fflush(stdout);
    pid_t pid = fork();
    REQUIRE(pid >= 0);
    if (pid == 0) {
        /* The child: stderr into the pipe; free everything like an exit-time cleanup. */
        dup2(errpipe[1], 2);
        close(errpipe[0]);
        cowbackup_job_free(job);
        cowbackup_driver_free(s);
        cowbackup_driver_free(t);
        /* The job's memory is left alone in the child on purpose (its locks may be held by
         * threads that do not exist here): end by exec, so a leak checker (valgrind) does
         * not count that as the child's leak. */
        execl("/bin/true", "true", (char *)NULL);
        _exit(0);
    }
    close(errpipe[1]);
    char buf[4096];
    ssize_t n, total = 0;
    while ((n = read(errpipe[0], buf + total, sizeof buf - 1 - (size_t)total)) > 0)
        total += n;
    buf[total] = 0;
    close(errpipe[0]);
    int status = 0;
    REQUIRE(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    if (total > 0)
        fprintf(stderr, "FAIL: the child printed on stderr:\n%s\n", buf);
    CHECK(total == 0);

    /* The parent's job is unaffected: it completes with an exact image. */
    for (uint64_t off = 0; off < size; off += 1u << 20) {
        CHECK_RC(cowbackup_cow_before_write(job, off, 4096), 0);
        memset(src->data + off, 0x55, 4096);
    }
    CHECK_RC(cowbackup_job_wait(job), 0);
    CHECK(first_diff(dst->data, before, size) == -1);
    cowbackup_job_free(job);
    cowbackup_driver_free(s);
    cowbackup_driver_free(t);
    cmem_destroy(src);
    cmem_destroy(dst);
    free(before);
    return test_finish();
}
