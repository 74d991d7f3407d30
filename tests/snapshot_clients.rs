//! Snapshots and clones served over NBD, checked with real clients: qemu-io
//! pattern reads, nbdcopy + cmp, nbdinfo, and libnbd writes that the server
//! refuses with EPERM (issue 14, acceptance 1 and 2).

mod serve_harness;

use std::process::Command;

use serde_json::Value;
use serve_harness::{
    cmp_files, cv_json, cv_ok, make_pool, nbdinfo_map_context, nbdinfo_read_only, offline_check,
    python_with_libnbd, qemu_io, require_tools, run, run_ok, tool, Out, Server, TestDir,
    CMD_TIMEOUT, MIB,
};

/// A write that skips libnbd's own read-only check, so the server decides.
/// Prints the errno it got.
const WRITE_PY: &str = r#"
import nbd, sys
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
print("read_only", h.is_read_only())
try:
    h.pwrite(b'\x11' * 4096, 0)
    print("write ok")
except nbd.Error as e:
    print("write refused errno", e.errno)
"#;

/// qemu-io on a read-only export (`-r`: qemu refuses to open one for
/// writing), every pattern verified.
fn qemu_io_ro(uri: &str, cmds: &[String]) -> Out {
    let mut c = Command::new(tool("qemu-io"));
    c.args(["-r", "-f", "raw", uri]);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    let o = run(&mut c, CMD_TIMEOUT);
    assert!(
        o.code == 0 && !o.all().contains("failed"),
        "qemu-io -r read back wrong data or failed:\n{}",
        o.text()
    );
    o
}

fn r(p: u8, off: u64, len: u64) -> String {
    format!("read -P {p:#x} {off} {len}")
}

fn w(p: u8, off: u64, len: u64) -> String {
    format!("write -P {p:#x} {off} {len}")
}

#[test]
fn snapshot_and_clone_through_nbd_clients() {
    require_tools(&["qemu-io", "nbdcopy", "nbdinfo", "cmp"]);
    let dir = TestDir::new("snapshot-clients");
    let devs = make_pool(&dir, "1G", "64M");
    let mut srv = Server::start(&dir, &devs, 2);
    let live = srv.uri("disk0");
    qemu_io(&live, &[w(0xa1, 0, 8 * MIB), w(0xb2, 16 * MIB, 4 * MIB)]);
    // No flush by the client: the snapshot holds every acknowledged write.
    cv_ok(&[
        "volume",
        "snapshot",
        "disk0",
        "snap",
        "--socket",
        srv.sock(),
    ]);
    qemu_io(
        &live,
        &[
            w(0xc3, 0, MIB),
            "discard 16M 2M".into(),
            "write -z 2M 1M".into(),
        ],
    );
    qemu_io(
        &live,
        &[r(0xc3, 0, MIB), r(0, 2 * MIB, MIB), r(0, 16 * MIB, 2 * MIB)],
    );
    let snap = srv.uri("snap");
    let old = [
        r(0xa1, 0, 8 * MIB),
        r(0, 8 * MIB, 8 * MIB),
        r(0xb2, 16 * MIB, 4 * MIB),
    ];
    qemu_io_ro(&snap, &old);
    // nbdcopy of the snapshot equals the content written before it.
    let mut want = vec![0u8; 64 * MIB as usize];
    want[..8 * MIB as usize].fill(0xa1);
    want[16 * MIB as usize..20 * MIB as usize].fill(0xb2);
    let want_path = dir.join("want.bin");
    std::fs::write(&want_path, &want).unwrap();
    let got = dir.join("snap.bin");
    run_ok(
        Command::new(tool("nbdcopy")).arg(&snap).arg(&got),
        CMD_TIMEOUT,
    );
    cmp_files(&want_path, &got);

    // Read-only: announced, and refused by the server with EPERM.
    assert!(
        nbdinfo_read_only(&snap),
        "nbdinfo: the snapshot is writable"
    );
    assert!(!nbdinfo_read_only(&live));
    let o = run_ok(
        Command::new(python_with_libnbd()).args(["-c", WRITE_PY, &snap]),
        CMD_TIMEOUT,
    );
    assert_eq!(
        o.stdout.trim(),
        "read_only True\nwrite refused errno EPERM",
        "{}",
        o.text()
    );

    // A clone of the snapshot diverges from it.
    cv_ok(&["volume", "clone", "snap", "work", "--socket", srv.sock()]);
    let work = srv.uri("work");
    assert!(!nbdinfo_read_only(&work));
    qemu_io(&work, &[w(0xd4, 4 * MIB, MIB), "discard 18M 2M".into()]);
    qemu_io(
        &work,
        &[
            r(0xa1, 0, 4 * MIB),
            r(0xd4, 4 * MIB, MIB),
            r(0xa1, 5 * MIB, 3 * MIB),
            r(0xb2, 16 * MIB, 2 * MIB),
            r(0, 18 * MIB, 2 * MIB),
        ],
    );
    qemu_io_ro(&snap, &old);

    // Deleting the source leaves the snapshot and the clone intact.
    cv_ok(&["volume", "delete", "disk0", "--socket", srv.sock()]);
    qemu_io_ro(&snap, &old);
    qemu_io(&work, &[r(0xd4, 4 * MIB, MIB), r(0xb2, 16 * MIB, 2 * MIB)]);
    srv.stop();
    offline_check(&devs, true);
    srv.launch();
    qemu_io_ro(&srv.uri("snap"), &old);
    srv.stop();
}

