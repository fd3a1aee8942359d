//! TLS for NBD (`NBD_OPT_STARTTLS`), shared by the server ([`super::Server`]) and the
//! client driver (`nbds://`): X.509 credentials from PEM files, the allow-list of client
//! identities, and the TLS handshake with an overall deadline.
//!
//! Built on rustls with the `ring` crypto provider (cargo feature `tls`, on by default).
//! TLS 1.3 and 1.2 (for peers built on older GnuTLS); nothing older.
//!
//! # Identities
//!
//! A client certificate is named in the allow-list ([`ServerTls::allow`]) by
//! - its subject distinguished name, RFC 4514 style, most specific attribute first as
//!   GnuTLS and QEMU's `tls-authz` print it: `"CN=alice,O=Example"` (the reverse order,
//!   `"O=Example,CN=alice"`, as `openssl x509 -subject` prints it, is accepted too; attribute
//!   names are case-insensitive, values exact, `\` escapes `,` `+` `=` `\`);
//! - or the SHA-256 fingerprint of its DER encoding: `"sha256:HEX"` (64 hex digits; `:`
//!   separators as `openssl x509 -fingerprint -sha256` prints them are allowed).

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

use crate::{Error, ErrorKind, Result};

fn invalid(msg: impl Into<String>) -> Error {
    Error::invalid(msg)
}

/// The crypto provider: `ring` (see Cargo.toml for why). rustls 0.23.48 deprecates it for
/// lacking post-quantum key exchange; X25519, P-256 and P-384 are what NBD peers
/// (GnuTLS in QEMU, nbdkit, libnbd) offer today.
///
/// AES-128-GCM comes first (then AES-256-GCM, ChaCha20): as safe for this use and the
/// cheapest for both ends on CPUs with AES instructions; the server picks by its own order.
#[allow(deprecated)]
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    let rank = |s: &rustls::SupportedCipherSuite| {
        let name = format!("{:?}", s.suite());
        let tls13 = matches!(s, rustls::SupportedCipherSuite::Tls13(_));
        let cipher = if name.contains("AES_128_GCM") {
            0
        } else if name.contains("AES_256_GCM") {
            1
        } else {
            2
        };
        (!tls13, cipher)
    };
    p.cipher_suites.sort_by_key(rank);
    Arc::new(p)
}

/// Encrypted data a connection buffers before writing it out: 1 MiB, so a large read reply
/// goes out in few system calls.
const TLS_BUFFER: usize = 1 << 20;

/// Read every certificate of a PEM file.
fn load_certs(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    std::fs::metadata(path).map_err(|e| {
        Error::new(ErrorKind::InvalidInput, crate::errno_of(&e), format!("{what} {}: {e}", path.display()))
    })?;
    let certs: std::result::Result<Vec<_>, _> =
        CertificateDer::pem_file_iter(path).map_err(|e| invalid(format!("{what} {}: {e}", path.display())))?.collect();
    let certs = certs.map_err(|e| invalid(format!("{what} {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(invalid(format!("{what} {}: no PEM certificate in the file", path.display())));
    }
    Ok(certs)
}

/// Read the private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    std::fs::metadata(path).map_err(|e| {
        Error::new(ErrorKind::InvalidInput, crate::errno_of(&e), format!("TLS key {}: {e}", path.display()))
    })?;
    PrivateKeyDer::from_pem_file(path).map_err(|e| invalid(format!("TLS key {}: {e}", path.display())))
}

fn roots(path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for c in load_certs("TLS CA", path)? {
        roots.add(c).map_err(|e| invalid(format!("TLS CA {}: {e}", path.display())))?;
    }
    Ok(roots)
}

/// Lower-case hex of `b`.
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// SHA-256 of `data`.
pub(crate) fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

// ---------------------------------------------------------------------------------------
// Identities
// ---------------------------------------------------------------------------------------

