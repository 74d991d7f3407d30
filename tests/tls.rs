//! NBD over TLS with real clients: nbdinfo (libnbd, GnuTLS) and qemu-io
//! (tls-creds-x509) read and write through `serve --tls-cert`; a plain
//! client is refused; with `--tls-client-ca`, a client without a
//! certificate is refused too. Certificates are made with openssl in the test.

mod serve_harness;

use std::fs;
use std::path::Path;
use std::process::Command;

use serve_harness::{
    make_pool, offline_check, require_tools, run, run_ok, s, tool, Out, Server, TestDir,
    CMD_TIMEOUT,
};

fn openssl(dir: &Path, args: &[&str]) {
    run_ok(
        Command::new(tool("openssl")).args(args).current_dir(dir),
        CMD_TIMEOUT,
    );
}

/// A CA, a server certificate for 127.0.0.1, and a client certificate, in
/// the layout libnbd and qemu read (`ca-cert.pem`, `client-cert.pem`,
/// `client-key.pem`); the server's go to `server-*.pem` beside them.
fn make_certs(dir: &Path) {
    fs::create_dir_all(dir).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "30",
            "-subj",
            "/CN=chunkvol test CA",
        ],
    );
    let exts = [
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n"),
        ("client", "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n"),
    ];
    for (who, ext) in exts {
        fs::write(dir.join(format!("{who}.ext")), ext).unwrap();
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{who}-key.pem"),
                "-out",
                &format!("{who}.csr"),
                "-subj",
                &format!("/CN={who}"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{who}.csr"),
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &format!("{who}-cert.pem"),
                "-days",
                "30",
                "-extfile",
                &format!("{who}.ext"),
            ],
        );
    }
}

/// A directory with only the CA: a client that trusts the server but has
/// no certificate of its own.
fn ca_only(certs: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    fs::copy(certs.join("ca-cert.pem"), to.join("ca-cert.pem")).unwrap();
}

fn nbdinfo(uri: &str) -> Out {
    run(Command::new(tool("nbdinfo")).arg(uri), CMD_TIMEOUT)
}

fn tls_uri(srv: &Server, certs: &Path) -> String {
    format!(
        "nbds://127.0.0.1:{}/disk0?tls-certificates={}",
        srv.port,
        s(certs)
    )
}

fn qemu_io_tls(srv: &Server, certs: &Path, cmds: &[&str]) -> Out {
    let mut c = Command::new(tool("qemu-io"));
    c.args([
        "--object",
        &format!("tls-creds-x509,id=tls0,dir={},endpoint=client", s(certs)),
        "--image-opts",
        &format!(
            "driver=raw,file.driver=nbd,file.host=127.0.0.1,file.port={},file.export=disk0,file.tls-creds=tls0",
            srv.port
        ),
    ]);
    for x in cmds {
        c.args(["-c", x]);
    }
    run(&mut c, CMD_TIMEOUT)
}

