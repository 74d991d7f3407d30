//! Every command accepts `--json` (issue 16, item 7): each one is run once
//! where it succeeds and once where it fails. Success prints one JSON
//! value on stdout; a failure prints `{"error", "exit_code"}` with
//! `exit_code` equal to the process's exit code, and the same command
//! without `--json` exits with the same code.

mod serve_harness;

use std::path::PathBuf;

use serde_json::Value;
use serve_harness::*;

/// Run with `--json` appended; require `code`, parse stdout as JSON.
fn json_run(args: &[&str], code: i32) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let o = cv(&a);
    assert_eq!(o.code, code, "exit code of --json run:\n{}", o.text());
    serde_json::from_str(&o.stdout)
        .unwrap_or_else(|e| panic!("stdout is not one JSON value ({e}):\n{}", o.text()))
}

/// Succeeds under `--json`; the object has `key`.
fn json_ok(args: &[&str], key: &str) -> Value {
    let v = json_run(args, 0);
    assert!(v.get(key).is_some(), "no `{key}` in {args:?}: {v:#}");
    v
}

/// Fails with `code` under `--json` with a JSON error naming `needle`,
/// and exits with the same code, printing `error:` on stderr, without it.
fn json_fails(args: &[&str], code: i32, needle: &str) {
    let v = json_run(args, code);
    let msg = v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{args:?}: {v:#}"));
    assert!(
        msg.contains(needle),
        "{args:?}: error {msg:?} lacks {needle:?}"
    );
    assert_eq!(v["exit_code"].as_i64(), Some(code as i64), "{v:#}");
    let plain = cv(args);
    assert_eq!(
        plain.code,
        code,
        "exit code without --json:\n{}",
        plain.text()
    );
    assert!(plain.stderr.contains("error"), "{}", plain.text());
    assert!(
        serde_json::from_str::<Value>(&plain.stdout).is_err() || plain.stdout.is_empty(),
        "plain run printed JSON:\n{}",
        plain.text()
    );
}

fn with<'a>(args: &[&'a str], devs: &'a [String]) -> Vec<&'a str> {
    let mut v = args.to_vec();
    v.extend(devs.iter().map(String::as_str));
    v
}

#[test]
fn every_command_speaks_json_on_success_and_failure() {
    let dir = TestDir::new("cli-json");
    let devs: Vec<String> = ["a.img", "b.img", "c.img"]
        .iter()
        .map(|d| s(&dir.join(d)).to_string())
        .collect();
    let pool = &devs[..2];
    let v = json_ok(&with(&["mkfs", "--size", "256M"], pool), "devices");
    assert_eq!(v["data"], "raid1");
    json_fails(&with(&["mkfs", "--size", "256M"], pool), 1, "--force");
    json_fails(&with(&["mkfs", "--data", "raid7"], pool), 2, "raid7");

    volume_commands(&dir, pool);
    pool_commands(&dir, pool);
    device_commands(&dir, pool, &devs[2]);
    job_commands(pool);
    tool_commands();
    online_commands(&dir, pool);
}

