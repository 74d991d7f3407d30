//! On-disk form of the intent log (btrfs's tree-log, ZFS's ZIL): the client
//! writes and punches acknowledged since the last commit, with their bytes,
//! so that a flush writes one log block instead of committing every tree.
//!
//! The log lives in each device's reserved first MiB, after the superblock:
//! [`LOG_OFFSET`]..[`SUPER_RESERVED_BYTES`]. Blocks follow each other from
//! [`LOG_OFFSET`]; each names the committed generation it follows and its
//! place in the chain, so a block of an older generation, a torn block or
//! stale bytes end the chain at replay.
//!
//! A block: magic (8), checksum of the rest (32, the pool's type), pool uuid
//! (16), generation (8), sequence (8), length in bytes (4, a multiple of
//! [`SECTOR_BYTES`]), record count (4); then the records, then zero padding.
//! A record: kind (1), volume id (8), offset in bytes (8), length in bytes
//! (8), and for a write its bytes.

use super::csum::CsumType;
use super::{DecodeError, Put, Reader, SECTOR_BYTES, SUPER_RESERVED_BYTES};

/// Where the log starts on each device.
pub const LOG_OFFSET: u64 = 256 << 10;
/// Room for one generation's log on each device.
pub const LOG_BYTES: u64 = SUPER_RESERVED_BYTES - LOG_OFFSET;
pub const LOG_MAGIC: [u8; 8] = *b"CVLOG001";
pub const LOG_HEADER_BYTES: usize = 80;
/// Bytes of a record before its payload.
pub const RECORD_HEADER_BYTES: usize = 25;

const CSUM_AT: usize = 8;
const CSUM_END: usize = 40;
const KIND_WRITE: u8 = 1;
const KIND_PUNCH: u8 = 2;

/// One logged client change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogRecord {
    /// `data` written at `offset_bytes` (whole sectors).
    Write {
        volume: u64,
        offset_bytes: u64,
        data: Vec<u8>,
    },
    /// [offset_bytes, +len_bytes) made a hole (discard or zeroes).
    Punch {
        volume: u64,
        offset_bytes: u64,
        len_bytes: u64,
    },
}

impl LogRecord {
    /// Bytes this record takes in a block.
    pub fn encoded_bytes(&self) -> usize {
        match self {
            LogRecord::Write { data, .. } => RECORD_HEADER_BYTES + data.len(),
            LogRecord::Punch { .. } => RECORD_HEADER_BYTES,
        }
    }

    pub fn volume(&self) -> u64 {
        match self {
            LogRecord::Write { volume, .. } | LogRecord::Punch { volume, .. } => *volume,
        }
    }

    /// The volume range the record changes.
    pub fn range_bytes(&self) -> (u64, u64) {
        match self {
            LogRecord::Write {
                offset_bytes, data, ..
            } => (*offset_bytes, data.len() as u64),
            LogRecord::Punch {
                offset_bytes,
                len_bytes,
                ..
            } => (*offset_bytes, *len_bytes),
        }
    }
}

/// One block of the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogBlock {
    /// The committed generation the records follow.
    pub generation: u64,
    /// Place in the chain of this generation, from 0.
    pub seq: u64,
    pub records: Vec<LogRecord>,
}

/// Size on disk of a block holding records of `records_bytes` in all.
pub fn block_bytes_for(records_bytes: usize) -> usize {
    (LOG_HEADER_BYTES + records_bytes).div_ceil(SECTOR_BYTES as usize) * SECTOR_BYTES as usize
}

impl LogBlock {
    /// The block, padded to whole sectors.
    pub fn encode(&self, pool_uuid: &[u8; 16], csum: CsumType) -> Vec<u8> {
        let records_bytes: usize = self.records.iter().map(|r| r.encoded_bytes()).sum();
        let len = block_bytes_for(records_bytes);
        let mut v = Vec::with_capacity(len);
        v.extend_from_slice(&LOG_MAGIC);
        v.extend_from_slice(&[0u8; CSUM_END - CSUM_AT]);
        v.extend_from_slice(pool_uuid);
        v.put_u64(self.generation);
        v.put_u64(self.seq);
        v.put_u32(u32::try_from(len).expect("a log block fits the log area"));
        v.put_u32(u32::try_from(self.records.len()).expect("records fit a block"));
        debug_assert_eq!(v.len(), LOG_HEADER_BYTES);
        for r in &self.records {
            let (kind, (volume, off, len_bytes)) = match r {
                LogRecord::Write {
                    volume,
                    offset_bytes,
                    data,
                } => (KIND_WRITE, (*volume, *offset_bytes, data.len() as u64)),
                LogRecord::Punch {
                    volume,
                    offset_bytes,
                    len_bytes,
                } => (KIND_PUNCH, (*volume, *offset_bytes, *len_bytes)),
            };
            v.put_u8(kind);
            v.put_u64(volume);
            v.put_u64(off);
            v.put_u64(len_bytes);
            if let LogRecord::Write { data, .. } = r {
                v.extend_from_slice(data);
            }
        }
        v.resize(len, 0);
        let sum = csum.compute(&v[CSUM_END..]);
        v[CSUM_AT..CSUM_END].copy_from_slice(&sum);
        v
    }

