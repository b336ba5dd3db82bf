//! The state's edits, round trips and diff, checked on small files and on the shipped examples.

use std::path::PathBuf;

use super::*;

const SOURCE: &str = "/srv/kakehi/lb.toml";

fn source() -> &'static Path {
    Path::new(SOURCE)
}

const BASE: &str = r#"
workers = 2
command_socket = "/tmp/kakehi-test.sock"

[[listeners]]
address = "127.0.0.1:8080"

[[listeners]]
address = "127.0.0.1:8081"

[clusters.app]
frontends = [ { address = "127.0.0.1:8080", hostname = "app.example.com" } ]
backends = [ { address = "127.0.0.1:9001" }, { address = "127.0.0.1:9002", weight = 2 } ]

[clusters.api]
load_balancing = "random"
frontends = [ { address = "127.0.0.1:8080", hostname = "app.example.com", path = "/api" } ]
backends = [ { address = "127.0.0.1:9003" } ]
"#;

fn base() -> State {
    State::from_toml(BASE, source()).unwrap()
}

fn example(name: &str) -> (PathBuf, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap();
    (path, text)
}

#[test]
fn the_examples_round_trip_through_toml_and_json() {
    for name in ["quickstart.toml", "full.toml"] {
        let (path, text) = example(name);
        let state = State::from_toml(&text, &path).unwrap();
        let written = state.to_toml();
        assert_eq!(State::from_toml(&written, &path).unwrap(), state, "{name}");
        // The same configuration, not only the same document.
        let from_file = crate::parse_str(&text, &path).unwrap();
        let from_state = state.validate(&path).unwrap();
        assert_eq!(
            format!("{from_file:?}"),
            format!("{from_state:?}"),
            "{name}"
        );
        let json = serde_json::to_string(&state).unwrap();
        assert_eq!(serde_json::from_str::<State>(&json).unwrap(), state);
    }
    let (path, text) = example("full.toml");
    let state = State::from_toml(&text, &path).unwrap();
    let app = &state.clusters["app"];
    assert_eq!(app.frontends.len(), 5);
    // Certificate files are read in: the state carries their text.
    let site = &state.listeners[1].certificates[0];
    assert!(site
        .certificate_pem
        .as_deref()
        .unwrap()
        .starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(site.key_pem.is_some());
    assert_eq!(app.backends[1].weight, Some(3));
    assert_eq!(
        app.health_check.as_ref().unwrap().interval.as_deref(),
        Some("10s")
    );
    assert_eq!(state.steering, Some(SteeringDef::Ebpf));
}

#[test]
fn from_toml_refuses_what_the_validator_refuses() {
    let e = State::from_toml("workers = 0", source()).unwrap_err();
    assert!(
        e.to_string()
            .starts_with(&format!("{SOURCE}:1:11: workers: ")),
        "{e}"
    );
    let e = State::from_toml("wrkers = 1", source()).unwrap_err();
    assert_eq!(e.field(), Some("wrkers"));
}

#[test]
fn draining_is_a_backend_key_of_the_file() {
    let text = BASE.replace(
        "{ address = \"127.0.0.1:9001\" }",
        "{ address = \"127.0.0.1:9001\", draining = true }",
    );
    let state = State::from_toml(&text, source()).unwrap();
    assert!(state.clusters["app"].backends[0].is_draining());
    assert!(state.to_toml().contains("draining = true"));
    let e = State::from_toml(&BASE.replace("weight = 2", "draining = 1"), source());
    assert!(e.unwrap_err().to_string().contains("draining"));
}

#[test]
fn clusters_are_added_and_removed() {
    let state = base();
    let web = ClusterDef {
        frontends: vec![FrontendDef {
            address: "127.0.0.1:8081".into(),
            ..FrontendDef::default()
        }],
        backends: vec![BackendDef::new("127.0.0.1:9100")],
        ..ClusterDef::default()
    };
    let next = state.add_cluster("web", web.clone(), source()).unwrap();
    assert_eq!(next.clusters["web"], web);
    assert_eq!(
        diff(&state, &next),
        [Change::ClusterAdded { name: "web".into() }]
    );
    let e = next.add_cluster("web", web.clone(), source()).unwrap_err();
    assert_eq!(e, StateError::ClusterExists { name: "web".into() });

    let back = next.remove_cluster("web", source()).unwrap();
    assert_eq!(back, state);
    let e = state.remove_cluster("nope", source()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "there is no cluster named \"nope\" (clusters: api, app)"
    );

    // The whole state is validated: a bad name, no backends.
    let e = state
        .add_cluster("my app", web.clone(), source())
        .unwrap_err();
    assert!(
        e.to_string()
            .starts_with("clusters.\"my app\": a cluster name is"),
        "{e}"
    );
    let empty = ClusterDef {
        backends: vec![],
        ..web
    };
    let e = state.add_cluster("web", empty, source()).unwrap_err();
    assert!(e.to_string().contains("has no backends"), "{e}");
}

#[test]
fn backends_are_added_removed_and_drained() {
    let state = base();
    let next = state
        .add_backend("app", BackendDef::new("127.0.0.1:9004"), source())
        .unwrap();
    assert_eq!(next.clusters["app"].backends.len(), 3);
    assert_eq!(
        diff(&state, &next),
        [Change::BackendAdded {
            cluster: "app".into(),
            backend: BackendDef::new("127.0.0.1:9004"),
        }]
    );

    // The same address spelled differently is the same backend.
    let e = state
        .add_backend("app", BackendDef::new(" 127.0.0.1:9001"), source())
        .unwrap_err();
    assert!(matches!(e, StateError::BackendExists { .. }), "{e}");
    let e = state
        .add_backend("nope", BackendDef::new("127.0.0.1:9004"), source())
        .unwrap_err();
    assert!(matches!(e, StateError::UnknownCluster { .. }), "{e}");
    let e = state
        .add_backend("app", BackendDef::new("localhost:9004"), source())
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "clusters.app.backends[2].address: \"localhost:9004\" is not a socket address: expected IP:PORT such as 127.0.0.1:8080 (or [::1]:8080); host names are not resolved"
    );
    let heavy = BackendDef {
        weight: Some(5000),
        ..BackendDef::new("127.0.0.1:9004")
    };
    let e = state.add_backend("app", heavy, source()).unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");

    let drained = state
        .drain_backend("app", "127.0.0.1:9002", source())
        .unwrap();
    assert!(drained.clusters["app"].backends[1].is_draining());
    assert_eq!(
        diff(&state, &drained),
        [Change::BackendChanged {
            cluster: "app".into(),
            address: "127.0.0.1:9002".into(),
            key: "draining".into(),
            old: None,
            new: Some("true".into()),
        }]
    );
    assert_eq!(
        diff(&state, &drained)[0].to_string(),
        "~ backend 127.0.0.1:9002 (cluster app): draining: (unset) -> true"
    );
    let again = drained
        .drain_backend("app", "127.0.0.1:9002", source())
        .unwrap();
    assert_eq!(again, drained, "draining twice changes nothing");

    let removed = drained
        .remove_backend("app", "127.0.0.1:9002", source())
        .unwrap();
    assert_eq!(removed.clusters["app"].backends.len(), 1);
    let e = removed
        .remove_backend("app", "127.0.0.1:9001", source())
        .unwrap_err();
    assert!(e.to_string().contains("is the last backend"), "{e}");
    let e = state
        .remove_backend("app", "127.0.0.1:1", source())
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "cluster \"app\" has no backend 127.0.0.1:1 (backends: 127.0.0.1:9001, 127.0.0.1:9002)"
    );
}

