//! Read-only exports, as qemu-nbd -r and nbdkit -r offer them: for the whole
//! server (`serve --read-only`) or one volume (`volume set --read-only`),
//! announced to clients (nbdinfo) and enforced on the server (EPERM).

mod serve_harness;

use std::process::Command;
use std::time::Duration;

use serve_harness::{
    cv, cv_json, cv_ok, make_pool, nbdinfo_read_only, offline_check, python_with_libnbd, qemu_io,
    require_tools, run, s, tool, Server, TestDir, CMD_TIMEOUT,
};

/// A qemu-io write that must fail because the export is read-only: qemu
/// refuses to open a read-only export for writing (EACCES), exactly as
/// with `qemu-nbd -r`.
fn qemu_write_refused(uri: &str) {
    let o = run(
        Command::new(tool("qemu-io")).args(["-f", "raw", uri, "-c", "write -P 0x77 0 64k"]),
        Duration::from_secs(60),
    );
    let all = o.all();
    assert!(
        o.code != 0 && all.contains("Could not open image: Permission denied"),
        "a write to a read-only export did not fail as read-only:\n{}",
        o.text()
    );
}

/// Writes through a connection opened before the volume became read-only.
/// Prints the errno of the refused write.
const OPEN_THEN_WRITE_PY: &str = r#"
import nbd, sys
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b'\x11' * 4096, 0)
print("first write ok", flush=True)
sys.stdin.readline()
try:
    h.pwrite(b'\x22' * 4096, 4096)
    print("second write ok")
except nbd.Error as e:
    print("second write refused errno", e.errno)
"#;

#[test]
fn serve_read_only_announces_and_refuses_writes() {
    require_tools(&["nbdinfo", "qemu-io"]);
    let dir = TestDir::new("export-ro");
    let devs = make_pool(&dir, "256M", "64M");
    let mut srv = Server::start(&dir, &devs, 1);
    qemu_io(&srv.uri("disk0"), &["write -P 0x5a 0 1M".into()]);
    srv.stop();
    let mut srv = Server::start_with(&dir, &devs, 1, &["--read-only"]);
    let uri = srv.uri("disk0");
    assert!(
        nbdinfo_read_only(&uri),
        "nbdinfo does not show the export read-only"
    );
    qemu_write_refused(&uri);
    // Reads work and the data is unchanged.
    let ro = format!("json:{{\"driver\":\"raw\",\"file\":{{\"driver\":\"nbd\",\"server\":{{\"type\":\"inet\",\"host\":\"127.0.0.1\",\"port\":\"{}\"}},\"export\":\"disk0\"}}}}", srv.port);
    let o = run(
        Command::new(tool("qemu-io")).args(["-r", &ro, "-c", "read -P 0x5a 0 1M"]),
        CMD_TIMEOUT,
    );
    assert!(o.code == 0 && !o.all().contains("failed"), "{}", o.text());
    srv.stop();
    offline_check(&devs, true);
}

#[test]
fn a_read_only_volume_refuses_writes_even_on_open_connections() {
    require_tools(&["nbdinfo", "qemu-io"]);
    let dir = TestDir::new("volume-ro");
    let devs = make_pool(&dir, "256M", "64M");
    let mut srv = Server::start(&dir, &devs, 1);
    let uri = srv.uri("disk0");
    assert!(!nbdinfo_read_only(&uri));
    let mut py = Command::new(python_with_libnbd())
        .args(["-c", OPEN_THEN_WRITE_PY, &uri])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    let mut out = std::io::BufReader::new(py.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    assert_eq!(line.trim(), "first write ok");

    // qemu-io too, interactive, its first write done before the flip.
    let mut qio = Command::new(tool("qemu-io"))
        .args(["-f", "raw", &uri])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io");
    let mut qin = qio.stdin.take().unwrap();
    let mut qout = std::io::BufReader::new(qio.stdout.take().unwrap());
    {
        use std::io::Write;
        qin.write_all(b"write -P 0x33 8k 4k\n").unwrap();
        qin.flush().unwrap();
    }
    let mut qline = String::new();
    std::io::BufRead::read_line(&mut qout, &mut qline).unwrap();
    assert!(qline.contains("wrote 4096/4096"), "qemu-io: {qline:?}");

    cv_ok(&[
        "volume",
        "set",
        "disk0",
        "--read-only",
        "true",
        "--socket",
        srv.sock(),
    ]);
    // qemu-io's connection, opened before: its write gets EPERM.
    {
        use std::io::Write;
        qin.write_all(b"write -P 0x44 12k 4k\nquit\n").unwrap();
    }
    drop(qin);
    let mut qrest = String::new();
    std::io::Read::read_to_string(&mut qout, &mut qrest).unwrap();
    let _ = qio.wait();
    assert!(
        qrest.contains("write failed: Operation not permitted"),
        "qemu-io after the flip:\n{qrest}"
    );
    // The connection opened before: the server refuses its write.
    use std::io::Write;
    py.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(py.wait().unwrap().success());
    assert_eq!(
        rest.trim(),
        "second write refused errno EPERM",
        "EPERM expected"
    );
    // New connections see the flag.
    assert!(nbdinfo_read_only(&uri));
    qemu_write_refused(&uri);
    let vols = cv_json(&["volume", "list", "--json", "--socket", srv.sock()]);
    assert_eq!(vols["volumes"][0]["read_only"], true, "{vols}");
    let o = cv(&[
        "volume",
        "resize",
        "disk0",
        "--size",
        "128M",
        "--socket",
        srv.sock(),
    ]);
    assert!(
        o.code != 0 && o.stderr.contains("volume disk0: read-only"),
        "{}",
        o.text()
    );
    let o = cv(&["volume", "set", "disk0", "--socket", srv.sock()]);
    assert_eq!(o.code, 2, "nothing to set is a usage error: {}", o.text());

    // The flag is stored in the pool.
    srv.stop();
    let o = cv_ok(
        &[
            &["volume", "list"][..],
            &devs.iter().map(|d| s(d)).collect::<Vec<_>>(),
        ]
        .concat(),
    );
    assert!(o.stdout.contains(" ro"), "{}", o.stdout);
    srv.launch();
    let uri = srv.uri("disk0");
    assert!(nbdinfo_read_only(&uri));
    cv_ok(&[
        "volume",
        "set",
        "disk0",
        "--read-only",
        "false",
        "--socket",
        srv.sock(),
    ]);
    assert!(!nbdinfo_read_only(&uri));
    qemu_io(
        &uri,
        &["write -P 0x33 0 64k".into(), "read -P 0x33 0 64k".into()],
    );
    srv.stop();
    offline_check(&devs, true);
}
