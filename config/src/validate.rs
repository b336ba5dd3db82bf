//! Turns the config document ([`State`]: the file's keys as plain values) into the immutable
//! `model::Config`.
//!
//! This module owns the defaults, the ranges and every check that spans more than one value:
//! listener addresses are unique, an https listener has certificates, every cluster has
//! backends, backend addresses are unique within a cluster. Frontends (hostnames, paths, methods,
//! their listener and their uniqueness) are checked in `routes.rs`. The first failed check is
//! returned as a `ConfigError` naming the offending field, and placed at its line when the document
//! came from a text ([`Places`]). The only files read are
//! the certificates and keys an https listener names by path (checked by `certs.rs`); relative
//! paths are joined to the config file's directory. Nothing here touches the network.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{join_key, ConfigError, Places};
use crate::model::{
    AccessLog, Backend, Certificate, Cluster, ClusterProtocol, Config, H2Limits, HealthCheck,
    Listener, ListenerProtocol, LoadBalancing, LogFormat, LogTarget, Metrics, Rate, Steering,
    SteeringPolicy, Timeouts,
};
use crate::routes::FrontendChecker;
use crate::state::{
    AccessLogDef, BackendDef, CertificateDef, ClusterDef, ClusterProtocolDef, H2Def,
    HealthCheckDef, ListenerDef, ListenerProtocolDef, LoadBalancingDef, LogFormatDef, RateDef,
    State, SteeringDef, SteeringPolicyDef, TimeoutsDef,
};
use crate::DEFAULT_COMMAND_SOCKET;

pub(crate) type Result<T> = std::result::Result<T, ConfigError>;

/// A unix socket path must fit `sockaddr_un.sun_path` (108 bytes with its NUL).
const MAX_UNIX_SOCKET_PATH: usize = 107;

/// The longest duration any setting takes: a day is more than any timeout or probe interval
/// needs, and far below what would overflow `Instant + Duration` (a panic) in the data path
/// or the health checker.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);

/// Validates the document `file` as the config file at `source` (errors name it, relative
/// paths resolve against its directory); `places` puts lines on the errors.
pub(crate) fn validate(file: &State, places: &Places<'_>, source: &Path) -> Result<Config> {
    let absolute = std::path::absolute(source).unwrap_or_else(|_| source.to_path_buf());
    let base_dir = absolute.parent().map(Path::to_path_buf).unwrap_or_default();
    let c = Checker {
        places,
        source,
        base_dir,
    };

    let workers = c.int(file.workers, "workers", 1, 1..=64)?;
    let max_connections = c.int(
        file.max_connections,
        "max_connections",
        10_000,
        1..=i64::from(u32::MAX),
    )?;
    let command_socket = c.command_socket(file.command_socket.as_ref())?;
    let steering = match file.steering {
        Some(SteeringDef::Ebpf) | None => Steering::Ebpf,
        Some(SteeringDef::Kernel) => Steering::Kernel,
    };
    let steering_policy = match file.steering_policy {
        Some(SteeringPolicyDef::FlowHash) | None => SteeringPolicy::FlowHash,
        Some(SteeringPolicyDef::LeastConnections) => SteeringPolicy::LeastConnections,
        Some(SteeringPolicyDef::PowerOfTwo) => SteeringPolicy::PowerOfTwo,
    };
    let user = c.account(file.user.as_ref(), "user")?;
    let group = c.account(file.group.as_ref(), "group")?;
    let buffer_size = c.int(file.buffer_size, "buffer_size", 16_384, 4_096..=1_048_576)?;
    let max_request_body = c.int(
        file.max_request_body,
        "max_request_body",
        0u64,
        0..=i64::MAX,
    )?;
    let timeouts = c.timeouts(&file.timeouts.clone().unwrap_or_default())?;
    let access_log = c.access_log(&file.access_log.clone().unwrap_or_default())?;
    let listeners = c.listeners(&file.listeners)?;
    if steering == Steering::Kernel {
        let limited = listeners.iter().enumerate().find_map(|(i, l)| {
            if l.max_connections_per_ip != 0 {
                Some(format!("listeners[{i}].max_connections_per_ip"))
            } else if l.max_connection_rate_per_ip != 0 {
                Some(format!("listeners[{i}].max_connection_rate_per_ip"))
            } else {
                None
            }
        });
        if let Some(field) = limited {
            return Err(c.err(
                &field,
                "per-client limits are enforced by the eBPF steering program: they need \
                 steering = \"ebpf\" (the default), and steering is \"kernel\"",
            ));
        }
    }
    let metrics = match &file.metrics {
        None => None,
        Some(m) => {
            let address = c.socket_addr(&m.address, "metrics.address")?;
            if listeners.iter().any(|l| l.address == address) {
                return Err(c.err(
                    "metrics.address",
                    format!("{address} is also a listener's address; give metrics its own port"),
                ));
            }
            Some(Metrics { address })
        }
    };
    let sync = match &file.sync {
        None => None,
        Some(s) => Some(c.sync(s)?),
    };
    let bgp = match &file.bgp {
        None => None,
        Some(b) => Some(c.bgp(b)?),
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
        sync,
        bgp,
        listeners,
        clusters,
    })
}

