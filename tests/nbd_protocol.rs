//! End-to-end tests of the NBD server against real clients (libnbd's
//! nbdinfo/nbdcopy, qemu-io) and against hand-written raw-socket clients
//! that misbehave on purpose.
//!
//! Tests that need a client tool fail (never skip) when it is missing:
//! `apt-get install -y libnbd-bin nbdkit fio qemu-utils`.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use chunkvol::nbd::{Export, ExportProvider, Server, ServerConfig, ShutdownHandle};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// Allocation granularity of the in-memory export's hole map.
const HOLE_BLOCK_BYTES: u64 = 4096;
/// Upper bound for any external tool run.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
/// Raw clients never wait longer than this for the server.
const RAW_READ_TIMEOUT: Duration = Duration::from_secs(10);

// ---- In-memory export -----------------------------------------------------

struct MemState {
    data: Vec<u8>,
    /// One flag per HOLE_BLOCK_BYTES block; unallocated blocks read as zero.
    allocated: Vec<bool>,
}

struct MemExport {
    size_bytes: u64,
    state: Mutex<MemState>,
    flushes: AtomicU64,
    fast_zero: bool,
    read_only: AtomicBool,
}

impl MemExport {
    fn new(size_bytes: u64, fast_zero: bool) -> Self {
        let blocks = size_bytes.div_ceil(HOLE_BLOCK_BYTES) as usize;
        MemExport {
            size_bytes,
            state: Mutex::new(MemState {
                data: vec![0; size_bytes as usize],
                allocated: vec![false; blocks],
            }),
            flushes: AtomicU64::new(0),
            fast_zero,
            read_only: AtomicBool::new(false),
        }
    }

    fn range(&self, offset: u64, len: u64) -> io::Result<std::ops::Range<usize>> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size_bytes => Ok(offset as usize..end as usize),
            _ => Err(io::Error::from_raw_os_error(22)),
        }
    }

    /// Blocks touched by any byte of the range.
    fn touched(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        (offset / HOLE_BLOCK_BYTES) as usize..(offset + len).div_ceil(HOLE_BLOCK_BYTES) as usize
    }

    /// Blocks entirely inside the range (the export's tail block counts if the range reaches the end).
    fn covered(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let end = offset + len;
        let last = if end == self.size_bytes {
            end.div_ceil(HOLE_BLOCK_BYTES)
        } else {
            end / HOLE_BLOCK_BYTES
        };
        let first = offset.div_ceil(HOLE_BLOCK_BYTES);
        first as usize..last.max(first) as usize
    }

    fn snapshot(&self) -> Vec<u8> {
        self.state.lock().unwrap().data.clone()
    }

    fn is_allocated(&self, offset: u64) -> bool {
        self.state.lock().unwrap().allocated[(offset / HOLE_BLOCK_BYTES) as usize]
    }

    fn zero_range(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let r = self.range(offset, len)?;
        let mut st = self.state.lock().unwrap();
        st.data[r].fill(0);
        if unmap {
            for b in self.covered(offset, len) {
                st.allocated[b] = false;
            }
        } else {
            for b in self.touched(offset, len) {
                st.allocated[b] = true;
            }
        }
        Ok(())
    }
}

impl Export for MemExport {
    fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let r = self.range(offset, buf.len() as u64)?;
        buf.copy_from_slice(&self.state.lock().unwrap().data[r]);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> io::Result<()> {
        let r = self.range(offset, data.len() as u64)?;
        let mut st = self.state.lock().unwrap();
        st.data[r].copy_from_slice(data);
        for b in self.touched(offset, data.len() as u64) {
            st.allocated[b] = true;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, _fua: bool) -> io::Result<()> {
        self.range(offset, len)?;
        let mut st = self.state.lock().unwrap();
        for b in self.covered(offset, len) {
            st.allocated[b] = false;
            let start = b * HOLE_BLOCK_BYTES as usize;
            let end = (start + HOLE_BLOCK_BYTES as usize).min(st.data.len());
            st.data[start..end].fill(0);
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, _fua: bool) -> io::Result<()> {
        self.zero_range(offset, len, may_unmap)
    }

    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, u32)>> {
        let r = self.range(offset, len)?;
        let st = self.state.lock().unwrap();
        let mut out: Vec<(u64, u32)> = Vec::new();
        let mut pos = r.start as u64;
        while pos < r.end as u64 {
            let b = pos / HOLE_BLOCK_BYTES;
            let ext_end = ((b + 1) * HOLE_BLOCK_BYTES).min(r.end as u64);
            let flags = if st.allocated[b as usize] { 0 } else { 3 };
            match out.last_mut() {
                Some(last) if last.1 == flags => last.0 += ext_end - pos,
                _ => out.push((ext_end - pos, flags)),
            }
            pos = ext_end;
        }
        Ok(out)
    }

    fn fast_zero(&self) -> bool {
        self.fast_zero
    }

    fn read_only(&self) -> bool {
        self.read_only.load(Ordering::SeqCst)
    }
}

struct MemProvider {
    exports: Mutex<HashMap<String, Arc<MemExport>>>,
    default_name: String,
}

impl ExportProvider for MemProvider {
    fn list(&self) -> Vec<String> {
        let mut names: Vec<String> = self.exports.lock().unwrap().keys().cloned().collect();
        names.sort();
        names
    }

