//! Scrub progress and the error log in the dev tree, so a scrub stopped by
//! a cancel, a crash or a restart can be reported and resumed.

use crate::btree::Iter;
use crate::engine::fs_info::FsInfo;
use crate::engine::transaction::Ctx;
use crate::format::progress::ScrubProgress;
use crate::format::{item, objectid, tree_id, Key};
use crate::util::error::Result;
use crate::util::sync::lock;

use super::{Counters, DevProgress, ErrorRecord, ScrubRun, State};

pub(super) fn state_key(devid: u64) -> Key {
    Key::new(objectid::SCRUB, item::SCRUB_STATE, devid)
}

fn encode_dev(run: &ScrubRun, st: State, d: &DevProgress) -> Vec<u8> {
    ScrubProgress {
        state: st.to_u8(),
        readonly: run.opts.readonly,
        started_at: run.started_at,
        active_ms: run.active.active().as_millis() as u64,
        last_physical: d.last_physical,
        bytes_total: d.bytes_total,
        done: d.done,
        counters: d.saved.to_array(),
    }
    .encode()
}

pub(super) struct Persisted {
    pub(super) state: State,
    pub(super) readonly: bool,
    pub(super) started_at: u64,
    pub(super) active_ms: u64,
    pub(super) dev: DevProgress,
}

fn decode_dev(devid: u64, b: &[u8]) -> Option<Persisted> {
    let p = ScrubProgress::decode(b).ok()?;
    let counters = Counters::from_array(p.counters);
    Some(Persisted {
        state: State::from_u8(p.state),
        readonly: p.readonly,
        started_at: p.started_at,
        active_ms: p.active_ms,
        dev: DevProgress {
            devid,
            last_physical: p.last_physical,
            bytes_total: p.bytes_total,
            done: p.done,
            bytes_scrubbed_this_run: 0,
            counters,
            saved: counters,
        },
    })
}

/// Write progress into the running transaction (durable at the next commit).
pub(super) fn checkpoint(fs: &FsInfo, run: &ScrubRun) {
    if run.opts.readonly {
        // -r writes nothing at all, progress included (R9).
        return;
    }
    let st = *lock(&run.state);
    let devs: Vec<DevProgress> = lock(&run.devs).values().cloned().collect();
    let errors = lock(&run.errors).clone();
    let mut t = lock(&fs.trans);
    let r = Ctx::begin(fs, &mut t).and_then(|mut ctx| {
        for d in &devs {
            ctx.insert(tree_id::DEV, state_key(d.devid), encode_dev(run, st, d))?;
        }
        for (i, e) in errors.iter().enumerate() {
            let k = Key::new(objectid::SCRUB, item::SCRUB_ERROR, i as u64);
            if ctx.get(tree_id::DEV, &k)?.is_none() {
                let v = serde_json::to_vec(e).unwrap_or_default();
                ctx.insert(tree_id::DEV, k, v)?;
            }
        }
        Ok(())
    });
    if let Err(e) = r {
        tracing::warn!("scrub: cannot record progress: {e}");
    }
}

pub(super) fn load_persisted(fs: &FsInfo) -> Result<Vec<Persisted>> {
    let root = lock(&fs.trans).root(tree_id::DEV);
    let mut out = Vec::new();
    for r in Iter::new(fs, &root, state_key(0), state_key(u64::MAX)) {
        let (k, v) = r?;
        if let Some(p) = decode_dev(k.offset, &v) {
            out.push(p);
        }
    }
    Ok(out)
}

pub(super) fn load_errors(fs: &FsInfo) -> Result<Vec<ErrorRecord>> {
    let root = lock(&fs.trans).root(tree_id::DEV);
    let mut out = Vec::new();
    let (a, b) = (
        Key::new(objectid::SCRUB, item::SCRUB_ERROR, 0),
        Key::new(objectid::SCRUB, item::SCRUB_ERROR, u64::MAX),
    );
    for r in Iter::new(fs, &root, a, b) {
        let (_, v) = r?;
        if let Ok(e) = serde_json::from_slice(&v) {
            out.push(e);
        }
    }
    Ok(out)
}

pub(super) fn clear_errors(ctx: &mut Ctx) -> Result<()> {
    let ks: Vec<Key> = ctx
        .range(
            tree_id::DEV,
            Key::new(objectid::SCRUB, item::SCRUB_ERROR, 0),
            Key::new(objectid::SCRUB, item::SCRUB_ERROR, u64::MAX),
        )?
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    for k in ks {
        ctx.delete(tree_id::DEV, &k)?;
    }
    Ok(())
}
