//! `serve --metrics`: the Prometheus endpoint scraped while NBD clients work
//! and while a scrub repairs injected corruption, parsed with Python's
//! prometheus_client (OpenMetrics parser), and checked against
//! `device stats --json` and `scrub status --json`.

mod serve_harness;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};

use serde_json::Value;
use serve_harness::{
    cv_json, free_port, make_pool, qemu_io, require_tools, s, Server, TestDir, MIB,
};

/// Parses an OpenMetrics exposition with prometheus_client; every sample
/// as "name{k=v,...}" -> value (labels sorted).
const PARSE_PY: &str = r#"
import sys, json
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(sys.stdin.read()):
    for smp in fam.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(smp.labels.items()))
        out[f"{smp.name}{{{labels}}}"] = smp.value
print(json.dumps(out))
"#;

fn scrape(port: u16) -> BTreeMap<String, f64> {
    let body = {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics listener");
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        assert!(
            r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200"),
            "{r}"
        );
        assert!(r.contains("application/openmetrics-text"), "{r}");
        r.split_once("\r\n\r\n").unwrap().1.to_string()
    };
    let mut py = Command::new("/usr/bin/python3")
        .args(["-c", PARSE_PY])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    py.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let o = py.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "the exposition does not parse:\n{}\n{body}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn get(m: &BTreeMap<String, f64>, key: &str) -> f64 {
    *m.get(key)
        .unwrap_or_else(|| panic!("no sample {key} in {:#?}", m.keys().collect::<Vec<_>>()))
}

/// Corrupts `n` data sectors on their first copy (pool offline).
fn corrupt_sectors(devs: &[std::path::PathBuf], n: usize) {
    let pool = chunkvol::Pool::open_paths(devs).unwrap();
    let (start, len) = pool.data_extents().unwrap()[0];
    assert!(len >= n as u64 * 4096);
    let plan: Vec<_> = (0..n as u64)
        .map(|i| pool.sector_copies(start + i * 4096).unwrap()[0].clone())
        .collect();
    pool.close().unwrap();
    for (p, phys) in plan {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .unwrap();
        let mut b = vec![0u8; 4096];
        f.read_exact_at(&mut b, phys).unwrap();
        b[100] ^= 0xff;
        f.write_all_at(&b, phys).unwrap();
    }
}

