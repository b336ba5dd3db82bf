//! TCP passthrough through a real `lbd` (`protocol = "tcp"` listeners and clusters):
//!
//! - routing by the TLS server name read from the ClientHello, to real TLS origins
//!   (`openssl s_server`, one certificate each) reached with `openssl s_client -servername`;
//!   the certificate the client sees tells which origin answered. No name, or an unknown one,
//!   goes to the frontend without hostname; without such a frontend the client is closed.
//! - 1 GiB each way at the same time, byte-exact, while the resident memory of lbd and its
//!   worker stays bounded (the throughput is printed, never asserted);
//! - half-close in both orders; an idle connection closed after `front_idle`;
//! - a backend refusing connections is skipped for the next one;
//! - a PROXY protocol v2 header parsed by a small origin written here; behind a listener
//!   with `accept_proxy`, the addresses of the v1 or v2 header the client sent are passed on;
//! - a backend added and the old one removed at runtime (command socket): new connections go
//!   to the new one while an established connection to the removed one keeps working;
//! - one access log line per connection (`method=-`, `path=-`, `status=0`, byte counts).
//!
//! Every socket has timeouts and every wait a deadline; origins and openssl processes are
//! stopped by handle or pid.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    connect, field, free_addr, parse_logfmt, pattern, process_memory, process_tree, wait_until,
    ClosedPort, Lbd, PatternCheck, TempDir, IO_TIMEOUT, PERIOD,
};

/// The bound on lbd's peak resident memory while it moves 1 GiB each way.
const MAX_RSS_KIB: u64 = 64 * 1024;
const GIB: u64 = 1 << 30;

// ---- origins --------------------------------------------------------------------------------

/// A TCP server on 127.0.0.1 running `handler` on a thread per connection; stopped on drop.
struct TcpOrigin {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicU64>,
}

impl TcpOrigin {
    fn start(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> TcpOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicU64::new(0));
        let handler = Arc::new(handler);
        let (s, a) = (Arc::clone(&stop), Arc::clone(&accepted));
        thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                a.fetch_add(1, Ordering::Relaxed);
                conn.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                conn.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
                let h = Arc::clone(&handler);
                thread::spawn(move || h(conn));
            }
        });
        TcpOrigin {
            addr,
            stop,
            accepted,
        }
    }

    /// Sends `tag` then echoes everything until EOF, then half-closes.
    fn echo(tag: &'static [u8]) -> TcpOrigin {
        TcpOrigin::start(move |mut conn| {
            if conn.write_all(tag).is_err() {
                return;
            }
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if conn.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = conn.shutdown(Shutdown::Write);
        })
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for TcpOrigin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// Reads until EOF (or an error, or the read timeout).
fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return out,
        }
    }
}

/// True when the peer closed the connection (EOF or reset) within the read timeout.
fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

fn tcp_listener(l: SocketAddr) -> String {
    format!("[[listeners]]\naddress = \"{l}\"\nprotocol = \"tcp\"\n\n")
}

/// A tcp cluster `name` served on `l` (with `extra` keys, e.g. a hostname in the frontend).
fn tcp_cluster(name: &str, frontend: &str, backends: &[SocketAddr], extra: &str) -> String {
    format!(
        "[clusters.{name}]\nprotocol = \"tcp\"\n{extra}frontends = [ {frontend} ]\nbackends = {}\n\n",
        common::backends(backends)
    )
}

/// The access log lines of `lbd` whose `client` is `client`.
fn log_lines_of(lbd: &Lbd, client: SocketAddr) -> Vec<Vec<(String, String)>> {
    let mut lines = Vec::new();
    wait_until(Duration::from_secs(5), || {
        lines = lbd
            .stdout()
            .lines()
            .map(parse_logfmt)
            .filter(|f| field(f, "client") == Some(client.to_string().as_str()))
            .collect();
        !lines.is_empty()
    });
    lines
}

