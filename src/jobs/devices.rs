//! Pool membership: adding a device, removing one (relocating everything off
//! it first), and devices that are missing (a pool opened `--degraded`).
//! Device replace is in [`crate::jobs::dev_replace`].

use std::path::Path;
use std::time::Duration;

use crate::chunk::volumes::Device;
use crate::device::BlockDevice;
use crate::engine::fs_info::FsInfo;
use crate::engine::transaction::{self, commit};
use crate::format::{item, new_uuid, objectid, tree_id, DevItem, Key, SUPER_BYTES, SUPER_OFFSETS};
use crate::jobs::relocation::relocate_block_group;
use crate::util::error::{Error, Result};
use crate::util::sync::{read, write, Arc, Ordering};

/// How long removal waits for relocated groups the cleaner still has to drop.
const DRAIN_WAIT: Duration = Duration::from_secs(60);

/// Which device a command names: a devid, `missing`, or a path.
pub fn resolve(fs: &FsInfo, spec: &str) -> Result<u64> {
    if let Ok(id) = spec.parse::<u64>() {
        if fs.member(id).is_some() || read(&fs.missing).contains_key(&id) {
            return Ok(id);
        }
        return Err(Error::Invalid(format!("no device with devid {id}")));
    }
    if spec == "missing" {
        return read(&fs.missing)
            .keys()
            .next()
            .copied()
            .ok_or_else(|| Error::Invalid("no device of the pool is missing".into()));
    }
    let want = std::fs::canonicalize(spec).unwrap_or_else(|_| Path::new(spec).to_path_buf());
    fs.devices()
        .iter()
        .find(|d| std::fs::canonicalize(d.dev.path()).is_ok_and(|p| p == want))
        .map(|d| d.devid)
        .ok_or_else(|| Error::Invalid(format!("{spec} is not a device of this pool")))
}

fn next_devid(fs: &FsInfo) -> u64 {
    // Aliases count: a devid an old map may name is never given out again.
    let present = read(&fs.devices).keys().max().copied().unwrap_or(0);
    let missing = read(&fs.missing).keys().max().copied().unwrap_or(0);
    present.max(missing) + 1
}

/// Add `dev` to the pool; returns its devid. New chunks may use it at once.
pub fn add(fs: &FsInfo, dev: Arc<dyn BlockDevice>) -> Result<u64> {
    add_with(fs, dev, true)
}

/// A path that is a member already (by any name): a clear error, checked
/// before the open, whose lock would otherwise report "in use".
pub fn refuse_member(fs: &FsInfo, path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &std::path::Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let Some(want) = id(path) else {
        return Ok(());
    };
    match fs.devices().iter().find(|d| id(d.dev.path()) == Some(want)) {
        Some(d) => Err(Error::Device {
            path: path.to_path_buf(),
            msg: format!("is already devid {} of this pool", d.devid),
        }),
        None => Ok(()),
    }
}

