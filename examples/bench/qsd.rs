//! `qemu-storage-daemon` driven over QMP, shared by the steps that run QEMU's backup job
//! next to cowbackup's (`qemu-guest`, `qemu-guest-disk`, `qemu-incremental`): the daemon's
//! command line ([`qsd_args`]), a minimal QMP client ([`Qmp`]), the running daemon
//! ([`Daemon`], stopped and reaped on drop) and a self-removing scratch directory
//! ([`TempDir`]).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// How long the daemon's QMP socket may take to accept a connection.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a QMP command may take to answer.
pub const QMP_TIMEOUT: Duration = Duration::from_secs(30);

/// A directory this step created (it must not exist before), removed with its contents
/// on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(parent: &Path, tag: &str) -> Result<TempDir, String> {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
        let p = parent.join(format!("bench-{tag}-{}", std::process::id()));
        std::fs::create_dir(&p).map_err(|e| format!("creating {}: {e}", p.display()))?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------
// QMP: one JSON object per line; a command's answer is {"return": ...} or {"error": ...},
// events ({"timestamp": ..., "event": NAME, ...}) can come in between.
// ---------------------------------------------------------------------------------------

/// `s` as a JSON string.
pub fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// The JSON string that starts at `s` (after its opening quote), unescaped, up to its
/// closing quote.
pub fn json_read_str(s: &str) -> Option<String> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?).unwrap_or('?'));
                }
                c => out.push(c),
            },
            c => out.push(c),
        }
    }
    None
}

/// The string value of the first `"key": "..."` in `line` (at any depth).
pub fn json_get_str(line: &str, key: &str) -> Option<String> {
    let pat = json_str(key);
    let mut from = 0;
    while let Some(i) = line[from..].find(&pat) {
        let rest = line[from + i + pat.len()..].trim_start();
        if let Some(v) = rest.strip_prefix(':') {
            if let Some(v) = v.trim_start().strip_prefix('"') {
                return json_read_str(v);
            }
        }
        from += i + pat.len();
    }
    None
}

/// The number value of the first `"key": N` in `line` (at any depth) at or after `from`.
pub fn json_get_u64(line: &str, key: &str) -> Option<u64> {
    let pat = json_str(key);
    let mut from = 0;
    while let Some(i) = line[from..].find(&pat) {
        let rest = line[from + i + pat.len()..].trim_start();
        if let Some(v) = rest.strip_prefix(':') {
            let v = v.trim_start();
            let end = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
            if end > 0 {
                return v[..end].parse().ok();
            }
        }
        from += i + pat.len();
    }
    None
}

/// The first key of the object on `line`.
pub fn json_first_key(line: &str) -> Option<String> {
    json_read_str(line.trim_start().strip_prefix('{')?.trim_start().strip_prefix('"')?)
}

/// A QMP connection.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events read while waiting for a command's answer.
    events: VecDeque<String>,
}

impl Qmp {
    /// Connect to an accepting socket, read the greeting, leave capabilities negotiation.
    pub fn open(stream: UnixStream) -> Result<Qmp, String> {
        stream.set_read_timeout(Some(Duration::from_millis(200))).map_err(err)?;
        let writer = stream.try_clone().map_err(err)?;
        let mut q = Qmp { reader: BufReader::new(stream), writer, events: VecDeque::new() };
        let greeting = q.line(Instant::now() + QMP_TIMEOUT)?;
        if json_first_key(&greeting).as_deref() != Some("QMP") {
            return Err(format!("not a QMP greeting: {greeting}"));
        }
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    /// The next line, before `deadline`.
    pub fn line(&mut self, deadline: Instant) -> Result<String, String> {
        let mut buf = Vec::new();
        loop {
            match self.reader.read_until(b'\n', &mut buf) {
                Ok(0) => return Err("QMP: the daemon closed the connection".into()),
                Ok(_) if buf.ends_with(b"\n") => return Ok(String::from_utf8_lossy(&buf).trim().to_string()),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("QMP: {e}")),
            }
            if Instant::now() >= deadline {
                return Err("QMP: no answer in time".into());
            }
        }
    }

    /// Run `command` with `args` (a JSON object) and return its answer line; events that
    /// come first are kept for [`Qmp::wait_event`].
    pub fn execute(&mut self, command: &str, args: Option<&str>) -> Result<String, String> {
        let msg = match args {
            Some(a) => format!("{{\"execute\": {}, \"arguments\": {a}}}\n", json_str(command)),
            None => format!("{{\"execute\": {}}}\n", json_str(command)),
        };
        self.writer.write_all(msg.as_bytes()).map_err(|e| format!("QMP {command}: {e}"))?;
        let deadline = Instant::now() + QMP_TIMEOUT;
        loop {
            let line = self.line(deadline).map_err(|e| format!("{command}: {e}"))?;
            match json_first_key(&line).as_deref() {
                Some("return") => return Ok(line),
                Some("error") => {
                    let desc = json_get_str(&line, "desc").unwrap_or(line);
                    return Err(format!("QMP {command} failed: {desc}"));
                }
                _ if json_get_str(&line, "event").is_some() => self.events.push_back(line),
                _ => {}
            }
        }
    }

