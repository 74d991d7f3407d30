//! On-disk structures and their codecs. docs/FORMAT.md is the prose version.
//!
//! Every decoder is bounds-checked and returns an error, never panics: these
//! bytes come from disks that may be corrupt or hostile.

pub mod csum;
pub mod log;
pub mod progress;

use crate::format::csum::{CsumType, CSUM_MAX_BYTES};

/// Sector: the unit of checksumming and of volume allocation.
pub const SECTOR_BYTES: u64 = 4096;
/// Default tree node size.
pub const DEFAULT_NODE_BYTES: u32 = 16 * 1024;
/// Size of one superblock copy.
pub const SUPER_BYTES: usize = 4096;
/// Superblock copies, at these physical offsets where the device is big enough.
pub const SUPER_OFFSETS: [u64; 3] = [64 << 10, 64 << 20, 256 << 30];
/// Bytes kept free around each superblock copy (the first 1 MiB is all reserved).
pub const SUPER_RESERVED_BYTES: u64 = 1 << 20;
/// Magic at byte 32 of every superblock.
pub const SUPER_MAGIC: [u8; 8] = *b"CHNKVOL1";
/// Largest bootstrap system-chunk array in a superblock.
pub const SYS_ARRAY_MAX_BYTES: usize = 2048;
/// Header bytes at the start of every tree node.
pub const NODE_HEADER_BYTES: usize = 80;
/// Label bytes in the superblock.
pub const LABEL_MAX_BYTES: usize = 255;
/// Longest volume name.
pub const VOLUME_NAME_MAX_BYTES: usize = 200;

/// Tree ids (the `owner` of a tree block).
pub mod tree_id {
    pub const EXTENT: u64 = 2;
    pub const CHUNK: u64 = 3;
    pub const DEV: u64 = 4;
    pub const VOLUME: u64 = 5;
    pub const CSUM: u64 = 7;
    /// The fixed trees, in superblock order. Each volume also has a tree of
    /// its own, whose id is the volume id (see [`is_volume`]).
    pub const ALL: [u64; 5] = [CHUNK, DEV, EXTENT, CSUM, VOLUME];
    /// Whether `id` names a volume's own mapping tree (ids of volumes start
    /// at [`super::objectid::FIRST_VOLUME`], above every fixed tree).
    pub fn is_volume(id: u64) -> bool {
        id >= super::objectid::FIRST_VOLUME
    }
    /// Human name of a tree.
    pub fn name(id: u64) -> &'static str {
        match id {
            EXTENT => "extent",
            CHUNK => "chunk",
            DEV => "dev",
            VOLUME => "volume",
            CSUM => "csum",
            id if is_volume(id) => "mapping",
            _ => "unknown",
        }
    }
}

/// Item types: the middle member of a key.
pub mod item {
    pub const VOLUME_ITEM: u8 = 1;
    pub const VOLUME_EXTENT: u8 = 108;
    pub const CSUM: u8 = 128;
    /// In the volume tree: where a volume's mapping tree's root is.
    pub const ROOT_ITEM: u8 = 132;
    /// In the volume tree, `(1, DEAD_ROOT, id)`: volume `id` was deleted
    /// and its tree is being dropped in the background.
    pub const DEAD_ROOT: u8 = 133;
    pub const EXTENT: u8 = 168;
    pub const METADATA: u8 = 169;
    pub const BLOCK_GROUP: u8 = 192;
    pub const DEV_EXTENT: u8 = 204;
    pub const DEV_ITEM: u8 = 216;
    pub const CHUNK: u8 = 228;
    pub const DEV_STATS: u8 = 249;
    pub const SCRUB_STATE: u8 = 250;
    pub const SCRUB_ERROR: u8 = 251;
    pub const BALANCE_STATE: u8 = 252;
    pub const BALANCE_PENDING: u8 = 253;
    pub const REPLACE_STATE: u8 = 254;

