//! `lbd worker`: the entry of a worker process, started by the supervisor.
//!
//! It takes its inherited descriptors (the config text and one listening socket per
//! listener), builds the event loop, then enters the sandbox (sandbox.rs) before it reads any
//! network input, and serves until SIGTERM, after which it drains and exits 0.

use crate::{fds, sandbox};
use anyhow::Context as _;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    /// This worker's index (0-based) among the supervisor's workers.
    #[arg(long)]
    pub index: usize,
    /// Inherited fd holding the configuration text.
    #[arg(long)]
    pub config_fd: i32,
    /// The file the configuration came from (relative paths in it resolve against it).
    #[arg(long)]
    pub source: PathBuf,
    /// Inherited listening sockets, one per listener, in config order.
    #[arg(long = "listener-fd")]
    pub listener_fds: Vec<i32>,
}

pub fn run(args: &WorkerArgs) -> anyhow::Result<()> {
    let file = fds::file_from_fd(args.config_fd)?;
    let text = fds::read_all(&file).context("reading the config handed by the supervisor")?;
    drop(file);
    let config = lb_config::parse_str(&text, &args.source).map_err(|e| anyhow::anyhow!("{e}"))?;
    let listeners = args
        .listener_fds
        .iter()
        .enumerate()
        .map(|(i, &fd)| fds::listener_from_fd(fd).map(|l| (i, l)))
        .collect::<Result<Vec<_>, _>>()?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("installing the signal handlers")?;
    }
    let mut worker = lb_proxy::Worker::new(&config, listeners)?;
    sandbox::enter(config.user.as_deref(), config.group.as_deref())
        .context("entering the sandbox")?;
    log::info!("worker {} sandboxed and serving", args.index);
    worker.run(&stop)?;
    Ok(())
}