// ---- TLS origins ----------------------------------------------------------------------------

/// `openssl s_server -www` with a self-signed certificate for `name`; killed by pid on drop.
struct TlsOrigin {
    child: Child,
    addr: SocketAddr,
}

fn openssl(args: &[&str]) -> std::process::Output {
    match Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "these tests need the openssl command line tool (a real TLS server and client): \
             install it with `apt-get install openssl`; the test is not skipped"
        ),
        Err(e) => panic!("running openssl: {e}"),
    }
}

impl TlsOrigin {
    fn start(dir: &Path, name: &str) -> TlsOrigin {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        let out = openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            &format!("subjectAltName=DNS:{name}"),
            "-keyout",
            key.to_str().unwrap(),
            "-out",
            cert.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "openssl req: {out:?}");
        for _ in 0..5 {
            let addr = free_addr();
            let mut child = Command::new("openssl")
                .args(["s_server", "-quiet", "-www", "-accept"])
                .arg(addr.to_string())
                .arg("-cert")
                .arg(&cert)
                .arg("-key")
                .arg(&key)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn openssl s_server");
            let up = wait_until(Duration::from_secs(10), || {
                child.try_wait().unwrap().is_some()
                    || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            });
            if up && child.try_wait().unwrap().is_none() {
                return TlsOrigin { child, addr };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("openssl s_server for {name} did not start");
    }
}

impl Drop for TlsOrigin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `openssl s_client` to `addr` with SNI `name` (None: `-noservername`), sending an HTTP/1.0
/// request; returns (success, stdout). Killed after 20 s.
fn s_client(addr: SocketAddr, name: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", &addr.to_string(), "-ign_eof"]);
    match name {
        Some(n) => cmd.args(["-servername", n]),
        None => cmd.arg("-noservername"),
    };
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn openssl s_client");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"GET / HTTP/1.0\r\n\r\n")
        .unwrap();
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("openssl s_client to {addr} ({name:?}) did not finish in 20 s");
        }
    };
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// The CN of the certificate s_client printed (`subject=CN = NAME` or `subject=CN=NAME`).
fn served_by(stdout: &str) -> Option<String> {
    let line = stdout.lines().find(|l| l.starts_with("subject="))?;
    let cn = line.split("CN").nth(1)?;
    Some(cn.trim_start_matches([' ', '=']).trim().to_owned())
}

