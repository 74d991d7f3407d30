//! The pool: the library's front door. mkfs, open, volumes, usage, device
//! statistics, flush.

pub mod check;
mod log_replay;
mod migrate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::btree::{Iter, NodeLoader};
use crate::chunk::volumes::Device;
use crate::data::volume::Volume;
use crate::device::{read_supers, BlockDevice, FileDevice, MIN_DEVICE_BYTES};
use crate::engine::block_group::BlockGroup;
use crate::engine::fs_info::{tree_index, CommitRoots, FsInfo, FsParams};
use crate::engine::transaction::{commit, Ctx, TransState, VolumeInfo};
use crate::format::csum::CsumType;
use crate::format::{
    bg_type, item, new_uuid, objectid, tree_id, BlockGroupItem, ChunkItem, DevExtent, DevItem,
    DevStats, Key, Profile, Superblock, VolumeItem, DEFAULT_NODE_BYTES, SECTOR_BYTES, SUPER_BYTES,
    SUPER_OFFSETS, VOLUME_NAME_MAX_BYTES,
};
use crate::util::error::{Error, Result};
use crate::util::sync::{lock, write, Arc, Ordering};

/// Largest volume (keeps LBA arithmetic far from overflow).
pub const MAX_VOLUME_BYTES: u64 = 1 << 60;
/// Default node cache bound.
pub const DEFAULT_CACHE_BYTES: usize = 256 << 20;

/// Choices made at mkfs.
#[derive(Debug, Clone)]
pub struct MkfsOptions {
    pub data: Option<Profile>,
    pub metadata: Option<Profile>,
    pub csum: CsumType,
    pub node_bytes: u32,
    pub label: String,
    /// Overwrite devices that already hold a pool.
    pub force: bool,
}

impl Default for MkfsOptions {
    fn default() -> Self {
        MkfsOptions {
            data: None,
            metadata: None,
            csum: CsumType::Crc32c,
            node_bytes: DEFAULT_NODE_BYTES,
            label: String::new(),
            force: false,
        }
    }
}

/// An open pool. Cheap to clone; safe to share between threads.
#[derive(Clone)]
pub struct Pool {
    fs: Arc<FsInfo>,
}

/// How to open a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenOptions {
    /// Reads rewrite bad copies they find.
    pub repair: bool,
    /// Open with members missing.
    pub degraded: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            repair: true,
            degraded: false,
        }
    }
}

/// Pool usage, as `usage --json` prints it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Usage {
    pub device_size_bytes: u64,
    pub allocated_bytes: u64,
    pub unallocated_bytes: u64,
    pub used_bytes: u64,
    pub data_ratio: f64,
    pub metadata_ratio: f64,
    pub generation: u64,
    pub devices: Vec<DeviceUsage>,
    pub block_groups: Vec<BlockGroupUsage>,
    pub unused_block_groups: Vec<u64>,
    /// Deleted volumes whose space the cleaner is still freeing.
    pub volumes_being_deleted: u64,
    /// Data bytes (one copy) the writable volumes could still claim if
    /// each were overwritten entirely while everything referenced now
    /// stays (snapshots hold the old data): their sizes plus the data in
    /// use.
    pub data_worst_case_bytes: u64,
    /// Data bytes (one copy) the pool can hold: data groups plus the
    /// unallocated space at the data profile's ratio.
    pub data_capacity_bytes: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceUsage {
    pub devid: u64,
    pub path: String,
    pub size_bytes: u64,
    pub allocated_bytes: u64,
    /// Not given at open (degraded); `path` is "<missing>".
    pub missing: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BlockGroupUsage {
    pub start: u64,
    pub length: u64,
    #[serde(rename = "type")]
    pub bg_type: String,
    pub profile: String,
    pub used_bytes: u64,
    pub ro: bool,
}

/// One device's error counters.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceStats {
    pub devid: u64,
    pub path: String,
    /// Not given at open (degraded).
    pub missing: bool,
    #[serde(flatten)]
    pub stats: DevStats,
}

/// A volume as listed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VolumeSummary {
    pub name: String,
    pub size_bytes: u64,
    /// Bytes mapped (one copy): what the volume references, shared or not.
    pub allocated_bytes: u64,
    /// Bytes only this volume references, as of the last commit: what
    /// deleting it would give back (one copy).
    pub exclusive_bytes: u64,
    pub read_only: bool,
}

/// Check a volume name: non-empty, at most 200 bytes, no '/' or NUL.
pub fn validate_volume_name(name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::Invalid("volume name is empty".into()));
    }
    if name.len() > VOLUME_NAME_MAX_BYTES {
        return Err(Error::Invalid(format!(
            "volume name is {} bytes long; the limit is {VOLUME_NAME_MAX_BYTES}",
            name.len()
        )));
    }
    if name.contains('/') || name.contains('\0') {
        return Err(Error::Invalid(format!(
            "volume name '{name}' contains '/' or NUL"
        )));
    }
    Ok(())
}

fn validate_volume_size(name: &str, size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(SECTOR_BYTES) || size > MAX_VOLUME_BYTES {
        return Err(Error::Invalid(format!(
            "volume {name}: size {size} must be a non-zero multiple of 4096 and at most 2^60"
        )));
    }
    Ok(())
}

fn open_files(paths: &[PathBuf]) -> Result<Vec<Arc<dyn BlockDevice>>> {
    refuse_named_twice(paths)?;
    paths
        .iter()
        .map(|p| FileDevice::open(p).map(|d| Arc::new(d) as Arc<dyn BlockDevice>))
        .collect()
}