/// [`add`], choosing whether new chunks may use the device yet (a replace
/// target takes its space for the copies first).
pub fn add_with(fs: &FsInfo, dev: Arc<dyn BlockDevice>, allocatable: bool) -> Result<u64> {
    fs.check_abort()?;
    let path = dev.path().to_path_buf();
    if dev.size_bytes() < crate::device::MIN_DEVICE_BYTES {
        return Err(Error::Device {
            path,
            msg: format!(
                "{} bytes is too small; the minimum is {}",
                dev.size_bytes(),
                crate::device::MIN_DEVICE_BYTES
            ),
        });
    }
    if let Ok(sbs) = crate::device::read_supers(dev.as_ref()) {
        let what = if sbs[0].pool_uuid == fs.pool_uuid {
            "is already a member of this pool".to_string()
        } else {
            format!(
                "holds chunkvol pool {}; wipe it first",
                crate::format::uuid_string(&sbs[0].pool_uuid)
            )
        };
        return Err(Error::Device { path, msg: what });
    }
    refuse_member(fs, &path)?;
    let _serial = crate::util::sync::lock(&fs.reloc_lock);
    let devid = next_devid(fs);
    let d = Arc::new(Device::new(devid, new_uuid(), dev));
    d.supers_valid.store(false, Ordering::Release);
    d.allocatable.store(allocatable, Ordering::Release);
    transaction::change(fs, |ctx| {
        let it = DevItem {
            devid,
            total_bytes: d.total_bytes,
            uuid: d.uuid,
        };
        ctx.insert(
            tree_id::CHUNK,
            Key::new(objectid::DEV_ITEMS, item::DEV_ITEM, devid),
            it.encode(),
        )?;
        write(&ctx.fs.devices).insert(devid, d.clone());
        ctx.fs.dev_stats_dirty.store(true, Ordering::Release);
        Ok(())
    })?;
    // The commit writes the new device's superblocks with everyone else's.
    commit(fs)?;
    tracing::info!("added devid {devid}: {}", d.dev.path().display());
    Ok(devid)
}

/// Check that the pool keeps enough devices for its profiles without `devid`.
fn check_enough_left(fs: &FsInfo, devid: u64) -> Result<()> {
    let left = fs
        .alloc_devices()
        .iter()
        .filter(|d| d.devid != devid)
        .count();
    let (data, meta) = {
        let st = crate::util::sync::lock(&fs.trans);
        (st.data_profile, st.metadata_profile)
    };
    let mut profiles = vec![data, meta];
    profiles.extend(fs.block_group_list().iter().map(|b| b.profile));
    for p in profiles {
        if left < p.min_devices() {
            return Err(Error::Invalid(format!(
                "removing devid {devid} would leave {left} device(s); profile {} needs {} (convert with balance first)",
                p.name(),
                p.min_devices()
            )));
        }
    }
    Ok(())
}

/// Chunks with a stripe on `devid`.
pub fn chunks_on(fs: &FsInfo, devid: u64) -> Vec<u64> {
    fs.mapping
        .all()
        .iter()
        .filter(|m| m.item.stripes.iter().any(|s| s.devid == devid))
        .map(|m| m.start())
        .collect()
}

/// Relocate every chunk off `devid`, then drop it from the pool and wipe its
/// superblocks. Clients keep reading and writing meanwhile.
pub fn remove(fs: &FsInfo, devid: u64) -> Result<()> {
    fs.check_abort()?;
    let present = fs.member(devid);
    if present.is_none() && !read(&fs.missing).contains_key(&devid) {
        return Err(Error::Invalid(format!("no device with devid {devid}")));
    }
    check_enough_left(fs, devid)?;
    if let Some(d) = &present {
        d.allocatable.store(false, Ordering::Release);
    }
    let total_bytes = chunks_on(fs, devid)
        .iter()
        .filter_map(|&s| fs.block_group(s).map(|b| b.length))
        .sum();
    let task = crate::jobs::control::begin_task(fs, "remove", devid.to_string(), total_bytes);
    let r = evacuate(fs, devid, &task);
    if r.is_err() {
        if let Some(d) = &present {
            d.allocatable.store(true, Ordering::Release);
        }
    }
    r?;
    forget(fs, devid)?;
    tracing::info!("removed devid {devid}");
    Ok(())
}

