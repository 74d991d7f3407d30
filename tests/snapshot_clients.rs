//! Snapshots and clones served over NBD, checked with real clients: qemu-io
//! pattern reads, nbdcopy + cmp, nbdinfo, and libnbd writes that the server
//! refuses with EPERM (issue 14, acceptance 1 and 2).

mod serve_harness;

use std::process::Command;

use serde_json::Value;
use serve_harness::{
    cmp_files, cv_ok, make_pool, nbdinfo_read_only, offline_check, python_with_libnbd, qemu_io,
    require_tools, run, run_ok, tool, Out, Server, TestDir, CMD_TIMEOUT, MIB,
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
