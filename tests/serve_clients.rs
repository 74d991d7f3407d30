//! `chunkvol serve` driven by real NBD clients: qemu-io, nbdcopy, qemu-img,
//! nbdinfo, fio, libnbd (Python), and a kernel ext4 on nbdfuse + loop.
//!
//! Every test starts its own server on a free loopback port with its own
//! pool in its own directory, so tests can run two at a time. The tools are
//! required: a missing one fails the test (scripts/install-test-deps.sh
//! installs them; the crash test also needs python3-libnbd).
//!
//! Run: `cargo test --release --test serve_clients -- --test-threads=2`

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

mod serve_harness;
use serve_harness::*;

/// How long the fio test writes and verifies (seconds).
const FIO_RUNTIME_SECS: u64 = 30;

// ---------------------------------------------------------------------------
// 1. qemu-io

#[test]
fn qemu_io_patterns_aligned_and_unaligned() {
    require_tools(&["qemu-io"]);
    let dir = TestDir::new("qemu-io");
    let devs = make_pool(&dir, "2G", "1G");
    let mut srv = Server::start(&dir, &devs, 2);
    let uri = srv.uri("disk0");

    let c = |v: &str| v.to_string();
    let w = |p: u8, off: u64, len: u64| format!("write -P {p:#x} {off} {len}");
    let r = |p: u8, off: u64, len: u64| format!("read -P {p:#x} {off} {len}");

    // Final contents, checked again after a restart.
    let mut fin: Vec<String> = Vec::new();
    // [0, 2M): a 1 MiB pattern, then unaligned overwrites inside it and
    // across its end; then an aligned discard of the first MiB.
    let mut cmds: Vec<String> = vec![
        w(0xab, 0, MIB),
        r(0xab, 0, MIB),
        w(0x11, 513, 1000),
        w(0x22, 4097, 70000),
        w(0x33, MIB - 7, 20),
    ];
    let mid = vec![
        r(0xab, 0, 513),
        r(0x11, 513, 1000),
        r(0xab, 1513, 4097 - 1513),
        r(0x22, 4097, 70000),
        r(0xab, 74097, MIB - 7 - 74097),
        r(0x33, MIB - 7, 20),
        r(0, MIB + 13, MIB - 13),
    ];
    cmds.extend(mid);
    cmds.push(format!("discard 0 {MIB}"));
    let after_discard = vec![r(0, 0, MIB), r(0x33, MIB, 13), r(0, MIB + 13, MIB - 13)];
    cmds.extend(after_discard.clone());
    fin.extend(after_discard);

    // [4M, 8M): unaligned write-zeroes inside a pattern; an aligned one too.
    let (za, zl) = (5 * MIB + 513, 2 * MIB - 1000);
    cmds.push(w(0x44, 4 * MIB, 4 * MIB));
    cmds.push(format!("write -z {za} {zl}"));
    cmds.push(format!("write -z {} {}", 7 * MIB + 4 * KIB, 8 * KIB));
    let zeroed = vec![
        r(0x44, 4 * MIB, za - 4 * MIB),
        r(0, za, zl),
        r(0x44, za + zl, 7 * MIB + 4 * KIB - (za + zl)),
        r(0, 7 * MIB + 4 * KIB, 8 * KIB),
        r(0x44, 7 * MIB + 12 * KIB, MIB - 12 * KIB),
    ];
    cmds.extend(zeroed.clone());
    fin.extend(zeroed);

    // [8M, 10M): an unaligned discard leaves its neighbours alone (what it
    // trims is unspecified by NBD, so it is not read).
    cmds.push(w(0x66, 8 * MIB, 2 * MIB));
    cmds.push(format!("discard {} {}", 8 * MIB + 100, MIB - 200));
    let nb = vec![r(0x66, 8 * MIB, 100), r(0x66, 9 * MIB - 100, MIB + 100)];
    cmds.extend(nb.clone());
    fin.extend(nb);

    // [2M, 4M): pipelined writes, then one flush.
    cmds.push(c("aio_write -P 0x55 2097152 65536"));
    cmds.push(format!(
        "aio_write -P 0x56 {} 3000",
        2 * MIB + 64 * KIB + 513
    ));
    cmds.push(format!("aio_write -P 0x57 {} {}", 3 * MIB, MIB));
    cmds.push(format!("aio_write -P 0x58 {} 4096", 2 * MIB + 512 * KIB));
    cmds.push(c("aio_flush"));
    let aio = vec![
        r(0x55, 2 * MIB, 64 * KIB),
        r(0, 2 * MIB + 64 * KIB, 513),
        r(0x56, 2 * MIB + 64 * KIB + 513, 3000),
        r(0, 2 * MIB + 64 * KIB + 3513, 512 * KIB - 64 * KIB - 3513),
        r(0x58, 2 * MIB + 512 * KIB, 4096),
        r(0, 2 * MIB + 516 * KIB, 508 * KIB),
        r(0x57, 3 * MIB, MIB),
    ];
    cmds.extend(aio.clone());
    fin.extend(aio);

    // FUA write across a 512 MiB boundary, in a hole.
    cmds.push(format!("write -f -P 0x77 {} 9", 512 * MIB - 3));
    let fua = vec![
        r(0, 512 * MIB - 4096, 4093),
        r(0x77, 512 * MIB - 3, 9),
        r(0, 512 * MIB + 6, 4096 - 6),
    ];
    cmds.extend(fua.clone());
    fin.extend(fua);

    // A write larger than the 32 MiB maximum request (qemu splits it), then
    // an unaligned overwrite of 2 bytes straddling a 4 KiB boundary.
    cmds.push(w(0x99, 64 * MIB, 40 * MIB));
    cmds.push(w(0xaa, 64 * MIB + 4095, 2));
    let big = vec![
        r(0x99, 64 * MIB, 4095),
        r(0xaa, 64 * MIB + 4095, 2),
        r(0x99, 64 * MIB + 4097, 40 * MIB - 4097),
        r(0, 104 * MIB, 4096),
    ];
    cmds.extend(big.clone());
    fin.extend(big);

    // The last bytes of the export.
    cmds.push(w(0x88, GIB - 4097, 4097));
    let end = vec![r(0, GIB - 8192, 4095), r(0x88, GIB - 4097, 4097)];
    cmds.extend(end.clone());
    fin.extend(end);
    cmds.push(c("flush"));

    qemu_io(&uri, &cmds);
    // A second connection sees the same bytes.
    qemu_io(&uri, &fin);
    srv.restart();
    qemu_io(&srv.uri("disk0"), &fin);
    srv.stop();
    offline_check(&devs, true);
}