#[test]
fn frontends_are_added_and_removed() {
    let state = base();
    let docs = FrontendDef {
        address: "127.0.0.1:8080".into(),
        hostname: Some("docs.example.com".into()),
        ..FrontendDef::default()
    };
    let next = state.add_frontend("app", docs.clone(), source()).unwrap();
    assert_eq!(next.clusters["app"].frontends.len(), 2);

    // Already served, by this cluster or another; the comparison applies the defaults.
    let same = FrontendDef {
        hostname: Some("APP.example.com".into()),
        path: Some("/api".into()),
        path_type: Some(PathTypeDef::Prefix),
        ..docs.clone()
    };
    let e = state.add_frontend("app", same, source()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the frontend 127.0.0.1:8080 hostname=APP.example.com path=/api path_type=prefix already exists in cluster \"api\": a request could not tell them apart"
    );
    // A listener that does not exist: the validator's own message.
    let elsewhere = FrontendDef {
        address: "127.0.0.1:9999".into(),
        ..docs.clone()
    };
    let e = state.add_frontend("app", elsewhere, source()).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("clusters.app.frontends[1].address: "),
        "{e}"
    );

    let removed = next
        .remove_frontend(
            "app",
            FrontendDef {
                path: Some("/".into()),
                ..docs.clone()
            },
            source(),
        )
        .unwrap();
    assert_eq!(removed, state);
    let e = state.remove_frontend("app", docs, source()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cluster \"app\" has no frontend 127.0.0.1:8080 hostname=docs.example.com"
    );
}

