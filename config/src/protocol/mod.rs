//! The command protocol between `lbctl` and `lbd`: messages, framing and a sans-io decoder;
//! and, in the submodules, the frame codec all of kakehi's streams share ([`frame`]) and the
//! messages between lbd main and its workers ([`channel`]).
//!
//! A frame is a 4-byte big-endian length, then that many bytes ([`frame`]): here one protocol
//! version byte ([`VERSION`]) and a JSON message. The length counts the version byte and the
//! JSON, and may not exceed [`MAX_FRAME`] (1 MiB). A client sends [`Request`]s, each with its
//! own id; the server answers each with a [`Response`] carrying the same id. [`Decoder`] turns
//! bytes into messages and refuses an over-size length, another protocol version and a message
//! that is not the expected JSON with a typed [`ProtocolError`]; it never panics and never
//! buffers more than one frame. Reading and writing sockets, and acting on a request, are left
//! to lbctl and to the command server in lbd.

pub mod channel;
pub mod frame;

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::path::PathBuf;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::state::{Change, ClusterSummary, Edit, ListenerProtocolDef, State};

/// The protocol version this build speaks, the byte after each frame's length.
pub const VERSION: u8 = 1;
/// The largest frame length (version byte + JSON), in bytes.
pub const MAX_FRAME: usize = 1 << 20;

/// One request from lbctl.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Chosen by the client; the response carries it back.
    pub id: u64,
    pub verb: Verb,
}

/// The answer to one request: its payload, or why it was refused (one line).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Response {
    /// The request's id; 0 when the request was too broken to carry one.
    pub id: u64,
    pub result: Result<Payload, String>,
}

/// What lbctl asks lbd to do. Paths are absolute: lbd does not share lbctl's directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[expect(
    clippy::large_enum_variant,
    reason = "one Verb per lbctl request, decoded once and dropped; boxing Edit would only add a heap step"
)]
pub enum Verb {
    /// Generation, workers, listeners.
    Status,
    /// The running state.
    StateDump,
    /// Writes the running state as a config file at `path` (on lbd's side).
    StateSave {
        path: PathBuf,
    },
    /// Replaces the running state with the config file at `path`, applying the difference.
    StateLoad {
        path: PathBuf,
    },
    ClusterList,
    /// A change of the running state (a cluster, backend, frontend, listener or certificate
    /// added, removed, drained or replaced): [`State::apply`] checks it, lbd pushes the result.
    Change(Edit),
    Metrics,
    /// Sets the level of lbd's own log (main and workers): error, warn, info, debug, trace
    /// or off.
    LogLevel {
        level: String,
    },
    /// Applies the difference between the running state and lbd's config file.
    Reload,
    /// Stops lbd: workers drain first unless `hard`.
    Shutdown {
        hard: bool,
    },
    /// Replaces the running lbd (or only its workers) with `binary` (default: the same path).
    Upgrade {
        binary: Option<PathBuf>,
        workers_only: bool,
    },
}

impl Verb {
    /// The verb's name as lbctl spells it, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Verb::Status => "status",
            Verb::StateDump => "state dump",
            Verb::StateSave { .. } => "state save",
            Verb::StateLoad { .. } => "state load",
            Verb::ClusterList => "cluster list",
            Verb::Change(edit) => edit.name(),
            Verb::Metrics => "metrics",
            Verb::LogLevel { .. } => "log-level",
            Verb::Reload => "reload",
            Verb::Shutdown { .. } => "shutdown",
            Verb::Upgrade { .. } => "upgrade",
        }
    }
}

/// What a successful request returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Payload {
    /// A request with nothing more to say than this line (state save, shutdown...).
    Done {
        message: String,
    },
    Status(Status),
    /// `state dump`.
    State(Box<State>),
    /// `cluster list`.
    Clusters(Vec<ClusterSummary>),
    /// A change that was accepted: what changed, and how each worker took it.
    Applied(Applied),
    /// `metrics`.
    Metrics(Vec<Sample>),
}