/// The same file (or device) given twice, by one name or two: a clear
/// error instead of "in use" from the second open's lock.
fn refuse_named_twice(paths: &[PathBuf]) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut seen: Vec<((u64, u64), &PathBuf)> = Vec::new();
    for p in paths {
        let Ok(m) = std::fs::metadata(p) else {
            continue;
        };
        let id = (m.dev(), m.ino());
        if let Some((_, first)) = seen.iter().find(|(k, _)| *k == id) {
            return Err(Error::Invalid(format!(
                "{} and {} are the same device: name each device once",
                first.display(),
                p.display()
            )));
        }
        seen.push((id, p));
    }
    Ok(())
}

impl Pool {
    /// Format `devs` as a new pool.
    pub fn mkfs(devs: Vec<Arc<dyn BlockDevice>>, opts: &MkfsOptions) -> Result<()> {
        if devs.is_empty() {
            return Err(Error::Invalid("mkfs needs at least one device".into()));
        }
        let n = devs.len();
        let data = opts.data.unwrap_or(if n > 1 {
            Profile::Raid1
        } else {
            Profile::Single
        });
        let meta = opts
            .metadata
            .unwrap_or(if n > 1 { Profile::Raid1 } else { Profile::Dup });
        for p in [data, meta] {
            if n < p.min_devices() {
                return Err(Error::Invalid(format!(
                    "profile {} needs at least {} devices, got {n}",
                    p.name(),
                    p.min_devices()
                )));
            }
        }
        let nb = opts.node_bytes;
        if !(4096..=65536).contains(&nb) || !nb.is_power_of_two() {
            return Err(Error::Invalid(format!(
                "node size {nb} must be a power of two from 4096 to 65536"
            )));
        }
        let mut seen = Vec::new();
        for d in &devs {
            if d.size_bytes() < MIN_DEVICE_BYTES {
                return Err(Error::Device {
                    path: d.path().into(),
                    msg: format!(
                        "{} bytes is too small; the minimum is {MIN_DEVICE_BYTES}",
                        d.size_bytes()
                    ),
                });
            }
            let canon = std::fs::canonicalize(d.path()).unwrap_or_else(|_| d.path().into());
            if seen.contains(&canon) {
                return Err(Error::Invalid(format!(
                    "{} is named twice",
                    d.path().display()
                )));
            }
            seen.push(canon);
            if !opts.force {
                if let Ok(sbs) = read_supers(d.as_ref()) {
                    return Err(Error::Device {
                        path: d.path().into(),
                        msg: format!(
                            "already holds chunkvol pool {}; use --force to overwrite",
                            crate::format::uuid_string(&sbs[0].pool_uuid)
                        ),
                    });
                }
            }
        }
        let mut devices = BTreeMap::new();
        for (i, d) in devs.into_iter().enumerate() {
            let devid = i as u64 + 1;
            devices.insert(devid, Arc::new(Device::new(devid, new_uuid(), d)));
        }
        let fs = FsInfo::new(FsParams {
            pool_uuid: new_uuid(),
            csum_type: opts.csum,
            node_bytes: nb as usize,
            label: opts.label.clone(),
            devices,
            trans: TransState::new(1, data, meta),
            committed_gen: 0,
            cache_bytes: DEFAULT_CACHE_BYTES,
        });
        {
            let mut st = lock(&fs.trans);
            let mut ctx = Ctx::join(&fs, &mut st);
            ctx.new_chunk(bg_type::SYSTEM)?;
            ctx.new_chunk(bg_type::METADATA)?;
            ctx.new_chunk(bg_type::DATA)?;
            for t in tree_id::ALL {
                let addr = crate::btree::NodeStore::alloc_node(&mut ctx, t, 0)?;
                let leaf = crate::btree::Node::new_leaf(addr, 1, t);
                ctx.st.roots[tree_index(t)] = Some(Arc::new(leaf));
            }
            for d in ctx.fs.devices() {
                let it = DevItem {
                    devid: d.devid,
                    total_bytes: d.total_bytes,
                    uuid: d.uuid,
                };
                ctx.insert(
                    tree_id::CHUNK,
                    Key::new(objectid::DEV_ITEMS, item::DEV_ITEM, d.devid),
                    it.encode(),
                )?;
            }
            fs.dev_stats_dirty.store(true, Ordering::Release);
        }
        commit(&fs)?;
        Ok(())
    }

    /// Format device files, creating missing ones as sparse files of `create_bytes`.
    pub fn mkfs_paths(
        paths: &[PathBuf],
        create_bytes: Option<u64>,
        opts: &MkfsOptions,
    ) -> Result<()> {
        refuse_named_twice(paths)?;
        // Files this mkfs creates are removed again if it fails; a name that
        // is already there (a file, or a symlink even if dangling) is kept.
        let created: Vec<&PathBuf> = paths
            .iter()
            .filter(|p| std::fs::symlink_metadata(p).is_err())
            .collect();
        let r = (|| {
            if let Some(sz) = create_bytes {
                for p in paths {
                    FileDevice::create_sparse(p, sz)?;
                }
            }
            Self::mkfs(open_files(paths)?, opts)
        })();
        if r.is_err() {
            for p in created {
                let _ = std::fs::remove_file(p);
            }
        }
        r
    }

    /// Open device files.
    pub fn open_paths(paths: &[PathBuf]) -> Result<Pool> {
        Self::open(open_files(paths)?)
    }

