//! `lbctl top`: a live terminal view of a running lbd, refreshed every second (like `sozu top`
//! or `htop`).
//!
//! Each refresh asks lbd for `status` and `metrics` over the command socket (the same verbs as
//! `lbctl status` and `lbctl metrics`) and draws, with ratatui: lbd's generation, pid and
//! uptime; each worker (pid, state, live connections, restarts); each cluster's requests per
//! second (the change of `kakehi_cluster_requests_total` since the previous refresh) and total;
//! each backend's health. `q`, Esc or Ctrl-C leaves, and the terminal is given back as it was.
//! What it draws is a pure function of two snapshots ([`View`]), tested without a terminal.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use lb_config::protocol::{Payload, Sample, Status, Verb};
use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table};
use ratatui::Frame;

use crate::client;
use crate::CtlError;

/// What one refresh shows: lbd's status, and per cluster its requests per second and total.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub status: Option<Status>,
    /// cluster → (requests per second since the previous refresh, total).
    pub clusters: BTreeMap<String, (f64, u64)>,
    /// Why the last refresh failed, if it did (lbd gone, refused...).
    pub error: Option<String>,
}

/// Requests served so far, per cluster (`kakehi_cluster_requests_total`, summed over its
/// other labels).
pub fn cluster_totals(samples: &[Sample]) -> BTreeMap<String, u64> {
    let mut totals = BTreeMap::new();
    for s in samples {
        if s.name != "kakehi_cluster_requests_total" {
            continue;
        }
        if let Some(cluster) = s.labels.get("cluster") {
            *totals.entry(cluster.clone()).or_insert(0) += s.value.max(0.0) as u64;
        }
    }
    totals
}

impl View {
    /// The next view from fresh snapshots: rates against `previous` totals over `elapsed`.
    pub fn next(
        status: Status,
        totals: &BTreeMap<String, u64>,
        previous: &BTreeMap<String, u64>,
        elapsed: Duration,
    ) -> View {
        let secs = elapsed.as_secs_f64();
        let clusters = totals
            .iter()
            .map(|(name, &total)| {
                let before = previous.get(name).copied().unwrap_or(total);
                let rate = if secs > 0.0 {
                    total.saturating_sub(before) as f64 / secs
                } else {
                    0.0
                };
                (name.clone(), (rate, total))
            })
            .collect();
        View {
            status: Some(status),
            clusters,
            error: None,
        }
    }

    /// Draws the view on `frame`.
    pub fn draw(&self, frame: &mut Frame) {
        let bold = Style::default().add_modifier(Modifier::BOLD);
        let workers = self.status.as_ref().map_or(0, |s| s.workers.len());
        let backends = self.status.as_ref().map_or(0, |s| s.backends.len());
        let areas = Layout::vertical([
            Constraint::Length(2),
            Constraint::Length(workers as u16 + 3),
            Constraint::Length(self.clusters.len() as u16 + 3),
            Constraint::Min(backends as u16 + 3),
        ])
        .split(frame.area());
        let head = match (&self.status, &self.error) {
            (_, Some(error)) => format!("lbctl top: {error} (q to quit)"),
            (Some(s), None) => format!(
                "lbd {} pid {} generation {} up {}s, config {} (q to quit)",
                s.version,
                s.pid,
                s.generation,
                s.uptime_secs,
                s.config.display()
            ),
            (None, None) => "lbctl top: waiting for lbd (q to quit)".to_owned(),
        };
        let cell = |i: usize| areas.get(i).copied().unwrap_or_default();
        frame.render_widget(Paragraph::new(Line::from(head)), cell(0));

        let rows = self.status.iter().flat_map(|s| &s.workers).map(|w| {
            Row::new(vec![
                Cell::from(w.index.to_string()),
                Cell::from(w.pid.map_or("-".to_owned(), |p| p.to_string())),
                Cell::from(w.state.to_string()),
                Cell::from(w.connections.map_or("-".to_owned(), |c| c.to_string())),
                Cell::from(w.restarts.to_string()),
            ])
        });
        let table = Table::new(rows, [Constraint::Length(10); 5])
            .header(Row::new(["worker", "pid", "state", "conns", "restarts"]).style(bold))
            .block(Block::default().borders(Borders::TOP).title("workers"));
        frame.render_widget(table, cell(1));

        let rows = self.clusters.iter().map(|(name, (rate, total))| {
            Row::new(vec![
                Cell::from(name.clone()),
                Cell::from(format!("{rate:.1}")),
                Cell::from(total.to_string()),
            ])
        });
        let table = Table::new(
            rows,
            [
                Constraint::Length(24),
                Constraint::Length(12),
                Constraint::Length(14),
            ],
        )
        .header(Row::new(["cluster", "req/s", "requests"]).style(bold))
        .block(Block::default().borders(Borders::TOP).title("clusters"));
        frame.render_widget(table, cell(2));

        let rows = self.status.iter().flat_map(|s| &s.backends).map(|b| {
            Row::new(vec![
                Cell::from(b.cluster.clone()),
                Cell::from(b.address.clone()),
                Cell::from(b.state.to_string()),
                Cell::from(b.check.clone()),
                Cell::from(b.ejected_by.to_string()),
            ])
        });
        let table = Table::new(
            rows,
            [
                Constraint::Length(16),
                Constraint::Length(24),
                Constraint::Length(10),
                Constraint::Length(20),
                Constraint::Length(8),
            ],
        )
        .header(Row::new(["cluster", "backend", "health", "check", "ejected"]).style(bold))
        .block(Block::default().borders(Borders::TOP).title("backends"));
        frame.render_widget(table, cell(3));
    }
}

