//! Wire format of the NBD protocol: constants, decoders for everything a
//! client sends, and encoders for everything the server sends.
//!
//! Every decoder here takes an untrusted byte slice and returns an error
//! instead of panicking, so they can be driven directly by a fuzzer.

use thiserror::Error;

// ---- Handshake magics and flags -------------------------------------------

/// `NBDMAGIC`, first word of the server greeting.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second word of the greeting and magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flag: the server speaks fixed newstyle.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after EXPORT_NAME.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client does not want the 124 zero bytes.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---- Options --------------------------------------------------------------

/// Option: select an export and enter transmission (cannot report errors).
pub const NBD_OPT_EXPORT_NAME: u32 = 1;
/// Option: end the session.
pub const NBD_OPT_ABORT: u32 = 2;
/// Option: list export names.
pub const NBD_OPT_LIST: u32 = 3;
/// Option: upgrade to TLS (refused by this server).
pub const NBD_OPT_STARTTLS: u32 = 5;
/// Option: describe an export without selecting it.
pub const NBD_OPT_INFO: u32 = 6;
/// Option: describe and select an export, then enter transmission.
pub const NBD_OPT_GO: u32 = 7;
/// Option: use structured replies in transmission.
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts matching queries.
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: select metadata contexts for NBD_CMD_BLOCK_STATUS.
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply: success / end of a reply list.
pub const NBD_REP_ACK: u32 = 1;
/// Option reply: one export name (NBD_OPT_LIST).
pub const NBD_REP_SERVER: u32 = 2;
/// Option reply: one `NBD_INFO_*` item (NBD_OPT_INFO/GO).
pub const NBD_REP_INFO: u32 = 3;
/// Option reply: one metadata context id and name.
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks option error replies.
const NBD_REP_ERR: u32 = 1 << 31;
/// Option error: option unknown to this server.
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_ERR | 1;
/// Option error: known but refused by policy.
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_ERR | 2;
/// Option error: syntactically or semantically invalid.
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_ERR | 3;
/// Option error: TLS must be started first (FORCEDTLS).
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_ERR | 5;
/// Option error: the export does not exist.
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_ERR | 6;
/// Option error: the server is shutting down.
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_ERR | 7;
/// Option error: request or reply too large.
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_ERR | 9;

/// Info item: export size and transmission flags.
pub const NBD_INFO_EXPORT: u16 = 0;
/// Info item: canonical export name.
pub const NBD_INFO_NAME: u16 = 1;
/// Info item: human-readable description.
pub const NBD_INFO_DESCRIPTION: u16 = 2;
/// Info item: minimum, preferred and maximum block sizes.
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

/// The allocation metadata context every export has.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Wildcard that lists every `base:` context during LIST_META_CONTEXT.
pub const BASE_NAMESPACE: &str = "base:";
/// Wildcard that lists every `qemu:` context during LIST_META_CONTEXT.
pub const QEMU_NAMESPACE: &str = "qemu:";
/// Prefix of qemu's dirty-bitmap contexts, `qemu:dirty-bitmap:NAME`; alone,
/// a LIST wildcard for every bitmap of the export.
pub const QEMU_DIRTY_BITMAP_PREFIX: &str = "qemu:dirty-bitmap:";

// ---- Transmission flags ---------------------------------------------------

/// Transmission flag: always set.
pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: NBD_CMD_FLUSH is supported.
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: NBD_CMD_FLAG_FUA is supported.
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: NBD_CMD_TRIM is supported.
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: NBD_CMD_WRITE_ZEROES and NO_HOLE are supported.
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: NBD_CMD_FLAG_DF is supported (structured replies only).
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag: flushes are visible across connections.
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag: NBD_CMD_CACHE is understood.
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag: NBD_CMD_FLAG_FAST_ZERO is supported.
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---- Requests and replies -------------------------------------------------

