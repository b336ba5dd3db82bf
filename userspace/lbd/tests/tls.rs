//! HTTPS listeners through a real, sandboxed `lbd`, with real clients:
//!
//! - certificates made here by the openssl command line tool; curl `--resolve` for several
//!   server names, each verified against the one certificate it must get, and the served
//!   certificate's SHA-256 fingerprint read by `openssl s_client` (exact name, `*.wildcard`, no
//!   SNI and an unknown name getting the first, default certificate);
//! - TLS 1.2 and 1.3 and ALPN http/1.1 by `openssl s_client`; session resumption (`-sess_out`
//!   then `-sess_in` says `Reused`) in both versions;
//! - X-Forwarded-Proto https and Forwarded proto=https as the origin received them;
//! - plain HTTP to the TLS port gets a clear-text 400; a garbage ClientHello is closed; a
//!   handshake that never ends is closed after `request_header`; lbd keeps serving after each,
//!   with the same worker;
//! - certificates added, replaced and removed through lbctl, the served certificate following
//!   each change, an established TLS connection surviving the replacement; expired,
//!   mismatched and unparsable certificates refused with their reason and the state unchanged;
//! - a certificate replaced repeatedly under wrk HTTPS load: zero failed requests;
//! - an http frontend with `redirect_https` answering 301 to the https URL;
//! - 24 MiB down and 8 MiB up through TLS byte-exact, and pipelined requests answered in order;
//! - a WebSocket upgrade piping raw bytes both ways over TLS;
//! - `lbctl reload` applying a certificate file renewed on disk (and nothing when unchanged);
//! - an https listener added at runtime by `lbctl listener add` serving its certificate.
//!
//! Every process is stopped by handle or pid and every wait has a deadline.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::{BufReader, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{
    connect, curl, lbctl_bin, read_body, read_head, run_bounded, Framing, Lbd, TempDir, Wrk,
};
use lb_testkit::Origin;

const DEADLINE: Duration = Duration::from_secs(20);

// ---- certificates ---------------------------------------------------------------------------

fn openssl(args: &[&str], dir: &Path) -> Output {
    let mut cmd = Command::new("openssl");
    cmd.args(args).current_dir(dir).stdin(Stdio::null());
    let out = run_bounded(cmd, DEADLINE, &format!("openssl {args:?}"));
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A certificate and its key, as files.
#[derive(Clone)]
struct Cert {
    pem: PathBuf,
    key: PathBuf,
}

impl Cert {
    /// A self-signed ECDSA P-256 certificate for `names` (the first is the common name),
    /// valid for 30 days.
    fn new(dir: &Path, stem: &str, names: &[&str]) -> Cert {
        let san: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
        let (pem, key) = (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}.key")),
        );
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "30",
                "-subj",
                &format!("/CN={}", names[0]),
                "-addext",
                &format!("subjectAltName={}", san.join(",")),
                "-keyout",
                key.to_str().unwrap(),
                "-out",
                pem.to_str().unwrap(),
            ],
            dir,
        );
        Cert { pem, key }
    }

    /// A certificate for `name` that expired in 2021 (`openssl ca` sets the dates).
    fn expired(dir: &Path, name: &str) -> Cert {
        let ca = dir.join("ca");
        std::fs::create_dir_all(&ca).unwrap();
        std::fs::write(
            ca.join("ca.cnf"),
            "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nnew_certs_dir = .\n\
             serial = serial\ndefault_md = sha256\npolicy = p\ncopy_extensions = copy\n\
             [p]\ncommonName = supplied\n",
        )
        .unwrap();
        std::fs::write(ca.join("index.txt"), "").unwrap();
        std::fs::write(ca.join("serial"), "01\n").unwrap();
        openssl(
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-subj",
                &format!("/CN={name}"),
                "-addext",
                &format!("subjectAltName=DNS:{name}"),
                "-keyout",
                "expired.key",
                "-out",
                "expired.csr",
            ],
            &ca,
        );
        openssl(
            &[
                "ca",
                "-batch",
                "-notext",
                "-config",
                "ca.cnf",
                "-selfsign",
                "-keyfile",
                "expired.key",
                "-in",
                "expired.csr",
                "-out",
                "expired.pem",
                "-startdate",
                "20200101000000Z",
                "-enddate",
                "20210101000000Z",
            ],
            &ca,
        );
        Cert {
            pem: ca.join("expired.pem"),
            key: ca.join("expired.key"),
        }
    }

    /// SHA-256 of the certificate file, lower-case hex.
    fn fingerprint(&self) -> String {
        let out = openssl(
            &[
                "x509",
                "-noout",
                "-fingerprint",
                "-sha256",
                "-in",
                self.pem.to_str().unwrap(),
            ],
            Path::new("/"),
        );
        parse_fingerprint(&String::from_utf8_lossy(&out.stdout))
    }
}

/// `sha256 Fingerprint=AB:CD:...` -> `abcd...`.
fn parse_fingerprint(text: &str) -> String {
    let value = text
        .lines()
        .find_map(|l| l.split_once("Fingerprint=").map(|(_, v)| v))
        .unwrap_or_else(|| panic!("no fingerprint in {text:?}"));
    value.trim().replace(':', "").to_ascii_lowercase()
}

// ---- clients --------------------------------------------------------------------------------

/// Runs `openssl s_client -connect ADDR ARGS...` with `input` on stdin; returns stdout and
/// stderr together.
fn s_client(addr: SocketAddr, args: &[&str], input: &[u8]) -> String {
    let mut cmd = Command::new("openssl");
    cmd.arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn openssl s_client");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    drop(stdin);
    let out = wait_output(child, &format!("openssl s_client {args:?}"));
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn wait_output(mut child: Child, what: &str) -> Output {
    let end = Instant::now() + DEADLINE;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {DEADLINE:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

/// The SHA-256 fingerprint of the certificate the listener serves for `sni` (None: no SNI).
fn served_fingerprint(addr: SocketAddr, sni: Option<&str>) -> String {
    let args: Vec<&str> = match sni {
        Some(name) => vec!["-servername", name],
        None => vec!["-noservername"],
    };
    let out = s_client(addr, &args, b"");
    let begin = out
        .find("-----BEGIN CERTIFICATE-----")
        .unwrap_or_else(|| panic!("no certificate from {addr} for {sni:?}:\n{out}"));
    let end = out[begin..].find("-----END CERTIFICATE-----").unwrap() + begin + 25;
    let mut child = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&out.as_bytes()[begin..end])
        .unwrap();
    let x509 = wait_output(child, "openssl x509");
    parse_fingerprint(&String::from_utf8_lossy(&x509.stdout))
}

/// curl to `https://NAME:PORT/PATH`, NAME resolved to the listener, trusting only `trust`.
fn curl_https(addr: SocketAddr, name: &str, path: &str, trust: &Cert) -> Output {
    curl(&[
        "--resolve",
        &format!("{name}:{}:{}", addr.port(), addr.ip()),
        "--cacert",
        trust.pem.to_str().unwrap(),
        &format!("https://{name}:{}{path}", addr.port()),
    ])
}

fn assert_served(out: &Output, body: &str) {
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), body);
}

