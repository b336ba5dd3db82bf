//! wrk, the load generator: started by the test, its summary parsed and checked.

use super::wait::wait_until;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

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