/// `lbctl status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    /// lbd's version.
    pub version: String,
    /// The main process.
    pub pid: u32,
    /// Bumped by each upgrade.
    pub generation: u64,
    /// The config file lbd was started with (and reloads).
    pub config: PathBuf,
    pub uptime_secs: u64,
    pub workers: Vec<WorkerStatus>,
    pub listeners: Vec<ListenerStatus>,
    /// Every backend with what the health checks say of it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<BackendHealth>,
    /// `[sync]`: etcd and the changes shared with other appliances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<Box<SyncStatus>>,
}

/// `lbctl status`'s sync part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncStatus {
    /// This appliance's name.
    pub name: String,
    pub prefix: String,
    pub etcd: Vec<String>,
    pub connected: bool,
    /// Seconds since etcd was last reached or lost.
    pub since_secs: u64,
    pub last_error: Option<String>,
    /// etcd's revision up to which changes were read.
    pub revision: u64,
    /// Changes made here and not yet known written to etcd.
    pub pending: usize,
    /// The other appliances with health verdicts in etcd.
    pub appliances: Vec<String>,
    /// The latest changes, oldest first.
    pub changes: Vec<SyncChange>,
}

/// A change in `lbctl status`: where it came from and how it went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncChange {
    /// etcd's revision (None: made here).
    pub revision: Option<u64>,
    pub origin: String,
    pub change: String,
    /// Why it was refused here.
    pub error: Option<String>,
}

/// One backend in `lbctl status`: its cluster's health check and what it found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendHealth {
    pub cluster: String,
    pub address: String,
    /// `http GET /health`, `tcp`, or `none` when the cluster has no health check.
    pub check: String,
    pub state: HealthState,
    /// Seconds in this state (since lbd started checking, for the first one).
    pub since_secs: Option<u64>,
    /// Probes made and probes that failed.
    pub checks: u64,
    pub failed_checks: u64,
    /// Why the last failed probe failed.
    pub last_error: Option<String>,
    /// Workers that keep it out of their rotation after consecutive errors (passive health).
    #[serde(default)]
    pub ejected_by: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HealthState {
    Up,
    Down,
    /// The cluster has no health check.
    Unchecked,
    /// `lbctl backend drain`: no new requests.
    Draining,
}

impl fmt::Display for HealthState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HealthState::Up => "up",
            HealthState::Down => "down",
            HealthState::Unchecked => "unchecked",
            HealthState::Draining => "draining",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerStatus {
    pub index: usize,
    /// None while the worker is being (re)started.
    pub pid: Option<u32>,
    pub state: WorkerState,
    /// Live client connections, when known.
    pub connections: Option<u64>,
    /// How many times this worker slot was restarted after its process died.
    pub restarts: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkerState {
    Starting,
    Running,
    Draining,
    /// Dead, waiting for its restart.
    Restarting,
    Stopped,
}

impl fmt::Display for WorkerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WorkerState::Starting => "starting",
            WorkerState::Running => "running",
            WorkerState::Draining => "draining",
            WorkerState::Restarting => "restarting",
            WorkerState::Stopped => "stopped",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerStatus {
    pub address: String,
    pub protocol: ListenerProtocolDef,
    /// Frontends served on it, all clusters together.
    pub frontends: usize,
}

/// An accepted change. lbd answers once every worker has applied it or failed to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Applied {
    /// What differs from the state before (empty: nothing to do).
    pub changes: Vec<Change>,
    pub workers: Vec<WorkerAck>,
}

impl Applied {
    /// The workers that did not apply the change.
    pub fn failed(&self) -> impl Iterator<Item = &WorkerAck> {
        self.workers.iter().filter(|w| w.error.is_some())
    }
}

/// One worker's answer to a change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerAck {
    pub index: usize,
    pub pid: Option<u32>,
    /// None: applied. Some: why not.
    pub error: Option<String>,
}

