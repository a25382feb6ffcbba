//! A request to stop, from a signal (Ctrl-C, a cluster's pre-emption `SIGTERM`). The
//! program's signal handler records the signal here; the training loop reads it at each
//! step boundary, writes a checkpoint and returns, so that at most the step in flight is
//! lost, and the loader reads it while it waits for a batch (a stalled source must not
//! keep the run from stopping). Signals are process-wide, so this state is too; recording is async-signal-safe
//! (one atomic compare-and-swap).

use std::sync::atomic::{AtomicI32, Ordering};

/// 0: no request; otherwise the signal number.
static REQUESTED: AtomicI32 = AtomicI32::new(0);

/// Records `signal` as the reason to stop. Returns `false` when a stop was already
/// requested (the caller's handler then exits at once: a second Ctrl-C is not ignored).
pub fn request(signal: i32) -> bool {
    REQUESTED
        .compare_exchange(0, signal.max(1), Ordering::SeqCst, Ordering::SeqCst)
        .is_ok()
}

/// The signal that asked the run to stop, if any.
pub fn requested() -> Option<i32> {
    match REQUESTED.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_first_request_wins_and_a_second_is_reported() {
        assert_eq!(super::requested(), None);
        assert!(super::request(15));
        assert!(!super::request(2));
        assert_eq!(super::requested(), Some(15));
        super::REQUESTED.store(0, std::sync::atomic::Ordering::SeqCst);
    }
}
