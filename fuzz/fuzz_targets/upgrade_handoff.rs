//! Arbitrary bytes as the upgrade handoff message, checked by the new lbd main as it checks
//! the message from the running one: `userspace/lbd/src/handoff.rs` (included with `#[path]`)
//! decodes the JSON, checks its version, reads the handed-over state and validates it like a
//! config file, and checks the descriptor roles against what that state needs, all before a
//! single descriptor is received.
//!
//! Checks: no panic; an accepted message has this version, exactly one command socket, and a
//! role for every listener × worker (and, with eBPF steering, a program and four maps per
//! listener), each within the state's listeners and workers; and the message encoded again
//! is accepted again with the same roles and the same configuration.
//!
//! The handed-over state names files (certificates) relative to the message's `source`; so that
//! the fuzzer reads nothing but the examples' certificates, a message whose state names any
//! `certificate` or `key` file is only checked when its `source` is `config/examples/fuzz.toml`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../userspace/lbd/src/handoff.rs"]
mod handoff;

#[allow(dead_code)]
#[path = "shared/config_files.rs"]
mod config_files;
use config_files::{names_any_file, reads_only_allowed_files, source};

use handoff::FdRole;

fuzz_target!(|data: &[u8]| {
    // The guard needs the state text: decode first (decoding reads no file).
    if let Ok(message) = handoff::decode(data) {
        let files = names_any_file(&message.state);
        if !reads_only_allowed_files(&message.state) || (files && message.source != source()) {
            return;
        }
    }
    let Ok(checked) = handoff::check(data) else {
        return;
    };
    let message = &checked.message;
    let config = &checked.config;
    assert_eq!(message.version, handoff::HANDOFF_VERSION);
    let roles = &message.fds;
    let count = |f: &dyn Fn(&FdRole) -> bool| roles.iter().filter(|r| f(r)).count();
    assert_eq!(
        count(&|r| matches!(r, FdRole::CommandSocket)),
        1,
        "{roles:?}"
    );
    let (listeners, workers) = (config.listeners.len(), config.workers);
    let ebpf = config.steering == lb_config::Steering::Ebpf;
    for listener in 0..listeners {
        for worker in 0..workers {
            let here = |r: &FdRole| matches!(r, FdRole::Listener { listener: l, worker: w, .. } if *l == listener && *w == worker);
            assert_eq!(
                count(&here),
                1,
                "listener {listener} worker {worker}: {roles:?}"
            );
        }
        let program =
            |r: &FdRole| matches!(r, FdRole::SteeringProgram { listener: l } if *l == listener);
        assert_eq!(count(&program), usize::from(ebpf), "{roles:?}");
        for map in handoff::STEERING_MAPS {
            let this = |r: &FdRole| matches!(r, FdRole::SteeringMap { listener: l, map: m } if *l == listener && m == map);
            assert_eq!(count(&this), usize::from(ebpf), "{roles:?}");
        }
        // The per-client maps: all or none, once each; track only with them, its link only
        // with track.
        let per_ip: Vec<usize> = handoff::PER_IP_MAPS
            .iter()
            .map(|map| {
                count(&|r: &FdRole| matches!(r, FdRole::SteeringMap { listener: l, map: m } if *l == listener && m == map))
            })
            .collect();
        let first = per_ip.first().copied().unwrap_or(0);
        assert!(per_ip.iter().all(|n| *n == first && *n <= 1), "{roles:?}");
        let track = count(&|r: &FdRole| matches!(r, FdRole::TrackProgram { listener: l } if *l == listener));
        let link = count(&|r: &FdRole| matches!(r, FdRole::TrackLink { listener: l } if *l == listener));
        assert!(track <= first && link <= track, "{roles:?}");
    }
    for role in roles {
        match role {
            FdRole::CommandSocket => {}
            FdRole::Listener {
                listener, worker, ..
            } => assert!(*listener < listeners && *worker < workers, "{role:?}"),
            FdRole::SteeringProgram { listener }
            | FdRole::SteeringMap { listener, .. }
            | FdRole::TrackProgram { listener }
            | FdRole::TrackLink { listener } => {
                assert!(ebpf && *listener < listeners, "{role:?}")
            }
        }
    }

    // Encoded again by the old main's code path (serde_json), it passes again, the same.
    let again = match serde_json::to_vec(message) {
        Ok(again) => again,
        Err(e) => panic!("an accepted message does not encode: {e}"),
    };
    match handoff::check(&again) {
        Ok(second) => {
            assert_eq!(second.message.fds, message.fds);
            assert_eq!(
                format!("{:?}", second.config),
                format!("{config:?}"),
                "the re-encoded message validates to another Config"
            );
        }
        Err(e) => panic!("the re-encoded message is refused: {e:#}"),
    }
});
