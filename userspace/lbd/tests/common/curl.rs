//! curl, the real HTTP client some tests need (never skipped when missing).

use std::io::ErrorKind;
use std::process::{Command, Output, Stdio};

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
