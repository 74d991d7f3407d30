//! A small blocking NBD client whose every call returns the failure instead
//! of panicking: a power cut kills the server under it on purpose.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const FLAG_FUA: u16 = 1;
/// A dead server must not hang the test.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

fn proto(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// One connection in the transmission phase.
pub struct Client {
    s: TcpStream,
    cookie: u64,
    pub size_bytes: u64,
}

/// An error reply from the server (the connection stays usable).
#[derive(Debug)]
pub struct NbdErrno(pub u32);

impl std::fmt::Display for NbdErrno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NBD error {}", self.0)
    }
}
impl std::error::Error for NbdErrno {}

impl Client {
    /// Fixed newstyle handshake and NBD_OPT_GO for `export`.
    pub fn connect(port: u16, export: &str) -> io::Result<Client> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.set_nodelay(true)?;
        let mut c = Client {
            s,
            cookie: 0,
            size_bytes: 0,
        };
        let mut greet = [0u8; 18];
        c.s.read_exact(&mut greet)?;
        if &greet[..16] != b"NBDMAGICIHAVEOPT" {
            return Err(proto(format!("bad greeting {greet:02x?}")));
        }
        // FIXED_NEWSTYLE | NO_ZEROES
        c.s.write_all(&3u32.to_be_bytes())?;
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
        opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
        opt.extend_from_slice(export.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        c.s.write_all(&opt)?;
        loop {
            let mut h = [0u8; 20];
            c.s.read_exact(&mut h)?;
            let magic = u64::from_be_bytes(h[..8].try_into().unwrap());
            let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            if magic != OPT_REPLY_MAGIC || len > 1 << 16 {
                return Err(proto(format!("bad option reply {h:02x?}")));
            }
            let mut data = vec![0u8; len];
            c.s.read_exact(&mut data)?;
            match typ {
                REP_INFO if len >= 10 && data[..2] == [0, 0] => {
                    c.size_bytes = u64::from_be_bytes(data[2..10].try_into().unwrap());
                }
                REP_INFO => {}
                REP_ACK => return Ok(c),
                t => {
                    return Err(proto(format!(
                        "NBD_OPT_GO {export}: reply {t:#x}: {}",
                        String::from_utf8_lossy(&data)
                    )))
                }
            }
        }
    }

    fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        self.cookie += 1;
        let mut b = Vec::with_capacity(28 + payload.len());
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&self.cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.s.write_all(&b)
    }

    /// Waits for the simple reply to the last request.
    fn reply(&mut self) -> io::Result<()> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h)?;
        let magic = u32::from_be_bytes(h[..4].try_into().unwrap());
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        if magic != SIMPLE_REPLY_MAGIC || cookie != self.cookie {
            return Err(proto(format!("bad reply {h:02x?}")));
        }
        if err != 0 {
            return Err(io::Error::other(NbdErrno(err)));
        }
        Ok(())
    }

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let flags = if fua { FLAG_FUA } else { 0 };
        self.request(CMD_WRITE, flags, offset, data.len() as u32, data)?;
        self.reply()
    }

    /// FLUSH; `sent` runs once the request is on the wire, before the reply.
    pub fn flush_then(&mut self, sent: impl FnOnce()) -> io::Result<()> {
        self.request(CMD_FLUSH, 0, 0, 0, &[])?;
        sent();
        self.reply()
    }

    pub fn trim(&mut self, offset: u64, len: u32) -> io::Result<()> {
        self.request(CMD_TRIM, 0, offset, len, &[])?;
        self.reply()
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u32) -> io::Result<()> {
        self.request(CMD_WRITE_ZEROES, 0, offset, len, &[])?;
        self.reply()
    }

    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.request(CMD_READ, 0, offset, buf.len() as u32, &[])?;
        self.reply()?;
        self.s.read_exact(buf)
    }
}

/// True when the error is the server's error reply, not a broken connection.
pub fn is_nbd_errno(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<NbdErrno>())
}