    /// The type's name, as `dump-tree` and error messages print keys.
    pub fn name(ty: u8) -> Option<&'static str> {
        Some(match ty {
            VOLUME_ITEM => "VOLUME_ITEM",
            VOLUME_EXTENT => "VOLUME_EXTENT",
            CSUM => "CSUM",
            ROOT_ITEM => "ROOT_ITEM",
            DEAD_ROOT => "DEAD_ROOT",
            EXTENT => "EXTENT",
            METADATA => "METADATA",
            BLOCK_GROUP => "BLOCK_GROUP",
            DEV_EXTENT => "DEV_EXTENT",
            DEV_ITEM => "DEV_ITEM",
            CHUNK => "CHUNK",
            DEV_STATS => "DEV_STATS",
            SCRUB_STATE => "SCRUB_STATE",
            SCRUB_ERROR => "SCRUB_ERROR",
            BALANCE_STATE => "BALANCE_STATE",
            BALANCE_PENDING => "BALANCE_PENDING",
            REPLACE_STATE => "REPLACE_STATE",
            _ => return None,
        })
    }
}

/// Well-known object ids.
pub mod objectid {
    pub const DEV_ITEMS: u64 = 1;
    pub const VOLUMES: u64 = 1;
    pub const FIRST_CHUNK: u64 = 256;
    pub const FIRST_VOLUME: u64 = 256;
    /// The objectid of every mapping item in a volume's tree: the same in
    /// every tree, so that a key means the same LBA in a volume and in a
    /// tree that shares its blocks.
    pub const MAPPING: u64 = 256;
    pub const DEV_STATS: u64 = 0;
    pub const SCRUB: u64 = 2;
    pub const BALANCE: u64 = 3;
    pub const REPLACE: u64 = 4;
    pub const CSUM: u64 = u64::MAX - 9;
}

/// Block group type bits.
pub mod bg_type {
    pub const DATA: u64 = 1;
    pub const SYSTEM: u64 = 2;
    pub const METADATA: u64 = 4;
    /// Name for JSON output.
    pub fn name(t: u64) -> &'static str {
        match t {
            DATA => "data",
            SYSTEM => "system",
            METADATA => "metadata",
            _ => "unknown",
        }
    }
}

/// Why a decode failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

/// Bounds-checked little-endian reader.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError(format!(
                "truncated: need {n} bytes at offset {}, have {}",
                self.pos,
                self.remaining()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    pub fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.bytes(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.bytes(2)?.try_into().unwrap()))
    }
    pub fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().unwrap()))
    }
    pub fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.bytes(8)?.try_into().unwrap()))
    }
    pub fn uuid(&mut self) -> Result<[u8; 16], DecodeError> {
        Ok(self.bytes(16)?.try_into().unwrap())
    }
    pub fn key(&mut self) -> Result<Key, DecodeError> {
        Ok(Key {
            objectid: self.u64()?,
            ty: self.u8()?,
            offset: self.u64()?,
        })
    }
}

/// Little-endian writer helpers on a Vec.
pub trait Put {
    fn put_u8(&mut self, v: u8);
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
    fn put_key(&mut self, k: &Key);
}

impl Put for Vec<u8> {
    fn put_u8(&mut self, v: u8) {
        self.push(v)
    }
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_le_bytes())
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_le_bytes())
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_le_bytes())
    }
    fn put_key(&mut self, k: &Key) {
        self.put_u64(k.objectid);
        self.put_u8(k.ty);
        self.put_u64(k.offset);
    }
}

/// A B-tree key: (objectid, type, offset), ordered in that order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Key {
    pub objectid: u64,
    pub ty: u8,
    pub offset: u64,
}

impl Key {
    pub const BYTES: usize = 17;
    pub const MIN: Key = Key {
        objectid: 0,
        ty: 0,
        offset: 0,
    };
    pub const MAX: Key = Key {
        objectid: u64::MAX,
        ty: u8::MAX,
        offset: u64::MAX,
    };
    pub const fn new(objectid: u64, ty: u8, offset: u64) -> Key {
        Key {
            objectid,
            ty,
            offset,
        }
    }
}

impl std::fmt::Display for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match item::name(self.ty) {
            Some(n) => write!(f, "({} {n} {})", self.objectid, self.offset),
            None => write!(f, "({} type {} {})", self.objectid, self.ty, self.offset),
        }
    }
}