#[test]
fn routes_by_tls_server_name_to_real_tls_origins() {
    let dir = TempDir::new("tcp-sni");
    let alpha = TlsOrigin::start(dir.path(), "alpha.test");
    let beta = TlsOrigin::start(dir.path(), "beta.test");
    let fallback = TlsOrigin::start(dir.path(), "default.test");
    let lbd = Lbd::start_multi(2, |l| {
        let (l1, l2) = (l[0], l[1]);
        format!(
            "{}{}{}{}{}{}",
            tcp_listener(l1),
            tcp_listener(l2),
            tcp_cluster(
                "alpha",
                &format!(
                    "{{ address = \"{l1}\", hostname = \"alpha.test\" }}, \
                     {{ address = \"{l2}\", hostname = \"alpha.test\" }}"
                ),
                &[alpha.addr],
                ""
            ),
            tcp_cluster(
                "beta",
                &format!("{{ address = \"{l1}\", hostname = \"*.beta.test\" }}"),
                &[beta.addr],
                ""
            ),
            tcp_cluster(
                "fallback",
                &format!("{{ address = \"{l1}\" }}"),
                &[fallback.addr],
                ""
            ),
            ""
        )
    });
    let (l1, l2) = (lbd.addrs[0], lbd.addrs[1]);
    let cases: [(SocketAddr, Option<&str>, &str); 6] = [
        (l1, Some("alpha.test"), "alpha.test"),
        (l1, Some("ALPHA.test"), "alpha.test"),
        (l1, Some("www.beta.test"), "beta.test"),
        (l1, Some("gamma.test"), "default.test"),
        (l1, None, "default.test"),
        (l2, Some("alpha.test"), "alpha.test"),
    ];
    for (addr, name, want) in cases {
        let (ok, out) = s_client(addr, name);
        assert!(ok, "s_client {name:?} via {addr} failed:\n{out}");
        assert_eq!(
            served_by(&out).as_deref(),
            Some(want),
            "SNI {name:?} via {addr}:\n{out}"
        );
        assert!(
            out.contains("HTTP/1.0 200 ok"),
            "no answer from the origin:\n{out}"
        );
    }
    // The second listener has no frontend without hostname: an unknown name and a client that
    // does not speak TLS are closed without reaching any backend.
    let (ok, out) = s_client(l2, Some("gamma.test"));
    assert!(!ok, "an unknown server name must be refused:\n{out}");
    let mut plain = connect(l2);
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(closed_by_peer(&mut plain), "plain text must get a close");
    let client = plain.local_addr().unwrap();
    let lines = log_lines_of(&lbd, client);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(field(&lines[0], "status"), Some("400"));
    assert_eq!(field(&lines[0], "error"), Some("not a TLS ClientHello"));

    // One line per connection, the server name in `host`.
    let stdout = lbd.stdout();
    let named: Vec<Vec<(String, String)>> = stdout
        .lines()
        .map(parse_logfmt)
        .filter(|f| field(f, "host") == Some("www.beta.test"))
        .collect();
    assert_eq!(named.len(), 1, "{stdout}");
    let f = &named[0];
    assert_eq!(field(f, "cluster"), Some("beta"));
    assert_eq!(field(f, "method"), Some("-"));
    assert_eq!(field(f, "path"), Some("-"));
    assert_eq!(field(f, "status"), Some("0"));
    assert_eq!(field(f, "backend"), Some(beta.addr.to_string().as_str()));
    assert!(field(f, "bytes_in").unwrap().parse::<u64>().unwrap() > 200);
    assert!(field(f, "bytes_out").unwrap().parse::<u64>().unwrap() > 500);
}

// ---- bulk transfer --------------------------------------------------------------------------

/// Writes `len` bytes of the test pattern (`i % 251`).
fn send_pattern(w: &mut impl Write, len: u64) -> std::io::Result<()> {
    let window = pattern(256 * 1024 + PERIOD);
    let mut off = 0u64;
    while off < len {
        let k = (len - off).min(256 * 1024) as usize;
        let phase = (off % PERIOD as u64) as usize;
        w.write_all(&window[phase..phase + k])?;
        off += k as u64;
    }
    Ok(())
}

/// Reads until EOF, checking the pattern.
fn check_pattern(r: &mut impl Read) -> PatternCheck {
    let mut check = PatternCheck::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return check,
            Ok(n) => check.update(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("reading after {} bytes: {e}", check.len),
        }
    }
}

fn rss_now(pid: i32) -> u64 {
    process_tree(pid)
        .into_iter()
        .filter_map(process_memory)
        .map(|m| m.rss_kib)
        .sum()
}