/// `lbctl --socket SOCK ARGS...`: (exit code, stdout, stderr).
fn lbctl(lbd: &Lbd, args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(lbctl_bin());
    cmd.arg("--socket")
        .arg(lbd.dir().path().join("lbd.sock"))
        .args(["--timeout", "20"])
        .args(args);
    let out = run_bounded(cmd, DEADLINE, &format!("lbctl {args:?}"));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn lbctl_ok(lbd: &Lbd, args: &[&str]) -> String {
    let (code, stdout, stderr) = lbctl(lbd, args);
    assert_eq!(code, Some(0), "lbctl {args:?}: {stdout}{stderr}");
    stdout
}

/// An `openssl s_client` kept open: requests written one by one on the same TLS connection.
/// A watchdog kills it after a minute, so that a read waiting for bytes that never come
/// fails the test instead of hanging it.
struct TlsSession {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    done: Arc<AtomicBool>,
}

impl TlsSession {
    fn open(addr: SocketAddr, sni: &str) -> TlsSession {
        let mut child = Command::new("openssl")
            .args(["s_client", "-quiet", "-connect", &addr.to_string()])
            .args(["-servername", sni])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn openssl s_client");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let done = Arc::new(AtomicBool::new(false));
        let (flag, pid) = (Arc::clone(&done), child.id() as i32);
        std::thread::spawn(move || {
            let end = Instant::now() + Duration::from_secs(60);
            while !flag.load(Ordering::SeqCst) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(50));
            }
            if !flag.load(Ordering::SeqCst) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        });
        TlsSession {
            child,
            stdin,
            stdout,
            done,
        }
    }

    /// `GET PATH` on the connection; the response body.
    fn get(&mut self, host: &str, path: &str) -> String {
        write!(self.stdin, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
        self.stdin.flush().unwrap();
        let head = read_head(&mut self.stdout).expect("a response head on the open connection");
        assert_eq!(head.status, 200, "{head:?}");
        let mut body = Vec::new();
        read_body(
            &mut self.stdout,
            Framing::of(&head, false),
            &mut |b: &[u8]| body.extend_from_slice(b),
        )
        .unwrap();
        String::from_utf8(body).unwrap()
    }
}

impl Drop for TlsSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.done.store(true, Ordering::SeqCst);
    }
}

// ---- lbd ------------------------------------------------------------------------------------

/// lbd with one https listener serving `certs` (the first is the default) in front of
/// `origin`, plus `extra` config text.
fn https_lbd(certs: &[&Cert], origin: &Origin, extra: &str) -> Lbd {
    let list: Vec<String> = certs
        .iter()
        .map(|c| {
            format!(
                "{{ certificate = \"{}\", key = \"{}\" }}",
                c.pem.display(),
                c.key.display()
            )
        })
        .collect();
    let list = list.join(", ");
    let origin = origin.addr();
    Lbd::start(move |addr| {
        format!(
            "{extra}\n[[listeners]]\naddress = \"{addr}\"\nprotocol = \"https\"\n\
             certificates = [ {list} ]\n\n[clusters.app]\n\
             frontends = [ {{ address = \"{addr}\" }} ]\nbackends = [ {{ address = \"{origin}\" }} ]\n"
        )
    })
}

/// The worker's pid (lbd has one worker in these tests).
fn worker_pids(lbd: &Lbd) -> Vec<i32> {
    let mut pids = lbd.pids();
    pids.retain(|&p| p != lbd.pid());
    pids
}

// ---- tests ----------------------------------------------------------------------------------

#[test]
fn sni_selects_each_certificate_and_the_first_is_the_default() {
    let dir = TempDir::new("tls-sni");
    let a = Cert::new(dir.path(), "a", &["a.test"]);
    let b = Cert::new(dir.path(), "b", &["b.test", "www.b.test"]);
    let wild = Cert::new(dir.path(), "wild", &["*.wild.test"]);
    let origin = Origin::start("one");
    let lbd = https_lbd(
        &[&a, &b, &wild],
        &origin,
        "[access_log]\ntarget = \"off\"\n",
    );
    let addr = lbd.addr();

    // curl trusts only the certificate each name must get: a wrong one fails verification.
    for (name, cert) in [
        ("a.test", &a),
        ("b.test", &b),
        ("www.b.test", &b),
        ("x.wild.test", &wild),
        ("y.wild.test", &wild),
    ] {
        assert_served(&curl_https(addr, name, "/", cert), "origin one: GET /\n");
        assert_eq!(
            served_fingerprint(addr, Some(name)),
            cert.fingerprint(),
            "{name}"
        );
    }
    // No SNI, an unknown name, and a name two labels under the wildcard: the default one.
    for sni in [None, Some("unknown.test"), Some("a.b.wild.test")] {
        assert_eq!(served_fingerprint(addr, sni), a.fingerprint(), "{sni:?}");
    }
}

#[test]
fn tls12_tls13_alpn_resumption_and_forwarded_proto() {
    let dir = TempDir::new("tls-versions");
    let a = Cert::new(dir.path(), "a", &["a.test"]);
    let origin = Origin::start("one");
    let lbd = https_lbd(&[&a], &origin, "[access_log]\ntarget = \"off\"\n");
    let addr = lbd.addr();
    let request = b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n";

    for (flag, version) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let out = s_client(
            addr,
            &[
                flag,
                "-servername",
                "a.test",
                "-alpn",
                "http/1.1",
                "-ign_eof",
            ],
            request,
        );
        assert!(out.contains(&format!("Protocol  : {version}")), "{out}");
        assert!(out.contains("ALPN protocol: http/1.1"), "{out}");
        assert!(out.contains("origin one: GET /"), "{out}");

        // Resumption: the session saved from one connection is reused by the next.
        let sess = dir.path().join(format!("sess{flag}"));
        let sess = sess.to_str().unwrap();
        let first = s_client(
            addr,
            &[flag, "-servername", "a.test", "-sess_out", sess, "-ign_eof"],
            request,
        );
        assert!(first.contains("New, "), "{first}");
        let again = s_client(
            addr,
            &[flag, "-servername", "a.test", "-sess_in", sess, "-ign_eof"],
            request,
        );
        assert!(
            again.contains("Reused, "),
            "{flag}: no resumption:\n{again}"
        );
        assert!(again.contains("origin one: GET /"), "{again}");
    }

    // What the origin received.
    let out = curl_https(addr, "a.test", "/headers", &a);
    let headers = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(headers.contains("x-forwarded-proto: https\n"), "{headers}");
    assert!(headers.contains("proto=https"), "{headers}");
    assert!(
        headers.contains(&format!("x-forwarded-port: {}\n", addr.port())),
        "{headers}"
    );
}

