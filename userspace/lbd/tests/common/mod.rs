//! The end-to-end harness shared by every test file in `tests/`: it starts the real `lbd`
//! binary on ports it picks itself, talks raw HTTP/1.1 to it over `std::net::TcpStream`, and
//! stops it by pid.
//!
//! What it owns: free ports (bind `127.0.0.1:0` and drop, never handed out twice in one test
//! binary, with a retry when `lbd` still cannot bind), a unique temp dir per instance holding the
//! config and `lbd`'s stdout (the access log) and stderr, readiness by polling the listeners
//! (10 s deadline, no fixed sleeps), SIGTERM on drop (SIGKILL 5 s later), a small HTTP/1.1
//! response reader (Content-Length, chunked, close-delimited), `/proc/PID/status` memory
//! readings, and a `curl` runner that fails loudly when curl is missing. Every socket it opens
//! has read and write timeouts, so no test can hang. The origin servers come from lb-testkit;
//! the tests themselves decide what to send and what to expect.

// Test helpers: panicking on a broken setup is the point, and not every test binary uses every
// helper.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Read and write timeout of every client socket.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `lbd` may take to accept on every listener.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// How long `lbd` has to exit after SIGTERM before it gets SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Interval between two looks at something the test waits for.
const POLL: Duration = Duration::from_millis(5);
/// Attempts at starting `lbd` when a picked port turned out to be taken.
const START_ATTEMPTS: usize = 5;

/// The `lbd` binary cargo built for these tests.
pub fn lbd_bin() -> &'static str {
    env!("CARGO_BIN_EXE_lbd")
}

/// Polls `cond` until it holds or `deadline` passes; true when it held.
pub fn wait_until(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(POLL);
    }
}

/// Checks that `cond` keeps holding for the whole `window` (a negative observation: "nothing
/// arrives"). Returns false at the first moment it does not.
pub fn holds_for(window: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + window;
    loop {
        if !cond() {
            return false;
        }
        if Instant::now() >= end {
            return true;
        }
        thread::sleep(POLL);
    }
}

// ---- temp dirs and ports --------------------------------------------------------------------

/// A directory of its own under the system temp dir; removed on drop unless the test failed
/// (then its path is printed, to look at the config and the logs).
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "kakehi-e2e-{tag}-{}-{n}-{nanos:x}",
            std::process::id()
        ));
        fs::create_dir_all(&path).unwrap();
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `name` in the directory and returns its path.
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path.join(name);
        fs::write(&p, contents).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!("kept for inspection: {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// A loopback address whose port was free a moment ago and has not been handed out before in
/// this test binary (so two `lbd` of parallel tests never share one through SO_REUSEPORT).
pub fn free_addr() -> SocketAddr {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let mut ports = handed_out()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if ports.insert(addr.port()) {
            return addr;
        }
    }
}

/// A loopback port that refuses connections for as long as this value lives: the port is
/// bound but not listening, so nothing else can take it and a connect gets a reset.
#[derive(Debug)]
pub struct ClosedPort {
    _socket: socket2::Socket,
    pub addr: SocketAddr,
}

impl ClosedPort {
    pub fn new() -> ClosedPort {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        socket.bind(&any.into()).expect("bind 127.0.0.1:0");
        let addr = socket
            .local_addr()
            .unwrap()
            .as_socket()
            .expect("an inet address");
        ClosedPort {
            _socket: socket,
            addr,
        }
    }
}

/// A loopback listener that never accepts and whose accept queue is full, so a connect to it
/// hangs (the kernel drops the SYNs): a backend that cannot be reached in time.
#[derive(Debug)]
pub struct BlackHole {
    _listener: socket2::Socket,
    _fillers: Vec<socket2::Socket>,
    pub addr: SocketAddr,
}

impl BlackHole {
    pub fn new() -> BlackHole {
        let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        listener.bind(&any.into()).expect("bind");
        listener.listen(0).expect("listen");
        let addr = listener.local_addr().unwrap().as_socket().unwrap();
        let mut fillers = Vec::new();
        // Fill the accept queue until a connect no longer completes.
        for _ in 0..16 {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            let hung = match s.connect_timeout(&addr.into(), Duration::from_millis(300)) {
                Ok(()) => false,
                Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => true,
                Err(e) => panic!("filling the accept queue of {addr}: {e}"),
            };
            fillers.push(s);
            if hung {
                return BlackHole {
                    _listener: listener,
                    _fillers: fillers,
                    addr,
                };
            }
        }
        panic!("could not fill the accept queue of {addr}: connects keep succeeding");
    }
}