    /// Open a pool from its devices. Builds free space from metadata only.
    pub fn open(devs: Vec<Arc<dyn BlockDevice>>) -> Result<Pool> {
        Self::open_with(devs, true)
    }

    /// Open device files without rewriting bad copies found while reading
    /// (for check and dump-tree, which must not change the devices).
    pub fn open_paths_no_repair(paths: &[PathBuf]) -> Result<Pool> {
        Self::open_with(open_files(paths)?, false)
    }

    /// Open, choosing whether reads repair bad copies.
    pub fn open_with(devs: Vec<Arc<dyn BlockDevice>>, repair: bool) -> Result<Pool> {
        Self::open_with_options(
            devs,
            OpenOptions {
                repair,
                degraded: false,
            },
        )
    }

    /// Open device files with options.
    pub fn open_paths_with(paths: &[PathBuf], opts: OpenOptions) -> Result<Pool> {
        Self::open_with_options(open_files(paths)?, opts)
    }

    /// Open with options (degraded: members that are not given are missing;
    /// reads use the remaining mirrors).
    pub fn open_with_options(devs: Vec<Arc<dyn BlockDevice>>, opts: OpenOptions) -> Result<Pool> {
        if devs.is_empty() {
            return Err(Error::Invalid("no devices given".into()));
        }
        let (best, devices, stale) = pick_superblock(&devs)?;
        let fs = FsInfo::new(FsParams {
            pool_uuid: best.pool_uuid,
            csum_type: best.csum_type,
            node_bytes: best.node_bytes as usize,
            label: best.label.clone(),
            devices,
            trans: TransState::new(
                best.generation + 1,
                best.data_profile,
                best.metadata_profile,
            ),
            committed_gen: best.generation,
            cache_bytes: DEFAULT_CACHE_BYTES,
        });
        fs.no_repair.store(!opts.repair, Ordering::Relaxed);
        let load = Loader {
            fs: &fs,
            best: &best,
        };
        let dev_items = load.chunk_tree()?;
        let roots = load.roots()?;
        load.members(&dev_items, &devs, opts.degraded)?;
        load.dev_tree(&roots)?;
        load.block_groups(&roots)?;
        load.volumes(&roots)?;
        report_stale_supers(&fs, &best, &stale);
        migrate::volume_trees(&fs)?;
        let fs = Arc::new(fs);
        // check and dump-tree change nothing: they leave the log for the
        // next read-write open.
        if opts.repair {
            log_replay::replay(&fs)?;
        }
        Ok(Pool { fs })
    }

    /// A pool handle on already-open engine state.
    pub fn from_fs(fs: Arc<FsInfo>) -> Pool {
        Pool { fs }
    }

    /// Shared engine state (for subsystems and tests).
    pub fn fs(&self) -> &Arc<FsInfo> {
        &self.fs
    }

    pub fn create_volume(&self, name: &str, size_bytes: u64) -> Result<Volume> {
        validate_volume_name(name)?;
        validate_volume_size(name, size_bytes)?;
        let mut st = lock(&self.fs.trans);
        if st.volumes.contains_key(name) {
            return Err(Error::VolumeExists(name.into()));
        }
        let id = st.next_volume_id;
        let mut ctx = Ctx::begin(&self.fs, &mut st)?;
        ctx.create_volume_tree(id)?;
        ctx.insert(
            tree_id::VOLUME,
            Key::new(objectid::VOLUMES, item::VOLUME_ITEM, id),
            VolumeItem {
                size_bytes,
                name: name.into(),
                flags: 0,
            }
            .encode(),
        )?;
        st.next_volume_id += 1;
        st.volumes.insert(
            name.into(),
            VolumeInfo {
                id,
                size_bytes,
                read_only: false,
            },
        );
        Ok(Volume::new(self.fs.clone(), id, name))
    }

    /// A handle on an existing volume.
    pub fn volume(&self, name: &str) -> Result<Volume> {
        let st = lock(&self.fs.trans);
        let v = st
            .volumes
            .get(name)
            .ok_or_else(|| Error::NoVolume(name.into()))?;
        Ok(Volume::new(self.fs.clone(), v.id, name))
    }

    pub fn volume_names(&self) -> Vec<String> {
        lock(&self.fs.trans).volumes.keys().cloned().collect()
    }

    /// Names of the read-only volumes (snapshots): the points from which a
    /// volume's changes can be asked for, `volume diff` or NBD's
    /// `qemu:dirty-bitmap:NAME`.
    pub fn snapshot_names(&self) -> Vec<String> {
        let st = lock(&self.fs.trans);
        let snapshots = st.volumes.iter().filter(|(_, v)| v.read_only);
        snapshots.map(|(name, _)| name.clone()).collect()
    }

    pub fn list_volumes(&self) -> Result<Vec<VolumeSummary>> {
        let mut out = Vec::new();
        for name in self.volume_names() {
            let v = self.volume(&name)?;
            out.push(VolumeSummary {
                size_bytes: v.size_bytes()?,
                allocated_bytes: v.allocated_bytes()?,
                exclusive_bytes: self.exclusive_bytes(v.id())?,
                read_only: v.read_only()?,
                name,
            });
        }
        Ok(out)
    }

    /// A read-only volume with `src`'s content as of this call: every
    /// write acknowledged before it, flushed or not (the snapshot is made by
    /// a commit). Returns once the snapshot is durable. Its cost does not
    /// grow with the volume: it shares `src`'s tree.
    pub fn snapshot_volume(&self, src: &str, name: &str) -> Result<Volume> {
        self.share_volume(src, name, true)
    }

