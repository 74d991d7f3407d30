//! chunkvol: a self-healing, multi-device, copy-on-write block storage engine.
//!
//! The source tree is the layer stack of docs/ARCHITECTURE.md, bottom to
//! top; a module imports only from its own layer or lower ones
//! (tests/layers.rs enforces it):
//!
//! 1. [`util`]: errors, locks, failpoints, sizes.
//! 2. [`format`]: on-disk codecs and checksums.
//! 3. [`device`]: positioned I/O (and the fault-injecting test device).
//! 4. [`btree`]: the copy-on-write B-tree and the node cache.
//! 5. [`chunk`]: chunk map, device extents, chunk allocation.
//! 6. [`engine`]: the transaction core: shared state, transactions and
//!    commit, block groups and their lifecycle.
//! 7. [`data`]: data extents and volumes.
//! 8. [`jobs`]: cleaner policy, relocation, balance, devices, replace, scrub.
//! 9. [`pool`]: the front door (mkfs, open, volumes, usage) and `check`.
//! 10. [`service`] and [`stress`]: pool commands, control socket, server;
//!     the stress harness.
//! 11. [`cli`]: the command line.
//!
//! [`nbd`] is the NBD protocol and server; it imports nothing of the engine.

// Functions stay under 100 lines and 6 parameters (clippy.toml).
#![warn(clippy::too_many_lines, clippy::too_many_arguments)]

pub mod btree;
pub mod chunk;
pub mod cli;
pub mod data;
pub mod device;
pub mod engine;
pub mod format;
pub mod jobs;
pub mod nbd;
pub mod pool;
pub mod service;
pub mod stress;
pub mod util;

pub use data::volume::Volume;
pub use pool::{MkfsOptions, Pool};
pub use util::error::{Error, Result};
