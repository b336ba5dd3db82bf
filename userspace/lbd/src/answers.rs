//! What lbd main reads from a worker's channel, as pure functions over the bytes: the frames
//! of the channel's stream ([`Inbox`]), which answer is the one main waits for (by request id;
//! any other is the late answer to a request main gave up on), and the samples of a metrics
//! answer that main exports.
//!
//! The messages and the frame codec are `lb_config::protocol::channel` and `::frame`, which the
//! worker imports too. The socket side (deadlines, reading several workers at once, closing a
//! channel out of step) is `channel.rs`'s. Nothing here touches a socket, so the
//! `worker_answers` fuzz target includes this file (and `metrics.rs`) with `#[path]` and feeds
//! it arbitrary bytes, as a worker that is not ours any more could send them.

use lb_config::protocol::channel::{self, Answer, ChannelError, Reply};
use lb_config::protocol::frame::{Frames, FramesError};
use lb_config::protocol::Sample;

/// The largest frame main accepts from a worker.
pub(crate) const MAX_WORKER_FRAME: usize = channel::MAX_FRAME;

/// One frame read from a worker, while main waits for the answer to request `waiting`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Heard {
    /// The answer main waits for.
    Ours(Reply),
    /// The answer to another request (main gave up on it): skip it.
    Late { id: u64 },
    /// Not an answer of this channel's version: the error to report.
    Unreadable(ChannelError),
}

/// Reads one frame's body while main waits for the answer to request `waiting` (None: main
/// waits for nothing, every answer is late).
pub(crate) fn hear(body: &[u8], waiting: Option<u64>) -> Heard {
    match channel::decode::<Answer>(body) {
        Ok(answer) if Some(answer.id) == waiting => Heard::Ours(answer.reply),
        Ok(answer) => Heard::Late { id: answer.id },
        Err(e) => Heard::Unreadable(e),
    }
}

/// The bytes a worker sent and main has not read as frames yet: at most one frame's worth
/// beyond the last read, kept from one request to the next, so that an answer that arrives in
/// pieces, or after main stopped waiting for it, never puts the stream out of step.
pub(crate) struct Inbox {
    frames: Frames,
}

impl Default for Inbox {
    fn default() -> Self {
        Inbox {
            frames: Frames::new(MAX_WORKER_FRAME),
        }
    }
}

impl Inbox {
    /// Appends bytes read from the channel.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.frames.push(bytes);
    }

    /// The next whole frame, read while main waits for `waiting`. An error means the stream
    /// is out of step for good (a length over the limit): the channel must be closed.
    pub(crate) fn pop(&mut self, waiting: Option<u64>) -> Result<Option<Heard>, FramesError> {
        Ok(self.frames.pop()?.map(|body| hear(&body, waiting)))
    }

    /// Bytes received and not yet part of a whole frame (for the tests and the fuzz targets).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn buffered(&self) -> usize {
        self.frames.buffered()
    }

    /// Whether a length over the limit was read: the stream is out of step for good.
    pub(crate) fn is_broken(&self) -> bool {
        self.frames.is_broken()
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use lb_config::protocol::channel::encode;

    fn answer(id: u64, reply: Reply) -> Vec<u8> {
        encode(&Answer { id, reply }).unwrap()
    }

    #[test]
    fn the_awaited_answer_is_found_by_id_and_others_are_late() {
        let mut inbox = Inbox::default();
        let mut wire = answer(1, Reply::Done);
        wire.extend(answer(2, Reply::Refused { error: "no".into() }));
        wire.extend(answer(3, Reply::Metrics { samples: vec![] }));
        inbox.push(&wire[..wire.len() - 1]);
        assert_eq!(inbox.pop(Some(2)).unwrap(), Some(Heard::Late { id: 1 }));
        assert_eq!(
            inbox.pop(Some(2)).unwrap(),
            Some(Heard::Ours(Reply::Refused { error: "no".into() }))
        );
        assert_eq!(inbox.pop(Some(3)).unwrap(), None, "half a frame waits");
        inbox.push(&wire[wire.len() - 1..]);
        assert_eq!(
            inbox.pop(Some(3)).unwrap(),
            Some(Heard::Ours(Reply::Metrics { samples: vec![] }))
        );
        assert_eq!(inbox.buffered(), 0);
        assert_eq!(
            hear(&answer(5, Reply::Done)[4..], None),
            Heard::Late { id: 5 }
        );
        // The old string protocol's answers are not misread.
        assert!(matches!(hear(b"ok", Some(1)), Heard::Unreadable(_)));
        assert!(matches!(hear(b"\x01{", Some(1)), Heard::Unreadable(_)));
        inbox.push(&u32::MAX.to_be_bytes());
        assert!(inbox.pop(Some(4)).is_err());
        assert!(inbox.pop(Some(4)).is_err(), "for good");
    }

    #[test]
    fn worker_samples_keep_prometheus_names_and_label_the_worker() {
        let samples: Vec<Sample> = serde_json::from_str(
            r#"[{"name":"kakehi_worker_x","value":1},{"name":"a b","value":2}]"#,
        )
        .unwrap();
        let (kept, left_out) = worker_samples(samples, 3);
        assert_eq!(left_out, 1);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].labels.get("worker").map(String::as_str), Some("3"));
    }
}
