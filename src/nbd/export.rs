//! The storage interface the NBD server serves.

use std::io;
use std::sync::Arc;

/// One served disk.
///
/// Methods are called concurrently from several worker threads (of one or
/// many connections), so implementations synchronise internally. The server
/// has already checked that every range lies inside `[0, size_bytes())` as
/// reported when the client connected, and that lengths are non-zero.
pub trait Export: Send + Sync {
    /// Size of the disk in bytes; sampled once per connection at handshake.
    fn size_bytes(&self) -> u64;
    /// Fills `buf` with the bytes at `offset`: every byte of it, since the
    /// buffer is reused and holds an earlier request's bytes of this
    /// connection.
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `offset`; with `fua` the data must be durable on return.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()>;
    /// Make every acknowledged write durable.
    ///
    /// Because the server advertises `NBD_FLAG_CAN_MULTI_CONN`, this must cover
    /// writes completed through *any* connection to this export, not only the
    /// calling one.
    fn flush(&self) -> io::Result<()>;
    /// Discards `[offset, offset+len)`; the contents become unspecified.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()>;
    /// Zeroes `[offset, offset+len)`.
    /// may_unmap = !NBD_CMD_FLAG_NO_HOLE.
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, fua: bool) -> io::Result<()>;
    /// Allocation status for base:allocation: contiguous extents covering at least a prefix of
    /// [offset, offset+len), each (length, flags) with flags bit0 = NBD_STATE_HOLE, bit1 = NBD_STATE_ZERO.
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u32)>>;
    /// Names of the dirty bitmaps a client may select as the metadata
    /// context `qemu:dirty-bitmap:NAME` (qemu's convention, read by backup
    /// tools); sampled when a client lists or selects contexts.
    fn dirty_bitmaps(&self) -> Vec<String> {
        Vec::new()
    }
    /// Changed status for `qemu:dirty-bitmap:NAME`: contiguous extents covering
    /// at least a prefix of [offset, offset+len), each (length, flags) with
    /// flags bit0 = NBD_STATE_DIRTY.
    fn dirty_status(&self, bitmap: &str, offset: u64, len: u64) -> io::Result<Vec<(u64, u32)>> {
        let _ = (offset, len);
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no dirty bitmap {bitmap:?} on this export"),
        ))
    }
    /// Whether the export can answer NBD_CMD_WRITE_ZEROES with FAST_ZERO (return true if zeroing never writes data).
    fn fast_zero(&self) -> bool {
        true
    }
    /// Whether the export refuses writes; sampled at handshake for
    /// NBD_FLAG_READ_ONLY (the write calls still refuse on their own if it
    /// becomes read-only later).
    fn read_only(&self) -> bool {
        false
    }
}

/// The set of exports; looked up by name on every handshake (exports can be created/deleted while serving).
pub trait ExportProvider: Send + Sync {
    /// Names of all exports, for NBD_OPT_LIST.
    fn list(&self) -> Vec<String>;
    /// The export called `name`, or `None` if it does not exist.
    fn open(&self, name: &str) -> Option<Arc<dyn Export>>;
    /// Name used when the client asks for the empty export name "".
    fn default_name(&self) -> Option<String>;
}
