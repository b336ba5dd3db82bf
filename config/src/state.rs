//! The running state: the config file's document, changed at runtime by lbctl.
//!
//! [`State`] holds the whole configuration in the same shape as the TOML file, key for key, as
//! plain values: it is what serde reads the file into, it serializes to TOML (`state save`,
//! `state dump`) and to JSON (the command protocol) and back, and it is equal in content to the
//! file it was read from. There is exactly one validator (`validate.rs`), the one
//! [`crate::parse_str`] (`lbd --check`, `lbctl config check`) runs on the file's document;
//! [`State::validate`] runs it on a state built at runtime, whose errors name no line.
//!
//! Every runtime change is an [`Edit`]. [`State::apply`] checks the edit against the current
//! state first (unknown cluster, backend already there, frontend already served elsewhere...),
//! then validates the whole resulting state, and returns a new `State` or a [`StateError`]; the
//! old state is never touched, so a refused change changes nothing. [`diff`] (`state/diff.rs`)
//! lists what differs between two states (what `lbctl reload` reports). Applying a state to
//! processes is the supervisor's business, not this module's.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{self, ConfigError};
use crate::model::Config;

mod diff;
pub use diff::{diff, Change};

/// An enum written in the file as one of a fixed set of words.
macro_rules! word_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $word:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $word)] $variant),+
        }

        impl $name {
            /// Every value, in the order the file's documentation lists them.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The word the file uses.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $word),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| {
                        let words: Vec<&str> = Self::ALL.iter().map(|v| v.as_str()).collect();
                        format!("{s:?} is not allowed: expected {}", words.join(" | "))
                    })
            }
        }
    };
}

word_enum!(
    /// `steering`.
    SteeringDef { Ebpf = "ebpf", Kernel = "kernel" }
);
word_enum!(
    /// `steering_policy`.
    SteeringPolicyDef {
        FlowHash = "flow-hash",
        LeastConnections = "least-connections",
        PowerOfTwo = "power-of-two",
    }
);
word_enum!(
    /// `access_log.format`.
    LogFormatDef { Logfmt = "logfmt", Json = "json" }
);
word_enum!(
    /// A listener's `protocol`.
    ListenerProtocolDef { Http = "http", Https = "https", Tcp = "tcp" }
);
word_enum!(
    /// A cluster's `protocol`.
    ClusterProtocolDef { Http = "http", Tcp = "tcp" }
);
word_enum!(
    /// A cluster's `load_balancing`.
    LoadBalancingDef {
        RoundRobin = "round-robin",
        Random = "random",
        LeastConnections = "least-connections",
        PowerOfTwo = "power-of-two",
        Maglev = "maglev",
    }
);
word_enum!(
    /// A frontend's `path_type`.
    PathTypeDef { Prefix = "prefix", Exact = "exact", Regex = "regex" }
);

/// The whole configuration, as the file writes it. A key absent from the file is `None` (or an
/// empty list) here, and is written back absent: defaults are the validator's business.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workers: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_socket: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steering: Option<SteeringDef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steering_policy: Option<SteeringPolicyDef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buffer_size: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_request_body: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<TimeoutsDef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_log: Option<AccessLogDef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsDef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncDef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bgp: Option<BgpDef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub listeners: Vec<ListenerDef>,
    /// By name, the order the file's tables are read in.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub clusters: BTreeMap<String, ClusterDef>,
}

/// `[timeouts]`: durations as written ("500ms", "5s", "1m").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsDef {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_header: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub front_idle: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub back_idle: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain: Option<String>,
}

/// `[access_log]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogDef {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<LogFormatDef>,
    /// "stdout", "off", or a file path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// `[metrics]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsDef {
    pub address: String,
}

/// `[sync]`: the etcd cluster several appliances share their changes and health verdicts
/// through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncDef {
    /// Client URLs of etcd members, `http://IP:PORT`.
    pub etcd: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// This appliance's name among the others (default: the host name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// `[bgp]`: the virtual IP bird2 announces while this appliance serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BgpDef {
    pub vip: String,
    pub local_as: i64,
    pub router_id: String,
    pub peers: Vec<BgpPeerDef>,
    /// bird's control socket (default "/run/bird/bird.ctl").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bird_socket: Option<String>,
    /// Where lbd writes bird's configuration.
    pub bird_config: String,
}

/// One BGP neighbour of `[bgp]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BgpPeerDef {
    pub address: String,
    #[serde(rename = "as")]
    pub asn: i64,
}

