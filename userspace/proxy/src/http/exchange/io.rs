//! What the exchange machine needs from outside HTTP: the two sides' bytes and readiness, the
//! time, routes, backend connections and the log. `session.rs` implements it over sockets,
//! `http/memory/` over bytes in memory.

use crate::accesslog::Record;
use crate::balancer::Tried;
use crate::cut::Cut;
use crate::http::{Peer, RequestInfo, ResponseInfo};
use lb_config::model::Timeouts;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// What the owner last learnt about one side of the exchange (the client or the backend).
#[derive(Debug, Default, Clone, Copy)]
pub struct Side {
    /// A read may return bytes (an event said so, and no read has drained it since).
    pub readable: bool,
    /// A write may be taken.
    pub writable: bool,
    /// The peer shut its write side (seen in an event): a short read is not the end.
    pub hup: bool,
    /// A read returned 0.
    pub eof: bool,
}

/// The client side beyond its bytes: what TLS adds.
pub trait FrontWire: Read + Write {
    /// TLS bytes wait for the socket.
    fn has_pending(&self) -> bool;
    /// Writes what TLS holds; `WouldBlock` when the socket is full.
    fn flush_pending(&mut self) -> io::Result<()>;
    /// The TLS handshake is not finished (no HTTP yet).
    fn handshaking(&self) -> bool;
    /// Plain HTTP came to a TLS port (and got its 400 from the TLS layer).
    fn refused_plain_http(&self) -> bool;
    /// Ends the sending side (close_notify, then FIN, on TLS).
    fn shutdown_write(&mut self);
    /// Reads and throws away what the client still sends, below TLS.
    fn discard(&mut self, scratch: &mut [u8]) -> io::Result<usize>;
    fn is_tls(&self) -> bool;
    /// How this client may start HTTP/2 (see [`Http2`]); never, unless the owner says.
    fn http2(&self) -> Http2 {
        Http2::Off
    }
    /// The client certificate verified in the TLS handshake, if any.
    fn client_cert(&self) -> Option<std::sync::Arc<crate::tls::ClientCert>> {
        None
    }
    /// The protocol the client speaks, for the log: `h1` unless an HTTP/2 stream.
    fn proto(&self) -> &'static str {
        "h1"
    }
    /// The request bytes read since the last call, when this front keeps them (an HTTP/2
    /// stream of a worker keeping a transcript, see `Cx::transcript`).
    fn take_tap(&mut self) -> Option<Vec<u8>> {
        None
    }
}

/// Whether a new client connection may turn out to speak HTTP/2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Http2 {
    /// HTTP/1.1 only.
    Off,
    /// Cleartext: HTTP/2 if the connection starts with the client preface (prior knowledge).
    Preface,
    /// TLS with ALPN `h2`: HTTP/2 from the first byte.
    Alpn,
}

/// What [`Io::open_backend`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// A connection to this backend, ready for the request (reused).
    Ready(SocketAddr),
    /// A new connection to this backend, still connecting.
    Connecting(SocketAddr),
    /// A backend was picked (and counted as tried) but the connection failed.
    Failed,
    /// No backend of the cluster can be picked.
    Unavailable,
}

/// What [`Io::check_connect`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connect {
    /// No backend connection.
    Missing,
    /// Not established yet: wait for an event.
    Pending,
    Established,
    Failed,
}

/// One exchange as the access log and the statistics see it.
pub struct LogEntry<'a> {
    pub request_id: &'a str,
    pub req: &'a RequestInfo,
    /// The response as far as it was parsed (default when none came).
    pub resp: &'a ResponseInfo,
    /// kakehi wrote this status itself (one of its own answers), rather than a backend.
    pub answered: bool,
    pub cluster: Option<usize>,
    pub backend: Option<SocketAddr>,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub duration: Duration,
    pub backend_time: Option<Duration>,
    pub error: Option<Cut>,
    /// The client's protocol: `h1` or `h2`.
    pub proto: &'static str,
    /// The verified client certificate (https listeners with `client_ca`).
    pub client_cert: Option<&'a crate::tls::ClientCert>,
}