/// A client identity of the allow-list.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Identity {
    /// Subject DN attributes, most specific first (RFC 4514 order).
    Dn(Vec<(String, String)>),
    /// SHA-256 of the certificate's DER.
    Sha256([u8; 32]),
}

/// Parse a certificate fingerprint `"sha256:HEX"` (64 hex digits, with or without `:`
/// between the bytes) into its 32 bytes, e.g. for [`ClientTls::pin_sha256`]; `None` when
/// malformed. Pure function.
pub fn parse_fingerprint(s: &str) -> Option<[u8; 32]> {
    let (scheme, hex) = s.split_once(':')?;
    if !scheme.eq_ignore_ascii_case("sha256") {
        return None;
    }
    let hex: Vec<u8> = hex.bytes().filter(|&c| c != b':').collect();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// Parse a DN string `"CN=a,O=b"` into `(TYPE, value)` pairs (types upper-cased).
fn parse_dn(s: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut parts = Vec::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => cur.push_str(&format!("\\{}", chars.next()?)),
            ',' | '+' => parts.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    parts.push(cur);
    for p in parts {
        // Split at the first unescaped '='.
        let bytes: Vec<char> = p.chars().collect();
        let mut i = 0;
        let mut eq = None;
        while i < bytes.len() {
            if bytes[i] == '\\' {
                i += 2;
                continue;
            }
            if bytes[i] == '=' {
                eq = Some(i);
                break;
            }
            i += 1;
        }
        let eq = eq?;
        let key: String = bytes[..eq].iter().collect::<String>().trim().to_ascii_uppercase();
        let mut value = String::new();
        let mut it = bytes[eq + 1..].iter();
        while let Some(&c) = it.next() {
            if c == '\\' {
                value.push(*it.next()?);
            } else {
                value.push(c);
            }
        }
        if key.is_empty() {
            return None;
        }
        out.push((key, value.trim().to_owned()));
    }
    Some(out)
}

impl Identity {
    fn parse(s: &str) -> Result<Identity> {
        if s.len() > 4096 || s.contains('\0') {
            return Err(invalid("TLS identity: at most 4096 bytes, no NUL"));
        }
        if s.to_ascii_lowercase().starts_with("sha256:") {
            return parse_fingerprint(s).map(Identity::Sha256).ok_or_else(|| {
                invalid(format!("TLS identity {s:?}: expected sha256: and 64 hex digits (the certificate's SHA-256)"))
            });
        }
        match parse_dn(s) {
            Some(dn) if !dn.is_empty() => Ok(Identity::Dn(dn)),
            _ => Err(invalid(format!("TLS identity {s:?}: expected a subject DN \"CN=name,O=org\" or \"sha256:HEX\""))),
        }
    }

    fn matches(&self, der: &[u8], fingerprint: &[u8; 32], dn: Option<&[(String, String)]>) -> bool {
        match self {
            Identity::Sha256(f) => f == fingerprint,
            Identity::Dn(want) => {
                let _ = der;
                let Some(have) = dn else { return false };
                let same = |a: &[(String, String)], b: &mut dyn Iterator<Item = &(String, String)>| {
                    let b: Vec<&(String, String)> = b.collect();
                    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.0 == y.0 && x.1 == y.1)
                };
                same(want, &mut have.iter()) || same(want, &mut have.iter().rev())
            }
        }
    }
}

/// Check the syntax of a client identity for [`ServerTls::allow`] (a subject DN or
/// `"sha256:HEX"`) without a server configuration. Pure function.
///
/// # Errors
/// `EINVAL` for a malformed identity (the message says why).
pub fn check_identity(identity: &str) -> Result<()> {
    Identity::parse(identity).map(|_| ())
}

// ---------------------------------------------------------------------------------------
// A small DER walk: the subject of a certificate
// ---------------------------------------------------------------------------------------

