//! `cargo xtask test`: every gate CI applies, in the order CI applies them.
//!
//! Owns the list and order of the gates: setup, `cargo fmt --check`, clippy with warnings
//! denied, the whole workspace's tests, a short fuzz smoke run, and the appliance image's boot
//! test (`vm-test`) and the Debian package's install test (`dist-test`). Each step streams its output; the first failure stops the run with a
//! non-zero exit. What the tests check is the crates' business.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::procs::{self, Signals};

pub fn test(signals: &Signals) -> Result<()> {
    let started = Instant::now();
    let root = crate::root();
    crate::setup::setup(signals, &crate::setup::TEST)?;
    crate::setup::httpwg()?;

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
        let mut cargo = Command::new("cargo");
        cargo.current_dir(&root).args(args);
        // One full run gains nothing from incremental state, which would double the target
        // directory on a fresh clone (gigabytes that CI's disk does not have).
        if std::env::var_os("CARGO_INCREMENTAL").is_none() {
            cargo.env("CARGO_INCREMENTAL", "0");
        }
        procs::run_step(signals, &mut cargo)
            .with_context(|| format!("step `{name}` failed ({} passed before it)", done.len()))?;
        done.push(format!(
            "{name} {:.0}s",
            step_started.elapsed().as_secs_f64()
        ));
    }
    if let Some(note) = fuzz_smoke(signals, &root)? {
        done.push(note);
    }
    // The appliance image: built (or found up to date), booted under qemu, checked.
    println!("\nxtask test: cargo xtask vm-test");
    let step_started = Instant::now();
    crate::vm::vm_test(signals, &crate::vm::TestArgs::default())
        .context("step `vm-test` failed: the appliance image did not boot and serve")?;
    done.push(format!(
        "vm-test {:.0}s",
        step_started.elapsed().as_secs_f64()
    ));
    // The Debian package: built, installed with apt into the appliance's Debian tree, serving.
    println!("\nxtask test: cargo xtask dist-test");
    let step_started = Instant::now();
    crate::dist::dist_test(signals, &crate::dist::Args { prebuilt: true })
        .context("step `dist-test` failed: the package did not install and serve")?;
    done.push(format!(
        "dist-test {:.0}s",
        step_started.elapsed().as_secs_f64()
    ));
    println!(
        "\nxtask test: all gates green ({}) in {:.0}s",
        done.join(", "),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The fuzz smoke run (`fuzz/smoke.sh`): replays every kept regression, then runs each target
/// for a few seconds from its seed corpus; a crash fails the gate. It needs a nightly toolchain
/// (libFuzzer's instrumentation) and cargo-fuzz: cargo-fuzz is installed from crates.io when
/// missing; without a nightly toolchain the run is skipped and says so.
fn fuzz_smoke(signals: &Signals, root: &Path) -> Result<Option<String>> {
    if !root.join("fuzz").is_dir() {
        return Ok(None);
    }
    let succeeds = |cmd: &mut Command| procs::output(cmd).is_ok_and(|o| o.status.success());
    if !succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
        println!("\nxtask test: no nightly toolchain for libFuzzer: fuzz smoke skipped");
        return Ok(Some("fuzz skipped (no nightly)".into()));
    }
    if !succeeds(
        Command::new("cargo")
            .args(["fuzz", "--version"])
            .current_dir(root),
    ) {
        println!("\nxtask test: cargo install cargo-fuzz --locked");
        procs::run_step(
            signals,
            Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]),
        )
        .context("installing cargo-fuzz")?;
    }
    let step_started = Instant::now();
    println!("\nxtask test: fuzz/smoke.sh {FUZZ_SECONDS}");
    procs::run_step(
        signals,
        Command::new("bash")
            .arg(root.join("fuzz/smoke.sh"))
            .arg(FUZZ_SECONDS)
            .current_dir(root),
    )
    .context("step `fuzz` failed: a fuzz target crashed (the input is in fuzz/artifacts/)")?;
    Ok(Some(format!(
        "fuzz {:.0}s",
        step_started.elapsed().as_secs_f64()
    )))
}

/// Seconds each fuzz target runs in the smoke run.
const FUZZ_SECONDS: &str = "15";
