//! WRITE payload and READ reply buffers, aligned for direct I/O and reused.
//! A fresh 1 MiB buffer per request faulted in new pages on every write (or
//! was zeroed on every read), and an unaligned one was copied again before
//! a direct write to the device (bench/profile.md, "Direct writes").

use crate::util::aligned::{AlignedBuf, DIRECT_IO_ALIGN};
use crate::util::sync::{lock, Mutex};
use std::ops::Deref;

/// Bytes of spare buffers one connection keeps: enough for queue depth 8 of
/// 1 MiB writes or reads (a read reply takes a page more, for its header),
/// bounded so idle connections hold little.
pub const SPARE_MAX_BYTES: usize = 8 * ((1 << 20) + DIRECT_IO_ALIGN);

/// The spare buffers of one connection.
#[derive(Default)]
pub struct PayloadPool {
    spare: Mutex<Vec<AlignedBuf>>,
}

/// One request's payload (or READ reply); its buffer goes back to the pool
/// when dropped.
pub struct Payload<'a> {
    buf: AlignedBuf,
    pool: Option<&'a PayloadPool>,
}

impl PayloadPool {
    /// A buffer of `len` bytes (contents unspecified), reused if one fits.
    pub fn take(&self, len: usize) -> Payload<'_> {
        let mut spare = lock(&self.spare);
        let at = spare.iter().position(|b| b.capacity() >= len);
        let mut buf = match at {
            Some(i) => spare.swap_remove(i),
            None => spare.pop().unwrap_or_default(),
        };
        drop(spare);
        buf.resize(len);
        Payload {
            buf,
            pool: Some(self),
        }
    }

    fn spare_bytes(spare: &[AlignedBuf]) -> usize {
        spare.iter().map(AlignedBuf::capacity).sum()
    }
}

impl Payload<'_> {
    /// No payload (every request but WRITE).
    pub fn empty() -> Payload<'static> {
        Payload {
            buf: AlignedBuf::default(),
            pool: None,
        }
    }

    /// The bytes to fill from the socket.
    pub fn as_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }
}

impl Deref for Payload<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Payload<'_> {
    fn drop(&mut self) {
        let Some(pool) = self.pool else { return };
        let buf = std::mem::take(&mut self.buf);
        let mut spare = lock(&pool.spare);
        if PayloadPool::spare_bytes(&spare) + buf.capacity() <= SPARE_MAX_BYTES {
            spare.push(buf);
        }
        debug_assert!(PayloadPool::spare_bytes(&spare) <= SPARE_MAX_BYTES);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_reused_and_bounded() {
        let pool = PayloadPool::default();
        let first = pool.take(1 << 20);
        assert_eq!(first.len(), 1 << 20);
        assert_eq!(first.as_ptr() as usize % DIRECT_IO_ALIGN, 0);
        let addr = first.as_ptr();
        drop(first);
        let again = pool.take(4096);
        assert_eq!(again.as_ptr(), addr, "the spare buffer is reused");
        assert_eq!(again.len(), 4096);
        drop(again);
        // More in flight than the pool keeps: the spare bytes stay bounded.
        let many: Vec<_> = (0..12).map(|_| pool.take(1 << 20)).collect();
        drop(many);
        let spare = lock(&pool.spare);
        assert!(PayloadPool::spare_bytes(&spare) <= SPARE_MAX_BYTES);
        assert!(!spare.is_empty());
    }
}
