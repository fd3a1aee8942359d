//! A throw-away PKI made with `openssl` for the TLS tests (tests/nbd_tls.rs and the
//! `cowbackup` command's tests, cli/tests/cli.rs, which include this file by path).

use std::path::Path;
use std::process::Command;

/// In `d`: a CA (`ca-cert.pem`, `ca-key.pem`), a server certificate for localhost and
/// 127.0.0.1 (`server-cert.pem`, `server-key.pem`), client certificates
/// `/O=cowbackup/CN=alice` and `/O=cowbackup/CN=bob` (`alice-cert.pem`, ...), laid out as
/// GnuTLS tools want them too: `server/` (ca-cert, server-cert, server-key), `alice/` and
/// `bob/` (ca-cert, client-cert, client-key: libnbd's `tls-certificates=DIR`), `anon/`
/// (ca-cert only).
pub fn make(d: &Path) {
    let ossl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(d).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    // A new P-256 key, unencrypted, with the request.
    let new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    ossl(
        &[
            &["req", "-x509"][..],
            &new_key,
            &[
                "-keyout",
                "ca-key.pem",
                "-out",
                "ca-cert.pem",
                "-days",
                "2",
                "-subj",
                "/CN=cowbackup test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        ]
        .concat(),
    );
    let leaf = |name: &str, subj: &str, ext: &str| {
        std::fs::write(d.join(format!("{name}.ext")), ext).unwrap();
        let (key, csr) = (format!("{name}-key.pem"), format!("{name}.csr"));
        ossl(&[&["req"][..], &new_key, &["-keyout", &key, "-out", &csr, "-subj", subj]].concat());
        ossl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            &format!("{name}-cert.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ]);
    };
    leaf(
        "server",
        "/O=cowbackup/CN=localhost",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\n",
    );
    for who in ["alice", "bob"] {
        leaf(
            who,
            &format!("/O=cowbackup/CN={who}"),
            // QEMU wants keyEncipherment in a client certificate's key usage.
            "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n",
        );
    }
    for sub in ["server", "alice", "bob", "anon"] {
        std::fs::create_dir(d.join(sub)).unwrap();
        std::fs::copy(d.join("ca-cert.pem"), d.join(sub).join("ca-cert.pem")).unwrap();
    }
    std::fs::copy(d.join("server-cert.pem"), d.join("server/server-cert.pem")).unwrap();
    std::fs::copy(d.join("server-key.pem"), d.join("server/server-key.pem")).unwrap();
    for who in ["alice", "bob"] {
        std::fs::copy(d.join(format!("{who}-cert.pem")), d.join(who).join("client-cert.pem")).unwrap();
        std::fs::copy(d.join(format!("{who}-key.pem")), d.join(who).join("client-key.pem")).unwrap();
    }
}
