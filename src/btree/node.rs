//! Tree nodes: the in-memory form and the on-disk codec.
//!
//! On disk a node is `node_bytes` long: an 80-byte header (checksum, pool uuid,
//! logical address, generation, owner tree, level, item count) then either
//! leaf items (key, value length, value) or child pointers (key, address,
//! generation).

use crate::format::csum::{CsumType, CSUM_MAX_BYTES};
use crate::format::{DecodeError, Key, Put, Reader, NODE_HEADER_BYTES};
use crate::util::sync::Arc;

/// A pointer from an internal node to a child.
#[derive(Debug, Clone)]
pub struct Child {
    /// First key of the child.
    pub key: Key,
    pub addr: u64,
    pub gen: u64,
    /// Present for children changed in the running transaction (they are not
    /// on disk yet); absent for clean children, which load through the cache.
    pub node: Option<Arc<Node>>,
}

/// A leaf item's value. Shared, so that copying a node on its first change
/// in a transaction (and reading items out) does not copy every value.
pub type Value = std::sync::Arc<[u8]>;

/// Node content.
#[derive(Debug, Clone)]
pub enum Body {
    Leaf(Vec<(Key, Value)>),
    Internal(Vec<Child>),
}

/// One tree block.
#[derive(Debug, Clone)]
pub struct Node {
    pub addr: u64,
    pub gen: u64,
    pub owner: u64,
    pub level: u8,
    pub body: Body,
}

/// Bytes per leaf item besides its value.
pub const LEAF_ITEM_OVERHEAD: usize = Key::BYTES + 4;
/// Bytes per child pointer.
pub const CHILD_BYTES: usize = Key::BYTES + 16;

