//! Crash mode: random operations (writes, discards, write-zeroes, flushes,
//! balance of a random block group, cleaner passes, snapshots, clones and
//! deletes), then power fails at a random moment: unflushed writes are
//! dropped (all, a random subset, or with a torn write), sometimes in the
//! middle of a commit, of a snapshot, a clone or a delete. The pool is
//! reopened and must check clean, every sector must hold what was flushed or
//! a version written after the last acknowledged flush, and every snapshot
//! and clone must be there whole or (if the cut caught it) not at all.

use std::collections::HashMap;

use super::crash_snaps::SnapTracker;
use crate::data::volume::Volume;
use crate::device::fault::{CrashMode, FaultyDevice, Rng};
use crate::device::BlockDevice;
use crate::format::Profile;
use crate::pool::{MkfsOptions, Pool};
use crate::util::sync::{Arc, AtomicI64, Ordering};

const S: usize = 4096;

/// What a campaign did.
#[derive(Debug, Default, Clone, Copy)]
pub struct CrashStats {
    pub points: u64,
    pub ops: u64,
    pub relocations: u64,
    pub cut_in_commit: u64,
    pub snapshots: u64,
    pub clones: u64,
    pub deletes: u64,
    /// Flushes that wrote an intent log block instead of committing.
    pub log_blocks: u64,
    /// Reopens that replayed intent log records.
    pub log_replays: u64,
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

fn blocks(devs: &[Arc<FaultyDevice>]) -> Vec<Arc<dyn BlockDevice>> {
    devs.iter().map(|d| d.clone() as _).collect()
}

/// Devices for a profile's smallest layout.
pub fn devices_for(p: Profile) -> usize {
    p.min_devices()
        .max(if p == Profile::Single || p == Profile::Dup {
            1
        } else {
            2
        })
}

/// Size of the one volume.
const VOL: u64 = 2 << 20;

/// Run `points` crash points on a fresh pool of `profile`.
pub fn campaign(profile: Profile, seed: u64, points: u64) -> Result<CrashStats, String> {
    let fail = |point: u64, m: String| {
        format!(
            "crash seed {seed} profile {} point {point}: {m}",
            profile.name()
        )
    };
    let rng = Rng::new(seed);
    let devs = fresh_pool(profile).map_err(|m| fail(0, m))?;
    let mut c = Campaign {
        rng,
        devs,
        stats: CrashStats::default(),
        durable: vec![0u8; VOL as usize],
        versions: HashMap::new(),
        snaps: SnapTracker::default(),
    };
    for point in 0..points {
        c.point().map_err(|m| fail(point, m))?;
    }
    c.stats.snapshots = c.snaps.snapshots;
    c.stats.clones = c.snaps.clones;
    c.stats.deletes = c.snaps.deletes;
    Ok(c.stats)
}

/// Devices for `profile` holding a pool with the one volume, closed.
fn fresh_pool(profile: Profile) -> Result<Vec<Arc<FaultyDevice>>, String> {
    let n = devices_for(profile);
    let devs: Vec<Arc<FaultyDevice>> = (0..n)
        .map(|i| Arc::new(FaultyDevice::new(format!("mem{i}"), 40 << 20)))
        .collect();
    let meta = if n > 1 { Profile::Raid1 } else { Profile::Dup };
    Pool::mkfs(
        blocks(&devs),
        &MkfsOptions {
            data: Some(profile),
            metadata: Some(meta),
            node_bytes: 4096,
            ..Default::default()
        },
    )
    .map_err(|e| format!("mkfs: {e}"))?;
    let pool = Pool::open(blocks(&devs)).map_err(|e| e.to_string())?;
    pool.create_volume("v", VOL).map_err(|e| e.to_string())?;
    pool.close().map_err(|e| e.to_string())?;
    Ok(devs)
}

/// State carried from one crash point to the next.
struct Campaign {
    rng: Rng,
    /// The devices as the last power cut left them.
    devs: Vec<Arc<FaultyDevice>>,
    stats: CrashStats,
    /// The volume as of the last acknowledged flush.
    durable: Vec<u8>,
    /// Per sector, the versions written since then: any may survive a cut.
    versions: HashMap<usize, Vec<Vec<u8>>>,
    snaps: SnapTracker,
}

impl Campaign {
    /// Reopen and verify, run random operations, then cut the power.
    fn point(&mut self) -> Result<(), String> {
        let pool = Pool::open(blocks(&self.devs)).map_err(|e| format!("reopen: {e}"))?;
        let log = &pool.fs().log_stats;
        self.stats.log_replays += u64::from(log.replayed.load(Ordering::Relaxed) > 0);
        let (vol, now) = self.verify(&pool)?;
        self.snaps.verify(&pool)?;
        // What survived came from a committed superblock: durable now.
        self.durable = now.clone();
        self.versions.clear();
        let mut model = now;
        let n_ops = 1 + self.rng.below(12);
        let cut = self.rng.below(3) == 0;
        for op in 0..n_ops {
            self.stats.ops += 1;
            if op == n_ops - 1 && cut {
                self.cut_in_commit(&pool, &vol, &model)?;
                break;
            }
            self.random_op(&pool, &vol, &mut model, op)?;
        }
        let mode = match self.rng.below(3) {
            0 => CrashMode::DropAll,
            1 => CrashMode::DropRandom,
            _ => CrashMode::Torn,
        };
        self.stats.log_blocks += pool.fs().log_stats.blocks.load(Ordering::Relaxed);
        drop(vol);
        drop(pool);
        self.devs = self
            .devs
            .iter()
            .map(|d| {
                Arc::new(FaultyDevice::from_image(
                    d.path().to_path_buf(),
                    d.crash_image(mode, &mut self.rng),
                ))
            })
            .collect();
        self.stats.points += 1;
        Ok(())
    }

