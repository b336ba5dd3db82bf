//! TLS termination for https listeners, with rustls.
//!
//! [`TlsContext`] is the worker's: one session ticket key set and one session cache, kept for
//! the worker's life, so that a configuration change (a certificate added or replaced) keeps
//! resumption working. From it, [`TlsContext::server_config`] builds the rustls configuration
//! of one listener: its certificates behind an SNI resolver ([`SniResolver`]: exact names, then
//! `*.wildcard` names one label deep, then the listener's first certificate), TLS 1.2 and 1.3,
//! ALPN `h2` (unless the listener's `alpn` leaves it out) then `http/1.1`. A new configuration only reaches new connections: established ones keep the
//! `Arc` of the one they started with, so replacing a certificate never cuts them.
//!
//! [`Front`] is a session's client side, plain or TLS, behind `Read`/`Write`; the session
//! (`session.rs`) drives it like a socket, plus [`Front::flush_pending`] for TLS bytes that the
//! socket could not take yet. Plain HTTP sent to a TLS port gets a clear-text 400.

use crate::tls_front::TlsFront;
use lb_config::Certificate;
use mio::net::TcpStream;
use rustls::server::{ClientHello, ProducesTickets, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use std::collections::HashMap;
use std::io::{self, ErrorKind, IoSlice, Read, Write};
use std::net::Shutdown;
use std::sync::Arc;

/// TLS 1.2 sessions kept for resumption by session id, per worker.
const SESSION_CACHE: usize = 20_000;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot create the session ticket keys: {0}")]
    Ticketer(#[source] rustls::Error),
    #[error("certificate {name}: {source}")]
    Key {
        name: String,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    #[error("an https listener needs a certificate")]
    NoCertificate,
    #[error("client_ca: {0}")]
    ClientCa(String),
}

/// A verified client certificate, as the backend is told of it (`X-Client-Cert-Subject`,
/// `X-Client-Cert-Fingerprint`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    pub subject: String,
    /// SHA-256 of the certificate, lower-case hex.
    pub fingerprint: String,
}

/// What every https listener of a worker shares: the crypto provider, the ticket keys (rotated
/// by rustls every 6 hours) and the TLS 1.2 session cache.
pub struct TlsContext {
    provider: Arc<rustls::crypto::CryptoProvider>,
    ticketer: Arc<dyn ProducesTickets>,
    cache: Arc<ServerSessionMemoryCache>,
    /// The system's CA certificates, for `backend_tls` clusters without `backend_ca`; empty,
    /// with why, when they could not be read.
    system_roots: (Arc<rustls::RootCertStore>, Option<String>),
}

impl TlsContext {
    /// Needs randomness (the ticket keys) and reads the system's CA certificates: create it
    /// before the sandbox. With `tickets`, the keys every worker shares (`tickets.rs`);
    /// without, keys of this worker's own, rotated by rustls.
    pub fn new(
        tickets: Option<Box<dyn crate::rate_limit::SharedSlots + Sync>>,
    ) -> Result<TlsContext, TlsError> {
        let ticketer: Arc<dyn ProducesTickets> = match tickets {
            Some(words) => Arc::new(crate::tickets::SharedTicketer::new(words)),
            None => rustls::crypto::aws_lc_rs::Ticketer::new().map_err(TlsError::Ticketer)?,
        };
        // AWS-LC sets its random generator up on first use, with syscalls the sandbox refuses
        // (newfstatat): use it once now.
        aws_lc_rs::rand::fill(&mut [0u8; 16])
            .map_err(|_| TlsError::Ticketer(rustls::Error::FailedToGetRandomBytes))?;
        Ok(TlsContext {
            provider: Arc::new(lb_config::certs::provider()),
            ticketer,
            cache: ServerSessionMemoryCache::new(SESSION_CACHE),
            system_roots: crate::back_stream::system_store(),
        })
    }

    /// The client side of TLS to a cluster's backends (`backend_tls`).
    pub fn backend_tls(
        &self,
        spec: &lb_config::BackendTls,
    ) -> Result<crate::back_stream::BackendTls, String> {
        if spec.roots.is_empty() {
            if let Some(why) = &self.system_roots.1 {
                return Err(format!(
                    "backend_tls without backend_ca verifies backends against the system's CA certificates, which cannot be read: {why}"
                ));
            }
        }
        crate::back_stream::BackendTls::new(spec, &self.provider, &self.system_roots.0)
    }

    /// The rustls configuration of a listener serving `certificates` (the first is the
    /// default one).
    pub fn server_config(
        &self,
        certificates: &[Certificate],
        http2: bool,
        client_auth: Option<&lb_config::ClientAuth>,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let resolver = SniResolver::new(certificates, &self.provider)?;
        let builder = ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(TlsError::Config)?;
        let builder = match client_auth {
            None => builder.with_no_client_auth(),
            Some(auth) => builder.with_client_cert_verifier(self.client_verifier(auth)?),
        };
        let mut config = builder.with_cert_resolver(Arc::new(resolver));
        config.alpn_protocols = vec![b"http/1.1".to_vec(), b"http/1.0".to_vec()];
        if http2 {
            config.alpn_protocols.insert(0, b"h2".to_vec());
        }
        config.ticketer = Arc::clone(&self.ticketer);
        config.session_storage = self.cache.clone();
        config.send_tls13_tickets = 1;
        Ok(Arc::new(config))
    }
}

impl TlsContext {
    /// Verifies client certificates against `auth.roots` (the handshake fails with the alert
    /// rustls picks: certificate_required without one when it is required, unknown_ca for a
    /// certificate no root signed, ...).
    fn client_verifier(
        &self,
        auth: &lb_config::ClientAuth,
    ) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for der in &auth.roots {
            roots
                .add(der.clone())
                .map_err(|e| TlsError::ClientCa(e.to_string()))?;
        }
        let mut builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&self.provider),
        );
        if !auth.crls.is_empty() {
            // A certificate a list names is refused (alert certificate_revoked); one whose
            // issuer has no list here is judged by its chain alone.
            builder = builder
                .with_crls(auth.crls.iter().cloned())
                .only_check_end_entity_revocation()
                .allow_unknown_revocation_status();
        }
        let builder = if auth.required {
            builder
        } else {
            builder.allow_unauthenticated()
        };
        builder
            .build()
            .map_err(|e| TlsError::ClientCa(e.to_string()))
    }
}

