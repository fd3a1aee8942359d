/*
 * What cowbackup.c (the filter: start-up, the write path, the start-up job) and control.c
 * (the QMP control socket: backups started at run time) share. Internal to the filter.
 */
#ifndef COWBACKUP_NBDKIT_FILTER_H
#define COWBACKUP_NBDKIT_FILTER_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cowbackup.h"

/* Set in .after_fork on the main thread before any connection or control thread runs;
 * read-only afterwards (the handles are freed in .cleanup, after those threads end). */
extern uint64_t disk_size;
extern cowbackup_driver *source_driver; /* the plugin as a read-only driver: every job's
                                           source; NULL when neither backup= nor control= */
extern cowbackup_bitmap *bitmap;        /* bitmap= (persistent), NULL without it */
extern char *bitmap_path;               /* bitmap=, absolute */
extern uint64_t cluster_size;           /* cluster-size= (also the control jobs' default) */

/* With control=, the write path holds hook_lock for reading across a whole client write (marks,
 * copy-before-write, the plugin's write); the control thread takes it for writing to
 * change the set of jobs and bitmaps the write path uses: taking it drains the writes in
 * flight, so a job started under it has a point in time no write straddles. Writer
 * preferring (a stream of client writes cannot starve the control thread). */
extern pthread_rwlock_t hook_lock;

/* Files beside a backup (cowbackup.c): a new temporary file `path`.tmp-XXXXXXXX (0600,
 * O_EXCL | O_NOFOLLOW), and its atomic replacement of `path`. */
int create_temp(const char *path, char **name);
int replace_file(int fd, const char *tmp, const char *path, const char *data, size_t len);

/* control.c. */
int control_config(const char *value);           /* .config: control=PATH */
bool control_configured(void);
int control_check(void);                          /* .config_complete: the path */
int control_start(char *err, size_t errlen);      /* .after_fork: bind and listen */
int control_run(char *err, size_t errlen);        /* .after_fork, last: the control thread */
void control_stop(void);                          /* .cleanup: before the jobs are freed */
void control_free(void);                          /* .cleanup: last */
void control_unload(void);
/* The write path, under hook_lock (read): mark the control socket's bitmaps, run the
 * hook of its job. 0 or -1 with *err (errno) set and the error logged. */
int control_before_write(const char *what, uint32_t count, uint64_t offset, int *err);
/* The start-up job (backup=) as QMP sees it: job id "backup0". Called by cowbackup.c. */
void control_startup_job(cowbackup_job *j);
void control_startup_trace(const cowbackup_trace_event *ev);
void control_startup_completed(int ret, const char *line);

#endif