// ---- lbd ------------------------------------------------------------------------------------

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

/// `config` as lbd should run it in this thread's network namespace. eBPF steering is lbd's
/// default, and tests attach eBPF programs only inside a fresh namespace
/// ([`in_fresh_netns`]): a config that leaves `steering` unset gets `steering = "kernel"`
/// when the thread is still in the namespace the test process started in (its main thread's:
/// [`in_fresh_netns`] moves only the test's thread; pid 1's may not be readable here).
pub fn steering_for_this_netns(config: &str) -> String {
    let names_steering = config.lines().any(|l| {
        l.trim_start().starts_with("steering ") || l.trim_start().starts_with("steering=")
    });
    let ns = |path: &str| fs::read_link(path).ok();
    let in_machine_netns = ns("/proc/thread-self/ns/net") == ns("/proc/self/ns/net");
    if names_steering || !in_machine_netns {
        config.to_owned()
    } else {
        format!("steering = \"kernel\"\n{config}")
    }
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
            let stdout = dir.path().join(format!("stdout.{attempt}.log"));
            let stderr = dir.path().join(format!("stderr.{attempt}.log"));
            let mut child = Command::new(lbd_bin())
                .arg("--config")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(File::create(&stdout).unwrap())
                .stderr(File::create(&stderr).unwrap())
                .spawn()
                .expect("spawn lbd");
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
}

/// Whether `pid` is running (a zombie does not count: it has exited).
pub fn is_alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

/// SIGTERM to a process that is not the test's child (so it cannot be waited for), its end
/// awaited by looking at /proc, then SIGKILL to it and its descendants after `grace`.
pub fn stop_process(pid: i32, grace: Duration) {
    let tree = process_tree(pid);
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    if !wait_until(grace, || !is_alive(pid)) {
        eprintln!("pid {pid} ignored SIGTERM for {grace:?}: SIGKILL");
        for p in tree {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
    }
}

/// `pid` and its descendants, found by scanning `/proc/*/stat` for parent pids.
pub fn process_tree(pid: i32) -> Vec<i32> {
    let mut parents: Vec<(i32, i32)> = Vec::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<i32>().ok())
            else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(format!("/proc/{child}/stat")) else {
                continue;
            };
            // `pid (comm) state ppid ...`: comm may hold spaces and parentheses.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok());
            if let Some(ppid) = ppid {
                parents.push((child, ppid));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            parents
                .iter()
                .filter(|(_, p)| *p == parent)
                .map(|(c, _)| *c),
        );
        i += 1;
    }
    tree
}

/// `VmRSS` and `VmHWM` of one process; None when it is gone (or a zombie, which has none).
pub fn process_memory(pid: i32) -> Option<Memory> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    Some(Memory {
        rss_kib: field("VmRSS:")?,
        hwm_kib: field("VmHWM:")?,
    })
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

/// Memory figures from `/proc/PID/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// Resident set size now.
    pub rss_kib: u64,
    /// Peak resident set size since the process started.
    pub hwm_kib: u64,
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

// ---- a config in a few lines ----------------------------------------------------------------

/// `[{ address = "A" }, { address = "B" }]`.
pub fn backends(addrs: &[SocketAddr]) -> String {
    let items: Vec<String> = addrs
        .iter()
        .map(|a| format!("{{ address = \"{a}\" }}"))
        .collect();
    format!("[ {} ]", items.join(", "))
}

/// One listener and one cluster `app` serving every host and path from `backend_addrs`.
/// `top` comes first: top-level keys, then tables such as `[timeouts]`.
pub fn one_cluster(top: &str, listener: SocketAddr, backend_addrs: &[SocketAddr]) -> String {
    format!(
        "{top}\n[[listeners]]\naddress = \"{listener}\"\n\n[clusters.app]\n\
         frontends = [ {{ address = \"{listener}\" }} ]\nbackends = {}\n",
        backends(backend_addrs)
    )
}

// ---- HTTP/1.1 client ------------------------------------------------------------------------

