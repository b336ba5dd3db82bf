//! Starting the benchmark's programs and checking them: the shared origin (nginx serving
//! static files) and each proxy under test, from the configs `configs` writes (with
//! `Plan::workers` workers or threads), each pinned where `Plan` says and watched until it
//! accepts; then `verify` checks the answers.
//! What is measured, and how, is `bench`'s business.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::{configs, Plan, Proxy, ProxyKind};
use crate::procs::{self, Proc, Signals};

const NGINX: &str = "/usr/sbin/nginx";
const HAPROXY: &str = "/usr/sbin/haproxy";
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A fresh directory for one program's generated files.
fn program_dir(plan: &Plan, name: &str) -> Result<PathBuf> {
    let dir = plan.dir.join(name);
    for sub in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        std::fs::create_dir_all(dir.join("tmp").join(sub))
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    Ok(dir)
}

fn nginx_command(dir: &Path) -> Command {
    let mut cmd = Command::new(NGINX);
    cmd.arg("-p")
        .arg(format!("{}/", dir.display()))
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(dir.join("nginx.conf"));
    cmd
}

pub fn start_origin(signals: &Signals, plan: &Plan, port: u16) -> Result<Proc> {
    let dir = program_dir(plan, "origin")?;
    configs::origin_documents(&dir)?;
    std::fs::write(dir.join("nginx.conf"), configs::origin_nginx(&dir, port))?;
    let log = plan.dir.join("logs").join("origin.log");
    let mut proc = Proc::spawn_logged("origin nginx", &mut nginx_command(&dir), plan.client, &log)?;
    let addr = ([127, 0, 0, 1], port).into();
    procs::wait_for_accept(
        signals,
        addr,
        START_TIMEOUT,
        std::slice::from_mut(&mut proc),
    )
    .with_context(|| format!("the origin nginx did not start; {}", log_tail(&log)))?;
    Ok(proc)
}

/// The ports of one proxy under test, and the origin's.
#[derive(Clone, Copy)]
pub struct Ports {
    pub proxy: configs::Ports,
    pub origin: u16,
}

