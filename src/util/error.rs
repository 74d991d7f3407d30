//! Errors name the thing: device path, volume, logical address, and the
//! volume's byte range (`bytes A..B`: offsets, as NBD and qemu-io use).

use std::path::PathBuf;

/// Result alias for the engine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure the engine reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {op} failed at physical {physical:#x} length {len}: {source}")]
    DeviceIo {
        path: PathBuf,
        op: &'static str,
        physical: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    Device { path: PathBuf, msg: String },
    #[error("{path}: bad superblock: {msg}")]
    BadSuper { path: PathBuf, msg: String },
    #[error("corrupt tree block at logical {logical:#x}: {msg}")]
    BadNode { logical: u64, msg: String },
    #[error("no chunk maps logical {logical:#x}")]
    NoChunk { logical: u64 },
    #[error("no space left: {0}")]
    NoSpace(String),
    #[error("volume {volume}: bytes {lba}..{end} (logical {logical:#x}): no good copy on any mirror", end = lba + len)]
    Unrecoverable {
        volume: String,
        lba: u64,
        len: u64,
        logical: u64,
    },
    #[error("volume {0}: not found")]
    NoVolume(String),
    #[error("volume {0}: already exists")]
    VolumeExists(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("volume {volume}: range {offset}+{len} is past the end ({size} bytes)")]
    OutOfRange {
        volume: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("pool is read-only after an earlier failure: {0}")]
    Aborted(String),
    #[error("{0}")]
    Corrupt(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Degraded(String),
    #[error("volume {0}: read-only")]
    ReadOnlyVolume(String),
}

impl Error {
    /// Map to an errno-style io error for the NBD layer.
    pub fn to_io(&self) -> std::io::Error {
        use std::io::ErrorKind as K;
        let kind = match self {
            Error::NoSpace(_) => return std::io::Error::from_raw_os_error(28),
            Error::Invalid(_) | Error::OutOfRange { .. } => K::InvalidInput,
            Error::Aborted(_) => return std::io::Error::from_raw_os_error(30),
            // Writes a degraded pool cannot place on every mirror are refused
            // as on a read-only device (NBD_EPERM), message kept.
            Error::Degraded(_) | Error::ReadOnlyVolume(_) => K::ReadOnlyFilesystem,
            _ => K::Other,
        };
        std::io::Error::new(kind, self.to_string())
    }
}

impl From<Error> for std::io::Error {
    fn from(e: Error) -> Self {
        e.to_io()
    }
}
