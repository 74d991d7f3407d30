//! The storm's snapshot actor: snapshots of the client volumes taken while
//! the writers run, clones of them written on their own, deletes that the
//! housekeeper's cleaner drops in the background, and diffs, each checked
//! against a model of every snapshot's and clone's content.

use std::time::Duration;

use super::model::first_diff;
use super::storm::{pattern, range, Shared};
use crate::device::fault::Rng;
use crate::pool::Pool;
use crate::util::sync::{lock, Ordering};

/// Snapshots and clones alive at once: each can pin a volume's worth of
/// data, and the storm's devices are small.
const MAX_SNAPSHOT_VOLUMES: usize = 3;
/// Sector the engine maps at (a discard frees whole sectors only).
const S: u64 = 4096;

/// What one snapshot or clone must read back.
pub(super) struct SnapModel {
    pub name: String,
    /// Index of the client volume it descends from.
    pub origin: usize,
    /// A clone (written by this actor) rather than a read-only snapshot.
    pub writable: bool,
    pub content: Vec<u8>,
}

/// Runs until the storm stops; any wrong answer fails the run.
pub(super) fn snapshotter(sh: &Shared) {
    let mut rng = sh.rng(900);
    let mut next_id = 0u64;
    while sh.running() {
        std::thread::sleep(Duration::from_millis(10 + rng.below(60)));
        let r = match rng.below(8) {
            0 | 1 => snapshot(sh, &mut rng, &mut next_id),
            2 => clone(sh, &mut rng, &mut next_id),
            3 | 4 => write_clone(sh, &mut rng),
            5 => verify(sh, &mut rng),
            6 => diff(sh, &mut rng),
            _ => delete(sh, &mut rng),
        };
        if let Err(e) = r {
            sh.fail(format!("snapshotter: {e}"));
        }
    }
}

/// A snapshot of a client volume with every write acknowledged before it:
/// the volume's model is held whole, so no write is half done.
fn snapshot(sh: &Shared, rng: &mut Rng, next_id: &mut u64) -> Result<(), String> {
    if lock(&sh.snaps).len() >= MAX_SNAPSHOT_VOLUMES {
        return delete(sh, rng);
    }
    // The churn volume (last) is rewritten whole all the time: not pinned.
    let origin = rng.below(sh.vols.len() as u64 - 1) as usize;
    let (vol, model) = &sh.vols[origin];
    let name = format!("snap{next_id}");
    *next_id += 1;
    let mut held = model.hold(0, model.size_bytes);
    let mut content = vec![0u8; model.size_bytes as usize];
    held.read(0, &mut content);
    sh.pool
        .snapshot_volume(vol.name(), &name)
        .map_err(|e| format!("snapshot {} as {name}: {e}", vol.name()))?;
    drop(held);
    sh.counts.snapshots.fetch_add(1, Ordering::Relaxed);
    lock(&sh.snaps).push(SnapModel {
        name,
        origin,
        writable: false,
        content,
    });
    Ok(())
}

/// A clone of a random snapshot; right after, `volume diff` must find
/// nothing between them.
fn clone(sh: &Shared, rng: &mut Rng, next_id: &mut u64) -> Result<(), String> {
    let mut snaps = lock(&sh.snaps);
    let ro: Vec<usize> = (0..snaps.len()).filter(|&i| !snaps[i].writable).collect();
    if ro.is_empty() || snaps.len() >= MAX_SNAPSHOT_VOLUMES {
        return Ok(());
    }
    let src = &snaps[ro[rng.below(ro.len() as u64) as usize]];
    let name = format!("clone{next_id}");
    *next_id += 1;
    sh.pool
        .clone_volume(&src.name, &name)
        .map_err(|e| format!("clone {} as {name}: {e}", src.name))?;
    let d = sh.pool.volume_diff(&src.name, &name);
    if d.as_ref().map_or(true, |d| !d.is_empty()) {
        return Err(format!(
            "diff of {} and its new clone {name}: {d:?}",
            src.name
        ));
    }
    sh.counts.clones.fetch_add(1, Ordering::Relaxed);
    let cloned = SnapModel {
        name,
        origin: src.origin,
        writable: true,
        content: src.content.clone(),
    };
    snaps.push(cloned);
    Ok(())
}

/// A write, discard or write-zeroes into a random clone.
fn write_clone(sh: &Shared, rng: &mut Rng) -> Result<(), String> {
    let mut snaps = lock(&sh.snaps);
    let rw: Vec<usize> = (0..snaps.len()).filter(|&i| snaps[i].writable).collect();
    if rw.is_empty() {
        return Ok(());
    }
    let c = &mut snaps[rw[rng.below(rw.len() as u64) as usize]];
    let vol = sh.pool.volume(&c.name).map_err(|e| e.to_string())?;
    let (off, len) = range(rng, c.content.len() as u64);
    let span = off as usize..(off + len) as usize;
    let what = rng.below(4);
    let r = match what {
        0 => vol.discard(off, len).map(|()| {
            let a = off.div_ceil(S) * S;
            let b = (off + len) / S * S;
            if b > a {
                c.content[a as usize..b as usize].fill(0);
            }
        }),
        1 => vol.write_zeroes(off, len).map(|()| c.content[span].fill(0)),
        _ => {
            let d = pattern(rng, len as usize);
            vol.write_at(&d, off)
                .map(|()| c.content[span].copy_from_slice(&d))
        }
    };
    r.map_err(|e| format!("clone {} op {what} at {off}+{len}: {e}", c.name))
}

