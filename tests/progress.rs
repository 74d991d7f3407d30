//! Progress bars (issue 16, item 1): every command that waits for a long
//! operation draws a bar with rate and time left when stderr is a
//! terminal, online and offline, and prints none otherwise. The terminal is
//! a pseudo-terminal from util-linux `script`.

mod common;
mod serve_harness;

use std::path::{Path, PathBuf};
use std::process::Command;

use serve_harness::*;

/// Run chunkvol under a pseudo-terminal; its screen output, `\r` as lines.
fn on_tty(args: &[&str]) -> String {
    let script = tool("script");
    // A wide terminal, so a frame is one line whatever the default is.
    let mut line = format!("stty cols 200 rows 50; {}", shell_quote(BIN));
    for a in args {
        line.push(' ');
        line.push_str(&shell_quote(a));
    }
    let o = run_ok(
        Command::new(script).args(["-qec", &line, "/dev/null"]),
        CMD_TIMEOUT,
    );
    o.stdout.replace('\r', "\n")
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The frames of `label`'s bar: `label [bar] NN% AMOUNT RATE/s ...`.
fn frames<'a>(screen: &'a str, label: &str) -> Vec<&'a str> {
    let head = format!("{label} [");
    screen
        .lines()
        .filter_map(|l| l.find(&head).map(|i| l[i..].trim_end()))
        .filter(|l| l.contains("%") && l.contains("/s "))
        .collect()
}

/// A bar was drawn, and its last frame shows the operation complete.
fn assert_bar(screen: &str, label: &str, end: &str) {
    let f = frames(screen, label);
    let last = f
        .last()
        .unwrap_or_else(|| panic!("no {label} bar on the terminal:\n{screen}"));
    assert!(last.contains("100%"), "last frame {last:?}");
    assert!(last.ends_with(end), "last frame {last:?}, want {end:?}");
}

/// Without a terminal: the result only, no bar.
fn assert_no_bar(args: &[&str]) {
    let o = cv_ok(args);
    assert!(
        !o.stderr.contains('[') && !o.stderr.contains('\r') && !o.stdout.contains('\r'),
        "a bar without a terminal:\n{}",
        o.text()
    );
}

fn with<'a>(args: &[&'a str], tail: &'a [String]) -> Vec<&'a str> {
    let mut v = args.to_vec();
    v.extend(tail.iter().map(String::as_str));
    v
}

fn sparse(p: &Path) -> String {
    std::fs::File::create(p)
        .and_then(|f| f.set_len(512 << 20))
        .unwrap();
    s(p).to_string()
}

#[test]
fn long_commands_draw_a_bar_on_a_terminal_only() {
    let dir = TestDir::new("progress");
    let paths = vec![dir.join("a.img"), dir.join("b.img"), dir.join("c.img")];
    make_pool_on(&paths, "512M", "256M");
    let devs: Vec<String> = paths.iter().map(|p| s(p).to_string()).collect();
    let input = dir.join("in.bin");
    write_random_file(&input, 96 << 20, 11);
    let out = dir.join("out.bin");

    // Offline.
    let sc = on_tty(&with(&["volume", "import", "disk0", s(&input)], &devs));
    assert_bar(&sc, "import", "done");
    assert_no_bar(&with(&["volume", "import", "disk0", s(&input)], &devs));
    assert_bar(
        &on_tty(&with(&["volume", "export", "disk0", s(&out)], &devs)),
        "export",
        "done",
    );
    live_scrub(&with(&["scrub", "start", "-B", "--limit", "48M"], &devs));
    assert_no_bar(&with(&["scrub", "start", "-B"], &devs));
    let sc = on_tty(&with(&["balance", "start", "--full"], &devs));
    assert_bar(&sc, "balance", "finished");
    assert!(frames(&sc, "balance")
        .iter()
        .all(|f| f.contains(" groups ")));
    let new = sparse(&dir.join("new.img"));
    let sc = on_tty(&with(&["device", "replace", "start", "3", &new], &devs));
    assert_bar(&sc, "replace", "finished");
    let devs = vec![devs[0].clone(), devs[1].clone(), new];
    assert_bar(
        &on_tty(&with(&["device", "remove", "3"], &devs)),
        "remove",
        "done",
    );

    // Online: the bar polls the server.
    let two: Vec<PathBuf> = devs[..2].iter().map(PathBuf::from).collect();
    let mut srv = Server::start(&dir, &two, 5);
    let sock = vec!["--socket".to_string(), srv.sock().to_string()];
    live_scrub(&with(&["scrub", "start", "-B", "--limit", "48M"], &sock));
    assert_no_bar(&with(&["scrub", "start", "-B"], &sock));
    let sc = on_tty(&with(&["balance", "start", "-dusage=100", "-B"], &sock));
    assert_bar(&sc, "balance", "finished");
    status_has_pace(&["balance", "status"], &sock);
    let sc = on_tty(&with(&["volume", "import", "disk0", s(&input)], &sock));
    assert_bar(&sc, "import", "done");
    let third = sparse(&dir.join("d.img"));
    cv_ok(&with(&["device", "add", &third], &sock));
    // b.img by new.img (wiped by the remove above), then a.img away.
    let sc = on_tty(&with(
        &["device", "replace", "start", &devs[1], &devs[2], "-B"],
        &sock,
    ));
    assert_bar(&sc, "replace", "finished");
    status_has_pace(&["device", "replace", "status"], &sock);
    assert_bar(
        &on_tty(&with(&["device", "remove", &devs[0]], &sock)),
        "remove",
        "done",
    );
    srv.stop();
}

