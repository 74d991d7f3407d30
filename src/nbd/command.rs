//! Validation of transmission-phase requests into operations on an export.
//!
//! Everything here is pure so that every way a client can misuse a request
//! is checked in one place and unit-tested without sockets.

use super::proto::*;

/// What the connection knows when checking a request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub export_size_bytes: u64,
    pub structured_replies: bool,
    /// At least one metadata context was selected: BLOCK_STATUS is allowed.
    pub meta_contexts: bool,
    /// NBD_FLAG_READ_ONLY was announced: every command that writes is EPERM.
    pub read_only: bool,
}

/// A validated operation, ready to run against the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read {
        offset: u64,
        len: u32,
    },
    Write {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u32,
        fua: bool,
    },
    Cache,
    WriteZeroes {
        offset: u64,
        len: u32,
        may_unmap: bool,
        fast_only: bool,
        fua: bool,
    },
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
}

impl Op {
    /// Whether FLUSH must wait for this operation (it modifies data).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Op::Write { .. } | Op::Trim { .. } | Op::WriteZeroes { .. }
        )
    }
}

/// A request refused before touching the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub error: u32,
    pub message: &'static str,
}

fn reject(error: u32, message: &'static str) -> Rejection {
    Rejection { error, message }
}

/// Command flags valid for each command (FUA is accepted everywhere, as the
/// spec requires once NBD_FLAG_SEND_FUA is advertised).
fn allowed_flags(cmd: Command, structured: bool) -> u16 {
    NBD_CMD_FLAG_FUA
        | match cmd {
            Command::Read if structured => NBD_CMD_FLAG_DF,
            Command::WriteZeroes => NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
            Command::BlockStatus => NBD_CMD_FLAG_REQ_ONE,
            _ => 0,
        }
}

/// Checks a request (other than DISC) against the export and negotiated
/// features. Offsets past the end, u64 overflow and zero lengths are EINVAL.
pub fn validate(req: &Request, limits: &Limits) -> Result<Op, Rejection> {
    let Some(cmd) = req.command() else {
        return Err(reject(NBD_EINVAL, "unknown command"));
    };
    if req.flags & !allowed_flags(cmd, limits.structured_replies) != 0 {
        return Err(reject(
            NBD_EINVAL,
            "command flag not valid for this command",
        ));
    }
    let fua = req.flags & NBD_CMD_FLAG_FUA != 0;
    let (offset, len) = (req.offset, req.length);
    if limits.read_only && matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes) {
        return Err(reject(NBD_EPERM, "the export is read-only"));
    }
    Ok(match cmd {
        // FLUSH's offset and length are reserved; we ignore them rather than
        // fail a client that fills them in.
        Command::Flush => Op::Flush,
        Command::Disc => return Err(reject(NBD_EINVAL, "disconnect is not an operation")),
        Command::Read => {
            check_range(req, limits)?;
            check_payload(req, limits)?;
            Op::Read { offset, len }
        }
        Command::Write => {
            check_range(req, limits)?;
            check_payload(req, limits)?;
            Op::Write { offset, len, fua }
        }
        Command::Trim => {
            check_range(req, limits)?;
            Op::Trim { offset, len, fua }
        }
        Command::Cache => {
            check_range(req, limits)?;
            Op::Cache
        }
        Command::WriteZeroes => {
            check_range(req, limits)?;
            Op::WriteZeroes {
                offset,
                len,
                may_unmap: req.flags & NBD_CMD_FLAG_NO_HOLE == 0,
                fast_only: req.flags & NBD_CMD_FLAG_FAST_ZERO != 0,
                fua,
            }
        }
        Command::BlockStatus => {
            check_range(req, limits)?;
            if !limits.meta_contexts {
                return Err(reject(NBD_EINVAL, "no metadata context was negotiated"));
            }
            Op::BlockStatus {
                offset,
                len,
                req_one: req.flags & NBD_CMD_FLAG_REQ_ONE != 0,
            }
        }
    })
}

/// Non-empty and inside the export, without u64 overflow.
fn check_range(req: &Request, limits: &Limits) -> Result<(), Rejection> {
    if req.length == 0 {
        return Err(reject(NBD_EINVAL, "zero-length request"));
    }
    match req.offset.checked_add(u64::from(req.length)) {
        Some(end) if end <= limits.export_size_bytes => Ok(()),
        _ => Err(reject(
            NBD_EINVAL,
            "request extends past the end of the export",
        )),
    }
}