/// Magic of every request header.
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Command flag: persist before replying.
pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag (WRITE_ZEROES): do not deallocate.
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag (READ): reply with at most one data chunk.
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag (BLOCK_STATUS): one extent per context.
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag (WRITE_ZEROES): fail with ENOTSUP unless zeroing is fast.
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag: final chunk of the reply.
pub const NBD_REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: no payload, success.
pub const NBD_REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: offset followed by data.
pub const NBD_REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: context id followed by extent descriptors.
pub const NBD_REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type: error value and message.
pub const NBD_REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// `base:allocation` flag: the extent is not allocated.
pub const NBD_STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag: the extent reads as zeroes.
pub const NBD_STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:` flag: the extent changed since the bitmap's point.
pub const NBD_STATE_DIRTY: u32 = 1 << 0;

/// Error: operation not permitted.
pub const NBD_EPERM: u32 = 1;
/// Error: input/output error.
pub const NBD_EIO: u32 = 5;
/// Error: out of memory.
pub const NBD_ENOMEM: u32 = 12;
/// Error: invalid argument.
pub const NBD_EINVAL: u32 = 22;
/// Error: no space left.
pub const NBD_ENOSPC: u32 = 28;
/// Error: value too large.
pub const NBD_EOVERFLOW: u32 = 75;
/// Error: operation not supported (fast zero refused).
pub const NBD_ENOTSUP: u32 = 95;
/// Error: server shutting down.
pub const NBD_ESHUTDOWN: u32 = 108;

// ---- Limits ---------------------------------------------------------------

/// Length of the server greeting (magic, IHAVEOPT, handshake flags).
pub const GREETING_BYTES: usize = 18;
/// Length of an option header (magic, option, length).
pub const OPTION_HEADER_BYTES: usize = 16;
/// Length of a request header.
pub const REQUEST_HEADER_BYTES: usize = 28;
/// Length of a simple reply header.
pub const SIMPLE_REPLY_HEADER_BYTES: usize = 16;
/// Length of a structured reply chunk header.
pub const CHUNK_HEADER_BYTES: usize = 20;
/// Zero padding after an NBD_OPT_EXPORT_NAME reply unless NO_ZEROES was negotiated.
pub const EXPORT_NAME_PADDING_BYTES: usize = 124;
/// Spec limit for any string (export names, queries, messages).
pub const MAX_STRING_BYTES: usize = 4096;
/// Advertised minimum block size: we accept any alignment.
pub const MIN_BLOCK_BYTES: u32 = 1;
/// Advertised preferred block size.
pub const PREFERRED_BLOCK_BYTES: u32 = 4096;
/// Largest READ/WRITE payload we accept (and advertise in NBD_INFO_BLOCK_SIZE).
pub const MAX_PAYLOAD_BYTES: u32 = 32 << 20;

/// A decoding failure: the client sent something malformed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtoError {
    /// The input ended before a complete message.
    #[error("message truncated: need {need} bytes, got {got}")]
    Truncated {
        /// Bytes the message needs.
        need: usize,
        /// Bytes available.
        got: usize,
    },
    /// A request did not start with NBD_REQUEST_MAGIC (stream out of sync).
    #[error("bad request magic {0:#010x}")]
    BadRequestMagic(u32),
    /// An option did not start with IHAVEOPT.
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    /// The client set flags we did not offer.
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// Option data does not match its documented layout.
    #[error("malformed option payload: {0}")]
    Malformed(&'static str),
    /// A string is longer than the spec allows.
    #[error("string of {0} bytes exceeds the {MAX_STRING_BYTES} byte limit")]
    StringTooLong(usize),
    /// A string is not UTF-8 or contains NUL.
    #[error("string is not valid UTF-8 or contains NUL")]
    BadString,
}

/// Bounds-checked big-endian cursor over untrusted bytes.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Cursor { buf, pos: 0 }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if n > self.remaining() {
            return Err(ProtoError::Truncated {
                need: self.pos.saturating_add(n),
                got: self.buf.len(),
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A string whose 32-bit length prefix has already been read.
    fn string(&mut self, len: u32) -> Result<String, ProtoError> {
        let len = len as usize;
        if len > MAX_STRING_BYTES {
            return Err(ProtoError::StringTooLong(len));
        }
        if len > self.remaining() {
            return Err(ProtoError::Malformed("string length exceeds option length"));
        }
        parse_string(self.take(len)?)
    }

    fn finish(&self) -> Result<(), ProtoError> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(ProtoError::Malformed("trailing bytes"))
        }
    }
}

/// Validates an NBD string: UTF-8, no NUL, at most [`MAX_STRING_BYTES`].
pub fn parse_string(bytes: &[u8]) -> Result<String, ProtoError> {
    if bytes.len() > MAX_STRING_BYTES {
        return Err(ProtoError::StringTooLong(bytes.len()));
    }
    match std::str::from_utf8(bytes) {
        Ok(s) if !s.contains('\0') => Ok(s.to_owned()),
        _ => Err(ProtoError::BadString),
    }
}

// ---- Handshake decoding ---------------------------------------------------

/// Flags the client sent right after the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    /// NBD_FLAG_C_FIXED_NEWSTYLE: the client understands option replies.
    pub fixed_newstyle: bool,
    /// NBD_FLAG_C_NO_ZEROES: omit the padding after NBD_OPT_EXPORT_NAME.
    pub no_zeroes: bool,
}

/// Decodes the 32-bit client flags; unknown bits are a protocol violation.
pub fn parse_client_flags(buf: &[u8]) -> Result<ClientFlags, ProtoError> {
    let raw = Cursor::new(buf).u32()?;
    let known = NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES;
    if raw & !known != 0 {
        return Err(ProtoError::UnknownClientFlags(raw));
    }
    Ok(ClientFlags {
        fixed_newstyle: raw & NBD_FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: raw & NBD_FLAG_C_NO_ZEROES != 0,
    })
}

/// Header of one client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// `NBD_OPT_*` value.
    pub option: u32,
    /// Length of the option data that follows the header.
    pub length: u32,
}

/// Decodes a 16-byte option header.
pub fn parse_option_header(buf: &[u8]) -> Result<OptionHeader, ProtoError> {
    let mut c = Cursor::new(buf);
    let magic = c.u64()?;
    if magic != IHAVEOPT {
        return Err(ProtoError::BadOptionMagic(magic));
    }
    Ok(OptionHeader {
        option: c.u32()?,
        length: c.u32()?,
    })
}

/// Data of NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name ("" selects the default export).
    pub name: String,
    /// Requested `NBD_INFO_*` items, in client order.
    pub requests: Vec<u16>,
}

/// Decodes the data of NBD_OPT_INFO / NBD_OPT_GO.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, ProtoError> {
    let mut c = Cursor::new(data);
    let name_len = c.u32()?;
    let name = c.string(name_len)?;
    let count = c.u16()? as usize;
    if count * 2 != c.remaining() {
        return Err(ProtoError::Malformed("information request count mismatch"));
    }
    let requests = (0..count).map(|_| c.u16()).collect::<Result<_, _>>()?;
    c.finish()?;
    Ok(InfoRequest { name, requests })
}

/// Data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export the contexts are for ("" selects the default export).
    pub export_name: String,
    /// Context queries such as `base:allocation` or `base:`.
    pub queries: Vec<String>,
}

/// Decodes the data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
pub fn parse_meta_context_request(data: &[u8]) -> Result<MetaContextRequest, ProtoError> {
    let mut c = Cursor::new(data);
    let name_len = c.u32()?;
    let export_name = c.string(name_len)?;
    let count = c.u32()? as usize;
    // Each query needs at least its 4-byte length, so this bounds the
    // allocation by the (already bounded) option length.
    if count > c.remaining() / 4 {
        return Err(ProtoError::Malformed("query count exceeds option length"));
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let len = c.u32()?;
        queries.push(c.string(len)?);
    }
    c.finish()?;
    Ok(MetaContextRequest {
        export_name,
        queries,
    })
}

// ---- Transmission decoding ------------------------------------------------

/// Transmission-phase command types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// NBD_CMD_READ (0).
    Read,
    /// NBD_CMD_WRITE (1); `length` bytes of payload follow the header.
    Write,
    /// NBD_CMD_DISC (2): soft disconnect, no reply.
    Disc,
    /// NBD_CMD_FLUSH (3).
    Flush,
    /// NBD_CMD_TRIM (4).
    Trim,
    /// NBD_CMD_CACHE (5).
    Cache,
    /// NBD_CMD_WRITE_ZEROES (6).
    WriteZeroes,
    /// NBD_CMD_BLOCK_STATUS (7).
    BlockStatus,
}

impl Command {
    /// Maps a wire command type; `None` for commands we do not know.
    pub fn from_wire(kind: u16) -> Option<Self> {
        Some(match kind {
            0 => Command::Read,
            1 => Command::Write,
            2 => Command::Disc,
            3 => Command::Flush,
            4 => Command::Trim,
            5 => Command::Cache,
            6 => Command::WriteZeroes,
            7 => Command::BlockStatus,
            _ => return None,
        })
    }
}

/// A decoded request header (the WRITE payload, if any, follows on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*` bits.
    pub flags: u16,
    /// Raw command type; see [`Command::from_wire`].
    pub kind: u16,
    /// Opaque client value echoed in the reply.
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Length in bytes (of the payload, for WRITE).
    pub length: u32,
}

