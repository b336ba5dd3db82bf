//! What recording one request's figures costs a worker: `Stats::request` plus a backend
//! attempt and a connection's accept and close, the calls a keep-alive request through a
//! two-backend cluster makes, timed over many rounds. Not a test (no timing is asserted):
//! `cargo run --release -p lb-proxy --example stats_cost` prints ns per request, to compare
//! builds (issue 18: the `metrics` facade must cost a request nothing measurable).

use lb_proxy::accesslog::Record;
use lb_proxy::stats::Stats;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn main() {
    let listener: SocketAddr = "127.0.0.1:80".parse().unwrap_or_else(|_| unreachable!());
    let backends: [SocketAddr; 2] = [
        "127.0.0.1:9001".parse().unwrap_or_else(|_| unreachable!()),
        "127.0.0.1:9002".parse().unwrap_or_else(|_| unreachable!()),
    ];
    let mut stats = Stats::default();
    let rounds = 5_000_000u32;
    let mut best = Duration::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        for i in 0..rounds {
            let [even, odd] = backends;
            let backend = if i & 1 == 0 { even } else { odd };
            let ms = u64::from(i % 7);
            stats.attempt("app", backend, false, i % 100 == 0);
            stats.request(
                &Record {
                    request_id: "x",
                    client: listener,
                    listener,
                    cluster: "app",
                    backend: Some(backend),
                    method: "GET",
                    host: "app.test",
                    path: "/",
                    proto: "h1",
                    status: 200,
                    bytes_in: 73,
                    bytes_out: 143,
                    duration: Duration::from_micros(300 + ms * 100),
                    backend_time: Some(Duration::from_micros(200 + ms * 100)),
                    error: None,
                    client_cert: None,
                },
                true,
            );
            if i % 100 == 0 {
                stats.accepted(listener);
                stats.closed(listener);
            }
        }
        best = best.min(start.elapsed());
    }
    println!(
        "{:.1} ns per request recorded (best of 5 x {rounds})",
        best.as_nanos() as f64 / f64::from(rounds)
    );
}