    fn open(&self, name: &str) -> Option<Arc<dyn Export>> {
        let export = self.exports.lock().unwrap().get(name)?.clone();
        Some(export)
    }

    fn default_name(&self) -> Option<String> {
        Some(self.default_name.clone())
    }
}

// ---- Server harness -------------------------------------------------------

struct TestServer {
    port: u16,
    provider: Arc<MemProvider>,
    handle: ShutdownHandle,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl TestServer {
    /// Serves `(name, size, fast_zero)` exports on 127.0.0.1 with a free port;
    /// the first export is the default.
    fn start(exports: &[(&str, u64, bool)]) -> Self {
        Self::start_with(exports, ServerConfig::default())
    }

    fn start_with(exports: &[(&str, u64, bool)], config: ServerConfig) -> Self {
        let provider = Arc::new(MemProvider {
            exports: Mutex::new(
                exports
                    .iter()
                    .map(|&(n, size, fz)| (n.to_owned(), Arc::new(MemExport::new(size, fz))))
                    .collect(),
            ),
            default_name: exports[0].0.to_owned(),
        });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = Server::new(provider.clone(), config);
        let handle = server.shutdown_handle();
        let thread = thread::spawn(move || server.serve_tcp(listener));
        TestServer {
            port,
            provider,
            handle,
            thread: Some(thread),
        }
    }

    fn uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.port, name)
    }

    fn export(&self, name: &str) -> Arc<MemExport> {
        self.provider.exports.lock().unwrap()[name].clone()
    }

    /// Shuts the server down and checks that serve_tcp returned cleanly.
    fn stop(mut self) {
        self.handle.shutdown();
        let result = self
            .thread
            .take()
            .unwrap()
            .join()
            .expect("server thread panicked");
        result.expect("serve_tcp failed");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.handle.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---- External tools -------------------------------------------------------

struct ToolOutput {
    success: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs a tool with a timeout; panics (failing the test) if it is missing.
fn run_tool(program: &str, args: &[&str]) -> ToolOutput {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("`{program}` is required for this test (apt-get install -y libnbd-bin nbdkit fio qemu-utils): {e}")
        });
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + TOOL_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`{program} {args:?}` timed out");
        }
        thread::sleep(Duration::from_millis(20));
    };
    ToolOutput {
        success: status.success(),
        code: status.code(),
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

fn run_ok(program: &str, args: &[&str]) -> String {
    let o = run_tool(program, args);
    assert!(
        o.success,
        "`{program} {args:?}` failed ({:?})\nstdout:\n{}\nstderr:\n{}",
        o.code, o.stdout, o.stderr
    );
    o.stdout
}

/// Runs qemu-io commands against an export and checks none failed. qemu-io
/// reports verification failures on stdout, so both the exit status and the
/// output are checked.
fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut args = vec!["-f", "raw", uri];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    let o = run_tool("qemu-io", &args);
    let all = format!("{}{}", o.stdout, o.stderr);
    let lower = all.to_lowercase();
    assert!(
        o.success && !lower.contains("fail") && !lower.contains("error"),
        "qemu-io {commands:?} failed ({:?}):\n{all}",
        o.code
    );
    all
}

fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("chunkvol-{}-{name}", std::process::id()))
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn random_bytes(len: usize, mut seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    for chunk in out.chunks_mut(8) {
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        let word = seed.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&word[..chunk.len()]);
    }
    out
}

fn assert_same_bytes(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length differs");
    // Slice equality is a memcmp; only locate the difference on failure.
    if actual != expected {
        let i = actual.iter().zip(expected).position(|(a, b)| a != b);
        panic!("{what}: first difference at byte {i:?}");
    }
}

