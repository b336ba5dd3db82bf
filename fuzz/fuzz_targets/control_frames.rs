//! Arbitrary bytes on a worker's channel from the supervisor, through the worker's own code:
//! `lb_proxy::control::next_frame` cuts them into frames and `Worker::answer_frames` acts on
//! each (a `\0` command: health, metrics, ejected, log-level...; anything else: a whole new
//! configuration, validated and applied to the running worker) and writes the answers, as
//! `serve_control` does between its socket reads and writes.
//!
//! The worker is a real one, made afresh for each input (so that a crash reproduces) from a
//! small config with one http listener (a socket bound once on 127.0.0.1:0, duplicated for each
//! worker, never accepted on), so configurations with one http listener are applied for real. Input: the first byte is the read size (0 means 1), the rest is the
//! stream, handed over in pieces of that size.
//!
//! Checks: no panic; after each piece no whole frame is left unanswered; each frame gets
//! exactly the answers it should (none for `health`, one for every other command and every
//! configuration); a length over the limit stops the channel; and every answer is read by lbd
//! main's own reader (`userspace/lbd/src/answers.rs`) as a verdict or a tagged answer whose
//! JSON decodes: the two ends agree on whatever the worker says.
#![no_main]

use lb_proxy::control::{next_frame, Frame};
use lb_proxy::worker::Worker;
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

#[allow(dead_code)]
#[path = "shared/config_files.rs"]
mod config_files;
use config_files::{reads_only_allowed_files, source};

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

/// How many answers the worker owes for `frame`.
fn answers_owed(frame: Frame<'_>) -> usize {
    match frame {
        Frame::Config(_) => 1,
        Frame::Command(body) => {
            let text = String::from_utf8_lossy(body);
            let word = text.split_once(' ').map_or(&*text, |(word, _)| word);
            usize::from(word != "health")
        }
    }
}

/// Checks every answer frame in `out` as lbd main reads it; returns how many there were.
fn check_answers(out: &[u8]) -> usize {
    let mut rest = out;
    let mut count = 0;
    while !rest.is_empty() {
        let Some((prefix, after)) = rest.split_first_chunk::<4>() else {
            panic!("half a length prefix in the worker's answers: {rest:?}");
        };
        let len = match answers::frame_len(*prefix) {
            Ok(len) => len,
            Err(e) => panic!("lbd refuses the worker's answer: {e}"),
        };
        let Some((body, after)) = after.split_at_checked(len) else {
            panic!("an answer frame longer than what the worker wrote");
        };
        rest = after;
        count += 1;
        for (tag, decodes) in [
            (
                &b"metrics "[..],
                answers::metrics(body.get(8..).unwrap_or_default()).is_ok(),
            ),
            (
                &b"ejected "[..],
                answers::ejected(body.get(8..).unwrap_or_default()).is_ok(),
            ),
        ] {
            if body.starts_with(tag) {
                assert!(
                    matches!(answers::tagged(body, tag), answers::Tagged::Found(_)),
                    "lbd does not find its tag in {:?}",
                    answers::head(body)
                );
                assert!(decodes, "lbd cannot decode {:?}", answers::head(body));
            }
        }
        if !body.starts_with(b"metrics ") && !body.starts_with(b"ejected ") {
            assert!(
                matches!(
                    answers::verdict(body),
                    answers::Verdict::Done | answers::Verdict::Refused(_)
                ),
                "lbd reads {:?} as {:?}",
                answers::head(body),
                answers::verdict(body)
            );
        }
    }
    count
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    // Configuration frames go to the validator: no file but the examples' certificates.
    if !reads_only_allowed_files(&String::from_utf8_lossy(stream)) {
        return;
    }
    let chunk = usize::from(chunk).max(1);
    let mut worker = new_worker();
    let mut inbuf = Vec::new();
    for piece in stream.chunks(chunk) {
        inbuf.extend_from_slice(piece);
        // What the worker owes for the whole frames it has now.
        let mut owed = 0;
        let mut at = 0;
        let mut too_large = false;
        loop {
            match next_frame(&inbuf[at..]) {
                Ok(Some((frame, len))) => {
                    owed += answers_owed(frame);
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
        let result = worker.answer_frames(&mut inbuf, source(), &mut out);
        assert_eq!(result.is_err(), too_large, "{result:?}");
        assert_eq!(check_answers(&out), owed, "answers for the frames taken");
        if too_large {
            return;
        }
        assert!(
            matches!(next_frame(&inbuf), Ok(None)),
            "a whole frame left unanswered"
        );
    }
});
