//! Config errors as an operator meets them, through the real `lbd` binary: `lbd --check` on a
//! bad file exits 1 and its stderr names the file, the line and the field
//! (`file:line:col: field: message`); a valid file (and the shipped examples) exits 0; and a bad
//! file given to `lbd --config` starts nothing: exit 1 and the listener's port never bound.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::ffi::OsStr;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use common::{free_addr, run_lbd, TempDir};

/// A valid config: one listener, one cluster.
const VALID: &str = r#"[[listeners]]
address = "127.0.0.1:18080"

[clusters.app]
load_balancing = "round-robin"
frontends = [ { address = "127.0.0.1:18080", hostname = "localhost" } ]
backends = [ { address = "127.0.0.1:19001" } ]
"#;

/// Runs `lbd --check --config FILE` on `text`; returns (exit code, stderr, file path).
fn check(text: &str) -> (Option<i32>, String, String) {
    let dir = TempDir::new("check");
    let path = dir.write("lbd.toml", text);
    let out = run_lbd(&[
        OsStr::new("--check"),
        OsStr::new("--config"),
        path.as_os_str(),
    ]);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        path.display().to_string(),
    )
}

/// The 1-based line of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("{needle:?} not in the config"))
        + 1
}

/// Asserts `lbd --check` refuses `text` with an error at the line holding `marker`, about
/// `field`.
fn refused(text: &str, marker: &str, field: &str) {
    let (code, stderr, path) = check(text);
    assert_eq!(
        code,
        Some(1),
        "exit code for a bad config; stderr:\n{stderr}"
    );
    let line = line_of(text, marker);
    let located = format!("{path}:{line}:");
    assert!(
        stderr.contains(&located),
        "stderr should point at {located} (the line with {marker:?}), got:\n{stderr}\nconfig:\n{text}"
    );
    assert!(
        stderr.contains(field),
        "stderr should name the field {field:?}, got:\n{stderr}"
    );
    assert_eq!(
        stderr.lines().filter(|l| !l.trim().is_empty()).count(),
        1,
        "one error line:\n{stderr}"
    );
}

#[test]
fn valid_config_exits_0() {
    let (code, stderr, _) = check(VALID);
    assert_eq!(code, Some(0), "stderr:\n{stderr}");
}

#[test]
fn shipped_examples_are_valid() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/examples");
    for name in ["quickstart.toml", "full.toml"] {
        let path = examples.join(name);
        let out = run_lbd(&[
            OsStr::new("--check"),
            OsStr::new("--config"),
            path.as_os_str(),
        ]);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn unknown_key() {
    let text = VALID.replace(
        "load_balancing = \"round-robin\"",
        "load_balancing = \"round-robin\"\nbalancing_speed = 3",
    );
    refused(&text, "balancing_speed", "balancing_speed");
    let text = format!("wrokers = 2\n{VALID}");
    refused(&text, "wrokers", "wrokers");
    let text = VALID.replace(
        "{ address = \"127.0.0.1:19001\" }",
        "{ address = \"127.0.0.1:19001\", wieght = 2 }",
    );
    refused(&text, "wieght", "wieght");
}

#[test]
fn bad_address() {
    let text = VALID.replace(
        "address = \"127.0.0.1:18080\"\n",
        "address = \"127.0.0.1:99999\"\n",
    );
    refused(&text, "99999", "listeners[0].address");
    let text = VALID.replace("127.0.0.1:19001", "localhost:9001");
    refused(&text, "localhost:9001", "clusters.app.backends[0].address");
}

#[test]
fn frontend_on_no_listener() {
    let text = VALID.replace(
        "{ address = \"127.0.0.1:18080\", hostname",
        "{ address = \"127.0.0.1:18081\", hostname",
    );
    refused(&text, "18081", "clusters.app.frontends[0].address");
}

#[test]
fn cluster_without_backend() {
    let text = VALID.replace(
        "backends = [ { address = \"127.0.0.1:19001\" } ]",
        "backends = []",
    );
    refused(&text, "backends = []", "clusters.app.backends");
    let text = VALID.replace("backends = [ { address = \"127.0.0.1:19001\" } ]\n", "");
    refused(&text, "[clusters.app]", "clusters.app.backends");
}

#[test]
fn duplicate_listener() {
    let text = format!("{VALID}\n[[listeners]]\naddress = \"127.0.0.1:18080\" # again\n");
    refused(&text, "# again", "listeners[1].address");
}

#[test]
fn bad_regex() {
    let text = VALID.replace("hostname = \"localhost\"", "hostname = \"~^api[0-9+$\"");
    refused(&text, "~^api[0-9+$", "clusters.app.frontends[0].hostname");
    let text = VALID.replace(
        "hostname = \"localhost\"",
        "path = \"^/v(1|2\", path_type = \"regex\"",
    );
    refused(&text, "^/v(1|2", "clusters.app.frontends[0].path");
}

#[test]
fn bad_values() {
    let text = VALID.replace("\"round-robin\"", "\"fastest\"");
    refused(&text, "fastest", "clusters.app.load_balancing");
    let text = format!("[timeouts]\nconnect = \"5 parsecs\"\n\n{VALID}");
    refused(&text, "parsecs", "timeouts.connect");
    let text = format!("buffer_size = 12\n{VALID}");
    refused(&text, "buffer_size", "buffer_size");
    let text = VALID.replace(
        "{ address = \"127.0.0.1:19001\" }",
        "{ address = \"127.0.0.1:19001\", weight = 0 }",
    );
    refused(&text, "weight = 0", "clusters.app.backends[0].weight");
}

#[test]
fn toml_syntax_error_has_a_line() {
    let text = VALID.replace("[clusters.app]", "[clusters.app");
    let (code, stderr, path) = check(&text);
    assert_eq!(code, Some(1));
    let line = line_of(&text, "[clusters.app");
    assert!(
        stderr.contains(&format!("{path}:{line}:")),
        "syntax error should point at line {line}:\n{stderr}"
    );
}

#[test]
fn missing_file() {
    let dir = TempDir::new("missing");
    let path = dir.path().join("nope.toml");
    let out = run_lbd(&[
        OsStr::new("--check"),
        OsStr::new("--config"),
        path.as_os_str(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&path.display().to_string()),
        "the error names the file:\n{stderr}"
    );
}

#[test]
fn bad_config_starts_nothing() {
    let listener = free_addr();
    let text = format!(
        "[[listeners]]\naddress = \"{listener}\"\n\n[clusters.app]\n\
         frontends = [ {{ address = \"{listener}\" }} ]\nbackends = []\n"
    );
    let dir = TempDir::new("badstart");
    let path = dir.write("lbd.toml", &text);
    let out = run_lbd(&[OsStr::new("--config"), path.as_os_str()]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "lbd --config with a bad file: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:{}:",
            path.display(),
            line_of(&text, "backends = []")
        )),
        "{stderr}"
    );
    assert!(
        TcpStream::connect_timeout(&listener, Duration::from_secs(1)).is_err(),
        "the listener {listener} accepts connections although the config was refused"
    );
}
