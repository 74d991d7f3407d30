//! Power loss on the file path users run: `chunkvol serve` on device files
//! in a FUSE filesystem ([`cutfs`]) that keeps unsynced writes in memory and
//! drops them on command. Clients write, flush, FUA-write, trim and zero over
//! NBD while commits, scrub and balance run; the server is killed and the
//! power cut at a random moment (or right after a FLUSH is sent, so inside a
//! commit); then `check --check-data-csum` must be clean and every block must
//! hold its last flushed content or a later write.

mod client;
mod cutfs;
mod ext4;
#[path = "../serve_harness/mod.rs"]
mod serve_harness;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use chunkvol::device::fault::Rng;
use client::{is_nbd_errno, Client};
use cutfs::{CutFs, BLOCK_BYTES};
use serve_harness::{cv, cv_ok, offline_check, s, Server, TestDir};

const DEV_SIZE: &str = "64M";
const VOL_BYTES: u64 = 16 << 20;
const WRITERS: u64 = 2;
const EXPORT: &str = "disk0";

/// What a block may hold after a cut: its last flushed content, or any
/// write sent since (acknowledged or in flight).
#[derive(Clone, Default)]
struct Block {
    stable: u64,
    since: Vec<u64>,
}

impl Block {
    fn latest(&self) -> u64 {
        *self.since.last().unwrap_or(&self.stable)
    }
    fn settle(&mut self) {
        self.stable = self.latest();
        self.since.clear();
    }
}

/// Content of block `blk` written by write `tag`; tag 0 is zeroes.
fn content(tag: u64, blk: u64, out: &mut [u8]) {
    if tag == 0 {
        out.fill(0);
        return;
    }
    out[..8].copy_from_slice(&tag.to_le_bytes());
    out[8..16].copy_from_slice(&blk.to_le_bytes());
    let mut st = tag ^ blk.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    serve_harness::fill_random(&mut out[16..], &mut st);
}

/// The tag a block read back carries, or None when it is no write of ours.
fn tag_of(blk: u64, got: &[u8]) -> Option<u64> {
    if got.iter().all(|&b| b == 0) {
        return Some(0);
    }
    let tag = u64::from_le_bytes(got[..8].try_into().unwrap());
    let mut want = vec![0u8; got.len()];
    content(tag, blk, &mut want);
    (want == got).then_some(tag)
}

#[derive(Clone, Copy, Default, Debug)]
struct LoadStats {
    writes: u64,
    fua_acked: u64,
    flushes_acked: u64,
    trims: u64,
    zeroes: u64,
    live_reads: u64,
}

impl LoadStats {
    fn add(&mut self, o: &LoadStats) {
        self.writes += o.writes;
        self.fua_acked += o.fua_acked;
        self.flushes_acked += o.flushes_acked;
        self.trims += o.trims;
        self.zeroes += o.zeroes;
        self.live_reads += o.live_reads;
    }
}

/// One writer on its own connection and its own range of blocks.
struct Writer {
    first_blk: u64,
    blocks: Vec<Block>,
    rng: Rng,
    next_tag: u64,
    /// Blocks written since the last acknowledged flush.
    dirty: Vec<usize>,
    stats: LoadStats,
}

impl Writer {
    fn offset(&self, i: usize) -> u64 {
        (self.first_blk + i as u64) * BLOCK_BYTES
    }

