//! `[sync]`: several appliances share their lbctl changes and their health verdicts through
//! etcd (issue 17, part 2).
//!
//! Changes. Every lbctl change (`Verb::Change`, one `Edit`) this lbd accepts is written to
//! etcd under `PREFIX/changes/NAME-INSTANCE-SEQ`, with the appliance's name. Every lbd reads
//! the changes written since the revision it last read, in etcd's revision order, and applies
//! those of other lbd processes through the same path as its own (`verbs::apply_change`: the
//! edit applied to a copy of the running state, validated whole, pushed to the workers); a
//! refusal is recorded and changes nothing. The revision read last is carried across
//! `lbctl upgrade`, so nothing is applied twice; a freshly started lbd reads every change from
//! the start, its state being its file's. `lbctl status` lists the latest changes with where
//! each came from. Only `lbctl` changes travel: `reload` and `state load` stay local. File
//! paths in a change (a certificate, a CA) are read by each appliance.
//!
//! Health. Each lbd writes its verdict on each checked backend under
//! `PREFIX/health/NAME/...`, attached to a lease of [`LEASE_TTL`] it keeps alive, so the
//! verdicts of an appliance that stops vanish with it. A backend is down when a strict
//! majority of the appliances with a verdict on it say down (this lbd's own verdict is its
//! local one, fresher than etcd's copy): one appliance's view of a flapping network does not
//! take a backend out everywhere, and a backend that two of three find dead is out on all
//! three, whose Maglev tables then agree.
//!
//! etcd unreachable. A thread of lbd's main process (never a worker) speaks to etcd's JSON
//! gateway (`/v3/kv/...`, `/v3/lease/...`) over plain HTTP, one short request at a time with
//! timeouts, every [`POLL`]. When etcd does not answer, the appliance keeps serving its last
//! state and its own health verdicts; its changes wait in order and are written when etcd is
//! back, and it then reads what the others wrote meanwhile. `lbctl status` and
//! `kakehi_sync_connected` say so.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use lb_config::protocol::{SyncChange, SyncStatus};
use lb_config::state::Edit;
use lb_proxy::recorder::Recorder;
use metrics::{counter, gauge, Counter, Gauge};
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often the thread reads etcd.
const POLL: Duration = Duration::from_millis(200);
/// How long a request to etcd may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long after a failure the thread tries etcd again.
const RETRY: Duration = Duration::from_secs(1);
/// The lease of the health verdicts: an appliance gone for this long has no say.
const LEASE_TTL: u64 = 10;
/// How often the lease is renewed.
const KEEPALIVE: Duration = Duration::from_secs(3);
/// Changes `lbctl status` lists.
const RECENT: usize = 20;
/// The largest answer read from etcd.
const MAX_ANSWER: usize = 64 << 20;

/// A backend: (cluster, address).
pub type Key = (String, SocketAddr);

/// A change as stored in etcd.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Stored {
    origin: String,
    instance: String,
    at: u64,
    edit: Edit,
}

/// A change another lbd made, to apply here.
#[derive(Debug)]
pub struct Remote {
    pub revision: u64,
    pub origin: String,
    pub edit: Edit,
}

enum ToEtcd {
    Publish(Box<Stored>),
    Verdicts(BTreeMap<Key, bool>),
}

enum FromEtcd {
    /// A round went well; this lbd's changes written so far.
    Connected(u64),
    Failed(String),
    Change(Box<Remote>),
    /// Everything up to this revision has been read.
    Revision(u64),
    /// Every appliance's verdicts: name → backend → up.
    Health(BTreeMap<String, BTreeMap<Key, bool>>),
}

/// lbd main's end of the sync: what the thread reports, and what `lbctl status` shows.
pub struct Sync {
    settings: lb_config::Sync,
    instance: String,
    to_etcd: mpsc::Sender<ToEtcd>,
    from_etcd: mpsc::Receiver<FromEtcd>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    connected: bool,
    /// When `connected` last changed.
    since: Instant,
    last_error: Option<String>,
    revision: u64,
    /// Local changes sent to the thread, and known written to etcd.
    published: u64,
    written: u64,
    recent: VecDeque<SyncChange>,
    /// The other appliances' verdicts.
    others: BTreeMap<String, BTreeMap<Key, bool>>,
    /// The local verdicts last sent to the thread.
    sent: Option<BTreeMap<Key, bool>>,
    figures: Figures,
}

