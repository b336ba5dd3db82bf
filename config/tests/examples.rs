//! The shipped example files parse, and into what the README says they mean.
//!
//! Also covers the defaults of an almost empty file and how relative paths resolve against the
//! config file's directory (never the current directory).

// Integration tests are compiled with cfg(test); saying so lets clippy.toml's test allowances
// (unwrap, panic, indexing) cover the helpers too, not only the #[test] functions.
#![cfg(test)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lb_config::*;

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn quickstart_parses() {
    let config = load(&examples().join("quickstart.toml")).unwrap();
    assert_eq!(config.workers, 2);
    assert_eq!(config.steering, Steering::Ebpf);
    assert_eq!(config.steering_policy, SteeringPolicy::LeastConnections);
    assert_eq!(
        config.command_socket,
        Path::new("/tmp/kakehi-quickstart.sock")
    );
    assert_eq!(config.listeners.len(), 1);
    assert_eq!(config.listeners[0].address, addr("127.0.0.1:8080"));
    assert_eq!(config.listeners[0].protocol, ListenerProtocol::Http);

    let names: Vec<&str> = config.clusters.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["api", "app"], "clusters come in name order");
    let api = &config.clusters[0];
    let app = &config.clusters[1];
    assert_eq!(app.load_balancing, LoadBalancing::RoundRobin);
    assert_eq!(
        app.backends.iter().map(|b| b.address).collect::<Vec<_>>(),
        [addr("127.0.0.1:9001"), addr("127.0.0.1:9002")]
    );
    assert!(matches!(&app.frontends[0].hostname, HostMatch::Exact(h) if h == "localhost"));
    assert!(matches!(&app.frontends[0].path, PathMatch::Prefix(p) if p == "/"));
    assert!(matches!(&api.frontends[0].path, PathMatch::Prefix(p) if p == "/api"));
    assert_eq!(api.frontends[0].address, addr("127.0.0.1:8080"));
    assert_eq!(api.backends[0].address, addr("127.0.0.1:9002"));
}

#[test]
fn full_example_sets_every_key() {
    let dir = examples();
    let config = load(&dir.join("full.toml")).unwrap();
    assert!(config.source.is_absolute());
    assert_eq!(config.workers, 2);
    assert_eq!(config.max_connections, 20_000);
    assert_eq!(
        config.sync,
        Some(lb_config::Sync {
            etcd: vec![
                "10.0.0.5:2379".parse().unwrap(),
                "10.0.0.6:2379".parse().unwrap()
            ],
            prefix: "/kakehi/prod".into(),
            name: "lb1".into(),
        })
    );
    assert_eq!(config.steering, Steering::Ebpf);
    assert_eq!(config.steering_policy, SteeringPolicy::LeastConnections);
    assert_eq!(config.user.as_deref(), Some("kakehi"));
    assert_eq!(config.group.as_deref(), Some("kakehi"));
    assert_eq!(config.buffer_size, 32_768);
    assert_eq!(
        config.timeouts,
        Timeouts {
            connect: Duration::from_secs(2),
            request_header: Duration::from_secs(5),
            front_idle: Duration::from_secs(120),
            back_idle: Duration::from_secs(45),
            drain: Duration::from_secs(10),
        }
    );
    assert_eq!(config.access_log.format, LogFormat::Json);
    assert_eq!(
        config.access_log.target,
        LogTarget::File(dir.join("logs/access.log"))
    );
    assert_eq!(
        config.metrics,
        Some(Metrics {
            address: addr("127.0.0.1:9100")
        })
    );

    let https = &config.listeners[1];
    assert_eq!(https.protocol, ListenerProtocol::Https);
    let site = &https.certificates[0];
    assert_eq!(
        site.path.as_deref(),
        Some(dir.join("certs/site.pem").as_path())
    );
    assert_eq!(site.names, ["site.example.com", "www.site.example.com"]);
    assert_eq!(site.fingerprint.len(), 64);
    assert!(site.not_after > 4_000_000_000, "valid for a century");
    let other = &https.certificates[1];
    assert_eq!(other.names, ["*.other.example.com"]);
    assert_eq!(
        other.path.as_deref(),
        Some(dir.join("certs/other.pem").as_path())
    );
    let secure = config.clusters[0].frontends.last().unwrap();
    assert!(secure.redirect_https);
    assert!(!config.clusters[0].frontends[0].redirect_https);
    assert!(config.listeners[2].accept_proxy);

    let app = &config.clusters[0];
    assert_eq!(app.load_balancing, LoadBalancing::PowerOfTwo);
    let f = &app.frontends;
    assert!(matches!(&f[2].hostname, HostMatch::Wildcard(s) if s == ".app.example.com"));
    assert!(matches!(&f[2].path, PathMatch::Exact(p) if p == "/healthz"));
    assert_eq!(f[2].method.as_deref(), Some("GET"));
    let HostMatch::Regex(host) = &f[3].hostname else {
        panic!("regex hostname expected")
    };
    assert!(
        host.is_match("API7.example.com"),
        "host regexes ignore case"
    );
    let PathMatch::Regex(path) = &f[3].path else {
        panic!("regex path expected")
    };
    assert!(path.is_match("/v2/users") && !path.is_match("/users"));
    assert_eq!(app.backends[1].weight, 3);
    assert!(app.backends[2].backup);
    assert_eq!(
        app.health_check,
        Some(HealthCheck {
            path: Some("/health".into()),
            method: "HEAD".into(),
            status: (200, 299),
            host: Some("health.site.example.com".into()),
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(2),
            rise: 3,
            fall: 5,
        })
    );

    let db = &config.clusters[1];
    assert_eq!(db.protocol, ClusterProtocol::Tcp);
    assert!(db.send_proxy);
    assert_eq!(db.backends[1].address, addr("[fd00::2]:5432"));
    let check = db.health_check.as_ref().unwrap();
    assert_eq!(check.path, None, "no path: a TCP connect check");
    assert_eq!(check.interval, Duration::from_secs(3));
}