/// Key of the mapping item for LBA `lba_bytes` in a volume's tree.
pub const fn mapping_key(lba_bytes: u64) -> Key {
    Key::new(objectid::MAPPING, item::VOLUME_EXTENT, lba_bytes)
}

/// Key of a volume's ROOT_ITEM in the volume tree.
pub const fn root_item_key(volume_id: u64) -> Key {
    Key::new(volume_id, item::ROOT_ITEM, 0)
}

/// Superblock `incompat_flags` bit: each volume's mappings live in a tree
/// of its own, found through a ROOT_ITEM (format 2). Without it (format 1)
/// the mappings are `(volume id, VOLUME_EXTENT, lba)` items in the volume
/// tree, and the first open moves them.
pub const INCOMPAT_VOLUME_TREES: u64 = 1;
/// Every incompat bit this build understands.
pub const INCOMPAT_KNOWN: u64 = INCOMPAT_VOLUME_TREES;

/// Tree heights no writer reaches (a 4 KiB node holds over 100 children):
/// a root claiming one is corrupt.
pub const MAX_TREE_LEVELS: u8 = 16;

/// Where a tree's root lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RootPtr {
    pub addr: u64,
    pub gen: u64,
    pub level: u8,
}

/// ROOT_ITEM value: where a volume's tree is, and since when its blocks
/// may be shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RootItem {
    pub root: RootPtr,
    /// Generation of the last snapshot taken of this tree, or that made it
    /// (0: never). A block written after it is this tree's alone, so a
    /// change copies it without looking up its reference count.
    pub last_snapshot_gen: u64,
}

impl RootItem {
    /// addr u64, gen u64, level u8, last_snapshot_gen u64.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(25);
        v.put_u64(self.root.addr);
        v.put_u64(self.root.gen);
        v.put_u8(self.root.level);
        v.put_u64(self.last_snapshot_gen);
        v
    }
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let root = RootPtr {
            addr: r.u64()?,
            gen: r.u64()?,
            level: r.u8()?,
        };
        if root.addr == 0 || root.level >= MAX_TREE_LEVELS {
            return Err(DecodeError(format!(
                "root at {:#x} level {} is out of range",
                root.addr, root.level
            )));
        }
        // The first per-volume-tree builds wrote no snapshot generation.
        let last_snapshot_gen = if r.remaining() == 0 { 0 } else { r.u64()? };
        Ok(RootItem {
            root,
            last_snapshot_gen,
        })
    }
}

/// Redundancy profile of a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Profile {
    Single = 0,
    Dup = 1,
    Raid1 = 2,
    Raid1c3 = 3,
    Raid10 = 4,
}

impl Profile {
    pub fn from_u8(v: u8) -> Option<Profile> {
        Some(match v {
            0 => Profile::Single,
            1 => Profile::Dup,
            2 => Profile::Raid1,
            3 => Profile::Raid1c3,
            4 => Profile::Raid10,
            _ => return None,
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            Profile::Single => "single",
            Profile::Dup => "dup",
            Profile::Raid1 => "raid1",
            Profile::Raid1c3 => "raid1c3",
            Profile::Raid10 => "raid10",
        }
    }
    pub fn parse(s: &str) -> Result<Profile, String> {
        Ok(match s {
            "single" => Profile::Single,
            "dup" => Profile::Dup,
            "raid1" => Profile::Raid1,
            "raid1c3" => Profile::Raid1c3,
            "raid10" => Profile::Raid10,
            _ => {
                return Err(format!(
                    "unknown profile '{s}' (single, dup, raid1, raid1c3, raid10)"
                ))
            }
        })
    }
    /// Copies of every byte.
    pub fn copies(self) -> usize {
        match self {
            Profile::Single => 1,
            Profile::Dup | Profile::Raid1 | Profile::Raid10 => 2,
            Profile::Raid1c3 => 3,
        }
    }
    /// Fewest distinct devices the profile needs.
    pub fn min_devices(self) -> usize {
        match self {
            Profile::Single | Profile::Dup => 1,
            Profile::Raid1 => 2,
            Profile::Raid1c3 => 3,
            Profile::Raid10 => 4,
        }
    }
}

/// One stripe of a chunk: a physical range on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stripe {
    pub devid: u64,
    pub physical: u64,
}

