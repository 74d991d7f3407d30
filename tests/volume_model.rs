//! Property test: each profile's volume against an in-memory model through
//! random writes (aligned and not), discards, write-zeroes, flushes and
//! reopen. Ends with a full offline check.

mod common;

use chunkvol::format::Profile;
use common::*;
use proptest::prelude::*;

const VOL_BYTES: u64 = 4 << 20;
const S: u64 = 4096;

#[derive(Debug, Clone)]
enum Op {
    Write {
        off: u64,
        len: u64,
        seed: u64,
    },
    WriteAligned {
        sector: u64,
        sectors: u64,
        seed: u64,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Zero {
        off: u64,
        len: u64,
    },
    Read {
        off: u64,
        len: u64,
    },
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..VOL_BYTES, 1u64..300_000).prop_map(|(o, l)| (o, l.min(VOL_BYTES - o).max(1)));
    prop_oneof![
        4 => (range.clone(), any::<u64>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        4 => (0..VOL_BYTES / S, 1u64..80, any::<u64>()).prop_map(|(sector, n, seed)| Op::WriteAligned {
            sector, sectors: n.min(VOL_BYTES / S - sector), seed }),
        2 => range.clone().prop_map(|(off, len)| Op::Discard { off, len }),
        1 => range.clone().prop_map(|(off, len)| Op::Zero { off, len }),
        2 => range.prop_map(|(off, len)| Op::Read { off, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn data(seed: u64, len: usize) -> Vec<u8> {
    // Some all-zero sectors so the zero-detection path (holes) is exercised.
    let mut d = pattern(seed, len);
    if seed.is_multiple_of(3) {
        let z = (seed as usize / 3) % len;
        let e = (z + 8192).min(len);
        d[z..e].fill(0);
    }
    d
}

fn run(p: Profile, ops: &[Op]) {
    let devs = mkfs_mem(p, 40 << 20);
    let mut pool = open_mem(&devs);
    pool.create_volume("v", VOL_BYTES).unwrap();
    let mut vol = pool.volume("v").unwrap();
    let mut model = vec![0u8; VOL_BYTES as usize];
    for o in ops {
        match *o {
            Op::Write { off, len, seed } => {
                let d = data(seed, len as usize);
                vol.write_at(&d, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&d);
            }
            Op::WriteAligned {
                sector,
                sectors,
                seed,
            } => {
                let (off, len) = (sector * S, sectors * S);
                let d = data(seed, len as usize);
                vol.write_at(&d, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&d);
            }
            Op::Discard { off, len } => {
                vol.discard(off, len).unwrap();
                let a = off.div_ceil(S) * S;
                let b = (off + len) / S * S;
                if b > a {
                    model[a as usize..b as usize].fill(0);
                }
            }
            Op::Zero { off, len } => {
                vol.write_zeroes(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Read { off, len } => {
                let mut b = vec![0u8; len as usize];
                vol.read_at(&mut b, off).unwrap();
                assert!(
                    b == model[off as usize..(off + len) as usize],
                    "{p:?} read {off}+{len}"
                );
            }
            Op::Flush => vol.flush().unwrap(),
            Op::Reopen => {
                pool.close().unwrap();
                pool = open_mem(&devs);
                vol = pool.volume("v").unwrap();
            }
        }
    }
    let mut all = vec![0u8; VOL_BYTES as usize];
    vol.read_at(&mut all, 0).unwrap();
    assert!(all == model, "{p:?}: final contents differ");
    // Allocation map agrees with the model's non-zero sectors.
    let alloc: u64 = vol.allocated_bytes().unwrap();
    let nonzero = model
        .chunks(S as usize)
        .filter(|c| c.iter().any(|&x| x != 0))
        .count() as u64
        * S;
    assert!(
        alloc >= nonzero,
        "{p:?}: allocated {alloc} < non-zero {nonzero}"
    );
    pool.close().unwrap();
    let pool = open_mem(&devs);
    let r = chunkvol::pool::check::check(&pool, true).unwrap();
    assert!(r.ok(), "{p:?}: check found {:#?}", r.problems);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
    #[test]
    fn single_matches_model(ops in proptest::collection::vec(op(), 1..60)) { run(Profile::Single, &ops) }
    #[test]
    fn dup_matches_model(ops in proptest::collection::vec(op(), 1..60)) { run(Profile::Dup, &ops) }
    #[test]
    fn raid1_matches_model(ops in proptest::collection::vec(op(), 1..60)) { run(Profile::Raid1, &ops) }
    #[test]
    fn raid1c3_matches_model(ops in proptest::collection::vec(op(), 1..60)) { run(Profile::Raid1c3, &ops) }
    #[test]
    fn raid10_matches_model(ops in proptest::collection::vec(op(), 1..60)) { run(Profile::Raid10, &ops) }
}