#[test]
fn one_gib_each_way_byte_exact_with_bounded_memory() {
    let (tx, rx) = mpsc::channel::<(u64, Option<u64>)>();
    let tx = std::sync::Mutex::new(tx);
    let origin = TcpOrigin::start(move |conn| {
        let mut reader = conn.try_clone().unwrap();
        let mut writer = conn;
        // Connections without traffic (the harness's readiness probe) just end.
        let r = thread::spawn(move || check_pattern(&mut reader));
        let mut first = [0u8; 1];
        if writer.peek(&mut first).ok() != Some(1) {
            let _ = r.join();
            return;
        }
        send_pattern(&mut writer, GIB).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
        let check = r.join().unwrap();
        let _ = tx.lock().unwrap().send((check.len, check.first_mismatch));
    });
    let lbd = Lbd::start(|l| {
        format!(
            "{}{}",
            tcp_listener(l),
            tcp_cluster(
                "bulk",
                &format!("{{ address = \"{l}\" }}"),
                &[origin.addr],
                ""
            )
        )
    });
    let stop = Arc::new(AtomicBool::new(false));
    let max_rss = Arc::new(AtomicU64::new(0));
    let sampler = {
        let (s, m, pid) = (Arc::clone(&stop), Arc::clone(&max_rss), lbd.pid());
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                m.fetch_max(rss_now(pid), Ordering::Relaxed);
                thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let started = Instant::now();
    let client = connect(lbd.addr());
    let mut writer = client.try_clone().unwrap();
    let up = thread::spawn(move || {
        send_pattern(&mut writer, GIB).unwrap();
        writer.shutdown(Shutdown::Write).unwrap();
    });
    let mut reader = client;
    let down = check_pattern(&mut reader);
    up.join().unwrap();
    let (origin_len, origin_mismatch) = rx.recv_timeout(IO_TIMEOUT).unwrap();
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();

    assert_eq!(down.len, GIB, "bytes the client received");
    assert_eq!(down.first_mismatch, None, "the client received other bytes");
    assert_eq!(origin_len, GIB, "bytes the origin received");
    assert_eq!(origin_mismatch, None, "the origin received other bytes");
    let mem = lbd.memory();
    let sampled = max_rss.load(Ordering::Relaxed);
    eprintln!(
        "1 GiB each way through lbd in {elapsed:.2?} ({:.0} MiB/s each way); lbd and its worker: \
         VmHWM {} KiB, sampled max VmRSS {sampled} KiB",
        1024.0 / elapsed.as_secs_f64(),
        mem.hwm_kib
    );
    assert!(
        mem.hwm_kib < MAX_RSS_KIB && sampled < MAX_RSS_KIB,
        "lbd's peak RSS {} KiB (sampled {sampled} KiB) is over {MAX_RSS_KIB} KiB",
        mem.hwm_kib
    );
    let lines = log_lines_of(&lbd, reader.local_addr().unwrap());
    assert_eq!(lines.len(), 1);
    assert_eq!(field(&lines[0], "bytes_in"), Some(GIB.to_string().as_str()));
    assert_eq!(
        field(&lines[0], "bytes_out"),
        Some(GIB.to_string().as_str())
    );
    assert_eq!(field(&lines[0], "error"), Some(""));
}

// ---- half-close, idle, refused backends ----------------------------------------------------

#[test]
fn half_close_is_passed_on_both_ways() {
    // The origin answers after the client's EOF, then closes: a request/response protocol
    // where the client half-closes (as `nc -N` does).
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let tx = std::sync::Mutex::new(tx);
    let origin = TcpOrigin::start(move |mut conn| {
        let got = read_to_end(&mut conn);
        let _ = conn.write_all(format!("got {} bytes", got.len()).as_bytes());
        let _ = conn.shutdown(Shutdown::Write);
        // The harness's readiness probe sends nothing: only report real exchanges.
        if !got.is_empty() {
            let _ = tx.lock().unwrap().send(got);
        }
    });
    // The other order: the origin sends a banner and half-closes at once; the client still
    // sends afterwards, and the origin gets it all.
    let (btx, brx) = mpsc::channel::<Vec<u8>>();
    let btx = std::sync::Mutex::new(btx);
    let banner = TcpOrigin::start(move |mut conn| {
        conn.write_all(b"hello from the origin").unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
        let got = read_to_end(&mut conn);
        let _ = btx.lock().unwrap().send(got);
    });
    let lbd = Lbd::start_multi(2, |l| {
        format!(
            "{}{}{}{}",
            tcp_listener(l[0]),
            tcp_listener(l[1]),
            tcp_cluster(
                "answer",
                &format!("{{ address = \"{}\" }}", l[0]),
                &[origin.addr],
                ""
            ),
            tcp_cluster(
                "banner",
                &format!("{{ address = \"{}\" }}", l[1]),
                &[banner.addr],
                ""
            ),
        )
    });

    let mut c = connect(lbd.addrs[0]);
    c.write_all(b"question, then EOF").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut c), b"got 18 bytes");
    let got = rx.recv_timeout(IO_TIMEOUT).unwrap();
    assert_eq!(got, b"question, then EOF");

    let mut c = connect(lbd.addrs[1]);
    let mut greeting = [0u8; 21];
    c.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"hello from the origin");
    // EOF from the origin arrives while our side is still open.
    let mut one = [0u8; 1];
    assert_eq!(
        c.read(&mut one).unwrap(),
        0,
        "the origin's EOF must be passed on"
    );
    c.write_all(b"banner-first: late words").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    // Skip the readiness probe's connection, which sent nothing.
    let got = loop {
        let got = brx.recv_timeout(IO_TIMEOUT).unwrap();
        if !got.is_empty() {
            break got;
        }
    };
    assert_eq!(got, b"banner-first: late words");
    let lines = log_lines_of(&lbd, c.local_addr().unwrap());
    assert_eq!(lines.len(), 1);
    assert_eq!(field(&lines[0], "status"), Some("0"));
    assert_eq!(field(&lines[0], "bytes_in"), Some("24"));
    assert_eq!(field(&lines[0], "bytes_out"), Some("21"));
}