/// CHUNK_ITEM: a logical range and where its bytes live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkItem {
    pub logical: u64,
    pub length: u64,
    pub bg_type: u64,
    pub profile: Profile,
    /// Bytes of each stripe on its device.
    pub stripe_bytes: u64,
    /// raid10 interleave unit.
    pub stripe_unit_bytes: u64,
    pub stripes: Vec<Stripe>,
}

/// raid10 interleave unit.
pub const RAID10_STRIPE_UNIT_BYTES: u64 = 64 << 10;

impl ChunkItem {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(48 + self.stripes.len() * 16);
        v.put_u64(self.length);
        v.put_u64(self.bg_type);
        v.put_u8(self.profile as u8);
        v.put_u64(self.stripe_bytes);
        v.put_u64(self.stripe_unit_bytes);
        v.put_u16(self.stripes.len() as u16);
        for s in &self.stripes {
            v.put_u64(s.devid);
            v.put_u64(s.physical);
        }
        v
    }
    pub fn decode(logical: u64, buf: &[u8]) -> Result<ChunkItem, DecodeError> {
        let mut r = Reader::new(buf);
        let length = r.u64()?;
        let bg_type = r.u64()?;
        let p = r.u8()?;
        let profile =
            Profile::from_u8(p).ok_or_else(|| DecodeError(format!("unknown profile {p}")))?;
        let stripe_bytes = r.u64()?;
        let stripe_unit_bytes = r.u64()?;
        let n = r.u16()? as usize;
        if n == 0 || n > 64 {
            return Err(DecodeError(format!("bad stripe count {n}")));
        }
        let mut stripes = Vec::with_capacity(n);
        for _ in 0..n {
            stripes.push(Stripe {
                devid: r.u64()?,
                physical: r.u64()?,
            });
        }
        let c = ChunkItem {
            logical,
            length,
            bg_type,
            profile,
            stripe_bytes,
            stripe_unit_bytes,
            stripes,
        };
        c.validate()?;
        Ok(c)
    }
    /// Structural sanity, so that mapping arithmetic can never overflow or divide by zero.
    pub fn validate(&self) -> Result<(), DecodeError> {
        let n = self.stripes.len() as u64;
        let ok_type = matches!(
            self.bg_type,
            bg_type::DATA | bg_type::METADATA | bg_type::SYSTEM
        );
        let expect_len = match self.profile {
            Profile::Raid10 => {
                if n < 4 || !n.is_multiple_of(2) || self.stripe_unit_bytes == 0 {
                    return Err(DecodeError("bad raid10 geometry".into()));
                }
                if !self.stripe_bytes.is_multiple_of(self.stripe_unit_bytes) {
                    return Err(DecodeError("raid10 stripe not a multiple of unit".into()));
                }
                self.stripe_bytes.checked_mul(n / 2)
            }
            p => {
                if n != p.copies() as u64 {
                    return Err(DecodeError(format!("{} chunk with {n} stripes", p.name())));
                }
                Some(self.stripe_bytes)
            }
        };
        if !ok_type
            || self.length == 0
            || expect_len != Some(self.length)
            || !self.length.is_multiple_of(SECTOR_BYTES)
            || !self.logical.is_multiple_of(SECTOR_BYTES)
            || self.logical.checked_add(self.length).is_none()
        {
            return Err(DecodeError(format!(
                "inconsistent chunk at {:#x}",
                self.logical
            )));
        }
        for s in &self.stripes {
            if s.physical.checked_add(self.stripe_bytes).is_none() {
                return Err(DecodeError("stripe overflows".into()));
            }
        }
        Ok(())
    }
}

/// DEV_ITEM in the chunk tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevItem {
    pub devid: u64,
    pub total_bytes: u64,
    pub uuid: [u8; 16],
}

impl DevItem {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u64(self.devid);
        v.put_u64(self.total_bytes);
        v.extend_from_slice(&self.uuid);
        v
    }
    pub fn decode(buf: &[u8]) -> Result<DevItem, DecodeError> {
        let mut r = Reader::new(buf);
        Ok(DevItem {
            devid: r.u64()?,
            total_bytes: r.u64()?,
            uuid: r.uuid()?,
        })
    }
}

