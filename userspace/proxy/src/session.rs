//! One client connection of an `http`/`https` listener: the sockets under the HTTP/1.1
//! exchange machine (`http/exchange/`).
//!
//! The machine decides everything HTTP (parsing, routing, retries, answers, the log); this
//! file is what it needs from the real world: the client socket (plain or TLS) and its
//! readiness, the backend connection of the current exchange (picked by the balancer, opened,
//! registered with the poll once under a token of its own, kept between requests or handed to
//! the worker's idle pool: see `idle_backends.rs`), the time and the worker's shared state.
//! The worker (`worker.rs`) owns the sockets' registration, the slab and the timers.

use crate::back_stream::{BackStream, BackendTls};
use crate::balancer::{self, ClusterState, Tried};
use crate::cx::Cx;
use crate::h2::conn::H2Conn;
use crate::h2::upstream::Shared;
use crate::http::exchange::{self, Connect, Exchange, FrontWire, Http2, LogEntry, Opened, Side};
use crate::http::Peer;
use crate::idle_backends::back_token;
use crate::pool::PoolBuf;
use crate::tls::Front;
use lb_config::model::Timeouts;
use mio::net::TcpStream;
use mio::{Interest, Token};
use std::io::{self, ErrorKind, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::Instant;

pub use crate::http::exchange::Flow;

/// A connection idle this long between requests gives its buffers back to the pool and frees
/// the parser's metadata: an idle keep-alive connection then holds only its `Session` (see
/// the README's "Memory per connection"). Not at once, so that a busy keep-alive connection
/// does not give back and take again two buffers per request.
pub const PARK_AFTER: std::time::Duration = std::time::Duration::from_millis(50);

/// A backend connection: a socket of the exchange's own, or, for a cluster with
/// `http2 = true`, a stream on a shared HTTP/2 connection (`h2/upstream.rs`).
pub(crate) enum BackIo {
    /// Plain TCP, or TLS for a cluster with `backend_tls`.
    Socket(BackStream),
    H2 {
        up: Shared,
        handle: u32,
    },
}

impl BackIo {
    /// The descriptor number of the socket (its backend token's).
    fn fd(&self) -> usize {
        match self {
            BackIo::Socket(s) => usize::try_from(s.as_raw_fd()).unwrap_or(usize::MAX),
            BackIo::H2 { up, .. } => up.borrow().fd(),
        }
    }
}

impl Read for BackIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            BackIo::Socket(s) => s.read(buf),
            BackIo::H2 { up, handle } => up.borrow_mut().read(*handle, buf),
        }
    }
}

