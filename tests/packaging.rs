//! What a packager and an operator get: shell completions and a man page
//! generated from the CLI, a systemd unit that `systemd-analyze verify`
//! accepts, and sd_notify readiness (READY=1 with a STATUS, STOPPING=1).

mod serve_harness;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use serve_harness::{
    cv, free_port, make_pool, require_tools, run, s, sigint, tool, wait_timeout, TestDir, BIN,
    CMD_TIMEOUT, STOP_TIMEOUT,
};

#[test]
fn completions_and_man_page_are_generated() {
    require_tools(&["bash"]);
    let dir = TestDir::new("completions");
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let o = cv(&["completions", shell]);
        assert_eq!(o.code, 0, "{shell}: {}", o.text());
        for word in ["chunkvol", "scrub", "replace", "--read-only"] {
            assert!(o.stdout.contains(word), "{shell} completions lack {word}");
        }
        if shell == "bash" {
            let f = dir.join("chunkvol.bash");
            std::fs::write(&f, &o.stdout).unwrap();
            let o = run(Command::new(tool("bash")).args(["-n", s(&f)]), CMD_TIMEOUT);
            assert_eq!(
                o.code,
                0,
                "the bash completion script does not parse: {}",
                o.text()
            );
        }
    }
    let o = cv(&["completions", "tcsh"]);
    assert_eq!(o.code, 2, "an unknown shell is a usage error: {}", o.text());
    let o = cv(&["manpage"]);
    assert_eq!(o.code, 0, "{}", o.text());
    assert!(o.stdout.contains(".TH chunkvol 1"), "no .TH header");
    for word in ["serve", "scrub", "SUBCOMMANDS"] {
        assert!(o.stdout.contains(word), "the man page lacks {word}");
    }
}

#[test]
fn the_systemd_unit_verifies() {
    require_tools(&["systemd-analyze"]);
    let dir = TestDir::new("unit");
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/contrib/chunkvol.service"
    ))
    .expect("contrib/chunkvol.service");
    assert!(unit.contains("Type=notify") && unit.contains("KillSignal=SIGINT"));
    // The unit names the installed path; verify it against this build.
    let f = dir.join("chunkvol.service");
    std::fs::write(&f, unit.replace("/usr/local/bin/chunkvol", BIN)).unwrap();
    let o = run(
        Command::new(tool("systemd-analyze")).args(["verify", "--man=no", s(&f)]),
        CMD_TIMEOUT,
    );
    assert_eq!(o.code, 0, "systemd-analyze verify:\n{}", o.text());
    assert!(o.stderr.trim().is_empty(), "warnings:\n{}", o.text());
    // The verifier does fail a broken unit.
    let bad = dir.join("broken.service");
    std::fs::write(
        &bad,
        unit.replace(BIN, "/nonexistent/chunkvol")
            .replace("/usr/local/bin/chunkvol", "/nonexistent/chunkvol"),
    )
    .unwrap();
    let o = run(
        Command::new(tool("systemd-analyze")).args(["verify", "--man=no", s(&bad)]),
        CMD_TIMEOUT,
    );
    assert_ne!(
        o.code,
        0,
        "a unit with a missing binary verified:\n{}",
        o.text()
    );
}

#[test]
fn serve_notifies_readiness_and_stopping() {
    let dir = TestDir::new("notify");
    let devs = make_pool(&dir, "256M", "64M");
    let sock = dir.join("notify.sock");
    let rx = UnixDatagram::bind(&sock).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let port = free_port();
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--socket",
            s(&dir.join("ctl.sock")),
        ])
        .args(&devs)
        .env("NOTIFY_SOCKET", &sock)
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("serve.log")).unwrap())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = rx.recv(&mut buf).expect("no READY=1 within 20 s");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.contains("READY=1"), "{msg}");
    assert!(
        msg.contains(&format!("STATUS=serving disk0 on nbd://127.0.0.1:{port}")),
        "{msg}"
    );
    // Ready means the NBD listener accepts.
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("listening when READY=1 is sent");
    sigint(child.id());
    let n = rx.recv(&mut buf).expect("no STOPPING=1");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    let st = wait_timeout(&mut child, STOP_TIMEOUT).expect("serve exits after SIGINT");
    assert!(st.success());
    // Its log went to a file: no colour codes in it.
    let log = std::fs::read_to_string(dir.join("serve.log")).unwrap();
    assert!(log.contains("INFO"), "{log}");
    assert!(!log.contains('\x1b'), "ANSI escapes in a log file:\n{log}");
}
