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
        if fs.device(id).is_some() || read(&fs.missing).contains_key(&id) {
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
    let present = fs.devices().iter().map(|d| d.devid).max().unwrap_or(0);
    let missing = read(&fs.missing).keys().max().copied().unwrap_or(0);
    present.max(missing) + 1
}

/// Add `dev` to the pool; returns its devid. New chunks may use it at once.
pub fn add(fs: &FsInfo, dev: Arc<dyn BlockDevice>) -> Result<u64> {
    add_with(fs, dev, true)
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
    let canon = std::fs::canonicalize(&path).unwrap_or_else(|_| path.clone());
    for d in fs.devices() {
        if std::fs::canonicalize(d.dev.path()).is_ok_and(|p| p == canon) {
            return Err(Error::Device {
                path,
                msg: format!("is already devid {}", d.devid),
            });
        }
    }
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
    let present = fs.device(devid);
    if present.is_none() && !read(&fs.missing).contains_key(&devid) {
        return Err(Error::Invalid(format!("no device with devid {devid}")));
    }
    check_enough_left(fs, devid)?;
    if let Some(d) = &present {
        d.allocatable.store(false, Ordering::Release);
    }
    let r = evacuate(fs, devid);
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

fn evacuate(fs: &FsInfo, devid: u64) -> Result<()> {
    let never = || false;
    let deadline = crate::util::sched::now() + DRAIN_WAIT;
    loop {
        let todo: Vec<u64> = chunks_on(fs, devid)
            .into_iter()
            .filter(|&s| fs.block_group(s).is_some_and(|b| !b.is_relocated()))
            .collect();
        for start in &todo {
            crate::failpoint!("devices::remove_group", *start);
            relocate_block_group(fs, *start, &never)?;
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
    let dev = fs.device(devid);
    transaction::change(fs, |ctx| {
        ctx.delete(
            tree_id::CHUNK,
            &Key::new(objectid::DEV_ITEMS, item::DEV_ITEM, devid),
        )?;
        ctx.delete(
            tree_id::DEV,
            &Key::new(objectid::DEV_STATS, item::DEV_STATS, devid),
        )?;
        write(&ctx.fs.devices).remove(&devid);
        write(&ctx.fs.missing).remove(&devid);
        ctx.st.dirty = true;
        Ok(())
    })?;
    commit(fs)?;
    if let Some(d) = dev {
        d.supers_valid.store(false, Ordering::Release);
        // No longer a member: a later open must not take it for one.
        let zero = vec![0u8; SUPER_BYTES];
        for &o in &SUPER_OFFSETS {
            if o + SUPER_BYTES as u64 <= d.total_bytes {
                let _ = d.dev.write_at(&zero, o);
            }
        }
        let _ = d.dev.flush();
    }
    Ok(())
}