// ---------------------------------------------------------------------------
// 2. nbdcopy + qemu-img compare

#[test]
fn nbdcopy_512m_roundtrip_survives_restart() {
    require_tools(&["nbdcopy", "qemu-img", "cmp"]);
    let dir = TestDir::new("nbdcopy");
    let devs = make_pool(&dir, "2G", "512M");
    let mut srv = Server::start(&dir, &devs, 2);
    let input = dir.join("in.bin");
    write_random_file(&input, 512 * MIB, 0x5eed_0002);

    let t = Instant::now();
    run_ok(
        Command::new(tool("nbdcopy"))
            .arg(&input)
            .arg(srv.uri("disk0")),
        CMD_TIMEOUT,
    );
    eprintln!("nbdcopy in: {:?}", t.elapsed());
    let out = dir.join("out.bin");
    run_ok(
        Command::new(tool("nbdcopy"))
            .arg(srv.uri("disk0"))
            .arg(&out),
        CMD_TIMEOUT,
    );
    cmp_files(&input, &out);
    qemu_img_compare(&input, &srv.uri("disk0"));
    assert_eq!(srv.volume_allocated("disk0"), 512 * MIB);

    srv.stop();
    offline_check(&devs, false);
    srv.launch();
    fs::remove_file(&out).unwrap();
    run_ok(
        Command::new(tool("nbdcopy"))
            .arg(srv.uri("disk0"))
            .arg(&out),
        CMD_TIMEOUT,
    );
    cmp_files(&input, &out);
    qemu_img_compare(&input, &srv.uri("disk0"));
    srv.stop();
}

// ---------------------------------------------------------------------------
// 3. nbdinfo --list with volumes created online; the map shows a trim

#[test]
fn nbdinfo_lists_online_volumes_and_maps_trimmed_hole() {
    require_tools(&["nbdinfo", "qemu-io", "qemu-img"]);
    let dir = TestDir::new("nbdinfo");
    let devs = make_pool(&dir, "2G", "1G");
    let mut srv = Server::start(&dir, &devs, 2);
    for name in ["extra1", "extra2"] {
        cv_ok(&[
            "volume",
            "create",
            name,
            "--size",
            "64M",
            "--socket",
            srv.sock(),
        ]);
    }
    let o = run_ok(
        Command::new(tool("nbdinfo")).args(["--list", "--json", &srv.base_uri()]),
        CMD_TIMEOUT,
    );
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    let mut got: Vec<(String, u64)> = v["exports"]
        .as_array()
        .unwrap_or_else(|| panic!("no exports:\n{}", o.text()))
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().unwrap().to_string(),
                e["export-size"].as_u64().unwrap(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("disk0".to_string(), GIB),
            ("extra1".to_string(), 64 * MIB),
            ("extra2".to_string(), 64 * MIB)
        ],
        "nbdinfo --list:\n{}",
        o.text()
    );
    // The plain listing names them too.
    let o = run_ok(
        Command::new(tool("nbdinfo")).args(["--list", &srv.base_uri()]),
        CMD_TIMEOUT,
    );
    for n in ["disk0", "extra1", "extra2"] {
        assert!(
            o.stdout.contains(&format!("export=\"{n}\"")),
            "{}",
            o.text()
        );
    }

    // Map: write 8 MiB, trim the middle 4 MiB.
    let uri = srv.uri("extra1");
    let (a, b) = (16 * MIB, 24 * MIB);
    qemu_io(
        &uri,
        &[format!("write -P 0x5a {a} {}", b - a), "flush".into()],
    );
    let m = nbdinfo_map(&uri);
    map_range_is(&m, a, b, false, "after the write");
    map_range_is(&m, 0, a, true, "never written head");
    map_range_is(&m, b, 64 * MIB, true, "never written tail");
    qemu_io(
        &uri,
        &[
            format!("discard {} {}", a + 2 * MIB, 4 * MIB),
            "flush".into(),
        ],
    );
    let m = nbdinfo_map(&uri);
    map_range_is(&m, a, a + 2 * MIB, false, "kept head of the write");
    map_range_is(&m, a + 2 * MIB, a + 6 * MIB, true, "trimmed middle");
    map_range_is(&m, a + 6 * MIB, b, false, "kept tail of the write");
    qemu_io(
        &uri,
        &[
            format!("read -P 0x5a {a} {}", 2 * MIB),
            format!("read -P 0 {} {}", a + 2 * MIB, 4 * MIB),
            format!("read -P 0x5a {} {}", a + 6 * MIB, 2 * MIB),
        ],
    );
    // qemu-img map agrees: the trimmed middle is zero and not data.
    let o = run_ok(
        Command::new(tool("qemu-img")).args(["map", "-f", "raw", "--output=json", &uri]),
        CMD_TIMEOUT,
    );
    let qm: Value = serde_json::from_str(&o.stdout).unwrap();
    let ext: Vec<(u64, u64, bool)> = qm
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (u64f(e, "start"), u64f(e, "length"), e["data"] == true))
        .collect();
    let data_at = |x: u64| {
        ext.iter()
            .find(|&&(st, l, _)| st <= x && x < st + l)
            .unwrap_or_else(|| panic!("qemu-img map has no extent at {x}:\n{}", o.stdout))
            .2
    };
    assert!(data_at(a) && data_at(a + 2 * MIB - 1), "{}", o.stdout);
    assert!(
        !data_at(a + 2 * MIB) && !data_at(a + 6 * MIB - 1),
        "{}",
        o.stdout
    );
    assert!(data_at(a + 6 * MIB) && data_at(b - 1), "{}", o.stdout);

    // The other new volume is a working disk.
    let u2 = srv.uri("extra2");
    qemu_io(
        &u2,
        &["write -P 0x21 0 64M".into(), "read -P 0x21 0 64M".into()],
    );
    srv.stop();
    offline_check(&devs, false);
}

