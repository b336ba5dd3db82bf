//! What lbd main reads from a worker's channel, as pure functions over the bytes: the length
//! prefix of an answer frame, the verdict of an answer to a configuration or a command
//! (`ok`, `error: WHY`), the tagged answers (`metrics JSON`, `ejected JSON`) and their JSON.
//!
//! The socket side (deadlines, partial reads, closing a channel out of step) is `runtime.rs`'s
//! `recv_frame`; asking the workers and merging their figures is `observe.rs`'s. Nothing here
//! touches a socket, so the `worker_answers` fuzz target includes this file (and `metrics.rs`)
//! with `#[path]` and feeds it arbitrary frames, as a worker that is not ours any more could
//! send them.

use lb_config::protocol::Sample;

/// The largest frame main accepts from a worker.
pub(crate) const MAX_WORKER_FRAME: usize = 16 << 20;

/// The body length a frame's 4-byte prefix announces, if main takes a frame that long.
pub(crate) fn frame_len(prefix: [u8; 4]) -> Result<usize, String> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_WORKER_FRAME {
        return Err(format!("an answer of {len} bytes is too large"));
    }
    Ok(len)
}

/// A worker's answer to a configuration or a `log-level` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// `ok`.
    Done,
    /// `error: WHY`: the worker refused, and why.
    Refused(String),
    /// The late answer to an earlier question (`metrics ...`, `ejected ...`): skip it.
    Late,
    /// Anything else: the error to report.
    Unexpected(String),
}

/// Reads `body` as the answer to a configuration or a `log-level` command.
pub(crate) fn verdict(body: &[u8]) -> Verdict {
    if body.starts_with(b"metrics ") || body.starts_with(b"ejected ") {
        return Verdict::Late;
    }
    let body = String::from_utf8_lossy(body);
    match body.strip_prefix("error: ") {
        Some(why) => Verdict::Refused(why.to_string()),
        None if body == "ok" => Verdict::Done,
        None => Verdict::Unexpected(format!("unexpected answer from the worker: {body:?}")),
    }
}

/// A worker's frame read while main waits for an answer starting with a tag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Tagged<'a> {
    /// The awaited answer: what follows the tag.
    Found(&'a [u8]),
    /// An answer that came too late for its asker (`ok`, `error: ...`, another tagged one):
    /// skip it.
    Late,
    /// Anything else: the error to report.
    Unexpected(String),
}

/// Reads `body` while waiting for an answer that starts with `tag`.
pub(crate) fn tagged<'a>(body: &'a [u8], tag: &[u8]) -> Tagged<'a> {
    if let Some(rest) = body.strip_prefix(tag) {
        return Tagged::Found(rest);
    }
    let late = body == b"ok"
        || body.starts_with(b"error: ")
        || body.starts_with(b"metrics ")
        || body.starts_with(b"ejected ");
    if late {
        return Tagged::Late;
    }
    Tagged::Unexpected(format!("unexpected answer {:?}", head(body)))
}

/// The first 80 bytes of `body`, as text, for a log line.
pub(crate) fn head(body: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(body.get(..body.len().min(80)).unwrap_or_default())
}

/// The samples of a `metrics JSON` answer.
pub(crate) fn metrics(json: &[u8]) -> Result<Vec<Sample>, String> {
    serde_json::from_slice(json).map_err(|e| format!("bad metrics: {e}"))
}

/// The samples of worker `index` that main exports: those with Prometheus names (main does not
/// trust a worker to write its exposition), the `kakehi_worker_*` ones labelled with the
/// worker; and how many were left out.
pub(crate) fn worker_samples(samples: Vec<Sample>, index: usize) -> (Vec<Sample>, usize) {
    let count = samples.len();
    let kept: Vec<Sample> = samples
        .into_iter()
        .filter(crate::metrics::well_named)
        .map(|mut s| {
            if s.name.starts_with("kakehi_worker_") {
                s.labels.insert("worker".into(), index.to_string());
            }
            s
        })
        .collect();
    let left_out = count - kept.len();
    (kept, left_out)
}

/// The `[cluster, address]` pairs of an `ejected JSON` answer.
pub(crate) fn ejected(json: &[u8]) -> Result<Vec<(String, String)>, String> {
    serde_json::from_slice(json).map_err(|e| format!("bad answer: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        assert_eq!(verdict(b"ok"), Verdict::Done);
        assert_eq!(verdict(b"error: no"), Verdict::Refused("no".into()));
        assert_eq!(verdict(b"metrics []"), Verdict::Late);
        assert!(matches!(verdict(b"ok "), Verdict::Unexpected(_)));
        assert_eq!(frame_len([0, 0, 1, 0]), Ok(256));
        assert!(frame_len(u32::MAX.to_be_bytes()).is_err());
    }

    #[test]
    fn tagged_answers() {
        assert_eq!(tagged(b"metrics []", b"metrics "), Tagged::Found(b"[]"));
        assert_eq!(tagged(b"ejected []", b"metrics "), Tagged::Late);
        assert_eq!(tagged(b"ok", b"metrics "), Tagged::Late);
        assert!(matches!(
            tagged(b"\xff", b"metrics "),
            Tagged::Unexpected(_)
        ));
        let samples =
            metrics(br#"[{"name":"kakehi_worker_x","value":1},{"name":"a b","value":2}]"#).unwrap();
        let (kept, left_out) = worker_samples(samples, 3);
        assert_eq!(left_out, 1);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].labels.get("worker").map(String::as_str), Some("3"));
        assert_eq!(
            ejected(br#"[["app","127.0.0.1:1"]]"#),
            Ok(vec![("app".to_string(), "127.0.0.1:1".to_string())])
        );
    }
}
