//! lbctl's command line: the clap definitions, and their translation into protocol verbs.
//!
//! This module owns the spelling of every verb and option (the contract in DESIGN.md) and turns
//! a parsed command into a [`Verb`]; relative paths become absolute here, since lbd does not
//! share lbctl's directory. Talking to lbd is `client.rs`; printing is `render.rs`.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use lb_config::protocol::Verb;
use lb_config::state::{
    BackendDef, CertificateDef, ClientAuthDef, ClusterDef, ClusterProtocolDef, Edit, FrontendDef,
    H2Def, ListenerDef, ListenerProtocolDef, LoadBalancingDef, PathTypeDef,
};

/// The longest `--timeout`: a day, like every duration in the config (lb-config's
/// `MAX_DURATION`); more would overflow `Instant + Duration`.
const MAX_TIMEOUT_SECS: u64 = lb_config::MAX_DURATION.as_secs();

/// `top --interval`: seconds, 0.2 to 60.
fn interval(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(secs) if (0.2..=60.0).contains(&secs) => Ok(secs),
        _ => Err(format!("{text:?}: seconds between 0.2 and 60")),
    }
}

/// Talks to a running lbd over its command socket.
///
/// Exit status: 0 success; 1 refused by lbd (or an invalid file for `config check`); 2 usage
/// error; 3 cannot reach lbd.
#[derive(Parser, Debug)]
#[command(name = "lbctl", version)]
pub struct Cli {
    /// lbd's config file: the command socket is its `command_socket`.
    #[arg(
        short,
        long,
        value_name = "FILE",
        global = true,
        conflicts_with = "socket"
    )]
    pub config: Option<PathBuf>,
    /// The command socket (default: /run/kakehi/lbd.sock, or the config file's).
    #[arg(short, long, value_name = "PATH", global = true)]
    pub socket: Option<PathBuf>,
    /// Machine-readable output (JSON) instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Seconds to wait for lbd's answer, 1 to 86400 (a day).
    #[arg(
        long,
        value_name = "SECS",
        default_value_t = 60,
        global = true,
        value_parser = clap::value_parser!(u64).range(1..=MAX_TIMEOUT_SECS)
    )]
    pub timeout: u64,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generation, workers (pid, state, connections) and listeners.
    Status,
    /// Replace the running lbd with a new binary, without dropping a connection.
    Upgrade {
        /// The new lbd (default: the running binary's path).
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        /// Restart only the workers, on the same main process.
        #[arg(long)]
        workers_only: bool,
    },
    /// Stop lbd: workers finish their requests first, unless --hard.
    Shutdown {
        /// Stop at once, dropping requests in flight.
        #[arg(long)]
        hard: bool,
    },
    /// The running configuration.
    #[command(subcommand)]
    State(StateCmd),
    /// Clusters: a set of backends and the frontends that lead to it.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// A cluster's servers: add, remove, drain.
    #[command(subcommand)]
    Backend(BackendCmd),
    /// Routes from a listener (host, path, method) to a cluster.
    #[command(subcommand)]
    Frontend(FrontendCmd),
    /// Listening addresses.
    #[command(subcommand)]
    Listener(ListenerCmd),
    /// TLS certificates of https listeners.
    #[command(subcommand)]
    Certificate(CertificateCmd),
    /// Counters and gauges of lbd and its workers.
    Metrics,
    /// Set the level of lbd's own log, in main and every worker, until the next change.
    LogLevel {
        /// error, warn, info, debug, trace or off.
        #[arg(value_parser = ["error", "warn", "info", "debug", "trace", "off"])]
        level: String,
    },
    /// Apply the difference between lbd's config file and the running state.
    Reload,
    /// Check a config file, without lbd.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Print a shell completion script, without lbd:
    /// `lbctl completions bash > /etc/bash_completion.d/lbctl`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// A live view of lbd (workers, connections, requests per second per cluster, backends),
    /// refreshed every second; q to quit.
    Top {
        /// Seconds between two refreshes, 0.2 to 60.
        #[arg(long, value_name = "SECS", default_value_t = 1.0, value_parser = interval)]
        interval: f64,
        /// Stop after this many refreshes (for scripts); default: until q.
        #[arg(long, value_name = "N", hide = true)]
        frames: Option<u64>,
    },
    /// Print lbctl's manual page (roff): how `cargo xtask dist` makes lbctl.1.
    #[command(hide = true)]
    Manpage,
}

