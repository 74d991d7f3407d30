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
    /// Drop the range's clean pages from the host page cache: what a
    /// drop-behind reader read, and what the kernel read ahead of it. The
    /// kernel keeps dirty and locked pages, and every folio reaching outside
    /// the range. No-op by default.
    fn drop_cached(&self, _offset: u64, _len: usize) {}
    /// Read bytes that are needed once (scrub), leaving the host page
    /// cache as it was. `cached` is [`page_cache_holds`] for the range,
    /// asked before this reader's read-ahead could reach it: a range no
    /// page of which was cached is read through the cache (the kernel
    /// reads ahead of a sequential reader), for the caller to drop with
    /// [`drop_cached`](Self::drop_cached); one with cached pages is read
    /// like [`read_uncached`](Self::read_uncached); None is
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
    /// Write `buf` at `offset`. A [`FileDevice`] writes pieces of
    /// [`DIRECT_WRITE_MIN_BYTES`] and more around the host page cache.
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
    /// Start reading the range into the host page cache and return
    /// without waiting: a reader about to read many small scattered ranges
    /// (a fragmented volume range) asks for them all first, so the device
    /// sees them together instead of one after another. A hint; no-op by
    /// default.
    fn prefetch(&self, _offset: u64, _len: usize) {}
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

/// Writes of this many bytes and more (aligned to
/// [`DIRECT_IO_ALIGN`](crate::util::aligned::DIRECT_IO_ALIGN)) go to a
/// [`FileDevice`] with direct I/O: bulk data (client writes of 256 KiB and
/// up, relocation, replace) is seldom read again soon, and copying it into
/// fresh page-cache pages of the host file, serialized on the file's inode
/// lock, held 1 MiB writes to about half the speed (bench/profile.md,
/// "Direct writes"). The cost: a read right after such a write comes from
/// the device, not the host cache. Smaller writes stay buffered: a direct
/// 4 KiB write waits for the device and measured 2.5x fewer IOPS.
pub const DIRECT_WRITE_MIN_BYTES: usize = 256 << 10;

/// Bounce buffers a device keeps for direct writes of unaligned buffers
/// (NBD payloads), and the size of each: the write is copied through them
/// a piece at a time, so memory stays bounded by
/// `BOUNCE_BUFS x BOUNCE_BYTES` per device however large the write.
const BOUNCE_BUFS: usize = 8;
const BOUNCE_BYTES: usize = 1 << 20;

