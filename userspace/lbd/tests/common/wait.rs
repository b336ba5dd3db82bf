//! Deadlines instead of sleeps: polling a condition until it holds, or while it holds.

use std::thread;
use std::time::{Duration, Instant};

/// Interval between two looks at something the test waits for.
pub(super) const POLL: Duration = Duration::from_millis(5);

/// Polls `cond` until it holds or `deadline` passes; true when it held.
pub fn wait_until(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(POLL);
    }
}

/// Checks that `cond` keeps holding for the whole `window` (a negative observation: "nothing
/// arrives"). Returns false at the first moment it does not.
pub fn holds_for(window: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + window;
    loop {
        if !cond() {
            return false;
        }
        if Instant::now() >= end {
            return true;
        }
        thread::sleep(POLL);
    }
}
