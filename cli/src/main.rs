//! `cowbackup`: the command line of the cowbackup library.
//!
//! Exit status: 0 success, 1 the work failed, 2 a usage error. Errors are one line on
//! stderr: `cowbackup: error: …`.

mod backup;
mod bitmap;
mod ctl;
mod progress;
mod serve;
mod util;

use clap::{Parser, Subcommand};

/// Point-in-time backups of block devices and images, dirty bitmaps, NBD and QMP.
#[derive(Debug, Parser)]
#[command(name = "cowbackup", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Back up SRC into DST: full, or incremental with a persistent dirty bitmap.
    Backup(backup::BackupArgs),
    /// Work with persistent dirty bitmap files.
    #[command(subcommand)]
    Bitmap(bitmap::BitmapCmd),
    /// Export an image read-only over NBD until SIGINT or SIGTERM; prints its URI.
    Serve(serve::ServeArgs),
    /// Send one QMP command to a control socket (the nbdkit filter's, QEMU's) and print
    /// its return value as JSON.
    Ctl(ctl::CtlArgs),
}

fn main() {
    // Before any thread starts: SIGINT/SIGTERM are taken by sigwait (serve stops, backup
    // cancels its job), never by a default handler in the middle of a write.
    util::block_signals();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Backup(a) => backup::run(a),
        Command::Bitmap(c) => bitmap::run(c),
        Command::Serve(a) => serve::run(a),
        Command::Ctl(a) => ctl::run(a),
    };
    if let Err(e) = result {
        eprintln!("cowbackup: error: {e}");
        std::process::exit(e.exit_code());
    }
}
