//! A random 16-byte identity for a new bitmap (RFC 4122 version 4 layout), from the
//! kernel's random source (`getrandom`, or `/dev/urandom`).

use std::io::Read;

use crate::error::{errno_of, Error, ErrorKind, Result};

/// 16 random bytes with the version-4 / variant-1 bits set.
pub(crate) fn random_uuid() -> Result<[u8; 16]> {
    let mut u = [0u8; 16];
    let mut filled = 0;
    while filled < u.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `u`, writable.
        let n = unsafe { libc::getrandom(u[filled..].as_mut_ptr().cast(), u.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
            continue;
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EINTR) {
            continue;
        }
        // No getrandom (old kernel, seccomp): the device file.
        std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut u)).map_err(|e| {
            Error::new(ErrorKind::Io, errno_of(&e), format!("cannot read random bytes for a bitmap uuid: {e}"))
        })?;
        break;
    }
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    Ok(u)
}

#[cfg(test)]
mod tests {
    #[test]
    fn dirty_uuids_differ_and_have_version_4() {
        let a = super::random_uuid().unwrap();
        let b = super::random_uuid().unwrap();
        assert_ne!(a, b);
        assert_eq!(a[6] >> 4, 4);
        assert_eq!(a[8] >> 6, 2);
    }
}