/// Bytes used per block-group type in `usage --json`.
fn used_by_type(u: &Value) -> std::collections::BTreeMap<String, u64> {
    let mut m = std::collections::BTreeMap::new();
    for g in u["block_groups"].as_array().expect("block_groups") {
        *m.entry(g["type"].as_str().unwrap().to_string())
            .or_default() += g["used_bytes"].as_u64().unwrap();
    }
    m
}

/// Delete returns at once and the cleaner frees the space in the
/// background; a kill -9 right after the deletes leaves them to finish
/// after the restart, down to the empty pool's usage (issue 14,
/// acceptance 3).
#[test]
fn delete_frees_space_in_the_background_across_kill_9() {
    require_tools(&["nbdcopy", "qemu-io"]);
    let dir = TestDir::new("snapshot-delete");
    let devs = make_pool(&dir, "1G", "256M");
    let mut srv = Server::start(&dir, &devs, 1);
    let empty = used_by_type(&srv.usage());
    let input = dir.join("in.bin");
    serve_harness::write_random_file(&input, 96 * MIB, 0x5eed_0014);
    run_ok(
        Command::new(tool("nbdcopy"))
            .arg(&input)
            .arg(srv.uri("disk0")),
        CMD_TIMEOUT,
    );
    cv_ok(&["volume", "snapshot", "disk0", "s1", "--socket", srv.sock()]);
    qemu_io(&srv.uri("disk0"), &[w(0x42, 8 * MIB, 16 * MIB)]);
    cv_ok(&["volume", "clone", "s1", "c1", "--socket", srv.sock()]);
    qemu_io(&srv.uri("c1"), &[w(0x43, 40 * MIB, 8 * MIB)]);
    for v in ["disk0", "s1", "c1"] {
        cv_ok(&["volume", "delete", v, "--socket", srv.sock()]);
    }
    srv.kill9();
    srv.launch();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let u = srv.usage();
        if u["volumes_being_deleted"] == 0 && used_by_type(&u)["data"] == empty["data"] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "space not back after the restart: {u}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let vols = srv.volumes();
    assert_eq!(vols["volumes"].as_array().unwrap().len(), 0, "{vols}");
    // Metadata: the fixed trees keep their own size, within a MiB.
    let meta = used_by_type(&srv.usage())["metadata"];
    assert!(
        meta <= empty["metadata"] + MIB,
        "metadata used {meta} vs {} empty",
        empty["metadata"]
    );
    srv.stop();
    offline_check(&devs, true);
}

