//! The end-to-end harness shared by every test file in `tests/`: it starts the real `lbd`
//! binary on ports it picks itself, talks raw HTTP/1.1 to it over `std::net::TcpStream`, and
//! stops it by pid.
//!
//! What it owns: free ports (bind `127.0.0.1:0` and drop, never handed out twice in one test
//! binary, with a retry when `lbd` still cannot bind), a unique temp dir per instance holding the
//! config and `lbd`'s stdout (the access log) and stderr, readiness by polling the listeners
//! (10 s deadline, no fixed sleeps), SIGTERM on drop (SIGKILL 5 s later), a small HTTP/1.1
//! response reader (Content-Length, chunked, close-delimited), `/proc/PID/status` memory
//! readings, and a `curl` runner that fails loudly when curl is missing. Every socket it opens
//! has read and write timeouts, so no test can hang. The origin servers come from lb-testkit;
//! the tests themselves decide what to send and what to expect.
//!
//! The parts: `lbd.rs` (the `lbd` under test), `procs.rs` (`/proc` readings, other processes),
//! `client.rs` (the HTTP/1.1 client), `bodies.rs` (the origin's byte pattern), `config.rs`
//! (config text), `ports.rs` (loopback addresses), `tempdir.rs`, `wait.rs` (polling with
//! deadlines), `logfmt.rs` (reading the access log), `curl.rs`, `wrk.rs`, `lbctl.rs` (the
//! external programs), `netns.rs` (network namespaces). Everything is re-exported here, so a
//! test file names `common::Lbd` wherever it lives.

// Test helpers: panicking on a broken setup is the point, and not every test binary uses every
// helper.
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod bodies;
mod certs;
mod client;
mod config;
mod curl;
mod h2load;
mod lbctl;
mod lbd;
mod logfmt;
mod netns;
mod ports;
mod procs;
mod tempdir;
mod wait;
mod wrk;

// Every part's items under `common::`, as when it was one file; not every test binary uses
// every part.
#[allow(unused_imports)]
pub use self::{
    bodies::*, certs::*, client::*, config::*, curl::*, h2load::*, lbctl::*, lbd::*, logfmt::*,
    netns::*, ports::*, procs::*, tempdir::*, wait::*, wrk::*,
};