/// A TCP connection with read and write timeouts.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// A response as the client received it.
#[derive(Debug, Clone)]
pub struct Response {
    pub version: String,
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// First header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every header named `name`.
    pub fn headers_named(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether a `Connection` header lists `close`.
    pub fn closes(&self) -> bool {
        self.headers_named("connection")
            .iter()
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("close"))
    }

    /// Asserts one of kakehi's own answers: a status in `allowed`, an HTML body.
    pub fn assert_html_answer(&self, allowed: &[u16]) {
        assert!(
            allowed.contains(&self.status),
            "expected one of {allowed:?}, got {} {} with body {:?}",
            self.status,
            self.reason,
            self.text()
        );
        let ct = self.header("content-type").unwrap_or_default();
        assert!(
            ct.to_ascii_lowercase().contains("text/html"),
            "a {} answer should be HTML, Content-Type is {ct:?}",
            self.status
        );
        assert!(
            self.text().to_ascii_lowercase().contains("<html"),
            "a {} answer should carry an HTML body, got {:?}",
            self.status,
            self.text()
        );
    }
}

/// A response head (status line and headers).
#[derive(Debug, Clone)]
pub struct Head {
    pub version: String,
    pub status: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
    Close,
}

impl Framing {
    /// The framing of a response to a request (HEAD or not), per RFC 9112 §6.3.
    pub fn of(head: &Head, head_request: bool) -> Framing {
        if head_request || head.status < 200 || head.status == 204 || head.status == 304 {
            return Framing::None;
        }
        let te = head.header("transfer-encoding").unwrap_or_default();
        if te
            .split(',')
            .next_back()
            .is_some_and(|t| t.trim().eq_ignore_ascii_case("chunked"))
        {
            return Framing::Chunked;
        }
        match head.header("content-length") {
            Some(n) => Framing::Length(
                n.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("bad Content-Length {n:?}")),
            ),
            None => Framing::Close,
        }
    }
}

fn read_line(r: &mut impl BufRead) -> io::Result<String> {
    let mut line = Vec::new();
    let n = r.by_ref().take(64 * 1024).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(io::Error::new(
            ErrorKind::UnexpectedEof,
            "connection closed before a complete line",
        ));
    }
    if line.last() != Some(&b'\n') {
        return Err(io::Error::new(ErrorKind::InvalidData, "line too long"));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|e| io::Error::new(ErrorKind::InvalidData, e))
}

/// Reads a response head.
pub fn read_head(r: &mut impl BufRead) -> io::Result<Head> {
    let status_line = read_line(r)?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default().to_owned();
    let status = parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| {
        io::Error::new(
            ErrorKind::InvalidData,
            format!("bad status line {status_line:?}"),
        )
    })?;
    let reason = parts.next().unwrap_or_default().to_owned();
    if !version.starts_with("HTTP/1.") {
        return Err(io::Error::new(
            ErrorKind::InvalidData,
            format!("bad status line {status_line:?}"),
        ));
    }
    let mut headers = Vec::new();
    loop {
        let line = read_line(r)?;
        if line.is_empty() {
            break;
        }
        let (n, v) = line.split_once(':').ok_or_else(|| {
            io::Error::new(ErrorKind::InvalidData, format!("bad header line {line:?}"))
        })?;
        headers.push((n.to_owned(), v.trim().to_owned()));
    }
    Ok(Head {
        version,
        status,
        reason,
        headers,
    })
}

/// Streams a body of the given framing into `sink`, piece by piece.
pub fn read_body(
    r: &mut impl BufRead,
    framing: Framing,
    sink: &mut dyn FnMut(&[u8]),
) -> io::Result<()> {
    match framing {
        Framing::None => Ok(()),
        Framing::Length(n) => copy_exact(r, n, sink),
        Framing::Close => loop {
            let buf = r.fill_buf()?;
            if buf.is_empty() {
                return Ok(());
            }
            let k = buf.len();
            sink(buf);
            r.consume(k);
        },
        Framing::Chunked => loop {
            let line = read_line(r)?;
            let size = line.split(';').next().unwrap_or_default().trim();
            let size = u64::from_str_radix(size, 16).map_err(|_| {
                io::Error::new(ErrorKind::InvalidData, format!("bad chunk size {line:?}"))
            })?;
            if size == 0 {
                // Trailers, then the empty line.
                while !read_line(r)?.is_empty() {}
                return Ok(());
            }
            copy_exact(r, size, sink)?;
            let end = read_line(r)?;
            if !end.is_empty() {
                return Err(io::Error::new(
                    ErrorKind::InvalidData,
                    format!("chunk not followed by CRLF: {end:?}"),
                ));
            }
        },
    }
}