/// One metric value, as Prometheus would name it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sample {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Why bytes were not a message. Each says what was wrong and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame of {len} bytes refused: the limit is {max} bytes")]
    TooLarge { len: u64, max: usize },
    #[error("{}", version_message(*found))]
    UnsupportedVersion { found: u8 },
    #[error("empty frame: a frame holds a version byte and a JSON message")]
    EmptyFrame,
    #[error("the message is not JSON: {detail}")]
    NotJson { detail: String },
    /// JSON, but not the expected message (an unknown verb, a missing or unknown field...).
    #[error("the message is not a valid {kind}: {detail}")]
    BadMessage {
        /// The request id, when the JSON carried one.
        id: Option<u64>,
        kind: &'static str,
        detail: String,
    },
    #[error("the connection closed in the middle of a frame ({buffered} bytes received)")]
    Truncated { buffered: usize },
    #[error("the stream is unusable after an earlier refused frame: reconnect")]
    Failed,
    #[error("cannot encode the message: {detail}")]
    Encode { detail: String },
}

fn version_message(found: u8) -> String {
    if found > VERSION {
        format!(
            "protocol version {found} is newer than this side's ({VERSION}): use lbctl and lbd from the same release"
        )
    } else {
        format!("protocol version {found} is not supported (this side speaks {VERSION})")
    }
}

impl ProtocolError {
    /// The id of the request the error is about, when it could be read.
    pub fn id(&self) -> Option<u64> {
        match self {
            ProtocolError::BadMessage { id, .. } => *id,
            _ => None,
        }
    }

    /// Whether the stream cannot go on: the next frame's start is unknown.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            ProtocolError::TooLarge { .. }
                | ProtocolError::Truncated { .. }
                | ProtocolError::Failed
        )
    }
}

impl From<frame::TooLarge> for ProtocolError {
    fn from(e: frame::TooLarge) -> Self {
        ProtocolError::TooLarge {
            len: e.len,
            max: e.max,
        }
    }
}

/// The frame carrying `message`.
pub fn encode<M: Serialize>(message: &M) -> Result<Vec<u8>, ProtocolError> {
    let body = serde_json::to_vec(message).map_err(|e| ProtocolError::Encode {
        detail: e.to_string(),
    })?;
    Ok(frame::encode(&[&[VERSION], &body], MAX_FRAME)?)
}

/// Sans-io decoder of a stream of frames carrying `M` (a [`Request`] on lbd's side, a
/// [`Response`] on lbctl's).
///
/// [`feed`](Decoder::feed) appends bytes and returns the first complete message; when bytes for
/// several frames arrive together, call [`poll`](Decoder::poll) until it returns `Ok(None)`.
/// An error about one frame (another version, bad JSON, an empty frame) consumes that frame and
/// the stream goes on; a fatal one ([`ProtocolError::is_fatal`]) leaves the decoder refusing
/// everything, since the next frame's start is unknown.
pub struct Decoder<M> {
    frames: frame::Frames,
    message: PhantomData<fn() -> M>,
}

impl<M> Default for Decoder<M> {
    fn default() -> Self {
        Decoder {
            frames: frame::Frames::new(MAX_FRAME),
            message: PhantomData,
        }
    }
}

impl<M: DeserializeOwned> Decoder<M> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `bytes`, then returns the first complete message, if any.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<M>, ProtocolError> {
        if self.frames.is_broken() {
            return Err(ProtocolError::Failed);
        }
        self.frames.push(bytes);
        self.poll()
    }

    /// The next complete message among the bytes already fed, if any.
    pub fn poll(&mut self) -> Result<Option<M>, ProtocolError> {
        let frame = match self.frames.pop() {
            Ok(Some(frame)) => frame,
            Ok(None) => return Ok(None),
            Err(frame::FramesError::TooLarge(e)) => return Err(e.into()),
            Err(frame::FramesError::Broken) => return Err(ProtocolError::Failed),
        };
        let Some((&version, body)) = frame.split_first() else {
            return Err(ProtocolError::EmptyFrame);
        };
        if version != VERSION {
            return Err(ProtocolError::UnsupportedVersion { found: version });
        }
        decode_body(body).map(Some)
    }

    /// Bytes received and not yet part of a complete frame.
    pub fn buffered(&self) -> usize {
        self.frames.buffered()
    }

    /// To call at the end of the stream: an error if it stopped inside a frame.
    pub fn finish(&self) -> Result<(), ProtocolError> {
        match self.frames.buffered() {
            0 => Ok(()),
            buffered => Err(ProtocolError::Truncated { buffered }),
        }
    }
}

