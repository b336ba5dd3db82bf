//! `cargo xtask run` (alias `demo`): the quickstart, served until Ctrl-C.
//!
//! Owns the demo's choreography: build, start two `lb-origin`s and `lbd` on
//! config/examples/quickstart.toml, wait until every listener accepts, print what to try,
//! then wait for Ctrl-C (or a child's unexpected exit) and stop every child by pid.
//! With `--config FILE` it runs `lbd` on that file alone. The proxy itself is `lbd`'s business.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::procs::{self, Group, Proc, Signals, SpawnOptions};

/// How long the origins and lbd get to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

const QUICKSTART: &str = "config/examples/quickstart.toml";
const ORIGINS: [(&str, &str); 2] = [("one", "127.0.0.1:9001"), ("two", "127.0.0.1:9002")];

#[derive(clap::Args)]
pub struct Args {
    /// Run lbd on this config instead of the quickstart (no demo origins are started).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
}

pub fn run(signals: &Signals, args: &Args) -> Result<ExitCode> {
    // Only curl is needed, for the commands printed below; without root, go on without it.
    if let Err(error) = crate::setup::setup(signals, &crate::setup::RUN) {
        eprintln!("xtask run: warning: {error:#}");
    }
    let root = crate::root();
    let config = match &args.config {
        Some(path) => std::fs::canonicalize(path)
            .with_context(|| format!("config file {}", path.display()))?,
        None => root.join(QUICKSTART),
    };
    if !config.is_file() {
        bail!("config file {} not found", config.display());
    }
    let listeners = listener_addresses(&config)?;
    let demo = args.config.is_none();

    // Fail before building when a port is taken: a leftover demo would answer in our place.
    let mut ports: Vec<(&str, SocketAddr)> = Vec::new();
    if demo {
        for (name, addr) in ORIGINS {
            ports.push((name, addr.parse()?));
        }
        // The quickstart's [metrics] address.
        ports.push(("lbd's metrics", "127.0.0.1:9100".parse()?));
    }
    ports.extend(listeners.iter().map(|addr| ("lbd", *addr)));
    for (who, addr) in &ports {
        if !procs::port_free(*addr) {
            bail!(
                "{addr} (for {who}) is already in use: is an earlier `cargo xtask run` or \
                 another server still running? (`ss -ltnp 'sport = :{}'` shows who)",
                addr.port()
            );
        }
    }

    let mut build = Command::new("cargo");
    build
        .current_dir(&root)
        .args(["build", "--release", "-p", "lbd", "-p", "lbctl"]);
    if demo {
        build.args(["-p", "lb-testkit"]);
    }
    procs::run_step(signals, &mut build)?;
    let bin = crate::target_dir().join("release");

    let options = SpawnOptions {
        cpu: None,
        own_group: true,
    };
    let mut group = Group::default();
    if demo {
        for (name, addr) in ORIGINS {
            let mut cmd = Command::new(bin.join("lb-origin"));
            cmd.args(["--name", name, "--listen", addr]);
            let origin = group.push(Proc::spawn(
                &format!("lb-origin {name}"),
                &mut cmd,
                options,
            )?);
            procs::wait_for_accept(
                signals,
                addr.parse()?,
                READY_TIMEOUT,
                std::slice::from_mut(origin),
            )?;
        }
    }
    let mut cmd = Command::new(bin.join("lbd"));
    cmd.arg("--config").arg(&config);
    let lbd = group.push(Proc::spawn("lbd", &mut cmd, options)?);
    for addr in &listeners {
        procs::wait_for_accept(signals, *addr, READY_TIMEOUT, std::slice::from_mut(lbd))?;
    }

    print_banner(&root, &config, &listeners, demo);

    loop {
        if let Some((name, status)) = group.exited()? {
            eprintln!(
                "xtask run: {name} exited unexpectedly ({}); stopping the others",
                procs::describe(status)
            );
            stop_in_order(&mut group);
            let code = procs::exit_code(status);
            return Ok(ExitCode::from(if code == 0 { 1 } else { code }));
        }
        if let Some(signal) = signals.wait(Duration::from_millis(500))? {
            let what = if demo { "lbd and the origins" } else { "lbd" };
            println!("\nxtask run: {signal}: stopping {what}");
            stop_in_order(&mut group);
            return Ok(ExitCode::SUCCESS);
        }
    }
}

