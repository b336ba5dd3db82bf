//! `lbd worker`: the entry of a worker process, started by the supervisor.
//!
//! It takes its inherited descriptors (the config text and one listening socket per
//! listener), builds the event loop, then enters the sandbox (sandbox.rs) before it reads any
//! network input, and serves until SIGTERM, after which it drains and exits 0.

use crate::{fds, sandbox, test_hooks};
use anyhow::Context as _;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    /// This worker's index (0-based) among the supervisor's workers.
    #[arg(long)]
    pub index: usize,
    /// Inherited fd holding the configuration main checked (JSON: it is neither parsed as
    /// a config file nor validated again here).
    #[arg(long)]
    pub config_fd: i32,
    /// Inherited listening sockets, one per listener, in config order.
    #[arg(long = "listener-fd")]
    pub listener_fds: Vec<i32>,
    /// Inherited channel to the supervisor (configuration updates).
    #[arg(long)]
    pub channel_fd: Option<i32>,
    /// Inherited write end of the trace pipe: where the SIGSYS handler names a syscall the
    /// sandbox refused (sandbox.rs).
    #[arg(long)]
    pub trace_fd: Option<i32>,
    /// Inherited WORKERS maps of the eBPF steering programs (one per listener), where this
    /// worker publishes its live connection count.
    #[arg(long = "workers-map-fd")]
    pub workers_map_fds: Vec<i32>,
    /// Inherited memfd of the request rates shared by every worker (frontends'
    /// `rate_limit`), of `lb_proxy::rate_limit::WORDS` words.
    #[arg(long)]
    pub rates_fd: Option<i32>,
    /// Inherited memfd of the session ticket keys every worker shares
    /// (`lb_proxy::tickets::WORDS` words).
    #[arg(long)]
    pub tickets_fd: Option<i32>,
}

/// Publishes the live count into every steering program's WORKERS map (shared memory).
struct SteeringGauge {
    maps: Vec<lb_ebpf_common::mmap::WorkerStates>,
    index: u32,
}

impl lb_proxy::LiveGauge for SteeringGauge {
    fn publish(&mut self, live: u32) {
        for map in &self.maps {
            if let Some(slot) = map.live(self.index) {
                slot.store(live, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

pub fn run(args: &WorkerArgs) -> anyhow::Result<()> {
    let file = fds::file_from_fd(args.config_fd)?;
    let text = fds::read_all(&file).context("reading the config handed by the supervisor")?;
    drop(file);
    let config = lb_config::protocol::channel::decode_config(text.as_bytes())
        .context("reading the config handed by the supervisor")?;
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
    // Mapped now: the sandbox forbids mmap of anything but anonymous memory... in spirit;
    // the mapping itself outlives the fds, which are closed here.
    let mut maps = Vec::new();
    for &fd in &args.workers_map_fds {
        let owned = fds::owned_from_fd(fd)?;
        maps.push(
            lb_ebpf_common::mmap::WorkerStates::map(std::os::fd::AsFd::as_fd(&owned))
                .with_context(|| format!("mapping the steering WORKERS map (fd {fd})"))?,
        );
    }
    let rates = match args.rates_fd {
        None => None,
        Some(fd) => {
            let owned = fds::owned_from_fd(fd)?;
            Some(
                lb_ebpf_common::mmap::SharedWords::map(
                    std::os::fd::AsFd::as_fd(&owned),
                    lb_proxy::rate_limit::WORDS,
                )
                .with_context(|| format!("mapping the table of request rates (fd {fd})"))?,
            )
        }
    };
    let tickets: Option<Box<dyn lb_proxy::rate_limit::SharedSlots + Sync>> = match args.tickets_fd {
        None => None,
        Some(fd) => {
            let owned = fds::owned_from_fd(fd)?;
            Some(Box::new(crate::tickets::Mapped(
                lb_ebpf_common::mmap::SharedWords::map(
                    std::os::fd::AsFd::as_fd(&owned),
                    lb_proxy::tickets::WORDS,
                )
                .with_context(|| format!("mapping the session ticket keys (fd {fd})"))?,
            )))
        }
    };
    let mut worker = lb_proxy::Worker::with_tickets(&config, listeners, tickets)?;
    if let Some(rates) = rates {
        worker.set_rates(lb_proxy::rate_limit::RateTable::new(Box::new(
            crate::tickets::Mapped(rates),
        )));
    }
    if let Some(fd) = args.channel_fd {
        let channel = std::os::unix::net::UnixStream::from(fds::owned_from_fd(fd)?);
        worker.set_control(channel)?;
    }
    if !maps.is_empty() {
        worker.set_gauge(Box::new(SteeringGauge {
            maps,
            index: u32::try_from(args.index).context("worker index")?,
        }));
    }
    let probe = test_hooks::seccomp_probe();
    // Read before the sandbox closes /proc; unmapped once inside it, after the filter's own
    // set-up code has run.
    let startup_pages = crate::pages::FilePages::find()
        .map_err(|e| log::warn!("reading /proc/self/smaps: {e}"))
        .unwrap_or_default();
    sandbox::enter(
        config.user.as_deref(),
        config.group.as_deref(),
        args.trace_fd,
    )
    .context("entering the sandbox")?;
    match startup_pages.unmap() {
        Ok(()) => log::debug!(
            "unmapped {} KiB of the binary's start-up pages",
            startup_pages.resident_kib()
        ),
        Err(e) => log::warn!("unmapping the start-up pages: {e}"),
    }
    log::info!("worker {} sandboxed and serving", args.index);
    if let Some(probe) = probe {
        // Test-only: prove that the filter is on in a real worker. The call is not in the
        // allowlist, so the kernel stops this process with SIGSYS before it returns.
        log::warn!(
            "{} is set: making a forbidden syscall ({probe})",
            test_hooks::SECCOMP_PROBE
        );
        let listener = args.listener_fds.first().copied().unwrap_or(-1);
        let what = sandbox::probe::forbidden_call(&probe, listener);
        anyhow::bail!("the forbidden syscall was allowed ({what}): the sandbox is not enforcing");
    }
    worker.run(&stop)?;
    Ok(())
}
