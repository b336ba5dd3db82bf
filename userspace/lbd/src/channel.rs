//! lbd main's end of a worker's channel: sending a request (numbered, framed, whole within a
//! deadline) and reading the answers of several workers at once, by request id.
//!
//! The messages and the codec are `lb_config::protocol::channel` and `::frame`; reading the
//! frames and matching ids is `answers.rs`'s, sans-io. This file owns the socket: writes are
//! blocking with a deadline ([`CHANNEL_WRITE_TIMEOUT`]), reads never block (`MSG_DONTWAIT`,
//! after a `poll` over every channel main waits on), so one slow worker holds up no other and
//! no answer is waited for past its deadline. The bytes a worker sent stay in the channel's
//! [`Inbox`] from one request to the next: an answer that comes late is read as late, whole,
//! and skipped. A channel whose frames no longer line up (half a frame written, a length over
//! the limit read) is shut down: the worker sees its end close, drains and exits, and its
//! replacement gets a fresh channel.

use crate::answers::{Heard, Inbox};
use lb_config::protocol::channel::{self, Order, Reply, Request};
use nix::errno::Errno;
use nix::sys::socket::{recv, MsgFlags};
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// How long one whole frame to a worker may take to write: a worker that does not read its
/// channel (stuck, or not ours any more) cannot block main.
pub(crate) const CHANNEL_WRITE_TIMEOUT: Duration = Duration::from_secs(2);
/// Reads of one channel per call when nobody waits for an answer (late answers dropped).
const IDLE_READS: usize = 4;
/// Reads of one channel per wake-up while main waits for its answer (whole frames are taken
/// out between two, so what is buffered stays within a frame and this much).
const WAITING_READS: usize = 64;
const READ_CHUNK: usize = 16 << 10;

