//! Balance, device add / remove / replace and degraded opens, through the
//! CLI and a running server with real clients (fio with verify, qemu-io),
//! while scrub loops run. The race rules behind them are forced one by one
//! in tests/scrub_races.rs.
//!
//! Run: `cargo test --release --test balance_devices -- --test-threads=2`

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use serde_json::Value;

mod serve_harness;
use serve_harness::*;

fn args<'a>(head: &[&'a str], devs: &'a [PathBuf]) -> Vec<&'a str> {
    let mut v = head.to_vec();
    v.extend(devs.iter().map(|d| s(d)));
    v
}

fn usage_offline(devs: &[PathBuf]) -> Value {
    cv_json(&args(&["usage", "--json"], devs))
}

fn profiles(u: &Value) -> Vec<(String, String)> {
    u["block_groups"]
        .as_array()
        .expect("block_groups")
        .iter()
        .map(|b| {
            (
                b["type"].as_str().unwrap().to_string(),
                b["profile"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// A scrub loop against a server; returns the scrubs that ran and the
/// errors they reported, once `stop` is set.
fn scrub_loop(sock: String, stop: Arc<AtomicBool>) -> thread::JoinHandle<(u64, u64, Vec<String>)> {
    thread::spawn(move || {
        let (mut runs, mut errors, mut notes) = (0, 0, Vec::new());
        while !stop.load(Ordering::Acquire) {
            let o = cv(&["scrub", "start", "-B", "--json", "--socket", &sock]);
            if o.code == 1 && o.all().contains("already running") {
                thread::sleep(Duration::from_millis(100));
                continue;
            }
            let v: Value = serde_json::from_str(&o.stdout).unwrap_or_default();
            if o.code != 0 || v["state"] != "finished" {
                notes.push(o.text());
                errors += 1;
                continue;
            }
            let e = [
                "read_errors",
                "csum_errors",
                "verify_errors",
                "super_errors",
            ]
            .iter()
            .map(|k| v[k].as_u64().unwrap_or(0))
            .sum::<u64>()
                + v["uncorrectable_errors"].as_u64().unwrap_or(0);
            if e > 0 {
                notes.push(o.stdout.clone());
            }
            errors += e;
            runs += 1;
        }
        (runs, errors, notes)
    })
}

fn export_offline(devs: &[PathBuf], degraded: bool, vol: &str, out: &Path) {
    let mut a = vec!["volume", "export", vol, s(out)];
    if degraded {
        a.push("--degraded");
    }
    a.extend(devs.iter().map(|d| s(d)));
    cv_ok(&a);
}

// ---------------------------------------------------------------------------
// 1. convert=raid1 after device add

#[test]
fn convert_single_to_raid1_after_device_add() {
    let dir = TestDir::new("convert");
    let a = dir.join("a.img");
    cv_ok(&["mkfs", "--size", "1G", s(&a)]);
    let mut devs = vec![a];
    cv_ok(&args(&["volume", "create", "v1", "--size", "400M"], &devs));
    cv_ok(&args(&["volume", "create", "v2", "--size", "100M"], &devs));
    let f1 = dir.join("v1.bin");
    let f2 = dir.join("v2.bin");
    write_random_file(&f1, 300 * MIB, 11);
    write_random_file(&f2, 60 * MIB, 12);
    cv_ok(&args(&["volume", "import", "v1", s(&f1)], &devs));
    cv_ok(&args(&["volume", "import", "v2", s(&f2)], &devs));
    let before = profiles(&usage_offline(&devs));
    assert!(before.iter().any(|(_, p)| p == "single"), "{before:?}");

    // Converting needs the second device first: a clear error, nothing changed.
    let o = cv(&args(&["balance", "start", "-dconvert=raid1"], &devs));
    assert_eq!(o.code, 2, "{}", o.text());
    assert!(o.stderr.contains("needs 2 devices"), "{}", o.text());
    assert_eq!(profiles(&usage_offline(&devs)), before);

    let b = dir.join("b.img");
    fs_create_sparse(&b, GIB);
    cv_ok(&args(&["device", "add", s(&b)], &devs));
    devs.push(b);
    let st = cv_json(&args(
        &[
            "balance",
            "start",
            "-dconvert=raid1",
            "-mconvert=raid1",
            "--json",
        ],
        &devs,
    ));
    assert_eq!(st["state"], "finished", "{st}");
    assert!(u64f(&st, "bytes_relocated") >= 360 * MIB, "{st}");
    let u = usage_offline(&devs);
    for (t, p) in profiles(&u) {
        assert_eq!(p, "raid1", "a {t} block group is still {p}: {u}");
    }
    assert_eq!(u["data_ratio"], 2.0);
    assert_eq!(u["metadata_ratio"], 2.0);
    for (vol, f) in [("v1", &f1), ("v2", &f2)] {
        let out = dir.join(format!("{vol}.out"));
        export_offline(&devs, false, vol, &out);
        truncate(&out, fs_len(f));
        cmp_files(f, &out);
    }
    offline_check(&devs, true);
    // Each copy alone holds everything now.
    for keep in 0..2 {
        let out = dir.join("alone.out");
        export_offline(&devs[keep..keep + 1], true, "v1", &out);
        truncate(&out, fs_len(&f1));
        cmp_files(&f1, &out);
    }
}

fn fs_create_sparse(p: &Path, len: u64) {
    let f = std::fs::File::create(p).unwrap();
    f.set_len(len).unwrap();
}
fn fs_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}
fn truncate(p: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .set_len(len)
        .unwrap();
}

// ---------------------------------------------------------------------------
// Bad input: a clear error before anything changes

#[test]
fn bad_balance_and_device_requests_change_nothing() {
    let dir = TestDir::new("badreq");
    let devs = make_pool(&dir, "512M", "200M");
    let f = dir.join("in.bin");
    write_random_file(&f, 50 * MIB, 3);
    cv_ok(&args(&["volume", "import", "disk0", s(&f)], &devs));
    let before = usage_offline(&devs);
    let cases: &[(&[&str], &str)] = &[
        (
            &["balance", "start", "-dconvert=raid1c3"],
            "needs 3 devices",
        ),
        (
            &["balance", "start", "-dusage=abc"],
            "usage=abc: 'abc' is not a percent",
        ),
        (&["balance", "start", "-dfoo=1"], "unknown balance filter"),
        (&["balance", "start", "-ddrange=0..10"], "needs devid"),
        (&["balance", "start", "-dusage=150"], "percent"),
        (&["balance", "start"], "--full"),
        (&["balance", "start", "-sconvert=dup"], "-m convert"),
        (&["device", "remove", "1"], "would leave 1 device"),
        (&["device", "remove", "9"], "no device with devid 9"),
        (&["balance", "resume"], "no balance to resume"),
        (&["balance", "pause"], "no balance is running"),
    ];
    for (cmd, want) in cases {
        let o = cv(&args(cmd, &devs));
        assert_ne!(o.code, 0, "{}", o.text());
        assert!(o.stderr.contains(want), "expected '{want}':\n{}", o.text());
    }
    // Replacing with a device smaller than what the source holds.
    let small = dir.join("small.img");
    fs_create_sparse(&small, 40 * MIB);
    let o = cv(&args(
        &["device", "replace", "start", "1", s(&small)],
        &devs,
    ));
    assert_ne!(o.code, 0, "{}", o.text());
    assert!(o.stderr.contains("smaller than"), "{}", o.text());
    // Adding a device of this very pool, or a file too small.
    let o = cv(&args(&["device", "add", s(&devs[0])], &devs));
    assert_ne!(o.code, 0, "{}", o.text());
    let tiny = dir.join("tiny.img");
    fs_create_sparse(&tiny, MIB);
    let o = cv(&args(&["device", "add", s(&tiny)], &devs));
    assert_ne!(o.code, 0, "{}", o.text());
    assert!(o.stderr.contains("too small"), "{}", o.text());
    let after = usage_offline(&devs);
    assert_eq!(profiles(&before), profiles(&after));
    assert_eq!(before["devices"], after["devices"]);
    offline_check(&devs, true);
}

/// Balancing a pool too full to hold another copy stops with ENOSPC, keeps
/// the pool consistent, and resumes once space is freed.
#[test]
fn balance_of_a_full_pool_stops_cleanly_and_resumes() {
    let dir = TestDir::new("fullbal");
    let a = dir.join("a.img");
    cv_ok(&["mkfs", "--size", "512M", "--data", "single", s(&a)]);
    let devs = vec![a];
    cv_ok(&args(&["volume", "create", "v", "--size", "1G"], &devs));
    let f = dir.join("in.bin");
    write_random_file(&f, 300 * MIB, 5);
    cv_ok(&args(&["volume", "import", "v", s(&f)], &devs));
    // Every data group relocated at once needs room for the largest one.
    let o = cv(&args(
        &["balance", "start", "-dconvert=dup", "--json"],
        &devs,
    ));
    assert_eq!(o.code, 1, "{}", o.text());
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["state"], "interrupted", "{v}");
    assert!(
        v["failure"].as_str().unwrap_or("").contains("no space"),
        "{v}"
    );
    offline_check(&devs, true);
    let out = dir.join("out.bin");
    export_offline(&devs, false, "v", &out);
    truncate(&out, fs_len(&f));
    cmp_files(&f, &out);
    // Free space: drop the volume's second half, then resume.
    let half = dir.join("half.bin");
    {
        let mut data = std::fs::read(&f).unwrap();
        data.truncate(60 * MIB as usize);
        std::fs::write(&half, &data).unwrap();
    }
    cv_ok(&args(&["volume", "delete", "v"], &devs));
    cv_ok(&args(&["volume", "create", "v", "--size", "1G"], &devs));
    cv_ok(&args(&["volume", "import", "v", s(&half)], &devs));
    let st = cv_json(&args(&["balance", "resume", "--json"], &devs));
    assert_eq!(st["state"], "finished", "{st}");
    let u = usage_offline(&devs);
    for (t, p) in profiles(&u) {
        if t == "data" {
            assert_eq!(p, "dup", "{u}");
        }
    }
    offline_check(&devs, true);
    export_offline(&devs, false, "v", &out);
    truncate(&out, fs_len(&half));
    cmp_files(&half, &out);
}

// ---------------------------------------------------------------------------
// 2. device remove while fio verifies

/// mkfs three 2 GiB raid1 devices with a 1 GiB volume disk0.
fn three_device_raid1(dir: &TestDir) -> Vec<PathBuf> {
    let devs: Vec<PathBuf> = ["a.img", "b.img", "c.img"]
        .iter()
        .map(|n| dir.join(n))
        .collect();
    cv_ok(&args(
        &[
            "mkfs",
            "--data",
            "raid1",
            "--metadata",
            "raid1",
            "--size",
            "2G",
        ],
        &devs,
    ));
    cv_ok(&args(&["volume", "create", "disk0", "--size", "1G"], &devs));
    devs
}

#[test]
fn device_remove_under_fio_verify() {
    require_tools(&["fio"]);
    let dir = TestDir::new("remove");
    let devs = three_device_raid1(&dir);
    let f = dir.join("in.bin");
    write_random_file(&f, 300 * MIB, 21);
    cv_ok(&args(&["volume", "import", "disk0", s(&f)], &devs));
    cv_ok(&args(&["volume", "create", "fio", "--size", "512M"], &devs));
    let srv = Server::start(&dir, &devs, 2);
    let uri = srv.uri("fio");
    let fio = {
        let mut c = fio_verify_cmd(&uri, 2, "128M", 25, "64k");
        c.current_dir(dir.join(""));
        thread::spawn(move || run(&mut c, Duration::from_secs(300)))
    };
    thread::sleep(Duration::from_secs(3));
    let o = cv(&["device", "remove", s(&devs[2]), "--socket", srv.sock()]);
    assert_eq!(o.code, 0, "device remove failed:\n{}", o.text());
    assert!(
        !fio.is_finished(),
        "fio must still be running when remove ends"
    );
    let u = srv.usage();
    let ids: Vec<u64> = u["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| u64f(d, "devid"))
        .collect();
    assert_eq!(ids, vec![1, 2], "{u}");
    let fo = fio.join().unwrap();
    assert_fio_clean(&fo, 2);
    drop(srv);
    let left = &devs[..2];
    offline_check(left, true);
    let out = dir.join("out.bin");
    export_offline(left, false, "disk0", &out);
    truncate(&out, fs_len(&f));
    cmp_files(&f, &out);
    // The removed device is no longer a pool member.
    let o = cv(&["check", s(&devs[2])]);
    assert_eq!(o.code, 2, "{}", o.text());
}

// ---------------------------------------------------------------------------
// 3. device replace while fio verifies and scrub loops, then a degraded open

#[test]
fn device_replace_under_fio_and_scrub_then_degraded_export() {
    require_tools(&["fio"]);
    let dir = TestDir::new("replace");
    let devs = make_pool(&dir, "1G", "512M");
    let f = dir.join("in.bin");
    write_random_file(&f, 200 * MIB, 31);
    cv_ok(&args(
        &["volume", "create", "data", "--size", "256M"],
        &devs,
    ));
    cv_ok(&args(&["volume", "import", "data", s(&f)], &devs));
    let srv = Server::start(&dir, &devs, 2);
    let stop = Arc::new(AtomicBool::new(false));
    let scrubs = scrub_loop(srv.sock().to_string(), stop.clone());
    let fio = {
        let mut c = fio_verify_cmd(&srv.uri("disk0"), 2, "128M", 25, "16k");
        c.current_dir(dir.join(""));
        thread::spawn(move || run(&mut c, Duration::from_secs(300)))
    };
    thread::sleep(Duration::from_secs(3));
    let c = dir.join("c.img");
    fs_create_sparse(&c, GIB);
    let o = cv(&[
        "device",
        "replace",
        "start",
        "1",
        s(&c),
        "-B",
        "--json",
        "--socket",
        srv.sock(),
    ]);
    assert_eq!(o.code, 0, "replace failed:\n{}", o.text());
    let v: Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["state"], "finished", "{v}");
    assert!(u64f(&v, "bytes_copied") >= 200 * MIB, "{v}");
    let st = cv_json(&[
        "device",
        "replace",
        "status",
        "--json",
        "--socket",
        srv.sock(),
    ]);
    assert_eq!(st["state"], "finished");
    let fo = fio.join().unwrap();
    assert_fio_clean(&fo, 2);
    stop.store(true, Ordering::Release);
    let (runs, errors, notes) = scrubs.join().unwrap();
    assert_eq!(
        errors, 0,
        "scrub reported errors during replace:\n{notes:?}"
    );
    assert!(runs >= 1, "no scrub completed during the replace");
    drop(srv);
    let now = vec![c.clone(), devs[1].clone()];
    offline_check(&now, true);
    let refs: Vec<(String, PathBuf)> = ["disk0", "data"]
        .iter()
        .map(|v| {
            let p = dir.join(format!("{v}.ref"));
            export_offline(&now, false, v, &p);
            (v.to_string(), p)
        })
        .collect();
    // Pull the other original device away: the new one alone serves all.
    let gone = dir.join("b.gone");
    std::fs::rename(&devs[1], &gone).unwrap();
    let o = cv(&["volume", "export", "data", s(&dir.join("x")), s(&c)]);
    assert_eq!(o.code, 2, "{}", o.text());
    assert!(o.stderr.contains("--degraded"), "{}", o.text());
    for (v, r) in &refs {
        let out = dir.join(format!("{v}.degraded"));
        export_offline(std::slice::from_ref(&c), true, v, &out);
        cmp_files(r, &out);
    }
    let u = cv_json(&["usage", "--json", "--degraded", s(&c)]);
    let missing: Vec<&Value> = u["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["missing"] == true)
        .collect();
    assert_eq!(missing.len(), 1, "{u}");
    assert_eq!(missing[0]["path"], "<missing>");
    let ds = cv_json(&["device", "stats", "--json", "--degraded", s(&c)]);
    assert!(ds["devices"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["missing"] == true));
    // Degraded data writes are refused, not written with one copy.
    let o = cv(&["volume", "import", "data", s(&f), "--degraded", s(&c)]);
    assert_ne!(o.code, 0, "{}", o.text());
    assert!(o.stderr.contains("degraded"), "{}", o.text());
    // Heal: replace the missing device, then the pool is whole again.
    let d = dir.join("d.img");
    fs_create_sparse(&d, GIB);
    cv_ok(&[
        "device",
        "replace",
        "start",
        "missing",
        s(&d),
        "--degraded",
        s(&c),
    ]);
    let whole = vec![c.clone(), d.clone()];
    offline_check(&whole, true);
    for (v, r) in &refs {
        let out = dir.join(format!("{v}.healed"));
        export_offline(&whole, false, v, &out);
        cmp_files(r, &out);
    }
}

// ---------------------------------------------------------------------------
// 5. balance -dusage=50 gives back space while a scrub loop runs

#[test]
fn balance_usage_filter_returns_space_under_scrub_loop() {
    require_tools(&["qemu-io"]);
    let dir = TestDir::new("usage");
    let devs = make_pool(&dir, "2G", "1G");
    let f = dir.join("in.bin");
    write_random_file(&f, 900 * MIB, 41);
    cv_ok(&args(&["volume", "import", "disk0", s(&f)], &devs));
    let srv = Server::start(&dir, &devs, 1);
    // Each data group ends up about 40% used.
    let model = thin_out(&srv, &f, 900 * MIB);
    let before = u64f(&srv.usage(), "allocated_bytes");
    let stop = Arc::new(AtomicBool::new(false));
    let scrubs = scrub_loop(srv.sock().to_string(), stop.clone());
    thread::sleep(Duration::from_millis(500));
    let st = cv_json(&[
        "balance",
        "start",
        "-dusage=50",
        "-B",
        "--json",
        "--socket",
        srv.sock(),
    ]);
    assert_eq!(st["state"], "finished", "{st}");
    assert!(u64f(&st, "block_groups_done") >= 2, "{st}");
    let after = poll_until(Duration::from_secs(60), "space back", || {
        let a = u64f(&srv.usage(), "allocated_bytes");
        (a + 300 * MIB <= before).then_some(a)
    });
    eprintln!("allocated {} MiB -> {} MiB", before >> 20, after >> 20);
    thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Release);
    let (runs, errors, notes) = scrubs.join().unwrap();
    assert_eq!(errors, 0, "scrub errors during balance:\n{notes:?}");
    assert!(runs >= 1);
    assert_disk0_is(&srv, &dir, &model);
    drop(srv);
    offline_check(&devs, true);
}

/// Discard 3 MiB of every 5 MiB of the first `len` bytes of disk0 through
/// NBD; returns the model of what disk0 now holds.
fn thin_out(srv: &Server, f: &Path, len: u64) -> Vec<u8> {
    let mut cmds = Vec::new();
    let mut model = std::fs::read(f).unwrap();
    let mut off = 0u64;
    while off + 5 * MIB <= len {
        cmds.push(format!("discard {} {}", off, 3 * MIB));
        model[off as usize..(off + 3 * MIB) as usize].fill(0);
        off += 5 * MIB;
    }
    qemu_io(&srv.uri("disk0"), &cmds);
    model
}

fn assert_disk0_is(srv: &Server, dir: &TestDir, model: &[u8]) {
    let reff = dir.join("model.bin");
    std::fs::write(&reff, model).unwrap();
    let out = dir.join("out.bin");
    run_ok(
        Command::new(tool("qemu-img")).args([
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &srv.uri("disk0"),
            s(&out),
        ]),
        CMD_TIMEOUT,
    );
    truncate(&out, model.len() as u64);
    cmp_files(&reff, &out);
}

/// `serve --reclaim-threshold 50`: groups thinned out below half used are
/// relocated in the background, without any balance command, and the space
/// comes back; the data stays intact.
#[test]
fn automatic_reclaim_relocates_sparse_groups() {
    require_tools(&["qemu-io", "qemu-img"]);
    let dir = TestDir::new("autoreclaim");
    let devs = make_pool(&dir, "2G", "1G");
    let f = dir.join("in.bin");
    write_random_file(&f, 900 * MIB, 61);
    cv_ok(&args(&["volume", "import", "disk0", s(&f)], &devs));
    let srv = Server::start_with(&dir, &devs, 1, &["--reclaim-threshold", "50"]);
    let before = u64f(&srv.usage(), "allocated_bytes");
    let model = thin_out(&srv, &f, 900 * MIB);
    let after = poll_until(
        Duration::from_secs(120),
        "reclaim to give space back",
        || {
            let a = u64f(&srv.usage(), "allocated_bytes");
            (a + 300 * MIB <= before).then_some(a)
        },
    );
    eprintln!("allocated {} MiB -> {} MiB", before >> 20, after >> 20);
    assert_disk0_is(&srv, &dir, &model);
    drop(srv);
    offline_check(&devs, true);
}

// ---------------------------------------------------------------------------
// 6. kill -9 during a balance, restart, resume

#[test]
fn balance_resumes_after_kill9() {
    let dir = TestDir::new("balkill");
    let devs = make_pool(&dir, "2G", "1G");
    let f = dir.join("in.bin");
    write_random_file(&f, 700 * MIB, 51);
    cv_ok(&args(&["volume", "import", "disk0", s(&f)], &devs));
    let mut srv = Server::start(&dir, &devs, 2);
    let st = cv_json(&[
        "balance",
        "start",
        "--full",
        "--json",
        "--socket",
        srv.sock(),
    ]);
    assert_eq!(st["state"], "running", "{st}");
    let total = u64f(&st, "block_groups_total");
    assert!(total >= 4, "{st}");
    poll_until(Duration::from_secs(120), "one group relocated", || {
        let v = cv_json(&["balance", "status", "--json", "--socket", srv.sock()]);
        (u64f(&v, "block_groups_done") >= 1).then_some(())
    });
    srv.kill9();
    srv.launch();
    let v = cv_json(&["balance", "status", "--json", "--socket", srv.sock()]);
    let left = u64f(&v, "block_groups_left");
    eprintln!("after kill -9: {v}");
    if left > 0 {
        assert_eq!(v["state"], "interrupted", "{v}");
        let o = cv(&["balance", "start", "-d", "--socket", srv.sock()]);
        assert_ne!(
            o.code,
            0,
            "a new balance over an interrupted one:\n{}",
            o.text()
        );
        let r = cv_json(&["balance", "resume", "-B", "--json", "--socket", srv.sock()]);
        assert_eq!(r["state"], "finished", "{r}");
        assert_eq!(u64f(&r, "block_groups_left"), 0);
    } else {
        assert_eq!(v["state"], "finished", "killed after the last group: {v}");
    }
    let out = dir.join("out.bin");
    drop(srv);
    offline_check(&devs, true);
    export_offline(&devs, false, "disk0", &out);
    truncate(&out, fs_len(&f));
    cmp_files(&f, &out);
}

// ---------------------------------------------------------------------------
// The storm through NBD with real clients

/// fio with verify on four connections while the server runs a scrub loop,
/// a balance loop with varied filters, device replaces, and its cleaner
/// (commit interval 1 s). No client error, no scrub error, a clean check.
#[test]
fn nbd_storm_fio_with_scrub_balance_replace() {
    require_tools(&["fio"]);
    let dir = TestDir::new("storm");
    let devs = three_device_raid1(&dir);
    let srv = Server::start(&dir, &devs, 1);
    let stop = Arc::new(AtomicBool::new(false));
    let scrubs = scrub_loop(srv.sock().to_string(), stop.clone());
    let balances = {
        let (sock, stop) = (srv.sock().to_string(), stop.clone());
        thread::spawn(move || {
            let filters = [
                "-dusage=50",
                "-dusage=90",
                "-d",
                "-dlimit=1",
                "-m",
                "-dusage=20..80",
            ];
            let (mut n, mut bad) = (0, Vec::new());
            while !stop.load(Ordering::Acquire) {
                let f = filters[n % filters.len()];
                let o = cv(&["balance", "start", f, "-B", "--json", "--socket", &sock]);
                let v: Value = serde_json::from_str(&o.stdout).unwrap_or_default();
                if o.code != 0 || v["state"] != "finished" {
                    bad.push(o.text());
                }
                n += 1;
            }
            (n, bad)
        })
    };
    let replaces = {
        let (sock, d) = (srv.sock().to_string(), dir.0.clone());
        thread::spawn(move || {
            let mut done = Vec::new();
            for i in 0..2 {
                thread::sleep(Duration::from_secs(5));
                let u = cv_json(&["usage", "--json", "--socket", &sock]);
                let src = u["devices"][i]["devid"].as_u64().unwrap().to_string();
                let new = d.join(format!("r{i}.img"));
                fs_create_sparse(&new, 2 * GIB);
                let o = cv(&[
                    "device",
                    "replace",
                    "start",
                    &src,
                    s(&new),
                    "-B",
                    "--json",
                    "--socket",
                    &sock,
                ]);
                done.push(o);
            }
            done
        })
    };
    let fo = run(
        fio_verify_cmd(&srv.uri("disk0"), 4, "128M", 30, "16k").current_dir(dir.join("")),
        Duration::from_secs(400),
    );
    assert_fio_clean(&fo, 4);
    for o in replaces.join().unwrap() {
        assert_eq!(o.code, 0, "replace failed:\n{}", o.text());
        assert!(o.stdout.contains("\"finished\""), "{}", o.text());
    }
    stop.store(true, Ordering::Release);
    let (runs, errors, notes) = scrubs.join().unwrap();
    assert_eq!(errors, 0, "scrub errors in the storm:\n{notes:?}");
    assert!(runs >= 1);
    let (n, bad) = balances.join().unwrap();
    assert!(bad.is_empty(), "balances failed:\n{bad:?}");
    assert!(n >= 2, "only {n} balances ran");
    let now: Vec<PathBuf> = srv.usage()["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| PathBuf::from(d["path"].as_str().unwrap()))
        .collect();
    assert_eq!(now.len(), 3);
    drop(srv);
    offline_check(&now, true);
}

// ---------------------------------------------------------------------------
// 6. serve --degraded: reads served, writes refused, replace heals under fio

/// fio job writing (or, with `verify_only`, verifying) a sequential pattern
/// of `size` at `offset`.
fn fio_pattern_cmd(uri: &str, offset: &str, size: &str, verify_only: bool) -> Command {
    let mut c = Command::new(tool("fio"));
    c.args([
        "--name=pattern",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=write",
        "--bs=64k",
        "--iodepth=4",
        &format!("--offset={offset}"),
        &format!("--size={size}"),
        "--verify=crc32c",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--output-format=json",
    ]);
    if verify_only {
        c.arg("--verify_only=1");
    } else {
        c.arg("--do_verify=0");
    }
    c
}

fn fio_ok(mut c: Command, what: &str) {
    let o = run(&mut c, Duration::from_secs(300));
    assert_eq!(o.code, 0, "fio {what} failed:\n{}", o.text());
    assert!(!o.all().contains("verify: "), "fio {what}:\n{}", o.text());
}

#[test]
fn serve_degraded_reads_refuses_writes_and_replace_heals_under_fio() {
    require_tools(&["fio", "qemu-io"]);
    let dir = TestDir::new("degraded");
    let devs = make_pool(&dir, "1G", "512M");
    {
        let srv = Server::start(&dir, &devs, 1);
        fio_ok(
            fio_pattern_cmd(&srv.uri("disk0"), "0", "96M", false),
            "pattern write",
        );
    }
    // The second mirror is gone.
    let gone = dir.join("b.gone");
    std::fs::rename(&devs[1], &gone).unwrap();
    let mut srv = Server::start_with(&dir, &devs[..1], 1, &["--degraded"]);
    let uri = srv.uri("disk0");
    fio_ok(fio_pattern_cmd(&uri, "0", "96M", true), "verify, degraded");
    let mut c = Command::new(tool("qemu-io"));
    c.args(["-f", "raw", &uri, "-c", "write -P 0x5a 200M 64k"]);
    let o = run(&mut c, Duration::from_secs(60));
    assert!(
        o.all().contains("Operation not permitted"),
        "a degraded write is refused as on a read-only device:\n{}",
        o.text()
    );
    // Heal: the replace returns once the new device takes new chunks, then
    // copies while fio writes and verifies elsewhere.
    let c_img = dir.join("c.img");
    fs_create_sparse(&c_img, GIB);
    cv_ok(&[
        "device",
        "replace",
        "start",
        "missing",
        s(&c_img),
        "--socket",
        srv.sock(),
    ]);
    let fio = {
        let mut c = fio_verify_cmd(&uri, 1, "64M", 10, "16k");
        c.arg("--offset=256M");
        c.current_dir(dir.join(""));
        thread::spawn(move || run(&mut c, Duration::from_secs(300)))
    };
    let end = std::time::Instant::now() + Duration::from_secs(300);
    let st = loop {
        let st = cv_json(&[
            "device",
            "replace",
            "status",
            "--json",
            "--socket",
            srv.sock(),
        ]);
        if st["state"] != "running" {
            break st;
        }
        assert!(std::time::Instant::now() < end, "replace never ended: {st}");
        thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(st["state"], "finished", "{st}");
    assert_eq!(
        st["target_devid"], 2,
        "the new device takes the missing devid: {st}"
    );
    assert_fio_clean(&fio.join().unwrap(), 1);
    srv.stop();
    let whole = vec![devs[0].clone(), c_img.clone()];
    offline_check(&whole, true);
    let u = cv_json(&args(&["usage", "--json"], &whole));
    assert!(
        u["devices"]
            .as_array()
            .unwrap()
            .iter()
            .all(|d| d["missing"] == false),
        "{u}"
    );
    let srv = Server::start(&dir, &whole, 1);
    fio_ok(
        fio_pattern_cmd(&srv.uri("disk0"), "0", "96M", true),
        "verify, healed",
    );
}
