//! Self-signed certificates made by the openssl command line tool, for https listeners.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::run_bounded;

/// A self-signed certificate and its key, as files.
pub struct Cert {
    pub pem: PathBuf,
    pub key: PathBuf,
}

impl Cert {
    /// An ECDSA P-256 certificate for `name` (its CN and only DNS name), valid for 30 days,
    /// written as `dir/NAME.pem` and `dir/NAME.key`.
    pub fn new(dir: &Path, name: &str) -> Cert {
        let (pem, key) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        let mut cmd = Command::new("openssl");
        cmd.args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "30",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            &format!("subjectAltName=DNS:{name}"),
            "-keyout",
            key.to_str().unwrap_or_default(),
            "-out",
            pem.to_str().unwrap_or_default(),
        ]);
        let out = run_bounded(cmd, Duration::from_secs(60), "openssl req");
        assert!(
            out.status.success(),
            "openssl req failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Cert { pem, key }
    }
}
