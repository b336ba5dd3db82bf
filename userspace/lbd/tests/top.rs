//! `lbctl top` in a real terminal: tmux (a server of the test's own, `tmux -L`) runs it against
//! a real lbd while requests flow; the test reads the screen with `capture-pane`, then presses
//! `q` and expects lbctl to leave.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{lbctl_bin, one_cluster, wait_until, Lbd};
use lb_testkit::Origin;

/// A tmux server of this test's own, killed when dropped.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new() -> Tmux {
        Tmux {
            socket: format!("kakehi-top-{}", std::process::id()),
        }
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("this test needs tmux (apt-get install tmux): {e}"))
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }

    fn alive(&self) -> bool {
        self.run(&["has-session", "-t", "top"]).status.success()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

#[test]
fn top_shows_workers_request_rates_and_backends_and_quits_on_q() {
    let origin = Origin::start("a");
    let lbd = Lbd::start(|l| one_cluster("workers = 2\n", l, &[origin.addr()]));
    let socket = lbd.dir().path().join("lbd.sock");
    // The listener accepts (into its queue) before every worker has started.
    let mut workers = Vec::new();
    assert!(wait_until(Duration::from_secs(10), || {
        workers = lbd.workers();
        workers.len() == 2
    }));

    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let stop = Arc::clone(&stop);
        let addr = lbd.addr();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                assert_eq!(common::get(addr, "x", "/").status, 200);
                n += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            n
        })
    };

    let tmux = Tmux::new();
    let command = format!(
        "{} --socket {} top --interval 0.5",
        lbctl_bin().display(),
        socket.display()
    );
    let out = tmux.run(&[
        "new-session",
        "-d",
        "-s",
        "top",
        "-x",
        "120",
        "-y",
        "40",
        &command,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A rate needs two refreshes with requests between them.
    let mut screen = String::new();
    let shown = wait_until(Duration::from_secs(15), || {
        screen = tmux.screen();
        let rate = screen
            .lines()
            .find(|l| l.trim_start().starts_with("app "))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|r| r.parse::<f64>().ok());
        rate.is_some_and(|r| r > 0.0)
    });
    stop.store(true, Ordering::Relaxed);
    let sent = traffic.join().unwrap();
    assert!(
        shown,
        "no request rate for cluster app on screen:\n{screen}"
    );
    for needle in ["generation 1", "workers", "clusters", "backends", "running"] {
        assert!(
            screen.contains(needle),
            "{needle:?} not on screen:\n{screen}"
        );
    }
    for pid in &workers {
        assert!(screen.contains(&pid.to_string()), "worker {pid}:\n{screen}");
    }
    assert!(
        screen.contains(&origin.addr().to_string()),
        "the backend:\n{screen}"
    );
    eprintln!("{sent} requests sent; the screen:\n{screen}");

    let out = tmux.run(&["send-keys", "-t", "top", "q"]);
    assert!(out.status.success());
    assert!(
        wait_until(Duration::from_secs(5), || !tmux.alive()),
        "lbctl top did not leave on q:\n{}",
        tmux.screen()
    );
    drop(lbd);
    origin.stop();
}