// ---------------------------------------------------------------------------
// 4. fio, two jobs on separate ranges, verified random writes

#[test]
fn fio_two_jobs_randwrite_verify_then_check() {
    require_tools(&["fio"]);
    let dir = TestDir::new("fio");
    let devs = make_pool(&dir, "2G", "1G");
    let mut srv = Server::start(&dir, &devs, 2);
    let uri = srv.uri("disk0");
    let o = run(
        fio_verify_cmd(&uri, 2, "256M", FIO_RUNTIME_SECS, "4k").current_dir(dir.join("")),
        Duration::from_secs(FIO_RUNTIME_SECS + 180),
    );
    assert_fio_clean(&o, 2);
    srv.stop();
    offline_check(&devs, false);
}

// ---------------------------------------------------------------------------
// 5. Trimming everything gives emptied data block groups back

#[test]
fn trim_reclaims_emptied_data_block_groups() {
    require_tools(&["qemu-io"]);
    let dir = TestDir::new("reclaim");
    let devs = make_pool(&dir, "2G", "1G");
    let interval = 2;
    let mut srv = Server::start(&dir, &devs, interval);
    let uri = srv.uri("disk0");
    let u0 = srv.usage();

    qemu_io(&uri, &["write -P 0x5c 0 1G".into(), "flush".into()]);
    let u1 = srv.usage();
    let full: Vec<&Value> = data_bgs(&u1)
        .into_iter()
        .filter(|b| u64f(b, "used_bytes") > 0)
        .collect();
    let used: u64 = full.iter().map(|b| u64f(b, "used_bytes")).sum();
    assert!(
        full.len() >= 3,
        "1 GiB of data should span at least 3 data block groups:\n{u1:#}"
    );
    assert_eq!(used, GIB, "data used_bytes after writing 1 GiB:\n{u1:#}");
    assert_eq!(srv.volume_allocated("disk0"), GIB);

    qemu_io(&uri, &[format!("discard 0 {GIB}"), "flush".into()]);
    let t = Instant::now();
    let u2 = poll_until(
        Duration::from_secs(2 * interval + 10),
        "the cleaner to delete the emptied data block groups",
        || {
            let u = srv.usage();
            let d = data_bgs(&u);
            let used: u64 = d.iter().map(|b| u64f(b, "used_bytes")).sum();
            (d.len() <= 1 && used == 0).then_some(u)
        },
    );
    eprintln!(
        "reclaimed after {:?} (commit interval {interval} s)",
        t.elapsed()
    );
    assert_eq!(srv.volume_allocated("disk0"), 0);
    // What is still allocated is the system and metadata groups plus at
    // most one (empty) data group, times two copies.
    let bgs = u2["block_groups"].as_array().unwrap();
    let non_data: u64 = bgs
        .iter()
        .filter(|b| b["type"] != "data")
        .map(|b| u64f(b, "length") * 2)
        .sum();
    let data: u64 = data_bgs(&u2).iter().map(|b| u64f(b, "length") * 2).sum();
    let alloc = u64f(&u2, "allocated_bytes");
    assert_eq!(
        alloc,
        non_data + data,
        "allocated_bytes vs block groups:\n{u2:#}"
    );
    let chunk = full.iter().map(|b| u64f(b, "length")).max().unwrap();
    assert!(data <= 2 * chunk, "{u2:#}");
    assert!(
        alloc <= u64f(&u0, "allocated_bytes").max(non_data + 2 * chunk),
        "allocated_bytes did not drop back: before {} after {}\n{u2:#}",
        u64f(&u0, "allocated_bytes"),
        alloc
    );
    assert!(
        u64f(&u1, "allocated_bytes") - alloc >= 2 * 2 * chunk,
        "at least two data chunks (both copies) should be gone: {} -> {}",
        u64f(&u1, "allocated_bytes"),
        alloc
    );

    // The freed space is usable again, and everything survives a restart.
    qemu_io(
        &uri,
        &[
            "write -P 0x77 0 1G".into(),
            "flush".into(),
            "read -P 0x77 0 1G".into(),
        ],
    );
    srv.restart();
    qemu_io(&srv.uri("disk0"), &["read -P 0x77 0 1G".into()]);
    srv.stop();
    offline_check(&devs, false);
}

// ---------------------------------------------------------------------------
// 6. ext4 on loop on nbdfuse