/// DEV_EXTENT value: which chunk owns this physical range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevExtent {
    pub chunk_logical: u64,
    pub length: u64,
}

impl DevExtent {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u64(self.chunk_logical);
        v.put_u64(self.length);
        v
    }
    pub fn decode(buf: &[u8]) -> Result<DevExtent, DecodeError> {
        let mut r = Reader::new(buf);
        Ok(DevExtent {
            chunk_logical: r.u64()?,
            length: r.u64()?,
        })
    }
}

/// BLOCK_GROUP item value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockGroupItem {
    pub used: u64,
    pub bg_type: u64,
}

impl BlockGroupItem {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u64(self.used);
        v.put_u64(self.bg_type);
        v
    }
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        Ok(BlockGroupItem {
            used: r.u64()?,
            bg_type: r.u64()?,
        })
    }
}

/// A (volume, LBA) that references a data extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BackRef {
    pub volume_id: u64,
    pub lba_bytes: u64,
}

/// EXTENT item value for data: refcount and back references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtentItem {
    pub refs: u64,
    pub gen: u64,
    pub backrefs: Vec<BackRef>,
}

impl ExtentItem {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u64(self.refs);
        v.put_u64(self.gen);
        v.put_u32(self.backrefs.len() as u32);
        for b in &self.backrefs {
            v.put_u64(b.volume_id);
            v.put_u64(b.lba_bytes);
        }
        v
    }
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let refs = r.u64()?;
        let gen = r.u64()?;
        let n = r.u32()? as usize;
        if n > r.remaining() / 16 {
            return Err(DecodeError(format!("extent item claims {n} backrefs")));
        }
        let mut backrefs = Vec::with_capacity(n);
        for _ in 0..n {
            backrefs.push(BackRef {
                volume_id: r.u64()?,
                lba_bytes: r.u64()?,
            });
        }
        Ok(ExtentItem {
            refs,
            gen,
            backrefs,
        })
    }
}

/// METADATA item value: a tree block's owner and generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataItem {
    pub gen: u64,
    pub owner: u64,
    /// Tree blocks (parents, or ROOT_ITEMs for a root) that point at this
    /// block: more than 1 once a snapshot shares it.
    pub refs: u64,
}

impl MetadataItem {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u64(self.gen);
        v.put_u64(self.owner);
        v.put_u64(self.refs);
        v
    }
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let (gen, owner) = (r.u64()?, r.u64()?);
        // Items written before snapshots have no count: one reference.
        let refs = if r.remaining() == 0 { 1 } else { r.u64()? };
        if refs == 0 {
            return Err(DecodeError("tree block with 0 references".into()));
        }
        Ok(MetadataItem { gen, owner, refs })
    }
}

/// VOLUME_ITEM flag: writes, discards and resizes are refused.
pub const VOLUME_FLAG_READ_ONLY: u64 = 1;
const VOLUME_FLAGS_KNOWN: u64 = VOLUME_FLAG_READ_ONLY;

/// VOLUME_ITEM value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeItem {
    pub size_bytes: u64,
    pub name: String,
    /// `VOLUME_FLAG_*`; absent (0) in items written before flags existed.
    pub flags: u64,
}

impl VolumeItem {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u64(self.size_bytes);
        v.put_u16(self.name.len() as u16);
        v.extend_from_slice(self.name.as_bytes());
        v.put_u64(self.flags);
        v
    }
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let size_bytes = r.u64()?;
        let n = r.u16()? as usize;
        let name = String::from_utf8(r.bytes(n)?.to_vec())
            .map_err(|_| DecodeError("volume name is not UTF-8".into()))?;
        let flags = if r.remaining() > 0 { r.u64()? } else { 0 };
        if flags & !VOLUME_FLAGS_KNOWN != 0 {
            return Err(DecodeError(format!(
                "volume {name}: unknown flags {flags:#x}"
            )));
        }
        Ok(VolumeItem {
            size_bytes,
            name,
            flags,
        })
    }
    pub fn read_only(&self) -> bool {
        self.flags & VOLUME_FLAG_READ_ONLY != 0
    }
}

