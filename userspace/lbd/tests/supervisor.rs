//! The supervisor and its sandboxed workers, seen from outside: the real `lbd` binary with
//! kernel steering (plain SO_REUSEPORT hashing, no eBPF), its worker processes found as its
//! children in /proc, and their sandbox read back from `/proc/PID/status`. A worker killed
//! with SIGKILL under wrk load is replaced within a second on the very same listening socket
//! (the `socket:[INODE]` its descriptors point to) without a failed request; a worker that
//! keeps dying is restarted with a growing delay; SIGTERM stops everything and exits 0; with
//! `user = "nobody"` the workers run as uid 65534, and so they do under a root lbd whose config
//! names no user. Each seccomp rule is tried from a real worker (test-only
//! `KAKEHI_TEST_SECCOMP_PROBE`): the worker dies by SIGSYS and lbd's log names the syscall.
//! A worker restarted after the binary was replaced on disk runs main's binary, not the new
//! file; main outlives a worker it cannot start and retries it; a worker that stopped reading
//! its channel does not block main.
//!
//! Every process a test starts is stopped by pid (the harness's `Lbd`, the wrk child); every
//! wait has a deadline.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::Wrk;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    get, listening_inodes, one_cluster, proc_status, process_alive, socket_inodes, wait_until,
    worker_index, Lbd,
};
use lb_testkit::Origin;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long a set of workers may take to be started and sandboxed.
const WORKERS_UP: Duration = Duration::from_secs(10);

fn start(workers: usize, top: &str, origin: SocketAddr) -> Lbd {
    let top = format!("workers = {workers}\n{top}");
    Lbd::start(|l| one_cluster(&top, l, &[origin]))
}

/// Whether the worker has entered its sandbox (the seccomp filter is the last step).
fn sandboxed(pid: i32) -> bool {
    proc_status(pid, "Seccomp").as_deref() == Some("2")
}

/// Waits until `lbd` has exactly `n` live worker children, all sandboxed; returns them.
fn wait_workers(lbd: &Lbd, n: usize) -> Vec<i32> {
    let mut workers = Vec::new();
    let up = wait_until(WORKERS_UP, || {
        workers = lbd.workers();
        workers.len() == n && workers.iter().all(|&w| sandboxed(w))
    });
    assert!(
        up,
        "expected {n} sandboxed workers under lbd (pid {}), found {:?} (Seccomp {:?})",
        lbd.pid(),
        workers,
        workers
            .iter()
            .map(|&w| proc_status(w, "Seccomp"))
            .collect::<Vec<_>>()
    );
    workers
}

/// The listening socket of `lbd`'s listener that `worker` holds (exactly one).
fn listener_inode(lbd: &Lbd, worker: i32) -> u64 {
    let listening = listening_inodes(lbd.pid(), lbd.addr());
    assert!(
        !listening.is_empty(),
        "no socket listens on {} in /proc/{}/net/tcp",
        lbd.addr(),
        lbd.pid()
    );
    let held: Vec<u64> = socket_inodes(worker)
        .intersection(&listening)
        .copied()
        .collect();
    assert_eq!(
        held.len(),
        1,
        "worker {worker} should hold exactly one of the listening sockets {listening:?}, \
         holds {held:?}"
    );
    held[0]
}

fn assert_serves(lbd: &Lbd, requests: usize) {
    for n in 0..requests {
        let resp = get(lbd.addr(), "localhost", &format!("/serve/{n}"));
        assert_eq!(resp.status, 200, "request {n}: {:?}", resp.text());
    }
}

/// The sandbox as /proc shows it: seccomp filter mode, no_new_privs, no capability at all.
fn assert_sandboxed(pid: i32) {
    let field = |k: &str| {
        proc_status(pid, k).unwrap_or_else(|| panic!("worker {pid}: no {k} in /proc status"))
    };
    assert_eq!(field("Seccomp"), "2", "worker {pid}: Seccomp");
    assert_eq!(field("NoNewPrivs"), "1", "worker {pid}: NoNewPrivs");
    for cap in ["CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"] {
        assert_eq!(field(cap), "0000000000000000", "worker {pid}: {cap}");
    }
}