fn copy_exact(r: &mut impl BufRead, mut n: u64, sink: &mut dyn FnMut(&[u8])) -> io::Result<()> {
    while n > 0 {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Err(io::Error::new(
                ErrorKind::UnexpectedEof,
                format!("connection closed with {n} body bytes missing"),
            ));
        }
        let k = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
        sink(&buf[..k]);
        r.consume(k);
        n -= k as u64;
    }
    Ok(())
}

/// One client connection to the proxy: raw writes, parsed responses.
#[derive(Debug)]
pub struct Client {
    pub stream: TcpStream,
    pub reader: BufReader<TcpStream>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = connect(addr);
        let reader = BufReader::with_capacity(64 * 1024, stream.try_clone().unwrap());
        Client { stream, reader }
    }

    /// Writes `bytes` in one `write_all`.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to lbd");
    }

    /// Reads one response head (a `100 Continue` or `101` is returned as it is).
    pub fn head(&mut self) -> Head {
        read_head(&mut self.reader).expect("read a response head")
    }

    /// Reads one complete final response, skipping `100 Continue` interim responses.
    pub fn response(&mut self) -> Response {
        self.response_to(false)
    }

    /// Reads the response to a request; `head_request` for HEAD (no body).
    pub fn response_to(&mut self, head_request: bool) -> Response {
        self.try_response_to(head_request)
            .unwrap_or_else(|e| panic!("read a response: {e}"))
    }

    pub fn try_response_to(&mut self, head_request: bool) -> io::Result<Response> {
        let mut head = read_head(&mut self.reader)?;
        while head.status == 100 {
            head = read_head(&mut self.reader)?;
        }
        let mut body = Vec::new();
        read_body(
            &mut self.reader,
            Framing::of(&head, head_request),
            &mut |b| body.extend_from_slice(b),
        )?;
        Ok(Response {
            version: head.version,
            status: head.status,
            reason: head.reason,
            headers: head.headers,
            body,
        })
    }

    /// `GET path` with `Host: host` on this connection (kept alive).
    pub fn get(&mut self, host: &str, path: &str) -> Response {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes());
        self.response()
    }

    /// Reads until the peer closes. Returns the bytes read before the close; panics when the
    /// connection is still open after the read timeout.
    pub fn read_to_close(&mut self) -> Vec<u8> {
        let mut rest = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => return rest,
                Ok(n) => rest.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return rest,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    panic!(
                        "the connection is still open after {IO_TIMEOUT:?} (read so far: {:?})",
                        String::from_utf8_lossy(&rest)
                    )
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Asserts that the peer closes the connection without sending anything more.
    pub fn assert_closed(&mut self) {
        let rest = self.read_to_close();
        assert!(
            rest.is_empty(),
            "expected the connection to close, got more bytes: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }

    pub fn shutdown_write(&self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }
}

/// Sends `raw` on a new connection and reads one response.
pub fn exchange(addr: SocketAddr, raw: &[u8]) -> Response {
    let mut c = Client::connect(addr);
    c.send(raw);
    c.response()
}

/// `GET path` with `Host: host` on a new connection.
pub fn get(addr: SocketAddr, host: &str, path: &str) -> Response {
    Client::connect(addr).get(host, path)
}

// ---- bodies ---------------------------------------------------------------------------------

/// Period of the test origin's `/bytes/N` pattern: byte `i` is `i % 251`.
pub const PERIOD: usize = 251;

/// `len` bytes of the origin's pattern.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % PERIOD) as u8).collect()
}

/// Checks a stream of bytes against the pattern without storing it.
#[derive(Debug)]
pub struct PatternCheck {
    window: Vec<u8>,
    pub len: u64,
    pub first_mismatch: Option<u64>,
}

impl Default for PatternCheck {
    fn default() -> Self {
        Self::new()
    }
}

impl PatternCheck {
    const STEP: usize = 64 * 1024;

    pub fn new() -> PatternCheck {
        PatternCheck {
            window: pattern(Self::STEP + PERIOD),
            len: 0,
            first_mismatch: None,
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let k = data.len().min(Self::STEP);
            let phase = (self.len % PERIOD as u64) as usize;
            if self.first_mismatch.is_none() && data[..k] != self.window[phase..phase + k] {
                let at = data[..k]
                    .iter()
                    .zip(&self.window[phase..phase + k])
                    .position(|(a, b)| a != b)
                    .unwrap_or(0);
                self.first_mismatch = Some(self.len + at as u64);
            }
            self.len += k as u64;
            data = &data[k..];
        }
    }
}

/// Writes `len` pattern bytes to `w` in 64 KiB writes, hashing them as it goes; returns the
/// FNV-1a 64 of what was written.
pub fn write_pattern(w: &mut impl Write, len: u64) -> io::Result<u64> {
    let window = pattern(64 * 1024 + PERIOD);
    let mut hash = lb_testkit::Fnv1a64::new();
    let mut off = 0u64;
    while off < len {
        let k = usize::try_from(len - off)
            .unwrap_or(usize::MAX)
            .min(64 * 1024);
        let phase = (off % PERIOD as u64) as usize;
        let data = &window[phase..phase + k];
        hash.update(data);
        w.write_all(data)?;
        off += k as u64;
    }
    Ok(hash.finish())
}

/// The `/digest` answer for `data`.
pub fn digest_line(data: &[u8]) -> String {
    format!(
        "len={} fnv={:016x}\n",
        data.len(),
        lb_testkit::fnv1a64(data)
    )
}

// ---- curl -----------------------------------------------------------------------------------

/// Runs `curl -sS --noproxy '*' --max-time 30 ARGS...`. Fails the test with a clear message
/// when curl is not installed: these tests need a real client and are never skipped silently.
pub fn curl(args: &[&str]) -> Output {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--noproxy", "*", "--max-time", "30"])
        .args(args)
        .stdin(Stdio::null());
    for var in [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "CURL_HOME",
    ] {
        cmd.env_remove(var);
    }
    match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "this end-to-end test needs curl (a real HTTP client) and `curl` is not in PATH: \
             install it (apt-get install curl); the test is not skipped"
        ),
        Err(e) => panic!("running curl: {e}"),
    }
}

