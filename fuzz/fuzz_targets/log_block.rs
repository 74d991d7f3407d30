#![no_main]
use chunkvol::format::csum::CsumType;
use chunkvol::format::log::{LogBlock, LOG_HEADER_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Fix the checksum and the header up half the time so the record
    // parser behind them runs.
    let mut b = data.to_vec();
    let uuid = [7u8; 16];
    if b.len() >= LOG_HEADER_BYTES && b[0] & 1 == 0 {
        b[..8].copy_from_slice(&chunkvol::format::log::LOG_MAGIC);
        b[40..56].copy_from_slice(&uuid);
        let len = (b.len() as u32).to_le_bytes();
        b[72..76].copy_from_slice(&len);
        let sum = CsumType::Crc32c.compute(&b[40..]);
        b[8..40].copy_from_slice(&sum);
    }
    let gen = b.get(56..64).map_or(0, |g| u64::from_le_bytes(g.try_into().unwrap()));
    let seq = b.get(64..72).map_or(0, |g| u64::from_le_bytes(g.try_into().unwrap()));
    let _ = LogBlock::peek_len(&b, &uuid, gen, seq);
    let _ = LogBlock::decode(&b, &uuid, CsumType::Crc32c);
});
