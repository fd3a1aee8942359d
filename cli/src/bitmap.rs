//! `cowbackup bitmap create|info|dump|clear|merge` on persistent dirty bitmap files.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::{Args, Subcommand};
use cowbackup::{BitmapFlags, BlockDriver, DirtyBitmap, FileDriver, OpenFlags, DEFAULT_GRANULARITY};
use serde_json::json;

use crate::util::{failed, is_nbd_uri, parse_size, print_json, usage, uuid_text, CliResult};

/// The `bitmap` subcommands.
#[derive(Debug, Subcommand)]
pub enum BitmapCmd {
    /// Create a new bitmap file (all clean) for a device of --size bytes or of the size of
    /// --like (an image or block device).
    Create(CreateArgs),
    /// Show size, granularity, dirty bytes, generation, uuid and flags.
    Info(FileArgs),
    /// List the dirty extents: "OFFSET LENGTH" in bytes, one per line, or JSON.
    Dump(FileArgs),
    /// Clear every bit (the next incremental copies nothing that was marked before).
    Clear(FileArgs),
    /// Merge (union) the bits of SRC files into DST.
    Merge(MergeArgs),
}

/// Arguments of `bitmap create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The new bitmap file (an existing file is never replaced).
    pub file: PathBuf,
    /// Size in bytes of the device it tracks (e.g. 10G).
    #[arg(long, value_parser = parse_size, value_name = "BYTES", required_unless_present = "like", conflicts_with = "like")]
    pub size: Option<u64>,
    /// Take the size from this image file or block device.
    #[arg(long, value_name = "IMAGE")]
    pub like: Option<PathBuf>,
    /// Bytes per bit, a power of two from 512 to 2G (e.g. 64K).
    #[arg(long, value_parser = parse_size, value_name = "SIZE", default_value_t = DEFAULT_GRANULARITY)]
    pub granularity: u64,
    /// Print the new bitmap's info as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of the subcommands that take one bitmap file.
#[derive(Debug, Args)]
pub struct FileArgs {
    /// The bitmap file.
    pub file: PathBuf,
    /// JSON output.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `bitmap merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The bitmap file that receives the bits.
    pub dst: PathBuf,
    /// Bitmap files whose bits are added (same device size; any granularity).
    #[arg(required = true)]
    pub src: Vec<PathBuf>,
    /// Print the merged bitmap's info as JSON.
    #[arg(long)]
    pub json: bool,
}

fn open(path: &Path) -> CliResult<Arc<DirtyBitmap>> {
    DirtyBitmap::open(path).map_err(|e| failed(format!("bitmap {}: {e}", path.display())))
}

fn flag_names(f: BitmapFlags) -> Vec<&'static str> {
    let mut v = Vec::new();
    if f.contains(BitmapFlags::RECORDING) {
        v.push("recording");
    }
    if f.contains(BitmapFlags::BUSY) {
        v.push("busy");
    }
    if f.contains(BitmapFlags::PERSISTENT) {
        v.push("persistent");
    }
    v
}

fn info_json(path: &Path, bm: &DirtyBitmap) -> serde_json::Value {
    let i = bm.info();
    json!({
        "file": path.display().to_string(),
        "size": i.size,
        "granularity": i.granularity,
        "count": i.count,
        "generation": i.generation,
        "uuid": uuid_text(&i.uuid),
        "flags": flag_names(i.flags),
    })
}

fn print_info(path: &Path, bm: &DirtyBitmap, as_json: bool) -> CliResult<()> {
    if as_json {
        return print_json(&info_json(path, bm));
    }
    let i = bm.info();
    println!("file: {}", path.display());
    println!("size: {}", i.size);
    println!("granularity: {}", i.granularity);
    println!("count: {}", i.count);
    println!("generation: {}", i.generation);
    println!("uuid: {}", uuid_text(&i.uuid));
    println!("flags: {}", flag_names(i.flags).join(","));
    Ok(())
}

/// Run a `bitmap` subcommand.
pub fn run(cmd: BitmapCmd) -> CliResult<()> {
    match cmd {
        BitmapCmd::Create(a) => {
            let size = match (a.size, &a.like) {
                (Some(s), _) => s,
                (None, Some(img)) => {
                    let s = img.to_string_lossy();
                    if is_nbd_uri(&s) {
                        return Err(usage("--like takes an image file or block device"));
                    }
                    FileDriver::open(img, OpenFlags::empty()).map_err(|e| failed(format!("--like: {e}")))?.size()
                }
                (None, None) => return Err(usage("give --size or --like")),
            };
            let bm = DirtyBitmap::create(&a.file, size, a.granularity)
                .map_err(|e| failed(format!("bitmap {}: {e}", a.file.display())))?;
            if a.json {
                print_info(&a.file, &bm, true)?;
            }
            Ok(())
        }
        BitmapCmd::Info(a) => {
            let bm = open(&a.file)?;
            print_info(&a.file, &bm, a.json)
        }
        BitmapCmd::Dump(a) => {
            let bm = open(&a.file)?;
            let mut extents = Vec::new();
            let mut from = 0;
            while let Some((off, len)) = bm.next_dirty(from) {
                extents.push((off, len));
                from = off + len;
            }
            if a.json {
                let v: Vec<_> = extents.iter().map(|&(o, l)| json!({"offset": o, "length": l})).collect();
                print_json(&serde_json::Value::Array(v))
            } else {
                use std::io::Write;
                let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                for (o, l) in extents {
                    writeln!(out, "{o} {l}").map_err(|e| failed(format!("writing to stdout: {e}")))?;
                }
                out.flush().map_err(|e| failed(format!("writing to stdout: {e}")))
            }
        }
        BitmapCmd::Clear(a) => {
            let bm = open(&a.file)?;
            bm.clear().map_err(|e| failed(format!("bitmap {}: clear: {e}", a.file.display())))?;
            if a.json {
                print_info(&a.file, &bm, true)?;
            }
            Ok(())
        }
        BitmapCmd::Merge(a) => {
            if a.src.iter().any(|s| s == &a.dst) {
                return Err(usage("merge: a source is the destination itself"));
            }
            let dst = open(&a.dst)?;
            // Gather every source first, then merge once: DST changes only if all of them can.
            let all = DirtyBitmap::new(dst.size(), dst.granularity())
                .map_err(|e| failed(format!("merge into {}: {e}", a.dst.display())))?;
            for s in &a.src {
                let src = open(s)?;
                all.merge(&src).map_err(|e| failed(format!("merge {} into {}: {e}", s.display(), a.dst.display())))?;
            }
            dst.merge(&all).map_err(|e| failed(format!("merge into {}: {e}", a.dst.display())))?;
            if a.json {
                print_info(&a.dst, &dst, true)?;
            }
            Ok(())
        }
    }
}