#[test]
fn plain_http_garbage_and_stalled_handshakes_are_closed_cleanly() {
    let dir = TempDir::new("tls-bad");
    let a = Cert::new(dir.path(), "a", &["a.test"]);
    let origin = Origin::start("one");
    let lbd = https_lbd(
        &[&a],
        &origin,
        "[timeouts]\nrequest_header = \"1s\"\n[access_log]\ntarget = \"stdout\"\n",
    );
    let addr = lbd.addr();
    // lbd answers on its listeners (main holds them) a moment before its worker shows in the
    // process tree: wait for it (a fresh-clone CI run once read the tree too early).
    common::wait_until(DEADLINE, || worker_pids(&lbd).len() == 1);
    let workers = worker_pids(&lbd);
    assert_eq!(workers.len(), 1, "one worker");

    // Plain HTTP: a clear-text 400 saying what to do, then the close.
    let out = curl(&["-i", &format!("http://{addr}/")]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{text}");
    assert!(text.contains("use an https:// URL"), "{text}");

    // Garbage after a handshake record header: closed, no HTTP in answer (an alert at most).
    let mut s = connect(addr);
    s.write_all(b"\x16\x03\x01\x00\x20this is not a client hello at all!!")
        .unwrap();
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("expected a close, got {e}"),
    }
    assert!(!got.starts_with(b"HTTP"), "{got:?}");
    assert!(got.len() < 64, "at most an alert: {got:?}");

    // Random bytes (not upper-case ASCII first): closed too.
    let mut s = connect(addr);
    s.write_all(&[0x80, 0x01, 0xff, 0x00, 0x13, 0x37]).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(!got.starts_with(b"HTTP"), "{got:?}");

    // A handshake that never completes: closed after request_header (1 s), well before the
    // client's own 10 s read timeout.
    let mut s = connect(addr);
    s.write_all(b"\x16\x03\x01").unwrap();
    let started = Instant::now();
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("the stalled handshake was not closed: {e}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "closed by the client's timeout, not lbd's"
    );

    // Still serving, with the same worker (no panic, no SIGSYS).
    assert_served(&curl_https(addr, "a.test", "/", &a), "origin one: GET /\n");
    assert_eq!(worker_pids(&lbd), workers, "the worker was replaced");
    let logged = common::wait_until(DEADLINE, || {
        lbd.stdout().lines().any(|l| {
            l.contains("status=400") && l.contains("error=\"plain HTTP sent to the TLS port\"")
        })
    });
    assert!(logged, "no access log line for it:\n{}", lbd.stdout());
}

#[test]
fn certificates_change_at_runtime_and_bad_ones_are_refused() {
    let dir = TempDir::new("tls-lbctl");
    let a = Cert::new(dir.path(), "a", &["a.test"]);
    let b = Cert::new(dir.path(), "b", &["b.test"]);
    let b2 = Cert::new(dir.path(), "b2", &["b.test"]);
    let c = Cert::new(dir.path(), "c", &["c.test"]);
    let expired = Cert::expired(dir.path(), "b.test");
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(
        &garbage,
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let origin = Origin::start("one");
    let lbd = https_lbd(&[&a], &origin, "[access_log]\ntarget = \"off\"\n");
    let addr = lbd.addr();
    let l = addr.to_string();
    let path = |p: &Path| p.to_str().unwrap().to_owned();

    // b.test has no certificate yet: the default one.
    assert_eq!(served_fingerprint(addr, Some("b.test")), a.fingerprint());
    let out = lbctl_ok(
        &lbd,
        &[
            "certificate",
            "add",
            "--address",
            &l,
            "--certificate",
            &path(&b.pem),
            "--key",
            &path(&b.key),
        ],
    );
    assert!(
        out.contains(&format!("~ listener {l}: certificates")),
        "{out}"
    );
    assert!(!out.contains("PRIVATE KEY"), "{out}");
    // The running state carries the certificate's text; a dump never shows the key.
    let dump = lbctl_ok(&lbd, &["state", "dump"]);
    assert!(dump.contains("certificate_pem"), "{dump}");
    assert!(dump.contains("private key not shown"), "{dump}");
    assert!(!dump.contains("PRIVATE KEY"), "{dump}");
    assert_served(&curl_https(addr, "b.test", "/", &b), "origin one: GET /\n");
    assert_eq!(served_fingerprint(addr, Some("b.test")), b.fingerprint());

    // An established connection (served with b) survives the replacement of b by b2.
    let mut open = TlsSession::open(addr, "b.test");
    assert_eq!(open.get("b.test", "/first"), "origin one: GET /first\n");
    lbctl_ok(
        &lbd,
        &[
            "certificate",
            "replace",
            "--address",
            &l,
            "--old-certificate",
            "b.test",
            "--certificate",
            &path(&b2.pem),
            "--key",
            &path(&b2.key),
        ],
    );
    assert_eq!(served_fingerprint(addr, Some("b.test")), b2.fingerprint());
    assert_served(&curl_https(addr, "b.test", "/", &b2), "origin one: GET /\n");
    assert_eq!(open.get("b.test", "/second"), "origin one: GET /second\n");
    drop(open);

    // Refused, each with its reason, and nothing changes.
    let before = lbctl_ok(&lbd, &["state", "dump", "--json"]);
    let add = |cert: &str, key: &str| {
        vec![
            "certificate".to_owned(),
            "add".to_owned(),
            "--address".to_owned(),
            l.clone(),
            "--certificate".to_owned(),
            cert.to_owned(),
            "--key".to_owned(),
            key.to_owned(),
        ]
    };
    let cases = [
        (add(&path(&expired.pem), &path(&expired.key)), "expired on"),
        (add(&path(&c.pem), &path(&a.key)), "does not match"),
        (add(&path(&garbage), &path(&c.key)), "cannot be parsed"),
        (add(&path(&c.key), &path(&c.key)), "no certificate found"),
        (add("/nonexistent.pem", &path(&c.key)), "cannot read"),
        (
            vec![
                "certificate".into(),
                "remove".into(),
                "--address".into(),
                l.clone(),
                "--certificate".into(),
                "nothing.test".into(),
            ],
            "has no certificate \"nothing.test\"",
        ),
    ];
    for (args, reason) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, stdout, stderr) = lbctl(&lbd, &args);
        assert_eq!(code, Some(1), "{args:?}: {stdout}{stderr}");
        assert!(stderr.contains(reason), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        assert_eq!(
            lbctl_ok(&lbd, &["state", "dump", "--json"]),
            before,
            "{args:?} was refused but changed the state"
        );
    }

    // Removed by fingerprint: b.test falls back to the default certificate; the last one stays.
    lbctl_ok(
        &lbd,
        &[
            "certificate",
            "remove",
            "--address",
            &l,
            "--certificate",
            &b2.fingerprint(),
        ],
    );
    assert_eq!(served_fingerprint(addr, Some("b.test")), a.fingerprint());
    let (code, _, stderr) = lbctl(
        &lbd,
        &[
            "certificate",
            "remove",
            "--address",
            &l,
            "--certificate",
            "a.test",
        ],
    );
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("last certificate"), "{stderr}");
    assert_served(&curl_https(addr, "a.test", "/", &a), "origin one: GET /\n");
}