#[test]
fn ext4_on_nbdfuse_loop_fsck_clean_after_fstrim_and_restart() {
    require_tools(&[
        "nbdfuse",
        "losetup",
        "mkfs.ext4",
        "fsck.ext4",
        "mount",
        "umount",
        "fstrim",
        "fusermount3",
        "sha256sum",
        "sync",
    ]);
    let dir = TestDir::new("ext4");
    let devs = make_pool(&dir, "2G", "1G");
    let mut srv = Server::start(&dir, &devs, 2);
    let mut kd = KernelDisk::attach(&dir, &srv.uri("disk0"));
    run_ok(
        Command::new(tool("mkfs.ext4")).args(["-q", kd.dev()]),
        CMD_TIMEOUT,
    );
    kd.mount();

    // ~200 MiB of files: some large, many small, in a few directories.
    let mut names = Vec::new();
    let mut st = 0x6e78_7434u64;
    let mut total = 0u64;
    let mut i = 0;
    while total < 200 * MIB {
        let sub = format!("d{}", i % 5);
        fs::create_dir_all(kd.fs.join(&sub)).unwrap();
        let len = if i % 4 == 0 {
            8 * MIB + (i as u64 * 4099) % (8 * MIB)
        } else {
            1 + (i as u64 * 7919 * 13) % (200 * KIB)
        };
        let mut buf = vec![0u8; len as usize];
        fill_random(&mut buf, &mut st);
        let name = format!("{sub}/f{i:03}.bin");
        fs::write(kd.fs.join(&name), &buf).unwrap();
        names.push(name);
        total += len;
        i += 1;
    }
    eprintln!("wrote {} files, {} MiB", names.len(), total >> 20);
    let o = run_ok(
        Command::new(tool("sha256sum"))
            .args(&names)
            .current_dir(&kd.fs),
        CMD_TIMEOUT,
    );
    let manifest = dir.join("sha256.txt");
    fs::write(&manifest, &o.stdout).unwrap();

    // A scratch file, written and deleted: fstrim must give its space back.
    let scratch = kd.fs.join("scratch.bin");
    let mut buf = vec![0u8; 64 * MIB as usize];
    fill_random(&mut buf, &mut st);
    fs::write(&scratch, &buf).unwrap();
    run_ok(&mut Command::new(tool("sync")), CMD_TIMEOUT);
    let before = srv.volume_allocated("disk0");
    fs::remove_file(&scratch).unwrap();
    run_ok(&mut Command::new(tool("sync")), CMD_TIMEOUT);
    let o = run_ok(
        Command::new(tool("fstrim")).arg("-v").arg(&kd.fs),
        CMD_TIMEOUT,
    );
    eprintln!("{}", o.stdout.trim());
    run_ok(&mut Command::new(tool("sync")), CMD_TIMEOUT);
    let after = srv.volume_allocated("disk0");
    assert!(
        after + 48 * MIB <= before,
        "fstrim should have freed the deleted 64 MiB in the volume: allocated {before} -> {after}"
    );
    assert!(
        after >= total,
        "allocated {after} is less than the files ({total})"
    );

    kd.umount();
    run_ok(
        Command::new(tool("fsck.ext4")).args(["-fn", kd.dev()]),
        CMD_TIMEOUT,
    );
    kd.detach(true);

    // Everything again from the server's disks alone.
    srv.restart();
    let mut kd = KernelDisk::attach(&dir, &srv.uri("disk0"));
    let o = run(
        Command::new(tool("fsck.ext4")).args(["-fn", kd.dev()]),
        CMD_TIMEOUT,
    );
    assert_eq!(
        o.code,
        0,
        "fsck after the restart is not clean:\n{}",
        o.text()
    );
    kd.mount();
    let o = run(
        Command::new(tool("sha256sum"))
            .arg("-c")
            .arg("--quiet")
            .arg(&manifest)
            .current_dir(&kd.fs),
        CMD_TIMEOUT,
    );
    assert_eq!(o.code, 0, "file contents changed:\n{}", o.text());
    kd.detach(true);
    srv.stop();
    offline_check(&devs, false);
}

// ---------------------------------------------------------------------------
// 7. kill -9 while a client writes and flushes: every flushed write stays

const CRASHIO_PY: &str = r#####"
# Crash-consistency writer and verifier for an NBD export (libnbd bindings).
#
#   crashio.py write URI LOG SEED SEQ0 REGION MAXSECS
#   crashio.py verify URI LOG REGION STATE_IN STATE_OUT
#
# The region is cut into 4 KiB blocks. A block written by write number SEQ
# holds struct.pack('<QQ', SEQ, BLOCK) * 256, so its content names the write
# that put it there; a block zeroed by a WRITE_ZEROES holds zeroes.
#
# The writer uses two connections (the server advertises multi-conn, so a
# flush on either covers writes completed on both). Operations go in
# batches; within a batch no block is touched twice, and up to QD operations
# are in flight, spread over both connections. About one operation in eight
# is a WRITE_ZEROES, and one in eight carries FUA. Once the whole batch has
# been acknowledged, a FLUSH is sent on one of the connections (alternating),
# and once that is acknowledged "F LASTSEQ" is logged. Each operation is
# logged ("W SEQ BLOCK NBLOCKS FUA KIND", KIND w or z) before it is sent, and
# "A SEQ" once acknowledged.
#
# Oracle after a crash: let S be the seq of the last logged F. Each block
# must hold exactly its newest operation with seq <= S (or what it held
# before this round if there is none). A block touched by a later operation
# (seq > S) may hold that instead, and must hold it if the operation had FUA
# and was acknowledged. Any other content (torn, foreign, older) is an error.
import json
import random
import select
import struct
import sys
import time

import nbd

BS = 4096
QD = 16
BATCH = 48


