//! The only module of linen with `unsafe`: socket options that `socket2` does not offer.
//! Each block carries a `// SAFETY:` comment.

#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd};

/// Sets `SO_SNDBUF`/`SO_RCVBUF` to `bytes`, first with the `…FORCE` variants (root may exceed
/// `net.core.{w,r}mem_max`), then the plain ones. Best effort: a failure only means smaller
/// buffers, so it is logged, not returned.
pub fn set_socket_buffers(fd: BorrowedFd<'_>, bytes: usize) {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    for (force, plain, name) in [
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, "send"),
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, "receive"),
    ] {
        if setsockopt_int(fd, libc::SOL_SOCKET, force, value).is_err()
            && let Err(e) = setsockopt_int(fd, libc::SOL_SOCKET, plain, value)
        {
            tracing::warn!(error = %e, bytes, "cannot set the UDP {name} buffer");
        }
    }
}

fn setsockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: `fd` is a valid open descriptor for the lifetime of the borrow; we pass a pointer to
    // a live `c_int` on our stack and its exact size, which is what these SOL_SOCKET options read.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