/// One DER element: (tag, contents, rest).
fn der_next(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)?;
    let (len, hdr) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *b.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = hdr.checked_add(len)?;
    if end > b.len() {
        return None;
    }
    Some((tag, &b[hdr..end], &b[end..]))
}

fn oid_name(oid: &[u8]) -> String {
    match oid {
        [0x55, 0x04, 0x03] => "CN".into(),
        [0x55, 0x04, 0x06] => "C".into(),
        [0x55, 0x04, 0x07] => "L".into(),
        [0x55, 0x04, 0x08] => "ST".into(),
        [0x55, 0x04, 0x09] => "STREET".into(),
        [0x55, 0x04, 0x0a] => "O".into(),
        [0x55, 0x04, 0x0b] => "OU".into(),
        [0x55, 0x04, 0x05] => "SERIALNUMBER".into(),
        [0x55, 0x04, 0x0c] => "TITLE".into(),
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19] => "DC".into(),
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01] => "UID".into(),
        [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01] => "EMAILADDRESS".into(),
        _ => {
            // Dotted form.
            let mut parts: Vec<u64> = Vec::new();
            let mut v: u64 = 0;
            for (i, &b) in oid.iter().enumerate() {
                v = (v << 7) | u64::from(b & 0x7f);
                if b & 0x80 == 0 {
                    if parts.is_empty() && i < oid.len() {
                        let first = (v / 40).min(2);
                        parts.push(first);
                        parts.push(v - first * 40);
                    } else {
                        parts.push(v);
                    }
                    v = 0;
                }
            }
            parts.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(".")
        }
    }
}

fn der_string(tag: u8, v: &[u8]) -> Option<String> {
    match tag {
        0x0c | 0x13 | 0x16 | 0x1a => String::from_utf8(v.to_vec()).ok(),
        0x14 => Some(v.iter().map(|&b| b as char).collect()),
        0x1e => {
            if v.len() % 2 != 0 {
                return None;
            }
            let units: Vec<u16> = v.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
            String::from_utf16(&units).ok()
        }
        0x1c => {
            if v.len() % 4 != 0 {
                return None;
            }
            v.chunks(4).map(|c| char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]]))).collect()
        }
        _ => None,
    }
}

/// The subject of a DER certificate as `(TYPE, value)` pairs, most specific first
/// (RFC 4514 order: the reverse of the DER order). `None` when the DER is not a
/// certificate this walk understands.
pub(crate) fn subject_of(der: &[u8]) -> Option<Vec<(String, String)>> {
    let (tag, cert, _) = der_next(der)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, tbs, _) = der_next(cert)?;
    if tag != 0x30 {
        return None;
    }
    let mut rest = tbs;
    let (tag, _, r) = der_next(rest)?;
    if tag == 0xa0 {
        rest = r; // explicit version
        let (_, _, r) = der_next(rest)?; // serial
        rest = r;
    } else {
        rest = r; // that was the serial
    }
    let (_, _, r) = der_next(rest)?; // signature algorithm
    let (_, _, r) = der_next(r)?; // issuer
    let (_, _, r) = der_next(r)?; // validity
    let (tag, subject, _) = der_next(r)?;
    if tag != 0x30 {
        return None;
    }
    let mut out = Vec::new();
    let mut rdns = subject;
    while !rdns.is_empty() {
        let (tag, set, r) = der_next(rdns)?;
        rdns = r;
        if tag != 0x31 {
            return None;
        }
        let mut atvs = set;
        let mut rdn = Vec::new();
        while !atvs.is_empty() {
            let (tag, atv, r) = der_next(atvs)?;
            atvs = r;
            if tag != 0x30 {
                return None;
            }
            let (tag, oid, r) = der_next(atv)?;
            if tag != 0x06 {
                return None;
            }
            let (vtag, value, _) = der_next(r)?;
            rdn.push((oid_name(oid), der_string(vtag, value)?));
        }
        out.push(rdn);
    }
    Some(out.into_iter().rev().flatten().collect())
}

