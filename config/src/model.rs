//! The validated, immutable configuration that the rest of kakehi consumes.
//!
//! Nothing here parses text: `file.rs` holds the serde structs that mirror the TOML file, and
//! `validate.rs` turns them into these types. Every value here has already been checked, so the
//! data path never has to handle a malformed config.
//!
//! lbd main validates each configuration once and hands workers this checked value itself
//! (serde: JSON over the worker channel and in the config memfd), so a worker never parses or
//! re-checks a configuration. Regexes travel as their pattern, certificates and keys as DER in
//! hex.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The whole configuration of one kakehi instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// `[sync]`: etcd shared with other appliances (lbd's main process alone uses it).
    pub sync: Option<Sync>,
    /// `[bgp]`: the VIP bird2 announces while lbd serves (lbd's main process alone uses it).
    pub bgp: Option<Bgp>,
    pub listeners: Vec<Listener>,
    /// Clusters in name order.
    pub clusters: Vec<Cluster>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Steering {
    Ebpf,
    Kernel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SteeringPolicy {
    FlowHash,
    LeastConnections,
    PowerOfTwo,
}

/// Timeouts of the data path. File keys under `[timeouts]`: `connect`, `request_header`,
/// `front_idle`, `back_idle`, `drain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessLog {
    pub format: LogFormat,
    pub target: LogTarget,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogFormat {
    Logfmt,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogTarget {
    Stdout,
    Off,
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metrics {
    pub address: SocketAddr,
}

/// `[sync]`, checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sync {
    /// etcd members' client addresses (`http://IP:PORT`; names are not resolved).
    pub etcd: Vec<SocketAddr>,
    /// The keys' prefix, without a trailing `/`: changes under `PREFIX/changes/`, health
    /// verdicts under `PREFIX/health/`.
    pub prefix: String,
    /// This appliance's name: where its changes and verdicts say they come from.
    pub name: String,
}

/// `[bgp]`, checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bgp {
    pub vip: std::net::IpAddr,
    pub local_as: u32,
    pub router_id: std::net::Ipv4Addr,
    /// (address, AS) of each neighbour.
    pub peers: Vec<(std::net::IpAddr, u32)>,
    pub bird_socket: PathBuf,
    pub bird_config: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ListenerProtocol {
    Http,
    Https,
    Tcp,
}

/// A checked certificate of an https listener (see `certs.rs`): its chain parses, its key
/// matches the leaf, and it was within its validity period when it was admitted.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    /// The chain, the server's certificate first (DER).
    #[serde(with = "wire::chain")]
    pub chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// The private key (DER).
    #[serde(with = "wire::key")]
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listener {
    pub address: SocketAddr,
    pub protocol: ListenerProtocol,
    /// Only for `https` listeners, in the file's order: the first one is the default (served
    /// when no name matches the client's SNI, or when it sends none).
    pub certificates: Vec<Certificate>,
    pub accept_proxy: bool,
    /// HTTP/2 is served (ALPN `h2` on https, prior knowledge on http): the `alpn` key lists
    /// `"h2"`, which it does by default.
    #[serde(default = "yes")]
    pub http2: bool,
    /// Its HTTP/2 limits.
    #[serde(default)]
    pub h2: H2Limits,
    /// `max_connections_per_ip` (0: no limit).
    #[serde(default)]
    pub max_connections_per_ip: u32,
    /// `max_connection_rate_per_ip`, in connections per second (0: no limit).
    #[serde(default)]
    pub max_connection_rate_per_ip: u32,
    /// `client_ca`/`client_auth` (https only): client certificates verified against these.
    #[serde(default)]
    pub client_auth: Option<ClientAuth>,
}

/// The client certificates an https listener asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientAuth {
    /// The CA certificates (DER).
    #[serde(with = "wire::chain")]
    pub roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// A client without a certificate is refused (`client_auth = "required"`, the default).
    pub required: bool,
    /// `client_crl`: the revocation lists (DER); a certificate they list is refused.
    #[serde(default, with = "wire::crls")]
    pub crls: Vec<rustls_pki_types::CertificateRevocationListDer<'static>>,
}

/// The HTTP/2 limits of a listener (`h2 = { ... }`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct H2Limits {
    /// SETTINGS_MAX_CONCURRENT_STREAMS (default 100).
    pub max_concurrent_streams: u32,
    /// SETTINGS_MAX_HEADER_LIST_SIZE, with 32 octets per field (default 16,384).
    pub max_header_list_size: u32,
    /// The connection's receive window (default 1 MiB): what all streams' request bodies may
    /// hold together before kakehi grants more.
    pub connection_window: u32,
    /// Streams the client resets before their response ended (Rapid Reset).
    pub client_resets: Rate,
    /// Streams kakehi resets because of what the client sent (MadeYouReset).
    pub own_resets: Rate,
    /// PING frames.
    pub pings: Rate,
    /// SETTINGS frames.
    pub settings: Rate,
    /// PRIORITY frames, empty DATA frames without END_STREAM, frames of unknown types.
    pub noise: Rate,
    /// WINDOW_UPDATE frames (a client downloading fast sends many).
    pub window_updates: Rate,
}

