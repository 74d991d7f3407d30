//! Reading one unit of one copy and checking every sector and tree block
//! in it against what the commit root says should be there.

use crate::btree::Node;
use crate::chunk::volumes::ChunkMap;
use crate::engine::fs_info::{tree_index, CommitRoots, FsInfo, NoRepair};
use crate::format::{item, objectid, tree_id, ExtentItem, Key, MetadataItem, SECTOR_BYTES};
use crate::util::sync::{Arc, Ordering};

use super::readahead::UnitRead;
use super::repair::repair;
use super::scan::{Alloc, DevScan};
use super::{ErrorKind, ErrorRecord};

/// A data extent's checksum item as scrub found it.
#[derive(Clone)]
pub(super) enum CsumLookup {
    Found(Vec<u8>),
    Missing,
    Unreadable,
}

/// Uncached lookup: scrub never repairs metadata it only reads for this.
fn csum_item(fs: &FsInfo, roots: &CommitRoots, start: u64) -> CsumLookup {
    match crate::btree::get(
        &NoRepair(fs),
        &roots.roots[tree_index(tree_id::CSUM)],
        &Key::new(objectid::CSUM, item::CSUM, start),
    ) {
        Ok(Some(v)) => CsumLookup::Found(v),
        Ok(None) => CsumLookup::Missing,
        Err(e) => {
            tracing::warn!("scrub: checksums of extent {start:#x} unreadable: {e}");
            CsumLookup::Unreadable
        }
    }
}

/// One unit of one copy: which copy, and where it is on the device and in
/// the chunk.
pub(super) struct Unit<'a> {
    /// The map scrub holds for the group (R2); repair uses only it (R5).
    pub(super) map: &'a Arc<ChunkMap>,
    /// This device's stripe in `map`.
    pub(super) idx: usize,
    pub(super) physical: u64,
    pub(super) logical: u64,
    pub(super) len: u64,
}

impl Unit<'_> {
    fn end(&self) -> u64 {
        self.logical + self.len
    }
    /// Where `logical` (inside the unit) is on the device.
    fn physical_of(&self, logical: u64) -> u64 {
        self.physical + (logical - self.logical)
    }
}

/// The allocations (sorted) overlapping `[logical, end)`.
pub(super) fn allocs_in(allocs: &[Alloc], node_bytes: u64, logical: u64, end: u64) -> &[Alloc] {
    let first = allocs.partition_point(|a| {
        let (s, l) = a.range(node_bytes);
        s + l <= logical
    });
    let n = allocs[first..]
        .iter()
        .take_while(|a| a.range(node_bytes).0 < end)
        .count();
    &allocs[first..first + n]
}

/// Verify one unit, `read` from the device; returns the bytes of data and
/// metadata it covered.
pub(super) fn scrub_unit(scan: &mut DevScan, u: &Unit, allocs: &[Alloc], read: UnitRead) -> u64 {
    let fs = scan.fs;
    let here = allocs_in(allocs, fs.node_bytes as u64, u.logical, u.end());
    debug_assert!(!here.is_empty(), "a unit with nothing in it is not read");
    let Some(dev) = fs.device(scan.devid) else {
        return 0;
    };
    debug_assert_eq!(read.buf.len() as u64, u.len);
    scan.buf = read.buf;
    let read_ok = read.ok;
    if !read_ok {
        // As btrfs: a read error scrub meets counts against the device
        // (persisted with the next commit, unless -r, which writes nothing).
        dev.stats.read_errs.fetch_add(1, Ordering::Relaxed);
        if !scan.run.opts.readonly {
            fs.dev_stats_dirty.store(true, Ordering::Release);
        }
    }
    let mut covered = 0;
    for a in here {
        covered += match a {
            Alloc::Data { start, len, ei } => verify_data(scan, u, read_ok, (*start, *len), ei),
            Alloc::Tree { addr, meta, level } => {
                verify_tree(scan, u, read_ok, *addr, (meta, *level))
            }
        };
    }
    covered
}