/// Every byte of a random snapshot or clone; a snapshot refuses writes.
fn verify(sh: &Shared, rng: &mut Rng) -> Result<(), String> {
    let snaps = lock(&sh.snaps);
    if snaps.is_empty() {
        return Ok(());
    }
    let s = &snaps[rng.below(snaps.len() as u64) as usize];
    compare(&sh.pool, s, "storm")?;
    if !s.writable {
        let vol = sh.pool.volume(&s.name).map_err(|e| e.to_string())?;
        if vol.write_at(&[0x5a; 512], 0).is_ok() {
            return Err(format!("snapshot {} took a write", s.name));
        }
    }
    sh.counts.snapshot_reads.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// `volume diff` between a snapshot or clone and its origin volume (held
/// whole) or another of the same origin: every byte whose content differs
/// lies in a range the diff reports. (The diff may report more: a rewrite
/// with the same bytes is a change of mapping.)
fn diff(sh: &Shared, rng: &mut Rng) -> Result<(), String> {
    let snaps = lock(&sh.snaps);
    if snaps.is_empty() {
        return Ok(());
    }
    let a = &snaps[rng.below(snaps.len() as u64) as usize];
    let kin: Vec<&SnapModel> = snaps.iter().filter(|s| s.origin == a.origin).collect();
    let pick = rng.below(kin.len() as u64 + 1) as usize;
    let (other, ranges, content) = if pick == kin.len() {
        let (vol, model) = &sh.vols[a.origin];
        let mut held = model.hold(0, model.size_bytes);
        let mut live = vec![0u8; model.size_bytes as usize];
        held.read(0, &mut live);
        let d = sh.pool.volume_diff(&a.name, vol.name());
        (vol.name().to_string(), d, live)
    } else {
        let b = kin[pick];
        let d = sh.pool.volume_diff(&a.name, &b.name);
        (b.name.clone(), d, b.content.clone())
    };
    let ranges = ranges.map_err(|e| format!("diff {} {other}: {e}", a.name))?;
    sh.counts.diffs.fetch_add(1, Ordering::Relaxed);
    match uncovered_difference(&a.content, &content, &ranges) {
        None => Ok(()),
        Some(p) => Err(format!(
            "diff {} {other} misses byte {p}, which differs ({} ranges: {:?}...)",
            a.name,
            ranges.len(),
            &ranges[..ranges.len().min(8)]
        )),
    }
}

/// The first byte at which `a` and `b` differ outside every range of
/// `ranges` (sorted, disjoint), if any.
fn uncovered_difference(a: &[u8], b: &[u8], ranges: &[(u64, u64)]) -> Option<u64> {
    let mut pos = 0usize;
    let check =
        |from: usize, to: usize| first_diff(&a[from..to], &b[from..to]).map(|i| (from + i) as u64);
    for &(o, l) in ranges {
        let o = (o as usize).min(a.len());
        if let Some(p) = check(pos, o.max(pos)) {
            return Some(p);
        }
        pos = pos.max((o + l as usize).min(a.len()));
    }
    check(pos, a.len())
}

/// Delete a random snapshot or clone; the housekeeper drops its tree.
fn delete(sh: &Shared, rng: &mut Rng) -> Result<(), String> {
    let mut snaps = lock(&sh.snaps);
    if snaps.is_empty() {
        return Ok(());
    }
    let at = rng.below(snaps.len() as u64) as usize;
    let gone = snaps.remove(at);
    sh.pool
        .delete_volume(&gone.name)
        .map_err(|e| format!("delete {}: {e}", gone.name))?;
    sh.counts.snapshot_deletes.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Every byte of `s` as `pool` reads it equals its model.
pub(super) fn compare(pool: &Pool, s: &SnapModel, when: &str) -> Result<(), String> {
    let vol = pool
        .volume(&s.name)
        .map_err(|e| format!("{when}: {}: {e}", s.name))?;
    let unit = 1 << 20;
    for (i, want) in s.content.chunks(unit).enumerate() {
        let off = (i * unit) as u64;
        let mut got = vec![0u8; want.len()];
        vol.read_at(&mut got, off)
            .map_err(|e| format!("{when}: read {} at {off}: {e}", s.name))?;
        if let Some(j) = first_diff(&got, want) {
            return Err(format!(
                "{when}: {} byte {} is {:#04x}, model has {:#04x}",
                s.name,
                off + j as u64,
                got[j],
                want[j]
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::uncovered_difference;

    #[test]
    fn differences_outside_the_ranges_are_found() {
        let a = [0u8; 10];
        let mut b = a;
        b[3] = 1;
        b[7] = 1;
        assert_eq!(uncovered_difference(&a, &b, &[]), Some(3));
        assert_eq!(uncovered_difference(&a, &b, &[(2, 2)]), Some(7));
        assert_eq!(uncovered_difference(&a, &b, &[(3, 1), (6, 4)]), None);
        assert_eq!(uncovered_difference(&a, &b, &[(0, 7)]), Some(7));
        assert_eq!(uncovered_difference(&a, &a, &[]), None);
    }
}