struct Figures {
    connected: Gauge,
    revision: Gauge,
    local: Counter,
    applied: Counter,
    refused: Counter,
}

impl Sync {
    /// Starts the thread; `revision` is where the previous lbd stopped reading (0: read
    /// every change).
    pub fn start(settings: &lb_config::Sync, revision: u64, recorder: &Recorder) -> Sync {
        let instance = instance_id();
        let (to_etcd, commands) = mpsc::channel();
        let (events, from_etcd) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let mut thread = Thread {
            client: Client {
                members: settings.etcd.clone(),
                next: 0,
            },
            changes: format!("{}/changes/", settings.prefix),
            health: format!("{}/health/", settings.prefix),
            name: settings.name.clone(),
            instance: instance.clone(),
            revision,
            queue: VecDeque::new(),
            changes_written: 0,
            verdicts: BTreeMap::new(),
            written: BTreeMap::new(),
            lease: None,
            commands,
            events,
            stop: Arc::clone(&stop),
        };
        let spawned = std::thread::Builder::new()
            .name("sync".into())
            .spawn(move || thread.run());
        let thread = spawned
            .map_err(|e| log::error!("sync: cannot start its thread: {e}"))
            .ok();
        let figures = recorder.register(|| Figures {
            connected: gauge!("kakehi_sync_connected"),
            revision: gauge!("kakehi_sync_revision"),
            local: counter!("kakehi_sync_changes_total", "origin" => "local", "result" => "written"),
            applied: counter!("kakehi_sync_changes_total", "origin" => "remote", "result" => "applied"),
            refused: counter!("kakehi_sync_changes_total", "origin" => "remote", "result" => "refused"),
        });
        log::info!(
            "sync: appliance {} with etcd {:?} under {}, from revision {revision}",
            settings.name,
            settings.etcd,
            settings.prefix
        );
        Sync {
            settings: settings.clone(),
            instance,
            to_etcd,
            from_etcd,
            stop,
            thread,
            connected: false,
            since: Instant::now(),
            last_error: None,
            revision,
            published: 0,
            written: 0,
            recent: VecDeque::new(),
            others: BTreeMap::new(),
            sent: None,
            figures,
        }
    }

    /// Everything read so far: the revision to hand the next lbd.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// What the thread reported since the last turn; the changes of other lbd processes, to
    /// apply in order.
    pub fn poll(&mut self) -> Vec<Remote> {
        let mut remote = Vec::new();
        while let Ok(event) = self.from_etcd.try_recv() {
            match event {
                FromEtcd::Connected(written) => {
                    if !self.connected {
                        log::warn!("sync: etcd reached");
                        self.connected = true;
                        self.since = Instant::now();
                        self.figures.connected.set(1.0);
                    }
                    self.written = written;
                }
                FromEtcd::Failed(e) => {
                    if self.connected || self.last_error.is_none() {
                        log::warn!(
                            "sync: etcd unreachable ({e}); serving the last state, changes wait"
                        );
                    }
                    if self.connected {
                        self.connected = false;
                        self.since = Instant::now();
                        self.figures.connected.set(0.0);
                    }
                    self.last_error = Some(e);
                }
                FromEtcd::Change(c) => remote.push(*c),
                FromEtcd::Revision(r) => {
                    self.revision = self.revision.max(r);
                    self.figures.revision.set(self.revision as f64);
                }
                FromEtcd::Health(all) => {
                    self.others = all;
                    self.others.remove(&self.settings.name);
                }
            }
        }
        remote
    }

