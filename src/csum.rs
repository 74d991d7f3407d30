//! Checksum algorithms. Every data sector and every tree block carries one.

use crate::error::{Error, Result};

/// Bytes reserved for a checksum in headers; shorter sums are zero-padded.
pub const CSUM_MAX_BYTES: usize = 32;

/// A checksum algorithm chosen at mkfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CsumType {
    Crc32c = 0,
    Xxhash64 = 1,
    Sha256 = 2,
    Blake3 = 3,
}

impl CsumType {
    /// Stored size of one checksum.
    pub fn size_bytes(self) -> usize {
        match self {
            CsumType::Crc32c => 4,
            CsumType::Xxhash64 => 8,
            CsumType::Sha256 | CsumType::Blake3 => 32,
        }
    }

    /// Decode from the on-disk byte.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => CsumType::Crc32c,
            1 => CsumType::Xxhash64,
            2 => CsumType::Sha256,
            3 => CsumType::Blake3,
            _ => return None,
        })
    }

    /// Name as used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            CsumType::Crc32c => "crc32c",
            CsumType::Xxhash64 => "xxhash64",
            CsumType::Sha256 => "sha256",
            CsumType::Blake3 => "blake3",
        }
    }

    /// Parse a command-line name.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "crc32c" => CsumType::Crc32c,
            "xxhash64" | "xxhash" => CsumType::Xxhash64,
            "sha256" => CsumType::Sha256,
            "blake3" => CsumType::Blake3,
            _ => {
                return Err(Error::Invalid(format!(
                    "unknown checksum '{s}' (crc32c, xxhash64, sha256, blake3)"
                )))
            }
        })
    }

    /// Compute the checksum of `data` into `out[..size_bytes()]`.
    pub fn compute_into(self, data: &[u8], out: &mut [u8]) {
        match self {
            CsumType::Crc32c => out[..4].copy_from_slice(&crc32c::crc32c(data).to_le_bytes()),
            CsumType::Xxhash64 => {
                out[..8].copy_from_slice(&xxhash_rust::xxh64::xxh64(data, 0).to_le_bytes())
            }
            CsumType::Sha256 => {
                use sha2::Digest;
                out[..32].copy_from_slice(&sha2::Sha256::digest(data));
            }
            CsumType::Blake3 => out[..32].copy_from_slice(blake3::hash(data).as_bytes()),
        }
    }

    /// Checksum of `data`, zero-padded to [`CSUM_MAX_BYTES`].
    pub fn compute(self, data: &[u8]) -> [u8; CSUM_MAX_BYTES] {
        let mut out = [0u8; CSUM_MAX_BYTES];
        self.compute_into(data, &mut out);
        out
    }

    /// Append one checksum per `sector_bytes` of `data` to `out`.
    pub fn compute_sectors(self, data: &[u8], sector_bytes: usize, out: &mut Vec<u8>) {
        let n = self.size_bytes();
        let mut tmp = [0u8; CSUM_MAX_BYTES];
        for sector in data.chunks(sector_bytes) {
            self.compute_into(sector, &mut tmp);
            out.extend_from_slice(&tmp[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values_and_sizes() {
        assert_eq!(
            &CsumType::Crc32c.compute(b"123456789")[..4],
            &0xe306_9283u32.to_le_bytes()
        );
        for t in [
            CsumType::Crc32c,
            CsumType::Xxhash64,
            CsumType::Sha256,
            CsumType::Blake3,
        ] {
            assert_eq!(CsumType::from_u8(t as u8), Some(t));
            assert_eq!(CsumType::parse(t.name()).unwrap(), t);
            let a = t.compute(&[0u8; 4096]);
            let b = t.compute(&[1u8; 4096]);
            assert_ne!(a, b, "{}", t.name());
            assert!(a[t.size_bytes()..].iter().all(|&x| x == 0));
        }
        assert!(CsumType::parse("md5").is_err());
    }
}