// ---- Real clients ---------------------------------------------------------

#[test]
fn nbdinfo_reports_size_and_capabilities() {
    let srv = TestServer::start(&[("disk0", 8 * MIB, true), ("disk1", MIB, true)]);
    let uri = srv.uri("disk0");
    assert_eq!(
        run_ok("nbdinfo", &["--size", &uri]).trim(),
        (8 * MIB).to_string()
    );
    for feature in [
        "multi-conn",
        "trim",
        "zero",
        "fua",
        "flush",
        "fast-zero",
        "cache",
        "df",
    ] {
        let o = run_tool("nbdinfo", &["--can", feature, &uri]);
        assert!(
            o.success,
            "nbdinfo --can {feature} returned {:?}: {}",
            o.code, o.stderr
        );
    }
    let ro = run_tool("nbdinfo", &["--is", "read-only", &uri]);
    assert_eq!(
        ro.code,
        Some(2),
        "export must not be read-only: {}",
        ro.stderr
    );

    let full = run_ok("nbdinfo", &["--no-content", &uri]);
    assert!(full.contains("export-size: 8388608"), "{full}");
    assert!(full.contains("base:allocation"), "{full}");
    assert!(full.contains("block_size_preferred: 4096"), "{full}");
    // The empty name selects the default export.
    let default_uri = format!("nbd://127.0.0.1:{}", srv.port);
    assert_eq!(
        run_ok("nbdinfo", &["--size", &default_uri]).trim(),
        (8 * MIB).to_string()
    );
    srv.stop();
}

#[test]
fn nbdinfo_list_shows_both_exports() {
    let srv = TestServer::start(&[("alpha", MIB, true), ("beta", 2 * MIB, true)]);
    let out = run_ok(
        "nbdinfo",
        &["--list", &format!("nbd://127.0.0.1:{}", srv.port)],
    );
    assert!(out.contains("export=\"alpha\""), "{out}");
    assert!(out.contains("export=\"beta\""), "{out}");
    assert!(out.contains("export-size: 2097152"), "{out}");
    srv.stop();
}

/// Parses `nbdinfo --map` lines into (offset, length, type).
fn parse_map(out: &str) -> Vec<(u64, u64, u32)> {
    out.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.first()?.parse().ok()?,
                f.get(1)?.parse().ok()?,
                f.get(2)?.parse().ok()?,
            ))
        })
        .collect()
}

#[test]
fn nbdinfo_map_shows_hole_after_trim() {
    let srv = TestServer::start(&[("disk", MIB, true)]);
    let uri = srv.uri("disk");
    qemu_io(&uri, &["write -P 0x5a 0 1M", "discard 256k 128k"]);
    let map = parse_map(&run_ok("nbdinfo", &["--map", &uri]));
    assert_eq!(
        map,
        vec![
            (0, 256 * KIB, 0),
            (256 * KIB, 128 * KIB, 3),
            (384 * KIB, 640 * KIB, 0)
        ],
        "unexpected map"
    );
    // REQ_ONE-free totals cover the whole disk.
    assert_eq!(map.iter().map(|e| e.1).sum::<u64>(), MIB);
    srv.stop();
}

#[test]
fn qemu_io_read_write_verify() {
    let srv = TestServer::start(&[("disk", 8 * MIB, true)]);
    let uri = srv.uri("disk");
    qemu_io(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            // A reply buffer is reused: a hole read after a data read
            // still reads zeroes.
            "read -P 0 6M 1M",
            // Unaligned offsets and lengths.
            "write -P 0xcd 513 4097",
            "read -P 0xab 0 513",
            "read -P 0xcd 513 4097",
            "read -P 0xab 4610 10000",
            // FUA write.
            "write -f -P 0x77 1M 64k",
            "read -P 0x77 1M 64k",
            // Discard then rewrite.
            "discard 2M 64k",
            "write -P 0x33 2M 4k",
            "read -P 0x33 2M 4k",
            // Zeroing without and with unmap.
            "write -P 0x44 3M 256k",
            "write -z 3M 128k",
            "write -z -u 3200k 64k",
            "read -P 0 3M 192k",
            "read -P 0x44 3264k 64k",
            // Pipelined async writes, then a flush.
            "aio_write -P 0x11 4M 64k",
            "aio_write -P 0x22 5M 64k",
            "aio_write -P 0x23 5000k 3k",
            "aio_flush",
            "read -P 0x11 4M 64k",
            "read -P 0x22 5M 64k",
            "read -P 0x23 5000k 3k",
        ],
    );
    let export = srv.export("disk");
    let data = export.snapshot();
    assert!(data[..513].iter().all(|&b| b == 0xab));
    assert!(data[513..4610].iter().all(|&b| b == 0xcd));
    assert!(
        data[3 * MIB as usize..3 * MIB as usize + 192 * KIB as usize]
            .iter()
            .all(|&b| b == 0)
    );
    // NO_HOLE was honoured for plain `write -z`, unmap allowed with -u.
    assert!(export.is_allocated(3 * MIB));
    assert!(!export.is_allocated(3200 * KIB));
    assert!(
        export.flushes.load(Ordering::SeqCst) > 0,
        "aio_flush must reach the export"
    );
    srv.stop();
}

