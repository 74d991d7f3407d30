//! Progress items of the resumable jobs (dev tree; docs/FORMAT.md): scrub's
//! binary per-device item and balance's JSON item. They live with the other
//! codecs so the persisted bytes are defined, and checked on read, in one
//! place; the jobs convert to and from their in-memory state.

use super::{DecodeError, Put, Reader};

/// Counters in a scrub progress item, in the order of `scrub::Counters`.
pub const SCRUB_COUNTERS: usize = 12;

/// One device's scrub progress (item SCRUB_STATE): what `scrub status` shows
/// after a restart and where `scrub resume` continues.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScrubProgress {
    /// 1 running, 2 paused, 3 finished, 4 canceled, 5 interrupted; anything
    /// else reads as "never".
    pub state: u8,
    pub readonly: bool,
    /// Unix seconds.
    pub started_at: u64,
    /// Time spent running (not paused), in milliseconds.
    pub active_ms: u64,
    pub last_physical: u64,
    pub bytes_total: u64,
    pub done: bool,
    /// Counters as of `last_physical`.
    pub counters: [u64; SCRUB_COUNTERS],
}

impl ScrubProgress {
    /// The item's bytes (fixed layout, docs/FORMAT.md).
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(35 + 8 * SCRUB_COUNTERS);
        v.put_u8(self.state);
        v.put_u8(self.readonly as u8);
        v.put_u64(self.started_at);
        v.put_u64(self.active_ms);
        v.put_u64(self.last_physical);
        v.put_u64(self.bytes_total);
        v.put_u8(self.done as u8);
        for c in self.counters {
            v.put_u64(c);
        }
        v
    }

    /// A short item is an error; bytes past the counters are ignored.
    pub fn decode(b: &[u8]) -> Result<ScrubProgress, DecodeError> {
        let mut r = Reader::new(b);
        let mut p = ScrubProgress {
            state: r.u8()?,
            readonly: r.u8()? != 0,
            started_at: r.u64()?,
            active_ms: r.u64()?,
            last_physical: r.u64()?,
            bytes_total: r.u64()?,
            done: r.u8()? != 0,
            counters: [0; SCRUB_COUNTERS],
        };
        for c in &mut p.counters {
            *c = r.u64()?;
        }
        Ok(p)
    }
}

/// What `balance start` was asked for (as given on the command line); kept
/// in the balance item so `balance resume` re-applies the same filters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalanceArgs {
    /// `-d` filters (Some("") = every data group).
    pub data: Option<String>,
    /// `-m` filters.
    pub metadata: Option<String>,
    /// `-s` filters.
    pub system: Option<String>,
    /// Every group of every type.
    pub full: bool,
}

/// Balance states, as printed and in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BalanceState {
    Never,
    Running,
    Paused,
    Finished,
    Canceled,
    /// Stopped by a crash, a restart or a failure; `balance resume` goes on.
    Interrupted,
}

impl BalanceState {
    pub fn name(self) -> &'static str {
        match self {
            BalanceState::Never => "never",
            BalanceState::Running => "running",
            BalanceState::Paused => "paused",
            BalanceState::Finished => "finished",
            BalanceState::Canceled => "canceled",
            BalanceState::Interrupted => "interrupted",
        }
    }
}

/// What the pool keeps about the last balance (item BALANCE_STATE, JSON).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalanceProgress {
    pub args: BalanceArgs,
    pub state: BalanceState,
    pub started_at: u64,
    pub block_groups_total: u64,
    pub block_groups_done: u64,
    pub bytes_relocated: u64,
    pub failure: Option<String>,
}

impl BalanceProgress {
    /// The item's JSON.
    pub fn encode(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(self)
    }

    /// Any malformed JSON is an error, never a panic.
    pub fn decode(b: &[u8]) -> Result<BalanceProgress, DecodeError> {
        serde_json::from_slice(b).map_err(|e| DecodeError(e.to_string()))
    }
}

/// Device replace states, as printed and in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplaceState {
    Never,
    Running,
    Finished,
    Canceled,
    Failed,
    /// Stopped by a crash or a restart; `device replace resume` (or `serve`)
    /// goes on.
    Interrupted,
}

impl ReplaceState {
    pub fn name(self) -> &'static str {
        match self {
            ReplaceState::Never => "never",
            ReplaceState::Running => "running",
            ReplaceState::Finished => "finished",
            ReplaceState::Canceled => "canceled",
            ReplaceState::Failed => "failed",
            ReplaceState::Interrupted => "interrupted",
        }
    }
}

/// What the pool keeps about the last device replace (item REPLACE_STATE,
/// JSON): enough to continue it after a crash and to report it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReplaceProgress {
    pub state: ReplaceState,
    pub src_devid: u64,
    pub target_devid: u64,
    pub target_path: String,
    pub started_at: u64,
    pub block_groups_total: u64,
    pub block_groups_done: u64,
    pub bytes_copied: u64,
    pub uncorrectable_errors: u64,
    pub failure: Option<String>,
}

impl ReplaceProgress {
    /// The item's JSON.
    pub fn encode(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(self)
    }

    /// Any malformed JSON is an error, never a panic.
    pub fn decode(b: &[u8]) -> Result<ReplaceProgress, DecodeError> {
        serde_json::from_slice(b).map_err(|e| DecodeError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_progress_round_trips_and_rejects_truncation() {
        let p = ScrubProgress {
            state: 2,
            readonly: true,
            started_at: 1_700_000_000,
            active_ms: 1234,
            last_physical: 64 << 20,
            bytes_total: 1 << 30,
            done: false,
            counters: std::array::from_fn(|i| i as u64 * 7),
        };
        let b = p.encode();
        assert_eq!(b.len(), 35 + 8 * SCRUB_COUNTERS);
        assert_eq!(ScrubProgress::decode(&b), Ok(p));
        for cut in 0..b.len() {
            assert!(ScrubProgress::decode(&b[..cut]).is_err());
        }
        let mut longer = b.clone();
        longer.extend_from_slice(&[9; 5]);
        assert_eq!(ScrubProgress::decode(&longer), Ok(p));
    }

    #[test]
    fn balance_progress_keeps_its_json() {
        let p = BalanceProgress {
            args: BalanceArgs {
                data: Some("usage=50".into()),
                full: false,
                ..Default::default()
            },
            state: BalanceState::Interrupted,
            started_at: 5,
            block_groups_total: 3,
            block_groups_done: 1,
            bytes_relocated: 4096,
            failure: None,
        };
        let b = p.encode().unwrap();
        assert_eq!(
            std::str::from_utf8(&b).unwrap(),
            r#"{"args":{"data":"usage=50","metadata":null,"system":null,"full":false},"state":"interrupted","started_at":5,"block_groups_total":3,"block_groups_done":1,"bytes_relocated":4096,"failure":null}"#
        );
        assert_eq!(BalanceProgress::decode(&b), Ok(p));
        assert!(BalanceProgress::decode(&b[..b.len() - 1]).is_err());
    }
}
