//! `cargo xtask cluster-demo` in CI (issue 17, part 4): `xtask/cluster_demo.py` builds network
//! namespaces (a client with 200 source addresses, a bird2 router with ECMP, three appliances
//! each with lbd and bird2, the backends and one etcd), runs this build's lbd in them, and
//! checks: each source keeps its backend whichever appliance takes the flow; an appliance
//! stopped is withdrawn over BGP, new flows go to the others and their established connections
//! answer; a change on one appliance reaches another; a backend killed is down everywhere and
//! moves only its own sources; etcd stopped for 10 s breaks nothing and its changes converge.
//! The script exits 1 on any failed check; the figures are asserted here again from its JSON.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{lbctl_bin, lbd_bin, run_bounded, TempDir};

#[test]
fn three_appliances_behind_one_router() {
    let bin = Path::new(lbd_bin()).parent().unwrap().to_path_buf();
    assert_eq!(lbctl_bin().parent(), Some(bin.as_path()));
    // The demo origin, built next to lbd (cargo test builds only lbd's own binaries).
    let mut build = Command::new(env!("CARGO"));
    build
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
        .args(["build", "-p", "lb-testkit", "--bin", "lb-origin"]);
    let out = run_bounded(build, Duration::from_secs(600), "cargo build lb-origin");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(bin.join("lb-origin").exists());

    let dir = TempDir::new("cluster-demo");
    let figures = dir.path().join("figures.json");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../xtask/cluster_demo.py");
    let mut demo = Command::new("/usr/bin/python3");
    demo.arg(&script)
        .arg("--bin")
        .arg(&bin)
        .arg("--json")
        .arg(&figures)
        // Debug builds beside the whole suite: 3 s, the figure is printed either way.
        .args(["--deadline", "3"]);
    let out = run_bounded(demo, Duration::from_secs(300), "cluster_demo.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&figures).unwrap()).unwrap();
    assert_eq!(v["failed"], serde_json::json!([]), "{v}");
    let r = &v["results"];
    assert_eq!(r["sources_stable"], 200, "{v}");
    assert_eq!(r["after_a2_stopped"]["new_flow_errors"], 0, "{v}");
    assert_eq!(
        r["after_a2_stopped"]["sources_on_another_backend"], 0,
        "{v}"
    );
    assert_eq!(
        r["held_connections"]["answering_after"], r["held_connections"]["on_a1_a3"],
        "{v}"
    );
    assert_eq!(r["backend_killed"]["other_sources_moved"], 0, "{v}");
    assert_eq!(
        r["backend_killed"]["its_sources_moved"], r["backend_killed"]["its_sources"],
        "{v}"
    );
}
