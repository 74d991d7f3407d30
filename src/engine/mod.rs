//! The transaction core: the shared state of an open pool (`fs_info`), the
//! running transaction and commit (`transaction`), and the block groups with
//! their lifecycle (`block_group`). These three call each other, as btrfs's
//! extent tree and transaction code do; nothing else in the tree may form
//! an import cycle (tests/layers.rs).

pub mod block_group;
pub mod data_refs;
pub mod free_space;
pub mod fs_info;
pub mod transaction;
pub mod tree_log;