#[test]
fn four_workers_are_sandboxed_children_and_serve() {
    let origin = Origin::start("o");
    let lbd = start(4, "", origin.addr());
    let workers = wait_workers(&lbd, 4);
    let mut indexes = Vec::new();
    let mut inodes = HashSet::new();
    for &w in &workers {
        assert_sandboxed(w);
        indexes.push(worker_index(w).expect("a worker's --index"));
        inodes.insert(listener_inode(&lbd, w));
    }
    indexes.sort_unstable();
    assert_eq!(indexes, [0, 1, 2, 3], "worker indexes");
    assert_eq!(
        inodes.len(),
        4,
        "one listening socket per worker: {inodes:?}"
    );
    // The supervisor keeps a copy of every worker's socket.
    let kept = socket_inodes(lbd.pid());
    assert!(
        inodes.is_subset(&kept),
        "lbd holds {kept:?}, workers {inodes:?}"
    );
    // The supervisor itself is not sandboxed (it must fork, exec, load programs).
    assert_eq!(proc_status(lbd.pid(), "Seccomp").as_deref(), Some("0"));
    assert_serves(&lbd, 40);
    println!("workers {workers:?} on listening sockets {inodes:?}");
}

// ---- wrk ------------------------------------------------------------------------------------

/// Waits for a live, sandboxed child of `lbd` that is not in `known`; returns it and how long
/// after `since` it was first seen (as a child, sandboxed or not).
fn wait_new_worker(lbd: &Lbd, known: &HashSet<i32>, since: Instant) -> (i32, Duration) {
    wait_new_process(lbd, known, since, true)
}

/// The first worker pid not in `known` and how long after `since` it appeared; with
/// `sandboxed`, waits until it is sandboxed too.
fn wait_new_process(
    lbd: &Lbd,
    known: &HashSet<i32>,
    since: Instant,
    sandboxed_too: bool,
) -> (i32, Duration) {
    let mut seen: Option<(i32, Duration)> = None;
    let found = wait_until(Duration::from_secs(10), || {
        if seen.is_none() {
            seen = lbd
                .workers()
                .into_iter()
                .find(|w| !known.contains(w))
                .map(|w| (w, since.elapsed()));
        }
        seen.is_some_and(|(w, _)| !sandboxed_too || sandboxed(w))
    });
    assert!(
        found,
        "no new sandboxed worker within 10 s (seen: {seen:?}); lbd stderr:\n{}",
        lbd.stderr()
    );
    seen.unwrap()
}

/// The first 8 hex digits of a request id: the prefix of the worker process that served it.
fn access_log_prefixes(lines: &[String]) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| {
            let fields = common::parse_logfmt(l);
            common::field(&fields, "request_id").map(|id| id.chars().take(8).collect())
        })
        .collect()
}