/// READ/WRITE carry data, so their length is capped by the payload limit.
fn check_payload(req: &Request, limits: &Limits) -> Result<(), Rejection> {
    if req.length <= MAX_PAYLOAD_BYTES {
        return Ok(());
    }
    // With structured replies a large read may be refused up front with EOVERFLOW.
    let error = if req.command() == Some(Command::Read) && limits.structured_replies {
        NBD_EOVERFLOW
    } else {
        NBD_EINVAL
    };
    Err(reject(error, "request exceeds the maximum payload size"))
}

/// Upper bound on descriptors in one block-status reply (8 bytes each); the
/// spec asks for at most 2^20, we keep replies to 512 KiB.
pub const MAX_BLOCK_STATUS_EXTENTS: usize = 1 << 16;

/// Turns the export's extents into wire descriptors for a request of `len`
/// bytes: drops empty extents, clips to the request, merges neighbours with
/// equal flags, masks flag bits outside the context's and caps the count.
/// Always returns at least one descriptor: with no extents, the context's
/// always-truthful status over the whole range.
pub fn block_status_descriptors(
    extents: &[(u64, u32)],
    len: u32,
    req_one: bool,
    context: ContextFlags,
) -> Vec<(u32, u32)> {
    let known = context.known;
    let max_extents = if req_one { 1 } else { MAX_BLOCK_STATUS_EXTENTS };
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut remaining = len;
    for &(ext_len, flags) in extents {
        if remaining == 0 {
            break;
        }
        let ext_len = ext_len.min(u64::from(remaining)) as u32;
        if ext_len == 0 {
            continue;
        }
        let flags = flags & known;
        remaining -= ext_len;
        let full = out.len() == max_extents;
        match out.last_mut() {
            Some(last) if last.1 == flags => last.0 += ext_len,
            _ if full => break,
            _ => out.push((ext_len, flags)),
        }
    }
    if out.is_empty() {
        out.push((len, context.fallback));
    }
    out
}

/// The status flags of one metadata context.
#[derive(Debug, Clone, Copy)]
pub struct ContextFlags {
    /// Bits the context defines; others are masked off.
    pub known: u32,
    /// A status that is true of any range.
    pub fallback: u32,
}

/// `base:allocation`: allocated data is always a truthful answer.
pub const BASE_ALLOCATION_FLAGS: ContextFlags = ContextFlags {
    known: NBD_STATE_HOLE | NBD_STATE_ZERO,
    fallback: 0,
};

