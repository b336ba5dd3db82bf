//! The command socket: where `lbctl` talks to the supervisor.
//!
//! This module owns the unix socket at `command_socket` (its directory, a stale file left by a
//! dead lbd, mode 0600), the peer check (SO_PEERCRED against an allowed-uid list), the framing
//! and decoding of requests (`lb_config::protocol`), and every refusal that needs no state:
//! garbage bytes, another protocol version, an over-size frame, an unknown verb, a peer that is
//! not allowed, a verb whose feature does not exist yet. What a valid request *does* is the
//! supervisor's business, through [`Handler`].
//!
//! Threads: one acceptor thread, and one thread per connected lbctl (at most [`MAX_CLIENTS`]).
//! They never touch the supervisor's state. Each valid request goes through an mpsc channel
//! with its own reply channel; the supervisor answers them on its own thread when it calls
//! [`CommandServer::poll`] (or [`CommandServer::poll_timeout`], which can replace the sleep of
//! its loop), so its handler needs no lock and sees one request at a time. The supervisor is not
//! the data path: workers never see this socket (it is close-on-exec).

use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lb_config::protocol::{encode, Decoder, Payload, ProtocolError, Request, Response, Verb};

/// Connected lbctl clients served at once; one more is refused with a message.
pub const MAX_CLIENTS: usize = 16;
/// A connection with no complete request for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a connection thread looks at the stop flag while waiting for bytes.
const READ_SLICE: Duration = Duration::from_millis(200);
/// A client that does not read its answer for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the acceptor looks at the stop and pause flags.
const ACCEPT_SLICE: Duration = Duration::from_millis(100);
/// After a refusal that ends the connection, how long its unread bytes are drained.
const LINGER: Duration = Duration::from_secs(2);

/// What the supervisor implements: act on one request, on the supervisor's own thread.
///
/// An `Err` is the one line lbctl prints (its `Display`); a refused change must have changed
/// nothing.
pub trait Handler {
    type Error: std::fmt::Display;
    fn handle(&mut self, verb: Verb) -> Result<Payload, Self::Error>;
}

/// Why the command socket could not be set up. Each names the path and what to do.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot create {}, the directory of the command socket: {error}", dir.display())]
    CreateDir {
        dir: PathBuf,
        #[source]
        error: io::Error,
    },
    #[error("another lbd already answers on the command socket {}: stop it first, or set another command_socket", path.display())]
    InUse { path: PathBuf },
    #[error("{} exists and is not a socket: remove it, or set another command_socket", path.display())]
    NotASocket { path: PathBuf },
    #[error("cannot remove the stale command socket {}: {error}", path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        error: io::Error,
    },
    #[error("cannot bind the command socket {}: {error}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        error: io::Error,
    },
    #[error("cannot make the command socket {} private (mode 0600): {error}", path.display())]
    Permissions {
        path: PathBuf,
        #[source]
        error: io::Error,
    },
    #[error("cannot start the command socket thread: {error}")]
    Thread {
        #[source]
        error: io::Error,
    },
}

/// Who is on the other end of a connection, as the kernel says (SO_PEERCRED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerCred {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

/// The uids allowed by default: root, and the user lbd runs as.
pub fn default_allowed_uids() -> Vec<u32> {
    let me = nix::unistd::geteuid().as_raw();
    if me == 0 {
        vec![0]
    } else {
        vec![0, me]
    }
}

/// Whether `peer` may use the socket; the refusal says who was refused and who may.
pub fn check_peer(peer: &PeerCred, allowed: &[u32]) -> Result<(), String> {
    if allowed.contains(&peer.uid) {
        return Ok(());
    }
    let list: Vec<String> = allowed.iter().map(u32::to_string).collect();
    Err(format!(
        "refused: uid {} (pid {}) may not use this command socket; allowed uids: {} (root and the user lbd runs as)",
        peer.uid,
        peer.pid,
        list.join(", ")
    ))
}

fn peer_cred(stream: &UnixStream) -> io::Result<PeerCred> {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(io::Error::from)?;
    Ok(PeerCred {
        pid: cred.pid(),
        uid: cred.uid(),
        gid: cred.gid(),
    })
}

/// Stops a [`CommandServer`] from accepting new connections while it still answers the
/// requests it has: the upgrade uses it once the next lbd serves the same socket.
#[derive(Clone)]
pub struct Pauser(Arc<Shared>);

