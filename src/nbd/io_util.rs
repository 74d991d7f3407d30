//! Small blocking-I/O helpers shared by the handshake and transmission phases.

use std::io::{self, Read};

/// Fills `buf` completely. Returns `Ok(false)` if the peer closed the stream
/// before sending any byte (a clean end), and `UnexpectedEof` if it closed
/// part-way through.
pub fn read_exact_or_eof<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Reads and drops exactly `len` bytes without buffering them, so that a
/// stream can be kept in sync past data we refuse to process.
pub fn discard_exact<R: Read + ?Sized>(r: &mut R, len: u64) -> io::Result<()> {
    let copied = io::copy(&mut r.take(len), &mut io::sink())?;
    if copied < len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_and_unclean_eof() {
        let mut buf = [0u8; 4];
        assert!(!read_exact_or_eof(&mut &b""[..], &mut buf).unwrap());
        assert_eq!(
            read_exact_or_eof(&mut &b"ab"[..], &mut buf)
                .unwrap_err()
                .kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert!(read_exact_or_eof(&mut &b"abcd"[..], &mut buf).unwrap());
        assert_eq!(&buf, b"abcd");
    }

    #[test]
    fn discard() {
        let mut r = &b"abcdef"[..];
        discard_exact(&mut r, 4).unwrap();
        assert_eq!(r, b"ef");
        assert!(discard_exact(&mut r, 3).is_err());
    }
}
