#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Fix the checksum up half the time so the field parsers behind it run.
    let mut b = data.to_vec();
    if b.len() >= 4096 && b[40] & 1 == 0 {
        let sum = chunkvol::format::csum::CsumType::Crc32c.compute(&b[32..4096]);
        b[..32].copy_from_slice(&sum);
        b[64 + 16] = 0;
    }
    if let Ok(sb) = chunkvol::format::Superblock::decode(&b) {
        let _ = sb.sys_chunks();
    }
});