#[test]
fn listeners_are_added_and_removed() {
    let state = base();
    let listener = ListenerDef {
        address: "127.0.0.1:8082".into(),
        protocol: Some(ListenerProtocolDef::Http),
        certificates: vec![],
        accept_proxy: None,
        alpn: None,
        h2: None,
        max_connections_per_ip: None,
        max_connection_rate_per_ip: None,
        client_ca: None,
        client_ca_pem: None,
        client_crl: None,
        client_crl_pem: None,
        client_auth: None,
    };
    let next = state.add_listener(listener.clone(), source()).unwrap();
    assert_eq!(
        diff(&state, &next),
        [Change::ListenerAdded {
            address: "127.0.0.1:8082".into()
        }]
    );
    let e = next.add_listener(listener, source()).unwrap_err();
    assert!(matches!(e, StateError::ListenerExists { .. }));
    let https = ListenerDef {
        address: "127.0.0.1:8443".into(),
        protocol: Some(ListenerProtocolDef::Https),
        certificates: vec![],
        accept_proxy: None,
        alpn: None,
        h2: None,
        max_connections_per_ip: None,
        max_connection_rate_per_ip: None,
        client_ca: None,
        client_ca_pem: None,
        client_crl: None,
        client_crl_pem: None,
        client_auth: None,
    };
    let e = state.add_listener(https, source()).unwrap_err();
    assert!(
        e.to_string().contains("needs at least one certificate"),
        "{e}"
    );

    let e = state
        .remove_listener("127.0.0.1:8080", source())
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "the listener 127.0.0.1:8080 still serves frontends of cluster api, app: remove those first"
    );
    let fewer = state.remove_listener("127.0.0.1:8081", source()).unwrap();
    assert_eq!(fewer.listeners.len(), 1);
    let e = state.remove_listener("127.0.0.1:1", source()).unwrap_err();
    assert!(
        e.to_string().contains("127.0.0.1:8080, 127.0.0.1:8081"),
        "{e}"
    );
}

#[test]
fn a_refused_edit_leaves_the_state_as_it_was() {
    let state = base();
    let before = state.to_toml();
    let edits = [
        Edit::RemoveCluster { name: "x".into() },
        Edit::AddBackend {
            cluster: "app".into(),
            backend: BackendDef::new("bad"),
        },
        Edit::RemoveListener {
            address: "127.0.0.1:8080".into(),
        },
    ];
    for edit in &edits {
        assert!(state.apply(edit, source()).is_err());
        assert_eq!(state.to_toml(), before);
    }
}

#[test]
fn diff_lists_exactly_what_an_edited_file_changes() {
    let old = base();
    let edited = BASE
        .replace("workers = 2", "workers = 3")
        .replace(", weight = 2 }", ", weight = 4 }")
        .replace("load_balancing = \"random\"", "")
        .replace(
            "backends = [ { address = \"127.0.0.1:9003\" } ]",
            "backends = [ { address = \"127.0.0.1:9005\" } ]",
        )
        .replace(
            "address = \"127.0.0.1:8081\"",
            "address = \"127.0.0.1:8081\"\naccept_proxy = true",
        )
        + "\n[clusters.web]\nbackends = [ { address = \"127.0.0.1:9100\" } ]\n"
        + "\n[timeouts]\nconnect = \"1s\"\n";
    let new = State::from_toml(&edited, source()).unwrap();
    let shown: Vec<String> = diff(&old, &new).iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        [
            "~ timeouts.connect: (unset) -> \"1s\"",
            "~ workers: 2 -> 3",
            "~ listener 127.0.0.1:8081: accept_proxy: (unset) -> true",
            "~ cluster api: load_balancing: \"random\" -> (unset)",
            "+ backend 127.0.0.1:9005 (cluster api)",
            "- backend 127.0.0.1:9003 (cluster api)",
            "~ backend 127.0.0.1:9002 (cluster app): weight: 2 -> 4",
            "+ cluster web",
        ]
    );
    assert!(diff(&new, &new).is_empty());
    let back = diff(&new, &old);
    assert!(back.contains(&Change::ClusterRemoved { name: "web".into() }));
}