#[test]
fn rotation_under_https_load_fails_no_request() {
    let dir = TempDir::new("tls-rotate");
    let certs: Vec<Cert> = (0..4)
        .map(|i| Cert::new(dir.path(), &format!("r{i}"), &["localhost"]))
        .collect();
    let origin = Origin::start("one");
    let lbd = https_lbd(&[&certs[0]], &origin, "[access_log]\ntarget = \"off\"\n");
    let addr = lbd.addr();
    let l = addr.to_string();
    let url = format!("https://localhost:{}/", addr.port());
    let wrk = Wrk::start(&url, 20, 6, "5s", lbd.dir().path());
    std::thread::sleep(Duration::from_millis(1500));
    for pair in certs.windows(2) {
        lbctl_ok(
            &lbd,
            &[
                "certificate",
                "replace",
                "--address",
                &l,
                "--old-certificate",
                &pair[0].fingerprint(),
                "--certificate",
                pair[1].pem.to_str().unwrap(),
                "--key",
                pair[1].key.to_str().unwrap(),
            ],
        );
        assert_eq!(
            served_fingerprint(addr, Some("localhost")),
            pair[1].fingerprint()
        );
        std::thread::sleep(Duration::from_millis(800));
    }
    let (summary, out) = wrk.finish(Duration::from_secs(30));
    println!("{out}");
    assert!(
        summary.requests > 100,
        "too few requests to mean anything:\n{out}"
    );
    assert_eq!(
        (
            summary.connect_errors,
            summary.read_errors,
            summary.write_errors,
            summary.timeouts,
            summary.non_2xx
        ),
        (0, 0, 0, 0, 0),
        "failed requests during the rotation:\n{out}"
    );
}

#[test]
fn redirect_https_answers_301_to_the_same_url() {
    let origin = Origin::start("one");
    let backend = origin.addr();
    let lbd = Lbd::start(move |addr| {
        format!(
            "[access_log]\ntarget = \"off\"\n[[listeners]]\naddress = \"{addr}\"\n\n\
             [clusters.app]\nfrontends = [\n\
             {{ address = \"{addr}\", hostname = \"secure.test\", redirect_https = true }},\n\
             {{ address = \"{addr}\", hostname = \"plain.test\" }},\n]\n\
             backends = [ {{ address = \"{backend}\" }} ]\n"
        )
    });
    let addr = lbd.addr();
    let out = curl(&[
        "-i",
        "-H",
        "Host: Secure.Test:8080",
        &format!("http://{addr}/a/b?c=d"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("HTTP/1.1 301 Moved Permanently\r\n"),
        "{text}"
    );
    assert!(
        text.contains("\r\nLocation: https://secure.test/a/b?c=d\r\n"),
        "{text}"
    );
    assert!(
        origin.requests().is_empty(),
        "a redirect never reaches the cluster"
    );
    // Another frontend of the same listener still proxies.
    let out = curl(&["-H", "Host: plain.test", &format!("http://{addr}/x")]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "origin one: GET /x\n");
    // And lbd refuses redirect_https where it makes no sense.
    let dir = TempDir::new("tls-redirect");
    let a = Cert::new(dir.path(), "a", &["a.test"]);
    let config = dir.write(
        "bad.toml",
        format!(
            "[[listeners]]\naddress = \"127.0.0.1:1\"\nprotocol = \"https\"\n\
             certificates = [ {{ certificate = \"{}\", key = \"{}\" }} ]\n\
             [clusters.app]\nfrontends = [ {{ address = \"127.0.0.1:1\", redirect_https = true }} ]\n\
             backends = [ {{ address = \"127.0.0.1:2\" }} ]\n",
            a.pem.display(),
            a.key.display()
        ),
    );
    let out = common::run_lbd(&["--config".as_ref(), config.as_os_str(), "--check".as_ref()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("redirect_https only applies to frontends of http listeners"),
        "{err}"
    );
}

#[test]
fn large_bodies_and_pipelined_requests_cross_tls_intact() {
    let dir = TempDir::new("tls-large");
    let a = Cert::new(dir.path(), "a", &["a.test"]);
    let origin = Origin::start("one");
    let lbd = https_lbd(&[&a], &origin, "[access_log]\ntarget = \"off\"\n");
    let addr = lbd.addr();

    // 24 MiB down: more than rustls's send buffer and the socket's, many times over.
    let len = 24 << 20;
    let got = curl_https(addr, "a.test", &format!("/bytes/{len}"), &a);
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert_eq!(got.stdout.len(), len);
    assert!(
        got.stdout == common::pattern(len),
        "the body differs from the pattern"
    );

    // 8 MiB up, through the backend and back as a digest.
    let body = common::pattern(8 << 20);
    let file = dir.write("up.bin", &body);
    let up = curl(&[
        "--resolve",
        &format!("a.test:{}:{}", addr.port(), addr.ip()),
        "--cacert",
        a.pem.to_str().unwrap(),
        "--data-binary",
        &format!("@{}", file.display()),
        &format!("https://a.test:{}/digest", addr.port()),
    ]);
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&up.stdout),
        common::digest_line(&body)
    );

    // Three pipelined requests in one TLS write, answered in order on one connection.
    let pipelined = "GET /p1 HTTP/1.1\r\nHost: a.test\r\n\r\n\
                     GET /p2 HTTP/1.1\r\nHost: a.test\r\n\r\n\
                     GET /p3 HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n";
    let out = s_client(
        addr,
        &["-servername", "a.test", "-quiet", "-ign_eof"],
        pipelined.as_bytes(),
    );
    let order: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("origin one: GET /p"))
        .collect();
    assert_eq!(
        order,
        [
            "origin one: GET /p1",
            "origin one: GET /p2",
            "origin one: GET /p3"
        ],
        "{out}"
    );
}

