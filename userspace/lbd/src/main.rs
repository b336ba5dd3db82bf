//! `lbd`, the kakehi load balancer daemon.
//!
//! `lbd --config FILE` validates the config, binds every listener and supervises `workers`
//! sandboxed worker processes (supervisor.rs) until SIGTERM or SIGINT, after which it drains
//! and exits 0. `lbd --config FILE --check` only validates. `lbd worker` is the worker
//! process's own entry (worker_main.rs), started by the supervisor, not by people.

#![deny(unsafe_code)]

#[allow(dead_code)] // The socket handoff of `lbctl upgrade` uses the rest.
mod command;
mod fds;
mod listeners;
mod logger;
mod runtime;
mod sandbox;
#[allow(dead_code)] // The fd handoff of `lbctl upgrade` and tests/steering.rs use the rest.
mod steering;
mod supervisor;
mod worker_main;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(name = "lbd", version, about = "kakehi load balancer daemon")]
struct Args {
    /// The configuration file (TOML).
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit: 0 when valid, 1 otherwise.
    #[arg(long)]
    check: bool,
    /// Log level for lbd's own messages (error, warn, info, debug).
    #[arg(long, default_value = "info", value_parser = parse_level, global = true)]
    log_level: log::LevelFilter,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// A worker process (started by lbd itself).
    #[command(hide = true)]
    Worker(worker_main::WorkerArgs),
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("unknown log level {s:?}: use error, warn, info or debug"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    logger::init(args.log_level);
    let result = match &args.command {
        Some(Cmd::Worker(worker)) => worker_main::run(worker),
        None => run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    let Some(path) = args.config.as_deref() else {
        anyhow::bail!("no configuration: use lbd --config FILE");
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read the config file", path.display()))?;
    // ConfigError already names the file, line, field and cause: print it once.
    let config = lb_config::parse_str(&text, path).map_err(|e| anyhow::anyhow!("{e}"))?;
    if args.check {
        println!("{}: configuration is valid", path.display());
        return Ok(());
    }
    // Workers re-validate configurations inside their sandbox, where no path can be made
    // absolute (no getcwd): hand them an absolute one.
    let path = &std::fs::canonicalize(path)
        .with_context(|| format!("{}: cannot resolve the path", path.display()))?;
    let state = lb_config::state::State::from_toml(&text, path)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .with_absolute_paths(path);
    let mut signals = supervisor::Supervisor::signals()?;
    let commands =
        command::CommandServer::bind(&config.command_socket, command::default_allowed_uids())
            .with_context(|| format!("command socket {}", config.command_socket.display()))?;
    let mut supervisor = supervisor::Supervisor::new(config, state, path, args.log_level)?;
    for addr in supervisor.addresses() {
        log::info!("listening on {addr}");
    }
    log::info!(
        "lbd {} serving {} (pid {})",
        env!("CARGO_PKG_VERSION"),
        path.display(),
        std::process::id()
    );
    let result = supervisor.run(&mut signals, &commands);
    commands.stop();
    result?;
    log::info!("lbd stopped");
    Ok(())
}