    /// From a block's first [`LOG_HEADER_BYTES`]: its length in bytes, if
    /// the header is one of this pool's, for generation `generation` and
    /// place `seq`. The caller reads that many bytes and calls [`decode`].
    ///
    /// [`decode`]: LogBlock::decode
    pub fn peek_len(
        header: &[u8],
        pool_uuid: &[u8; 16],
        generation: u64,
        seq: u64,
    ) -> Result<usize, DecodeError> {
        let mut r = Reader::new(header);
        if r.bytes(8)? != LOG_MAGIC {
            return Err(DecodeError("no log block magic".into()));
        }
        r.bytes(CSUM_END - CSUM_AT)?;
        if r.uuid()? != *pool_uuid {
            return Err(DecodeError("log block of another pool".into()));
        }
        let (g, s) = (r.u64()?, r.u64()?);
        if (g, s) != (generation, seq) {
            return Err(DecodeError(format!(
                "log block of generation {g} seq {s}, want generation {generation} seq {seq}"
            )));
        }
        let len = r.u32()? as usize;
        if len < LOG_HEADER_BYTES
            || !len.is_multiple_of(SECTOR_BYTES as usize)
            || len as u64 > LOG_BYTES
        {
            return Err(DecodeError(format!("log block length {len} out of range")));
        }
        Ok(len)
    }

    /// A whole block, checksum verified.
    pub fn decode(
        buf: &[u8],
        pool_uuid: &[u8; 16],
        csum: CsumType,
    ) -> Result<LogBlock, DecodeError> {
        let mut r = Reader::new(buf);
        r.bytes(8)?;
        let want = r.bytes(CSUM_END - CSUM_AT)?;
        let uuid = r.uuid()?;
        let (generation, seq) = (r.u64()?, r.u64()?);
        let len = r.u32()? as usize;
        let count = r.u32()?;
        Self::peek_len(buf, pool_uuid, generation, seq)?;
        if uuid != *pool_uuid || len != buf.len() {
            return Err(DecodeError(format!(
                "log block length {len}, {} bytes given",
                buf.len()
            )));
        }
        if !csum.matches(&buf[CSUM_END..], &want[..csum.size_bytes()]) {
            return Err(DecodeError(format!(
                "log block generation {generation} seq {seq}: checksum mismatch"
            )));
        }
        let mut records = Vec::new();
        for _ in 0..count {
            let kind = r.u8()?;
            let (volume, offset_bytes, len_bytes) = (r.u64()?, r.u64()?, r.u64()?);
            if offset_bytes.checked_add(len_bytes).is_none() {
                return Err(DecodeError(format!(
                    "log record at {offset_bytes} of {len_bytes} bytes overflows"
                )));
            }
            records.push(match kind {
                KIND_WRITE => {
                    let n = usize::try_from(len_bytes)
                        .map_err(|_| DecodeError("log write too long".into()))?;
                    LogRecord::Write {
                        volume,
                        offset_bytes,
                        data: r.bytes(n)?.to_vec(),
                    }
                }
                KIND_PUNCH => LogRecord::Punch {
                    volume,
                    offset_bytes,
                    len_bytes,
                },
                k => return Err(DecodeError(format!("unknown log record kind {k}"))),
            });
        }
        Ok(LogBlock {
            generation,
            seq,
            records,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block() -> LogBlock {
        LogBlock {
            generation: 7,
            seq: 2,
            records: vec![
                LogRecord::Write {
                    volume: 256,
                    offset_bytes: 8192,
                    data: vec![0xab; 4096],
                },
                LogRecord::Punch {
                    volume: 257,
                    offset_bytes: 0,
                    len_bytes: 1 << 20,
                },
            ],
        }
    }

    #[test]
    fn round_trip_and_rejections() {
        let uuid = [3u8; 16];
        let b = block();
        let enc = b.encode(&uuid, CsumType::Crc32c);
        assert_eq!(enc.len(), 8192);
        let len = LogBlock::peek_len(&enc[..LOG_HEADER_BYTES], &uuid, 7, 2).unwrap();
        assert_eq!(len, enc.len());
        assert_eq!(LogBlock::decode(&enc, &uuid, CsumType::Crc32c).unwrap(), b);
        // Another generation, another place in the chain, another pool.
        assert!(LogBlock::peek_len(&enc, &uuid, 8, 2).is_err());
        assert!(LogBlock::peek_len(&enc, &uuid, 7, 3).is_err());
        assert!(LogBlock::peek_len(&enc, &[4u8; 16], 7, 2).is_err());
        // A flipped bit anywhere, or a torn tail.
        for at in [CSUM_END, 100, 5000, enc.len() - 1] {
            let mut bad = enc.clone();
            bad[at] ^= 1;
            assert!(LogBlock::decode(&bad, &uuid, CsumType::Crc32c).is_err());
        }
        let mut torn = enc.clone();
        torn[4096..].fill(0);
        assert!(LogBlock::decode(&torn, &uuid, CsumType::Crc32c).is_err());
        assert!(LogBlock::decode(&enc[..4096], &uuid, CsumType::Crc32c).is_err());
    }

    #[test]
    fn random_bytes_never_panic() {
        let uuid = [3u8; 16];
        let enc = block().encode(&uuid, CsumType::Crc32c);
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..2000 {
            let mut m = enc.clone();
            let at = next() as usize % m.len();
            m[at] = next() as u8;
            let cut = next() as usize % (m.len() + 1);
            let _ = LogBlock::peek_len(&m[..cut], &uuid, 7, 2);
            let _ = LogBlock::decode(&m[..cut], &uuid, CsumType::Crc32c);
        }
    }
}