impl LogEntry<'_> {
    /// The access log's record, with the cluster's name.
    pub fn record<'a>(&'a self, peer: Peer, cluster: &'a str) -> Record<'a> {
        Record {
            request_id: self.request_id,
            client: peer.client,
            listener: peer.listener,
            cluster,
            backend: self.backend,
            method: &self.req.method,
            host: &self.req.authority,
            path: &self.req.target,
            proto: self.proto,
            status: self.status,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            duration: self.duration,
            backend_time: self.backend_time,
            error: self.error,
            client_cert: self.client_cert,
        }
    }
}

/// Everything the machine needs from outside HTTP.
pub trait Io {
    type Front: FrontWire;
    type Back: Read + Write;

    /// The client connection and what is known of its readiness.
    fn front(&mut self) -> (&mut Self::Front, &mut Side);
    /// The backend connection of the current exchange, if one is open.
    fn back(&mut self) -> Option<(&mut Self::Back, &mut Side)>;

    /// The time of this turn of the event loop.
    fn now(&self) -> Instant;
    /// The worker stops: every answer from now on says `Connection: close`.
    fn draining(&self) -> bool;
    fn timeouts(&self) -> &Timeouts;
    /// Largest request body accepted (0: no limit).
    fn max_request_body(&self) -> u64;
    fn next_request_id(&mut self, out: &mut String);
    /// How the client may start HTTP/2: [`FrontWire::http2`] where the listener serves it.
    fn http2(&self) -> Http2 {
        Http2::Off
    }
    /// The cluster a request goes to, and whether the frontend redirects it to https.
    fn route(&self, host: &[u8], path: &[u8], method: &[u8]) -> Option<(usize, bool)>;
    /// Whether the client is over the `rate_limit` of the frontend the request matches (a
    /// request within it is counted).
    fn over_rate(&mut self, _host: &[u8], _path: &[u8], _method: &[u8]) -> bool {
        false
    }
    /// The `Strict-Transport-Security` value for the response, if the request came over TLS
    /// and its frontend has `hsts`.
    fn hsts(&self, _host: &[u8], _path: &[u8], _method: &[u8]) -> Option<std::sync::Arc<str>> {
        None
    }

    /// Picks a backend of `cluster` not in `tried` (adding it), and opens a connection to it
    /// (a kept or pooled one, or a new one): `attempt` counts from 1 for the request.
    /// `key`: the request's Maglev key when its cluster hashes a header or cookie it carries
    /// (otherwise a `maglev` cluster hashes the client's address).
    fn open_backend(
        &mut self,
        cluster: usize,
        tried: &mut Tried,
        attempt: u32,
        key: Option<u64>,
    ) -> Opened;
    /// What a `maglev` cluster hashes, when it is a header or a cookie.
    fn hash_key(&self, _cluster: usize) -> Option<lb_config::HashKey> {
        None
    }
    /// Whether the connection being established is up.
    fn check_connect(&mut self) -> Connect;
    /// Counts a failure of the current backend for passive health (`connect`: it failed to
    /// connect, rather than to answer).
    fn backend_failed(&mut self, connect: bool);
    /// Forgets the backend connection without reusing it.
    fn drop_backend(&mut self);
    /// The exchange ended with a response: count the verdict (`ok` unless a 5xx), then keep the
    /// connection for reuse when `reusable`, or close it.
    fn release_backend(&mut self, ok: bool, reusable: bool);
    /// After a 101, the client finished sending: shut the backend's write side.
    fn shutdown_back_write(&mut self);
    /// Why the backend connection failed, when its TLS layer knows (a certificate not
    /// trusted, ...): the access log says that rather than a connection error.
    fn back_failure(&self) -> Option<Cut> {
        None
    }

    /// One exchange ended (with a response or not): the access log and the statistics.
    fn log(&mut self, entry: &LogEntry<'_>);
    /// A response head and body (interim or final) was delivered whole to the client.
    fn response_done(&mut self, _info: &ResponseInfo) {}
}