impl Node {
    pub fn new_leaf(addr: u64, gen: u64, owner: u64) -> Node {
        Node {
            addr,
            gen,
            owner,
            level: 0,
            body: Body::Leaf(Vec::new()),
        }
    }
    pub fn is_leaf(&self) -> bool {
        matches!(self.body, Body::Leaf(_))
    }
    pub fn len(&self) -> usize {
        match &self.body {
            Body::Leaf(v) => v.len(),
            Body::Internal(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn first_key(&self) -> Option<Key> {
        match &self.body {
            Body::Leaf(v) => v.first().map(|i| i.0),
            Body::Internal(v) => v.first().map(|c| c.key),
        }
    }
    /// Payload bytes after the header.
    pub fn body_bytes(&self) -> usize {
        match &self.body {
            Body::Leaf(v) => v.iter().map(|(_, d)| LEAF_ITEM_OVERHEAD + d.len()).sum(),
            Body::Internal(v) => v.len() * CHILD_BYTES,
        }
    }
    /// Whether the payload is under `bytes`; a leaf's items are summed only
    /// until the answer is known (a delete asks this of every leaf it
    /// touches, and a leaf holds hundreds of items).
    pub fn body_bytes_below(&self, bytes: usize) -> bool {
        match &self.body {
            Body::Leaf(v) => {
                let mut sum = 0;
                v.iter().all(|(_, d)| {
                    sum += LEAF_ITEM_OVERHEAD + d.len();
                    sum < bytes
                })
            }
            Body::Internal(v) => v.len() * CHILD_BYTES < bytes,
        }
    }
    pub fn leaf_items(&self) -> &[(Key, Value)] {
        match &self.body {
            Body::Leaf(v) => v,
            Body::Internal(_) => &[],
        }
    }
    pub fn children(&self) -> &[Child] {
        match &self.body {
            Body::Internal(v) => v,
            Body::Leaf(_) => &[],
        }
    }

    /// Serialise to exactly `node_bytes`, with the checksum filled in.
    pub fn encode(&self, pool_uuid: &[u8; 16], node_bytes: usize, csum: CsumType) -> Vec<u8> {
        let mut v = Vec::with_capacity(node_bytes);
        v.resize(CSUM_MAX_BYTES, 0);
        v.extend_from_slice(pool_uuid);
        v.put_u64(self.addr);
        v.put_u64(self.gen);
        v.put_u64(self.owner);
        v.put_u8(self.level);
        v.put_u32(self.len() as u32);
        v.resize(NODE_HEADER_BYTES, 0);
        match &self.body {
            Body::Leaf(items) => {
                for (k, d) in items {
                    v.put_key(k);
                    v.put_u32(d.len() as u32);
                    v.extend_from_slice(d);
                }
            }
            Body::Internal(children) => {
                for c in children {
                    v.put_key(&c.key);
                    v.put_u64(c.addr);
                    v.put_u64(c.gen);
                }
            }
        }
        assert!(v.len() <= node_bytes, "node {:#x} overflows", self.addr);
        v.resize(node_bytes, 0);
        let sum = csum.compute(&v[CSUM_MAX_BYTES..]);
        v[..CSUM_MAX_BYTES].copy_from_slice(&sum);
        v
    }

    /// Parse and verify a node read from `addr`.
    pub fn decode(
        buf: &[u8],
        addr: u64,
        pool_uuid: &[u8; 16],
        csum: CsumType,
    ) -> Result<Node, DecodeError> {
        if buf.len() < NODE_HEADER_BYTES {
            return Err(DecodeError("node truncated".into()));
        }
        let mut r = Reader::new(buf);
        let stored = r.bytes(CSUM_MAX_BYTES)?;
        if csum.compute(&buf[CSUM_MAX_BYTES..])[..] != stored[..] {
            return Err(DecodeError("checksum mismatch".into()));
        }
        if r.bytes(16)? != pool_uuid {
            return Err(DecodeError("belongs to another pool".into()));
        }
        let at = r.u64()?;
        if at != addr {
            return Err(DecodeError(format!("header says logical {at:#x}")));
        }
        let gen = r.u64()?;
        let owner = r.u64()?;
        let level = r.u8()?;
        let n = r.u32()? as usize;
        let mut r = Reader::new(&buf[NODE_HEADER_BYTES..]);
        let body = if level == 0 {
            let mut items: Vec<(Key, Value)> = Vec::with_capacity(n.min(buf.len() / 21));
            for _ in 0..n {
                let k = r.key()?;
                let len = r.u32()? as usize;
                let d: Value = r.bytes(len)?.into();
                if items.last().is_some_and(|(p, _)| *p >= k) {
                    return Err(DecodeError(format!("keys out of order at {k}")));
                }
                items.push((k, d));
            }
            Body::Leaf(items)
        } else {
            if n == 0 {
                return Err(DecodeError("empty internal node".into()));
            }
            let mut ch: Vec<Child> = Vec::with_capacity(n.min(buf.len() / CHILD_BYTES));
            for _ in 0..n {
                let key = r.key()?;
                let c = Child {
                    key,
                    addr: r.u64()?,
                    gen: r.u64()?,
                    node: None,
                };
                if ch.last().is_some_and(|p| p.key >= key) {
                    return Err(DecodeError(format!("keys out of order at {key}")));
                }
                if c.gen > gen {
                    return Err(DecodeError("child newer than parent".into()));
                }
                ch.push(c);
            }
            Body::Internal(ch)
        };
        Ok(Node {
            addr,
            gen,
            owner,
            level,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_corruption() {
        let mut n = Node::new_leaf(1 << 20, 5, 2);
        if let Body::Leaf(v) = &mut n.body {
            v.push((Key::new(1, 2, 3), vec![9; 10].into()));
            v.push((Key::new(1, 2, 4), Value::from(&[][..])));
        }
        let uuid = [7u8; 16];
        let enc = n.encode(&uuid, 4096, CsumType::Crc32c);
        let d = Node::decode(&enc, 1 << 20, &uuid, CsumType::Crc32c).unwrap();
        assert_eq!(d.leaf_items(), n.leaf_items());
        assert!(Node::decode(&enc, 2 << 20, &uuid, CsumType::Crc32c).is_err());
        assert!(Node::decode(&enc, 1 << 20, &[0; 16], CsumType::Crc32c).is_err());
        let mut bad = enc.clone();
        bad[100] ^= 1;
        assert!(Node::decode(&bad, 1 << 20, &uuid, CsumType::Crc32c).is_err());
    }
}