/// Sector size of the changed-block model.
const SECTOR: u64 = 4096;

/// Which write (op number) maps each sector, or 0 for a hole.
type Model = Vec<u32>;

/// Ranges (offset, length) where `a` and `b` map different writes.
fn changed(a: &Model, b: &Model) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x == y {
            continue;
        }
        let o = i as u64 * SECTOR;
        match out.last_mut() {
            Some((s, l)) if *s + *l == o => *l += SECTOR,
            _ => out.push((o, SECTOR)),
        }
    }
    out
}

/// `count` random writes, discards and write-zeroes through one qemu-io run,
/// recorded in `model` (a discard or zeroing leaves a hole).
fn random_ops(uri: &str, model: &mut Model, op: &mut u32, rng: &mut u64, count: usize) {
    let sectors = model.len() as u64;
    let mut next = || {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng
    };
    let mut cmds = Vec::new();
    for _ in 0..count {
        *op += 1;
        let a = next() % (sectors - 1);
        let n = 1 + next() % 64.min(sectors - a);
        let (off, len) = (a * SECTOR, n * SECTOR);
        let range = a as usize..(a + n) as usize;
        match next() % 4 {
            0 => {
                cmds.push(format!("discard {off} {len}"));
                model[range].fill(0);
            }
            1 => {
                cmds.push(format!("write -z {off} {len}"));
                model[range].fill(0);
            }
            _ => {
                // Never pattern 0: an all-zero write is stored as a hole.
                cmds.push(w(1 + (*op % 255) as u8, off, len));
                model[range].fill(*op);
            }
        }
    }
    qemu_io(uri, &cmds);
}

/// The dirty ranges of `qemu:dirty-bitmap:BITMAP` on `uri`, read by
/// `nbdinfo --map`; the map must cover the whole export.
fn dirty_map(uri: &str, bitmap: &str, size: u64) -> Vec<(u64, u64)> {
    let map = nbdinfo_map_context(uri, &format!("qemu:dirty-bitmap:{bitmap}"));
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = 0;
    for (off, len, ty) in map {
        assert_eq!(off, pos, "nbdinfo map has a gap or overlap at {off:#x}");
        pos += len;
        if ty & 1 == 0 {
            continue;
        }
        match out.last_mut() {
            Some((s, l)) if *s + *l == off => *l += len,
            _ => out.push((off, len)),
        }
    }
    assert_eq!(pos, size, "nbdinfo map does not cover the export");
    out
}

/// `volume diff OLD NEW --json` as (offset, length) ranges.
fn cli_diff(sock: &str, old: &str, new: &str) -> Vec<(u64, u64)> {
    let v = cv_json(&["volume", "diff", old, new, "--json", "--socket", sock]);
    let ranges = v["changed"]
        .as_array()
        .unwrap_or_else(|| panic!("diff: {v}"));
    let range = |r: &Value| {
        let field = |f: &str| r[f].as_u64().unwrap_or_else(|| panic!("diff: {r}"));
        (field("offset_bytes"), field("length_bytes"))
    };
    ranges.iter().map(range).collect()
}

/// Both contexts in one BLOCK_STATUS: every reply carries a `base:allocation`
/// chunk and a dirty-bitmap chunk. Prints the dirty ranges it saw.
const TWO_CONTEXTS_PY: &str = r#"
import nbd, sys
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:dirty-bitmap:" + sys.argv[2])
h.connect_uri(sys.argv[1])
assert h.can_meta_context("base:allocation")
assert h.can_meta_context("qemu:dirty-bitmap:" + sys.argv[2])
size, off, dirty = h.get_size(), 0, []
while off < size:
    seen = {}
    def cb(ctx, o, entries, err):
        seen[ctx] = entries
        return 0
    h.block_status(min(size - off, 1 << 30), off, cb)
    assert len(seen) == 2, seen.keys()
    e = seen["qemu:dirty-bitmap:" + sys.argv[2]]
    p = off
    for i in range(0, len(e), 2):
        if e[i + 1] & 1:
            dirty.append((p, e[i]))
        p += e[i]
    off = p
