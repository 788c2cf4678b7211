//! Ctrl-C during `tune`: the first SIGINT asks the training loop to stop
//! after the step it is on (it then writes the checkpoint, and `tune`
//! writes the state and exits 130); a second SIGINT exits at once (130).
use std::sync::atomic::{AtomicUsize, Ordering};

static HITS: AtomicUsize = AtomicUsize::new(0);

const FIRST: &[u8] = b"\ninterrupted: finishing the current step, then writing the checkpoint \
and the state (Ctrl-C again to abort at once)\n";

extern "C" fn on_sigint(_sig: libc::c_int) {
    // Only async-signal-safe work here: atomics, write(2) and _exit(2).
    if HITS.fetch_add(1, Ordering::SeqCst) == 0 {
        rwkv_tune::tune::train::request_stop();
        // SAFETY: write(2) is async-signal-safe; the buffer is a static
        // byte string that outlives the call, and its length is passed.
        unsafe {
            libc::write(2, FIRST.as_ptr().cast(), FIRST.len());
        }
    } else {
        // SAFETY: _exit(2) is async-signal-safe and never returns; it skips
        // destructors and atexit handlers, which is what "abort now" means.
        unsafe { libc::_exit(130) }
    }
}

/// Installs the SIGINT handler (idempotent).
pub fn install() {
    let handler: extern "C" fn(libc::c_int) = on_sigint;
    // SAFETY: `on_sigint` has the C signature signal(2) expects and does
    // only async-signal-safe work; replacing SIGINT's disposition affects
    // only this process.
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
    }
}