impl Write for BackIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            BackIo::Socket(s) => s.write_vectored(bufs),
            BackIo::H2 { up, handle } => up.borrow_mut().write(*handle, bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Drives after an HTTP/2 backend connection made room for the request, in one turn.
const MAX_REDRIVES: usize = 4;

struct BackConn {
    io: BackIo,
    cluster: usize,
    backend: usize,
    address: SocketAddr,
    side: Side,
}

/// A backend connection this session keeps between its requests (like HAProxy's
/// `http-reuse safe`): the next request that goes to the same backend uses it as it is, its
/// events still coming to this session, with no liveness probe unless an event came for it
/// meanwhile. It goes to the shared idle pool when the next request goes elsewhere or
/// the client connection ends.
struct HeldBack {
    stream: BackStream,
    address: SocketAddr,
    since: Instant,
    /// An event came while it was idle (bytes, or the backend closing): probe before reuse.
    stirred: bool,
}

/// The sockets of one HTTP client connection (`F`: the client socket), or of one HTTP/2
/// stream (`F`: the stream's side of its connection, see `h2/stream.rs`).
pub(crate) struct Wires<F> {
    key: usize,
    listener: usize,
    pub(crate) front: F,
    pub(crate) front_side: Side,
    back: Option<BackConn>,
    held: Option<HeldBack>,
}

impl<F> Wires<F> {
    /// After the exchange's turn: what an HTTP/2 backend connection must write, and whether
    /// the exchange should be driven again. A stream the backend refused unprocessed (a
    /// GOAWAY before it, REFUSED_STREAM) moves here to another connection, its request sent
    /// again, without the exchange knowing.
    pub(crate) fn after_drive(&mut self, cx: &mut Cx) -> bool {
        if let Some(BackConn {
            io: BackIo::Socket(stream),
            side,
            ..
        }) = self.back.as_mut()
        {
            // TLS records rustls could not write yet (the socket was full), or the handshake's
            // next flight: out now, since the exchange may have nothing more to write.
            if stream.has_pending() {
                match stream.flush_pending() {
                    Err(e) if e.kind() != ErrorKind::WouldBlock => {
                        // The exchange learns it from its next read.
                        side.readable = true;
                        return true;
                    }
                    _ => {}
                }
            }
            return false;
        }
        let key = self.key;
        let Some(BackConn {
            io: BackIo::H2 { up, handle },
            side,
            address,
            cluster,
            ..
        }) = self.back.as_mut()
        else {
            return false;
        };
        let refused = up.borrow_mut().take_refused(*handle);
        if let Some((request, moves)) = refused {
            cx.upstreams.release(up, *handle, cx.now);
            match cx.upstreams.open(*address, key, &cx.registry, cx.now) {
                Ok((next, next_handle, reused)) => {
                    log::debug!("a stream refused by {address} goes again on another connection");
                    cx.note_attempt(*cluster, *address, 1, !reused);
                    next.borrow_mut().resume(next_handle, request, moves);
                    *up = next;
                    *handle = next_handle;
                }
                Err(e) => {
                    // The exchange learns it from its next read (the stream is gone).
                    log::warn!("connect to {address} failed: {e}");
                    side.readable = true;
                    return true;
                }
            }
        }
        let again = up.borrow_mut().after_drive(*handle);
        side.writable |= again;
        again
    }

    /// The wires of session `key` (its slab key) on listener `listener`, with no backend.
    pub(crate) fn new(key: usize, listener: usize, front: F) -> Wires<F> {
        Wires {
            key,
            listener,
            front,
            front_side: Side::default(),
            back: None,
            held: None,
        }
    }

    pub(crate) fn key(&self) -> usize {
        self.key
    }

    pub(crate) fn listener(&self) -> usize {
        self.listener
    }

    /// Records readiness from an event on the backend socket with descriptor number `fd`;
    /// false when it is none of these wires' connections.
    pub(crate) fn back_event(
        &mut self,
        fd: usize,
        readable: bool,
        writable: bool,
        read_closed: bool,
    ) -> bool {
        let is = |stream: &BackStream| usize::try_from(stream.as_raw_fd()) == Ok(fd);
        if let Some(back) = self.back.as_mut().filter(|b| b.io.fd() == fd) {
            back.side.readable |= readable;
            back.side.writable |= writable;
            back.side.hup |= read_closed;
            true
        } else if let Some(held) = self.held.as_mut().filter(|h| is(&h.stream)) {
            held.stirred |= readable || read_closed;
            true
        } else {
            false
        }
    }

    /// After a configuration change: the backend connection's cluster and backend at their
    /// new positions.
    pub(crate) fn remap_clusters(&mut self, old: &[ClusterState], new: &[ClusterState]) {
        if let Some(back) = self.back.as_mut() {
            (back.cluster, back.backend) =
                balancer::remap_backend(old, new, back.cluster, back.address);
        }
    }

    /// Lets go of the backend connections: the one of an exchange in flight is closed, the
    /// one kept for a next request goes to the idle pool. Returns the front.
    pub(crate) fn release(self, cx: &mut Cx) -> F {
        let Wires {
            front,
            mut back,
            held,
            ..
        } = self;
        if let Some(b) = back.as_mut() {
            forget(cx, &b.io);
            if let Some(c) = cx.clusters.get_mut(b.cluster) {
                c.release(b.backend);
            }
        }
        if let Some(held) = held {
            cx.idle.unhold();
            put_back(cx, held);
        }
        front
    }
}

pub struct Session {
    pub id: u64,
    peer: Peer,
    wires: Wires<Front>,
    exchange: Exchange,
    /// The connection speaks HTTP/2 (prior knowledge or ALPN): its streams are there, and
    /// `exchange` only keeps the connection's place (its buffers went back to the pool).
    h2: Option<Box<H2Conn>>,
    /// The end of the TLS handshake was counted (or the front is plain).
    tls_counted: bool,
    pub deadline: Instant,
    /// The earliest timer entry the worker holds for this session.
    pub scheduled: Option<Instant>,
}

pub fn front_token(key: usize) -> Token {
    Token(key << 1)
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        key: usize,
        front: Front,
        peer: Peer,
        listener: usize,
        front_buf: PoolBuf,
        back_buf: PoolBuf,
        now: Instant,
    ) -> Session {
        Session {
            id,
            peer,
            wires: Wires::new(key, listener, front),
            exchange: Exchange::new(peer, front_buf, back_buf, now),
            h2: None,
            tls_counted: false,
            deadline: now,
            scheduled: None,
        }
    }

    /// The address of the listener that accepted the connection.
    pub fn listener_addr(&self) -> SocketAddr {
        self.peer.listener
    }

    pub fn front_stream(&mut self) -> &mut TcpStream {
        self.wires.front.stream_mut()
    }

    /// Records readiness from an event on the front (client) socket. `read_closed`: the
    /// peer shut its write side, so reads must go on until they return 0.
    pub fn front_event(&mut self, readable: bool, writable: bool, read_closed: bool) {
        let side = &mut self.wires.front_side;
        side.readable |= readable;
        side.writable |= writable;
        side.hup |= read_closed;
    }

    /// Records readiness from an event on the backend socket with descriptor number `fd`
    /// (the one of the current exchange, or the one kept for the next request; an event of a
    /// connection this session no longer has is ignored).
    pub fn back_event(&mut self, fd: usize, readable: bool, writable: bool, read_closed: bool) {
        if !self.wires.back_event(fd, readable, writable, read_closed) {
            if let Some(h2) = self.h2.as_mut() {
                h2.back_event(fd, readable, writable, read_closed);
            }
        }
    }

    /// The last `drive` stopped at its step cap with work left: the worker drives it again
    /// at its next turn, since bytes already waiting bring no new edge-triggered event.
    pub fn yielded(&self) -> bool {
        match &self.h2 {
            Some(h2) => h2.yielded(),
            None => self.exchange.yielded(),
        }
    }

    /// Idle between requests since `since` (its last exchange ended, or it was accepted):
    /// a draining worker may close it once the grace has passed since then.
    pub fn idle_since(&self) -> Option<Instant> {
        match &self.h2 {
            Some(h2) => h2.idle_since(),
            None => self.exchange.idle_since(self.wires.front.handshaking()),
        }
    }

    /// After a configuration change: point the request's cluster and backend at their new
    /// positions (by cluster name and backend address), or at nothing when they were removed
    /// (the exchange in flight finishes; it just no longer counts for balancing).
    pub fn remap_clusters(&mut self, old: &[ClusterState], new: &[ClusterState]) {
        self.exchange
            .remap_cluster(|c| balancer::remap_cluster(old, new, c));
        self.wires.remap_clusters(old, new);
        if let Some(h2) = self.h2.as_mut() {
            h2.remap_clusters(old, new);
        }
    }

    /// Gives the buffers back and closes the sockets (closing removes them from the poll),
    /// but for a backend connection kept for the next request, which goes to the idle pool.
    pub fn close(self, cx: &mut Cx) {
        if !self.tls_counted && self.wires.front.is_tls() {
            cx.stats
                .tls_handshake(self.peer.listener, !self.wires.front.handshaking());
        }
        let Session {
            wires,
            exchange,
            h2,
            ..
        } = self;
        if let Some(h2) = h2 {
            h2.close(cx);
        }
        let front = wires.release(cx);
        // No deregistration: closing the socket removes it from the poll (one syscall less
        // per connection).
        drop(front);
        if !exchange.parked() {
            let (front_buf, back_buf) = exchange.into_buffers();
            cx.pool.checkin(front_buf);
            cx.pool.checkin(back_buf);
        }
    }

    /// Makes every step possible now.
    pub fn drive(&mut self, cx: &mut Cx) -> Flow {
        if let Some(h2) = self.h2.as_mut() {
            let flow = h2.drive(&mut self.wires, cx);
            self.deadline = h2.deadline(cx);
            return flow;
        }
        if self.exchange.parked() && !self.unpark(cx) {
            // The pool holds two buffers for every connection allowed (`max_connections`): an
            // empty pool here is a bug, and closing is the bounded answer to it.
            log::warn!("no buffer for a parked connection: closing it");
            return Flow::Close;
        }
        if !self.tls_counted && self.wires.front.is_tls() && !self.wires.front.handshaking() {
            self.tls_counted = true;
            cx.stats.tls_handshake(self.peer.listener, true);
        }
        match self.step(cx, |exchange, io| exchange.drive(io)) {
            Flow::Http2 => self.start_h2(cx),
            flow => flow,
        }
    }

    /// The connection turned out to speak HTTP/2: what the exchange read goes to the HTTP/2
    /// connection, and the exchange's buffers back to the pool.
    fn start_h2(&mut self, cx: &mut Cx) -> Flow {
        let limits = cx
            .h2_limits
            .get(self.wires.listener())
            .copied()
            .unwrap_or_default();
        let mut h2 = Box::new(H2Conn::new(self.peer, limits, cx));
        h2.client_cert = self.wires.front.client_cert();
        h2.take_input(self.exchange.unparsed_input());
        let (front, back) = self.exchange.park();
        cx.pool.checkin(front);
        cx.pool.checkin(back);
        self.h2 = Some(h2);
        self.drive(cx)
    }

    /// One call of the machine over this session's sockets, then the next deadline.
    fn step(&mut self, cx: &mut Cx, call: fn(&mut Exchange, &mut Real<'_, Front>) -> Flow) -> Flow {
        let mut flow = call(
            &mut self.exchange,
            &mut Real {
                wires: &mut self.wires,
                peer: self.peer,
                cx,
            },
        );
        // An HTTP/2 backend may have more to write, or room again for the request.
        for _ in 0..MAX_REDRIVES {
            if flow != Flow::Continue || !self.wires.after_drive(cx) {
                break;
            }
            flow = self.exchange.drive(&mut Real {
                wires: &mut self.wires,
                peer: self.peer,
                cx,
            });
        }
        if flow == Flow::Continue {
            self.set_deadline(cx);
        }
        flow
    }

    /// The deadline passed: what the state calls for.
    pub fn timeout(&mut self, cx: &mut Cx) -> Flow {
        if let Some(h2) = self.h2.as_mut() {
            let flow = h2.timeout(&mut self.wires, cx);
            self.deadline = h2.deadline(cx);
            return flow;
        }
        if self.park_due(cx) {
            let (front, back) = self.exchange.park();
            cx.pool.checkin(front);
            cx.pool.checkin(back);
            self.set_deadline(cx);
            return Flow::Continue;
        }
        self.step(cx, |exchange, io| exchange.timeout(io))
    }

    fn set_deadline(&mut self, cx: &Cx) {
        let deadline =
            self.exchange
                .deadline(&cx.timeouts, self.wires.front.handshaking(), cx.draining);
        self.deadline = if self.exchange.parkable() && !self.exchange.parked() {
            deadline.min(self.exchange.since() + PARK_AFTER)
        } else {
            deadline
        };
    }

    /// Idle for [`PARK_AFTER`] with its buffers, and not yet at its idle deadline.
    fn park_due(&self, cx: &Cx) -> bool {
        self.exchange.parkable()
            && !self.exchange.parked()
            && cx.now
                < self
                    .exchange
                    .deadline(&cx.timeouts, self.wires.front.handshaking(), cx.draining)
    }

    /// Takes two buffers from the pool for a parked connection; false when the pool has none.
    fn unpark(&mut self, cx: &mut Cx) -> bool {
        let Some(front) = cx.pool.checkout() else {
            return false;
        };
        let Some(back) = cx.pool.checkout() else {
            cx.pool.checkin(front);
            return false;
        };
        self.exchange.unpark(front, back);
        true
    }

    /// The connection holds no buffer (idle past [`PARK_AFTER`]).
    pub fn parked(&self) -> bool {
        self.h2.is_none() && self.exchange.parked()
    }
}

/// A connection kept for the next request goes to the idle pool, or is closed when an event
/// came for it while it was kept.
/// An exchange is done with its backend connection, which is not reused: a socket of its own
/// is closed (when the caller drops it), a stream on a shared connection ended.
fn forget(cx: &mut Cx, io: &BackIo) {
    match io {
        BackIo::Socket(s) => cx.idle.forget(s),
        BackIo::H2 { up, handle } => cx.upstreams.release(up, *handle, cx.now),
    }
}

fn put_back(cx: &mut Cx, held: HeldBack) {
    if held.stirred {
        cx.idle.forget(&held.stream);
    } else {
        cx.idle.put(held.address, held.stream, held.since);
    }
}

/// The exchange machine's view of the sockets and the worker, for one call.
pub(crate) struct Real<'a, F> {
    pub(crate) wires: &'a mut Wires<F>,
    pub(crate) peer: Peer,
    pub(crate) cx: &'a mut Cx,
}