#[test]
fn a_worker_killed_under_load_is_replaced_within_a_second_on_the_same_socket() {
    const CONNECTIONS: u32 = 20;
    let origin = Origin::start("o");
    let lbd = start(4, "", origin.addr());
    let workers = wait_workers(&lbd, 4);
    let inodes: HashMap<i32, u64> = workers
        .iter()
        .map(|&w| (w, listener_inode(&lbd, w)))
        .collect();

    let url = format!("http://{}/", lbd.addr());
    let wrk = Wrk::start(&url, CONNECTIONS, 4, "3s", lbd.dir().path());
    std::thread::sleep(Duration::from_millis(1500));
    let victim = workers[1];
    let victim_inode = inodes[&victim];
    let victim_index = worker_index(victim).unwrap();
    let killed_at = Instant::now();
    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    let known: HashSet<i32> = workers.iter().copied().collect();
    let (replacement, after) = wait_new_worker(&lbd, &known, killed_at);
    let sandboxed_after = killed_at.elapsed();
    let (summary, out) = wrk.finish(Duration::from_secs(15));
    println!("{out}");
    println!(
        "killed worker {victim} (index {victim_index}, socket:[{victim_inode}]); replacement \
         {replacement} seen after {after:?}, sandboxed after {sandboxed_after:?}"
    );
    println!("wrk: {summary:?}");

    assert!(
        after < Duration::from_secs(1),
        "the replacement appeared {after:?} after the kill"
    );
    assert!(!process_alive(victim), "the killed worker is still there");
    assert_eq!(worker_index(replacement), Some(victim_index));
    assert_eq!(
        listener_inode(&lbd, replacement),
        victim_inode,
        "the replacement must take over the dead worker's listening socket"
    );
    let now: HashSet<i32> = wait_workers(&lbd, 4).into_iter().collect();
    let expected: HashSet<i32> = workers
        .iter()
        .copied()
        .filter(|&w| w != victim)
        .chain([replacement])
        .collect();
    assert_eq!(now, expected, "the other workers are untouched");
    assert_sandboxed(replacement);

    assert!(summary.requests > 1000, "too little load: {summary:?}");
    assert_eq!(
        summary.non_2xx, 0,
        "non-2xx answers under the kill: {summary:?}"
    );
    assert_eq!(summary.connect_errors, 0, "{summary:?}");
    assert_eq!(summary.timeouts, 0, "{summary:?}");
    // Only connections the killed worker had accepted may fail: at most wrk's connections.
    assert!(
        summary.read_errors + summary.write_errors <= u64::from(CONNECTIONS),
        "more socket errors than connections inside the dead worker: {summary:?}"
    );

    // The replacement serves: over 200 new connections (kernel hashing over 4 sockets), the
    // access log shows the request-id prefixes of 4 processes, none of them the dead one's
    // (which could not log any more).
    let before = lbd.stdout().lines().count();
    assert_serves(&lbd, 200);
    let lines = lbd.wait_stdout_lines(before + 200);
    let prefixes: HashSet<String> = access_log_prefixes(&lines[before..]).into_iter().collect();
    assert_eq!(
        prefixes.len(),
        4,
        "4 workers should share 200 new connections: request-id prefixes {prefixes:?}"
    );
    let stderr = lbd.stderr();
    assert!(
        stderr.contains(&format!("(pid {victim}) was killed by SIGKILL")),
        "lbd should log the death:\n{stderr}"
    );
}