def payload(seq, blk, n):
    return b"".join(struct.pack("<QQ", seq, blk + i) * (BS // 16) for i in range(n))


def pump(hs):
    """Wait (at most 1 s) for progress on any connection."""
    rl, wl = [], []
    for h in hs:
        if h.aio_in_flight() == 0:
            continue
        d = h.aio_get_direction()
        if d & nbd.AIO_DIRECTION_READ:
            rl.append(h.aio_get_fd())
        if d & nbd.AIO_DIRECTION_WRITE:
            wl.append(h.aio_get_fd())
    r, w, _ = select.select(rl, wl, [], 1.0)
    for h in hs:
        if h.aio_in_flight() == 0:
            continue
        fd = h.aio_get_fd()
        if fd in r:
            h.aio_notify_read()
        if fd in w:
            h.aio_notify_write()


def write(uri, logpath, seed, seq0, region, maxsecs):
    rng = random.Random(seed)
    nblk = region // BS
    log = open(logpath, "w", buffering=1)
    hs = []
    for _ in range(2):
        h = nbd.NBD()
        h.connect_uri(uri)
        assert h.can_multi_conn(), "server does not advertise multi-conn"
        hs.append(h)
    log.write("C connected\n")
    seq = seq0
    deadline = time.monotonic() + maxsecs
    batches = 0
    try:
        while time.monotonic() < deadline:
            used = set()
            todo = []
            while len(todo) < BATCH:
                n = rng.randint(1, 16)
                b = rng.randrange(0, nblk - n + 1)
                if any((b + i) in used for i in range(n)):
                    continue
                used.update(range(b, b + n))
                seq += 1
                kind = "z" if rng.random() < 0.125 else "w"
                todo.append((seq, b, n, rng.random() < 0.125, kind))
            inflight = {}  # (conn, cookie) -> (seq, buffer)
            k = 0
            while todo or inflight:
                while todo and len(inflight) < QD:
                    s, b, n, fua, kind = todo.pop(0)
                    h = hs[k % 2]
                    k += 1
                    log.write("W %d %d %d %d %s\n" % (s, b, n, int(fua), kind))
                    fl = nbd.CMD_FLAG_FUA if fua else 0
                    if kind == "z":
                        buf = None
                        c = h.aio_zero(n * BS, b * BS, flags=fl)
                    else:
                        buf = nbd.Buffer.from_bytearray(bytearray(payload(s, b, n)))
                        c = h.aio_pwrite(buf, b * BS, flags=fl)
                    inflight[(id(h), c)] = (s, buf, h, c)
                pump(hs)
                for key in list(inflight):
                    s, _, h, c = inflight[key]
                    if h.aio_command_completed(c):
                        log.write("A %d\n" % s)
                        del inflight[key]
            hs[batches % 2].flush()
            log.write("F %d\n" % seq)
            batches += 1
    except Exception as e:  # the server went away
        log.write("E %s\n" % str(e).replace("\n", " "))
        print("writer stopped after %d flushed batches: %s" % (batches, e))
        return 0
    print("writer ran out of time after %d batches (the server never went away)" % batches)
    return 2


def verify(uri, logpath, region, state_in, state_out):
    nblk = region // BS
    state = {}
    if state_in != "-":
        state = {int(k): v for k, v in json.load(open(state_in)).items()}
    flushed = dict(state)  # block -> seq that must be there (None: zeroes)
    ops = {}
    acked = set()
    last_f = -1
    for ln in open(logpath).read().splitlines():
        p = ln.split()
        if not p:
            continue
        if p[0] == "W":
            ops[int(p[1])] = (int(p[2]), int(p[3]), p[4] == "1", p[5])
        elif p[0] == "A":
            acked.add(int(p[1]))
        elif p[0] == "F":
            last_f = int(p[1])
    maybe = {}  # block -> what later operations may have left there
    for s in sorted(ops):
        b, n, fua, kind = ops[s]
        v = None if kind == "z" else s
        for i in range(n):
            if s <= last_f or (fua and s in acked):
                flushed[b + i] = v
            else:
                maybe.setdefault(b + i, set()).add(v)
    h = nbd.NBD()
    h.connect_uri(uri)
    zero = bytes(BS)
    bad = []
    actual = {}
    chunk = 4 << 20
    n_exact = n_later = 0
    for off in range(0, region, chunk):
        data = h.pread(min(chunk, region - off), off)
        for j in range(0, len(data), BS):
            blk = (off + j) // BS
            d = data[j:j + BS]
            want = flushed.get(blk)
            if d == zero:
                got = None
            else:
                got, who = struct.unpack("<QQ", d[:16])
                if who != blk or d != payload(got, blk, 1):
                    bad.append("block %d: torn or foreign content (header: write %d, block %d)"
                               % (blk, got, who))
                    continue
            if got == want:
                n_exact += 1
            elif got in maybe.get(blk, ()):
                n_later += 1
            else:
                bad.append("block %d: holds write %s, expected write %s%s (None: zeroes)" % (
                    blk, got, want,
                    (" or one of %s" % sorted(maybe[blk], key=str)) if blk in maybe else ""))
            if got is not None:
                actual[blk] = got
    h.shutdown()
    json.dump({str(k): v for k, v in actual.items()}, open(state_out, "w"))
    print("verified %d blocks: last acknowledged flush after op %d; %d ops logged "
          "(%d write-zeroes), %d acknowledged; %d blocks as flushed, %d hold a later "
          "unflushed op; %d bad" % (
              nblk, last_f, len(ops), sum(1 for o in ops.values() if o[3] == "z"),
              len(acked), n_exact, n_later, len(bad)))
    for b in bad[:50]:
        print("BAD " + b)
    return 1 if bad else 0


if __name__ == "__main__":
    a = sys.argv
    if a[1] == "write":
        sys.exit(write(a[2], a[3], int(a[4]), int(a[5]), int(a[6]), float(a[7])))
    if a[1] == "verify":
        sys.exit(verify(a[2], a[3], int(a[4]), a[5], a[6]))
    sys.exit("usage: crashio.py write|verify ...")
"#####;

#[test]
fn kill9_mid_write_keeps_every_flushed_write() {
    let py = python_with_libnbd();
    let dir = TestDir::new("crash");
    let devs = make_pool(&dir, "2G", "1G");
    let script = dir.join("crashio.py");
    fs::write(&script, CRASHIO_PY).unwrap();
    let region = 128 * MIB;
    // (commit interval, seconds of writing before kill -9)
    let rounds = [(2u64, 2.5f64), (1, 4.0), (5, 3.0)];
    let mut state_in = "-".to_string();
    let mut srv = Server::start(&dir, &devs, rounds[0].0);
    for (round, &(interval, secs)) in rounds.iter().enumerate() {
        if round > 0 {
            srv.interval = interval;
            srv.launch();
        }
        let log = dir.join(format!("writes{round}.log"));
        let out = dir.join(format!("writer{round}.out"));
        let mut writer = Command::new(&py)
            .arg(&script)
            .args(["write", &srv.uri("disk0"), s(&log)])
            .arg((1000 + round).to_string())
            .arg(((round as u64 + 1) * 1_000_000_000).to_string())
            .arg(region.to_string())
            .arg("120")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&out).unwrap())
            .stderr(fs::File::create(dir.join(format!("writer{round}.err"))).unwrap())
            .spawn()
            .expect("spawn the python writer");
        let flushes = |log: &Path| {
            fs::read_to_string(log)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.starts_with("F "))
                .count()
        };
        let start = Instant::now();
        poll_until(
            Duration::from_secs(60),
            "the writer to flush a few batches",
            || {
                if let Some(st) = writer.try_wait().unwrap() {
                    panic!(
                        "writer exited early ({st}):\n{}\n{}",
                        fs::read_to_string(&out).unwrap_or_default(),
                        fs::read_to_string(dir.join(format!("writer{round}.err")))
                            .unwrap_or_default()
                    );
                }
                (flushes(&log) >= 5 && start.elapsed().as_secs_f64() >= secs).then_some(())
            },
        );
        srv.kill9();
        let st = wait_timeout(&mut writer, Duration::from_secs(60));
        if st.is_none() {
            let _ = writer.kill();
            let _ = writer.wait();
        }
        let wout = fs::read_to_string(&out).unwrap_or_default();
        assert!(
            st.is_some_and(|s| s.success()),
            "writer did not stop cleanly after the crash ({st:?}):\n{wout}\n{}",
            fs::read_to_string(dir.join(format!("writer{round}.err"))).unwrap_or_default()
        );
        eprintln!("round {round}: {} flushes; {}", flushes(&log), wout.trim());

        srv.launch();
        let state_out = dir.join(format!("state{round}.json"));
        let o = run(
            Command::new(&py)
                .arg(&script)
                .args(["verify", &srv.uri("disk0"), s(&log)])
                .arg(region.to_string())
                .arg(&state_in)
                .arg(&state_out),
            CMD_TIMEOUT,
        );
        eprintln!("round {round}: {}", o.stdout.lines().next().unwrap_or(""));
        assert_eq!(
            o.code,
            0,
            "round {round}: acknowledged-and-flushed writes lost after kill -9:\n{}",
            o.text()
        );
        state_in = s(&state_out).to_string();
        srv.stop();
        offline_check(&devs, false);
    }
    offline_check(&devs, true);
}

