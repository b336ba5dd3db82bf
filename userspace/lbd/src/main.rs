//! `lbd`, the kakehi load balancer daemon.
//!
//! Today it reads and validates the config, binds every listener, and runs one worker event
//! loop (lb-proxy) in the foreground until SIGTERM or SIGINT, after which it drains and exits
//! 0. The supervisor with several sandboxed workers and eBPF steering builds on the same
//! pieces: `listeners.rs` binds, lb-proxy's `Worker` serves.

#![forbid(unsafe_code)]

mod listeners;
mod logger;

use anyhow::Context as _;
use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(name = "lbd", version, about = "kakehi load balancer daemon")]
struct Args {
    /// The configuration file (TOML).
    #[arg(short, long, value_name = "FILE")]
    config: PathBuf,
    /// Validate the configuration and exit: 0 when valid, 1 otherwise.
    #[arg(long)]
    check: bool,
    /// Log level for lbd's own messages (error, warn, info, debug).
    #[arg(long, default_value = "info", value_parser = parse_level)]
    log_level: log::LevelFilter,
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("unknown log level {s:?}: use error, warn, info or debug"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    logger::init(args.log_level);
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> anyhow::Result<()> {
    // ConfigError already names the file, line, field and cause: print it once.
    let config = lb_config::load(&args.config).map_err(|e| anyhow::anyhow!("{e}"))?;
    if args.check {
        println!("{}: configuration is valid", args.config.display());
        return Ok(());
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing the signal handlers")?;
    }
    let bound = listeners::bind_all(&config)?;
    let mut worker = lb_proxy::Worker::new(&config, bound)?;
    for addr in worker.local_addrs() {
        log::info!("listening on {addr}");
    }
    log::info!(
        "lbd {} serving {} (pid {})",
        env!("CARGO_PKG_VERSION"),
        args.config.display(),
        std::process::id()
    );
    worker.run(&stop)?;
    log::info!("lbd stopped");
    Ok(())
}