/// Format DN pairs as `"CN=a,O=b"` with RFC 4514 escapes.
pub(crate) fn format_dn(dn: &[(String, String)]) -> String {
    let esc = |v: &str| {
        let mut s = String::new();
        for c in v.chars() {
            if ",+\"\\<>;=".contains(c) {
                s.push('\\');
            }
            s.push(c);
        }
        s
    };
    dn.iter().map(|(k, v)| format!("{k}={}", esc(v))).collect::<Vec<_>>().join(",")
}

// ---------------------------------------------------------------------------------------
// Server side
// ---------------------------------------------------------------------------------------

/// The server's TLS credentials and client authorization, for
/// [`super::ServerOptions::tls`]. Cheap to clone (the rustls configuration is shared).
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
    client_certs: bool,
    allow: Vec<Identity>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("client_certs", &self.client_certs)
            .field("allow", &self.allow.len())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Credentials from PEM files: the server's certificate chain `cert_pem` (leaf first),
    /// its private key `key_pem`, and optionally the CA `ca_pem` that signs client
    /// certificates: with it, every client must present a certificate that chains to it
    /// (and, when the allow-list is not empty, is on it); without it, clients are not asked
    /// for certificates.
    ///
    /// # Errors
    /// `EINVAL` (or the file's errno, e.g. `ENOENT`) naming the file when a file is
    /// missing, not PEM, holds no certificate or key, or the key does not match.
    pub fn from_pem_files(cert_pem: &Path, key_pem: &Path, ca_pem: Option<&Path>) -> Result<ServerTls> {
        let certs = load_certs("TLS certificate", cert_pem)?;
        let key = load_key(key_pem)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(format!("TLS: {e}")))?;
        let builder = match ca_pem {
            Some(ca) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()
                    .map_err(|e| invalid(format!("TLS CA {}: {e}", ca.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| invalid(format!("TLS certificate {} / key {}: {e}", cert_pem.display(), key_pem.display())))?;
        config.max_early_data_size = 0;
        config.ignore_client_order = true;
        Ok(ServerTls { config: Arc::new(config), client_certs: ca_pem.is_some(), allow: Vec::new() })
    }

    /// Add a client identity to the allow-list: a subject DN (`"CN=alice,O=Example"`) or a
    /// certificate fingerprint (`"sha256:HEX"`); see the module documentation. With an
    /// empty allow-list, every certificate the CA signed is accepted.
    ///
    /// # Errors
    /// `EINVAL` for a malformed identity; `EINVAL` when there is no CA (no client
    /// certificates are asked for, so nobody could match).
    pub fn allow(&mut self, identity: &str) -> Result<()> {
        if !self.client_certs {
            return Err(invalid("TLS allow-list: set a CA first (client certificates need one to be verified)"));
        }
        let id = Identity::parse(identity)?;
        self.allow.push(id);
        Ok(())
    }

    /// Whether client certificates are required (a CA was given).
    pub fn requires_client_certs(&self) -> bool {
        self.client_certs
    }

    /// Run the TLS handshake as the server on `sock` within `deadline`, then check the
    /// client's certificate against the allow-list. `set_timeout` sets the socket's read
    /// and write timeout.
    pub(crate) fn accept<S: Read + Write>(
        &self,
        mut sock: S,
        deadline: Instant,
        set_timeout: impl Fn(&S, Duration) -> io::Result<()>,
    ) -> io::Result<rustls::StreamOwned<ServerConnection, S>> {
        let mut conn = ServerConnection::new(self.config.clone()).map_err(io::Error::other)?;
        conn.set_buffer_limit(Some(TLS_BUFFER));
        handshake(&mut conn, &mut sock, deadline, &set_timeout)?;
        if self.client_certs && !self.allow.is_empty() {
            let der = conn.peer_certificates().and_then(|c| c.first()).map(|c| c.as_ref().to_vec());
            let Some(der) = der else {
                return Err(io::Error::new(io::ErrorKind::PermissionDenied, "no client certificate"));
            };
            let fp = sha256(&der);
            let dn = subject_of(&der);
            if !self.allow.iter().any(|id| id.matches(&der, &fp, dn.as_deref())) {
                // Tell the client why before closing (an access_denied alert).
                conn.send_close_notify();
                let _ = conn.write_tls(&mut sock);
                let who = dn.as_deref().map(format_dn).unwrap_or_default();
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("client certificate {who:?} (sha256:{}) is not on the allow-list", hex(&fp)),
                ));
            }
        }
        Ok(rustls::StreamOwned::new(conn, sock))
    }
}