#[test]
fn a_websocket_upgrade_pipes_bytes_over_tls() {
    let dir = TempDir::new("tls-ws");
    let a = Cert::new(dir.path(), "a", &["a.test"]);
    let origin = Origin::start("one");
    let lbd = https_lbd(&[&a], &origin, "[access_log]\ntarget = \"off\"\n");
    let mut ws = TlsSession::open(lbd.addr(), "a.test");
    ws.stdin
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: a.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .unwrap();
    ws.stdin.flush().unwrap();
    let head = read_head(&mut ws.stdout).unwrap();
    assert_eq!(head.status, 101, "{head:?}");
    // Raw bytes both ways through the TLS front, echoed by the origin, several times.
    for round in 0..3 {
        let line = format!("round {round}: {}\n", "x".repeat(10_000));
        ws.stdin.write_all(line.as_bytes()).unwrap();
        ws.stdin.flush().unwrap();
        let mut echoed = vec![0u8; line.len()];
        ws.stdout.read_exact(&mut echoed).unwrap();
        assert_eq!(String::from_utf8(echoed).unwrap(), line);
    }
}

#[test]
fn reload_applies_a_certificate_renewed_on_disk() {
    let dir = TempDir::new("tls-reload");
    let live = Cert::new(dir.path(), "live", &["a.test"]);
    let old = live.fingerprint();
    let origin = Origin::start("one");
    let lbd = https_lbd(&[&live], &origin, "[access_log]\ntarget = \"off\"\n");
    let addr = lbd.addr();
    assert_eq!(served_fingerprint(addr, Some("a.test")), old);
    // Nothing changed on disk: nothing to apply.
    let out = lbctl_ok(&lbd, &["reload"]);
    assert!(!out.contains("certificates"), "{out}");
    // Renewed in place (same file names), then reloaded: served from then on.
    let renewed = Cert::new(dir.path(), "live", &["a.test"]);
    assert_ne!(renewed.fingerprint(), old);
    let out = lbctl_ok(&lbd, &["reload"]);
    assert!(
        out.contains(&format!("~ listener {addr}: certificates")),
        "{out}"
    );
    assert!(!out.contains("PRIVATE KEY"), "{out}");
    assert_eq!(
        served_fingerprint(addr, Some("a.test")),
        renewed.fingerprint()
    );
    assert_served(
        &curl_https(addr, "a.test", "/", &renewed),
        "origin one: GET /\n",
    );
}

#[test]
fn an_https_listener_added_at_runtime_serves_its_certificate() {
    let dir = TempDir::new("tls-listener-add");
    let a = Cert::new(dir.path(), "a", &["a.test"]);
    let origin = Origin::start("one");
    let backend = origin.addr();
    let lbd = Lbd::start(move |addr| {
        format!(
            "[access_log]\ntarget = \"off\"\n[[listeners]]\naddress = \"{addr}\"\n\n\
             [clusters.app]\nfrontends = [ {{ address = \"{addr}\" }} ]\n\
             backends = [ {{ address = \"{backend}\" }} ]\n"
        )
    });
    let new = common::free_addr().to_string();
    lbctl_ok(
        &lbd,
        &[
            "listener",
            "add",
            "--address",
            &new,
            "--protocol",
            "https",
            "--certificate",
            a.pem.to_str().unwrap(),
            "--key",
            a.key.to_str().unwrap(),
        ],
    );
    lbctl_ok(
        &lbd,
        &["frontend", "add", "--cluster", "app", "--address", &new],
    );
    let addr: SocketAddr = new.parse().unwrap();
    assert_served(&curl_https(addr, "a.test", "/", &a), "origin one: GET /\n");
    assert_eq!(served_fingerprint(addr, Some("a.test")), a.fingerprint());
}

/// `accept_proxy = true` on an https listener: the PROXY protocol header comes before the
/// ClientHello (curl `--haproxy-protocol` sends a v1 line with its own addresses), is read
/// and consumed, and the TLS handshake and the request go on after it; a client that starts
/// with the ClientHello instead is closed.
#[test]
fn accept_proxy_reads_the_header_before_the_handshake() {
    let dir = TempDir::new("tls-proxy");
    let a = Cert::new(dir.path(), "a", &["a.test"]);
    let origin = Origin::start("one");
    let backend = origin.addr();
    let (pem, key) = (a.pem.display(), a.key.display());
    let lbd = Lbd::start(move |addr| {
        format!(
            "[[listeners]]\naddress = \"{addr}\"\nprotocol = \"https\"\naccept_proxy = true\n\
             certificates = [ {{ certificate = \"{pem}\", key = \"{key}\" }} ]\n\n\
             [clusters.app]\nfrontends = [ {{ address = \"{addr}\" }} ]\n\
             backends = [ {{ address = \"{backend}\" }} ]\n"
        )
    });
    let addr = lbd.addr();
    let url = format!("https://a.test:{}/", addr.port());
    let resolve = format!("a.test:{}:{}", addr.port(), addr.ip());
    let cacert = a.pem.to_str().unwrap();
    let out = curl(&[
        "--haproxy-protocol",
        "--resolve",
        &resolve,
        "--cacert",
        cacert,
        &url,
    ]);
    assert_served(&out, "origin one: GET /\n");
    let seen = origin.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen[0].header("x-forwarded-proto"), Some("https"));
    // Without the header: the ClientHello is not one, the connection closes, nothing served.
    let out = curl(&["--resolve", &resolve, "--cacert", cacert, &url]);
    assert!(!out.status.success(), "served without a PROXY header");
    assert_eq!(origin.requests().len(), 1);
}