/// One `[[listeners]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerDef {
    pub address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<ListenerProtocolDef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub certificates: Vec<CertificateDef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accept_proxy: Option<bool>,
    /// The application protocols offered, in order of preference: `"h2"` and `"http/1.1"`
    /// (default: both, h2 first). Without `"h2"` the listener speaks HTTP/1.1 only: no ALPN
    /// h2 on https, no prior-knowledge HTTP/2 on http.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpn: Option<Vec<String>>,
    /// HTTP/2 limits of the listener (see [`H2Def`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub h2: Option<H2Def>,
    /// The most connections one client address may have open on this listener; more are
    /// refused in the kernel, at the SYN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections_per_ip: Option<i64>,
    /// The most connections one client address may open per second (`"R/s"`, a burst of R);
    /// more are refused in the kernel, at the SYN.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connection_rate_per_ip: Option<String>,
    /// https: the CA certificates (PEM file) client certificates are verified against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<String>,
    /// The same as PEM text (what `state save` writes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_pem: Option<String>,
    /// With `client_ca`: whether a client must present a certificate (default required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<ClientAuthDef>,
    /// With `client_ca`: certificate revocation lists (PEM file): a client certificate they
    /// list is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_crl: Option<String>,
    /// The same as PEM text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_crl_pem: Option<String>,
}

/// A listener's `client_auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuthDef {
    /// The handshake fails without a certificate the CA signed.
    Required,
    /// A client without a certificate is served; one with a bad certificate is not.
    Optional,
}

/// A listener's `h2 = { ... }`: the HTTP/2 limits it advertises and enforces.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct H2Def {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrent_streams: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_header_list_size: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_window: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_resets: Option<RateDef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub own_resets: Option<RateDef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pings: Option<RateDef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub settings: Option<RateDef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub noise: Option<RateDef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_updates: Option<RateDef>,
}

/// A rate budget in a listener's `h2` table: `{ burst = N, per_second = M }`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateDef {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_second: Option<i64>,
}

/// What `lbctl state dump` shows in place of a private key.
pub const KEY_NOT_SHOWN: &str = "(private key not shown: see `lbctl state save`)";

/// `{ certificate = "...", key = "..." }` in a listener's `certificates`: the files, and once
/// read, their PEM text (`certificate_pem`, `key_pem`), which is what counts. The running state
/// always carries the text ([`State::from_toml`] reads the files): workers check the
/// configurations they receive inside a sandbox that opens no file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateDef {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub certificate_pem: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_pem: Option<String>,
}

impl CertificateDef {
    /// Checks the certificate (PEM text, else the files) as a new one: parsed, key matching,
    /// within its validity period now.
    pub fn admit(&self) -> Result<crate::Certificate, String> {
        let read = |pem: &Option<String>, path: &Option<String>, what: &str| match (pem, path) {
            (Some(pem), _) => Ok(pem.clone()),
            (None, Some(path)) => std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the {what} {path}: {e}")),
            (None, None) => Err(format!("no {what} given")),
        };
        let chain = read(&self.certificate_pem, &self.certificate, "certificate")?;
        let key = read(&self.key_pem, &self.key, "key")?;
        let path = self.certificate.as_ref().map(std::path::PathBuf::from);
        crate::certs::check(&chain, &key, path, Some(crate::certs::unix_now()))
    }

    /// Parses a certificate of the running state (no expiry check: it was admitted earlier).
    fn admit_running(&self) -> Result<crate::Certificate, String> {
        let (Some(chain), Some(key)) = (&self.certificate_pem, &self.key_pem) else {
            return Err("not read in".into());
        };
        let path = self.certificate.as_ref().map(std::path::PathBuf::from);
        crate::certs::check(chain, key, path, None)
    }

    /// The same certificate with its files' text read in (no change when the text is there).
    pub fn inlined(&self) -> std::io::Result<CertificateDef> {
        let mut out = self.clone();
        if out.certificate_pem.is_none() {
            if let Some(path) = &self.certificate {
                out.certificate_pem = Some(std::fs::read_to_string(path)?);
            }
        }
        if out.key_pem.is_none() {
            if let Some(path) = &self.key {
                out.key_pem = Some(std::fs::read_to_string(path)?);
            }
        }
        Ok(out)
    }

    /// One line naming it without its text (never the key): its file, and the SHA-256 of its
    /// leaf certificate, for diffs and listings.
    pub fn summary(&self) -> String {
        let fingerprint = self
            .certificate_pem
            .as_deref()
            .and_then(|pem| {
                use rustls::pki_types::pem::PemObject;
                rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
                    .next()
                    .and_then(Result::ok)
            })
            .map(|der| crate::certs::fingerprint(der.as_ref()));
        match (&self.certificate, fingerprint) {
            (Some(path), Some(f)) => format!("{path} (sha256 {f})"),
            (None, Some(f)) => format!("sha256 {f}"),
            (Some(path), None) => path.clone(),
            (None, None) => "(unreadable certificate)".to_owned(),
        }
    }
}

