//! `lbd`, the kakehi load balancer daemon.
//!
//! `lbd --config FILE` validates the config, binds every listener and supervises `workers`
//! sandboxed worker processes (supervisor.rs) until SIGTERM or SIGINT, after which it drains
//! and exits 0. `lbd --config FILE --check` only validates. `lbd worker` is the worker
//! process's own entry (worker_main.rs), started by the supervisor, not by people.
//! `lbd --upgrade-fd N` is the next main of an upgrade, started by the running one
//! (upgrade.rs), which hands it everything over fd N.

#![deny(unsafe_code)]

mod answers;
mod bgp;
mod channel;
mod command;
mod fds;
mod generation;
mod handoff;
mod health;
mod listeners;
mod logger;
mod metrics;
mod observe;
mod pages;
mod sandbox;
#[allow(dead_code)] // The fd handoff of `lbctl upgrade` and tests/steering.rs use the rest.
mod steering;
mod supervisor;
mod sync;
mod test_hooks;
mod tickets;
mod upgrade;
mod verbs;
mod worker_main;
mod workers;

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
    /// The next main of an upgrade: the running lbd hands everything over on this fd.
    #[arg(long, value_name = "FD", hide = true, conflicts_with_all = ["config", "check"])]
    upgrade_fd: Option<i32>,
    /// Print lbd's manual page (roff) and exit: how `cargo xtask dist` makes lbd.8.
    #[arg(long, hide = true)]
    manpage: bool,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// A worker process (started by lbd itself).
    #[command(hide = true)]
    Worker(worker_main::WorkerArgs),
}

fn manpage() -> ExitCode {
    use std::io::Write as _;
    let command = <Args as clap::CommandFactory>::command();
    let mut page = Vec::new();
    if let Err(e) = clap_mangen::Man::new(command)
        .section("8")
        .render(&mut page)
    {
        eprintln!("lbd: rendering the manual page: {e}");
        return ExitCode::FAILURE;
    }
    let _ = std::io::stdout().write_all(&page);
    ExitCode::SUCCESS
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse()
        .map_err(|_| format!("unknown log level {s:?}: use error, warn, info or debug"))
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.manpage {
        return manpage();
    }
    logger::init(args.log_level);
    let result = match &args.command {
        Some(Cmd::Worker(worker)) => worker_main::run(worker),
        None => match args.upgrade_fd {
            Some(fd) => take_over(fd, args.log_level),
            None => run(&args),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lbd: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, "what: why: why", each cause once: the error types
/// of lbd say their cause in their own message, and anyhow's contexts do not.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
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
        upgrade::version(),
        path.display(),
        std::process::id()
    );
    match supervisor.start_generation(generation::READY_TIMEOUT) {
        Ok(()) => notify_ready(),
        // The loop goes on restarting workers that die, but lbd does not claim to be ready:
        // under systemd the start then times out and the unit fails, visibly.
        Err(e) => log::error!("not every worker is ready, so lbd does not report ready: {e}"),
    }
    serve(supervisor, &mut signals, commands)
}

/// Runs the supervisor until it stops or hands over to the next lbd.
fn serve(
    mut supervisor: supervisor::Supervisor,
    signals: &mut signal_hook::iterator::Signals,
    commands: command::CommandServer,
) -> anyhow::Result<()> {
    supervisor.set_command_socket(&commands)?;
    match supervisor.run(signals, &commands) {
        supervisor::Exit::HandedOver => {
            // The socket file stays: the next lbd answers on it.
            drop(commands.handoff());
            log::info!("lbd handed over to the next generation; exiting");
        }
        supervisor::Exit::Stopped => {
            commands.stop();
            log::info!("lbd stopped");
        }
    }
    Ok(())
}

/// Tells systemd (when it started lbd with Type=notify) that lbd serves, and which pid is
/// the main process: after an upgrade, it is this one.
fn notify_ready() {
    let states = [
        sd_notify::NotifyState::MainPid(std::process::id()),
        sd_notify::NotifyState::Ready,
    ];
    if let Err(e) = sd_notify::notify(false, &states) {
        log::warn!("cannot notify systemd: {e}");
    }
}

/// The next main of `lbctl upgrade`: takes over what the running lbd hands over on `fd`,
/// starts its workers on the same sockets, says "ready", and serves once the running lbd
/// commits (or has gone away).
fn take_over(fd: i32, log_level: log::LevelFilter) -> anyhow::Result<()> {
    let mut channel = std::os::unix::net::UnixStream::from(fds::owned_from_fd(fd)?);
    let refuse = |channel: &mut std::os::unix::net::UnixStream, error: &anyhow::Error| {
        let reply = upgrade::Reply::Failed {
            error: one_line(error),
        };
        let _ = upgrade::reply(channel, &reply);
    };
    let mut signals = supervisor::Supervisor::signals()?;
    let handed = match upgrade::receive(&mut channel, generation::READY_TIMEOUT) {
        Ok(handed) => handed,
        Err(e) => {
            let e = anyhow::Error::from(e);
            refuse(&mut channel, &e);
            return Err(e.context("taking over from the running lbd"));
        }
    };
    log::info!(
        "lbd {} (pid {}) taking over from lbd {} (pid {}), generation {}",
        upgrade::version(),
        std::process::id(),
        handed.from_version,
        handed.from_pid,
        handed.generation + 1
    );
    let command_path = handed.config.command_socket.clone();
    let (mut supervisor, command) = match supervisor::Supervisor::adopt(handed, log_level) {
        Ok(adopted) => adopted,
        Err(e) => {
            let e = anyhow::Error::from(e);
            refuse(&mut channel, &e);
            return Err(e);
        }
    };
    if let Err(e) = supervisor.start_generation(generation::READY_TIMEOUT) {
        let e = anyhow::Error::from(e);
        refuse(&mut channel, &e);
        supervisor.retire_all();
        return Err(e);
    }
    if let Some(pause) = test_hooks::handoff_pause() {
        // Test-only: a window in which the test kills this process mid-handoff.
        log::warn!(
            "{} is set: pausing {pause:?} before saying ready",
            test_hooks::HANDOFF_PAUSE
        );
        std::thread::sleep(pause);
    }
    let ready = upgrade::Reply::Ready {
        pid: std::process::id(),
        version: upgrade::version().to_owned(),
        generation: supervisor.generation(),
    };
    if let Err(e) = upgrade::reply(&mut channel, &ready) {
        supervisor.retire_all();
        return Err(anyhow::Error::from(e).context("answering the running lbd"));
    }
    match upgrade::wait_commit(&mut channel, generation::READY_TIMEOUT) {
        Ok(true) => {}
        Ok(false) => log::warn!("the previous lbd went away after this one was ready: taking over"),
        Err(e) => {
            supervisor.retire_all();
            anyhow::bail!("the running lbd did not commit the upgrade: {e}");
        }
    }
    drop(channel);
    notify_ready();
    let commands = command::CommandServer::from_listener(
        command,
        &command_path,
        command::default_allowed_uids(),
    )
    .with_context(|| format!("command socket {}", command_path.display()))?;
    log::info!(
        "lbd generation {} serving (pid {})",
        supervisor.generation(),
        std::process::id()
    );
    serve(supervisor, &mut signals, commands)
}
