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

use crate::balancer::ClusterState;
use crate::worker::Cx;
use std::net::SocketAddr;

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
