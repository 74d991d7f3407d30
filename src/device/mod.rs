//! Devices: positioned I/O and flush behind a trait, so tests can wrap a device
//! with faults ([`crate::device::fault`]) without touching the engine.

pub mod fault;
mod page_cache;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::util::error::{Error, Result};

/// A device the pool stores bytes on.
pub trait BlockDevice: Send + Sync {
    /// Path for messages.
    fn path(&self) -> &Path;
    fn size_bytes(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Read without leaving the bytes in the host's page cache, where the
    /// device can (scrub: reading a whole pool must not evict the clients'
    /// cached data). Direct I/O needs `buf`'s address, its length and
    /// `offset` aligned to [`DIRECT_IO_ALIGN`]; otherwise, and on devices
    /// without it, this is [`read_at`](Self::read_at).
    ///
    /// [`DIRECT_IO_ALIGN`]: crate::util::aligned::DIRECT_IO_ALIGN
    fn read_uncached(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_at(buf, offset)
    }
    /// Whether the host page cache holds any page of the range; None on
    /// devices without one, or where the kernel does not say.
    fn page_cache_holds(&self, _offset: u64, _len: usize) -> Option<bool> {
        None
    }
    /// Start reading a range no page of which is cached into the cache,
    /// without waiting ([`read_drop_behind`](Self::read_drop_behind) reads
    /// it later). No-op by default.
    fn prefetch(&self, _offset: u64, _len: usize) {}
    /// Drop the range's clean pages from the host page cache (a prefetch
    /// never read). No-op by default.
    fn drop_cached(&self, _offset: u64, _len: usize) {}
    /// Read bytes that are needed once (scrub), leaving the host page
    /// cache as it was. `cached` is [`page_cache_holds`] for the range,
    /// asked before any prefetch of it: a range no page of which was cached
    /// is read through the cache and dropped after; one with cached pages
    /// is read like [`read_uncached`](Self::read_uncached); None is
    /// [`read_at`](Self::read_at).
    ///
    /// [`page_cache_holds`]: Self::page_cache_holds
    fn read_drop_behind(
        &self,
        buf: &mut [u8],
        offset: u64,
        _cached: Option<bool>,
    ) -> io::Result<()> {
        self.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Whether writes to this device may run on helper threads next to
    /// writes to another (the copies of one piece). A device that must
    /// replay the same way from a seed (a power-cut budget shared across
    /// devices) says no.
    fn parallel_writes(&self) -> bool {
        true
    }
    /// Whether a long sequential reader (scrub) gains from keeping several
    /// reads in flight on helper threads: a real device does (its queue,
    /// and direct reads get no kernel read-ahead); an in-memory one, whose
    /// reads must interleave the same way from a seed, says no.
    fn reads_ahead(&self) -> bool {
        false
    }
    /// Make every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Write `buf` and make just these bytes durable before returning (the
    /// intent log): other writes not yet flushed need not be. The default
    /// flushes everything.
    fn write_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)?;
        self.flush()
    }
}

/// A regular file or block device, locked exclusively while open.
pub struct FileDevice {
    path: PathBuf,
    file: File,
    /// The same file opened with O_DIRECT, for [`BlockDevice::read_uncached`];
    /// None where the host filesystem refuses it.
    direct: Option<File>,
    /// A direct read was refused (EINVAL): plain reads from then on.
    direct_refused: std::sync::atomic::AtomicBool,
    /// The same file opened with O_DSYNC, for
    /// [`BlockDevice::write_durable`]: the kernel syncs only the range
    /// written, where `fdatasync` would also write back (and allocate) every
    /// dirty page of the file.
    dsync: Option<File>,
    /// The same file again, with kernel read-ahead off (`fadvise` RANDOM),
    /// for [`BlockDevice::read_drop_behind`]: read-ahead would cache the
    /// next unit before it is checked, so it would never be dropped. A
    /// descriptor of its own keeps the clients' read-ahead.
    once: Option<File>,
    size_bytes: u64,
}

impl FileDevice {
    /// Open read-write and take an exclusive lock.
    pub fn open(path: &Path) -> Result<FileDevice> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::Device {
                path: path.into(),
                msg: format!("cannot open: {e}"),
            })?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(Error::Busy(format!(
                    "{}: in use by another process{}",
                    path.display(),
                    crate::device::owner_hint(path)
                )))
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(Error::Device {
                    path: path.into(),
                    msg: format!("cannot lock: {e}"),
                })
            }
        }
        let size_bytes = device_size(&file).map_err(|e| Error::Device {
            path: path.into(),
            msg: format!("cannot read size: {e}"),
        })?;
        let direct = open_again(&file, path, rustix::fs::OFlags::DIRECT, false);
        let dsync = open_again(&file, path, rustix::fs::OFlags::DSYNC, true);
        let once = open_again(&file, path, rustix::fs::OFlags::empty(), false)
            .filter(|f| rustix::fs::fadvise(f, 0, None, rustix::fs::Advice::Random).is_ok());
        Ok(FileDevice {
            path: path.into(),
            file,
            direct,
            direct_refused: Default::default(),
            dsync,
            once,
            size_bytes,
        })
    }

    /// Create (sparse) or extend a regular file to `size_bytes`.
    pub fn create_sparse(path: &Path, size_bytes: u64) -> Result<()> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| Error::Device {
                path: path.into(),
                msg: format!("cannot create: {e}"),
            })?;
        let cur = f.metadata().map(|m| m.len()).unwrap_or(0);
        if cur < size_bytes {
            f.set_len(size_bytes).map_err(|e| Error::Device {
                path: path.into(),
                msg: format!("cannot size to {size_bytes}: {e}"),
            })?;
        }
        Ok(())
    }
}