    /// The next event named `name` (events of other names are dropped).
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<String, String> {
        while let Some(e) = self.events.pop_front() {
            if json_get_str(&e, "event").as_deref() == Some(name) {
                return Ok(e);
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            let line = self.line(deadline).map_err(|e| format!("waiting for {name}: {e}"))?;
            if json_get_str(&line, "event").as_deref() == Some(name) {
                return Ok(line);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// qemu-storage-daemon
// ---------------------------------------------------------------------------------------

/// `qemu-storage-daemon`, or `BENCH_QSD`.
pub fn qsd_program() -> String {
    std::env::var("BENCH_QSD").unwrap_or_else(|_| "qemu-storage-daemon".into())
}

/// The first line of `qemu-storage-daemon --version`; `Err` when it does not run.
pub fn qsd_version() -> Result<String, String> {
    let prog = qsd_program();
    let out = Command::new(&prog).arg("--version").stdin(Stdio::null()).output().map_err(|e| format!("{prog}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{prog} --version: {}", out.status));
    }
    let s = String::from_utf8_lossy(&out.stdout);
    Ok(s.lines().next().unwrap_or("").trim().to_string())
}

/// "QEMU 10.0.2" from "qemu-storage-daemon version 10.0.2 (Debian ...)".
pub fn qemu_name(version_line: &str) -> String {
    let mut w = version_line.split_whitespace();
    match w.position(|x| x == "version").and_then(|_| w.next()) {
        Some(v) => format!("QEMU {v}"),
        None => "QEMU".into(),
    }
}

/// A key=value option value with QEMU's comma escaping.
pub fn opt_val(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// A running `qemu-storage-daemon` serving `src` over NBD with `tgt` as a spare node. It
/// is stopped (SIGTERM, after 5 s SIGKILL) and reaped on drop, on every path.
pub struct Daemon {
    child: Option<Child>,
    /// The daemon's monitor.
    pub qmp: Qmp,
    nbd_sock: PathBuf,
    log: PathBuf,
}

/// The daemon's command line (shown in the report).
pub fn qsd_args(src: &Path, tgt: &Path, nbd_sock: &Path, qmp_sock: &Path) -> Vec<String> {
    vec![
        "--blockdev".into(),
        format!("driver=file,node-name=src-file,filename={}", opt_val(src)),
        "--blockdev".into(),
        "driver=raw,node-name=src,file=src-file".into(),
        "--blockdev".into(),
        format!("driver=file,node-name=tgt-file,filename={}", opt_val(tgt)),
        "--blockdev".into(),
        "driver=raw,node-name=tgt,file=tgt-file".into(),
        "--nbd-server".into(),
        format!("addr.type=unix,addr.path={}", opt_val(nbd_sock)),
        "--export".into(),
        "type=nbd,id=exp0,node-name=src,name=src,writable=on".into(),
        "--chardev".into(),
        format!("socket,id=qmp0,path={},server=on,wait=off", opt_val(qmp_sock)),
        "--monitor".into(),
        "chardev=qmp0".into(),
    ]
}

/// Kill and reap `c` unless it has exited: SIGTERM, then SIGKILL after 5 s.
pub fn stop_child(c: &mut Child) {
    if c.try_wait().ok().flatten().is_some() {
        return;
    }
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    while c.try_wait().ok().flatten().is_none() {
        if t.elapsed() > Duration::from_secs(5) {
            let _ = c.kill();
            let _ = c.wait();
            return;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

impl Daemon {
    /// Start the daemon with sockets and its log in `dir`; wait (at most 10 s) until its
    /// QMP socket accepts, then negotiate QMP. Once QMP answers, every command-line option
    /// has been processed: the NBD export is there.
    pub fn start(src: &Path, tgt: &Path, dir: &Path) -> Result<Daemon, String> {
        let (nbd_sock, qmp_sock, log) = (dir.join("qsd-nbd.sock"), dir.join("qsd-qmp.sock"), dir.join("qsd.log"));
        for p in [&nbd_sock, &qmp_sock] {
            let _ = std::fs::remove_file(p);
        }
        let logf = File::create(&log).map_err(err)?;
        let mut cmd = Command::new(qsd_program());
        cmd.args(qsd_args(src, tgt, &nbd_sock, &qmp_sock));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .map_err(|e| format!("{}: {e}", qsd_program()))?;
        let mut guard = ChildGuard(Some(child));
        let t = Instant::now();
        let stream = loop {
            if let Ok(s) = UnixStream::connect(&qmp_sock) {
                break s;
            }
            if let Ok(Some(st)) = guard.0.as_mut().expect("child").try_wait() {
                return Err(format!("qemu-storage-daemon exited: {st}: {}", log_tail(&log)));
            }
            if t.elapsed() > START_TIMEOUT {
                return Err(format!("qemu-storage-daemon: no QMP socket within 10 s: {}", log_tail(&log)));
            }
            thread::sleep(Duration::from_millis(10));
        };
        let qmp = Qmp::open(stream).map_err(|e| format!("{e}: {}", log_tail(&log)))?;
        Ok(Daemon { child: guard.0.take(), qmp, nbd_sock, log })
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///src?socket={}", self.nbd_sock.display())
    }

    /// `blockdev-backup` of `src` into `tgt` (sync full; `x-perf` with `max_workers`),
    /// its copy-before-write filter named `cbw`. Checks that the NBD export now writes
    /// through that filter: the job put it above `src` and moved `src`'s parents to it.
    pub fn start_backup(&mut self, max_workers: Option<u32>) -> Result<(), String> {
        let perf = max_workers.map(|w| format!(", \"x-perf\": {{\"max-workers\": {w}}}")).unwrap_or_default();
        let args = format!(
            "{{\"job-id\": \"bk\", \"device\": \"src\", \"target\": \"tgt\", \"sync\": \"full\", \
             \"filter-node-name\": \"cbw\"{perf}}}"
        );
        self.qmp.execute("blockdev-backup", Some(&args))?;
        let exports = self.qmp.execute("query-block-exports", None)?;
        match json_get_str(&exports, "node-name") {
            Some(n) if n == "cbw" => Ok(()),
            other => Err(format!(
                "the NBD export is attached to {other:?}, not to the backup's copy-before-write filter: {exports}"
            )),
        }
    }

    /// `blockdev-backup` of `src` into `tgt` with `sync: bitmap`, the dirty bitmap `bitmap`
    /// of `src` and `bitmap-mode: never` (the bitmap stays as it was, so every run copies
    /// the same set). Returns when QEMU has accepted the job.
    pub fn start_bitmap_backup(&mut self, bitmap: &str) -> Result<(), String> {
        let args = format!(
            "{{\"job-id\": \"bk\", \"device\": \"src\", \"target\": \"tgt\", \"sync\": \"bitmap\", \
             \"bitmap\": {}, \"bitmap-mode\": \"never\"}}",
            json_str(bitmap)
        );
        self.qmp.execute("blockdev-backup", Some(&args)).map(|_| ())
    }

    /// Wait for the job's `BLOCK_JOB_COMPLETED` (an error in it fails), then `fdatasync`
    /// the target file.
    pub fn wait_backup(&mut self, tgt: &Path, timeout: Duration) -> Result<(), String> {
        let ev = self.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout)?;
        if json_get_str(&ev, "device").as_deref() != Some("bk") {
            return Err(format!("unexpected job in {ev}"));
        }
        if let Some(e) = json_get_str(&ev, "error") {
            return Err(format!("QEMU's backup failed: {e}"));
        }
        File::open(tgt).and_then(|f| f.sync_data()).map_err(|e| format!("fdatasync {}: {e}", tgt.display()))
    }

    /// `quit`, and wait (at most 10 s) for a clean exit; the drop kills it otherwise.
    pub fn stop(mut self) -> Result<(), String> {
        let _ = self.qmp.execute("quit", None);
        let mut c = self.child.take().expect("child until stop");
        let t = Instant::now();
        let res = loop {
            match c.try_wait() {
                Ok(Some(st)) if st.success() => break Ok(()),
                Ok(Some(st)) => break Err(format!("qemu-storage-daemon exited: {st}: {}", log_tail(&self.log))),
                Ok(None) if t.elapsed() > Duration::from_secs(10) => {
                    break Err("qemu-storage-daemon did not quit within 10 s".to_string())
                }
                Ok(None) => thread::sleep(Duration::from_millis(5)),
                Err(e) => break Err(err(e)),
            }
        };
        stop_child(&mut c);
        res
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            stop_child(c);
        }
    }
}

/// A child that is killed and reaped on drop (until taken).
pub struct ChildGuard(pub Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            stop_child(c);
        }
    }
}

/// The last lines of the daemon's stderr, for error messages.
pub fn log_tail(log: &Path) -> String {
    let s = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
    if tail.is_empty() {
        "(no output)".into()
    } else {
        tail
    }
}