/// lbd first (it drains), then the origins behind it.
fn stop_in_order(group: &mut Group) {
    if let Some(lbd) = group.procs.iter_mut().find(|proc| proc.name == "lbd") {
        lbd.stop();
    }
    group.stop_all();
}

fn print_banner(root: &Path, config: &Path, listeners: &[SocketAddr], demo: bool) {
    let shown = config.strip_prefix(root).unwrap_or(config);
    let addrs: Vec<String> = listeners.iter().map(ToString::to_string).collect();
    println!();
    println!(
        "kakehi (lbd) is serving {} on {}",
        shown.display(),
        addrs.join(", ")
    );
    if demo {
        // lbctl was built in release beside lbd: shown relative to the root the user runs from.
        let lbctl = crate::target_dir().join("release").join("lbctl");
        let lbctl = lbctl.strip_prefix(root).unwrap_or(&lbctl);
        let base = "http://127.0.0.1:8080";
        println!("origins: lb-origin one on 127.0.0.1:9001, lb-origin two on 127.0.0.1:9002");
        println!();
        println!("Try, in another terminal:");
        println!("  curl -H 'Host: localhost' {base}/        # cluster app: origin one: GET /");
        println!("  curl -H 'Host: localhost' {base}/        # again: origin two (round robin)");
        println!("  curl -H 'Host: localhost' {base}/api/x   # cluster api: always origin two");
        println!("  curl -i -H 'Host: unknown.example' {base}/   # no frontend matches: 404");
        println!(
            "  curl -H 'Host: localhost' {base}/headers # what the origin received (X-Forwarded-*)"
        );
        println!(
            "  curl -s -o /dev/null -w '%{{http_code}} %{{size_download}}\\n' \
             -H 'Host: localhost' {base}/bytes/100000"
        );
        println!(
            "  curl -s http://127.0.0.1:9100/metrics | grep requests_total   # Prometheus metrics"
        );
        println!(
            "  {} -c {QUICKSTART} status   # workers, listeners, backends' health",
            lbctl.display()
        );
        println!("The access log appears below, one line per request.");
    } else if let Some(addr) = listeners.first() {
        println!();
        println!("Try: curl -i -H 'Host: YOUR.HOSTNAME' http://{addr}/");
    }
    println!("Press Ctrl-C to stop.");
    println!();
}

/// The `address` of every `[[listeners]]` table in the config file.
fn listener_addresses(config: &Path) -> Result<Vec<SocketAddr>> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("reading {}", config.display()))?;
    let value: toml::Table = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", config.display()))?;
    let mut addresses = Vec::new();
    if let Some(listeners) = value.get("listeners").and_then(toml::Value::as_array) {
        for listener in listeners {
            if let Some(address) = listener.get("address").and_then(toml::Value::as_str) {
                let addr: SocketAddr = address.parse().with_context(|| {
                    format!("{}: listener address {address:?}", config.display())
                })?;
                addresses.push(addr);
            }
        }
    }
    if addresses.is_empty() {
        bail!("{} has no [[listeners]] with an address", config.display());
    }
    Ok(addresses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_are_read_from_the_file() {
        let dir = std::env::temp_dir().join(format!("xtask-run-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "workers = 1\n[[listeners]]\naddress = \"127.0.0.1:8080\"\nprotocol = \"http\"\n\
             [[listeners]]\naddress = \"127.0.0.1:8081\"\n",
        )
        .unwrap();
        let addrs = listener_addresses(&file).unwrap();
        assert_eq!(addrs.len(), 2);
        assert_eq!(addrs[1].port(), 8081);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
