//! Crash mode: random operations (writes, discards, write-zeroes, flushes,
//! balance of a random block group, cleaner passes), then power fails at a
//! random moment: unflushed writes are dropped (all, a random subset, or with
//! a torn write), sometimes in the middle of a commit. The pool is reopened
//! and must check clean, and every sector must hold what was flushed or a
//! version written after the last acknowledged flush.

use std::collections::HashMap;

use crate::device::fault::{CrashMode, FaultyDevice, Rng};
use crate::device::BlockDevice;
use crate::format::Profile;
use crate::pool::{MkfsOptions, Pool};
use crate::util::sync::{Arc, AtomicI64};

const S: usize = 4096;

/// What a campaign did.
#[derive(Debug, Default, Clone, Copy)]
pub struct CrashStats {
    pub points: u64,
    pub ops: u64,
    pub relocations: u64,
    pub cut_in_commit: u64,
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

/// Run `points` crash points on a fresh pool of `profile`.
pub fn campaign(profile: Profile, seed: u64, points: u64) -> Result<CrashStats, String> {
    const VOL: u64 = 2 << 20;
    let fail = |point: u64, m: String| {
        format!(
            "crash seed {seed} profile {} point {point}: {m}",
            profile.name()
        )
    };
    let mut rng = Rng::new(seed);
    let n = devices_for(profile);
    let mut devs: Vec<Arc<FaultyDevice>> = (0..n)
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
    .map_err(|e| fail(0, format!("mkfs: {e}")))?;
    {
        let pool = Pool::open(blocks(&devs)).map_err(|e| fail(0, e.to_string()))?;
        pool.create_volume("v", VOL)
            .map_err(|e| fail(0, e.to_string()))?;
        pool.close().map_err(|e| fail(0, e.to_string()))?;
    }
    let mut stats = CrashStats::default();
    let mut durable = vec![0u8; VOL as usize];
    let mut versions: HashMap<usize, Vec<Vec<u8>>> = HashMap::new();
    for point in 0..points {
        let pool = Pool::open(blocks(&devs)).map_err(|e| fail(point, format!("reopen: {e}")))?;
        let r = crate::pool::check::check(&pool, true)
            .map_err(|e| fail(point, format!("check: {e}")))?;
        if !r.ok() {
            return Err(fail(point, format!("check: {:?}", r.problems)));
        }
        let vol = pool.volume("v").map_err(|e| fail(point, e.to_string()))?;
        let mut now = vec![0u8; VOL as usize];
        vol.read_at(&mut now, 0)
            .map_err(|e| fail(point, format!("read: {e}")))?;
        for (i, (a, b)) in now.chunks(S).zip(durable.chunks(S)).enumerate() {
            if a != b && !versions.get(&i).is_some_and(|v| v.iter().any(|x| x == a)) {
                return Err(fail(point, format!("sector {i} lost flushed data")));
            }
        }
        // What survived came from a committed superblock: durable now.
        durable = now.clone();
        versions.clear();
        let mut model = now;
        let n_ops = 1 + rng.below(12);
        let cut = rng.below(3) == 0;
        let note =
            |model: &[u8], versions: &mut HashMap<usize, Vec<Vec<u8>>>, a: usize, b: usize| {
                for s in a..b {
                    versions
                        .entry(s)
                        .or_default()
                        .push(model[s * S..(s + 1) * S].to_vec());
                }
            };
        for op in 0..n_ops {
            stats.ops += 1;
            if op == n_ops - 1 && cut {
                // Power fails somewhere inside this flush's commit.
                let budget = Arc::new(AtomicI64::new(rng.below(40) as i64));
                for d in &devs {
                    d.set_power_budget(budget.clone());
                }
                stats.cut_in_commit += 1;
                let _ = vol.flush();
                break;
            }
            let io = |e: crate::Error| fail(point, format!("op {op}: {e}"));
            match rng.below(9) {
                0..=2 => {
                    let off = rng.below(VOL - 1);
                    let len = 1 + rng.below((VOL - off).min(600_000));
                    let d = pattern(rng.next_u64(), len as usize);
                    vol.write_at(&d, off).map_err(io)?;
                    model[off as usize..(off + len) as usize].copy_from_slice(&d);
                    note(
                        &model,
                        &mut versions,
                        off as usize / S,
                        ((off + len) as usize).div_ceil(S),
                    );
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
                    note(&model, &mut versions, a, b);
                }
                5 => {
                    // Relocate a random block group (what balance does).
                    let groups = pool.fs().block_group_list();
                    let g = &groups[rng.below(groups.len() as u64) as usize];
                    match crate::jobs::relocation::relocate_block_group(pool.fs(), g.start, &|| {
                        false
                    }) {
                        Ok(_) | Err(crate::Error::NoSpace(_)) => stats.relocations += 1,
                        Err(e) => return Err(fail(point, format!("relocate {:#x}: {e}", g.start))),
                    }
                }
                6 => {
                    crate::engine::block_group::delete_unused_bgs(pool.fs())
                        .map_err(|e| fail(point, format!("cleaner: {e}")))?;
                }
                _ => {
                    vol.flush().map_err(io)?;
                    durable = model.clone();
                    versions.clear();
                }
            }
        }
        let mode = match rng.below(3) {
            0 => CrashMode::DropAll,
            1 => CrashMode::DropRandom,
            _ => CrashMode::Torn,
        };
        drop(vol);
        drop(pool);
        devs = devs
            .iter()
            .map(|d| {
                Arc::new(FaultyDevice::from_image(
                    d.path().to_path_buf(),
                    d.crash_image(mode, &mut rng),
                ))
            })
            .collect();
        stats.points += 1;
    }
    Ok(stats)
}