#[test]
fn hsts_is_added_to_https_responses_of_its_frontend() {
    let dir = TempDir::new("tls-hsts");
    let cert = Cert::new(dir.path(), "a", &["a.test", "b.test"]);
    let origin = Origin::start("one");
    let backend = origin.addr();
    let (pem, key) = (cert.pem.clone(), cert.key.clone());
    let lbd = Lbd::start(move |addr| {
        format!(
            "[[listeners]]\naddress = \"{addr}\"\nprotocol = \"https\"\n\
             certificates = [ {{ certificate = \"{}\", key = \"{}\" }} ]\n\n\
             [clusters.app]\nfrontends = [\n\
             {{ address = \"{addr}\", hostname = \"a.test\", hsts = \"max-age=31536000; includeSubDomains\" }},\n\
             {{ address = \"{addr}\", hostname = \"b.test\" }},\n]\n\
             backends = [ {{ address = \"{backend}\" }} ]\n",
            pem.display(),
            key.display()
        )
    });
    let addr = lbd.addr();
    for http in ["--http1.1", "--http2"] {
        let out = curl(&[
            http,
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--resolve",
            &format!("a.test:{}:{}", addr.port(), addr.ip()),
            "--cacert",
            cert.pem.to_str().unwrap(),
            &format!("https://a.test:{}/x", addr.port()),
        ]);
        let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        assert!(
            head.contains("\r\nstrict-transport-security: max-age=31536000; includesubdomains\r\n"),
            "{http}: {head}"
        );
        let out = curl(&[
            http,
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--resolve",
            &format!("b.test:{}:{}", addr.port(), addr.ip()),
            "--cacert",
            cert.pem.to_str().unwrap(),
            &format!("https://b.test:{}/x", addr.port()),
        ]);
        let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        assert!(head.contains(" 200"), "{http}: {head}");
        assert!(
            !head.contains("strict-transport-security"),
            "{http}: a frontend without hsts: {head}"
        );
    }
    // On an http listener the key is refused, naming it.
    let config = dir.write(
        "bad.toml",
        "[[listeners]]\naddress = \"127.0.0.1:1\"\n\n[clusters.app]\n\
         frontends = [ { address = \"127.0.0.1:1\", hsts = \"max-age=60\" } ]\n\
         backends = [ { address = \"127.0.0.1:2\" } ]\n",
    );
    let out = common::run_lbd(&["--config".as_ref(), config.as_os_str(), "--check".as_ref()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("clusters.app.frontends[0].hsts")
            && err.contains("only applies to frontends of https listeners"),
        "{err}"
    );
}

/// A CA (`NAME-ca.pem`, `NAME-ca.key`) and a client certificate it signed for `subject`
/// (`NAME-client.pem`, `NAME-client.key`), made with openssl in `dir`.
fn client_ca(dir: &Path, name: &str, subject: &str) {
    let s = |suffix: &str| format!("{name}-{suffix}");
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
            &s("ca.key"),
            "-out",
            &s("ca.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name} client CA"),
        ],
        dir,
    );
    std::fs::write(
        dir.join(s("ext.cnf")),
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    client_cert(dir, name, name, subject);
}

