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
