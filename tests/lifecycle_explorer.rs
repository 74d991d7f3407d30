//! Randomised schedule explorer over the block-group lifecycle. Actors run
//! at once on one pool: a writer that allocates and empties groups, two
//! cleaners racing each other, a scrubber, and a committer. Every failpoint
//! on their paths sleeps or yields by a seeded choice (failpoint::set_chaos),
//! so each seed drives a different interleaving through the real code.
//! A prober keeps new empty data groups coming while scrub walks the pool,
//! so the cleaners delete groups scrub has found (the seed's window).
//! Invariants per seed: no false scrub error, no lost byte (volume equals
//! the model), no leaked unused group, a clean check, no deadlock. Over the
//! whole run the events must have happened: groups deleted, and groups
//! scrub found but skipped because they were removed.
//!
//! CHUNKVOL_EXPLORE_SEEDS sets how many seeds run (default 500, to keep the
//! suite under 30 minutes; the deterministic lifecycle_sim runs 1000); a failure
//! prints its seed, and CHUNKVOL_EXPLORE_FIRST_SEED replays from there.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chunkvol::device::fault::Rng;
use chunkvol::format::Profile;
use chunkvol::jobs::scrub::{self, ScrubOptions, State};
use common::*;

const VOL: u64 = 20 << 20;
const S: u64 = 4096;

/// What one seed made happen.
#[derive(Default, Debug, Clone, Copy)]
struct Events {
    deleted: u64,
    skipped_removed: u64,
    scrubs: u64,
}

fn one_seed(seed: u64) -> Events {
    chunkvol::util::failpoint::set_chaos(seed, 300);
    let devs = mkfs_mem(Profile::Raid1, 96 << 20);
    let pool = open_mem(&devs);
    let vol = pool.create_volume("v", VOL).unwrap();
    pool.flush().unwrap();
    let model = Arc::new(Mutex::new(vec![0u8; VOL as usize]));
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    // Writer: fills and empties ranges, so groups are allocated and emptied.
    {
        let (vol, model, pool) = (vol.clone(), model.clone(), pool.clone());
        handles.push(std::thread::spawn(move || {
            let mut rng = Rng::new(seed);
            for _ in 0..12 {
                let off = rng.below(VOL / S) * S;
                let len = (1 + rng.below(2 << 20)).min(VOL - off);
                if rng.below(3) == 0 {
                    discard_with_model(&vol, &model, off, len);
                } else {
                    write_with_model(&vol, &model, off, &pattern(rng.next_u64(), len as usize));
                }
                if rng.below(4) == 0 {
                    pool.flush().unwrap();
                }
            }
        }));
    }
    // Prober: a few new empty data groups, handed to the cleaner, while
    // scrub may be walking them.
    {
        let (fs, stop) = (pool.fs().clone(), stop.clone());
        handles.push(std::thread::spawn(move || {
            let mut rng = Rng::new(seed ^ 0x9e37);
            for _ in 0..5 {
                std::thread::sleep(Duration::from_micros(200 + rng.below(2000)));
                if stop.load(Ordering::Acquire) {
                    break;
                }
                let r = chunkvol::engine::transaction::change(&fs, |ctx| {
                    ctx.new_chunk(chunkvol::format::bg_type::DATA)
                        .map(|bg| bg.hand_back(&fs))
                });
                match r {
                    Ok(_) | Err(chunkvol::Error::NoSpace(_)) => {}
                    Err(e) => panic!("seed {seed}: prober: {e}"),
                }
                chunkvol::engine::transaction::commit(&fs).unwrap();
            }
        }));
    }
    // Two cleaners racing each other and everyone else.
    let deleted = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for _ in 0..2 {
        let (fs, stop, deleted) = (pool.fs().clone(), stop.clone(), deleted.clone());
        handles.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                match chunkvol::engine::block_group::delete_unused_bgs(&fs) {
                    Ok(p) => {
                        deleted.fetch_add(p.deleted as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        let u = chunkvol::Pool::from_fs(fs.clone()).usage();
                        panic!(
                            "seed {seed}: cleaner: {e}\n{:#?}\npinned {}",
                            u,
                            fs.pinned_bytes()
                        );
                    }
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }));
    }
    // Committer.
    {
        let (fs, stop) = (pool.fs().clone(), stop.clone());
        handles.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                chunkvol::engine::transaction::commit(&fs).unwrap();
                std::thread::sleep(Duration::from_micros(2000));
            }
        }));
    }
    // Scrubber: every scrub must finish clean.
    let scrubber = {
        let (fs, stop) = (pool.fs().clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut n, mut skipped) = (0, 0);
            while !stop.load(Ordering::Acquire) || n == 0 {
                let st = match scrub::start(&fs, ScrubOptions::default()) {
                    Ok(r) => r.wait(),
                    Err(chunkvol::Error::Busy(_)) => continue,
                    Err(e) => panic!("seed {seed}: scrub start: {e}"),
                };
                assert_eq!(st.state, State::Finished, "seed {seed}: {:?}", st.failure);
                assert_eq!(
                    st.counters.errors(),
                    0,
                    "seed {seed}: false scrub error {st:?}"
                );
                assert_eq!(st.counters.uncorrectable_errors, 0, "seed {seed}");
                skipped += st.counters.block_groups_skipped_removed;
                n += 1;
            }
            (n, skipped)
        })
    };
    let writer = handles.remove(0);
    writer
        .join()
        .unwrap_or_else(|_| panic!("seed {seed}: writer panicked"));
    stop.store(true, Ordering::Release);
    for h in handles {
        h.join()
            .unwrap_or_else(|_| panic!("seed {seed}: actor panicked"));
    }
    let (scrubs, skipped_removed) = scrubber
        .join()
        .unwrap_or_else(|_| panic!("seed {seed}: scrubber panicked"));
    chunkvol::util::failpoint::set_chaos(0, 0);

    // No lost byte, no leaked group, every structure agrees after reopen.
    assert_lifecycle_end(seed, pool, &vol, &model, &as_block(&devs));
    Events {
        deleted: deleted.load(Ordering::Relaxed),
        skipped_removed,
        scrubs,
    }
}

#[test]
fn block_group_lifecycle_interleavings() {
    let n: u64 = std::env::var("CHUNKVOL_EXPLORE_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let first: u64 = std::env::var("CHUNKVOL_EXPLORE_FIRST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let t0 = Instant::now();
    let mut total = Events::default();
    for seed in first..first + n {
        // A deadlock shows up as a seed that never finishes.
        let (tx, rx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || {
            let ev = one_seed(seed);
            let _ = tx.send(());
            ev
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(()) => {
                let ev = h.join().unwrap();
                total.deleted += ev.deleted;
                total.skipped_removed += ev.skipped_removed;
                total.scrubs += ev.scrubs;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("seed {seed}: deadlock (no progress in 60 s)")
            }
            Err(_) => {
                let e = h
                    .join()
                    .err()
                    .and_then(|e| e.downcast_ref::<String>().cloned());
                panic!("seed {seed} failed: {}", e.unwrap_or_default());
            }
        }
    }
    eprintln!(
        "explored {n} seeds in {:.1}s: {total:?}",
        t0.elapsed().as_secs_f64()
    );
    // A run in which nothing was deleted, or scrub never met a removed
    // group, explored nothing of the lifecycle.
    assert!(total.deleted > 0, "no group was ever deleted: {total:?}");
    assert!(
        total.skipped_removed > 0,
        "scrub never met a removed group: {total:?}"
    );
}
