//! Scrub acceptance through the real binary on device files: corruption of
//! data and tree blocks found and repaired on raid1, dup and raid10; both
//! copies bad gives exit 3 and an error log naming volume and LBA; `-r`
//! changes nothing.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use chunkvol::device::fault::Rng;
use chunkvol::format::tree_id;

fn run(args: &[String], dir: &Path) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_chunkvol"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run chunkvol");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn ok(args: &[String], dir: &Path) -> String {
    let (c, out, err) = run(args, dir);
    assert_eq!(c, 0, "chunkvol {args:?} failed:\n{out}\n{err}");
    out
}

fn a(v: &[&str], devs: &[String]) -> Vec<String> {
    v.iter()
        .map(|s| s.to_string())
        .chain(devs.iter().cloned())
        .collect()
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("chunkvol-scrub-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn corrupt(path: &Path, phys: u64, len: usize) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, phys).unwrap();
    for x in b.iter_mut().step_by(61) {
        *x ^= 0xa5;
    }
    f.write_all_at(&b, phys).unwrap();
}

fn file_digest(p: &Path) -> u32 {
    let b = std::fs::read(p).unwrap();
    crc32c::crc32c(&b)
}

struct Damage {
    data: Vec<u64>,
    tree: Vec<u64>,
}

/// Corrupt `n_data` data sectors and `n_tree` csum-tree leaves on copy 0.
fn damage(dir: &Path, devs: &[String], n_data: usize, n_tree: usize, seed: u64) -> Damage {
    let paths: Vec<PathBuf> = devs.iter().map(|d| dir.join(d)).collect();
    let pool = chunkvol::Pool::open_paths(&paths).unwrap();
    let mut rng = Rng::new(seed);
    let ext = pool.data_extents().unwrap();
    let mut data = BTreeSet::new();
    while data.len() < n_data {
        let (s, l) = ext[rng.below(ext.len() as u64) as usize];
        data.insert(s + rng.below(l / 4096) * 4096);
    }
    // Leaves of the csum tree: opening the pool does not read them, so the
    // damage stays for scrub to find.
    let leaves: Vec<u64> = pool
        .tree_blocks()
        .unwrap()
        .into_iter()
        .filter(|&(_, owner, level)| owner == tree_id::CSUM && level == 0)
        .map(|(a, _, _)| a)
        .collect();
    assert!(leaves.len() > n_tree, "need more csum leaves than {n_tree}");
    let tree: Vec<u64> = leaves
        .iter()
        .step_by(leaves.len() / n_tree)
        .take(n_tree)
        .copied()
        .collect();
    let node_bytes = pool.fs().node_bytes;
    let mut plan = Vec::new();
    for &l in &data {
        let (p, phys) = pool.sector_copies(l).unwrap()[0].clone();
        plan.push((p, phys, 4096));
    }
    for &t in &tree {
        let (p, phys) = pool.sector_copies(t).unwrap()[0].clone();
        plan.push((p, phys, node_bytes));
    }
    pool.close().unwrap();
    for (p, phys, len) in plan {
        corrupt(&p, phys, len);
    }
    Damage {
        data: data.into_iter().collect(),
        tree,
    }
}

fn scrub_json(dir: &Path, devs: &[String], extra: &[&str]) -> (i32, serde_json::Value) {
    let mut args = vec!["scrub", "start", "-B", "--json"];
    args.extend(extra);
    let (c, out, err) = run(&a(&args, devs), dir);
    let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    (c, v)
}

fn u(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("no {k} in {v}"))
}

