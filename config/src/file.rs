//! The serde structs that mirror the TOML file, key for key.
//!
//! This module owns only the *shape* of the file: every table denies unknown keys, and every
//! value that a later check may reject is kept as a [`Spanned`] so the error can point at its
//! line. Defaults, ranges, address parsing and cross-references are left to `validate.rs`;
//! nothing here is handed to the rest of kakehi.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_spanned::Spanned;

/// A string value together with where it sits in the file.
pub(crate) type SpannedStr = Spanned<String>;
/// An integer value together with where it sits in the file. Kept signed and wide so that a
/// negative or huge number reaches validation and gets a message with the allowed range.
pub(crate) type SpannedInt = Spanned<i64>;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileConfig {
    pub workers: Option<SpannedInt>,
    pub max_connections: Option<SpannedInt>,
    pub command_socket: Option<SpannedStr>,
    pub steering: Option<Spanned<FileSteering>>,
    pub steering_policy: Option<Spanned<FileSteeringPolicy>>,
    pub user: Option<SpannedStr>,
    pub group: Option<SpannedStr>,
    pub buffer_size: Option<SpannedInt>,
    pub max_request_body: Option<SpannedInt>,
    pub timeouts: Option<FileTimeouts>,
    pub access_log: Option<FileAccessLog>,
    pub metrics: Option<FileMetrics>,
    #[serde(default)]
    pub listeners: Vec<Spanned<FileListener>>,
    /// Sorted by name, which is the order `Config::clusters` promises.
    #[serde(default)]
    pub clusters: BTreeMap<SpannedStr, Spanned<FileCluster>>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum FileSteering {
    Ebpf,
    Kernel,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum FileSteeringPolicy {
    FlowHash,
    LeastConnections,
    PowerOfTwo,
}

/// `[timeouts]`: durations as humantime strings ("500ms", "5s", "1m").
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileTimeouts {
    pub connect: Option<SpannedStr>,
    pub request_header: Option<SpannedStr>,
    pub front_idle: Option<SpannedStr>,
    pub back_idle: Option<SpannedStr>,
    pub drain: Option<SpannedStr>,
}

/// `[access_log]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileAccessLog {
    pub format: Option<Spanned<FileLogFormat>>,
    /// "stdout", "off", or a file path.
    pub target: Option<SpannedStr>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum FileLogFormat {
    Logfmt,
    Json,
}

/// `[metrics]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileMetrics {
    pub address: SpannedStr,
}

/// One `[[listeners]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileListener {
    pub address: SpannedStr,
    pub protocol: Option<Spanned<FileListenerProtocol>>,
    pub certificates: Option<Spanned<Vec<Spanned<FileCertificate>>>>,
    pub accept_proxy: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum FileListenerProtocol {
    Http,
    Https,
    Tcp,
}

/// `{ certificate = "...", key = "..." }` inside a listener's `certificates`: files, or the
/// PEM text itself in `certificate_pem` / `key_pem` (which wins when both are given: the
/// running state keeps the text, since a sandboxed worker cannot open files).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileCertificate {
    pub certificate: Option<SpannedStr>,
    pub key: Option<SpannedStr>,
    pub certificate_pem: Option<SpannedStr>,
    pub key_pem: Option<SpannedStr>,
}

/// One `[clusters.NAME]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileCluster {
    pub protocol: Option<Spanned<FileClusterProtocol>>,
    pub load_balancing: Option<Spanned<FileLoadBalancing>>,
    pub frontends: Option<Vec<Spanned<FileFrontend>>>,
    pub backends: Option<Spanned<Vec<Spanned<FileBackend>>>>,
    pub health_check: Option<Spanned<FileHealthCheck>>,
    pub send_proxy: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum FileClusterProtocol {
    Http,
    Tcp,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum FileLoadBalancing {
    RoundRobin,
    Random,
    LeastConnections,
    PowerOfTwo,
}

/// One entry of a cluster's `frontends`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileFrontend {
    pub address: SpannedStr,
    pub hostname: Option<SpannedStr>,
    pub path: Option<SpannedStr>,
    pub path_type: Option<Spanned<FilePathType>>,
    pub method: Option<SpannedStr>,
    /// On an http listener: answer 301 to the same URL in https instead of proxying.
    pub redirect_https: Option<Spanned<bool>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum FilePathType {
    Prefix,
    Exact,
    Regex,
}

/// One entry of a cluster's `backends`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileBackend {
    pub address: SpannedStr,
    pub weight: Option<SpannedInt>,
    pub backup: Option<bool>,
    /// `draining = true`: the backend receives no new requests; those in flight finish. Set by
    /// `lbctl backend drain` and kept by `state save` (`state::BackendDef::draining`).
    pub draining: Option<bool>,
}

/// A cluster's `health_check`; no `path` means a TCP connect check.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileHealthCheck {
    pub path: Option<SpannedStr>,
    /// HTTP checks: the request method (default GET).
    pub method: Option<SpannedStr>,
    /// HTTP checks: the statuses that mean up, "200-399" (the default) or "204".
    pub status: Option<SpannedStr>,
    /// HTTP checks: the Host header sent (default: the backend's address).
    pub host: Option<SpannedStr>,
    pub interval: Option<SpannedStr>,
    pub timeout: Option<SpannedStr>,
    pub rise: Option<SpannedInt>,
    pub fall: Option<SpannedInt>,
}
