//! Arbitrary bytes on a worker's channel, read by lbd main as it reads a worker's answers:
//! `userspace/lbd/src/answers.rs` (included with `#[path]`, with `metrics.rs` which it uses)
//! cuts frames by their length prefix and reads each as a verdict (`ok`, `error: WHY`), a
//! tagged answer (`metrics JSON`, `ejected JSON`) or a late one, and the metrics JSON then goes
//! through the same filter, labelling, merging and rendering as a scrape of `/metrics`.
//!
//! The worker may not be ours any more (a compromised worker, or one of an older binary), so
//! main must not trust it. Checks: no panic; the verdicts are exactly what the words say; a
//! length over the limit stops reading (main closes such a channel); and the Prometheus text
//! rendered from whatever samples the worker sent is well-formed: every line is a `# HELP`,
//! a `# TYPE` or one sample with valid metric and label names, escaped label values and a
//! number, one line per sample kept (so a worker cannot forge lines or families).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../userspace/lbd/src/answers.rs"]
mod answers;
#[allow(dead_code)]
#[path = "../../userspace/lbd/src/metrics.rs"]
mod metrics;

use answers::{Tagged, Verdict};

/// The index main gives the worker (it labels the `kakehi_worker_*` samples with it).
const WORKER: usize = 3;

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
    let mut rest = data;
    let mut merged = metrics::Merged::default();
    while let Some((prefix, after)) = rest.split_first_chunk::<4>() {
        let Ok(len) = answers::frame_len(*prefix) else {
            // Main closes the channel: nothing after it is read.
            break;
        };
        let Some((body, after)) = after.split_at_checked(len) else {
            break; // Main would wait for the rest, then time out.
        };
        rest = after;

        let tagged_answer = body.starts_with(b"metrics ") || body.starts_with(b"ejected ");
        match answers::verdict(body) {
            Verdict::Done => assert_eq!(body, b"ok"),
            Verdict::Refused(why) => {
                assert!(!tagged_answer && body.starts_with(b"error: "));
                assert_eq!(why, String::from_utf8_lossy(&body[7..]));
            }
            Verdict::Late => assert!(tagged_answer),
            Verdict::Unexpected(_) => {
                assert!(!tagged_answer && body != b"ok" && !body.starts_with(b"error: "));
            }
        }
        match answers::tagged(body, b"ejected ") {
            Tagged::Found(json) => {
                assert_eq!(json, &body[8..]);
                let _ = answers::ejected(json);
            }
            Tagged::Late => {}
            // At most 80 bytes of the answer, each escaped to at most 10 characters.
            Tagged::Unexpected(why) => assert!(why.len() < 900, "a log line of {}", why.len()),
        }
        if let Tagged::Found(json) = answers::tagged(body, b"metrics ") {
            let Ok(samples) = answers::metrics(json) else {
                continue;
            };
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
