//! Layer 0, used by every layer above: errors, the lock and atomic
//! re-exports (with the lock-order check), failpoints, the deterministic
//! scheduler, size parsing and
//! printing, and wall-clock helpers. Nothing here knows about pools.

pub mod aligned;
pub mod error;
pub mod failpoint;
pub mod fan_out;
pub mod histogram;
pub mod sched;
pub mod size;
pub mod sync;
pub mod time;
