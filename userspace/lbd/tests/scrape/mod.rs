//! Reading lbd's Prometheus endpoint in tests: a plain HTTP GET, parsed by a real Prometheus
//! text parser (prometheus-parse), and lookups of one sample by name and labels.

#![allow(dead_code)]

use prometheus_parse::{HistogramCount, Scrape, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// GET /metrics on `addr`: the status and the body. lbd binds the address once its workers
/// are up, so a refused connect is tried again for a few seconds.
pub fn get_metrics(addr: SocketAddr) -> (u16, String) {
    let end = Instant::now() + Duration::from_secs(5);
    let mut s = loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < end => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("connecting to the metrics address {addr}: {e}"),
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: prometheus\r\nAccept: text/plain\r\n\r\n")
        .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(length, body.len(), "Content-Length matches the body");
    (status, body.to_string())
}

/// The parsed scrape of `addr`.
pub fn scrape(addr: SocketAddr) -> Scrape {
    let (status, body) = get_metrics(addr);
    assert_eq!(status, 200, "{body}");
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap()
}

/// The value of the counter or gauge `name` whose labels include `labels`, summed over the
/// samples that match (None when none does).
pub fn value(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for s in &scrape.samples {
        if s.metric != name || !labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)) {
            continue;
        }
        let v = match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            other => panic!("{name} is not a counter or gauge: {other:?}"),
        };
        *found.get_or_insert(0.0) += v;
    }
    found
}

/// The buckets of each histogram `name` whose labels include `labels`.
fn histograms<'a>(
    scrape: &'a Scrape,
    name: &'a str,
    labels: &'a [(&str, &str)],
) -> impl Iterator<Item = &'a [HistogramCount]> {
    scrape.samples.iter().filter_map(move |s| match &s.value {
        Value::Histogram(buckets)
            if s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)) =>
        {
            Some(buckets.as_slice())
        }
        _ => None,
    })
}

/// The observations at most `bound` of the histograms `name` whose labels include `labels`
/// (that bucket, summed).
pub fn histogram_bucket(
    scrape: &Scrape,
    name: &str,
    labels: &[(&str, &str)],
    bound: f64,
) -> Option<f64> {
    let mut found = None;
    for buckets in histograms(scrape, name, labels) {
        if let Some(b) = buckets.iter().find(|b| b.less_than == bound) {
            *found.get_or_insert(0.0) += b.count;
        }
    }
    found
}

/// The observations of the histograms `name` whose labels include `labels` (their +Inf
/// buckets, summed), after checking that each one's buckets are cumulative.
pub fn histogram_count(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for buckets in histograms(scrape, name, labels) {
        let mut last = 0.0;
        for b in buckets {
            assert!(b.count >= last, "buckets are cumulative: {buckets:?}");
            last = b.count;
        }
        let inf = buckets
            .iter()
            .find(|b| b.less_than.is_infinite())
            .map(|b| b.count);
        *found.get_or_insert(0.0) += inf.expect("a +Inf bucket");
    }
    found
}
