//! Arbitrary bytes on a worker's channel, read by lbd main as it reads a worker's answers:
//! `userspace/lbd/src/answers.rs` (included with `#[path]`, with `metrics.rs` which it uses)
//! cuts frames with the shared codec (`lb_config::protocol::frame`) and reads each as the
//! typed answer main waits for (by request id), a late one, or an unreadable one; the samples
//! of a metrics answer then go through the same filter, labelling, merging and rendering as a
//! scrape of `/metrics`.
//!
//! The worker may not be ours any more (a compromised worker, or one of an older binary), so
//! main must not trust it. Checks: no panic; the inbox reads the frames the codec cuts, and
//! each as what the decoder says (ours only with the awaited id, late only with another); a
//! length over the limit stops reading for good (main closes such a channel); and the
//! Prometheus text rendered from whatever samples the worker sent is well-formed: every line
//! is a `# HELP`, a `# TYPE` or one sample with valid metric and label names, escaped label
//! values and a number, one line per sample kept (so a worker cannot forge lines or families).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../userspace/lbd/src/answers.rs"]
mod answers;
#[allow(dead_code)]
#[path = "../../userspace/lbd/src/metrics.rs"]
mod metrics;

use answers::Heard;
use lb_config::protocol::channel::{self, Answer, Reply};

/// The index main gives the worker (it labels the `kakehi_worker_*` samples with it).
const WORKER: usize = 3;
/// The request main waits for the answer to.
const WAITING: u64 = 3;

fn metric_name(name: &str, colon: bool) -> bool {
    let mut chars = name.chars();
    let ok = |c: char, first: bool| {
        c.is_ascii_alphabetic() || c == '_' || (colon && c == ':') || (!first && c.is_ascii_digit())
    };
    chars.next().is_some_and(|c| ok(c, true)) && chars.all(|c| ok(c, false))
}

/// Checks one sample line of the text format; panics with the line if it is not one.
fn check_sample_line(line: &str) {
    let fail = |why: &str| -> ! { panic!("{why} in the exposition line {line:?}") };
    let name_end = line.find(['{', ' ']).unwrap_or_else(|| fail("no value"));
    if !metric_name(&line[..name_end], true) {
        fail("bad metric name");
    }
    let mut rest = &line[name_end..];
    if let Some(labels) = rest.strip_prefix('{') {
        rest = labels;
        loop {
            let eq = rest.find('=').unwrap_or_else(|| fail("label without ="));
            if !metric_name(&rest[..eq], false) {
                fail("bad label name");
            }
            rest = rest[eq + 1..]
                .strip_prefix('"')
                .unwrap_or_else(|| fail("unquoted label value"));
            let mut chars = rest.char_indices();
            let close = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, '\\' | '"' | 'n')) => {}
                        _ => fail("bad escape"),
                    },
                    Some((i, '"')) => break i,
                    Some(_) => {}
                    None => fail("unterminated label value"),
                }
            };
            rest = &rest[close + 1..];
            if let Some(more) = rest.strip_prefix(',') {
                rest = more;
            } else if let Some(end) = rest.strip_prefix('}') {
                rest = end;
                break;
            } else {
                fail("no , or } after a label");
            }
        }
    }
    let value = rest.strip_prefix(' ').unwrap_or_else(|| fail("no space"));
    let number = matches!(value, "NaN" | "+Inf" | "-Inf") || value.parse::<f64>().is_ok();
    if !number {
        fail("bad value");
    }
}

/// Checks a whole exposition; returns its number of sample lines.
fn check_exposition(text: &str) -> usize {
    assert!(text.is_empty() || text.ends_with('\n'), "no final newline");
    let mut samples = 0;
    for line in text.lines() {
        if let Some(help) = line.strip_prefix("# HELP ") {
            let name = help.split(' ').next().unwrap_or_default();
            assert!(metric_name(name, true), "bad HELP line {line:?}");
        } else if let Some(kind) = line.strip_prefix("# TYPE ") {
            let mut words = kind.split(' ');
            let name = words.next().unwrap_or_default();
            assert!(metric_name(name, true), "bad TYPE line {line:?}");
            assert!(
                matches!(words.next(), Some("counter" | "gauge" | "histogram"))
                    && words.next().is_none(),
                "bad TYPE line {line:?}"
            );
        } else {
            check_sample_line(line);
            samples += 1;
        }
    }
    samples
}

fuzz_target!(|data: &[u8]| {
    let mut inbox = answers::Inbox::default();
    inbox.push(data);
    let mut merged = metrics::Merged::default();
    // Bodies cut by the codec itself, to compare with what the inbox reads.
    let mut at = 0;
    loop {
        let heard = match inbox.pop(Some(WAITING)) {
            Ok(Some(heard)) => heard,
            Ok(None) => break, // Main would wait for the rest, then time out.
            Err(_) => {
                // Main closes the channel: nothing after it is read.
                assert!(
                    inbox.pop(Some(WAITING)).is_err(),
                    "a refused stream goes on"
                );
                break;
            }
        };
        let Ok(Some((body, len))) =
            lb_config::protocol::frame::cut(&data[at..], answers::MAX_WORKER_FRAME)
        else {
            panic!("the inbox read a frame the codec does not cut");
        };
        at += len;
        let decoded = channel::decode::<Answer>(body);
        let reply = match (heard, decoded) {
            (Heard::Ours(reply), Ok(answer)) => {
                assert_eq!(answer.id, WAITING);
                assert_eq!(answer.reply, reply);
                reply
            }
            (Heard::Late { id }, Ok(answer)) => {
                assert_ne!(id, WAITING);
                assert_eq!(answer.id, id);
                answer.reply
            }
            (Heard::Unreadable(e), Err(again)) => {
                assert_eq!(e, again);
                continue;
            }
            (heard, decoded) => panic!("the inbox reads {heard:?}, the codec {decoded:?}"),
        };
        if let Reply::Metrics { samples } = reply {
            let count = samples.len();
            let (kept, left_out) = answers::worker_samples(samples, WORKER);
            assert_eq!(kept.len() + left_out, count);
            for s in &kept {
                assert!(metrics::well_named(s), "kept {s:?}");
                if s.name.starts_with("kakehi_worker_") {
                    assert_eq!(s.labels.get("worker"), Some(&WORKER.to_string()));
                }
            }
            // One worker's samples alone, then (below) merged with the earlier answers'.
            let text = metrics::render(&kept);
            assert_eq!(check_exposition(&text), kept.len(), "{text}");
            merged.add(kept);
        }
    }
    let samples = merged.into_samples();
    let text = metrics::render(&samples);
    assert_eq!(check_exposition(&text), samples.len(), "{text}");
});
