//! Copy-on-write B-tree. One implementation serves every tree: keys are
//! (objectid, type, offset) triples and values are opaque bytes.
//!
//! Nodes are immutable once shared (`Arc`); a change copies the path from the
//! root down (path copying). A node is written to a new address the first
//! time a transaction changes it, so the committed tree (the commit root)
//! stays intact and readable while the next transaction runs. The page store
//! (allocation, loading, caching) sits behind [`NodeStore`]; this module is
//! only tree logic.

pub mod cache;
mod node;
mod tree;

pub use node::{Body, Child, Node, Value, CHILD_BYTES, LEAF_ITEM_OVERHEAD};
pub use tree::{
    delete, delete_expected, diff, drop_some, drop_tree, get, insert, last_at_or_before,
    max_item_bytes, relocate, snapshot_root, Iter, NodeLoader, NodeStore,
};

#[cfg(test)]
mod tests;
