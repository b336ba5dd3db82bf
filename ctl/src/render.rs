//! What lbctl prints: plain tables for people, JSON for scripts.
//!
//! This module owns the layout of every answer (columns, headers, the wording of a change) and
//! the JSON shape `--json` gives, which is the payload's own serde form. It never decides the
//! exit status: `main.rs` does.

use std::fmt::Write as _;

use lb_config::protocol::{Applied, Payload, Sample, Status};
use lb_config::state::ClusterSummary;

/// A table of left-aligned columns two spaces apart, headers in capitals.
#[derive(Debug, Default)]
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&'static str]) -> Table {
        Table {
            headers: headers.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table, one line per row, no trailing spaces.
    pub fn render(&self) -> String {
        let header: Vec<String> = self.headers.iter().map(|h| (*h).to_owned()).collect();
        let lines: Vec<&Vec<String>> = std::iter::once(&header).chain(&self.rows).collect();
        let columns = lines.iter().map(|l| l.len()).max().unwrap_or(0);
        let widths: Vec<usize> = (0..columns)
            .map(|c| {
                lines
                    .iter()
                    .filter_map(|l| l.get(c))
                    .map(|cell| cell.chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for line in lines {
            let mut text = String::new();
            for (cell, width) in line.iter().zip(&widths) {
                let _ = write!(text, "{cell:<width$}  ");
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

/// The answer for people.
pub fn human(payload: &Payload) -> String {
    match payload {
        Payload::Done { message } => format!("{message}\n"),
        Payload::Status(status) => status_text(status),
        Payload::State(state) => state.without_keys().to_toml(),
        Payload::Clusters(clusters) => clusters_text(clusters),
        Payload::Applied(applied) => applied_text(applied),
        Payload::Metrics(samples) => metrics_text(samples),
    }
}

/// The answer for scripts: the payload's content as pretty JSON.
pub fn json(payload: &Payload) -> String {
    let value = match payload {
        Payload::Done { message } => serde_json::json!({ "message": message }),
        Payload::Status(status) => serde_json::to_value(status).unwrap_or_default(),
        Payload::State(state) => serde_json::to_value(state.without_keys()).unwrap_or_default(),
        Payload::Clusters(clusters) => serde_json::to_value(clusters).unwrap_or_default(),
        Payload::Applied(applied) => serde_json::to_value(applied).unwrap_or_default(),
        Payload::Metrics(samples) => serde_json::to_value(samples).unwrap_or_default(),
    };
    let mut out = serde_json::to_string_pretty(&value).unwrap_or_default();
    out.push('\n');
    out
}

fn status_text(s: &Status) -> String {
    let mut out = format!(
        "lbd {}, pid {}, generation {}, up {}\nconfig {}\n\n",
        s.version,
        s.pid,
        s.generation,
        duration(s.uptime_secs),
        s.config.display()
    );
    let mut workers = Table::new(&["WORKER", "PID", "STATE", "CONNECTIONS", "RESTARTS"]);
    for w in &s.workers {
        workers.row(vec![
            w.index.to_string(),
            w.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
            w.state.to_string(),
            w.connections
                .map_or_else(|| "-".to_owned(), |c| c.to_string()),
            w.restarts.to_string(),
        ]);
    }
    out.push_str(&workers.render());
    out.push('\n');
    let mut listeners = Table::new(&["LISTENER", "PROTOCOL", "FRONTENDS"]);
    for l in &s.listeners {
        listeners.row(vec![
            l.address.clone(),
            l.protocol.to_string(),
            l.frontends.to_string(),
        ]);
    }
    out.push_str(&listeners.render());
    if !s.backends.is_empty() {
        out.push('\n');
        let mut backends = Table::new(&[
            "CLUSTER",
            "BACKEND",
            "CHECK",
            "STATE",
            "SINCE",
            "FAILED",
            "EJECTED BY",
            "LAST ERROR",
        ]);
        for b in &s.backends {
            backends.row(vec![
                b.cluster.clone(),
                b.address.clone(),
                b.check.clone(),
                b.state.to_string(),
                b.since_secs.map_or_else(|| "-".to_owned(), duration),
                format!("{}/{}", b.failed_checks, b.checks),
                match b.ejected_by {
                    0 => "-".to_owned(),
                    1 => "1 worker".to_owned(),
                    n => format!("{n} workers"),
                },
                b.last_error.clone().unwrap_or_else(|| "-".to_owned()),
            ]);
        }
        out.push_str(&backends.render());
    }
    if let Some(sync) = &s.sync {
        out.push('\n');
        out.push_str(&sync_text(sync));
    }
    out
}

fn sync_text(s: &lb_config::protocol::SyncStatus) -> String {
    let state = if s.connected {
        format!("connected for {}", duration(s.since_secs))
    } else {
        format!(
            "UNREACHABLE for {} ({}); serving the last state",
            duration(s.since_secs),
            s.last_error.as_deref().unwrap_or("not reached yet")
        )
    };
    let mut out = format!(
        "sync: appliance {} via etcd {} under {}: {state}
\
         read up to revision {}, {} change(s) of this appliance waiting; other appliances: {}\n",
        s.name,
        s.etcd.join(", "),
        s.prefix,
        s.revision,
        s.pending,
        if s.appliances.is_empty() {
            "none seen".to_owned()
        } else {
            s.appliances.join(", ")
        }
    );
    if !s.changes.is_empty() {
        let mut table = Table::new(&["REVISION", "FROM", "CHANGE", "RESULT"]);
        for c in &s.changes {
            table.row(vec![
                c.revision.map_or_else(|| "-".to_owned(), |r| r.to_string()),
                c.origin.clone(),
                c.change.clone(),
                c.error
                    .as_ref()
                    .map_or_else(|| "applied".to_owned(), |e| format!("refused: {e}")),
            ]);
        }
        out.push_str(&table.render());
    }
    out
}

fn clusters_text(clusters: &[ClusterSummary]) -> String {
    if clusters.is_empty() {
        return "no clusters\n".to_owned();
    }
    let mut table = Table::new(&[
        "CLUSTER",
        "PROTOCOL",
        "LOAD-BALANCING",
        "FRONTENDS",
        "BACKENDS",
        "DRAINING",
    ]);
    for c in clusters {
        table.row(vec![
            c.name.clone(),
            c.protocol.to_string(),
            c.load_balancing.to_string(),
            c.frontends.to_string(),
            c.backends.to_string(),
            c.draining.to_string(),
        ]);
    }
    table.render()
}

fn applied_text(applied: &Applied) -> String {
    let mut out = String::new();
    if applied.changes.is_empty() {
        out.push_str("no change: the running state already is that\n");
    }
    for change in &applied.changes {
        let _ = writeln!(out, "{change}");
    }
    let total = applied.workers.len();
    let failed = applied.failed().count();
    if failed == 0 && total > 0 && !applied.changes.is_empty() {
        let _ = writeln!(out, "applied by all {total} workers");
    }
    out
}

/// The one stderr line when some workers did not apply an accepted change.
pub fn failed_workers(applied: &Applied) -> Option<String> {
    let failed: Vec<String> = applied
        .failed()
        .map(|w| {
            let pid = w.pid.map_or_else(String::new, |p| format!(" (pid {p})"));
            let why = w.error.as_deref().unwrap_or_default();
            format!("worker {}{pid}: {why}", w.index)
        })
        .collect();
    (!failed.is_empty()).then(|| {
        format!(
            "the change was accepted, but {} of {} workers did not apply it: {}",
            failed.len(),
            applied.workers.len(),
            failed.join("; ")
        )
    })
}

fn metrics_text(samples: &[Sample]) -> String {
    if samples.is_empty() {
        return "no metrics yet\n".to_owned();
    }
    let mut table = Table::new(&["METRIC", "LABELS", "VALUE"]);
    // Histogram buckets make the table unreadable: their _sum and _count stay (--json has all).
    for s in samples.iter().filter(|s| !s.name.ends_with("_bucket")) {
        let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        table.row(vec![s.name.clone(), labels.join(","), number(s.value)]);
    }
    table.render()
}

/// Integers without ".0", the rest as Rust prints them.
fn number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.0}")
    } else {
        value.to_string()
    }
}

/// "3d 4h", "2h 5m", "4m 10s", "12s".
fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3_600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {s}s")
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_config::protocol::{ListenerStatus, WorkerAck, WorkerState, WorkerStatus};
    use lb_config::state::{
        BackendDef, Change, ClusterProtocolDef, ListenerProtocolDef, LoadBalancingDef,
    };

    #[test]
    fn tables_align_columns_without_trailing_spaces() {
        let mut t = Table::new(&["NAME", "VALUE"]);
        t.row(vec!["a-long-name".into(), "1".into()]);
        t.row(vec!["b".into(), "22".into()]);
        assert_eq!(
            t.render(),
            "NAME         VALUE\na-long-name  1\nb            22\n"
        );
    }

    #[test]
    fn status_shows_workers_and_listeners() {
        let status = Status {
            version: "0.1.0".into(),
            pid: 100,
            generation: 2,
            config: "/etc/kakehi/lb.toml".into(),
            uptime_secs: 3_725,
            workers: vec![
                WorkerStatus {
                    index: 0,
                    pid: Some(101),
                    state: WorkerState::Running,
                    connections: Some(12),
                    restarts: 0,
                },
                WorkerStatus {
                    index: 1,
                    pid: None,
                    state: WorkerState::Restarting,
                    connections: None,
                    restarts: 3,
                },
            ],
            listeners: vec![ListenerStatus {
                address: "127.0.0.1:8080".into(),
                protocol: ListenerProtocolDef::Http,
                frontends: 2,
            }],
            backends: vec![lb_config::protocol::BackendHealth {
                cluster: "app".into(),
                address: "127.0.0.1:9001".into(),
                check: "http GET /health".into(),
                state: lb_config::protocol::HealthState::Down,
                since_secs: Some(75),
                checks: 40,
                failed_checks: 3,
                last_error: Some("connect: Connection refused".into()),
                ejected_by: 2,
            }],
            sync: None,
        };
        assert_eq!(
            human(&Payload::Status(status)),
            "lbd 0.1.0, pid 100, generation 2, up 1h 2m\n\
             config /etc/kakehi/lb.toml\n\
             \n\
             WORKER  PID  STATE       CONNECTIONS  RESTARTS\n\
             0       101  running     12           0\n\
             1       -    restarting  -            3\n\
             \n\
             LISTENER        PROTOCOL  FRONTENDS\n\
             127.0.0.1:8080  http      2\n\
             \n\
             CLUSTER  BACKEND         CHECK             STATE  SINCE   FAILED  EJECTED BY  LAST ERROR\n\
             app      127.0.0.1:9001  http GET /health  down   1m 15s  3/40    2 workers   connect: Connection refused\n"
        );
    }

    #[test]
    fn clusters_and_metrics_tables() {
        let clusters = vec![ClusterSummary {
            name: "app".into(),
            protocol: ClusterProtocolDef::Http,
            load_balancing: LoadBalancingDef::RoundRobin,
            frontends: 1,
            backends: 2,
            draining: 1,
        }];
        assert_eq!(
            human(&Payload::Clusters(clusters)),
            "CLUSTER  PROTOCOL  LOAD-BALANCING  FRONTENDS  BACKENDS  DRAINING\n\
             app      http      round-robin     1          2         1\n"
        );
        assert_eq!(human(&Payload::Clusters(vec![])), "no clusters\n");
        let samples = vec![Sample {
            name: "kakehi_requests_total".into(),
            labels: [("cluster".to_owned(), "app".to_owned())].into(),
            value: 42.0,
        }];
        assert_eq!(
            human(&Payload::Metrics(samples)),
            "METRIC                 LABELS       VALUE\n\
             kakehi_requests_total  cluster=app  42\n"
        );
        assert_eq!(number(0.25), "0.25");
    }

    #[test]
    fn applied_changes_and_failed_workers() {
        let mut applied = Applied {
            changes: vec![Change::BackendAdded {
                cluster: "app".into(),
                backend: BackendDef::new("127.0.0.1:9003"),
            }],
            workers: vec![
                WorkerAck {
                    index: 0,
                    pid: Some(7),
                    error: None,
                },
                WorkerAck {
                    index: 1,
                    pid: Some(8),
                    error: None,
                },
            ],
        };
        assert_eq!(
            human(&Payload::Applied(applied.clone())),
            "+ backend 127.0.0.1:9003 (cluster app)\napplied by all 2 workers\n"
        );
        assert_eq!(failed_workers(&applied), None);
        applied.workers[1].error = Some("channel closed".into());
        assert_eq!(
            failed_workers(&applied).unwrap(),
            "the change was accepted, but 1 of 2 workers did not apply it: worker 1 (pid 8): channel closed"
        );
        let none = Applied {
            changes: vec![],
            workers: vec![],
        };
        assert!(human(&Payload::Applied(none)).starts_with("no change"));
    }

    #[test]
    fn json_is_the_payload_content() {
        let out = json(&Payload::Done {
            message: "saved".into(),
        });
        let value: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(value, serde_json::json!({ "message": "saved" }));
        assert_eq!(duration(90_000), "1d 1h");
        assert_eq!(duration(59), "59s");
    }
}