// ---- access log -----------------------------------------------------------------------------

/// Parses one logfmt line: `key=value` pairs, values bare or double-quoted with JSON escapes.
pub fn parse_logfmt(line: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.peek() == Some(&' ') {
            chars.next();
        }
        if chars.peek().is_none() {
            return out;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ' ' {
                break;
            }
            key.push(c);
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'=') {
            chars.next();
            if chars.peek() == Some(&'"') {
                chars.next();
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => match chars.next() {
                            Some('n') => value.push('\n'),
                            Some('r') => value.push('\r'),
                            Some('t') => value.push('\t'),
                            Some('u') => {
                                let hex: String = chars.by_ref().take(4).collect();
                                let c = u32::from_str_radix(&hex, 16)
                                    .ok()
                                    .and_then(char::from_u32)
                                    .unwrap_or('\u{fffd}');
                                value.push(c);
                            }
                            Some(c) => value.push(c),
                            None => break,
                        },
                        c => value.push(c),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == ' ' {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
            }
        }
        out.push((key, value));
    }
}

/// The value of `key` in parsed logfmt `fields`.
pub fn field<'a>(fields: &'a [(String, String)], key: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

// ---- the supervisor and its workers: /proc readings, readiness from the log ----------------

impl Lbd {
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
            let stdout = dir.path().join(format!("stdout.{attempt}.log"));
            let stderr = dir.path().join(format!("stderr.{attempt}.log"));
            let mut child = Command::new(lbd_bin())
                .arg("--config")
                .arg(&config_path)
                .stdin(Stdio::null())
                .stdout(File::create(&stdout).unwrap())
                .stderr(File::create(&stderr).unwrap())
                .spawn()
                .expect("spawn lbd");
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

/// `/proc/PID/stat` split after the command name: `[state, ppid, ...]`; None when gone.
fn proc_stat_tail(pid: i32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The direct children of `pid` that are alive (neither zombies nor dead), by scanning the
/// parent pid of every `/proc/*/stat`.
pub fn live_children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Some(tail) = proc_stat_tail(child) else {
            continue;
        };
        let state = tail.first().map(String::as_str).unwrap_or("?");
        let ppid = tail.get(1).and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(pid) && state != "Z" && state != "X" {
            out.push(child);
        }
    }
    out.sort_unstable();
    out
}

