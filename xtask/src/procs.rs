//! Child processes and signals, shared by every xtask command.
//!
//! Owns: the signal mask (SIGINT/SIGTERM/SIGCHLD are blocked and read from a signalfd, so a
//! Ctrl-C never kills xtask between "started a child" and "stopped it"), one-shot steps whose
//! output streams to the terminal (`run_step`), long-running children stopped by pid with
//! SIGTERM then SIGKILL (`Proc`, `Group`, both stopping on drop), CPU pinning and ports.
//! It does not know what the children are: the commands decide that.
//!
//! Every child starts with the default signal mask (std would pass ours on) and
//! `PR_SET_PDEATHSIG = SIGTERM`, so even a SIGKILLed xtask leaves no proxy or origin holding a
//! port behind it. Children are started through `run_step`, `Proc` or `output`, never bare. This is the only module with `unsafe` (one `pre_exec`).

use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{sched_setaffinity, CpuSet};
use nix::sys::signal::{kill, SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::{getpid, getppid, Pid};

/// How long a child gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// SIGINT, SIGTERM and SIGCHLD, blocked on the (only) thread and read from a signalfd.
///
/// Children do not inherit the mask: std resets it before exec.
pub struct Signals {
    fd: SignalFd,
    stop: std::cell::Cell<Option<Signal>>,
}

impl Signals {
    pub fn install() -> Result<Self> {
        let mut set = SigSet::empty();
        set.add(Signal::SIGINT);
        set.add(Signal::SIGTERM);
        set.add(Signal::SIGCHLD);
        set.thread_block()
            .context("blocking SIGINT/SIGTERM/SIGCHLD")?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
            .context("creating a signalfd")?;
        Ok(Self {
            fd,
            stop: std::cell::Cell::new(None),
        })
    }

    /// Waits up to `timeout` for a signal. Returns the first SIGINT/SIGTERM seen (now or
    /// earlier: it sticks), else `None` when the timeout passed or a child changed state.
    pub fn wait(&self, timeout: Duration) -> Result<Option<Signal>> {
        if self.stop.get().is_none() {
            let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(error) => return Err(error).context("polling the signalfd"),
            }
            self.drain()?;
        }
        Ok(self.stop.get())
    }

    /// The SIGINT/SIGTERM received so far, if any, without waiting.
    pub fn stop_requested(&self) -> Result<Option<Signal>> {
        self.drain()?;
        Ok(self.stop.get())
    }

    fn drain(&self) -> Result<()> {
        while let Some(info) = self.fd.read_signal().context("reading the signalfd")? {
            let signal = i32::try_from(info.ssi_signo)
                .ok()
                .and_then(|n| Signal::try_from(n).ok());
            if let Some(signal @ (Signal::SIGINT | Signal::SIGTERM)) = signal {
                if self.stop.get().is_none() {
                    self.stop.set(Some(signal));
                }
            }
        }
        Ok(())
    }
}

/// Options for spawning a child.
#[derive(Default, Clone, Copy)]
pub struct SpawnOptions {
    /// Pin the child (and what it forks) to this CPU.
    pub cpu: Option<usize>,
    /// Put the child in a process group of its own, so a terminal Ctrl-C reaches only xtask,
    /// which then stops the child itself, in order.
    pub own_group: bool,
}

fn prepare(cmd: &mut Command, options: SpawnOptions) -> Result<()> {
    let parent = getpid();
    let cpus = match options.cpu {
        Some(cpu) => {
            let mut set = CpuSet::new();
            set.set(cpu)
                .with_context(|| format!("cpu {cpu} out of range"))?;
            Some(set)
        }
        None => None,
    };
    if options.own_group {
        cmd.process_group(0);
    }
    // SAFETY: the closure runs between fork and exec and only makes four syscalls
    // (sigprocmask, prctl, getppid, sched_setaffinity) through nix: no allocation, no lock, no
    // unwinding.
    unsafe {
        cmd.pre_exec(move || {
            // std passes the signal mask on to the child: unblock what `Signals` blocked.
            SigSet::empty().thread_set_mask()?;
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
            if getppid() != parent {
                // xtask died before prctl took effect.
                return Err(std::io::Error::other("parent exited"));
            }
            if let Some(set) = &cpus {
                sched_setaffinity(Pid::from_raw(0), set)?;
            }
            Ok(())
        });
    }
    Ok(())
}