/// A regular file or block device, locked exclusively while open.
pub struct FileDevice {
    path: PathBuf,
    file: File,
    /// The same file opened with O_DIRECT, for [`BlockDevice::read_uncached`]
    /// and large writes; None where the host filesystem refuses it.
    direct: Option<File>,
    /// A direct read or write was refused (EINVAL): buffered I/O from then
    /// on.
    direct_refused: std::sync::atomic::AtomicBool,
    /// Spare aligned buffers for direct writes, at most [`BOUNCE_BUFS`].
    bounce: crate::util::sync::Mutex<Vec<crate::util::aligned::AlignedBuf>>,
    /// The same file opened with O_DSYNC, for
    /// [`BlockDevice::write_durable`]: the kernel syncs only the range
    /// written, where `fdatasync` would also write back (and allocate) every
    /// dirty page of the file.
    dsync: Option<File>,
    /// The same file again, for [`BlockDevice::read_drop_behind`]: a
    /// descriptor of its own, so scrub's sequential stream and the
    /// clients' reads keep separate kernel read-ahead state.
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
        let direct = open_again(&file, path, rustix::fs::OFlags::DIRECT, true);
        let dsync = open_again(&file, path, rustix::fs::OFlags::DSYNC, true);
        let once = open_again(&file, path, rustix::fs::OFlags::empty(), false);
        Ok(FileDevice {
            path: path.into(),
            file,
            direct,
            direct_refused: Default::default(),
            bounce: Default::default(),
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
    fn prefetch(&self, offset: u64, len: usize) {
        page_cache::will_need(&self.file, offset, len);
    }
    fn read_uncached(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        use crate::util::aligned::DIRECT_IO_ALIGN as A;
        let aligned = (buf.as_ptr() as usize).is_multiple_of(A)
            && buf.len().is_multiple_of(A)
            && offset.is_multiple_of(A as u64);
        match self.direct_file() {
            // The kernel writes back dirty cached pages of the range first,
            // so a direct read sees what buffered writes left.
            Some(d) if aligned => match d.read_exact_at(buf, offset) {
                Err(e) if self.refused(&e, "reads") => self.read_at(buf, offset),
                r => r,
            },
            _ => self.read_at(buf, offset),
        }
    }
    fn page_cache_holds(&self, offset: u64, len: usize) -> Option<bool> {
        page_cache::any_resident(self.once.as_ref()?, offset, len)
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
            // No one had it cached: read through the cache (the kernel
            // reads ahead of this descriptor's sequential stream); the
            // caller drops it.
            (Some(false), Some(f)) => f.read_exact_at(buf, offset),
            // Some pages are cached: read around the cache, which a
            // buffered read would reorder (and the pages are not ours to
            // drop).
            (Some(true), _) => self.read_uncached(buf, offset),
            _ => self.read_at(buf, offset),
        }
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        use crate::util::aligned::DIRECT_IO_ALIGN as A;
        let bulk = buf.len() >= DIRECT_WRITE_MIN_BYTES
            && buf.len().is_multiple_of(A)
            && offset.is_multiple_of(A as u64);
        match self.direct_file() {
            // The kernel writes back and drops cached pages of the range
            // around a direct write, so buffered reads see its bytes.
            Some(d) if bulk => match self.write_direct(d, buf, offset) {
                Err(e) if self.refused(&e, "writes") => self.file.write_all_at(buf, offset),
                r => r,
            },
            _ => self.file.write_all_at(buf, offset),
        }
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

impl FileDevice {
    /// The O_DIRECT descriptor, unless the filesystem refused direct I/O.
    fn direct_file(&self) -> Option<&File> {
        use std::sync::atomic::Ordering::Relaxed;
        self.direct
            .as_ref()
            .filter(|_| !self.direct_refused.load(Relaxed))
    }

    /// Whether `e` is the filesystem refusing direct I/O (EINVAL: opened,
    /// yet refused for I/O, as where larger alignment is wanted), not a
    /// device error; buffered I/O is used from then on.
    fn refused(&self, e: &io::Error, what: &str) -> bool {
        if e.raw_os_error() != Some(rustix::io::Errno::INVAL.raw_os_error()) {
            return false;
        }
        tracing::info!(
            "{}: direct {what} refused ({e}); using the page cache",
            self.path.display()
        );
        self.direct_refused
            .store(true, std::sync::atomic::Ordering::Relaxed);
        true
    }

    /// Write aligned `buf` through `d` (O_DIRECT); an unaligned buffer is
    /// copied through a bounce buffer a piece at a time.
    fn write_direct(&self, d: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        use crate::util::aligned::DIRECT_IO_ALIGN as A;
        if (buf.as_ptr() as usize).is_multiple_of(A) {
            return d.write_all_at(buf, offset);
        }
        let mut bounce = crate::util::sync::lock(&self.bounce)
            .pop()
            .unwrap_or_default();
        let mut r = Ok(());
        for (i, part) in buf.chunks(BOUNCE_BYTES).enumerate() {
            bounce.resize(part.len());
            bounce.copy_from_slice(part);
            r = d.write_all_at(&bounce, offset + (i * BOUNCE_BYTES) as u64);
            if r.is_err() {
                break;
            }
        }
        let mut spare = crate::util::sync::lock(&self.bounce);
        if spare.len() < BOUNCE_BUFS {
            spare.push(bounce);
        }
        r
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

#[cfg(test)]
mod tests {
    use super::*;

    fn device(name: &str, size_bytes: u64) -> (FileDevice, PathBuf) {
        let dir = std::env::temp_dir().join(format!("cv-device-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("dev.img");
        let _ = std::fs::remove_file(&path);
        FileDevice::create_sparse(&path, size_bytes).unwrap();
        let dev = FileDevice::open(&path).unwrap();
        assert!(
            dev.direct.is_some(),
            "{}: the test directory must allow O_DIRECT",
            dir.display()
        );
        (dev, dir)
    }

    /// A pattern that differs per 4 KiB block and per `seed`.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i / 4096) as u8 ^ seed ^ i as u8)
            .collect()
    }

    #[test]
    fn bulk_writes_go_around_the_page_cache() {
        let (dev, dir) = device("bulk", 16 << 20);
        // Unaligned in memory (an NBD payload), larger than one bounce
        // buffer, not a multiple of it.
        let data = pattern((3 << 20) + 4096 + 1, 3);
        let unaligned = &data[1..];
        dev.write_at(unaligned, 1 << 20).unwrap();
        assert_eq!(dev.page_cache_holds(1 << 20, unaligned.len()), Some(false));
        let mut back = vec![0u8; unaligned.len()];
        dev.read_at(&mut back, 1 << 20).unwrap();
        assert!(back == unaligned, "the bytes written come back");
        // Small writes stay buffered.
        dev.write_at(&pattern(4096, 9), 8 << 20).unwrap();
        assert_eq!(dev.page_cache_holds(8 << 20, 4096), Some(true));
        assert!(crate::util::sync::lock(&dev.bounce).len() <= BOUNCE_BUFS);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_bulk_write_replaces_cached_and_dirty_pages() {
        let (dev, dir) = device("coherent", 4 << 20);
        let len = DIRECT_WRITE_MIN_BYTES;
        dev.write_at(&pattern(len, 1), 0).unwrap();
        // Cache the old bytes, and leave one page dirty with other bytes.
        let mut old = vec![0u8; len];
        dev.read_at(&mut old, 0).unwrap();
        dev.write_at(&pattern(4096, 2), 8192).unwrap();
        let new = pattern(len, 5);
        dev.write_at(&new, 0).unwrap();
        let mut back = vec![0u8; len];
        dev.read_at(&mut back, 0).unwrap();
        assert!(back == new, "a buffered read after a direct write sees it");
        // The dirty page was written back before the direct write, not
        // over it later.
        dev.flush().unwrap();
        dev.drop_cached(0, len);
        dev.read_at(&mut back, 0).unwrap();
        assert!(back == new, "the device holds the direct write's bytes");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
