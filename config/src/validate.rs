//! Turns the file structs of `file.rs` into the immutable `model::Config`.
//!
//! This module owns the defaults, the ranges and every check that spans more than one value:
//! listener addresses are unique, an https listener has certificates, every cluster has
//! backends, backend addresses are unique within a cluster. Frontends (hostnames, paths, methods,
//! their listener and their uniqueness) are checked in `routes.rs`. The first failed check is
//! returned as a `ConfigError` pointing at the offending value's line. The only files read are
//! the certificates and keys an https listener names by path (checked by `certs.rs`); relative
//! paths are joined to the config file's directory. Nothing here touches the network.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_spanned::Spanned;

use crate::error::{join_key, locate, ConfigError};
use crate::file::{
    FileAccessLog, FileCertificate, FileCluster, FileClusterProtocol, FileConfig, FileHealthCheck,
    FileListener, FileListenerProtocol, FileLoadBalancing, FileLogFormat, FileSteering,
    FileSteeringPolicy, FileTimeouts, SpannedInt, SpannedStr,
};
use crate::model::{
    AccessLog, Backend, Certificate, Cluster, ClusterProtocol, Config, HealthCheck, Listener,
    ListenerProtocol, LoadBalancing, LogFormat, LogTarget, Metrics, Steering, SteeringPolicy,
    Timeouts,
};
use crate::routes::FrontendChecker;
use crate::DEFAULT_COMMAND_SOCKET;

pub(crate) type Result<T> = std::result::Result<T, ConfigError>;

/// A unix socket path must fit `sockaddr_un.sun_path` (108 bytes with its NUL).
const MAX_UNIX_SOCKET_PATH: usize = 107;

/// The longest duration any setting takes: a day is more than any timeout or probe interval
/// needs, and far below what would overflow `Instant + Duration` (a panic) in the data path
/// or the health checker.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// Validates a parsed file. `text` is the file's content (for line numbers), `source` its path.
pub(crate) fn validate(file: FileConfig, text: &str, source: &Path) -> Result<Config> {
    let absolute = std::path::absolute(source).unwrap_or_else(|_| source.to_path_buf());
    let base_dir = absolute.parent().map(Path::to_path_buf).unwrap_or_default();
    let c = Checker {
        text,
        source,
        base_dir,
    };

    let workers = c.int(file.workers.as_ref(), "workers", 1, 1..=64)?;
    let max_connections = c.int(
        file.max_connections.as_ref(),
        "max_connections",
        10_000,
        1..=i64::from(u32::MAX),
    )?;
    let command_socket = c.command_socket(file.command_socket.as_ref())?;
    let steering = match file.steering.as_ref().map(|s| *s.get_ref()) {
        Some(FileSteering::Ebpf) | None => Steering::Ebpf,
        Some(FileSteering::Kernel) => Steering::Kernel,
    };
    let steering_policy = match file.steering_policy.as_ref().map(|s| *s.get_ref()) {
        Some(FileSteeringPolicy::FlowHash) | None => SteeringPolicy::FlowHash,
        Some(FileSteeringPolicy::LeastConnections) => SteeringPolicy::LeastConnections,
        Some(FileSteeringPolicy::PowerOfTwo) => SteeringPolicy::PowerOfTwo,
    };
    let user = c.account(file.user.as_ref(), "user")?;
    let group = c.account(file.group.as_ref(), "group")?;
    let buffer_size = c.int(
        file.buffer_size.as_ref(),
        "buffer_size",
        16_384,
        4_096..=1_048_576,
    )?;
    let max_request_body = c.int(
        file.max_request_body.as_ref(),
        "max_request_body",
        0u64,
        0..=i64::MAX,
    )?;
    let timeouts = c.timeouts(file.timeouts.unwrap_or_default())?;
    let access_log = c.access_log(file.access_log.unwrap_or_default())?;
    let listeners = c.listeners(&file.listeners)?;
    let metrics = match &file.metrics {
        None => None,
        Some(m) => {
            let address = c.socket_addr(&m.address, "metrics.address")?;
            if listeners.iter().any(|l| l.address == address) {
                return Err(c.err(
                    m.address.span(),
                    "metrics.address",
                    format!("{address} is also a listener's address; give metrics its own port"),
                ));
            }
            Some(Metrics { address })
        }
    };
    let clusters = c.clusters(&file.clusters, &listeners)?;

    Ok(Config {
        source: absolute,
        workers,
        max_connections,
        command_socket,
        steering,
        steering_policy,
        user,
        group,
        buffer_size,
        max_request_body,
        timeouts,
        access_log,
        metrics,
        listeners,
        clusters,
    })
}