    /// Power fails somewhere inside a commit: a flush's, a snapshot's or a
    /// clone's, or one after a delete (a flush's or the cleaner's dropping
    /// the deleted tree).
    fn cut_in_commit(&mut self, pool: &Pool, vol: &Volume, model: &[u8]) -> Result<(), String> {
        let kind = self.rng.below(5);
        if kind >= 3 {
            self.snaps.delete(pool, &mut self.rng)?;
        }
        let budget = Arc::new(AtomicI64::new(self.rng.below(40) as i64));
        for d in &self.devs {
            d.set_power_budget(budget.clone());
        }
        self.stats.cut_in_commit += 1;
        match kind {
            2 => {
                self.snaps.make(pool, &mut self.rng, model, true)?;
            }
            4 => {
                let _ = crate::jobs::cleaner::drop_dead_volumes(pool.fs(), &|| false);
            }
            _ => {
                let _ = vol.flush();
            }
        }
        Ok(())
    }

    /// A commit returned: all before it is durable.
    fn committed(&mut self, model: &[u8]) {
        self.durable = model.to_vec();
        self.versions.clear();
        self.snaps.committed();
    }

    /// The reopened pool must check clean, and every sector hold what was
    /// flushed or a version written after; returns the volume and its bytes.
    fn verify(&self, pool: &Pool) -> Result<(Volume, Vec<u8>), String> {
        let r = crate::pool::check::check(pool, true).map_err(|e| format!("check: {e}"))?;
        if !r.ok() {
            return Err(format!("check: {:?}", r.problems));
        }
        let vol = pool.volume("v").map_err(|e| e.to_string())?;
        let mut now = vec![0u8; VOL as usize];
        vol.read_at(&mut now, 0).map_err(|e| format!("read: {e}"))?;
        for (i, (a, b)) in now.chunks(S).zip(self.durable.chunks(S)).enumerate() {
            if a != b
                && !self
                    .versions
                    .get(&i)
                    .is_some_and(|v| v.iter().any(|x| x == a))
            {
                return Err(format!("sector {i} lost flushed data"));
            }
        }
        Ok((vol, now))
    }

    /// Sectors `a..b` now hold another version that a cut may leave behind.
    fn note(&mut self, model: &[u8], a: usize, b: usize) {
        for s in a..b {
            self.versions
                .entry(s)
                .or_default()
                .push(model[s * S..(s + 1) * S].to_vec());
        }
    }

    /// One random operation, mirrored in `model`.
    fn random_op(
        &mut self,
        pool: &Pool,
        vol: &Volume,
        model: &mut [u8],
        op: u64,
    ) -> Result<(), String> {
        let rng = &mut self.rng;
        let io = |e: crate::Error| format!("op {op}: {e}");
        match rng.below(12) {
            0..=2 => {
                let off = rng.below(VOL - 1);
                let len = 1 + rng.below((VOL - off).min(600_000));
                let d = pattern(rng.next_u64(), len as usize);
                vol.write_at(&d, off).map_err(io)?;
                model[off as usize..(off + len) as usize].copy_from_slice(&d);
                self.note(model, off as usize / S, ((off + len) as usize).div_ceil(S));
            }
            3 | 4 => {
                let off = rng.below(VOL - 1);
                let len = 1 + rng.below((VOL - off).min(600_000));
                let zeroes = rng.below(2) == 0;
                let (a, b) = if zeroes {
                    vol.write_zeroes(off, len).map_err(io)?;
                    model[off as usize..(off + len) as usize].fill(0);
                    (off as usize / S, ((off + len) as usize).div_ceil(S))
                } else {
                    vol.discard(off, len).map_err(io)?;
                    let a = (off as usize).div_ceil(S);
                    let b = ((off + len) as usize / S).max(a);
                    for s in a..b {
                        model[s * S..(s + 1) * S].fill(0);
                    }
                    (a, b)
                };
                self.note(model, a, b);
            }
            5 => {
                // Relocate a random block group (what balance does).
                let groups = pool.fs().block_group_list();
                let g = &groups[rng.below(groups.len() as u64) as usize];
                match crate::jobs::relocation::relocate_block_group(pool.fs(), g.start, &|| false) {
                    Ok(_) | Err(crate::Error::NoSpace(_)) => self.stats.relocations += 1,
                    Err(e) => return Err(format!("relocate {:#x}: {e}", g.start)),
                }
            }
            6 => {
                crate::engine::block_group::delete_unused_bgs(pool.fs())
                    .map_err(|e| format!("cleaner: {e}"))?;
            }
            9 => {
                // A snapshot or clone commits: everything before is durable.
                if self.snaps.make(pool, &mut self.rng, model, false)? {
                    self.committed(model);
                }
            }
            10 => self.snaps.delete(pool, &mut self.rng)?,
            11 => {
                let dropped = crate::jobs::cleaner::drop_dead_volumes(pool.fs(), &|| false)
                    .map_err(|e| format!("dropping deleted volumes: {e}"))?;
                if dropped > 0 {
                    self.committed(model);
                }
            }
            _ => {
                vol.flush().map_err(io)?;
                self.committed(model);
            }
        }
        Ok(())
    }
}
