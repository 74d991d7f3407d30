//! Scrub spares the host page cache (issue 15). By default it reads
//! through the cache and drops the pages its reads brought in, keeping the
//! ones cached before (drop-behind); `--uncached` reads around the cache
//! (O_DIRECT). Either way, scrubbing a pool whose device files are not
//! cached leaves them not cached, and what a client had cached stays.
//! Measured with util-linux `fincore`.

mod serve_harness;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serve_harness::*;

/// Bytes of `path` in the page cache.
fn cached_bytes(path: &Path) -> u64 {
    let o = run_ok(
        Command::new(tool("fincore")).args(["--bytes", "--noheadings", "--output", "RES", s(path)]),
        CMD_TIMEOUT,
    );
    o.stdout
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("fincore said {:?}: {e}", o.stdout))
}

/// Write back and drop `path`'s cached pages.
fn evict(path: &Path) {
    let f = std::fs::File::open(path).unwrap();
    f.sync_all().unwrap();
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
}

#[test]
fn scrub_leaves_the_device_files_out_of_the_page_cache() {
    let dir = TestDir::new("scrub-cache");
    let devs: Vec<PathBuf> = vec![dir.join("a.img"), dir.join("b.img")];
    make_pool_on(&devs, "1G", "640M");
    let input = dir.join("in.bin");
    write_random_file(&input, 512 << 20, 0x5c);
    let mut a = vec!["volume", "import", "disk0", s(&input)];
    a.extend(devs.iter().map(|d| s(d)));
    cv_ok(&a);
    // Opening the pool and the commit read and write some metadata through
    // the cache; the data (512 MiB a device) must not be there. A plain
    // cached scrub leaves over 512 MiB of each file cached.
    for uncached in [false, true] {
        let after = scrub_cached_bytes(&devs, uncached, 0);
        assert!(
            after.iter().all(|&c| c < 64 << 20),
            "bytes in the page cache after scrub (uncached: {uncached}): {after:?}"
        );
    }
}

#[test]
fn scrub_keeps_what_was_cached_before() {
    let dir = TestDir::new("scrub-cache-keep");
    let devs: Vec<PathBuf> = vec![dir.join("a.img"), dir.join("b.img")];
    make_pool_on(&devs, "1G", "640M");
    let input = dir.join("in.bin");
    write_random_file(&input, 512 << 20, 0x5d);
    let mut a = vec!["volume", "import", "disk0", s(&input)];
    a.extend(devs.iter().map(|d| s(d)));
    cv_ok(&a);
    // The first 384 MiB of a.img cached (as if a client read them), b.img
    // not: scrub reads both whole and must leave a.img's pages and add
    // none of its own.
    let hot = 384u64 << 20;
    let after = scrub_cached_bytes(&devs, false, hot);
    assert!(
        after[0] >= hot - (16 << 20) && after[0] < hot + (64 << 20),
        "a.img had {hot} bytes cached before the scrub, {} after",
        after[0]
    );
    assert!(
        after[1] < 64 << 20,
        "b.img: {} bytes cached after",
        after[1]
    );
}

/// Drop the device files' pages, read the first `hot_bytes` of the first,
/// scrub (offline), and return how many bytes of each file are cached
/// afterwards.
fn scrub_cached_bytes(devs: &[PathBuf], uncached: bool, hot_bytes: u64) -> Vec<u64> {
    for d in devs {
        evict(d);
        let c = cached_bytes(d);
        assert!(c < 8 << 20, "{} still has {c} bytes cached", d.display());
    }
    if hot_bytes > 0 {
        let f = std::fs::File::open(&devs[0]).unwrap();
        let mut buf = vec![0u8; 1 << 20];
        for at in (0..hot_bytes).step_by(buf.len()) {
            f.read_exact_at(&mut buf, at).unwrap();
        }
        let c = cached_bytes(&devs[0]);
        assert!(c >= hot_bytes, "{c} bytes cached after reading {hot_bytes}");
    }
    let mut a = vec!["scrub", "start", "-B", "--json"];
    if uncached {
        a.push("--uncached");
    }
    a.extend(devs.iter().map(|d| s(d)));
    let st = cv_json(&a);
    let scrubbed = st["data_bytes_scrubbed"].as_u64().unwrap();
    assert!(scrubbed >= 1 << 30, "both copies of 512 MiB: {st:#}");
    let cached: Vec<u64> = devs.iter().map(|d| cached_bytes(d)).collect();
    eprintln!("scrub (uncached: {uncached}): {cached:?} bytes cached after");
    cached
}