#[test]
fn nbdcopy_64mib_roundtrip() {
    let size = 64 * MIB;
    let srv = TestServer::start(&[("big", size, true)]);
    let uri = srv.uri("big");
    let src = temp_path("copy-src.img");
    let dst = temp_path("copy-dst.img");
    let original = random_bytes(size as usize, 0x1234_5678_9abc_def1);
    std::fs::write(&src, &original).unwrap();
    std::fs::File::create(&dst).unwrap().set_len(size).unwrap();

    run_ok("nbdcopy", &["--flush", src.to_str().unwrap(), &uri]);
    assert_same_bytes(
        &srv.export("big").snapshot(),
        &original,
        "export after copy in",
    );
    run_ok("nbdcopy", &[&uri, dst.to_str().unwrap()]);
    let copied = std::fs::read(&dst).unwrap();
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&dst);
    assert_same_bytes(&copied, &original, "file after copy out");
    srv.stop();
}

#[test]
fn serves_unix_socket() {
    let path = temp_path("unix.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    let provider = Arc::new(MemProvider {
        exports: Mutex::new(HashMap::from([(
            "u".to_owned(),
            Arc::new(MemExport::new(2 * MIB, true)),
        )])),
        default_name: "u".to_owned(),
    });
    let server = Server::new(provider, ServerConfig::default());
    let handle = server.shutdown_handle();
    let t = thread::spawn(move || server.serve_unix(listener));
    let uri = format!("nbd+unix:///u?socket={}", path.display());
    assert_eq!(
        run_ok("nbdinfo", &["--size", &uri]).trim(),
        (2 * MIB).to_string()
    );
    qemu_io(&uri, &["write -P 0x9 0 64k", "read -P 0x9 0 64k"]);
    handle.shutdown();
    t.join().unwrap().unwrap();
    let _ = std::fs::remove_file(&path);
}

// ---- Raw-socket clients ---------------------------------------------------

const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = (1 << 31) | 1;
const REP_ERR_UNKNOWN: u32 = (1 << 31) | 6;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;
const FLAG_FAST_ZERO: u16 = 1 << 4;
const FLAG_REQ_ONE: u16 = 1 << 3;
const EINVAL: u32 = 22;
const ENOTSUP: u32 = 95;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// A minimal hand-rolled NBD client.
struct Raw {
    s: TcpStream,
}