#[test]
fn tls_clients_read_and_write_and_plain_ones_are_refused() {
    require_tools(&["openssl", "nbdinfo", "nbdcopy", "qemu-io"]);
    let dir = TestDir::new("tls");
    let certs = dir.join("certs");
    make_certs(&certs);
    let devs = make_pool(&dir, "256M", "64M");
    let (cert, key) = (certs.join("server-cert.pem"), certs.join("server-key.pem"));
    let mut srv = Server::start_with(
        &dir,
        &devs,
        1,
        &["--tls-cert", s(&cert), "--tls-key", s(&key)],
    );

    let o = nbdinfo(&tls_uri(&srv, &certs));
    assert!(
        o.code == 0 && o.stdout.contains("disk0"),
        "nbdinfo over TLS:\n{}",
        o.text()
    );
    // 32 MiB each way through the TLS pumps, with several requests in flight.
    let (src, back) = (dir.join("src.bin"), dir.join("back.bin"));
    serve_harness::write_random_file(&src, 32 << 20, 0x7153);
    let uri = tls_uri(&srv, &certs);
    run_ok(
        Command::new(tool("nbdcopy")).args([s(&src), &uri]),
        CMD_TIMEOUT,
    );
    run_ok(
        Command::new(tool("nbdcopy")).args([&uri, s(&back)]),
        CMD_TIMEOUT,
    );
    let back = fs::read(&back).unwrap();
    assert!(
        back[..32 << 20] == fs::read(&src).unwrap()[..],
        "data read back over TLS differs"
    );
    let o = qemu_io_tls(&srv, &certs, &["write -P 0x5a 0 1M", "read -P 0x5a 0 1M"]);
    assert!(
        o.code == 0 && !o.all().contains("failed"),
        "qemu-io over TLS:\n{}",
        o.text()
    );
    // A client whose CA did not sign the server's certificate refuses it.
    let stranger = dir.join("other-ca");
    make_certs(&stranger);
    let o = nbdinfo(&tls_uri(&srv, &stranger));
    assert!(
        o.code != 0,
        "a client without our CA accepted the server:\n{}",
        o.text()
    );
    // FORCEDTLS: a plain client gets no export.
    let o = nbdinfo(&srv.uri("disk0"));
    assert!(o.code != 0, "a plain client was served:\n{}", o.text());
    assert!(o.all().to_lowercase().contains("tls"), "{}", o.text());
    srv.stop();

    // --tls on: plain clients may still connect, and read what TLS wrote.
    let mut srv = Server::start_with(
        &dir,
        &devs,
        1,
        &["--tls-cert", s(&cert), "--tls-key", s(&key), "--tls", "on"],
    );
    serve_harness::qemu_io(&srv.uri("disk0"), &["read -P 0x5a 0 1M".into()]);
    srv.stop();

    // --tls-client-ca: a client must present a certificate from that CA.
    let ca = certs.join("ca-cert.pem");
    let mut srv = Server::start_with(
        &dir,
        &devs,
        1,
        &[
            "--tls-cert",
            s(&cert),
            "--tls-key",
            s(&key),
            "--tls-client-ca",
            s(&ca),
        ],
    );
    let o = qemu_io_tls(&srv, &certs, &["read -P 0x5a 0 1M"]);
    assert!(
        o.code == 0 && !o.all().contains("failed"),
        "client with a certificate:\n{}",
        o.text()
    );
    let anon = dir.join("anon");
    ca_only(&certs, &anon);
    let o = nbdinfo(&tls_uri(&srv, &anon));
    assert!(
        o.code != 0,
        "a client without a certificate was served:\n{}",
        o.text()
    );
    let o = qemu_io_tls(&srv, &anon, &["read 0 4k"]);
    assert!(
        o.code != 0,
        "qemu without a client certificate was served:\n{}",
        o.text()
    );
    srv.stop();
    offline_check(&devs, true);
}

#[test]
fn bad_tls_files_are_refused_before_the_pool_opens() {
    let dir = TestDir::new("tls-bad");
    let devs = make_pool(&dir, "256M", "64M");
    let missing = dir.join("nope.pem");
    let mut a = vec!["serve", "--tls-cert", s(&missing), "--tls-key", s(&missing)];
    a.extend(devs.iter().map(|d| s(d)));
    let o = serve_harness::cv(&a);
    assert_eq!(o.code, 2, "{}", o.text());
    assert!(
        o.stderr.contains("nope.pem") && o.stderr.contains("certificates"),
        "{}",
        o.text()
    );
    let o = serve_harness::cv(&["serve", "--tls-key", s(&missing)]);
    assert_eq!(o.code, 2, "--tls-key alone is a usage error: {}", o.text());
}

/// Holds a TLS connection open (after one read) until stdin closes.
const HOLD_PY: &str = r#"
import nbd, sys
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates(sys.argv[2])
h.connect_uri(sys.argv[1])
h.pread(4096, 0)
print("connected", flush=True)
sys.stdin.read()
"#;

#[test]
fn shutdown_with_an_open_tls_connection_exits_cleanly() {
    require_tools(&["openssl"]);
    let dir = TestDir::new("tls-shutdown");
    let certs = dir.join("certs");
    make_certs(&certs);
    let devs = make_pool(&dir, "256M", "64M");
    let (cert, key) = (certs.join("server-cert.pem"), certs.join("server-key.pem"));
    let mut srv = Server::start_with(
        &dir,
        &devs,
        1,
        &["--tls-cert", s(&cert), "--tls-key", s(&key)],
    );
    let uri = format!("nbds://127.0.0.1:{}/disk0", srv.port);
    let mut py = Command::new(serve_harness::python_with_libnbd())
        .args(["-c", HOLD_PY, &uri, s(&certs)])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(py.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "connected");
    // SIGINT with the TLS client idle: the grace ends, the socket is cut,
    // the pumps end, the server exits 0 (Server::stop asserts all three).
    srv.stop();
    drop(py.stdin.take());
    let _ = py.wait();
    offline_check(&devs, true);
}
