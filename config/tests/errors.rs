//! Every refusal names the file, the line, the field and what is allowed.
//!
//! Each test writes a small config as a list of lines (line N is element N-1), so the expected
//! line number can be read off the test itself. The checks are on the `Display` string an
//! operator sees, plus the structured accessors other crates may use.

// Integration tests are compiled with cfg(test); saying so lets clippy.toml's test allowances
// (unwrap, panic, indexing) cover the helpers too, not only the #[test] functions.
#![cfg(test)]

use std::path::Path;

use lb_config::{parse_str, ConfigError};

const FILE: &str = "/srv/kakehi/lb.toml";

fn error(lines: &[&str]) -> ConfigError {
    let text = lines.join("\n");
    match parse_str(&text, Path::new(FILE)) {
        Ok(config) => panic!("expected an error, got {config:#?}"),
        Err(e) => e,
    }
}

/// Asserts the error's `Display` is `FILE:LINE:COL: FIELD: ...PHRASE...`.
#[track_caller]
fn check(lines: &[&str], line: usize, field: &str, phrase: &str) -> String {
    let e = error(lines);
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!("{FILE}:{line}:")),
        "wrong file or line ({line} expected): {shown}"
    );
    assert!(
        shown.contains(&format!(": {field}: ")),
        "field {field} missing: {shown}"
    );
    assert!(shown.contains(phrase), "phrase {phrase:?} missing: {shown}");
    assert_eq!(e.file(), Path::new(FILE));
    assert_eq!(e.location().map(|l| l.line), Some(line));
    assert_eq!(e.field(), Some(field));
    shown
}

const LISTENER: &str = "[[listeners]]\naddress = \"127.0.0.1:8080\"";

