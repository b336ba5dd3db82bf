//! `cargo xtask`: the developer's and CI's entry point to kakehi.
//!
//! It owns the commands that a new user and CI run — `setup` (system prerequisites), `run`
//! (the quickstart demo), `test` (every gate CI applies), `bench` (kakehi against nginx and
//! HAProxy) and `vm-image`/`vm-test` (the appliance image). It is not the data path: the
//! proxy lives in `lbd` and `lb-proxy`, and nothing here is linked into them. Each command lives in its own module; process handling that several
//! commands share (signals, children stopped by pid, ports) lives in `procs`.

// xtask is a developer tool, not the data path: a broken invariant here may panic with a
// message instead of threading an error through, so the workspace's data-path lints are relaxed.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod bench;
mod cluster_demo;
mod dashboard;
mod dist;
mod ebpf;
mod procs;
mod run;
mod setup;
mod test;
mod vm;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "kakehi developer commands",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install the system prerequisites (apt packages, the eBPF toolchain, what the appliance
    /// image needs), idempotently; root if any is missing.
    Setup,
    /// Serve the quickstart: two demo origins and lbd on config/examples/quickstart.toml.
    #[command(visible_alias = "demo")]
    Run(run::Args),
    /// Run every gate CI runs: fmt, clippy, the whole test suite.
    Test,
    /// Benchmark kakehi against nginx and HAProxy on this machine (not a test).
    Bench(bench::Args),
    /// Build the eBPF steering program as `cargo build` does, load it into the kernel (in a
    /// fresh network namespace) to prove the verifier accepts it, and print its size.
    BuildEbpf,
    /// Build the appliance VM image (target/vm/kakehi.qcow2): Debian, systemd, DHCP, a serial
    /// console, the release lbd and lbctl and kakehi.service; a second run reuses what is up
    /// to date.
    VmImage(vm::ImageArgs),
    /// Boot the appliance image under qemu (TCG), send HTTP through it and check, inside the
    /// guest, the sandbox, the eBPF steering and lbctl; builds the image first if needed.
    VmTest(vm::TestArgs),
    /// Build the Debian package target/kakehi_VERSION_ARCH.deb: lbd, lbctl, the systemd unit,
    /// the default config, manual pages and shell completions.
    Dist(dist::Args),
    /// Build the package, install it with apt into a Debian 12 tree (the appliance's, chroot)
    /// and see the installed lbd serve.
    DistTest(dist::Args),
    /// Draw the Grafana dashboard (config/grafana/kakehi.json) fed by a real run: lbd with
    /// eBPF steering and Debian's Prometheus in a fresh network namespace, 100 s of scripted
    /// traffic; writes config/grafana/kakehi.png.
    Dashboard(dashboard::Args),
    /// Three appliances behind one BGP router on this machine: network namespaces, bird2 with
    /// ECMP, lbd with Maglev, [sync] through one etcd and [bgp] on each; checks that a source
    /// keeps its backend, an appliance stopping is withdrawn, changes travel (issue 17).
    ClusterDemo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = procs::Signals::install().and_then(|signals| match cli.command {
        Command::Setup => setup::setup(&signals, &setup::ALL)
            .and_then(|()| setup::httpwg())
            .and_then(|()| setup::setup_vm(&signals))
            .map(|()| ExitCode::SUCCESS),
        Command::Run(args) => run::run(&signals, &args),
        Command::Test => test::test(&signals).map(|()| ExitCode::SUCCESS),
        Command::Bench(args) => bench::bench(&signals, &args).map(|()| ExitCode::SUCCESS),
        Command::BuildEbpf => ebpf::build_ebpf().map(|()| ExitCode::SUCCESS),
        Command::VmImage(args) => vm::vm_image(&signals, &args).map(|_| ExitCode::SUCCESS),
        Command::VmTest(args) => vm::vm_test(&signals, &args).map(|()| ExitCode::SUCCESS),
        Command::Dist(args) => dist::dist(&signals, &args).map(|_| ExitCode::SUCCESS),
        Command::DistTest(args) => dist::dist_test(&signals, &args).map(|()| ExitCode::SUCCESS),
        Command::ClusterDemo => cluster_demo::cluster_demo(&signals).map(|()| ExitCode::SUCCESS),
        Command::Dashboard(args) => {
            dashboard::dashboard(&signals, &args).map(|()| ExitCode::SUCCESS)
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root (the parent of this crate), whatever the current directory is.
fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::canonicalize(&manifest).unwrap_or(manifest);
    manifest
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// target/release/lbd and lbctl, built first (`cargo build --release -p lbd -p lbctl`) unless
/// `prebuilt`; `what` names the command in what it prints.
fn release_binaries(
    signals: &procs::Signals,
    what: &str,
    prebuilt: bool,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    if !prebuilt {
        println!("\nxtask {what}: cargo build --release -p lbd -p lbctl");
        procs::run_step(
            signals,
            std::process::Command::new("cargo")
                .current_dir(root())
                .args(["build", "--release", "-p", "lbd", "-p", "lbctl"]),
        )?;
    }
    let release = target_dir().join("release");
    Ok((release.join("lbd"), release.join("lbctl")))
}

/// `cargo build --release -p P...` of `packages`, said first as `xtask {what}: ...`; the
/// directory of the binaries.
fn build_release(
    signals: &procs::Signals,
    what: &str,
    packages: &[&str],
) -> anyhow::Result<PathBuf> {
    let mut args = vec!["build", "--release"];
    for p in packages {
        args.extend(["-p", p]);
    }
    println!("\nxtask {what}: cargo {}", args.join(" "));
    procs::run_step(
        signals,
        std::process::Command::new("cargo")
            .current_dir(root())
            .args(&args),
    )?;
    Ok(target_dir().join("release"))
}

/// Cargo's target directory: `CARGO_TARGET_DIR` when set, else `<root>/target`.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            if dir.is_absolute() {
                dir
            } else {
                root().join(dir)
            }
        }
        None => root().join("target"),
    }
}
