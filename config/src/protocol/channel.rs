//! The channel between lbd main and each of its workers: typed messages, each request with an
//! id, in frames of the shared codec ([`super::frame`]).
//!
//! A frame's body is one version byte ([`VERSION`]) and a JSON message, at most [`MAX_FRAME`]
//! bytes in all (a configuration, a worker's metrics). Main sends [`Request`]s; the worker
//! answers each with an [`Answer`] carrying the same id, except [`Order::Health`], which is
//! never answered (main sends it whenever the set of backends found down changes, and to every
//! new worker, without waiting). Main numbers its requests on each channel; an answer whose id
//! is not the one main waits for is the late answer to a request main gave up on, and is
//! skipped. A frame that is not a request of this version is answered [`Reply::Refused`] (with
//! its id when the JSON carries one) and changes nothing. Both ends are usually the same
//! binary; after `lbctl upgrade --workers-only --binary` they may not be, and another version
//! is then refused in words, so the new workers are not ready and the upgrade is rolled back.
//!
//! This module is the one place both ends import: lb-proxy's `orders.rs` (the worker) and
//! lbd's `channel.rs` (main). Reading and writing the socket is theirs.

use std::net::SocketAddr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::frame::{self, TooLarge};
use super::Sample;
use crate::model::Config;

/// The version of the channel's messages, the first byte of each frame's body. 2: a
/// configuration travels checked ([`Config`]), not as TOML text.
pub const VERSION: u8 = 2;
/// The largest frame body either end accepts (a configuration with its certificates, or a
/// worker's metrics), in bytes.
pub const MAX_FRAME: usize = 16 << 20;

/// One request from main to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Chosen by main, one per request on this channel; the answer carries it back.
    pub id: u64,
    pub order: Order,
}

/// What main asks of a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Order {
    /// A whole new configuration, validated once by main (a worker neither parses nor
    /// re-checks it); answered [`Reply::Done`] or [`Reply::Refused`] (when the worker cannot
    /// build its listeners' TLS from it, for example).
    Configure { config: Box<Config> },
    /// The backends the supervisor's active checks found down, as (cluster, address): the
    /// whole set each time. Never answered.
    Health { down: Vec<(String, SocketAddr)> },
    /// Answered [`Reply::Metrics`].
    Metrics,
    /// Answered [`Reply::Ejected`]: the backends this worker keeps out of rotation after
    /// consecutive errors (passive health), for `lbctl status`.
    Ejected,
    /// The level of the worker's own log (error, warn, info, debug, trace, off); answered
    /// [`Reply::Done`] or [`Reply::Refused`].
    LogLevel { level: String },
}

impl Order {
    /// Whether the worker answers this order.
    pub fn is_answered(&self) -> bool {
        !matches!(self, Order::Health { .. })
    }
}

/// One answer from a worker to main.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Answer {
    /// The id of the request answered; 0 when the request was too broken to carry one.
    pub id: u64,
    pub reply: Reply,
}

/// What a worker answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    /// Applied (a configuration, a log level).
    Done,
    /// Refused, and why (one line); nothing changed.
    Refused { error: String },
    /// The worker's samples (lb-proxy's `stats.rs`).
    Metrics { samples: Vec<Sample> },
    /// The (cluster, address) pairs the worker keeps ejected.
    Ejected { backends: Vec<(String, SocketAddr)> },
}

/// Why a frame's body is not a message of this channel, or a message cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error(transparent)]
    TooLarge(#[from] TooLarge),
    #[error("empty frame: a frame holds a version byte and a JSON message")]
    Empty,
    #[error(
        "channel message version {found}, this side speaks {VERSION}: lbd main and its workers are from different releases"
    )]
    Version { found: u8 },
    #[error("the message is not a valid {kind}: {detail}")]
    Bad {
        /// The id the JSON carried, when it carried one.
        id: Option<u64>,
        kind: &'static str,
        detail: String,
    },
    #[error("cannot encode the message: {detail}")]
    Encode { detail: String },
}

impl ChannelError {
    /// The id of the request the error is about, when it could be read.
    pub fn id(&self) -> Option<u64> {
        match self {
            ChannelError::Bad { id, .. } => *id,
            _ => None,
        }
    }
}

/// The frame carrying `message` (a [`Request`] or an [`Answer`]).
pub fn encode<M: Serialize>(message: &M) -> Result<Vec<u8>, ChannelError> {
    let body = serde_json::to_vec(message).map_err(|e| ChannelError::Encode {
        detail: e.to_string(),
    })?;
    Ok(frame::encode(&[&[VERSION], &body], MAX_FRAME)?)
}

/// The message in a frame's body (as [`frame::cut`] or [`frame::Frames`] give it).
pub fn decode<M: Message>(body: &[u8]) -> Result<M, ChannelError> {
    let Some((&version, json)) = body.split_first() else {
        return Err(ChannelError::Empty);
    };
    if version != VERSION {
        return Err(ChannelError::Version { found: version });
    }
    let bad = |id, detail: String| ChannelError::Bad {
        id,
        kind: M::KIND,
        detail,
    };
    let value: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| bad(None, e.to_string()))?;
    let id = value.get("id").and_then(serde_json::Value::as_u64);
    serde_json::from_value(value).map_err(|e| bad(id, e.to_string()))
}