#[test]
fn defaults() {
    let config = parse_str("", Path::new("/etc/kakehi/lb.toml")).unwrap();
    assert_eq!(config.source, Path::new("/etc/kakehi/lb.toml"));
    assert_eq!(config.workers, 1);
    assert_eq!(config.max_connections, 10_000);
    assert_eq!(config.command_socket, Path::new(DEFAULT_COMMAND_SOCKET));
    assert_eq!(config.command_socket, Path::new("/run/kakehi/lbd.sock"));
    assert_eq!(config.steering, Steering::Ebpf, "eBPF steering by default");
    assert_eq!(config.steering_policy, SteeringPolicy::FlowHash);
    assert_eq!((config.user, config.group), (None, None));
    assert_eq!(config.buffer_size, 16_384);
    assert_eq!(
        config.timeouts,
        Timeouts {
            connect: Duration::from_secs(3),
            request_header: Duration::from_secs(10),
            front_idle: Duration::from_secs(60),
            back_idle: Duration::from_secs(30),
            drain: Duration::from_secs(10),
        }
    );
    assert_eq!(
        config.access_log,
        AccessLog {
            format: LogFormat::Logfmt,
            target: LogTarget::Stdout
        }
    );
    assert_eq!(config.metrics, None);
    assert!(config.listeners.is_empty() && config.clusters.is_empty());
}

#[test]
fn defaults_inside_listeners_and_clusters() {
    let text = r#"
[[listeners]]
address = "127.0.0.1:8080"

[clusters.app]
frontends = [ { address = "127.0.0.1:8080" } ]
backends = [ { address = "127.0.0.1:9001" } ]
health_check = {}

[access_log]
target = "off"
"#;
    let config = parse_str(text, Path::new("/etc/kakehi/lb.toml")).unwrap();
    let listener = &config.listeners[0];
    assert_eq!(listener.protocol, ListenerProtocol::Http);
    assert!(listener.certificates.is_empty() && !listener.accept_proxy);
    let app = &config.clusters[0];
    assert_eq!(app.protocol, ClusterProtocol::Http);
    assert_eq!(app.load_balancing, LoadBalancing::RoundRobin);
    assert!(!app.send_proxy);
    let frontend = &app.frontends[0];
    assert!(matches!(frontend.hostname, HostMatch::Any));
    assert!(matches!(&frontend.path, PathMatch::Prefix(p) if p == "/"));
    assert_eq!(frontend.method, None);
    assert_eq!(
        app.backends[0],
        Backend {
            address: addr("127.0.0.1:9001"),
            weight: 1,
            backup: false,
            draining: false,
        }
    );
    assert_eq!(
        app.health_check,
        Some(HealthCheck {
            path: None,
            method: "GET".into(),
            status: (200, 399),
            host: None,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
        })
    );
    assert_eq!(config.access_log.target, LogTarget::Off);
}

#[test]
fn relative_paths_resolve_against_the_file_directory() {
    let text = r#"
command_socket = "run/lbd.sock"
[access_log]
target = "../log/access.log"
[[listeners]]
address = "127.0.0.1:8443"
protocol = "https"
certificates = [ { certificate = "certs/site.pem", key = "KEY" } ]
"#;
    // The certificate is read (and checked), so it must exist: the example ones do.
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let key = examples.join("certs/site.key");
    let text = text.replace("KEY", key.to_str().unwrap());
    let config = parse_str(&text, &examples.join("lb.toml")).unwrap();
    let cert = &config.listeners[0].certificates[0];
    assert_eq!(
        cert.path.as_deref(),
        Some(examples.join("certs/site.pem").as_path())
    );
    assert_eq!(config.command_socket, examples.join("run/lbd.sock"));
    assert_eq!(
        config.access_log.target,
        LogTarget::File(examples.join("../log/access.log"))
    );

    // A relative config path is made absolute against the current directory first.
    let cwd = std::env::current_dir().unwrap();
    let relative = examples.strip_prefix(&cwd).unwrap().join("lb.toml");
    let config = parse_str(&text, &relative).unwrap();
    assert_eq!(config.source, cwd.join(&relative));
    assert_eq!(
        config.listeners[0].certificates[0].path.as_deref(),
        Some(examples.join("certs/site.pem").as_path())
    );
}

#[test]
fn durations_accept_humantime_units() {
    let text = r#"
[timeouts]
connect = "500ms"
request_header = "1m 30s"
"#;
    let config = parse_str(text, Path::new("lb.toml")).unwrap();
    assert_eq!(config.timeouts.connect, Duration::from_millis(500));
    assert_eq!(config.timeouts.request_header, Duration::from_secs(90));
}
