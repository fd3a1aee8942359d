//! `cowbackup serve IMAGE`: an image read-only over NBD until SIGINT or SIGTERM.

use std::io::Write;
use std::net::{IpAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use cowbackup::nbd::{Server, ServerOptions, ServerTls};
use cowbackup::DirtyBitmap;
use serde_json::json;

use crate::util::{failed, open_source, signal_name, usage, wait_signal, CliResult};

/// Arguments of `serve`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("listen").required(true).args(["socket", "tcp"])))]
pub struct ServeArgs {
    /// The image file, block device or NBD URI to export, read-only.
    #[arg(required_unless_present = "chain")]
    pub image: Option<String>,
    /// Export a chain of backups instead (instant access to the newest point in time):
    /// their manifests, oldest (the full backup) first. Every cluster read is checked
    /// against its digest.
    #[arg(long, num_args = 1.., value_name = "MANIFEST", conflicts_with = "image")]
    pub chain: Vec<PathBuf>,
    /// Listen on a Unix socket at PATH (created 0600 by the server).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Listen on TCP HOST:PORT (port 0: any free port). Only loopback addresses unless
    /// TLS (--tls-cert) or --insecure: NBD without TLS is readable by anyone on the network.
    #[arg(long, value_name = "HOST:PORT")]
    pub tcp: Option<String>,
    /// Allow a TCP address that is not loopback without TLS.
    #[arg(long)]
    pub insecure: bool,
    /// Serve over TLS (NBD STARTTLS, TLS 1.3/1.2) with this certificate (PEM), with
    /// --tls-key. Clients that do not start TLS learn no export name or size. A TCP
    /// address that is not loopback is then allowed without --insecure.
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require a client certificate signed by this CA (PEM).
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// With --tls-ca, admit only clients whose certificate is this identity: a subject DN
    /// ("CN=alice,O=Example") or "sha256:HEX" (the certificate's fingerprint). Repeatable.
    #[arg(long, value_name = "IDENTITY", requires = "tls_ca")]
    pub allow: Vec<String>,
    /// Most clients connected at once; a further client is disconnected at once.
    #[arg(long, value_name = "N", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub max_connections: u32,
    /// Disconnect a client that sends no whole request for this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub idle_timeout: u64,
    /// Export name.
    #[arg(long, default_value = "")]
    pub export: String,
    /// Also export this persistent bitmap file as qemu:dirty-bitmap:NAME (see --bitmap-name).
    #[arg(long, value_name = "FILE")]
    pub bitmap: Option<PathBuf>,
    /// Name of the exported bitmap.
    #[arg(long, value_name = "NAME", default_value = "bitmap0", requires = "bitmap")]
    pub bitmap_name: String,
    /// Print {"uri", "address", "export"} as one line of JSON instead of the bare URI.
    #[arg(long)]
    pub json: bool,
}

/// The characters of an NBD URI's query value that need no escaping.
fn uri_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The NBD URI of `export` on a server bound at `address` ("unix:PATH" / "tcp:IP:PORT");
/// `nbds` schemes with `tls` (a client adds its `tls-certificates=DIR`).
pub fn uri_of(address: &str, export: &str, tls: bool) -> String {
    let s = if tls { "s" } else { "" };
    if let Some(path) = address.strip_prefix("unix:") {
        format!("nbd{s}+unix:///{}?socket={}", uri_escape(export), uri_escape(path))
    } else {
        let hp = address.strip_prefix("tcp:").unwrap_or(address);
        format!("nbd{s}://{hp}/{}", uri_escape(export))
    }
}

/// The server's options from the arguments: TLS (certificate, key, CA, allow-list) and
/// the limits.
fn server_options(a: &ServeArgs) -> CliResult<ServerOptions> {
    let mut o = ServerOptions {
        max_connections: a.max_connections as usize,
        idle_timeout: Duration::from_secs(a.idle_timeout),
        insecure: a.insecure,
        ..ServerOptions::default()
    };
    if let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) {
        let mut tls =
            ServerTls::from_pem_files(cert, key, a.tls_ca.as_deref()).map_err(|e| usage(format!("TLS: {e}")))?;
        for id in &a.allow {
            tls.allow(id).map_err(|e| usage(format!("--allow {id:?}: {e}")))?;
        }
        o.tls = Some(tls);
    }
    Ok(o)
}

