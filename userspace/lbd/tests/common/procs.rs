//! Processes seen through `/proc` (liveness, children, memory, sockets), stopping one that is
//! not the test's child, and running a command under a deadline.

use super::wait::wait_until;
use std::collections::HashSet;
use std::fs;
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Whether `pid` is running (a zombie does not count: it has exited).
pub fn is_alive(pid: i32) -> bool {
    proc_stat_tail(pid)
        .and_then(|t| t.first().cloned())
        .is_some_and(|s| s != "Z" && s != "X")
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
    let parents: Vec<(i32, i32)> = all_pids()
        .filter_map(|child| {
            let ppid = proc_stat_tail(child)?.get(1)?.parse::<i32>().ok()?;
            Some((child, ppid))
        })
        .collect();
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

/// Memory figures from `/proc/PID/status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// Resident set size now.
    pub rss_kib: u64,
    /// Peak resident set size since the process started.
    pub hwm_kib: u64,
}

/// Every pid in `/proc` now.
fn all_pids() -> impl Iterator<Item = i32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
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
    let mut out: Vec<i32> = all_pids()
        .filter(|&child| {
            proc_stat_tail(child).is_some_and(|tail| {
                let state = tail.first().map(String::as_str).unwrap_or("?");
                let ppid = tail.get(1).and_then(|p| p.parse::<i32>().ok());
                ppid == Some(pid) && state != "Z" && state != "X"
            })
        })
        .collect();
    out.sort_unstable();
    out
}

/// Whether `pid` exists and is not a zombie (the same as [`is_alive`]).
pub fn process_alive(pid: i32) -> bool {
    is_alive(pid)
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

/// The TCP sockets of process `pid` connected to `peer`, each duplicated into this process
/// with pidfd_getfd(2) (it takes the right to ptrace `pid`: root here), so a test can read
/// their socket options; fds 0..4096 are looked at.
pub fn sockets_to(pid: i32, peer: std::net::SocketAddr) -> Vec<std::net::TcpStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let Ok(pidfd) = i32::try_from(pidfd) else {
        return Vec::new();
    };
    if pidfd < 0 {
        return Vec::new();
    }
    // SAFETY: pidfd is a descriptor this process just opened and owns alone.
    let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(pidfd) };
    let mut found = Vec::new();
    for target in 0..4096 {
        use std::os::fd::AsRawFd;
        // SAFETY: pidfd_getfd takes a pidfd, the other process's fd number and flags, and
        // returns a new descriptor of this process (or -1).
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
        let Ok(fd) = i32::try_from(fd) else { continue };
        if fd < 0 {
            continue;
        }
        // SAFETY: fd was just returned to this process and nothing else owns it.
        let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let stream = std::net::TcpStream::from(owned);
        if stream.peer_addr().ok() == Some(peer) {
            found.push(stream);
        }
    }
    found
}