/// Whether `pid` exists and is not a zombie.
pub fn process_alive(pid: i32) -> bool {
    proc_stat_tail(pid)
        .and_then(|t| t.first().cloned())
        .is_some_and(|s| s != "Z" && s != "X")
}

/// The value of the `key:` line of `/proc/PID/status` (trimmed); None when gone.
pub fn proc_status(pid: i32, key: &str) -> Option<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let prefix = format!("{key}:");
    status
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .map(|v| v.trim().to_owned())
}

/// The `--index N` of a worker's command line.
pub fn worker_index(pid: i32) -> Option<usize> {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let at = args.iter().position(|a| *a == b"--index")?;
    std::str::from_utf8(args.get(at + 1)?).ok()?.parse().ok()
}

/// The inodes of the sockets among `pid`'s open descriptors (`socket:[INODE]` links).
pub fn socket_inodes(pid: i32) -> HashSet<u64> {
    let mut out = HashSet::new();
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return out;
    };
    for entry in entries.flatten() {
        let Ok(target) = fs::read_link(entry.path()) else {
            continue;
        };
        let inode = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
            .and_then(|t| t.parse().ok());
        if let Some(inode) = inode {
            out.insert(inode);
        }
    }
    out
}

/// One IPv4 TCP socket of `/proc/PID/net/tcp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSocket {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    /// The kernel's state number: 0x01 established, 0x0A listen...
    pub state: u8,
    pub inode: u64,
}

pub const TCP_ESTABLISHED: u8 = 0x01;
pub const TCP_LISTEN: u8 = 0x0A;