#[test]
fn idle_connections_are_closed_after_front_idle() {
    let origin = TcpOrigin::echo(b"");
    let lbd = Lbd::start(|l| {
        format!(
            "[timeouts]\nfront_idle = \"700ms\"\n\n{}{}",
            tcp_listener(l),
            tcp_cluster(
                "idle",
                &format!("{{ address = \"{l}\" }}"),
                &[origin.addr],
                ""
            )
        )
    });
    let mut c = connect(lbd.addr());
    c.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    c.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    assert!(closed_by_peer(&mut c), "an idle connection must be closed");
    let lines = log_lines_of(&lbd, c.local_addr().unwrap());
    assert_eq!(field(&lines[0], "error"), Some("idle timeout"));
}

#[test]
fn a_refusing_backend_is_skipped_for_the_next() {
    let refusing = ClosedPort::new();
    let origin = TcpOrigin::echo(b"live:");
    let dead = ClosedPort::new();
    let lbd = Lbd::start_multi(2, |l| {
        format!(
            "{}{}{}{}",
            tcp_listener(l[0]),
            tcp_listener(l[1]),
            tcp_cluster(
                "mixed",
                &format!("{{ address = \"{}\" }}", l[0]),
                &[refusing.addr, origin.addr],
                "load_balancing = \"round-robin\"\n"
            ),
            tcp_cluster(
                "dead",
                &format!("{{ address = \"{}\" }}", l[1]),
                &[dead.addr],
                ""
            ),
        )
    });
    for i in 0..6 {
        let mut c = connect(lbd.addrs[0]);
        let msg = format!("hello {i}");
        c.write_all(msg.as_bytes()).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(
            String::from_utf8(read_to_end(&mut c)).unwrap(),
            format!("live:{msg}"),
            "connection {i}"
        );
        let lines = log_lines_of(&lbd, c.local_addr().unwrap());
        assert_eq!(field(&lines[0], "status"), Some("0"));
        assert_eq!(
            field(&lines[0], "backend"),
            Some(origin.addr.to_string().as_str())
        );
    }
    // Every backend refusing: the client is closed, the log says 502.
    let mut c = connect(lbd.addrs[1]);
    assert!(closed_by_peer(&mut c));
    let lines = log_lines_of(&lbd, c.local_addr().unwrap());
    assert_eq!(field(&lines[0], "status"), Some("502"));
    assert_eq!(field(&lines[0], "error"), Some("backend connect failed"));
}

// ---- PROXY protocol v2 ----------------------------------------------------------------------