impl Request {
    /// The command, or `None` if the type is unknown.
    pub fn command(&self) -> Option<Command> {
        Command::from_wire(self.kind)
    }

    /// Bytes of payload that follow this header on the wire.
    pub fn payload_bytes(&self) -> u32 {
        if self.command() == Some(Command::Write) {
            self.length
        } else {
            0
        }
    }
}

/// Decodes a request header from the first [`REQUEST_HEADER_BYTES`] of `buf`.
/// Extra bytes are ignored. A bad magic means the stream is out of sync.
pub fn parse_request(buf: &[u8]) -> Result<Request, ProtoError> {
    if buf.len() < REQUEST_HEADER_BYTES {
        return Err(ProtoError::Truncated {
            need: REQUEST_HEADER_BYTES,
            got: buf.len(),
        });
    }
    let mut c = Cursor::new(buf);
    let magic = c.u32()?;
    if magic != NBD_REQUEST_MAGIC {
        return Err(ProtoError::BadRequestMagic(magic));
    }
    Ok(Request {
        flags: c.u16()?,
        kind: c.u16()?,
        cookie: c.u64()?,
        offset: c.u64()?,
        length: c.u32()?,
    })
}

// ---- Encoders -------------------------------------------------------------

/// The 18-byte server greeting.
pub fn encode_greeting() -> [u8; GREETING_BYTES] {
    let mut out = [0u8; GREETING_BYTES];
    out[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// Appends one fixed-newstyle option reply to `out`.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    // Callers only pass data bounded by our own limits, far below 4 GiB.
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Payload of NBD_INFO_EXPORT.
pub fn encode_info_export(size_bytes: u64, transmission_flags: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&NBD_INFO_EXPORT.to_be_bytes());
    out.extend_from_slice(&size_bytes.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
    out
}

/// Payload of NBD_INFO_BLOCK_SIZE with this server's fixed constraints.
pub fn encode_info_block_size() -> Vec<u8> {
    let mut out = Vec::with_capacity(14);
    out.extend_from_slice(&NBD_INFO_BLOCK_SIZE.to_be_bytes());
    out.extend_from_slice(&MIN_BLOCK_BYTES.to_be_bytes());
    out.extend_from_slice(&PREFERRED_BLOCK_BYTES.to_be_bytes());
    out.extend_from_slice(&MAX_PAYLOAD_BYTES.to_be_bytes());
    out
}

/// Payload of NBD_INFO_NAME / NBD_INFO_DESCRIPTION.
pub fn encode_info_string(info: u16, text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + text.len());
    out.extend_from_slice(&info.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    out
}

/// Payload of NBD_REP_SERVER.
pub fn encode_rep_server(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// Payload of NBD_REP_META_CONTEXT.
pub fn encode_rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// Reply to NBD_OPT_EXPORT_NAME: size, flags and optional zero padding.
pub fn encode_export_name_reply(size_bytes: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + EXPORT_NAME_PADDING_BYTES);
    out.extend_from_slice(&size_bytes.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        out.resize(out.len() + EXPORT_NAME_PADDING_BYTES, 0);
    }
    out
}

/// Writes a simple reply header into `out[..SIMPLE_REPLY_HEADER_BYTES]`.
pub fn put_simple_reply_header(out: &mut [u8], error: u32, cookie: u64) {
    out[0..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
}

/// A simple reply without payload.
pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_HEADER_BYTES] {
    let mut out = [0u8; SIMPLE_REPLY_HEADER_BYTES];
    put_simple_reply_header(&mut out, error, cookie);
    out
}

/// Writes a structured chunk header into `out[..CHUNK_HEADER_BYTES]`.
pub fn put_chunk_header(out: &mut [u8], flags: u16, kind: u16, cookie: u64, length: u32) {
    out[0..4].copy_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
}

/// A final NBD_REPLY_TYPE_ERROR chunk carrying `error` and a human message.
pub fn encode_error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    // The message field is 16 bits and the spec caps strings at 4096 bytes.
    let mut msg_len = message.len().min(MAX_STRING_BYTES);
    while !message.is_char_boundary(msg_len) {
        msg_len -= 1;
    }
    let payload_len = 6 + msg_len;
    let mut out = vec![0u8; CHUNK_HEADER_BYTES];
    put_chunk_header(
        &mut out,
        NBD_REPLY_FLAG_DONE,
        NBD_REPLY_TYPE_ERROR,
        cookie,
        payload_len as u32,
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg_len as u16).to_be_bytes());
    out.extend_from_slice(&message.as_bytes()[..msg_len]);
    out
}

