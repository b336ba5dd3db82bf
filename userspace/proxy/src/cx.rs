//! What every session of a worker shares while it takes a step: balancers, routers, the
//! buffer pool, idle backend connections, the access log and the figures. Borrowed by one
//! session at a time (the worker is single-threaded).

use crate::accesslog::AccessLog;
use crate::balancer::{ClusterState, Rng};
use crate::idle_backends::IdlePool;
use crate::pool::BufferPool;
use crate::router::Router;
use crate::splice::PipePool;
use crate::stats::Stats;
use crate::tcp_routes::TcpRoutes;
use lb_config::Timeouts;
use mio::Registry;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// A request as kakehi logged it (see [`Cx::transcript`]).
#[derive(Debug, Clone)]
pub struct Logged {
    /// What the exchange parsed and routed on.
    pub req: crate::http::RequestInfo,
    pub status: u16,
    /// kakehi answered itself.
    pub answered: bool,
    /// The request bytes its exchange read (an HTTP/2 stream's: the head and body
    /// `h2/request.rs` wrote), when its front keeps them.
    pub read: Option<Vec<u8>>,
}

/// Everything a session may use while it takes a step, apart from its own sockets.
pub struct Cx {
    pub registry: Registry,
    pub clusters: Vec<ClusterState>,
    /// One per listener of the worker, by listener index.
    pub routers: Vec<Router>,
    /// One per listener of the worker, by listener index (empty for http listeners).
    pub tcp_routes: Vec<TcpRoutes>,
    /// One per listener of the worker, by listener index: the TLS configuration of an https
    /// listener (new connections take the current one; established ones keep theirs).
    pub tls: Vec<Option<Arc<rustls::ServerConfig>>>,
    /// One per listener of the worker, by listener index: it serves HTTP/2 (see
    /// `h2/conn.rs`).
    pub http2: Vec<bool>,
    /// One per listener of the worker, by listener index: its HTTP/2 limits.
    pub h2_limits: Vec<lb_config::H2Limits>,
    pub pool: BufferPool,
    /// Pipes for splice(2) in TCP passthrough.
    pub pipes: PipePool,
    pub idle: IdlePool,
    /// What each logged request was, with the bytes its exchange read: kept only when driven
    /// in memory for the fuzz target `h2_conn` (its differential check), `None` in a worker.
    pub transcript: Option<Vec<Logged>>,
    /// HTTP/2 connections to the backends of `http2 = true` clusters, shared by exchanges.
    pub upstreams: crate::h2::upstream::Upstreams,
    pub log: AccessLog,
    /// This worker's figures, sent to the supervisor when it asks (see `orders.rs`).
    pub stats: Stats,
    /// The backends the supervisor's health checks found down: (cluster, address).
    pub down: Vec<(String, SocketAddr)>,
    pub rng: Rng,
    pub timeouts: Timeouts,
    /// Largest request body accepted (0: no limit).
    pub max_request_body: u64,
    pub now: Instant,
    pub draining: bool,
    /// Set [`DRAIN_IDLE_GRACE`](crate::worker::DRAIN_IDLE_GRACE) after the drain began, when the connections idle since
    /// before it are closed. Until then an idle keep-alive connection is left open, so that a
    /// request the client is sending right now is answered (with `Connection: close`) instead
    /// of meeting a closed socket; one that becomes idle later gets the same grace from then.
    pub close_idle: bool,
    pub(crate) id_prefix: u32,
    pub(crate) requests: u64,
    /// The request rates of the frontends' `rate_limit`, shared with the other workers
    /// (`Worker::set_rates`); made in this process's memory, on first use, without one.
    pub rates: Option<crate::rate_limit::RateTable>,
}

impl Cx {
    /// Whether a request from `client` is within the frontend's `limit` (and counts it).
    pub fn admit_rate(
        &mut self,
        limit: &crate::rate_limit::RateLimit,
        client: std::net::IpAddr,
    ) -> bool {
        let seed = self.id_prefix.into();
        let table = self.rates.get_or_insert_with(|| {
            crate::rate_limit::RateTable::new(Box::new(crate::rate_limit::LocalSlots::new(seed)))
        });
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| {
                u64::try_from(t.tv_sec())
                    .unwrap_or(0)
                    .saturating_mul(1_000_000_000)
                    .saturating_add(u64::try_from(t.tv_nsec()).unwrap_or(0))
            })
            .unwrap_or(1);
        table.admit(limit, client, now)
    }

    /// A fresh request id: 8 hex digits for the worker, 16 for the request.
    pub fn next_request_id(&mut self, out: &mut String) {
        self.requests += 1;
        out.clear();
        let _ = write!(out, "{:08x}{:016x}", self.id_prefix, self.requests);
    }
}
