//! Volumes: thin LBA spaces. Writes are copy-on-write into data block groups
//! and reach every mirror before their mapping is inserted; reads verify
//! every sector and repair a bad copy from a good one.

use crate::btree::{self, Iter};
use crate::data::extent;
use crate::engine::fs_info::{FsInfo, RMW_LOCKS};
use crate::engine::transaction::Ctx;
use crate::format::log::{LogRecord, RECORD_HEADER_BYTES};
use crate::format::{bg_type, mapping_key, tree_id, VolumeExtent, SECTOR_BYTES};
use crate::util::error::{Error, Result};
use crate::util::sync::{lock, Arc, Ordering};

/// Largest range one freeing change punches: at most 256 sector extents, so
/// that the global metadata reserve covers its tree changes.
pub const PUNCH_PIECE_BYTES: u64 = 1 << 20;

/// A handle on one volume. Cheap to clone; safe to use from many threads.
#[derive(Clone)]
pub struct Volume {
    fs: Arc<FsInfo>,
    id: u64,
    name: Arc<str>,
}

/// One run of a volume's allocation map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub allocated: bool,
}

fn is_zero(b: &[u8]) -> bool {
    let mut chunks = b.chunks_exact(16);
    chunks
        .by_ref()
        .all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0)
        && chunks.remainder().iter().all(|&x| x == 0)
}

