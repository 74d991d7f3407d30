#![no_main]
use libfuzzer_sys::fuzz_target;

use chunkvol::format::csum::CsumType;

fuzz_target!(|data: &[u8]| {
    let mut b = data.to_vec();
    if b.len() >= 80 {
        let sum = CsumType::Crc32c.compute(&b[32..]);
        b[..32].copy_from_slice(&sum);
        b[32..48].fill(0);
    }
    let addr = if b.len() >= 56 { u64::from_le_bytes(b[48..56].try_into().unwrap()) } else { 0 };
    if let Ok(n) = chunkvol::btree::Node::decode(&b, addr, &[0; 16], CsumType::Crc32c) {
        for (k, v) in n.leaf_items() {
            use chunkvol::format::*;
            let _ = ChunkItem::decode(k.offset, v);
            let _ = ExtentItem::decode(v);
            let _ = VolumeItem::decode(v);
            let _ = VolumeExtent::decode(v);
            let _ = RootItem::decode(v);
        }
    }
});
