//! chunkvol: a self-healing, multi-device, copy-on-write block storage engine.
//!
//! Layers, top to bottom (docs/ARCHITECTURE.md): [`pool`] and [`volume`]
//! (the API), [`extent`] (data extents and checksums), [`transaction`] and
//! [`btree`] (copy-on-write metadata), [`block_group`] and [`volumes`]
//! (chunk map and device extents), [`device`] (positioned I/O).

pub mod block_group;
pub mod btree;
pub mod cache;
pub mod csum;
pub mod device;
pub mod error;
pub mod extent;
pub mod fault;
pub mod format;
pub mod fs_info;
pub mod pool;
pub mod sync;
pub mod transaction;
pub mod volume;
pub mod volumes;

pub use error::{Error, Result};
pub use pool::{MkfsOptions, Pool};
pub use volume::Volume;
pub mod balance;
pub mod check;
pub mod cleaner;
pub mod cli;
pub mod control;
pub mod dev_replace;
pub mod devices;
pub mod failpoint;
pub mod nbd;
pub mod ops;
pub mod relocation;
pub mod scrub;
pub mod server;
pub mod stress;
