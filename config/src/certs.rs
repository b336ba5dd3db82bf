//! Certificates of https listeners: PEM text in, a checked [`Certificate`] out.
//!
//! A certificate is admitted only when its chain and key parse, the key matches the leaf's
//! public key (with the same crypto provider the workers sign with), and — when asked — the
//! leaf is within its validity period. Its server names (subject alternative names, else the
//! subject's common name) and its SHA-256 fingerprint are listed for SNI selection and for
//! `lbctl`. Reading the files is the caller's business (`validate.rs` for paths in the file);
//! this module only sees bytes, so workers can re-check a configuration inside their sandbox.

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::model::Certificate;

/// The provider every process of kakehi uses (see the workspace `Cargo.toml` for the choice).
pub fn provider() -> CryptoProvider {
    rustls::crypto::aws_lc_rs::default_provider()
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Parses and checks a certificate chain and its key. `now`: refuse a leaf outside its
/// validity period at that time (seconds since the epoch); `None` skips that check. The error
/// is one sentence saying what is wrong and what to do.
pub fn check(
    chain_pem: &str,
    key_pem: &str,
    path: Option<PathBuf>,
    now: Option<i64>,
) -> Result<Certificate, String> {
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the certificate is not valid PEM: {e}"))?;
    let Some(leaf) = chain.first() else {
        return Err(
            "no certificate found: expected a PEM `BEGIN CERTIFICATE` block (the server's \
             certificate first, then its intermediates)"
                .into(),
        );
    };
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| {
        format!(
            "no usable private key ({e}): expected a PEM `PRIVATE KEY`, `RSA PRIVATE KEY` or \
             `EC PRIVATE KEY` block"
        )
    })?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("the certificate cannot be parsed: {e}"))?;
    let validity = parsed.validity();
    let not_before = validity.not_before.timestamp();
    let not_after = validity.not_after.timestamp();
    if let Some(now) = now {
        if not_after < now {
            return Err(format!(
                "the certificate expired on {}: renew it",
                validity.not_after
            ));
        }
        if not_before > now {
            return Err(format!(
                "the certificate is not valid before {}: check the clock or the certificate",
                validity.not_before
            ));
        }
    }
    let names = server_names(&parsed);
    if names.is_empty() {
        return Err(
            "the certificate names no server (no DNS subject alternative name and no common \
             name): SNI could never select it"
                .into(),
        );
    }
    let provider = provider();
    CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
            "the private key does not match the certificate's public key: check that both \
             files belong together"
                .to_owned()
        }
        other => format!("the private key cannot be used: {other}"),
    })?;
    Ok(Certificate {
        fingerprint: fingerprint(leaf.as_ref()),
        chain,
        key,
        names,
        not_after,
        path,
    })
}

/// DNS names of the subject alternative name extension, else the subject's common names,
/// lower-case (`*.example.com` kept as written).
fn server_names(cert: &x509_parser::certificate::X509Certificate<'_>) -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push(dns.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        for cn in cert.subject().iter_common_name() {
            if let Ok(cn) = cn.as_str() {
                names.push(cn.to_ascii_lowercase());
            }
        }
    }
    names.dedup();
    names
}

/// SHA-256 of `der`, as lower-case hex (what `openssl x509 -fingerprint -sha256` prints,
/// without colons).
pub fn fingerprint(der: &[u8]) -> String {
    let digest = rustls::crypto::aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .map(|s| s.common.hash_provider.hash(der));
    let mut out = String::with_capacity(64);
    if let Some(digest) = digest {
        for b in digest.as_ref() {
            let _ = write!(out, "{b:02x}");
        }
    }
    out
}

/// Whether `selector` designates `cert`: its file path, its SHA-256 fingerprint (hex, colons
/// and case ignored) or one of its server names.
pub fn selects(cert: &Certificate, selector: &str) -> bool {
    let selector = selector.trim();
    if cert
        .path
        .as_deref()
        .is_some_and(|p| p.as_os_str() == selector)
    {
        return true;
    }
    let hex: String = selector
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    if hex.len() == 64 && hex == cert.fingerprint {
        return true;
    }
    let name = selector.to_ascii_lowercase();
    cert.names.contains(&name)
}

/// The CA certificates of a listener's `client_ca` or a cluster's `backend_ca` (PEM, one or
/// more): the roots certificates are verified against.
pub fn ca_roots(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let roots = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if roots.is_empty() {
        return Err("no certificate in it (a PEM \"BEGIN CERTIFICATE\" block)".into());
    }
    for (i, der) in roots.iter().enumerate() {
        x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| format!("certificate {i}: {e}"))?;
    }
    Ok(roots)
}

/// The revocation lists of a listener's `client_crl` (PEM, one or more), each parsed.
pub fn crls(
    pem: &str,
) -> Result<Vec<rustls::pki_types::CertificateRevocationListDer<'static>>, String> {
    let crls = rustls::pki_types::CertificateRevocationListDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM revocation lists: {e}"))?;
    if crls.is_empty() {
        return Err("no revocation list in it (a PEM \"BEGIN X509 CRL\" block)".into());
    }
    for (i, der) in crls.iter().enumerate() {
        x509_parser::parse_x509_crl(der.as_ref()).map_err(|e| format!("list {i}: {e}"))?;
    }
    Ok(crls)
}

/// What the backend is told of a verified client certificate: its subject (RFC 4514-like, as
/// x509-parser prints it) and its SHA-256 fingerprint.
pub fn describe_client(der: &[u8]) -> (String, String) {
    let subject = x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert.subject().to_string())
        .unwrap_or_default();
    // A header value: no control character may reach the backend (a CR or LF would end the
    // header); anything else is kept, UTF-8 included.
    let subject = subject
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect();
    (subject, fingerprint(der))
}

/// Where the system's CA certificates are: the file `SSL_CERT_FILE` names, else Debian's
/// bundle (from the `ca-certificates` package).
pub fn system_roots_path() -> std::path::PathBuf {
    std::env::var_os("SSL_CERT_FILE")
        .map_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into(), Into::into)
}

/// The system's CA certificates, the roots of a cluster with `backend_tls` and no
/// `backend_ca` (see [`system_roots_path`]). Blocks that are not certificates are skipped.
pub fn system_roots() -> Result<Vec<CertificateDer<'static>>, String> {
    let path = system_roots_path();
    let pem = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let roots: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .filter_map(Result::ok)
        .collect();
    if roots.is_empty() {
        return Err(format!("{}: no certificate in it", path.display()));
    }
    Ok(roots)
}
