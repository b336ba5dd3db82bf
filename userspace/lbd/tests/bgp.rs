//! `[bgp]` with real bird2 (Debian's): a router namespace and an appliance namespace joined by a
//! veth pair, each running bird; lbd (in the test's own namespace: it only speaks to the
//! appliance bird's control socket) writes the appliance bird's configuration, and the router
//! learns the VIP over BGP:
//! - announced while lbd serves;
//! - withdrawn when its only backend is down by the health check, and announced again when it
//!   is back;
//! - kept across `lbctl upgrade`;
//! - withdrawn when lbd stops.
//!
//! The times are printed for the note; the deadlines are generous.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{lbctl_ok, wait_until, Lbd, TempDir};
use lb_testkit::Origin;

const VIP: &str = "192.0.2.10";

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces joined by a veth pair, a bird in each; removed (and the birds stopped) on
/// drop.
struct Routers {
    router: String,
    appliance: String,
    dir: TempDir,
}

impl Routers {
    fn start() -> Routers {
        let id = std::process::id();
        let r = Routers {
            router: format!("kakehi-bgp-r-{id}"),
            appliance: format!("kakehi-bgp-a-{id}"),
            dir: TempDir::new("bgp"),
        };
        let (rr, aa) = (r.router.as_str(), r.appliance.as_str());
        run(&["ip", "netns", "add", rr]);
        run(&["ip", "netns", "add", aa]);
        let (vr, va) = (format!("kr{}", id % 100_000), format!("ka{}", id % 100_000));
        run(&[
            "ip", "link", "add", &vr, "type", "veth", "peer", "name", &va,
        ]);
        run(&["ip", "link", "set", &vr, "netns", rr]);
        run(&["ip", "link", "set", &va, "netns", aa]);
        run(&["ip", "-n", rr, "addr", "add", "10.99.0.1/24", "dev", &vr]);
        run(&["ip", "-n", aa, "addr", "add", "10.99.0.2/24", "dev", &va]);
        for (ns, dev) in [(rr, &vr), (aa, &va)] {
            run(&["ip", "-n", ns, "link", "set", dev, "up"]);
            run(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let router_conf = r.dir.write(
            "router.conf",
            "router id 10.99.0.1;\nprotocol device { scan time 1; }\n\
             protocol kernel { ipv4 { export all; }; }\n\
             protocol bgp appliance {\n  local 10.99.0.1 as 65000;\n  neighbor 10.99.0.2 as 65001;\n  \
             hold time 9; keepalive time 3;\n  connect delay time 1; connect retry time 2; error wait time 1, 10;\n  \
             ipv4 { import all; export none; };\n}\n",
        );
        // lbd writes the appliance's real configuration; this one only lets bird start.
        let appliance_conf = r.dir.write(
            "appliance.conf",
            "router id 10.99.0.2;\nprotocol device {}\n",
        );
        r.bird(rr, &router_conf, "router");
        r.bird(aa, &appliance_conf, "appliance");
        r
    }

    fn bird(&self, ns: &str, conf: &Path, name: &str) {
        let dir = self.dir.path();
        run(&[
            "ip",
            "netns",
            "exec",
            ns,
            "bird",
            "-c",
            conf.to_str().unwrap(),
            "-s",
            dir.join(format!("{name}.ctl")).to_str().unwrap(),
            "-P",
            dir.join(format!("{name}.pid")).to_str().unwrap(),
        ]);
    }

    fn ctl(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.ctl"))
    }

    /// Whether the router's kernel table has the VIP, learnt from bird.
    fn router_has_vip(&self) -> bool {
        let out = Command::new("ip")
            .args(["-n", &self.router, "route", "show", VIP])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).contains("via 10.99.0.2")
    }

    /// The appliance bird's line for kakehi_vip: its state and since when (in ms), which
    /// changes with any down and up however short.
    fn vip_protocol(&self) -> String {
        self.birdc("appliance", "show protocols kakehi_vip")
            .lines()
            .find(|l| l.starts_with("kakehi_vip "))
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn birdc(&self, name: &str, command: &str) -> String {
        let out = Command::new("birdc")
            .arg("-s")
            .arg(self.ctl(name))
            .args(command.split(' '))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Routers {
    fn drop(&mut self) {
        for name in ["router", "appliance"] {
            if let Ok(pid) = std::fs::read_to_string(self.dir.path().join(format!("{name}.pid"))) {
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    common::stop_process(pid, Duration::from_secs(2));
                }
            }
        }
        for ns in [&self.router, &self.appliance] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn the_vip_is_announced_while_lbd_serves() {
    let routers = Routers::start();
    let origin = Origin::start("o");
    let origin_addr = origin.addr();
    let conf = routers.dir.path().join("appliance.conf");
    let ctl = routers.ctl("appliance");
    let started = Instant::now();
    let mut lbd = Lbd::start(|l| {
        format!(
            "[[listeners]]\naddress = \"{l}\"\n\n\
             [clusters.app]\nfrontends = [ {{ address = \"{l}\" }} ]\n\
             backends = [ {{ address = \"{origin_addr}\" }} ]\n\
             health_check = {{ interval = \"200ms\", timeout = \"150ms\", rise = 2, fall = 2 }}\n\n\
             [bgp]\nvip = \"{VIP}\"\nlocal_as = 65001\nrouter_id = \"10.99.0.2\"\n\
             peers = [ {{ address = \"10.99.0.1\", as = 65000 }} ]\n\
             bird_socket = \"{}\"\nbird_config = \"{}\"\n",
            ctl.display(),
            conf.display()
        )
    });
    assert!(
        wait_until(Duration::from_secs(20), || routers.router_has_vip()),
        "the router learns the VIP: {}\n{}\n{}",
        routers.birdc("router", "show protocols all appliance"),
        routers.birdc("appliance", "show protocols"),
        lbd.stderr()
    );
    eprintln!("announced {:?} after lbd started", started.elapsed());
    let text = std::fs::read_to_string(&conf).unwrap();
    assert!(text.contains("protocol static kakehi_vip"), "{text}");

    // The only backend down: withdrawn; back: announced.
    drop(origin);
    let killed = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || !routers.router_has_vip()),
        "withdrawn with no backend up:\n{}",
        lbd.stderr()
    );
    eprintln!("withdrawn {:?} after the backend died", killed.elapsed());
    let origin = Origin::start_on("o", origin_addr).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || routers.router_has_vip()),
        "announced again when the backend is back"
    );

    // lbctl upgrade keeps it: never withdrawn meanwhile, not even for a moment in the
    // appliance's bird (the next lbd must not have bird load the same configuration again:
    // that resets kakehi_vip to the file's `disabled` until lbd enables it again).
    let before = routers.vip_protocol();
    assert!(before.contains(" up "), "{before}");
    let socket = lbd.dir().path().join("lbd.sock");
    let binary = common::fresh_binary(lbd.dir().path(), 1);
    let watching = std::thread::spawn({
        let router = routers.router.clone();
        move || {
            let deadline = Instant::now() + Duration::from_secs(8);
            let mut missing = 0;
            while Instant::now() < deadline {
                let out = Command::new("ip")
                    .args(["-n", &router, "route", "show", VIP])
                    .output()
                    .unwrap();
                if !String::from_utf8_lossy(&out.stdout).contains("via 10.99.0.2") {
                    missing += 1;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            missing
        }
    });
    lbctl_ok(&socket, &["upgrade", "--binary", binary.to_str().unwrap()]);
    let v: serde_json::Value =
        serde_json::from_str(&lbctl_ok(&socket, &["status", "--json"])).unwrap();
    lbd.follow_main(v["pid"].as_i64().unwrap() as i32);
    assert_eq!(
        watching.join().unwrap(),
        0,
        "the VIP stays announced across the upgrade"
    );
    assert_eq!(
        routers.vip_protocol(),
        before,
        "kakehi_vip stays up in the appliance's bird across the upgrade:\n{}",
        lbd.stderr()
    );

    // lbd stops: withdrawn.
    let stopping = Instant::now();
    lbd.shutdown();
    assert!(
        wait_until(Duration::from_secs(10), || !routers.router_has_vip()),
        "withdrawn when lbd stops"
    );
    eprintln!(
        "withdrawn {:?} after lbd was told to stop",
        stopping.elapsed()
    );
    drop(origin);
}