impl Raw {
    /// Connects and completes the greeting (fixed newstyle, no zeroes).
    fn connect(port: u16) -> Self {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(RAW_READ_TIMEOUT)).unwrap();
        let mut c = Raw { s };
        let greeting = c.read_n(18);
        assert_eq!(&greeting[..8], b"NBDMAGIC");
        assert_eq!(&greeting[8..16], b"IHAVEOPT");
        c.send(&3u32.to_be_bytes());
        c
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        self.s.read_exact(&mut b).unwrap();
        b
    }

    fn u16_at(b: &[u8], i: usize) -> u16 {
        u16::from_be_bytes(b[i..i + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], i: usize) -> u32 {
        u32::from_be_bytes(b[i..i + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], i: usize) -> u64 {
        u64::from_be_bytes(b[i..i + 8].try_into().unwrap())
    }

    fn option_header(option: u32, len: u32) -> Vec<u8> {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = Self::option_header(option, data.len() as u32);
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// Reads one option reply: (option, reply type, data).
    fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read_n(20);
        assert_eq!(Self::u64_at(&h, 0), 0x0003_e889_0455_65a9);
        let len = Self::u32_at(&h, 16) as usize;
        (Self::u32_at(&h, 8), Self::u32_at(&h, 12), self.read_n(len))
    }

    fn structured(&mut self) {
        self.option(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(self.option_reply().1, REP_ACK);
    }

    fn set_meta_context(&mut self, export: &str) {
        let q = b"base:allocation";
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&(q.len() as u32).to_be_bytes());
        d.extend_from_slice(q);
        self.option(OPT_SET_META_CONTEXT, &d);
        let (_, rep, data) = self.option_reply();
        assert_eq!(rep, REP_META_CONTEXT);
        assert_eq!(&data[4..], q);
        assert_eq!(self.option_reply().1, REP_ACK);
    }

    /// NBD_OPT_GO; Ok(size) on success, Err(reply type) on an error reply.
    fn go(&mut self, export: &str) -> Result<u64, u32> {
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &d);
        let mut size = None;
        loop {
            let (opt, rep, data) = self.option_reply();
            assert_eq!(opt, OPT_GO);
            match rep {
                REP_INFO if Self::u16_at(&data, 0) == 0 => size = Some(Self::u64_at(&data, 2)),
                REP_INFO => {}
                REP_ACK => return Ok(size.expect("NBD_INFO_EXPORT before ACK")),
                err => return Err(err),
            }
        }
    }

    #[allow(clippy::too_many_arguments)] // a test client mirroring the wire fields
    fn request(
        &mut self,
        flags: u16,
        cmd: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut b = REQUEST_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&cmd.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.send(&b);
    }

    /// Reads a simple reply header: (error, cookie).
    fn simple_reply(&mut self) -> (u32, u64) {
        let h = self.read_n(16);
        assert_eq!(
            Self::u32_at(&h, 0),
            SIMPLE_REPLY_MAGIC,
            "expected a simple reply"
        );
        (Self::u32_at(&h, 4), Self::u64_at(&h, 8))
    }

    /// Reads one structured chunk: (flags, type, cookie, payload).
    fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let h = self.read_n(20);
        assert_eq!(
            Self::u32_at(&h, 0),
            STRUCTURED_REPLY_MAGIC,
            "expected a structured chunk"
        );
        let len = Self::u32_at(&h, 16) as usize;
        (
            Self::u16_at(&h, 4),
            Self::u16_at(&h, 6),
            Self::u64_at(&h, 8),
            self.read_n(len),
        )
    }

    /// Asserts the server closed the connection (EOF or reset, not a timeout).
    fn expect_closed(&mut self) {
        let mut b = [0u8; 64];
        match self.s.read(&mut b) {
            Ok(0) => {}
            Ok(n) => panic!("expected close, got {n} more bytes"),
            Err(e) => assert!(
                !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ),
                "server did not close the connection: {e}"
            ),
        }
    }
}

/// A fresh connection still negotiates, writes and reads back correctly.
fn assert_server_alive(port: u16, export: &str) {
    let mut c = Raw::connect(port);
    c.go(export).expect("GO on a fresh connection");
    let data = [0x5au8; 512];
    c.request(0, CMD_WRITE, 1, 0, 512, &data);
    assert_eq!(c.simple_reply(), (0, 1));
    c.request(0, CMD_READ, 2, 0, 512, &[]);
    assert_eq!(c.simple_reply(), (0, 2));
    assert_eq!(c.read_n(512), data);
    c.request(0, CMD_DISC, 3, 0, 0, &[]);
    c.expect_closed();
}

#[test]
fn wrong_request_magic_closes_only_that_connection() {
    let srv = TestServer::start(&[("d", MIB, true)]);
    let mut other = Raw::connect(srv.port);
    other.go("d").unwrap();
    let mut c = Raw::connect(srv.port);
    c.go("d").unwrap();
    c.send(&[0xde, 0xad, 0xbe, 0xef]);
    c.send(&[0u8; 24]);
    c.expect_closed();
    // An already-open connection is unaffected, and new ones work.
    other.request(0, CMD_READ, 9, 0, 16, &[]);
    assert_eq!(other.simple_reply(), (0, 9));
    other.read_n(16);
    assert_server_alive(srv.port, "d");
    srv.stop();
}

