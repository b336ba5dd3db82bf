//! `cargo xtask dashboard`: the picture of the Grafana dashboard the README shows, fed by a
//! real run.
//!
//! Installs what it needs (Debian's Prometheus, matplotlib, wrk), builds the release lbd and
//! the demo origin, then runs `config/grafana/render.py` in a fresh network namespace (it
//! loads the eBPF steering program): lbd, three origins and Prometheus, a bounded script of
//! traffic, then every panel of `config/grafana/kakehi.json` queried from Prometheus and
//! drawn where the dashboard places it. The script owns the choreography; this owns set-up.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Result;

use crate::procs::{self, Signals};

/// What the picture needs besides the release binaries.
pub const PACKAGES: [&str; 4] = ["prometheus", "python3-matplotlib", "wrk", "iproute2"];

#[derive(clap::Args)]
pub struct Args {
    /// Where to write the PNG.
    #[arg(long, default_value = "config/grafana/kakehi.png")]
    out: PathBuf,
    /// Seconds of traffic (the script's phases are placed for the default).
    #[arg(long, default_value_t = 100)]
    seconds: u32,
}

pub fn dashboard(signals: &Signals, args: &Args) -> Result<()> {
    crate::setup::setup(signals, &PACKAGES)?;
    let root = crate::root();
    let bin = crate::build_release(signals, "dashboard", &["lbd", "lb-testkit"])?;
    let out = if args.out.is_absolute() {
        args.out.clone()
    } else {
        root.join(&args.out)
    };
    procs::run_step(
        signals,
        Command::new("unshare")
            .args(["--net", "--", "/usr/bin/python3"])
            .arg(root.join("config/grafana/render.py"))
            .arg("--bin")
            .arg(&bin)
            .arg("--out")
            .arg(&out)
            .arg("--seconds")
            .arg(args.seconds.to_string()),
    )?;
    println!("xtask dashboard: {}", out.display());
    Ok(())
}
