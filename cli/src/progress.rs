//! Progress of long work on stderr: an indicatif bar on a terminal, or (when forced on
//! something that is not a terminal) a plain line at most once a second.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// When to show progress (`-p` = `--progress=auto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum When {
    /// A bar when stderr is a terminal, nothing otherwise.
    Auto,
    /// Always: a bar on a terminal, a line a second otherwise (logs, tests).
    Always,
    /// Never.
    Never,
}

/// The `-p` / `--progress[=WHEN]` option of the commands that run a job (flattened into
/// their arguments).
#[derive(Debug, clap::Args)]
pub struct ProgressArg {
    /// Show progress on stderr: a bar when it is a terminal (-p), or --progress=always (a
    /// line a second when not a terminal) / never.
    #[arg(
        short = 'p',
        long = "progress",
        value_enum,
        value_name = "WHEN",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "auto"
    )]
    pub when: Option<When>,
}

/// A progress display of `total` bytes.
pub enum Progress {
    /// Nothing shown.
    Hidden,
    /// The bar.
    Bar(ProgressBar),
    /// Plain lines; the time of the last one.
    Lines { total: u64, last: Option<Instant> },
}

impl Progress {
    /// Start showing progress of `total` bytes per `when`.
    pub fn new(when: Option<When>, total: u64) -> Progress {
        let tty = std::io::stderr().is_terminal();
        match when {
            None | Some(When::Never) => Progress::Hidden,
            Some(When::Auto) if !tty => Progress::Hidden,
            Some(_) if tty => {
                let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr_with_hz(10));
                let style = ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} ({binary_bytes_per_sec}, {eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("#>-");
                bar.set_style(style);
                Progress::Bar(bar)
            }
            Some(_) => Progress::Lines { total, last: None },
        }
    }

    /// Show `done` bytes of the total.
    pub fn update(&mut self, done: u64) {
        match self {
            Progress::Hidden => {}
            Progress::Bar(b) => b.set_position(done),
            Progress::Lines { total, last } => {
                if last.map_or(true, |t| t.elapsed() >= Duration::from_secs(1)) {
                    *last = Some(Instant::now());
                    line(done, *total);
                }
            }
        }
    }

    /// The work ended: show the final count and stop.
    pub fn finish(&mut self, done: u64) {
        match self {
            Progress::Hidden => {}
            Progress::Bar(b) => {
                b.set_position(done);
                b.abandon();
            }
            Progress::Lines { total, .. } => line(done, *total),
        }
    }
}

fn line(done: u64, total: u64) {
    let pct = if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 };
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "progress: {pct:.1}% ({done}/{total} bytes)");
}

/// How a job the command ran ended ([`run_to_end`]).
pub struct Ended {
    /// The job's last counters.
    pub info: cowbackup::JobInfo,
    /// Seconds from `started` to the end.
    pub secs: f64,
    /// The one-line error to report, `None` when the job completed.
    pub error: Option<String>,
}

impl Ended {
    /// The result as `--json` shows it.
    pub fn result_name(&self) -> &'static str {
        match self.info.state {
            cowbackup::JobState::Completed => "completed",
            cowbackup::JobState::Cancelled => "cancelled",
            _ => "failed",
        }
    }
}

/// Run `job` to its end, showing its progress per `when`: SIGINT / SIGTERM (blocked by
/// `util::block_signals` at start) cancel it, and the command then fails like any
/// cancelled job, naming the signal.
pub fn run_to_end(
    job: std::sync::Arc<cowbackup::Job>,
    when: Option<When>,
    started: Instant,
) -> crate::util::CliResult<Ended> {
    use std::sync::atomic::{AtomicI32, Ordering};
    let signalled = std::sync::Arc::new(AtomicI32::new(0));
    {
        let (job, signalled) = (job.clone(), signalled.clone());
        std::thread::Builder::new()
            .name("cowbackup-signals".into())
            .spawn(move || {
                signalled.store(crate::util::wait_signal(), Ordering::SeqCst);
                job.cancel();
            })
            .map_err(|e| crate::util::failed(format!("starting the signal thread: {e}")))?;
    }
    let mut progress = Progress::new(when, job.len());
    let result = loop {
        match job.wait_timeout(Duration::from_millis(100)) {
            Some(r) => break r,
            None => progress.update(job.info().offset),
        }
    };
    let info = job.info();
    progress.finish(info.offset);
    let secs = started.elapsed().as_secs_f64();
    let sig = signalled.load(Ordering::SeqCst);
    let error = match &result {
        Ok(()) => None,
        Err(_) if sig != 0 && info.state == cowbackup::JobState::Cancelled => {
            Some(format!("cancelled by {}", crate::util::signal_name(sig)))
        }
        Err(e) => Some(e.to_string()),
    };
    Ok(Ended { info, secs, error })
}