/// `qemu:dirty-bitmap:`: "dirty" is always safe, a backup then copies more.
pub const DIRTY_BITMAP_FLAGS: ContextFlags = ContextFlags {
    known: NBD_STATE_DIRTY,
    fallback: NBD_STATE_DIRTY,
};

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u64 = 1 << 20;

    fn limits() -> Limits {
        Limits {
            export_size_bytes: SIZE,
            structured_replies: true,
            meta_contexts: true,
            read_only: false,
        }
    }

    #[test]
    fn a_read_only_export_refuses_every_write_with_eperm() {
        let ro = Limits {
            read_only: true,
            ..limits()
        };
        for kind in [1u16, 4, 6] {
            assert_eq!(
                err(validate(&req(kind, 0, 0, 4096), &ro)),
                NBD_EPERM,
                "cmd {kind}"
            );
        }
        assert!(validate(&req(0, 0, 0, 4096), &ro).is_ok(), "read");
        assert!(validate(&req(3, 0, 0, 0), &ro).is_ok(), "flush");
    }

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            kind,
            cookie: 1,
            offset,
            length,
        }
    }

    fn err(r: Result<Op, Rejection>) -> u32 {
        r.unwrap_err().error
    }

    #[test]
    fn valid_requests() {
        let l = limits();
        assert_eq!(
            validate(&req(0, 0, 0, 512), &l),
            Ok(Op::Read {
                offset: 0,
                len: 512
            })
        );
        assert_eq!(
            validate(&req(1, NBD_CMD_FLAG_FUA, SIZE - 1, 1), &l),
            Ok(Op::Write {
                offset: SIZE - 1,
                len: 1,
                fua: true
            })
        );
        assert_eq!(validate(&req(3, 0, 0, 0), &l), Ok(Op::Flush));
        assert_eq!(
            validate(
                &req(6, NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO, 0, 4096),
                &l
            ),
            Ok(Op::WriteZeroes {
                offset: 0,
                len: 4096,
                may_unmap: false,
                fast_only: true,
                fua: false
            })
        );
        assert_eq!(
            validate(&req(7, NBD_CMD_FLAG_REQ_ONE, 0, 4096), &l),
            Ok(Op::BlockStatus {
                offset: 0,
                len: 4096,
                req_one: true,
            })
        );
        assert_eq!(validate(&req(5, 0, 0, 1), &l), Ok(Op::Cache));
        // Trim/zero lengths are not limited by the payload size.
        let big = Limits {
            export_size_bytes: u64::MAX,
            ..l
        };
        assert!(validate(&req(4, 0, 0, u32::MAX), &big).is_ok());
    }

    #[test]
    fn out_of_range_overflow_and_zero_length() {
        let l = limits();
        for kind in [0, 1, 4, 5, 6, 7] {
            assert_eq!(err(validate(&req(kind, 0, SIZE, 1), &l)), NBD_EINVAL);
            assert_eq!(err(validate(&req(kind, 0, SIZE - 1, 2), &l)), NBD_EINVAL);
            assert_eq!(
                err(validate(&req(kind, 0, u64::MAX - 10, 100), &l)),
                NBD_EINVAL
            );
            assert_eq!(err(validate(&req(kind, 0, 0, 0), &l)), NBD_EINVAL);
        }
    }

    #[test]
    fn bad_flags_and_commands() {
        let l = limits();
        assert_eq!(err(validate(&req(99, 0, 0, 1), &l)), NBD_EINVAL);
        assert_eq!(
            err(validate(&req(1, NBD_CMD_FLAG_NO_HOLE, 0, 1), &l)),
            NBD_EINVAL
        );
        assert_eq!(
            err(validate(&req(0, NBD_CMD_FLAG_REQ_ONE, 0, 1), &l)),
            NBD_EINVAL
        );
        assert_eq!(err(validate(&req(0, 1 << 9, 0, 1), &l)), NBD_EINVAL);
        // DF only once structured replies are on.
        assert!(validate(&req(0, NBD_CMD_FLAG_DF, 0, 1), &l).is_ok());
        let simple = Limits {
            structured_replies: false,
            meta_contexts: false,
            ..l
        };
        assert_eq!(
            err(validate(&req(0, NBD_CMD_FLAG_DF, 0, 1), &simple)),
            NBD_EINVAL
        );
        // BLOCK_STATUS without a negotiated context.
        assert_eq!(err(validate(&req(7, 0, 0, 1), &simple)), NBD_EINVAL);
    }

    #[test]
    fn oversized_payloads() {
        let l = Limits {
            export_size_bytes: u64::MAX,
            ..limits()
        };
        let over = MAX_PAYLOAD_BYTES + 1;
        assert_eq!(err(validate(&req(1, 0, 0, over), &l)), NBD_EINVAL);
        assert_eq!(err(validate(&req(0, 0, 0, over), &l)), NBD_EOVERFLOW);
        let simple = Limits {
            structured_replies: false,
            ..l
        };
        assert_eq!(err(validate(&req(0, 0, 0, over), &simple)), NBD_EINVAL);
        assert!(validate(&req(0, 0, 0, MAX_PAYLOAD_BYTES), &simple).is_ok());
    }

    #[test]
    fn descriptors_are_clipped_merged_and_capped() {
        let d = |e: &[(u64, u32)], len, one| {
            block_status_descriptors(e, len, one, BASE_ALLOCATION_FLAGS)
        };
        assert_eq!(
            d(&[(100, 3), (0, 0), (50, 3), (1000, 0)], 300, false),
            vec![(150, 3), (150, 0)]
        );
        assert_eq!(d(&[(100, 3), (100, 0)], 300, true), vec![(100, 3)]);
        assert_eq!(d(&[(1 << 40, 0xff)], 10, false), vec![(10, 3)]);
        assert_eq!(d(&[], 10, false), vec![(10, 0)]);
        assert_eq!(d(&[(0, 1)], 10, true), vec![(10, 0)]);
        let many: Vec<(u64, u32)> = (0..200_000).map(|i| (1, i % 2)).collect();
        assert_eq!(d(&many, u32::MAX, false).len(), MAX_BLOCK_STATUS_EXTENTS);
    }

    #[test]
    fn dirty_bitmap_descriptors_mask_other_bits_and_default_to_dirty() {
        let d = |e: &[(u64, u32)], len| block_status_descriptors(e, len, false, DIRTY_BITMAP_FLAGS);
        assert_eq!(
            d(&[(100, 3), (50, 1), (50, 2)], 300),
            vec![(150, 1), (50, 0)]
        );
        // Nothing known: the whole range is reported dirty, never clean.
        assert_eq!(d(&[], 300), vec![(300, NBD_STATE_DIRTY)]);
    }
}
