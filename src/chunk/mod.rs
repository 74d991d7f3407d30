//! The chunk layer: the chunk map (logical -> device, physical for every
//! copy), each device's extents and error counters, and chunk allocation.
//! It sits on devices and the on-disk format, and knows nothing of trees.

pub mod volumes;