impl Volume {
    pub(crate) fn new(fs: Arc<FsInfo>, id: u64, name: &str) -> Volume {
        Volume {
            fs,
            id,
            name: name.into(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn id(&self) -> u64 {
        self.id
    }

    /// This volume's record; errors if it was deleted.
    fn info(&self) -> Result<crate::engine::transaction::VolumeInfo> {
        let st = lock(&self.fs.trans);
        st.volumes
            .get(&*self.name)
            .filter(|v| v.id == self.id)
            .cloned()
            .ok_or_else(|| Error::NoVolume(self.name.to_string()))
    }

    /// This volume's live tree root; `NoVolume` once it was deleted.
    fn root(&self, st: &crate::engine::transaction::TransState) -> Result<Arc<btree::Node>> {
        st.tree_root(self.id)
            .map_err(|_| Error::NoVolume(self.name.to_string()))
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> Result<bool> {
        self.info().map(|v| v.read_only)
    }

    /// Current size; errors if the volume was deleted.
    pub fn size_bytes(&self) -> Result<u64> {
        self.info().map(|v| v.size_bytes)
    }

    fn check_range(&self, offset: u64, len: u64, write: bool) -> Result<()> {
        let v = self.info()?;
        let (size, read_only) = (v.size_bytes, v.read_only);
        if write && read_only {
            return Err(Error::ReadOnlyVolume(self.name.to_string()));
        }
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::OutOfRange {
                volume: self.name.to_string(),
                offset,
                len,
                size,
            });
        }
        Ok(())
    }

    /// Count a client request, check its range, and widen it to whole
    /// sectors; None for an empty request.
    fn client_io(&self, offset: u64, len: u64, write: bool) -> Result<Option<(u64, u64)>> {
        self.fs.client_ops.fetch_add(1, Ordering::Relaxed);
        self.check_range(offset, len, write)?;
        if len == 0 {
            return Ok(None);
        }
        let start = offset / SECTOR_BYTES * SECTOR_BYTES;
        let end = (offset + len).div_ceil(SECTOR_BYTES) * SECTOR_BYTES;
        Ok(Some((start, end)))
    }

    /// Read `buf.len()` bytes at `offset`. Unmapped ranges read as zeroes.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let len = buf.len() as u64;
        let Some((start, end)) = self.client_io(offset, len, false)? else {
            return Ok(());
        };
        if start == offset && end == offset + len {
            return self.read_aligned(buf, offset);
        }
        let mut tmp = vec![0u8; (end - start) as usize];
        self.read_aligned(&mut tmp, start)?;
        let a = (offset - start) as usize;
        buf.copy_from_slice(&tmp[a..a + buf.len()]);
        Ok(())
    }

    fn read_aligned(&self, out: &mut [u8], start: u64) -> Result<()> {
        let fs = &*self.fs;
        let end = start + out.len() as u64;
        let (vroot, croot, _guard) = {
            let st = lock(&fs.trans);
            (
                self.root(&st)?,
                st.root(tree_id::CSUM),
                fs.register_reader(st.gen),
            )
        };
        let it = Iter::new(
            fs,
            &vroot,
            extent::mapping_scan_from(fs, &vroot, start)?,
            mapping_key(end - 1),
        );
        // The mapped pieces of the range: (start, end, the logical address
        // its mapping points at, the logical address of `start`).
        let mut runs = Vec::new();
        for r in it {
            let (k, v) = r?;
            let ve = VolumeExtent::decode(&v).map_err(|e| Error::Corrupt(format!("{k}: {e}")))?;
            let (s, e) = (k.offset, k.offset + ve.len);
            if e > start {
                runs.push((
                    s.max(start),
                    e.min(end),
                    ve.logical,
                    ve.logical + (s.max(start) - s),
                ));
            }
        }
        // A range that random overwrites scattered over the device: ask for
        // every piece before reading the first, so the device sees them
        // together instead of one at a time (cold 1 MiB reads: +44 % in
        // bench/frag_read.sh, bench/profile.md).
        if runs.len() > 1 {
            for &(os, oe, _, sub) in &runs {
                fs.prefetch_data(sub, oe - os);
            }
        }
        let mut pos = start;
        let cs = fs.csum_type.size_bytes();
        for (os, oe, mapped, sub) in runs {
            if os > pos {
                out[(pos - start) as usize..(os - start) as usize].fill(0);
            }
            // Every mapping has its checksums (extent.rs invariant): a
            // missing or short item is corruption, not unverified data.
            let Some(sums) = extent::sums_for(fs, &croot, cs, mapped, (sub, oe - os))? else {
                return Err(Error::Corrupt(format!(
                    "volume {}: bytes {os}..{oe} (logical {mapped:#x}): checksum item missing or short",
                    self.name
                )));
            };
            let sums = Some(&sums[..]);
            let name = &self.name;
            fs.read_data(
                sub,
                &mut out[(os - start) as usize..(oe - start) as usize],
                sums,
                &|lg, l| Error::Unrecoverable {
                    volume: name.to_string(),
                    lba: os + (lg - sub),
                    len: l,
                    logical: lg,
                },
            )?;
            pos = oe;
        }
        if pos < end {
            out[(pos - start) as usize..].fill(0);
        }
        Ok(())
    }

    /// Write `data` at `offset`. Partial sectors are read, merged and
    /// rewritten; all-zero sectors become holes.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        let len = data.len() as u64;
        let Some((start, end)) = self.client_io(offset, len, true)? else {
            return Ok(());
        };
        if start == offset && end == offset + len {
            return self.write_aligned(data, offset);
        }
        // Two partial writes to one sector must not lose each other's bytes.
        let stripe =
            |lba: u64| ((lba / SECTOR_BYTES) ^ self.id.rotate_left(17)) as usize % RMW_LOCKS;
        let mut idx = [stripe(start), stripe(end - 1)];
        idx.sort_unstable();
        let locks = &self.fs.rmw_locks;
        let _g1 = lock(&locks[idx[0]]);
        let _g2 = (idx[1] != idx[0]).then(|| lock(&locks[idx[1]]));
        let mut tmp = vec![0u8; (end - start) as usize];
        let s = SECTOR_BYTES as usize;
        if offset != start {
            self.read_aligned(&mut tmp[..s], start)?;
        }
        if offset + len != end && (end - SECTOR_BYTES > start || offset == start) {
            let n = tmp.len();
            self.read_aligned(&mut tmp[n - s..], end - SECTOR_BYTES)?;
        }
        let a = (offset - start) as usize;
        tmp[a..a + data.len()].copy_from_slice(data);
        self.write_aligned(&tmp, start)
    }

