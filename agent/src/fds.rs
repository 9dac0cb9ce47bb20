//! The two places the agent names a file descriptor by number: the PTY master that
//! `portable-pty` opened (duplicated while its owner holds it), and the masters an agent
//! update hands to the process it becomes (numbers that process finds in its handover
//! state, each claimed once).
#![allow(unsafe_code)]

use std::os::fd::{BorrowedFd, OwnedFd, RawFd};

/// A close-on-exec duplicate of `fd`, which the caller's own object keeps open meanwhile.
pub(crate) fn dup_open(fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: the caller holds the object that owns `fd` for the length of this call.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    Ok(rustix::io::fcntl_dupfd_cloexec(borrowed, 3)?)
}

/// Takes ownership of `fd`, inherited across `exec` from the agent this process replaced,
/// and marks it close-on-exec again (so no session's process inherits another's master).
/// Fails when no such descriptor is open.
pub(crate) fn claim_inherited(fd: RawFd) -> std::io::Result<OwnedFd> {
    if fd < 3 {
        return Err(std::io::Error::other(format!(
            "descriptor {fd} is not a handover's"
        )));
    }
    // SAFETY: only checks that `fd` is open; nothing is read or closed through it.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    rustix::io::fcntl_getfd(borrowed)?;
    // SAFETY: the handover state names each descriptor once, and nothing else in this
    // process owns descriptors inherited from the agent it replaced.
    let owned = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&owned, rustix::io::FdFlags::CLOEXEC)?;
    Ok(owned)
}
