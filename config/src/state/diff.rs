//! What differs between two states: the list `lbctl reload` and `state load` report.
//!
//! Listeners and backends are matched by address (two spellings of one socket address are the
//! same), frontends by route, clusters by name; every other key is compared as a value. What the
//! supervisor does about each difference is its own business.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use super::{address_key, same_address, BackendDef, ClusterDef, FrontendDef, ListenerDef, State};
use crate::error;

/// One difference between two states. Values in `old`/`new` are written as in JSON
/// (`"5s"`, `2`, `true`, `{...}`); `None` means the key is absent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case", deny_unknown_fields)]
pub enum Change {
    /// A key outside listeners and clusters: `workers`, `timeouts.connect`, `metrics.address`...
    Setting {
        key: String,
        old: Option<String>,
        new: Option<String>,
    },
    ListenerAdded {
        address: String,
    },
    ListenerRemoved {
        address: String,
    },
    ListenerChanged {
        address: String,
        key: String,
        old: Option<String>,
        new: Option<String>,
    },
    ClusterAdded {
        name: String,
    },
    ClusterRemoved {
        name: String,
    },
    /// A cluster key other than its frontends and backends.
    ClusterChanged {
        name: String,
        key: String,
        old: Option<String>,
        new: Option<String>,
    },
    FrontendAdded {
        cluster: String,
        frontend: FrontendDef,
    },
    FrontendRemoved {
        cluster: String,
        frontend: FrontendDef,
    },
    BackendAdded {
        cluster: String,
        backend: BackendDef,
    },
    BackendRemoved {
        cluster: String,
        address: String,
    },
    BackendChanged {
        cluster: String,
        address: String,
        key: String,
        old: Option<String>,
        new: Option<String>,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = |v: &Option<String>| v.clone().unwrap_or_else(|| "(unset)".to_owned());
        match self {
            Change::Setting { key, old, new } => {
                write!(f, "~ {key}: {} -> {}", value(old), value(new))
            }
            Change::ListenerAdded { address } => write!(f, "+ listener {address}"),
            Change::ListenerRemoved { address } => write!(f, "- listener {address}"),
            Change::ListenerChanged {
                address,
                key,
                old,
                new,
            } => write!(
                f,
                "~ listener {address}: {key}: {} -> {}",
                value(old),
                value(new)
            ),
            Change::ClusterAdded { name } => write!(f, "+ cluster {name}"),
            Change::ClusterRemoved { name } => write!(f, "- cluster {name}"),
            Change::ClusterChanged {
                name,
                key,
                old,
                new,
            } => write!(
                f,
                "~ cluster {name}: {key}: {} -> {}",
                value(old),
                value(new)
            ),
            Change::FrontendAdded { cluster, frontend } => {
                write!(f, "+ frontend {frontend} (cluster {cluster})")
            }
            Change::FrontendRemoved { cluster, frontend } => {
                write!(f, "- frontend {frontend} (cluster {cluster})")
            }
            Change::BackendAdded { cluster, backend } => {
                write!(f, "+ backend {backend} (cluster {cluster})")
            }
            Change::BackendRemoved { cluster, address } => {
                write!(f, "- backend {address} (cluster {cluster})")
            }
            Change::BackendChanged {
                cluster,
                address,
                key,
                old,
                new,
            } => write!(
                f,
                "~ backend {address} (cluster {cluster}): {key}: {} -> {}",
                value(old),
                value(new)
            ),
        }
    }
}