/// Run `serve`.
pub fn run(a: ServeArgs) -> CliResult<()> {
    let address = match (&a.socket, &a.tcp) {
        (Some(p), None) => format!("unix:{}", p.display()),
        (None, Some(hp)) => {
            let addrs: Vec<_> = hp.to_socket_addrs().map_err(|e| usage(format!("--tcp {hp}: {e}")))?.collect();
            if addrs.is_empty() {
                return Err(usage(format!("--tcp {hp}: resolves to no address")));
            }
            let remote = addrs.iter().any(|sa| match sa.ip() {
                IpAddr::V4(ip) => !ip.is_loopback(),
                IpAddr::V6(ip) => !ip.is_loopback(),
            });
            if remote && !a.insecure && a.tls_cert.is_none() {
                return Err(usage(format!(
                    "--tcp {hp} is not a loopback address: NBD without TLS is open to the network; \
                     give --tls-cert and --tls-key, or pass --insecure to allow it"
                )));
            }
            format!("tcp:{hp}")
        }
        _ => return Err(usage("give exactly one of --socket and --tcp")),
    };
    // Checked before the image is opened: bad TLS files change nothing.
    let options = server_options(&a)?;
    let tls = options.tls.is_some();
    let driver: std::sync::Arc<dyn cowbackup::BlockDriver> = match &a.image {
        Some(image) => open_source(image, false)?,
        None => std::sync::Arc::new(
            cowbackup::repo::Chain::open(&a.chain, true).map_err(|e| failed(format!("chain: {e}")))?,
        ),
    };
    let bitmap = match &a.bitmap {
        Some(p) => Some(DirtyBitmap::open(p).map_err(|e| failed(format!("bitmap {}: {e}", p.display())))?),
        None => None,
    };
    let server = Server::start_with(&address, options).map_err(|e| failed(e.to_string()))?;
    server.add(&a.export, driver, false).map_err(|e| failed(e.to_string()))?;
    if let Some(bm) = bitmap {
        server.add_bitmap(&a.export, &a.bitmap_name, bm).map_err(|e| failed(e.to_string()))?;
    }
    let uri = uri_of(server.address(), &a.export, tls);
    if a.json {
        // One line, like the bare URI: a script reads the first line and goes on.
        let v = json!({"uri": uri, "address": server.address(), "export": a.export});
        let mut out = std::io::stdout().lock();
        writeln!(out, "{v}").and_then(|_| out.flush()).map_err(|e| failed(format!("writing to stdout: {e}")))?;
    } else {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{uri}").and_then(|_| out.flush()).map_err(|e| failed(format!("writing to stdout: {e}")))?;
    }
    let sig = wait_signal();
    eprintln!("cowbackup: {}: stopping the server", signal_name(sig));
    server.stop();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        assert_eq!(uri_of("unix:/tmp/a b.sock", "disk", false), "nbd+unix:///disk?socket=/tmp/a%20b.sock");
        assert_eq!(uri_of("unix:/tmp/s", "", false), "nbd+unix:///?socket=/tmp/s");
        assert_eq!(uri_of("tcp:127.0.0.1:10809", "d", false), "nbd://127.0.0.1:10809/d");
        assert_eq!(uri_of("tcp:[::1]:10809", "d", false), "nbd://[::1]:10809/d");
        assert_eq!(uri_of("unix:/tmp/s", "d", true), "nbds+unix:///d?socket=/tmp/s");
        assert_eq!(uri_of("tcp:127.0.0.1:10809", "", true), "nbds://127.0.0.1:10809/");
    }
}
