//! Shared by the tests that drive `chunkvol serve` and its CLI with real
//! clients: bounded command runs, test directories, a server handle, tools.
#![allow(dead_code)]

use std::collections::HashSet;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_chunkvol");

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// Bound for one ordinary client command.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(180);
/// Bound for the server to start accepting connections.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound for the server to exit after SIGINT (its shutdown grace is 30 s).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------
// Tools

/// Path of a required tool; panics (the test fails) when it is missing.
pub fn tool(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in [
        "/usr/local/sbin",
        "/usr/local/bin",
        "/usr/sbin",
        "/usr/bin",
        "/sbin",
        "/bin",
    ] {
        dirs.push(PathBuf::from(d));
    }
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "required tool `{name}` is not installed (run scripts/install-test-deps.sh; \
         Debian packages: qemu-utils libnbd-bin nbdfuse nbdkit fio fuse3 e2fsprogs mount \
         python3-libnbd)"
    )
}

pub fn require_tools(names: &[&str]) {
    for n in names {
        tool(n);
    }
}

/// /usr/bin/python3 with the libnbd bindings (`import nbd`).
pub fn python_with_libnbd() -> PathBuf {
    let py = PathBuf::from("/usr/bin/python3");
    assert!(
        py.is_file(),
        "/usr/bin/python3 is required (the libnbd Python bindings are packaged for it)"
    );
    let o = run(
        Command::new(&py).args(["-c", "import nbd; print(nbd.__file__)"]),
        Duration::from_secs(30),
    );
    assert!(
        o.code == 0,
        "the libnbd Python bindings are missing: `apt-get install python3-libnbd`\n{}",
        o.text()
    );
    py
}

// ---------------------------------------------------------------------------
// Running commands with a time bound

pub struct Out {
    pub desc: String,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    pub fn text(&self) -> String {
        format!(
            "$ {}\nexit code: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.desc,
            self.code,
            tail(&self.stdout, 8000),
            tail(&self.stderr, 8000)
        )
    }
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

pub fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut i = s.len() - n;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// Run to completion, killing it after `timeout` (then the test fails).
pub fn run(cmd: &mut Command, timeout: Duration) -> Out {
    let desc = format!("{cmd:?}");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {desc}: {e}"));
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t1 = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let t2 = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break Some(s);
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let out = Out {
        desc,
        code: status.map(|s| s.code().unwrap_or(-1000)).unwrap_or(-2000),
        stdout: String::from_utf8_lossy(&t1.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&t2.join().unwrap()).into_owned(),
    };
    if status.is_none() {
        panic!("timed out after {timeout:?}:\n{}", out.text());
    }
    out
}

pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Out {
    let o = run(cmd, timeout);
    assert_eq!(o.code, 0, "command failed:\n{}", o.text());
    o
}

pub fn cv(args: &[&str]) -> Out {
    run(Command::new(BIN).args(args), CMD_TIMEOUT)
}

pub fn cv_ok(args: &[&str]) -> Out {
    let o = cv(args);
    assert_eq!(o.code, 0, "chunkvol failed:\n{}", o.text());
    o
}

pub fn cv_json(args: &[&str]) -> Value {
    let o = cv_ok(args);
    serde_json::from_str(&o.stdout)
        .unwrap_or_else(|e| panic!("not one JSON object ({e}):\n{}", o.text()))
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

// ---------------------------------------------------------------------------
// Test directory, pool, server

/// A fresh directory; removed when the test passes, kept when it fails.
/// Prints how long the test took.
pub struct TestDir(pub PathBuf, Instant);

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let d = std::env::temp_dir().join(format!("chunkvol-serve-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        TestDir(d, Instant::now())
    }
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        eprintln!(
            "[{}] {:.1} s",
            self.0.file_name().unwrap().to_string_lossy(),
            self.1.elapsed().as_secs_f64()
        );
        if thread::panicking() {
            eprintln!("test files kept in {}", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// mkfs a raid1 pool of two sparse files of `dev_size`, create volume
/// disk0 of `vol_size` (offline). Returns the device paths.
pub fn make_pool(dir: &TestDir, dev_size: &str, vol_size: &str) -> Vec<PathBuf> {
    let devs = vec![dir.join("a.img"), dir.join("b.img")];
    make_pool_on(&devs, dev_size, vol_size);
    devs
}

/// mkfs a raid1 pool (data and metadata) on `devs`, sparse files of
/// `dev_size`, and create volume disk0 of `vol_size` (offline).
pub fn make_pool_on(devs: &[PathBuf], dev_size: &str, vol_size: &str) {
    let paths: Vec<&str> = devs.iter().map(|d| s(d)).collect();
    let mut a = vec![
        "mkfs",
        "--data",
        "raid1",
        "--metadata",
        "raid1",
        "--size",
        dev_size,
    ];
    a.extend(&paths);
    cv_ok(&a);
    let mut a = vec!["volume", "create", "disk0", "--size", vol_size];
    a.extend(&paths);
    cv_ok(&a);
}

pub fn offline_check(devs: &[PathBuf], data: bool) -> Out {
    let mut a = vec!["check"];
    if data {
        a.push("--check-data-csum");
    }
    a.extend(devs.iter().map(|d| s(d)));
    let o = cv(&a);
    assert_eq!(o.code, 0, "chunkvol check found problems:\n{}", o.text());
    assert!(o.stdout.contains("no problems found"), "{}", o.text());
    o
}

/// Ports handed out by this process, so two tests never get the same one.
pub static PORTS: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

pub fn free_port() -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        let p = l.local_addr().unwrap().port();
        drop(l);
        let mut g = PORTS.lock().unwrap_or_else(|e| e.into_inner());
        if g.get_or_insert_with(HashSet::new).insert(p) {
            return p;
        }
    }
}

/// A running `chunkvol serve`; SIGINT and wait on drop.
pub struct Server {
    pub child: Option<Child>,
    pub port: u16,
    pub sock: PathBuf,
    pub devs: Vec<PathBuf>,
    pub interval: u64,
    pub log: PathBuf,
    /// Extra `serve` arguments (before the devices).
    pub extra_args: Vec<String>,
}

pub fn sigint(pid: u32) {
    let _ = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return Some(st);
        }
        if start.elapsed() > timeout {
            return None;
        }
        thread::sleep(Duration::from_millis(25));
    }
}

impl Server {
    pub fn start(dir: &TestDir, devs: &[PathBuf], interval: u64) -> Server {
        Self::start_with(dir, devs, interval, &[])
    }