/// VOLUME_EXTENT value: LBA range [key.offset, +len) lives at logical [logical, +len).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeExtent {
    pub logical: u64,
    pub len: u64,
    pub gen: u64,
}

impl VolumeExtent {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(24);
        v.put_u64(self.logical);
        v.put_u64(self.len);
        v.put_u64(self.gen);
        v
    }
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        let v = VolumeExtent {
            logical: r.u64()?,
            len: r.u64()?,
            gen: r.u64()?,
        };
        // Lengths feed offset arithmetic: reject what no writer produces.
        if v.len == 0
            || !v.len.is_multiple_of(SECTOR_BYTES)
            || v.len > 1 << 30
            || v.logical.checked_add(v.len).is_none()
        {
            return Err(DecodeError(format!(
                "volume extent of {} bytes at logical {:#x} is out of range",
                v.len, v.logical
            )));
        }
        Ok(v)
    }
}

/// Device error counters, persisted per device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct DevStats {
    pub read_errs: u64,
    pub write_errs: u64,
    pub flush_errs: u64,
    pub corruption_errs: u64,
    pub generation_errs: u64,
}

impl DevStats {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        for x in [
            self.read_errs,
            self.write_errs,
            self.flush_errs,
            self.corruption_errs,
            self.generation_errs,
        ] {
            v.put_u64(x);
        }
        v
    }
    pub fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(buf);
        Ok(DevStats {
            read_errs: r.u64()?,
            write_errs: r.u64()?,
            flush_errs: r.u64()?,
            corruption_errs: r.u64()?,
            generation_errs: r.u64()?,
        })
    }
}

/// The superblock, one copy per [`SUPER_OFFSETS`] entry on every device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub pool_uuid: [u8; 16],
    pub dev_uuid: [u8; 16],
    pub devid: u64,
    pub generation: u64,
    pub csum_type: CsumType,
    pub sector_bytes: u32,
    pub node_bytes: u32,
    pub num_devices: u64,
    pub data_profile: Profile,
    pub metadata_profile: Profile,
    pub next_volume_id: u64,
    /// Roots in [`tree_id::ALL`] order.
    pub roots: [RootPtr; 5],
    pub label: String,
    /// Encoded CHUNK items of the SYSTEM chunks: (logical u64, len u32, item).
    pub sys_chunk_array: Vec<u8>,
    /// `INCOMPAT_*` bits: format features a build must know to open the
    /// pool. Zero (the padding) in superblocks written before the field.
    pub incompat_flags: u64,
}

