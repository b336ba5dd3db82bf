//! Hooks the integration tests use to reach states no config can (a worker that cannot start,
//! a pause in the middle of a handoff, a forbidden syscall made on purpose), read from
//! `KAKEHI_TEST_*` environment variables. They are compiled into debug builds, which is what
//! `cargo test` runs, and into a release build only with the `test-hooks` feature: a shipped
//! binary (the .deb, the appliance image) ignores the variables.

use std::path::PathBuf;
use std::time::Duration;

/// Set in a worker's environment: it makes a syscall its sandbox forbids right after entering
/// it (and must die by SIGSYS). Its value names the call (`setsockopt`, `tgkill`, `socket`,
/// `mmap`; anything else opens a file), see `sandbox::probe`.
pub const SECCOMP_PROBE: &str = "KAKEHI_TEST_SECCOMP_PROBE";
/// While the file it names exists, starting a worker fails.
pub const START_FAILS: &str = "KAKEHI_TEST_WORKER_START_FAILS";
/// The next main of an upgrade waits this many milliseconds, its workers started, before it
/// says "ready" (so that a test can kill it mid-handoff).
pub const HANDOFF_PAUSE: &str = "KAKEHI_TEST_HANDOFF_PAUSE_MS";

/// The hooks are compiled in.
pub const ENABLED: bool = cfg!(any(debug_assertions, feature = "test-hooks"));

fn var(name: &str) -> Option<String> {
    if ENABLED {
        std::env::var(name).ok()
    } else {
        None
    }
}

/// The forbidden call a worker must make after entering its sandbox, if any.
pub fn seccomp_probe() -> Option<String> {
    var(SECCOMP_PROBE)
}

/// The file whose existence makes worker starts fail, when it exists now.
pub fn start_fails() -> Option<PathBuf> {
    var(START_FAILS)
        .map(PathBuf::from)
        .filter(|path| path.exists())
}

/// How long the next main of an upgrade pauses before saying "ready".
pub fn handoff_pause() -> Option<Duration> {
    var(HANDOFF_PAUSE)
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis)
}