    /// A change this lbd accepted from lbctl: written to etcd (now, or when it is back).
    pub fn publish(&mut self, edit: &Edit) {
        let stored = Stored {
            origin: self.settings.name.clone(),
            instance: self.instance.clone(),
            at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            edit: edit.clone(),
        };
        self.published += 1;
        self.figures.local.increment(1);
        self.record(SyncChange {
            revision: None,
            origin: format!("{} (this appliance)", self.settings.name),
            change: describe(edit),
            error: None,
        });
        let _ = self.to_etcd.send(ToEtcd::Publish(Box::new(stored)));
    }

    /// Another lbd's change was applied here (`error` None) or refused.
    pub fn applied(&mut self, change: &Remote, error: Option<String>) {
        match &error {
            None => {
                self.figures.applied.increment(1);
                log::info!(
                    "sync: applied {} from {} (revision {})",
                    describe(&change.edit),
                    change.origin,
                    change.revision
                );
            }
            Some(e) => {
                self.figures.refused.increment(1);
                log::warn!(
                    "sync: refused {} from {} (revision {}): {e}",
                    describe(&change.edit),
                    change.origin,
                    change.revision
                );
            }
        }
        self.record(SyncChange {
            revision: Some(change.revision),
            origin: change.origin.clone(),
            change: describe(&change.edit),
            error,
        });
    }

    fn record(&mut self, change: SyncChange) {
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(change);
    }

    /// The backends down once every appliance's verdict is counted: `local` is this lbd's
    /// (every checked backend, up or not). Without etcd, the local verdicts alone.
    pub fn down(&mut self, local: &BTreeMap<Key, bool>) -> Vec<Key> {
        if self.sent.as_ref() != Some(local) {
            let _ = self.to_etcd.send(ToEtcd::Verdicts(local.clone()));
            self.sent = Some(local.clone());
        }
        let others = if self.connected {
            &self.others
        } else {
            &BTreeMap::new()
        };
        combine(local, others)
    }

    pub fn status(&self) -> SyncStatus {
        SyncStatus {
            name: self.settings.name.clone(),
            prefix: self.settings.prefix.clone(),
            etcd: self
                .settings
                .etcd
                .iter()
                .map(|a| format!("http://{a}"))
                .collect(),
            connected: self.connected,
            since_secs: self.since.elapsed().as_secs(),
            last_error: self.last_error.clone(),
            revision: self.revision,
            pending: usize::try_from(self.published.saturating_sub(self.written))
                .unwrap_or(usize::MAX),
            appliances: self.others.keys().cloned().collect(),
            changes: self.recent.iter().cloned().collect(),
        }
    }
}