/// The example certificate files, by absolute path.
fn example(name: &str) -> String {
    format!("{}/examples/certs/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// `certificates = [ ... ]` with the example site certificate.
fn site_certificates() -> String {
    format!(
        "certificates = [ {{ certificate = \"{}\", key = \"{}\" }} ]",
        example("site.pem"),
        example("site.key")
    )
}

#[test]
fn bad_certificates_are_refused_with_their_reason() {
    let https = |cert: &str, key: &str| {
        format!("certificates = [ {{ certificate = \"{cert}\", key = \"{key}\" }} ]")
    };
    let lines = |certs: String| {
        vec![
            "[[listeners]]".to_owned(),
            "address = \"127.0.0.1:8443\"".to_owned(),
            "protocol = \"https\"".to_owned(),
            certs,
        ]
    };
    let cases = [
        (
            https("/nonexistent/c.pem", &example("site.key")),
            "listeners[0].certificates[0].certificate",
            "cannot read /nonexistent/c.pem",
        ),
        (
            https(&example("site.pem"), &example("other.key")),
            "listeners[0].certificates[0]",
            "the private key does not match the certificate's public key",
        ),
        (
            https(&example("README.md"), &example("site.key")),
            "listeners[0].certificates[0]",
            "no certificate found",
        ),
        (
            https(&example("site.pem"), &example("site.pem")),
            "listeners[0].certificates[0]",
            "no usable private key",
        ),
        (
            format!(
                "certificates = [ {{ certificate = \"{}\", key = \"{}\" }}, {{ certificate = \"{}\", key = \"{}\" }} ]",
                example("site.pem"),
                example("site.key"),
                example("site.pem"),
                example("site.key")
            ),
            "listeners[0].certificates[1]",
            "the same certificate as certificates[0]",
        ),
        (
            "certificates = [ { key_pem = \"x\" } ]".to_owned(),
            "listeners[0].certificates[0]",
            "certificate is missing",
        ),
    ];
    for (certs, field, phrase) in cases {
        let lines = lines(certs);
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        check(&lines, 4, field, phrase);
    }
}

#[test]
fn unknown_keys_carry_line_and_column() {
    let shown = check(
        &["workers = 1", "wokers = 2"],
        2,
        "wokers",
        "unknown field `wokers`",
    );
    assert!(shown.starts_with(&format!("{FILE}:2:1: ")), "{shown}");
    check(
        &[
            "[[listeners]]",
            "address = \"127.0.0.1:80\"",
            "protcol = \"http\"",
        ],
        3,
        "listeners[0].protcol",
        "expected one of `address`, `protocol`",
    );
    let shown = check(
        &[
            "[clusters.app]",
            "backends = [ { address = \"127.0.0.1:9001\" },",
            "  { address = \"127.0.0.1:9002\", wieght = 2 } ]",
        ],
        3,
        "clusters.app.backends[1].wieght",
        "unknown field `wieght`",
    );
    assert!(shown.starts_with(&format!("{FILE}:3:33: ")), "{shown}");
    check(
        &["[timeouts]", "conect = \"1s\""],
        2,
        "timeouts.conect",
        "unknown field",
    );
}

#[test]
fn serde_shape_errors_name_the_field() {
    check(
        &[LISTENER, "protocol = \"htp\""],
        3,
        "listeners[0].protocol",
        "unknown variant `htp`, expected one of `http`, `https`, `tcp`",
    );
    check(&["workers = \"two\""], 1, "workers", "expected an integer");
    check(
        &["[clusters.app]", "backends = [ { weight = 2 } ]"],
        2,
        "clusters.app.backends[0].address",
        "missing field `address`",
    );
    check(
        &["steering_policy = \"random\""],
        1,
        "steering_policy",
        "`flow-hash`, `least-connections`, `power-of-two`",
    );
}

#[test]
fn syntax_errors_have_a_line_but_no_field() {
    let e = error(&["workers = 1", "max_connections = = 3"]);
    let shown = e.to_string();
    assert!(shown.starts_with(&format!("{FILE}:2:")), "{shown}");
    assert_eq!(e.field(), None);
}

#[test]
fn bad_socket_addresses() {
    check(
        &["[[listeners]]", "address = \"localhost:8080\""],
        2,
        "listeners[0].address",
        "expected IP:PORT such as 127.0.0.1:8080",
    );
    check(
        &[
            LISTENER,
            "[clusters.app]",
            "backends = [ { address = \"127.0.0.1:9001\" }, { address = \"127.0.0.1\" } ]",
        ],
        4,
        "clusters.app.backends[1].address",
        "expected IP:PORT such as 127.0.0.1:8080",
    );
    check(
        &["[metrics]", "address = \"9100\""],
        2,
        "metrics.address",
        "expected IP:PORT",
    );
}

#[test]
fn frontend_without_a_listener_lists_the_listeners() {
    check(
        &[
            LISTENER,
            "[[listeners]]",
            "address = \"127.0.0.1:8443\"",
            "protocol = \"https\"",
            &site_certificates(),
            "[clusters.app]",
            "backends = [ { address = \"127.0.0.1:9001\" } ]",
            "frontends = [",
            "  { address = \"127.0.0.1:8080\" },",
            "  { address = \"127.0.0.1:9999\" },",
            "]",
        ],
        11,
        "clusters.app.frontends[1].address",
        "no listener has address 127.0.0.1:9999 (the listeners are 127.0.0.1:8080, 127.0.0.1:8443)",
    );
}

#[test]
fn frontend_on_a_listener_of_the_wrong_protocol() {
    check(
        &[
            "[[listeners]]",
            "address = \"127.0.0.1:5432\"",
            "protocol = \"tcp\"",
            "[clusters.app]",
            "frontends = [ { address = \"127.0.0.1:5432\" } ]",
            "backends = [ { address = \"127.0.0.1:9001\" } ]",
        ],
        5,
        "clusters.app.frontends[0].address",
        "the listener 127.0.0.1:5432 is tcp, but this is an http cluster",
    );
    check(
        &[
            LISTENER,
            "[clusters.db]",
            "protocol = \"tcp\"",
            "frontends = [ { address = \"127.0.0.1:8080\" } ]",
            "backends = [ { address = \"127.0.0.1:9001\" } ]",
        ],
        5,
        "clusters.db.frontends[0].address",
        "is http, but this is a tcp cluster: its frontends need a tcp listener",
    );
}

#[test]
fn clusters_need_backends() {
    check(
        &[
            LISTENER,
            "",
            "[clusters.app]",
            "load_balancing = \"random\"",
        ],
        4,
        "clusters.app.backends",
        "cluster app has no backends",
    );
    check(
        &[LISTENER, "[clusters.app]", "backends = []"],
        4,
        "clusters.app.backends",
        "has no backends",
    );
}

#[test]
fn duplicate_listener_addresses() {
    check(
        &[
            LISTENER,
            "",
            "[[listeners]]",
            "address = \"127.0.0.1:8080\"",
        ],
        5,
        "listeners[1].address",
        "127.0.0.1:8080 is already the address of listeners[0] (line 2)",
    );
}

#[test]
fn duplicate_backend_addresses() {
    check(
        &[
            "[clusters.app]",
            "backends = [",
            "  { address = \"127.0.0.1:9001\" },",
            "  { address = \"127.0.0.1:9001\", weight = 2 },",
            "]",
        ],
        4,
        "clusters.app.backends[1].address",
        "127.0.0.1:9001 is already clusters.app.backends[0]",
    );
}

#[test]
fn bad_regexes_include_the_regex_message() {
    check(
        &[
            LISTENER,
            "[clusters.app]",
            "backends = [ { address = \"127.0.0.1:9001\" } ]",
            "frontends = [ { address = \"127.0.0.1:8080\", path = \"/(a\", path_type = \"regex\" } ]",
        ],
        5,
        "clusters.app.frontends[0].path",
        "\"/(a\" is not a valid regex: unclosed group",
    );
    check(
        &[
            LISTENER,
            "[clusters.app]",
            "backends = [ { address = \"127.0.0.1:9001\" } ]",
            "frontends = [ { address = \"127.0.0.1:8080\", hostname = \"~[a-\" } ]",
        ],
        5,
        "clusters.app.frontends[0].hostname",
        "is not a valid regex",
    );
}

#[test]
fn certificates_belong_to_https_listeners() {
    check(
        &[
            LISTENER,
            "[[listeners]]",
            "address = \"127.0.0.1:8443\"",
            "protocol = \"https\"",
        ],
        3,
        "listeners[1].certificates",
        "an https listener needs at least one certificate",
    );
    check(
        &[
            LISTENER,
            "certificates = [ { certificate = \"c.pem\", key = \"k.pem\" } ]",
        ],
        3,
        "listeners[0].certificates",
        "certificates only apply to https listeners and this one is http",
    );
}

#[test]
fn durations_must_parse_and_be_positive() {
    check(
        &["[timeouts]", "connect = \"5\""],
        2,
        "timeouts.connect",
        "\"5\" is not a duration",
    );
    check(
        &["[timeouts]", "front_idle = \"0s\""],
        2,
        "timeouts.front_idle",
        "a duration must be greater than zero",
    );
    check(
        &[
            "[clusters.app]",
            "backends = [ { address = \"127.0.0.1:9001\" } ]",
            "health_check = { interval = \"5 parsecs\" }",
        ],
        3,
        "clusters.app.health_check.interval",
        "expected a number and a unit such as \"500ms\"",
    );
    check(
        &[
            "[clusters.app]",
            "backends = [ { address = \"127.0.0.1:9001\" } ]",
            "health_check = { interval = \"1s\", timeout = \"2s\" }",
        ],
        3,
        "clusters.app.health_check.timeout",
        "is longer than the interval",
    );
}

/// Issue 12, item 8: a duration of centuries parses (humantime goes up to ~584 billion
/// years) and then overflows `Instant + Duration` in the worker or the health checker, a
/// panic. Every duration is bounded at a day, with the file, line and field named.
#[test]
fn durations_are_at_most_a_day() {
    for (key, value) in [
        ("connect", "1000000000years"),
        ("request_header", "500000000000y"),
        ("front_idle", "25h"),
        ("back_idle", "86401s"),
        ("drain", "2days"),
    ] {
        let line = format!("{key} = \"{value}\"");
        check(
            &["workers = 1", "[timeouts]", &line],
            3,
            &format!("timeouts.{key}"),
            &format!("\"{value}\" is longer than a day (24h)"),
        );
    }
    check(
        &[
            "[clusters.app]",
            "backends = [ { address = \"127.0.0.1:9001\" } ]",
            "health_check = { interval = \"500000years\" }",
        ],
        3,
        "clusters.app.health_check.interval",
        "is longer than a day",
    );
    check(
        &[
            "[clusters.app]",
            "backends = [ { address = \"127.0.0.1:9001\" } ]",
            "health_check = { interval = \"2d\", timeout = \"30h\" }",
        ],
        3,
        "clusters.app.health_check.interval",
        "is longer than a day",
    );
    // A day itself is fine.
    let text = "[timeouts]\ndrain = \"24h\"\nfront_idle = \"1day\"";
    let config = parse_str(text, Path::new(FILE)).unwrap();
    assert_eq!(
        config.timeouts.drain,
        std::time::Duration::from_secs(86_400)
    );
}

#[test]
fn numbers_out_of_range() {
    check(
        &[
            "[clusters.app]",
            "backends = [ { address = \"127.0.0.1:9001\", weight = 1001 } ]",
        ],
        2,
        "clusters.app.backends[0].weight",
        "1001 is out of range: allowed 1 to 1000",
    );
    check(
        &["workers = 65"],
        1,
        "workers",
        "65 is out of range: allowed 1 to 64",
    );
    check(&["workers = 0"], 1, "workers", "allowed 1 to 64");
    check(
        &["max_connections = -1"],
        1,
        "max_connections",
        "allowed 1 to",
    );
    check(
        &["buffer_size = 100"],
        1,
        "buffer_size",
        "allowed 4096 to 1048576",
    );
}

#[test]
fn identical_frontends_in_two_clusters() {
    let shown = check(
        &[
            LISTENER,
            "[clusters.api]",
            "backends = [ { address = \"127.0.0.1:9001\" } ]",
            "frontends = [ { address = \"127.0.0.1:8080\", hostname = \"App.Example.com\", path = \"/api\" } ]",
            "[clusters.web]",
            "backends = [ { address = \"127.0.0.1:9002\" } ]",
            "frontends = [",
            "  { address = \"127.0.0.1:8080\", hostname = \"app.example.com\", path = \"/\" },",
            "  { address = \"127.0.0.1:8080\", hostname = \"app.example.com\", path = \"/api\", path_type = \"prefix\" },",
            "]",
        ],
        10,
        "clusters.web.frontends[1]",
        "identical to clusters.api.frontends[0] (line 5)",
    );
    assert!(
        shown.contains("a request could not tell them apart"),
        "{shown}"
    );
}

#[test]
fn frontends_that_differ_only_in_method_are_distinct() {
    let text = [
        LISTENER,
        "[clusters.app]",
        "backends = [ { address = \"127.0.0.1:9001\" } ]",
        "frontends = [ { address = \"127.0.0.1:8080\", method = \"GET\" }, { address = \"127.0.0.1:8080\", method = \"POST\" } ]",
    ]
    .join("\n");
    parse_str(&text, Path::new(FILE)).unwrap();
}

#[test]
fn hostnames_paths_and_methods() {
    let route = |frontend: &str| {
        vec![
            LISTENER.to_owned(),
            "[clusters.app]".to_owned(),
            "backends = [ { address = \"127.0.0.1:9001\" } ]".to_owned(),
            format!("frontends = [ {{ address = \"127.0.0.1:8080\", {frontend} }} ]"),
        ]
    };
    let cases = [
        (
            "hostname = \"app.example.com:8080\"",
            "hostname",
            "a hostname has no port here",
        ),
        (
            "hostname = \"app_1.example.com\"",
            "hostname",
            "only letters, digits, '-' and '.'",
        ),
        ("hostname = \"a.*.com\"", "hostname", "'*' is only allowed"),
        ("hostname = \"*.\"", "hostname", "it is empty"),
        ("path = \"api\"", "path", "it must start with '/'"),
        ("path = \"/a?b=1\"", "path", "the query and fragment"),
        (
            "path_type = \"regex\"",
            "path",
            "needs a path holding the regex",
        ),
        ("method = \"GE T\"", "method", "is not an HTTP method"),
        ("method = \"\"", "method", "is not an HTTP method"),
    ];
    for (frontend, key, phrase) in cases {
        let lines = route(frontend);
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        check(
            &lines,
            5,
            &format!("clusters.app.frontends[0].{key}"),
            phrase,
        );
    }
}

#[test]
fn tcp_frontends_take_no_http_rules() {
    check(
        &[
            "[[listeners]]",
            "address = \"127.0.0.1:5432\"",
            "protocol = \"tcp\"",
            "[clusters.db]",
            "protocol = \"tcp\"",
            "backends = [ { address = \"127.0.0.1:15432\" } ]",
            "frontends = [ { address = \"127.0.0.1:5432\", path = \"/\" } ]",
        ],
        7,
        "clusters.db.frontends[0].path",
        "path only applies to http clusters",
    );
}

#[test]
fn other_checks() {
    check(
        &[LISTENER, "[metrics]", "address = \"127.0.0.1:8080\""],
        4,
        "metrics.address",
        "also a listener's address",
    );
    check(
        &[
            "[clusters.\"my app\"]",
            "backends = [ { address = \"127.0.0.1:9001\" } ]",
        ],
        1,
        "clusters.\"my app\"",
        "a cluster name is 1 to 64 letters, digits, '-' or '_'",
    );
    check(
        &[
            "[clusters.app]",
            "backends = [ { address = \"127.0.0.1:0\" } ]",
        ],
        2,
        "clusters.app.backends[0].address",
        "has port 0",
    );
    check(
        &[&format!("command_socket = \"/{}\"", "s".repeat(120))],
        1,
        "command_socket",
        "at most 107",
    );
    check(
        &["[access_log]", "target = \"\""],
        2,
        "access_log.target",
        "expected \"stdout\", \"off\" or a file path",
    );
    check(
        &[
            "[clusters.app]",
            "backends = [ { address = \"127.0.0.1:9001\" } ]",
            "health_check = { path = \"health\" }",
        ],
        3,
        "clusters.app.health_check.path",
        "does not start with '/'",
    );
    check(&["user = \"\""], 1, "user", "is not an account name");
}

#[test]
fn http_health_check_method_and_status() {
    let cluster = |check: &str| {
        vec![
            "[clusters.app]".to_string(),
            "backends = [ { address = \"127.0.0.1:9001\" } ]".to_string(),
            format!("health_check = {check}"),
        ]
    };
    for (check_text, field, phrase) in [
        (
            "{ path = \"/h\", status = \"600\" }",
            "status",
            "expected e.g. \"200\" or \"200-399\"",
        ),
        (
            "{ path = \"/h\", status = \"399-200\" }",
            "status",
            "not a status or a range",
        ),
        (
            "{ path = \"/h\", method = \"GE T\" }",
            "method",
            "is not a request method",
        ),
        ("{ status = \"200\" }", "status", "give a path too"),
        ("{ method = \"HEAD\" }", "method", "give a path too"),
        ("{ host = \"a.example\" }", "host", "give a path too"),
        (
            "{ path = \"/h\", host = \"a b\" }",
            "host",
            "is not a host name",
        ),
        (
            "{ path = \"/h HTTP/1.1\\r\\nX: y\" }",
            "path",
            "holds a space or a control character",
        ),
    ] {
        let lines = cluster(check_text);
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        check(
            &lines,
            3,
            &format!("clusters.app.health_check.{field}"),
            phrase,
        );
    }
    let text = "[[listeners]]\naddress = \"127.0.0.1:8080\"\n[clusters.app]\n\
                frontends = [ { address = \"127.0.0.1:8080\" } ]\n\
                backends = [ { address = \"127.0.0.1:9001\" } ]\n\
                health_check = { path = \"/ping\", method = \"head\", status = \"204\" }\n";
    let config = parse_str(text, Path::new(FILE)).unwrap();
    let h = config.clusters[0].health_check.as_ref().unwrap();
    assert_eq!((h.method.as_str(), h.status), ("HEAD", (204, 204)));
}

#[test]
fn an_unreadable_file_is_named() {
    let missing = Path::new("/nonexistent/kakehi/lb.toml");
    let e = lb_config::load(missing).unwrap_err();
    assert!(matches!(e, ConfigError::Read { .. }));
    let shown = e.to_string();
    assert!(
        shown.starts_with("/nonexistent/kakehi/lb.toml: cannot read the config file: "),
        "{shown}"
    );
    assert_eq!(e.file(), missing);
}

#[test]
fn http2_listener_keys_are_checked() {
    check(
        &[
            "[[listeners]]",
            "address = \"127.0.0.1:8080\"",
            "alpn = [\"h2\"]",
        ],
        3,
        "listeners[0].alpn",
        "\"http/1.1\" must be listed",
    );
    check(
        &[
            "[[listeners]]",
            "address = \"127.0.0.1:8080\"",
            "alpn = [\"h3\", \"http/1.1\"]",
        ],
        3,
        "listeners[0].alpn",
        "\"h3\" is not a protocol kakehi serves",
    );
    check(
        &[
            "[[listeners]]",
            "address = \"127.0.0.1:8080\"",
            "h2 = { max_concurrent_streams = 0 }",
        ],
        3,
        "listeners[0].h2.max_concurrent_streams",
        "0 is out of range: allowed 1 to 1000",
    );
    check(
        &[
            "[[listeners]]",
            "address = \"127.0.0.1:8080\"",
            "protocol = \"tcp\"",
            "h2 = { max_concurrent_streams = 10 }",
        ],
        4,
        "listeners[0].h2",
        "does not speak HTTP/2",
    );
    check(
        &[
            "[[listeners]]",
            "address = \"127.0.0.1:8080\"",
            "h2 = { pings = { burst = 0 } }",
        ],
        3,
        "listeners[0].h2.pings.burst",
        "0 is out of range: allowed 1 to 1000000",
    );
    check(
        &[
            "[[listeners]]",
            "address = \"127.0.0.1:8080\"",
            "h2 = { client_resets = { burst = 10, every = 5 } }",
        ],
        3,
        "listeners[0].h2.client_resets.every",
        "unknown field `every`, expected `burst` or `per_second`",
    );
    let text = "[[listeners]]\naddress = \"127.0.0.1:8080\"\nh2 = { client_resets = { per_second = 3 } }\n";
    let config = parse_str(text, Path::new(FILE)).unwrap();
    let h2 = &config.listeners[0].h2;
    assert_eq!(h2.client_resets, lb_config::Rate::new(100, 3));
    assert_eq!(h2.pings, lb_config::Rate::new(50, 10));
    let text = "[[listeners]]\naddress = \"127.0.0.1:8080\"\nalpn = [\"http/1.1\"]\n\
                h2 = { max_concurrent_streams = 8, max_header_list_size = 4096 }\n";
    let config = parse_str(text, Path::new(FILE)).unwrap();
    let l = &config.listeners[0];
    assert!(!l.http2);
    assert_eq!(l.h2.max_concurrent_streams, 8);
    assert_eq!(l.h2.max_header_list_size, 4096);
    assert_eq!(l.h2.connection_window, 1 << 20);
    let config = parse_str(
        "[[listeners]]\naddress = \"127.0.0.1:8080\"\n",
        Path::new(FILE),
    )
    .unwrap();
    assert!(config.listeners[0].http2);
}

#[test]
fn bgp_is_checked() {
    let run = |body: &str, line: usize, field: &str, phrase: &str| {
        let mut lines = vec!["[bgp]"];
        lines.extend(body.lines());
        check(&lines, line, field, phrase);
    };
    let rest = "local_as = 65001\nrouter_id = \"10.0.0.2\"\n\
                peers = [ { address = \"10.0.0.1\", as = 65000 } ]\nbird_config = \"bird.conf\"";
    run(
        &format!("vip = \"192.0.2\"\n{rest}"),
        2,
        "bgp.vip",
        "is not an IP address",
    );
    run(
        "vip = \"192.0.2.10\"\nlocal_as = 0\nrouter_id = \"10.0.0.2\"\npeers = []\nbird_config = \"b\"",
        3,
        "bgp.local_as",
        "is not an AS number",
    );
    run(
        "vip = \"192.0.2.10\"\nlocal_as = 65001\nrouter_id = \"::1\"\npeers = []\nbird_config = \"b\"",
        4,
        "bgp.router_id",
        "a router id is an IPv4 address",
    );
    run(
        "vip = \"192.0.2.10\"\nlocal_as = 65001\nrouter_id = \"10.0.0.2\"\npeers = []\nbird_config = \"b\"",
        5,
        "bgp.peers",
        "no peer",
    );
    let config = parse_str(
        &format!("[bgp]\nvip = \"192.0.2.10\"\n{rest}\n"),
        Path::new(FILE),
    )
    .unwrap();
    let bgp = config.bgp.unwrap();
    assert_eq!(bgp.bird_socket, Path::new("/run/bird/bird.ctl"));
    assert_eq!(bgp.peers, vec![("10.0.0.1".parse().unwrap(), 65000)]);
}

#[test]
fn sync_is_checked() {
    let run = |body: &str, line: usize, field: &str, phrase: &str| {
        let mut lines = vec!["[[listeners]]", "address = \"127.0.0.1:8080\"", "[sync]"];
        lines.extend(body.lines());
        check(&lines, line, field, phrase);
    };
    run("etcd = []", 4, "sync.etcd", "no etcd member");
    run(
        "etcd = [\"https://10.0.0.5:2379\"]",
        4,
        "sync.etcd",
        "is not an http:// URL",
    );
    run(
        "etcd = [\"http://etcd.example:2379\"]",
        4,
        "sync.etcd",
        "is not a socket address",
    );
    run(
        "etcd = [\"http://10.0.0.5:2379\"]\nprefix = \"kakehi\"",
        5,
        "sync.prefix",
        "is not a key prefix",
    );
    run(
        "etcd = [\"http://10.0.0.5:2379\"]\nname = \"lb 1\"",
        5,
        "sync.name",
        "is not an appliance name",
    );
    let config = parse_str(
        "[sync]\netcd = [\"http://10.0.0.5:2379/\"]\nname = \"lb1\"\n",
        Path::new(FILE),
    )
    .unwrap();
    let sync = config.sync.unwrap();
    assert_eq!(sync.prefix, "/kakehi");
    assert_eq!(sync.etcd, vec!["10.0.0.5:2379".parse().unwrap()]);
}

#[test]
fn hash_keys_and_backend_tls_are_checked() {
    let cluster = |extra: &str| {
        vec![
            "[[listeners]]".to_owned(),
            "address = \"127.0.0.1:8080\"".to_owned(),
            "[clusters.app]".to_owned(),
            extra.to_owned(),
            "frontends = [ { address = \"127.0.0.1:8080\" } ]".to_owned(),
            "backends = [ { address = \"127.0.0.1:9001\" } ]".to_owned(),
        ]
    };
    let run = |extra: &str, line: usize, field: &str, phrase: &str| {
        let lines = cluster(extra);
        let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
        check(&lines, line, field, phrase);
    };
    run(
        "hash_key = \"source-ip\"",
        4,
        "clusters.app.hash_key",
        "applies to load_balancing = \"maglev\"",
    );
    run(
        "load_balancing = \"maglev\"\nhash_key = \"header:\"",
        5,
        "clusters.app.hash_key",
        "is not a hash key",
    );
    run(
        "backend_ca = \"ca.pem\"",
        4,
        "clusters.app.backend_ca",
        "add backend_tls = true",
    );
    run(
        "backend_tls = true\nhttp2 = true",
        4,
        "clusters.app.backend_tls",
        "HTTP/2 to backends over TLS is not supported yet",
    );
    run(
        "backend_tls = true\nbackend_server_name = \"not a name!\"",
        5,
        "clusters.app.backend_server_name",
        "is not a DNS name or an IP address",
    );
}