    /// A writable volume sharing everything with `src` (a snapshot, or any
    /// volume), as [`snapshot_volume`](Self::snapshot_volume) makes it.
    pub fn clone_volume(&self, src: &str, name: &str) -> Result<Volume> {
        self.share_volume(src, name, false)
    }

    fn share_volume(&self, src: &str, name: &str, read_only: bool) -> Result<Volume> {
        validate_volume_name(name)?;
        let new_id = {
            let mut st = lock(&self.fs.trans);
            let v = volume_record(&st, src)?;
            if st.volumes.contains_key(name) {
                return Err(Error::VolumeExists(name.into()));
            }
            let new_id = st.next_volume_id;
            st.next_volume_id += 1;
            st.pending_snapshots
                .push(crate::engine::transaction::PendingSnapshot {
                    src_id: v.id,
                    new_id,
                    name: name.into(),
                    read_only,
                });
            st.dirty = true;
            new_id
        };
        // The commit that makes it, then one that makes it durable.
        let made = commit(&self.fs).and_then(|_| {
            match lock(&self.fs.trans).snapshot_results.remove(&new_id) {
                Some(r) => r,
                None => Err(Error::Invalid(format!(
                    "snapshot of {src} as {name} was not made"
                ))),
            }
        });
        if made.is_err() {
            lock(&self.fs.trans)
                .pending_snapshots
                .retain(|p| p.new_id != new_id);
        }
        made?;
        commit(&self.fs)?;
        Ok(Volume::new(self.fs.clone(), new_id, name))
    }

    /// Byte ranges `(offset, length)` in which volume `new` may differ
    /// from `old` (a snapshot of it, or the snapshot it was cloned from):
    /// where their mappings differ. The cost grows with the changes, not
    /// with the volumes. Whatever `new` has past `old`'s end counts too.
    pub fn volume_diff(&self, old: &str, new: &str) -> Result<Vec<(u64, u64)>> {
        let fs = &*self.fs;
        let (a, b, _guard) = {
            let st = lock(&fs.trans);
            let (va, vb) = (volume_record(&st, old)?, volume_record(&st, new)?);
            (
                st.tree_root(va.id)?,
                st.tree_root(vb.id)?,
                fs.register_reader(st.gen),
            )
        };
        crate::data::extent::diff_mappings(fs, &a, &b)
    }

    /// Bytes only volume `id` references, as of the last commit (0 for a
    /// volume made since).
    fn exclusive_bytes(&self, id: u64) -> Result<u64> {
        let (roots, _guard) = self.fs.commit_snapshot();
        let Some(root) = roots.tree(id) else {
            return Ok(0);
        };
        let ext = roots.tree(tree_id::EXTENT).expect("fixed tree");
        crate::data::extent::exclusive_bytes(&*self.fs, root, ext)
    }