/// A token bucket: `burst` at once, refilled at `per_second`. Past it, the HTTP/2 connection
/// ends with GOAWAY(ENHANCE_YOUR_CALM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rate {
    pub burst: u32,
    pub per_second: u32,
}

impl Rate {
    pub const fn new(burst: u32, per_second: u32) -> Rate {
        Rate { burst, per_second }
    }
}

impl Default for H2Limits {
    fn default() -> Self {
        H2Limits {
            max_concurrent_streams: 100,
            max_header_list_size: 16_384,
            connection_window: 1 << 20,
            client_resets: Rate::new(100, 10),
            own_resets: Rate::new(100, 10),
            pings: Rate::new(50, 10),
            settings: Rate::new(50, 10),
            noise: Rate::new(1000, 100),
            window_updates: Rate::new(10_000, 5_000),
        }
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClusterProtocol {
    Http,
    Tcp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoadBalancing {
    RoundRobin,
    Random,
    LeastConnections,
    PowerOfTwo,
    /// Consistent hashing of the cluster's `hash_key` (Maglev).
    Maglev,
}

/// What a `maglev` cluster hashes to pick a backend (`hash_key`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum HashKey {
    /// The client's address (the default; a tcp cluster's only key).
    #[default]
    SourceIp,
    /// `header:NAME`: the value of that request header (name lower-case).
    Header(String),
    /// `cookie:NAME`: the value of that cookie.
    Cookie(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cluster {
    pub name: String,
    pub protocol: ClusterProtocol,
    pub load_balancing: LoadBalancing,
    pub frontends: Vec<Frontend>,
    pub backends: Vec<Backend>,
    pub health_check: Option<HealthCheck>,
    pub send_proxy: bool,
    /// The backends speak h2c (HTTP/2 with prior knowledge).
    #[serde(default)]
    pub http2: bool,
    /// `backend_tls`: the backends are reached over TLS and verified.
    #[serde(default)]
    pub backend_tls: Option<BackendTls>,
    /// `hash_key` of a `maglev` cluster. A request without it falls back to the source IP.
    #[serde(default)]
    pub hash_key: HashKey,
}

/// How a cluster's backends are verified over TLS (`backend_tls = true`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendTls {
    /// The CA certificates (DER) of `backend_ca`; empty: the system's roots
    /// ([`crate::certs::system_roots`]), which each process reads itself.
    #[serde(with = "wire::chain")]
    pub roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// `backend_server_name`: SNI and the name checked; None: each backend's IP address.
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// `rate_limit`: requests per client address per second, across all workers (0: none).
    #[serde(default)]
    pub rate_limit: u32,
    /// `hsts` (https listeners only): the `Strict-Transport-Security` value of its responses.
    #[serde(default)]
    pub hsts: Option<String>,
}

/// How a frontend matches the request's host (port removed, compared case-insensitively).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum HostMatch {
    /// No `hostname`: any host.
    Any,
    /// `app.example.com`, stored lower-case.
    Exact(String),
    /// `*.example.com`: stored as the lower-case suffix `.example.com`; matches one or more labels.
    Wildcard(String),
    /// `~^api[0-9]+\.example\.com$`: a regex (the `~` prefix, as nginx's server_name),
    /// case-insensitive.
    Regex(#[serde(with = "wire::host_regex")] regex::Regex),
}

/// How a frontend matches the request's path (the part of the target before `?`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PathMatch {
    /// `path = "/api"` (default "/"): a prefix.
    Prefix(String),
    /// `path_type = "exact"`.
    Exact(String),
    /// `path_type = "regex"`.
    Regex(#[serde(with = "wire::regex")] regex::Regex),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    pub address: SocketAddr,
    /// Relative share of traffic, 1..=1000, default 1.
    pub weight: u32,
    /// Used only when no non-backup backend is available.
    pub backup: bool,
    /// Receives no new requests; those in flight finish (`lbctl backend drain`).
    pub draining: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// Two regexes are the same rule when they have the same pattern (each kind is always built
/// the same way: see `wire`).
impl PartialEq for HostMatch {
    fn eq(&self, other: &HostMatch) -> bool {
        match (self, other) {
            (HostMatch::Any, HostMatch::Any) => true,
            (HostMatch::Exact(a), HostMatch::Exact(b)) => a == b,
            (HostMatch::Wildcard(a), HostMatch::Wildcard(b)) => a == b,
            (HostMatch::Regex(a), HostMatch::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

impl PartialEq for PathMatch {
    fn eq(&self, other: &PathMatch) -> bool {
        match (self, other) {
            (PathMatch::Prefix(a), PathMatch::Prefix(b)) => a == b,
            (PathMatch::Exact(a), PathMatch::Exact(b)) => a == b,
            (PathMatch::Regex(a), PathMatch::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

/// How the values serde cannot write by itself travel to workers.
mod wire {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn unhex<E: serde::de::Error>(text: &str) -> Result<Vec<u8>, E> {
        let digit = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            _ => Err(E::custom("not lower-case hex")),
        };
        if !text.len().is_multiple_of(2) {
            return Err(E::custom("odd number of hex digits"));
        }
        text.as_bytes()
            .chunks(2)
            .map(|pair| match pair {
                [hi, lo] => Ok(digit(*hi)? << 4 | digit(*lo)?),
                _ => Err(E::custom("odd number of hex digits")),
            })
            .collect()
    }

    pub(super) mod chain {
        use super::*;
        use rustls_pki_types::CertificateDer;

        pub(crate) fn serialize<S: Serializer>(
            chain: &[CertificateDer<'static>],
            s: S,
        ) -> Result<S::Ok, S::Error> {
            let texts: Vec<String> = chain.iter().map(|c| hex(c.as_ref())).collect();
            texts.serialize(s)
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Vec<CertificateDer<'static>>, D::Error> {
            Vec::<String>::deserialize(d)?
                .iter()
                .map(|t| unhex(t).map(CertificateDer::from))
                .collect()
        }
    }

    pub(super) mod crls {
        use super::*;
        use rustls_pki_types::CertificateRevocationListDer;

        pub(crate) fn serialize<S: Serializer>(
            crls: &[CertificateRevocationListDer<'static>],
            s: S,
        ) -> Result<S::Ok, S::Error> {
            let texts: Vec<String> = crls.iter().map(|c| hex(c.as_ref())).collect();
            texts.serialize(s)
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<Vec<CertificateRevocationListDer<'static>>, D::Error> {
            Vec::<String>::deserialize(d)?
                .iter()
                .map(|t| unhex(t).map(CertificateRevocationListDer::from))
                .collect()
        }
    }

    pub(super) mod key {
        use super::*;
        use rustls_pki_types::{
            PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer,
        };

        #[derive(Serialize, Deserialize)]
        #[serde(rename_all = "snake_case", deny_unknown_fields)]
        enum Key {
            Pkcs1(String),
            Sec1(String),
            Pkcs8(String),
        }

        pub(crate) fn serialize<S: Serializer>(
            key: &PrivateKeyDer<'static>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            let key = match key {
                PrivateKeyDer::Pkcs1(k) => Key::Pkcs1(hex(k.secret_pkcs1_der())),
                PrivateKeyDer::Sec1(k) => Key::Sec1(hex(k.secret_sec1_der())),
                PrivateKeyDer::Pkcs8(k) => Key::Pkcs8(hex(k.secret_pkcs8_der())),
                _ => return Err(serde::ser::Error::custom("unknown kind of private key")),
            };
            key.serialize(s)
        }

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<PrivateKeyDer<'static>, D::Error> {
            Ok(match Key::deserialize(d)? {
                Key::Pkcs1(t) => PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(unhex(&t)?)),
                Key::Sec1(t) => PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(unhex(&t)?)),
                Key::Pkcs8(t) => PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(unhex(&t)?)),
            })
        }
    }

    /// A regex travels as its pattern.
    pub(crate) fn write_regex<S: Serializer>(r: &::regex::Regex, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(r.as_str())
    }

    /// The regex of a pattern, built as `routes.rs` builds that kind.
    pub(crate) fn read_regex<'de, D: Deserializer<'de>>(
        d: D,
        case_insensitive: bool,
    ) -> Result<::regex::Regex, D::Error> {
        let pattern = String::deserialize(d)?;
        ::regex::RegexBuilder::new(&pattern)
            .case_insensitive(case_insensitive)
            .build()
            .map_err(D::Error::custom)
    }

    /// A path regex (`regex::Regex::new`, as `routes.rs` builds it).
    pub(super) mod regex {
        pub(crate) use super::write_regex as serialize;
        use super::*;

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<::regex::Regex, D::Error> {
            read_regex(d, false)
        }
    }

    /// A hostname regex: case-insensitive, as `routes.rs` builds it.
    pub(super) mod host_regex {
        pub(crate) use super::write_regex as serialize;
        use super::*;

        pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
            d: D,
        ) -> Result<::regex::Regex, D::Error> {
            read_regex(d, true)
        }
    }
}
