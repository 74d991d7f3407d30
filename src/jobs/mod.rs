//! Maintenance jobs that run beside client I/O: the cleaner's policy,
//! relocation, balance, device add/remove/replace, and scrub.

pub mod balance;
pub mod cleaner;
pub mod control;
pub mod dev_replace;
pub mod devices;
pub mod relocation;
pub mod scrub;