/// The configuration as main writes it into the memfd a worker starts from: the JSON of the
/// checked [`Config`] (the same value [`Order::Configure`] carries).
pub fn encode_config(config: &Config) -> Result<Vec<u8>, ChannelError> {
    serde_json::to_vec(config).map_err(|e| ChannelError::Encode {
        detail: e.to_string(),
    })
}

/// Reads what [`encode_config`] wrote.
pub fn decode_config(bytes: &[u8]) -> Result<Config, ChannelError> {
    serde_json::from_slice(bytes).map_err(|e| ChannelError::Bad {
        id: None,
        kind: "configuration",
        detail: e.to_string(),
    })
}

/// A message of the channel: [`Request`] or [`Answer`].
pub trait Message: DeserializeOwned {
    /// Its name in error messages.
    const KIND: &'static str;
}

impl Message for Request {
    const KIND: &'static str = "request";
}

impl Message for Answer {
    const KIND: &'static str = "answer";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_round_trip_in_frames() {
        let requests = [
            Order::Configure {
                config: Box::new(checked_config()),
            },
            Order::Health {
                down: vec![("app".into(), "127.0.0.1:9001".parse().unwrap())],
            },
            Order::Metrics,
            Order::Ejected,
            Order::LogLevel {
                level: "debug".into(),
            },
        ];
        for (id, order) in requests.into_iter().enumerate() {
            let sent = Request {
                id: id as u64 + 1,
                order,
            };
            let wire = encode(&sent).unwrap();
            let (body, len) = frame::cut(&wire, MAX_FRAME).unwrap().unwrap();
            assert_eq!(len, wire.len());
            assert_eq!(body[0], VERSION);
            assert_eq!(decode::<Request>(body), Ok(sent));
        }
        let answer = Answer {
            id: 9,
            reply: Reply::Ejected {
                backends: vec![("app".into(), "[::1]:80".parse().unwrap())],
            },
        };
        let wire = encode(&answer).unwrap();
        assert_eq!(decode::<Answer>(&wire[4..]), Ok(answer));
        assert!(!Order::Health { down: Vec::new() }.is_answered());
        assert!(Order::Metrics.is_answered());
    }

    /// A configuration with everything serde does not write by itself: certificates (chain
    /// and key), host and path regexes.
    fn checked_config() -> Config {
        let certs = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/certs");
        let text = format!(
            "[[listeners]]\naddress = \"127.0.0.1:8443\"\nprotocol = \"https\"\n\
             certificates = [ {{ certificate = \"{certs}/site.pem\", key = \"{certs}/site.key\" }} ]\n\
             [clusters.app]\nfrontends = [ {{ address = \"127.0.0.1:8443\", hostname = \"~^API[0-9]+\\\\.example$\", path = \"^/v[0-9]/\", path_type = \"regex\" }} ]\n\
             backends = [ {{ address = \"127.0.0.1:9001\" }} ]\n"
        );
        crate::parse_str(&text, std::path::Path::new("/etc/kakehi/lb.toml")).unwrap()
    }

    #[test]
    fn a_checked_configuration_travels_whole() {
        let config = checked_config();
        let back = decode_config(&encode_config(&config).unwrap()).unwrap();
        assert_eq!(back, config);
        let cert = &back.listeners[0].certificates[0];
        assert_eq!(cert.chain, config.listeners[0].certificates[0].chain);
        assert_eq!(cert.key, config.listeners[0].certificates[0].key);
        match &back.clusters[0].frontends[0].hostname {
            crate::HostMatch::Regex(r) => assert!(r.is_match("api7.EXAMPLE")),
            other => panic!("{other:?}"),
        }
        assert!(decode_config(b"workers = 1\n").is_err());
    }

    #[test]
    fn the_wire_form_is_stable() {
        let wire = encode(&Request {
            id: 3,
            order: Order::LogLevel {
                level: "warn".into(),
            },
        })
        .unwrap();
        assert_eq!(
            &wire[5..],
            br#"{"id":3,"order":{"log_level":{"level":"warn"}}}"#
        );
        let wire = encode(&Answer {
            id: 3,
            reply: Reply::Done,
        })
        .unwrap();
        assert_eq!(&wire[5..], br#"{"id":3,"reply":"done"}"#);
    }

    #[test]
    fn what_is_not_a_message_of_this_version_is_a_typed_error() {
        assert_eq!(decode::<Request>(b""), Err(ChannelError::Empty));
        let e = decode::<Request>(b"\x01{}").unwrap_err();
        assert_eq!(e, ChannelError::Version { found: 1 });
        assert!(e.to_string().contains("different releases"), "{e}");
        let e = decode::<Request>(b"\x02{\"id\":4,\"order\":\"reboot\"}").unwrap_err();
        assert_eq!(e.id(), Some(4));
        assert!(e.to_string().contains("not a valid request"), "{e}");
        let e = decode::<Answer>(b"\x02ok").unwrap_err();
        assert_eq!(e.id(), None);
        // The old string protocol's frames are refused in words, not misread.
        assert!(decode::<Request>(b"\0metrics").is_err());
        assert!(decode::<Request>(b"workers = 1\n").is_err());
        let mut config = checked_config();
        config.clusters[0].name = "a".repeat(MAX_FRAME);
        let big = Order::Configure {
            config: Box::new(config),
        };
        assert!(matches!(
            encode(&Request { id: 1, order: big }),
            Err(ChannelError::TooLarge(_))
        ));
    }
}