#[test]
fn client_certificates_are_verified_and_told_to_the_backend() {
    let dir = TempDir::new("tls-mtls");
    let server = Cert::new(dir.path(), "server", &["a.test"]);
    client_ca(dir.path(), "good", "/CN=alice/O=Acme");
    client_ca(dir.path(), "other", "/CN=mallory");
    let origin = Origin::start("one");
    let backend = origin.addr();
    let start = |auth: &str| {
        let (pem, key, ca) = (
            server.pem.clone(),
            server.key.clone(),
            dir.path().join("good-ca.pem"),
        );
        let auth = auth.to_owned();
        Lbd::start(move |addr| {
            format!(
                "[[listeners]]\naddress = \"{addr}\"\nprotocol = \"https\"\n\
                 certificates = [ {{ certificate = \"{}\", key = \"{}\" }} ]\n\
                 client_ca = \"{}\"\n{auth}\n\n[clusters.app]\n\
                 frontends = [ {{ address = \"{addr}\" }} ]\n\
                 backends = [ {{ address = \"{backend}\" }} ]\n",
                pem.display(),
                key.display(),
                ca.display()
            )
        })
    };
    let get = |addr: SocketAddr, http: &str, client: Option<&str>| -> Output {
        let mut args = vec![
            http.to_owned(),
            "--resolve".to_owned(),
            format!("a.test:{}:{}", addr.port(), addr.ip()),
            "--cacert".to_owned(),
            server.pem.display().to_string(),
            "-H".to_owned(),
            "X-Client-Cert-Subject: CN=forged".to_owned(),
        ];
        if let Some(name) = client {
            args.extend([
                "--cert".to_owned(),
                dir.path()
                    .join(format!("{name}-client.pem"))
                    .display()
                    .to_string(),
                "--key".to_owned(),
                dir.path()
                    .join(format!("{name}-client.key"))
                    .display()
                    .to_string(),
            ]);
        }
        args.push(format!("https://a.test:{}/headers", addr.port()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&args)
    };
    let fingerprint = {
        let out = openssl(
            &[
                "x509",
                "-in",
                "good-client.pem",
                "-noout",
                "-fingerprint",
                "-sha256",
            ],
            dir.path(),
        );
        parse_fingerprint(&String::from_utf8_lossy(&out.stdout))
    };

    // Required (the default): the CA's client is served, over HTTP/1.1 and HTTP/2, and the
    // backend is told who it is (a header the client forged is not passed on).
    let lbd = start("");
    for http in ["--http1.1", "--http2"] {
        let out = get(lbd.addr(), http, Some("good"));
        assert!(
            out.status.success(),
            "{http}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let seen = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        assert!(
            seen.contains("x-client-cert-subject: cn=alice, o=acme"),
            "{http}: {seen}"
        );
        assert!(
            seen.contains(&format!("x-client-cert-fingerprint: {fingerprint}")),
            "{http}: {seen}"
        );
        assert!(!seen.contains("cn=forged"), "{http}: {seen}");
    }
    // And the access log says who it was, for both requests (h1 and h2).
    let log = lbd.wait_stdout_lines(2).join("\n");
    let who = format!("client_subject=\"CN=alice, O=Acme\" client_fingerprint={fingerprint}");
    assert_eq!(log.matches(&who).count(), 2, "{log}");
    // No certificate, or one another CA signed: the handshake fails, nothing reaches the
    // origin.
    let before = origin.requests().len();
    for (client, why) in [(None, "no certificate"), (Some("other"), "another CA's")] {
        let out = get(lbd.addr(), "--http1.1", client);
        assert!(
            !out.status.success(),
            "{why}: served: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert_eq!(
        origin.requests().len(),
        before,
        "refused clients reach no backend"
    );
    drop(lbd);

    // Optional: a client without a certificate is served and nothing is claimed for it; a
    // bad certificate is still refused.
    let lbd = start("client_auth = \"optional\"");
    let out = get(lbd.addr(), "--http1.1", None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(!seen.contains("x-client-cert"), "{seen}");
    assert!(!get(lbd.addr(), "--http1.1", Some("other")).status.success());
    drop(lbd);

    // client_ca on an http listener is refused, naming the key.
    let config = dir.write(
        "bad.toml",
        format!(
            "[[listeners]]\naddress = \"127.0.0.1:1\"\nclient_ca = \"{}\"\n\n[clusters.app]\n\
             frontends = [ {{ address = \"127.0.0.1:1\" }} ]\n\
             backends = [ {{ address = \"127.0.0.1:2\" }} ]\n",
            dir.path().join("good-ca.pem").display()
        ),
    );
    let out = common::run_lbd(&["--config".as_ref(), config.as_os_str(), "--check".as_ref()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("listeners[0].client_ca") && err.contains("only applies to https listeners"),
        "{err}"
    );
}

/// Session tickets open in every worker, and in the next generation's after `lbctl upgrade`:
/// the keys are lbd's, shared by its workers and handed over. A session made on one
/// connection is resumed by 20 more, spread by the eBPF flow hash over 4 workers (their
/// request ids say which), TLS 1.3 and 1.2.
#[test]
fn session_tickets_resume_on_every_worker_and_across_an_upgrade() {
    const WORKERS: usize = 4;
    const AGAIN: usize = 20;
    let dir = TempDir::new("tls-tickets");
    let a = Cert::new(dir.path(), "a", &["a.test"]);
    let origin = Origin::start("one");
    let backend = origin.addr();
    let (pem, key) = (a.pem.clone(), a.key.clone());
    let mut lbd = Lbd::start_until(
        move |addr| {
            format!(
                "workers = {WORKERS}\nsteering = \"ebpf\"\nsteering_policy = \"flow-hash\"\n\
                 [[listeners]]\naddress = \"{addr}\"\nprotocol = \"https\"\n\
                 certificates = [ {{ certificate = \"{}\", key = \"{}\" }} ]\n\n\
                 [clusters.app]\nfrontends = [ {{ address = \"{addr}\" }} ]\n\
                 backends = [ {{ address = \"{backend}\" }} ]\n",
                pem.display(),
                key.display()
            )
        },
        common::workers_ready(WORKERS),
    );
    let addr = lbd.addr();
    let request = b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n";
    let sock = lbd.dir().path().join("lbd.sock");
    let binary = common::fresh_binary(dir.path(), 1);
    let lines_before = |lbd: &Lbd| lbd.stdout().lines().count();

    for (round, flag) in ["-tls1_3", "-tls1_2"].into_iter().enumerate() {
        let sess = dir.path().join(format!("sess{flag}"));
        let sess = sess.to_str().unwrap();
        let first = s_client(
            addr,
            &[flag, "-servername", "a.test", "-sess_out", sess, "-ign_eof"],
            request,
        );
        assert!(first.contains("New, "), "{first}");
        let skip = lines_before(&lbd);
        let mut reused = 0;
        for _ in 0..AGAIN {
            let again = s_client(
                addr,
                &[flag, "-servername", "a.test", "-sess_in", sess, "-ign_eof"],
                request,
            );
            assert!(again.contains("origin one: GET /"), "{again}");
            reused += usize::from(again.contains("Reused, "));
        }
        let log = lbd.stdout();
        let workers: std::collections::HashSet<String> = log
            .lines()
            .skip(skip)
            .filter_map(|l| l.split("request_id=").nth(1))
            .map(|id| id.chars().take(8).collect())
            .collect();
        eprintln!(
            "{flag}: {reused}/{AGAIN} resumed, served by {} workers",
            workers.len()
        );
        assert!(
            workers.len() >= 2,
            "{flag}: the connections reached several workers: {workers:?}"
        );
        assert_eq!(reused, AGAIN, "{flag}: every connection resumed");

        // Across an upgrade: the new generation's workers open the old one's tickets.
        if round == 0 {
            let before: serde_json::Value =
                serde_json::from_str(&common::lbctl_ok(&sock, &["status", "--json"])).unwrap();
            common::lbctl_ok(&sock, &["upgrade", "--binary", binary.to_str().unwrap()]);
            let after: serde_json::Value =
                serde_json::from_str(&common::lbctl_ok(&sock, &["status", "--json"])).unwrap();
            assert_ne!(after["pid"], before["pid"]);
            lbd.follow_main(after["pid"].as_i64().unwrap() as i32);
            let mut resumed = 0;
            for _ in 0..AGAIN / 2 {
                let again = s_client(
                    addr,
                    &[flag, "-servername", "a.test", "-sess_in", sess, "-ign_eof"],
                    request,
                );
                resumed += usize::from(again.contains("Reused, "));
            }
            eprintln!("{flag}: after the upgrade {resumed}/{} resumed", AGAIN / 2);
            assert_eq!(resumed, AGAIN / 2, "tickets resume after lbctl upgrade");
        }
    }
}

/// `lbctl listener client-ca` replaces the CA client certificates are verified against, and
/// `client_auth`, at runtime: the next handshakes follow it. A file that is not a CA is
/// refused and changes nothing. `lbctl listener add --client-ca` starts a listener asking for
/// them.
#[test]
fn the_client_ca_is_replaced_at_runtime() {
    let dir = TempDir::new("tls-client-ca");
    let server = Cert::new(dir.path(), "server", &["a.test"]);
    client_ca(dir.path(), "good", "/CN=alice");
    client_ca(dir.path(), "other", "/CN=bob");
    let origin = Origin::start("one");
    let backend = origin.addr();
    let (pem, key, ca) = (
        server.pem.clone(),
        server.key.clone(),
        dir.path().join("good-ca.pem"),
    );
    let lbd = Lbd::start(move |addr| {
        format!(
            "[[listeners]]\naddress = \"{addr}\"\nprotocol = \"https\"\n\
             certificates = [ {{ certificate = \"{}\", key = \"{}\" }} ]\n\
             client_ca = \"{}\"\n\n[clusters.app]\n\
             frontends = [ {{ address = \"{addr}\" }} ]\n\
             backends = [ {{ address = \"{backend}\" }} ]\n",
            pem.display(),
            key.display(),
            ca.display()
        )
    });
    let sock = lbd.dir().path().join("lbd.sock");
    let file = |name: &str| dir.path().join(name).display().to_string();
    let who =
        |addr: SocketAddr, client: Option<&str>| client_subject(addr, &server, dir.path(), client);
    let addr = lbd.addr();
    let a = addr.to_string();
    assert_eq!(who(addr, Some("good")).as_deref(), Some("cn=alice"));
    assert_eq!(who(addr, Some("other")), None);

    // Replaced by the other CA: bob is served, alice is refused.
    common::lbctl_ok(
        &sock,
        &[
            "listener",
            "client-ca",
            "--address",
            &a,
            "--ca",
            &file("other-ca.pem"),
        ],
    );
    assert_eq!(who(addr, Some("other")).as_deref(), Some("cn=bob"));
    assert_eq!(who(addr, Some("good")), None);
    assert_eq!(who(addr, None), None, "still required");

    // A file that is not a CA: refused, nothing changes.
    let bad = dir.write("bad.pem", "not a certificate\n");
    let before = common::lbctl_ok(&sock, &["state", "dump"]);
    let refused = common::lbctl_at(
        &sock,
        &[
            "listener",
            "client-ca",
            "--address",
            &a,
            "--ca",
            bad.to_str().unwrap(),
        ],
    );
    assert_ne!(refused.code, Some(0));
    assert!(refused.stderr.contains("client CA"), "{}", refused.stderr);
    assert_eq!(common::lbctl_ok(&sock, &["state", "dump"]), before);
    assert_eq!(who(addr, Some("other")).as_deref(), Some("cn=bob"));

    // Optional, then none at all.
    common::lbctl_ok(
        &sock,
        &[
            "listener",
            "client-ca",
            "--address",
            &a,
            "--ca",
            &file("other-ca.pem"),
            "--auth",
            "optional",
        ],
    );
    assert_eq!(who(addr, None).as_deref(), Some(""));
    assert_eq!(
        who(addr, Some("good")),
        None,
        "a bad certificate still fails"
    );
    common::lbctl_ok(&sock, &["listener", "client-ca", "--address", &a, "--none"]);
    assert_eq!(who(addr, None).as_deref(), Some(""));

    // A listener added with --client-ca asks for certificates from its first connection.
    let added = common::free_addr();
    let added_text = added.to_string();
    common::lbctl_ok(
        &sock,
        &[
            "listener",
            "add",
            "--address",
            &added_text,
            "--protocol",
            "https",
            "--certificate",
            server.pem.to_str().unwrap(),
            "--key",
            server.key.to_str().unwrap(),
            "--client-ca",
            &file("good-ca.pem"),
        ],
    );
    common::lbctl_ok(
        &sock,
        &[
            "frontend",
            "add",
            "--cluster",
            "app",
            "--address",
            &added_text,
        ],
    );
    assert_eq!(who(added, Some("good")).as_deref(), Some("cn=alice"));
    assert_eq!(who(added, None), None);
}

/// The subject the backend was told for a request to `addr` with client certificate
/// `dir/NAME-client.pem` (None: none), or None when the handshake failed.
fn client_subject(
    addr: SocketAddr,
    server: &Cert,
    dir: &Path,
    client: Option<&str>,
) -> Option<String> {
    let file = |name: &str| dir.join(name).display().to_string();
    let mut args = vec![
        "--http1.1".to_owned(),
        "--resolve".to_owned(),
        format!("a.test:{}:{}", addr.port(), addr.ip()),
        "--cacert".to_owned(),
        server.pem.display().to_string(),
    ];
    if let Some(name) = client {
        args.extend([
            "--cert".to_owned(),
            file(&format!("{name}-client.pem")),
            "--key".to_owned(),
            file(&format!("{name}-client.key")),
        ]);
    }
    args.push(format!("https://a.test:{}/headers", addr.port()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = curl(&args);
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("x-client-cert-subject: ")
                    .map(str::to_owned)
            })
            .unwrap_or_default()
    })
}

/// A client certificate `dir/NAME-client.pem` (key `NAME-client.key`) for `subject`, signed
/// by the CA `ca` of [`client_ca`].
fn client_cert(dir: &Path, ca: &str, name: &str, subject: &str) {
    let s = |suffix: &str| format!("{name}-{suffix}");
    openssl(
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &s("client.key"),
            "-out",
            &s("client.csr"),
            "-subj",
            subject,
        ],
        dir,
    );
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            &s("client.csr"),
            "-CA",
            &format!("{ca}-ca.pem"),
            "-CAkey",
            &format!("{ca}-ca.key"),
            "-CAcreateserial",
            "-out",
            &s("client.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{ca}-ext.cnf"),
        ],
        dir,
    );
}

