//! `scrub status` tells the truth about what a scrub covered: a scrub
//! started right after unflushed writes scrubs them (it commits first), and
//! after a device leaves the pool its bytes no longer count in the totals.

mod serve_harness;

use std::process::Command;

use serde_json::Value;
use serve_harness::{
    cv_json, cv_ok, offline_check, python_with_libnbd, run_ok, s, u64f, Server, TestDir,
    CMD_TIMEOUT, MIB,
};

/// Writes `len` bytes of 0x5a at offset 0 through libnbd, with no FLUSH.
fn write_unflushed(uri: &str, len: u64) {
    let script = format!(
        "import nbd\nh = nbd.NBD()\nh.connect_uri('{uri}')\nb = b'\\x5a' * (1 << 20)\n\
         for i in range({}):\n    h.pwrite(b, i << 20)\nh.shutdown()\n",
        len >> 20
    );
    run_ok(
        Command::new(python_with_libnbd()).args(["-c", &script]),
        CMD_TIMEOUT,
    );
}

#[test]
fn scrub_right_after_unflushed_writes_covers_them() {
    let dir = TestDir::new("scrub-unflushed");
    let devs = serve_harness::make_pool(&dir, "512M", "256M");
    // No timed commit during the test: only the scrub can commit the writes.
    let mut srv = Server::start(&dir, &devs, 3600);
    write_unflushed(&srv.uri("disk0"), 96 * MIB);
    let st = cv_json(&["scrub", "start", "-B", "--json", "--socket", srv.sock()]);
    assert_eq!(st["state"], "finished", "{st}");
    let scrubbed = u64f(&st, "data_bytes_scrubbed");
    // raid1: both copies of the 96 MiB.
    assert!(
        scrubbed >= 2 * 96 * MIB,
        "only {scrubbed} data bytes scrubbed: {st}"
    );
    assert_eq!(
        u64f(&st, "bytes_scrubbed"),
        u64f(&st, "bytes_total"),
        "a finished scrub of a quiet pool covers its whole total: {st}"
    );
    srv.stop();
    offline_check(&devs, true);
}

#[test]
fn scrub_totals_follow_the_members_after_device_remove() {
    let dir = TestDir::new("scrub-departed");
    let devs: Vec<_> = (0..3).map(|i| dir.join(format!("d{i}.img"))).collect();
    serve_harness::make_pool_on(&devs, "512M", "256M");
    let mut srv = Server::start(&dir, &devs, 1);
    write_unflushed(&srv.uri("disk0"), 64 * MIB);
    let before = cv_json(&["scrub", "start", "-B", "--json", "--socket", srv.sock()]);
    let ids = |v: &Value| -> Vec<u64> {
        v["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| u64f(d, "devid"))
            .collect()
    };
    assert_eq!(ids(&before), vec![1, 2, 3], "{before}");
    cv_ok(&["device", "remove", s(&devs[2]), "--socket", srv.sock()]);
    let after = cv_json(&["scrub", "status", "--json", "--socket", srv.sock()]);
    assert_eq!(ids(&after), vec![1, 2], "{after}");
    assert_eq!(after["departed_devids"], serde_json::json!([3]), "{after}");
    let sum: u64 = after["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| u64f(d, "bytes_total"))
        .sum();
    assert_eq!(u64f(&after, "bytes_total"), sum, "{after}");
    assert!(
        u64f(&after, "bytes_total") < u64f(&before, "bytes_total"),
        "the departed device's bytes still count: before {before}\nafter {after}"
    );
    let text = cv_ok(&["scrub", "status", "--socket", srv.sock()]).stdout;
    assert!(text.contains("Not counted:      devid [3]"), "{text}");
    srv.stop();
}