/// Reads a PROXY protocol v2 header (TCP over IPv4 or IPv6) by the spec, independently of
/// lbd's own code: returns (source, destination).
fn read_proxy_v2(conn: &mut TcpStream) -> Result<(SocketAddr, SocketAddr), String> {
    let mut fixed = [0u8; 16];
    conn.read_exact(&mut fixed).map_err(|e| e.to_string())?;
    if fixed[..12] != *b"\r\n\r\n\0\r\nQUIT\n" {
        return Err(format!("bad signature {:?}", &fixed[..12]));
    }
    if fixed[12] != 0x21 {
        return Err(format!("version/command {:#x}, want 0x21", fixed[12]));
    }
    let len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
    let mut block = vec![0u8; len];
    conn.read_exact(&mut block).map_err(|e| e.to_string())?;
    let port = |i: usize| u16::from_be_bytes([block[i], block[i + 1]]);
    match fixed[13] {
        0x11 if len >= 12 => {
            let ip = |i: usize| {
                std::net::Ipv4Addr::new(block[i], block[i + 1], block[i + 2], block[i + 3])
            };
            Ok((
                SocketAddr::from((ip(0), port(8))),
                SocketAddr::from((ip(4), port(10))),
            ))
        }
        0x21 if len >= 36 => {
            let ip = |i: usize| {
                let o: [u8; 16] = block[i..i + 16].try_into().unwrap();
                std::net::Ipv6Addr::from(o)
            };
            Ok((
                SocketAddr::from((ip(0), port(32))),
                SocketAddr::from((ip(16), port(34))),
            ))
        }
        other => Err(format!("family {other:#x} with {len} address bytes")),
    }
}

#[test]
fn send_proxy_writes_a_v2_header_first() {
    // The origin parses the header, answers with what it read, then echoes the payload.
    let origin = TcpOrigin::start(|mut conn| {
        let answer = match read_proxy_v2(&mut conn) {
            Ok((src, dst)) => format!("src={src} dst={dst}\n"),
            Err(e) => format!("error={e}\n"),
        };
        if conn.write_all(answer.as_bytes()).is_err() {
            return;
        }
        let rest = read_to_end(&mut conn);
        let _ = conn.write_all(&rest);
        let _ = conn.shutdown(Shutdown::Write);
    });
    let lbd = Lbd::start(|l| {
        format!(
            "{}{}",
            tcp_listener(l),
            tcp_cluster(
                "proxied",
                &format!("{{ address = \"{l}\" }}"),
                &[origin.addr],
                "send_proxy = true\n"
            )
        )
    });
    let mut c = connect(lbd.addr());
    c.write_all(b"payload after the header").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let got = String::from_utf8(read_to_end(&mut c)).unwrap();
    let want = format!(
        "src={} dst={}\npayload after the header",
        c.local_addr().unwrap(),
        lbd.addr()
    );
    assert_eq!(got, want);
}