#[derive(Subcommand, Debug)]
pub enum StateCmd {
    /// Print the running state (as a config file; JSON with --json).
    Dump,
    /// Have lbd write the running state to FILE, as a config file.
    Save { file: PathBuf },
    /// Have lbd replace the running state with the config file FILE.
    Load { file: PathBuf },
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// One line per cluster.
    List,
    /// Add a cluster; give it frontends with `frontend add`.
    Add(ClusterAddArgs),
    /// Remove a cluster, its frontends and backends.
    Remove {
        /// The cluster's name.
        name: String,
    },
}

#[derive(Args, Debug)]
pub struct ClusterAddArgs {
    /// The cluster's name: letters, digits, '-' and '_'.
    pub name: String,
    /// http | tcp (default http).
    #[arg(long)]
    pub protocol: Option<ClusterProtocolDef>,
    /// round-robin | random | least-connections | power-of-two (default round-robin).
    #[arg(long)]
    pub load_balancing: Option<LoadBalancingDef>,
    /// A backend IP:PORT; repeat for several. A cluster needs at least one.
    #[arg(long = "backend", value_name = "ADDR", required = true)]
    pub backends: Vec<String>,
    /// Send a PROXY protocol v2 header to the backends.
    #[arg(long)]
    pub send_proxy: bool,
    /// With --load-balancing maglev: source-ip (default), header:NAME or cookie:NAME.
    #[arg(long, value_name = "KEY")]
    pub hash_key: Option<String>,
    /// Connect to the backends over TLS, verifying their certificates.
    #[arg(long)]
    pub backend_tls: bool,
    /// With --backend-tls: the CA certificates (PEM file) backends are verified against
    /// (default: the system's).
    #[arg(long, value_name = "FILE", requires = "backend_tls")]
    pub backend_ca: Option<PathBuf>,
    /// With --backend-tls: the name the backends' certificates must be valid for, sent in
    /// SNI (default: each backend's IP address).
    #[arg(long, value_name = "NAME", requires = "backend_tls")]
    pub backend_server_name: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum BackendCmd {
    /// Add a backend to a cluster.
    Add(BackendAddArgs),
    /// Remove a backend; its requests in flight finish.
    Remove(BackendRef),
    /// Send the backend no new requests; those in flight finish.
    Drain(BackendRef),
}

#[derive(Args, Debug)]
pub struct BackendAddArgs {
    #[command(flatten)]
    pub backend: BackendRef,
    /// Relative share of the traffic, 1 to 1000 (default 1).
    #[arg(long)]
    pub weight: Option<u32>,
    /// Use it only when no other backend is available.
    #[arg(long)]
    pub backup: bool,
}

#[derive(Args, Debug)]
pub struct BackendRef {
    /// The cluster's name.
    #[arg(long, value_name = "NAME")]
    pub cluster: String,
    /// The backend's IP:PORT.
    #[arg(long, value_name = "ADDR")]
    pub address: String,
}

#[derive(Subcommand, Debug)]
pub enum FrontendCmd {
    /// Route requests to a cluster.
    Add(FrontendArgs),
    /// Remove the route with exactly these address, hostname, path, path type and method.
    Remove(FrontendArgs),
}

#[derive(Args, Debug)]
pub struct FrontendArgs {
    /// The cluster's name.
    #[arg(long, value_name = "NAME")]
    pub cluster: String,
    /// The listener's IP:PORT.
    #[arg(long, value_name = "ADDR")]
    pub address: String,
    /// app.example.com, *.example.com or ~regex (default: any host).
    #[arg(long)]
    pub hostname: Option<String>,
    /// Matched against the request path (default "/").
    #[arg(long)]
    pub path: Option<String>,
    /// prefix | exact | regex (default prefix).
    #[arg(long)]
    pub path_type: Option<PathTypeDef>,
    /// e.g. GET (default: any method).
    #[arg(long)]
    pub method: Option<String>,
    /// On an http listener: answer 301 to the same URL in https instead of proxying.
    #[arg(long)]
    pub redirect_https: bool,
    /// Requests per client address per second, as "R/s"; over it, 429 (frontend add only).
    #[arg(long, value_name = "R/s")]
    pub rate_limit: Option<String>,
    /// On an https listener: the Strict-Transport-Security value added to responses, e.g.
    /// "max-age=31536000; includeSubDomains" (frontend add only).
    #[arg(long, value_name = "VALUE")]
    pub hsts: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum ListenerCmd {
    /// Listen on a new address.
    Add(ListenerAddArgs),
    /// Stop listening on an address (no frontend may use it).
    Remove {
        /// The listener's IP:PORT.
        #[arg(long, value_name = "ADDR")]
        address: String,
    },
    /// Set or replace the CA that client certificates of an https listener are verified
    /// against (new handshakes use it at once), or stop asking for them (--none).
    ClientCa {
        /// The listener's IP:PORT.
        #[arg(long, value_name = "ADDR")]
        address: String,
        /// The CA certificates (PEM file).
        #[arg(long, value_name = "FILE", required_unless_present = "none")]
        ca: Option<PathBuf>,
        /// Stop asking clients for certificates.
        #[arg(long, conflicts_with_all = ["ca", "auth", "crl"])]
        none: bool,
        /// required (default) | optional: whether a client without a certificate is served.
        #[arg(long, value_parser = ["required", "optional"])]
        auth: Option<String>,
        /// Certificate revocation lists (PEM file): the certificates they list are refused.
        #[arg(long, value_name = "FILE", requires = "ca")]
        crl: Option<PathBuf>,
    },
}

#[derive(Args, Debug)]
pub struct ListenerAddArgs {
    /// IP:PORT to listen on.
    #[arg(long, value_name = "ADDR")]
    pub address: String,
    /// http | https | tcp (default http).
    #[arg(long)]
    pub protocol: Option<ListenerProtocolDef>,
    /// Expect a PROXY protocol header from clients.
    #[arg(long)]
    pub accept_proxy: bool,
    /// The most connections one client address may have open (refused in the kernel).
    #[arg(long, value_name = "N")]
    pub max_connections_per_ip: Option<i64>,
    /// The most connections one client address may open per second, as "R/s" (refused in
    /// the kernel).
    #[arg(long, value_name = "R/s")]
    pub max_connection_rate_per_ip: Option<String>,
    /// For https: the certificate chain (PEM); needs --key.
    #[arg(long, value_name = "PATH", requires = "key")]
    pub certificate: Option<PathBuf>,
    /// For https: the private key (PEM); needs --certificate.
    #[arg(long, value_name = "PATH", requires = "certificate")]
    pub key: Option<PathBuf>,
    /// For https: the CA certificates (PEM file) client certificates must be signed by.
    #[arg(long, value_name = "FILE")]
    pub client_ca: Option<PathBuf>,
    /// With --client-ca: required (default) | optional.
    #[arg(long, value_parser = ["required", "optional"], requires = "client_ca")]
    pub client_auth: Option<String>,
    /// For http and https: the protocols offered, in order of preference (`h2,http/1.1` by
    /// default; `http/1.1` alone turns HTTP/2 off).
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub alpn: Option<Vec<String>>,
    /// For http and https: the listener's HTTP/2 limits, as the keys of its `h2` table in the
    /// config, e.g. `max_concurrent_streams = 50, pings = { burst = 5, per_second = 1 }`.
    #[arg(long, value_name = "KEYS", value_parser = parse_h2)]
    pub h2: Option<Box<H2Def>>,
}

/// `--h2`'s keys, read as the config reads a listener's `h2 = { KEYS }`.
fn parse_h2(keys: &str) -> Result<Box<H2Def>, String> {
    let table: toml::Table = format!("h2 = {{ {keys} }}")
        .parse()
        .map_err(|e: toml::de::Error| e.message().to_owned())?;
    let value = table.get("h2").cloned().ok_or("no h2 keys")?;
    value
        .try_into()
        .map(Box::new)
        .map_err(|e: toml::de::Error| e.message().to_owned())
}

#[derive(Subcommand, Debug)]
pub enum CertificateCmd {
    /// Add a certificate to an https listener.
    Add {
        /// The listener's IP:PORT.
        #[arg(long, value_name = "ADDR")]
        address: String,
        #[arg(long, value_name = "PATH")]
        certificate: PathBuf,
        #[arg(long, value_name = "PATH")]
        key: PathBuf,
    },
    /// Replace a listener's certificate with another.
    Replace {
        #[arg(long, value_name = "ADDR")]
        address: String,
        /// The certificate being replaced: its file, its SHA-256 fingerprint or a server name.
        #[arg(long, value_name = "PATH|SHA256|NAME")]
        old_certificate: String,
        #[arg(long, value_name = "PATH")]
        certificate: PathBuf,
        #[arg(long, value_name = "PATH")]
        key: PathBuf,
    },
    /// Remove a certificate from a listener.
    Remove {
        #[arg(long, value_name = "ADDR")]
        address: String,
        /// Its file, its SHA-256 fingerprint or a server name.
        #[arg(long, value_name = "PATH|SHA256|NAME")]
        certificate: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum ConfigCmd {
    /// Validate FILE with lbd's own validator: exit 0 when valid, 1 otherwise.
    Check { file: PathBuf },
}

/// `path` made absolute against lbctl's current directory.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// `--auth`/`--client-auth`, as clap checked it.
fn client_auth(word: Option<&str>) -> Option<ClientAuthDef> {
    match word? {
        "optional" => Some(ClientAuthDef::Optional),
        _ => Some(ClientAuthDef::Required),
    }
}

fn absolute_text(path: &Path) -> String {
    absolute(path).to_string_lossy().into_owned()
}

/// A certificate selector: an existing file is sent as its absolute path; anything else (a
/// fingerprint, a server name, a path lbd knows) as written.
fn selector(text: &str) -> String {
    if Path::new(text).exists() {
        absolute_text(Path::new(text))
    } else {
        text.to_owned()
    }
}

impl Command {
    /// The request for lbd; None for a command lbctl runs itself (`config check`).
    pub fn verb(&self) -> Option<Verb> {
        Some(match self {
            Command::Status => Verb::Status,
            Command::Upgrade {
                binary,
                workers_only,
            } => Verb::Upgrade {
                binary: binary.as_deref().map(absolute),
                workers_only: *workers_only,
            },
            Command::Shutdown { hard } => Verb::Shutdown { hard: *hard },
            Command::State(StateCmd::Dump) => Verb::StateDump,
            Command::State(StateCmd::Save { file }) => Verb::StateSave {
                path: absolute(file),
            },
            Command::State(StateCmd::Load { file }) => Verb::StateLoad {
                path: absolute(file),
            },
            Command::Cluster(ClusterCmd::List) => Verb::ClusterList,
            Command::Cluster(ClusterCmd::Add(add)) => Verb::Change(Edit::AddCluster {
                name: add.name.clone(),
                cluster: ClusterDef {
                    protocol: add.protocol,
                    load_balancing: add.load_balancing,
                    frontends: Vec::new(),
                    backends: add.backends.iter().map(BackendDef::new).collect(),
                    health_check: None,
                    send_proxy: add.send_proxy.then_some(true),
                    http2: None,
                    backend_tls: add.backend_tls.then_some(true),
                    backend_ca: add
                        .backend_ca
                        .as_deref()
                        .map(|p| absolute(p).display().to_string()),
                    backend_ca_pem: None,
                    backend_server_name: add.backend_server_name.clone(),
                    hash_key: add.hash_key.clone(),
                },
            }),
            Command::Cluster(ClusterCmd::Remove { name }) => {
                Verb::Change(Edit::RemoveCluster { name: name.clone() })
            }
            Command::Backend(BackendCmd::Add(add)) => Verb::Change(Edit::AddBackend {
                cluster: add.backend.cluster.clone(),
                backend: BackendDef {
                    weight: add.weight.map(i64::from),
                    backup: add.backup.then_some(true),
                    ..BackendDef::new(add.backend.address.clone())
                },
            }),
            Command::Backend(BackendCmd::Remove(b)) => Verb::Change(Edit::RemoveBackend {
                cluster: b.cluster.clone(),
                address: b.address.clone(),
            }),
            Command::Backend(BackendCmd::Drain(b)) => Verb::Change(Edit::DrainBackend {
                cluster: b.cluster.clone(),
                address: b.address.clone(),
            }),
            Command::Frontend(FrontendCmd::Add(f)) => Verb::Change(Edit::AddFrontend {
                cluster: f.cluster.clone(),
                frontend: f.frontend(),
            }),
            Command::Frontend(FrontendCmd::Remove(f)) => Verb::Change(Edit::RemoveFrontend {
                cluster: f.cluster.clone(),
                frontend: f.frontend(),
            }),
            Command::Listener(ListenerCmd::Add(l)) => Verb::Change(Edit::AddListener {
                listener: ListenerDef {
                    address: l.address.clone(),
                    protocol: l.protocol,
                    certificates: match (&l.certificate, &l.key) {
                        (Some(certificate), Some(key)) => vec![CertificateDef {
                            certificate: Some(absolute_text(certificate)),
                            key: Some(absolute_text(key)),
                            ..CertificateDef::default()
                        }],
                        _ => Vec::new(),
                    },
                    accept_proxy: l.accept_proxy.then_some(true),
                    alpn: l.alpn.clone(),
                    h2: l.h2.as_deref().cloned(),
                    max_connections_per_ip: l.max_connections_per_ip,
                    max_connection_rate_per_ip: l.max_connection_rate_per_ip.clone(),
                    client_ca: l.client_ca.as_deref().map(absolute_text),
                    client_ca_pem: None,
                    client_crl: None,
                    client_crl_pem: None,
                    client_auth: client_auth(l.client_auth.as_deref()),
                },
            }),
            Command::Listener(ListenerCmd::ClientCa {
                address,
                ca,
                auth,
                crl,
                ..
            }) => Verb::Change(Edit::SetClientCa {
                address: address.clone(),
                ca: ca.as_deref().map(absolute_text),
                auth: client_auth(auth.as_deref()),
                crl: crl.as_deref().map(absolute_text),
            }),
            Command::Listener(ListenerCmd::Remove { address }) => {
                Verb::Change(Edit::RemoveListener {
                    address: address.clone(),
                })
            }
            Command::Certificate(CertificateCmd::Add {
                address,
                certificate,
                key,
            }) => Verb::Change(Edit::AddCertificate {
                address: address.clone(),
                certificate: CertificateDef {
                    certificate: Some(absolute_text(certificate)),
                    key: Some(absolute_text(key)),
                    ..CertificateDef::default()
                },
            }),
            Command::Certificate(CertificateCmd::Replace {
                address,
                old_certificate,
                certificate,
                key,
            }) => Verb::Change(Edit::ReplaceCertificate {
                address: address.clone(),
                old: selector(old_certificate),
                certificate: CertificateDef {
                    certificate: Some(absolute_text(certificate)),
                    key: Some(absolute_text(key)),
                    ..CertificateDef::default()
                },
            }),
            Command::Certificate(CertificateCmd::Remove {
                address,
                certificate,
            }) => Verb::Change(Edit::RemoveCertificate {
                address: address.clone(),
                certificate: selector(certificate),
            }),
            Command::Metrics => Verb::Metrics,
            Command::LogLevel { level } => Verb::LogLevel {
                level: level.clone(),
            },
            Command::Reload => Verb::Reload,
            Command::Config(ConfigCmd::Check { .. })
            | Command::Completions { .. }
            | Command::Top { .. }
            | Command::Manpage => return None,
        })
    }
}

impl FrontendArgs {
    fn frontend(&self) -> FrontendDef {
        FrontendDef {
            address: self.address.clone(),
            hostname: self.hostname.clone(),
            path: self.path.clone(),
            path_type: self.path_type,
            method: self.method.clone(),
            redirect_https: self.redirect_https.then_some(true),
            rate_limit: self.rate_limit.clone(),
            hsts: self.hsts.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verb(args: &[&str]) -> Verb {
        let cli = Cli::try_parse_from(std::iter::once("lbctl").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        cli.command.verb().unwrap()
    }

    fn usage_error(args: &[&str]) -> String {
        Cli::try_parse_from(std::iter::once("lbctl").chain(args.iter().copied()))
            .err()
            .unwrap_or_else(|| panic!("{args:?} parsed"))
            .to_string()
    }

    #[test]
    fn listener_add_takes_alpn_and_h2_keys() {
        let Verb::Change(Edit::AddListener { listener }) = verb(&[
            "listener",
            "add",
            "--address",
            "127.0.0.1:8080",
            "--alpn",
            "http/1.1",
            "--h2",
            "max_concurrent_streams = 50, pings = { burst = 5, per_second = 1 }",
        ]) else {
            panic!("not a listener add");
        };
        assert_eq!(listener.alpn, Some(vec!["http/1.1".to_owned()]));
        let h2 = listener.h2.unwrap();
        assert_eq!(h2.max_concurrent_streams, Some(50));
        assert_eq!(h2.pings.unwrap().burst, Some(5));
        let e = usage_error(&[
            "listener",
            "add",
            "--address",
            "127.0.0.1:8080",
            "--h2",
            "max_streams = 5",
        ]);
        assert!(e.contains("unknown field `max_streams`"), "{e}");
    }

    #[test]
    fn the_contract_verbs_parse() {
        assert_eq!(verb(&["status"]), Verb::Status);
        assert_eq!(verb(&["metrics"]), Verb::Metrics);
        assert_eq!(
            verb(&["log-level", "debug"]),
            Verb::LogLevel {
                level: "debug".into()
            }
        );
        assert_eq!(verb(&["reload"]), Verb::Reload);
        assert_eq!(verb(&["shutdown"]), Verb::Shutdown { hard: false });
        assert_eq!(verb(&["shutdown", "--hard"]), Verb::Shutdown { hard: true });
        assert_eq!(
            verb(&["upgrade", "--binary", "/opt/lbd", "--workers-only"]),
            Verb::Upgrade {
                binary: Some("/opt/lbd".into()),
                workers_only: true
            }
        );
        assert_eq!(verb(&["state", "dump"]), Verb::StateDump);
        assert_eq!(verb(&["cluster", "list"]), Verb::ClusterList);
        assert_eq!(
            verb(&["cluster", "remove", "app"]),
            Verb::Change(Edit::RemoveCluster { name: "app".into() })
        );
    }

    #[test]
    fn state_paths_become_absolute() {
        let Verb::StateSave { path } = verb(&["state", "save", "saved.toml"]) else {
            panic!()
        };
        assert!(path.is_absolute(), "{}", path.display());
        assert!(path.ends_with("saved.toml"));
        let Verb::StateLoad { path } = verb(&["state", "load", "/etc/kakehi/lb.toml"]) else {
            panic!()
        };
        assert_eq!(path, Path::new("/etc/kakehi/lb.toml"));
    }

    #[test]
    fn backend_verbs_take_cluster_and_address() {
        assert_eq!(
            verb(&[
                "backend",
                "add",
                "--cluster",
                "app",
                "--address",
                "127.0.0.1:9003",
                "--weight",
                "2",
                "--backup"
            ]),
            Verb::Change(Edit::AddBackend {
                cluster: "app".into(),
                backend: BackendDef {
                    address: "127.0.0.1:9003".into(),
                    weight: Some(2),
                    backup: Some(true),
                    draining: None,
                }
            })
        );
        assert_eq!(
            verb(&[
                "backend",
                "drain",
                "--cluster",
                "app",
                "--address",
                "1.2.3.4:80"
            ]),
            Verb::Change(Edit::DrainBackend {
                cluster: "app".into(),
                address: "1.2.3.4:80".into()
            })
        );
        let e = usage_error(&["backend", "remove", "--address", "1.2.3.4:80"]);
        assert!(e.contains("--cluster <NAME>"), "{e}");
        let e = usage_error(&[
            "backend",
            "drain",
            "--cluster",
            "a",
            "--address",
            "b",
            "--weight",
            "2",
        ]);
        assert!(e.contains("--weight"), "{e}");
        let e = usage_error(&[
            "backend",
            "add",
            "--cluster",
            "a",
            "--address",
            "b",
            "--weight",
            "lots",
        ]);
        assert!(e.contains("lots"), "{e}");
    }

    #[test]
    fn frontend_listener_and_cluster_definitions() {
        assert_eq!(
            verb(&[
                "frontend",
                "add",
                "--cluster",
                "app",
                "--address",
                "127.0.0.1:8080",
                "--hostname",
                "*.example.com",
                "--path",
                "/api",
                "--path-type",
                "exact",
                "--method",
                "GET"
            ]),
            Verb::Change(Edit::AddFrontend {
                cluster: "app".into(),
                frontend: FrontendDef {
                    address: "127.0.0.1:8080".into(),
                    hostname: Some("*.example.com".into()),
                    path: Some("/api".into()),
                    path_type: Some(PathTypeDef::Exact),
                    method: Some("GET".into()),
                    redirect_https: None,
                    rate_limit: None,
                    hsts: None,
                }
            })
        );
        let e = usage_error(&[
            "frontend",
            "add",
            "--cluster",
            "a",
            "--address",
            "b",
            "--path-type",
            "glob",
        ]);
        assert!(e.contains("expected prefix | exact | regex"), "{e}");

        assert_eq!(
            verb(&["listener", "add", "--address", "127.0.0.1:8081"]),
            Verb::Change(Edit::AddListener {
                listener: ListenerDef {
                    address: "127.0.0.1:8081".into(),
                    protocol: None,
                    certificates: vec![],
                    accept_proxy: None,
                    alpn: None,
                    h2: None,
                    max_connections_per_ip: None,
                    max_connection_rate_per_ip: None,
                    client_ca: None,
                    client_ca_pem: None,
                    client_crl: None,
                    client_crl_pem: None,
                    client_auth: None,
                }
            })
        );
        let e = usage_error(&[
            "listener",
            "add",
            "--address",
            "a",
            "--certificate",
            "c.pem",
        ]);
        assert!(e.contains("--key"), "{e}");

        assert_eq!(
            verb(&[
                "cluster",
                "add",
                "web",
                "--load-balancing",
                "least-connections",
                "--backend",
                "127.0.0.1:9100",
                "--backend",
                "127.0.0.1:9101"
            ]),
            Verb::Change(Edit::AddCluster {
                name: "web".into(),
                cluster: ClusterDef {
                    load_balancing: Some(LoadBalancingDef::LeastConnections),
                    backends: vec![
                        BackendDef::new("127.0.0.1:9100"),
                        BackendDef::new("127.0.0.1:9101")
                    ],
                    ..ClusterDef::default()
                }
            })
        );
        let e = usage_error(&["cluster", "add", "web"]);
        assert!(e.contains("--backend <ADDR>"), "{e}");
    }

    #[test]
    fn global_options_go_anywhere_and_config_excludes_socket() {
        let cli = Cli::try_parse_from(["lbctl", "status", "--json", "--socket", "/tmp/s"]).unwrap();
        assert!(cli.json);
        assert_eq!(cli.socket.as_deref(), Some(Path::new("/tmp/s")));
        let e = usage_error(&["--config", "a.toml", "--socket", "/tmp/s", "status"]);
        assert!(e.contains("cannot be used with"), "{e}");
        let cli = Cli::try_parse_from(["lbctl", "config", "check", "lb.toml"]).unwrap();
        assert!(cli.command.verb().is_none());
    }

    /// Issue 12, item 8: `--timeout 18446744073709551615` made `Instant::now() + timeout`
    /// overflow and lbctl panic; it is refused as a usage error (at most a day).
    #[test]
    fn the_timeout_is_bounded() {
        for bad in ["18446744073709551615", "86401", "0"] {
            let e = usage_error(&["status", "--timeout", bad]);
            assert!(e.contains("--timeout"), "{bad}: {e}");
            assert!(e.contains("86400"), "{bad}: {e}");
        }
        let cli = Cli::try_parse_from(["lbctl", "status", "--timeout", "86400"]).unwrap();
        assert_eq!(cli.timeout, 86_400);
    }
}
