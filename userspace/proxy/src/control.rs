//! Commands from the supervisor other than a new configuration, on the worker's channel.
//!
//! The channel carries u32-BE-length frames (see `worker.rs`). A configuration frame is TOML
//! text, which never holds a NUL byte; a command frame starts with one, then a word:
//!
//! - `\0health JSON`: the backends the supervisor's active checks found down, as a JSON list
//!   of `[cluster, address]` pairs (the whole set each time). No answer: the supervisor sends
//!   it whenever the set changes and to every new worker, without waiting.
//! - `\0metrics`: answered with `metrics JSON`, the worker's samples (see `stats.rs`).
//! - `\0ejected`: answered with `ejected JSON`, the `[cluster, address]` pairs this worker
//!   keeps out of rotation after consecutive errors (passive health), for `lbctl status`.
//! - `\0log-level LEVEL`: answered `ok` or `error: WHY`, like a configuration.
//!
//! An unknown command is answered `error: ...` (both ends are the same binary, so this is a
//! bug, not an old peer).
//!
//! [`next_frame`] cuts the channel's bytes into frames, sans-io; the worker's
//! `Worker::answer_frames` acts on them and writes the answers, which is what the
//! `control_frames` fuzz target drives without a socket.

use crate::balancer::ClusterState;
use crate::cx::Cx;
use std::net::SocketAddr;

/// Largest frame the control channel accepts (a configuration).
pub const MAX_CONTROL_FRAME: usize = 16 << 20;

/// One frame from the supervisor, without its length prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A `\0` command (the NUL stripped): see [`command`].
    Command(&'a [u8]),
    /// A whole new configuration (TOML text).
    Config(&'a [u8]),
}

/// A length prefix over [`MAX_CONTROL_FRAME`]: the channel is out of step, close it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a control frame of {len} bytes is over the limit of {MAX_CONTROL_FRAME}")]
pub struct FrameTooLarge {
    pub len: usize,
}

/// The first frame of `input` and how many bytes it takes (its length prefix included), or
/// None while the frame is not all there.
pub fn next_frame(input: &[u8]) -> Result<Option<(Frame<'_>, usize)>, FrameTooLarge> {
    let Some(&[a, b, c, d]) = input.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    if len > MAX_CONTROL_FRAME {
        return Err(FrameTooLarge { len });
    }
    let Some(body) = input.get(4..4 + len) else {
        return Ok(None);
    };
    let frame = match body.strip_prefix(b"\0") {
        Some(command) => Frame::Command(command),
        None => Frame::Config(body),
    };
    Ok(Some((frame, 4 + len)))
}

/// Acts on one command frame (without its NUL); the answer to send back, if any.
pub fn command(cx: &mut Cx, live: usize, body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let (word, rest) = text.split_once(' ').unwrap_or((&text, ""));
    match word {
        "health" => {
            match serde_json::from_str::<Vec<(String, SocketAddr)>>(rest) {
                Ok(down) => {
                    cx.down = down;
                    apply_down(&mut cx.clusters, &cx.down);
                }
                Err(e) => log::error!("health update refused: {e}"),
            }
            None
        }
        "metrics" => {
            let samples =
                cx.stats
                    .samples(&cx.clusters, live, (cx.pool.in_use(), cx.pool.capacity()));
            Some(match serde_json::to_string(&samples) {
                Ok(json) => format!("metrics {json}"),
                Err(e) => format!("error: cannot encode the metrics: {e}"),
            })
        }
        "ejected" => {
            let ejected: Vec<(&str, SocketAddr)> = cx
                .clusters
                .iter()
                .flat_map(|c| {
                    c.backends
                        .iter()
                        .filter(|b| b.is_ejected())
                        .map(|b| (c.name.as_str(), b.address))
                })
                .collect();
            Some(match serde_json::to_string(&ejected) {
                Ok(json) => format!("ejected {json}"),
                Err(e) => format!("error: cannot encode the ejected backends: {e}"),
            })
        }
        "log-level" => Some(match rest.trim().parse::<log::LevelFilter>() {
            Ok(level) => {
                log::set_max_level(level);
                "ok".to_string()
            }
            Err(_) => format!("error: unknown log level {rest:?}"),
        }),
        other => Some(format!("error: unknown command {other:?}")),
    }
}

/// Marks, in every cluster, the backends of `down` as down and the others as up.
pub fn apply_down(clusters: &mut [ClusterState], down: &[(String, SocketAddr)]) {
    for c in clusters {
        let addresses: Vec<SocketAddr> = down
            .iter()
            .filter(|(name, _)| *name == c.name)
            .map(|(_, a)| *a)
            .collect();
        c.set_down(&addresses);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_cut_at_their_length() {
        let mut wire = 7u32.to_be_bytes().to_vec();
        wire.extend_from_slice(b"\0health");
        wire.extend_from_slice(&3u32.to_be_bytes());
        wire.extend_from_slice(b"a=1");
        assert_eq!(next_frame(&wire), Ok(Some((Frame::Command(b"health"), 11))));
        assert_eq!(
            next_frame(&wire[11..]),
            Ok(Some((Frame::Config(b"a=1"), 7)))
        );
        for cut in 0..11 {
            assert_eq!(next_frame(&wire[..cut]), Ok(None), "cut {cut}");
        }
        assert_eq!(
            next_frame(&0u32.to_be_bytes()),
            Ok(Some((Frame::Config(b""), 4)))
        );
        let len = MAX_CONTROL_FRAME as u32 + 1;
        assert_eq!(
            next_frame(&len.to_be_bytes()),
            Err(FrameTooLarge { len: len as usize })
        );
    }
}
