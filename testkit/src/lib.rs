//! `lb-testkit`: a small, fast, std-only HTTP/1.1 origin server for kakehi's
//! end-to-end tests, the demo (`cargo xtask run`) and benchmarks.
//!
//! [`Origin::start`] binds `127.0.0.1:0`, serves every connection on its own
//! thread and records every request it sees ([`Origin::requests`]). Bodies are
//! never stored: they are hashed (FNV-1a 64, see [`fnv1a64`]) while streaming,
//! so multi-GiB transfers are fine. Routes (every response carries
//! `X-Origin: NAME`):
//!
//! | route | answer |
//! |---|---|
//! | `/` or unknown | 200 `origin NAME: METHOD TARGET\n` |
//! | `/bytes/N` | N pattern bytes (`i % 251`), `Content-Length` |
//! | `/chunked/N` | same bytes, chunked (chunks of up to 8 KiB) |
//! | `/echo` | the request body, streamed back |
//! | `/digest` | `len=N fnv=HEX\n` of the request body |
//! | `/headers` | every request header as `Name: value\n` |
//! | `/status/CODE` | that status |
//! | `/sleep/MS` | 200 after MS milliseconds |
//! | `/close` | 200 with `Connection: close`, then closes |
//! | `/ws` | `101` on `Upgrade: websocket`, then raw byte echo until EOF |
//! | `/health` | 200 `ok` |

// This crate is test/demo tooling, not the data path: panicking on a broken
// test setup is the desired behaviour here, so the data-path lints are relaxed.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod conn;
mod http;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

pub use http::{fnv1a64, Fnv1a64};

/// Stack size of connection threads: all buffers live on the heap.
const CONN_STACK: usize = 256 * 1024;

/// One request as the origin saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// Request method, as sent (`GET`, `POST`, ...).
    pub method: String,
    /// Request target, as sent (`/path?query`).
    pub target: String,
    /// Protocol version, as sent (`HTTP/1.1`).
    pub version: String,
    /// Every header in received order, names with their original case.
    pub headers: Vec<(String, String)>,
    /// Decoded body length (after de-chunking).
    pub body_len: u64,
    /// FNV-1a 64 of the decoded body (see [`fnv1a64`]).
    pub body_sha: u64,
    /// Connection this request arrived on: 0 for the first accepted
    /// connection, 1 for the second, ...
    pub conn_id: usize,
}

impl RecordedRequest {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// State shared by the accept thread and the connection threads.
pub(crate) struct Shared {
    pub(crate) name: String,
    stop: AtomicBool,
    requests: Mutex<Vec<RecordedRequest>>,
    pub(crate) bytes_received: AtomicUsize,
    accepted: AtomicUsize,
    /// Live connections (clones), shut down on stop.
    live: Mutex<HashMap<usize, TcpStream>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Shared {
    pub(crate) fn record(&self, req: RecordedRequest) {
        lock(&self.requests).push(req);
    }

    pub(crate) fn forget(&self, conn_id: usize) {
        lock(&self.live).remove(&conn_id);
    }
}

/// A running origin server. Stops (stops accepting, closes every
/// connection) on [`Origin::stop`] or when dropped.
pub struct Origin {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Origin {
    /// Starts an origin named `name` on `127.0.0.1:0` (an ephemeral port).
    ///
    /// # Panics
    /// If the loopback listener cannot be bound.
    pub fn start(name: &str) -> Origin {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        Self::start_on(name, addr).expect("lb-testkit: bind 127.0.0.1:0")
    }

    /// Starts an origin named `name` listening on `addr`.
    pub fn start_on(name: &str, addr: SocketAddr) -> io::Result<Origin> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            stop: AtomicBool::new(false),
            requests: Mutex::new(Vec::new()),
            bytes_received: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
            live: Mutex::new(HashMap::new()),
        });
        let accept_shared = Arc::clone(&shared);
        let accept = thread::Builder::new()
            .name(format!("origin-{name}-accept"))
            .spawn(move || accept_loop(&listener, &accept_shared))?;
        Ok(Origin {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    /// The bound address (with the real port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The name given at start (sent as `X-Origin`).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Every request received so far, in order of completion (a request is
    /// recorded once its body has been read, before its response completes).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    /// Total bytes read from all connections (heads, bodies, websocket data).
    pub fn raw_bytes_received(&self) -> usize {
        self.shared.bytes_received.load(Ordering::Relaxed)
    }

    /// Connections accepted so far.
    pub fn connections_accepted(&self) -> usize {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Stops accepting and closes every open connection.
    pub fn stop(self) {
        drop(self);
    }

    fn shutdown(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept() with a throwaway connection.
        let ip = match self.addr.ip() {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let woke = TcpStream::connect_timeout(
            &SocketAddr::new(ip, self.addr.port()),
            Duration::from_secs(2),
        )
        .is_ok();
        if woke {
            let _ = accept.join();
        }
        // The accept thread registered every connection before exiting.
        for (_, s) in lock(&self.shared.live).drain() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field("name", &self.shared.name)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    loop {
        let res = listener.accept();
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match res {
            Ok((s, _)) => s,
            Err(_) => {
                // EMFILE and friends: back off instead of spinning.
                thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        let conn_id = shared.accepted.fetch_add(1, Ordering::Relaxed);
        if let Ok(clone) = stream.try_clone() {
            lock(&shared.live).insert(conn_id, clone);
        }
        let conn_shared = Arc::clone(shared);
        let spawned = thread::Builder::new()
            .name(format!("origin-{}-conn{conn_id}", shared.name))
            .stack_size(CONN_STACK)
            .spawn(move || {
                conn::serve(conn_id, stream, &conn_shared);
                conn_shared.forget(conn_id);
            });
        if spawned.is_err() {
            shared.forget(conn_id);
        }
    }
}
