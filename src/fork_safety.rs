//! The process-wide locks a `fork` must not copy while they are held.
//!
//! `fork` copies only the calling thread. If another thread holds one of specdec's process-wide locks at that
//! moment (the table of live C handles, the CPU pool's slot), the child inherits it locked with no thread left to
//! release it, and its next call waits for ever. So, as glibc does for `malloc`, a `pthread_atfork` handler has
//! the forking thread take every such lock just before `fork` and release it in the parent and in the child
//! right after: the child starts with each lock free and its data whole. The locks are held only for one map
//! operation or one `Arc` clone, so a fork waits for at most that.

use std::any::Any;
use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};

thread_local! {
    /// The guards the forking thread holds across `fork` (the child's copy of this thread holds them too).
    static HELD: RefCell<Vec<Box<dyn Any>>> = const { RefCell::new(Vec::new()) };
}

#[cfg(unix)]
extern "C" {
    fn pthread_atfork(
        prepare: Option<unsafe extern "C" fn()>,
        parent: Option<unsafe extern "C" fn()>,
        child: Option<unsafe extern "C" fn()>,
    ) -> std::ffi::c_int;
}

unsafe extern "C" fn before_fork() {
    // Never unwind into libc: a panic here (none is expected) leaves the locks free, which is how they were.
    let _ = std::panic::catch_unwind(|| {
        let guards: Vec<Box<dyn Any>> = vec![
            crate::capi::lock_handles_for_fork(),
            crate::cpu::pool::lock_for_fork(),
        ];
        HELD.with(|held| *held.borrow_mut() = guards);
    });
}

unsafe extern "C" fn after_fork() {
    let _ = std::panic::catch_unwind(|| {
        // Released in the reverse order of taking them.
        HELD.with(|held| {
            let mut held = held.borrow_mut();
            while held.pop().is_some() {}
        });
    });
}

/// Installs the handlers, once per process (a child inherits them). Called before a lock they take is first used.
///
/// A flag, not a `Once`: a fork while another thread ran a `Once` would leave it running for ever in the child,
/// whose next call would then wait on it (seen: 1 child in 200 hung when the first fork met the first call).
/// The cost: a fork racing the very first registration (another thread may already hold a lock while this one
/// registers) may miss the handlers; every fork after the first call is covered.
pub(crate) fn install() {
    static INSTALLED: AtomicBool = AtomicBool::new(false);
    if INSTALLED.load(Ordering::Acquire) || INSTALLED.swap(true, Ordering::AcqRel) {
        return;
    }
    #[cfg(unix)]
    // SAFETY: the handlers are plain functions that live for the whole process.
    unsafe {
        pthread_atfork(Some(before_fork), Some(after_fork), Some(after_fork));
    }
}
