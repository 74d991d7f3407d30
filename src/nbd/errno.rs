//! Mapping of export I/O errors to the small set of NBD error values.

use std::io;

use super::proto::{NBD_EINVAL, NBD_EIO, NBD_ENOSPC, NBD_ENOTSUP, NBD_EPERM};

// Linux errno values; NBD only defines a handful and clients rely on the
// protocol values, not on the server's OS.
const EPERM: i32 = 1;
const EINVAL: i32 = 22;
const EFBIG: i32 = 27;
const ENOSPC: i32 = 28;
const EROFS: i32 = 30;
const EOPNOTSUPP: i32 = 95;
const EDQUOT: i32 = 122;

/// Converts an export error into the NBD error value sent to the client.
///
/// ENOSPC (and EDQUOT/EFBIG, as the spec recommends) -> NBD_ENOSPC,
/// EINVAL -> NBD_EINVAL, EPERM/EROFS -> NBD_EPERM,
/// ENOTSUP/Unsupported -> NBD_ENOTSUP, anything else -> NBD_EIO.
pub fn nbd_error_from_io(err: &io::Error) -> u32 {
    if let Some(code) = err.raw_os_error() {
        return match code {
            ENOSPC | EDQUOT | EFBIG => NBD_ENOSPC,
            EINVAL => NBD_EINVAL,
            EPERM | EROFS => NBD_EPERM,
            EOPNOTSUPP => NBD_ENOTSUP,
            _ => NBD_EIO,
        };
    }
    match err.kind() {
        io::ErrorKind::StorageFull | io::ErrorKind::FileTooLarge => NBD_ENOSPC,
        io::ErrorKind::InvalidInput => NBD_EINVAL,
        io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => NBD_EPERM,
        io::ErrorKind::Unsupported => NBD_ENOTSUP,
        _ => NBD_EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_os_errors() {
        let os = |c| nbd_error_from_io(&io::Error::from_raw_os_error(c));
        assert_eq!(os(ENOSPC), NBD_ENOSPC);
        assert_eq!(os(EDQUOT), NBD_ENOSPC);
        assert_eq!(os(EINVAL), NBD_EINVAL);
        assert_eq!(os(EPERM), NBD_EPERM);
        assert_eq!(os(EROFS), NBD_EPERM);
        assert_eq!(os(EOPNOTSUPP), NBD_ENOTSUP);
        assert_eq!(os(5), NBD_EIO);
        assert_eq!(os(12), NBD_EIO);
    }

    #[test]
    fn maps_error_kinds() {
        let kind = |k| nbd_error_from_io(&io::Error::new(k, "x"));
        assert_eq!(kind(io::ErrorKind::StorageFull), NBD_ENOSPC);
        assert_eq!(kind(io::ErrorKind::InvalidInput), NBD_EINVAL);
        assert_eq!(kind(io::ErrorKind::PermissionDenied), NBD_EPERM);
        assert_eq!(kind(io::ErrorKind::ReadOnlyFilesystem), NBD_EPERM);
        assert_eq!(kind(io::ErrorKind::Unsupported), NBD_ENOTSUP);
        assert_eq!(kind(io::ErrorKind::Other), NBD_EIO);
        assert_eq!(kind(io::ErrorKind::UnexpectedEof), NBD_EIO);
    }
}
