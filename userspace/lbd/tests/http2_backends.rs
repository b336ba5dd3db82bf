//! HTTP/2 to the backends of an `http2 = true` cluster, with nginx (Debian's, h2c with prior
//! knowledge: `listen ... http2`) as the backend and h2load as the clients, through a real,
//! sandboxed `lbd`:
//!
//! - 50 HTTP/1.1 clients at once (50 sessions of the worker) and HTTP/2 clients with 10
//!   streams each, downloads of 64 KiB and uploads of 32 KiB: every request answered 2xx,
//!   over a few backend connections shared by the exchanges (kakehi's
//!   `kakehi_backend_connections_total`), not one each;
//! - nginx ends each connection after 1000 requests (its `keepalive_requests`: GOAWAY, then
//!   the streams past its last one are never processed): those requests go again on a new
//!   connection, and no client sees an error.
//!
//! nginx is started by the test in a directory of its own and killed by handle; every client
//! has a deadline.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;
mod scrape;

use std::fs::File;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{free_addr, h2load_all_ok, require, wait_until, Lbd, TempDir};

/// The longest one h2load run may take.
const DEADLINE: Duration = Duration::from_secs(120);
/// The size of nginx's /big.
const BIG: usize = 64 * 1024;

/// nginx serving h2c with prior knowledge on a free port: `/small` (a short text), `/big`
/// (a file of [`BIG`] bytes), `/up` (a POST whose body it reads and drops).
struct NginxH2c {
    child: Child,
    addr: SocketAddr,
    dir: TempDir,
}

impl NginxH2c {
    fn start() -> NginxH2c {
        require("nginx", "nginx");
        let dir = TempDir::new("nginx-h2c");
        let d = dir.path().display().to_string();
        std::fs::create_dir_all(dir.path().join("www")).unwrap();
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        let big: Vec<u8> = (0..BIG).map(|i| b'a' + (i % 26) as u8).collect();
        std::fs::write(dir.path().join("www/big"), big).unwrap();
        let addr = free_addr();
        let user = if nix::unistd::Uid::effective().is_root() {
            "user root;\n"
        } else {
            ""
        };
        let conf = format!(
            "{user}worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\n\
             error_log {d}/error.log warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
             \x20   access_log off;\n\
             \x20   client_body_temp_path {d}/tmp/body;\n\
             \x20   proxy_temp_path {d}/tmp/proxy;\n\
             \x20   fastcgi_temp_path {d}/tmp/fastcgi;\n\
             \x20   uwsgi_temp_path {d}/tmp/uwsgi;\n\
             \x20   scgi_temp_path {d}/tmp/scgi;\n\
             \x20   keepalive_requests 1000;\n\
             \x20   server {{\n\
             \x20       listen {addr} http2;\n\
             \x20       root {d}/www;\n\
             \x20       location = /small {{ return 200 \"small\\n\"; }}\n\
             \x20       location = /up {{ client_max_body_size 1m; return 200 \"up\\n\"; }}\n\
             \x20   }}\n\
             }}\n"
        );
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&path)
            .arg("-p")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(dir.path().join("stderr")).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nginx: {e}"));
        let up = wait_until(Duration::from_secs(10), || {
            std::net::TcpStream::connect(addr).is_ok()
        });
        let nginx = NginxH2c { child, addr, dir };
        assert!(up, "nginx is not listening on {addr}:\n{}", nginx.log());
        nginx
    }

    fn log(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        format!("{}{}", read("stderr"), read("error.log"))
    }
}

impl Drop for NginxH2c {
    /// SIGTERM to the master, which stops its worker (a SIGKILL would leave the worker
    /// running, orphaned, on the port); SIGKILL only if it has not exited within 5 s.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("nginx's log:\n{}", self.log());
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let exited = wait_until(Duration::from_secs(5), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !exited {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// lbd with an http listener in front of `backend` in an `http2 = true` cluster, and its
/// Prometheus endpoint on `metrics`.
fn lbd(backend: SocketAddr, metrics: SocketAddr) -> Lbd {
    Lbd::start(move |l| {
        format!(
            "[metrics]\naddress = \"{metrics}\"\n\n\
             [[listeners]]\naddress = \"{l}\"\nprotocol = \"http\"\n\n\
             [clusters.h2]\nhttp2 = true\n\
             frontends = [ {{ address = \"{l}\" }} ]\n\
             backends = [ {{ address = \"{backend}\" }} ]\n"
        )
    })
}

fn connections_opened(metrics: SocketAddr, backend: SocketAddr) -> f64 {
    let m = scrape::scrape(metrics);
    let labels = [("cluster", "h2"), ("backend", &*backend.to_string())];
    scrape::value(&m, "kakehi_backend_connections_total", &labels)
        .expect("no kakehi_backend_connections_total for the backend")
}

#[test]
fn clients_share_multiplexed_connections_to_nginx_and_survive_its_goaways() {
    let nginx = NginxH2c::start();
    let metrics = free_addr();
    let lbd = lbd(nginx.addr, metrics);
    let base = format!("http://{}", lbd.addr());

    // 50 HTTP/1.1 clients at once: their exchanges open streams on shared connections.
    let out = h2load_all_ok(
        &["-c", "50", "--h1"],
        &format!("{base}/big"),
        1500,
        "http/1.1",
        DEADLINE,
    );
    // h2load's "traffic: ... 93.75MB (98304000) data": every body whole.
    let data = out
        .lines()
        .find(|l| l.starts_with("traffic:"))
        .and_then(|l| l.split(',').find(|p| p.trim_end().ends_with("data")))
        .and_then(|p| p.split(['(', ')']).nth(1))
        .and_then(|n| n.parse::<usize>().ok());
    assert_eq!(data, Some(1500 * BIG), "response bytes:\n{out}");
    // HTTP/2 clients, 10 streams each: small answers, then uploads.
    h2load_all_ok(
        &["-c", "10", "-m", "10"],
        &format!("{base}/small"),
        2000,
        "h2c",
        DEADLINE,
    );
    let body = nginx.dir.path().join("body");
    std::fs::write(&body, vec![b'u'; 32 * 1024]).unwrap();
    h2load_all_ok(
        &["-c", "10", "-m", "10", "-d", body.to_str().unwrap()],
        &format!("{base}/up"),
        1000,
        "h2c",
        DEADLINE,
    );

    // 4,500 requests; nginx takes 1000 per connection, and at most 128 at once on one.
    let opened = connections_opened(metrics, nginx.addr);
    eprintln!("4500 requests opened {opened} connections to nginx");
    assert!(
        (5.0..=12.0).contains(&opened),
        "4500 requests opened {opened} backend connections"
    );
}