#[test]
fn a_worker_that_keeps_dying_is_restarted_with_back_off() {
    let origin = Origin::start("o");
    let mut lbd = start(2, "", origin.addr());
    let workers = wait_workers(&lbd, 2);
    let mut known: HashSet<i32> = workers.iter().copied().collect();
    let victim = workers[0];
    let index = worker_index(victim).unwrap();
    let inode = listener_inode(&lbd, victim);
    // A worker that lived longer than 250 ms is restarted at once; the test wants that
    // first restart to be the prompt one.
    std::thread::sleep(Duration::from_millis(1200));

    let mut current = victim;
    let mut gaps = Vec::new();
    for round in 0..3 {
        let at = Instant::now();
        kill(Pid::from_raw(current), Signal::SIGKILL).unwrap();
        // The replacements of rounds 0 and 1 are killed as soon as they appear (within
        // 250 ms of their start: a worker that keeps dying as it starts); the last one is
        // left to start and checked.
        let (next, gap) = wait_new_process(&lbd, &known, at, round == 2);
        if round == 2 {
            assert_eq!(worker_index(next), Some(index), "round {round}");
            assert_eq!(
                listener_inode(&lbd, next),
                inode,
                "round {round}: same socket"
            );
        }
        known.insert(next);
        gaps.push(gap);
        current = next;
    }
    println!("worker {index}: replacement delays after 3 quick kills: {gaps:?}");
    assert!(gaps[0] < Duration::from_secs(1), "{gaps:?}");
    // It lived less than 250 ms each time: 100 ms, then 200 ms before the restart.
    assert!(
        gaps[1] >= Duration::from_millis(100),
        "no back-off: {gaps:?}"
    );
    assert!(
        gaps[2] >= Duration::from_millis(200),
        "no growing back-off: {gaps:?}"
    );
    assert!(gaps[2] > gaps[1], "the back-off should grow: {gaps:?}");
    assert!(gaps[2] < Duration::from_secs(3), "{gaps:?}");

    assert!(lbd.wait_exit(Duration::ZERO).is_none(), "lbd died");
    let now = wait_workers(&lbd, 2);
    assert!(now.contains(&current), "{now:?} vs {current}");
    assert!(
        now.contains(&workers[1]),
        "the other worker was touched: {now:?}"
    );
    assert_serves(&lbd, 20);
    let restarts = lbd
        .stderr()
        .lines()
        .filter(|l| {
            l.contains(&format!("worker {index} (pid "))
                && l.contains("was killed by SIGKILL")
                && l.contains("restarting it on the same sockets")
        })
        .count();
    assert_eq!(restarts, 3, "stderr:\n{}", lbd.stderr());
    let status = lbd.shutdown();
    assert_eq!(status.code(), Some(0), "lbd after the restarts: {status}");
}

#[test]
fn sigterm_stops_every_worker_and_exits_0() {
    let origin = Origin::start("o");
    let mut lbd = start(4, "", origin.addr());
    let workers = wait_workers(&lbd, 4);
    assert_serves(&lbd, 8);
    let at = Instant::now();
    lbd.signal(Signal::SIGTERM);
    let status = lbd.wait_exit(Duration::from_secs(10));
    let took = at.elapsed();
    let status = status.expect("lbd did not exit within 10 s of SIGTERM");
    println!("lbd exited {status} {took:?} after SIGTERM");
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM");
    for &w in &workers {
        assert!(!process_alive(w), "worker {w} outlived lbd");
    }
    let stderr = lbd.stderr();
    assert!(stderr.contains("stopping: draining 4 workers"), "{stderr}");
    for &w in &workers {
        assert!(
            stderr.contains(&format!("(pid {w}) exited with status 0")),
            "worker {w} should drain and exit 0:\n{stderr}"
        );
    }
    assert!(
        !stderr.contains("did not stop in time"),
        "a worker had to be killed:\n{stderr}"
    );
}

#[test]
fn workers_run_as_the_configured_user_and_serve() {
    let origin = Origin::start("o");
    let lbd = start(2, "user = \"nobody\"", origin.addr());
    let workers = wait_workers(&lbd, 2);
    for &w in &workers {
        let uid = proc_status(w, "Uid").unwrap();
        let gid = proc_status(w, "Gid").unwrap();
        let groups = proc_status(w, "Groups").unwrap();
        println!("worker {w}: Uid {uid:?} Gid {gid:?} Groups {groups:?}");
        assert_eq!(
            uid.split_whitespace().collect::<Vec<_>>(),
            ["65534"; 4],
            "worker {w}: real, effective, saved and filesystem uid"
        );
        assert_eq!(
            gid.split_whitespace().collect::<Vec<_>>(),
            ["65534"; 4],
            "worker {w}: the gid of nobody"
        );
        assert_eq!(groups, "65534", "worker {w}: supplementary groups");
    }
    let uid = proc_status(lbd.pid(), "Uid").unwrap();
    assert!(
        uid.starts_with('0'),
        "the supervisor keeps its identity: {uid:?}"
    );
    assert_serves(&lbd, 40);
    // The same sandbox as root's workers: nothing left in any capability set, bounding
    // included.
    for &w in &workers {
        assert_sandboxed(w);
    }
}