impl Drop for Sync {
    /// Stops the thread and waits for it: it revokes the lease, so this appliance's verdicts
    /// leave etcd now rather than after the lease's TTL.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A backend is down when a strict majority of the appliances that judge it say so.
pub fn combine(
    local: &BTreeMap<Key, bool>,
    others: &BTreeMap<String, BTreeMap<Key, bool>>,
) -> Vec<Key> {
    let mut votes: BTreeMap<&Key, (usize, usize)> = BTreeMap::new();
    for verdicts in std::iter::once(local).chain(others.values()) {
        for (key, up) in verdicts {
            let v = votes.entry(key).or_default();
            v.0 += 1;
            if !up {
                v.1 += 1;
            }
        }
    }
    votes
        .into_iter()
        .filter(|(_, (judges, down))| down * 2 > *judges)
        .map(|(key, _)| key.clone())
        .collect()
}

/// One line for a change: the lbctl command and what it names.
pub fn describe(edit: &Edit) -> String {
    let what = match edit {
        Edit::AddCluster { name, .. } | Edit::RemoveCluster { name } => name.clone(),
        Edit::AddBackend { cluster, backend } => format!("{cluster} {}", backend.address),
        Edit::RemoveBackend { cluster, address } | Edit::DrainBackend { cluster, address } => {
            format!("{cluster} {address}")
        }
        Edit::AddFrontend { cluster, frontend } | Edit::RemoveFrontend { cluster, frontend } => {
            format!(
                "{cluster} {} {}{}",
                frontend.address,
                frontend.hostname.as_deref().unwrap_or("*"),
                frontend.path.as_deref().unwrap_or("")
            )
        }
        Edit::AddListener { listener } => listener.address.clone(),
        Edit::RemoveListener { address }
        | Edit::AddCertificate { address, .. }
        | Edit::ReplaceCertificate { address, .. }
        | Edit::RemoveCertificate { address, .. }
        | Edit::SetClientCa { address, .. } => address.clone(),
    };
    format!("{} {what}", edit.name())
}

/// 16 random hex digits: this lbd process among every writer of the changes.
fn instance_id() -> String {
    let mut bytes = [0u8; 8];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = (nanos as u64 ^ u64::from(std::process::id()) << 32).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The thread that speaks to etcd.
struct Thread {
    client: Client,
    changes: String,
    health: String,
    name: String,
    instance: String,
    revision: u64,
    queue: VecDeque<Stored>,
    /// Changes of this lbd written to etcd.
    changes_written: u64,
    verdicts: BTreeMap<Key, bool>,
    /// The verdicts etcd holds, as this thread wrote them.
    written: BTreeMap<Key, bool>,
    /// The lease id and when it was last renewed.
    lease: Option<(i64, Instant)>,
    commands: mpsc::Receiver<ToEtcd>,
    events: mpsc::Sender<FromEtcd>,
    stop: Arc<AtomicBool>,
}

impl Thread {
    fn run(&mut self) {
        while !self.stop.load(Ordering::Relaxed) {
            loop {
                match self.commands.try_recv() {
                    Ok(ToEtcd::Publish(s)) => self.queue.push_back(*s),
                    Ok(ToEtcd::Verdicts(v)) => {
                        self.verdicts = v;
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    // lbd main is gone.
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            }
            let wait = match self.step() {
                Ok(()) => {
                    let _ = self.events.send(FromEtcd::Connected(self.changes_written));
                    POLL
                }
                Err(e) => {
                    let _ = self.events.send(FromEtcd::Failed(e));
                    self.client.next += 1;
                    RETRY
                }
            };
            std::thread::sleep(wait);
        }
        if let Some((id, _)) = self.lease {
            // The verdicts go with the lease, at once rather than after its TTL.
            let _ = self
                .client
                .call("/v3/lease/revoke", &json!({ "ID": id.to_string() }));
        }
    }

    /// One round: write what waits, keep the lease, read what changed.
    fn step(&mut self) -> Result<(), String> {
        while let Some(stored) = self.queue.front() {
            // The change's key is fixed by its place in this lbd's sequence, and it is only
            // created, never overwritten: a write retried after a lost answer adds nothing.
            let key = format!(
                "{}{}-{}-{:010}",
                self.changes,
                self.name,
                self.instance,
                self.changes_written + 1
            );
            let value = serde_json::to_string(stored).map_err(|e| e.to_string())?;
            self.client.create(&key, &value)?;
            self.queue.pop_front();
            self.changes_written += 1;
        }
        self.keep_lease()?;
        self.write_verdicts()?;
        self.read_changes()?;
        self.read_health()
    }

    fn keep_lease(&mut self) -> Result<(), String> {
        match self.lease {
            Some((id, renewed)) if renewed.elapsed() >= KEEPALIVE => {
                let answer = self
                    .client
                    .call("/v3/lease/keepalive", &json!({ "ID": id.to_string() }))?;
                // etcd answers a lease it no longer has with a TTL of 0 (or none).
                let ttl = number(answer.pointer("/result/TTL")).unwrap_or(0);
                if ttl > 0 {
                    self.lease = Some((id, Instant::now()));
                } else {
                    self.lease = None;
                }
            }
            Some(_) => {}
            None => {}
        }
        if self.lease.is_none() {
            let answer = self
                .client
                .call("/v3/lease/grant", &json!({ "TTL": LEASE_TTL.to_string() }))?;
            let id = number(answer.get("ID")).ok_or("etcd granted no lease")?;
            self.lease = Some((id as i64, Instant::now()));
            // The verdicts of the lost lease are gone from etcd.
            self.written.clear();
        }
        Ok(())
    }

    /// Writes the verdicts that changed since the last write (all of them on a new lease),
    /// and deletes those of backends no longer checked.
    fn write_verdicts(&mut self) -> Result<(), String> {
        let lease = self.lease.map(|(id, _)| id);
        let key =
            |(cluster, address): &Key| format!("{}{}/{cluster}/{address}", self.health, self.name);
        for (backend, up) in &self.verdicts {
            if self.written.get(backend) == Some(up) {
                continue;
            }
            let value = json!({ "cluster": backend.0, "backend": backend.1.to_string(), "up": up });
            self.client.put(&key(backend), &value.to_string(), lease)?;
            self.written.insert(backend.clone(), *up);
        }
        let gone: Vec<Key> = self
            .written
            .keys()
            .filter(|k| !self.verdicts.contains_key(*k))
            .cloned()
            .collect();
        for backend in gone {
            self.client.delete(&key(&backend))?;
            self.written.remove(&backend);
        }
        Ok(())
    }

    fn read_changes(&mut self) -> Result<(), String> {
        let (kvs, revision) = self.client.range_prefix(&self.changes, self.revision + 1)?;
        let mut kvs: Vec<(u64, String)> = kvs
            .into_iter()
            .map(|(_, value, modified)| (modified, value))
            .collect();
        kvs.sort_by_key(|(modified, _)| *modified);
        for (modified, value) in kvs {
            match serde_json::from_str::<Stored>(&value) {
                Ok(s) if s.instance == self.instance => {}
                Ok(s) => {
                    let _ = self.events.send(FromEtcd::Change(Box::new(Remote {
                        revision: modified,
                        origin: s.origin,
                        edit: s.edit,
                    })));
                }
                Err(e) => log::warn!("sync: change at revision {modified} skipped: {e}"),
            }
        }
        self.revision = self.revision.max(revision);
        let _ = self.events.send(FromEtcd::Revision(self.revision));
        Ok(())
    }

    fn read_health(&mut self) -> Result<(), String> {
        let (kvs, _) = self.client.range_prefix(&self.health, 0)?;
        let mut all: BTreeMap<String, BTreeMap<Key, bool>> = BTreeMap::new();
        for (key, value, _) in kvs {
            let Some(name) = key
                .strip_prefix(&self.health)
                .and_then(|rest| rest.split('/').next())
            else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(&value) else {
                continue;
            };
            let cluster = v.get("cluster").and_then(Value::as_str);
            let backend = v
                .get("backend")
                .and_then(Value::as_str)
                .and_then(|b| b.parse::<SocketAddr>().ok());
            let up = v.get("up").and_then(Value::as_bool);
            if let (Some(cluster), Some(backend), Some(up)) = (cluster, backend, up) {
                all.entry(name.to_string())
                    .or_default()
                    .insert((cluster.to_string(), backend), up);
            }
        }
        let _ = self.events.send(FromEtcd::Health(all));
        Ok(())
    }
}

/// An int64 of etcd's JSON (written as a string).
fn number(v: Option<&Value>) -> Option<u64> {
    match v? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

/// A key, its value and the revision it was last modified at.
type Kv = (String, String, u64);

/// etcd's JSON gateway, one HTTP/1.0 request per connection.
struct Client {
    members: Vec<SocketAddr>,
    /// The member tried first (the next one after a failure).
    next: usize,
}

impl Client {
    fn call(&self, path: &str, body: &Value) -> Result<Value, String> {
        let member = self
            .members
            .get(self.next % self.members.len().max(1))
            .copied()
            .ok_or("no etcd member")?;
        let fail = |what: &str, e: &dyn std::fmt::Display| format!("{member}: {what}: {e}");
        let mut stream = TcpStream::connect_timeout(&member, REQUEST_TIMEOUT)
            .map_err(|e| fail("connect", &e))?;
        stream
            .set_read_timeout(Some(REQUEST_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(REQUEST_TIMEOUT)))
            .map_err(|e| fail("socket", &e))?;
        let body = body.to_string();
        let request = format!(
            "POST {path} HTTP/1.0\r\nHost: {member}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream
            .write_all(request.as_bytes())
            .map_err(|e| fail("write", &e))?;
        let mut answer = Vec::new();
        stream
            .take(MAX_ANSWER as u64)
            .read_to_end(&mut answer)
            .map_err(|e| fail("read", &e))?;
        let text = String::from_utf8_lossy(&answer);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| fail("answer", &"no HTTP head"))?;
        let status = head.split_whitespace().nth(1).unwrap_or("");
        if status != "200" {
            return Err(fail(&format!("{path} answered {status}"), &body.trim()));
        }
        serde_json::from_str(body).map_err(|e| fail("answer", &e))
    }

    fn put(&self, key: &str, value: &str, lease: Option<i64>) -> Result<(), String> {
        let body = match lease {
            Some(id) => {
                json!({ "key": B64.encode(key), "value": B64.encode(value), "lease": id.to_string() })
            }
            None => json!({ "key": B64.encode(key), "value": B64.encode(value) }),
        };
        self.call("/v3/kv/put", &body).map(|_| ())
    }

    /// Puts `key` unless it exists (a transaction on its creation revision).
    fn create(&self, key: &str, value: &str) -> Result<(), String> {
        let key = B64.encode(key);
        let body = json!({
            "compare": [{ "key": key, "result": "EQUAL", "target": "CREATE", "create_revision": "0" }],
            "success": [{ "request_put": { "key": key, "value": B64.encode(value) } }],
        });
        self.call("/v3/kv/txn", &body).map(|_| ())
    }

    fn delete(&self, key: &str) -> Result<(), String> {
        self.call("/v3/kv/deleterange", &json!({ "key": B64.encode(key) }))
            .map(|_| ())
    }

    /// Every key under `prefix` modified at `min_revision` or later (0: all): (key, value,
    /// modification revision), and the store's revision at the time of the read.
    fn range_prefix(&self, prefix: &str, min_revision: u64) -> Result<(Vec<Kv>, u64), String> {
        let (key, end) = (B64.encode(prefix), B64.encode(prefix_end(prefix)));
        let body = if min_revision > 0 {
            json!({ "key": key, "range_end": end, "min_mod_revision": min_revision.to_string() })
        } else {
            json!({ "key": key, "range_end": end })
        };
        let answer = self.call("/v3/kv/range", &body)?;
        let revision = number(answer.pointer("/header/revision")).unwrap_or(0);
        let mut out = Vec::new();
        for kv in answer
            .get("kvs")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let text = |field: &str| {
                kv.get(field)
                    .and_then(Value::as_str)
                    .and_then(|s| B64.decode(s).ok())
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default()
            };
            let modified = number(kv.get("mod_revision")).unwrap_or(0);
            out.push((text("key"), text("value"), modified));
        }
        Ok((out, revision))
    }
}

/// The end of the range of keys that start with `prefix`: its last byte plus one.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u16) -> Key {
        ("app".into(), SocketAddr::from(([127, 0, 0, 1], n)))
    }

    #[test]
    fn a_backend_is_down_when_a_strict_majority_says_so() {
        let local: BTreeMap<Key, bool> = [(key(1), false), (key(2), false), (key(3), true)].into();
        let others: BTreeMap<String, BTreeMap<Key, bool>> = [
            (
                "b".to_string(),
                [(key(1), false), (key(2), true), (key(3), false)].into(),
            ),
            (
                "c".to_string(),
                [(key(1), true), (key(2), true), (key(3), false)].into(),
            ),
        ]
        .into();
        // 1: two of three down; 2: one of three; 3: two of three.
        assert_eq!(combine(&local, &others), vec![key(1), key(3)]);
        // Alone, its own verdicts.
        assert_eq!(combine(&local, &BTreeMap::new()), vec![key(1), key(2)]);
        // Two judges, one down: no majority.
        let one: BTreeMap<String, BTreeMap<Key, bool>> =
            [("b".to_string(), [(key(2), true)].into())].into();
        assert_eq!(combine(&local, &one), vec![key(1)]);
    }

    #[test]
    fn prefix_ends_are_the_next_key() {
        assert_eq!(prefix_end("/k/changes/"), b"/k/changes0".to_vec());
        assert_eq!(prefix_end("ab"), b"ac".to_vec());
    }
}
