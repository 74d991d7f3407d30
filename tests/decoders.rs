//! Nothing read from a device or a socket may panic the process. Random and
//! mutated inputs for every decoder, and structure-aware corruption of real
//! pool metadata (with checksums fixed up so the parsers behind them run).

mod common;

use chunkvol::btree::Node;
use chunkvol::device::fault::Rng;
use chunkvol::device::BlockDevice;
use chunkvol::format::csum::CsumType;
use chunkvol::format::*;
use chunkvol::nbd::proto;
use common::*;
use proptest::prelude::*;

fn all_decoders(b: &[u8]) {
    let _ = Superblock::decode(b);
    let _ = Node::decode(b, 0, &[0; 16], CsumType::Crc32c);
    let _ = ChunkItem::decode(4096, b);
    let _ = DevItem::decode(b);
    let _ = DevExtent::decode(b);
    let _ = BlockGroupItem::decode(b);
    let _ = ExtentItem::decode(b);
    let _ = MetadataItem::decode(b);
    let _ = VolumeItem::decode(b);
    let _ = VolumeExtent::decode(b);
    let _ = RootItem::decode(b);
    let _ = DevStats::decode(b);
    let _ = progress::ScrubProgress::decode(b);
    let _ = progress::BalanceProgress::decode(b);
    let _ = chunkvol::format::log::LogBlock::decode(b, &[0; 16], CsumType::Crc32c);
    let _ = chunkvol::format::log::LogBlock::peek_len(b, &[0; 16], 0, 0);
    let _ = chunkvol::nbd::parse_request(b);
    let _ = proto::parse_option_header(b);
    let _ = proto::parse_client_flags(b);
    let _ = proto::parse_info_request(b);
    let _ = proto::parse_meta_context_request(b);
    let _ = proto::parse_string(b);
    // The control protocol and balance filters come from a socket or a user.
    let text = String::from_utf8_lossy(b);
    let _ = serde_json::from_str::<chunkvol::service::ops::Op>(&text);
    let _ = chunkvol::jobs::balance::Filters::parse(&text);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]
    #[test]
    fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..5000)) {
        all_decoders(&b);
    }
}

fn fix_node_csum(buf: &mut [u8]) {
    let sum = CsumType::Crc32c.compute(&buf[32..]);
    buf[..32].copy_from_slice(&sum);
}

#[test]
fn mutated_superblocks_never_panic() {
    let devs = mkfs_mem(Profile::Raid1, 40 << 20);
    let mut sb = vec![0u8; SUPER_BYTES];
    devs[0].read_at(&mut sb, SUPER_OFFSETS[0]).unwrap();
    let mut rng = Rng::new(5);
    for _ in 0..20_000 {
        let mut m = sb.clone();
        for _ in 0..1 + rng.below(4) {
            let i = 32 + rng.below((SUPER_BYTES - 32) as u64) as usize;
            m[i] = rng.next_u64() as u8;
        }
        let sum = CsumType::Crc32c.compute(&m[32..]);
        m[..32].copy_from_slice(&sum);
        if let Ok(s) = Superblock::decode(&m) {
            let _ = s.sys_chunks();
        }
        let cut = rng.below(SUPER_BYTES as u64) as usize;
        let _ = Superblock::decode(&m[..cut]);
    }
}

/// Corrupt tree blocks of a real pool (checksum fixed up, so the damage
/// gets past the checksum) and open, read and check it: errors are fine,
/// panics are not.
#[test]
fn corrupted_metadata_never_panics() {
    let devs = mkfs_mem(Profile::Raid1, 40 << 20);
    let blocks = {
        let pool = open_mem(&devs);
        let v = pool.create_volume("v", 8 << 20).unwrap();
        for i in 0..40u64 {
            v.write_at(&pattern(i, 20_000), i * 150_000).unwrap();
        }
        pool.create_volume("w", 4 << 20).unwrap();
        pool.close().unwrap();
        let pool = open_mem(&devs);
        let r = chunkvol::pool::check::check(&pool, false).unwrap();
        assert!(r.ok());
        // Physical addresses of every tree block on device 1.
        let mut v = Vec::new();
        let roots = chunkvol::util::sync::read(&pool.fs().commit_roots)
            .roots
            .clone();
        fn walk(
            fs: &chunkvol::engine::fs_info::FsInfo,
            n: &std::sync::Arc<Node>,
            out: &mut Vec<u64>,
        ) {
            out.push(n.addr);
            for c in n.children() {
                if let Ok(x) = fs.load_node(c.addr, c.gen, n.owner, n.level - 1) {
                    walk(fs, &x, out);
                }
            }
        }
        for r in &roots {
            walk(pool.fs(), r, &mut v);
        }
        v.into_iter()
            .map(|a| pool.sector_copies(a).unwrap())
            .collect::<Vec<_>>()
    };
    let images: Vec<Vec<u8>> = devs.iter().map(|d| d.image()).collect();
    let mut rng = Rng::new(11);
    let nb = 4096usize;
    let mut opened = 0;
    // CHUNKVOL_FUZZ_ROUNDS raises the count for long runs (3000 rounds were clean).
    let rounds: usize = std::env::var("CHUNKVOL_FUZZ_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    for round in 0..rounds {
        let copies = &blocks[rng.below(blocks.len() as u64) as usize];
        let fresh: Vec<_> = devs
            .iter()
            .zip(&images)
            .map(|(d, img)| {
                std::sync::Arc::new(chunkvol::device::fault::FaultyDevice::from_image(
                    d.path().to_path_buf(),
                    img.clone(),
                ))
            })
            .collect();
        let mut buf = vec![0u8; nb];
        let (_, phys) = copies[0];
        fresh[0].read_at(&mut buf, phys).unwrap();
        for _ in 0..1 + rng.below(3) {
            let i = 48 + rng.below((nb - 48) as u64) as usize;
            buf[i] = rng.next_u64() as u8;
        }
        fix_node_csum(&mut buf);
        // Same damage on every copy, so no good mirror hides it.
        for (k, (_, p)) in copies.iter().enumerate() {
            fresh[k].corrupt(*p, &buf);
        }
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let Ok(pool) = chunkvol::Pool::open(as_block(&fresh)) else {
                return false;
            };
            let _ = chunkvol::pool::check::check(&pool, true);
            for name in pool.volume_names() {
                if let Ok(v) = pool.volume(&name) {
                    let mut b = vec![0u8; 1 << 20];
                    let _ = v.read_at(&mut b, 0);
                    let _ = v.write_at(&b[..10_000], 3);
                    let _ = v.discard(0, 1 << 20);
                }
            }
            let _ = pool.flush();
            true
        }));
        match r {
            Ok(o) => opened += o as usize,
            Err(_) => panic!("round {round}: corrupt metadata panicked"),
        }
    }
    assert!(opened > 0, "some corruptions must still open");
}