fn evacuate(fs: &FsInfo, devid: u64, task: &crate::jobs::control::TaskGuard) -> Result<()> {
    let never = || false;
    let deadline = crate::util::sched::now() + DRAIN_WAIT;
    loop {
        let todo: Vec<u64> = chunks_on(fs, devid)
            .into_iter()
            .filter(|&s| fs.block_group(s).is_some_and(|b| !b.is_relocated()))
            .collect();
        for start in &todo {
            crate::failpoint!("devices::remove_group", *start);
            // Its length before it moves: a relocated group is gone after.
            let length = fs.block_group_at(*start).map_or(0, |b| b.length);
            relocate_block_group(fs, *start, &never)?;
            task.advance(length);
        }
        if chunks_on(fs, devid).is_empty() {
            return Ok(());
        }
        // Relocated groups wait for readers of their old extents.
        commit(fs)?;
        crate::engine::block_group::delete_unused_bgs(fs)?;
        if crate::util::sched::now() >= deadline {
            return Err(Error::Busy(format!(
                "devid {devid}: {} block groups still hold stripes on it",
                chunks_on(fs, devid).len()
            )));
        }
        crate::util::sched::sleep(Duration::from_millis(50));
    }
}

/// Drop a device that holds no chunk: its items, its place in the pool, and
/// (if present) its superblocks.
pub fn forget(fs: &FsInfo, devid: u64) -> Result<()> {
    let dev = fs.member(devid);
    transaction::change(fs, |ctx| {
        ctx.delete(
            tree_id::CHUNK,
            &Key::new(objectid::DEV_ITEMS, item::DEV_ITEM, devid),
        )?;
        ctx.delete(
            tree_id::DEV,
            &Key::new(objectid::DEV_STATS, item::DEV_STATS, devid),
        )?;
        write(&ctx.fs.devices).retain(|_, d| d.devid != devid);
        write(&ctx.fs.missing).remove(&devid);
        ctx.st.dirty = true;
        Ok(())
    })?;
    commit(fs)?;
    if let Some(d) = dev {
        wipe_supers(&d);
    }
    Ok(())
}

/// A device that is no longer a member: a later open must not take it for one.
fn wipe_supers(d: &Device) {
    d.supers_valid.store(false, Ordering::Release);
    let zero = vec![0u8; SUPER_BYTES];
    for &o in &SUPER_OFFSETS {
        if o + SUPER_BYTES as u64 <= d.total_bytes {
            let _ = d.dev.write_at(&zero, o);
        }
    }
    let _ = d.dev.flush();
}

/// How long [`take_over`] waits for old maps that name the source.
const RETIRED_WAIT: Duration = Duration::from_secs(30);

