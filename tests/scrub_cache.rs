//! `scrub --uncached` spares the host page cache (issue 15): it reads with
//! O_DIRECT, so scrubbing a pool whose device files are not cached leaves
//! them not cached, where a default scrub fills the cache with every copy
//! (evicting what the clients had there). Measured with util-linux
//! `fincore`.

mod serve_harness;

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
fn scrub_uncached_leaves_the_device_files_out_of_the_page_cache() {
    let dir = TestDir::new("scrub-cache");
    let devs: Vec<PathBuf> = vec![dir.join("a.img"), dir.join("b.img")];
    make_pool_on(&devs, "1G", "640M");
    let input = dir.join("in.bin");
    write_random_file(&input, 512 << 20, 0x5c);
    let mut a = vec!["volume", "import", "disk0", s(&input)];
    a.extend(devs.iter().map(|d| s(d)));
    cv_ok(&a);
    // Default: cached reads, which fill the cache with both copies.
    let after_default = scrub_cached_bytes(&devs, false);
    assert!(
        after_default.iter().all(|&c| c > 256 << 20),
        "a default scrub reads through the cache: {after_default:?}"
    );
    // --uncached: O_DIRECT. Opening the pool and the commit read and write
    // some metadata through the cache; the data (512 MiB a device) must
    // not be there.
    let after_uncached = scrub_cached_bytes(&devs, true);
    assert!(
        after_uncached.iter().all(|&c| c < 64 << 20),
        "bytes in the page cache after scrub --uncached: {after_uncached:?}"
    );
}

/// Drop the device files' pages, scrub (offline), and return how many bytes
/// of each file are cached afterwards.
fn scrub_cached_bytes(devs: &[PathBuf], uncached: bool) -> Vec<u64> {
    for d in devs {
        evict(d);
        let c = cached_bytes(d);
        assert!(c < 8 << 20, "{} still has {c} bytes cached", d.display());
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
