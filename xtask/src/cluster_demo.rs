//! `cargo xtask cluster-demo`: three appliances behind one BGP router, on this machine
//! (issue 17, part 4).
//!
//! Installs what it needs (bird2, etcd-server, curl), builds the release lbd, lbctl and the
//! demo origin, then runs `xtask/cluster_demo.py`, which owns the choreography: network
//! namespaces for a client with 200 source addresses, a bird2 router with ECMP, three
//! appliances (lbd and bird2 each), the backends and one etcd; then the checks it prints.
//! `userspace/lbd/tests/cluster_demo.rs` runs the same script in CI.

use std::process::Command;

use anyhow::Result;

use crate::procs::{self, Signals};

pub const PACKAGES: [&str; 4] = ["bird2", "etcd-server", "curl", "iproute2"];

pub fn cluster_demo(signals: &Signals) -> Result<()> {
    crate::setup::setup(signals, &PACKAGES)?;
    let bin = crate::build_release(signals, "cluster-demo", &["lbd", "lbctl", "lb-testkit"])?;
    procs::run_step(
        signals,
        Command::new("/usr/bin/python3")
            .arg(crate::root().join("xtask/cluster_demo.py"))
            .arg("--bin")
            .arg(&bin),
    )
}