/// The IPv4 TCP sockets of the network namespace `pid` is in (`/proc/PID/net/tcp`: a test
/// thread that moved into a namespace of its own must name a process inside it, since
/// `/proc/net` follows the main thread's namespace).
pub fn tcp_sockets(pid: i32) -> Vec<TcpSocket> {
    fn addr(hex: &str) -> Option<SocketAddr> {
        let (ip, port) = hex.split_once(':')?;
        let ip = u32::from_str_radix(ip, 16).ok()?;
        let port = u16::from_str_radix(port, 16).ok()?;
        // The kernel prints the address's in-memory (network order) bytes as a native u32.
        let ip = std::net::Ipv4Addr::from(ip.to_ne_bytes());
        Some(SocketAddr::new(ip.into(), port))
    }
    let text = fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            Some(TcpSocket {
                local: addr(f.get(1)?)?,
                remote: addr(f.get(2)?)?,
                state: u8::from_str_radix(f.get(3)?, 16).ok()?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// The inodes of the sockets listening on `addr`, in the namespace of `pid`.
pub fn listening_inodes(pid: i32, addr: SocketAddr) -> HashSet<u64> {
    tcp_sockets(pid)
        .into_iter()
        .filter(|s| s.state == TCP_LISTEN && s.local == addr)
        .map(|s| s.inode)
        .collect()
}

// ---- lbd from a config file written elsewhere -----------------------------------------------

impl Lbd {
    /// Starts `lbd --config CONFIG_PATH` on a config file the test wrote itself (a saved state,
    /// say), whose listeners are `addrs` and whose `command_socket` it chose. No retry on a
    /// taken port: the addresses are the file's. Its stdout and stderr go to a new temp dir.
    pub fn start_file(config_path: &Path, addrs: Vec<SocketAddr>) -> Lbd {
        let dir = TempDir::new("lbd-file");
        let text = fs::read_to_string(config_path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", config_path.display()));
        let stdout = dir.path().join("stdout.log");
        let stderr = dir.path().join("stderr.log");
        let mut child = Command::new(lbd_bin())
            .arg("--config")
            .arg(config_path)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout).unwrap())
            .stderr(File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn lbd");
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

// ---- wrk ------------------------------------------------------------------------------------

/// wrk's summary.
#[derive(Debug, Default, Clone, Copy)]
pub struct WrkSummary {
    pub requests: u64,
    pub connect_errors: u64,
    pub read_errors: u64,
    pub write_errors: u64,
    pub timeouts: u64,
    pub non_2xx: u64,
}

impl WrkSummary {
    /// Fails the test unless wrk made more than `min_requests` requests with no socket error
    /// (connect, read, write, timeout) and no non-2xx answer; `out` is wrk's output.
    pub fn assert_clean(&self, min_requests: u64, what: &str, out: &str) {
        assert!(
            self.requests > min_requests,
            "{what}: too few requests to mean anything\n{out}"
        );
        assert_eq!(
            (
                self.connect_errors,
                self.read_errors,
                self.write_errors,
                self.timeouts,
                self.non_2xx
            ),
            (0, 0, 0, 0, 0),
            "{what}: wrk saw failures (connect, read, write, timeout errors; non-2xx)\n{out}"
        );
    }
}

/// Reads wrk's output. Without a Lua script it prints "Socket errors: ..." and "Non-2xx or 3xx
/// responses: N" only when there are some.
pub fn parse_wrk(out: &str) -> WrkSummary {
    let mut s = WrkSummary::default();
    let number = |t: &str| -> u64 {
        t.trim()
            .trim_end_matches(',')
            .parse()
            .unwrap_or_else(|_| panic!("a number in wrk's output: {t:?}\n{out}"))
    };
    let mut saw_requests = false;
    for line in out.lines() {
        let line = line.trim();
        if let Some((n, _)) = line.split_once(" requests in ") {
            s.requests = number(n);
            saw_requests = true;
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            // `connect A, read B, write C, timeout D`
            for part in rest.split(',') {
                let mut kv = part.split_whitespace();
                let (Some(k), Some(v)) = (kv.next(), kv.next()) else {
                    continue;
                };
                let v = number(v);
                match k {
                    "connect" => s.connect_errors = v,
                    "read" => s.read_errors = v,
                    "write" => s.write_errors = v,
                    "timeout" => s.timeouts = v,
                    _ => {}
                }
            }
        } else if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
            s.non_2xx = number(n);
        }
    }
    assert!(saw_requests, "no request count in wrk's output:\n{out}");
    s
}

/// wrk against `url`, a child process killed by pid if it overstays or the test fails.
pub struct Wrk {
    child: std::process::Child,
    out: PathBuf,
}

impl Wrk {
    /// `wrk -t1 -cN -dSs --timeout T URL`, its output kept in `dir/wrk.out`.
    pub fn start(url: &str, connections: u32, seconds: u32, timeout: &str, dir: &Path) -> Wrk {
        Wrk::start_with(url, connections, seconds, timeout, &[], dir)
    }

    /// Like [`Wrk::start`], with `extra` arguments (`-H "Connection: close"`...) before the URL.
    pub fn start_with(
        url: &str,
        connections: u32,
        seconds: u32,
        timeout: &str,
        extra: &[&str],
        dir: &Path,
    ) -> Wrk {
        let out = dir.join("wrk.out");
        let child = Command::new("/usr/bin/wrk")
            .args([
                "-t1",
                &format!("-c{connections}"),
                &format!("-d{seconds}s"),
                "--timeout",
                timeout,
            ])
            .args(extra)
            .arg(url)
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("this test needs wrk at /usr/bin/wrk (apt-get install wrk): {e}")
            });
        Wrk { child, out }
    }

    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn finish(mut self, deadline: Duration) -> (WrkSummary, String) {
        let child = &mut self.child;
        let done = wait_until(deadline, || child.try_wait().unwrap().is_some());
        if !done {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
            let _ = self.child.wait();
            panic!("wrk did not finish within {deadline:?}");
        }
        let status = self.child.wait().unwrap();
        let out = fs::read_to_string(&self.out).unwrap_or_default();
        assert!(status.success(), "wrk failed ({status}):\n{out}");
        (parse_wrk(&out), out)
    }
}

impl Drop for Wrk {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

// ---- lbctl ----------------------------------------------------------------------------------

/// What one `lbctl --socket SOCKET ARGS` said (40 s timeout, killed after 60 s).
pub struct Ctl {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

pub fn lbctl_at(socket: &Path, args: &[&str]) -> Ctl {
    let mut cmd = Command::new(lbctl_bin());
    cmd.arg("--socket")
        .arg(socket)
        .args(["--timeout", "40"])
        .args(args);
    let out = run_bounded(cmd, Duration::from_secs(60), &format!("lbctl {args:?}"));
    Ctl {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// [`lbctl_at`] that must succeed; its stdout.
pub fn lbctl_ok(socket: &Path, args: &[&str]) -> String {
    let ctl = lbctl_at(socket, args);
    assert!(
        ctl.code == Some(0),
        "lbctl {args:?} should succeed, got exit {:?}\nstdout: {}\nstderr: {}",
        ctl.code,
        ctl.stdout,
        ctl.stderr
    );
    ctl.stdout
}

/// The lbctl binary next to lbd's, built when missing or older than its sources.
pub fn lbctl_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(locate_lbctl)
}

fn newest_mtime(paths: &[PathBuf]) -> Option<SystemTime> {
    let mut newest: Option<SystemTime> = None;
    let mut stack: Vec<PathBuf> = paths.to_vec();
    while let Some(p) = stack.pop() {
        let Ok(meta) = fs::metadata(&p) else { continue };
        if meta.is_dir() {
            if let Ok(entries) = fs::read_dir(&p) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        } else if let Ok(m) = meta.modified() {
            newest = Some(newest.map_or(m, |n| n.max(m)));
        }
    }
    newest
}

fn locate_lbctl() -> PathBuf {
    let lbd = Path::new(lbd_bin());
    let bin = lbd.with_file_name("lbctl");
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let sources = newest_mtime(&[
        workspace.join("ctl/src"),
        workspace.join("ctl/Cargo.toml"),
        workspace.join("config/src"),
        workspace.join("config/Cargo.toml"),
    ]);
    let built = fs::metadata(&bin).and_then(|m| m.modified()).ok();
    let fresh = built.is_some_and(|b| sources.is_none_or(|s| s <= b));
    if !fresh {
        let why = if built.is_some() {
            "older than its sources"
        } else {
            "missing"
        };
        eprintln!("{} is {why}: running cargo build -p lbctl", bin.display());
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-p", "lbctl"]).current_dir(&workspace);
        if lbd
            .parent()
            .and_then(Path::file_name)
            .is_some_and(|d| d == "release")
        {
            cmd.arg("--release");
        }
        let out = run_bounded(cmd, Duration::from_secs(600), "cargo build -p lbctl");
        assert!(
            out.status.success(),
            "cargo build -p lbctl failed ({}): these tests need the lbctl binary at {}; build it \
             with `cargo build -p lbd -p lbctl -p lb-testkit`\n{}",
            out.status,
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        bin.is_file(),
        "no lbctl binary at {} (next to lbd): build it with `cargo build -p lbctl`",
        bin.display()
    );
    bin
}

/// Runs `cmd` with piped output, killing it by pid after `deadline`.
pub fn run_bounded(mut cmd: Command, deadline: Duration, what: &str) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(deadline) {
        Ok(out) => out.unwrap_or_else(|e| panic!("{what}: {e}")),
        Err(_) => {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = rx.recv_timeout(Duration::from_secs(5));
            panic!("{what} did not finish within {deadline:?}: killed it");
        }
    }
}

// ---- network namespaces ---------------------------------------------------------------------

/// Runs `test` on a new thread inside a new network namespace with loopback up.
pub fn in_fresh_netns(test: impl FnOnce() + Send + 'static) {
    let outcome = std::thread::spawn(move || {
        enter_fresh_netns();
        test();
    })
    .join();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

fn enter_fresh_netns() {
    // SAFETY: unshare takes flags only; CLONE_NEWNET moves just this thread into a new
    // network namespace, which no other thread observes.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        let error = io::Error::last_os_error();
        panic!(
            "unshare(CLONE_NEWNET) failed: {error}. Tests that attach eBPF programs need root \
             (CAP_SYS_ADMIN for a network namespace, CAP_BPF and CAP_NET_ADMIN for the \
             program): run them as root, as CI does; they are not skipped"
        );
    }
    loopback_up();
}

/// `ip link set lo up`, by ioctl (a new namespace's loopback starts down).
fn loopback_up() {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
        .expect("an ioctl socket");
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in request.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    use std::os::fd::AsRawFd as _;
    // SAFETY: SIOCGIFFLAGS reads the name and writes ifru_flags inside `request`, which
    // lives across the call; the fd is a valid socket.
    let got = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) };
    assert_eq!(got, 0, "SIOCGIFFLAGS lo: {}", io::Error::last_os_error());
    // SAFETY: the union's flags member is the one SIOCGIFFLAGS just wrote.
    unsafe { request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    // SAFETY: as above; SIOCSIFFLAGS only reads `request`.
    let set = unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) };
    assert_eq!(set, 0, "SIOCSIFFLAGS lo up: {}", io::Error::last_os_error());
}
