//! The `lbd` under test: starting it on picked ports (or a given config file), readiness,
//! its output, its processes and memory, and stopping it.

use super::config::steering_for_this_netns;
use super::ports::free_addr;
use super::procs::{live_children, process_memory, process_tree, stop_process, Memory};
use super::tempdir::TempDir;
use super::wait::{wait_until, POLL};
use std::fs::{self, File};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long `lbd` may take to accept on every listener.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// How long `lbd` has to exit after SIGTERM before it gets SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Attempts at starting `lbd` when a picked port turned out to be taken.
const START_ATTEMPTS: usize = 5;

/// The `lbd` binary cargo built for these tests.
pub fn lbd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_lbd")
}

/// Why `lbd` did not come up.
enum Start {
    Ready,
    Exited(ExitStatus),
    TimedOut,
}

/// A running `lbd --config FILE`, stopped with SIGTERM (then SIGKILL) when dropped.
#[derive(Debug)]
pub struct Lbd {
    child: Child,
    status: Option<ExitStatus>,
    /// After `lbctl upgrade`: the main process now serving (not a child of the test).
    main: Option<i32>,
    /// The listener addresses, in the order the config closure received them.
    pub addrs: Vec<SocketAddr>,
    pub config_path: PathBuf,
    pub config_text: String,
    stdout: PathBuf,
    stderr: PathBuf,
    dir: TempDir,
}

/// A "freshly built" lbd for `lbctl upgrade`: a copy of the test's binary with bytes appended
/// (ignored by the loader), so it is another file with another binary id.
pub fn fresh_binary(dir: &Path, n: usize) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join(format!("lbd-next-{n}"));
    let mut bytes = fs::read(lbd_bin()).unwrap();
    bytes.extend_from_slice(format!("\nkakehi test build {n}\n").as_bytes());
    fs::write(&path, bytes).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

impl Lbd {
    /// Starts `lbd` with one listener; `config` gets its address and returns the config text
    /// (everything but `command_socket`, which the harness sets into the temp dir).
    pub fn start(config: impl Fn(SocketAddr) -> String) -> Lbd {
        Self::start_multi(1, |a| config(a[0]))
    }

