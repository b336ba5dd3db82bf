//! lb-proxy: the data path of a kakehi worker.
//!
//! A [`Worker`] runs one single-threaded mio event loop over already-bound listeners: it
//! accepts connections, parses HTTP/1.1 with kawa (`http`), routes each request to a cluster
//! (`router`), picks a backend (`balancer`), and streams bytes both ways through two pooled
//! buffers per connection: the exchange machine (`http::exchange`, socket-free, also driven in
//! memory by the tests and fuzz targets through `http::memory`) over the sockets of `session`,
//! with buffers from `pool`. On `tcp` listeners it forwards bytes instead
//! (`tcp`), to the cluster its frontends name (`tcp_routes`), optionally chosen by the TLS
//! server name read from the ClientHello (`sni`), with PROXY protocol headers accepted from a
//! load balancer in front and sent to backends (`proxy_protocol`), zero-copy through pipes
//! (`splice`). On https listeners it terminates TLS with rustls (`tls`). `h2` is HTTP/2: the
//! frames, header blocks and HPACK, the client connection whose streams each drive one
//! exchange (`h2::conn`), and h2c to the backends of `http2 = true` clusters (`h2::backend`).
//! It never
//! links aya or clap: binding sockets, sandboxing and supervision belong to `lbd`.

#![forbid(unsafe_code)]

pub mod accesslog;
pub mod back_stream;
pub mod balancer;
pub mod conn;
pub mod cut;
pub mod cx;
pub mod h2;
pub mod http;
pub mod idle_backends;
pub mod maglev;
pub mod orders;
pub mod pool;
pub mod proxied;
pub mod proxy_protocol;
pub mod rate_limit;
pub mod recorder;
pub mod router;
pub mod session;
pub mod sni;
pub mod splice;
pub mod stats;
pub mod tcp;
pub mod tcp_routes;
pub mod tickets;
pub mod timer;
pub mod tls;
mod tls_front;
pub mod worker;

#[cfg(test)]
mod turns;

pub use worker::{LiveGauge, Worker, WorkerError};
