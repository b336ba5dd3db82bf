//! A client connection of an `http` or `https` listener with `accept_proxy = true`, before its
//! PROXY protocol header (v1 or v2, from a front load balancer) has been read.
//!
//! The header is read with `MSG_PEEK` and then consumed to its exact length, so whatever
//! follows it (the HTTP request, or the TLS ClientHello) stays in the socket for the
//! [`Session`] the connection becomes: the session is made with the header's source address as
//! the client (in `X-Forwarded-For`, `Forwarded` and the access log), then driven at once. A connection whose first bytes are not a header, or whose
//! header does not arrive within `timeouts.request_header`, is closed without a word; a
//! `LOCAL` header (a health check of the front load balancer) keeps the socket's own address.

use crate::cx::Cx;
use crate::http::Peer;
use crate::pool::PoolBuf;
use crate::proxy_protocol::{self, Addresses, Parsed};
use crate::session::{Flow, Session};
use crate::tls::Front;
use mio::net::TcpStream;
use std::io::{ErrorKind, Read};
use std::net::SocketAddr;
use std::time::Instant;

/// The longest header read: a v2 header with TLVs up to this size is read, a longer one
/// refused (HAProxy's own TLVs, which carry SSL and unique-id information, fit easily).
pub const MAX_HEADER: usize = 4096;

/// What the connection needs to become a [`Session`].
struct Parts {
    stream: TcpStream,
    client: SocketAddr,
    https: bool,
    front_buf: PoolBuf,
    back_buf: PoolBuf,
}

/// A connection waiting for its PROXY protocol header.
pub struct AwaitingProxy {
    pub id: u64,
    key: usize,
    listener: usize,
    listener_addr: SocketAddr,
    /// Taken when the session is made.
    parts: Option<Parts>,
    /// `timeouts.request_header` after the accept.
    pub deadline: Instant,
    pub scheduled: Option<Instant>,
}

/// How reading the header went.
enum Header {
    /// Not all of it yet.
    Waiting,
    /// Read and consumed: the client's address.
    Read(SocketAddr),
    /// Not a header, too long, or the client went away: close.
    Failed(String),
}

impl AwaitingProxy {
    /// A connection accepted on listener `listener` (at `listener_addr`) from `client`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        key: usize,
        stream: TcpStream,
        client: SocketAddr,
        listener: usize,
        listener_addr: SocketAddr,
        https: bool,
        front_buf: PoolBuf,
        back_buf: PoolBuf,
        deadline: Instant,
    ) -> AwaitingProxy {
        AwaitingProxy {
            id,
            key,
            listener,
            listener_addr,
            parts: Some(Parts {
                stream,
                client,
                https,
                front_buf,
                back_buf,
            }),
            deadline,
            scheduled: None,
        }
    }

    pub fn listener_addr(&self) -> SocketAddr {
        self.listener_addr
    }

    /// The client socket (for its registration with the poll).
    pub fn front_stream(&mut self) -> Option<&mut TcpStream> {
        self.parts.as_mut().map(|p| &mut p.stream)
    }

    /// Reads the header if it is all there: `Ok(Some(session))` when the connection became a
    /// session (not driven yet), `Ok(None)` to wait for more bytes, `Err(Flow::Close)` when it
    /// must close.
    pub fn advance(&mut self, cx: &mut Cx) -> Result<Option<Session>, Flow> {
        let Some(parts) = self.parts.as_mut() else {
            return Err(Flow::Close);
        };
        let client = match read_header(&mut parts.stream, parts.client) {
            Header::Waiting => return Ok(None),
            Header::Read(client) => client,
            Header::Failed(why) => {
                log::debug!(
                    "connection from {} on {} closed before its request: {why}",
                    parts.client,
                    self.listener_addr
                );
                return Err(Flow::Close);
            }
        };
        let Some(Parts {
            stream,
            https,
            front_buf,
            back_buf,
            ..
        }) = self.parts.take()
        else {
            return Err(Flow::Close);
        };
        let front =
            match Front::accepted(stream, cx.tls.get(self.listener).and_then(Option::as_ref)) {
                Ok(front) => front,
                Err(e) => {
                    log::warn!("TLS connection from {client} refused: {e}");
                    cx.pool.checkin(front_buf);
                    cx.pool.checkin(back_buf);
                    return Err(Flow::Close);
                }
            };
        let mut session = Session::new(
            self.id,
            self.key,
            front,
            Peer {
                client,
                listener: self.listener_addr,
                https,
            },
            self.listener,
            front_buf,
            back_buf,
            cx.now,
        );
        session.scheduled = self.scheduled;
        // The bytes after the header are in the socket already: their edge was this one.
        session.front_event(true, true, false);
        Ok(Some(session))
    }

    /// Gives the buffers back; the socket closes as it is dropped.
    pub fn close(self, cx: &mut Cx) {
        if let Some(parts) = self.parts {
            cx.pool.checkin(parts.front_buf);
            cx.pool.checkin(parts.back_buf);
        }
    }
}

/// Peeks at what the client sent and, once a whole header is there, consumes exactly it.
fn read_header(stream: &mut TcpStream, own: SocketAddr) -> Header {
    let mut buf = [0u8; MAX_HEADER];
    let seen = loop {
        match stream.peek(&mut buf) {
            Ok(0) => return Header::Failed("the client closed".into()),
            Ok(n) => break n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Header::Waiting,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Header::Failed(e.to_string()),
        }
    };
    let (addresses, len) = match proxy_protocol::parse(buf.get(..seen).unwrap_or_default()) {
        Ok(Parsed::Complete { addresses, len }) => (addresses, len),
        Ok(Parsed::Incomplete { at_least }) if at_least <= MAX_HEADER && seen < MAX_HEADER => {
            return Header::Waiting;
        }
        Ok(Parsed::Incomplete { .. }) => {
            return Header::Failed(format!(
                "PROXY protocol header longer than {MAX_HEADER} bytes"
            ))
        }
        Err(e) => return Header::Failed(e.to_string()),
    };
    // The bytes are there (peeked): one read takes them, a loop in case it is cut short.
    let mut left = len;
    while left > 0 {
        match stream.read(buf.get_mut(..left).unwrap_or_default()) {
            Ok(0) => return Header::Failed("the client closed".into()),
            Ok(n) => left -= n.min(left),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Header::Failed(e.to_string()),
        }
    }
    match addresses {
        Addresses::Proxy { source, .. } => Header::Read(source),
        Addresses::Local => Header::Read(own),
    }
}