    fn write_aligned(&self, data: &[u8], offset: u64) -> Result<()> {
        let s = SECTOR_BYTES as usize;
        let mut i = 0;
        while i < data.len() {
            let zero = is_zero(&data[i..i + s]);
            let mut j = i + s;
            while j < data.len() && is_zero(&data[j..j + s]) == zero {
                j += s;
            }
            let lba = offset + i as u64;
            if zero {
                // A write of zeroes is a write: no dipping into the reserve.
                self.punch_range(lba, (j - i) as u64, false)?;
            } else {
                self.write_run(&data[i..j], lba)?;
            }
            i = j;
        }
        Ok(())
    }

    fn alloc_data(&self, want: u64) -> Result<(u64, u64)> {
        let deadline = crate::util::sched::now() + crate::engine::transaction::ENOSPC_WAIT;
        loop {
            let r = crate::engine::transaction::change(&self.fs, |ctx| {
                ctx.alloc_extent(bg_type::DATA, SECTOR_BYTES, want)
            });
            match r {
                // Freed space comes back once its transaction is durable and
                // no reader of an older view (a scrub, a read) needs it;
                // empty groups give their device space back. ENOSPC only
                // when none of that helps within the bound.
                Err(Error::NoSpace(m)) => {
                    let pending = crate::engine::block_group::free_space_now(&self.fs)?;
                    if !pending || crate::util::sched::now() >= deadline {
                        return Err(Error::NoSpace(m));
                    }
                    crate::util::sched::sleep(std::time::Duration::from_millis(5));
                }
                r => return r,
            }
        }
    }

    fn write_run(&self, data: &[u8], lba: u64) -> Result<()> {
        let fs = &*self.fs;
        let mut pos = 0usize;
        while pos < data.len() {
            let want = fs.max_extent_bytes.min((data.len() - pos) as u64);
            let (logical, got) = self.alloc_data(want)?;
            let piece = &data[pos..pos + got as usize];
            let mut sums = Vec::with_capacity(piece.len() / SECTOR_BYTES as usize * 8);
            fs.csum_type
                .compute_sectors(piece, SECTOR_BYTES as usize, &mut sums);
            let r = fs.write_logical(logical, piece).and_then(|_| {
                crate::failpoint!("volume::data_written", logical);
                let at = lba + pos as u64;
                crate::engine::transaction::change(fs, |ctx| {
                    match ctx.st.volumes.values().find(|v| v.id == self.id) {
                        None => return Err(Error::NoVolume(self.name.to_string())),
                        // Made read-only while this write was in flight.
                        Some(v) if v.read_only => {
                            return Err(Error::ReadOnlyVolume(self.name.to_string()))
                        }
                        // Shrunk while this write was in flight.
                        Some(v) if at + got > v.size_bytes => {
                            return Err(Error::OutOfRange {
                                volume: self.name.to_string(),
                                offset: at,
                                len: got,
                                size: v.size_bytes,
                            })
                        }
                        Some(_) => {}
                    }
                    extent::insert_data_extent(ctx, self.id, at, logical, got, sums.clone())?;
                    if ctx.st.log.wants(RECORD_HEADER_BYTES + piece.len()) {
                        ctx.st.log.record(LogRecord::Write {
                            volume: self.id,
                            offset_bytes: at,
                            data: piece.to_vec(),
                        });
                    }
                    Ok(())
                })
            });
            if let Err(e) = r {
                if !fs.is_aborted() {
                    let mut st = lock(&fs.trans);
                    Ctx::join(fs, &mut st).unreserve(logical, got);
                }
                return Err(e);
            }
            pos += got as usize;
        }
        Ok(())
    }

