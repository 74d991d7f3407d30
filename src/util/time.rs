//! Wall-clock time as the pool records it (start times of jobs), apart from
//! the monotonic clocks used for rates and timeouts.

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix seconds now; 0 if the clock is before 1970 (a record, never a panic).
pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
