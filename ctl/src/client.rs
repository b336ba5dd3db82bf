//! One request, one answer: lbctl's side of the command socket.
//!
//! This module owns connecting to lbd's unix socket, sending a framed [`Request`] and reading
//! the [`Response`] with the same id, with a deadline. Its errors say which socket, and whether
//! lbd looks down (no socket, or nothing answering on it) or merely unreachable to this user.
//! The framing and decoding are `lb_config::protocol`'s; what to print is `render.rs`'s.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lb_config::protocol::{encode, Decoder, Payload, Request, Response, Verb};

/// Why no answer came from lbd.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to lbd at {}: {}", path.display(), connect_hint(error))]
    Connect {
        path: PathBuf,
        #[source]
        error: io::Error,
    },
    #[error("lost the connection to lbd at {}: {detail}", path.display())]
    Talk { path: PathBuf, detail: String },
    #[error("lbd at {} did not answer within {} s (use --timeout to wait longer)", path.display(), timeout.as_secs())]
    Timeout { path: PathBuf, timeout: Duration },
}

fn connect_hint(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::NotFound => {
            "no such socket: is lbd running? (it creates the socket when it starts)".to_owned()
        }
        io::ErrorKind::ConnectionRefused => {
            "nothing answers on it: lbd is not running (the socket file is left from an earlier run)"
                .to_owned()
        }
        io::ErrorKind::PermissionDenied => {
            "permission denied: the socket is private (mode 0600); run lbctl as root or as the user lbd runs as"
                .to_owned()
        }
        _ => format!("{error} (is lbd running?)"),
    }
}

/// Sends `verb` to the lbd listening on `socket` and returns its answer: `Ok(Err(line))` when
/// lbd refused the request.
pub fn call(
    socket: &Path,
    verb: Verb,
    timeout: Duration,
) -> Result<Result<Payload, String>, ClientError> {
    let talk = |detail: String| ClientError::Talk {
        path: socket.to_path_buf(),
        detail,
    };
    let mut stream = UnixStream::connect(socket).map_err(|error| ClientError::Connect {
        path: socket.to_path_buf(),
        error,
    })?;
    let request = Request { id: 1, verb };
    let frame = encode(&request).map_err(|e| talk(e.to_string()))?;
    stream
        .set_write_timeout(Some(timeout.max(Duration::from_millis(1))))
        .map_err(|e| talk(e.to_string()))?;
    stream.write_all(&frame).map_err(|e| talk(e.to_string()))?;

    let deadline = Instant::now() + timeout;
    let mut decoder = Decoder::<Response>::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ClientError::Timeout {
                path: socket.to_path_buf(),
                timeout,
            });
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| talk(e.to_string()))?;
        let n = match stream.read(&mut buffer) {
            Ok(0) => {
                return Err(talk(
                    "lbd closed the connection without answering (is it stopping?)".to_owned(),
                ))
            }
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(talk(e.to_string())),
        };
        let bytes = buffer.get(..n).unwrap_or_default();
        match decoder.feed(bytes) {
            Ok(None) => {}
            // Id 0: lbd refused the connection or the bytes before reading a request's id.
            Ok(Some(response)) if response.id == request.id || response.id == 0 => {
                return Ok(response.result)
            }
            Ok(Some(response)) => {
                return Err(talk(format!(
                    "answer for request {} while waiting for {}",
                    response.id, request.id
                )))
            }
            Err(e) => return Err(talk(format!("unreadable answer: {e}"))),
        }
    }
}