    /// Delete a volume. It is gone at once; the cleaner frees what only it
    /// referenced in the background ([`drop_deleted_volumes`](Self::drop_deleted_volumes)),
    /// what it shares with snapshots and clones stays for them.
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let mut st = lock(&self.fs.trans);
        let v = volume_record(&st, name)?;
        let mut ctx = Ctx::begin(&self.fs, &mut st)?;
        ctx.kill_volume(name, v.id)
    }

    /// Finish dropping deleted volumes now (what the cleaner does in the
    /// background). Returns how many were finished.
    pub fn drop_deleted_volumes(&self) -> Result<u64> {
        crate::jobs::cleaner::drop_dead_volumes(&self.fs, &|| false)
    }

    /// Grow or shrink a volume; shrinking frees the data past the new end.
    pub fn resize_volume(&self, name: &str, size_bytes: u64) -> Result<()> {
        validate_volume_size(name, size_bytes)?;
        let mut st = lock(&self.fs.trans);
        let v = volume_record(&st, name)?;
        if v.read_only {
            return Err(Error::ReadOnlyVolume(name.into()));
        }
        let mut ctx = Ctx::begin(&self.fs, &mut st)?;
        if size_bytes < v.size_bytes {
            crate::data::extent::punch(&mut ctx, v.id, size_bytes, v.size_bytes - size_bytes)?;
        }
        let v = VolumeInfo { size_bytes, ..v };
        ctx.put_volume_item(name, &v)?;
        st.volumes.insert(name.into(), v);
        Ok(())
    }

    /// Make a volume read-only (writes, discards and resizes refused, also
    /// through connections already open) or writable again.
    pub fn set_volume_read_only(&self, name: &str, read_only: bool) -> Result<()> {
        let mut st = lock(&self.fs.trans);
        let v = volume_record(&st, name)?;
        if v.read_only == read_only {
            return Ok(());
        }
        let mut ctx = Ctx::begin(&self.fs, &mut st)?;
        let v = VolumeInfo { read_only, ..v };
        ctx.put_volume_item(name, &v)?;
        st.volumes.insert(name.into(), v);
        Ok(())
    }

    /// Commit: everything written before this call is durable after it.
    pub fn flush(&self) -> Result<u64> {
        commit(&self.fs)
    }

    /// Commit and release the devices.
    pub fn close(self) -> Result<()> {
        if !self.fs.is_aborted() {
            commit(&self.fs)?;
        }
        Ok(())
    }

    pub fn usage(&self) -> Usage {
        let fs = &self.fs;
        let mut devices: Vec<DeviceUsage> = fs
            .devices()
            .iter()
            .map(|d| DeviceUsage {
                devid: d.devid,
                path: d.dev.path().display().to_string(),
                size_bytes: d.total_bytes,
                allocated_bytes: d.allocated_bytes(),
                missing: false,
            })
            .collect();
        for m in crate::util::sync::read(&fs.missing).values() {
            let allocated = fs
                .mapping
                .all()
                .iter()
                .map(|c| {
                    c.item.stripes.iter().filter(|s| s.devid == m.devid).count() as u64
                        * c.item.stripe_bytes
                })
                .sum();
            devices.push(DeviceUsage {
                devid: m.devid,
                path: "<missing>".into(),
                size_bytes: m.total_bytes,
                allocated_bytes: allocated,
                missing: true,
            });
        }
        devices.sort_by_key(|d| d.devid);
        let mut used = 0;
        let mut bgs = Vec::new();
        // Ratios of the profiles new allocations use.
        let (dr, mr) = {
            let st = lock(&fs.trans);
            (
                st.data_profile.copies() as f64,
                st.metadata_profile.copies() as f64,
            )
        };
        for bg in fs.block_group_list() {
            let s = bg.view();
            let copies = bg.profile.copies() as u64;
            used += s.used_bytes * copies;
            bgs.push(BlockGroupUsage {
                start: bg.start,
                length: bg.length,
                bg_type: bg_type::name(bg.bg_type).into(),
                profile: bg.profile.name().into(),
                used_bytes: s.used_bytes,
                ro: s.ro > 0,
            });
        }
        let size: u64 = devices.iter().map(|d| d.size_bytes).sum();
        let alloc: u64 = devices.iter().map(|d| d.allocated_bytes).sum();
        let data = |f: fn(&BlockGroupUsage) -> u64| -> u64 {
            bgs.iter().filter(|b| b.bg_type == "data").map(f).sum()
        };
        let (data_used, data_len) = (data(|b| b.used_bytes), data(|b| b.length));
        let writable: u64 = lock(&fs.trans)
            .volumes
            .values()
            .filter(|v| !v.read_only)
            .map(|v| v.size_bytes)
            .sum();
        Usage {
            device_size_bytes: size,
            allocated_bytes: alloc,
            unallocated_bytes: size - alloc.min(size),
            used_bytes: used,
            data_ratio: dr,
            metadata_ratio: mr,
            generation: fs.committed_gen.load(Ordering::Acquire),
            devices,
            block_groups: bgs,
            unused_block_groups: fs.unused_bgs.list(),
            volumes_being_deleted: lock(&fs.trans).dead_volumes.len() as u64,
            data_worst_case_bytes: data_used + writable,
            data_capacity_bytes: data_len + ((size - alloc.min(size)) as f64 / dr) as u64,
        }
    }

    pub fn device_stats(&self) -> Vec<DeviceStats> {
        let mut out: Vec<DeviceStats> = self
            .fs
            .devices()
            .iter()
            .map(|d| DeviceStats {
                devid: d.devid,
                path: d.dev.path().display().to_string(),
                missing: false,
                stats: d.stats.snapshot(),
            })
            .collect();
        for m in crate::util::sync::read(&self.fs.missing).keys() {
            out.push(DeviceStats {
                devid: *m,
                path: "<missing>".into(),
                missing: true,
                stats: DevStats::default(),
            });
        }
        out.sort_by_key(|d| d.devid);
        out
    }

    /// Zero every device's error counters (persisted at the next commit).
    pub fn reset_device_stats(&self) {
        for d in self.fs.devices() {
            d.stats.set(&DevStats::default());
        }
        self.fs.dev_stats_dirty.store(true, Ordering::Release);
    }

    /// Data extents (logical start, length) as of the last commit.
    pub fn data_extents(&self) -> Result<Vec<(u64, u64)>> {
        let (roots, _guard) = self.fs.commit_snapshot();
        let root = roots.roots[tree_index(tree_id::EXTENT)].clone();
        let mut out = Vec::new();
        for r in Iter::new(&*self.fs as &dyn NodeLoader, &root, Key::MIN, Key::MAX) {
            let (k, _) = r?;
            if k.ty == item::EXTENT {
                out.push((k.objectid, k.offset));
            }
        }
        Ok(out)
    }

    /// Every tree block of the last commit: (logical, owner tree, level).
    pub fn tree_blocks(&self) -> Result<Vec<(u64, u64, u8)>> {
        let (roots, _guard) = self.fs.commit_snapshot();
        let mut out = Vec::new();
        let mut stack: Vec<Arc<crate::btree::Node>> = roots.all().map(|(_, r)| r.clone()).collect();
        while let Some(n) = stack.pop() {
            out.push((n.addr, n.owner, n.level));
            for c in n.children() {
                stack.push(self.fs.load_node(c.addr, c.gen, n.owner, n.level - 1)?);
            }
        }
        Ok(out)
    }

    /// Where each copy of the sector at `logical` lives: (device path, physical).
    pub fn sector_copies(&self, logical: u64) -> Result<Vec<(PathBuf, u64)>> {
        let map = self
            .fs
            .mapping
            .lookup(logical)
            .ok_or(Error::NoChunk { logical })?;
        let m = map.map(logical, SECTOR_BYTES)?;
        Ok(m[0]
            .mirrors
            .iter()
            .filter_map(|&(d, p)| self.fs.device(d).map(|d| (d.dev.path().to_path_buf(), p)))
            .collect())
    }

    /// Paths of the devices, by devid.
    pub fn device_paths(&self) -> Vec<PathBuf> {
        self.fs
            .devices()
            .iter()
            .map(|d| d.dev.path().to_path_buf())
            .collect()
    }
}