#[test]
fn accept_proxy_takes_the_client_from_the_header() {
    let origin = TcpOrigin::start(|mut conn| {
        let answer = match read_proxy_v2(&mut conn) {
            Ok((src, dst)) => format!("src={src} dst={dst}\n"),
            Err(e) => format!("error={e}\n"),
        };
        if conn.write_all(answer.as_bytes()).is_err() {
            return;
        }
        let rest = read_to_end(&mut conn);
        let _ = conn.write_all(&rest);
        let _ = conn.shutdown(Shutdown::Write);
    });
    let lbd = Lbd::start(|l| {
        format!(
            "[[listeners]]\naddress = \"{l}\"\nprotocol = \"tcp\"\naccept_proxy = true\n\n{}",
            tcp_cluster(
                "behind",
                &format!("{{ address = \"{l}\" }}"),
                &[origin.addr],
                "send_proxy = true\n"
            )
        )
    });
    // A v1 line, then a v2 header (as a front load balancer would send them).
    let v1 = b"PROXY TCP4 203.0.113.7 198.51.100.1 4242 5432\r\n".to_vec();
    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x21\x00\x24".to_vec();
    v2.extend_from_slice(
        &"2001:db8::7"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    v2.extend_from_slice(
        &"2001:db8::1"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    v2.extend_from_slice(&4243u16.to_be_bytes());
    v2.extend_from_slice(&443u16.to_be_bytes());
    let cases = [
        (
            v1,
            "src=203.0.113.7:4242 dst=198.51.100.1:5432",
            "203.0.113.7:4242",
        ),
        (
            v2,
            "src=[2001:db8::7]:4243 dst=[2001:db8::1]:443",
            "[2001:db8::7]:4243",
        ),
    ];
    for (header, want, client) in cases {
        let mut c = connect(lbd.addr());
        c.write_all(&header).unwrap();
        c.write_all(b"payload").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let got = String::from_utf8(read_to_end(&mut c)).unwrap();
        assert_eq!(got, format!("{want}\npayload"));
        let lines = log_lines_of(&lbd, client.parse().unwrap());
        assert_eq!(lines.len(), 1, "one line for {client}");
        assert_eq!(
            field(&lines[0], "bytes_in"),
            Some((header.len() + 7).to_string().as_str())
        );
    }
    // No header: closed, nothing reaches the origin but the probe's header-less connection.
    let accepted = origin.accepted();
    let mut c = connect(lbd.addr());
    c.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(closed_by_peer(&mut c));
    let lines = log_lines_of(&lbd, c.local_addr().unwrap());
    assert_eq!(field(&lines[0], "status"), Some("400"));
    assert_eq!(origin.accepted(), accepted);
}

// ---- runtime changes ------------------------------------------------------------------------

/// Sends one command to lbd's command socket and returns its answer (Err: refused).
fn command(lbd: &Lbd, verb: lb_config::protocol::Verb) -> Result<(), String> {
    use lb_config::protocol::{encode, Decoder, Request, Response};
    let socket = lbd.dir().path().join("lbd.sock");
    let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&encode(&Request { id: 7, verb }).unwrap())
        .unwrap();
    let mut decoder = Decoder::<Response>::new();
    let mut buf = [0u8; 65536];
    loop {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "lbd closed the command connection without an answer");
        if let Some(answer) = decoder.feed(&buf[..n]).unwrap() {
            return answer.result.map(|_| ());
        }
    }
}

#[test]
fn backends_change_at_runtime() {
    let old = TcpOrigin::echo(b"old:");
    let new = TcpOrigin::echo(b"new:");
    let lbd = Lbd::start(|l| {
        format!(
            "{}{}",
            tcp_listener(l),
            tcp_cluster("db", &format!("{{ address = \"{l}\" }}"), &[old.addr], "")
        )
    });
    let mut established = connect(lbd.addr());
    let mut tag = [0u8; 4];
    established.read_exact(&mut tag).unwrap();
    assert_eq!(&tag, b"old:");

    command(
        &lbd,
        lb_config::protocol::Verb::Change(lb_config::state::Edit::AddBackend {
            cluster: "db".into(),
            backend: lb_config::state::BackendDef::new(new.addr.to_string()),
        }),
    )
    .unwrap();
    command(
        &lbd,
        lb_config::protocol::Verb::Change(lb_config::state::Edit::RemoveBackend {
            cluster: "db".into(),
            address: old.addr.to_string(),
        }),
    )
    .unwrap();
    let before = old.accepted();
    for _ in 0..3 {
        let mut c = connect(lbd.addr());
        c.write_all(b"x").unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        assert_eq!(read_to_end(&mut c), b"new:x");
    }
    assert_eq!(
        old.accepted(),
        before,
        "a removed backend got new connections"
    );
    // The connection made before the change still flows, both ways.
    established.write_all(b"still here").unwrap();
    established.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_end(&mut established), b"still here");
}