fn corruption_case(profile: &str, ndev: usize, data_mib: usize) {
    let dir = tempdir(profile);
    let devs: Vec<String> = (0..ndev).map(|i| format!("d{i}.img")).collect();
    ok(
        &a(
            &[
                "mkfs",
                "--data",
                profile,
                "--metadata",
                profile,
                "--size",
                "2G",
            ],
            &devs,
        ),
        &dir,
    );
    ok(
        &a(&["volume", "create", "disk0", "--size", "2G"], &devs),
        &dir,
    );
    std::fs::write(dir.join("in.bin"), common::pattern(3, data_mib << 20)).unwrap();
    ok(&a(&["volume", "import", "disk0", "in.bin"], &devs), &dir);
    let dmg = damage(&dir, &devs, 200, 5, 17);

    // -r: everything reported, nothing written.
    let before: Vec<u32> = devs.iter().map(|d| file_digest(&dir.join(d))).collect();
    let (c, v) = scrub_json(&dir, &devs, &["-r"]);
    assert_eq!(c, 0, "{v}");
    assert_eq!(u(&v, "csum_errors"), 205, "{profile} -r: {v}");
    assert_eq!(u(&v, "corrected_errors"), 0);
    let after: Vec<u32> = devs.iter().map(|d| file_digest(&dir.join(d))).collect();
    assert_eq!(before, after, "{profile}: -r changed a device file");
    // The same around the page cache (O_DIRECT, two reads in flight per
    // device, verified in order).
    let (c, v) = scrub_json(&dir, &devs, &["-r", "--uncached"]);
    assert_eq!(c, 0, "{v}");
    assert_eq!(u(&v, "csum_errors"), 205, "{profile} -r --uncached: {v}");
    assert!(u(&v, "data_bytes_scrubbed") >= (data_mib as u64) << 20);
    let after: Vec<u32> = devs.iter().map(|d| file_digest(&dir.join(d))).collect();
    assert_eq!(
        before, after,
        "{profile}: -r --uncached changed a device file"
    );

    // Repair.
    let (c, v) = scrub_json(&dir, &devs, &[]);
    assert_eq!(c, 0, "{v}");
    assert_eq!(u(&v, "csum_errors"), 205, "{profile}: {v}");
    assert_eq!(u(&v, "corrected_errors"), 205, "{profile}: {v}");
    assert_eq!(u(&v, "uncorrectable_errors"), 0);
    assert_eq!(
        u(&v, "read_errors") + u(&v, "verify_errors") + u(&v, "super_errors"),
        0
    );
    assert!(u(&v, "data_bytes_scrubbed") >= (data_mib as u64) << 20);
    assert!(u(&v, "tree_bytes_scrubbed") > 0);
    let (_, out, _) = run(&a(&["scrub", "status", "--json", "--errors"], &devs), &dir);
    let log: serde_json::Value = serde_json::from_str(&out).unwrap();
    let log = log["errors"].as_array().unwrap();
    for t in &dmg.tree {
        assert!(
            log.iter().any(|e| e["logical"].as_u64() == Some(*t)
                && e["kind"] == "tree csum"
                && e["repaired"] == true),
            "{profile}: tree block {t:#x} not logged as repaired"
        );
    }
    for d in &dmg.data {
        assert!(
            log.iter().any(|e| e["logical"].as_u64() == Some(*d)
                && e["volume"] == "disk0"
                && e["repaired"] == true),
            "{profile}: data sector {d:#x} not logged with its volume"
        );
    }
    let c = ok(&a(&["check", "--check-data-csum"], &devs), &dir);
    assert!(c.contains("no problems found"), "{c}");
    ok(&a(&["volume", "export", "disk0", "out.bin"], &devs), &dir);
    let x = std::fs::read(dir.join("in.bin")).unwrap();
    let y = std::fs::read(dir.join("out.bin")).unwrap();
    assert!(y[..x.len()] == x[..], "{profile}: export differs");
    // A second scrub is clean.
    let (c, v) = scrub_json(&dir, &devs, &[]);
    assert_eq!((c, u(&v, "csum_errors")), (0, 0), "{v}");

    // Both copies of one sector: exit 3, the log names volume and LBA, that
    // LBA fails to read, others read fine.
    let victim = dmg.data[0];
    let paths: Vec<PathBuf> = devs.iter().map(|d| dir.join(d)).collect();
    let copies = {
        let pool = chunkvol::Pool::open_paths(&paths).unwrap();
        let copies = pool.sector_copies(victim).unwrap();
        pool.close().unwrap();
        copies
    };
    for (p, phys) in &copies {
        corrupt(p, *phys, 4096);
    }
    let (c, v) = scrub_json(&dir, &devs, &[]);
    assert_eq!(c, 3, "{v}");
    assert!(u(&v, "uncorrectable_errors") >= 1, "{v}");
    let (_, out, _) = run(&a(&["scrub", "status", "--json", "--errors"], &devs), &dir);
    let st: serde_json::Value = serde_json::from_str(&out).unwrap();
    let bad: Vec<&serde_json::Value> = st["errors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["logical"].as_u64() == Some(victim) && e["repaired"] == false)
        .collect();
    assert!(!bad.is_empty(), "error log lacks {victim:#x}: {st}");
    assert_eq!(bad[0]["volume"], "disk0");
    let lba = bad[0]["offset_bytes"]
        .as_u64()
        .expect("offset_bytes in the error log");
    let pool = chunkvol::Pool::open_paths(&paths).unwrap();
    let vol = pool.volume("disk0").unwrap();
    let mut b = vec![0u8; 4096];
    let e = vol.read_at(&mut b, lba).unwrap_err().to_string();
    assert!(e.contains("disk0") && e.contains(&lba.to_string()), "{e}");
    let other = if lba >= 8 << 20 { 0 } else { 16 << 20 };
    vol.read_at(&mut b, other).unwrap();
    assert!(b[..] == x[other as usize..other as usize + 4096]);
    drop(vol);
    pool.close().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn raid1_corruption_found_repaired_and_readonly_writes_nothing() {
    corruption_case("raid1", 2, 1024);
}

#[test]
fn dup_corruption_found_and_repaired() {
    corruption_case("dup", 1, 512);
}

#[test]
fn raid10_corruption_found_and_repaired() {
    corruption_case("raid10", 4, 512);
}

/// Ctrl-C on an offline `scrub start -B`: the scrub stops where it is, its
/// progress is saved with the pool, the command exits 130 saying how to go
/// on, and `scrub resume -B` continues from there instead of from zero.
#[test]
fn sigint_on_offline_scrub_saves_progress_and_resume_continues() {
    let dir = tempdir("sigint");
    let devs: Vec<String> = vec!["d0.img".into(), "d1.img".into()];
    ok(
        &a(
            &[
                "mkfs",
                "--data",
                "raid1",
                "--metadata",
                "raid1",
                "--size",
                "1G",
            ],
            &devs,
        ),
        &dir,
    );
    ok(&a(&["volume", "create", "v", "--size", "1G"], &devs), &dir);
    std::fs::write(dir.join("in.bin"), common::pattern(9, 384 << 20)).unwrap();
    ok(&a(&["volume", "import", "v", "in.bin"], &devs), &dir);
    // 40 MiB/s per device: about ten seconds for the whole pool.
    let child = Command::new(env!("CARGO_BIN_EXE_chunkvol"))
        .args(a(
            &["scrub", "start", "-B", "--json", "--limit", "40M"],
            &devs,
        ))
        .current_dir(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let o = child.wait_with_output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert_eq!(o.status.code(), Some(130), "{out}\n{err}");
    assert!(err.contains("resume"), "says how to go on: {err}");
    let first: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(first["state"], "canceled", "{first}");
    let done = u(&first, "bytes_scrubbed");
    let total = u(&first, "bytes_total");
    assert!(done > 0 && done < total, "stopped mid-way: {first}");
    let st = ok(&a(&["scrub", "status", "--json"], &devs), &dir);
    let st: serde_json::Value = serde_json::from_str(&st).unwrap();
    assert!(u(&st, "bytes_scrubbed") > 0, "progress was saved: {st}");
    let (c, v) = {
        let (c, out, err) = run(&a(&["scrub", "resume", "-B", "--json"], &devs), &dir);
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
        (c, v)
    };
    assert_eq!(c, 0, "{v}");
    assert_eq!(v["state"], "finished", "{v}");
    let this_run = u(&v, "bytes_scrubbed_this_run");
    assert!(
        this_run + (32 << 20) < u(&v, "bytes_total"),
        "the resumed scrub started from zero: {v}"
    );
    assert!(
        u(&v, "bytes_scrubbed") >= u(&v, "bytes_total") - (1 << 20),
        "{v}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
