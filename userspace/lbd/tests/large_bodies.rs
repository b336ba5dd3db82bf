//! Large bodies through a real `lbd` with bounded memory: 100 MiB streamed up (`/digest`, both
//! Content-Length and chunked) and down (`/bytes/N`, with a pause in the reading so that a
//! proxy that buffered instead of applying backpressure would grow), checked byte for byte,
//! while the resident memory of `lbd` and its worker processes is read from
//! `/proc/PID/status`. The assertion is on the peak RSS (`VmHWM`, added up over the processes), a
//! memory bound, never on a duration.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{
    holds_for, one_cluster, process_memory, process_tree, write_pattern, Client, Framing, Lbd,
    PatternCheck,
};
use lb_testkit::Origin;

const SIZE: u64 = 100 * 1024 * 1024;
/// The bound on lbd's peak resident memory while it moves 100 MiB.
const MAX_RSS_KIB: u64 = 64 * 1024;

/// The resident memory of `lbd` and its workers now, in KiB.
fn rss_now(pid: i32) -> u64 {
    process_tree(pid)
        .into_iter()
        .filter_map(process_memory)
        .map(|m| m.rss_kib)
        .sum()
}

/// Samples the VmRSS of lbd and its workers every few milliseconds; keeps the largest sum.
struct Sampler {
    stop: Arc<AtomicBool>,
    max_rss: Arc<AtomicU64>,
    handle: Option<thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: i32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let max_rss = Arc::new(AtomicU64::new(0));
        let (s, m) = (Arc::clone(&stop), Arc::clone(&max_rss));
        let handle = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                m.fetch_max(rss_now(pid), Ordering::Relaxed);
                thread::sleep(Duration::from_millis(10));
            }
        });
        Sampler {
            stop,
            max_rss,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
        self.max_rss.load(Ordering::Relaxed)
    }
}

fn assert_bounded(lbd: &Lbd, sampled_max_rss: u64, what: &str) {
    let mem = lbd.memory();
    eprintln!(
        "{what}: lbd and its workers ({:?}): VmHWM {} KiB, sampled max VmRSS {sampled_max_rss} KiB, VmRSS now {} KiB",
        lbd.pids(),
        mem.hwm_kib,
        mem.rss_kib
    );
    assert!(
        mem.hwm_kib < MAX_RSS_KIB && sampled_max_rss < MAX_RSS_KIB,
        "{what}: lbd's peak RSS {} KiB (sampled {sampled_max_rss} KiB) is over {MAX_RSS_KIB} KiB: \
         bodies must stream through fixed buffers",
        mem.hwm_kib
    );
}

#[test]
fn upload_100_mib_content_length() {
    let origin = Origin::start("o");
    let addr = origin.addr();
    let lbd = Lbd::start(|l| one_cluster("", l, &[addr]));
    let sampler = Sampler::start(lbd.pid());
    let mut c = Client::connect(lbd.addr());
    c.send(
        format!("POST /digest HTTP/1.1\r\nHost: localhost\r\nContent-Length: {SIZE}\r\n\r\n")
            .as_bytes(),
    );
    let fnv = write_pattern(&mut c.stream, SIZE).expect("upload");
    let resp = c.response();
    let max_rss = sampler.finish();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), format!("len={SIZE} fnv={fnv:016x}\n"));
    let reqs = origin.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].body_len, SIZE);
    assert_eq!(reqs[0].body_sha, fnv);
    assert_bounded(&lbd, max_rss, "100 MiB upload");
}

/// Frames every write as one chunk of the chunked transfer coding.
struct ChunkedWriter<'a, W: Write> {
    inner: &'a mut W,
}

impl<W: Write> Write for ChunkedWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut framed = Vec::with_capacity(buf.len() + 16);
        framed.extend_from_slice(format!("{:x}\r\n", buf.len()).as_bytes());
        framed.extend_from_slice(buf);
        framed.extend_from_slice(b"\r\n");
        self.inner.write_all(&framed)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[test]
fn upload_100_mib_chunked() {
    let origin = Origin::start("o");
    let addr = origin.addr();
    let lbd = Lbd::start(|l| one_cluster("", l, &[addr]));
    let sampler = Sampler::start(lbd.pid());
    let mut c = Client::connect(lbd.addr());
    c.send(b"POST /digest HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n");
    let fnv = write_pattern(
        &mut ChunkedWriter {
            inner: &mut c.stream,
        },
        SIZE,
    )
    .expect("upload");
    c.send(b"0\r\n\r\n");
    let resp = c.response();
    let max_rss = sampler.finish();
    assert_eq!(resp.status, 200);
    assert_eq!(resp.text(), format!("len={SIZE} fnv={fnv:016x}\n"));
    assert_bounded(&lbd, max_rss, "100 MiB chunked upload");
}

#[test]
fn download_100_mib_with_a_slow_reader() {
    let origin = Origin::start("o");
    let addr = origin.addr();
    let lbd = Lbd::start(|l| one_cluster("", l, &[addr]));
    let sampler = Sampler::start(lbd.pid());
    let mut c = Client::connect(lbd.addr());
    c.send(format!("GET /bytes/{SIZE} HTTP/1.1\r\nHost: localhost\r\n\r\n").as_bytes());
    let head = c.head();
    assert_eq!(head.status, 200);
    assert_eq!(Framing::of(&head, false), Framing::Length(SIZE));

    let mut check = PatternCheck::new();
    let mut buf = vec![0u8; 64 * 1024];
    // Read 8 MiB, then stop reading for a moment: a proxy without backpressure would keep
    // reading from the origin and hold the rest in memory.
    while check.len < 8 * 1024 * 1024 {
        let n = c.reader.read(&mut buf).expect("download");
        assert!(n > 0, "closed after {} bytes", check.len);
        check.update(&buf[..n]);
    }
    let pid = lbd.pid();
    let bounded_while_paused = holds_for(Duration::from_millis(500), || rss_now(pid) < MAX_RSS_KIB);
    common::read_body(&mut c.reader, Framing::Length(SIZE - check.len), &mut |b| {
        check.update(b)
    })
    .expect("download");
    let max_rss = sampler.finish();
    assert_eq!(check.len, SIZE);
    assert_eq!(
        check.first_mismatch, None,
        "the body differs from the origin's"
    );
    assert!(
        bounded_while_paused,
        "lbd's RSS went over {MAX_RSS_KIB} KiB while the client was not reading"
    );
    assert_bounded(&lbd, max_rss, "100 MiB download");
    // The connection is still good for another request.
    assert_eq!(c.get("localhost", "/after").status, 200);
}