/// The file behind `file` opened again with `flags` (O_DIRECT for reads,
/// O_DSYNC for writes), if the filesystem allows it. Through /proc/self/fd,
/// so it is the same file even if `path` was renamed or replaced since. The
/// lock stays with `file`.
fn open_again(file: &File, path: &Path, flags: rustix::fs::OFlags, write: bool) -> Option<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(flags.bits() as i32)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .inspect_err(|e| tracing::debug!("{}: cannot open with {flags:?} ({e})", path.display()))
        .ok()
}

fn device_size(file: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let m = file.metadata()?;
    if m.is_file() {
        return Ok(m.len());
    }
    // Block devices report 0 in metadata; seeking to the end gives the size.
    let mut f = file;
    f.seek(SeekFrom::End(0))
}

/// Who holds a pool, if a server left a note beside the device.
pub fn owner_hint(path: &Path) -> String {
    let note = owner_note_path(path);
    match std::fs::read_to_string(&note) {
        Ok(s) if !s.trim().is_empty() => format!(" ({})", s.trim()),
        _ => String::new(),
    }
}

/// Where a server records its pid and control socket for a device.
pub fn owner_note_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".owner");
    PathBuf::from(p)
}

impl BlockDevice for FileDevice {
    fn path(&self) -> &Path {
        &self.path
    }
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn reads_ahead(&self) -> bool {
        true
    }
    fn read_uncached(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        use crate::util::aligned::DIRECT_IO_ALIGN as A;
        let aligned = (buf.as_ptr() as usize).is_multiple_of(A)
            && buf.len().is_multiple_of(A)
            && offset.is_multiple_of(A as u64);
        use std::sync::atomic::Ordering::Relaxed;
        match &self.direct {
            // The kernel writes back dirty cached pages of the range first,
            // so a direct read sees what buffered writes left.
            Some(d) if aligned && !self.direct_refused.load(Relaxed) => {
                match d.read_exact_at(buf, offset) {
                    // Opened, yet refused for I/O (a filesystem that wants
                    // larger alignment): not a device error.
                    Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                        tracing::info!(
                            "{}: direct reads refused ({e}); reading through the page cache",
                            self.path.display()
                        );
                        self.direct_refused.store(true, Relaxed);
                        self.read_at(buf, offset)
                    }
                    r => r,
                }
            }
            _ => self.read_at(buf, offset),
        }
    }
    fn page_cache_holds(&self, offset: u64, len: usize) -> Option<bool> {
        page_cache::any_resident(self.once.as_ref()?, offset, len)
    }
    fn prefetch(&self, offset: u64, len: usize) {
        if let Some(f) = &self.once {
            page_cache::prefetch(f, offset, len);
        }
    }
    fn drop_cached(&self, offset: u64, len: usize) {
        if let Some(f) = &self.once {
            page_cache::drop_range(f, offset, len);
        }
    }
    fn read_drop_behind(
        &self,
        buf: &mut [u8],
        offset: u64,
        cached: Option<bool>,
    ) -> io::Result<()> {
        match (cached, &self.once) {
            // No one had it cached: read through the cache (no read-ahead
            // on this descriptor) and drop it. A client reading it in
            // between reads it again from the device: rare, only a cost.
            (Some(false), Some(f)) => {
                let r = f.read_exact_at(buf, offset);
                page_cache::drop_range(f, offset, buf.len());
                r
            }
            // Some pages are cached: read around the cache. A buffered
            // read would touch them, and one carrying the kernel's
            // read-ahead mark starts read-ahead even on this descriptor,
            // caching the next units before they are asked about.
            (Some(true), _) => self.read_uncached(buf, offset),
            _ => self.read_at(buf, offset),
        }
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn write_durable(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match &self.dsync {
            Some(f) => f.write_all_at(buf, offset),
            None => {
                self.write_at(buf, offset)?;
                self.flush()
            }
        }
    }
}

/// Smallest device mkfs and `device add` accept.
pub const MIN_DEVICE_BYTES: u64 = 32 << 20;

/// Read every valid superblock copy of a device; the newest first.
pub fn read_supers(dev: &dyn BlockDevice) -> Result<Vec<crate::format::Superblock>> {
    let mut out = Vec::new();
    let mut last = String::from("device too small");
    for &o in &crate::format::SUPER_OFFSETS {
        if o + crate::format::SUPER_BYTES as u64 > dev.size_bytes() {
            break;
        }
        let mut buf = vec![0u8; crate::format::SUPER_BYTES];
        if let Err(e) = dev.read_at(&mut buf, o) {
            last = format!("copy at {o}: {e}");
            continue;
        }
        match crate::format::Superblock::decode(&buf) {
            Ok(sb) => out.push(sb),
            Err(e) => last = format!("copy at {o}: {e}"),
        }
    }
    if out.is_empty() {
        return Err(Error::BadSuper {
            path: dev.path().into(),
            msg: format!("no valid superblock ({last})"),
        });
    }
    out.sort_by_key(|s| std::cmp::Reverse(s.generation));
    Ok(out)
}