/// Everything that differs from `old` to `new`, in a stable order: settings, listeners,
/// clusters; within a cluster its own keys, then frontends, then backends.
pub fn diff(old: &State, new: &State) -> Vec<Change> {
    let mut out = Vec::new();

    let settings = |s: &State| {
        let mut s = s.clone();
        s.listeners.clear();
        s.clusters.clear();
        leaves(&s)
    };
    for (key, old, new) in changed(settings(old), settings(new)) {
        out.push(Change::Setting { key, old, new });
    }

    let listeners = |s: &State| -> BTreeMap<String, ListenerDef> {
        s.listeners
            .iter()
            .map(|l| (address_key(&l.address), l.clone()))
            .collect()
    };
    let (old_l, new_l) = (listeners(old), listeners(new));
    for (key, listener) in &new_l {
        match old_l.get(key) {
            None => out.push(Change::ListenerAdded {
                address: listener.address.clone(),
            }),
            Some(before) => {
                let mut before = leaves(&before.summarized());
                let mut after = leaves(&listener.summarized());
                // A respelling of the same address is not a change.
                before.remove("address");
                after.remove("address");
                for (k, old, new) in changed(before, after) {
                    out.push(Change::ListenerChanged {
                        address: listener.address.clone(),
                        key: k,
                        old,
                        new,
                    });
                }
            }
        }
    }
    for (key, listener) in &old_l {
        if !new_l.contains_key(key) {
            out.push(Change::ListenerRemoved {
                address: listener.address.clone(),
            });
        }
    }

    for (name, after) in &new.clusters {
        match old.clusters.get(name) {
            None => out.push(Change::ClusterAdded { name: name.clone() }),
            Some(before) => diff_cluster(name, before, after, &mut out),
        }
    }
    for name in old.clusters.keys() {
        if !new.clusters.contains_key(name) {
            out.push(Change::ClusterRemoved { name: name.clone() });
        }
    }
    out
}

fn diff_cluster(name: &str, before: &ClusterDef, after: &ClusterDef, out: &mut Vec<Change>) {
    let own = |c: &ClusterDef| {
        let mut c = c.clone();
        c.frontends.clear();
        c.backends.clear();
        leaves(&c)
    };
    for (key, old, new) in changed(own(before), own(after)) {
        out.push(Change::ClusterChanged {
            name: name.to_owned(),
            key,
            old,
            new,
        });
    }
    for f in &after.frontends {
        if !before.frontends.iter().any(|g| g.same_route(f)) {
            out.push(Change::FrontendAdded {
                cluster: name.to_owned(),
                frontend: f.clone(),
            });
        }
    }
    for f in &before.frontends {
        if !after.frontends.iter().any(|g| g.same_route(f)) {
            out.push(Change::FrontendRemoved {
                cluster: name.to_owned(),
                frontend: f.clone(),
            });
        }
    }
    for b in &after.backends {
        match before
            .backends
            .iter()
            .find(|o| same_address(&o.address, &b.address))
        {
            None => out.push(Change::BackendAdded {
                cluster: name.to_owned(),
                backend: b.clone(),
            }),
            Some(o) => {
                let (mut old_leaves, mut new_leaves) = (leaves(o), leaves(b));
                old_leaves.remove("address");
                new_leaves.remove("address");
                for (key, old, new) in changed(old_leaves, new_leaves) {
                    out.push(Change::BackendChanged {
                        cluster: name.to_owned(),
                        address: b.address.clone(),
                        key,
                        old,
                        new,
                    });
                }
            }
        }
    }
    for o in &before.backends {
        if !after
            .backends
            .iter()
            .any(|b| same_address(&o.address, &b.address))
        {
            out.push(Change::BackendRemoved {
                cluster: name.to_owned(),
                address: o.address.clone(),
            });
        }
    }
}

/// The keys whose values differ, with both values.
fn changed(
    old: BTreeMap<String, String>,
    new: BTreeMap<String, String>,
) -> Vec<(String, Option<String>, Option<String>)> {
    let keys: BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter_map(|k| {
            let (o, n) = (old.get(k), new.get(k));
            (o != n).then(|| (k.clone(), o.cloned(), n.cloned()))
        })
        .collect()
}

/// Every scalar (and every list, as one value) of `value`, by dotted key.
fn leaves(value: &impl Serialize) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Ok(json) = serde_json::to_value(value) {
        flatten(&json, "", &mut out);
    }
    out
}

fn flatten(value: &serde_json::Value, prefix: &str, out: &mut BTreeMap<String, String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                flatten(v, &error::join_key(prefix, k), out);
            }
        }
        serde_json::Value::Null => {}
        other => {
            out.insert(prefix.to_owned(), other.to_string());
        }
    }
}