/// One refresh: status and metrics from lbd.
fn snapshot(socket: &Path, timeout: Duration) -> Result<(Status, Vec<Sample>), String> {
    let ask = |verb: Verb| -> Result<Payload, String> {
        match client::call(socket, verb, timeout) {
            Ok(Ok(payload)) => Ok(payload),
            Ok(Err(refused)) => Err(refused),
            Err(e) => Err(e.to_string()),
        }
    };
    let status = match ask(Verb::Status)? {
        Payload::Status(status) => status,
        _ => return Err("lbd answered status with something else".to_owned()),
    };
    let samples = match ask(Verb::Metrics)? {
        Payload::Metrics(samples) => samples,
        _ => return Err("lbd answered metrics with something else".to_owned()),
    };
    Ok((status, samples))
}

/// Runs the live view until the user quits. `frames`: stop after that many refreshes (for
/// scripts); none: until `q`.
pub fn run(
    socket: &Path,
    timeout: Duration,
    interval: Duration,
    frames: Option<u64>,
) -> Result<(), CtlError> {
    // Fail before taking the terminal when lbd cannot be reached at all (exit 3), or refuses.
    if let Err(refused) = client::call(socket, Verb::Status, timeout)? {
        return Err(CtlError::Refused {
            verb: "status",
            message: refused,
        });
    }
    let mut terminal = ratatui::init();
    let outcome = live(&mut terminal, socket, timeout, interval, frames);
    ratatui::restore();
    outcome
}

fn live(
    terminal: &mut ratatui::DefaultTerminal,
    socket: &Path,
    timeout: Duration,
    interval: Duration,
    frames: Option<u64>,
) -> Result<(), CtlError> {
    let mut previous = BTreeMap::new();
    let mut previous_at = Instant::now();
    let mut view = View::default();
    let mut drawn = 0u64;
    loop {
        match snapshot(socket, timeout) {
            Ok((status, samples)) => {
                let totals = cluster_totals(&samples);
                let now = Instant::now();
                view = View::next(status, &totals, &previous, now - previous_at);
                previous = totals;
                previous_at = now;
            }
            Err(e) => view.error = Some(e),
        }
        terminal
            .draw(|frame| view.draw(frame))
            .map_err(|e| CtlError::Usage(format!("drawing on the terminal: {e}")))?;
        drawn += 1;
        if frames.is_some_and(|n| drawn >= n) {
            return Ok(());
        }
        let until = Instant::now() + interval;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            let ready = event::poll(left)
                .map_err(|e| CtlError::Usage(format!("reading the terminal: {e}")))?;
            if !ready {
                break;
            }
            if let Ok(Event::Key(key)) = event::read() {
                let ctrl_c =
                    key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
                if matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_config::protocol::{WorkerState, WorkerStatus};
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    fn sample(cluster: &str, class: &str, value: f64) -> Sample {
        Sample {
            name: "kakehi_cluster_requests_total".into(),
            labels: [("cluster", cluster), ("class", class)]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            value,
        }
    }

    #[test]
    fn rates_come_from_the_change_of_the_totals() {
        let before = cluster_totals(&[sample("app", "2xx", 100.0), sample("app", "5xx", 4.0)]);
        let after = cluster_totals(&[sample("app", "2xx", 300.0), sample("app", "5xx", 4.0)]);
        assert_eq!(after.get("app"), Some(&304));
        let status = Status {
            version: "0.1.0".into(),
            pid: 42,
            generation: 3,
            config: "/etc/kakehi/config.toml".into(),
            uptime_secs: 61,
            workers: vec![WorkerStatus {
                index: 0,
                pid: Some(4242),
                state: WorkerState::Running,
                connections: Some(7),
                restarts: 1,
            }],
            listeners: vec![],
            backends: vec![],
            sync: None,
        };
        let view = View::next(status, &after, &before, Duration::from_secs(2));
        assert_eq!(view.clusters.get("app"), Some(&(100.0, 304)));

        let mut terminal = Terminal::new(TestBackend::new(100, 20)).unwrap();
        terminal.draw(|f| view.draw(f)).unwrap();
        let screen: String = terminal
            .backend()
            .buffer()
            .content()
            .iter()
            .map(|c| c.symbol())
            .collect();
        for needle in ["generation 3", "4242", "running", "app", "100.0", "304"] {
            assert!(screen.contains(needle), "{needle} not on screen:\n{screen}");
        }
    }
}
