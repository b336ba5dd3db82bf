//! TCP passthrough: one client connection forwarded byte for byte to one backend of a
//! `protocol = "tcp"` cluster.
//!
//! A [`TcpSession`] follows the conventions of the HTTP session (`session.rs`): the worker
//! records readiness from edge-triggered events, `drive` makes every step it can until nothing
//! moves and computes the next deadline, `timeout` handles a passed deadline, `close` gives
//! the resources back. Its states:
//!
//! - `ProxyHeader` (only on a listener with `accept_proxy = true`): a PROXY protocol header,
//!   v1 or v2, from the load balancer in front is read and removed; its source address is the
//!   client from then on (in the log, and in the header sent on with `send_proxy`). A missing
//!   or malformed header, or none within `timeouts.request_header`, closes the connection.
//! - `Hello` (only on a listener whose frontends name a `hostname`): the client's first bytes
//!   are read into the upstream buffer until they hold a whole TLS ClientHello (`sni.rs`);
//!   its server name picks the frontend (`tcp_routes.rs`: exact, then `*.wildcard` with the
//!   longest suffix, then regex, then the frontend without hostname). Bytes that are not a
//!   ClientHello, a hello without SNI, or no hello within `timeouts.request_header` (a
//!   protocol where the server speaks first) go to the frontend without hostname, or are
//!   closed when there is none. TLS is never terminated: the backend gets the hello as it came.
//! - `Connecting`: a non-blocking connect to the backend the cluster's balancing policy picks;
//!   a refused or failed connect, or one slower than `timeouts.connect`, tries another backend
//!   (three attempts in all, as HTTP requests have).
//! - `Proxying`: bytes flow both ways. With `send_proxy = true` on the cluster, a PROXY
//!   protocol v2 header (`proxy_protocol.rs`) goes first. A side that shuts its write side
//!   (half-close) has its EOF passed on with shutdown(SHUT_WR) once everything it sent is
//!   delivered; the connection ends when both directions have ended, on an error on either
//!   side, or after `timeouts.front_idle` without a byte either way.
//!
//! Bytes go through the two pooled buffers of the connection (read/write) until one read
//! fills a whole buffer: from then on that direction moves through a pipe with splice(2)
//! (`splice.rs`), zero-copy, so bulk transfers cost no copy into the worker and no memory
//! beyond the pipe. Memory stays bounded either way. A `drive` call that stops at its step
//! cap with bytes still waiting says so ([`TcpSession::yielded`]): edge-triggered readiness
//! would bring no new event for them, so the worker drives it again at its next turn.
//! A draining worker closes connections that have not sent anything yet; the others run until
//! they end or the drain deadline passes.
//!
//! Access log: one line per connection, when it closes: `method=-`, `path=-`, `host` = the
//! SNI server name (empty without one), `bytes_in`/`bytes_out` = bytes from / to the client,
//! `backend_ms` = connect time. `status` is 0 for a connection that reached a backend
//! (whatever ended it later: `error` tells when kakehi cut it); otherwise the HTTP code an HTTP
//! listener would have answered with: 404 no frontend for the server name, 400 not a TLS
//! ClientHello and no frontend without hostname, 408 no ClientHello in time, 499 the client
//! left first, 502 every connect failed, 503 no backend available, 504 the last connect timed
//! out.

mod half;

use crate::accesslog::Record;
use crate::balancer::{self, ClusterState, Tried};
use crate::cut::Cut;
use crate::cx::Cx;
use crate::idle_backends::back_token;
use crate::pool::PoolBuf;
use crate::proxy_protocol::{self, encode_v2, Addresses, Parsed};
use crate::session::Flow;
use crate::sni::{self, Hello};
use crate::tcp_routes::{Target, TcpRoutes};
use half::{Half, Io, Ready};
use kawa::AsBuffer;
use mio::net::TcpStream;
use mio::Interest;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Steps one `drive` call may take before yielding to other sessions.
const MAX_STEPS: usize = 64;
/// Connect attempts per connection (the first and the retries).
const MAX_ATTEMPTS: u32 = 3;

// ---- the session --------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading the PROXY protocol header of the load balancer in front.
    ProxyHeader,
    /// Waiting for the ClientHello that decides the route.
    Hello,
    Connecting,
    Proxying,
}

struct Back {
    stream: TcpStream,
    ready: Ready,
    cluster: usize,
    backend: usize,
    address: SocketAddr,
}