/// Picks a listener's certificate from the client's server name.
#[derive(Debug)]
pub struct SniResolver {
    exact: HashMap<String, Vec<Arc<CertifiedKey>>>,
    /// By the suffix after `*.`: `example.com` for `*.example.com`.
    wildcard: HashMap<String, Vec<Arc<CertifiedKey>>>,
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    pub fn new(
        certificates: &[Certificate],
        provider: &rustls::crypto::CryptoProvider,
    ) -> Result<SniResolver, TlsError> {
        let mut exact: HashMap<String, Vec<Arc<CertifiedKey>>> = HashMap::new();
        let mut wildcard: HashMap<String, Vec<Arc<CertifiedKey>>> = HashMap::new();
        let mut default = None;
        for cert in certificates {
            let key = provider
                .key_provider
                .load_private_key(cert.key.clone_key())
                .map_err(|source| TlsError::Key {
                    name: cert.names.first().cloned().unwrap_or_default(),
                    source,
                })?;
            let certified = Arc::new(CertifiedKey::new(cert.chain.clone(), key));
            default.get_or_insert_with(|| Arc::clone(&certified));
            for name in &cert.names {
                match name.strip_prefix("*.") {
                    Some(suffix) => wildcard.entry(suffix.to_owned()).or_default(),
                    None => exact.entry(name.clone()).or_default(),
                }
                .push(Arc::clone(&certified));
            }
        }
        Ok(SniResolver {
            exact,
            wildcard,
            default: default.ok_or(TlsError::NoCertificate)?,
        })
    }

    /// The certificate for `server_name` that can sign with one of `schemes` (the first one
    /// listed when several can), else the default certificate.
    pub fn pick(
        &self,
        server_name: Option<&str>,
        schemes: &[rustls::SignatureScheme],
    ) -> Arc<CertifiedKey> {
        let usable = |list: &Vec<Arc<CertifiedKey>>| {
            list.iter()
                .find(|c| c.key.choose_scheme(schemes).is_some())
                .or_else(|| list.first())
                .cloned()
        };
        if let Some(name) = server_name {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if let Some(found) = self.exact.get(&name).and_then(usable) {
                return found;
            }
            if let Some((_, parent)) = name.split_once('.') {
                if let Some(found) = self.wildcard.get(parent).and_then(usable) {
                    return found;
                }
            }
        }
        Arc::clone(&self.default)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name(), hello.signature_schemes()))
    }
}

/// The client side of a session.
pub enum Front {
    Plain(TcpStream),
    Tls(Box<TlsFront>),
}