fn volume_commands(dir: &TestDir, pool: &[String]) {
    let v = json_ok(
        &with(&["volume", "create", "v", "--size", "32M"], pool),
        "created",
    );
    assert_eq!(v["size_bytes"], 32 << 20);
    json_fails(
        &with(&["volume", "create", "v", "--size", "32M"], pool),
        1,
        "exists",
    );
    let v = json_ok(&with(&["volume", "list"], pool), "volumes");
    assert_eq!(v["volumes"][0]["name"], "v");
    json_fails(&["volume", "list"], 2, "no target");
    json_ok(
        &with(&["volume", "resize", "v", "--size", "48M"], pool),
        "resized",
    );
    json_fails(
        &with(&["volume", "resize", "nope", "--size", "8M"], pool),
        1,
        "nope",
    );
    let v = json_ok(
        &with(&["volume", "set", "v", "--read-only", "false"], pool),
        "read_only",
    );
    assert_eq!(v["read_only"], false);
    json_fails(&with(&["volume", "set", "v"], pool), 2, "nothing to set");
    let file = dir.join("in.bin");
    write_random_file(&file, 8 << 20, 7);
    let v = json_ok(
        &with(&["volume", "import", "v", s(&file)], pool),
        "imported",
    );
    assert_eq!(v["bytes"], 8 << 20);
    let missing = dir.join("missing.bin");
    json_fails(
        &with(&["volume", "import", "v", s(&missing)], pool),
        1,
        "missing.bin",
    );
    let out = dir.join("out.bin");
    let v = json_ok(&with(&["volume", "export", "v", s(&out)], pool), "exported");
    assert_eq!(v["bytes"], 48 << 20);
    json_fails(
        &with(&["volume", "export", "nope", s(&out)], pool),
        1,
        "nope",
    );
    json_ok(
        &with(&["volume", "create", "gone", "--size", "8M"], pool),
        "created",
    );
    json_ok(&with(&["volume", "delete", "gone"], pool), "deleted");
    json_fails(&with(&["volume", "delete", "gone"], pool), 1, "gone");
    let v = json_ok(
        &with(&["volume", "snapshot", "v", "v.snap"], pool),
        "snapshot",
    );
    assert_eq!(v["source"], "v");
    json_fails(
        &with(&["volume", "snapshot", "v", "v.snap"], pool),
        1,
        "v.snap",
    );
    json_fails(&with(&["volume", "snapshot", "nope", "x"], pool), 1, "nope");
    let v = json_ok(
        &with(&["volume", "clone", "v.snap", "v.clone"], pool),
        "clone",
    );
    assert_eq!(v["source"], "v.snap");
    json_fails(&with(&["volume", "clone", "nope", "y"], pool), 1, "nope");
    // The clone's first 4 KiB rewritten: that is the whole difference.
    let four_k = dir.join("4k.bin");
    write_random_file(&four_k, 4096, 8);
    json_ok(
        &with(&["volume", "import", "v.clone", s(&four_k)], pool),
        "imported",
    );
    let v = json_ok(
        &with(&["volume", "diff", "v.snap", "v.clone"], pool),
        "changed",
    );
    assert_eq!(v["changed_bytes"], 4096, "{v}");
    assert_eq!(v["changed"][0]["offset_bytes"], 0, "{v}");
    json_fails(
        &with(&["volume", "diff", "v.snap", "nope"], pool),
        1,
        "nope",
    );
    let v = json_ok(&with(&["volume", "list"], pool), "volumes");
    let ro: Vec<(String, bool)> = v["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["name"].as_str().unwrap().to_string(),
                x["read_only"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ro,
        [
            ("v".into(), false),
            ("v.clone".into(), false),
            ("v.snap".into(), true)
        ]
    );
}

fn pool_commands(dir: &TestDir, pool: &[String]) {
    let missing = dir.join("none.img");
    json_ok(&with(&["usage"], pool), "block_groups");
    json_fails(&["usage", s(&missing)], 2, "none.img");
    let v = json_ok(&with(&["check", "--check-data-csum"], pool), "problems");
    assert_eq!(v["problems"].as_array().map(Vec::len), Some(0), "{v:#}");
    json_fails(&["check", s(&missing)], 2, "none.img");
    let v = json_ok(&with(&["dump-tree", "--tree", "volume"], pool), "trees");
    assert_eq!(v["trees"][0]["tree"], "volume");
    assert!(v["trees"][0]["root"]["level"].is_u64(), "{v:#}");
    json_fails(&with(&["dump-tree", "--tree", "bogus"], pool), 2, "bogus");
    json_ok(&with(&["device", "stats"], pool), "devices");
    json_fails(
        &with(&["device", "stats", "--socket", "/x"], pool),
        2,
        "not both",
    );
}

fn device_commands(dir: &TestDir, pool: &[String], third: &str) {
    std::fs::File::create(third)
        .and_then(|f| f.set_len(256 << 20))
        .unwrap();
    let v = json_ok(&with(&["device", "add", third], pool), "devid");
    let devid = v["devid"].as_u64().unwrap();
    let mut all = pool.to_vec();
    all.push(third.to_string());
    // A member named again: not "in use by another process" (its own lock).
    json_fails(&with(&["device", "add", third], &all), 1, "already devid");
    let id = devid.to_string();
    let v = json_ok(&with(&["device", "remove", &id], &all), "removed_devid");
    assert_eq!(v["removed_devid"], devid);
    json_fails(&with(&["device", "remove", "99"], pool), 2, "99");
    let new: PathBuf = dir.join("new.img");
    std::fs::File::create(&new)
        .and_then(|f| f.set_len(256 << 20))
        .unwrap();
    let v = json_ok(
        &with(&["device", "replace", "start", "2", s(&new)], pool),
        "state",
    );
    assert_eq!(v["state"], "finished", "{v:#}");
    let pool2 = [pool[0].clone(), s(&new).to_string()];
    json_ok(&with(&["device", "replace", "status"], &pool2), "state");
    json_fails(
        &with(&["device", "replace", "start", "9", s(&new)], &pool2),
        2,
        "9",
    );
    json_fails(
        &with(&["device", "replace", "cancel"], &pool2),
        2,
        "replace",
    );
    json_fails(
        &with(&["device", "replace", "resume"], &pool2),
        2,
        "replace",
    );
    // Later steps use the replaced pool.
    std::fs::rename(&new, &pool[1]).unwrap();
}

fn job_commands(pool: &[String]) {
    let v = json_ok(&with(&["scrub", "start", "-B"], pool), "state");
    assert_eq!(v["state"], "finished", "{v:#}");
    json_ok(&with(&["scrub", "status"], pool), "bytes_scrubbed");
    json_fails(&["scrub", "status", "/nonexistent.img"], 2, "nonexistent");
    json_fails(&["balance", "status", "/nonexistent.img"], 2, "nonexistent");
    json_fails(
        &["device", "replace", "status", "/nonexistent.img"],
        2,
        "nonexistent",
    );
    json_fails(&with(&["scrub", "pause"], pool), 2, "scrub");
    json_fails(&with(&["scrub", "cancel"], pool), 2, "scrub");
    json_fails(&with(&["scrub", "resume"], pool), 2, "scrub");
    json_fails(&with(&["scrub", "start", "-d", "77"], pool), 2, "77");
    let v = json_ok(&with(&["balance", "start", "--full"], pool), "state");
    assert_eq!(v["state"], "finished", "{v:#}");
    json_ok(&with(&["balance", "status"], pool), "state");
    json_fails(&with(&["balance", "start", "-dusage=abc"], pool), 2, "abc");
    json_fails(&with(&["balance", "pause"], pool), 2, "balance");
    json_fails(&with(&["balance", "cancel"], pool), 2, "balance");
    json_fails(&with(&["balance", "resume"], pool), 2, "balance");
}

fn tool_commands() {
    let v = json_ok(&["completions", "bash"], "script");
    assert!(v["script"].as_str().unwrap().contains("_chunkvol"));
    json_fails(&["completions", "tcsh"], 2, "tcsh");
    let v = json_ok(&["manpage"], "roff");
    assert!(v["roff"].as_str().unwrap().contains(".TH"));
    json_fails(&["manpage", "extra"], 2, "extra");
    let v = json_run(
        &["bench-csum", "--seconds", "0.01", "--buffer-bytes", "4096"],
        0,
    );
    assert!(v.as_array().is_some_and(|a| !a.is_empty()), "{v:#}");
    json_fails(&["bench-csum", "--buffer-bytes", "100"], 2, "multiple");
    let v = json_ok(
        &[
            "stress",
            "--profile",
            "single",
            "--duration",
            "1",
            "--seed",
            "3",
        ],
        "runs",
    );
    assert_eq!(v["ok"], true, "{v:#}");
    json_fails(&["stress", "--mode", "bogus"], 2, "bogus");
    json_fails(&["frobnicate"], 2, "frobnicate");
    let v = json_ok(&["--version"], "version");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["name"], "chunkvol");
}

fn online_commands(dir: &TestDir, pool: &[String]) {
    let paths: Vec<PathBuf> = pool.iter().map(PathBuf::from).collect();
    let mut srv = Server::start_with(dir, &paths, 1, &["--json"]);
    let log = std::fs::read_to_string(dir.join("serve.log")).unwrap();
    let banner = log
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON banner in:\n{log}"));
    let b: Value = serde_json::from_str(banner).unwrap();
    assert_eq!(b["exports"][0], "v", "{b:#}");
    assert!(b["uri"].as_str().unwrap().starts_with("nbd://127.0.0.1:"));
    let sock = srv.sock().to_string();
    let v = json_ok(&["scrub", "start", "-B", "--socket", &sock], "state");
    assert_eq!(v["state"], "finished", "{v:#}");
    json_fails(&["balance", "pause", "--socket", &sock], 2, "balance");
    json_ok(
        &["volume", "create", "w", "--size", "8M", "--socket", &sock],
        "created",
    );
    json_fails(
        &["volume", "create", "w", "--size", "8M", "--socket", &sock],
        1,
        "exists",
    );
    srv.stop();
    json_fails(&["serve", s(&dir.join("none.img"))], 2, "none.img");
}