#[test]
fn unknown_and_oversized_options() {
    let srv = TestServer::start(&[("d", MIB, true)]);
    let mut c = Raw::connect(srv.port);
    c.option(0x7777, b"whatever");
    assert_eq!(
        c.option_reply(),
        (0x7777, REP_ERR_UNSUP, b"option not supported".to_vec())
    );
    // Large unknown option data is skipped without buffering, then answered.
    c.option(0x7778, &vec![0u8; 1 << 20]);
    assert_eq!(c.option_reply().1, REP_ERR_UNSUP);
    // The session continues normally.
    assert_eq!(c.go("d"), Ok(MIB));
    drop(c);

    // An absurd option length is a hang-up, not a 4 GiB allocation.
    let mut c = Raw::connect(srv.port);
    let mut b = Raw::option_header(OPT_GO, u32::MAX);
    b.extend_from_slice(&[0u8; 1024]);
    c.send(&b);
    c.expect_closed();
    assert_server_alive(srv.port, "d");
    srv.stop();
}

#[test]
fn missing_export() {
    let srv = TestServer::start(&[("d", MIB, true)]);
    let mut c = Raw::connect(srv.port);
    assert_eq!(c.go("nope"), Err(REP_ERR_UNKNOWN));
    // After an error the client may try again.
    assert_eq!(c.go("d"), Ok(MIB));
    drop(c);

    // EXPORT_NAME cannot report errors: the server must hang up.
    let mut c = Raw::connect(srv.port);
    c.option(OPT_EXPORT_NAME, b"nope");
    c.expect_closed();
    assert_server_alive(srv.port, "d");
    srv.stop();
}

#[test]
fn export_name_without_zeroes_enters_transmission() {
    let srv = TestServer::start(&[("d", MIB, true)]);
    let mut c = Raw::connect(srv.port);
    c.option(OPT_EXPORT_NAME, b"d");
    let r = c.read_n(10);
    assert_eq!(Raw::u64_at(&r, 0), MIB);
    assert_ne!(Raw::u16_at(&r, 8) & 1, 0, "HAS_FLAGS");
    c.request(0, CMD_READ, 5, 4096, 8, &[]);
    assert_eq!(c.simple_reply(), (0, 5));
    assert_eq!(c.read_n(8), [0u8; 8]);
    srv.stop();
}

#[test]
fn read_only_export_is_announced_and_writes_get_eperm() {
    const FLAG_READ_ONLY: u16 = 1 << 1;
    const FLAG_SEND_TRIM: u16 = 1 << 5;
    const EPERM: u32 = 1;
    let srv = TestServer::start(&[("d", MIB, true)]);
    let exp = srv.export("d");
    exp.write(0, &[0xab; 4096], false).unwrap();
    exp.read_only.store(true, Ordering::SeqCst);
    let mut c = Raw::connect(srv.port);
    c.option(OPT_EXPORT_NAME, b"d");
    let r = c.read_n(10);
    let flags = Raw::u16_at(&r, 8);
    assert_ne!(flags & FLAG_READ_ONLY, 0, "NBD_FLAG_READ_ONLY");
    assert_eq!(flags & FLAG_SEND_TRIM, 0, "no trim on a read-only export");
    // The server refuses, whatever the client was told.
    c.request(0, CMD_WRITE, 1, 0, 4096, &[0x11; 4096]);
    assert_eq!(c.simple_reply(), (EPERM, 1));
    c.request(0, CMD_TRIM, 2, 0, 4096, &[]);
    assert_eq!(c.simple_reply(), (EPERM, 2));
    c.request(0, CMD_WRITE_ZEROES, 3, 0, 4096, &[]);
    assert_eq!(c.simple_reply(), (EPERM, 3));
    c.request(0, CMD_FLUSH, 4, 0, 0, &[]);
    assert_eq!(c.simple_reply(), (0, 4));
    c.request(0, CMD_READ, 5, 0, 4096, &[]);
    assert_eq!(c.simple_reply(), (0, 5));
    assert_eq!(c.read_n(4096), vec![0xab; 4096]);
    assert_eq!(exp.snapshot()[..4096], [0xab; 4096]);
    srv.stop();
}

#[test]
fn invalid_requests_get_einval_and_stream_stays_in_sync() {
    let srv = TestServer::start(&[("d", MIB, true)]);
    let mut c = Raw::connect(srv.port);
    c.go("d").unwrap();
    // Past the end.
    c.request(0, CMD_READ, 1, MIB - 10, 11, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 1));
    // Write past the end: the payload is consumed, so the next request parses.
    c.request(0, CMD_WRITE, 2, MIB - 100, 200, &[0xee; 200]);
    assert_eq!(c.simple_reply(), (EINVAL, 2));
    // Offset + length overflowing u64.
    c.request(0, CMD_READ, 3, u64::MAX - 10, 100, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 3));
    c.request(0, CMD_TRIM, 4, u64::MAX, 1, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 4));
    // Zero length.
    c.request(0, CMD_READ, 5, 0, 0, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 5));
    c.request(0, CMD_WRITE, 6, 0, 0, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 6));
    // Unknown command and unknown flag.
    c.request(0, 42, 7, 0, 512, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 7));
    c.request(1 << 12, CMD_READ, 8, 0, 512, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 8));
    // Block status without a negotiated context.
    c.request(0, CMD_BLOCK_STATUS, 9, 0, 512, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 9));
    // Still in sync: a valid request works, and nothing was written past the end.
    c.request(0, CMD_READ, 10, MIB - 100, 100, &[]);
    assert_eq!(c.simple_reply(), (0, 10));
    assert_eq!(c.read_n(100), vec![0u8; 100]);
    assert_server_alive(srv.port, "d");
    srv.stop();
}