impl Front {
    /// The front of a connection accepted on a listener: TLS with `tls`, the listener's
    /// configuration, when it has one (https), plain otherwise.
    pub fn accepted(
        sock: TcpStream,
        tls: Option<&Arc<ServerConfig>>,
    ) -> Result<Front, rustls::Error> {
        match tls {
            None => Ok(Front::Plain(sock)),
            Some(config) => Front::tls(sock, config),
        }
    }

    pub fn tls(sock: TcpStream, config: &Arc<ServerConfig>) -> Result<Front, rustls::Error> {
        Ok(Front::Tls(Box::new(TlsFront::new(sock, config)?)))
    }

    /// The socket, for registration.
    pub fn stream_mut(&mut self) -> &mut TcpStream {
        match self {
            Front::Plain(s) => s,
            Front::Tls(t) => t.sock_mut(),
        }
    }

    /// TLS bytes wait for the socket.
    pub fn has_pending(&self) -> bool {
        match self {
            Front::Plain(_) => false,
            Front::Tls(t) => t.has_pending(),
        }
    }

    /// Writes what rustls holds; `WouldBlock` when the socket is full.
    pub fn flush_pending(&mut self) -> io::Result<()> {
        match self {
            Front::Plain(_) => Ok(()),
            Front::Tls(t) => t.flush(),
        }
    }

    /// The TLS handshake is not finished (no HTTP yet).
    pub fn handshaking(&self) -> bool {
        match self {
            Front::Plain(_) => false,
            Front::Tls(t) => t.handshaking(),
        }
    }

    /// Plain HTTP came to this TLS port (and got its 400).
    pub fn refused_plain_http(&self) -> bool {
        match self {
            Front::Plain(_) => false,
            Front::Tls(t) => t.refused_plain_http(),
        }
    }

    /// ALPN chose `h2` in the TLS handshake.
    pub fn alpn_h2(&self) -> bool {
        match self {
            Front::Plain(_) => false,
            Front::Tls(t) => t.alpn_protocol() == Some(b"h2"),
        }
    }

    /// The certificate the client presented and the listener's `client_ca` verified (rustls
    /// completes no handshake with a certificate that fails verification).
    pub fn client_cert(&self) -> Option<Arc<ClientCert>> {
        let Front::Tls(t) = self else {
            return None;
        };
        let leaf = t.peer_certificates()?.first()?;
        let (subject, fingerprint) = lb_config::certs::describe_client(leaf.as_ref());
        Some(Arc::new(ClientCert {
            subject,
            fingerprint,
        }))
    }

    /// Ends the sending side: close_notify then FIN on TLS (the FIN once rustls's bytes are
    /// out: see [`Front::flush_pending`]).
    pub fn shutdown_write(&mut self) {
        match self {
            Front::Plain(s) => {
                let _ = s.shutdown(Shutdown::Write);
            }
            Front::Tls(t) => t.shutdown_write(),
        }
    }

    /// Reads and throws away what the client still sends (a lingering close), below TLS.
    pub fn discard(&mut self, scratch: &mut [u8]) -> io::Result<usize> {
        self.stream_mut().read(scratch)
    }
}

