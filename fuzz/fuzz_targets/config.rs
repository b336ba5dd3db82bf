//! TOML text through kakehi's config validator, both ways lbd takes it: `lb_config::parse_str`
//! (`lbd --check`, lbd's start, the worker's channel) and the running state's path
//! (`State::from_toml`, then `State::validate`, as `lbctl state load` and the upgrade handoff
//! do).
//!
//! Checks: no panic; both paths accept and refuse the same texts; an accepted text gives the
//! same `Config` by either path (compared by `Debug`: `Config` has no `PartialEq`); the state written back as TOML (`state save`) reads back to an
//! equal `State` (and `state::diff` sees no change) that validates to the same `Config`; and the
//! state sent as JSON (the command protocol's `state dump` payload) decodes to an equal one.
//!
//! The validator reads the certificate files an https listener names. So that the fuzzer reads
//! nothing but them, a text naming any other `certificate` or `key` file is skipped (the
//! examples' `certs/site.*` and `certs/other.*` are allowed); inline `certificate_pem` and
//! `key_pem` are fuzzed as they come. Texts are resolved as if they were
//! `config/examples/fuzz.toml`.
#![no_main]

use lb_config::state::{diff, State};
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "shared/config_files.rs"]
mod config_files;
use config_files::{reads_only_allowed_files, source};

fuzz_target!(|data: &[u8]| {
    // The worker takes a configuration frame the same way (worker.rs `serve_control`).
    let text = String::from_utf8_lossy(data);
    if !reads_only_allowed_files(&text) {
        return;
    }
    let source = source();
    let config = lb_config::parse_str(&text, source);
    let state = State::from_toml(&text, source);
    let (config, state) = match (config, state) {
        (Ok(config), Ok(state)) => (config, state),
        (Err(_), Err(_)) => return,
        (config, state) => panic!(
            "parse_str and State::from_toml disagree:\n  parse_str: {:?}\n  from_toml: {:?}",
            config.err(),
            state.err()
        ),
    };
    match state.validate(source) {
        Ok(again) => assert_eq!(
            format!("{again:?}"),
            format!("{config:?}"),
            "the state validates to another Config"
        ),
        Err(e) => panic!("an accepted file's state does not validate: {e}"),
    }

    // `state save` and loading it again.
    let saved = state.to_toml();
    let reloaded = match State::from_toml(&saved, source) {
        Ok(reloaded) => reloaded,
        Err(e) => panic!("the saved state does not load: {e}\n--- saved:\n{saved}"),
    };
    assert_eq!(reloaded, state, "the saved state loads as another state");
    let changes = diff(&state, &reloaded);
    assert!(changes.is_empty(), "diff of equal states: {changes:?}");
    match reloaded.validate(source) {
        Ok(again) => assert_eq!(
            format!("{again:?}"),
            format!("{config:?}"),
            "the saved state validates to another Config"
        ),
        Err(e) => panic!("the saved state does not validate: {e}"),
    }

    // The state as the command protocol carries it.
    match serde_json::to_string(&state) {
        Ok(json) => match serde_json::from_str::<State>(&json) {
            Ok(back) => assert_eq!(back, state, "the state's JSON decodes to another state"),
            Err(e) => panic!("the state's JSON does not decode: {e}\n{json}"),
        },
        Err(e) => panic!("the state does not encode as JSON: {e}"),
    }
});