#[test]
fn oversized_write_gets_einval_then_close() {
    let srv = TestServer::start(&[("d", 64 * MIB, true)]);
    let mut c = Raw::connect(srv.port);
    c.go("d").unwrap();
    c.request(0, CMD_WRITE, 1, 0, (32 << 20) + 1, &[]);
    assert_eq!(c.simple_reply(), (EINVAL, 1));
    c.expect_closed();
    assert_server_alive(srv.port, "d");
    srv.stop();
}

#[test]
fn truncated_request_then_disconnect() {
    let srv = TestServer::start(&[("d", MIB, true)]);
    let mut c = Raw::connect(srv.port);
    c.go("d").unwrap();
    c.send(&REQUEST_MAGIC.to_be_bytes());
    c.send(&[0u8; 6]);
    c.s.shutdown(Shutdown::Both).unwrap();
    drop(c);
    // Also a client that vanishes in the middle of option haggling.
    let mut c = Raw::connect(srv.port);
    c.send(&Raw::option_header(OPT_GO, 100)[..12]);
    drop(c);
    assert_server_alive(srv.port, "d");
    srv.stop();
}

#[test]
fn disconnect_mid_write_payload() {
    let srv = TestServer::start(&[("d", MIB, true)]);
    let mut c = Raw::connect(srv.port);
    c.go("d").unwrap();
    c.request(0, CMD_WRITE, 1, 4096, 65536, &[0xff; 1000]);
    drop(c);
    assert_server_alive(srv.port, "d");
    // The partial write never reached the export.
    let data = srv.export("d").snapshot();
    assert!(data[4096..4096 + 65536].iter().all(|&b| b == 0));
    srv.stop();
}

#[test]
fn structured_replies_and_block_status() {
    let srv = TestServer::start(&[("d", MIB, true)]);
    let mut c = Raw::connect(srv.port);
    c.structured();
    c.set_meta_context("d");
    assert_eq!(c.go("d"), Ok(MIB));

    c.request(0, CMD_WRITE, 1, 0, 8192, &[7u8; 8192]);
    assert_eq!(c.simple_reply(), (0, 1));
    // Reads come back as one OFFSET_DATA chunk.
    c.request(0, CMD_READ, 2, 4000, 200, &[]);
    let (flags, kind, cookie, payload) = c.chunk();
    assert_eq!((flags & 1, kind, cookie), (1, REPLY_TYPE_OFFSET_DATA, 2));
    assert_eq!(Raw::u64_at(&payload, 0), 4000);
    assert_eq!(&payload[8..], &[7u8; 200][..]);
    // Errors on reads are error chunks.
    c.request(0, CMD_READ, 3, MIB, 1, &[]);
    let (flags, kind, cookie, payload) = c.chunk();
    assert_eq!((flags & 1, kind, cookie), (1, REPLY_TYPE_ERROR, 3));
    assert_eq!(Raw::u32_at(&payload, 0), EINVAL);
    // Block status: data then hole (with zero).
    c.request(0, CMD_BLOCK_STATUS, 4, 0, 65536, &[]);
    let (_, kind, cookie, payload) = c.chunk();
    assert_eq!((kind, cookie), (REPLY_TYPE_BLOCK_STATUS, 4));
    assert_eq!(
        Raw::u32_at(&payload, 0),
        1,
        "context id from SET_META_CONTEXT"
    );
    let extents: Vec<(u32, u32)> = payload[4..]
        .chunks(8)
        .map(|e| (Raw::u32_at(e, 0), Raw::u32_at(e, 4)))
        .collect();
    assert_eq!(extents, vec![(8192, 0), (65536 - 8192, 3)]);
    // REQ_ONE yields a single descriptor.
    c.request(FLAG_REQ_ONE, CMD_BLOCK_STATUS, 5, 0, 65536, &[]);
    let (_, _, _, payload) = c.chunk();
    assert_eq!(payload.len(), 12);
    assert_eq!(Raw::u32_at(&payload, 4), 8192);
    srv.stop();
}