/// Whether `path` looks like it holds a chunkvol pool.
pub fn is_pool_device(path: &Path) -> bool {
    std::fs::File::open(path)
        .ok()
        .and_then(|f| {
            use std::os::unix::fs::FileExt;
            let mut b = vec![0u8; SUPER_BYTES];
            f.read_exact_at(&mut b, SUPER_OFFSETS[0]).ok()?;
            Superblock::decode(&b).ok()
        })
        .is_some()
}

/// The newest superblock among the devices, and the devices as pool
/// members; every device must belong to that pool, each devid once.
/// A member whose newest superblock is more than one generation older than
/// the pool's: it missed commits (absent for a while, or its superblock
/// writes failed).
struct StaleSuper {
    devid: u64,
    generation: u64,
}

/// Stale members are trusted for nothing: the pool opens from the newest
/// superblock, their stale copies fail checksum or generation checks and are
/// read from a mirror, and their superblocks are rewritten by the next
/// commit. Each is reported and counted as a generation error.
fn report_stale_supers(fs: &FsInfo, best: &Superblock, stale: &[StaleSuper]) {
    for s in stale {
        let Some(d) = fs.device(s.devid) else {
            continue;
        };
        tracing::warn!(
            "{} (devid {}): superblock generation {} is older than the pool's {}; it missed commits (was it absent?): run a scrub",
            d.dev.path().display(),
            s.devid,
            s.generation,
            best.generation
        );
        d.stats.generation_errs.fetch_add(1, Ordering::Relaxed);
        fs.dev_stats_dirty.store(true, Ordering::Release);
    }
}

type Picked = (Superblock, BTreeMap<u64, Arc<Device>>, Vec<StaleSuper>);

fn pick_superblock(devs: &[Arc<dyn BlockDevice>]) -> Result<Picked> {
    let mut supers = Vec::new();
    for d in devs {
        supers.push(read_supers(d.as_ref())?.remove(0));
    }
    let best = supers
        .iter()
        .max_by_key(|s| s.generation)
        .cloned()
        .expect("non-empty");
    let mut devices = BTreeMap::new();
    for (d, sb) in devs.iter().zip(&supers) {
        if sb.pool_uuid != best.pool_uuid {
            return Err(Error::Device {
                path: d.path().into(),
                msg: format!(
                    "belongs to pool {}, not {}",
                    crate::format::uuid_string(&sb.pool_uuid),
                    crate::format::uuid_string(&best.pool_uuid)
                ),
            });
        }
        if let Some((other, gen)) = devices.get(&sb.devid).map(|o: &Arc<Device>| {
            let g = supers
                .iter()
                .zip(devs)
                .find(|(_, x)| Arc::ptr_eq(x, &o.dev))
                .map_or(0, |(s, _)| s.generation);
            (o.clone(), g)
        }) {
            if other.uuid == sb.dev_uuid {
                return Err(Error::Device {
                    path: d.path().into(),
                    msg: format!("devid {} given twice", sb.devid),
                });
            }
            // Two devices claim one devid: a replace's source whose
            // superblocks were not wiped yet, and its target. The newer
            // superblock wins; the tree's uuids settle it in `members`.
            if gen > sb.generation {
                tracing::warn!(
                    "{}: devid {} is claimed by a newer superblock on {}; ignored",
                    d.path().display(),
                    sb.devid,
                    other.dev.path().display()
                );
                continue;
            }
        }
        devices.insert(
            sb.devid,
            Arc::new(Device::new(sb.devid, sb.dev_uuid, d.clone())),
        );
    }
    let stale = supers
        .iter()
        // One behind is a crash while superblocks were being written: the
        // commit before is complete on every device. More is missed commits.
        .filter(|s| s.generation + 1 < best.generation)
        .map(|s| StaleSuper {
            devid: s.devid,
            generation: s.generation,
        })
        .collect();
    Ok((best, devices, stale))
}

/// Rebuilds the in-memory state of a pool from its metadata, one tree at
/// a time (`open` reads metadata only).
struct Loader<'a> {
    fs: &'a FsInfo,
    best: &'a Superblock,
}