/// Give the replace target the devid of `src`, which holds no chunk any
/// more (as btrfs does: a replaced disk keeps its devid), and drop `src`.
/// The device item, the target's device extents and every chunk stripe on
/// it are renamed in one transaction. The target stays reachable under its
/// old devid for maps taken before the rename; `src` names the target only
/// once no one holds a map that names the old source (a scrub between two
/// views, a read in flight). Returns false, keeping the target's devid,
/// when such a holder does not let go within [`RETIRED_WAIT`].
/// `record` runs in the rename's transaction (the replace's finished state).
pub fn take_over(
    fs: &FsInfo,
    src: u64,
    target: &Arc<Device>,
    record: &dyn Fn(&mut transaction::Ctx) -> Result<()>,
) -> Result<bool> {
    let t = target.devid;
    debug_assert!(
        chunks_on(fs, src).is_empty(),
        "devid {src} still holds chunks"
    );
    crate::failpoint!("devices::take_over", src);
    let deadline = crate::util::sched::now() + RETIRED_WAIT;
    while fs.mapping.retired_on(src) > 0 {
        if crate::util::sched::now() >= deadline {
            tracing::warn!(
                "devid {src}: old chunk maps still held; the new device keeps devid {t}"
            );
            forget(fs, src)?;
            return Ok(false);
        }
        crate::util::sched::sleep(Duration::from_millis(5));
    }
    let old_src = fs.member(src);
    let renamed = Arc::new(Device::new(src, target.uuid, target.dev.clone()));
    renamed.supers_valid.store(false, Ordering::Release);
    transaction::change(fs, |ctx| {
        renamed.devid_since_gen.store(ctx.st.gen, Ordering::Release);
        // Chunks are allocated in transactions: none can land between.
        let extents = read(&target.extents).clone();
        *write(&renamed.extents) = extents;
        for id in [src, t] {
            ctx.delete(
                tree_id::CHUNK,
                &Key::new(objectid::DEV_ITEMS, item::DEV_ITEM, id),
            )?;
            ctx.delete(
                tree_id::DEV,
                &Key::new(objectid::DEV_STATS, item::DEV_STATS, id),
            )?;
        }
        let it = DevItem {
            devid: src,
            total_bytes: renamed.total_bytes,
            uuid: renamed.uuid,
        };
        ctx.insert(
            tree_id::CHUNK,
            Key::new(objectid::DEV_ITEMS, item::DEV_ITEM, src),
            it.encode(),
        )?;
        // The device table first: from here `src` (named by no map that
        // is alive) and `t` both reach the renamed device, so I/O through
        // a map renamed below never lands on the old source.
        let mut devs = write(&ctx.fs.devices);
        devs.insert(src, renamed.clone());
        devs.insert(t, renamed.clone());
        drop(devs);
        write(&ctx.fs.missing).remove(&src);
        for m in fs.mapping.all() {
            // A removed group whose map drop waits for a scrub's freeze
            // (R4) has no items left to rename; its map, still naming `t`,
            // reaches the renamed device through the alias until dropped.
            let live = fs
                .block_group_at(m.start())
                .is_some_and(|b| !b.is_removed());
            if live && m.item.stripes.iter().any(|st| st.devid == t) {
                rename_stripes(ctx, &m.item, t, src)?;
            }
        }
        ctx.fs.dev_stats_dirty.store(true, Ordering::Release);
        ctx.st.dirty = true;
        record(ctx)
    })?;
    commit(fs)?;
    if let Some(d) = old_src.filter(|d| !Arc::ptr_eq(d, &renamed)) {
        wipe_supers(&d);
    }
    tracing::info!(
        "devid {t} ({}) is now devid {src}",
        renamed.dev.path().display()
    );
    Ok(true)
}

/// Rewrite one chunk's stripes on devid `from` as on `to`.
fn rename_stripes(
    ctx: &mut transaction::Ctx,
    chunk: &crate::format::ChunkItem,
    from: u64,
    to: u64,
) -> Result<()> {
    let mut item = chunk.clone();
    for st in item.stripes.iter_mut().filter(|st| st.devid == from) {
        st.devid = to;
    }
    restripe_chunk(ctx, chunk, item)
}

/// Give a chunk new stripes (same count, same size): its item (or pending
/// item), the device extents of every stripe that changed, and its map.
/// Device replace switches chunks with it; the devid rename too.
pub(crate) fn restripe_chunk(
    ctx: &mut transaction::Ctx,
    old: &crate::format::ChunkItem,
    new: crate::format::ChunkItem,
) -> Result<()> {
    debug_assert_eq!(old.stripes.len(), new.stripes.len());
    let start = new.logical;
    if let Some(c) = ctx
        .st
        .pending_chunks
        .iter_mut()
        .find(|c| c.logical == start)
    {
        // Not in the trees yet: the commit inserts it, stripes and all.
        *c = new.clone();
    } else {
        ctx.insert(
            tree_id::CHUNK,
            Key::new(objectid::FIRST_CHUNK, item::CHUNK, start),
            new.encode(),
        )?;
        for (a, b) in old.stripes.iter().zip(&new.stripes).filter(|(a, b)| a != b) {
            ctx.delete(
                tree_id::DEV,
                &Key::new(a.devid, item::DEV_EXTENT, a.physical),
            )?;
            ctx.insert(
                tree_id::DEV,
                Key::new(b.devid, item::DEV_EXTENT, b.physical),
                crate::format::DevExtent {
                    chunk_logical: start,
                    length: new.stripe_bytes,
                }
                .encode(),
            )?;
        }
    }
    ctx.fs.mapping.insert(new);
    Ok(())
}
