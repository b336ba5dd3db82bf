//! `[sync]` through a real etcd (Debian's etcd-server, started here on free ports) and two real
//! `lbd` processes, appliances "a" and "b" with the same file:
//! - an lbctl change on a is applied by b, which says where it came from, and b's traffic
//!   follows it;
//! - etcd stopped: both serve, a takes a change and holds it; etcd back: b applies it, once;
//! - `lbctl upgrade` of b: the new lbd reads on from the revision the old one reached, so
//!   nothing is applied twice, and it still follows a;
//! - the health verdicts: a backend killed is down on both, b sees a's verdicts;
//! - a majority decides: with a's check failing and b's passing, both serve through the
//!   backend; a third appliance failing it too takes it out on b as well; once it stops, the
//!   backend serves everywhere again (fails with the verdicts not combined: tried).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_addr, lbctl_ok, wait_until, Lbd, TempDir};
use lb_testkit::Origin;

const ETCD: &str = "/usr/bin/etcd";

struct Etcd {
    child: Option<Child>,
    dir: TempDir,
    client: SocketAddr,
    peer: SocketAddr,
}

impl Etcd {
    fn start() -> Etcd {
        let mut etcd = Etcd {
            child: None,
            dir: TempDir::new("etcd"),
            client: free_addr(),
            peer: free_addr(),
        };
        etcd.run();
        etcd
    }