impl<F> Real<'_, F> {
    /// Connects to `address` or reuses a connection to it: the one this session kept, or one
    /// from the idle pool. The bool says it was reused (no connect needed).
    /// A connection found is registered already and its events come to this session; a new
    /// one is registered by the caller.
    /// A stream to `address` on an HTTP/2 connection shared with other exchanges.
    fn open_h2_stream(
        &mut self,
        cluster_idx: usize,
        backend: usize,
        address: SocketAddr,
        attempt: u32,
    ) -> Opened {
        let cx = &mut *self.cx;
        let (up, handle, reused) =
            match cx
                .upstreams
                .open(address, self.wires.key, &cx.registry, cx.now)
            {
                Ok(opened) => opened,
                Err(e) => {
                    log::warn!("connect to {address} failed: {e}");
                    cx.note_attempt(cluster_idx, address, attempt, true);
                    cx.backend_failed(cluster_idx, backend, true);
                    return Opened::Failed;
                }
            };
        cx.note_attempt(cluster_idx, address, attempt, !reused);
        if let Some(cluster) = cx.clusters.get_mut(cluster_idx) {
            cluster.acquire(backend);
        }
        let established = up.borrow().connect_state() == Some(true);
        self.wires.back = Some(BackConn {
            io: BackIo::H2 { up, handle },
            cluster: cluster_idx,
            backend,
            address,
            side: Side {
                writable: established,
                ..Side::default()
            },
        });
        if established {
            Opened::Ready(address)
        } else {
            Opened::Connecting(address)
        }
    }

    fn connection_to(
        &mut self,
        address: SocketAddr,
        tls: Option<&BackendTls>,
    ) -> io::Result<(BackStream, bool)> {
        let cx = &mut *self.cx;
        let tls_id = tls.map_or(0, |t| t.id);
        let held = self.wires.held.take();
        if held.is_some() {
            cx.idle.unhold();
        }
        let kept = match held {
            Some(held) if held.address == address && held.stream.tls_id() == tls_id => cx
                .idle
                .revive(held.stream, held.since, held.stirred, cx.now),
            Some(held) => {
                put_back(cx, held);
                None
            }
            None => None,
        };
        let found = match kept {
            Some(s) => Some(s),
            None => cx.idle.take(address, tls_id, cx.now, self.wires.key),
        };
        if let Some(s) = found {
            return Ok((s, true));
        }
        let sock = crate::idle_backends::connect_backend(address)?;
        let stream = match tls {
            Some(tls) => tls.connect(sock, address)?,
            None => BackStream::plain(sock),
        };
        Ok((stream, false))
    }
}