#[test]
fn metrics_follow_nbd_load_and_a_repairing_scrub() {
    require_tools(&["qemu-io"]);
    let dir = TestDir::new("metrics");
    let devs = make_pool(&dir, "512M", "256M");
    let mut srv = Server::start(&dir, &devs, 1);
    qemu_io(&srv.uri("disk0"), &["write -P 0x61 0 16M".into()]);
    srv.stop();
    corrupt_sectors(&devs, 5);
    let port = free_port();
    let mut srv = Server::start_with(&dir, &devs, 1, &["--metrics", &port.to_string()]);

    let before = scrape(port);
    assert_eq!(get(&before, "chunkvol_scrub_state{state=never}"), 1.0);
    assert_eq!(
        get(&before, "chunkvol_volume_size_bytes{volume=disk0}"),
        256.0 * MIB as f64
    );
    // NBD load: counters move by what the client did.
    qemu_io(
        &srv.uri("disk0"),
        &[
            "write -P 0x62 32M 8M".into(),
            "read -P 0x62 32M 8M".into(),
            "flush".into(),
        ],
    );
    // Small flushed writes go through the intent log (a background commit
    // may take one or two of them first).
    let small: Vec<String> = (0..20)
        .flat_map(|i| {
            [
                format!("write -P 0x63 {} 4k", 64 * MIB + i * 8192),
                "flush".into(),
            ]
        })
        .collect();
    qemu_io(&srv.uri("disk0"), &small);
    let after = scrape(port);
    let moved = |k: &str| get(&after, k) - before.get(k).copied().unwrap_or(0.0);
    assert!(moved("chunkvol_nbd_request_bytes_total{command=write}") >= 8.0 * MIB as f64);
    assert!(moved("chunkvol_nbd_request_bytes_total{command=read}") >= 8.0 * MIB as f64);
    assert!(moved("chunkvol_nbd_requests_total{command=flush}") >= 1.0);
    assert_eq!(
        get(&after, "chunkvol_nbd_request_errors_total{command=write}"),
        0.0
    );
    assert_eq!(
        get(
            &after,
            "chunkvol_nbd_request_duration_seconds_count{command=write}"
        ),
        get(&after, "chunkvol_nbd_requests_total{command=write}"),
        "one latency observation per request"
    );
    assert!(get(&after, "chunkvol_nbd_connections_total{}") >= 1.0);
    assert!(get(&after, "chunkvol_commit_duration_seconds_count{}") >= 1.0);
    assert!(moved("chunkvol_intent_log_blocks_total{}") >= 10.0);
    assert!(moved("chunkvol_intent_log_bytes_total{}") >= 10.0 * 8192.0);
    assert_eq!(get(&after, "chunkvol_intent_log_replayed_records{}"), 0.0);
    assert!(moved("chunkvol_volume_allocated_bytes{volume=disk0}") >= 8.0 * MIB as f64);

    // A scrub that repairs the 5 bad sectors.
    let st = cv_json(&["scrub", "start", "-B", "--json", "--socket", srv.sock()]);
    let m = scrape(port);
    assert_eq!(get(&m, "chunkvol_scrub_state{state=finished}"), 1.0);
    assert_eq!(
        get(&m, "chunkvol_scrub_errors{kind=csum}"),
        st["csum_errors"].as_f64().unwrap()
    );
    assert_eq!(get(&m, "chunkvol_scrub_errors{kind=csum}"), 5.0);
    assert_eq!(get(&m, "chunkvol_scrub_corrected_errors{}"), 5.0);
    assert_eq!(get(&m, "chunkvol_scrub_uncorrectable_errors{}"), 0.0);
    assert_eq!(
        get(&m, "chunkvol_scrub_scrubbed_bytes{}"),
        st["bytes_scrubbed"].as_f64().unwrap()
    );
    assert!(get(&m, "chunkvol_scrub_last_completed_timestamp_seconds{}") > 1.7e9);
    let stats: Value = cv_json(&["device", "stats", "--json", "--socket", srv.sock()]);
    for d in stats["devices"].as_array().expect("devices") {
        let (id, path) = (d["devid"].as_u64().unwrap(), d["path"].as_str().unwrap());
        for kind in ["read", "write", "flush", "corruption", "generation"] {
            let key = format!("chunkvol_device_errors_total{{devid={id},kind={kind},path={path}}}");
            let want = d[format!("{kind}_errs")].as_f64().unwrap();
            assert_eq!(get(&m, &key), want, "{key} vs device stats {d}");
        }
    }
    let corr: f64 = ["1", "2"]
        .iter()
        .map(|id| {
            let path = s(&devs[id.parse::<usize>().unwrap() - 1]);
            get(
                &m,
                &format!("chunkvol_device_errors_total{{devid={id},kind=corruption,path={path}}}"),
            )
        })
        .sum();
    assert_eq!(
        corr, 5.0,
        "the 5 repaired sectors count as corruption errors"
    );
    srv.stop();
}

/// `serve --intent-log off`: every flush commits the tree, and the log
/// carries nothing (with it on, the test above sees log blocks).
#[test]
fn intent_log_off_makes_every_flush_a_commit() {
    require_tools(&["qemu-io"]);
    let dir = TestDir::new("metrics-nolog");
    let devs = make_pool(&dir, "512M", "256M");
    let port = free_port();
    let srv = Server::start_with(
        &dir,
        &devs,
        1,
        &["--metrics", &port.to_string(), "--intent-log", "off"],
    );
    let before = scrape(port);
    let small: Vec<String> = (0..20)
        .flat_map(|i| [format!("write -P 0x64 {} 4k", i * 8192), "flush".into()])
        .collect();
    qemu_io(&srv.uri("disk0"), &small);
    let after = scrape(port);
    let moved = |k: &str| get(&after, k) - before.get(k).copied().unwrap_or(0.0);
    assert_eq!(get(&after, "chunkvol_intent_log_blocks_total{}"), 0.0);
    assert!(
        moved("chunkvol_commit_duration_seconds_count{}") >= 20.0,
        "one commit per flush"
    );
}