/// What every check needs to build an error or resolve a path.
pub(crate) struct Checker<'a> {
    text: &'a str,
    source: &'a Path,
    base_dir: PathBuf,
}

impl Checker<'_> {
    /// An error at `span`, about `field`.
    pub(crate) fn err(
        &self,
        span: Range<usize>,
        field: &str,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.source.to_path_buf(),
            location: Some(locate(self.text, span.start)),
            field: Some(field.to_owned()),
            message: message.into(),
        }
    }

    /// The 1-based line of byte `offset`, to refer to an earlier definition in a message.
    pub(crate) fn line(&self, offset: usize) -> usize {
        locate(self.text, offset).line
    }

    /// An integer in `range`, `default` when absent.
    fn int<T: TryFrom<i64>>(
        &self,
        value: Option<&SpannedInt>,
        field: &str,
        default: T,
        range: RangeInclusive<i64>,
    ) -> Result<T> {
        let Some(value) = value else {
            return Ok(default);
        };
        let n = *value.get_ref();
        let out_of_range = || {
            self.err(
                value.span(),
                field,
                format!(
                    "{n} is out of range: allowed {} to {}",
                    range.start(),
                    range.end()
                ),
            )
        };
        if !range.contains(&n) {
            return Err(out_of_range());
        }
        T::try_from(n).map_err(|_| out_of_range())
    }

    /// A humantime duration ("500ms", "5s", "1m") greater than zero and at most
    /// [`MAX_DURATION`], `default` when absent.
    pub(crate) fn duration(
        &self,
        value: Option<&SpannedStr>,
        field: &str,
        default: Duration,
    ) -> Result<Duration> {
        let Some(value) = value else {
            return Ok(default);
        };
        let text = value.get_ref().trim();
        match humantime::parse_duration(text) {
            Ok(d) if d.is_zero() => Err(self.err(
                value.span(),
                field,
                format!("\"{text}\" is zero; a duration must be greater than zero, such as \"5s\""),
            )),
            Ok(d) if d > MAX_DURATION => Err(self.err(
                value.span(),
                field,
                format!(
                    "\"{text}\" is longer than a day (24h), the longest duration kakehi takes"
                ),
            )),
            Ok(d) => Ok(d),
            Err(e) => Err(self.err(
                value.span(),
                field,
                format!(
                    "\"{text}\" is not a duration ({e}); expected a number and a unit such as \"500ms\", \"5s\" or \"1m\""
                ),
            )),
        }
    }

    /// An `IP:PORT` socket address.
    pub(crate) fn socket_addr(&self, value: &SpannedStr, field: &str) -> Result<SocketAddr> {
        let text = value.get_ref();
        text.trim().parse().map_err(|_| {
            self.err(
                value.span(),
                field,
                format!(
                    "\"{text}\" is not a socket address: expected IP:PORT such as 127.0.0.1:8080 (or [::1]:8080); host names are not resolved"
                ),
            )
        })
    }

    /// A non-empty path, joined to the config file's directory when relative.
    fn path(&self, value: &SpannedStr, field: &str) -> Result<PathBuf> {
        let text = value.get_ref();
        if text.trim().is_empty() {
            return Err(self.err(value.span(), field, "the path is empty"));
        }
        let path = Path::new(text);
        Ok(if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        })
    }

    fn command_socket(&self, value: Option<&SpannedStr>) -> Result<PathBuf> {
        let Some(value) = value else {
            return Ok(PathBuf::from(DEFAULT_COMMAND_SOCKET));
        };
        let path = self.path(value, "command_socket")?;
        let len = path.as_os_str().len();
        if len > MAX_UNIX_SOCKET_PATH {
            return Err(self.err(
                value.span(),
                "command_socket",
                format!(
                    "{} is {len} bytes long; a unix socket path may have at most {MAX_UNIX_SOCKET_PATH}: choose a shorter one",
                    path.display()
                ),
            ));
        }
        Ok(path)
    }

    /// `user` or `group`: a non-empty name without spaces.
    fn account(&self, value: Option<&SpannedStr>, field: &str) -> Result<Option<String>> {
        let Some(value) = value else {
            return Ok(None);
        };
        let name = value.get_ref();
        if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == ':') {
            return Err(self.err(
                value.span(),
                field,
                format!("\"{name}\" is not an account name: expected a name such as \"kakehi\""),
            ));
        }
        Ok(Some(name.clone()))
    }

    fn timeouts(&self, t: FileTimeouts) -> Result<Timeouts> {
        let secs = Duration::from_secs;
        Ok(Timeouts {
            connect: self.duration(t.connect.as_ref(), "timeouts.connect", secs(3))?,
            request_header: self.duration(
                t.request_header.as_ref(),
                "timeouts.request_header",
                secs(10),
            )?,
            front_idle: self.duration(t.front_idle.as_ref(), "timeouts.front_idle", secs(60))?,
            back_idle: self.duration(t.back_idle.as_ref(), "timeouts.back_idle", secs(30))?,
            drain: self.duration(t.drain.as_ref(), "timeouts.drain", secs(10))?,
        })
    }

    fn access_log(&self, a: FileAccessLog) -> Result<AccessLog> {
        let format = match a.format.map(Spanned::into_inner) {
            Some(FileLogFormat::Logfmt) | None => LogFormat::Logfmt,
            Some(FileLogFormat::Json) => LogFormat::Json,
        };
        let target = match &a.target {
            None => LogTarget::Stdout,
            Some(t) if t.get_ref() == "stdout" => LogTarget::Stdout,
            Some(t) if t.get_ref() == "off" => LogTarget::Off,
            Some(t) => LogTarget::File(self.path(t, "access_log.target").map_err(|_| {
                self.err(
                    t.span(),
                    "access_log.target",
                    "the target is empty: expected \"stdout\", \"off\" or a file path",
                )
            })?),
        };
        Ok(AccessLog { format, target })
    }

    fn listeners(&self, items: &[Spanned<FileListener>]) -> Result<Vec<Listener>> {
        let mut out: Vec<Listener> = Vec::with_capacity(items.len());
        let mut lines = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let field = format!("listeners[{i}]");
            let l = item.get_ref();
            let address_field = format!("{field}.address");
            let address = self.socket_addr(&l.address, &address_field)?;
            let mut earlier = out.iter().zip(&lines).enumerate();
            if let Some((j, (_, line))) = earlier.find(|(_, (o, _))| o.address == address) {
                return Err(self.err(
                    l.address.span(),
                    &address_field,
                    format!(
                        "{address} is already the address of listeners[{j}] (line {line}); each listener needs its own address"
                    ),
                ));
            }
            let protocol = match l.protocol.as_ref().map(|p| *p.get_ref()) {
                Some(FileListenerProtocol::Http) | None => ListenerProtocol::Http,
                Some(FileListenerProtocol::Https) => ListenerProtocol::Https,
                Some(FileListenerProtocol::Tcp) => ListenerProtocol::Tcp,
            };
            let certificates = self.certificates(item, &field, protocol)?;
            lines.push(self.line(l.address.span().start));
            out.push(Listener {
                address,
                protocol,
                certificates,
                accept_proxy: l.accept_proxy.unwrap_or(false),
            });
        }
        Ok(out)
    }

    fn certificates(
        &self,
        listener: &Spanned<FileListener>,
        field: &str,
        protocol: ListenerProtocol,
    ) -> Result<Vec<Certificate>> {
        let field = format!("{field}.certificates");
        let certs: &[Spanned<FileCertificate>] = match &listener.get_ref().certificates {
            Some(c) => c.get_ref(),
            None => &[],
        };
        let span = match &listener.get_ref().certificates {
            Some(c) => c.span(),
            None => listener.span(),
        };
        if protocol == ListenerProtocol::Https && certs.is_empty() {
            return Err(self.err(
                span,
                &field,
                "an https listener needs at least one certificate: certificates = [ { certificate = \"site.pem\", key = \"site.key\" } ]",
            ));
        }
        if protocol != ListenerProtocol::Https && !certs.is_empty() {
            let name = if protocol == ListenerProtocol::Tcp {
                "tcp"
            } else {
                "http"
            };
            return Err(self.err(
                span,
                &field,
                format!("certificates only apply to https listeners and this one is {name}: set protocol = \"https\" or remove them"),
            ));
        }
        let mut out: Vec<Certificate> = Vec::with_capacity(certs.len());
        for (i, item) in certs.iter().enumerate() {
            let field = format!("{field}[{i}]");
            let cert = self.certificate(item, &field)?;
            if let Some(j) = out.iter().position(|o| o.fingerprint == cert.fingerprint) {
                return Err(self.err(
                    item.span(),
                    &field,
                    format!("the same certificate as certificates[{j}]: list it once"),
                ));
            }
            out.push(cert);
        }
        Ok(out)
    }

    /// Reads (when given by path) and checks one certificate and its key. Files are checked
    /// for expiry; PEM text given inline is the running state's, admitted earlier (a
    /// certificate that expires while lbd runs must not stop a worker from restarting).
    fn certificate(&self, item: &Spanned<FileCertificate>, field: &str) -> Result<Certificate> {
        let c = item.get_ref();
        let path = |value: &Option<SpannedStr>, key: &str| -> Result<Option<PathBuf>> {
            value
                .as_ref()
                .map(|v| self.path(v, &format!("{field}.{key}")))
                .transpose()
        };
        let cert_path = path(&c.certificate, "certificate")?;
        let key_path = path(&c.key, "key")?;
        let read = |value: &Option<SpannedStr>,
                    path: &Option<PathBuf>,
                    key: &str|
         -> Result<(String, bool)> {
            if let Some(pem) = value {
                return Ok((pem.get_ref().clone(), false));
            }
            let Some(path) = path else {
                return Err(self.err(
                    item.span(),
                    field,
                    format!(
                        "{key} is missing: {{ certificate = \"site.pem\", key = \"site.key\" }}"
                    ),
                ));
            };
            std::fs::read_to_string(path)
                .map(|text| (text, true))
                .map_err(|e| {
                    self.err(
                        item.span(),
                        &format!("{field}.{key}"),
                        format!("cannot read {}: {e}", path.display()),
                    )
                })
        };
        let (chain, chain_from_file) = read(&c.certificate_pem, &cert_path, "certificate")?;
        let (key, key_from_file) = read(&c.key_pem, &key_path, "key")?;
        let now = (chain_from_file || key_from_file).then(crate::certs::unix_now);
        let shown = cert_path
            .as_ref()
            .map_or_else(|| "the certificate".to_owned(), |p| p.display().to_string());
        crate::certs::check(&chain, &key, cert_path.clone(), now)
            .map_err(|e| self.err(item.span(), field, format!("{shown}: {e}")))
    }

    fn clusters(
        &self,
        clusters: &BTreeMap<SpannedStr, Spanned<FileCluster>>,
        listeners: &[Listener],
    ) -> Result<Vec<Cluster>> {
        let mut frontends = FrontendChecker::new(self, listeners);
        let mut out = Vec::with_capacity(clusters.len());
        for (name, cluster) in clusters {
            let field = join_key("clusters", name.get_ref());
            let valid_name = !name.get_ref().is_empty()
                && name.get_ref().len() <= 64
                && name
                    .get_ref()
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !valid_name {
                return Err(self.err(
                    name.span(),
                    &field,
                    "a cluster name is 1 to 64 letters, digits, '-' or '_'",
                ));
            }
            let file = cluster.get_ref();
            let protocol = match file.protocol.as_ref().map(|p| *p.get_ref()) {
                Some(FileClusterProtocol::Http) | None => ClusterProtocol::Http,
                Some(FileClusterProtocol::Tcp) => ClusterProtocol::Tcp,
            };
            let load_balancing = match file.load_balancing.as_ref().map(|p| *p.get_ref()) {
                Some(FileLoadBalancing::RoundRobin) | None => LoadBalancing::RoundRobin,
                Some(FileLoadBalancing::Random) => LoadBalancing::Random,
                Some(FileLoadBalancing::LeastConnections) => LoadBalancing::LeastConnections,
                Some(FileLoadBalancing::PowerOfTwo) => LoadBalancing::PowerOfTwo,
            };
            let fronts = file.frontends.as_deref().unwrap_or_default();
            let fronts = fronts
                .iter()
                .enumerate()
                .map(|(i, f)| frontends.check(f, &format!("{field}.frontends[{i}]"), protocol))
                .collect::<Result<Vec<_>>>()?;
            let backends = self.backends(name, file, &field)?;
            let health_check = match &file.health_check {
                Some(h) => Some(self.health_check(h.get_ref(), &format!("{field}.health_check"))?),
                None => None,
            };
            out.push(Cluster {
                name: name.get_ref().clone(),
                protocol,
                load_balancing,
                frontends: fronts,
                backends,
                health_check,
                send_proxy: file.send_proxy.unwrap_or(false),
            });
        }
        Ok(out)
    }

    fn backends(
        &self,
        name: &SpannedStr,
        cluster: &FileCluster,
        field: &str,
    ) -> Result<Vec<Backend>> {
        let field = format!("{field}.backends");
        let no_backends = || {
            format!(
                "cluster {} has no backends: add backends = [ {{ address = \"127.0.0.1:9001\" }} ]",
                name.get_ref()
            )
        };
        let Some(items) = &cluster.backends else {
            return Err(self.err(name.span(), &field, no_backends()));
        };
        if items.get_ref().is_empty() {
            return Err(self.err(items.span(), &field, no_backends()));
        }
        let mut out: Vec<Backend> = Vec::with_capacity(items.get_ref().len());
        for (i, item) in items.get_ref().iter().enumerate() {
            let b = item.get_ref();
            let address_field = format!("{field}[{i}].address");
            let address = self.socket_addr(&b.address, &address_field)?;
            if address.port() == 0 {
                return Err(self.err(
                    b.address.span(),
                    &address_field,
                    format!("{address} has port 0; a backend needs the port it listens on"),
                ));
            }
            if let Some(j) = out.iter().position(|o| o.address == address) {
                return Err(self.err(
                    b.address.span(),
                    &address_field,
                    format!(
                        "{address} is already {field}[{j}]; list each backend once and use weight to give it more traffic"
                    ),
                ));
            }
            out.push(Backend {
                address,
                weight: self.int(
                    b.weight.as_ref(),
                    &format!("{field}[{i}].weight"),
                    1,
                    1..=1000,
                )?,
                backup: b.backup.unwrap_or(false),
                draining: b.draining.unwrap_or(false),
            });
        }
        Ok(out)
    }

    /// The method, status range and Host of an HTTP health check (which only a check with a
    /// path is).
    fn health_http(
        &self,
        h: &FileHealthCheck,
        field: &str,
        http: bool,
    ) -> Result<(String, (u16, u16), Option<String>)> {
        for (key, value) in [
            ("method", &h.method),
            ("status", &h.status),
            ("host", &h.host),
        ] {
            if let (Some(v), false) = (value, http) {
                return Err(self.err(
                    v.span(),
                    &format!("{field}.{key}"),
                    format!("{key} applies to HTTP checks: give a path too (without one the check is a TCP connect)"),
                ));
            }
        }
        let method = match &h.method {
            None => "GET".to_string(),
            Some(m) => {
                let upper = m.get_ref().to_ascii_uppercase();
                if upper.is_empty()
                    || upper.len() > 20
                    || !upper.bytes().all(|b| b.is_ascii_uppercase())
                {
                    return Err(self.err(
                        m.span(),
                        &format!("{field}.method"),
                        format!(
                            "\"{}\" is not a request method: expected a word such as \"GET\" or \"HEAD\"",
                            m.get_ref()
                        ),
                    ));
                }
                upper
            }
        };
        let status = match &h.status {
            None => (200, 399),
            Some(s) => {
                let text = s.get_ref().trim();
                let (lo, hi) = text.split_once('-').unwrap_or((text, text));
                let parsed = lo
                    .trim()
                    .parse::<u16>()
                    .ok()
                    .zip(hi.trim().parse::<u16>().ok());
                match parsed {
                    Some((lo, hi)) if (100..=599).contains(&lo) && (lo..=599).contains(&hi) => {
                        (lo, hi)
                    }
                    _ => {
                        return Err(self.err(
                            s.span(),
                            &format!("{field}.status"),
                            format!(
                                "\"{}\" is not a status or a range of statuses: expected e.g. \"200\" or \"200-399\" (100 to 599)",
                                s.get_ref()
                            ),
                        ))
                    }
                }
            }
        };
        let host = match &h.host {
            None => None,
            Some(v) => {
                let valid = !v.get_ref().is_empty()
                    && v.get_ref().len() <= 255
                    && v.get_ref()
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b));
                if !valid {
                    return Err(self.err(
                        v.span(),
                        &format!("{field}.host"),
                        format!(
                            "{:?} is not a host name: expected e.g. \"app.example.com\" or \"app.example.com:8080\"",
                            v.get_ref()
                        ),
                    ));
                }
                Some(v.get_ref().clone())
            }
        };
        Ok((method, status, host))
    }

    fn health_check(&self, h: &FileHealthCheck, field: &str) -> Result<HealthCheck> {
        let path = match &h.path {
            None => None,
            Some(p) if p.get_ref().starts_with('/') && !has_space_or_control(p.get_ref()) => {
                Some(p.get_ref().clone())
            }
            Some(p) if p.get_ref().starts_with('/') => {
                return Err(self.err(
                    p.span(),
                    &format!("{field}.path"),
                    format!(
                        "{:?} holds a space or a control character: write them %-encoded (%20)",
                        p.get_ref()
                    ),
                ))
            }
            Some(p) => {
                return Err(self.err(
                    p.span(),
                    &format!("{field}.path"),
                    format!(
                        "\"{}\" does not start with '/': expected a request path such as \"/health\" (or no path for a TCP connect check)",
                        p.get_ref()
                    ),
                ))
            }
        };
        let interval_field = format!("{field}.interval");
        let timeout_field = format!("{field}.timeout");
        let interval =
            self.duration(h.interval.as_ref(), &interval_field, Duration::from_secs(5))?;
        let timeout = self.duration(h.timeout.as_ref(), &timeout_field, Duration::from_secs(1))?;
        if timeout > interval {
            let (span, name) = match (&h.timeout, &h.interval) {
                (Some(t), _) => (t.span(), timeout_field),
                (None, Some(i)) => (i.span(), interval_field),
                (None, None) => (0..0, timeout_field),
            };
            return Err(self.err(
                span,
                &name,
                format!(
                    "the timeout ({}) is longer than the interval ({}); a probe must end before the next one starts",
                    humantime::format_duration(timeout),
                    humantime::format_duration(interval)
                ),
            ));
        }
        let (method, status, host) = self.health_http(h, field, path.is_some())?;
        Ok(HealthCheck {
            path,
            method,
            status,
            host,
            interval,
            timeout,
            rise: self.int(h.rise.as_ref(), &format!("{field}.rise"), 2, 1..=100)?,
            fall: self.int(h.fall.as_ref(), &format!("{field}.fall"), 3, 1..=100)?,
        })
    }
}

/// A space or a control character: what cannot go into a request line as is.
fn has_space_or_control(text: &str) -> bool {
    text.chars().any(|c| c.is_whitespace() || c.is_control())
}
