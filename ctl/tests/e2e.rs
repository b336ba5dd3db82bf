//! The lbctl binary against a small in-test server that speaks the command protocol: what it
//! sends for each verb, what it prints, and its exit status (0 ok, 1 refused, 2 usage,
//! 3 unreachable).

// Integration tests are compiled with cfg(test); saying so lets clippy.toml's test allowances
// (unwrap, panic, indexing) cover the helpers too, not only the #[test] functions.
#![cfg(test)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use lb_config::protocol::{
    encode, Applied, Decoder, ListenerStatus, Payload, Request, Response, Status, Verb, WorkerAck,
    WorkerState, WorkerStatus,
};
use lb_config::state::{BackendDef, Change, Edit, ListenerProtocolDef, State};

/// A directory of its own under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("lbctl-e2e-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A stand-in for lbd: answers each request with `answer`, and remembers the verbs.
struct FakeLbd {
    socket: PathBuf,
    received: Arc<Mutex<Vec<Verb>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    dir: TempDir,
}

fn answer(verb: &Verb) -> Result<Payload, String> {
    match verb {
        Verb::Status => Ok(Payload::Status(Status {
            version: "0.1.0".into(),
            pid: 4000,
            generation: 1,
            config: "/etc/kakehi/lb.toml".into(),
            uptime_secs: 61,
            workers: vec![WorkerStatus {
                index: 0,
                pid: Some(4001),
                state: WorkerState::Running,
                connections: Some(3),
                restarts: 0,
            }],
            listeners: vec![ListenerStatus {
                address: "127.0.0.1:8080".into(),
                protocol: ListenerProtocolDef::Http,
                frontends: 1,
            }],
            backends: Vec::new(),
            sync: None,
        })),
        Verb::StateDump => Ok(Payload::State(Box::new(state()))),
        Verb::Change(Edit::RemoveCluster { name }) => Err(format!(
            "there is no cluster named {name:?} (clusters: app)"
        )),
        Verb::Shutdown { .. } => {
            Err("refused: uid 1234 (pid 1) may not use this command socket".into())
        }
        Verb::Change(Edit::AddBackend { cluster, backend }) => Ok(Payload::Applied(Applied {
            changes: vec![Change::BackendAdded {
                cluster: cluster.clone(),
                backend: BackendDef::new(backend.address.clone()),
            }],
            workers: vec![ack(0, None), ack(1, None)],
        })),
        Verb::Change(Edit::DrainBackend { cluster, address }) => Ok(Payload::Applied(Applied {
            changes: vec![Change::BackendChanged {
                cluster: cluster.clone(),
                address: address.clone(),
                key: "draining".into(),
                old: None,
                new: Some("true".into()),
            }],
            workers: vec![ack(0, None), ack(1, Some("its channel is closed"))],
        })),
        other => Ok(Payload::Done {
            message: format!("done: {}", other.name()),
        }),
    }
}

fn ack(index: usize, error: Option<&str>) -> WorkerAck {
    WorkerAck {
        index,
        pid: Some(5000 + index as u32),
        error: error.map(str::to_owned),
    }
}

fn state() -> State {
    let text = "[[listeners]]\naddress = \"127.0.0.1:8080\"\n\n[clusters.app]\nfrontends = [ { address = \"127.0.0.1:8080\" } ]\nbackends = [ { address = \"127.0.0.1:9001\" } ]\n";
    State::from_toml(text, Path::new("/etc/kakehi/lb.toml")).unwrap()
}

impl FakeLbd {
    fn start() -> FakeLbd {
        let dir = TempDir::new();
        let socket = dir.0.join("lbd.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopping) = (Arc::clone(&received), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                if let Ok(stream) = stream {
                    serve(stream, &seen);
                }
            }
        });
        FakeLbd {
            socket,
            received,
            stop,
            thread: Some(thread),
            dir,
        }
    }

    fn received(&self) -> Vec<Verb> {
        self.received.lock().unwrap().clone()
    }
}

impl Drop for FakeLbd {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = UnixStream::connect(&self.socket);
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

/// One connection: each request in, its answer out, until the client closes.
fn serve(mut stream: UnixStream, seen: &Mutex<Vec<Verb>>) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut decoder = Decoder::<Request>::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut next = decoder.feed(&buf[..n]);
        while let Ok(Some(Request { id, verb })) = next {
            seen.lock().unwrap().push(verb.clone());
            let result = answer(&verb);
            stream
                .write_all(&encode(&Response { id, result }).unwrap())
                .unwrap();
            next = decoder.poll();
        }
    }
}

