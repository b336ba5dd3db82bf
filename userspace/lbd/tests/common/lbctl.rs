//! lbctl, run against a test's command socket; its binary found (or built) next to lbd's.

use super::lbd::lbd_bin;
use super::procs::run_bounded;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

/// What one `lbctl --socket SOCKET ARGS` said (40 s timeout, killed after 60 s).
#[derive(Debug)]
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
