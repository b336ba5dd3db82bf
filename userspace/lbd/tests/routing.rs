//! Routing end to end: which cluster a request reaches through a real `lbd`, for each kind of
//! frontend rule — exact, wildcard and regex hostnames; prefix, exact and regex paths; methods —
//! plus the precedence between them (longest prefix wins) and the 404 for a request no frontend
//! matches. Every cluster has its own test origin, named after the cluster, and the origin's
//! answer (`origin NAME: METHOD TARGET`) tells which one served the request.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use common::{exchange, get, Lbd, Response};
use lb_testkit::Origin;

/// The clusters of the routing config: name → (frontends as TOML inline tables with `{L}`
/// standing for the listener address).
const CLUSTERS: &[(&str, &[&str])] = &[
    (
        "exact",
        &[r#"{ address = "{L}", hostname = "exact.test" }"#],
    ),
    (
        "wild",
        &[r#"{ address = "{L}", hostname = "*.wild.test" }"#],
    ),
    (
        "regex_host",
        &[r#"{ address = "{L}", hostname = "~^api[0-9]+\\.re\\.test$" }"#],
    ),
    (
        "root",
        &[r#"{ address = "{L}", hostname = "paths.test", path = "/" }"#],
    ),
    (
        "prefix",
        &[r#"{ address = "{L}", hostname = "paths.test", path = "/static" }"#],
    ),
    (
        "exact_path",
        &[r#"{ address = "{L}", hostname = "paths.test", path = "/exact", path_type = "exact" }"#],
    ),
    (
        "api",
        &[r#"{ address = "{L}", hostname = "paths.test", path = "/api" }"#],
    ),
    (
        "api_v2",
        &[r#"{ address = "{L}", hostname = "paths.test", path = "/api/v2" }"#],
    ),
    (
        "regex_path",
        &[
            r#"{ address = "{L}", hostname = "regexpath.test", path = "^/re/[0-9]+$", path_type = "regex" }"#,
        ],
    ),
    (
        "post_only",
        &[r#"{ address = "{L}", hostname = "method.test", path = "/", method = "POST" }"#],
    ),
    (
        "any_method",
        &[r#"{ address = "{L}", hostname = "method.test", path = "/" }"#],
    ),
];

struct Setup {
    lbd: Lbd,
    origins: BTreeMap<&'static str, Origin>,
}

fn setup() -> Setup {
    let origins: BTreeMap<&'static str, Origin> = CLUSTERS
        .iter()
        .map(|(name, _)| (*name, Origin::start(name)))
        .collect();
    let lbd = Lbd::start(|l: SocketAddr| {
        let mut text = format!("[[listeners]]\naddress = \"{l}\"\n");
        for (name, fronts) in CLUSTERS {
            let fronts: Vec<String> = fronts
                .iter()
                .map(|f| f.replace("{L}", &l.to_string()))
                .collect();
            text.push_str(&format!(
                "\n[clusters.{name}]\nfrontends = [ {} ]\nbackends = [ {{ address = \"{}\" }} ]\n",
                fronts.join(", "),
                origins[name].addr()
            ));
        }
        text
    });
    Setup { lbd, origins }
}

/// The origin that served `resp` (from its `origin NAME: ...` body).
fn served_by(resp: &Response) -> String {
    assert_eq!(
        resp.status,
        200,
        "expected a 200 from an origin, got {} {:?}",
        resp.status,
        resp.text()
    );
    let text = resp.text();
    text.strip_prefix("origin ")
        .and_then(|t| t.split(':').next())
        .unwrap_or_else(|| panic!("not an origin's answer: {text:?}"))
        .to_owned()
}

fn route(s: &Setup, host: &str, path: &str) -> String {
    served_by(&get(s.lbd.addr(), host, path))
}

fn assert_not_found(s: &Setup, host: &str, path: &str) {
    let resp = get(s.lbd.addr(), host, path);
    assert_eq!(
        resp.status,
        404,
        "Host {host} path {path}: expected 404, got {} {:?}",
        resp.status,
        resp.text()
    );
    resp.assert_html_answer(&[404]);
}

#[test]
fn exact_hostname() {
    let s = setup();
    assert_eq!(route(&s, "exact.test", "/"), "exact");
    // Case-insensitive, port ignored.
    assert_eq!(route(&s, "EXACT.Test", "/x"), "exact");
    assert_eq!(route(&s, "exact.test:8080", "/x"), "exact");
    assert_not_found(&s, "sub.exact.test", "/");
    assert_not_found(&s, "exact.test.evil", "/");
    assert_eq!(s.origins["exact"].requests().len(), 3);
}

#[test]
fn wildcard_hostname() {
    let s = setup();
    assert_eq!(route(&s, "a.wild.test", "/"), "wild");
    assert_eq!(route(&s, "a.b.wild.test", "/"), "wild");
    assert_eq!(route(&s, "A.WILD.TEST:81", "/"), "wild");
    assert_not_found(&s, "wild.test", "/");
    assert_not_found(&s, "notwild.test", "/");
}

#[test]
fn regex_hostname() {
    let s = setup();
    assert_eq!(route(&s, "api1.re.test", "/"), "regex_host");
    assert_eq!(route(&s, "api42.re.test", "/x"), "regex_host");
    assert_not_found(&s, "apix.re.test", "/");
    assert_not_found(&s, "xapi1.re.test", "/");
}

#[test]
fn path_prefix() {
    let s = setup();
    assert_eq!(route(&s, "paths.test", "/static"), "prefix");
    assert_eq!(route(&s, "paths.test", "/static/app.js"), "prefix");
    assert_eq!(route(&s, "paths.test", "/static/app.js?v=1"), "prefix");
    assert_eq!(route(&s, "paths.test", "/other"), "root");
    assert_eq!(route(&s, "paths.test", "/"), "root");
    // The origin sees the target unchanged.
    let targets: Vec<String> = s.origins["prefix"]
        .requests()
        .into_iter()
        .map(|r| r.target)
        .collect();
    assert_eq!(
        targets,
        ["/static", "/static/app.js", "/static/app.js?v=1"].map(String::from)
    );
}

#[test]
fn path_exact() {
    let s = setup();
    assert_eq!(route(&s, "paths.test", "/exact"), "exact_path");
    assert_eq!(route(&s, "paths.test", "/exact?q=1"), "exact_path");
    assert_eq!(route(&s, "paths.test", "/exact/more"), "root");
    assert_eq!(route(&s, "paths.test", "/exactly"), "root");
}

#[test]
fn path_regex() {
    let s = setup();
    assert_eq!(route(&s, "regexpath.test", "/re/123"), "regex_path");
    assert_eq!(route(&s, "regexpath.test", "/re/7?x=y"), "regex_path");
    assert_not_found(&s, "regexpath.test", "/re/abc");
    assert_not_found(&s, "regexpath.test", "/re/123/more");
}

#[test]
fn longest_prefix_wins() {
    let s = setup();
    assert_eq!(route(&s, "paths.test", "/api"), "api");
    assert_eq!(route(&s, "paths.test", "/api/v1/users"), "api");
    assert_eq!(route(&s, "paths.test", "/api/v2"), "api_v2");
    assert_eq!(route(&s, "paths.test", "/api/v2/users"), "api_v2");
    assert_eq!(route(&s, "paths.test", "/ap"), "root");
}

#[test]
fn method() {
    let s = setup();
    let addr = s.lbd.addr();
    let post = exchange(
        addr,
        b"POST /form HTTP/1.1\r\nHost: method.test\r\nContent-Length: 3\r\n\r\na=b",
    );
    assert_eq!(served_by(&post), "post_only");
    assert_eq!(route(&s, "method.test", "/form"), "any_method");
    let put = exchange(
        addr,
        b"PUT /form HTTP/1.1\r\nHost: method.test\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(served_by(&put), "any_method");
    let reqs = s.origins["post_only"].requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].method, "POST");
    assert_eq!(reqs[0].body_len, 3);
}

#[test]
fn unknown_host_is_404_with_html_and_reaches_no_origin() {
    let s = setup();
    let resp = get(s.lbd.addr(), "nobody.test", "/");
    assert_eq!(resp.status, 404);
    resp.assert_html_answer(&[404]);
    assert!(
        resp.header("x-request-id").is_some_and(|v| !v.is_empty()),
        "kakehi's own answers carry X-Request-Id too: {:?}",
        resp.headers
    );
    for (name, o) in &s.origins {
        assert!(o.requests().is_empty(), "origin {name} got a request");
    }
}

#[test]
fn keep_alive_survives_a_404() {
    let s = setup();
    let mut c = common::Client::connect(s.lbd.addr());
    let miss = c.get("nobody.test", "/");
    assert_eq!(miss.status, 404);
    if !miss.closes() {
        // A 404 without Connection: close promises the connection can carry the next request.
        let hit = c.get("exact.test", "/after-404");
        assert_eq!(served_by(&hit), "exact");
    }
}
