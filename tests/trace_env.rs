//! `COWBACKUP_TRACE=1` prints trace events to stderr. Its own test binary: the
//! environment is process-wide.

use std::process::Command;

#[test]
fn cowbackup_trace_env_prints_events_to_stderr() {
    // Re-run this test binary as a child with the variable set, in child mode.
    if std::env::var_os("COWBACKUP_TRACE_CHILD").is_some() {
        use cowbackup::{backup_start, BackupOptions, MemDriver};
        use std::sync::Arc;
        let source = Arc::new(MemDriver::from_bytes(&[7u8; 1 << 20]).unwrap());
        let target = Arc::new(MemDriver::new(1 << 20).unwrap());
        let job = backup_start(source, target, BackupOptions::default()).unwrap();
        job.wait().unwrap();
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "cowbackup_trace_env_prints_events_to_stderr", "--nocapture"])
        .env("COWBACKUP_TRACE", "1")
        .env("COWBACKUP_TRACE_CHILD", "1")
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cowbackup: backup_chunk_copied job="), "stderr: {err}");
    assert!(err.contains("cowbackup: backup_state job=") && err.contains("to=Completed"), "stderr: {err}");
}