impl ListenerDef {
    /// The listener with each certificate replaced by its [`CertificateDef::summary`] (in
    /// `certificate`), for diffs and listings that must not print keys.
    pub fn summarized(&self) -> ListenerDef {
        let mut out = self.clone();
        for cert in &mut out.certificates {
            *cert = CertificateDef {
                certificate: Some(cert.summary()),
                ..CertificateDef::default()
            };
        }
        for pem in [out.client_ca_pem.as_mut(), out.client_crl_pem.as_mut()]
            .into_iter()
            .flatten()
        {
            *pem = format!(
                "(PEM, sha256 {})",
                crate::certs::fingerprint(pem.as_bytes())
            );
        }
        out
    }
}

/// One `[clusters.NAME]` table (the name is its key in [`State::clusters`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterDef {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<ClusterProtocolDef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_balancing: Option<LoadBalancingDef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frontends: Vec<FrontendDef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendDef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckDef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub send_proxy: Option<bool>,
    /// `http2 = true`: the backends speak HTTP/2 without TLS (h2c, prior knowledge), as gRPC
    /// servers do. Only for http clusters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2: Option<bool>,
    /// `backend_tls = true`: connections to the backends (and their health checks) are TLS,
    /// and the backends' certificates are verified. Only for http clusters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_tls: Option<bool>,
    /// With `backend_tls`: the CA certificates (PEM file) backends are verified against;
    /// default: the system's roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_ca: Option<String>,
    /// The same as PEM text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_ca_pem: Option<String>,
    /// With `backend_tls`: the name sent in SNI and that the backends' certificates must be
    /// valid for; default: each backend's IP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_server_name: Option<String>,
    /// With `load_balancing = "maglev"`: `"source-ip"` (default), `"header:NAME"` or
    /// `"cookie:NAME"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_key: Option<String>,
}

/// One entry of a cluster's `frontends`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FrontendDef {
    /// The listener's `IP:PORT`.
    pub address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_type: Option<PathTypeDef>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// On an http listener: 301 to the same URL in https.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub redirect_https: Option<bool>,
    /// Requests per client address per second (`"R/s"`, a burst of R); over it, 429.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<String>,
    /// On an https listener: the `Strict-Transport-Security` value added to responses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hsts: Option<String>,
}

/// One entry of a cluster's `backends`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendDef {
    pub address: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup: Option<bool>,
    /// `draining = true`: the backend receives no new requests; those in flight finish.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draining: Option<bool>,
}

/// A cluster's `health_check`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckDef {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rise: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fall: Option<i64>,
}

/// A state that passed validation, and the configuration it validated to: what lbd main makes
/// the running state and hands to its workers, without validating it again.
#[derive(Debug, Clone)]
pub struct Checked {
    pub state: State,
    pub config: Config,
}

/// One runtime change to a [`State`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Edit {
    AddCluster {
        name: String,
        cluster: ClusterDef,
    },
    RemoveCluster {
        name: String,
    },
    AddBackend {
        cluster: String,
        backend: BackendDef,
    },
    RemoveBackend {
        cluster: String,
        address: String,
    },
    /// Marks the backend `draining = true` (already draining: no change).
    DrainBackend {
        cluster: String,
        address: String,
    },
    AddFrontend {
        cluster: String,
        frontend: FrontendDef,
    },
    /// Removes the frontend with the same route (address, hostname, path, path_type, method).
    RemoveFrontend {
        cluster: String,
        frontend: FrontendDef,
    },
    AddListener {
        listener: ListenerDef,
    },
    RemoveListener {
        address: String,
    },
    /// Adds a certificate to an https listener (checked first: see [`CertificateDef::admit`]).
    AddCertificate {
        address: String,
        certificate: CertificateDef,
    },
    /// Replaces the certificate that `old` selects (its file, its SHA-256 fingerprint or one
    /// of its names) in place: a default certificate stays the default.
    ReplaceCertificate {
        address: String,
        old: String,
        certificate: CertificateDef,
    },
    /// Removes the certificate that `certificate` selects; the listener keeps at least one.
    RemoveCertificate {
        address: String,
        certificate: String,
    },
    /// Sets the CA client certificates of an https listener are verified against (a PEM file,
    /// read now and kept as text) and `client_auth`; `ca = None` stops asking for them.
    /// Handshakes from then on use it; established connections keep theirs.
    SetClientCa {
        address: String,
        ca: Option<String>,
        auth: Option<ClientAuthDef>,
        /// Revocation lists (a PEM file, read now), with `ca`.
        #[serde(default)]
        crl: Option<String>,
    },
}

impl Edit {
    /// The lbctl command that asks for it, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Edit::AddCluster { .. } => "cluster add",
            Edit::RemoveCluster { .. } => "cluster remove",
            Edit::AddBackend { .. } => "backend add",
            Edit::RemoveBackend { .. } => "backend remove",
            Edit::DrainBackend { .. } => "backend drain",
            Edit::AddFrontend { .. } => "frontend add",
            Edit::RemoveFrontend { .. } => "frontend remove",
            Edit::AddListener { .. } => "listener add",
            Edit::RemoveListener { .. } => "listener remove",
            Edit::AddCertificate { .. } => "certificate add",
            Edit::ReplaceCertificate { .. } => "certificate replace",
            Edit::RemoveCertificate { .. } => "certificate remove",
            Edit::SetClientCa { .. } => "listener client-ca",
        }
    }
}