/// A job's `status` from this server: duration, rate and time left in
/// JSON, and in text the rate and a local RFC 3339 start time.
fn status_has_pace(cmd: &[&str], sock: &[String]) {
    let v = cv_json(&with(&[cmd, &["--json"]].concat(), sock));
    assert!(v["duration_s"].as_f64().is_some_and(|d| d > 0.0), "{v:#}");
    assert!(
        v["rate_bytes_per_s"].as_u64().is_some_and(|r| r > 0),
        "{v:#}"
    );
    assert!(v.get("eta_s").is_some(), "{v:#}");
    let text = cv_ok(&with(cmd, sock)).stdout;
    assert!(text.contains("Rate:"), "{text}");
    let started = text
        .lines()
        .find_map(|l| l.strip_prefix("Started at:"))
        .unwrap_or_else(|| panic!("no start time in:\n{text}"))
        .trim();
    // 2026-12-01T06:10:00+00:00
    let b = started.as_bytes();
    assert!(
        started.len() == 25 && b[10] == b'T' && (b[19] == b'+' || b[19] == b'-'),
        "not RFC 3339: {started:?}"
    );
}

/// A scrub slow enough to watch: frames while it runs show a growing
/// percentage with a rate and a time left, and the last one its end.
fn live_scrub(args: &[&str]) {
    let sc = on_tty(args);
    let f = frames(&sc, "scrub");
    let running: Vec<&&str> = f.iter().filter(|l| l.contains(" eta ")).collect();
    let pct = |l: &str| {
        let i = l.find('%').unwrap();
        l[..i].rsplit(' ').next().unwrap().parse::<u32>().unwrap()
    };
    let mut seen: Vec<u32> = running.iter().map(|l| pct(l)).collect();
    seen.dedup();
    assert!(
        seen.len() >= 2 && seen.windows(2).all(|w| w[0] <= w[1]),
        "no live progress in {f:#?}"
    );
    assert!(
        running.iter().any(|l| l.contains("MiB/s eta ")),
        "no rate and time left in {running:#?}"
    );
    assert_bar(&sc, "scrub", "finished");
}

/// What the bar of a device remove reads: the `progress` request reports
/// the bytes of the groups moved so far, while the remove runs (held by a
/// failpoint before its second group).
#[test]
fn a_device_remove_reports_its_progress_while_it_runs() {
    use chunkvol::format::Profile;
    use chunkvol::jobs::{control, devices};
    use chunkvol::util::failpoint::{self, Action};

    let devs = common::mem_devices(3, 256 << 20);
    let opts = chunkvol::MkfsOptions {
        data: Some(Profile::Raid1),
        metadata: Some(Profile::Raid1),
        node_bytes: 4096,
        ..Default::default()
    };
    chunkvol::Pool::mkfs(common::as_block(&devs), &opts).unwrap();
    let pool = common::open_mem(&devs);
    let v = pool.create_volume("v", 200 << 20).unwrap();
    v.write_at(&common::pattern(3, 150 << 20), 0).unwrap();
    pool.flush().unwrap();
    let fs = pool.fs().clone();
    let on3 = devices::chunks_on(&fs, 3);
    assert!(on3.len() >= 2, "devid 3 holds {on3:x?}");
    let len = |s: u64| fs.block_group_at(s).unwrap().length;
    let total: u64 = on3.iter().map(|&s| len(s)).sum();
    let first = len(on3[0]);
    failpoint::set("devices::remove_group", Action::PauseIf(on3[1]));
    let remover = {
        let fs = fs.clone();
        std::thread::spawn(move || devices::remove(&fs, 3))
    };
    assert!(failpoint::wait_paused(
        "devices::remove_group",
        std::time::Duration::from_secs(60)
    ));
    let t = control::tasks(&fs);
    assert_eq!(t.len(), 1, "{t:?}");
    assert_eq!((t[0].kind.as_str(), t[0].subject.as_str()), ("remove", "3"));
    assert_eq!((t[0].done_bytes, t[0].total_bytes), (first, total), "{t:?}");
    failpoint::release("devices::remove_group");
    remover.join().unwrap().unwrap();
    assert!(
        control::tasks(&fs).is_empty(),
        "the task ends with the remove"
    );
    failpoint::reset();
}
