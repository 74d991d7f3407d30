//! The control socket acts with the server's privileges, so it is not
//! reachable by other users: it has mode 0600, and a peer of another uid
//! that gets past the file mode anyway (CAP_DAC_OVERRIDE) is refused by its
//! credentials (SO_PEERCRED) and logged. (That the socket is never
//! reachable with a wider mode, being bound in a private directory and
//! renamed into place, is by construction; this test sees only the result.)

mod serve_harness;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::Command;

use serve_harness::{make_pool, require_tools, run, tool, Server, TestDir, BIN, CMD_TIMEOUT};

/// Not the server's uid, and not root.
const OTHER_UID: &str = "4242";

fn as_other_uid(extra: &[&str], sock: &str) -> serve_harness::Out {
    let mut c = Command::new(tool("setpriv"));
    c.args(["--reuid", OTHER_UID, "--regid", OTHER_UID, "--clear-groups"])
        .args(extra)
        .args([BIN, "usage", "--socket", sock]);
    run(&mut c, CMD_TIMEOUT)
}

#[test]
fn other_users_cannot_use_the_control_socket() {
    require_tools(&["setpriv"]);
    let dir = TestDir::new("control-socket");
    let devs = make_pool(&dir, "256M", "64M");
    let srv = Server::start(&dir, &devs, 1);
    let meta = std::fs::metadata(&srv.sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let leftovers: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".chunkvol-sock")
        })
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary socket directory left behind"
    );
    // Our own uid is served.
    serve_harness::cv_ok(&["usage", "--socket", srv.sock()]);

    // The file mode stops another uid at connect.
    let o = as_other_uid(&[], srv.sock());
    assert!(
        o.code != 0 && o.stderr.contains("Permission denied"),
        "another uid reached the control socket:\n{}",
        o.text()
    );
    // Past the file mode, the server refuses by the peer's credentials.
    let caps = [
        "--inh-caps",
        "+dac_override",
        "--ambient-caps",
        "+dac_override",
    ];
    let o = as_other_uid(&caps, srv.sock());
    assert_eq!(o.code, 1, "{}", o.text());
    assert!(
        o.stderr
            .contains(&format!("permission denied: uid {OTHER_UID}")),
        "{}",
        o.text()
    );
    let log = std::fs::read_to_string(&srv.log).unwrap();
    assert!(
        log.contains(&format!(
            "control socket: refused a connection from uid {OTHER_UID}"
        )),
        "the refusal is not logged:\n{log}"
    );
    // The server still serves its owner.
    serve_harness::cv_ok(&["usage", "--socket", srv.sock()]);
}