/// Why an edit was refused. The `Display` is one line an operator can act on; it never names a
/// line number, since the state being edited is not a file anyone wrote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("there is no cluster named {name:?} ({known})")]
    UnknownCluster { name: String, known: String },
    #[error("cluster {name:?} already exists: remove it first, or add its frontends and backends one by one")]
    ClusterExists { name: String },
    #[error("cluster {cluster:?} has no backend {address} ({known})")]
    UnknownBackend {
        cluster: String,
        address: String,
        known: String,
    },
    #[error("cluster {cluster:?} already has the backend {address}: remove it first to change it")]
    BackendExists { cluster: String, address: String },
    #[error("{address} is the last backend of cluster {cluster:?}: a cluster needs one; add another first, or remove the cluster")]
    LastBackend { cluster: String, address: String },
    #[error("cluster {cluster:?} has no frontend {frontend}")]
    UnknownFrontend { cluster: String, frontend: String },
    #[error("the frontend {frontend} already exists in cluster {owner:?}: a request could not tell them apart")]
    FrontendExists { owner: String, frontend: String },
    #[error("there is no listener on {address} ({known})")]
    UnknownListener { address: String, known: String },
    #[error("there is already a listener on {address}")]
    ListenerExists { address: String },
    #[error("the listener {address} still serves frontends of {clusters}: remove those first")]
    ListenerInUse { address: String, clusters: String },
    #[error("the listener {address} is {protocol}: certificates belong to https listeners")]
    NotHttps { address: String, protocol: String },
    #[error("certificate refused: {reason}")]
    BadCertificate { reason: String },
    #[error("the listener {address} already has this certificate ({summary})")]
    CertificateExists { address: String, summary: String },
    #[error("the listener {address} has no certificate {selector:?} ({known}): name one by its file, its SHA-256 fingerprint or a server name")]
    UnknownCertificate {
        address: String,
        selector: String,
        known: String,
    },
    #[error("{selector:?} selects {count} certificates of {address}: name one by its file or fingerprint")]
    AmbiguousCertificate {
        address: String,
        selector: String,
        count: usize,
    },
    #[error("that is the last certificate of the https listener {address}: add another first")]
    LastCertificate { address: String },
    /// The edit fits, but the resulting configuration does not pass validation.
    #[error("{}", render_invalid(field.as_deref(), message))]
    Invalid {
        field: Option<String>,
        message: String,
    },
}

fn render_invalid(field: Option<&str>, message: &str) -> String {
    match field {
        Some(field) => format!("{field}: {message}"),
        None => message.to_owned(),
    }
}

impl StateError {
    /// A validation failure of a state built at runtime: the field and message, without the
    /// file name and line (they would point into generated text).
    pub fn invalid(error: ConfigError) -> StateError {
        match error {
            ConfigError::Invalid { field, message, .. } => StateError::Invalid { field, message },
            other => StateError::Invalid {
                field: None,
                message: other.to_string(),
            },
        }
    }
}

impl State {
    /// Reads `text`, the config file at `source`, after checking it with the validator.
    ///
    /// Certificate files are read in (see [`CertificateDef`]), relative to `source`: the state
    /// carries their text from then on.
    pub fn from_toml(text: &str, source: &Path) -> Result<State, ConfigError> {
        State::checked_from_toml(text, source).map(|checked| checked.state)
    }

    /// [`State::from_toml`], with the configuration the text validated to (validated once).
    pub fn checked_from_toml(text: &str, source: &Path) -> Result<Checked, ConfigError> {
        let mut state: State =
            toml::from_str(text).map_err(|e| error::from_toml(source, text, &e))?;
        let config = crate::validate::validate(&state, &error::Places::of(text), source)?;
        let absolute = state.with_absolute_paths(source);
        for (listener, resolved) in state.listeners.iter_mut().zip(&absolute.listeners) {
            for (cert, resolved) in listener.certificates.iter_mut().zip(&resolved.certificates) {
                let inlined = resolved.inlined().map_err(|error| ConfigError::Read {
                    file: resolved.certificate.clone().unwrap_or_default().into(),
                    error,
                })?;
                cert.certificate_pem = inlined.certificate_pem;
                cert.key_pem = inlined.key_pem;
            }
        }
        Ok(Checked { state, config })
    }

    /// Reads and checks the config file at `path`.
    pub fn load(path: &Path) -> Result<State, ConfigError> {
        State::load_checked(path).map(|checked| checked.state)
    }

