//! A backend connection's socket: plain TCP, or TLS for a cluster with `backend_tls = true`.
//!
//! [`BackendTls`] is a cluster's client configuration (its roots: `backend_ca` or the
//! system's; the name its backends must prove: `backend_server_name` or each backend's IP
//! address), built by the worker when the configuration arrives. [`BackStream`] is what the
//! session, the idle pool and the exchange machine hold: `Read`/`Write` give plaintext, the
//! TLS records going through rustls over the same non-blocking socket, with the same
//! contract as the client side (`tls.rs`): a short read means the socket is drained. The
//! handshake happens inside the first reads and writes, as the request goes out: a request
//! written before it ends waits in rustls and goes with the client's Finished.
//!
//! A failed handshake is a read error whose reason [`BackStream::failure`] gives (an
//! untrusted certificate, a wrong name, ...) for the access log's `error` field.

use crate::cut::Cut;
use crate::tls::{flush_tls_to, read_plain_from, write_plain_to};
use mio::net::TcpStream;
use rustls::pki_types::ServerName;
use rustls::{CertificateError, ClientConfig, ClientConnection, RootCertStore};
use std::io::{self, ErrorKind, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Plaintext rustls may hold for the backend before `write` pushes back.
const SEND_BUFFER_LIMIT: usize = 64 * 1024;

/// Gives every [`BackendTls`] of a process its own number (0 is plain TCP).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A cluster's TLS client side.
pub struct BackendTls {
    /// Pooled connections are reused only by a cluster with the same `id` (the same roots and
    /// name).
    pub id: u64,
    pub spec: lb_config::BackendTls,
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendTls")
            .field("id", &self.id)
            .field("server_name", &self.spec.server_name)
            .finish_non_exhaustive()
    }
}

impl BackendTls {
    /// The client side of a cluster's `backend_tls`: its `backend_ca`, or `system` when it
    /// names none.
    pub fn new(
        spec: &lb_config::BackendTls,
        provider: &Arc<rustls::crypto::CryptoProvider>,
        system: &Arc<RootCertStore>,
    ) -> Result<BackendTls, String> {
        Ok(BackendTls {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            spec: spec.clone(),
            config: client_config(spec, provider, system)?,
        })
    }

    /// The name `address`'s certificate must be valid for (and the SNI, when it is a DNS
    /// name).
    pub fn server_name(&self, address: SocketAddr) -> ServerName<'static> {
        server_name(&self.spec, address)
    }

    /// A new TLS connection over `sock` (connecting) to the backend at `address`.
    pub fn connect(&self, sock: TcpStream, address: SocketAddr) -> io::Result<BackStream> {
        let mut conn = ClientConnection::new(Arc::clone(&self.config), self.server_name(address))
            .map_err(|e| io::Error::other(format!("TLS: {e}")))?;
        conn.set_buffer_limit(Some(SEND_BUFFER_LIMIT));
        Ok(BackStream {
            sock,
            tls: Some(Box::new(TlsBack {
                conn,
                id: self.id,
                eof: false,
                failure: None,
            })),
        })
    }
}

/// The rustls client configuration of a cluster's `backend_tls` (also what lbd's health
/// checks use): TLS 1.3 and 1.2, ALPN `http/1.1`, the cluster's roots or `system`, resumption
/// with rustls's in-memory cache.
pub fn client_config(
    spec: &lb_config::BackendTls,
    provider: &Arc<rustls::crypto::CryptoProvider>,
    system: &Arc<RootCertStore>,
) -> Result<Arc<ClientConfig>, String> {
    let roots = if spec.roots.is_empty() {
        Arc::clone(system)
    } else {
        let mut roots = RootCertStore::empty();
        for der in &spec.roots {
            roots
                .add(der.clone())
                .map_err(|e| format!("backend_ca: {e}"))?;
        }
        Arc::new(roots)
    };
    let mut config = ClientConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The system's roots as a rustls store (see `lb_config::certs::system_roots`): empty, with
/// the reason, when they cannot be read (every backend then fails verification, saying so).
pub fn system_store() -> (Arc<RootCertStore>, Option<String>) {
    match lb_config::certs::system_roots() {
        Ok(ders) => {
            let mut store = RootCertStore::empty();
            store.add_parsable_certificates(ders);
            (Arc::new(store), None)
        }
        Err(e) => (Arc::new(RootCertStore::empty()), Some(e)),
    }
}

/// The name a backend must prove: `backend_server_name`, else its IP address.
pub fn server_name(spec: &lb_config::BackendTls, address: SocketAddr) -> ServerName<'static> {
    spec.server_name
        .as_deref()
        .and_then(|name| ServerName::try_from(name.to_owned()).ok())
        .unwrap_or_else(|| ServerName::IpAddress(address.ip().into()))
}