/// Writes what rustls holds for the socket; `WouldBlock` when the socket is full.
pub(crate) fn flush_tls_to<D>(
    sock: &mut TcpStream,
    conn: &mut rustls::ConnectionCommon<D>,
) -> io::Result<()> {
    while conn.wants_write() {
        match conn.write_tls(sock) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads plaintext from a TLS connection over `sock` (client or backend side): fills `buf` as
/// far as the socket allows, so that a short read means the socket is drained (the session
/// relies on it with edge-triggered readiness). A short read from the socket says the same
/// here: then no read is spent on `EAGAIN`. `eof`: the socket's end was read. A TLS failure
/// is an `InvalidData` error carrying the `rustls::Error`, after the alert was sent.
pub(crate) fn read_plain_from<D>(
    sock: &mut TcpStream,
    conn: &mut rustls::ConnectionCommon<D>,
    eof: &mut bool,
    buf: &mut [u8],
) -> io::Result<usize> {
    let mut filled = 0;
    let mut drained = false;
    loop {
        let Some(rest) = buf.get_mut(filled..) else {
            return Ok(filled);
        };
        if rest.is_empty() {
            return Ok(filled);
        }
        match conn.reader().read(rest) {
            // close_notify: the end of the stream.
            Ok(0) => return Ok(filled),
            Ok(n) => {
                filled += n;
                continue;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            // The peer closed without close_notify: an end all the same for HTTP/1.1,
            // whose messages delimit themselves.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(filled),
            Err(e) => return if filled > 0 { Ok(filled) } else { Err(e) },
        }
        if *eof {
            return Ok(filled);
        }
        if drained {
            return if filled > 0 {
                Ok(filled)
            } else {
                Err(ErrorKind::WouldBlock.into())
            };
        }
        let mut probe = ShortReadProbe {
            sock: &mut *sock,
            short: false,
        };
        match conn.read_tls(&mut probe) {
            Ok(0) => *eof = true,
            Ok(_) => {
                drained = probe.short;
                if let Err(e) = conn.process_new_packets() {
                    // rustls queued an alert: send it, then report the failure.
                    let _ = flush_tls_to(sock, conn);
                    return Err(io::Error::new(ErrorKind::InvalidData, e));
                }
                match flush_tls_to(sock, conn) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if filled > 0 && e.kind() == ErrorKind::WouldBlock => return Ok(filled),
            Err(e) => return Err(e),
        }
    }
}

/// Writes plaintext to a TLS connection over `sock`: what rustls already holds goes first
/// (`WouldBlock` while the socket cannot take it); then as much of `bufs` as rustls takes,
/// flushed as far as the socket allows (the rest goes at the next write or
/// [`flush_tls_to`]).
pub(crate) fn write_plain_to<D>(
    sock: &mut TcpStream,
    conn: &mut rustls::ConnectionCommon<D>,
    bufs: &[IoSlice<'_>],
) -> io::Result<usize> {
    flush_tls_to(sock, conn)?;
    let n = conn.writer().write_vectored(bufs)?;
    match flush_tls_to(sock, conn) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    if n == 0 && bufs.iter().any(|b| !b.is_empty()) {
        return Err(ErrorKind::WouldBlock.into());
    }
    Ok(n)
}

/// The socket as rustls reads it, noting whether a read came back shorter than asked: the
/// receive queue was empty then, and the next bytes will bring a new readiness event.
struct ShortReadProbe<'a> {
    sock: &'a mut TcpStream,
    short: bool,
}

impl Read for ShortReadProbe<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.sock.read(buf)?;
        self.short = n < buf.len();
        Ok(n)
    }
}

impl Read for Front {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Front::Plain(s) => s.read(buf),
            Front::Tls(t) => t.read_plain(buf),
        }
    }
}

impl Write for Front {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Front::Plain(s) => s.write(buf),
            Front::Tls(t) => t.write_plain(&[IoSlice::new(buf)]),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Front::Plain(s) => s.write_vectored(bufs),
            Front::Tls(t) => t.write_plain(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_pending()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(cert: &str, key: &str) -> Certificate {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/examples/certs/");
        let read = |name: &str| std::fs::read_to_string(format!("{dir}{name}")).unwrap();
        lb_config::certs::check(&read(cert), &read(key), None, None).unwrap()
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_the_first_certificate() {
        let site = example("site.pem", "site.key");
        let other = example("other.pem", "other.key");
        let context = TlsContext::new(None).unwrap();
        let resolver = SniResolver::new(&[site.clone(), other.clone()], &context.provider).unwrap();
        let schemes = [rustls::SignatureScheme::ECDSA_NISTP256_SHA256];
        let leaf = |name: Option<&str>| resolver.pick(name, &schemes).cert[0].clone();
        assert_eq!(leaf(Some("site.example.com")), site.chain[0]);
        assert_eq!(leaf(Some("WWW.Site.Example.com.")), site.chain[0]);
        assert_eq!(leaf(Some("a.other.example.com")), other.chain[0]);
        // A wildcard covers one label only; anything else gets the default (first) one.
        assert_eq!(leaf(Some("a.b.other.example.com")), site.chain[0]);
        assert_eq!(leaf(Some("other.example.com")), site.chain[0]);
        assert_eq!(leaf(None), site.chain[0]);
        // Reversed order: the default follows.
        let resolver = SniResolver::new(&[other.clone(), site], &context.provider).unwrap();
        assert_eq!(resolver.pick(None, &schemes).cert[0], other.chain[0]);
    }

    #[test]
    fn a_listener_config_speaks_http11_with_both_versions() {
        let context = TlsContext::new(None).unwrap();
        let config = context
            .server_config(&[example("site.pem", "site.key")], false, None)
            .unwrap();
        assert_eq!(config.alpn_protocols[0], b"http/1.1");
        assert!(context.server_config(&[], true, None).is_err());
    }
}