/// SIGKILL of the supervisor (no drain possible): its workers must not live on, serving
/// with nobody to restart or stop them. Checked with and without a `user` switch.
#[test]
fn workers_do_not_outlive_a_killed_supervisor() {
    let origin = Origin::start("o");
    let mut outcomes = Vec::new();
    for top in ["", "user = \"nobody\""] {
        let mut lbd = start(2, top, origin.addr());
        let workers = wait_workers(&lbd, 2);
        lbd.signal(Signal::SIGKILL);
        assert!(lbd.wait_exit(Duration::from_secs(5)).is_some());
        let gone = wait_until(Duration::from_secs(3), || {
            workers.iter().all(|&w| !process_alive(w))
        });
        let left: Vec<i32> = workers
            .iter()
            .copied()
            .filter(|&w| process_alive(w))
            .collect();
        // Clean up what this test started, by pid.
        for &w in &left {
            let _ = kill(Pid::from_raw(w), Signal::SIGKILL);
        }
        println!("config {top:?}: workers still alive 3 s after SIGKILL of lbd: {left:?}");
        outcomes.push((top, gone, left));
    }
    for (top, gone, left) in &outcomes {
        assert!(
            gone,
            "with config {top:?}, workers {left:?} were still running 3 s after the \
             supervisor was killed: {outcomes:?}"
        );
    }
}

