//! h2load (Debian's nghttp2-client): its summary read back, and the check that it is there.

use std::collections::HashMap;
use std::path::Path;

/// h2load's counters: "requests: 2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed,
/// 0 errored, 0 timeout" and "status codes: 2000 2xx, 0 3xx, 0 4xx, 0 5xx", by their words
/// (the status ones as "status 2xx"...).
pub fn parse_h2load(out: &str) -> HashMap<String, u64> {
    let mut m = HashMap::new();
    for (prefix, tag) in [("requests:", ""), ("status codes:", "status ")] {
        let line = out
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in h2load's output:\n{out}"));
        for part in line.split(',') {
            let mut kv = part.split_whitespace();
            if let (Some(n), Some(word)) = (kv.next(), kv.next()) {
                let n = n
                    .parse()
                    .unwrap_or_else(|_| panic!("a number in {part:?}:\n{out}"));
                m.insert(format!("{tag}{word}"), n);
            }
        }
    }
    m
}

/// Fails the test, with the way out, when `program` (from Debian's `package`) is not on PATH:
/// never skipped.
pub fn require(program: &str, package: &str) {
    let installed = std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .any(|d| Path::new(d).join(program).is_file());
    assert!(
        installed,
        "this test needs {program} (Debian's {package}: `cargo xtask setup` or apt-get install \
         -y {package}); it is not skipped"
    );
}

/// Runs `h2load -n N ARGS... -N 10 URL` (bounded by `deadline`) and asserts that every request
/// succeeded with a 2xx over `proto` ("h2c", "h2", "http/1.1"). Returns what it printed.
pub fn h2load_all_ok(
    args: &[&str],
    url: &str,
    n: u64,
    proto: &str,
    deadline: std::time::Duration,
) -> String {
    require("h2load", "nghttp2-client");
    let mut cmd = std::process::Command::new("h2load");
    // -N: a connection quiet for 10 s is given up (and counted as failed requests).
    cmd.args(["-n", &n.to_string()])
        .args(args)
        .args(["-N", "10", url]);
    let out = super::run_bounded(cmd, deadline, &format!("h2load {url}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(
        text.contains(&format!("Application protocol: {proto}\n")),
        "h2load did not use {proto}:\n{text}"
    );
    let m = parse_h2load(&text);
    let get = |k: &str| m.get(k).copied().unwrap_or(u64::MAX);
    assert_eq!(
        (
            get("total"),
            get("done"),
            get("succeeded"),
            get("status 2xx")
        ),
        (n, n, n, n),
        "not every request succeeded with a 2xx:\n{text}"
    );
    assert_eq!(
        (get("failed"), get("errored"), get("timeout")),
        (0, 0, 0),
        "failures:\n{text}"
    );
    text
}
