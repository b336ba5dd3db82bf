//! lb-proxy: the data path of a kakehi worker.
//!
//! A [`Worker`] runs one single-threaded mio event loop over already-bound listeners: it
//! accepts connections, parses HTTP/1.1 with kawa (`http`), routes each request to a cluster
//! (`router`), picks a backend (`balancer`), and streams bytes both ways through two pooled
//! buffers per connection (`session`, `pool`). It never links aya or clap: binding sockets,
//! sandboxing and supervision belong to `lbd`.

pub mod accesslog;
pub mod backend;
pub mod balancer;
pub mod http;
pub mod pool;
pub mod router;
pub mod session;
pub mod timer;
pub mod worker;

pub use worker::{LiveGauge, Worker, WorkerError};
