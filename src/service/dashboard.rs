//! The live dashboard on the metrics listener: a page (HTML, CSS and JS
//! built into the binary, nothing fetched from elsewhere) and the JSON
//! endpoints behind it, which scripts can use too.
//!
//! `GET /` the page; `/api/state` everything below in one snapshot;
//! `/api/block-groups`, `/api/removed-block-groups`, `/api/devices`,
//! `/api/jobs`, `/api/errors` its parts.

use serde_json::{json, Value};

use crate::engine::block_group::{BgView, BlockGroup, RecentlyRemoved};
use crate::format::bg_type;
use crate::pool::Pool;

const PAGE_HTML: &str = include_str!("dashboard/index.html");
const PAGE_JS: &str = include_str!("dashboard/dashboard.js");
const PAGE_CSS: &str = include_str!("dashboard/dashboard.css");

/// A response: content type and body.
pub struct Reply {
    pub content_type: &'static str,
    pub body: String,
}

/// The reply for `path`, or None (404).
pub fn route(path: &str, pool: &Pool) -> Option<Reply> {
    let page = |content_type, body: &str| {
        Some(Reply {
            content_type,
            body: body.to_string(),
        })
    };
    let api = |v: Value| {
        Some(Reply {
            content_type: "application/json",
            body: serde_json::to_string(&v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}")),
        })
    };
    match path.split('?').next().unwrap_or("") {
        "/" | "/dashboard" => page("text/html; charset=utf-8", PAGE_HTML),
        "/dashboard.js" => page("text/javascript; charset=utf-8", PAGE_JS),
        "/dashboard.css" => page("text/css; charset=utf-8", PAGE_CSS),
        "/api/state" => api(state(pool)),
        "/api/block-groups" => api(block_groups(pool)),
        "/api/removed-block-groups" => api(removed_block_groups(pool)),
        "/api/devices" => api(devices(pool)),
        "/api/jobs" => api(jobs(pool)),
        "/api/errors" => api(errors(pool)),
        _ => None,
    }
}

/// Everything the page shows, in one snapshot.
pub fn state(pool: &Pool) -> Value {
    json!({
        "generation": pool.usage().generation,
        "block_groups": block_groups(pool),
        "removed_block_groups": removed_block_groups(pool),
        "devices": devices(pool),
        "jobs": jobs(pool),
        "errors": errors(pool),
    })
}

/// The state a map cell shows: the first that holds of removed,
/// relocated (emptied; the cleaner deletes it), relocating (read-only:
/// relocation, a replace or the cleaner is emptying it), scrubbing,
/// frozen (scrub holds its chunk map), ok.
pub fn cell_state(v: &BgView) -> &'static str {
    if v.removed {
        "removed"
    } else if v.relocated {
        "relocated"
    } else if v.ro > 0 {
        "relocating"
    } else if v.scrubbing > 0 {
        "scrubbing"
    } else if v.frozen > 0 {
        "frozen"
    } else {
        "ok"
    }
}

fn group_json(bg: &BlockGroup) -> Value {
    let v = bg.view();
    json!({
        "start": bg.start,
        "length": bg.length,
        "type": bg_type::name(bg.bg_type),
        "profile": bg.profile.name(),
        "used_bytes": v.used_bytes,
        "fill": v.used_bytes as f64 / bg.length as f64,
        "state": cell_state(&v),
        "flags": {
            "read_only": v.ro,
            "scrubbing": v.scrubbing,
            "frozen": v.frozen,
            "relocated": v.relocated,
            "removed": v.removed,
            "unused": v.on_unused_list,
        },
    })
}

/// Every block group, by start.
pub fn block_groups(pool: &Pool) -> Value {
    let mut list = pool.fs().block_group_list();
    list.sort_by_key(|b| b.start);
    Value::Array(list.iter().map(|b| group_json(b)).collect())
}

/// Groups removed lately in this process (oldest first, at most
/// [`RECENTLY_REMOVED_MAX`]), so the map can show what went away.
///
/// [`RECENTLY_REMOVED_MAX`]: crate::engine::block_group::RECENTLY_REMOVED_MAX
pub fn removed_block_groups(pool: &Pool) -> Value {
    let fs = pool.fs();
    json!(fs.extension::<RecentlyRemoved>().list())
}

/// Devices with size, allocation, error counters and a health word:
/// `missing`, `errors` (any counter above zero), or `ok`.
pub fn devices(pool: &Pool) -> Value {
    let usage = pool.usage();
    let stats = pool.device_stats();
    let list = usage.devices.iter().map(|d| {
        let st = stats.iter().find(|s| s.devid == d.devid);
        let counters = st.map(|s| json!(s.stats)).unwrap_or(Value::Null);
        let any_errors = counters
            .as_object()
            .is_some_and(|m| m.values().any(|c| c.as_u64().unwrap_or(0) > 0));
        let health = match (d.missing, any_errors) {
            (true, _) => "missing",
            (false, true) => "errors",
            (false, false) => "ok",
        };
        json!({
            "devid": d.devid,
            "path": d.path,
            "size_bytes": d.size_bytes,
            "allocated_bytes": d.allocated_bytes,
            "health": health,
            "errors": counters,
        })
    });
    Value::Array(list.collect())
}

/// Scrub, balance and replace status (as their `status --json`), and the
/// removes, imports and exports running now.
pub fn jobs(pool: &Pool) -> Value {
    let fs = pool.fs();
    let or_error =
        |r: crate::Result<Value>| r.unwrap_or_else(|e| json!({ "error": e.to_string() }));
    json!({
        "scrub": or_error(crate::jobs::scrub::status(fs, false).map(|s| json!(s))),
        "balance": or_error(crate::jobs::balance::status(fs).map(|s| json!(s))),
        "replace": crate::jobs::dev_replace::status(fs).map_or(json!({ "state": "never" }), |s| json!(s)),
        "tasks": crate::jobs::control::tasks(fs),
    })
}

/// The scrub error log (with volume and byte offset where data was hit), and the
/// sectors the last replace found without a good copy.
pub fn errors(pool: &Pool) -> Value {
    let fs = pool.fs();
    let scrub = crate::jobs::scrub::status(fs, true)
        .ok()
        .and_then(|s| s.errors)
        .unwrap_or_default();
    let replace = crate::jobs::dev_replace::status(fs)
        .map(|s| s.errors)
        .unwrap_or_default();
    json!({ "scrub": scrub, "replace": replace })
}