/// Revocation lists from `openssl ca`: `client_crl` in the file refuses the certificates it
/// lists and serves the CA's others; `lbctl listener client-ca --crl` replaces it; a file
/// that is not a CRL is refused and changes nothing.
#[test]
fn revoked_client_certificates_are_refused() {
    let dir = TempDir::new("tls-crl");
    let server = Cert::new(dir.path(), "server", &["a.test"]);
    client_ca(dir.path(), "good", "/CN=alice");
    client_cert(dir.path(), "good", "carol", "/CN=carol");
    dir.write(
        "ca.cnf",
        "[ca]\ndefault_ca = own\n[own]\ndatabase = index.txt\ncrlnumber = crlnumber\n\
         default_md = sha256\ndefault_crl_days = 2\n",
    );
    dir.write("index.txt", "");
    dir.write("crlnumber", "1000\n");
    let ca_args = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "ca",
            "-config",
            "ca.cnf",
            "-keyfile",
            "good-ca.key",
            "-cert",
            "good-ca.pem",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    };
    let run = |extra: &[&str]| {
        let args = ca_args(extra);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        openssl(&args, dir.path());
    };
    run(&["-gencrl", "-out", "empty-crl.pem"]);
    run(&["-revoke", "good-client.pem"]);
    run(&["-gencrl", "-out", "crl.pem"]);

    let origin = Origin::start("one");
    let backend = origin.addr();
    let (pem, key, ca, crl) = (
        server.pem.clone(),
        server.key.clone(),
        dir.path().join("good-ca.pem"),
        dir.path().join("crl.pem"),
    );
    let lbd = Lbd::start(move |addr| {
        format!(
            "[[listeners]]\naddress = \"{addr}\"\nprotocol = \"https\"\n\
             certificates = [ {{ certificate = \"{}\", key = \"{}\" }} ]\n\
             client_ca = \"{}\"\nclient_crl = \"{}\"\n\n[clusters.app]\n\
             frontends = [ {{ address = \"{addr}\" }} ]\n\
             backends = [ {{ address = \"{backend}\" }} ]\n",
            pem.display(),
            key.display(),
            ca.display(),
            crl.display()
        )
    });
    let addr = lbd.addr();
    let who = |client: Option<&str>| client_subject(addr, &server, dir.path(), client);
    assert_eq!(who(Some("good")), None, "alice is revoked");
    assert_eq!(who(Some("carol")).as_deref(), Some("cn=carol"));

    let sock = lbd.dir().path().join("lbd.sock");
    let a = addr.to_string();
    let file = |name: &str| dir.path().join(name).display().to_string();
    let bad = dir.write("bad-crl.pem", "not a list\n");
    let before = common::lbctl_ok(&sock, &["state", "dump"]);
    let refused = common::lbctl_at(
        &sock,
        &[
            "listener",
            "client-ca",
            "--address",
            &a,
            "--ca",
            &file("good-ca.pem"),
            "--crl",
            bad.to_str().unwrap(),
        ],
    );
    assert_ne!(refused.code, Some(0));
    assert!(refused.stderr.contains("client CRL"), "{}", refused.stderr);
    assert_eq!(common::lbctl_ok(&sock, &["state", "dump"]), before);

    common::lbctl_ok(
        &sock,
        &[
            "listener",
            "client-ca",
            "--address",
            &a,
            "--ca",
            &file("good-ca.pem"),
            "--crl",
            &file("empty-crl.pem"),
        ],
    );
    assert_eq!(
        who(Some("good")).as_deref(),
        Some("cn=alice"),
        "the new list"
    );
    assert_eq!(who(Some("carol")).as_deref(), Some("cn=carol"));
}