    /// Starts `lbd` with `listeners` listener addresses handed to `config`.
    pub fn start_multi(listeners: usize, config: impl Fn(&[SocketAddr]) -> String) -> Lbd {
        let dir = TempDir::new("lbd");
        let socket = dir.path().join("lbd.sock");
        for attempt in 0..START_ATTEMPTS {
            let addrs: Vec<SocketAddr> = (0..listeners).map(|_| free_addr()).collect();
            let text = format!(
                "command_socket = \"{}\"\n{}",
                socket.display(),
                steering_for_this_netns(&config(&addrs))
            );
            let config_path = dir.write("lbd.toml", &text);
            let (mut child, stdout, stderr) =
                spawn_logged(&config_path, dir.path(), &format!(".{attempt}"));
            match wait_ready(&mut child, &addrs) {
                Start::Ready => {
                    return Lbd {
                        child,
                        status: None,
                        main: None,
                        addrs,
                        config_path,
                        config_text: text,
                        stdout,
                        stderr,
                        dir,
                    }
                }
                Start::Exited(status) => {
                    let err = fs::read_to_string(&stderr).unwrap_or_default();
                    let taken =
                        err.contains("cannot bind") || err.contains("Address already in use");
                    if taken && attempt + 1 < START_ATTEMPTS {
                        continue;
                    }
                    panic!("lbd exited at start ({status}):\n{err}\nconfig:\n{text}");
                }
                Start::TimedOut => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let err = fs::read_to_string(&stderr).unwrap_or_default();
                    panic!(
                        "lbd did not accept on {addrs:?} within {START_DEADLINE:?}:\n{err}\nconfig:\n{text}"
                    );
                }
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// The first (often only) listener.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// The main process serving now: the one the test started, or the one an upgrade made.
    pub fn pid(&self) -> i32 {
        self.main
            .unwrap_or_else(|| i32::try_from(self.child.id()).unwrap())
    }

    /// The pid of the lbd the test started (it exits after handing over in an upgrade).
    pub fn first_pid(&self) -> i32 {
        i32::try_from(self.child.id()).unwrap()
    }

    /// Records that `pid` is the main process now (after `lbctl upgrade`): `pid()`, `pids()`
    /// and stopping follow it.
    pub fn follow_main(&mut self, pid: i32) {
        if pid != self.first_pid() {
            self.main = Some(pid);
        }
    }

    pub fn dir(&self) -> &TempDir {
        &self.dir
    }

    /// Sends `signal` to the process.
    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.pid()), signal).expect("kill(lbd)");
    }

    /// Waits for the process to exit, at most `deadline`.
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        let child = &mut self.child;
        let mut status = None;
        wait_until(deadline, || {
            status = child.try_wait().expect("wait(lbd)");
            status.is_some()
        });
        self.status = status;
        status
    }

    /// SIGTERM, up to 5 s for it to exit, then SIGKILL; returns how it exited.
    pub fn stop(mut self) -> ExitStatus {
        self.shutdown()
    }

    /// Like [`Lbd::stop`], keeping the value to read its output afterwards.
    pub fn shutdown(&mut self) -> ExitStatus {
        if let Some(main) = self.main.take() {
            stop_process(main, STOP_GRACE);
        }
        if let Some(status) = self.status {
            return status;
        }
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
        }
        if let Some(status) = self.wait_exit(STOP_GRACE) {
            return status;
        }
        eprintln!(
            "lbd (pid {}) ignored SIGTERM for {STOP_GRACE:?}: SIGKILL",
            self.pid()
        );
        for pid in self.pids().into_iter().skip(1) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let status = self.child.wait().expect("wait(lbd)");
        self.status = Some(status);
        status
    }

    /// Everything `lbd` wrote to stdout so far (the access log, by default).
    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// Everything `lbd` wrote to stderr so far (its own log lines).
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits (5 s at most) until stdout holds at least `n` lines, and returns them all.
    pub fn wait_stdout_lines(&self, n: usize) -> Vec<String> {
        let mut lines = Vec::new();
        wait_until(Duration::from_secs(5), || {
            lines = self.stdout().lines().map(str::to_owned).collect();
            lines.len() >= n
        });
        lines
    }

    /// The pid of `lbd` followed by those of all its descendants (its worker processes).
    pub fn pids(&self) -> Vec<i32> {
        process_tree(self.pid())
    }

    /// `VmRSS` and `VmHWM` of `lbd` and its worker processes, in KiB, added up: the sum of the
    /// peaks bounds the peak of the sum.
    pub fn memory(&self) -> Memory {
        self.pids()
            .into_iter()
            .filter_map(process_memory)
            .fold(Memory::default(), |a, m| Memory {
                rss_kib: a.rss_kib + m.rss_kib,
                hwm_kib: a.hwm_kib + m.hwm_kib,
            })
    }

    /// Like [`Lbd::start`], but without connecting to the listener to see it ready: `lbd` is
    /// ready when `ready(stderr)` holds (10 s at most). For tests that account for every
    /// connection the listener ever receives (the eBPF steering counters), which the readiness
    /// probe of [`Lbd::start`] would add to.
    pub fn start_until(config: impl Fn(SocketAddr) -> String, ready: impl Fn(&str) -> bool) -> Lbd {
        let dir = TempDir::new("lbd");
        let socket = dir.path().join("lbd.sock");
        for attempt in 0..START_ATTEMPTS {
            let addrs = vec![free_addr()];
            let text = format!(
                "command_socket = \"{}\"\n{}",
                socket.display(),
                steering_for_this_netns(&config(addrs[0]))
            );
            let config_path = dir.write("lbd.toml", &text);
            let (mut child, stdout, stderr) =
                spawn_logged(&config_path, dir.path(), &format!(".{attempt}"));
            let mut exited = None;
            let up = wait_until(START_DEADLINE, || {
                if let Some(status) = child.try_wait().expect("wait(lbd)") {
                    exited = Some(status);
                    return true;
                }
                ready(&fs::read_to_string(&stderr).unwrap_or_default())
            });
            let err = fs::read_to_string(&stderr).unwrap_or_default();
            if let Some(status) = exited {
                let taken = err.contains("cannot bind") || err.contains("Address already in use");
                if taken && attempt + 1 < START_ATTEMPTS {
                    continue;
                }
                panic!("lbd exited at start ({status}):\n{err}\nconfig:\n{text}");
            }
            if !up {
                let _ = child.kill();
                let _ = child.wait();
                panic!("lbd was not ready within {START_DEADLINE:?}:\n{err}\nconfig:\n{text}");
            }
            return Lbd {
                child,
                status: None,
                main: None,
                addrs,
                config_path,
                config_text: text,
                stdout,
                stderr,
                dir,
            };
        }
        unreachable!("the last attempt returns or panics")
    }

    /// The live (not zombie) worker processes: the direct children of `lbd`.
    pub fn workers(&self) -> Vec<i32> {
        live_children(self.pid())
    }

    /// Starts `lbd --config CONFIG_PATH` on a config file the test wrote itself (a saved state,
    /// say), whose listeners are `addrs` and whose `command_socket` it chose. No retry on a
    /// taken port: the addresses are the file's. Its stdout and stderr go to a new temp dir.
    pub fn start_file(config_path: &Path, addrs: Vec<SocketAddr>) -> Lbd {
        let dir = TempDir::new("lbd-file");
        let text = fs::read_to_string(config_path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", config_path.display()));
        let (mut child, stdout, stderr) = spawn_logged(config_path, dir.path(), "");
        match wait_ready(&mut child, &addrs) {
            Start::Ready => Lbd {
                child,
                status: None,
                main: None,
                addrs,
                config_path: config_path.to_path_buf(),
                config_text: text,
                stdout,
                stderr,
                dir,
            },
            Start::Exited(status) => {
                let err = fs::read_to_string(&stderr).unwrap_or_default();
                panic!("lbd exited at start ({status}):\n{err}\nconfig:\n{text}");
            }
            Start::TimedOut => {
                let _ = child.kill();
                let _ = child.wait();
                let err = fs::read_to_string(&stderr).unwrap_or_default();
                panic!(
                    "lbd did not accept on {addrs:?} within {START_DEADLINE:?}:\n{err}\nconfig:\n{text}"
                );
            }
        }
    }
}