impl Loader<'_> {
    fn bad(&self, m: String) -> Error {
        Error::Corrupt(format!(
            "pool {}: {m}",
            crate::format::uuid_string(&self.best.pool_uuid)
        ))
    }

    fn load_root(&self, i: usize) -> Result<Arc<crate::btree::Node>> {
        let r = self.best.roots[i];
        let n = self
            .fs
            .read_node(r.addr, Some((r.gen, tree_id::ALL[i], r.level)))?;
        self.fs.cache.insert(n.clone());
        Ok(n)
    }

    fn scan<'r>(&'r self, roots: &'r [Arc<crate::btree::Node>], tree: u64) -> Iter<'r> {
        Iter::new(
            self.fs as &dyn NodeLoader,
            &roots[tree_index(tree)],
            Key::MIN,
            Key::MAX,
        )
    }

    /// The system chunks, then the chunk tree (it lives in system chunks and
    /// maps where the other roots are). Returns the device items.
    fn chunk_tree(&self) -> Result<Vec<DevItem>> {
        let sys = self.best.sys_chunks();
        for c in sys.map_err(|e| self.bad(format!("system chunk array: {e}")))? {
            self.fs.mapping.insert(c);
        }
        let chunk_root = self.load_root(tree_index(tree_id::CHUNK))?;
        let mut dev_items = Vec::new();
        for r in Iter::new(self.fs as &dyn NodeLoader, &chunk_root, Key::MIN, Key::MAX) {
            let (k, v) = r?;
            match k.ty {
                item::DEV_ITEM => dev_items
                    .push(DevItem::decode(&v).map_err(|e| self.bad(format!("dev item {k}: {e}")))?),
                item::CHUNK => {
                    let c = ChunkItem::decode(k.offset, &v)
                        .map_err(|e| self.bad(format!("chunk item {k}: {e}")))?;
                    self.fs.mapping.insert(c);
                }
                _ => {}
            }
        }
        Ok(dev_items)
    }

    /// Every tree's root, installed as the live and the commit roots.
    fn roots(&self) -> Result<Vec<Arc<crate::btree::Node>>> {
        let roots = (0..tree_id::ALL.len())
            .map(|i| self.load_root(i))
            .collect::<Result<Vec<_>>>()?;
        {
            let mut st = lock(&self.fs.trans);
            for (i, r) in roots.iter().enumerate() {
                st.roots[i] = Some(r.clone());
            }
            st.next_volume_id = self.best.next_volume_id;
            st.incompat_flags = self.best.incompat_flags;
        }
        *write(&self.fs.commit_roots) = CommitRoots {
            gen: self.best.generation,
            roots: roots.clone(),
            volumes: BTreeMap::new(),
        };
        Ok(roots)
    }

    /// The devices given must all be members; missing members are allowed
    /// only with `degraded`.
    fn members(
        &self,
        dev_items: &[DevItem],
        devs: &[Arc<dyn BlockDevice>],
        degraded: bool,
    ) -> Result<()> {
        let fs = self.fs;
        self.rekey_by_uuid(dev_items);
        let missing: Vec<String> = dev_items
            .iter()
            .filter(|d| fs.device(d.devid).is_none())
            .map(|d| {
                format!(
                    "devid {} (uuid {})",
                    d.devid,
                    crate::format::uuid_string(&d.uuid)
                )
            })
            .collect();
        if !missing.is_empty() && !degraded {
            return Err(Error::Device {
                path: devs[0].path().into(),
                msg: format!(
                    "pool is missing {} (open with --degraded to use the remaining mirrors)",
                    missing.join(", ")
                ),
            });
        }
        if !missing.is_empty() {
            tracing::warn!("opening degraded: missing {}", missing.join(", "));
            let mut m = write(&fs.missing);
            for d in dev_items.iter().filter(|d| fs.device(d.devid).is_none()) {
                m.insert(d.devid, d.clone());
            }
        }
        for d in fs.devices() {
            if !dev_items
                .iter()
                .any(|x| x.devid == d.devid && x.uuid == d.uuid)
            {
                return Err(Error::Device {
                    path: d.dev.path().into(),
                    msg: format!("devid {} is not a member of this pool", d.devid),
                });
            }
        }
        Ok(())
    }

    /// Devices are known by the devid their superblock carries, the tree
    /// knows their uuids too. A crash inside a replace's rename commit can
    /// leave the renamed device's superblocks with its old devid, and the
    /// replaced source's not wiped yet: each device takes the devid the tree
    /// gives its uuid, and one the tree does not list (a former member) is
    /// left out, with a warning.
    fn rekey_by_uuid(&self, dev_items: &[DevItem]) {
        let mut rewrite = false;
        let mut table = write(&self.fs.devices);
        let present: Vec<Arc<Device>> = table.values().cloned().collect();
        table.clear();
        for d in present {
            match dev_items.iter().find(|x| x.uuid == d.uuid) {
                Some(x) if x.devid == d.devid => {
                    table.insert(d.devid, d);
                }
                Some(x) => {
                    tracing::warn!(
                        "{}: its superblock says devid {}, the pool says devid {} (a replace's last commit did not reach it); using devid {}",
                        d.dev.path().display(),
                        d.devid,
                        x.devid,
                        x.devid
                    );
                    table.insert(x.devid, Arc::new(Device::new(x.devid, d.uuid, d.dev.clone())));
                    rewrite = true;
                }
                None => tracing::warn!(
                    "{}: devid {} is no longer a member of this pool (replaced or removed); ignored",
                    d.dev.path().display(),
                    d.devid
                ),
            }
        }
        drop(table);
        if rewrite {
            // The next commit writes its superblocks with the right devid.
            lock(&self.fs.trans).dirty = true;
        }
    }

    /// Dev tree: device extents and error counters.
    fn dev_tree(&self, roots: &[Arc<crate::btree::Node>]) -> Result<()> {
        for r in self.scan(roots, tree_id::DEV) {
            let (k, v) = r?;
            match k.ty {
                item::DEV_EXTENT => {
                    let de = DevExtent::decode(&v).map_err(|e| self.bad(format!("{k}: {e}")))?;
                    if let Some(d) = self.fs.device(k.objectid) {
                        write(&d.extents).insert(k.offset, de.length);
                    }
                }
                item::DEV_STATS => {
                    if let Some(d) = self.fs.device(k.offset) {
                        let st = DevStats::decode(&v).map_err(|e| self.bad(format!("{k}: {e}")))?;
                        d.stats.set(&st);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Extent tree: block groups and what is allocated in them.
    fn block_groups(&self, roots: &[Arc<crate::btree::Node>]) -> Result<()> {
        let fs = self.fs;
        let mut allocated: BTreeMap<u64, Vec<(u64, u64)>> = BTreeMap::new();
        let mut groups = Vec::new();
        for r in self.scan(roots, tree_id::EXTENT) {
            let (k, v) = r?;
            match k.ty {
                item::BLOCK_GROUP => {
                    let bi =
                        BlockGroupItem::decode(&v).map_err(|e| self.bad(format!("{k}: {e}")))?;
                    let map = fs
                        .mapping
                        .get(k.objectid)
                        .ok_or_else(|| self.bad(format!("block group {k} has no chunk")))?;
                    if k.offset == 0 || k.objectid.checked_add(k.offset).is_none() {
                        return Err(self.bad(format!("block group {k} has a bad length")));
                    }
                    groups.push((k.objectid, k.offset, bi, map.item.profile));
                }
                item::EXTENT => allocated
                    .entry(k.objectid)
                    .or_default()
                    .push((k.objectid, k.offset)),
                item::METADATA => allocated
                    .entry(k.objectid)
                    .or_default()
                    .push((k.objectid, fs.node_bytes as u64)),
                _ => {}
            }
        }
        for (start, length, bi, profile) in groups {
            let in_group: Vec<(u64, u64)> = allocated
                .range(start..start + length)
                .flat_map(|(_, list)| list.iter().copied())
                .collect();
            let bg = Arc::new(BlockGroup::open(
                start, length, bi.bg_type, profile, bi.used, &in_group,
            ));
            write(&fs.block_groups).insert(start, bg.clone());
            // Every empty group goes to the cleaner.
            bg.hand_back(fs);
        }
        Ok(())
    }

    /// Volume tree: the volumes.
    fn volumes(&self, roots: &[Arc<crate::btree::Node>]) -> Result<()> {
        let mut st = lock(&self.fs.trans);
        let it = Iter::new(
            self.fs as &dyn NodeLoader,
            &roots[tree_index(tree_id::VOLUME)],
            Key::new(objectid::VOLUMES, item::VOLUME_ITEM, 0),
            Key::new(objectid::VOLUMES, item::VOLUME_ITEM, u64::MAX),
        );
        for r in it {
            let (k, v) = r?;
            let vi = VolumeItem::decode(&v).map_err(|e| self.bad(format!("{k}: {e}")))?;
            st.volumes.insert(
                vi.name.clone(),
                VolumeInfo {
                    id: k.offset,
                    size_bytes: vi.size_bytes,
                    read_only: vi.read_only(),
                },
            );
        }
        let dead = Iter::new(
            self.fs as &dyn NodeLoader,
            &roots[tree_index(tree_id::VOLUME)],
            Key::new(objectid::VOLUMES, item::DEAD_ROOT, 0),
            Key::new(objectid::VOLUMES, item::DEAD_ROOT, u64::MAX),
        );
        for r in dead {
            st.dead_volumes.insert(r?.0.offset);
        }
        let trees = self.volume_trees(roots, &st)?;
        if let Some(id) = st.dead_volumes.iter().find(|id| !trees.contains_key(id)) {
            return Err(self.bad(format!("deleted volume id {id} has no ROOT_ITEM")));
        }
        let format1 = st.incompat_flags & crate::format::INCOMPAT_VOLUME_TREES == 0;
        if let Some(v) = st.volumes.values().find(|v| !trees.contains_key(&v.id)) {
            // A format-1 pool gets its trees when it is converted after open.
            if !format1 {
                return Err(self.bad(format!("volume id {} has no ROOT_ITEM", v.id)));
            }
        }
        st.last_snapshot = trees.iter().map(|(&id, (_, g))| (id, *g)).collect();
        st.vol_roots = trees.into_iter().map(|(id, (n, _))| (id, n)).collect();
        write(&self.fs.commit_roots).volumes = st.vol_roots.clone();
        Ok(())
    }

    /// Each volume's tree root and last snapshot generation, from its
    /// ROOT_ITEM in the volume tree.
    fn volume_trees(
        &self,
        roots: &[Arc<crate::btree::Node>],
        st: &TransState,
    ) -> Result<BTreeMap<u64, (Arc<crate::btree::Node>, u64)>> {
        let mut out = BTreeMap::new();
        let it = Iter::new(
            self.fs as &dyn NodeLoader,
            &roots[tree_index(tree_id::VOLUME)],
            Key::new(objectid::FIRST_VOLUME, 0, 0),
            Key::MAX,
        );
        for r in it {
            let (k, v) = r?;
            if k.ty != item::ROOT_ITEM {
                continue;
            }
            let ri =
                crate::format::RootItem::decode(&v).map_err(|e| self.bad(format!("{k}: {e}")))?;
            let p = ri.root;
            let live = st.volumes.values().any(|x| x.id == k.objectid);
            if !live && !st.dead_volumes.contains(&k.objectid) {
                return Err(self.bad(format!(
                    "{k}: ROOT_ITEM of volume id {} that has no VOLUME_ITEM",
                    k.objectid
                )));
            }
            let n = self
                .fs
                .read_node(p.addr, Some((p.gen, k.objectid, p.level)))?;
            out.insert(k.objectid, (n, ri.last_snapshot_gen));
        }
        Ok(out)
    }
}

/// A volume's in-memory record, or `NoVolume`.
fn volume_record(st: &crate::engine::transaction::TransState, name: &str) -> Result<VolumeInfo> {
    st.volumes
        .get(name)
        .cloned()
        .ok_or_else(|| Error::NoVolume(name.into()))
}
