//! TLS to backends (`backend_tls`, `backend_ca`, `backend_server_name`) through a real,
//! sandboxed `lbd`, with python's http.server behind the ssl module as the origin
//! (`backend_tls/origin.py`) and curl and wrk as clients; certificates made here by the
//! openssl command line tool (two CAs, server certificates they signed):
//!
//! - a backend verified against `backend_ca` by `backend_server_name` (sent in SNI) or by its
//!   IP address; requests on one client connection reuse one backend TLS connection;
//! - 2 MiB down and 1 MiB up byte-exact, and wrk load with no failure;
//! - 502 with the reason in the access log's `error` for a certificate the roots do not
//!   trust (another CA, or the system's roots), a name it is not valid for, and a backend
//!   that does not speak TLS; nothing reaches the origin then;
//! - health checks over TLS: the backend with an untrusted certificate is down, saying why in
//!   `lbctl status`, and the good one carries the requests;
//! - a cluster added by `lbctl cluster add --backend-tls --backend-ca`; a bad backend_ca is
//!   refused naming the field, and changes nothing.
//!
//! Every process is stopped by handle or pid and every wait has a deadline.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{curl, lbctl_at, lbctl_ok, run_bounded, wait_until, Lbd, TempDir, Wrk};
use lb_testkit::Origin;

const DEADLINE: Duration = Duration::from_secs(20);

fn openssl(args: &[&str], dir: &Path) {
    let mut cmd = Command::new("openssl");
    cmd.args(args).current_dir(dir).stdin(Stdio::null());
    let out = run_bounded(cmd, DEADLINE, &format!("openssl {args:?}"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, `dir/CA-ca.pem`.
fn ca(dir: &Path, ca: &str) -> PathBuf {
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{ca}-ca.key"),
            "-out",
            &format!("{ca}-ca.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={ca} test CA"),
        ],
        dir,
    );
    dir.join(format!("{ca}-ca.pem"))
}

/// A server certificate `dir/NAME.pem` (key `NAME.key`) for DNS name backend.test and IP
/// 127.0.0.1, signed by CA `ca`.
fn server_cert(dir: &Path, ca: &str, name: &str) -> (PathBuf, PathBuf) {
    openssl(
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            "/CN=backend.test",
        ],
        dir,
    );
    std::fs::write(
        dir.join(format!("{name}.cnf")),
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n\
         subjectAltName=DNS:backend.test,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}-ca.pem"),
            "-CAkey",
            &format!("{ca}-ca.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.cnf"),
        ],
        dir,
    );
    (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    )
}

/// `backend_tls/origin.py` under /usr/bin/python3 (python's http.server over ssl), killed on
/// drop.
struct TlsOrigin {
    child: Child,
    addr: SocketAddr,
}

