//! Snapshots, clones and deletes in the crash campaign: what each one may
//! look like after a power cut. A snapshot or clone that returned exists and
//! holds exactly its source's content at the call; one cut in its commit
//! either exists with that content or does not exist; a deleted one may come
//! back, whole, until the next commit.

use std::collections::BTreeMap;

use crate::device::fault::Rng;
use crate::pool::Pool;

/// Snapshots and clones alive at once (the campaign's devices are small).
const MAX_SNAPSHOT_VOLUMES: usize = 3;

/// What is known of one snapshot or clone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Made, and committed: must be there.
    Exists,
    /// Made by a call the power cut: there, or not at all.
    MaybeMade,
    /// Deleted, not committed yet: there (whole), or not at all.
    MaybeGone,
}

struct Tracked {
    /// Snapshots and clones are never written in the campaign: this is
    /// their content for good.
    content: Vec<u8>,
    read_only: bool,
    fate: Fate,
}

/// The campaign's snapshots and clones of the volume `v`.
#[derive(Default)]
pub(super) struct SnapTracker {
    vols: BTreeMap<String, Tracked>,
    next_id: u64,
    pub snapshots: u64,
    pub clones: u64,
    pub deletes: u64,
}

impl SnapTracker {
    /// After a reopen: every snapshot and clone that must be there is, none
    /// appears that cannot, and each one there reads exactly its content.
    pub fn verify(&mut self, pool: &Pool) -> Result<(), String> {
        let names = pool.volume_names();
        for name in names.iter().filter(|n| *n != "v") {
            let Some(t) = self.vols.get_mut(name) else {
                return Err(format!("volume {name} appeared after the cut"));
            };
            let vol = pool.volume(name).map_err(|e| e.to_string())?;
            let mut now = vec![0u8; t.content.len()];
            vol.read_at(&mut now, 0)
                .map_err(|e| format!("read {name}: {e}"))?;
            if let Some(i) = super::model::first_diff(&now, &t.content) {
                return Err(format!("{name} byte {i} changed ({:?})", t.fate));
            }
            if vol.read_only().map_err(|e| e.to_string())? != t.read_only {
                return Err(format!("{name}: read-only flag lost ({:?})", t.fate));
            }
            t.fate = Fate::Exists;
        }
        let lost: Vec<&String> = self
            .vols
            .iter()
            .filter(|(n, t)| t.fate == Fate::Exists && !names.contains(n))
            .map(|(n, _)| n)
            .collect();
        if !lost.is_empty() {
            return Err(format!("committed snapshots or clones lost: {lost:?}"));
        }
        self.vols.retain(|n, _| names.contains(n));
        Ok(())
    }

    /// A commit returned: deletes are for good.
    pub fn committed(&mut self) {
        self.vols.retain(|_, t| t.fate != Fate::MaybeGone);
    }

    fn live(&self) -> Vec<String> {
        let live = self.vols.iter().filter(|(_, t)| t.fate != Fate::MaybeGone);
        live.map(|(n, _)| n.clone()).collect()
    }

    /// Snapshot `v` (whose content is `model`), or clone a random snapshot or
    /// clone. Returns whether the call succeeded (it commits: everything
    /// before it is durable then). With `cut`, the power fails in the call,
    /// and its result does not matter.
    pub fn make(
        &mut self,
        pool: &Pool,
        rng: &mut Rng,
        model: &[u8],
        cut: bool,
    ) -> Result<bool, String> {
        let live = self.live();
        if live.len() >= MAX_SNAPSHOT_VOLUMES {
            return Ok(false);
        }
        let id = self.next_id;
        self.next_id += 1;
        let source = (!live.is_empty() && rng.below(3) == 0)
            .then(|| live[rng.below(live.len() as u64) as usize].clone());
        let (name, content, read_only, r) = match source {
            None => {
                let name = format!("s{id}");
                let r = pool.snapshot_volume("v", &name);
                (name, model.to_vec(), true, r)
            }
            Some(src) => {
                let name = format!("c{id}");
                let r = pool.clone_volume(&src, &name);
                (name, self.vols[&src].content.clone(), false, r)
            }
        };
        let fate = match (&r, cut) {
            (_, true) => Fate::MaybeMade,
            (Ok(_), false) => Fate::Exists,
            (Err(e), false) => return Err(format!("make {name}: {e}")),
        };
        if read_only {
            self.snapshots += 1;
        } else {
            self.clones += 1;
        }
        let tracked = Tracked {
            content,
            read_only,
            fate,
        };
        self.vols.insert(name, tracked);
        Ok(r.is_ok())
    }

    /// Delete a random snapshot or clone (not durable until a commit).
    pub fn delete(&mut self, pool: &Pool, rng: &mut Rng) -> Result<(), String> {
        let live = self.live();
        if live.is_empty() {
            return Ok(());
        }
        let name = &live[rng.below(live.len() as u64) as usize];
        pool.delete_volume(name)
            .map_err(|e| format!("delete {name}: {e}"))?;
        self.vols.get_mut(name).expect("live").fate = Fate::MaybeGone;
        self.deletes += 1;
        Ok(())
    }
}
