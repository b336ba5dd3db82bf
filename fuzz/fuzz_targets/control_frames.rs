//! Arbitrary bytes on a worker's channel from the supervisor, through the worker's own code:
//! `lb_proxy::orders::next_frame` cuts them into frames and decodes each as a typed request
//! (`lb_config::protocol::channel`), and `Worker::answer_frames` acts on each (health, metrics,
//! ejected, log-level, or a whole new configuration, checked by main and applied to the
//! running worker as it is; a frame that is no request is refused) and writes the answers, as `serve_control`
//! does between its socket reads and writes.
//!
//! The worker is a real one, made afresh for each input (so that a crash reproduces) from a
//! small config with one http listener (a socket bound once on 127.0.0.1:0, duplicated for each
//! worker, never accepted on), so configurations with one http listener are applied for real. Input: the first byte is the read size (0 means 1), the rest is the
//! stream, handed over in pieces of that size.
//!
//! Checks: no panic; after each piece no whole frame is left unanswered; each frame gets
//! exactly the answers it should (none for a `health` request, one for every other frame),
//! in order, each carrying its request's id (0 for a frame too broken to carry one); a length
//! over the limit stops the channel; and every answer is read by lbd main's own reader
//! (`userspace/lbd/src/answers.rs`) as the answer to that id, with the reply its request asks
//! for (or a refusal): the two ends agree on whatever the worker says.
#![no_main]

use lb_config::protocol::channel::{Order, Reply};
use lb_proxy::orders::{next_frame, Frame};
use lb_proxy::worker::Worker;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

#[allow(dead_code)]
#[path = "shared/config_files.rs"]
mod config_files;
use config_files::source;

// lbd main's reader of worker answers, and what it uses.
#[allow(dead_code)]
#[path = "../../userspace/lbd/src/answers.rs"]
mod answers;
#[allow(dead_code)]
#[path = "../../userspace/lbd/src/metrics.rs"]
mod metrics;

/// The worker's first configuration (its listener is bound on port 0 whatever it says).
const BASE: &str = r#"
workers = 1
steering = "kernel"
access_log = { target = "off" }

[[listeners]]
address = "127.0.0.1:18080"

[clusters.app]
frontends = [ { address = "127.0.0.1:18080", hostname = "a.example" } ]
backends = [ { address = "127.0.0.1:19001" }, { address = "127.0.0.1:19002" } ]
"#;

fn new_worker() -> Worker {
    static BASE_CONFIG: OnceLock<(lb_config::Config, std::net::TcpListener)> = OnceLock::new();
    let (config, listener) = BASE_CONFIG.get_or_init(|| {
        let config = match lb_config::parse_str(BASE, source()) {
            Ok(config) => config,
            Err(e) => panic!("the fuzz target's base config is refused: {e}"),
        };
        match std::net::TcpListener::bind("127.0.0.1:0") {
            Ok(listener) => (config, listener),
            Err(e) => panic!("cannot bind the worker's listener: {e}"),
        }
    });
    let listener = match listener.try_clone() {
        Ok(listener) => listener,
        Err(e) => panic!("cannot duplicate the worker's listener: {e}"),
    };
    match Worker::new(config, vec![(0, listener)]) {
        Ok(worker) => worker,
        Err(e) => panic!("cannot make the worker: {e}"),
    }
}

/// The answer the worker owes for `frame`, if any: the id it must carry and the reply kinds
/// it may be.
fn answer_owed(frame: &Frame) -> Option<(u64, &'static [&'static str])> {
    match frame {
        Ok(request) => {
            let kinds: &'static [&'static str] = match request.order {
                Order::Health { .. } => return None,
                Order::Configure { .. } | Order::LogLevel { .. } => &["done", "refused"],
                Order::Metrics => &["metrics", "refused"],
                Order::Ejected => &["ejected", "refused"],
            };
            Some((request.id, kinds))
        }
        Err(e) => Some((e.id().unwrap_or(0), &["refused"])),
    }
}

fn kind(reply: &Reply) -> &'static str {
    match reply {
        Reply::Done => "done",
        Reply::Refused { .. } => "refused",
        Reply::Metrics { .. } => "metrics",
        Reply::Ejected { .. } => "ejected",
    }
}

/// Checks every answer frame in `out` as lbd main reads it, against what was owed, in order.
fn check_answers(out: &[u8], owed: &[(u64, &'static [&'static str])]) {
    let mut inbox = answers::Inbox::default();
    inbox.push(out);
    let mut count = 0;
    loop {
        let waiting = owed.get(count).map(|(id, _)| *id);
        let heard = match inbox.pop(waiting) {
            Ok(Some(heard)) => heard,
            Ok(None) => break,
            Err(e) => panic!("lbd refuses the worker's answers: {e}"),
        };
        let Some((id, kinds)) = owed.get(count) else {
            panic!("an answer nobody asked for: {heard:?}");
        };
        match heard {
            answers::Heard::Ours(reply) => {
                assert!(
                    kinds.contains(&kind(&reply)),
                    "request {id} answered {reply:?}"
                );
                if let Reply::Metrics { samples } = reply {
                    let count = samples.len();
                    let (kept, left_out) = answers::worker_samples(samples, 0);
                    assert_eq!(kept.len() + left_out, count);
                }
            }
            other => panic!("lbd does not read the answer to request {id}: {other:?}"),
        }
        count += 1;
    }
    assert_eq!(inbox.buffered(), 0, "half an answer frame");
    assert_eq!(count, owed.len(), "answers for the frames taken");
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut worker = new_worker();
    let mut inbuf = Vec::new();
    for piece in stream.chunks(chunk) {
        inbuf.extend_from_slice(piece);
        // What the worker owes for the whole frames it has now.
        let mut owed = Vec::new();
        let mut at = 0;
        let mut too_large = false;
        loop {
            match next_frame(&inbuf[at..]) {
                Ok(Some((frame, len))) => {
                    owed.extend(answer_owed(&frame));
                    at += len;
                }
                Ok(None) => break,
                Err(_) => {
                    too_large = true;
                    break;
                }
            }
        }
        let mut out = Vec::new();
        let result = worker.answer_frames(&mut inbuf, &mut out);
        assert_eq!(result.is_err(), too_large, "{result:?}");
        check_answers(&out, &owed);
        if too_large {
            return;
        }
        assert!(
            matches!(next_frame(&inbuf), Ok(None)),
            "a whole frame left unanswered"
        );
    }
});