/// Drive a TLS handshake to its end, every socket wait bounded by what is left until
/// `deadline` (a peer sending a byte now and then cannot stretch it).
fn handshake<C, D, S>(
    conn: &mut C,
    sock: &mut S,
    deadline: Instant,
    set_timeout: &impl Fn(&S, Duration) -> io::Result<()>,
) -> io::Result<()>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
    S: Read + Write,
{
    while conn.is_handshaking() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake took too long"));
        }
        set_timeout(sock, left)?;
        if conn.wants_write() {
            conn.write_tls(sock)?;
            continue;
        }
        if conn.wants_read() {
            let n = conn.read_tls(sock)?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the peer closed during the TLS handshake"));
            }
            if let Err(e) = conn.process_new_packets() {
                // Send the alert that says why.
                let _ = conn.write_tls(sock);
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}")));
            }
        }
    }
    while conn.wants_write() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake took too long"));
        }
        set_timeout(sock, left)?;
        conn.write_tls(sock)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Client side
// ---------------------------------------------------------------------------------------

/// TLS settings of the NBD client driver (`nbds://`, `nbds+unix://`): which CA verifies
/// the server, an optional client certificate, the name checked in the server's
/// certificate, an optional pinned fingerprint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// PEM file of the CA(s) that sign the server's certificate. Required unless
    /// `pin_sha256` is set.
    pub ca_pem: Option<std::path::PathBuf>,
    /// PEM file of the client certificate (for servers that require one), with `key_pem`.
    pub cert_pem: Option<std::path::PathBuf>,
    /// PEM file of the client certificate's private key.
    pub key_pem: Option<std::path::PathBuf>,
    /// The name the server's certificate must carry. `None`: the URI's host (a DNS name or
    /// an IP address, checked against the certificate's DNS or IP subject-alt-names), or
    /// `localhost` for Unix sockets (libnbd's choice). The URI's `tls-hostname=` sets it.
    pub hostname: Option<String>,
    /// SHA-256 of the server certificate's DER: when set, the server's certificate must
    /// be exactly this one (in addition to the CA check when a CA is given; alone, it
    /// replaces the CA and hostname checks).
    pub pin_sha256: Option<[u8; 32]>,
}