/// Why a request got no answer. The texts are what lbctl and the log show.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("cannot encode the request: {0}")]
    Encode(#[source] channel::ChannelError),
    #[error("the worker did not take a frame of {len} bytes within {CHANNEL_WRITE_TIMEOUT:?}")]
    WriteTimeout { len: usize },
    #[error("the worker's channel is closed")]
    Closed,
    #[error("{0}")]
    Io(#[source] std::io::Error),
    #[error("timed out")]
    TimedOut,
    #[error("unexpected answer from the worker: {0}")]
    Unexpected(#[source] channel::ChannelError),
    #[error("the worker's answers are out of step: {0}")]
    OutOfStep(#[source] lb_config::protocol::frame::FramesError),
    /// Any of the above, after which the channel was shut down.
    #[error("{0}; its channel is closed, so the worker drains and is replaced")]
    Condemned(#[source] Box<ChannelError>),
}

/// Main's end of one worker's channel.
pub(crate) struct WorkerChannel {
    stream: UnixStream,
    inbox: Inbox,
    next_id: u64,
}

impl WorkerChannel {
    pub(crate) fn new(stream: UnixStream) -> WorkerChannel {
        WorkerChannel {
            stream,
            inbox: Inbox::default(),
            next_id: 1,
        }
    }

    /// Sends `order` as the next request, all of it within [`CHANNEL_WRITE_TIMEOUT`]; returns
    /// its id. A frame cut in half condemns the channel.
    pub(crate) fn send(&mut self, order: Order) -> Result<u64, ChannelError> {
        let id = self.next_id;
        self.next_id += 1;
        let frame = channel::encode(&Request { id, order }).map_err(ChannelError::Encode)?;
        let deadline = Instant::now() + CHANNEL_WRITE_TIMEOUT;
        let mut left = frame.as_slice();
        while !left.is_empty() {
            let time = deadline.saturating_duration_since(Instant::now());
            let failed = if time.is_zero() {
                Some(ChannelError::WriteTimeout { len: frame.len() })
            } else {
                self.stream
                    .set_write_timeout(Some(time))
                    .err()
                    .map(ChannelError::Io)
            };
            if let Some(why) = failed {
                return Err(if left.len() < frame.len() {
                    self.condemn(why)
                } else {
                    why
                });
            }
            match self.stream.write(left) {
                Ok(0) => return Err(ChannelError::Closed),
                Ok(n) => left = left.get(n..).unwrap_or_default(),
                Err(e) if transient(&e) => {}
                Err(e) => return Err(ChannelError::Io(e)),
            }
        }
        Ok(id)
    }

    /// Shuts the channel down (its frames no longer line up) and says so.
    fn condemn(&self, why: ChannelError) -> ChannelError {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        ChannelError::Condemned(Box::new(why))
    }

    /// Reads what the worker sent, without waiting, at most `reads` times: Ok(true) while the
    /// channel is open, Ok(false) once the worker closed it.
    fn fill(&mut self, reads: usize) -> Result<bool, ChannelError> {
        let mut buf = [0u8; READ_CHUNK];
        for _ in 0..reads {
            match recv(self.stream.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(0) => return Ok(false),
                Ok(n) => self.inbox.push(buf.get(..n).unwrap_or_default()),
                Err(Errno::EAGAIN) => return Ok(true),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(ChannelError::Io(e.into())),
            }
        }
        Ok(true)
    }

    /// The answer to request `id` among the frames read so far, if it came; the late answers
    /// before it are dropped.
    fn answer(&mut self, id: u64, index: usize) -> Result<Option<Reply>, ChannelError> {
        loop {
            match self.inbox.pop(Some(id)) {
                Ok(None) => return Ok(None),
                Ok(Some(Heard::Ours(reply))) => return Ok(Some(reply)),
                Ok(Some(Heard::Late { id: late })) => {
                    log::debug!("worker {index}: skipped the late answer to request {late}");
                }
                Ok(Some(Heard::Unreadable(e))) => return Err(ChannelError::Unexpected(e)),
                Err(e) => return Err(self.condemn(ChannelError::OutOfStep(e))),
            }
        }
    }

    /// Between two requests nobody waits for an answer: whatever is there is late, and is
    /// dropped, whole (a bounded amount per call). Whether the channel is still open: a
    /// channel found closed (main shut it down, or the worker closed it) means the worker must
    /// leave.
    pub(crate) fn drop_late(&mut self, index: usize) -> bool {
        if self.inbox.is_broken() {
            // Shut down already, and said so once.
            return false;
        }
        let open = matches!(self.fill(IDLE_READS), Ok(true));
        loop {
            match self.inbox.pop(None) {
                Ok(None) => return open,
                Ok(Some(heard)) => log::debug!("worker {index}: dropped a late answer: {heard:?}"),
                Err(e) => {
                    let e = self.condemn(ChannelError::OutOfStep(e));
                    log::warn!("worker {index}: {e}");
                    return false;
                }
            }
        }
    }
}

/// A request sent to worker `index`, waiting for its answer.
pub(crate) struct Asked<'a> {
    pub index: usize,
    pub channel: &'a mut WorkerChannel,
    pub id: u64,
}

/// Waits for the answers to `asked`, all by `deadline`, reading whichever channel has bytes:
/// the workers answer in parallel and one that is slow or silent holds up none of the others.
/// Returns each worker's index and its answer, in the order of `asked`.
pub(crate) fn gather(
    asked: Vec<Asked<'_>>,
    deadline: Instant,
) -> Vec<(usize, Result<Reply, ChannelError>)> {
    let mut waiting: Vec<(Asked<'_>, Option<Result<Reply, ChannelError>>)> =
        asked.into_iter().map(|a| (a, None)).collect();
    loop {
        // What already came, before waiting for more.
        for (asked, answer) in waiting.iter_mut().filter(|(_, a)| a.is_none()) {
            *answer = asked.channel.answer(asked.id, asked.index).transpose();
        }
        let open: Vec<usize> = waiting
            .iter()
            .enumerate()
            .filter(|(_, (_, a))| a.is_none())
            .map(|(i, _)| i)
            .collect();
        if open.is_empty() {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            for &i in &open {
                if let Some((_, answer)) = waiting.get_mut(i) {
                    *answer = Some(Err(ChannelError::TimedOut));
                }
            }
            break;
        }
        let ready = wait_readable(&waiting, &open, left);
        for i in ready {
            let Some((asked, answer)) = waiting.get_mut(i) else {
                continue;
            };
            match asked.channel.fill(WAITING_READS) {
                Ok(true) => {}
                Ok(false) => {
                    // Closed: what it sent before closing may still hold the answer.
                    *answer = Some(
                        asked
                            .channel
                            .answer(asked.id, asked.index)
                            .and_then(|r| r.ok_or(ChannelError::Closed)),
                    );
                }
                Err(e) => *answer = Some(Err(e)),
            }
        }
    }
    waiting
        .into_iter()
        .map(|(asked, answer)| (asked.index, answer.unwrap_or(Err(ChannelError::TimedOut))))
        .collect()
}

/// The indexes, among `open`, of the channels with bytes (or an end) to read, waiting at most
/// `left` for the first.
fn wait_readable(
    waiting: &[(Asked<'_>, Option<Result<Reply, ChannelError>>)],
    open: &[usize],
    left: Duration,
) -> Vec<usize> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds: Vec<PollFd<'_>> = open
        .iter()
        .filter_map(|&i| waiting.get(i))
        .map(|(asked, _)| PollFd::new(asked.channel.stream.as_fd(), PollFlags::POLLIN))
        .collect();
    // Rounded up: a wait of 0 ms would spin until the deadline.
    let timeout = PollTimeout::try_from(left.saturating_add(Duration::from_millis(1)))
        .unwrap_or(PollTimeout::MAX);
    match poll(&mut fds, timeout) {
        Ok(n) if n > 0 => {}
        _ => return Vec::new(),
    }
    fds.iter()
        .zip(open)
        .filter(|(fd, _)| fd.revents().is_some_and(|r| !r.is_empty()))
        .map(|(_, &i)| i)
        .collect()
}

/// A read or write that may simply be tried again: interrupted, or cut by its timeout.
pub(crate) fn transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::Interrupted
            | std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_config::protocol::channel::{encode, Answer};
    use lb_config::protocol::frame;

    /// The worker's end: reads requests, answers those in `answers` by position.
    fn requests(worker: &mut UnixStream) -> Vec<Request> {
        use std::io::Read;
        worker
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut frames = frame::Frames::new(channel::MAX_FRAME);
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while out.is_empty() {
            let n = worker.read(&mut buf).unwrap();
            frames.push(&buf[..n]);
            while let Some(body) = frames.pop().unwrap() {
                out.push(channel::decode::<Request>(&body).unwrap());
            }
        }
        out
    }

    #[test]
    fn answers_are_gathered_from_every_worker_and_a_silent_one_times_out() {
        let (a, mut worker_a) = UnixStream::pair().unwrap();
        let (b, mut worker_b) = UnixStream::pair().unwrap();
        let (c, worker_c) = UnixStream::pair().unwrap();
        let (mut a, mut b, mut c) = (
            WorkerChannel::new(a),
            WorkerChannel::new(b),
            WorkerChannel::new(c),
        );
        let ia = a.send(Order::Metrics).unwrap();
        let ib = b.send(Order::Ejected).unwrap();
        let ic = c.send(Order::Metrics).unwrap();
        assert_eq!((ia, ib, ic), (1, 1, 1));
        let got = requests(&mut worker_a);
        assert_eq!(got[0].order, Order::Metrics);
        // b answers an old request first (late), then this one, in two pieces.
        let mut bytes = encode(&Answer {
            id: 0,
            reply: Reply::Done,
        })
        .unwrap();
        bytes.extend(
            encode(&Answer {
                id: ib,
                reply: Reply::Ejected { backends: vec![] },
            })
            .unwrap(),
        );
        worker_b.write_all(&bytes[..7]).unwrap();
        let rest = bytes[7..].to_vec();
        let late = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            worker_b.write_all(&rest).unwrap();
            worker_b
        });
        worker_a
            .write_all(
                &encode(&Answer {
                    id: ia,
                    reply: Reply::Metrics { samples: vec![] },
                })
                .unwrap(),
            )
            .unwrap();
        let started = Instant::now();
        let answers = gather(
            vec![
                Asked {
                    index: 0,
                    channel: &mut a,
                    id: ia,
                },
                Asked {
                    index: 1,
                    channel: &mut b,
                    id: ib,
                },
                Asked {
                    index: 2,
                    channel: &mut c,
                    id: ic,
                },
            ],
            Instant::now() + Duration::from_millis(500),
        );
        let _worker_b = late.join().unwrap();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(matches!(answers[0], (0, Ok(Reply::Metrics { .. }))));
        assert!(matches!(answers[1], (1, Ok(Reply::Ejected { .. }))));
        assert!(matches!(answers[2], (2, Err(ChannelError::TimedOut))));

        // c's answer comes after main gave up: dropped as late, whole; the next one is read.
        let mut worker_c = worker_c;
        worker_c
            .write_all(
                &encode(&Answer {
                    id: ic,
                    reply: Reply::Done,
                })
                .unwrap(),
            )
            .unwrap();
        assert!(c.drop_late(2));
        let next = c
            .send(Order::LogLevel {
                level: "warn".into(),
            })
            .unwrap();
        worker_c
            .write_all(
                &encode(&Answer {
                    id: next,
                    reply: Reply::Refused { error: "no".into() },
                })
                .unwrap(),
            )
            .unwrap();
        let answers = gather(
            vec![Asked {
                index: 2,
                channel: &mut c,
                id: next,
            }],
            Instant::now() + Duration::from_secs(5),
        );
        assert!(matches!(&answers[0].1, Ok(Reply::Refused { error }) if error == "no"));

        // A worker that closes its end: no answer, at once, and the channel reads as closed.
        drop(worker_c);
        let id = c.send(Order::Metrics);
        if let Ok(id) = id {
            let answers = gather(
                vec![Asked {
                    index: 2,
                    channel: &mut c,
                    id,
                }],
                Instant::now() + Duration::from_secs(5),
            );
            assert!(matches!(answers[0].1, Err(ChannelError::Closed)));
        }
        assert!(!c.drop_late(2));
    }

    #[test]
    fn a_length_over_the_limit_condemns_the_channel() {
        let (a, mut worker) = UnixStream::pair().unwrap();
        let mut a = WorkerChannel::new(a);
        let id = a.send(Order::Ejected).unwrap();
        worker.write_all(&u32::MAX.to_be_bytes()).unwrap();
        let answers = gather(
            vec![Asked {
                index: 0,
                channel: &mut a,
                id,
            }],
            Instant::now() + Duration::from_secs(5),
        );
        let e = answers[0].1.as_ref().unwrap_err().to_string();
        assert!(
            e.contains("out of step") && e.contains("drains and is replaced"),
            "{e}"
        );
        use std::io::Read;
        worker
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut rest = Vec::new();
        let _ = worker.read_to_end(&mut rest);
        assert!(!a.drop_late(0), "shut down");
    }
}