fn lbctl_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lbctl"))
        .args(["--timeout", "10"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn lbctl(lbd: &FakeLbd, args: &[&str]) -> Output {
    let mut all = vec!["--socket", lbd.socket.to_str().unwrap()];
    all.extend_from_slice(args);
    lbctl_in(&lbd.dir.0, &all)
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

#[track_caller]
fn assert_exit(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        stdout(out),
        stderr(out)
    );
}

#[test]
fn status_prints_tables_or_json() {
    let lbd = FakeLbd::start();
    let out = lbctl(&lbd, &["status"]);
    assert_exit(&out, 0);
    assert_eq!(
        stdout(&out),
        "lbd 0.1.0, pid 4000, generation 1, up 1m 1s\nconfig /etc/kakehi/lb.toml\n\n\
         WORKER  PID   STATE    CONNECTIONS  RESTARTS\n\
         0       4001  running  3            0\n\n\
         LISTENER        PROTOCOL  FRONTENDS\n\
         127.0.0.1:8080  http      1\n"
    );
    assert!(stderr(&out).is_empty());

    let out = lbctl(&lbd, &["status", "--json"]);
    assert_exit(&out, 0);
    let value: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(value["workers"][0]["pid"], 4001);
    assert_eq!(value["workers"][0]["state"], "running");
    assert_eq!(lbd.received(), [Verb::Status, Verb::Status]);
}

#[test]
fn a_change_prints_what_changed() {
    let lbd = FakeLbd::start();
    let out = lbctl(
        &lbd,
        &[
            "backend",
            "add",
            "--cluster",
            "app",
            "--address",
            "127.0.0.1:9003",
            "--weight",
            "2",
        ],
    );
    assert_exit(&out, 0);
    assert_eq!(
        stdout(&out),
        "+ backend 127.0.0.1:9003 (cluster app)\napplied by all 2 workers\n"
    );
    assert_eq!(
        lbd.received(),
        [Verb::Change(Edit::AddBackend {
            cluster: "app".into(),
            backend: BackendDef {
                weight: Some(2),
                ..BackendDef::new("127.0.0.1:9003")
            },
        })]
    );
}

#[test]
fn a_refusal_is_one_line_and_exit_1() {
    let lbd = FakeLbd::start();
    let out = lbctl(&lbd, &["cluster", "remove", "nope"]);
    assert_exit(&out, 1);
    assert!(stdout(&out).is_empty());
    assert_eq!(
        stderr(&out),
        "lbctl: cluster remove: there is no cluster named \"nope\" (clusters: app)\n"
    );
    // A refusal made by the socket itself (here, a peer check) says "refused" once.
    let out = lbctl(&lbd, &["shutdown"]);
    assert_exit(&out, 1);
    assert_eq!(
        stderr(&out),
        "lbctl: shutdown: uid 1234 (pid 1) may not use this command socket\n"
    );
}

#[test]
fn workers_that_did_not_apply_a_change_are_named() {
    let lbd = FakeLbd::start();
    let out = lbctl(
        &lbd,
        &[
            "backend",
            "drain",
            "--cluster",
            "app",
            "--address",
            "127.0.0.1:9001",
        ],
    );
    assert_exit(&out, 1);
    assert_eq!(
        stdout(&out),
        "~ backend 127.0.0.1:9001 (cluster app): draining: (unset) -> true\n"
    );
    assert_eq!(
        stderr(&out),
        "lbctl: the change was accepted, but 1 of 2 workers did not apply it: worker 1 (pid 5001): its channel is closed\n"
    );
}

#[test]
fn state_dump_is_a_config_file_and_save_sends_an_absolute_path() {
    let lbd = FakeLbd::start();
    let out = lbctl(&lbd, &["state", "dump"]);
    assert_exit(&out, 0);
    let dumped = stdout(&out);
    assert_eq!(dumped, state().to_toml());
    let file = lbd.dir.0.join("dumped.toml");
    std::fs::write(&file, &dumped).unwrap();
    let check = lbctl_in(&lbd.dir.0, &["config", "check", "dumped.toml"]);
    assert_exit(&check, 0);

    let out = lbctl(&lbd, &["state", "save", "saved.toml"]);
    assert_exit(&out, 0);
    assert_eq!(stdout(&out), "done: state save\n");
    let received = lbd.received();
    let Some(Verb::StateSave { path }) = received.last() else {
        panic!("{received:?}")
    };
    assert_eq!(path, &lbd.dir.0.join("saved.toml"));
}

#[test]
fn the_socket_can_come_from_the_config_file() {
    let lbd = FakeLbd::start();
    let config = lbd.dir.0.join("lb.toml");
    std::fs::write(
        &config,
        format!("command_socket = {:?}\n", lbd.socket.to_str().unwrap()),
    )
    .unwrap();
    let out = lbctl_in(
        &lbd.dir.0,
        &[
            "--config",
            config.to_str().unwrap(),
            "cluster",
            "list",
            "--json",
        ],
    );
    assert_exit(&out, 0);
    assert_eq!(lbd.received(), [Verb::ClusterList]);
}

#[test]
fn an_unreachable_lbd_is_exit_3_and_says_why() {
    let dir = TempDir::new();
    let missing = dir.0.join("none.sock");
    let out = lbctl_in(&dir.0, &["--socket", missing.to_str().unwrap(), "status"]);
    assert_exit(&out, 3);
    assert_eq!(
        stderr(&out),
        format!(
            "lbctl: cannot connect to lbd at {}: no such socket: is lbd running? (it creates the socket when it starts)\n",
            missing.display()
        )
    );

    // A socket file nobody answers on.
    let stale = dir.0.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    let out = lbctl_in(&dir.0, &["--socket", stale.to_str().unwrap(), "reload"]);
    assert_exit(&out, 3);
    assert!(
        stderr(&out).contains("lbd is not running"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn usage_errors_are_exit_2() {
    let dir = TempDir::new();
    let out = lbctl_in(&dir.0, &["backend", "add", "--cluster", "app"]);
    assert_exit(&out, 2);
    assert!(
        stderr(&out).contains("--address <ADDR>"),
        "{}",
        stderr(&out)
    );
    let out = lbctl_in(&dir.0, &["--config", "missing.toml", "status"]);
    assert_exit(&out, 2);
    assert!(stderr(&out).contains("or use --socket"), "{}", stderr(&out));
    let out = lbctl_in(&dir.0, &["--help"]);
    assert_exit(&out, 0);
}

#[test]
fn config_check_needs_no_lbd() {
    let dir = TempDir::new();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/examples");
    let good = examples.join("full.toml");
    let out = lbctl_in(&dir.0, &["config", "check", good.to_str().unwrap()]);
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("configuration is valid"));

    std::fs::write(
        dir.0.join("bad.toml"),
        "[[listeners]]\naddress = \"127.0.0.1:80\"\n\n[clusters.app]\nbackends = [ { address = \"localhost:9001\" } ]\n",
    )
    .unwrap();
    let out = lbctl_in(&dir.0, &["config", "check", "bad.toml"]);
    assert_exit(&out, 1);
    assert_eq!(
        stderr(&out),
        "lbctl: bad.toml:5:26: clusters.app.backends[0].address: \"localhost:9001\" is not a socket address: expected IP:PORT such as 127.0.0.1:8080 (or [::1]:8080); host names are not resolved\n"
    );
}

/// `lbctl completions bash` prints a script that bash loads and that completes verbs and
/// sub-verbs; zsh and fish scripts name lbctl; a shell clap does not know is a usage error.
#[test]
fn completions_complete_verbs_in_a_real_bash() {
    let dir = TempDir::new();
    let out = lbctl_in(&dir.0, &["completions", "bash"]);
    assert_exit(&out, 0);
    let script = dir.0.join("lbctl.bash");
    std::fs::write(&script, &out.stdout).unwrap();
    let complete = |words: &[&str]| -> Vec<String> {
        let line = words.join(" ");
        let program = format!(
            "source {}; COMP_WORDS=({line}); COMP_CWORD={}; COMP_LINE='{line}'; COMP_POINT={}; \
             _lbctl lbctl {} {}; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            script.display(),
            words.len() - 1,
            line.len(),
            words[words.len() - 1],
            words[words.len() - 2],
        );
        let out = Command::new("bash")
            .args(["-c", &program])
            .output()
            .unwrap();
        assert!(out.status.success(), "bash: {}", stderr(&out));
        stdout(&out).lines().map(str::to_owned).collect()
    };
    assert_eq!(complete(&["lbctl", "back"]), vec!["backend"]);
    assert_eq!(complete(&["lbctl", "backend", "d"]), vec!["drain"]);
    assert!(complete(&["lbctl", "up"]).contains(&"upgrade".to_owned()));
    for shell in ["zsh", "fish"] {
        let out = lbctl_in(&dir.0, &["completions", shell]);
        assert_exit(&out, 0);
        assert!(stdout(&out).contains("lbctl"), "{shell}");
    }
    let out = lbctl_in(&dir.0, &["completions", "csh"]);
    assert_exit(&out, 2);
}