/// `cmd.output()` for a short command (a query, a version, a check): its stdin is empty, and
/// it gets the same signal mask and parent-death signal as every other child.
pub fn output(cmd: &mut Command) -> std::io::Result<std::process::Output> {
    prepare(cmd, SpawnOptions::default()).map_err(std::io::Error::other)?;
    cmd.stdin(Stdio::null()).output()
}

/// A program name for messages: the file name of the command's program.
fn program_name(cmd: &Command) -> String {
    Path::new(cmd.get_program())
        .file_name()
        .map_or_else(|| "?".into(), |name| name.to_string_lossy().into_owned())
}

/// The command line, for messages.
pub fn display(cmd: &Command) -> String {
    let mut line = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        let arg = arg.to_string_lossy();
        if arg.contains([' ', '\'', '"', '$']) || arg.is_empty() {
            line.push_str(&format!(" '{}'", arg.replace('\'', r"'\''")));
        } else {
            line.push(' ');
            line.push_str(&arg);
        }
    }
    line
}

/// Runs `cmd` to completion with its output streamed to ours and no stdin. A SIGINT/SIGTERM
/// to xtask stops it (SIGTERM, then SIGKILL) and fails the step.
pub fn run_step(signals: &Signals, cmd: &mut Command) -> Result<()> {
    let line = display(cmd);
    let status = run_status(signals, cmd)?;
    if !status.success() {
        bail!("`{line}` failed: {}", describe(status));
    }
    Ok(())
}

/// Like `run_step` but returns the exit status instead of failing on a non-zero one.
pub fn run_status(signals: &Signals, cmd: &mut Command) -> Result<ExitStatus> {
    cmd.stdin(Stdio::null());
    let mut proc = Proc::spawn(&program_name(cmd), cmd, SpawnOptions::default())?;
    loop {
        if let Some(status) = proc.try_exited()? {
            return Ok(status);
        }
        if let Some(signal) = signals.wait(Duration::from_millis(200))? {
            proc.stop();
            bail!("interrupted by {signal}: stopped `{}`", display(cmd));
        }
    }
}

/// A long-running child, stopped by pid when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
    status: Option<ExitStatus>,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, options: SpawnOptions) -> Result<Self> {
        prepare(cmd, options)?;
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: `{}`", display(cmd)))?;
        Ok(Self {
            name: name.to_string(),
            child,
            status: None,
        })
    }

    /// Spawns with stdout and stderr appended to `log`.
    pub fn spawn_logged(
        name: &str,
        cmd: &mut Command,
        options: SpawnOptions,
        log: &Path,
    ) -> Result<Self> {
        let file = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        Self::spawn(name, cmd, options)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the child has exited (reaping it), else `None`.
    pub fn try_exited(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.name))?;
        }
        Ok(self.status)
    }

    /// SIGINT, as a terminal's Ctrl-C (strace then detaches and writes its summary).
    pub fn interrupt(&self) {
        self.signal(Signal::SIGINT);
    }

    fn signal(&self, signal: Signal) {
        if self.status.is_none() {
            let pid = i32::try_from(self.child.id()).unwrap_or(i32::MAX);
            let _ = kill(Pid::from_raw(pid), signal);
        }
    }

    /// SIGTERM, up to `STOP_GRACE` to exit, then SIGKILL. Returns the exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        stop_all(std::slice::from_mut(self));
        self.status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stops every child at once: SIGTERM to all, one shared grace period, SIGKILL to the rest.