    /// Reads and checks the config file at `path` once: its state, with every relative path
    /// made absolute (then it means the same wherever it is saved), and its configuration.
    pub fn load_checked(path: &Path) -> Result<Checked, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            file: path.to_path_buf(),
            error,
        })?;
        let checked = State::checked_from_toml(&text, path)?;
        Ok(Checked {
            state: checked.state.with_absolute_paths(path),
            config: checked.config,
        })
    }

    /// The state as a config file. Reading it back gives an equal `State`.
    pub fn to_toml(&self) -> String {
        // Every field is a string, a bool, an i64, a list or a string-keyed table of those, all
        // of which TOML writes; an error here would be a bug, and the text then fails validation
        // with the reason instead of being silently empty.
        toml::to_string(self)
            .unwrap_or_else(|e| format!("# internal error: cannot write the state: {e}\n"))
    }

    /// The state for showing (`lbctl state dump`): private keys replaced by a placeholder.
    /// `state save` keeps them, since a saved state must be loadable.
    pub fn without_keys(&self) -> State {
        let mut out = self.clone();
        for cert in out.listeners.iter_mut().flat_map(|l| &mut l.certificates) {
            if cert.key_pem.is_some() {
                cert.key_pem = Some(KEY_NOT_SHOWN.to_owned());
            }
        }
        out
    }

    /// Checks the whole state with the file's validator, as if it were the file at `source`
    /// (relative paths resolve against its directory; errors name it and the field, without a
    /// line: a state built at runtime is no text anyone wrote).
    pub fn validate(&self, source: &Path) -> Result<Config, ConfigError> {
        crate::validate::validate(self, &error::Places::none(), source)
    }

    /// The same state with every relative path (command socket, access log file, certificates)
    /// joined to the directory of `source`, made absolute against the current directory: then
    /// the state means the same wherever it is saved.
    pub fn with_absolute_paths(&self, source: &Path) -> State {
        let absolute = std::path::absolute(source).unwrap_or_else(|_| source.to_path_buf());
        let base = absolute.parent().map(Path::to_path_buf).unwrap_or_default();
        let fix = |p: &mut String| {
            if !p.trim().is_empty() && Path::new(p.as_str()).is_relative() {
                *p = base.join(p.as_str()).to_string_lossy().into_owned();
            }
        };
        let mut out = self.clone();
        if let Some(socket) = &mut out.command_socket {
            fix(socket);
        }
        if let Some(target) = out.access_log.as_mut().and_then(|a| a.target.as_mut()) {
            if target != "stdout" && target != "off" {
                fix(target);
            }
        }
        for cert in out.listeners.iter_mut().flat_map(|l| &mut l.certificates) {
            cert.certificate.as_mut().map(fix);
            cert.key.as_mut().map(fix);
        }
        out
    }

    /// The state with `edit` applied, checked against the whole state as if it were the file at
    /// `source`, with the configuration it validated to. `self` is left as it was, whatever
    /// the outcome.
    pub fn apply(&self, edit: &Edit, source: &Path) -> Result<Checked, StateError> {
        let mut next = self.clone();
        next.edit_in_place(edit)?;
        let config = next.validate(source).map_err(StateError::invalid)?;
        Ok(Checked {
            state: next,
            config,
        })
    }

    /// [`State::apply`], keeping only the state.
    fn applied(&self, edit: &Edit, source: &Path) -> Result<State, StateError> {
        self.apply(edit, source).map(|checked| checked.state)
    }

    pub fn add_cluster(
        &self,
        name: &str,
        cluster: ClusterDef,
        source: &Path,
    ) -> Result<State, StateError> {
        let name = name.to_owned();
        self.applied(&Edit::AddCluster { name, cluster }, source)
    }

    pub fn remove_cluster(&self, name: &str, source: &Path) -> Result<State, StateError> {
        let name = name.to_owned();
        self.applied(&Edit::RemoveCluster { name }, source)
    }

    pub fn add_backend(
        &self,
        cluster: &str,
        backend: BackendDef,
        source: &Path,
    ) -> Result<State, StateError> {
        let cluster = cluster.to_owned();
        self.applied(&Edit::AddBackend { cluster, backend }, source)
    }

    pub fn remove_backend(
        &self,
        cluster: &str,
        address: &str,
        source: &Path,
    ) -> Result<State, StateError> {
        let (cluster, address) = (cluster.to_owned(), address.to_owned());
        self.applied(&Edit::RemoveBackend { cluster, address }, source)
    }

    pub fn drain_backend(
        &self,
        cluster: &str,
        address: &str,
        source: &Path,
    ) -> Result<State, StateError> {
        let (cluster, address) = (cluster.to_owned(), address.to_owned());
        self.applied(&Edit::DrainBackend { cluster, address }, source)
    }

    pub fn add_frontend(
        &self,
        cluster: &str,
        frontend: FrontendDef,
        source: &Path,
    ) -> Result<State, StateError> {
        let cluster = cluster.to_owned();
        self.applied(&Edit::AddFrontend { cluster, frontend }, source)
    }

    pub fn remove_frontend(
        &self,
        cluster: &str,
        frontend: FrontendDef,
        source: &Path,
    ) -> Result<State, StateError> {
        let cluster = cluster.to_owned();
        self.applied(&Edit::RemoveFrontend { cluster, frontend }, source)
    }

    pub fn add_listener(&self, listener: ListenerDef, source: &Path) -> Result<State, StateError> {
        self.applied(&Edit::AddListener { listener }, source)
    }

    pub fn remove_listener(&self, address: &str, source: &Path) -> Result<State, StateError> {
        let address = address.to_owned();
        self.applied(&Edit::RemoveListener { address }, source)
    }

    /// One line per cluster, for `lbctl cluster list`.
    pub fn cluster_summaries(&self) -> Vec<ClusterSummary> {
        self.clusters
            .iter()
            .map(|(name, c)| ClusterSummary {
                name: name.clone(),
                protocol: c.protocol.unwrap_or(ClusterProtocolDef::Http),
                load_balancing: c.load_balancing.unwrap_or(LoadBalancingDef::RoundRobin),
                frontends: c.frontends.len(),
                backends: c.backends.len(),
                draining: c.backends.iter().filter(|b| b.is_draining()).count(),
            })
            .collect()
    }

    /// The pre-checks that give an edit its own clear refusal; the whole-state validation
    /// follows in `apply`.
    fn edit_in_place(&mut self, edit: &Edit) -> Result<(), StateError> {
        match edit {
            Edit::AddCluster { name, cluster } => {
                if self.clusters.contains_key(name) {
                    return Err(StateError::ClusterExists { name: name.clone() });
                }
                for frontend in &cluster.frontends {
                    self.refuse_duplicate_frontend(frontend)?;
                }
                self.clusters.insert(name.clone(), cluster.clone());
            }
            Edit::RemoveCluster { name } => {
                self.cluster_mut(name)?;
                self.clusters.remove(name);
            }
            Edit::AddBackend { cluster, backend } => {
                let c = self.cluster_mut(cluster)?;
                if c.backends
                    .iter()
                    .any(|b| same_address(&b.address, &backend.address))
                {
                    return Err(StateError::BackendExists {
                        cluster: cluster.clone(),
                        address: backend.address.clone(),
                    });
                }
                c.backends.push(backend.clone());
            }
            Edit::RemoveBackend { cluster, address } => {
                let c = self.cluster_mut(cluster)?;
                let i = backend_index(c, cluster, address)?;
                if c.backends.len() == 1 {
                    return Err(StateError::LastBackend {
                        cluster: cluster.clone(),
                        address: address.clone(),
                    });
                }
                c.backends.remove(i);
            }
            Edit::DrainBackend { cluster, address } => {
                let c = self.cluster_mut(cluster)?;
                let i = backend_index(c, cluster, address)?;
                if let Some(b) = c.backends.get_mut(i) {
                    b.draining = Some(true);
                }
            }
            Edit::AddFrontend { cluster, frontend } => {
                self.cluster_mut(cluster)?;
                self.refuse_duplicate_frontend(frontend)?;
                self.cluster_mut(cluster)?.frontends.push(frontend.clone());
            }
            Edit::RemoveFrontend { cluster, frontend } => {
                let c = self.cluster_mut(cluster)?;
                let Some(i) = c.frontends.iter().position(|f| f.same_route(frontend)) else {
                    return Err(StateError::UnknownFrontend {
                        cluster: cluster.clone(),
                        frontend: frontend.to_string(),
                    });
                };
                c.frontends.remove(i);
            }
            Edit::AddListener { listener } => {
                if self
                    .listeners
                    .iter()
                    .any(|l| same_address(&l.address, &listener.address))
                {
                    return Err(StateError::ListenerExists {
                        address: listener.address.clone(),
                    });
                }
                // The running state carries certificates as text (workers open no file).
                let mut listener = listener.clone();
                for cert in &mut listener.certificates {
                    *cert = cert.inlined().map_err(|e| StateError::BadCertificate {
                        reason: format!(
                            "cannot read {}: {e}",
                            cert.certificate.as_deref().unwrap_or("the certificate")
                        ),
                    })?;
                }
                self.listeners.push(listener);
            }
            Edit::AddCertificate {
                address,
                certificate,
            } => {
                let admitted = certificate
                    .admit()
                    .map_err(|reason| StateError::BadCertificate { reason })?;
                let certificate =
                    certificate
                        .inlined()
                        .map_err(|e| StateError::BadCertificate {
                            reason: e.to_string(),
                        })?;
                let listener = self.https_listener(address)?;
                if let Some(same) = listener.certificates.iter().find(|c| {
                    c.admit_running()
                        .is_ok_and(|c| c.fingerprint == admitted.fingerprint)
                }) {
                    return Err(StateError::CertificateExists {
                        address: address.clone(),
                        summary: same.summary(),
                    });
                }
                listener.certificates.push(certificate);
            }
            Edit::ReplaceCertificate {
                address,
                old,
                certificate,
            } => {
                let i = self.certificate_index(address, old)?;
                certificate
                    .admit()
                    .map_err(|reason| StateError::BadCertificate { reason })?;
                let certificate =
                    certificate
                        .inlined()
                        .map_err(|e| StateError::BadCertificate {
                            reason: e.to_string(),
                        })?;
                if let Some(slot) = self.https_listener(address)?.certificates.get_mut(i) {
                    *slot = certificate;
                }
            }
            Edit::SetClientCa {
                address,
                ca,
                auth,
                crl,
            } => {
                let read = |what: &str, path: &str, check: fn(&str) -> Result<(), String>| {
                    let bad = |e: String| StateError::BadCertificate {
                        reason: format!("{what} {path}: {e}"),
                    };
                    let pem = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
                    check(&pem).map_err(bad)?;
                    Ok::<String, StateError>(pem)
                };
                let pem = match ca {
                    Some(path) => Some(read("client CA", path, |pem| {
                        crate::certs::ca_roots(pem).map(drop)
                    })?),
                    None => None,
                };
                let crl_pem = match crl {
                    Some(path) => Some(read("client CRL", path, |pem| {
                        crate::certs::crls(pem).map(drop)
                    })?),
                    None => None,
                };
                let listener = self.https_listener(address)?;
                listener.client_auth = pem.as_ref().and(*auth);
                listener.client_ca = None;
                listener.client_crl = None;
                listener.client_crl_pem = pem.as_ref().and(crl_pem);
                listener.client_ca_pem = pem;
            }
            Edit::RemoveCertificate {
                address,
                certificate,
            } => {
                let i = self.certificate_index(address, certificate)?;
                let listener = self.https_listener(address)?;
                if listener.certificates.len() == 1 {
                    return Err(StateError::LastCertificate {
                        address: address.clone(),
                    });
                }
                listener.certificates.remove(i);
            }
            Edit::RemoveListener { address } => {
                let Some(i) = self
                    .listeners
                    .iter()
                    .position(|l| same_address(&l.address, address))
                else {
                    let known = known_list(self.listeners.iter().map(|l| l.address.as_str()));
                    return Err(StateError::UnknownListener {
                        address: address.clone(),
                        known: format!("listeners: {known}"),
                    });
                };
                let users: Vec<&str> = self
                    .clusters
                    .iter()
                    .filter(|(_, c)| {
                        c.frontends
                            .iter()
                            .any(|f| same_address(&f.address, address))
                    })
                    .map(|(name, _)| name.as_str())
                    .collect();
                if !users.is_empty() {
                    return Err(StateError::ListenerInUse {
                        address: address.clone(),
                        clusters: format!("cluster {}", users.join(", ")),
                    });
                }
                self.listeners.remove(i);
            }
        }
        Ok(())
    }

    /// The https listener at `address`, or why there is none.
    fn https_listener(&mut self, address: &str) -> Result<&mut ListenerDef, StateError> {
        let known = known_list(self.listeners.iter().map(|l| l.address.as_str()));
        let Some(listener) = self
            .listeners
            .iter_mut()
            .find(|l| same_address(&l.address, address))
        else {
            return Err(StateError::UnknownListener {
                address: address.to_owned(),
                known: format!("listeners: {known}"),
            });
        };
        let protocol = listener.protocol.unwrap_or(ListenerProtocolDef::Http);
        if protocol != ListenerProtocolDef::Https {
            return Err(StateError::NotHttps {
                address: address.to_owned(),
                protocol: protocol.to_string(),
            });
        }
        Ok(listener)
    }

    /// The position of the one certificate of the https listener at `address` that
    /// `selector` designates (see [`crate::certs::selects`]).
    fn certificate_index(&mut self, address: &str, selector: &str) -> Result<usize, StateError> {
        let listener = self.https_listener(address)?;
        let matching: Vec<usize> = listener
            .certificates
            .iter()
            .enumerate()
            .filter(|(_, c)| {
                c.certificate.as_deref() == Some(selector.trim())
                    || c.admit_running()
                        .is_ok_and(|c| crate::certs::selects(&c, selector))
            })
            .map(|(i, _)| i)
            .collect();
        match matching.as_slice() {
            [i] => Ok(*i),
            [] => Err(StateError::UnknownCertificate {
                address: address.to_owned(),
                selector: selector.to_owned(),
                known: known_list(
                    listener
                        .certificates
                        .iter()
                        .map(|c| c.summary())
                        .collect::<Vec<_>>()
                        .iter()
                        .map(String::as_str),
                ),
            }),
            many => Err(StateError::AmbiguousCertificate {
                address: address.to_owned(),
                selector: selector.to_owned(),
                count: many.len(),
            }),
        }
    }

    fn cluster_mut(&mut self, name: &str) -> Result<&mut ClusterDef, StateError> {
        let known = known_list(self.clusters.keys().map(String::as_str));
        self.clusters
            .get_mut(name)
            .ok_or_else(|| StateError::UnknownCluster {
                name: name.to_owned(),
                known: format!("clusters: {known}"),
            })
    }

    fn refuse_duplicate_frontend(&self, frontend: &FrontendDef) -> Result<(), StateError> {
        for (owner, cluster) in &self.clusters {
            if cluster.frontends.iter().any(|f| f.same_route(frontend)) {
                return Err(StateError::FrontendExists {
                    owner: owner.clone(),
                    frontend: frontend.to_string(),
                });
            }
        }
        Ok(())
    }
}