fn decode_body<M: DeserializeOwned>(body: &[u8]) -> Result<M, ProtocolError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| ProtocolError::NotJson {
            detail: e.to_string(),
        })?;
    let id = value.get("id").and_then(serde_json::Value::as_u64);
    serde_json::from_value(value).map_err(|e| ProtocolError::BadMessage {
        id,
        kind: kind_name::<M>(),
        detail: e.to_string(),
    })
}

/// "request" or "response" for a message type, for error messages.
fn kind_name<M>() -> &'static str {
    let name = std::any::type_name::<M>();
    if name.ends_with("::Request") {
        "request"
    } else if name.ends_with("::Response") {
        "response"
    } else {
        "message"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::BackendDef;

    fn frame(version: u8, body: &[u8]) -> Vec<u8> {
        let mut out = ((body.len() + 1) as u32).to_be_bytes().to_vec();
        out.push(version);
        out.extend_from_slice(body);
        out
    }

    fn request(verb: Verb) -> Request {
        Request { id: 7, verb }
    }

    #[test]
    fn a_request_round_trips_even_byte_by_byte() {
        let sent = request(Verb::Change(Edit::AddBackend {
            cluster: "app".into(),
            backend: BackendDef {
                weight: Some(2),
                ..BackendDef::new("127.0.0.1:9003")
            },
        }));
        let bytes = encode(&sent).unwrap();
        assert_eq!(bytes[4], VERSION);
        assert_eq!(
            u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize,
            bytes.len() - 4
        );
        let mut decoder = Decoder::<Request>::new();
        let (last, head) = bytes.split_last().unwrap();
        for b in head {
            assert_eq!(decoder.feed(&[*b]).unwrap(), None);
        }
        assert_eq!(decoder.feed(&[*last]).unwrap(), Some(sent));
        assert_eq!(decoder.buffered(), 0);
        decoder.finish().unwrap();
    }

    #[test]
    fn several_frames_in_one_read_come_out_one_by_one() {
        let a = request(Verb::Status);
        let b = Request {
            id: 8,
            verb: Verb::Shutdown { hard: true },
        };
        let mut bytes = encode(&a).unwrap();
        bytes.extend(encode(&b).unwrap());
        bytes.extend(&encode(&a).unwrap()[..3]);
        let mut decoder = Decoder::<Request>::new();
        assert_eq!(decoder.feed(&bytes).unwrap(), Some(a));
        assert_eq!(decoder.poll().unwrap(), Some(b));
        assert_eq!(decoder.poll().unwrap(), None);
        assert_eq!(
            decoder.finish(),
            Err(ProtocolError::Truncated { buffered: 3 })
        );
    }

    #[test]
    fn responses_round_trip() {
        for result in [
            Ok(Payload::Done {
                message: "saved".into(),
            }),
            Ok(Payload::State(Box::default())),
            Err("no cluster named \"x\"".to_owned()),
            Ok(Payload::Metrics(vec![Sample {
                name: "kakehi_requests_total".into(),
                labels: [("cluster".to_owned(), "app".to_owned())].into(),
                value: 12.0,
            }])),
        ] {
            let sent = Response { id: 3, result };
            let got = Decoder::<Response>::new()
                .feed(&encode(&sent).unwrap())
                .unwrap();
            assert_eq!(got, Some(sent));
        }
    }

    #[test]
    fn an_over_size_length_is_refused_at_once_and_for_good() {
        let mut decoder = Decoder::<Request>::new();
        let len = (MAX_FRAME as u32 + 1).to_be_bytes();
        let e = decoder.feed(&len).unwrap_err();
        assert_eq!(
            e,
            ProtocolError::TooLarge {
                len: MAX_FRAME as u64 + 1,
                max: MAX_FRAME
            }
        );
        assert!(e.is_fatal());
        assert_eq!(decoder.buffered(), 0, "nothing of it is kept");
        let good = encode(&request(Verb::Status)).unwrap();
        assert_eq!(decoder.feed(&good), Err(ProtocolError::Failed));
        let e = Decoder::<Request>::new().feed(&[0xff; 4]).unwrap_err();
        assert!(e.to_string().contains("limit is 1048576 bytes"), "{e}");
    }

    #[test]
    fn a_future_version_is_refused_and_skipped() {
        let body = serde_json::to_vec(&request(Verb::Status)).unwrap();
        let mut bytes = frame(VERSION + 1, &body);
        bytes.extend(frame(VERSION, &body));
        let mut decoder = Decoder::<Request>::new();
        let e = decoder.feed(&bytes).unwrap_err();
        assert_eq!(e, ProtocolError::UnsupportedVersion { found: 2 });
        assert!(e.to_string().contains("newer"), "{e}");
        assert!(!e.is_fatal());
        assert_eq!(decoder.poll().unwrap(), Some(request(Verb::Status)));
        let e = Decoder::<Request>::new()
            .feed(&frame(0, &body))
            .unwrap_err();
        assert!(e.to_string().contains("not supported"), "{e}");
    }

    #[test]
    fn garbage_json_and_unknown_verbs_are_typed_errors() {
        let mut decoder = Decoder::<Request>::new();
        let e = decoder.feed(&frame(VERSION, b"\x00garbage{")).unwrap_err();
        assert!(matches!(e, ProtocolError::NotJson { .. }), "{e:?}");
        let e = decoder
            .feed(&frame(VERSION, br#"{"id":9,"verb":"frobnicate"}"#))
            .unwrap_err();
        assert_eq!(e.id(), Some(9));
        assert!(e.to_string().contains("not a valid request"), "{e}");
        assert!(e.to_string().contains("frobnicate"), "{e}");
        let e = decoder
            .feed(&frame(VERSION, br#"{"id":1,"verb":"status","extra":1}"#))
            .unwrap_err();
        assert!(e.to_string().contains("extra"), "{e}");
        let e = decoder.feed(&0u32.to_be_bytes()).unwrap_err();
        assert_eq!(e, ProtocolError::EmptyFrame);
        // None of these broke the stream.
        let good = encode(&request(Verb::Metrics)).unwrap();
        assert_eq!(decoder.feed(&good).unwrap(), Some(request(Verb::Metrics)));
    }

    #[test]
    fn an_over_size_message_is_not_encoded() {
        let verb = Verb::Change(Edit::RemoveCluster {
            name: "x".repeat(MAX_FRAME),
        });
        assert!(matches!(
            encode(&request(verb)),
            Err(ProtocolError::TooLarge { .. })
        ));
    }

    #[test]
    fn a_change_is_named_as_lbctl_spells_it() {
        let verb = Verb::Change(Edit::DrainBackend {
            cluster: "app".into(),
            address: "127.0.0.1:1".into(),
        });
        assert_eq!(verb.name(), "backend drain");
        assert_eq!(Verb::Reload.name(), "reload");
    }

    #[test]
    fn the_wire_form_is_stable() {
        let json = serde_json::to_string(&Request {
            id: 1,
            verb: Verb::Change(Edit::DrainBackend {
                cluster: "app".into(),
                address: "127.0.0.1:9001".into(),
            }),
        })
        .unwrap();
        assert_eq!(
            json,
            r#"{"id":1,"verb":{"change":{"drain_backend":{"cluster":"app","address":"127.0.0.1:9001"}}}}"#
        );
        let json = serde_json::to_string(&Response {
            id: 1,
            result: Err("no".into()),
        })
        .unwrap();
        assert_eq!(json, r#"{"id":1,"result":{"Err":"no"}}"#);
    }
}