/// The bench's certificate (ECDSA P-256, `localhost`), made once per run with openssl:
/// `tls/bench.pem` and `tls/bench.key`, and both in one file for HAProxy.
pub fn make_certificate(plan: &Plan) -> Result<()> {
    let tls = configs::Tls::new(&plan.dir);
    std::fs::create_dir_all(&tls.dir)?;
    let output = procs::output(
        Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:P-256", "-nodes", "-days", "30"])
            .args([
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost",
            ])
            .arg("-keyout")
            .arg(&tls.key)
            .arg("-out")
            .arg(&tls.cert),
    )
    .context("running openssl")?;
    if !output.status.success() {
        bail!(
            "openssl req failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let both = [std::fs::read(&tls.cert)?, std::fs::read(&tls.key)?].concat();
    std::fs::write(&tls.combined, both)?;
    Ok(())
}

pub fn start_proxy(
    signals: &Signals,
    plan: &Plan,
    kind: ProxyKind,
    ports: Ports,
    haproxy_reuse: &str,
) -> Result<Proxy> {
    let Ports {
        proxy: listen,
        origin,
    } = ports;
    let configs::Ports {
        http: port,
        https: tls_port,
        tcp: tcp_port,
    } = listen;
    let tls = configs::Tls::new(&plan.dir);
    let name = kind.name();
    let dir = program_dir(plan, name)?;
    let log = plan.dir.join("logs").join(format!("{name}.log"));
    let (mut cmd, settings, version) = match kind {
        ProxyKind::Kakehi => {
            let config = dir.join("lbd.toml");
            std::fs::write(
                &config,
                configs::kakehi(&dir, listen, origin, plan.workers, &tls),
            )?;
            let _ = std::fs::remove_file(dir.join("lbd.sock"));
            let lbd = plan.lbd.clone();
            let check = procs::output(
                Command::new(&lbd)
                    .arg("--config")
                    .arg(&config)
                    .arg("--check"),
            )
            .with_context(|| format!("running {}", lbd.display()))?;
            if !check.status.success() {
                bail!(
                    "`lbd --config {} --check` refused the bench config: {}",
                    config.display(),
                    String::from_utf8_lossy(&check.stderr).trim()
                );
            }
            let version = version_of(Command::new(&lbd).arg("--version"));
            let mut cmd = Command::new(lbd);
            cmd.arg("--config").arg(&config);
            (cmd, configs::kakehi_settings(plan.workers), version)
        }
        ProxyKind::Nginx => {
            std::fs::write(
                dir.join("nginx.conf"),
                configs::nginx_proxy(&dir, listen, origin, plan.workers, &tls),
            )?;
            let version = version_of(Command::new(NGINX).arg("-v"));
            (
                nginx_command(&dir),
                configs::nginx_settings(plan.workers),
                version,
            )
        }
        ProxyKind::Haproxy => {
            let config = dir.join("haproxy.cfg");
            std::fs::write(
                &config,
                configs::haproxy(listen, origin, haproxy_reuse, plan.workers, &tls),
            )?;
            let mut cmd = Command::new(HAPROXY);
            cmd.arg("-db").arg("-f").arg(&config);
            let version = version_of(Command::new(HAPROXY).arg("-v"));
            (
                cmd,
                configs::haproxy_settings(plan.workers, haproxy_reuse),
                version,
            )
        }
    };
    let mut proc = Proc::spawn_logged(name, &mut cmd, plan.proxy, &log)?;
    let addr = ([127, 0, 0, 1], port).into();
    procs::wait_for_accept(
        signals,
        addr,
        START_TIMEOUT,
        std::slice::from_mut(&mut proc),
    )
    .with_context(|| log_tail(&log))?;
    for other in [tls_port, tcp_port] {
        procs::wait_for_accept(
            signals,
            ([127, 0, 0, 1], other).into(),
            START_TIMEOUT,
            std::slice::from_mut(&mut proc),
        )
        .with_context(|| log_tail(&log))?;
    }
    Ok(Proxy {
        kind,
        port,
        tls_port,
        tcp_port,
        proc,
        settings,
        version,
        rss_per_run: true,
    })
}

/// The first line a program prints about its version, from stdout or stderr.
fn version_of(cmd: &mut Command) -> String {
    let Ok(output) = procs::output(cmd) else {
        return String::new();
    };
    let text = [output.stdout, output.stderr].concat();
    String::from_utf8_lossy(&text)
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}

pub fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(5)..].join("\n    ");
    if tail.is_empty() {
        format!("{} is empty", log.display())
    } else {
        format!("last lines of {}:\n    {tail}", log.display())
    }
}

/// `GET /` over TLS answers 200 with the origin's small body.
pub fn verify_tls(port: u16) -> Result<()> {
    let url = format!("https://127.0.0.1:{port}/");
    let output = procs::output(
        Command::new("curl")
            .args(["-sS", "-k", "--max-time", "5", "--tlsv1.3", "-o", "-"])
            .arg(&url),
    )
    .context("running curl")?;
    let got = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() || got != configs::SMALL_BODY {
        bail!(
            "GET {url}: expected {:?}, got {got:?} {}",
            configs::SMALL_BODY,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// `GET /` answers 200 with the origin's small body, `GET /bytes/65536` 200 with 64 KiB.
pub fn verify(port: u16) -> Result<()> {
    let checks = [
        ("/", Some(configs::SMALL_BODY), configs::SMALL_BODY.len()),
        ("/bytes/65536", None, configs::LARGE_SIZE),
    ];
    for (path, body, size) in checks {
        let url = format!("http://127.0.0.1:{port}{path}");
        let output = procs::output(
            Command::new("curl")
                .args(["-sS", "--max-time", "5", "-o", "-", "-w", "\n%{http_code}"])
                .arg(&url),
        )
        .context("running curl")?;
        let text = String::from_utf8_lossy(&output.stdout);
        let (got, status) = text.rsplit_once('\n').unwrap_or(("", &text));
        if !output.status.success() || status != "200" || got.len() != size {
            bail!(
                "GET {url}: expected 200 with {size} bytes, got status {status:?} with {} bytes {}",
                got.len(),
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        if body.is_some_and(|body| body != got) {
            bail!("GET {url}: expected the body {body:?}, got {got:?}");
        }
    }
    Ok(())
}
