//! Crash test: at 500+ random points, drop the unflushed writes (all, a
//! random subset, or with a torn write), sometimes cutting power in the
//! middle of a commit, then reopen: check passes and every sector holds what
//! was flushed, or a version written after the last completed flush.

mod common;

use std::collections::HashMap;
use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use chunkvol::fault::{CrashMode, Rng};
use chunkvol::format::Profile;
use common::*;

const VOL: u64 = 2 << 20;
const S: usize = 4096;

fn campaign(p: Profile, seed: u64, points: usize) {
    let mut rng = Rng::new(seed);
    let mut devs = mkfs_mem(p, 40 << 20);
    {
        let pool = open_mem(&devs);
        pool.create_volume("v", VOL).unwrap();
        pool.close().unwrap();
    }
    let mut durable = vec![0u8; VOL as usize];
    let mut versions: HashMap<usize, Vec<Vec<u8>>> = HashMap::new();
    for point in 0..points {
        let pool = open_mem(&devs);
        let r = chunkvol::check::check(&pool, true).unwrap();
        assert!(r.ok(), "{p:?} seed {seed} point {point}: {:#?}", r.problems);
        let vol = pool.volume("v").unwrap();
        let mut now = vec![0u8; VOL as usize];
        vol.read_at(&mut now, 0).unwrap();
        for (i, (a, b)) in now.chunks(S).zip(durable.chunks(S)).enumerate() {
            if a != b {
                let ok = versions.get(&i).is_some_and(|v| v.iter().any(|x| x == a));
                assert!(
                    ok,
                    "{p:?} seed {seed} point {point}: sector {i} lost flushed data"
                );
            }
        }
        // What survived is durable now: it came from a committed superblock.
        durable = now.clone();
        versions.clear();
        let mut model = now;
        let n_ops = 1 + rng.below(12);
        let cut = rng.below(3) == 0;
        for op in 0..n_ops {
            let last = op == n_ops - 1;
            if last && cut {
                // Power fails somewhere inside this flush's commit.
                let budget = Arc::new(AtomicI64::new(rng.below(40) as i64));
                for d in &devs {
                    d.set_power_budget(budget.clone());
                }
                let _ = vol.flush();
                break;
            }
            match rng.below(6) {
                0..=2 => {
                    let off = rng.below(VOL - 1);
                    let len = 1 + rng.below((VOL - off).min(600_000));
                    let d = pattern(rng.next_u64(), len as usize);
                    vol.write_at(&d, off).unwrap();
                    model[off as usize..(off + len) as usize].copy_from_slice(&d);
                    for s in off as usize / S..((off + len) as usize).div_ceil(S) {
                        versions
                            .entry(s)
                            .or_default()
                            .push(model[s * S..(s + 1) * S].to_vec());
                    }
                }
                3 => {
                    let off = rng.below(VOL - 1);
                    let len = 1 + rng.below((VOL - off).min(600_000));
                    vol.discard(off, len).unwrap();
                    let a = (off as usize).div_ceil(S);
                    let b = (off + len) as usize / S;
                    for s in a..b.max(a) {
                        model[s * S..(s + 1) * S].fill(0);
                        versions.entry(s).or_default().push(vec![0; S]);
                    }
                }
                _ => {
                    vol.flush().unwrap();
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
        devs = crash(&devs, mode, &mut rng);
    }
}

#[test]
fn crash_raid1() {
    campaign(Profile::Raid1, 1, 140);
}
#[test]
fn crash_single() {
    campaign(Profile::Single, 2, 130);
}
#[test]
fn crash_dup() {
    campaign(Profile::Dup, 3, 120);
}
#[test]
fn crash_raid10() {
    campaign(Profile::Raid10, 4, 120);
}