    /// [`start`](Self::start) with extra `serve` arguments.
    pub fn start_with(dir: &TestDir, devs: &[PathBuf], interval: u64, extra: &[&str]) -> Server {
        let mut srv = Server {
            child: None,
            port: 0,
            sock: dir.join("ctl.sock"),
            devs: devs.to_vec(),
            interval,
            log: dir.join("serve.log"),
            extra_args: extra.iter().map(|a| a.to_string()).collect(),
        };
        srv.launch();
        srv
    }

    pub fn launch(&mut self) {
        assert!(self.child.is_none(), "server already running");
        for attempt in 0..3 {
            let port = free_port();
            let mut log = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .unwrap();
            writeln!(
                log,
                "==== chunkvol serve on port {port} (attempt {attempt})"
            )
            .unwrap();
            let log_start = log.metadata().unwrap().len();
            let mut cmd = Command::new(BIN);
            cmd.arg("serve")
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--socket")
                .arg(&self.sock)
                .arg("--commit-interval")
                .arg(self.interval.to_string())
                .args(&self.extra_args)
                .args(&self.devs)
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log);
            let mut child = cmd.spawn().expect("spawn chunkvol serve");
            let start = Instant::now();
            loop {
                if let Some(st) = child.try_wait().unwrap() {
                    let text = fs::read_to_string(&self.log).unwrap_or_default();
                    let mine = text.get(log_start as usize..).unwrap_or("");
                    if mine.contains("cannot listen") && attempt < 2 {
                        break; // port taken meanwhile: try another
                    }
                    panic!("chunkvol serve exited early ({st}):\n{}", tail(mine, 8000));
                }
                let probe = TcpStream::connect_timeout(
                    &format!("127.0.0.1:{port}").parse().unwrap(),
                    Duration::from_millis(200),
                );
                // A connect to a free local port can pick that port as its
                // own source and "succeed" by connecting to itself.
                let listening = probe.is_ok_and(|c| c.local_addr().ok() != c.peer_addr().ok());
                if listening {
                    // The probe could have reached another process if our
                    // server failed to bind: make sure it is still running.
                    thread::sleep(Duration::from_millis(50));
                    if child.try_wait().unwrap().is_none() {
                        self.child = Some(child);
                        self.port = port;
                        return;
                    }
                    continue;
                }
                if start.elapsed() > START_TIMEOUT {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "chunkvol serve did not accept on port {port} within {START_TIMEOUT:?}:\n{}",
                        self.log_tail()
                    );
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("could not start chunkvol serve:\n{}", self.log_tail());
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port)
    }