impl Superblock {
    /// Encode to exactly [`SUPER_BYTES`], checksum included.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = vec![0u8; CSUM_MAX_BYTES];
        v.extend_from_slice(&SUPER_MAGIC);
        v.extend_from_slice(&self.pool_uuid);
        v.extend_from_slice(&self.dev_uuid);
        v.put_u64(self.devid);
        v.put_u64(self.generation);
        v.put_u8(self.csum_type as u8);
        v.put_u32(self.sector_bytes);
        v.put_u32(self.node_bytes);
        v.put_u64(self.num_devices);
        v.put_u8(self.data_profile as u8);
        v.put_u8(self.metadata_profile as u8);
        v.put_u64(self.next_volume_id);
        for r in &self.roots {
            v.put_u64(r.addr);
            v.put_u64(r.gen);
            v.put_u8(r.level);
        }
        let label = self.label.as_bytes();
        let label = &label[..label.len().min(LABEL_MAX_BYTES)];
        v.put_u16(label.len() as u16);
        v.extend_from_slice(label);
        v.put_u32(self.sys_chunk_array.len() as u32);
        v.extend_from_slice(&self.sys_chunk_array);
        v.put_u64(self.incompat_flags);
        assert!(v.len() <= SUPER_BYTES, "superblock overflow");
        v.resize(SUPER_BYTES, 0);
        let sum = self.csum_type.compute(&v[CSUM_MAX_BYTES..]);
        v[..CSUM_MAX_BYTES].copy_from_slice(&sum);
        v
    }

    /// Decode and verify one copy.
    pub fn decode(buf: &[u8]) -> Result<Superblock, DecodeError> {
        if buf.len() < SUPER_BYTES {
            return Err(DecodeError("superblock truncated".into()));
        }
        let buf = &buf[..SUPER_BYTES];
        let mut r = Reader::new(buf);
        let stored = r.bytes(CSUM_MAX_BYTES)?;
        if r.bytes(8)? != SUPER_MAGIC {
            return Err(DecodeError("no chunkvol magic".into()));
        }
        let pool_uuid = r.uuid()?;
        let dev_uuid = r.uuid()?;
        let devid = r.u64()?;
        let generation = r.u64()?;
        let ct = r.u8()?;
        let csum_type =
            CsumType::from_u8(ct).ok_or_else(|| DecodeError(format!("unknown csum type {ct}")))?;
        if csum_type.compute(&buf[CSUM_MAX_BYTES..])[..] != stored[..] {
            return Err(DecodeError("checksum mismatch".into()));
        }
        let sector_bytes = r.u32()?;
        let node_bytes = r.u32()?;
        if sector_bytes as u64 != SECTOR_BYTES {
            return Err(DecodeError(format!(
                "unsupported sector size {sector_bytes}"
            )));
        }
        if !(4096..=65536).contains(&node_bytes) || !node_bytes.is_power_of_two() {
            return Err(DecodeError(format!("unsupported node size {node_bytes}")));
        }
        let num_devices = r.u64()?;
        let dp = r.u8()?;
        let mp = r.u8()?;
        let data_profile =
            Profile::from_u8(dp).ok_or_else(|| DecodeError(format!("bad data profile {dp}")))?;
        let metadata_profile = Profile::from_u8(mp)
            .ok_or_else(|| DecodeError(format!("bad metadata profile {mp}")))?;
        let next_volume_id = r.u64()?;
        let mut roots = [RootPtr::default(); 5];
        for root in roots.iter_mut() {
            *root = RootPtr {
                addr: r.u64()?,
                gen: r.u64()?,
                level: r.u8()?,
            };
        }
        let ln = r.u16()? as usize;
        if ln > LABEL_MAX_BYTES {
            return Err(DecodeError("label too long".into()));
        }
        let label = String::from_utf8_lossy(r.bytes(ln)?).into_owned();
        let sn = r.u32()? as usize;
        if sn > SYS_ARRAY_MAX_BYTES {
            return Err(DecodeError("system chunk array too long".into()));
        }
        let sys_chunk_array = r.bytes(sn)?.to_vec();
        let incompat_flags = r.u64()?;
        let unknown = incompat_flags & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(DecodeError(format!(
                "unknown incompat flags {unknown:#x}: the pool was written by a newer chunkvol"
            )));
        }
        Ok(Superblock {
            pool_uuid,
            dev_uuid,
            devid,
            generation,
            csum_type,
            sector_bytes,
            node_bytes,
            num_devices,
            data_profile,
            metadata_profile,
            next_volume_id,
            roots,
            label,
            sys_chunk_array,
            incompat_flags,
        })
    }

    /// Decode the bootstrap SYSTEM chunks.
    pub fn sys_chunks(&self) -> Result<Vec<ChunkItem>, DecodeError> {
        let mut r = Reader::new(&self.sys_chunk_array);
        let mut out = Vec::new();
        while r.remaining() > 0 {
            let logical = r.u64()?;
            let n = r.u32()? as usize;
            out.push(ChunkItem::decode(logical, r.bytes(n)?)?);
        }
        Ok(out)
    }

    /// Encode SYSTEM chunks into the bootstrap array.
    pub fn encode_sys_chunks(chunks: &[ChunkItem]) -> Vec<u8> {
        let mut v = Vec::new();
        for c in chunks {
            let e = c.encode();
            v.put_u64(c.logical);
            v.put_u32(e.len() as u32);
            v.extend_from_slice(&e);
        }
        v
    }
}

/// A fresh random (version 4) UUID.
pub fn new_uuid() -> [u8; 16] {
    uuid::Uuid::new_v4().into_bytes()
}