impl Drop for Lbd {
    fn drop(&mut self) {
        let status = self.shutdown();
        if thread::panicking() {
            eprintln!(
                "lbd exited with {status}; config {}:\n{}\n--- lbd stderr ---\n{}",
                self.config_path.display(),
                self.config_text,
                tail(&self.stderr(), 4000)
            );
        }
    }
}

fn tail(s: &str, max: usize) -> &str {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

fn wait_ready(child: &mut Child, addrs: &[SocketAddr]) -> Start {
    let end = Instant::now() + START_DEADLINE;
    let mut ready = vec![false; addrs.len()];
    loop {
        if let Some(status) = child.try_wait().expect("wait(lbd)") {
            return Start::Exited(status);
        }
        for (i, addr) in addrs.iter().enumerate() {
            if !ready[i] {
                ready[i] = TcpStream::connect_timeout(addr, Duration::from_millis(200)).is_ok();
            }
        }
        if ready.iter().all(|r| *r) {
            return Start::Ready;
        }
        if Instant::now() >= end {
            return Start::TimedOut;
        }
        thread::sleep(POLL);
    }
}

/// Spawns `lbd --config CONFIG_PATH` with its stdout and stderr in `dir`'s
/// `stdout{suffix}.log` and `stderr{suffix}.log`; returns the child and the two paths.
fn spawn_logged(config_path: &Path, dir: &Path, suffix: &str) -> (Child, PathBuf, PathBuf) {
    let stdout = dir.join(format!("stdout{suffix}.log"));
    let stderr = dir.join(format!("stderr{suffix}.log"));
    let child = Command::new(lbd_bin())
        .arg("--config")
        .arg(config_path)
        .stdin(Stdio::null())
        .stdout(File::create(&stdout).unwrap())
        .stderr(File::create(&stderr).unwrap())
        .spawn()
        .expect("spawn lbd");
    (child, stdout, stderr)
}

/// Runs `lbd ARGS...` to completion (10 s at most) and returns its output.
pub fn run_lbd(args: &[&std::ffi::OsStr]) -> Output {
    let mut child = Command::new(lbd_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lbd");
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
    let exited = wait_until(Duration::from_secs(10), || {
        child.try_wait().expect("wait(lbd)").is_some()
    });
    if !exited {
        let _ = kill(pid, Signal::SIGKILL);
    }
    let out = child.wait_with_output().expect("lbd output");
    assert!(exited, "lbd {args:?} did not exit within 10 s");
    out
}

/// A readiness test for [`Lbd::start_until`]: the supervisor logged the start of workers
/// `0..n` (after which the steering program counts them active) and each of them logged that
/// it is sandboxed and serving.
pub fn workers_ready(n: usize) -> impl Fn(&str) -> bool {
    move |log: &str| {
        (0..n).all(|i| {
            log.contains(&format!("worker {i} started (pid "))
                && log.contains(&format!("worker {i} sandboxed and serving"))
        })
    }
}