for o, l in dirty:
    print(o, l)
"#;

/// Changed-block tracking over NBD (issue 14, acceptance 5): after random
/// writes, discards and write-zeroes, `nbdinfo --map=qemu:dirty-bitmap:SNAP`
/// shows exactly the ranges a sector model says changed since SNAP, on the
/// live volume and on a later snapshot, and `volume diff` agrees.
#[test]
fn dirty_bitmap_context_matches_a_model() {
    require_tools(&["qemu-io", "nbdinfo"]);
    let dir = TestDir::new("dirty-bitmap");
    let size = 64 * MIB;
    let devs = make_pool(&dir, "1G", "64M");
    let mut srv = Server::start(&dir, &devs, 2);
    let live = srv.uri("disk0");
    let sock = srv.sock().to_owned();
    let (mut model, mut op, mut rng) = (vec![0u32; (size / SECTOR) as usize], 0, 0x5eed_u64);
    random_ops(&live, &mut model, &mut op, &mut rng, 300);
    cv_ok(&["volume", "snapshot", "disk0", "s1", "--socket", &sock]);
    let at_s1 = model.clone();
    assert_eq!(dirty_map(&live, "s1", size), [], "nothing changed yet");
    random_ops(&live, &mut model, &mut op, &mut rng, 60);
    let want = changed(&at_s1, &model);
    assert!(!want.is_empty());
    assert_eq!(dirty_map(&live, "s1", size), want, "live since s1");
    assert_eq!(cli_diff(&sock, "s1", "disk0"), want);
    cv_ok(&["volume", "snapshot", "disk0", "s2", "--socket", &sock]);
    let at_s2 = model.clone();
    random_ops(&live, &mut model, &mut op, &mut rng, 40);
    // Incremental backup reads the newer snapshot with the older one's bitmap.
    let s2 = srv.uri("s2");
    assert_eq!(dirty_map(&s2, "s1", size), changed(&at_s1, &at_s2));
    assert_eq!(dirty_map(&live, "s2", size), changed(&at_s2, &model));
    assert_eq!(dirty_map(&live, "s1", size), changed(&at_s1, &model));
    // nbdinfo lists the bitmaps among the export's contexts.
    let o = run_ok(
        Command::new(tool("nbdinfo")).args(["--json", &live]),
        CMD_TIMEOUT,
    );
    let info: Value = serde_json::from_str(&o.stdout).unwrap();
    let contexts = &info["exports"][0]["contexts"];
    for c in [
        "base:allocation",
        "qemu:dirty-bitmap:s1",
        "qemu:dirty-bitmap:s2",
    ] {
        let listed = contexts
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == c));
        assert!(listed, "nbdinfo does not list {c}: {contexts}");
    }
    // Two contexts at once: one chunk each per reply.
    let o = run_ok(
        Command::new(python_with_libnbd()).args(["-c", TWO_CONTEXTS_PY, &live, "s1"]),
        CMD_TIMEOUT,
    );
    let seen: Vec<(u64, u64)> = o
        .stdout
        .lines()
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect();
    assert_eq!(
        merge(seen),
        changed(&at_s1, &model),
        "libnbd with two contexts"
    );
    // A bitmap that is not a snapshot is not offered.
    let o = run(
        Command::new(tool("nbdinfo")).args(["--map=qemu:dirty-bitmap:nope", &live]),
        CMD_TIMEOUT,
    );
    assert_ne!(o.code, 0, "nbdinfo mapped an unknown bitmap:\n{}", o.text());
    srv.stop();
}

/// Adjacent ranges joined.
fn merge(ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (o, l) in ranges {
        match out.last_mut() {
            Some((s, n)) if *s + *n == o => *n += l,
            _ => out.push((o, l)),
        }
    }
    out
}