// ---------------------------------------------------------------------------
// 8. Control socket online; offline commands refused while serving

#[test]
fn online_control_socket_and_offline_refusal() {
    require_tools(&["nbdinfo", "qemu-io"]);
    let dir = TestDir::new("control");
    let devs = make_pool(&dir, "2G", "1G");
    let mut srv = Server::start(&dir, &devs, 2);
    let sock = srv.sock().to_string();

    let u = srv.usage();
    for k in [
        "device_size_bytes",
        "allocated_bytes",
        "unallocated_bytes",
        "used_bytes",
    ] {
        assert!(u[k].is_u64(), "usage --json lacks {k}: {u:#}");
    }
    assert_eq!(u64f(&u, "device_size_bytes"), 4 * GIB);
    assert!(
        u["data_ratio"].is_number() && u["metadata_ratio"].is_number(),
        "{u:#}"
    );
    let d = u["devices"].as_array().expect("devices");
    assert_eq!(d.len(), 2, "{u:#}");
    for x in d {
        for k in ["devid", "size_bytes", "allocated_bytes"] {
            assert!(x[k].is_u64(), "device lacks {k}: {u:#}");
        }
        assert!(x["path"].is_string(), "{u:#}");
    }
    for b in u["block_groups"].as_array().expect("block_groups") {
        for k in ["start", "length", "used_bytes"] {
            assert!(b[k].is_u64(), "block group lacks {k}: {u:#}");
        }
        assert!(
            ["data", "metadata", "system"].contains(&b["type"].as_str().unwrap()),
            "{u:#}"
        );
        assert_eq!(b["profile"], "raid1", "{u:#}");
        assert!(b["ro"].is_boolean(), "{u:#}");
    }

    let v = srv.volumes();
    let vols = v["volumes"].as_array().expect("volumes");
    assert_eq!(vols.len(), 1, "{v:#}");
    assert_eq!(vols[0]["name"], "disk0");
    assert_eq!(u64f(&vols[0], "size_bytes"), GIB);
    assert_eq!(u64f(&vols[0], "allocated_bytes"), 0);

    // Online resize: a new connection sees the new size and can use it.
    cv_ok(&[
        "volume", "resize", "disk0", "--size", "2G", "--socket", &sock,
    ]);
    let o = run_ok(
        Command::new(tool("nbdinfo")).args(["--size", &srv.uri("disk0")]),
        CMD_TIMEOUT,
    );
    assert_eq!(o.stdout.trim(), (2 * GIB).to_string(), "{}", o.text());
    let off = GIB + 512 * MIB;
    qemu_io(
        &srv.uri("disk0"),
        &[
            format!("write -P 0x3c {off} 1M"),
            "flush".into(),
            format!("read -P 0x3c {off} 1M"),
        ],
    );
    let v = srv.volumes();
    assert_eq!(u64f(&v["volumes"][0], "size_bytes"), 2 * GIB, "{v:#}");
    assert_eq!(u64f(&v["volumes"][0], "allocated_bytes"), MIB, "{v:#}");

    // Offline access while the server holds the pool: refused, exit 2, and
    // the message says who holds it and where to talk to it.
    let pid = srv.pid();
    let dv: Vec<&str> = devs.iter().map(|p| s(p)).collect();
    let offline: Vec<Vec<&str>> = vec![
        [&["usage"][..], &dv[..]].concat(),
        [&["usage", "--json"][..], &dv[..]].concat(),
        [&["volume", "list"][..], &dv[..]].concat(),
        [&["volume", "create", "x", "--size", "1M"][..], &dv[..]].concat(),
        [&["check"][..], &dv[..]].concat(),
    ];
    for args in &offline {
        let o = cv(args);
        assert_eq!(
            o.code,
            2,
            "offline command while serving should exit 2:\n{}",
            o.text()
        );
        // Under --json the error is on stdout (docs/CLI.md).
        assert!(
            o.all().contains(&format!("pid {pid}")),
            "message should name the server pid {pid}:\n{}",
            o.text()
        );
        assert!(
            o.all().contains(&sock),
            "message should name the control socket {sock}:\n{}",
            o.text()
        );
        if args.contains(&"--json") {
            let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("JSON error");
            assert_eq!(v["exit_code"], 2, "{}", o.text());
        } else {
            assert!(o.stdout.is_empty(), "{}", o.text());
        }
    }
    // mkfs --force on the live pool must not touch it.
    let o = cv(&[&["mkfs", "--force"][..], &dv[..]].concat());
    assert_ne!(
        o.code,
        0,
        "mkfs --force on a served pool succeeded:\n{}",
        o.text()
    );
    assert!(o.stderr.contains(&format!("pid {pid}")), "{}", o.text());
    // Both a socket and devices: bad usage.
    let o = cv(&[&["usage", "--socket", &sock][..], &dv[..]].concat());
    assert_eq!(o.code, 2, "{}", o.text());

    // The server is unharmed.
    qemu_io(&srv.uri("disk0"), &[format!("read -P 0x3c {off} 1M")]);
    assert_eq!(srv.volumes()["volumes"].as_array().unwrap().len(), 1);

    // Shrink back online, then the pool works offline once the server is gone.
    cv_ok(&[
        "volume", "resize", "disk0", "--size", "1G", "--socket", &sock,
    ]);
    let o = run_ok(
        Command::new(tool("nbdinfo")).args(["--size", &srv.uri("disk0")]),
        CMD_TIMEOUT,
    );
    assert_eq!(o.stdout.trim(), GIB.to_string(), "{}", o.text());
    srv.stop();
    assert!(
        !srv.sock.exists(),
        "control socket left behind after shutdown"
    );
    let o = cv_ok(&[&["volume", "list", "--json"][..], &dv[..]].concat());
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(u64f(&v["volumes"][0], "size_bytes"), GIB, "{v:#}");
    assert_eq!(u64f(&v["volumes"][0], "allocated_bytes"), 0, "{v:#}");
    let o = cv(&["usage", "--socket", &sock]);
    assert_eq!(o.code, 2, "usage through a dead socket:\n{}", o.text());
    offline_check(&devs, false);
}

