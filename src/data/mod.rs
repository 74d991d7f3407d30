//! Data: extents of volume data with their checksums (`extent`) and the
//! block API of a volume (`volume`).

pub mod extent;
pub mod volume;
