//! The validated, immutable configuration that the rest of kakehi consumes.
//!
//! Nothing here parses text: `file.rs` holds the serde structs that mirror the TOML file, and
//! `validate.rs` turns them into these types. Every value here has already been checked, so the
//! data path never has to handle a malformed config.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The whole configuration of one kakehi instance.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file the configuration came from (absolute when it was given relative).
    pub source: PathBuf,
    /// Number of worker processes.
    pub workers: usize,
    /// Live connections one worker accepts; over it, new connections are refused.
    pub max_connections: usize,
    pub command_socket: PathBuf,
    pub steering: Steering,
    pub steering_policy: SteeringPolicy,
    pub user: Option<String>,
    pub group: Option<String>,
    /// Size of one I/O buffer (each proxied connection uses two). Default 16 KiB.
    pub buffer_size: usize,
    /// Largest request body accepted, in bytes (`max_request_body`); 0 = no limit. Over it
    /// the client gets 413.
    pub max_request_body: u64,
    pub timeouts: Timeouts,
    pub access_log: AccessLog,
    pub metrics: Option<Metrics>,
    pub listeners: Vec<Listener>,
    /// Clusters in name order.
    pub clusters: Vec<Cluster>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steering {
    Ebpf,
    Kernel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SteeringPolicy {
    FlowHash,
    LeastConnections,
    PowerOfTwo,
}

/// Timeouts of the data path. File keys under `[timeouts]`: `connect`, `request_header`,
/// `front_idle`, `back_idle`, `drain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Connecting to a backend. Default 3s.
    pub connect: Duration,
    /// From a request's first byte (or the connection's accept) to its complete header. Default 10s.
    pub request_header: Duration,
    /// A client connection with no request in progress. Default 60s.
    pub front_idle: Duration,
    /// Waiting for bytes from a backend while a request is in flight. Default 30s.
    pub back_idle: Duration,
    /// How long a stopping worker (SIGTERM, `lbctl shutdown`, the old generation of an
    /// upgrade) lets its connections finish before it closes what is left. Default 10s.
    pub drain: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLog {
    pub format: LogFormat,
    pub target: LogTarget,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Logfmt,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    Stdout,
    Off,
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metrics {
    pub address: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerProtocol {
    Http,
    Https,
    Tcp,
}

/// A checked certificate of an https listener (see `certs.rs`): its chain parses, its key
/// matches the leaf, and it was within its validity period when it was admitted.
#[derive(Debug, PartialEq, Eq)]
pub struct Certificate {
    /// The chain, the server's certificate first (DER).
    pub chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// The private key (DER).
    pub key: rustls_pki_types::PrivateKeyDer<'static>,
    /// The server names SNI selects it by, lower-case: the DNS subject alternative names
    /// (else the common name); a wildcard is kept as `*.example.com`.
    pub names: Vec<String>,
    /// End of the leaf's validity, seconds since the Unix epoch.
    pub not_after: i64,
    /// SHA-256 of the leaf, lower-case hex.
    pub fingerprint: String,
    /// The file it was read from (or that lbctl named), when known.
    pub path: Option<PathBuf>,
}

impl Clone for Certificate {
    fn clone(&self) -> Certificate {
        Certificate {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            names: self.names.clone(),
            not_after: self.not_after,
            fingerprint: self.fingerprint.clone(),
            path: self.path.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub address: SocketAddr,
    pub protocol: ListenerProtocol,
    /// Only for `https` listeners, in the file's order: the first one is the default (served
    /// when no name matches the client's SNI, or when it sends none).
    pub certificates: Vec<Certificate>,
    pub accept_proxy: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterProtocol {
    Http,
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadBalancing {
    RoundRobin,
    Random,
    LeastConnections,
    PowerOfTwo,
}

#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    pub protocol: ClusterProtocol,
    pub load_balancing: LoadBalancing,
    pub frontends: Vec<Frontend>,
    pub backends: Vec<Backend>,
    pub health_check: Option<HealthCheck>,
    pub send_proxy: bool,
}

#[derive(Debug, Clone)]
pub struct Frontend {
    /// The listener this frontend is served on (validated to exist).
    pub address: SocketAddr,
    pub hostname: HostMatch,
    pub path: PathMatch,
    /// Upper-case method name, e.g. "GET"; None matches any method.
    pub method: Option<String>,
    /// `redirect_https = true` (http listeners only): the request is answered with a 301 to
    /// the same host and target in https, and never reaches the cluster.
    pub redirect_https: bool,
}

/// How a frontend matches the request's host (port removed, compared case-insensitively).
#[derive(Debug, Clone)]
pub enum HostMatch {
    /// No `hostname`: any host.
    Any,
    /// `app.example.com`, stored lower-case.
    Exact(String),
    /// `*.example.com`: stored as the lower-case suffix `.example.com`; matches one or more labels.
    Wildcard(String),
    /// `~^api[0-9]+\.example\.com$`: a regex (the `~` prefix, as nginx's server_name).
    Regex(regex::Regex),
}

/// How a frontend matches the request's path (the part of the target before `?`).
#[derive(Debug, Clone)]
pub enum PathMatch {
    /// `path = "/api"` (default "/"): a prefix.
    Prefix(String),
    /// `path_type = "exact"`.
    Exact(String),
    /// `path_type = "regex"`.
    Regex(regex::Regex),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub address: SocketAddr,
    /// Relative share of traffic, 1..=1000, default 1.
    pub weight: u32,
    /// Used only when no non-backup backend is available.
    pub backup: bool,
    /// Receives no new requests; those in flight finish (`lbctl backend drain`).
    pub draining: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// None means a TCP connect check.
    pub path: Option<String>,
    /// HTTP checks: the request method, upper-case (default GET).
    pub method: String,
    /// HTTP checks: the lowest and highest status that mean up (default 200 to 399).
    pub status: (u16, u16),
    /// HTTP checks: the Host header sent; None: the backend's address.
    pub host: Option<String>,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}