/// Check the sectors of data extent `(start, len)` inside the unit against
/// their checksums; returns the bytes covered.
fn verify_data(
    scan: &mut DevScan,
    u: &Unit,
    read_ok: bool,
    (start, alen): (u64, u64),
    ei: &ExtentItem,
) -> u64 {
    let fs = scan.fs;
    let cs = fs.csum_type.size_bytes();
    let s = SECTOR_BYTES;
    let (os, oe) = (start.max(u.logical), (start + alen).min(u.end()));
    let roots = &scan.snap.0;
    let sums = scan
        .csums
        .entry(start)
        .or_insert_with(|| csum_item(fs, roots, start))
        .clone();
    scan.update(|p| {
        p.counters.bytes_scrubbed += oe - os;
        p.counters.data_bytes_scrubbed += oe - os;
        p.bytes_scrubbed_this_run += oe - os;
    });
    let sums = match sums {
        CsumLookup::Found(x) if x.len() as u64 >= alen / s * cs as u64 => x,
        CsumLookup::Unreadable => {
            // The checksums exist but their tree block cannot be
            // read: these sectors are not verified (counted, not
            // passed off as checksum-less).
            scan.update(|p| p.counters.unverified_errors += (oe - os) / s);
            return oe - os;
        }
        _ => {
            scan.update(|p| p.counters.no_csum_sectors += (oe - os) / s);
            return oe - os;
        }
    };
    let mut sec = os;
    while sec < oe {
        let i = ((sec - start) / s) as usize;
        let b = (sec - u.logical) as usize;
        let want = &sums[i * cs..(i + 1) * cs];
        let good = read_ok && fs.csum_type.matches(&scan.buf[b..b + s as usize], want);
        if !good {
            let kind = if read_ok {
                ErrorKind::DataCsum
            } else {
                ErrorKind::DataRead
            };
            scan.update(|p| kind.count(&mut p.counters));
            let fixed = repair(scan, u, sec, s, &|b| fs.csum_type.matches(b, want));
            let (vol, lba, referrers) = super::sector_owners(fs, ei, sec - start, sec);
            scan.run.record(ErrorRecord {
                devid: scan.devid,
                physical: u.physical_of(sec),
                logical: sec,
                volume: vol,
                offset_bytes: lba,
                length_bytes: s,
                kind,
                repaired: fixed,
                referrers,
            });
        }
        sec += s;
    }
    oe - os
}

/// Check the tree block at `addr` (if wholly inside the unit) against its
/// extent item; returns the bytes covered.
fn verify_tree(
    scan: &mut DevScan,
    u: &Unit,
    read_ok: bool,
    addr: u64,
    (meta, level): (&MetadataItem, u8),
) -> u64 {
    let fs = scan.fs;
    let nb = fs.node_bytes as u64;
    scan.update(|p| {
        p.counters.bytes_scrubbed += nb;
        p.counters.tree_bytes_scrubbed += nb;
        p.bytes_scrubbed_this_run += nb;
    });
    if addr < u.logical || addr + nb > u.end() {
        return nb;
    }
    let b = (addr - u.logical) as usize;
    let check = |bytes: &[u8]| -> Result<(), ErrorKind> {
        let n = Node::decode(bytes, addr, &fs.pool_uuid, fs.csum_type)
            .map_err(|_| ErrorKind::TreeCsum)?;
        if n.gen != meta.gen || n.owner != meta.owner || n.level != level {
            return Err(ErrorKind::TreeVerify);
        }
        Ok(())
    };
    let verdict = if read_ok {
        check(&scan.buf[b..b + nb as usize])
    } else {
        Err(ErrorKind::TreeRead)
    };
    if let Err(kind) = verdict {
        scan.update(|p| kind.count(&mut p.counters));
        let fixed = repair(scan, u, addr, nb, &|x| check(x).is_ok());
        scan.run.record(ErrorRecord {
            devid: scan.devid,
            physical: u.physical_of(addr),
            logical: addr,
            volume: None,
            offset_bytes: None,
            length_bytes: nb,
            kind,
            repaired: fixed,
            referrers: Vec::new(),
        });
    }
    nb
}