#[test]
fn relative_paths_can_be_made_absolute() {
    let text = "command_socket = \"run/lbd.sock\"\n[access_log]\ntarget = \"logs/a.log\"\n";
    let state = State::from_toml(text, source()).unwrap();
    let fixed = state.with_absolute_paths(source());
    assert_eq!(
        fixed.command_socket.as_deref(),
        Some("/srv/kakehi/run/lbd.sock")
    );
    assert_eq!(
        fixed.access_log.unwrap().target.as_deref(),
        Some("/srv/kakehi/logs/a.log")
    );
    let stdout = State::from_toml("[access_log]\ntarget = \"stdout\"\n", source()).unwrap();
    assert_eq!(stdout.with_absolute_paths(source()), stdout);
}

#[test]
fn summaries_and_words() {
    let state = base()
        .drain_backend("app", "127.0.0.1:9001", source())
        .unwrap();
    let list = state.cluster_summaries();
    assert_eq!(list[1].name, "app");
    assert_eq!((list[1].backends, list[1].draining), (2, 1));
    assert_eq!(list[0].load_balancing, LoadBalancingDef::Random);
    assert_eq!("power-of-two".parse(), Ok(LoadBalancingDef::PowerOfTwo));
    let e = "http2".parse::<ListenerProtocolDef>().unwrap_err();
    assert_eq!(e, "\"http2\" is not allowed: expected http | https | tcp");
}