impl Pauser {
    /// Stops accepting, and waits (a bounded time) until the acceptor has seen it.
    pub fn pause(&self) {
        self.0.paused.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + ACCEPT_SLICE * 5;
        while !self.0.paused_seen.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// A valid request waiting for the supervisor, and where its answer goes.
struct Pending {
    verb: Verb,
    reply: SyncSender<Result<Payload, String>>,
}

/// What the acceptor and connection threads share.
struct Shared {
    stopping: AtomicBool,
    /// Set when an upgrade hands the socket to the next lbd: accept no more, but answer the
    /// requests already taken.
    paused: AtomicBool,
    /// Set by the acceptor once it has seen `paused` (it accepts nothing after that).
    paused_seen: AtomicBool,
    clients: AtomicUsize,
    allowed: Vec<u32>,
}

/// The running command socket. Dropping it stops the threads and removes the socket file.
pub struct CommandServer {
    path: PathBuf,
    listener: UnixListener,
    requests: Option<Receiver<Pending>>,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
    remove_on_stop: bool,
}

impl CommandServer {
    /// Creates the socket at `path` (and its directory), refusing to take over a socket some
    /// process still answers on, and starts accepting. Only peers whose uid is in `allowed`
    /// are served (see [`default_allowed_uids`]).
    pub fn bind(path: &Path, allowed: Vec<u32>) -> Result<CommandServer, CommandError> {
        prepare_path(path)?;
        let listener = UnixListener::bind(path).map_err(|error| CommandError::Bind {
            path: path.to_path_buf(),
            error,
        })?;
        // Between bind and chmod the file has the umask's mode; the uid check below holds
        // either way, the mode is a second fence.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
            |error| CommandError::Permissions {
                path: path.to_path_buf(),
                error,
            },
        )?;
        CommandServer::from_listener(listener, path, allowed)
    }

    /// Serves an already bound socket (one handed over by the previous lbd in an upgrade).
    pub fn from_listener(
        listener: UnixListener,
        path: &Path,
        allowed: Vec<u32>,
    ) -> Result<CommandServer, CommandError> {
        let (sender, requests) = mpsc::channel();
        let shared = Arc::new(Shared {
            stopping: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            paused_seen: AtomicBool::new(false),
            clients: AtomicUsize::new(0),
            allowed,
        });
        // Non-blocking, and the acceptor polls: during an upgrade two lbd processes hold this
        // socket, and the one that lost a connection to the other must not block in accept.
        listener
            .set_nonblocking(true)
            .map_err(|error| CommandError::Thread { error })?;
        let accepting = listener
            .try_clone()
            .map_err(|error| CommandError::Thread { error })?;
        let thread_shared = Arc::clone(&shared);
        let acceptor = std::thread::Builder::new()
            .name("lbd-command".to_owned())
            .spawn(move || accept_loop(&accepting, &sender, &thread_shared))
            .map_err(|error| CommandError::Thread { error })?;
        Ok(CommandServer {
            path: path.to_path_buf(),
            listener,
            requests: Some(requests),
            shared,
            acceptor: Some(acceptor),
            remove_on_stop: true,
        })
    }

    /// The listening socket, to hand to the next lbd in an upgrade.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// A handle that stops this server from accepting (see [`Pauser`]).
    pub fn pauser(&self) -> Pauser {
        Pauser(Arc::clone(&self.shared))
    }

    /// Answers every request already waiting, through `handler`; never blocks. Returns how
    /// many were handled.
    pub fn poll(&self, handler: &mut impl Handler) -> usize {
        let Some(requests) = &self.requests else {
            return 0;
        };
        let mut handled = 0;
        loop {
            match requests.try_recv() {
                Ok(pending) => {
                    answer(pending, handler);
                    handled += 1;
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return handled,
            }
        }
    }

    /// Waits up to `timeout` for a first request, then answers it and every other one waiting.
    /// The supervisor's loop can call this instead of sleeping.
    pub fn poll_timeout(&self, handler: &mut impl Handler, timeout: Duration) -> usize {
        let Some(requests) = &self.requests else {
            std::thread::sleep(timeout);
            return 0;
        };
        match requests.recv_timeout(timeout) {
            Ok(pending) => {
                answer(pending, handler);
                1 + self.poll(handler)
            }
            Err(RecvTimeoutError::Timeout) => 0,
            Err(RecvTimeoutError::Disconnected) => {
                // The acceptor is gone (it only stops when asked): nothing will ever arrive.
                std::thread::sleep(timeout);
                0
            }
        }
    }

    /// Stops accepting, lets every connection write the answers it already has, and removes
    /// the socket file. Requests not yet handled are answered "lbd is stopping".
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// Like [`stop`](CommandServer::stop), but keeps the socket file and returns the listening
    /// socket: the next lbd of an upgrade serves it from then on.
    pub fn handoff(mut self) -> io::Result<UnixListener> {
        self.remove_on_stop = false;
        let listener = self.listener.try_clone()?;
        self.shutdown();
        Ok(listener)
    }

    fn shutdown(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Waiting requests are dropped with their reply channels: their threads answer
        // "lbd is stopping" instead of waiting forever.
        self.requests = None;
        if let Some(acceptor) = self.acceptor.take() {
            // The acceptor polls with a timeout: it sees the flag within ACCEPT_SLICE.
            let _ = acceptor.join();
        }
        if self.remove_on_stop {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Drop for CommandServer {
    fn drop(&mut self) {
        if self.acceptor.is_some() {
            self.shutdown();
        }
    }
}

/// Runs the supervisor's handler for one request and sends the answer to its connection.
fn answer(pending: Pending, handler: &mut impl Handler) {
    let name = pending.verb.name();
    let result = handler.handle(pending.verb).map_err(|e| e.to_string());
    if let Err(e) = &result {
        log::info!("lbctl {name}: refused: {e}");
    }
    // The client may have gone; its answer has nowhere to go.
    let _ = pending.reply.send(result);
}

/// Makes room for the socket: its directory, and no stale file in the way.
fn prepare_path(path: &Path) -> Result<(), CommandError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|error| CommandError::CreateDir {
            dir: dir.to_path_buf(),
            error,
        })?;
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(error) => {
            return Err(CommandError::Bind {
                path: path.to_path_buf(),
                error,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(CommandError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    if UnixStream::connect(path).is_ok() {
        return Err(CommandError::InUse {
            path: path.to_path_buf(),
        });
    }
    log::info!("removing the stale command socket {}", path.display());
    std::fs::remove_file(path).map_err(|error| CommandError::RemoveStale {
        path: path.to_path_buf(),
        error,
    })
}

fn accept_loop(listener: &UnixListener, sender: &Sender<Pending>, shared: &Arc<Shared>) {
    use std::os::fd::AsFd;
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    loop {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        if shared.paused.load(Ordering::SeqCst) {
            shared.paused_seen.store(true, Ordering::SeqCst);
            std::thread::sleep(ACCEPT_SLICE);
            continue;
        }
        let mut ready = [nix::poll::PollFd::new(
            listener.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let timeout =
            nix::poll::PollTimeout::try_from(ACCEPT_SLICE).unwrap_or(nix::poll::PollTimeout::MAX);
        if !matches!(nix::poll::poll(&mut ready, timeout), Ok(n) if n > 0) {
            continue;
        }
        if shared.stopping.load(Ordering::SeqCst) || shared.paused.load(Ordering::SeqCst) {
            continue;
        }
        let accepted = listener.accept();
        connections.retain(|c| !c.is_finished());
        let mut stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // EMFILE and friends: wait a little instead of spinning.
                log::warn!("command socket: accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let _ = stream.set_write_timeout(Some(WRITE_TIMEOUT));
        if shared.clients.load(Ordering::SeqCst) >= MAX_CLIENTS {
            let message = format!(
                "refused: {MAX_CLIENTS} lbctl connections are already open; try again when one ends"
            );
            // Not on this thread: lingering here would stall every other client.
            let _ = send(&mut stream, 0, Err(message));
            let _ = stream.shutdown(std::net::Shutdown::Both);
            continue;
        }
        shared.clients.fetch_add(1, Ordering::SeqCst);
        let (sender, thread_shared) = (sender.clone(), Arc::clone(shared));
        let spawned = std::thread::Builder::new()
            .name("lbd-command-client".to_owned())
            .spawn(move || {
                serve_connection(stream, &sender, &thread_shared);
                thread_shared.clients.fetch_sub(1, Ordering::SeqCst);
            });
        match spawned {
            Ok(handle) => connections.push(handle),
            Err(e) => {
                shared.clients.fetch_sub(1, Ordering::SeqCst);
                log::warn!("command socket: cannot start a connection thread: {e}");
            }
        }
    }
    // Connections notice the stop flag within READ_SLICE, after writing what they have.
    for connection in connections {
        let _ = connection.join();
    }
}

/// Serves one lbctl connection until it closes, idles out, breaks the framing or lbd stops.
fn serve_connection(mut stream: UnixStream, sender: &Sender<Pending>, shared: &Shared) {
    match peer_cred(&stream) {
        Ok(peer) => {
            if let Err(message) = check_peer(&peer, &shared.allowed) {
                log::warn!("command socket: {message}");
                let _ = send(&mut stream, 0, Err(message));
                return linger_close(stream);
            }
        }
        Err(e) => {
            let message = format!("refused: cannot read the peer's credentials: {e}");
            log::warn!("command socket: {message}");
            let _ = send(&mut stream, 0, Err(message));
            return linger_close(stream);
        }
    }
    if stream.set_read_timeout(Some(READ_SLICE)).is_err() {
        return;
    }
    let mut decoder = Decoder::<Request>::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut last_request = Instant::now();
    loop {
        let n = match stream.read(&mut buffer) {
            Ok(0) => {
                if let Err(e) = decoder.finish() {
                    log::info!("command socket: {e}");
                }
                return;
            }
            Ok(n) => n,
            Err(e) if is_timeout(&e) => {
                if shared.stopping.load(Ordering::SeqCst) || last_request.elapsed() >= IDLE_TIMEOUT
                {
                    return;
                }
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut next = decoder.feed(buffer.get(..n).unwrap_or_default());
        loop {
            match next {
                Ok(None) => break,
                Ok(Some(request)) => {
                    last_request = Instant::now();
                    let result = dispatch(request.verb, sender, shared);
                    if send(&mut stream, request.id, result).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    log::info!("command socket: refused a request: {e}");
                    let id = e.id().unwrap_or(0);
                    if send(&mut stream, id, Err(format!("refused: {e}"))).is_err() {
                        return;
                    }
                    if e.is_fatal() {
                        return linger_close(stream);
                    }
                }
            }
            next = decoder.poll();
        }
        // Requests read while stopping were answered "lbd is stopping"; read no more.
        if shared.stopping.load(Ordering::SeqCst) {
            return linger_close(stream);
        }
    }
}

/// Closes after a refusal so that the refusal arrives: closing a unix socket with unread bytes
/// makes the peer's next read fail with ECONNRESET, answer lost. So stop writing, then read and
/// drop what the peer still sends, for a bounded time.
fn linger_close(mut stream: UnixStream) {
    let _ = stream.shutdown(std::net::Shutdown::Write);
    if stream.set_read_timeout(Some(READ_SLICE)).is_err() {
        return;
    }
    let deadline = Instant::now() + LINGER;
    let mut sink = [0u8; 16 * 1024];
    while Instant::now() < deadline {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Hands a valid request to the supervisor and waits for its answer.
fn dispatch(verb: Verb, sender: &Sender<Pending>, shared: &Shared) -> Result<Payload, String> {
    if shared.stopping.load(Ordering::SeqCst) {
        return Err("lbd is stopping: the request was not run".to_owned());
    }
    let (reply, answer) = mpsc::sync_channel(1);
    sender
        .send(Pending { verb, reply })
        .map_err(|_| "lbd is stopping: the request was not run".to_owned())?;
    answer
        .recv()
        .unwrap_or_else(|_| Err("lbd is stopping: the request was not run".to_owned()))
}

/// Writes one response; an answer too large for a frame becomes an error saying so.
fn send(stream: &mut UnixStream, id: u64, result: Result<Payload, String>) -> io::Result<()> {
    let frame = match encode(&Response { id, result }) {
        Ok(frame) => frame,
        Err(e @ (ProtocolError::TooLarge { .. } | ProtocolError::Encode { .. })) => {
            let result = Err(format!("the answer cannot be sent: {e}"));
            encode(&Response { id, result }).map_err(io::Error::other)?
        }
        Err(e) => return Err(io::Error::other(e)),
    };
    stream.write_all(&frame)?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_config::protocol::{MAX_FRAME, VERSION};
    use lb_config::state::Edit;
    use std::sync::atomic::AtomicU32;

    /// A handler that records what reached it.
    #[derive(Default)]
    struct Fake {
        calls: Vec<Verb>,
    }

    impl Handler for Fake {
        type Error = String;

        fn handle(&mut self, verb: Verb) -> Result<Payload, String> {
            self.calls.push(verb.clone());
            match verb {
                Verb::Change(Edit::RemoveCluster { name }) => {
                    Err(format!("there is no cluster named {name:?}"))
                }
                _ => Ok(Payload::Done {
                    message: format!("did {}", verb.name()),
                }),
            }
        }
    }

    /// A fresh directory under the system's temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::SeqCst);
            let dir = std::env::temp_dir().join(format!("lbd-cmd-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            TempDir(dir)
        }

        fn socket(&self) -> PathBuf {
            self.0.join("run").join("lbd.sock")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn me() -> Vec<u32> {
        vec![nix::unistd::geteuid().as_raw()]
    }

    fn connect(path: &Path) -> UnixStream {
        let stream = UnixStream::connect(path).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
    }

    fn frame(version: u8, body: &[u8]) -> Vec<u8> {
        let mut out = ((body.len() + 1) as u32).to_be_bytes().to_vec();
        out.push(version);
        out.extend_from_slice(body);
        out
    }

    /// Reads one response; None when the server closed the connection first.
    fn read_response(stream: &mut UnixStream) -> Option<Response> {
        let mut decoder = Decoder::<Response>::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).unwrap();
            if n == 0 {
                return None;
            }
            if let Some(response) = decoder.feed(&buf[..n]).unwrap() {
                return Some(response);
            }
        }
    }

    fn request(stream: &mut UnixStream, id: u64, verb: Verb) {
        stream
            .write_all(&encode(&Request { id, verb }).unwrap())
            .unwrap();
    }

    fn refusal(response: Option<Response>) -> (u64, String) {
        let response = response.expect("an answer before the close");
        match response.result {
            Err(e) => (response.id, e),
            Ok(p) => panic!("expected a refusal, got {p:?}"),
        }
    }

    #[test]
    fn a_valid_request_reaches_the_handler_and_its_answer_comes_back() {
        let dir = TempDir::new();
        let server = CommandServer::bind(&dir.socket(), me()).unwrap();
        let mut handler = Fake::default();
        let mut client = connect(&dir.socket());

        request(&mut client, 41, Verb::Status);
        assert_eq!(
            server.poll_timeout(&mut handler, Duration::from_secs(10)),
            1
        );
        let response = read_response(&mut client).unwrap();
        assert_eq!(response.id, 41);
        assert_eq!(
            response.result,
            Ok(Payload::Done {
                message: "did status".into()
            })
        );

        // A refusal from the handler keeps the connection usable.
        request(
            &mut client,
            42,
            Verb::Change(Edit::RemoveCluster { name: "x".into() }),
        );
        server.poll_timeout(&mut handler, Duration::from_secs(10));
        let (id, e) = refusal(read_response(&mut client));
        assert_eq!((id, e.as_str()), (42, "there is no cluster named \"x\""));
        assert_eq!(handler.calls.len(), 2);
        server.stop();
        assert!(!dir.socket().exists(), "stop removes the socket file");
    }

    /// Sends `bytes`, reads the answer; the handler must never be asked anything.
    fn refused(bytes: &[u8]) -> (u64, String, UnixStream, CommandServer, TempDir) {
        let dir = TempDir::new();
        let server = CommandServer::bind(&dir.socket(), me()).unwrap();
        let mut handler = Fake::default();
        let mut client = connect(&dir.socket());
        client.write_all(bytes).unwrap();
        let (id, e) = refusal(read_response(&mut client));
        assert_eq!(server.poll(&mut handler), 0);
        assert!(handler.calls.is_empty(), "the handler was called");
        (id, e, client, server, dir)
    }

    #[test]
    fn garbage_bytes_are_refused_without_the_handler() {
        let (id, e, mut client, _server, _dir) = refused(&frame(VERSION, b"\xff\xfegarbage"));
        assert_eq!(id, 0);
        assert!(e.starts_with("refused: the message is not JSON"), "{e}");
        // The framing was intact: the connection goes on.
        request(
            &mut client,
            5,
            Verb::Change(Edit::RemoveCluster { name: "x".into() }),
        );
        _server.poll_timeout(&mut Fake::default(), Duration::from_secs(10));
        let (id, e) = refusal(read_response(&mut client));
        assert_eq!(id, 5);
        assert!(e.contains("there is no cluster named"), "{e}");
    }

    #[test]
    fn a_future_protocol_version_is_refused() {
        let body = serde_json::to_vec(&Request {
            id: 1,
            verb: Verb::Status,
        })
        .unwrap();
        let (_, e, _, _, _) = refused(&frame(VERSION + 1, &body));
        assert!(e.contains("protocol version 2 is newer"), "{e}");
    }

    #[test]
    fn a_too_large_frame_is_refused_and_the_connection_closed() {
        let len = (MAX_FRAME as u32 + 1).to_be_bytes();
        let (_, e, mut client, _server, _dir) = refused(&len);
        assert!(e.contains("limit is 1048576 bytes"), "{e}");
        assert_eq!(read_response(&mut client), None);
    }

    #[test]
    fn an_unknown_verb_is_refused_with_its_id() {
        let (id, e, _, _, _) = refused(&frame(VERSION, br#"{"id":12,"verb":"self_destruct"}"#));
        assert_eq!(id, 12);
        assert!(e.contains("unknown variant `self_destruct`"), "{e}");
    }

    #[test]
    fn a_peer_whose_uid_is_not_allowed_is_refused() {
        let peer = PeerCred {
            pid: 4242,
            uid: 1001,
            gid: 1001,
        };
        let e = check_peer(&peer, &[0, 998]).unwrap_err();
        assert_eq!(
            e,
            "refused: uid 1001 (pid 4242) may not use this command socket; allowed uids: 0, 998 (root and the user lbd runs as)"
        );
        assert!(check_peer(&PeerCred { uid: 998, ..peer }, &[0, 998]).is_ok());
        assert!(default_allowed_uids().contains(&0));

        // Over a real socket: this process's uid is not in the list.
        let dir = TempDir::new();
        let stranger = vec![nix::unistd::geteuid().as_raw().wrapping_add(1)];
        let server = CommandServer::bind(&dir.socket(), stranger).unwrap();
        let mut handler = Fake::default();
        let mut client = connect(&dir.socket());
        request(&mut client, 1, Verb::Shutdown { hard: true });
        let (id, e) = refusal(read_response(&mut client));
        assert_eq!(id, 0);
        assert!(e.contains("may not use this command socket"), "{e}");
        assert_eq!(read_response(&mut client), None, "then closed");
        assert_eq!(server.poll(&mut handler), 0);
        assert!(handler.calls.is_empty());
    }

    #[test]
    fn the_socket_is_private_and_a_stale_one_is_replaced() {
        let dir = TempDir::new();
        let path = dir.socket();
        // A socket file nobody answers on: left by a dead lbd.
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let server = CommandServer::bind(&path, me()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        // A live one is not taken over.
        let e = CommandServer::bind(&path, me()).err().unwrap();
        assert!(matches!(e, CommandError::InUse { .. }), "{e}");
        assert!(e.to_string().contains("another lbd already answers"), "{e}");
        drop(server);
        assert!(!path.exists(), "drop removes the socket file");

        std::fs::write(&path, "not a socket").unwrap();
        let e = CommandServer::bind(&path, me()).err().unwrap();
        assert!(matches!(e, CommandError::NotASocket { .. }), "{e}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket");
    }

    #[test]
    fn requests_left_when_lbd_stops_are_answered() {
        let dir = TempDir::new();
        let server = CommandServer::bind(&dir.socket(), me()).unwrap();
        let mut client = connect(&dir.socket());
        request(&mut client, 9, Verb::Reload);
        // The request is queued for the supervisor, which goes away without answering it (as
        // `stop` drops the queue).
        let queue = server.requests.as_ref().unwrap();
        let pending = queue.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(pending.verb, Verb::Reload);
        drop(pending);
        let (id, e) = refusal(read_response(&mut client));
        assert_eq!(id, 9);
        assert!(e.contains("lbd is stopping"), "{e}");

        // Stopping ends the idle connection (within READ_SLICE) instead of waiting for it.
        server.stop();
        assert_eq!(read_response(&mut client), None);
        assert!(!dir.socket().exists());
    }

    #[test]
    fn a_handed_off_socket_keeps_its_file_and_serves_again() {
        let dir = TempDir::new();
        let server = CommandServer::bind(&dir.socket(), me()).unwrap();
        let listener = server.handoff().unwrap();
        assert!(dir.socket().exists());
        let next = CommandServer::from_listener(listener, &dir.socket(), me()).unwrap();
        let mut client = connect(&dir.socket());
        request(&mut client, 2, Verb::Metrics);
        let mut handler = Fake::default();
        next.poll_timeout(&mut handler, Duration::from_secs(10));
        assert!(read_response(&mut client).unwrap().result.is_ok());
    }
}