/// The built client configuration (shared by the driver's connections).
#[derive(Clone)]
pub(crate) struct ClientTlsConfig {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

/// A server certificate verifier for a pinned fingerprint, optionally with a CA check.
#[derive(Debug)]
struct Pinned {
    pin: [u8; 32],
    inner: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> std::result::Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if sha256(end_entity.as_ref()) != self.pin {
            return Err(rustls::Error::General("the server certificate does not match the pinned fingerprint".into()));
        }
        match &self.inner {
            Some(v) => v.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now),
            None => Ok(rustls::client::danger::ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> std::result::Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

impl ClientTls {
    /// Build the rustls configuration; `default_host` is the URI's host (`None` for a
    /// Unix socket).
    pub(crate) fn build(&self, default_host: Option<&str>) -> Result<ClientTlsConfig> {
        let name = self.hostname.as_deref().or(default_host).unwrap_or("localhost");
        let name =
            ServerName::try_from(name.to_owned()).map_err(|e| invalid(format!("TLS server name {name:?}: {e}")))?;
        let p = provider();
        let builder = ClientConfig::builder_with_provider(p.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(format!("TLS: {e}")))?;
        let webpki = match &self.ca_pem {
            Some(ca) => Some(
                rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots(ca)?), p.clone())
                    .build()
                    .map_err(|e| invalid(format!("TLS CA {}: {e}", ca.display())))?,
            ),
            None => None,
        };
        let builder = match (self.pin_sha256, webpki) {
            (Some(pin), inner) => {
                builder.dangerous().with_custom_certificate_verifier(Arc::new(Pinned { pin, inner, provider: p }))
            }
            (None, Some(v)) => builder.with_webpki_verifier(v),
            (None, None) => {
                return Err(invalid("TLS: a CA file (or a pinned server fingerprint) is needed to verify the server"))
            }
        };
        let config = match (&self.cert_pem, &self.key_pem) {
            (Some(c), Some(k)) => {
                let certs = load_certs("TLS client certificate", c)?;
                let key = load_key(k)?;
                builder.with_client_auth_cert(certs, key).map_err(|e| {
                    invalid(format!("TLS client certificate {} / key {}: {e}", c.display(), k.display()))
                })?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err(invalid("TLS: a client certificate needs its key, and a key its certificate")),
        };
        Ok(ClientTlsConfig { config: Arc::new(config), name })
    }
}

impl ClientTlsConfig {
    /// Run the TLS handshake as the client on `sock` within `deadline`.
    pub(crate) fn connect<S: Read + Write>(
        &self,
        mut sock: S,
        deadline: Instant,
        set_timeout: impl Fn(&S, Duration) -> io::Result<()>,
    ) -> io::Result<rustls::StreamOwned<ClientConnection, S>> {
        let mut conn = ClientConnection::new(self.config.clone(), self.name.clone()).map_err(io::Error::other)?;
        conn.set_buffer_limit(Some(TLS_BUFFER));
        handshake(&mut conn, &mut sock, deadline, &set_timeout)?;
        Ok(rustls::StreamOwned::new(conn, sock))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_parse_and_reject() {
        assert_eq!(
            Identity::parse("CN=alice,O=Example").unwrap(),
            Identity::Dn(vec![("CN".into(), "alice".into()), ("O".into(), "Example".into())])
        );
        assert_eq!(
            Identity::parse("cn=a\\,b, o = X").unwrap(),
            Identity::Dn(vec![("CN".into(), "a,b".into()), ("O".into(), "X".into())])
        );
        let hex = "ab".repeat(32);
        assert_eq!(Identity::parse(&format!("sha256:{hex}")).unwrap(), Identity::Sha256([0xab; 32]));
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(Identity::parse(&format!("SHA256:{colons}")).unwrap(), Identity::Sha256([0xab; 32]));
        for bad in ["", "sha256:abc", "sha256:zz", "noequals", "=x", "a\0b"] {
            assert!(Identity::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn dn_matches_either_order() {
        let have = vec![("CN".to_string(), "alice".to_string()), ("O".to_string(), "Ex".to_string())];
        let fp = [0u8; 32];
        assert!(Identity::parse("CN=alice,O=Ex").unwrap().matches(&[], &fp, Some(&have)));
        assert!(Identity::parse("O=Ex,CN=alice").unwrap().matches(&[], &fp, Some(&have)));
        assert!(!Identity::parse("CN=alice").unwrap().matches(&[], &fp, Some(&have)));
        assert!(!Identity::parse("CN=bob,O=Ex").unwrap().matches(&[], &fp, Some(&have)));
        assert_eq!(format_dn(&have), "CN=alice,O=Ex");
    }

    #[test]
    fn der_walk_survives_garbage() {
        for n in 0..64 {
            let junk: Vec<u8> = (0..n).map(|i| (i * 37 + 0x30) as u8).collect();
            let _ = subject_of(&junk);
        }
        assert!(subject_of(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).is_none());
    }
}
