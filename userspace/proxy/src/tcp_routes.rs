//! Routes of a TCP passthrough listener: which `protocol = "tcp"` cluster a connection goes to.
//!
//! A listener's [`TcpRoutes`] come from the frontends of tcp clusters that name its address.
//! Only the TLS server name (SNI, read by `tcp/` with `sni.rs`) can tell them apart: exact
//! hostnames first, then `*.wildcard` ones with the longest suffix first, then regexes, then
//! the frontend without hostname, which takes everything else (no SNI, not TLS, unknown name).
//! The config refuses two frontends with the same address and hostname, so the order never
//! depends on the file. HTTP routing (paths, methods) is `router.rs`'s.

use lb_config::{ClusterProtocol, Config, HostMatch};
use std::net::SocketAddr;

/// Where a TCP listener's connections go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Index in the worker's clusters.
    pub cluster: usize,
    /// Send a PROXY protocol v2 header to the backend first.
    pub send_proxy: bool,
}

#[derive(Debug, Clone)]
struct TcpRoute {
    host: HostMatch,
    target: Target,
}

impl TcpRoute {
    fn rank(&self) -> (u8, usize) {
        match &self.host {
            HostMatch::Exact(h) => (0, usize::MAX - h.len()),
            HostMatch::Wildcard(s) => (1, usize::MAX - s.len()),
            HostMatch::Regex(_) => (2, 0),
            HostMatch::Any => (3, 0),
        }
    }

    fn matches(&self, name: Option<&str>) -> bool {
        match (&self.host, name) {
            (HostMatch::Any, _) => true,
            (_, None) => false,
            (HostMatch::Exact(h), Some(n)) => h == n,
            (HostMatch::Wildcard(suffix), Some(n)) => {
                n.len() > suffix.len() && n.ends_with(suffix.as_str())
            }
            (HostMatch::Regex(re), Some(n)) => re.is_match(n),
        }
    }
}

/// The frontends of one TCP listener, most specific first, and how it is reached.
#[derive(Debug, Clone, Default)]
pub struct TcpRoutes {
    routes: Vec<TcpRoute>,
    /// Connections start with a PROXY protocol header (`accept_proxy = true`).
    accept_proxy: bool,
}

impl TcpRoutes {
    /// The routes of the listener at `address` (empty for a listener that is not tcp); cluster
    /// indices follow `config.clusters`.
    pub fn for_listener(config: &Config, address: SocketAddr) -> TcpRoutes {
        let mut routes: Vec<TcpRoute> = config
            .clusters
            .iter()
            .enumerate()
            .filter(|(_, c)| c.protocol == ClusterProtocol::Tcp)
            .flat_map(|(cluster, c)| {
                c.frontends
                    .iter()
                    .filter(move |f| f.address == address)
                    .map(move |f| TcpRoute {
                        host: f.hostname.clone(),
                        target: Target {
                            cluster,
                            send_proxy: c.send_proxy,
                        },
                    })
            })
            .collect();
        routes.sort_by_key(TcpRoute::rank);
        let accept_proxy = config
            .listeners
            .iter()
            .any(|l| l.address == address && l.accept_proxy);
        TcpRoutes {
            routes,
            accept_proxy,
        }
    }

    /// Whether connections start with a PROXY protocol header.
    pub fn accept_proxy(&self) -> bool {
        self.accept_proxy
    }

    /// Whether some frontend names a hostname, so the ClientHello must be read first.
    pub fn by_server_name(&self) -> bool {
        self.routes
            .iter()
            .any(|r| !matches!(r.host, HostMatch::Any))
    }

    /// The target for a server name (None: no SNI, only the frontend without hostname fits).
    pub fn lookup(&self, server_name: Option<&str>) -> Option<Target> {
        let name = server_name.map(|n| n.trim_end_matches('.').to_ascii_lowercase());
        self.routes
            .iter()
            .find(|r| r.matches(name.as_deref()))
            .map(|r| r.target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = r#"
[[listeners]]
address = "127.0.0.1:5000"
protocol = "tcp"

[[listeners]]
address = "127.0.0.1:5001"
protocol = "tcp"

[clusters.a_exact]
protocol = "tcp"
frontends = [{ address = "127.0.0.1:5000", hostname = "db.example.com" }]
backends = [{ address = "127.0.0.1:1" }]

[clusters.b_wild]
protocol = "tcp"
send_proxy = true
frontends = [{ address = "127.0.0.1:5000", hostname = "*.example.com" }]
backends = [{ address = "127.0.0.1:2" }]

[clusters.c_regex]
protocol = "tcp"
frontends = [{ address = "127.0.0.1:5000", hostname = "~^shard[0-9]+\\.test$" }]
backends = [{ address = "127.0.0.1:3" }]

[clusters.d_any]
protocol = "tcp"
frontends = [{ address = "127.0.0.1:5000" }, { address = "127.0.0.1:5001" }]
backends = [{ address = "127.0.0.1:4" }]
"#;

    fn routes(listener: &str) -> TcpRoutes {
        let config = lb_config::parse_str(CONFIG, std::path::Path::new("t.toml")).unwrap();
        TcpRoutes::for_listener(&config, listener.parse().unwrap())
    }

    #[test]
    fn server_name_routing() {
        let r = routes("127.0.0.1:5000");
        assert!(r.by_server_name());
        let cluster = |name: Option<&str>| r.lookup(name).map(|t| t.cluster);
        assert_eq!(cluster(Some("db.example.com")), Some(0));
        assert_eq!(cluster(Some("DB.Example.COM.")), Some(0));
        assert_eq!(cluster(Some("www.example.com")), Some(1));
        assert_eq!(
            r.lookup(Some("www.example.com")).map(|t| t.send_proxy),
            Some(true)
        );
        assert_eq!(cluster(Some("example.com")), Some(3));
        assert_eq!(cluster(Some("shard12.test")), Some(2));
        assert_eq!(cluster(Some("shardx.test")), Some(3));
        assert_eq!(cluster(None), Some(3));
    }

    #[test]
    fn listener_without_names_is_not_peeked() {
        let r = routes("127.0.0.1:5001");
        assert!(!r.by_server_name());
        assert_eq!(r.lookup(None).map(|t| t.cluster), Some(3));
        assert!(routes("127.0.0.1:5999").lookup(None).is_none());
    }
}