/// Where the connection is going and how it went, for balancing and the log.
struct Course {
    target: Option<Target>,
    server_name: Option<String>,
    tried: Tried,
    attempts: u32,
    /// The backend last tried or used.
    backend: Option<SocketAddr>,
    /// The status for the log (see the module docs).
    status: u16,
    error: Option<Cut>,
    /// Why the connection went to the frontend without hostname, for the log's `error` field
    /// when nothing worse happened.
    note: Option<Cut>,
    started: Instant,
    connect_time: Option<Duration>,
    /// Parse the ClientHello again once this many bytes are buffered.
    hello_wanted: usize,
}

/// Where the client connection came from.
struct Accepted {
    /// The client (from the PROXY protocol header, when the listener accepts one).
    client: SocketAddr,
    /// The address the client connected to, when a PROXY protocol header said it.
    destination: Option<SocketAddr>,
    /// The listener's address and its index among the worker's listeners.
    listener_addr: SocketAddr,
    listener: usize,
}

pub struct TcpSession {
    pub id: u64,
    key: usize,
    front: TcpStream,
    front_ready: Ready,
    accepted: Accepted,
    back: Option<Back>,
    state: State,
    up: Half,
    down: Half,
    course: Course,
    /// When the current state's clock started (accept, connect, last byte moved).
    since: Instant,
    /// The last `drive` stopped at its step cap with work left.
    yielded: bool,
    pub deadline: Instant,
    /// The earliest timer entry the worker holds for this session.
    pub scheduled: Option<Instant>,
}

impl TcpSession {
    /// The address of the listener that accepted the connection.
    pub fn listener_addr(&self) -> SocketAddr {
        self.accepted.listener_addr
    }

