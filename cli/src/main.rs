//! `cowbackup`: the command line of the cowbackup library.
//!
//! Exit status: 0 success, 1 the work failed, 2 a usage error. Errors are one line on
//! stderr: `cowbackup: error: …`.

mod backup;
mod bitmap;
mod ctl;
mod progress;
mod pull;
mod repo;
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
    /// Check a backup against its manifest (every copied cluster re-read and hashed).
    Verify(repo::VerifyArgs),
    /// Restore a chain of backups (full, then incrementals: their manifests) into a new
    /// file, a block device or an NBD export.
    Restore(repo::RestoreArgs),
    /// Merge consecutive backups of a chain into one backup with its own manifest.
    Consolidate(repo::ConsolidateArgs),
    /// Work with persistent dirty bitmap files.
    #[command(subcommand)]
    Bitmap(bitmap::BitmapCmd),
    /// Export an image read-only over NBD until SIGINT or SIGTERM; prints its URI.
    Serve(serve::ServeArgs),
    /// Incremental from an NBD server that exports a dirty bitmap (qemu:dirty-bitmap:NAME):
    /// copy just the dirty extents into a new target.
    Pull(pull::PullArgs),
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
        Command::Verify(a) => repo::run_verify(a),
        Command::Restore(a) => repo::run_restore(a),
        Command::Consolidate(a) => repo::run_consolidate(a),
        Command::Serve(a) => serve::run(a),
        Command::Ctl(a) => ctl::run(a),
        Command::Pull(a) => pull::run(a),
    };
    if let Err(e) = result {
        eprintln!("cowbackup: error: {e}");
        std::process::exit(e.exit_code());
    }
}