pub fn stop_all(procs: &mut [Proc]) {
    for proc in procs.iter_mut() {
        if let Ok(None) = proc.try_exited() {
            proc.signal(Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + STOP_GRACE;
    loop {
        let mut running = 0;
        for proc in procs.iter_mut() {
            if !matches!(proc.try_exited(), Ok(Some(_))) {
                running += 1;
            }
        }
        if running == 0 {
            return;
        }
        if Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for proc in procs.iter_mut() {
        if let Ok(None) = proc.try_exited() {
            eprintln!(
                "xtask: {} (pid {}) ignored SIGTERM for {}s: SIGKILL",
                proc.name,
                proc.pid(),
                STOP_GRACE.as_secs()
            );
            proc.signal(Signal::SIGKILL);
            proc.status = proc.child.wait().ok();
        }
    }
}

/// Children stopped together (SIGTERM to all, then SIGKILL) when the group is dropped.
#[derive(Default)]
pub struct Group {
    pub procs: Vec<Proc>,
}

impl Group {
    pub fn push(&mut self, proc: Proc) -> &mut Proc {
        self.procs.push(proc);
        self.procs.last_mut().expect("just pushed")
    }

    /// The first child that has exited, with its status.
    pub fn exited(&mut self) -> Result<Option<(String, ExitStatus)>> {
        for proc in &mut self.procs {
            if let Some(status) = proc.try_exited()? {
                return Ok(Some((proc.name.clone(), status)));
            }
        }
        Ok(None)
    }

    pub fn stop_all(&mut self) {
        stop_all(&mut self.procs);
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// "exit status 3" / "killed by SIGSEGV".
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(signal)) => match Signal::try_from(signal) {
            Ok(signal) => format!("killed by {signal}"),
            Err(_) => format!("killed by signal {signal}"),
        },
        (None, None) => format!("{status}"),
    }
}

/// The exit code a shell would report for `status` (128 + signal when killed).
pub fn exit_code(status: ExitStatus) -> u8 {
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(signal)) => u8::try_from(128 + (signal & 0x7f)).unwrap_or(1),
        (None, None) => 1,
    }
}

/// True when nothing listens on `addr` and we could bind it.
pub fn port_free(addr: SocketAddr) -> bool {
    TcpListener::bind(addr).is_ok()
}

/// Free 127.0.0.1 ports, distinct from each other (all held open while choosing).
pub fn free_ports(count: usize) -> Result<Vec<u16>> {
    let listeners = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0"))
        .collect::<Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

/// Waits until `addr` accepts a TCP connection, for at most `timeout`. Fails early, with the
/// child's name and status, when a watched child exits, and when xtask is told to stop.
pub fn wait_for_accept(
    signals: &Signals,
    addr: SocketAddr,
    timeout: Duration,
    watched: &mut [Proc],
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        for proc in watched.iter_mut() {
            if let Some(status) = proc.try_exited()? {
                bail!(
                    "{} exited ({}) before {addr} accepted connections",
                    proc.name,
                    describe(status)
                );
            }
        }
        if let Some(signal) = signals.stop_requested()? {
            bail!("interrupted by {signal} while waiting for {addr}");
        }
        if Instant::now() >= deadline {
            bail!(
                "nothing accepted connections on {addr} within {}s",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(exit_code(ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(ExitStatus::from_raw(9)), 137);
        assert_eq!(describe(ExitStatus::from_raw(9)), "killed by SIGKILL");
    }

    #[test]
    fn free_ports_are_distinct_and_bindable() {
        let ports = free_ports(3).unwrap();
        assert_eq!(ports.len(), 3);
        assert!(ports[0] != ports[1] && ports[1] != ports[2] && ports[0] != ports[2]);
        assert!(port_free(SocketAddr::from(([127, 0, 0, 1], ports[0]))));
    }

    #[test]
    fn children_start_with_no_signal_blocked() {
        // Blocks SIGINT/SIGTERM/SIGCHLD on this test's thread, as xtask's main does.
        let _signals = Signals::install().unwrap();
        let out = output(Command::new("grep").args(["SigBlk", "/proc/self/status"])).unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.trim(), "SigBlk:\t0000000000000000");
    }

    #[test]
    fn display_quotes_what_a_shell_would_split() {
        let mut cmd = Command::new("wrk");
        cmd.args(["-H", "Connection: close", "-t1"]);
        assert_eq!(display(&cmd), "wrk -H 'Connection: close' -t1");
    }
}