/// What every check needs to build an error or resolve a path.
pub(crate) struct Checker<'a> {
    places: &'a Places<'a>,
    source: &'a Path,
    base_dir: PathBuf,
}

impl Checker<'_> {
    /// `[bgp]`: the VIP, this router's AS and id, its neighbours, and bird's files.
    fn bgp(&self, b: &crate::state::BgpDef) -> Result<crate::model::Bgp> {
        let ip = |text: &str, field: &str| {
            text.trim()
                .parse::<std::net::IpAddr>()
                .map_err(|_| self.err(field, format!("\"{text}\" is not an IP address")))
        };
        let asn = |n: i64, field: &str| {
            u32::try_from(n)
                .ok()
                .filter(|&a| a > 0)
                .ok_or_else(|| self.err(field, format!("{n} is not an AS number: 1 to 4294967295")))
        };
        let vip = ip(&b.vip, "bgp.vip")?;
        let local_as = asn(b.local_as, "bgp.local_as")?;
        let router_id = match ip(&b.router_id, "bgp.router_id")? {
            std::net::IpAddr::V4(v4) => v4,
            std::net::IpAddr::V6(_) => {
                return Err(self.err("bgp.router_id", "a router id is an IPv4 address"))
            }
        };
        if b.peers.is_empty() {
            return Err(self.err(
                "bgp.peers",
                "no peer: give at least one, such as [ { address = \"10.0.0.1\", as = 65000 } ]",
            ));
        }
        let mut peers = Vec::new();
        for (i, p) in b.peers.iter().enumerate() {
            peers.push((
                ip(&p.address, &format!("bgp.peers[{i}].address"))?,
                asn(p.asn, &format!("bgp.peers[{i}].as"))?,
            ));
        }
        Ok(crate::model::Bgp {
            vip,
            local_as,
            router_id,
            peers,
            bird_socket: self.path(
                b.bird_socket.as_deref().unwrap_or("/run/bird/bird.ctl"),
                "bgp.bird_socket",
            )?,
            bird_config: self.path(&b.bird_config, "bgp.bird_config")?,
        })
    }

    /// `[sync]`: etcd's client URLs, the key prefix, this appliance's name.
    fn sync(&self, s: &crate::state::SyncDef) -> Result<crate::model::Sync> {
        if s.etcd.is_empty() {
            return Err(self.err(
                "sync.etcd",
                "no etcd member: give at least one client URL, such as [\"http://10.0.0.5:2379\"]",
            ));
        }
        let mut etcd = Vec::new();
        for url in &s.etcd {
            let text = url.trim();
            let Some(rest) = text.strip_prefix("http://") else {
                return Err(self.err(
                    "sync.etcd",
                    format!(
                        "\"{text}\" is not an http:// URL: kakehi speaks to etcd's client port over plain HTTP (http://IP:PORT)"
                    ),
                ));
            };
            etcd.push(self.socket_addr(rest.trim_end_matches('/'), "sync.etcd")?);
        }
        let prefix = s.prefix.as_deref().unwrap_or("/kakehi").trim();
        if !prefix.starts_with('/')
            || prefix.len() < 2
            || prefix.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(self.err(
                "sync.prefix",
                format!(
                    "\"{prefix}\" is not a key prefix: expected a path such as \"/kakehi/prod\""
                ),
            ));
        }
        let name = match &s.name {
            Some(n) => n.trim().to_string(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_default(),
        };
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_');
        if name.is_empty() || name.len() > 64 || !name.chars().all(allowed) {
            return Err(self.err_near(
                if s.name.is_some() { "sync.name" } else { "sync" },
                "sync.name",
                format!(
                    "\"{name}\" is not an appliance name: 1 to 64 letters, digits, '.', '-' or '_' (the default is the host name)"
                ),
            ));
        }
        Ok(crate::model::Sync {
            etcd,
            prefix: prefix.trim_end_matches('/').to_string(),
            name,
        })
    }

    /// An error about `field`, placed where it is written.
    pub(crate) fn err(&self, field: &str, message: impl Into<String>) -> ConfigError {
        self.err_near(field, field, message)
    }

    /// An error about `field`, placed where `place` is written (a key that is absent is
    /// better shown at the one that makes it needed).
    pub(crate) fn err_near(
        &self,
        place: &str,
        field: &str,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError::Invalid {
            file: self.source.to_path_buf(),
            location: self.places.locate(place),
            field: Some(field.to_owned()),
            message: message.into(),
        }
    }

    /// ` (line N)` where `field` is written, to refer to an earlier definition in a message;
    /// nothing when the document has no text.
    pub(crate) fn at_line(&self, field: &str) -> String {
        self.places
            .locate(field)
            .map_or_else(String::new, |l| format!(" (line {})", l.line))
    }

    /// An integer in `range`, `default` when absent.
    fn int<T: TryFrom<i64>>(
        &self,
        value: Option<i64>,
        field: &str,
        default: T,
        range: RangeInclusive<i64>,
    ) -> Result<T> {
        let Some(n) = value else {
            return Ok(default);
        };
        let out_of_range = || {
            self.err(
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
        value: Option<&String>,
        field: &str,
        default: Duration,
    ) -> Result<Duration> {
        let Some(value) = value else {
            return Ok(default);
        };
        let text = value.trim();
        match humantime::parse_duration(text) {
            Ok(d) if d.is_zero() => Err(self.err(
                field,
                format!("\"{text}\" is zero; a duration must be greater than zero, such as \"5s\""),
            )),
            Ok(d) if d > MAX_DURATION => Err(self.err(
                field,
                format!(
                    "\"{text}\" is longer than a day (24h), the longest duration kakehi takes"
                ),
            )),
            Ok(d) => Ok(d),
            Err(e) => Err(self.err(
                field,
                format!(
                    "\"{text}\" is not a duration ({e}); expected a number and a unit such as \"500ms\", \"5s\" or \"1m\""
                ),
            )),
        }
    }

    /// An `IP:PORT` socket address.
    pub(crate) fn socket_addr(&self, text: &str, field: &str) -> Result<SocketAddr> {
        text.trim().parse().map_err(|_| {
            self.err(
                field,
                format!(
                    "\"{text}\" is not a socket address: expected IP:PORT such as 127.0.0.1:8080 (or [::1]:8080); host names are not resolved"
                ),
            )
        })
    }

    /// A non-empty path, joined to the config file's directory when relative.
    fn path(&self, text: &str, field: &str) -> Result<PathBuf> {
        if text.trim().is_empty() {
            return Err(self.err(field, "the path is empty"));
        }
        let path = Path::new(text);
        Ok(if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.base_dir.join(path)
        })
    }

    fn command_socket(&self, value: Option<&String>) -> Result<PathBuf> {
        let Some(value) = value else {
            return Ok(PathBuf::from(DEFAULT_COMMAND_SOCKET));
        };
        let path = self.path(value, "command_socket")?;
        let len = path.as_os_str().len();
        if len > MAX_UNIX_SOCKET_PATH {
            return Err(self.err(
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
    fn account(&self, value: Option<&String>, field: &str) -> Result<Option<String>> {
        let Some(name) = value else {
            return Ok(None);
        };
        if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c == ':') {
            return Err(self.err(
                field,
                format!("\"{name}\" is not an account name: expected a name such as \"kakehi\""),
            ));
        }
        Ok(Some(name.clone()))
    }

    fn timeouts(&self, t: &TimeoutsDef) -> Result<Timeouts> {
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

    fn access_log(&self, a: &AccessLogDef) -> Result<AccessLog> {
        let format = match a.format {
            Some(LogFormatDef::Logfmt) | None => LogFormat::Logfmt,
            Some(LogFormatDef::Json) => LogFormat::Json,
        };
        let target = match &a.target {
            None => LogTarget::Stdout,
            Some(t) if t == "stdout" => LogTarget::Stdout,
            Some(t) if t == "off" => LogTarget::Off,
            Some(t) => LogTarget::File(self.path(t, "access_log.target").map_err(|_| {
                self.err(
                    "access_log.target",
                    "the target is empty: expected \"stdout\", \"off\" or a file path",
                )
            })?),
        };
        Ok(AccessLog { format, target })
    }

    fn listeners(&self, items: &[ListenerDef]) -> Result<Vec<Listener>> {
        let mut out: Vec<Listener> = Vec::with_capacity(items.len());
        for (i, l) in items.iter().enumerate() {
            let field = format!("listeners[{i}]");
            let address_field = format!("{field}.address");
            let address = self.socket_addr(&l.address, &address_field)?;
            if let Some(j) = out.iter().position(|o| o.address == address) {
                let at = self.at_line(&format!("listeners[{j}].address"));
                return Err(self.err(
                    &address_field,
                    format!(
                        "{address} is already the address of listeners[{j}]{at}; each listener needs its own address"
                    ),
                ));
            }
            let protocol = match l.protocol {
                Some(ListenerProtocolDef::Http) | None => ListenerProtocol::Http,
                Some(ListenerProtocolDef::Https) => ListenerProtocol::Https,
                Some(ListenerProtocolDef::Tcp) => ListenerProtocol::Tcp,
            };
            let certificates = self.certificates(l, &field, protocol)?;
            let http2 = self.alpn(l.alpn.as_deref(), &format!("{field}.alpn"), protocol)?;
            let h2 = self.h2_limits(l.h2.as_ref(), &format!("{field}.h2"), protocol)?;
            let max_connections_per_ip = self.int(
                l.max_connections_per_ip,
                &format!("{field}.max_connections_per_ip"),
                0,
                1..=1_000_000,
            )?;
            let rate_field = format!("{field}.max_connection_rate_per_ip");
            let max_connection_rate_per_ip = match &l.max_connection_rate_per_ip {
                None => 0,
                Some(text) => self.per_second(text, &rate_field)?,
            };
            let client_auth = self.client_auth(l, &field, protocol)?;
            out.push(Listener {
                address,
                protocol,
                certificates,
                accept_proxy: l.accept_proxy.unwrap_or(false),
                http2,
                h2,
                max_connections_per_ip,
                max_connection_rate_per_ip,
                client_auth,
            });
        }
        Ok(out)
    }

    /// A listener's `client_ca` (or `client_ca_pem`) and `client_auth`.
    fn client_auth(
        &self,
        l: &ListenerDef,
        field: &str,
        protocol: ListenerProtocol,
    ) -> Result<Option<crate::model::ClientAuth>> {
        let ca_field = format!("{field}.client_ca");
        let pem = self.pem_text(&l.client_ca_pem, &l.client_ca, &ca_field)?;
        let Some(pem) = pem else {
            if l.client_crl.is_some() || l.client_crl_pem.is_some() {
                return Err(self.err(
                    &format!("{field}.client_crl"),
                    "client_crl needs client_ca = \"ca.pem\", the CA whose revoked certificates it lists",
                ));
            }
            if l.client_auth.is_some() {
                return Err(self.err(
                    &format!("{field}.client_auth"),
                    "client_auth needs client_ca = \"ca.pem\", the CA that signs the client certificates",
                ));
            }
            return Ok(None);
        };
        if protocol != ListenerProtocol::Https {
            return Err(self.err(
                &ca_field,
                "client certificates are asked for in the TLS handshake: client_ca only applies to https listeners",
            ));
        }
        let roots = crate::certs::ca_roots(&pem).map_err(|e| self.err(&ca_field, e))?;
        let crl_field = format!("{field}.client_crl");
        let crl_pem = self.pem_text(&l.client_crl_pem, &l.client_crl, &crl_field)?;
        let crls = match crl_pem {
            Some(pem) => crate::certs::crls(&pem).map_err(|e| self.err(&crl_field, e))?,
            None => Vec::new(),
        };
        Ok(Some(crate::model::ClientAuth {
            roots,
            required: l.client_auth != Some(crate::state::ClientAuthDef::Optional),
            crls,
        }))
    }

    /// PEM given as text (`..._pem`, as `state save` writes it) or as a file (resolved
    /// against the config's folder), for `field`; None when neither is set.
    fn pem_text(
        &self,
        text: &Option<String>,
        file: &Option<String>,
        field: &str,
    ) -> Result<Option<String>> {
        match (text, file) {
            (Some(pem), _) => Ok(Some(pem.clone())),
            (None, Some(path)) => {
                let path = self.path(path, field)?;
                std::fs::read_to_string(&path)
                    .map(Some)
                    .map_err(|e| self.err(field, format!("cannot read {}: {e}", path.display())))
            }
            (None, None) => Ok(None),
        }
    }

    /// A rate written `"R/s"`: R per second, 1 to 1,000,000.
    pub(crate) fn per_second(&self, text: &str, field: &str) -> Result<u32> {
        let bad = || {
            self.err(
                field,
                format!("{text:?} is not a rate: write \"R/s\", R per second from 1 to 1000000 (e.g. \"20/s\")"),
            )
        };
        let count = text.trim().strip_suffix("/s").ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        if !(1..=1_000_000).contains(&count) {
            return Err(bad());
        }
        Ok(count)
    }

    /// A listener's `h2 = { ... }` limits.
    fn h2_limits(
        &self,
        def: Option<&H2Def>,
        field: &str,
        protocol: ListenerProtocol,
    ) -> Result<H2Limits> {
        let d = H2Limits::default();
        let Some(def) = def else {
            return Ok(d);
        };
        if protocol == ListenerProtocol::Tcp {
            return Err(self.err(field, "a tcp listener does not speak HTTP/2"));
        }
        Ok(H2Limits {
            max_concurrent_streams: self.int(
                def.max_concurrent_streams,
                &format!("{field}.max_concurrent_streams"),
                d.max_concurrent_streams,
                1..=1000,
            )?,
            max_header_list_size: self.int(
                def.max_header_list_size,
                &format!("{field}.max_header_list_size"),
                d.max_header_list_size,
                1024..=1_048_576,
            )?,
            connection_window: self.int(
                def.connection_window,
                &format!("{field}.connection_window"),
                d.connection_window,
                65_535..=(1 << 30),
            )?,
            client_resets: self.rate(
                def.client_resets.as_ref(),
                field,
                "client_resets",
                d.client_resets,
            )?,
            own_resets: self.rate(def.own_resets.as_ref(), field, "own_resets", d.own_resets)?,
            pings: self.rate(def.pings.as_ref(), field, "pings", d.pings)?,
            settings: self.rate(def.settings.as_ref(), field, "settings", d.settings)?,
            noise: self.rate(def.noise.as_ref(), field, "noise", d.noise)?,
            window_updates: self.rate(
                def.window_updates.as_ref(),
                field,
                "window_updates",
                d.window_updates,
            )?,
        })
    }

    /// One of the `h2` table's rate budgets, `{ burst, per_second }`; each key absent takes
    /// its default.
    fn rate(&self, def: Option<&RateDef>, field: &str, name: &str, d: Rate) -> Result<Rate> {
        let Some(def) = def else {
            return Ok(d);
        };
        Ok(Rate {
            burst: self.int(
                def.burst,
                &format!("{field}.{name}.burst"),
                d.burst,
                1..=1_000_000,
            )?,
            per_second: self.int(
                def.per_second,
                &format!("{field}.{name}.per_second"),
                d.per_second,
                1..=1_000_000,
            )?,
        })
    }

    /// A listener's `alpn` list: whether it serves HTTP/2.
    fn alpn(
        &self,
        alpn: Option<&[String]>,
        field: &str,
        protocol: ListenerProtocol,
    ) -> Result<bool> {
        let Some(list) = alpn else {
            return Ok(protocol != ListenerProtocol::Tcp);
        };
        if protocol == ListenerProtocol::Tcp {
            return Err(self.err(field, "a tcp listener has no application protocols"));
        }
        if list.is_empty() {
            return Err(self.err(
                field,
                "the list is empty: expected \"h2\", \"http/1.1\" or both",
            ));
        }
        for (i, name) in list.iter().enumerate() {
            if name != "h2" && name != "http/1.1" {
                return Err(self.err(
                    field,
                    format!(
                        "{name:?} is not a protocol kakehi serves: expected \"h2\" or \"http/1.1\""
                    ),
                ));
            }
            if list.iter().take(i).any(|n| n == name) {
                return Err(self.err(field, format!("{name:?} is listed twice")));
            }
        }
        if !list.iter().any(|n| n == "http/1.1") {
            return Err(self.err(
                field,
                "\"http/1.1\" must be listed: clients without HTTP/2 are always served",
            ));
        }
        Ok(list.iter().any(|n| n == "h2"))
    }

    fn certificates(
        &self,
        listener: &ListenerDef,
        field: &str,
        protocol: ListenerProtocol,
    ) -> Result<Vec<Certificate>> {
        let field = format!("{field}.certificates");
        let certs = &listener.certificates;
        if protocol == ListenerProtocol::Https && certs.is_empty() {
            return Err(self.err(
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
    fn certificate(&self, c: &CertificateDef, field: &str) -> Result<Certificate> {
        let path = |value: &Option<String>, key: &str| -> Result<Option<PathBuf>> {
            value
                .as_ref()
                .map(|v| self.path(v, &format!("{field}.{key}")))
                .transpose()
        };
        let cert_path = path(&c.certificate, "certificate")?;
        let key_path = path(&c.key, "key")?;
        let read =
            |value: &Option<String>, path: &Option<PathBuf>, key: &str| -> Result<(String, bool)> {
                if let Some(pem) = value {
                    return Ok((pem.clone(), false));
                }
                let Some(path) = path else {
                    return Err(self.err(
                        field,
                        format!(
                        "{key} is missing: {{ certificate = \"site.pem\", key = \"site.key\" }}"
                    ),
                    ));
                };
                std::fs::read_to_string(path)
                    .map(|text| (text, true))
                    .map_err(|e| {
                        self.err_near(
                            field,
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
            .map_err(|e| self.err(field, format!("{shown}: {e}")))
    }

    fn clusters(
        &self,
        clusters: &BTreeMap<String, ClusterDef>,
        listeners: &[Listener],
    ) -> Result<Vec<Cluster>> {
        let mut frontends = FrontendChecker::new(self, listeners);
        let mut out = Vec::with_capacity(clusters.len());
        for (name, file) in clusters {
            let field = join_key("clusters", name);
            let valid_name = !name.is_empty()
                && name.len() <= 64
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !valid_name {
                return Err(self.err(
                    &field,
                    "a cluster name is 1 to 64 letters, digits, '-' or '_'",
                ));
            }
            let protocol = match file.protocol {
                Some(ClusterProtocolDef::Http) | None => ClusterProtocol::Http,
                Some(ClusterProtocolDef::Tcp) => ClusterProtocol::Tcp,
            };
            let load_balancing = match file.load_balancing {
                Some(LoadBalancingDef::RoundRobin) | None => LoadBalancing::RoundRobin,
                Some(LoadBalancingDef::Random) => LoadBalancing::Random,
                Some(LoadBalancingDef::LeastConnections) => LoadBalancing::LeastConnections,
                Some(LoadBalancingDef::PowerOfTwo) => LoadBalancing::PowerOfTwo,
                Some(LoadBalancingDef::Maglev) => LoadBalancing::Maglev,
            };
            let fronts = file
                .frontends
                .iter()
                .enumerate()
                .map(|(i, f)| frontends.check(f, &format!("{field}.frontends[{i}]"), protocol))
                .collect::<Result<Vec<_>>>()?;
            let backends = self.backends(name, file, &field)?;
            let health_check = match &file.health_check {
                Some(h) => Some(self.health_check(h, &format!("{field}.health_check"))?),
                None => None,
            };
            out.push(Cluster {
                name: name.clone(),
                protocol,
                load_balancing,
                frontends: fronts,
                backends,
                health_check,
                send_proxy: file.send_proxy.unwrap_or(false),
                http2: file.http2.unwrap_or(false),
                backend_tls: self.backend_tls(file, &field, protocol)?,
                hash_key: self.hash_key(file, &field, protocol, load_balancing)?,
            });
        }
        Ok(out)
    }

    /// A cluster's `hash_key`.
    fn hash_key(
        &self,
        file: &ClusterDef,
        field: &str,
        protocol: ClusterProtocol,
        policy: LoadBalancing,
    ) -> Result<crate::model::HashKey> {
        use crate::model::HashKey;
        let Some(text) = &file.hash_key else {
            return Ok(HashKey::SourceIp);
        };
        let key_field = format!("{field}.hash_key");
        if policy != LoadBalancing::Maglev {
            return Err(self.err(
                &key_field,
                "hash_key applies to load_balancing = \"maglev\"",
            ));
        }
        let token = |name: &str| {
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        };
        let key = match text.split_once(':') {
            None if text == "source-ip" => HashKey::SourceIp,
            Some(("header", name)) if token(name) => HashKey::Header(name.to_ascii_lowercase()),
            Some(("cookie", name)) if token(name) => HashKey::Cookie(name.to_owned()),
            _ => {
                return Err(self.err(
                    &key_field,
                    format!("{text:?} is not a hash key: write \"source-ip\", \"header:NAME\" or \"cookie:NAME\""),
                ))
            }
        };
        if protocol == ClusterProtocol::Tcp && key != HashKey::SourceIp {
            return Err(self.err(
                &key_field,
                "a tcp cluster sees no header or cookie: its hash key is the source IP",
            ));
        }
        Ok(key)
    }

    /// A cluster's `backend_tls`, `backend_ca` (or `backend_ca_pem`) and
    /// `backend_server_name`.
    fn backend_tls(
        &self,
        file: &ClusterDef,
        field: &str,
        protocol: ClusterProtocol,
    ) -> Result<Option<crate::model::BackendTls>> {
        if file.backend_tls != Some(true) {
            let stray = [
                ("backend_ca", file.backend_ca.is_some()),
                ("backend_ca_pem", file.backend_ca_pem.is_some()),
                ("backend_server_name", file.backend_server_name.is_some()),
            ];
            if let Some((key, _)) = stray.iter().find(|(_, set)| *set) {
                return Err(self.err(
                    &format!("{field}.{key}"),
                    format!("{key} applies to TLS backends: add backend_tls = true"),
                ));
            }
            return Ok(None);
        }
        let tls_field = format!("{field}.backend_tls");
        if protocol != ClusterProtocol::Http {
            return Err(self.err(
                &tls_field,
                "backend_tls applies to http clusters (a tcp cluster passes the client's bytes through, TLS or not)",
            ));
        }
        if file.http2 == Some(true) {
            return Err(self.err(
                &tls_field,
                "HTTP/2 to backends over TLS is not supported yet: backend_tls needs http2 = false (HTTP/1.1 backends)",
            ));
        }
        let ca_field = format!("{field}.backend_ca");
        let pem = self.pem_text(&file.backend_ca_pem, &file.backend_ca, &ca_field)?;
        let roots = match pem {
            Some(pem) => crate::certs::ca_roots(&pem).map_err(|e| self.err(&ca_field, e))?,
            None => Vec::new(),
        };
        let server_name = match &file.backend_server_name {
            Some(name) => {
                rustls_pki_types::ServerName::try_from(name.as_str()).map_err(|_| {
                    self.err(
                        &format!("{field}.backend_server_name"),
                        format!("{name:?} is not a DNS name or an IP address"),
                    )
                })?;
                Some(name.clone())
            }
            None => None,
        };
        Ok(Some(crate::model::BackendTls { roots, server_name }))
    }

    fn backends(&self, name: &str, cluster: &ClusterDef, field: &str) -> Result<Vec<Backend>> {
        let field = format!("{field}.backends");
        let items: &[BackendDef] = &cluster.backends;
        if items.is_empty() {
            return Err(self.err(
                &field,
                format!(
                    "cluster {name} has no backends: add backends = [ {{ address = \"127.0.0.1:9001\" }} ]"
                ),
            ));
        }
        let mut out: Vec<Backend> = Vec::with_capacity(items.len());
        for (i, b) in items.iter().enumerate() {
            let address_field = format!("{field}[{i}].address");
            let address = self.socket_addr(&b.address, &address_field)?;
            if address.port() == 0 {
                return Err(self.err(
                    &address_field,
                    format!("{address} has port 0; a backend needs the port it listens on"),
                ));
            }
            if let Some(j) = out.iter().position(|o| o.address == address) {
                return Err(self.err(
                    &address_field,
                    format!(
                        "{address} is already {field}[{j}]; list each backend once and use weight to give it more traffic"
                    ),
                ));
            }
            out.push(Backend {
                address,
                weight: self.int(b.weight, &format!("{field}[{i}].weight"), 1, 1..=1000)?,
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
        h: &HealthCheckDef,
        field: &str,
        http: bool,
    ) -> Result<(String, (u16, u16), Option<String>)> {
        for (key, value) in [
            ("method", &h.method),
            ("status", &h.status),
            ("host", &h.host),
        ] {
            if let (Some(_), false) = (value, http) {
                return Err(self.err(
                    &format!("{field}.{key}"),
                    format!("{key} applies to HTTP checks: give a path too (without one the check is a TCP connect)"),
                ));
            }
        }
        let method = match &h.method {
            None => "GET".to_string(),
            Some(m) => {
                let upper = m.to_ascii_uppercase();
                if upper.is_empty()
                    || upper.len() > 20
                    || !upper.bytes().all(|b| b.is_ascii_uppercase())
                {
                    return Err(self.err(
                        &format!("{field}.method"),
                        format!(
                            "\"{m}\" is not a request method: expected a word such as \"GET\" or \"HEAD\""
                        ),
                    ));
                }
                upper
            }
        };
        let status = match &h.status {
            None => (200, 399),
            Some(s) => {
                let text = s.trim();
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
                            &format!("{field}.status"),
                            format!(
                                "\"{s}\" is not a status or a range of statuses: expected e.g. \"200\" or \"200-399\" (100 to 599)"
                            ),
                        ))
                    }
                }
            }
        };
        let host = match &h.host {
            None => None,
            Some(v) => {
                let valid = !v.is_empty()
                    && v.len() <= 255
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b));
                if !valid {
                    return Err(self.err(
                        &format!("{field}.host"),
                        format!(
                            "{v:?} is not a host name: expected e.g. \"app.example.com\" or \"app.example.com:8080\""
                        ),
                    ));
                }
                Some(v.clone())
            }
        };
        Ok((method, status, host))
    }

    fn health_check(&self, h: &HealthCheckDef, field: &str) -> Result<HealthCheck> {
        let path = match &h.path {
            None => None,
            Some(p) if p.starts_with('/') && !has_space_or_control(p) => Some(p.clone()),
            Some(p) if p.starts_with('/') => {
                return Err(self.err(
                    &format!("{field}.path"),
                    format!(
                        "{p:?} holds a space or a control character: write them %-encoded (%20)"
                    ),
                ))
            }
            Some(p) => {
                return Err(self.err(
                    &format!("{field}.path"),
                    format!(
                        "\"{p}\" does not start with '/': expected a request path such as \"/health\" (or no path for a TCP connect check)"
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
            let name = match (&h.timeout, &h.interval) {
                (None, Some(_)) => interval_field,
                _ => timeout_field,
            };
            return Err(self.err(
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
            rise: self.int(h.rise, &format!("{field}.rise"), 2, 1..=100)?,
            fall: self.int(h.fall, &format!("{field}.fall"), 3, 1..=100)?,
        })
    }
}

/// A space or a control character: what cannot go into a request line as is.
fn has_space_or_control(text: &str) -> bool {
    text.chars().any(|c| c.is_whitespace() || c.is_control())
}