    /// Free a range in pieces of at most [`PUNCH_PIECE_BYTES`], each a
    /// change of its own; for discards (`freeing`) one that may use the
    /// global reserve, so a pool whose metadata is full can still be
    /// emptied.
    fn punch_range(&self, start: u64, len: u64, freeing: bool) -> Result<()> {
        use crate::engine::transaction::{change, change_freeing};
        let end = start + len;
        let mut at = start;
        while at < end {
            let n = (end - at).min(PUNCH_PIECE_BYTES);
            let punch = |ctx: &mut Ctx| {
                // A discard that passed its check before the volume became
                // read-only must not change it afterwards.
                let ro = ctx
                    .st
                    .volumes
                    .values()
                    .any(|v| v.id == self.id && v.read_only);
                if ro {
                    return Err(Error::ReadOnlyVolume(self.name.to_string()));
                }
                extent::punch(ctx, self.id, at, n)?;
                if ctx.st.log.wants(RECORD_HEADER_BYTES) {
                    ctx.st.log.record(LogRecord::Punch {
                        volume: self.id,
                        offset_bytes: at,
                        len_bytes: n,
                    });
                }
                Ok(())
            };
            if freeing {
                change_freeing(&self.fs, punch)?;
            } else {
                change(&self.fs, punch)?;
            }
            at += n;
        }
        Ok(())
    }

    /// Free the whole sectors inside [offset, +len). Partial sectors at the
    /// edges are left as they are (discard is advisory).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len, true)?;
        let a = offset.div_ceil(SECTOR_BYTES) * SECTOR_BYTES;
        let b = (offset + len) / SECTOR_BYTES * SECTOR_BYTES;
        if b > a {
            self.punch_range(a, b - a, true)?;
        }
        Ok(())
    }

    /// Make [offset, +len) read as zeroes, freeing whole sectors.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len, true)?;
        let a = offset.div_ceil(SECTOR_BYTES) * SECTOR_BYTES;
        let b = (offset + len) / SECTOR_BYTES * SECTOR_BYTES;
        if b <= a {
            return self.write_at(&vec![0u8; len as usize], offset);
        }
        if a > offset {
            self.write_at(&vec![0u8; (a - offset) as usize], offset)?;
        }
        self.punch_range(a, b - a, true)?;
        if offset + len > b {
            self.write_at(&vec![0u8; (offset + len - b) as usize], b)?;
        }
        Ok(())
    }

    /// Make every acknowledged write durable: through the intent log, or
    /// a commit shared with concurrent callers.
    pub fn flush(&self) -> Result<()> {
        crate::engine::tree_log::sync(&self.fs).map(|_| ())
    }

    /// Allocation map of [offset, +len): runs of allocated data and holes.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.check_range(offset, len, false)?;
        let end = offset + len;
        let fs = &*self.fs;
        let (vroot, _guard) = {
            let st = lock(&fs.trans);
            (self.root(&st)?, fs.register_reader(st.gen))
        };
        let it = Iter::new(
            fs,
            &vroot,
            extent::mapping_scan_from(fs, &vroot, offset)?,
            mapping_key(end.saturating_sub(1)),
        );
        let mut out: Vec<Extent> = Vec::new();
        let mut push = |o: u64, l: u64, allocated: bool| {
            if l == 0 {
                return;
            }
            match out.last_mut() {
                Some(x) if x.allocated == allocated && x.offset + x.len == o => x.len += l,
                _ => out.push(Extent {
                    offset: o,
                    len: l,
                    allocated,
                }),
            }
        };
        let mut pos = offset;
        for r in it {
            let (k, v) = r?;
            let ve = VolumeExtent::decode(&v).map_err(|e| Error::Corrupt(format!("{k}: {e}")))?;
            let (s, e) = (k.offset.max(offset), (k.offset + ve.len).min(end));
            if e <= pos {
                continue;
            }
            push(pos, s.saturating_sub(pos), false);
            push(s.max(pos), e - s.max(pos), true);
            pos = e;
        }
        push(pos, end - pos, false);
        Ok(out)
    }

    /// Bytes of data the volume references.
    pub fn allocated_bytes(&self) -> Result<u64> {
        let size = self.size_bytes()?;
        Ok(self
            .block_status(0, size)?
            .iter()
            .filter(|e| e.allocated)
            .map(|e| e.len)
            .sum())
    }
}
