//! `cargo xtask test`: every gate CI applies, in the order CI applies them.
//!
//! Owns the list and order of the gates: setup, `cargo fmt --check`, clippy with warnings
//! denied, the whole workspace's tests, and (later) a short fuzz smoke run. Each step streams
//! its output; the first failure stops the run with a non-zero exit. What the tests check is
//! the crates' business.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::procs::{self, Signals};

pub fn test(signals: &Signals) -> Result<()> {
    let started = Instant::now();
    let root = crate::root();
    crate::setup::setup(signals, &crate::setup::TEST)?;

    let steps: [(&str, &[&str]); 3] = [
        ("fmt", &["fmt", "--all", "--", "--check"]),
        (
            "clippy",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ],
        ),
        ("tests", &["test", "--workspace"]),
    ];
    let mut done = Vec::new();
    for (name, args) in steps {
        println!("\nxtask test: cargo {}", args.join(" "));
        let step_started = Instant::now();
        procs::run_step(signals, Command::new("cargo").current_dir(&root).args(args))
            .with_context(|| format!("step `{name}` failed ({} passed before it)", done.len()))?;
        done.push(format!(
            "{name} {:.0}s",
            step_started.elapsed().as_secs_f64()
        ));
    }
    if let Some(note) = fuzz_smoke(signals, &root)? {
        done.push(note);
    }
    println!(
        "\nxtask test: all gates green ({}) in {:.0}s",
        done.join(", "),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The fuzz smoke run's place. Runs only when `fuzz/` exists and `cargo fuzz` is installed;
/// never required. The run itself (each target for a few seconds on its kept corpus) is added
/// with the first fuzz target.
fn fuzz_smoke(_signals: &Signals, root: &Path) -> Result<Option<String>> {
    if !root.join("fuzz").is_dir() {
        return Ok(None);
    }
    let available = procs::output(
        Command::new("cargo")
            .args(["fuzz", "--version"])
            .current_dir(root),
    )
    .is_ok_and(|output| output.status.success());
    if !available {
        println!(
            "\nxtask test: fuzz/ exists but `cargo fuzz` is not installed: fuzz smoke skipped"
        );
        return Ok(Some("fuzz skipped".into()));
    }
    println!("\nxtask test: fuzz smoke run not defined yet: skipped");
    Ok(Some("fuzz skipped".into()))
}
