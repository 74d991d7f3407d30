//! The service: pool commands shared by the CLI and the server (`ops`), the
//! control socket (`control`) and `chunkvol serve` (`server`).

pub mod control;
pub mod dashboard;
pub mod metrics;
pub mod ops;
pub mod server;