    pub fn base_uri(&self) -> String {
        format!("nbd://127.0.0.1:{}", self.port)
    }

    pub fn sock(&self) -> &str {
        s(&self.sock)
    }

    pub fn log_tail(&self) -> String {
        tail(&fs::read_to_string(&self.log).unwrap_or_default(), 8000).to_string()
    }

    /// SIGINT, wait, and require a clean exit (status 0).
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("server running");
        sigint(child.id());
        match wait_timeout(&mut child, STOP_TIMEOUT) {
            Some(st) => assert!(
                st.success(),
                "chunkvol serve exited with {st} after SIGINT:\n{}",
                self.log_tail()
            ),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "chunkvol serve did not exit within {STOP_TIMEOUT:?} of SIGINT:\n{}",
                    self.log_tail()
                );
            }
        }
    }

    /// SIGKILL: a crash.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("server running");
        child.kill().expect("kill -9 the server");
        let _ = child.wait();
    }

    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    pub fn usage(&self) -> Value {
        cv_json(&["usage", "--json", "--socket", self.sock()])
    }

    pub fn volumes(&self) -> Value {
        cv_json(&["volume", "list", "--json", "--socket", self.sock()])
    }

    pub fn volume_allocated(&self, name: &str) -> u64 {
        let v = self.volumes();
        v["volumes"]
            .as_array()
            .expect("volumes list")
            .iter()
            .find(|x| x["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name} in {v}"))["allocated_bytes"]
            .as_u64()
            .expect("allocated_bytes")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            sigint(child.id());
            if wait_timeout(&mut child, STOP_TIMEOUT).is_none() {
                let _ = child.kill();
                let _ = child.wait();
            }
            if thread::panicking() {
                eprintln!(
                    "--- server log tail ({}) ---\n{}",
                    self.log.display(),
                    self.log_tail()
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Clients

pub fn qemu_io(uri: &str, cmds: &[String]) -> Out {
    let mut c = Command::new(tool("qemu-io"));
    c.args(["-f", "raw", uri]);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    let o = run(&mut c, CMD_TIMEOUT);
    assert!(
        !o.all().contains("Pattern verification failed"),
        "qemu-io read back wrong data:\n{}",
        o.text()
    );
    assert!(
        !o.all().contains("failed"),
        "a qemu-io command failed:\n{}",
        o.text()
    );
    assert_eq!(o.code, 0, "qemu-io failed:\n{}", o.text());
    o
}

/// Deterministic pseudo-random bytes (splitmix64).
pub fn fill_random(buf: &mut [u8], state: &mut u64) {
    for c in buf.chunks_mut(8) {
        *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let b = z.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

pub fn write_random_file(path: &Path, len: u64, seed: u64) {
    let mut f = fs::File::create(path).unwrap();
    let mut st = seed;
    let mut buf = vec![0u8; 4 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        fill_random(&mut buf[..n], &mut st);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.sync_all().unwrap();
}

pub fn cmp_files(a: &Path, b: &Path) {
    run_ok(Command::new(tool("cmp")).arg(a).arg(b), CMD_TIMEOUT);
}

pub fn qemu_img_compare(file: &Path, uri: &str) {
    let o = run(
        Command::new(tool("qemu-img")).args(["compare", "-f", "raw", "-F", "raw", s(file), uri]),
        CMD_TIMEOUT,
    );
    assert_eq!(o.code, 0, "qemu-img compare: images differ:\n{}", o.text());
    assert!(o.stdout.contains("Images are identical"), "{}", o.text());
}

/// (offset, length, type) from `nbdinfo --map --json`.
pub fn nbdinfo_map(uri: &str) -> Vec<(u64, u64, u64)> {
    nbdinfo_map_context(uri, "base:allocation")
}

/// (offset, length, type) from `nbdinfo --map=CONTEXT --json`.
pub fn nbdinfo_map_context(uri: &str, context: &str) -> Vec<(u64, u64, u64)> {
    let map_arg = format!("--map={context}");
    let o = run_ok(
        Command::new(tool("nbdinfo")).args([&map_arg, "--json", uri]),
        CMD_TIMEOUT,
    );
    let v: Value = serde_json::from_str(&o.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo --map --json: {e}\n{}", o.text()));
    v.as_array()
        .expect("map is a list")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Every extent of `map` that overlaps [a, b) satisfies `want`; the map
/// covers [a, b) without gaps.
pub fn map_range_is(map: &[(u64, u64, u64)], a: u64, b: u64, hole: bool, what: &str) {
    let mut covered = 0;
    for &(off, len, ty) in map {
        let (lo, hi) = (off.max(a), (off + len).min(b));
        if lo < hi {
            covered += hi - lo;
            assert_eq!(
                ty & 1 == 1,
                hole,
                "{what}: [{a:#x}, {b:#x}) should be {}; extent at {off:#x}+{len:#x} has type {ty}\nmap: {map:?}",
                if hole { "a hole" } else { "data" }
            );
        }
    }
    assert_eq!(
        covered,
        b - a,
        "{what}: map does not cover [{a:#x}, {b:#x}): {map:?}"
    );
}

pub fn data_bgs(u: &Value) -> Vec<&Value> {
    u["block_groups"]
        .as_array()
        .expect("block_groups")
        .iter()
        .filter(|b| b["type"] == "data")
        .collect()
}

pub fn u64f(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("missing u64 field {k} in {v}"))
}

pub fn poll_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// fio through NBD: `jobs` jobs of random writes over `size_each` each,
/// verified with crc32c while writing (a backlog, since `time_based` skips
/// the final verify phase), for `runtime_s` seconds.
pub fn fio_verify_cmd(uri: &str, jobs: u32, size_each: &str, runtime_s: u64, bs: &str) -> Command {
    let mut c = Command::new(tool("fio"));
    c.args([
        "--name=nbdverify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        &format!("--bs={bs}"),
        "--iodepth=8",
        &format!("--numjobs={jobs}"),
        &format!("--size={size_each}"),
        &format!("--offset_increment={size_each}"),
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_backlog=1024",
        "--time_based",
        &format!("--runtime={runtime_s}"),
        "--output-format=json",
        // No local-*-verify.state files (and none in the work tree).
        "--verify_state_save=0",
    ]);
    c
}

/// Check a finished fio run: exit 0, no verify complaint, every job wrote
/// and verified something. Returns (bytes written, bytes verified).
pub fn assert_fio_clean(o: &Out, jobs: usize) -> (u64, u64) {
    let all = o.all();
    assert_eq!(o.code, 0, "fio failed:\n{}", o.text());
    for bad in [
        "verify failed",
        "bad magic",
        "bad header",
        "verify: ",
        "crc32c: verify",
    ] {
        assert!(
            !all.contains(bad),
            "fio reported a verify problem ({bad}):\n{}",
            o.text()
        );
    }
    let js = &o.stdout[o.stdout.find("\n{").map(|i| i + 1).unwrap_or(0)..];
    let j: Value =
        serde_json::from_str(js).unwrap_or_else(|e| panic!("fio JSON ({e}):\n{}", o.text()));
    let list = j["jobs"].as_array().expect("jobs");
    assert_eq!(list.len(), jobs, "{}", o.text());
    let (mut w, mut r) = (0, 0);
    for job in list {
        assert_eq!(job["error"], 0, "fio job error:\n{}", o.text());
        let wr = u64f(&job["write"], "io_bytes");
        let rd = u64f(&job["read"], "io_bytes");
        eprintln!("fio job: wrote {} MiB, verified {} MiB", wr >> 20, rd >> 20);
        assert!(wr > 0, "fio wrote nothing:\n{}", o.text());
        assert!(rd > 0, "fio verified nothing:\n{}", o.text());
        w += wr;
        r += rd;
    }
    (w, r)
}

// ---------------------------------------------------------------------------
// A kernel filesystem on an export

/// nbdfuse + losetup + mount, undone in reverse order (also on failure).
pub struct KernelDisk {
    pub mnt: PathBuf,
    pub fs: PathBuf,
    nbdfuse: Option<Child>,
    fuse_mounted: bool,
    loopdev: Option<String>,
    mounted: bool,
}

impl KernelDisk {
    pub fn attach(dir: &TestDir, uri: &str) -> KernelDisk {
        assert!(
            Path::new("/dev/fuse").exists(),
            "/dev/fuse is missing: FUSE is needed for nbdfuse"
        );
        let mnt = dir.join("mnt");
        let fsdir = dir.join("fs");
        fs::create_dir_all(&mnt).unwrap();
        fs::create_dir_all(&fsdir).unwrap();
        let pidfile = dir.join("nbdfuse.pid");
        let _ = fs::remove_file(&pidfile);
        let log = fs::File::create(dir.join("nbdfuse.log")).unwrap();
        let child = Command::new(tool("nbdfuse"))
            .arg("-P")
            .arg(&pidfile)
            .arg(&mnt)
            .arg(uri)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn nbdfuse");
        let mut kd = KernelDisk {
            mnt,
            fs: fsdir,
            nbdfuse: Some(child),
            fuse_mounted: false,
            loopdev: None,
            mounted: false,
        };
        let image = kd.mnt.join("nbd");
        let start = Instant::now();
        loop {
            let ready = fs::read_to_string(&pidfile)
                .map(|p| !p.trim().is_empty())
                .unwrap_or(false);
            if ready && image.exists() {
                break;
            }
            if let Some(st) = kd.nbdfuse.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "nbdfuse exited ({st}) before mounting (is FUSE usable here?):\n{}",
                    fs::read_to_string(dir.join("nbdfuse.log")).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < START_TIMEOUT,
                "nbdfuse did not expose {} within {START_TIMEOUT:?}",
                image.display()
            );
            thread::sleep(Duration::from_millis(50));
        }
        kd.fuse_mounted = true;
        let o = run(
            Command::new(tool("losetup")).args(["-f", "--show", s(&image)]),
            CMD_TIMEOUT,
        );
        assert_eq!(
            o.code,
            0,
            "cannot attach a loop device (loop devices are needed for this test):\n{}",
            o.text()
        );
        let dev = o.stdout.trim().to_string();
        assert!(dev.starts_with("/dev/loop"), "{}", o.text());
        kd.loopdev = Some(dev);
        kd
    }

    pub fn dev(&self) -> &str {
        self.loopdev.as_deref().unwrap()
    }

    pub fn mount(&mut self) {
        run_ok(
            Command::new(tool("mount")).args([self.dev(), s(&self.fs)]),
            CMD_TIMEOUT,
        );
        self.mounted = true;
    }

    pub fn umount(&mut self) {
        run_ok(Command::new(tool("umount")).arg(&self.fs), CMD_TIMEOUT);
        self.mounted = false;
    }

    /// Undo everything; `strict` asserts each step worked.
    pub fn detach(&mut self, strict: bool) {
        if self.mounted {
            let o = run(Command::new(tool("umount")).arg(&self.fs), CMD_TIMEOUT);
            if o.code != 0 {
                let _ = run(
                    Command::new(tool("umount")).arg("-l").arg(&self.fs),
                    CMD_TIMEOUT,
                );
            }
            assert!(!strict || o.code == 0, "{}", o.text());
            self.mounted = false;
        }
        if let Some(dev) = self.loopdev.take() {
            let o = run(
                Command::new(tool("losetup")).args(["-d", &dev]),
                CMD_TIMEOUT,
            );
            assert!(!strict || o.code == 0, "{}", o.text());
        }
        if self.fuse_mounted {
            let o = run(
                Command::new(tool("fusermount3")).arg("-u").arg(&self.mnt),
                CMD_TIMEOUT,
            );
            if o.code != 0 {
                let _ = run(
                    Command::new(tool("fusermount3")).arg("-uz").arg(&self.mnt),
                    CMD_TIMEOUT,
                );
            }
            assert!(!strict || o.code == 0, "{}", o.text());
            self.fuse_mounted = false;
        }
        if let Some(mut c) = self.nbdfuse.take() {
            if wait_timeout(&mut c, Duration::from_secs(20)).is_none() {
                let _ = c.kill();
                let _ = c.wait();
                assert!(!strict, "nbdfuse did not exit after fusermount3 -u");
            }
        }
    }
}

impl Drop for KernelDisk {
    fn drop(&mut self) {
        self.detach(false);
    }
}

/// Whether nbdinfo sees the export at `uri` as read-only.
pub fn nbdinfo_read_only(uri: &str) -> bool {
    let o = run(
        Command::new(tool("nbdinfo")).args(["--json", uri]),
        CMD_TIMEOUT,
    );
    assert_eq!(o.code, 0, "{}", o.text());
    let v: Value = serde_json::from_str(&o.stdout).expect("nbdinfo --json");
    v["exports"][0]["is_read_only"]
        .as_bool()
        .unwrap_or_else(|| panic!("no is_read_only in {v}"))
}