    /// A session for a connection accepted on the worker's listener `listener` (at
    /// `listener_addr`); `accept_proxy`: it starts with a PROXY protocol header.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        key: usize,
        front: TcpStream,
        client: SocketAddr,
        listener_addr: SocketAddr,
        listener: usize,
        accept_proxy: bool,
        front_buf: PoolBuf,
        back_buf: PoolBuf,
        now: Instant,
    ) -> TcpSession {
        TcpSession {
            id,
            key,
            front,
            front_ready: Ready::default(),
            accepted: Accepted {
                client,
                destination: None,
                listener_addr,
                listener,
            },
            back: None,
            state: if accept_proxy {
                State::ProxyHeader
            } else {
                State::Hello
            },
            up: Half::new(front_buf),
            down: Half::new(back_buf),
            course: Course {
                target: None,
                server_name: None,
                tried: Tried::default(),
                attempts: 0,
                backend: None,
                status: 499,
                error: None,
                note: None,
                started: now,
                connect_time: None,
                hello_wanted: 1,
            },
            since: now,
            yielded: false,
            deadline: now,
            scheduled: None,
        }
    }

    /// The last `drive` stopped at its step cap: the worker drives it again at its next turn,
    /// since bytes already waiting in a socket bring no new edge-triggered event.
    pub fn yielded(&self) -> bool {
        self.yielded
    }

    pub fn front_stream(&mut self) -> &mut TcpStream {
        &mut self.front
    }

    /// Records readiness from an event on the client socket.
    pub fn front_event(&mut self, readable: bool, writable: bool, read_closed: bool) {
        self.front_ready.readable |= readable;
        self.front_ready.writable |= writable;
        self.front_ready.hup |= read_closed;
    }

    /// Records readiness from an event on the backend socket.
    pub fn back_event(&mut self, fd: usize, readable: bool, writable: bool, read_closed: bool) {
        let is = |b: &&mut Back| usize::try_from(b.stream.as_raw_fd()) == Ok(fd);
        if let Some(back) = self.back.as_mut().filter(is) {
            back.ready.readable |= readable;
            back.ready.writable |= writable;
            back.ready.hup |= read_closed;
        }
    }

    /// Nothing received yet and no backend: a draining worker may close it at once.
    pub fn is_idle(&self) -> bool {
        matches!(self.state, State::ProxyHeader | State::Hello) && self.up.is_empty()
    }

    /// After a configuration change: the cluster and backend by name and address in `new`
    /// (or nothing, when they were removed: the connection goes on, it no longer counts).
    pub fn remap_clusters(&mut self, old: &[ClusterState], new: &[ClusterState]) {
        if let Some(target) = self.course.target.as_mut() {
            target.cluster =
                balancer::remap_cluster(old, new, target.cluster).unwrap_or(usize::MAX);
        }
        self.course.tried = Tried::default();
        if let Some(back) = self.back.as_mut() {
            (back.cluster, back.backend) =
                balancer::remap_backend(old, new, back.cluster, back.address);
        }
    }

    /// Logs the connection and gives back its buffers, pipes and backend slot. The sockets
    /// are closed without deregistering them first: closing the only descriptor of a socket
    /// removes it from the epoll set (two syscalls less per connection).
    pub fn close(mut self, cx: &mut Cx) {
        self.log(cx);
        let TcpSession { back, up, down, .. } = self;
        if let Some(b) = back {
            cx.idle.forget(&b.stream);
            if let Some(c) = cx.clusters.get_mut(b.cluster) {
                c.release(b.backend);
            }
        }
        up.release(cx);
        down.release(cx);
    }

    /// Makes every step possible now.
    pub fn drive(&mut self, cx: &mut Cx) -> Flow {
        self.yielded = true;
        for _ in 0..MAX_STEPS {
            let step = match self.state {
                State::ProxyHeader => self.proxy_header(cx),
                State::Hello => self.hello(cx),
                State::Connecting => self.finish_connect(cx),
                State::Proxying => self.proxy(cx),
            };
            match step {
                Step::Progress => continue,
                Step::Blocked => {
                    self.yielded = false;
                    break;
                }
                Step::Close => return Flow::Close,
            }
        }
        let span = match self.state {
            State::ProxyHeader | State::Hello => cx.timeouts.request_header,
            State::Connecting => cx.timeouts.connect,
            State::Proxying => cx.timeouts.front_idle,
        };
        self.deadline = self.since + span;
        Flow::Continue
    }

    /// The deadline passed.
    pub fn timeout(&mut self, cx: &mut Cx) -> Flow {
        match self.state {
            State::ProxyHeader => {
                self.fail(408, Cut::ProxyHeaderTimeout);
                Flow::Close
            }
            State::Hello => {
                // A client that says nothing first may speak a protocol where the server
                // does: the frontend without hostname takes it, if there is one.
                let step = match self.route(cx, None) {
                    Some(target) => {
                        self.course.target = Some(target);
                        self.course.note = Some(Cut::ClientHelloTimeout);
                        self.connect_next(cx)
                    }
                    None => self.fail(408, Cut::ClientHelloTimeout),
                };
                if let Step::Close = step {
                    return Flow::Close;
                }
                self.drive(cx)
            }
            State::Connecting => {
                self.course.error = Some(Cut::ConnectTimeout);
                if let Some(b) = self.back.as_ref() {
                    cx.backend_failed(b.cluster, b.backend, true);
                }
                self.drop_backend(cx);
                if let Step::Close = self.connect_next(cx) {
                    self.course.status = 504;
                    return Flow::Close;
                }
                self.drive(cx)
            }
            State::Proxying => {
                self.course.error = Some(Cut::IdleTimeout);
                Flow::Close
            }
        }
    }

    fn route(&self, cx: &Cx, server_name: Option<&str>) -> Option<Target> {
        cx.tcp_routes
            .get(self.accepted.listener)?
            .lookup(server_name)
    }

    fn fail(&mut self, status: u16, error: Cut) -> Step {
        self.course.status = status;
        self.course.error = Some(error);
        Step::Close
    }

    // ---- routing ----------------------------------------------------------------------------

    /// Reads the PROXY protocol header and takes the client's address from it.
    fn proxy_header(&mut self, cx: &mut Cx) -> Step {
        let read = self
            .up
            .fill(&mut self.front, &mut self.front_ready, &mut cx.pipes);
        if let Io::Error = read {
            return self.fail(499, Cut::ClientConnectionError);
        }
        let moved = matches!(read, Io::Moved | Io::Eof);
        match proxy_protocol::parse(self.up.buffered()) {
            Ok(Parsed::Incomplete { .. }) if self.up.eof => {
                self.fail(499, Cut::ClientClosedMidProxyHeader)
            }
            Ok(Parsed::Incomplete { at_least }) if at_least > self.up.buf.as_buffer().len() => {
                self.fail(400, Cut::ProxyHeaderTooLarge)
            }
            Ok(Parsed::Incomplete { .. }) if moved => Step::Progress,
            Ok(Parsed::Incomplete { .. }) => Step::Blocked,
            Ok(Parsed::Complete { addresses, len }) => {
                self.up.consume(len);
                if let Addresses::Proxy {
                    source,
                    destination,
                } = addresses
                {
                    self.accepted.client = source;
                    self.accepted.destination = Some(destination);
                }
                self.state = State::Hello;
                Step::Progress
            }
            Err(_) => self.fail(400, Cut::BadProxyHeader),
        }
    }

    fn hello(&mut self, cx: &mut Cx) -> Step {
        let by_name = cx
            .tcp_routes
            .get(self.accepted.listener)
            .is_some_and(TcpRoutes::by_server_name);
        if !by_name {
            let Some(target) = self.route(cx, None) else {
                return self.fail(404, Cut::NoFrontendOnListener);
            };
            self.course.target = Some(target);
            return self.connect_next(cx);
        }
        let read = match self
            .up
            .fill(&mut self.front, &mut self.front_ready, &mut cx.pipes)
        {
            Io::Error => return self.fail(499, Cut::ClientConnectionError),
            other => other,
        };
        let have = self.up.buffered().len();
        let moved = matches!(read, Io::Moved | Io::Eof);
        if have < self.course.hello_wanted {
            if self.up.eof {
                return self.fail(499, Cut::ClientClosedMidClientHello);
            }
            return if moved { Step::Progress } else { Step::Blocked };
        }
        let (server_name, error) = match sni::parse(self.up.buffered()) {
            Ok(Hello::Incomplete { at_least }) => {
                let capacity = self.up.buf.as_buffer().len();
                if at_least <= capacity && !self.up.eof {
                    self.course.hello_wanted = at_least;
                    return if moved { Step::Progress } else { Step::Blocked };
                }
                (None, Cut::ClientHelloTooLarge)
            }
            Ok(Hello::Complete(name)) => (name, Cut::ClientHelloWithoutServerName),
            Err(sni::SniError::NotTls) => (None, Cut::NotTls),
            Err(_) => (None, Cut::MalformedClientHello),
        };
        let target = self.route(cx, server_name.as_deref());
        let named = server_name.is_some();
        self.course.server_name = server_name;
        let Some(target) = target else {
            return if named {
                self.fail(404, Cut::NoFrontendForServerName)
            } else {
                self.fail(400, error)
            };
        };
        if !named {
            // Routed to the frontend without hostname; say why in the log.
            self.course.note = Some(error);
        }
        self.course.target = Some(target);
        self.connect_next(cx)
    }

    // ---- the backend connection -------------------------------------------------------------

    /// Connects to the next backend of the target cluster, or fails the session.
    fn connect_next(&mut self, cx: &mut Cx) -> Step {
        let Some(target) = self.course.target else {
            return self.fail(404, Cut::NoFrontendOnListener);
        };
        while self.course.attempts < MAX_ATTEMPTS {
            let Some(cluster) = cx.clusters.get_mut(target.cluster) else {
                break;
            };
            cluster.revive(cx.now);
            let key = if cluster.policy == lb_config::LoadBalancing::Maglev {
                crate::maglev::ip_key(self.accepted.client.ip())
            } else {
                0
            };
            let Some(backend) = cluster.pick_keyed(self.course.tried, &mut cx.rng, key) else {
                break;
            };
            self.course.tried.insert(backend);
            self.course.attempts += 1;
            let Some(address) = cluster.address(backend) else {
                break;
            };
            self.course.backend = Some(address);
            cx.note_attempt(target.cluster, address, self.course.attempts, true);
            let mut stream = match TcpStream::connect(address) {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("connect to {address} failed: {e}");
                    cx.backend_failed(target.cluster, backend, true);
                    continue;
                }
            };
            let Some(cluster) = cx.clusters.get_mut(target.cluster) else {
                break;
            };
            let interest = Interest::READABLE | Interest::WRITABLE;
            let token = back_token(&stream);
            if cx.registry.register(&mut stream, token, interest).is_err() {
                continue;
            }
            cx.idle.own(&stream, self.key);
            cluster.acquire(backend);
            self.back = Some(Back {
                stream,
                ready: Ready::default(),
                cluster: target.cluster,
                backend,
                address,
            });
            self.state = State::Connecting;
            self.since = cx.now;
            return Step::Progress;
        }
        if self.course.attempts == 0 {
            self.fail(503, Cut::NoBackendAvailable)
        } else {
            let error = self.course.error.unwrap_or(Cut::BackendConnectFailed);
            self.fail(502, error)
        }
    }

    fn finish_connect(&mut self, cx: &mut Cx) -> Step {
        let Some(back) = self.back.as_mut() else {
            return self.connect_next(cx);
        };
        if !back.ready.writable && !back.ready.readable {
            return Step::Blocked;
        }
        let failed = match back.stream.take_error() {
            Ok(Some(_)) | Err(_) => true,
            Ok(None) => match back.stream.peer_addr() {
                Ok(_) => false,
                Err(e) if e.kind() == ErrorKind::NotConnected => {
                    back.ready = Ready::default();
                    return Step::Blocked;
                }
                Err(_) => true,
            },
        };
        if failed {
            log::warn!("connect to {} failed", back.address);
            let (cluster, backend) = (back.cluster, back.backend);
            cx.backend_failed(cluster, backend, true);
            self.course.error = Some(Cut::BackendConnectFailed);
            self.drop_backend(cx);
            return self.connect_next(cx);
        }
        let _ = back.stream.set_nodelay(true);
        let (cluster, backend) = (back.cluster, back.backend);
        cx.backend_ok(cluster, backend);
        // A retry succeeded: the failed attempts are no error of the connection's.
        self.course.error = None;
        self.course.status = 0;
        self.course.connect_time = Some(cx.now.saturating_duration_since(self.since));
        if self.course.target.is_some_and(|t| t.send_proxy) {
            let destination = match self.accepted.destination {
                Some(d) => d,
                None => self
                    .front
                    .local_addr()
                    .unwrap_or(self.accepted.listener_addr),
            };
            self.up.prefix = Some((encode_v2(self.accepted.client, destination), 0));
        }
        self.state = State::Proxying;
        self.since = cx.now;
        Step::Progress
    }

    /// Forgets the backend connection.
    fn drop_backend(&mut self, cx: &mut Cx) {
        if let Some(b) = self.back.take() {
            // Closing it removes it from the poll.
            cx.idle.forget(&b.stream);
            if let Some(c) = cx.clusters.get_mut(b.cluster) {
                c.release(b.backend);
            }
        }
    }

    // ---- forwarding -------------------------------------------------------------------------

    fn proxy(&mut self, cx: &mut Cx) -> Step {
        let Some(back) = self.back.as_mut() else {
            return self.fail(0, Cut::BackendConnectionLost);
        };
        let mut progress = false;
        // Client -> backend.
        match self
            .up
            .fill(&mut self.front, &mut self.front_ready, &mut cx.pipes)
        {
            Io::Moved | Io::Eof => progress = true,
            Io::Error => return self.fail(0, Cut::ClientConnectionError),
            Io::Idle => {}
        }
        match self.up.flush(&mut back.stream, &mut back.ready) {
            Io::Moved => progress = true,
            Io::Error => return self.fail(0, Cut::BackendConnectionError),
            Io::Idle | Io::Eof => {}
        }
        progress |= self.up.pass_eof(&back.stream, self.down.shut);
        // Backend -> client.
        match self
            .down
            .fill(&mut back.stream, &mut back.ready, &mut cx.pipes)
        {
            Io::Moved | Io::Eof => progress = true,
            Io::Error => return self.fail(0, Cut::BackendConnectionError),
            Io::Idle => {}
        }
        match self.down.flush(&mut self.front, &mut self.front_ready) {
            Io::Moved => progress = true,
            Io::Error => return self.fail(0, Cut::ClientConnectionError),
            Io::Idle | Io::Eof => {}
        }
        progress |= self.down.pass_eof(&self.front, self.up.shut);
        if self.up.shut && self.down.shut {
            return Step::Close;
        }
        if progress {
            self.since = cx.now;
            Step::Progress
        } else {
            Step::Blocked
        }
    }

    fn log(&mut self, cx: &mut Cx) {
        let mut request_id = String::new();
        if cx.log.enabled() {
            cx.next_request_id(&mut request_id);
        }
        let cluster = self
            .course
            .target
            .and_then(|t| cx.clusters.get(t.cluster))
            .map_or("", |c| c.name.as_str());
        let record = Record {
            request_id: &request_id,
            client: self.accepted.client,
            listener: self.accepted.listener_addr,
            cluster,
            backend: self.course.backend,
            method: "-",
            host: self.course.server_name.as_deref().unwrap_or(""),
            path: "-",
            proto: "tcp",
            status: self.course.status,
            bytes_in: self.up.read,
            bytes_out: self.down.written,
            duration: cx.now.saturating_duration_since(self.course.started),
            backend_time: self.course.connect_time,
            error: self.course.error.or(self.course.note),
            client_cert: None,
        };
        cx.stats.request(&record, false);
        cx.log.log(&record);
    }
}

enum Step {
    Progress,
    Blocked,
    Close,
}