impl<F: FrontWire> exchange::Io for Real<'_, F> {
    type Front = F;
    type Back = BackIo;

    fn front(&mut self) -> (&mut F, &mut Side) {
        (&mut self.wires.front, &mut self.wires.front_side)
    }

    fn back(&mut self) -> Option<(&mut BackIo, &mut Side)> {
        self.wires.back.as_mut().map(|b| (&mut b.io, &mut b.side))
    }

    fn now(&self) -> Instant {
        self.cx.now
    }

    fn draining(&self) -> bool {
        self.cx.draining
    }

    fn timeouts(&self) -> &Timeouts {
        &self.cx.timeouts
    }

    fn max_request_body(&self) -> u64 {
        self.cx.max_request_body
    }

    fn next_request_id(&mut self, out: &mut String) {
        self.cx.next_request_id(out);
    }

    fn http2(&self) -> Http2 {
        if self.cx.http2.get(self.wires.listener) == Some(&true) {
            self.wires.front.http2()
        } else {
            Http2::Off
        }
    }

    fn route(&self, host: &[u8], path: &[u8], method: &[u8]) -> Option<(usize, bool)> {
        self.cx
            .routers
            .get(self.wires.listener)
            .and_then(|r| r.lookup_route(host, path, method))
    }

    fn over_rate(&mut self, host: &[u8], path: &[u8], method: &[u8]) -> bool {
        let Some(limit) = self
            .cx
            .routers
            .get(self.wires.listener)
            .and_then(|r| r.rate_limit(host, path, method))
        else {
            return false;
        };
        !self.cx.admit_rate(&limit, self.peer.client.ip())
    }

    fn hsts(&self, host: &[u8], path: &[u8], method: &[u8]) -> Option<std::sync::Arc<str>> {
        if !self.peer.https {
            return None;
        }
        self.cx
            .routers
            .get(self.wires.listener)
            .and_then(|r| r.hsts(host, path, method))
    }

    fn hash_key(&self, cluster: usize) -> Option<lb_config::HashKey> {
        self.cx
            .clusters
            .get(cluster)
            .map(|c| &c.hash_key)
            .filter(|k| **k != lb_config::HashKey::SourceIp)
            .cloned()
    }

    fn open_backend(
        &mut self,
        cluster_idx: usize,
        tried: &mut Tried,
        attempt: u32,
        key: Option<u64>,
    ) -> Opened {
        let cx = &mut *self.cx;
        let Some(cluster) = cx.clusters.get_mut(cluster_idx) else {
            return Opened::Unavailable;
        };
        cluster.revive(cx.now);
        let key = match (cluster.policy, key) {
            (lb_config::LoadBalancing::Maglev, None) => {
                crate::maglev::ip_key(self.peer.client.ip())
            }
            (_, key) => key.unwrap_or(0),
        };
        let Some(backend) = cluster.pick_keyed(*tried, &mut cx.rng, key) else {
            return Opened::Unavailable;
        };
        tried.insert(backend);
        let Some(address) = cluster.address(backend) else {
            return Opened::Unavailable;
        };
        if cluster.http2 {
            return self.open_h2_stream(cluster_idx, backend, address, attempt);
        }
        let tls = cluster.tls.clone();
        let (stream, reused) = match self.connection_to(address, tls.as_deref()) {
            Ok(found) => found,
            Err(e) => {
                log::warn!("connect to {address} failed: {e}");
                self.cx.note_attempt(cluster_idx, address, attempt, true);
                self.cx.backend_failed(cluster_idx, backend, true);
                return Opened::Failed;
            }
        };
        let cx = &mut *self.cx;
        cx.note_attempt(cluster_idx, address, attempt, !reused);
        let mut back = BackConn {
            io: BackIo::Socket(stream),
            cluster: cluster_idx,
            backend,
            address,
            // A reused connection had no event since its last response (or was probed): it
            // can take the request, and there is nothing to read yet.
            side: Side {
                writable: reused,
                ..Side::default()
            },
        };
        if !reused {
            let BackIo::Socket(stream) = &mut back.io else {
                return Opened::Failed;
            };
            let interest = Interest::READABLE | Interest::WRITABLE;
            let token = back_token(stream);
            if cx
                .registry
                .register(stream.sock_mut(), token, interest)
                .is_err()
            {
                return Opened::Failed;
            }
            cx.idle.own(stream, self.wires.key);
        }
        if let Some(cluster) = cx.clusters.get_mut(cluster_idx) {
            cluster.acquire(backend);
        }
        self.wires.back = Some(back);
        if reused {
            Opened::Ready(address)
        } else {
            Opened::Connecting(address)
        }
    }

    fn check_connect(&mut self) -> Connect {
        let Some(back) = self.wires.back.as_mut() else {
            return Connect::Missing;
        };
        let stream = match &back.io {
            BackIo::Socket(stream) => stream,
            BackIo::H2 { up, .. } => {
                return match up.borrow().connect_state() {
                    None => Connect::Pending,
                    Some(true) => Connect::Established,
                    Some(false) => {
                        log::warn!("connect to {} failed", back.address);
                        Connect::Failed
                    }
                }
            }
        };
        if !back.side.writable && !back.side.readable {
            return Connect::Pending;
        }
        let failed = match stream.sock().take_error() {
            Ok(Some(_)) | Err(_) => true,
            Ok(None) => match stream.sock().peer_addr() {
                Ok(_) => false,
                Err(e) if e.kind() == ErrorKind::NotConnected => {
                    back.side.writable = false;
                    back.side.readable = false;
                    return Connect::Pending;
                }
                Err(_) => true,
            },
        };
        if failed {
            log::warn!("connect to {} failed", back.address);
            return Connect::Failed;
        }
        Connect::Established
    }

    fn backend_failed(&mut self, connect: bool) {
        if let Some(b) = self.wires.back.as_ref() {
            self.cx.backend_failed(b.cluster, b.backend, connect);
        }
    }

    fn drop_backend(&mut self) {
        if let Some(b) = self.wires.back.take() {
            forget(self.cx, &b.io);
            if let Some(c) = self.cx.clusters.get_mut(b.cluster) {
                c.release(b.backend);
            }
        }
    }

    fn release_backend(&mut self, ok: bool, reusable: bool) {
        let Some(back) = self.wires.back.take() else {
            return;
        };
        let cx = &mut *self.cx;
        if ok {
            cx.backend_ok(back.cluster, back.backend);
        } else {
            cx.backend_failed(back.cluster, back.backend, false);
        }
        if let Some(c) = cx.clusters.get_mut(back.cluster) {
            c.release(back.backend);
        }
        let stream = match back.io {
            BackIo::Socket(stream) if reusable => stream,
            io => {
                forget(cx, &io);
                return;
            }
        };
        // Kept for this client's next request, its events still coming here; past the
        // worker's cap on kept connections, it goes to the pool at once. Either way it stays
        // registered (see idle_backends.rs).
        if let Some(old) = self.wires.held.take() {
            cx.idle.unhold();
            put_back(cx, old);
        }
        if cx.idle.hold() {
            self.wires.held = Some(HeldBack {
                stream,
                address: back.address,
                since: cx.now,
                stirred: false,
            });
        } else {
            cx.idle.put(back.address, stream, cx.now);
        }
    }

    fn shutdown_back_write(&mut self) {
        // A stream on an HTTP/2 connection ends with its request's END_STREAM instead.
        if let Some(BackConn {
            io: BackIo::Socket(stream),
            ..
        }) = self.wires.back.as_mut()
        {
            stream.shutdown_write();
        }
    }

    fn back_failure(&self) -> Option<crate::cut::Cut> {
        match self.wires.back.as_ref().map(|b| &b.io) {
            Some(BackIo::Socket(stream)) => stream.failure(),
            _ => None,
        }
    }

    fn log(&mut self, entry: &LogEntry<'_>) {
        let cluster = entry
            .cluster
            .and_then(|c| self.cx.clusters.get(c))
            .map_or("", |s| s.name.as_str());
        let record = entry.record(self.peer, cluster);
        self.cx.stats.request(&record, true);
        self.cx.log.log(&record);
        if let Some(transcript) = self.cx.transcript.as_mut() {
            transcript.push(crate::cx::Logged {
                req: entry.req.clone(),
                status: entry.status,
                answered: entry.answered,
                read: self.wires.front.take_tap(),
            });
        }
    }
}

impl FrontWire for Front {
    fn has_pending(&self) -> bool {
        Front::has_pending(self)
    }

    fn flush_pending(&mut self) -> io::Result<()> {
        Front::flush_pending(self)
    }

    fn handshaking(&self) -> bool {
        Front::handshaking(self)
    }

    fn refused_plain_http(&self) -> bool {
        Front::refused_plain_http(self)
    }

    fn shutdown_write(&mut self) {
        Front::shutdown_write(self);
    }

    fn discard(&mut self, scratch: &mut [u8]) -> io::Result<usize> {
        self.stream_mut().read(scratch)
    }

    fn is_tls(&self) -> bool {
        matches!(self, Front::Tls(_))
    }

    fn client_cert(&self) -> Option<std::sync::Arc<crate::tls::ClientCert>> {
        Front::client_cert(self)
    }

    fn http2(&self) -> Http2 {
        match self {
            Front::Plain(_) => Http2::Preface,
            Front::Tls(_) if self.alpn_h2() => Http2::Alpn,
            Front::Tls(_) => Http2::Off,
        }
    }
}