impl TlsOrigin {
    fn start(cert: &(PathBuf, PathBuf), name: &str) -> TlsOrigin {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/backend_tls/origin.py");
        let mut child = Command::new("/usr/bin/python3")
            .arg(script)
            .arg(&cert.0)
            .arg(&cert.1)
            .arg(name)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("/usr/bin/python3 (the TLS origin)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("the origin's port, got {line:?}"));
        TlsOrigin {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
}

impl Drop for TlsOrigin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn get(lbd: &Lbd, host: &str, paths: &[&str], extra: &[&str]) -> Output {
    let mut args: Vec<String> = vec!["-H".into(), format!("Host: {host}")];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    for path in paths {
        args.push(format!("http://{}{path}", lbd.addr()));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    curl(&args)
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn status(lbd: &Lbd, host: &str) -> String {
    text(&get(
        lbd,
        host,
        &["/"],
        &["-o", "/dev/null", "-w", "%{http_code}"],
    ))
}

#[test]
fn backends_are_reached_over_tls_and_verified() {
    let dir = TempDir::new("backend-tls");
    let good_ca = ca(dir.path(), "good");
    ca(dir.path(), "other");
    let good = TlsOrigin::start(&server_cert(dir.path(), "good", "good-server"), "good");
    let stranger = TlsOrigin::start(&server_cert(dir.path(), "other", "other-server"), "other");
    // Checked every 300 ms, so its handshake count is not the one the first requests read.
    let checked = TlsOrigin::start(&server_cert(dir.path(), "good", "good-server"), "good");
    let plain = Origin::start("plain");
    let (g, s, p, c) = (good.addr, stranger.addr, plain.addr(), checked.addr);
    let ca = good_ca.display().to_string();
    let lbd = Lbd::start(|l| {
        let cluster = |name: &str, tls: &str, backends: &str| {
            format!(
                "[clusters.{name}]\nbackend_tls = true\n{tls}\n\
                 frontends = [ {{ address = \"{l}\", hostname = \"{name}.test\" }} ]\n\
                 backends = [ {backends} ]\n\n"
            )
        };
        let one = |a: SocketAddr| format!("{{ address = \"{a}\" }}");
        format!(
            "[[listeners]]\naddress = \"{l}\"\n\n{}{}{}{}{}{}{}",
            cluster(
                "named",
                &format!("backend_ca = \"{ca}\"\nbackend_server_name = \"backend.test\""),
                &one(g)
            ),
            cluster("byip", &format!("backend_ca = \"{ca}\""), &one(g)),
            cluster("system", "", &one(g)),
            cluster(
                "wrongname",
                &format!("backend_ca = \"{ca}\"\nbackend_server_name = \"wrong.test\""),
                &one(g)
            ),
            cluster("untrusted", &format!("backend_ca = \"{ca}\""), &one(s)),
            cluster("notls", &format!("backend_ca = \"{ca}\""), &one(p)),
            cluster(
                "checked",
                &format!(
                    "backend_ca = \"{ca}\"\nhealth_check = {{ interval = \"300ms\", timeout = \"250ms\", rise = 1, fall = 1 }}"
                ),
                &format!("{}, {}", one(c), one(s))
            ),
        )
    });

    // Verified by name (sent in SNI) and by IP address; the three requests of one client
    // connection go over one backend TLS connection (one handshake).
    let out = get(&lbd, "named.test", &["/a", "/b", "/c"], &[]);
    let seen = text(&out);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(lines.len(), 3, "{seen}");
    for (line, path) in lines.iter().zip(["/a", "/b", "/c"]) {
        assert!(
            line.starts_with(&format!("good sni=backend.test path={path} ")),
            "{line}"
        );
    }
    let handshakes = |line: &str| -> u64 {
        line.rsplit("handshakes=")
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(
        handshakes(lines[2]),
        handshakes(lines[0]),
        "one backend TLS connection for one client connection's requests: {seen}"
    );
    let seen = text(&get(&lbd, "byip.test", &["/ip"], &[]));
    assert!(seen.starts_with("good sni=None path=/ip "), "{seen}");

    // Bodies both ways, byte-exact.
    let big = dir.path().join("big.out");
    let out = get(
        &lbd,
        "named.test",
        &["/big"],
        &["-o", big.to_str().unwrap()],
    );
    assert!(out.status.success());
    let body = std::fs::read(&big).unwrap();
    assert_eq!(body.len(), 2 << 20);
    assert!(
        body.iter()
            .enumerate()
            .all(|(i, &b)| u64::from(b) == (i as u64 * 7) % 251),
        "the 2 MiB body arrived intact"
    );
    let upload: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
    let up = dir.write("up.bin", &upload);
    let back = dir.path().join("back.out");
    let out = get(
        &lbd,
        "named.test",
        &["/echo"],
        &[
            "--data-binary",
            &format!("@{}", up.display()),
            "-o",
            back.to_str().unwrap(),
        ],
    );
    assert!(out.status.success());
    assert!(
        std::fs::read(&back).unwrap() == upload,
        "1 MiB up and back intact"
    );

    // Refused backends: 502, and the access log says why.
    for (host, why) in [
        (
            "untrusted",
            "backend TLS: certificate not signed by a trusted CA",
        ),
        (
            "system",
            "backend TLS: certificate not signed by a trusted CA",
        ),
        (
            "wrongname",
            "backend TLS: certificate not valid for the backend's name",
        ),
        ("notls", "backend TLS handshake failed"),
    ] {
        assert_eq!(status(&lbd, &format!("{host}.test")), "502", "{host}");
        // The worker writes its log lines at the end of its event-loop turn, maybe just
        // after curl has its answer.
        let mut log = String::new();
        wait_until(Duration::from_secs(5), || {
            log = lbd.stdout();
            log.contains(&format!("cluster={host} "))
        });
        let line = log
            .lines()
            .rev()
            .find(|l| l.contains(&format!("cluster={host} ")))
            .unwrap_or_else(|| panic!("{host}: no access log line:\n{log}"));
        assert!(line.contains(why), "{host}: {line}");
    }
    assert!(
        plain.requests().is_empty(),
        "nothing reached the plain origin: the handshake failed first"
    );

    // Health checks over TLS: the untrusted backend is down, saying why; requests all go to
    // the good one.
    let socket = lbd.dir().path().join("lbd.sock");
    let mut json = serde_json::Value::Null;
    let down = wait_until(Duration::from_secs(10), || {
        let out = lbctl_ok(&socket, &["status", "--json"]);
        json = serde_json::from_str(&out).unwrap();
        let state = |addr: SocketAddr| {
            json["backends"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["cluster"] == "checked" && b["address"] == addr.to_string())
                .map(|b| b["state"].as_str().unwrap_or("").to_owned())
        };
        state(s).as_deref() == Some("down") && state(c).as_deref() == Some("up")
    });
    assert!(
        down,
        "the untrusted backend goes down, the good one stays up: {json:#}"
    );
    let row = json["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["cluster"] == "checked" && b["address"] == s.to_string())
        .unwrap();
    let why = row["last_error"].as_str().unwrap_or("");
    assert!(
        why.contains("TLS handshake") && why.contains("UnknownIssuer"),
        "{row}"
    );
    for _ in 0..5 {
        let seen = text(&get(&lbd, "checked.test", &["/"], &[]));
        assert!(seen.starts_with("good "), "{seen}");
    }

    // Under load: no failure.
    let wrk = Wrk::start_with(
        &format!("http://{}/", lbd.addr()),
        20,
        2,
        "5s",
        &["-H", "Host: named.test"],
        dir.path(),
    );
    let (summary, out) = wrk.finish(Duration::from_secs(20));
    summary.assert_clean(100, "wrk through a TLS backend", &out);
}

#[test]
fn lbctl_adds_a_tls_cluster_and_refuses_a_bad_ca() {
    let dir = TempDir::new("backend-tls-lbctl");
    let good_ca = ca(dir.path(), "good");
    let good = TlsOrigin::start(&server_cert(dir.path(), "good", "good-server"), "good");
    let plain = Origin::start("plain");
    let backend = plain.addr();
    let lbd = Lbd::start(|l| {
        format!(
            "[[listeners]]\naddress = \"{l}\"\n\n[clusters.app]\n\
             frontends = [ {{ address = \"{l}\" }} ]\nbackends = [ {{ address = \"{backend}\" }} ]\n"
        )
    });
    let socket = lbd.dir().path().join("lbd.sock");
    let g = good.addr.to_string();
    let listener = lbd.addr().to_string();

    // A CA file that is not PEM: refused naming the field; the state does not change.
    let bad = dir.write("bad-ca.pem", "not a certificate\n");
    let before = lbctl_ok(&socket, &["state", "dump"]);
    let refused = lbctl_at(
        &socket,
        &[
            "cluster",
            "add",
            "secure",
            "--backend",
            &g,
            "--backend-tls",
            "--backend-ca",
            bad.to_str().unwrap(),
        ],
    );
    assert_ne!(refused.code, Some(0), "{}", refused.stdout);
    assert!(
        refused.stderr.contains("clusters.secure.backend_ca"),
        "{}",
        refused.stderr
    );
    assert_eq!(lbctl_ok(&socket, &["state", "dump"]), before);

    lbctl_ok(
        &socket,
        &[
            "cluster",
            "add",
            "secure",
            "--backend",
            &g,
            "--backend-tls",
            "--backend-ca",
            good_ca.to_str().unwrap(),
            "--backend-server-name",
            "backend.test",
        ],
    );
    lbctl_ok(
        &socket,
        &[
            "frontend",
            "add",
            "--cluster",
            "secure",
            "--address",
            &listener,
            "--hostname",
            "secure.test",
        ],
    );
    let seen = text(&get(&lbd, "secure.test", &["/added"], &[]));
    assert!(
        seen.starts_with("good sni=backend.test path=/added "),
        "{seen}"
    );
}