// ---------------------------------------------------------------------------
// Scrub online: resume after a crash, and scrub under load with the cleaner.

fn scrub_status(srv: &Server) -> Value {
    cv_json(&["scrub", "status", "--json", "--socket", srv.sock()])
}

#[test]
fn scrub_resumes_after_kill9_without_starting_over() {
    let dir = TestDir::new("scrub-resume");
    let devs = make_pool(&dir, "2G", "2G");
    let data = dir.join("data.bin");
    write_random_file(&data, GIB, 77);
    cv_ok(&[
        "volume",
        "import",
        "disk0",
        s(&data),
        s(&devs[0]),
        s(&devs[1]),
    ]);
    let _ = fs::remove_file(&data);
    let mut srv = Server::start(&dir, &devs, 1);
    // Slow enough to be killed in the middle: 1 GiB per device at 48 MiB/s.
    cv_ok(&["scrub", "start", "--limit", "48M", "--socket", srv.sock()]);
    let t0 = Instant::now();
    loop {
        let v = scrub_status(&srv);
        let total = u64f(&v, "bytes_total");
        if u64f(&v, "bytes_scrubbed") * 100 > total * 40 {
            break;
        }
        assert_eq!(v["state"], "running", "{v}");
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "scrub too slow: {v}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Let a background commit carry the latest checkpoint, then crash.
    std::thread::sleep(Duration::from_millis(2500));
    srv.kill9();
    srv.launch();
    let before = scrub_status(&srv);
    assert_eq!(before["state"], "interrupted", "{before}");
    let saved = u64f(&before, "bytes_scrubbed");
    let total = u64f(&before, "bytes_total");
    assert!(
        saved * 100 > total * 25,
        "progress was not checkpointed: {before}"
    );
    let o = cv(&["scrub", "resume", "-B", "--json", "--socket", srv.sock()]);
    assert_eq!(o.code, 0, "{}", o.text());
    let v: Value = serde_json::from_str(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", o.text()));
    assert_eq!(v["state"], "finished", "{v}");
    let this_run = u64f(&v, "bytes_scrubbed_this_run");
    let done = u64f(&v, "bytes_scrubbed");
    eprintln!("scrub resume: total {total}, saved {saved}, read again {this_run}, final {done}");
    assert!(this_run * 100 < total * 75, "resume re-read too much: {v}");
    assert!(this_run > 0);
    assert!(
        done * 100 >= total * 98 && done * 100 <= total * 102,
        "totals: {v}"
    );
    for k in [
        "read_errors",
        "csum_errors",
        "verify_errors",
        "uncorrectable_errors",
    ] {
        assert_eq!(u64f(&v, k), 0, "{k}: {v}");
    }
    srv.stop();
    offline_check(&devs, true);
}

/// How long the scrub-under-load storm runs.
const SCRUB_LOAD_SECS: u64 = 60;

#[test]
fn scrub_loop_under_fio_and_cleaner_churn_reports_no_errors() {
    require_tools(&["fio", "qemu-io"]);
    let dir = TestDir::new("scrub-load");
    let devs = make_pool(&dir, "2G", "512M");
    let mut srv = Server::start(&dir, &devs, 1);
    cv_ok(&[
        "volume",
        "create",
        "churn",
        "--size",
        "384M",
        "--socket",
        srv.sock(),
    ]);
    let deadline = Instant::now() + Duration::from_secs(SCRUB_LOAD_SECS);
    let fio = {
        let uri = srv.uri("disk0");
        let wd = dir.join("");
        std::thread::spawn(move || {
            run(
                Command::new(tool("fio"))
                    .args([
                        "--name=load",
                        "--ioengine=nbd",
                        &format!("--uri={uri}"),
                        "--rw=randwrite",
                        "--bs=4k",
                        "--iodepth=8",
                        "--numjobs=2",
                        "--size=192M",
                        "--offset_increment=192M",
                        "--verify=crc32c",
                        "--do_verify=1",
                        "--verify_fatal=1",
                        "--verify_backlog=1024",
                        "--time_based",
                        &format!("--runtime={SCRUB_LOAD_SECS}"),
                        "--verify_state_save=0",
                    ])
                    .current_dir(wd),
                Duration::from_secs(SCRUB_LOAD_SECS + 180),
            )
        })
    };
    let churn = {
        let uri = srv.uri("churn");
        std::thread::spawn(move || {
            let mut rounds = 0;
            while Instant::now() < deadline {
                let o = qemu_io(
                    &uri,
                    &[
                        format!("write -P {} 0 300M", 0x10 + rounds % 200),
                        "discard 0 384M".to_string(),
                    ],
                );
                assert_eq!(o.code, 0, "churn: {}", o.text());
                rounds += 1;
            }
            rounds
        })
    };
    let mut scrubs = 0;
    let mut skipped = 0;
    while Instant::now() < deadline {
        let o = cv(&["scrub", "start", "-B", "--json", "--socket", srv.sock()]);
        assert_eq!(o.code, 0, "scrub {scrubs}: {}", o.text());
        let v: Value =
            serde_json::from_str(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", o.text()));
        assert_eq!(v["state"], "finished", "{v}");
        for k in [
            "read_errors",
            "csum_errors",
            "verify_errors",
            "super_errors",
            "uncorrectable_errors",
        ] {
            assert_eq!(u64f(&v, k), 0, "scrub {scrubs} {k}: {v}");
        }
        skipped += u64f(&v, "block_groups_skipped_removed");
        scrubs += 1;
    }
    let rounds = churn.join().expect("churn thread");
    let f = fio.join().expect("fio thread");
    assert_eq!(f.code, 0, "fio: {}", f.text());
    assert!(!f.all().contains("verify failed"), "{}", f.text());
    eprintln!("scrub under load: {scrubs} scrubs, {rounds} fill/trim rounds, {skipped} groups skipped as removed");
    assert!(scrubs >= 2 && rounds >= 2);
    srv.stop();
    offline_check(&devs, true);
}

// ---------------------------------------------------------------------------
// Two connections, one sector

/// Two NBD connections (two qemu-io processes) write different bytes of the
/// same 4 KiB sectors at once: A bytes [100, 1100) and B bytes [2000, 3000)
/// of each of 1,500 sectors, in the same order, so they meet in the same
/// sector again and again; four rounds, each with new patterns. Each partial write is a read-modify-write of its
/// sector; the striped locks shared by every connection must keep one from
/// writing back the sector it read before the other's bytes landed. After
/// each round a third connection flushes, and the export read back through
/// qemu-img must hold both connections' bytes in every sector (and after a
/// restart, the last round's).
#[test]
fn two_connections_write_one_sector_at_once() {
    require_tools(&["qemu-io", "qemu-img"]);
    let dir = TestDir::new("two-conn-sector");
    let devs = make_pool(&dir, "1G", "256M");
    let mut srv = Server::start(&dir, &devs, 2);
    let uri = srv.uri("disk0");
    const SECTORS: u64 = 1500;
    // Asynchronous writes keep several of each connection's requests in
    // flight (the server runs 4 workers per connection), so the two meet
    // in a sector far more often than one request at a time would.
    let cmds = |off: u64, p: u8| -> Vec<String> {
        let mut v = Vec::new();
        for k in 0..SECTORS {
            v.push(format!("aio_write -P {p:#x} {} 1000", k * 4096 + off));
            if k % 64 == 63 {
                v.push("aio_flush".to_string());
            }
        }
        v.push("aio_flush".to_string());
        v
    };
    let verify = |uri: &str, pa: u8, pb: u8| {
        let out = dir.join("read-back.img");
        let _ = fs::remove_file(&out);
        run_ok(
            Command::new(tool("qemu-img")).args([
                "convert",
                "-f",
                "raw",
                "-O",
                "raw",
                uri,
                s(&out),
            ]),
            CMD_TIMEOUT,
        );
        let img = fs::read(&out).unwrap();
        let mut lost = Vec::new();
        for k in 0..SECTORS as usize {
            let sec = &img[k * 4096..(k + 1) * 4096];
            let ok = sec[..100].iter().all(|&x| x == 0)
                && sec[100..1100].iter().all(|&x| x == pa)
                && sec[1100..2000].iter().all(|&x| x == 0)
                && sec[2000..3000].iter().all(|&x| x == pb)
                && sec[3000..].iter().all(|&x| x == 0);
            if !ok {
                lost.push(k);
            }
        }
        assert!(
            lost.is_empty(),
            "sectors that lost a connection's bytes: {lost:?}"
        );
    };
    // Each round rewrites every sector from both connections with new
    // patterns: a round catches a lost update only where the two met.
    let mut last = (0, 0);
    for round in 0..4u8 {
        let (pa, pb) = (0xa1 + round, 0xb1 + round);
        let (a, b) = (cmds(100, pa), cmds(2000, pb));
        thread::scope(|s| {
            let ta = s.spawn(|| qemu_io(&uri, &a));
            let tb = s.spawn(|| qemu_io(&uri, &b));
            ta.join().unwrap();
            tb.join().unwrap();
        });
        qemu_io(&uri, &["flush".to_string()]);
        verify(&uri, pa, pb);
        last = (pa, pb);
    }
    srv.restart();
    verify(&srv.uri("disk0"), last.0, last.1);
    srv.stop();
    offline_check(&devs, true);
}

/// Flushed writes that no commit carried come back after kill -9: qemu-io
/// writes (aligned, unaligned, zeroes, a discard) with a flush after each,
/// no background commit (interval one hour), SIGKILL; the restarted server
/// replays the intent log and qemu-io reads every pattern back.
#[test]
fn flushed_writes_come_back_from_the_intent_log_after_kill_9() {
    require_tools(&["qemu-io"]);
    let dir = TestDir::new("intent-log");
    let devs = make_pool(&dir, "256M", "64M");
    let mut srv = Server::start(&dir, &devs, 3600);
    let uri = srv.uri("disk0");
    let cmds: Vec<String> = [
        "write -P 0x5a 0 64k",
        "write -P 0x5b 1M 4k",
        "write -P 0x5c 8000 100",
        "write -z 0 4k",
        "discard 1M 4k",
        "write -P 0x5d 2M 8k",
    ]
    .iter()
    .flat_map(|c| [c.to_string(), "flush".to_string()])
    .collect();
    qemu_io(&uri, &cmds);
    srv.kill9();
    srv.launch();
    assert!(
        srv.log_tail().contains("intent log records"),
        "no replay at restart:\n{}",
        srv.log_tail()
    );
    let reads: Vec<String> = [
        "read -P 0 0 4k",
        "read -P 0x5a 4k 3904",
        "read -P 0x5c 8000 100",
        "read -P 0x5a 8100 57436",
        "read -P 0 1M 4k",
        "read -P 0x5d 2M 8k",
    ]
    .iter()
    .map(|c| c.to_string())
    .collect();
    qemu_io(&srv.uri("disk0"), &reads);
    srv.stop();
    offline_check(&devs, true);
}
