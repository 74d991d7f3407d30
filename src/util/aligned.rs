//! A byte buffer whose first byte is aligned for direct I/O (O_DIRECT needs
//! the address, the length and the file offset aligned to the device's
//! logical block; 4 KiB covers every common one). Safe code: the vector is
//! over-allocated and the aligned window inside it is used.

use std::ops::{Deref, DerefMut};

/// Alignment of [`AlignedBuf`]'s start.
pub const DIRECT_IO_ALIGN: usize = 4096;

/// A buffer of `len()` bytes starting at a [`DIRECT_IO_ALIGN`] boundary.
#[derive(Default)]
pub struct AlignedBuf {
    raw: Vec<u8>,
    at: usize,
    len: usize,
}

impl AlignedBuf {
    /// Make the buffer `len` bytes long (contents unspecified after growth).
    pub fn resize(&mut self, len: usize) {
        if len + DIRECT_IO_ALIGN > self.raw.len() {
            self.raw = vec![0u8; len + DIRECT_IO_ALIGN];
            self.at = self.raw.as_ptr().align_offset(DIRECT_IO_ALIGN);
            assert!(self.at < DIRECT_IO_ALIGN, "a byte pointer can be aligned");
        }
        self.len = len;
        debug_assert_eq!(self.as_ptr() as usize % DIRECT_IO_ALIGN, 0);
    }

    /// The longest `len` the buffer takes without allocating again.
    pub fn capacity(&self) -> usize {
        self.raw.len().saturating_sub(DIRECT_IO_ALIGN)
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.raw[self.at..self.at + self.len]
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.at..self.at + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_aligned_and_sized() {
        let mut b = AlignedBuf::default();
        for len in [4096, 1 << 20, 8192, 3 << 20] {
            b.resize(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % DIRECT_IO_ALIGN, 0);
            b[len - 1] = 7;
        }
    }
}