/// Format a uuid the usual way.
pub fn uuid_string(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {

    #[test]
    fn new_uuids_are_version_4() {
        let (a, b) = (new_uuid(), new_uuid());
        assert_ne!(a, b);
        for u in [a, b] {
            assert_eq!(u[6] >> 4, 4, "version 4");
            assert_eq!(u[8] & 0xc0, 0x80, "RFC 4122 variant");
        }
    }
    use super::*;

    fn sample_super() -> Superblock {
        Superblock {
            pool_uuid: [1; 16],
            dev_uuid: [2; 16],
            devid: 1,
            generation: 7,
            csum_type: CsumType::Crc32c,
            sector_bytes: 4096,
            node_bytes: 16384,
            num_devices: 2,
            data_profile: Profile::Raid1,
            metadata_profile: Profile::Raid1,
            next_volume_id: 256,
            roots: [RootPtr {
                addr: 1 << 20,
                gen: 7,
                level: 0,
            }; 5],
            label: "x".into(),
            incompat_flags: INCOMPAT_VOLUME_TREES,
            sys_chunk_array: Superblock::encode_sys_chunks(&[ChunkItem {
                logical: 1 << 20,
                length: 8 << 20,
                bg_type: bg_type::SYSTEM,
                profile: Profile::Raid1,
                stripe_bytes: 8 << 20,
                stripe_unit_bytes: 0,
                stripes: vec![
                    Stripe {
                        devid: 1,
                        physical: 1 << 20,
                    },
                    Stripe {
                        devid: 2,
                        physical: 1 << 20,
                    },
                ],
            }]),
        }
    }

    #[test]
    fn superblock_roundtrip_and_corruption() {
        let sb = sample_super();
        let enc = sb.encode();
        assert_eq!(enc.len(), SUPER_BYTES);
        let dec = Superblock::decode(&enc).unwrap();
        assert_eq!(dec, sb);
        assert_eq!(dec.sys_chunks().unwrap().len(), 1);
        for i in [0usize, 40, 100, 300, 4000] {
            let mut bad = enc.clone();
            bad[i] ^= 0x10;
            assert!(Superblock::decode(&bad).is_err(), "flip at {i}");
        }
        assert!(Superblock::decode(&enc[..100]).is_err());
    }

    #[test]
    fn unknown_incompat_flags_are_refused() {
        let mut sb = sample_super();
        sb.incompat_flags |= 1 << 40;
        let e = Superblock::decode(&sb.encode()).unwrap_err();
        assert!(e.0.contains("newer chunkvol"), "{e:?}");
    }

    #[test]
    fn root_item_roundtrip_and_bounds() {
        let p = RootItem {
            root: RootPtr {
                addr: 1 << 30,
                gen: 9,
                level: 3,
            },
            last_snapshot_gen: 7,
        };
        assert_eq!(RootItem::decode(&p.encode()).unwrap(), p);
        let short = RootItem::decode(&p.encode()[..17]).unwrap();
        assert_eq!(short.last_snapshot_gen, 0);
        let mut bad = p;
        bad.root.level = 40;
        assert!(RootItem::decode(&bad.encode()).is_err());
        bad.root = RootPtr { addr: 0, ..p.root };
        assert!(RootItem::decode(&bad.encode()).is_err());
        assert!(RootItem::decode(&p.encode()[..10]).is_err());
    }

    #[test]
    fn metadata_item_refs_default_to_one() {
        let m = MetadataItem {
            gen: 3,
            owner: 256,
            refs: 4,
        };
        assert_eq!(MetadataItem::decode(&m.encode()).unwrap(), m);
        assert_eq!(MetadataItem::decode(&m.encode()[..16]).unwrap().refs, 1);
        let zero = MetadataItem { refs: 0, ..m };
        assert!(MetadataItem::decode(&zero.encode()).is_err());
    }

    #[test]
    fn key_order() {
        assert!(Key::new(1, 2, 3) < Key::new(1, 3, 0));
        assert!(Key::new(1, 255, u64::MAX) < Key::new(2, 0, 0));
    }
}
