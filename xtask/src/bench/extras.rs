//! The benchmark's figures beyond wrk's: memory per idle keep-alive connection (a set of
//! connections held open, each served one request, while the busy ones run) and syscalls per
//! request (`strace -c` on the proxy's whole tree during a short keep-alive run).

use super::procfs;
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

/// How long idle connections are left alone before the proxy's memory is read: past kakehi's
/// 50 ms before an idle connection gives its buffers back, and any proxy's first-request
/// bookkeeping.
const SETTLE: Duration = Duration::from_millis(500);

/// Keep-alive connections held open, each after one whole request and response.
pub struct IdleSet {
    streams: Vec<TcpStream>,
    /// Resident memory the proxy's tree grew by while they were opened, per connection, in
    /// bytes.
    pub bytes_per_conn: f64,
}

/// Opens `count` connections to `port`, sends `GET /` on each and reads its whole response,
/// then measures the proxy tree's resident memory (`pid`) against what it was before.
pub fn hold_idle(pid: u32, port: u16, count: u32) -> Result<IdleSet> {
    raise_file_limit(u64::from(count) + 256)?;
    let before = procfs::rss_kib(pid);
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let mut streams = Vec::with_capacity(count as usize);
    for n in 0..count {
        let stream = one_request(address)
            .with_context(|| format!("idle connection {n} of {count} to {address}"))?;
        streams.push(stream);
    }
    std::thread::sleep(SETTLE);
    let after = procfs::rss_kib(pid);
    Ok(IdleSet {
        bytes_per_conn: after.saturating_sub(before) as f64 * 1024.0 / f64::from(count.max(1)),
        streams,
    })
}

impl IdleSet {
    /// How many connections are still open (none was closed by the proxy while idle).
    pub fn still_open(&mut self) -> usize {
        self.streams
            .iter_mut()
            .filter(|s| {
                let mut s: &TcpStream = s;
                let _ = s.set_nonblocking(true);
                let mut byte = [0u8; 1];
                matches!(s.read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            })
            .count()
    }
}

/// One keep-alive `GET /` on a new connection, its response read whole (by Content-Length).
fn one_request(address: SocketAddr) -> Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")?;
    let mut got = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            bail!("the proxy closed the connection before the whole response");
        }
        got.extend_from_slice(chunk.get(..n).unwrap_or_default());
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(got.get(..end).unwrap_or_default()).to_lowercase();
            if !head.starts_with("http/1.1 200") {
                bail!("answered {:?}", head.lines().next().unwrap_or_default());
            }
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .context("a response without Content-Length")?;
            if got.len() >= end + 4 + length {
                return Ok(stream);
            }
        }
    }
}

/// Raises this process's soft limit on open files to `want` (at most its hard limit).
fn raise_file_limit(want: u64) -> Result<()> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft >= want {
        return Ok(());
    }
    if hard < want {
        bail!("the open-file limit is {hard}: {want} connections cannot be held");
    }
    setrlimit(Resource::RLIMIT_NOFILE, want, hard)?;
    Ok(())
}

/// Syscalls of the proxy's tree during one wrk run: calls per request, per syscall and in all,
/// and the failed ones (mostly `EAGAIN`).
#[derive(Debug, Clone, Default)]
pub struct Syscalls {
    pub requests: u64,
    pub per_syscall: BTreeMap<String, (u64, u64)>,
}

impl Syscalls {
    pub fn total_per_request(&self) -> f64 {
        let calls: u64 = self.per_syscall.values().map(|(calls, _)| calls).sum();
        calls as f64 / self.requests.max(1) as f64
    }

    pub fn errors_per_request(&self) -> f64 {
        let errors: u64 = self.per_syscall.values().map(|(_, errors)| errors).sum();
        errors as f64 / self.requests.max(1) as f64
    }

    /// The syscalls made at least 0.05 times per request, most frequent first.
    pub fn top(&self) -> Vec<(String, f64, f64)> {
        let per = |n: u64| n as f64 / self.requests.max(1) as f64;
        let mut rows: Vec<(String, f64, f64)> = self
            .per_syscall
            .iter()
            .map(|(name, &(calls, errors))| (name.clone(), per(calls), per(errors)))
            .filter(|(_, calls, _)| *calls >= 0.05)
            .collect();
        rows.sort_by(|a, b| b.1.total_cmp(&a.1));
        rows
    }

    /// "writev 2.00, recvfrom 2.31 (0.31 failed), ..."
    pub fn text(&self) -> String {
        self.top()
            .iter()
            .map(|(name, calls, errors)| {
                if *errors >= 0.005 {
                    format!("{name} {calls:.2} ({errors:.2} failed)")
                } else {
                    format!("{name} {calls:.2}")
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The syscall counts of `strace -c` (its summary file) over `requests` requests.
pub fn read_syscalls(summary: &Path, requests: u64) -> Result<Syscalls> {
    let table = std::fs::read_to_string(summary)
        .with_context(|| format!("reading {}", summary.display()))?;
    let per_syscall = parse_strace_summary(&table);
    if per_syscall.is_empty() {
        bail!("strace counted nothing (see {})", summary.display());
    }
    Ok(Syscalls {
        requests,
        per_syscall,
    })
}

/// The table `strace -c` writes: `% time seconds usecs/call calls errors syscall`, the errors
/// column empty when there were none.
fn parse_strace_summary(text: &str) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (Some(first), Some(&name)) = (words.first(), words.last()) else {
            continue;
        };
        if words.len() < 5 || first.parse::<f64>().is_err() || name == "total" {
            continue;
        }
        let number = |i: usize| words.get(i).and_then(|w| w.parse::<u64>().ok());
        let Some(calls) = number(3) else {
            continue;
        };
        let errors = if words.len() >= 6 { number(4) } else { None };
        out.insert(name.to_string(), (calls, errors.unwrap_or(0)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strace_tables_are_read_with_and_without_errors() {
        let table = "% time     seconds  usecs/call     calls    errors syscall\n\
                     ------ ----------- ----------- --------- --------- ----------------\n\
                     \x20 45.10    0.120000           3     40000           writev\n\
                     \x20 40.00    0.100000           2     46000      6000 recvfrom\n\
                     \x20  0.10    0.000100           1       100           epoll_ctl\n\
                     ------ ----------- ----------- --------- --------- ----------------\n\
                     100.00    0.220100           2     86100      6000 total\n";
        let got = parse_strace_summary(table);
        assert_eq!(got.len(), 3);
        assert_eq!(got["writev"], (40000, 0));
        assert_eq!(got["recvfrom"], (46000, 6000));
        let counts = Syscalls {
            requests: 20000,
            per_syscall: got,
        };
        assert!((counts.total_per_request() - 4.305).abs() < 1e-9);
        assert!((counts.errors_per_request() - 0.3).abs() < 1e-9);
        assert_eq!(counts.text(), "recvfrom 2.30 (0.30 failed), writev 2.00");
    }
}