    /// Sends one random command; Err when the connection died.
    fn step(&mut self, c: &mut Client, flush_sent: &Option<SyncSender<()>>) -> Result<(), String> {
        let r = self.rng.below(100);
        let n = self.blocks.len();
        let i = self.rng.below(n as u64) as usize;
        let len = (1 + self.rng.below(16) as usize).min(n - i);
        let res = match r {
            0..=69 => {
                let fua = r >= 55;
                let tag = self.next_tag;
                self.next_tag += 1;
                let mut buf = vec![0u8; len * BLOCK_BYTES as usize];
                for k in 0..len {
                    let blk = self.first_blk + (i + k) as u64;
                    content(
                        tag,
                        blk,
                        &mut buf[k * BLOCK_BYTES as usize..][..BLOCK_BYTES as usize],
                    );
                    self.blocks[i + k].since.push(tag);
                    self.dirty.push(i + k);
                }
                self.stats.writes += 1;
                c.write(self.offset(i), &buf, fua).map(|()| {
                    if fua {
                        self.stats.fua_acked += 1;
                        for b in &mut self.blocks[i..i + len] {
                            b.settle();
                        }
                    }
                })
            }
            70..=79 => {
                let sent = || {
                    if let Some(tx) = flush_sent {
                        let _ = tx.try_send(());
                    }
                };
                c.flush_then(sent).map(|()| {
                    self.stats.flushes_acked += 1;
                    for d in std::mem::take(&mut self.dirty) {
                        self.blocks[d].settle();
                    }
                })
            }
            80..=94 => {
                for k in i..i + len {
                    self.blocks[k].since.push(0);
                    self.dirty.push(k);
                }
                let bytes = (len as u64 * BLOCK_BYTES) as u32;
                if r < 88 {
                    self.stats.trims += 1;
                    c.trim(self.offset(i), bytes)
                } else {
                    self.stats.zeroes += 1;
                    c.write_zeroes(self.offset(i), bytes)
                }
            }
            _ => {
                // A live read sees the latest acknowledged write.
                let mut buf = vec![0u8; BLOCK_BYTES as usize];
                c.read(self.offset(i), &mut buf).map(|()| {
                    self.stats.live_reads += 1;
                    let blk = self.first_blk + i as u64;
                    let want = self.blocks[i].latest();
                    assert_eq!(
                        tag_of(blk, &buf),
                        Some(want),
                        "live read of block {blk} (byte {}) before any cut",
                        blk * BLOCK_BYTES
                    );
                })
            }
        };
        match res {
            Ok(()) => Ok(()),
            Err(e) if is_nbd_errno(&e) => panic!("server refused a request: {e}"),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Every block holds its last flushed content or a later write; afterwards
/// what it holds becomes the new baseline.
fn verify(port: u16, writers: &mut [Writer], cut: u64) -> u64 {
    let mut c = Client::connect(port, EXPORT).expect("connect after the cut");
    let mut bad = Vec::new();
    let mut checked = 0;
    for w in writers.iter_mut() {
        let chunk_blocks = 256;
        let mut buf = vec![0u8; (chunk_blocks * BLOCK_BYTES) as usize];
        for start in (0..w.blocks.len()).step_by(chunk_blocks as usize) {
            let k = (w.blocks.len() - start).min(chunk_blocks as usize);
            let b = &mut buf[..k * BLOCK_BYTES as usize];
            c.read(w.offset(start), b).expect("read back after the cut");
            for j in 0..k {
                let blk = w.first_blk + (start + j) as u64;
                let got = tag_of(blk, &b[j * BLOCK_BYTES as usize..][..BLOCK_BYTES as usize]);
                let m = &mut w.blocks[start + j];
                checked += 1;
                match got {
                    Some(t) if t == m.stable || m.since.contains(&t) => {
                        m.stable = t;
                        m.since.clear();
                    }
                    _ => bad.push(format!(
                        "block {blk} (volume {EXPORT}, byte {}): holds {got:?}, flushed {}, later {:?}",
                        blk * BLOCK_BYTES,
                        m.stable,
                        m.since
                    )),
                }
            }
        }
        w.dirty.clear();
    }
    assert!(
        bad.is_empty(),
        "after cut {cut}: {} blocks lost flushed data or hold garbage:\n{}",
        bad.len(),
        bad[..bad.len().min(20)].join("\n")
    );
    checked
}

struct Totals {
    load: LoadStats,
    verified_blocks: u64,
    flush_cuts: u64,
    jobs_started: u64,
}

/// Starts a scrub or a balance now and then, as an operator would.
pub(crate) fn maybe_start_jobs(srv: &Server, rng: &mut Rng) -> u64 {
    let mut started = 0;
    if rng.below(3) == 0 {
        started += u64::from(cv(&["scrub", "start", "--socket", srv.sock()]).code == 0);
    }
    if rng.below(4) == 0 {
        let o = cv(&["balance", "start", "--full", "--socket", srv.sock()]);
        started += u64::from(o.code == 0);
    }
    started
}

/// One round: load, then kill -9 and the power cut. Returns the writers.
fn round(srv: &mut Server, mut ws: Vec<Writer>, rng: &mut Rng, t: &mut Totals) -> Vec<Writer> {
    let stop = Arc::new(AtomicBool::new(false));
    let at_flush = rng.below(3) == 0;
    let (tx, rx) = sync_channel::<()>(1);
    let min_load = Duration::from_millis(100 + rng.below(400));
    let started = Instant::now();
    let handles: Vec<_> = ws
        .drain(..)
        .map(|mut w| {
            let port = srv.port;
            let stop = stop.clone();
            let tx = at_flush.then(|| tx.clone());
            thread::spawn(move || {
                let mut c = Client::connect(port, EXPORT).expect("connect");
                while !stop.load(Ordering::Relaxed) {
                    let sig = tx
                        .as_ref()
                        .filter(|_| started.elapsed() >= min_load)
                        .cloned();
                    if w.step(&mut c, &sig).is_err() {
                        break;
                    }
                }
                w
            })
        })
        .collect();
    drop(tx);
    t.jobs_started += maybe_start_jobs(srv, rng);
    if at_flush {
        // Kill once a FLUSH is on the wire: the commit it starts is cut short.
        if rx.recv_timeout(min_load + Duration::from_secs(5)).is_ok() {
            t.flush_cuts += 1;
        }
    } else {
        thread::sleep(min_load + Duration::from_millis(rng.below(800)));
    }
    srv.kill9();
    stop.store(true, Ordering::Relaxed);
    handles
        .into_iter()
        .map(|h| {
            let mut w = h.join().expect("writer thread");
            t.load.add(&std::mem::take(&mut w.stats));
            w
        })
        .collect()
}

/// mkfs, volume create, then `cuts` rounds of load + kill + cut + check.
fn campaign(name: &str, mkfs: &[&str], ndev: usize, cuts: u64, seed: u64) {
    let dir = TestDir::new(name);
    let fs = CutFs::mount(&dir.join("cutfs"), &dir.join("backing"));
    let devs: Vec<PathBuf> = (0..ndev).map(|i| fs.path(&format!("d{i}.img"))).collect();
    let dev_args: Vec<&str> = devs.iter().map(|d| s(d)).collect();
    let mut rng = Rng::new(seed);
    let keep = |rng: &mut Rng| {
        // Half the cuts lose every unsynced block, half a random share.
        if rng.below(2) == 0 {
            0
        } else {
            rng.below(1001)
        }
    };
    let mut a = vec!["mkfs", "--size", DEV_SIZE];
    a.extend_from_slice(mkfs);
    a.extend_from_slice(&dev_args);
    cv_ok(&a);
    let k = keep(&mut rng);
    fs.fs.cut(k, &mut || rng.next_u64());
    let mut a = vec!["volume", "create", EXPORT, "--size", "16M"];
    a.extend_from_slice(&dev_args);
    cv_ok(&a);
    let k = keep(&mut rng);
    fs.fs.cut(k, &mut || rng.next_u64());
    offline_check(&devs, true);

    let per = VOL_BYTES / BLOCK_BYTES / WRITERS;
    let mut ws: Vec<Writer> = (0..WRITERS)
        .map(|i| Writer {
            first_blk: i * per,
            blocks: vec![Block::default(); per as usize],
            rng: Rng::new(seed ^ (i + 1).wrapping_mul(0x2545_f491_4f6c_dd1d)),
            next_tag: ((i + 1) << 48) | 1,
            dirty: Vec::new(),
            stats: LoadStats::default(),
        })
        .collect();
    let mut t = Totals {
        load: LoadStats::default(),
        verified_blocks: 0,
        flush_cuts: 0,
        jobs_started: 0,
    };
    let mut srv = Server::start(&dir, &devs, 1);
    for cut in 0..cuts {
        ws = round(&mut srv, ws, &mut rng, &mut t);
        let k = keep(&mut rng);
        fs.fs.cut(k, &mut || rng.next_u64());
        let o = cv(&[&["check", "--check-data-csum"][..], &dev_args].concat());
        assert!(
            o.code == 0 && o.stdout.contains("no problems found"),
            "check after cut {cut} (seed {seed}):\n{}\nserver log:\n{}",
            o.text(),
            srv.log_tail()
        );
        srv.launch();
        t.verified_blocks += verify(srv.port, &mut ws, cut);
    }
    srv.stop();
    offline_check(&devs, true);
    let st = fs.fs.stats();
    eprintln!(
        "{name}: {cuts} cuts ({} while a FLUSH was out), {:?}, {} jobs started, \
         {} blocks verified, cutfs {:?}",
        t.flush_cuts, t.load, t.jobs_started, t.verified_blocks, st
    );
    // The campaign is only worth something if the cuts really lost data
    // and the clients really flushed.
    assert!(
        st.cuts_with_pending * 2 >= cuts && st.blocks_dropped > 0,
        "too few cuts found unsynced data: {st:?}"
    );
    // Flushes went through the intent log (O_DSYNC writes), so the cuts
    // tested its replay.
    assert!(st.sync_writes > 0, "no intent log writes: {st:?}");
    assert!(
        t.load.flushes_acked > cuts && t.load.fua_acked > cuts,
        "{:?}",
        t.load
    );
}

#[test]
fn power_cuts_raid1_lose_no_flushed_byte() {
    campaign(
        "powercut-raid1",
        &["--data", "raid1", "--metadata", "raid1"],
        2,
        100,
        0x5eed_0001,
    );
}

#[test]
fn power_cuts_single_lose_no_flushed_byte() {
    campaign(
        "powercut-single",
        &["--data", "single", "--metadata", "dup"],
        1,
        100,
        0x5eed_0002,
    );
}