fn backend_index(c: &ClusterDef, cluster: &str, address: &str) -> Result<usize, StateError> {
    c.backends
        .iter()
        .position(|b| same_address(&b.address, address))
        .ok_or_else(|| StateError::UnknownBackend {
            cluster: cluster.to_owned(),
            address: address.to_owned(),
            known: format!(
                "backends: {}",
                known_list(c.backends.iter().map(|b| b.address.as_str()))
            ),
        })
}

/// At most ten names, for an error message.
fn known_list<'a>(names: impl Iterator<Item = &'a str>) -> String {
    let names: Vec<&str> = names.collect();
    match names.len() {
        0 => "none".to_owned(),
        n if n <= 10 => names.join(", "),
        n => format!(
            "{} and {} more",
            names.get(..10).unwrap_or_default().join(", "),
            n - 10
        ),
    }
}

/// Two addresses as the validator sees them: parsed when both parse, else the text.
fn same_address(a: &str, b: &str) -> bool {
    match (
        a.trim().parse::<SocketAddr>(),
        b.trim().parse::<SocketAddr>(),
    ) {
        (Ok(x), Ok(y)) => x == y,
        _ => a.trim() == b.trim(),
    }
}

/// The address as a key that two spellings of the same socket address share.
fn address_key(a: &str) -> String {
    a.trim()
        .parse::<SocketAddr>()
        .map_or_else(|_| a.trim().to_owned(), |s| s.to_string())
}