/// An NBD_REPLY_TYPE_BLOCK_STATUS chunk appended to `out`, the reply's last
/// chunk when `done`; `extents` must be non-empty.
pub fn encode_block_status_chunk(
    out: &mut Vec<u8>,
    cookie: u64,
    context_id: u32,
    extents: &[(u32, u32)],
    done: bool,
) {
    let payload_len = 4 + 8 * extents.len();
    out.reserve(CHUNK_HEADER_BYTES + payload_len);
    let start = out.len();
    out.resize(start + CHUNK_HEADER_BYTES, 0);
    put_chunk_header(
        &mut out[start..],
        if done { NBD_REPLY_FLAG_DONE } else { 0 },
        NBD_REPLY_TYPE_BLOCK_STATUS,
        cookie,
        payload_len as u32,
    );
    out.extend_from_slice(&context_id.to_be_bytes());
    for &(len, flags) in extents {
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_bytes(
        magic: u32,
        flags: u16,
        kind: u16,
        cookie: u64,
        off: u64,
        len: u32,
    ) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&magic.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&off.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    #[test]
    fn parses_valid_request() {
        let b = request_bytes(NBD_REQUEST_MAGIC, NBD_CMD_FLAG_FUA, 1, 0xdead, 4096, 512);
        let r = parse_request(&b).unwrap();
        assert_eq!(
            r,
            Request {
                flags: NBD_CMD_FLAG_FUA,
                kind: 1,
                cookie: 0xdead,
                offset: 4096,
                length: 512
            }
        );
        assert_eq!(r.command(), Some(Command::Write));
        assert_eq!(r.payload_bytes(), 512);
    }

    #[test]
    fn request_rejects_bad_magic_and_short_input() {
        let b = request_bytes(0x1234_5678, 0, 0, 0, 0, 0);
        assert_eq!(
            parse_request(&b),
            Err(ProtoError::BadRequestMagic(0x1234_5678))
        );
        for n in 0..REQUEST_HEADER_BYTES {
            let good = request_bytes(NBD_REQUEST_MAGIC, 0, 0, 0, 0, 1);
            assert!(matches!(
                parse_request(&good[..n]),
                Err(ProtoError::Truncated { .. })
            ));
        }
    }

    #[test]
    fn unknown_command_has_no_payload() {
        let b = request_bytes(NBD_REQUEST_MAGIC, 0, 99, 1, 0, 1 << 30);
        let r = parse_request(&b).unwrap();
        assert_eq!(r.command(), None);
        assert_eq!(r.payload_bytes(), 0);
    }

    #[test]
    fn parse_request_never_panics_on_garbage() {
        // Cheap deterministic fuzz: every prefix of pseudo-random data.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut buf = Vec::new();
        for _ in 0..4096 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            buf.push(x as u8);
            let _ = parse_request(&buf[buf.len().saturating_sub(40)..]);
            let _ = parse_info_request(&buf[buf.len().saturating_sub(64)..]);
            let _ = parse_meta_context_request(&buf[buf.len().saturating_sub(64)..]);
            let _ = parse_option_header(&buf[buf.len().saturating_sub(16)..]);
        }
    }

    #[test]
    fn client_flags() {
        assert_eq!(
            parse_client_flags(&3u32.to_be_bytes()),
            Ok(ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            })
        );
        assert_eq!(
            parse_client_flags(&4u32.to_be_bytes()),
            Err(ProtoError::UnknownClientFlags(4))
        );
        assert!(parse_client_flags(&[0, 0]).is_err());
    }

    #[test]
    fn option_header() {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
        b.extend_from_slice(&7u32.to_be_bytes());
        assert_eq!(
            parse_option_header(&b),
            Ok(OptionHeader {
                option: NBD_OPT_GO,
                length: 7
            })
        );
        assert!(matches!(
            parse_option_header(&b[..10]),
            Err(ProtoError::Truncated { .. })
        ));
        b[0] ^= 1;
        assert!(matches!(
            parse_option_header(&b),
            Err(ProtoError::BadOptionMagic(_))
        ));
    }

    fn info_bytes(name: &[u8], name_len: u32, reqs: &[u16], count: u16) -> Vec<u8> {
        let mut b = name_len.to_be_bytes().to_vec();
        b.extend_from_slice(name);
        b.extend_from_slice(&count.to_be_bytes());
        for r in reqs {
            b.extend_from_slice(&r.to_be_bytes());
        }
        b
    }

    #[test]
    fn info_request_valid() {
        let b = info_bytes(b"disk", 4, &[NBD_INFO_NAME, NBD_INFO_BLOCK_SIZE], 2);
        assert_eq!(
            parse_info_request(&b),
            Ok(InfoRequest {
                name: "disk".into(),
                requests: vec![NBD_INFO_NAME, NBD_INFO_BLOCK_SIZE]
            })
        );
        let empty = info_bytes(b"", 0, &[], 0);
        assert_eq!(parse_info_request(&empty).unwrap().name, "");
    }

    #[test]
    fn info_request_malformed() {
        // Name length larger than the data.
        assert!(parse_info_request(&info_bytes(b"disk", 400, &[], 0)).is_err());
        // Name length absurdly large.
        assert!(parse_info_request(&info_bytes(b"disk", u32::MAX, &[], 0)).is_err());
        // Count claims more requests than present, and fewer.
        assert!(parse_info_request(&info_bytes(b"disk", 4, &[1], 2)).is_err());
        assert!(parse_info_request(&info_bytes(b"disk", 4, &[1, 2], 1)).is_err());
        // Missing count entirely.
        assert!(parse_info_request(&[0, 0, 0, 0]).is_err());
        // Invalid UTF-8 and embedded NUL.
        assert_eq!(
            parse_info_request(&info_bytes(&[0xff, 0xfe], 2, &[], 0)),
            Err(ProtoError::BadString)
        );
        assert_eq!(
            parse_info_request(&info_bytes(b"a\0b", 3, &[], 0)),
            Err(ProtoError::BadString)
        );
        // Over-long name.
        let long = vec![b'a'; MAX_STRING_BYTES + 1];
        assert_eq!(
            parse_info_request(&info_bytes(&long, long.len() as u32, &[], 0)),
            Err(ProtoError::StringTooLong(MAX_STRING_BYTES + 1))
        );
    }

    fn meta_bytes(name: &str, queries: &[&str], count: u32) -> Vec<u8> {
        let mut b = (name.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(name.as_bytes());
        b.extend_from_slice(&count.to_be_bytes());
        for q in queries {
            b.extend_from_slice(&(q.len() as u32).to_be_bytes());
            b.extend_from_slice(q.as_bytes());
        }
        b
    }

    #[test]
    fn meta_context_valid() {
        let b = meta_bytes("disk", &["base:allocation", "qemu:dirty"], 2);
        assert_eq!(
            parse_meta_context_request(&b),
            Ok(MetaContextRequest {
                export_name: "disk".into(),
                queries: vec!["base:allocation".into(), "qemu:dirty".into()]
            })
        );
        assert!(parse_meta_context_request(&meta_bytes("", &[], 0))
            .unwrap()
            .queries
            .is_empty());
    }

    #[test]
    fn meta_context_malformed() {
        // More queries claimed than present (and an absurd count).
        assert!(parse_meta_context_request(&meta_bytes("d", &["base:"], 2)).is_err());
        assert!(parse_meta_context_request(&meta_bytes("d", &[], u32::MAX)).is_err());
        // Trailing junk.
        let mut b = meta_bytes("d", &["base:"], 1);
        b.push(0);
        assert!(parse_meta_context_request(&b).is_err());
        // Query length past the end.
        let mut b = meta_bytes("d", &[], 1);
        b.extend_from_slice(&100u32.to_be_bytes());
        b.extend_from_slice(b"base:");
        assert!(parse_meta_context_request(&b).is_err());
        // Truncated before the count.
        assert!(parse_meta_context_request(&[0, 0, 0, 1, b'd']).is_err());
    }

    #[test]
    fn error_chunk_layout() {
        let c = encode_error_chunk(7, NBD_EINVAL, "bad");
        assert_eq!(c.len(), CHUNK_HEADER_BYTES + 6 + 3);
        assert_eq!(&c[0..4], &NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&c[4..6], &NBD_REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&c[6..8], &NBD_REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&c[16..20], &9u32.to_be_bytes());
        assert_eq!(&c[20..24], &NBD_EINVAL.to_be_bytes());
        assert_eq!(&c[24..26], &3u16.to_be_bytes());
        assert_eq!(&c[26..], b"bad");
    }

    #[test]
    fn block_status_chunk_layout() {
        let mut c = Vec::new();
        encode_block_status_chunk(&mut c, 9, 1, &[(4096, 3), (512, 0)], false);
        assert_eq!(c.len(), CHUNK_HEADER_BYTES + 4 + 16);
        assert_eq!(&c[4..6], &0u16.to_be_bytes(), "not the last chunk");
        assert_eq!(&c[16..20], &20u32.to_be_bytes());
        assert_eq!(&c[20..24], &1u32.to_be_bytes());
        assert_eq!(&c[24..28], &4096u32.to_be_bytes());
        assert_eq!(&c[28..32], &3u32.to_be_bytes());
        // A second chunk follows the first, and ends the reply.
        encode_block_status_chunk(&mut c, 9, 2, &[(8192, 1)], true);
        let second = &c[CHUNK_HEADER_BYTES + 20..];
        assert_eq!(second.len(), CHUNK_HEADER_BYTES + 12);
        assert_eq!(&second[4..6], &NBD_REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&second[20..24], &2u32.to_be_bytes());
        assert_eq!(&second[24..28], &8192u32.to_be_bytes());
    }

    #[test]
    fn export_name_reply_padding() {
        assert_eq!(encode_export_name_reply(1, 1, false).len(), 134);
        assert_eq!(encode_export_name_reply(1, 1, true).len(), 10);
    }
}