#[test]
fn changes_serialize_with_a_tag() {
    let c = Change::ClusterAdded { name: "web".into() };
    let json = serde_json::to_string(&c).unwrap();
    assert_eq!(json, r#"{"change":"cluster_added","name":"web"}"#);
    assert_eq!(serde_json::from_str::<Change>(&json).unwrap(), c);
}

fn cert_file(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/certs")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn cert_def(cert: &str, key: &str) -> CertificateDef {
    CertificateDef {
        certificate: Some(cert_file(cert)),
        key: Some(cert_file(key)),
        ..CertificateDef::default()
    }
}

fn https_state() -> State {
    let text = format!(
        "[[listeners]]\naddress = \"127.0.0.1:8443\"\nprotocol = \"https\"\n\
         certificates = [ {{ certificate = \"{}\", key = \"{}\" }} ]\n\n\
         [[listeners]]\naddress = \"127.0.0.1:8080\"\n",
        cert_file("site.pem"),
        cert_file("site.key")
    );
    State::from_toml(&text, source()).unwrap()
}

#[test]
fn certificates_are_added_replaced_and_removed() {
    let state = https_state();
    let add = Edit::AddCertificate {
        address: "127.0.0.1:8443".into(),
        certificate: cert_def("other.pem", "other.key"),
    };
    let checked = state.apply(&add, source()).unwrap();
    let two = checked.state;
    assert_eq!(two.listeners[0].certificates.len(), 2);
    let config = two.validate(source()).unwrap();
    assert_eq!(
        checked.config, config,
        "apply returns what the state validates to"
    );
    assert_eq!(
        config.listeners[0].certificates[1].names,
        ["*.other.example.com"]
    );
    // The same one again: refused.
    let e = two.apply(&add, source()).unwrap_err();
    assert!(
        e.to_string().contains("already has this certificate"),
        "{e}"
    );

    // Replaced in place by a server name; the default stays first.
    let replace = Edit::ReplaceCertificate {
        address: "127.0.0.1:8443".into(),
        old: "x.other.example.com".into(),
        certificate: cert_def("other.pem", "other.key"),
    };
    let e = two.apply(&replace, source()).unwrap_err();
    assert!(
        e.to_string()
            .contains("no certificate \"x.other.example.com\""),
        "{e}"
    );
    let replace = Edit::ReplaceCertificate {
        address: "127.0.0.1:8443".into(),
        old: "*.other.example.com".into(),
        certificate: cert_def("other.pem", "other.key"),
    };
    let replaced = two.apply(&replace, source()).unwrap().state;
    assert_eq!(replaced, two, "the same certificate in the same place");

    // Removed by file; the last one stays.
    let remove = |selector: &str| Edit::RemoveCertificate {
        address: "127.0.0.1:8443".into(),
        certificate: selector.into(),
    };
    let one = two
        .apply(&remove(&cert_file("other.pem")), source())
        .unwrap()
        .state;
    assert_eq!(one, state);
    let fingerprint = state.validate(source()).unwrap().listeners[0].certificates[0]
        .fingerprint
        .clone();
    let e = one.apply(&remove(&fingerprint), source()).unwrap_err();
    assert!(e.to_string().contains("last certificate"), "{e}");
}

#[test]
fn bad_certificate_edits_are_refused_and_change_nothing() {
    let state = https_state();
    let before = state.clone();
    let cases = [
        (
            Edit::AddCertificate {
                address: "127.0.0.1:8443".into(),
                certificate: cert_def("site.pem", "other.key"),
            },
            "does not match",
        ),
        (
            Edit::AddCertificate {
                address: "127.0.0.1:8443".into(),
                certificate: cert_def("README.md", "other.key"),
            },
            "no certificate found",
        ),
        (
            Edit::AddCertificate {
                address: "127.0.0.1:8080".into(),
                certificate: cert_def("other.pem", "other.key"),
            },
            "is http: certificates belong to https listeners",
        ),
        (
            Edit::AddCertificate {
                address: "127.0.0.1:9999".into(),
                certificate: cert_def("other.pem", "other.key"),
            },
            "there is no listener on 127.0.0.1:9999",
        ),
        (
            Edit::ReplaceCertificate {
                address: "127.0.0.1:8443".into(),
                old: "site.example.com".into(),
                certificate: cert_def("other.pem", "site.key"),
            },
            "does not match",
        ),
    ];
    for (edit, phrase) in cases {
        let e = state.apply(&edit, source()).unwrap_err();
        assert!(e.to_string().contains(phrase), "{edit:?}: {e}");
        assert_eq!(state, before);
    }
}

#[test]
fn a_certificate_change_is_one_line_without_the_key() {
    let state = https_state();
    let add = Edit::AddCertificate {
        address: "127.0.0.1:8443".into(),
        certificate: cert_def("other.pem", "other.key"),
    };
    let two = state.apply(&add, source()).unwrap().state;
    let changes = diff(&state, &two);
    assert_eq!(changes.len(), 1, "{changes:?}");
    let line = changes[0].to_string();
    assert!(
        line.starts_with("~ listener 127.0.0.1:8443: certificates"),
        "{line}"
    );
    assert!(line.contains("other.pem (sha256 "), "{line}");
    assert!(!line.contains("PRIVATE KEY"), "{line}");
}

#[test]
fn an_added_https_listener_carries_its_certificates_as_text() {
    let state = https_state();
    let listener = ListenerDef {
        address: "127.0.0.1:9443".into(),
        protocol: Some(ListenerProtocolDef::Https),
        certificates: vec![cert_def("other.pem", "other.key")],
        accept_proxy: None,
        alpn: None,
        h2: None,
        max_connections_per_ip: None,
        max_connection_rate_per_ip: None,
        client_ca: None,
        client_ca_pem: None,
        client_crl: None,
        client_crl_pem: None,
        client_auth: None,
    };
    let next = state
        .apply(&Edit::AddListener { listener }, source())
        .unwrap()
        .state;
    let cert = &next.listeners[2].certificates[0];
    assert!(cert
        .certificate_pem
        .as_deref()
        .unwrap()
        .contains("BEGIN CERTIFICATE"));
    assert!(cert.key_pem.as_deref().unwrap().contains("PRIVATE KEY"));
}
