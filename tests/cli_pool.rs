//! Issue 2 acceptance through the real binary: mkfs, import/export, check,
//! usage, corruption and repair.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use chunkvol::device::fault::Rng;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_chunkvol"))
}

fn run(args: &[&str], dir: &Path) -> (i32, String, String) {
    let o = bin()
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

fn ok(args: &[&str], dir: &Path) -> String {
    let (c, out, err) = run(args, dir);
    assert_eq!(c, 0, "chunkvol {args:?} failed:\n{out}\n{err}");
    out
}

fn tempdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("chunkvol-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write_random(path: &Path, len: usize, seed: u64) {
    std::fs::write(path, common::pattern(seed, len)).unwrap();
}

fn cmp_prefix(a: &Path, b: &Path, len: u64) {
    let x = std::fs::read(a).unwrap();
    let y = std::fs::read(b).unwrap();
    assert!(x.len() as u64 >= len && y.len() as u64 >= len);
    assert!(
        x[..len as usize] == y[..len as usize],
        "{} and {} differ",
        a.display(),
        b.display()
    );
}

fn roundtrip(profile: &str, ndev: usize, data_mib: usize) {
    let dir = tempdir(profile);
    let devs: Vec<String> = (0..ndev).map(|i| format!("d{i}.img")).collect();
    let devs_ref: Vec<&str> = devs.iter().map(|s| s.as_str()).collect();
    let mut a = vec![
        "mkfs",
        "--data",
        profile,
        "--metadata",
        if profile == "single" { "dup" } else { profile },
        "--size",
        "2G",
    ];
    a.extend(&devs_ref);
    ok(&a, &dir);
    let with = |base: &[&str]| -> Vec<String> {
        base.iter()
            .map(|s| s.to_string())
            .chain(devs.iter().cloned())
            .collect()
    };
    let w = with(&["volume", "create", "disk0", "--size", "4G"]);
    ok(&w.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &dir);
    write_random(&dir.join("in.bin"), data_mib << 20, 7);
    let w = with(&["volume", "import", "disk0", "in.bin"]);
    ok(&w.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &dir);
    let w = with(&["volume", "export", "disk0", "out.bin"]);
    ok(&w.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &dir);
    let st = Command::new("cmp")
        .args(["-n", &((data_mib << 20).to_string()), "in.bin", "out.bin"])
        .current_dir(&dir)
        .status()
        .expect("cmp is needed");
    assert!(st.success(), "{profile}: export differs from import");
    let out = std::fs::metadata(dir.join("out.bin")).unwrap().len();
    assert_eq!(out, 4 << 30);
    let w = with(&["check", "--check-data-csum"]);
    let c = ok(&w.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &dir);
    assert!(c.contains("no problems found"), "{c}");
    let w = with(&["usage", "--json"]);
    let u: serde_json::Value =
        serde_json::from_str(&ok(&w.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &dir)).unwrap();
    assert_eq!(u["devices"].as_array().unwrap().len(), ndev);
    let bgs = u["block_groups"].as_array().unwrap();
    let data_used: u64 = bgs
        .iter()
        .filter(|b| b["type"] == "data")
        .map(|b| b["used_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(
        data_used,
        (data_mib as u64) << 20,
        "{profile}: data used bytes"
    );
    assert!(bgs
        .iter()
        .all(|b| b["profile"] == profile || b["type"] != "data"));
    for k in [
        "device_size_bytes",
        "allocated_bytes",
        "unallocated_bytes",
        "used_bytes",
        "data_ratio",
        "metadata_ratio",
    ] {
        assert!(u.get(k).is_some(), "usage lacks {k}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn acceptance_1_raid1_import_export_check_usage() {
    roundtrip("raid1", 2, 300);
}

#[test]
fn acceptance_2_other_profiles() {
    roundtrip("single", 1, 300);
    roundtrip("dup", 1, 300);
    roundtrip("raid1c3", 3, 300);
    roundtrip("raid10", 4, 300);
}

#[test]
fn acceptance_3_corruption_is_found_and_repaired() {
    let dir = tempdir("corrupt");
    ok(
        &[
            "mkfs",
            "--data",
            "raid1",
            "--metadata",
            "raid1",
            "--size",
            "1G",
            "a.img",
            "b.img",
        ],
        &dir,
    );
    ok(
        &[
            "volume", "create", "disk0", "--size", "256M", "a.img", "b.img",
        ],
        &dir,
    );
    ok(
        &[
            "volume", "create", "other", "--size", "64M", "a.img", "b.img",
        ],
        &dir,
    );
    write_random(&dir.join("in.bin"), 64 << 20, 9);
    ok(
        &["volume", "import", "disk0", "in.bin", "a.img", "b.img"],
        &dir,
    );
    ok(
        &["volume", "import", "other", "in.bin", "a.img", "b.img"],
        &dir,
    );
    // Pick 50 distinct sectors inside allocated data; find their copies.
    let paths = [dir.join("a.img"), dir.join("b.img")];
    let targets = {
        let pool = chunkvol::Pool::open_paths(&paths).unwrap();
        let ext = pool.data_extents().unwrap();
        let mut rng = Rng::new(42);
        let mut chosen = std::collections::BTreeSet::new();
        while chosen.len() < 50 {
            let (s, l) = ext[rng.below(ext.len() as u64) as usize];
            chosen.insert(s + rng.below(l / 4096) * 4096);
        }
        let copies: Vec<Vec<(PathBuf, u64)>> = chosen
            .iter()
            .map(|&l| pool.sector_copies(l).unwrap())
            .collect();
        pool.close().unwrap();
        copies
    };
    let before_a = std::fs::read(&paths[0]).unwrap();
    for copies in &targets {
        let (p, phys) = &copies[0];
        corrupt_sector(p, *phys);
    }
    let (c, out, _) = run(&["check", "--check-data-csum", "a.img", "b.img"], &dir);
    assert_eq!(c, 1, "check must report corruption:\n{out}");
    assert_eq!(out.matches("checksum mismatch").count(), 50, "{out}");
    assert!(
        out.contains("volume disk0 byte offset") || out.contains("volume other byte offset"),
        "{out}"
    );
    ok(
        &["volume", "export", "disk0", "out0.bin", "a.img", "b.img"],
        &dir,
    );
    ok(
        &["volume", "export", "other", "out1.bin", "a.img", "b.img"],
        &dir,
    );
    cmp_prefix(&dir.join("in.bin"), &dir.join("out0.bin"), 64 << 20);
    cmp_prefix(&dir.join("in.bin"), &dir.join("out1.bin"), 64 << 20);
    let c = ok(&["check", "--check-data-csum", "a.img", "b.img"], &dir);
    assert!(c.contains("no problems found"), "{c}");
    let s: serde_json::Value =
        serde_json::from_str(&ok(&["device", "stats", "--json", "a.img", "b.img"], &dir)).unwrap();
    let corr: u64 = s["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["corruption_errs"].as_u64().unwrap())
        .sum();
    assert_eq!(corr, 50, "{s}");
    drop(before_a);
    // Both copies of one sector: export fails naming volume and LBA; the rest is fine.
    let copies = &targets[0];
    for (p, phys) in copies {
        corrupt_sector(p, *phys);
    }
    let (c1, _, e1) = run(
        &["volume", "export", "disk0", "x0.bin", "a.img", "b.img"],
        &dir,
    );
    let (c2, _, e2) = run(
        &["volume", "export", "other", "x1.bin", "a.img", "b.img"],
        &dir,
    );
    let (bad_err, good_code) = if c1 != 0 { (e1, c2) } else { (e2, c1) };
    assert!(c1 != 0 || c2 != 0, "one export must fail");
    assert_eq!(good_code, 0, "the other volume must still export");
    assert!(
        bad_err.contains(": bytes ") && bad_err.contains("volume"),
        "{bad_err}"
    );
    assert!(bad_err.contains("no good copy"), "{bad_err}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn corrupt_sector(path: &Path, phys: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = vec![0u8; 4096];
    f.read_exact_at(&mut b, phys).unwrap();
    for x in b.iter_mut().step_by(97) {
        *x ^= 0x5a;
    }
    f.write_all_at(&b, phys).unwrap();
}

#[test]
fn bad_input_is_rejected_clearly() {
    let dir = tempdir("badinput");
    let (c, _, e) = run(&["mkfs", "--data", "raid5", "--size", "64M", "a.img"], &dir);
    assert_eq!(c, 2, "{e}");
    assert!(e.contains("unknown profile"), "{e}");
    let (c, _, e) = run(&["mkfs", "--data", "raid1", "--size", "64M", "a.img"], &dir);
    assert_eq!(c, 2, "{e}");
    ok(&["mkfs", "--size", "64M", "a.img"], &dir);
    let (c, _, e) = run(&["mkfs", "a.img"], &dir);
    assert_ne!(c, 0);
    assert!(e.contains("already holds"), "{e}");
    for (name, why) in [
        ("", "empty"),
        ("a/b", "'/'"),
        (&"x".repeat(300) as &str, "limit"),
    ] {
        let (c, _, e) = run(&["volume", "create", name, "--size", "1G", "a.img"], &dir);
        assert_ne!(c, 0, "{name}");
        assert!(e.contains(why), "{e}");
    }
    let (c, _, e) = run(
        &["volume", "create", "v", "--size", "99999999999T", "a.img"],
        &dir,
    );
    assert_eq!(c, 2);
    assert!(e.contains("too large"), "{e}");
    // Truncated and corrupt superblocks: clear error naming the device, nothing lost.
    std::fs::write(dir.join("tiny.img"), b"short").unwrap();
    let (c, _, e) = run(&["usage", "tiny.img"], &dir);
    assert_eq!(c, 2);
    assert!(e.contains("tiny.img") && e.contains("superblock"), "{e}");
    ok(&["mkfs", "--size", "64M", "o.img"], &dir);
    let (c, _, e) = run(&["usage", "a.img", "o.img"], &dir);
    assert_eq!(c, 2);
    assert!(e.contains("belongs to pool"), "{e}");
    let (c, _, e) = run(&["usage", "missing.img"], &dir);
    assert_eq!(c, 2);
    assert!(e.contains("missing.img"), "{e}");
    // A pool with a device left out names what is missing.
    ok(&["mkfs", "--size", "64M", "m1.img", "m2.img"], &dir);
    let (c, _, e) = run(&["usage", "m1.img"], &dir);
    assert_eq!(c, 2);
    assert!(e.contains("missing devid 2"), "{e}");
    // Corrupt the primary superblock: the mirror copy at 64 MiB is absent on a
    // 64 MiB device, so the device is reported, not opened wrongly.
    corrupt_sector(&dir.join("a.img"), 64 << 10);
    let (c, _, e) = run(&["usage", "a.img"], &dir);
    assert_eq!(c, 2);
    assert!(e.contains("a.img") && e.contains("checksum"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_device_named_twice_is_refused_and_a_failed_mkfs_removes_its_files() {
    let dir = tempdir("twice");
    // mkfs naming one file twice, by the same name and through a symlink.
    let (c, _, e) = run(&["mkfs", "--size", "64M", "a.img", "a.img"], &dir);
    assert_eq!(c, 2, "{e}");
    assert!(e.contains("are the same device"), "{e}");
    assert!(
        !dir.join("a.img").exists(),
        "the failed mkfs left a.img behind"
    );
    ok(
        &[
            "mkfs",
            "--data",
            "raid1",
            "--metadata",
            "raid1",
            "--size",
            "64M",
            "a.img",
            "b.img",
        ],
        &dir,
    );
    std::os::unix::fs::symlink(dir.join("a.img"), dir.join("link.img")).unwrap();
    let (c, _, e) = run(&["usage", "a.img", "link.img"], &dir);
    assert_eq!(c, 2, "{e}");
    assert!(e.contains("a.img and link.img are the same device"), "{e}");
    assert!(!e.contains("in use"), "{e}");
    // A failed mkfs removes the files it created, and only those.
    let before = std::fs::read(dir.join("b.img")).unwrap();
    let (c, _, e) = run(
        &[
            "mkfs", "--data", "raid1c3", "--size", "64M", "new1.img", "new2.img", "b.img",
        ],
        &dir,
    );
    assert_ne!(c, 0, "{e}");
    assert!(e.contains("b.img: already holds"), "{e}");
    assert!(
        !dir.join("new1.img").exists() && !dir.join("new2.img").exists(),
        "{e}"
    );
    assert_eq!(
        std::fs::read(dir.join("b.img")).unwrap(),
        before,
        "b.img was changed"
    );
    // A dangling symlink to a new file is one device named twice: mkfs fails,
    // removes the file it created, and keeps the user's symlink.
    std::os::unix::fs::symlink(dir.join("c.img"), dir.join("to-c.img")).unwrap();
    let (c, _, e) = run(&["mkfs", "--size", "64M", "c.img", "to-c.img"], &dir);
    assert_eq!(c, 2, "{e}");
    assert!(e.contains("are the same device"), "{e}");
    assert!(!dir.join("c.img").exists(), "c.img left behind");
    assert!(
        std::fs::symlink_metadata(dir.join("to-c.img")).is_ok(),
        "the user's symlink was removed"
    );
}

#[test]
fn dump_tree_names_item_types() {
    let dir = tempdir("dumptree");
    ok(&["mkfs", "--size", "64M", "a.img"], &dir);
    ok(&["volume", "create", "v", "--size", "1G", "a.img"], &dir);
    let out = ok(&["dump-tree", "--tree", "volume", "a.img"], &dir);
    assert!(out.contains("item (1 VOLUME_ITEM 256)"), "{out}");
    assert!(out.contains("item (256 ROOT_ITEM 0)"), "{out}");
    assert!(!out.contains("VOLUME_EXTENT"), "{out}");
    let out = ok(&["dump-tree", "--tree", "chunk", "a.img"], &dir);
    assert!(
        out.contains(" DEV_ITEM ") && out.contains(" CHUNK "),
        "{out}"
    );
    // 2,000 sectors, every other one a hole: 1,000 mappings in v's own tree.
    let mut img = vec![0u8; 2000 * 4096];
    for (i, s) in img.chunks_mut(8192).enumerate() {
        s[..4096].fill(i as u8 | 1);
    }
    std::fs::write(dir.join("v.raw"), &img).unwrap();
    ok(&["volume", "import", "v", "v.raw", "a.img"], &dir);
    let out = ok(&["dump-tree", "--tree", "volume:v", "a.img"], &dir);
    assert!(out.starts_with("volume:v tree (id 256,"), "{out}");
    assert_eq!(
        out.matches("item (256 VOLUME_EXTENT ").count(),
        1000,
        "{out}"
    );
    let (c, _, e) = run(&["dump-tree", "--tree", "volume:w", "a.img"], &dir);
    assert_eq!(c, 2);
    assert!(
        e.contains("unknown tree 'volume:w'") && e.contains("volume:v"),
        "{e}"
    );
    // A reader that stops early (far more than a pipe buffer is printed).
    let o = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "set -o pipefail; {} dump-tree a.img | head -c 100 >/dev/null",
            env!("CARGO_BIN_EXE_chunkvol")
        ))
        .current_dir(&dir)
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success() && !e.contains("panicked"), "{e}");
}