#[test]
fn fast_zero_unsupported_fails_with_enotsup() {
    let srv = TestServer::start(&[("slow", MIB, false)]);
    let mut c = Raw::connect(srv.port);
    c.go("slow").unwrap();
    c.request(0, CMD_WRITE, 1, 0, 512, &[1u8; 512]);
    assert_eq!(c.simple_reply(), (0, 1));
    c.request(FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 2, 0, 512, &[]);
    assert_eq!(c.simple_reply(), (ENOTSUP, 2));
    // The data was not touched; a normal zero works.
    assert_eq!(srv.export("slow").snapshot()[0], 1);
    c.request(0, CMD_WRITE_ZEROES, 3, 0, 512, &[]);
    assert_eq!(c.simple_reply(), (0, 3));
    assert_eq!(srv.export("slow").snapshot()[0], 0);
    srv.stop();
}

#[test]
fn pipelined_requests_with_small_budget() {
    // A budget smaller than the data in flight forces the reader to wait.
    let config = ServerConfig {
        max_in_flight_bytes_per_conn: 64 * 1024,
        worker_threads_per_conn: 3,
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(&[("d", 4 * MIB, true)], config);
    let mut c = Raw::connect(srv.port);
    c.go("d").unwrap();
    let writer_half = c.s.try_clone().unwrap();
    // Send everything from another thread while replies are read here, as a
    // real pipelining client would.
    let sender = thread::spawn(move || {
        let mut w = Raw { s: writer_half };
        for i in 0..64u64 {
            w.request(0, CMD_WRITE, i, i * 32768, 32768, &[i as u8; 32768]);
        }
        w.request(0, CMD_FLUSH, 1000, 0, 0, &[]);
    });
    let mut seen = std::collections::HashSet::new();
    for _ in 0..65 {
        let (err, cookie) = c.simple_reply();
        assert_eq!(err, 0);
        assert!(seen.insert(cookie), "duplicate reply for {cookie}");
        if cookie == 1000 {
            // FLUSH is answered only after every earlier write reached the export.
            let data = srv.export("d").snapshot();
            for i in 0..64usize {
                assert_eq!(
                    data[i * 32768],
                    i as u8,
                    "flush answered before write {i} completed"
                );
            }
        }
    }
    sender.join().unwrap();
    let data = srv.export("d").snapshot();
    for i in 0..64usize {
        assert!(data[i * 32768..(i + 1) * 32768]
            .iter()
            .all(|&b| b == i as u8));
    }
    assert_eq!(srv.export("d").flushes.load(Ordering::SeqCst), 1);
    srv.stop();
}

#[test]
fn shutdown_closes_idle_connections_and_returns() {
    let srv = TestServer::start(&[("d", MIB, true)]);
    let mut in_transmission = Raw::connect(srv.port);
    in_transmission.go("d").unwrap();
    let mut in_handshake = Raw::connect(srv.port);
    let started = Instant::now();
    srv.stop();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown took too long"
    );
    in_transmission.expect_closed();
    in_handshake.expect_closed();
}

#[test]
fn connections_over_the_limit_are_refused() {
    let config = ServerConfig {
        max_connections: 1,
        ..ServerConfig::default()
    };
    let srv = TestServer::start_with(&[("d", MIB, true)], config);
    let mut first = Raw::connect(srv.port);
    first.go("d").unwrap();
    // The second client is accepted and closed before any greeting.
    let mut second = Raw {
        s: TcpStream::connect(("127.0.0.1", srv.port)).unwrap(),
    };
    second.s.set_read_timeout(Some(RAW_READ_TIMEOUT)).unwrap();
    second.expect_closed();
    // Once the first one leaves, its slot is free again.
    first.request(0, CMD_DISC, 1, 0, 0, &[]);
    first.expect_closed();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = Raw {
            s: TcpStream::connect(("127.0.0.1", srv.port)).unwrap(),
        };
        c.s.set_read_timeout(Some(RAW_READ_TIMEOUT)).unwrap();
        let mut greeting = [0u8; 18];
        if c.s.read_exact(&mut greeting).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "slot was never released");
        thread::sleep(Duration::from_millis(20));
    }
    srv.stop();
}
