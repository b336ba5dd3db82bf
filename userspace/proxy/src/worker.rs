//! The worker's event loop: one mio `Poll`, the listeners, a slab of sessions and their timers.
//!
//! A session is an HTTP one (`session.rs`) on an `http` listener or a TCP passthrough one
//! (`tcp/`) on a `tcp` listener; the slab holds either, as a [`Conn`].
//!
//! Single-threaded and lock-free: everything a session needs besides its own sockets lives in
//! [`Cx`] (`cx.rs`: balancers, routers, buffer pool, idle backend connections, access log), borrowed
//! for the duration of one step. New connections over `max_connections`, or when the buffer
//! pool is exhausted, are closed at once instead of costing memory. On stop the worker stops
//! accepting, lets in-flight requests finish (closing each connection after its response), and
//! returns when no session is left or the drain deadline passes.

use crate::accesslog::AccessLog;
use crate::balancer::{ClusterState, Rng};
use crate::conn::Conn;
use crate::cx::Cx;
use crate::http::Peer;
use crate::idle_backends::{self, IdlePool};
use crate::pool::BufferPool;
use crate::proxied::AwaitingProxy;
use crate::router::Router;
use crate::session::{front_token, Flow, Session};
use crate::splice::{PipePool, PIPE_SIZE};
use crate::stats::Stats;
use crate::tcp::TcpSession;
use crate::tcp_routes::TcpRoutes;
use crate::timer::Timers;
use crate::tls::{Front, TlsContext};
use lb_config::{Config, ListenerProtocol};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Tokens at and above this value are listeners; below, sessions' client sockets (key << 1)
/// and backend connections (descriptor number << 1 | 1, see `idle_backends.rs`).
const LISTENER_BASE: usize = usize::MAX / 2;
/// Idle backend connections kept per backend address.
const IDLE_PER_BACKEND: usize = 512;
/// How often the pool of idle backend connections is swept for expired ones.
const PRUNE_EVERY: Duration = Duration::from_secs(1);
/// Expired pooled connections closed per turn of the loop at most (see [`IdlePool::prune`]).
const PRUNE_BATCH: usize = 32;
/// How long a draining worker leaves idle keep-alive connections open (see
/// [`Cx::close_idle`]); clients with a request in flight get their answer and a close.
pub(crate) const DRAIN_IDLE_GRACE: Duration = Duration::from_secs(1);
/// Buffers allocated up front (two per connection).
const PREALLOCATED_BUFFERS: usize = 256;
/// Empty pipes kept for the next TCP passthrough connections (each counts against the
/// user's pipe memory even when idle: see splice.rs).
const IDLE_PIPES: usize = 32;
/// New connections taken from a listener's accept queue per turn of the loop, after the
/// sessions already open were served (nginx's default, without `multi_accept`). Taking the
/// whole queue at once (50 waiting TLS clients, say) put all their handshakes in the next
/// turn, and every request in flight waited for that turn to end: the loop's turns grew with
/// the burst. The rest of the queue is taken in the next turns, which come at once.
pub(crate) const ACCEPTS_PER_TURN: usize = 1;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot create the event loop: {0}")]
    Poll(#[source] std::io::Error),
    #[error("listener {address}: {source}")]
    Listener {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("listener {address}: {source}")]
    Tls {
        address: SocketAddr,
        #[source]
        source: crate::tls::TlsError,
    },
    #[error("cannot set up TLS: {0}")]
    TlsContext(#[source] crate::tls::TlsError),
    #[error("{0}")]
    Clusters(String),
    #[error("no listener in the config at index {0}")]
    NoSuchListener(usize),
    #[error("cannot open the access log: {0}")]
    AccessLog(#[source] std::io::Error),
    #[error("event loop failed: {0}")]
    Loop(#[source] std::io::Error),
}

struct ListenerEntry {
    socket: TcpListener,
    address: SocketAddr,
    protocol: ListenerProtocol,
    /// Its accept queue may hold connections: an event came and the last accept did not
    /// find it empty (edge-triggered: no new event comes for connections already queued).
    backlog: bool,
}

/// The channel from the supervisor: frames of `lb_config::protocol::channel` requests (a whole
/// new configuration, or an order of `orders.rs`), each answered by id. When the supervisor
/// goes away (EOF) the worker drains and stops.
struct Control {
    stream: mio::net::UnixStream,
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    closed: bool,
}

const CONTROL_TOKEN: Token = Token(usize::MAX);

/// Where a worker publishes its live connection count for whoever steers connections to it
/// (the eBPF steering program reads it from shared memory). Called once per event-loop turn
/// when the count changed.
pub trait LiveGauge {
    fn publish(&mut self, live: u32);
}

/// One worker: accepts on its listeners and proxies until told to stop.
pub struct Worker {
    poll: Poll,
    cx: Cx,
    sessions: Slab<Conn>,
    listeners: Vec<ListenerEntry>,
    timers: Timers,
    max_connections: usize,
    next_session_id: u64,
    last_prune: Instant,
    /// The last sweep of the idle backend pool left expired connections to close.
    prune_more: bool,
    gauge: Option<Box<dyn LiveGauge>>,
    control: Option<Control>,
    /// For each listener of the worker, its index in the config's listeners and the protocol
    /// it serves (a change of either needs new sockets from the supervisor).
    listener_specs: Vec<(usize, ListenerProtocol)>,
    access_log: lb_config::AccessLog,
    buffer_size: usize,
    /// Sessions to drive again at the next turn (see [`Conn::yielded`]).
    again: Vec<usize>,
    /// Scratch lists: sessions woken by an HTTP/2 backend connection's event, and by its
    /// streams moving outside one (key, descriptor).
    woken: Vec<usize>,
    moved: Vec<(usize, usize)>,
    tls_context: TlsContext,
}

/// The TLS configuration of an https listener; None for the others.
fn tls_config(
    context: &TlsContext,
    spec: &lb_config::Listener,
) -> Result<Option<Arc<rustls::ServerConfig>>, crate::tls::TlsError> {
    if spec.protocol != ListenerProtocol::Https {
        return Ok(None);
    }
    context
        .server_config(&spec.certificates, spec.http2, spec.client_auth.as_ref())
        .map(Some)
}

/// The clusters of `config`, with the TLS client side of those with `backend_tls`: kept from
/// `old` where a cluster of the same name has the same settings (its pooled connections and
/// TLS sessions stay usable), built anew otherwise.
fn cluster_states(
    config: &Config,
    context: &TlsContext,
    old: &[ClusterState],
) -> Result<Vec<ClusterState>, String> {
    config
        .clusters
        .iter()
        .map(|cluster| {
            let mut state = ClusterState::new(cluster);
            if let Some(spec) = &cluster.backend_tls {
                let kept = old
                    .iter()
                    .find(|o| o.name == cluster.name)
                    .and_then(|o| o.tls.as_ref())
                    .filter(|t| t.spec == *spec);
                state.tls = Some(match kept {
                    Some(tls) => Arc::clone(tls),
                    None => Arc::new(
                        context
                            .backend_tls(spec)
                            .map_err(|e| format!("cluster {}: {e}", cluster.name))?,
                    ),
                });
            }
            Ok(state)
        })
        .collect()
}

impl Worker {
    /// A worker over already-bound listeners: each is given with the index of its entry in
    /// `config.listeners` (its routes are that entry's frontends, whatever port it got).
    pub fn new(
        config: &Config,
        listeners: Vec<(usize, std::net::TcpListener)>,
    ) -> Result<Worker, WorkerError> {
        Worker::with_tickets(config, listeners, None)
    }

    /// [`Worker::new`], with the session ticket keys every worker shares (`tickets.rs`)
    /// when `tickets` is given.
    pub fn with_tickets(
        config: &Config,
        listeners: Vec<(usize, std::net::TcpListener)>,
        tickets: Option<Box<dyn crate::rate_limit::SharedSlots + Sync>>,
    ) -> Result<Worker, WorkerError> {
        let poll = Poll::new().map_err(WorkerError::Poll)?;
        let registry = poll.registry().try_clone().map_err(WorkerError::Poll)?;
        let mut entries = Vec::new();
        let mut routers = Vec::new();
        let mut tcp_routes = Vec::new();
        let mut tls = Vec::new();
        let mut http2 = Vec::new();
        let mut h2_limits = Vec::new();
        let mut listener_specs = Vec::new();
        // Created up front, before the sandbox: the ticket keys need randomness, and the
        // crypto library initialises itself on first use.
        let tls_context = TlsContext::new(tickets).map_err(WorkerError::TlsContext)?;
        for (i, (index, std_listener)) in listeners.into_iter().enumerate() {
            let spec = config
                .listeners
                .get(index)
                .ok_or(WorkerError::NoSuchListener(index))?;
            listener_specs.push((index, spec.protocol));
            tls.push(
                tls_config(&tls_context, spec).map_err(|source| WorkerError::Tls {
                    address: spec.address,
                    source,
                })?,
            );
            let listener_err = |source| WorkerError::Listener {
                address: spec.address,
                source,
            };
            std_listener.set_nonblocking(true).map_err(listener_err)?;
            let address = std_listener.local_addr().map_err(listener_err)?;
            let mut socket = TcpListener::from_std(std_listener);
            poll.registry()
                .register(&mut socket, Token(LISTENER_BASE + i), Interest::READABLE)
                .map_err(listener_err)?;
            routers.push(Router::for_listener(config, spec.address));
            http2.push(spec.http2);
            h2_limits.push(spec.h2);
            tcp_routes.push(TcpRoutes::for_listener(config, spec.address));
            entries.push(ListenerEntry {
                socket,
                address,
                protocol: spec.protocol,
                backlog: false,
            });
        }
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()).rotate_left(32);
        let mut rng = Rng::new(seed);
        let max_buffers = config.max_connections.saturating_mul(2);
        let now = Instant::now();
        let cx = Cx {
            registry,
            clusters: cluster_states(config, &tls_context, &[]).map_err(WorkerError::Clusters)?,
            routers,
            tcp_routes,
            tls,
            http2,
            h2_limits,
            pool: BufferPool::new(
                config.buffer_size,
                PREALLOCATED_BUFFERS.min(max_buffers),
                max_buffers,
            ),
            pipes: PipePool::new(IDLE_PIPES, PIPE_SIZE),
            idle: IdlePool::new(IDLE_PER_BACKEND, config.timeouts.back_idle),
            upstreams: crate::h2::upstream::Upstreams::new(config.timeouts.back_idle),
            transcript: None,
            log: AccessLog::new(&config.access_log).map_err(WorkerError::AccessLog)?,
            stats: Stats::default(),
            down: Vec::new(),
            id_prefix: rng.next_u64() as u32,
            rates: None,
            rng,
            timeouts: config.timeouts,
            max_request_body: config.max_request_body,
            now,
            draining: false,
            close_idle: false,
            requests: 0,
        };
        Ok(Worker {
            poll,
            cx,
            sessions: Slab::with_capacity(config.max_connections.min(4096)),
            listeners: entries,
            timers: Timers::default(),
            max_connections: config.max_connections,
            next_session_id: 0,
            last_prune: now,
            prune_more: false,
            gauge: None,
            control: None,
            listener_specs,
            access_log: config.access_log.clone(),
            buffer_size: config.buffer_size,
            again: Vec::new(),
            woken: Vec::new(),
            moved: Vec::new(),
            tls_context,
        })
    }

    /// Takes configuration changes from the supervisor on `stream` (see [`Control`]).
    pub fn set_control(
        &mut self,
        stream: std::os::unix::net::UnixStream,
    ) -> Result<(), WorkerError> {
        stream.set_nonblocking(true).map_err(WorkerError::Poll)?;
        let mut stream = mio::net::UnixStream::from_std(stream);
        self.poll
            .registry()
            .register(
                &mut stream,
                CONTROL_TOKEN,
                Interest::READABLE | Interest::WRITABLE,
            )
            .map_err(WorkerError::Poll)?;
        self.control = Some(Control {
            stream,
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            closed: false,
        });
        Ok(())
    }

    /// Applies a new configuration to the running worker: clusters, backends (their live
    /// request counts carried over by address), routes, timeouts and limits. Connections in
    /// flight finish where they were sent. What needs other resources than the worker has
    /// inside its sandbox (listeners, the access log target, the buffer size) is refused.
    pub fn reconfigure(&mut self, config: &Config) -> Result<(), String> {
        let specs: Option<Vec<&lb_config::Listener>> = self
            .listener_specs
            .iter()
            .map(|&(i, protocol)| config.listeners.get(i).filter(|l| l.protocol == protocol))
            .collect();
        let Some(specs) = specs else {
            return Err("the listeners changed: that needs new sockets from the supervisor".into());
        };
        if config.listeners.len() != self.listener_specs.len() {
            return Err("the listeners changed: that needs new sockets from the supervisor".into());
        }
        if config.access_log.target != self.access_log.target {
            return Err(
                "access_log.target cannot change at runtime (the worker opens no files)".into(),
            );
        }
        if config.buffer_size != self.buffer_size {
            return Err("buffer_size cannot change at runtime".into());
        }
        let tls = specs
            .iter()
            .map(|spec| tls_config(&self.tls_context, spec))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| e.to_string())?;
        let mut clusters = cluster_states(config, &self.tls_context, &self.cx.clusters)?;
        for cluster in &mut clusters {
            let Some(old) = self.cx.clusters.iter().find(|o| o.name == cluster.name) else {
                continue;
            };
            for backend in &mut cluster.backends {
                if let Some(ob) = old.backends.iter().find(|b| b.address == backend.address) {
                    backend.active = ob.active;
                    backend.carry_health(ob);
                }
            }
        }
        crate::orders::apply_down(&mut clusters, &self.cx.down);
        self.cx.stats.retain(&clusters);
        let old = std::mem::replace(&mut self.cx.clusters, clusters);
        for (_, session) in self.sessions.iter_mut() {
            session.remap_clusters(&old, &self.cx.clusters);
        }
        self.cx.routers = specs
            .iter()
            .map(|spec| Router::for_listener(config, spec.address))
            .collect();
        self.cx.tcp_routes = specs
            .iter()
            .map(|spec| TcpRoutes::for_listener(config, spec.address))
            .collect();
        self.cx.tls = tls;
        self.cx.http2 = specs.iter().map(|spec| spec.http2).collect();
        self.cx.h2_limits = specs.iter().map(|spec| spec.h2).collect();
        self.cx.timeouts = config.timeouts;
        self.cx.max_request_body = config.max_request_body;
        self.cx.log.set_format(config.access_log.format);
        self.access_log = config.access_log.clone();
        self.max_connections = config.max_connections;
        Ok(())
    }

    /// Reads and answers what the supervisor sent.
    fn serve_control(&mut self) {
        let Some(mut control) = self.control.take() else {
            return;
        };
        let mut chunk = [0u8; 16384];
        loop {
            match std::io::Read::read(&mut control.stream, &mut chunk) {
                Ok(0) => {
                    control.closed = true;
                    break;
                }
                Ok(n) => control
                    .inbuf
                    .extend_from_slice(chunk.get(..n).unwrap_or_default()),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    control.closed = true;
                    break;
                }
            }
        }
        if self
            .answer_frames(&mut control.inbuf, &mut control.outbuf)
            .is_err()
        {
            control.closed = true;
        }
        while !control.outbuf.is_empty() {
            match std::io::Write::write(&mut control.stream, &control.outbuf) {
                Ok(0) => break,
                Ok(n) => {
                    control.outbuf.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        self.control = Some(control);
    }

    /// Acts on every whole frame at the start of `inbuf` (removing them) and appends the
    /// answers, as frames, to `out`; `source` is the config file's path. Sans-io: the
    /// channel's reads and writes are `serve_control`'s. A length over the limit is an
    /// error: the channel is out of step and must be closed (the frames before it were
    /// answered).
    pub fn answer_frames(
        &mut self,
        inbuf: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<(), crate::orders::FrameTooLarge> {
        use lb_config::protocol::channel::{Order, Reply, Request};
        let mut taken = 0;
        let result = loop {
            let (frame, len) =
                match crate::orders::next_frame(inbuf.get(taken..).unwrap_or_default()) {
                    Ok(Some(next)) => next,
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                };
            taken += len;
            let (id, reply) = match frame {
                Ok(Request {
                    id,
                    order: Order::Configure { config },
                }) => {
                    // Checked by main: applied as it is (only what needs the worker's own
                    // resources, such as its listeners' TLS, can still refuse it).
                    let reply = self.reconfigure(&config).err();
                    match &reply {
                        None => log::info!("configuration update: ok"),
                        Some(error) => log::info!("configuration update: error: {error}"),
                    }
                    (
                        id,
                        Some(reply.map_or(Reply::Done, |error| Reply::Refused { error })),
                    )
                }
                Ok(Request { id, order }) => {
                    let live = self.sessions.len();
                    (id, crate::orders::command(&mut self.cx, live, order))
                }
                Err(e) => crate::orders::refusal(&e),
            };
            if let Some(reply) = reply {
                crate::orders::answer(out, id, reply);
            }
        };
        inbuf.drain(..taken);
        result
    }

    /// Publishes the live connection count to `gauge` from now on.
    /// The table of request rates shared with the other workers (see `rate_limit.rs`).
    pub fn set_rates(&mut self, rates: crate::rate_limit::RateTable) {
        self.cx.rates = Some(rates);
    }

    pub fn set_gauge(&mut self, gauge: Box<dyn LiveGauge>) {
        self.gauge = Some(gauge);
        self.publish_live();
    }

    fn publish_live(&mut self) {
        let live = u32::try_from(self.sessions.len()).unwrap_or(u32::MAX);
        // Stored on every turn of the loop, not only on a change: after an upgrade the
        // previous generation's worker of this slot may have left its own count there.
        if let Some(gauge) = self.gauge.as_mut() {
            gauge.publish(live);
        }
    }

    /// The addresses the worker actually listens on (useful when bound to port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.listeners.iter().map(|l| l.address).collect()
    }

    /// Runs until `stop` is set, then drains and returns.
    pub fn run(&mut self, stop: &AtomicBool) -> Result<(), WorkerError> {
        let mut events = Events::with_capacity(1024);
        let mut touched: Vec<usize> = Vec::with_capacity(1024);
        let mut drain_deadline: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let mut wait = Duration::from_millis(500);
            if let Some(next) = self.timers.next_deadline() {
                wait = wait.min(next.saturating_duration_since(now) + Duration::from_millis(1));
            }
            if drain_deadline.is_some() {
                wait = wait.min(Duration::from_millis(50));
            }
            self.turn(&mut events, &mut touched, wait)?;

            let orphaned = self.control.as_ref().is_some_and(|c| c.closed);
            if (stop.load(Ordering::Relaxed) || orphaned) && drain_deadline.is_none() {
                drain_deadline = Some(self.cx.now + self.cx.timeouts.drain);
                self.begin_drain();
            }
            if let Some(deadline) = drain_deadline {
                let grace_over =
                    self.cx.now + self.cx.timeouts.drain >= deadline + DRAIN_IDLE_GRACE;
                if grace_over && !self.cx.close_idle {
                    self.cx.close_idle = true;
                    self.close_idle_sessions();
                }
                if self.sessions.is_empty() || self.cx.now >= deadline {
                    log::info!(
                        "worker stopped ({} connections left at the deadline)",
                        self.sessions.len()
                    );
                    return Ok(());
                }
            }
        }
    }

    /// One turn of the loop: waits at most `wait` for events (not at all when work is left
    /// over), serves the sessions they concern, then takes new connections (at most
    /// [`ACCEPTS_PER_TURN`] per listener), fires the timers due and does the periodic work.
    pub(crate) fn turn(
        &mut self,
        events: &mut Events,
        touched: &mut Vec<usize>,
        wait: Duration,
    ) -> Result<(), WorkerError> {
        let leftover =
            !self.again.is_empty() || self.prune_more || self.listeners.iter().any(|l| l.backlog);
        let wait = if leftover { Duration::ZERO } else { wait };
        match self.poll.poll(events, Some(wait)) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(WorkerError::Loop(e)),
        }
        self.cx.now = Instant::now();

        touched.clear();
        for event in events.iter() {
            let token = event.token().0;
            if event.token() == CONTROL_TOKEN {
                self.serve_control();
                continue;
            }
            if token >= LISTENER_BASE {
                if let Some(entry) = self.listeners.get_mut(token - LISTENER_BASE) {
                    entry.backlog = true;
                }
                continue;
            }
            let readable = event.is_readable() || event.is_read_closed() || event.is_error();
            let writable = event.is_writable() || event.is_write_closed() || event.is_error();
            let closed = event.is_read_closed();
            if token & 1 == 0 {
                let key = token >> 1;
                let Some(session) = self.sessions.get_mut(key) else {
                    continue;
                };
                session.front_event(readable, writable, closed);
                touched.push(key);
            } else {
                // A backend connection: its owner's, or a pooled one's (then it will not be
                // reused when the event says bytes came or the backend closed).
                let fd = idle_backends::token_fd(token);
                // An HTTP/2 connection shared by streams: it reads and sorts its frames, and
                // the sessions whose streams moved are driven.
                let mut woken = std::mem::take(&mut self.woken);
                woken.clear();
                if self.cx.upstreams.event(fd, readable, writable, &mut woken) {
                    for &key in &woken {
                        if let Some(session) = self.sessions.get_mut(key) {
                            session.back_event(fd, true, true, false);
                            touched.push(key);
                        }
                    }
                    self.woken = woken;
                    continue;
                }
                self.woken = woken;
                let Some(key) = self.cx.idle.event(fd, readable) else {
                    continue;
                };
                let Some(session) = self.sessions.get_mut(key) else {
                    continue;
                };
                session.back_event(fd, readable, writable, closed);
                touched.push(key);
            }
        }
        touched.append(&mut self.again);
        touched.sort_unstable();
        touched.dedup();
        for &key in touched.iter() {
            self.drive(key);
        }
        // New connections after the open ones were served, a few at a time.
        touched.clear();
        for index in 0..self.listeners.len() {
            if self.listeners.get(index).is_some_and(|l| l.backlog) {
                let more = self.accept(index, touched, ACCEPTS_PER_TURN);
                if let Some(entry) = self.listeners.get_mut(index) {
                    entry.backlog = more;
                }
                // Publish at once: the steering program counts this worker's load for the
                // very next connection.
                self.publish_live();
            }
        }
        for &key in touched.iter() {
            self.drive(key);
        }
        self.fire_timers();

        // Streams moved by other sessions' turns (room made on a shared HTTP/2 connection, a
        // stream that failed): their sessions are driven in the next turn, which comes at once.
        let mut moved = std::mem::take(&mut self.moved);
        moved.clear();
        self.cx.upstreams.woken(&mut moved);
        for &(key, fd) in &moved {
            if let Some(session) = self.sessions.get_mut(key) {
                session.back_event(fd, true, true, false);
                self.again.push(key);
            }
        }
        self.moved = moved;
        // Expired pooled backend connections are closed a batch per turn until none is left.
        let prune_due = self.cx.now.saturating_duration_since(self.last_prune) >= PRUNE_EVERY;
        if prune_due || self.prune_more {
            self.prune_more = self.cx.idle.prune(self.cx.now, PRUNE_BATCH);
        }
        if prune_due {
            self.cx.upstreams.prune(self.cx.now);
            self.last_prune = self.cx.now;
        }
        self.cx.log.flush();
        self.publish_live();
        self.cx.stats.turn(self.cx.now.elapsed());
        Ok(())
    }

    /// Stops accepting; connections finish their requests and close (idle ones after
    /// [`DRAIN_IDLE_GRACE`]).
    fn begin_drain(&mut self) {
        self.cx.draining = true;
        // Take what already waits in the accept queues: those clients completed their
        // handshake and are served (with `Connection: close`) rather than reset.
        let mut touched = Vec::new();
        for index in 0..self.listeners.len() {
            self.accept(index, &mut touched, usize::MAX);
        }
        for key in touched {
            self.drive(key);
        }
        for l in &mut self.listeners {
            let _ = self.poll.registry().deregister(&mut l.socket);
        }
        // Closing the listeners leaves new connections to the kernel (refused once no socket
        // listens); the supervisor keeps its own copy when it must hand them over.
        self.listeners.clear();
        // Every connection is driven once now: an HTTP/2 one says GOAWAY at once (an idle
        // HTTP/1.1 one has nothing to do until the grace closes it).
        self.again.extend(self.sessions.iter().map(|(key, _)| key));
        // The slot's live count belongs to whoever accepts on it next (after an upgrade, the
        // next generation's worker): stop publishing ours.
        self.gauge = None;
    }

    /// Closes the connections that have no request in flight (after the drain's grace).
    fn close_idle_sessions(&mut self) {
        let now = self.cx.now;
        let idle: Vec<usize> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.idle_past_grace(now))
            .map(|(k, _)| k)
            .collect();
        for key in idle {
            self.close_session(key);
        }
    }

    /// Takes at most `limit` connections from listener `index`'s queue (the keys of their
    /// sessions go to `touched`); true when the limit stopped it, so more may be waiting.
    fn accept(&mut self, index: usize, touched: &mut Vec<usize>, limit: usize) -> bool {
        let mut taken = 0;
        loop {
            if taken >= limit {
                return true;
            }
            let Some(entry) = self.listeners.get_mut(index) else {
                return false;
            };
            let (stream, client) = match entry.socket.accept() {
                Ok(pair) => pair,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and friends: leave the rest in the queue and try again later.
                    log::warn!("accept on {} failed: {e}", entry.address);
                    return false;
                }
            };
            taken += 1;
            let listener_addr = entry.address;
            let protocol = entry.protocol;
            if self.sessions.len() >= self.max_connections {
                log::debug!("refusing {client}: max_connections reached");
                drop(stream);
                continue;
            }
            let Some(front_buf) = self.cx.pool.checkout() else {
                drop(stream);
                continue;
            };
            let Some(back_buf) = self.cx.pool.checkout() else {
                self.cx.pool.checkin(front_buf);
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let entry = self.sessions.vacant_entry();
            let key = entry.key();
            self.next_session_id += 1;
            let accept_proxy = self
                .cx
                .tcp_routes
                .get(index)
                .is_some_and(TcpRoutes::accept_proxy);
            let mut session = if protocol == ListenerProtocol::Tcp {
                Conn::Tcp(TcpSession::new(
                    self.next_session_id,
                    key,
                    stream,
                    client,
                    listener_addr,
                    index,
                    accept_proxy,
                    front_buf,
                    back_buf,
                    self.cx.now,
                ))
            } else if accept_proxy {
                Conn::Proxied(AwaitingProxy::new(
                    self.next_session_id,
                    key,
                    stream,
                    client,
                    index,
                    listener_addr,
                    protocol == ListenerProtocol::Https,
                    front_buf,
                    back_buf,
                    self.cx.now + self.cx.timeouts.request_header,
                ))
            } else {
                let tls = self.cx.tls.get(index).and_then(Option::as_ref);
                let front = match Front::accepted(stream, tls) {
                    Ok(front) => front,
                    Err(e) => {
                        log::warn!("TLS connection from {client} refused: {e}");
                        self.cx.pool.checkin(front_buf);
                        self.cx.pool.checkin(back_buf);
                        continue;
                    }
                };
                Conn::Http(Session::new(
                    self.next_session_id,
                    key,
                    front,
                    Peer {
                        client,
                        listener: listener_addr,
                        https: protocol == ListenerProtocol::Https,
                    },
                    index,
                    front_buf,
                    back_buf,
                    self.cx.now,
                ))
            };
            let front = match &mut session {
                Conn::Http(s) => Some(s.front_stream()),
                Conn::Tcp(s) => Some(s.front_stream()),
                Conn::Proxied(p) => p.front_stream(),
            };
            let Some(front) = front else {
                session.close(&mut self.cx);
                continue;
            };
            if self
                .cx
                .registry
                .register(
                    front,
                    front_token(key),
                    Interest::READABLE | Interest::WRITABLE,
                )
                .is_err()
            {
                session.close(&mut self.cx);
                continue;
            }
            self.cx.stats.accepted(listener_addr);
            entry.insert(session);
            touched.push(key);
        }
    }

    fn drive(&mut self, key: usize) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        match session.drive(&mut self.cx) {
            Flow::Close => self.close_session(key),
            // A session takes its HTTP/2 connection over itself: never seen here.
            Flow::Continue | Flow::Http2 => self.schedule(key),
        }
    }

    fn schedule(&mut self, key: usize) {
        let Some(session) = self.sessions.get_mut(key) else {
            return;
        };
        if session.yielded() {
            self.again.push(key);
        }
        let deadline = session.deadline();
        let id = session.id();
        let scheduled = session.scheduled();
        if scheduled.is_none_or(|at| deadline < at) {
            self.timers.schedule(deadline, key, id);
            *scheduled = Some(deadline);
        }
    }

    fn fire_timers(&mut self) {
        let now = self.cx.now;
        while let Some((_, key, id)) = self.timers.pop_due(now) {
            let Some(session) = self.sessions.get_mut(key) else {
                continue;
            };
            if session.id() != id {
                continue;
            }
            *session.scheduled() = None;
            if session.deadline() <= now {
                match session.timeout(&mut self.cx) {
                    Flow::Close => {
                        self.close_session(key);
                        continue;
                    }
                    Flow::Continue | Flow::Http2 => {}
                }
            }
            self.schedule(key);
        }
    }

    fn close_session(&mut self, key: usize) {
        if let Some(session) = self.sessions.try_remove(key) {
            let listener = match &session {
                Conn::Http(s) => s.listener_addr(),
                Conn::Tcp(s) => s.listener_addr(),
                Conn::Proxied(p) => p.listener_addr(),
            };
            self.cx.stats.closed(listener);
            session.close(&mut self.cx);
        }
    }

    /// Live client connections.
    pub fn connections(&self) -> usize {
        self.sessions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(protocol: &str, backends: &str) -> Config {
        let text = format!(
            "[[listeners]]\naddress = \"127.0.0.1:1\"\nprotocol = \"{protocol}\"\n\n\
             [clusters.c]\nprotocol = \"{}\"\nfrontends = [{{ address = \"127.0.0.1:1\" }}]\n\
             backends = [{backends}]\n\n[access_log]\ntarget = \"off\"\n",
            if protocol == "tcp" { "tcp" } else { "http" }
        );
        lb_config::parse_str(&text, std::path::Path::new("t.toml")).unwrap()
    }

    #[test]
    fn reconfigure_keeps_tcp_listeners_and_refuses_a_protocol_change() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let one = "{ address = \"127.0.0.1:2\" }";
        let two = "{ address = \"127.0.0.1:2\" }, { address = \"127.0.0.1:3\" }";
        let mut worker = Worker::new(&config("tcp", one), vec![(0, listener)]).unwrap();
        assert!(worker.cx.tcp_routes[0].lookup(None).is_some());
        worker.reconfigure(&config("tcp", two)).unwrap();
        assert_eq!(worker.cx.clusters[0].backends.len(), 2);
        assert!(worker.cx.tcp_routes[0].lookup(None).is_some());
        let e = worker.reconfigure(&config("http", two)).unwrap_err();
        assert!(e.contains("listeners changed"), "{e}");
        // Refused: nothing changed.
        assert!(worker.cx.tcp_routes[0].lookup(None).is_some());
    }

    /// Issue 19: a burst leaves hundreds of pooled backend connections that expire together;
    /// closing 512 over loopback took 4-5 ms, one turn every busy connection waited through.
    /// The sweep closes [`PRUNE_BATCH`] a turn, and the turns after it come at once until none
    /// is left, without waiting for events.
    #[test]
    fn expired_pooled_connections_are_closed_a_batch_per_turn_without_waiting() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let one = "{ address = \"127.0.0.1:2\" }";
        let mut worker = Worker::new(&config("http", one), vec![(0, listener)]).unwrap();
        let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = backend.local_addr().unwrap();
        let long_ago = Instant::now() - worker.cx.timeouts.back_idle - Duration::from_secs(1);
        let mut peers = Vec::new();
        for _ in 0..100 {
            let stream = std::net::TcpStream::connect(addr).unwrap();
            peers.push(backend.accept().unwrap().0);
            stream.set_nonblocking(true).unwrap();
            let stream =
                crate::back_stream::BackStream::plain(mio::net::TcpStream::from_std(stream));
            worker.cx.idle.put(addr, stream, long_ago);
        }
        worker.last_prune = long_ago;
        let mut events = Events::with_capacity(64);
        let mut touched = Vec::new();
        let mut left = Vec::new();
        let mut started = Instant::now();
        for turn in 0..4 {
            worker
                .turn(&mut events, &mut touched, Duration::from_millis(200))
                .unwrap();
            left.push(worker.cx.idle.len());
            if turn == 0 {
                // The first turn waited for events (none came), then swept.
                started = Instant::now();
            }
        }
        assert_eq!(left, [68, 36, 4, 0]);
        // None of the three turns after it waited its 200 ms for events that never came.
        assert!(started.elapsed() < Duration::from_millis(200));
        // The next one does: nothing is left to do.
        assert!(!worker.prune_more);
    }

    /// Issue 19: a stall of the loop is every busy connection's wait, so each turn's length is
    /// kept (`kakehi_worker_loop_turn_seconds`), from the poll's return to the end of its work:
    /// the time spent waiting for events is not in it.
    #[test]
    fn every_turn_of_the_loop_is_counted_without_its_wait() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let one = "{ address = \"127.0.0.1:2\" }";
        let mut worker = Worker::new(&config("http", one), vec![(0, listener)]).unwrap();
        let mut client = std::net::TcpStream::connect(address).unwrap();
        std::io::Write::write_all(&mut client, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut events = Events::with_capacity(64);
        let mut touched = Vec::new();
        let started = Instant::now();
        for _ in 0..5 {
            worker
                .turn(&mut events, &mut touched, Duration::from_millis(40))
                .unwrap();
        }
        let elapsed = started.elapsed().as_secs_f64();
        let samples = worker.cx.stats.samples(&[], 0, (0, 0));
        let value = |name: &str| {
            samples
                .iter()
                .find(|s| s.name == name)
                .map(|s| s.value)
                .unwrap()
        };
        assert_eq!(value("kakehi_worker_loop_turn_seconds_count"), 5.0);
        let sum = value("kakehi_worker_loop_turn_seconds_sum");
        // The turns after the first ones waited up to 40 ms each for events that never came
        // (the backend refuses, the client waits): at least one did, and that wait is not
        // counted.
        assert!(elapsed >= 0.04, "{elapsed}");
        assert!(
            sum > 0.0 && sum < elapsed - 0.03,
            "turns {sum} s of {elapsed} s"
        );
    }
}