/// Why a TLS connection to a backend failed, for the access log.
pub fn classify(e: &rustls::Error) -> Cut {
    match e {
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => Cut::BackendTlsWrongName,
        rustls::Error::InvalidCertificate(
            CertificateError::Expired
            | CertificateError::ExpiredContext { .. }
            | CertificateError::NotValidYet
            | CertificateError::NotValidYetContext { .. },
        ) => Cut::BackendTlsExpired,
        rustls::Error::InvalidCertificate(_) => Cut::BackendTlsUntrusted,
        _ => Cut::BackendTlsHandshake,
    }
}

/// A backend connection: its socket, and the TLS state over it for a `backend_tls` cluster.
pub struct BackStream {
    sock: TcpStream,
    tls: Option<Box<TlsBack>>,
}

struct TlsBack {
    conn: ClientConnection,
    /// The [`BackendTls::id`] it was made with.
    id: u64,
    eof: bool,
    failure: Option<Cut>,
}

impl BackStream {
    pub fn plain(sock: TcpStream) -> BackStream {
        BackStream { sock, tls: None }
    }

    /// The socket (registration, connect checks, probes).
    pub fn sock(&self) -> &TcpStream {
        &self.sock
    }

    pub fn sock_mut(&mut self) -> &mut TcpStream {
        &mut self.sock
    }

    /// 0 for plain TCP, else the [`BackendTls::id`] it was made with.
    pub fn tls_id(&self) -> u64 {
        self.tls.as_ref().map_or(0, |t| t.id)
    }

    /// The TLS handshake or a record failed: why.
    pub fn failure(&self) -> Option<Cut> {
        self.tls.as_ref().and_then(|t| t.failure)
    }

    /// TLS bytes wait for the socket.
    pub fn has_pending(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.conn.wants_write())
    }

    /// Writes what rustls holds; `WouldBlock` when the socket is full.
    pub fn flush_pending(&mut self) -> io::Result<()> {
        match self.tls.as_mut() {
            None => Ok(()),
            Some(t) => flush_tls_to(&mut self.sock, &mut t.conn),
        }
    }

    /// Ends the sending side (close_notify first on TLS).
    pub fn shutdown_write(&mut self) {
        if let Some(t) = self.tls.as_mut() {
            t.conn.send_close_notify();
            let _ = flush_tls_to(&mut self.sock, &mut t.conn);
        }
        let _ = self.sock.shutdown(Shutdown::Write);
    }
}

impl AsRawFd for BackStream {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

impl Read for BackStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(t) = self.tls.as_mut() else {
            return self.sock.read(buf);
        };
        let result = read_plain_from(&mut self.sock, &mut t.conn, &mut t.eof, buf);
        if let Err(e) = &result {
            if e.kind() == ErrorKind::InvalidData {
                if let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    t.failure = Some(classify(tls));
                }
            }
        }
        result
    }
}

impl Write for BackStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self.tls.as_mut() {
            None => self.sock.write_vectored(bufs),
            Some(t) => write_plain_to(&mut self.sock, &mut t.conn, bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_pending()
    }
}
