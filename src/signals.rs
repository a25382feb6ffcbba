//! SIGINT and SIGTERM during training: the first asks the loop to stop at the next step
//! boundary (it writes a checkpoint, then the process exits with `128 + signal`); a
//! second exits at once with that status.

/// Installs the handlers (training commands only: elsewhere the default, immediate exit
/// is what a user expects of Ctrl-C).
pub fn stop_at_step_boundary() {
    extern "C" fn on_signal(signal: libc::c_int) {
        if !vlp_train::interrupt::request(signal) {
            // No `pipe:` command outlives the run (atomics and `kill` only).
            vlp_data::source::kill_all_pipes();
            // SAFETY: `_exit` is async-signal-safe; no destructor needs to run.
            unsafe { libc::_exit(128 + signal) };
        }
    }
    on_sigint_and_sigterm(on_signal);
}

/// Installs `handler` for SIGINT and SIGTERM. The handler must do async-signal-safe work
/// only (atomics, `_exit`).
pub fn on_sigint_and_sigterm(handler: extern "C" fn(libc::c_int)) {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the caller's handler is async-signal-safe; the sigaction struct is
        // zeroed, then filled in.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = handler as usize;
            libc::sigemptyset(&mut action.sa_mask);
            action.sa_flags = libc::SA_RESTART;
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
    }
}