    /// Starts etcd on its data directory and ports; waits until it answers a read.
    fn run(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).unwrap();
        let (c, p) = (self.client, self.peer);
        let child = Command::new(ETCD)
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .arg(format!("--listen-client-urls=http://{c}"))
            .arg(format!("--advertise-client-urls=http://{c}"))
            .arg(format!("--listen-peer-urls=http://{p}"))
            .arg(format!("--initial-advertise-peer-urls=http://{p}"))
            .arg(format!("--initial-cluster=t=http://{p}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("etcd-server is installed (cargo xtask setup)");
        self.child = Some(child);
        assert!(
            wait_until(Duration::from_secs(20), || self.answers()),
            "etcd answers on {c}:\n{}",
            std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
        );
    }

    fn answers(&self) -> bool {
        Command::new("curl")
            .args(["-sf", "-m", "1", "-X", "POST", "-d", "{\"key\":\"AA==\"}"])
            .arg(format!("http://{}/v3/kv/range", self.client))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

fn appliance(name: &str, etcd: SocketAddr, prefix: &str, backends: &[SocketAddr]) -> Lbd {
    appliance_checking(name, etcd, prefix, backends, "")
}

/// An appliance whose health check asks for `path` (none: a TCP connect check).
fn appliance_checking(
    name: &str,
    etcd: SocketAddr,
    prefix: &str,
    backends: &[SocketAddr],
    path: &str,
) -> Lbd {
    let path = if path.is_empty() {
        String::new()
    } else {
        format!("path = \"{path}\", ")
    };
    let backends: Vec<String> = backends
        .iter()
        .map(|b| format!("{{ address = \"{b}\" }}"))
        .collect();
    let backends = backends.join(", ");
    let (name, prefix) = (name.to_owned(), prefix.to_owned());
    Lbd::start(move |l| {
        format!(
            "[[listeners]]\naddress = \"{l}\"\n\n\
             [clusters.app]\nfrontends = [ {{ address = \"{l}\" }} ]\nbackends = [ {backends} ]\n\
             health_check = {{ {path}interval = \"200ms\", timeout = \"150ms\", rise = 2, fall = 2 }}\n\n\
             [sync]\netcd = [\"http://{etcd}\"]\nprefix = \"{prefix}\"\nname = \"{name}\"\n"
        )
    })
}

fn socket(lbd: &Lbd) -> PathBuf {
    lbd.dir().path().join("lbd.sock")
}

fn sync_status(socket: &Path) -> serde_json::Value {
    let text = lbctl_ok(socket, &["status", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["sync"].clone()
}

/// The running state (the backends are the only addresses in it besides the listener).
fn backends_in_state(socket: &Path) -> String {
    lbctl_ok(socket, &["state", "dump"])
}

/// The origin that answered a GET through `lbd`.
fn served_by(lbd: &Lbd) -> String {
    let out = Command::new("curl")
        .args(["-s", "-m", "5"])
        .arg(format!("http://{}/", lbd.addr()))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("origin "))
        .and_then(|l| l.split(':').next())
        .unwrap_or("")
        .to_owned()
}

/// The changes `sync` lists as coming from `origin` and naming `what`.
fn changes_from(sync: &serde_json::Value, origin: &str, what: &str) -> Vec<serde_json::Value> {
    sync["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["origin"] == origin && c["change"].as_str().unwrap().contains(what))
        .cloned()
        .collect()
}

fn backend(action: &str, socket: &Path, address: SocketAddr) -> String {
    lbctl_ok(
        socket,
        &[
            "backend",
            action,
            "--cluster",
            "app",
            "--address",
            &address.to_string(),
        ],
    )
}

#[test]
fn changes_and_verdicts_travel_through_etcd_and_survive_its_outage() {
    let mut etcd = Etcd::start();
    let o1 = Origin::start("o1");
    let o2 = Origin::start("o2");
    let o3 = Origin::start("o3");
    let prefix = format!("/kakehi/test-{}", std::process::id());
    let a = appliance("a", etcd.client, &prefix, &[o1.addr(), o2.addr()]);
    let mut b = appliance("b", etcd.client, &prefix, &[o1.addr(), o2.addr()]);
    let (sa, sb) = (socket(&a), socket(&b));
    for s in [&sa, &sb] {
        assert!(
            wait_until(Duration::from_secs(10), || sync_status(s)["connected"]
                == true),
            "connected: {}",
            sync_status(s)
        );
    }
    // Each sees the other's health verdicts.
    assert!(
        wait_until(Duration::from_secs(5), || sync_status(&sb)["appliances"]
            == serde_json::json!(["a"])),
        "{}",
        sync_status(&sb)
    );

    // A change on a reaches b.
    let started = Instant::now();
    backend("remove", &sa, o2.addr());
    let o2_text = o2.addr().to_string();
    assert!(
        wait_until(Duration::from_secs(5), || !backends_in_state(&sb)
            .contains(&o2_text)),
        "b applies a's change:\n{}",
        backends_in_state(&sb)
    );
    eprintln!(
        "a's backend remove applied on b after {:?}",
        started.elapsed()
    );
    let sync = sync_status(&sb);
    let from_a = changes_from(&sync, "a", "backend remove");
    assert_eq!(from_a.len(), 1, "{sync}");
    assert!(from_a[0]["revision"].as_u64().unwrap() > 0, "{sync}");
    assert!(from_a[0]["error"].is_null(), "{sync}");
    let mine = changes_from(&sync_status(&sa), "a (this appliance)", "backend remove");
    assert_eq!(mine.len(), 1);
    for _ in 0..6 {
        assert_eq!(served_by(&b), "o1");
    }

    // etcd gone: both serve; a takes a change and holds it.
    etcd.stop();
    assert!(
        wait_until(Duration::from_secs(10), || sync_status(&sa)["connected"]
            == false),
        "a sees etcd gone: {}",
        sync_status(&sa)
    );
    backend("add", &sa, o3.addr());
    let held = sync_status(&sa);
    assert_eq!(held["pending"], 1, "{held}");
    let text = lbctl_ok(&sa, &["status"]);
    assert!(text.contains("UNREACHABLE"), "{text}");
    for _ in 0..4 {
        assert!(["o1", "o3"].contains(&served_by(&a).as_str()));
        assert_eq!(served_by(&b), "o1");
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(!backends_in_state(&sb).contains(&o3.addr().to_string()));

    // etcd back: b applies the held change, once.
    etcd.run();
    let o3_text = o3.addr().to_string();
    assert!(
        wait_until(Duration::from_secs(15), || backends_in_state(&sb)
            .contains(&o3_text)),
        "b applies the change a made while etcd was away: {}",
        sync_status(&sb)
    );
    assert!(wait_until(Duration::from_secs(5), || sync_status(&sa)
        ["pending"]
        == 0));
    std::thread::sleep(Duration::from_secs(1));
    let sync = sync_status(&sb);
    assert_eq!(changes_from(&sync, "a", "backend add").len(), 1, "{sync}");
    assert_eq!(
        changes_from(&sync, "a", "backend remove").len(),
        1,
        "{sync}"
    );

    // b upgraded: the new lbd reads on from where the old one stopped.
    let binary = common::fresh_binary(b.dir().path(), 1);
    let out = lbctl_ok(&sb, &["upgrade", "--binary", binary.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(&lbctl_ok(&sb, &["status", "--json"])).unwrap();
    b.follow_main(v["pid"].as_i64().unwrap() as i32);
    assert!(
        wait_until(Duration::from_secs(10), || sync_status(&sb)["connected"]
            == true),
        "{out}"
    );
    std::thread::sleep(Duration::from_secs(1));
    let sync = sync_status(&sb);
    assert_eq!(
        sync["changes"].as_array().unwrap().len(),
        0,
        "nothing re-applied after the upgrade: {sync}"
    );
    backend("remove", &sa, o3.addr());
    assert!(
        wait_until(Duration::from_secs(5), || !backends_in_state(&sb)
            .contains(&o3_text)),
        "the upgraded b follows a: {}",
        sync_status(&sb)
    );

    // A backend killed is down on both.
    let o1_text = o1.addr().to_string();
    drop(o1);
    for s in [&sa, &sb] {
        assert!(
            wait_until(Duration::from_secs(10), || {
                let text = lbctl_ok(s, &["status"]);
                text.lines()
                    .any(|l| l.contains(&o1_text) && l.contains(" down "))
            }),
            "{}",
            lbctl_ok(s, &["status"])
        );
    }
}

/// The status line of a GET through `lbd`.
fn status_through(lbd: &Lbd) -> String {
    let out = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "5"])
        .arg(format!("http://{}/", lbd.addr()))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_backend_is_down_where_a_majority_of_appliances_says_so() {
    let etcd = Etcd::start();
    let o = Origin::start("o");
    let prefix = format!("/kakehi/majority-{}", std::process::id());
    // a's check asks for /status/500, so a finds the backend down; b's finds it up.
    let a = appliance_checking("a", etcd.client, &prefix, &[o.addr()], "/status/500");
    let b = appliance_checking("b", etcd.client, &prefix, &[o.addr()], "/health");
    let (sa, sb) = (socket(&a), socket(&b));
    let o_text = o.addr().to_string();
    let local_state = |s: &Path| {
        lbctl_ok(s, &["status"])
            .lines()
            .find(|l| l.contains(&o_text))
            .map(|l| l.contains(" down "))
    };
    assert!(wait_until(Duration::from_secs(10), || local_state(&sa)
        == Some(true)
        && sync_status(&sb)["appliances"] == serde_json::json!(["a"])
        && sync_status(&sa)["appliances"] == serde_json::json!(["b"])));
    assert_eq!(local_state(&sb), Some(false));
    // One of two says down: no majority, both serve through it (a too, against its own check).
    std::thread::sleep(Duration::from_secs(1));
    for _ in 0..5 {
        assert_eq!(status_through(&a), "200");
        assert_eq!(status_through(&b), "200");
    }

    // c agrees with a: two of three, and b takes it out too although its own check finds it up.
    let mut c = appliance_checking("c", etcd.client, &prefix, &[o.addr()], "/status/500");
    assert!(
        wait_until(Duration::from_secs(10), || status_through(&b) == "503"),
        "b follows the majority: {}",
        sync_status(&sb)
    );
    assert_eq!(
        local_state(&sb),
        Some(false),
        "b's own check still finds it up"
    );
    assert_eq!(status_through(&a), "503");

    // c stops (its lease is revoked): one of two again, and it serves everywhere.
    c.shutdown();
    assert!(
        wait_until(Duration::from_secs(10), || status_through(&b) == "200"
            && status_through(&a) == "200"),
        "{}",
        sync_status(&sb)
    );
}