/// A forbidden syscall made from a real worker (the test-only `KAKEHI_TEST_SECCOMP_PROBE`
/// hook makes the call `probe` right after the sandbox goes on) kills that worker with SIGSYS,
/// and the supervisor says so and restarts it. Returns lbd's log.
fn run_seccomp_probe(probe: &str) -> String {
    let dir = std::env::temp_dir().join(format!(
        "kakehi-seccomp-probe-{probe}-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.join("lbd.toml");
    std::fs::write(
        &config,
        format!(
            "workers = 1\nsteering = \"kernel\"\ncommand_socket = \"{}/lbd.sock\"\n[access_log]\ntarget = \"off\"\n\
             [[listeners]]\naddress = \"127.0.0.1:{port}\"\n[clusters.c]\n\
             frontends = [{{ address = \"127.0.0.1:{port}\" }}]\n\
             backends = [{{ address = \"127.0.0.1:9\" }}]\n",
            dir.display()
        ),
    )
    .unwrap();
    let stderr_path = dir.join("stderr.log");
    // Workers that never serve: lbd must not tell systemd it is ready.
    let notify_path = dir.join("notify.sock");
    let _ = std::fs::remove_file(&notify_path);
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_nonblocking(true).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_lbd"))
        .arg("--config")
        .arg(&config)
        .env("KAKEHI_TEST_SECCOMP_PROBE", probe)
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .unwrap();
    let pid = Pid::from_raw(child.id() as i32);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut log = String::new();
    while Instant::now() < deadline {
        log = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        if log.contains("was killed by SIGSYS") && log.contains("does not report ready") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut datagram = [0u8; 512];
    let told = notify
        .recv(&mut datagram)
        .map(|n| String::from_utf8_lossy(&datagram[..n]).into_owned());
    let _ = kill(pid, Signal::SIGTERM);
    let status = child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        log.contains("does not report ready"),
        "{probe}: lbd's start did not end without readiness:\n{log}"
    );
    assert!(
        told.as_deref().map_or(true, |t| !t.contains("READY=1")),
        "{probe}: lbd reported ready with no worker serving: {told:?}"
    );
    assert!(
        log.contains("making a forbidden syscall") && log.contains("was killed by SIGSYS"),
        "{probe}: no worker death by SIGSYS in lbd's log:\n{log}"
    );
    assert!(
        !log.contains("the sandbox is not enforcing"),
        "{probe}: the forbidden syscall returned:\n{log}"
    );
    assert!(log.contains("restarting it on the same sockets"), "{log}");
    assert!(status.success(), "{probe}: lbd exit: {status:?}");
    log
}

#[test]
fn a_forbidden_syscall_in_a_real_worker_kills_it_by_sigsys() {
    let log = run_seccomp_probe("open");
    assert!(
        log.contains("the sandbox refused syscall openat"),
        "the supervisor did not name the syscall:\n{log}"
    );
}

/// Issue 12, item 6: each argument rule holds in a real worker (its listener's steering
/// cannot be detached, no signal to its parent, no raw socket, no executable memory), and a
/// violation leaves a trace: the supervisor's log names the refused syscall.
#[test]
fn each_argument_rule_holds_in_a_real_worker_and_the_log_names_the_syscall() {
    for probe in ["setsockopt", "tgkill", "socket", "mmap"] {
        let log = run_seccomp_probe(probe);
        assert!(
            log.contains(&format!("the sandbox refused syscall {probe} (number")),
            "{probe}: the supervisor did not name the syscall:\n{log}"
        );
    }
}

/// Issue 12, item 6: a root lbd whose config names no `user` must not run its workers as
/// root; like nginx it falls back to `nobody` (and `nogroup`).
#[test]
fn a_root_lbd_without_a_user_runs_its_workers_as_nobody() {
    if !nix::unistd::geteuid().is_root() {
        println!("skipped: not root");
        return;
    }
    let origin = Origin::start("o");
    let lbd = start(2, "", origin.addr());
    let workers = wait_workers(&lbd, 2);
    let nogroup = nix::unistd::Group::from_name("nogroup")
        .unwrap()
        .map(|g| g.gid.as_raw());
    for &w in &workers {
        let uid = proc_status(w, "Uid").unwrap();
        let gid = proc_status(w, "Gid").unwrap();
        assert_eq!(
            uid.split_whitespace().collect::<Vec<_>>(),
            ["65534"; 4],
            "worker {w}: real, effective, saved and filesystem uid"
        );
        if let Some(gid_nogroup) = nogroup {
            let want = gid_nogroup.to_string();
            assert_eq!(
                gid.split_whitespace().collect::<Vec<_>>(),
                [want.as_str(); 4],
                "worker {w}: gid of nogroup"
            );
        }
        assert_sandboxed(w);
    }
    assert!(proc_status(lbd.pid(), "Uid").unwrap().starts_with('0'));
    assert_serves(&lbd, 20);
}

/// An lbd started from a copy of the binary in its own directory (which a test may replace or
/// delete), with extra environment; killed (and its workers with it) when dropped.
struct CopiedLbd {
    child: std::process::Child,
    dir: common::TempDir,
    addr: SocketAddr,
}

impl CopiedLbd {
    fn start(
        workers: usize,
        top: &str,
        origin: SocketAddr,
        env: &[(&str, &std::path::Path)],
    ) -> CopiedLbd {
        use std::os::unix::fs::PermissionsExt;
        let dir = common::TempDir::new("copied-lbd");
        let binary = dir.path().join("lbd");
        std::fs::copy(common::lbd_bin(), &binary).unwrap();
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
        let addr = common::free_addr();
        let config = dir.write(
            "lbd.toml",
            format!(
                "command_socket = \"{}\"\n{}",
                dir.path().join("lbd.sock").display(),
                one_cluster(&format!("workers = {workers}\n{top}"), addr, &[origin])
            ),
        );
        let mut command = Command::new(&binary);
        command
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr.log")).unwrap());
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().unwrap();
        CopiedLbd { child, dir, addr }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn binary(&self) -> std::path::PathBuf {
        self.dir.path().join("lbd")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for `n` sandboxed workers none of which is in `old`.
    fn new_workers(&self, n: usize, old: &[i32], within: Duration) -> Option<Vec<i32>> {
        let mut found = Vec::new();
        wait_until(within, || {
            found = common::live_children(self.pid());
            found.len() == n && found.iter().all(|w| sandboxed(*w) && !old.contains(w))
        })
        .then_some(found)
    }
}

impl Drop for CopiedLbd {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
        let stopped = wait_until(Duration::from_secs(10), || {
            self.child.try_wait().ok().flatten().is_some()
        });
        if !stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Issue 12, item 7: the documented upgrade puts the new binary at the old one's path first.
/// A worker that crashes after that must come back as the binary main runs (exec'd from a
/// descriptor opened at start), not as whatever file is at the path now.
#[test]
fn a_restarted_worker_runs_mains_binary_not_the_file_now_at_its_path() {
    use std::os::unix::fs::PermissionsExt;
    let origin = Origin::start("o");
    let mut lbd = CopiedLbd::start(2, "", origin.addr(), &[]);
    let first = lbd
        .new_workers(2, &[], WORKERS_UP)
        .unwrap_or_else(|| panic!("no workers:\n{}", lbd.log()));
    // Another binary is put at the path, the way `install` or a package upgrade does it.
    let ran = lbd.dir.path().join("replacement-ran");
    let replacement = lbd.dir.write(
        "lbd.new",
        format!("#!/bin/sh\necho \"$@\" >> {}\nexit 1\n", ran.display()),
    );
    std::fs::set_permissions(&replacement, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&replacement, lbd.binary()).unwrap();
    kill(Pid::from_raw(first[0]), Signal::SIGKILL).unwrap();
    let now = lbd.new_workers(2, &first[..1], WORKERS_UP);
    assert!(
        !ran.exists(),
        "the file now at lbd's path was run as a worker: {:?}\n{}",
        std::fs::read_to_string(&ran),
        lbd.log()
    );
    let now = now.unwrap_or_else(|| panic!("the worker did not come back:\n{}", lbd.log()));
    assert!(lbd.alive(), "{}", lbd.log());
    for w in now {
        let exe = std::fs::read_link(format!("/proc/{w}/exe")).unwrap();
        assert!(
            exe.to_string_lossy().ends_with("(deleted)"),
            "worker {w} runs {exe:?}, not the replaced (unlinked) original"
        );
    }
    for n in 0..10 {
        assert_eq!(get(lbd.addr, "localhost", &format!("/{n}")).status, 200);
    }
}

/// Issue 12, item 7: a worker that cannot be started (here its binary is gone from disk,
/// then the test-only hook makes every start fail) must not take main down: main logs it,
/// tries again with a growing delay, keeps serving with the other workers, and the worker is
/// back once starting works again.
#[test]
fn main_outlives_a_worker_it_cannot_start_and_retries_it() {
    let origin = Origin::start("o");
    let flag_dir = common::TempDir::new("start-fails");
    let flag = flag_dir.path().join("fail");
    let mut lbd = CopiedLbd::start(
        2,
        "",
        origin.addr(),
        &[("KAKEHI_TEST_WORKER_START_FAILS", &flag)],
    );
    let first = lbd
        .new_workers(2, &[], WORKERS_UP)
        .unwrap_or_else(|| panic!("no workers:\n{}", lbd.log()));
    // The binary is gone from its path: exec by path would fail.
    std::fs::remove_file(lbd.binary()).unwrap();
    kill(Pid::from_raw(first[0]), Signal::SIGKILL).unwrap();
    let second = lbd.new_workers(2, &first[..1], WORKERS_UP);
    assert!(lbd.alive(), "main exited for one worker:\n{}", lbd.log());
    let second = second.unwrap_or_else(|| panic!("the worker did not come back:\n{}", lbd.log()));
    // Now every start fails, for a while.
    std::fs::write(&flag, "").unwrap();
    kill(Pid::from_raw(second[0]), Signal::SIGKILL).unwrap();
    let retried = wait_until(Duration::from_secs(10), || {
        lbd.log().matches("cannot start worker").count() >= 3
    });
    assert!(retried, "no retries in the log:\n{}", lbd.log());
    assert!(lbd.alive(), "main exited for one worker:\n{}", lbd.log());
    let log = lbd.log();
    assert!(log.contains("trying again in"), "{log}");
    std::fs::remove_file(&flag).unwrap();
    let third = lbd.new_workers(2, &second[..1], Duration::from_secs(15));
    assert!(
        third.is_some(),
        "the worker did not come back:\n{}",
        lbd.log()
    );
    for n in 0..10 {
        assert_eq!(get(lbd.addr, "localhost", &format!("/{n}")).status, 200);
    }
}

/// Issue 12, item 7: writes on worker channels had no timeout, so one worker that stopped
/// reading its channel (stopped here with SIGSTOP) blocked main for good on the next
/// configuration larger than the socket buffer: no lbctl verb was answered again. Now the
/// push gives up on that worker in bounded time and main keeps answering; the worker, whose
/// channel is out of step, is closed off, and since it does not leave within the drain
/// timeout (it is stopped), it is killed and replaced by one that serves.
#[test]
fn a_worker_that_does_not_read_its_channel_does_not_block_main() {
    let origin = Origin::start("o");
    let drain = "[timeouts]\ndrain = \"1s\"";
    let lbd = CopiedLbd::start(1, drain, origin.addr(), &[]);
    let workers = lbd
        .new_workers(1, &[], WORKERS_UP)
        .unwrap_or_else(|| panic!("no workers:\n{}", lbd.log()));
    kill(Pid::from_raw(workers[0]), Signal::SIGSTOP).unwrap();
    // A state whose text is far larger than a unix socket's buffer (a very long path).
    let long = format!("/{}", "a".repeat(500_000));
    let big = lbd.dir.write(
        "big.toml",
        format!(
            "command_socket = \"{}\"\nworkers = 1\n{drain}\n[[listeners]]\naddress = \"{}\"\n\n\
             [clusters.app]\nfrontends = [ {{ address = \"{}\", path = \"{long}\" }} ]\n\
             backends = [ {{ address = \"{}\" }} ]\n",
            lbd.dir.path().join("lbd.sock").display(),
            lbd.addr,
            lbd.addr,
            origin.addr()
        ),
    );
    assert!(std::fs::metadata(&big).unwrap().len() > 400_000);
    let lbctl = |args: &[&str]| {
        let mut cmd = Command::new(common::lbctl_bin());
        cmd.arg("--socket")
            .arg(lbd.dir.path().join("lbd.sock"))
            .arg("--timeout")
            .arg("30")
            .args(args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = cmd.spawn().unwrap();
        let pid = child.id() as i32;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let out = rx.recv_timeout(Duration::from_secs(40));
        if out.is_err() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        out.ok().and_then(Result::ok)
    };
    let load = lbctl(&["state", "load", big.to_str().unwrap()]).expect("lbctl state load");
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&load.stdout),
        String::from_utf8_lossy(&load.stderr)
    );
    println!("state load: {:?}: {shown}", load.status);
    assert!(
        !shown.contains("did not answer within"),
        "main was blocked writing to a worker that does not read: {shown}\n{}",
        lbd.log()
    );
    let status = lbctl(&["status"]).expect("lbctl status");
    assert!(
        status.status.success(),
        "main does not answer after the push: {}\n{}",
        String::from_utf8_lossy(&status.stderr),
        lbd.log()
    );
    // Drain (1 s) plus the supervisor's slack (5 s): the stuck worker is gone, replaced.
    let replaced = lbd.new_workers(1, &workers, Duration::from_secs(15));
    let _ = kill(Pid::from_raw(workers[0]), Signal::SIGCONT);
    assert!(
        replaced.is_some(),
        "the stuck worker was neither killed nor replaced:\n{}",
        lbd.log()
    );
    // It serves the loaded state: its only frontend is the long path, so "/" is kakehi's 404.
    assert_eq!(get(lbd.addr, "localhost", "/").status, 404);
}