impl BackendDef {
    /// A backend at `address` with the file's defaults.
    pub fn new(address: impl Into<String>) -> BackendDef {
        BackendDef {
            address: address.into(),
            ..BackendDef::default()
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.unwrap_or(false)
    }
}

impl FrontendDef {
    /// Whether `other` is the same route: what the validator would call identical (the same
    /// listener, hostname ignoring case, path and path type with their defaults, method
    /// ignoring case).
    pub fn same_route(&self, other: &FrontendDef) -> bool {
        let host = |f: &FrontendDef| f.hostname.as_deref().map(|h| h.trim().to_ascii_lowercase());
        let path_type = |f: &FrontendDef| f.path_type.unwrap_or(PathTypeDef::Prefix);
        let path = |f: &FrontendDef| f.path.clone().unwrap_or_else(|| "/".to_owned());
        let method = |f: &FrontendDef| f.method.as_deref().map(|m| m.trim().to_ascii_uppercase());
        same_address(&self.address, &other.address)
            && host(self) == host(other)
            && path_type(self) == path_type(other)
            && path(self) == path(other)
            && method(self) == method(other)
    }
}

impl fmt::Display for FrontendDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.address)?;
        if let Some(h) = &self.hostname {
            write!(f, " hostname={h}")?;
        }
        if let Some(p) = &self.path {
            write!(f, " path={p}")?;
        }
        if let Some(t) = self.path_type {
            write!(f, " path_type={t}")?;
        }
        if let Some(m) = &self.method {
            write!(f, " method={m}")?;
        }
        if let Some(r) = &self.rate_limit {
            write!(f, " rate_limit={r}")?;
        }
        if let Some(h) = &self.hsts {
            write!(f, " hsts={h:?}")?;
        }
        Ok(())
    }
}

impl fmt::Display for BackendDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.address)?;
        if let Some(w) = self.weight {
            write!(f, " weight={w}")?;
        }
        if self.backup == Some(true) {
            write!(f, " backup")?;
        }
        if self.is_draining() {
            write!(f, " draining")?;
        }
        Ok(())
    }
}

/// One cluster in `lbctl cluster list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSummary {
    pub name: String,
    pub protocol: ClusterProtocolDef,
    pub load_balancing: LoadBalancingDef,
    pub frontends: usize,
    pub backends: usize,
    /// Backends marked `draining`.
    pub draining: usize,
}

#[cfg(test)]
mod tests;
