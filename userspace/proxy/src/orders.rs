//! The worker's side of the channel from the supervisor: the orders other than a new
//! configuration, and the cutting of the channel's bytes into requests.
//!
//! The messages, their ids and the frame codec are `lb_config::protocol::channel` and
//! `lb_config::protocol::frame`, which lbd main imports too: this file only acts on them.
//!
//! - [`Order::Health`]: the backends the supervisor's active checks found down (the whole set
//!   each time). No answer: the supervisor sends it whenever the set changes and to every new
//!   worker, without waiting.
//! - [`Order::Metrics`]: answered [`Reply::Metrics`], the worker's samples (see `stats.rs`).
//! - [`Order::Ejected`]: answered [`Reply::Ejected`], the backends this worker keeps out of
//!   rotation after consecutive errors (passive health), for `lbctl status`.
//! - [`Order::LogLevel`]: answered [`Reply::Done`] or [`Reply::Refused`], like a
//!   configuration ([`Order::Configure`], which the worker's loop applies: `worker.rs`).
//!
//! A frame that is not a request of this version is answered [`Reply::Refused`] and changes
//! nothing. [`next_frame`] cuts the channel's bytes into requests, sans-io; the worker's
//! `Worker::answer_frames` acts on them and writes the answers, which is what the
//! `control_frames` fuzz target drives without a socket.

use crate::balancer::ClusterState;
use crate::cx::Cx;
use lb_config::protocol::channel::{self, Answer, ChannelError, Order, Reply, Request};
use lb_config::protocol::frame;
use std::net::SocketAddr;

/// Largest frame the control channel accepts (a configuration).
pub const MAX_CONTROL_FRAME: usize = channel::MAX_FRAME;

/// A length prefix over [`MAX_CONTROL_FRAME`]: the channel is out of step, close it.
pub type FrameTooLarge = frame::TooLarge;

/// One frame from the supervisor: the request it holds, or why it holds none.
pub type Frame = Result<Request, ChannelError>;

/// The first frame of `input` and how many bytes it takes (its length prefix included), or
/// None while the frame is not all there.
pub fn next_frame(input: &[u8]) -> Result<Option<(Frame, usize)>, FrameTooLarge> {
    Ok(frame::cut(input, MAX_CONTROL_FRAME)?
        .map(|(body, len)| (channel::decode::<Request>(body), len)))
}

/// Acts on one order other than a configuration; the reply to send back, if any.
pub fn command(cx: &mut Cx, live: usize, order: Order) -> Option<Reply> {
    match order {
        Order::Health { down } => {
            cx.down = down;
            apply_down(&mut cx.clusters, &cx.down);
            None
        }
        Order::Metrics => Some(Reply::Metrics {
            samples: cx
                .stats
                .samples(&cx.clusters, live, (cx.pool.in_use(), cx.pool.capacity())),
        }),
        Order::Ejected => Some(Reply::Ejected {
            backends: cx
                .clusters
                .iter()
                .flat_map(|c| {
                    c.backends
                        .iter()
                        .filter(|b| b.is_ejected())
                        .map(|b| (c.name.clone(), b.address))
                })
                .collect(),
        }),
        Order::LogLevel { level } => Some(match level.trim().parse::<log::LevelFilter>() {
            Ok(filter) => {
                log::set_max_level(filter);
                Reply::Done
            }
            Err(_) => Reply::Refused {
                error: format!("unknown log level {level:?}"),
            },
        }),
        Order::Configure { .. } => Some(Reply::Refused {
            error: "internal: a configuration reached the command handler".into(),
        }),
    }
}

/// The reply to a frame that holds no request of this version, and the id to answer it with.
pub fn refusal(e: &ChannelError) -> (u64, Option<Reply>) {
    log::warn!("control channel: refused a frame: {e}");
    let error = format!("refused: {e}");
    (e.id().unwrap_or(0), Some(Reply::Refused { error }))
}

/// Appends the answer `reply` to request `id` to `out`, as a frame; an answer too large for a
/// frame becomes a refusal saying so.
pub fn answer(out: &mut Vec<u8>, id: u64, reply: Reply) {
    let encoded = channel::encode(&Answer { id, reply }).or_else(|e| {
        let error = format!("the answer cannot be sent: {e}");
        channel::encode(&Answer {
            id,
            reply: Reply::Refused { error },
        })
    });
    match encoded {
        Ok(frame) => out.extend_from_slice(&frame),
        Err(e) => log::error!("control channel: cannot answer request {id}: {e}"),
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
    use lb_config::protocol::channel::encode;

    #[test]
    fn frames_are_cut_at_their_length() {
        let metrics = Request {
            id: 1,
            order: Order::Metrics,
        };
        let mut wire = encode(&metrics).unwrap();
        let first = wire.len();
        wire.extend_from_slice(&4u32.to_be_bytes());
        wire.extend_from_slice(b"\0bad");
        assert_eq!(next_frame(&wire), Ok(Some((Ok(metrics), first))));
        let (refused, len) = next_frame(&wire[first..]).unwrap().unwrap();
        assert_eq!(len, 8);
        assert!(matches!(refused, Err(ChannelError::Version { found: 0 })));
        for cut in 0..first {
            assert_eq!(next_frame(&wire[..cut]), Ok(None), "cut {cut}");
        }
        assert_eq!(
            next_frame(&0u32.to_be_bytes()),
            Ok(Some((Err(ChannelError::Empty), 4)))
        );
        let len = MAX_CONTROL_FRAME as u32 + 1;
        assert_eq!(
            next_frame(&len.to_be_bytes()),
            Err(FrameTooLarge {
                len: u64::from(len),
                max: MAX_CONTROL_FRAME
            })
        );
    }
}
