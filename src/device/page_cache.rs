//! Whether the host page cache holds any page of a file range, and dropping
//! a range from it. Scrub reads every copy in the pool once; through the
//! cache, that would evict what the clients keep hot there (btrfs and ZFS
//! scrub read around the cache). Reading around it with O_DIRECT is slower
//! on the hosts measured (docs/BENCHMARKS.md), so scrub reads a range no
//! one has cached through the cache and drops it after ("drop-behind").

use std::fs::File;
use std::os::fd::AsRawFd;

/// Host page size in bytes.
fn page_bytes() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(p).ok().filter(|&p| p > 0).unwrap_or(4096)
}

/// Whether any page covering `offset .. offset + len` of `file` is in the
/// page cache; None when the kernel does not say.
pub(super) fn any_resident(file: &File, offset: u64, len: usize) -> Option<bool> {
    if len == 0 {
        return Some(false);
    }
    let page = page_bytes();
    let start = offset - offset % page;
    let span_bytes = usize::try_from(offset + len as u64 - start).ok()?;
    let mut flags = vec![0u8; span_bytes.div_ceil(page as usize)];
    let at = libc::off_t::try_from(start).ok()?;
    // SAFETY: a fresh read-only shared mapping of the file that is never
    // dereferenced: mincore only asks the kernel about it, then it is
    // unmapped. `flags` holds one byte per page of the mapping.
    let ok = unsafe {
        let addr = libc::mmap(
            std::ptr::null_mut(),
            span_bytes,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            at,
        );
        if addr == libc::MAP_FAILED {
            return None;
        }
        let r = libc::mincore(addr, span_bytes, flags.as_mut_ptr());
        libc::munmap(addr, span_bytes);
        r == 0
    };
    ok.then(|| flags.iter().any(|f| f & 1 != 0))
}

/// Drop `offset .. offset + len` of `file` from the page cache: clean pages
/// go at once, the kernel keeps dirty ones (a client wrote them since).
pub(super) fn drop_range(file: &File, offset: u64, len: usize) {
    advise(file, offset, len, rustix::fs::Advice::DontNeed);
}

/// Start reading `offset .. offset + len` of `file` into the page cache
/// without waiting for it.
pub(super) fn will_need(file: &File, offset: u64, len: usize) {
    advise(file, offset, len, rustix::fs::Advice::WillNeed);
}

/// Advice only: a failure leaves pages cached, nothing else.
fn advise(file: &File, offset: u64, len: usize, advice: rustix::fs::Advice) {
    let _ = rustix::fs::fadvise(file, offset, std::num::NonZeroU64::new(len as u64), advice);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    /// A file of `bytes` in a directory of its own (`name`), none of it
    /// in the page cache, opened without kernel read-ahead (it would cache
    /// pages nobody asked for).
    fn uncached_file(name: &str, bytes: usize) -> (std::path::PathBuf, File) {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        let mut f = File::create(&path).unwrap();
        f.write_all(&vec![7u8; bytes]).unwrap();
        f.sync_all().unwrap();
        let f = File::open(&path).unwrap();
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::Random).unwrap();
        drop_range(&f, 0, bytes);
        assert_eq!(any_resident(&f, 0, bytes), Some(false));
        (dir, f)
    }

    #[test]
    fn residency_follows_reads_and_drops() {
        let (dir, f) = uncached_file("cv-pagecache", 64 << 10);
        let page = page_bytes() as usize;
        f.read_exact_at(&mut vec![0u8; page], 32 << 10).unwrap();
        assert_eq!(any_resident(&f, 0, 32 << 10), Some(false));
        assert_eq!(any_resident(&f, 0, 64 << 10), Some(true));
        // Unaligned ranges ask about every page they touch.
        assert_eq!(any_resident(&f, (32 << 10) + 100, 1), Some(true));
        drop_range(&f, 32 << 10, page);
        assert_eq!(any_resident(&f, 0, 64 << 10), Some(false));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn will_need_reads_the_range_in() {
        let (dir, f) = uncached_file("cv-willneed", 256 << 10);
        will_need(&f, 128 << 10, 8 << 10);
        // The read runs in the background: wait for it, within a bound.
        let mut cached = false;
        for _ in 0..200 {
            cached = any_resident(&f, 128 << 10, 8 << 10) == Some(true);
            if cached {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(cached, "the range asked for was not read in");
        assert_eq!(
            any_resident(&f, 0, 64 << 10),
            Some(false),
            "a range not asked for was read"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
