//! The dashboard (issue 16, item 3) in headless Chromium: with a scrub
//! held on one block group and a balance held relocating another (both by
//! failpoints, so the states cannot move while the page loads), the map has
//! one cell per block group, each in the state the lifecycle module
//! reports; the jobs show as running. After the balance, the emptied group
//! shows as relocated while the scrub runs, and as removed once the cleaner
//! deleted it. Screenshots go to target/test-artifacts/.

mod common;
mod serve_harness;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use chunkvol::engine::block_group::{delete_unused_bgs, RecentlyRemoved};
use chunkvol::engine::transaction::commit;
use chunkvol::format::{bg_type, Profile};
use chunkvol::jobs::{balance, scrub};
use chunkvol::service::dashboard::cell_state;
use chunkvol::util::failpoint::{self, Action};
use common::*;
use serve_harness::{run_ok, tool};

/// The map's cells in the DOM: start -> data-state.
fn cells(dom: &str) -> BTreeMap<u64, String> {
    let attr = |tag: &str, name: &str| {
        let key = format!("{name}=\"");
        let i = tag.find(&key)? + key.len();
        let j = tag[i..].find('"')?;
        Some(tag[i..i + j].to_string())
    };
    let mut out = BTreeMap::new();
    for (i, _) in dom.match_indices("<div class=\"cell ") {
        let tag = &dom[i..i + dom[i..].find('>').expect("tag ends")];
        let start = attr(tag, "data-start")
            .expect("data-start")
            .parse()
            .unwrap();
        let state = attr(tag, "data-state").expect("data-state");
        assert!(
            out.insert(start, state).is_none(),
            "two cells for {start:#x}"
        );
    }
    out
}

/// One attribute of the element with `id`.
fn job_state(dom: &str, id: &str) -> String {
    let key = format!("id=\"{id}\" data-state=\"");
    let i = dom
        .find(&key)
        .unwrap_or_else(|| panic!("no #{id} in the page"))
        + key.len();
    dom[i..i + dom[i..].find('"').unwrap()].to_string()
}

fn chromium(url: &str, extra: &[&str]) -> String {
    let mut cmd = Command::new(tool("chromium"));
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--window-size=1200,800",
        // Virtual time: the page's timers run until this much has passed,
        // each fetch completing first.
        "--virtual-time-budget=3000",
    ])
    .args(extra)
    .arg(url);
    run_ok(&mut cmd, Duration::from_secs(120)).stdout
}

fn artifact(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn screenshot(url: &str, name: &str) {
    let png = artifact(name);
    let _ = std::fs::remove_file(&png);
    chromium(url, &[&format!("--screenshot={}", png.display())]);
    let bytes = std::fs::read(&png).unwrap_or_else(|e| panic!("{}: {e}", png.display()));
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
        "{} is not a screenshot",
        png.display()
    );
    eprintln!("screenshot: {}", png.display());
}

#[test]
fn the_map_shows_every_block_group_in_its_state_during_scrub_and_balance() {
    let devs = mkfs_mem(Profile::Raid1, 512 << 20);
    let pool = open_mem(&devs);
    let v = pool.create_volume("v", 320 << 20).unwrap();
    v.write_at(&pattern(5, 200 << 20), 0).unwrap();
    pool.flush().unwrap();
    let fs = pool.fs().clone();
    let mut data: Vec<u64> = fs
        .block_group_list()
        .iter()
        .filter(|b| b.bg_type == bg_type::DATA)
        .map(|b| b.start)
        .collect();
    data.sort();
    assert!(data.len() >= 2, "want two data groups, have {data:x?}");
    let (scrubbed, moved) = (data[0], data[1]);

    let listener = chunkvol::service::metrics::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let http =
        chunkvol::service::metrics::spawn(listener, pool.clone(), Arc::default(), stop.clone());

    // Scrub held inside one group, balance held relocating another.
    failpoint::set("scrub::group_frozen", Action::PauseIf(scrubbed));
    // One device, so one scrub thread: nothing else moves once it paused.
    let one_dev = scrub::ScrubOptions {
        devid: Some(1),
        ..Default::default()
    };
    let scrub_run = scrub::start(&fs, one_dev).unwrap();
    assert!(failpoint::wait_paused(
        "scrub::group_frozen",
        Duration::from_secs(60)
    ));
    failpoint::set("relocation::after_ro", Action::PauseIf(moved));
    let args = balance::BalanceArgs {
        data: Some(format!("vrange={moved}..{}", moved + 1)),
        ..Default::default()
    };
    let bal = balance::start(&fs, args, false).unwrap();
    assert!(failpoint::wait_paused(
        "relocation::after_ro",
        Duration::from_secs(60)
    ));

    let expected: BTreeMap<u64, String> = fs
        .block_group_list()
        .iter()
        .map(|b| (b.start, cell_state(&b.view()).to_string()))
        .collect();
    assert_eq!(expected[&scrubbed], "scrubbing");
    assert_eq!(expected[&moved], "relocating");
    // Groups the cleaner removed earlier show as removed; every other cell
    // is a live group in its lifecycle state.
    let removed_before: Vec<u64> = fs
        .extension::<RecentlyRemoved>()
        .list()
        .iter()
        .map(|g| g.start)
        .filter(|s| !expected.contains_key(s))
        .collect();
    let dom = chromium(&url, &["--dump-dom"]);
    let mut shown = cells(&dom);
    for s in &removed_before {
        assert_eq!(shown.remove(s).as_deref(), Some("removed"), "{s:#x}");
    }
    assert_eq!(shown, expected, "the map against the lifecycle module");
    assert_eq!(job_state(&dom, "job-scrub"), "running");
    assert_eq!(job_state(&dom, "job-balance"), "running");
    assert!(
        dom.contains("<td class=\"health-ok\">ok</td>"),
        "device health"
    );
    screenshot(&url, "dashboard-scrub-and-balance.png");

    // The balance ends. The group it emptied waits for the cleaner while
    // the scrub (a reader of the old commit root) runs: "relocated".
    failpoint::release("relocation::after_ro");
    let end = bal.wait(&fs);
    assert_eq!(end.state, balance::State::Finished, "{end:?}");
    let dom = chromium(&url, &["--dump-dom"]);
    let after = cells(&dom);
    assert_eq!(after[&moved], "relocated", "{after:x?}");
    assert_eq!(after[&scrubbed], "scrubbing");
    assert_eq!(job_state(&dom, "job-balance"), "finished");
    screenshot(&url, "dashboard-after-balance.png");

    // The scrub ends and the cleaner deletes the group: "removed".
    failpoint::release("scrub::group_frozen");
    let s = scrub_run.wait();
    assert_eq!(s.counters.uncorrectable_errors, 0);
    for _ in 0..100 {
        if fs.block_group_at(moved).is_none() {
            break;
        }
        commit(&fs).unwrap();
        delete_unused_bgs(&fs).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(fs.block_group_at(moved).is_none(), "the cleaner removed it");
    let dom = chromium(&url, &["--dump-dom"]);
    let last = cells(&dom);
    assert_eq!(last[&moved], "removed", "{last:x?}");
    assert_eq!(last[&scrubbed], "ok");
    assert_eq!(job_state(&dom, "job-scrub"), "finished");
    stop.store(true, std::sync::atomic::Ordering::Release);
    http.join().unwrap();
    failpoint::reset();
}
