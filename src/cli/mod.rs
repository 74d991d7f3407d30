//! The `chunkvol` command line (contract: docs/CLI.md).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::btree::{Body, Node};
use crate::engine::fs_info::FsInfo;
use crate::format::csum::CsumType;
use crate::format::{tree_id, Profile};
use crate::pool::{MkfsOptions, Pool};
use crate::service::ops::{self, Op, OpOutput};
use crate::util::size;

mod progress;
use progress::Watch;

/// chunkvol: self-healing, multi-device, copy-on-write block storage served over NBD.
#[derive(Parser, Debug)]
#[command(name = "chunkvol", version, about)]
pub struct Cli {
    /// Print the result, and any error, as JSON on stdout
    /// (`{"error": …, "exit_code": …}`); exit codes are unchanged.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where a pool command acts: a running server, or device files.
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// Control socket of the running `chunkvol serve` that owns the pool.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Device files of the pool (offline).
    devs: Vec<PathBuf>,
    /// Open although members are missing: reads use the remaining mirrors,
    /// data writes that cannot reach every mirror are refused.
    #[arg(long)]
    degraded: bool,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create a pool on devices.
    Mkfs(MkfsArgs),
    /// Serve the pool's volumes over NBD (no DEV: the demo pool in ./chunkvol-data).
    Serve(ServeArgs),
    /// Manage volumes.
    Volume {
        #[command(subcommand)]
        cmd: VolumeCmd,
    },
    /// Show space usage.
    Usage {
        #[command(flatten)]
        target: Target,
    },
    /// Check a pool offline (exit 0 consistent, 1 problems found, 2 could not run).
    Check {
        /// Also read and verify every data sector on every copy.
        #[arg(long)]
        check_data_csum: bool,
        #[arg(required = true)]
        devs: Vec<PathBuf>,
    },
    /// Print tree contents.
    DumpTree {
        /// chunk, dev, extent, csum, volume, or volume:NAME for a volume's
        /// own mapping tree (default: all).
        #[arg(long)]
        tree: Option<String>,
        #[arg(required = true)]
        devs: Vec<PathBuf>,
    },
    /// Verify every copy of everything and repair from good mirrors.
    Scrub {
        #[command(subcommand)]
        cmd: ScrubCmd,
    },
    /// Device commands.
    Device {
        #[command(subcommand)]
        cmd: DeviceCmd,
    },
    /// Relocate block groups: reclaim space, convert profiles, spread data.
    Balance {
        #[command(subcommand)]
        cmd: BalanceCmd,
    },
    /// Run the stress harness on in-memory devices (docs/TESTING.md).
    Stress(StressArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff) for `man -l -`, or install it as chunkvol.1.
    Manpage,
    /// Measure this build's checksum paths against the raw crates (bench/run).
    BenchCsum {
        /// Bytes hashed per call.
        #[arg(long, default_value_t = 1 << 20)]
        buffer_bytes: usize,
        /// Seconds per measured path.
        #[arg(long, default_value_t = 0.6)]
        seconds: f64,
    },
}

#[derive(Args, Debug)]
struct StressArgs {
    /// normal (everything at once), fault (plus injected faults), or crash.
    #[arg(long, default_value = "normal")]
    mode: String,
    /// Seconds per profile (normal and fault modes).
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Seed (default: from the clock; always printed).
    #[arg(long)]
    seed: Option<u64>,
    /// Data profile, or `all`.
    #[arg(long, default_value = "all")]
    profile: String,
    /// Devices (default: what the profile needs, plus one or two).
    #[arg(long)]
    devices: Option<usize>,
    #[arg(long, default_value_t = 3)]
    writers: usize,
    #[arg(long, default_value_t = 2)]
    readers: usize,
    #[arg(long, default_value_t = 2)]
    volumes: usize,
    #[arg(long, value_parser = size::parse_size, default_value = "128M")]
    device_size: u64,
    #[arg(long, value_parser = size::parse_size, default_value = "16M")]
    volume_size: u64,
    /// Crash mode: power cuts per profile.
    #[arg(long, default_value_t = 500)]
    points: u64,
    /// Microseconds each failpoint may sleep (seeded), widening race
    /// windows; 0 turns it off.
    #[arg(long, default_value_t = 500)]
    chaos_us: u64,
}

fn bench_csum(buffer_bytes: usize, seconds: f64, json: bool) -> i32 {
    let sector = crate::format::SECTOR_BYTES as usize;
    if buffer_bytes < sector
        || !buffer_bytes.is_multiple_of(sector)
        || buffer_bytes > 1 << 30
        || !(0.01..=600.0).contains(&seconds)
    {
        return fail(
            2,
            format!("--buffer-bytes must be a multiple of {sector} up to 1 GiB, and --seconds within 0.01..600"),
        );
    }
    let speeds = crate::format::csum::measure_speeds(
        buffer_bytes,
        sector,
        std::time::Duration::from_secs_f64(seconds),
    );
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&speeds).expect("plain data")
        );
    } else {
        let g = |b: f64| format!("{:.2} GB/s", b / 1e9);
        println!("algorithm  crate/buffer  crate/sector  engine-compute  engine-verify");
        for s in &speeds {
            println!(
                "{:<10} {:>12}  {:>12}  {:>14}  {:>13}",
                s.algorithm,
                g(s.crate_buffer_bytes_per_s),
                g(s.crate_sector_bytes_per_s),
                g(s.engine_compute_bytes_per_s),
                g(s.engine_verify_bytes_per_s)
            );
        }
    }
    0
}

fn stress(a: StressArgs) -> i32 {
    use crate::stress::{Mode, StressOptions};
    let mode = match Mode::parse(&a.mode) {
        Ok(m) => m,
        Err(e) => return fail(2, e),
    };
    let profiles: Vec<Profile> = if a.profile == "all" {
        let all = [
            Profile::Single,
            Profile::Dup,
            Profile::Raid1,
            Profile::Raid1c3,
            Profile::Raid10,
        ];
        all.into_iter()
            .filter(|p| mode != Mode::Fault || (p.copies() >= 2 && *p != Profile::Dup))
            .collect()
    } else {
        match Profile::parse(&a.profile) {
            Ok(p) => vec![p],
            Err(e) => return fail(2, e),
        }
    };
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let mut code = 0;
    let mut runs = Vec::new();
    for p in profiles {
        let mut o =
            StressOptions::for_profile(p, mode, seed, std::time::Duration::from_secs(a.duration));
        if let Some(d) = a.devices {
            o.devices = d;
        }
        o.writers = a.writers;
        o.readers = a.readers;
        o.volumes = a.volumes;
        o.device_bytes = a.device_size;
        o.volume_bytes = a.volume_size;
        o.crash_points = a.points;
        o.chaos_us = a.chaos_us;
        if let Err(e) = o.validate() {
            return fail(2, e);
        }
        let head = format!(
            "stress {} profile {} seed {seed} devices {}",
            mode.name(),
            p.name(),
            o.devices
        );
        let replay = format!(
            "chunkvol stress --mode {} --profile {} --seed {seed} --duration {}",
            mode.name(),
            p.name(),
            a.duration
        );
        if !json_out() {
            println!("{head}");
        }
        let r = crate::stress::run(&o);
        if r.is_err() {
            code = 1;
        }
        if json_out() {
            let mut v = serde_json::json!({
                "mode": mode.name(), "profile": p.name(), "seed": seed, "devices": o.devices,
            });
            match r {
                Ok(r) => {
                    v["seconds"] = r.seconds.into();
                    v["lines"] = r.lines.into();
                }
                Err(e) => {
                    v["error"] = e.to_string().into();
                    v["replay"] = replay.into();
                }
            }
            runs.push(v);
            continue;
        }
        match r {
            Ok(r) => {
                println!("  ok in {:.1} s", r.seconds);
                for l in r.lines {
                    println!("  {l}");
                }
            }
            Err(e) => {
                println!("  FAILED: {e}");
                println!("  replay: {replay}");
            }
        }
    }
    if json_out() {
        let v = serde_json::json!({ "runs": runs, "ok": code == 0 });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    code
}

#[derive(Subcommand, Debug)]
enum BalanceCmd {
    /// Start a balance (FILTERS: usage=N|N..M, devid=N, drange=A..B,
    /// vrange=A..B, profiles=P|P, convert=P, limit=N, soft).
    Start {
        /// Data groups, with filters (e.g. -dusage=50).
        #[arg(short = 'd', num_args = 0..=1, default_missing_value = "", require_equals = false)]
        data: Option<String>,
        /// Metadata groups, with filters.
        #[arg(short = 'm', num_args = 0..=1, default_missing_value = "")]
        metadata: Option<String>,
        /// System groups, with filters.
        #[arg(short = 's', num_args = 0..=1, default_missing_value = "")]
        system: Option<String>,
        /// Every block group (no filters).
        #[arg(long)]
        full: bool,
        /// Wait for the end.
        #[arg(short = 'B')]
        wait: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Progress of the running or last balance.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Pause the running balance after the current step.
    Pause {
        #[command(flatten)]
        target: Target,
    },
    /// Continue a paused or interrupted balance.
    Resume {
        #[arg(short = 'B')]
        wait: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Stop the running balance, or forget a paused or interrupted one.
    Cancel {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand, Debug)]
enum ReplaceCmd {
    /// Copy SRC's stripes to NEW_DEV while clients keep working, then drop SRC.
    Start {
        /// DEVID, `missing`, or device path.
        src: String,
        new_dev: PathBuf,
        /// Wait for the end.
        #[arg(short = 'B')]
        wait: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Continue a replace a crash or restart interrupted (`serve` does it
    /// on its own at start).
    Resume {
        /// Wait for the end.
        #[arg(short = 'B')]
        wait: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Progress of the running or last replace.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Stop a running replace after the current block group.
    Cancel {
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Args, Debug)]
struct MkfsArgs {
    /// Data profile: single, dup, raid1, raid1c3, raid10.
    #[arg(long)]
    data: Option<String>,
    /// Metadata profile.
    #[arg(long)]
    metadata: Option<String>,
    /// Checksum: crc32c, xxhash64, sha256, blake3.
    #[arg(long, default_value = "crc32c")]
    csum: String,
    /// Create missing device files (sparse) of this size.
    #[arg(long, value_parser = size::parse_size)]
    size: Option<u64>,
    /// Tree node size.
    #[arg(long, value_parser = size::parse_size, default_value = "16K")]
    node_size: u64,
    #[arg(long, default_value = "")]
    label: String,
    /// Overwrite devices that already hold a pool.
    #[arg(long)]
    force: bool,
    #[arg(required = true)]
    devs: Vec<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum VolumeCmd {
    /// Create a thin volume.
    Create {
        name: String,
        #[arg(long, value_parser = size::parse_size)]
        size: u64,
        #[command(flatten)]
        target: Target,
    },
    /// List volumes.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Delete a volume and free its space.
    Delete {
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Make a read-only snapshot of SRC: its content as of now (every write
    /// acknowledged before the command), sharing SRC's space.
    Snapshot {
        src: String,
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Make a writable clone of SRC (a snapshot or any volume), sharing its
    /// space until either is written.
    Clone {
        src: String,
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// List the byte ranges in which NEW differs from OLD (a snapshot of
    /// it, or the snapshot it was cloned from), for incremental backup. The
    /// time grows with the changes, not with the volume.
    Diff {
        old: String,
        new: String,
        #[command(flatten)]
        target: Target,
    },
    /// Grow or shrink a volume.
    Resize {
        name: String,
        #[arg(long, value_parser = size::parse_size)]
        size: u64,
        #[command(flatten)]
        target: Target,
    },
    /// Change a volume's properties: `--read-only true` refuses writes,
    /// discards and resizes (NBD clients see a read-only export).
    Set {
        name: String,
        #[arg(long, value_name = "BOOL", action = clap::ArgAction::Set)]
        read_only: Option<bool>,
        #[command(flatten)]
        target: Target,
    },
    /// Copy FILE's bytes into the volume (all-zero sectors stay unallocated).
    Import {
        name: String,
        file: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// Copy the volume into FILE.
    Export {
        name: String,
        file: PathBuf,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand, Debug)]
enum ScrubCmd {
    /// Start a scrub.
    Start {
        /// Wait for the end, with a progress bar on a terminal.
        #[arg(short = 'B')]
        wait: bool,
        /// Read-only: report, never repair.
        #[arg(short = 'r')]
        readonly: bool,
        /// Only this device.
        #[arg(short = 'd')]
        devid: Option<u64>,
        /// Read rate cap per device (e.g. 100M); default yields to client I/O.
        #[arg(long, value_parser = size::parse_size)]
        limit: Option<u64>,
        /// Read around the host page cache (O_DIRECT). By default scrub
        /// reads through it and drops what it brought in: either way the
        /// clients' cached data stays. O_DIRECT was slower where measured.
        #[arg(long)]
        uncached: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Progress and errors of the current or last scrub.
    Status {
        /// List what was found.
        #[arg(long)]
        errors: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Stop the running scrub (progress is kept for resume).
    Cancel {
        #[command(flatten)]
        target: Target,
    },
    /// Pause the running scrub.
    Pause {
        #[command(flatten)]
        target: Target,
    },
    /// Continue a paused, canceled or interrupted scrub where it stopped.
    Resume {
        #[arg(short = 'B')]
        wait: bool,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand, Debug)]
enum DeviceCmd {
    /// Error counters per device.
    Stats {
        /// Zero the counters after printing them.
        #[arg(long)]
        reset: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Add a device to the pool (online or offline).
    Add {
        dev: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// Move everything off a device, then drop it (DEVID, `missing`, or path).
    Remove {
        dev: String,
        #[command(flatten)]
        target: Target,
    },
    /// Replace a device by a new one.
    Replace {
        #[command(subcommand)]
        cmd: ReplaceCmd,
    },
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CHUNKVOL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour only on a terminal (never in log files), and never with NO_COLOR.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .try_init();
}

/// `--json`, set once from the command line before any output.
static JSON_OUTPUT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Whether results and errors print as JSON.
fn json_out() -> bool {
    JSON_OUTPUT.get().copied().unwrap_or(false)
}

/// Print a command's result. Under `--json`: its JSON (the op's own, or
/// its structured value), or `{"error", "exit_code"}` when it failed
/// without one.
fn emit(out: OpOutput) -> i32 {
    use std::io::Write;
    if json_out() && out.stdout.trim().is_empty() && out.exit != 0 {
        let msg = out.stderr.trim();
        return fail(out.exit, msg.strip_prefix("error: ").unwrap_or(msg));
    }
    match (&out.value, json_out()) {
        (Some(v), true) => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        _ => print!("{}", out.stdout),
    }
    eprint!("{}", out.stderr);
    let _ = std::io::stdout().flush();
    out.exit
}

/// Report an error: `error: MSG` on stderr, or under `--json` the object
/// `{"error": MSG, "exit_code": CODE}` on stdout. Returns `code`.
fn fail(code: i32, msg: impl std::fmt::Display) -> i32 {
    if json_out() {
        let v = serde_json::json!({ "error": msg.to_string(), "exit_code": code });
        println!("{v}");
    } else {
        eprintln!("error: {msg}");
    }
    code
}

/// Print a plain result: `text` (with a newline), or `value` under `--json`.
fn done(text: impl std::fmt::Display, value: serde_json::Value) -> i32 {
    if json_out() {
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
    } else {
        println!("{text}");
    }
    0
}

fn absolute(p: &std::path::Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Run a pool command online (through the server) or offline.
/// SIGINT or SIGTERM during an offline command: the first stops its job
/// where it can resume (progress saved with the pool's close), a second
/// exits at once.
struct OfflineSignals {
    handle: signal_hook::iterator::Handle,
    thread: std::thread::JoinHandle<()>,
    seen: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl OfflineSignals {
    fn install(pool: &Pool) -> Result<OfflineSignals, String> {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
            .map_err(|e| format!("cannot install signal handlers: {e}"))?;
        let handle = signals.handle();
        let seen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (p, s) = (pool.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            for _ in signals.forever() {
                if s.swap(true, std::sync::atomic::Ordering::AcqRel) {
                    std::process::exit(130);
                }
                ops::interrupt(&p);
            }
        });
        Ok(OfflineSignals {
            handle,
            thread,
            seen,
        })
    }

    /// Stop listening; whether a signal came.
    /// Whether SIGINT or SIGTERM came.
    fn seen(&self) -> bool {
        self.seen.load(std::sync::atomic::Ordering::Acquire)
    }

    fn finish(self) -> bool {
        self.handle.close();
        let _ = self.thread.join();
        self.seen.load(std::sync::atomic::Ordering::Acquire)
    }
}

fn run_op(target: &Target, op: Op) -> i32 {
    run_op_with(target, op, None)
}

/// [`run_op`] with a progress bar following `watch` while it runs.
fn run_op_with(target: &Target, op: Op, watch: Option<Watch>) -> i32 {
    match (&target.socket, target.devs.is_empty()) {
        (Some(_), false) => fail(2, "give either --socket or device paths, not both"),
        (None, true) => fail(
            2,
            "no target: give --socket PATH or the pool's device paths",
        ),
        (Some(sock), true) => {
            let bar = watch.and_then(|w| {
                let sock = sock.clone();
                progress::start(
                    w,
                    Box::new(move |op| {
                        let t = Some(std::time::Duration::from_secs(2));
                        crate::service::control::request_within(&sock, op, t).ok()
                    }),
                )
            });
            let r = crate::service::control::request(sock, &op);
            if let Some(b) = bar {
                b.finish(r.as_ref().is_ok_and(|o| o.exit == 0));
            }
            match r {
                Ok(out) => emit(out),
                Err(e) => fail(2, e),
            }
        }
        (None, false) => {
            let opts = crate::pool::OpenOptions {
                degraded: target.degraded,
                ..Default::default()
            };
            let pool = match Pool::open_paths_with(&target.devs, opts) {
                Ok(p) => p,
                Err(e) => return fail(2, e),
            };
            let signals = match OfflineSignals::install(&pool) {
                Ok(s) => s,
                Err(e) => return fail(1, e),
            };
            let bar = watch.and_then(|w| {
                let p = pool.clone();
                progress::start(w, Box::new(move |op| Some(ops::run(&p, op))))
            });
            let out = ops::run(&pool, &op);
            if let Some(b) = bar {
                b.finish(out.exit == 0);
            }
            // Offline there is no cleaner: a deleted volume's space comes
            // back before the command ends (an interrupt leaves the rest to
            // the next open).
            if let Err(e) = crate::jobs::cleaner::drop_dead_volumes(pool.fs(), &|| signals.seen()) {
                return fail(1, e);
            }
            let interrupted = signals.finish();
            if let Err(e) = pool.close() {
                return fail(1, e);
            }
            let code = emit(out);
            if interrupted {
                eprintln!("interrupted: progress saved; `resume` continues where it stopped");
                return 130;
            }
            code
        }
    }
}

fn mkfs(a: MkfsArgs) -> i32 {
    let parse = |s: &Option<String>| -> Result<Option<Profile>, String> {
        s.as_deref().map(Profile::parse).transpose()
    };
    let (data, metadata) = match (parse(&a.data), parse(&a.metadata)) {
        (Ok(d), Ok(m)) => (d, m),
        (Err(e), _) | (_, Err(e)) => return fail(2, e),
    };
    let csum = match CsumType::parse(&a.csum) {
        Ok(c) => c,
        Err(e) => return fail(2, e),
    };
    if a.node_size > u32::MAX as u64 {
        return fail(2, "node size too large");
    }
    let opts = MkfsOptions {
        data,
        metadata,
        csum,
        node_bytes: a.node_size as u32,
        label: a.label,
        force: a.force,
    };
    match Pool::mkfs_paths(&a.devs, a.size, &opts) {
        Ok(()) => {
            let pool = match Pool::open_paths(&a.devs) {
                Ok(p) => p,
                Err(e) => return fail(1, e),
            };
            let u = pool.usage();
            let many = a.devs.len() > 1;
            let data = data.map_or(if many { "raid1" } else { "single" }, |p| p.name());
            let metadata = metadata.map_or(if many { "raid1" } else { "dup" }, |p| p.name());
            done(
                format_args!(
                    "created pool on {} device(s), {} total; data {data}, metadata {metadata}, checksum {}",
                    a.devs.len(),
                    size::human(u.device_size_bytes),
                    csum.name()
                ),
                serde_json::json!({
                    "devices": a.devs,
                    "device_size_bytes": u.device_size_bytes,
                    "data": data,
                    "metadata": metadata,
                    "csum": csum.name(),
                }),
            )
        }
        Err(e @ (crate::Error::Invalid(_) | crate::Error::Busy(_))) => fail(2, e),
        Err(e) => fail(1, e),
    }
}

fn check(devs: &[PathBuf], data: bool, json: bool) -> i32 {
    let pool = match Pool::open_paths_no_repair(devs) {
        Ok(p) => p,
        Err(e) => return fail(2, e),
    };
    let r = match crate::pool::check::check(&pool, data) {
        Ok(r) => r,
        Err(e) => return fail(2, e),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
    } else {
        for p in &r.problems {
            println!("problem: {p}");
        }
        println!(
            "checked {} tree blocks, {} data extents ({}){}: {}",
            r.tree_blocks,
            r.data_extents,
            size::human(r.data_bytes),
            if data {
                format!(
                    ", {} sectors verified, {} checksum errors",
                    r.sectors_verified, r.csum_errors
                )
            } else {
                String::new()
            },
            if r.ok() {
                "no problems found"
            } else {
                "PROBLEMS FOUND"
            }
        );
    }
    if r.ok() {
        0
    } else {
        1
    }
}

fn dump_node(fs: &FsInfo, n: &Node, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    out.push_str(&format!(
        "{pad}node {:#x} level {} gen {} owner {} items {}\n",
        n.addr,
        n.level,
        n.gen,
        tree_id::name(n.owner),
        n.len()
    ));
    match &n.body {
        Body::Leaf(items) => {
            for (k, v) in items {
                out.push_str(&format!("{pad}  item {k} size {}\n", v.len()));
            }
        }
        Body::Internal(ch) => {
            for c in ch {
                out.push_str(&format!(
                    "{pad}  ptr {} -> {:#x} gen {}\n",
                    c.key, c.addr, c.gen
                ));
                match fs.load_node(c.addr, c.gen, n.owner, n.level - 1) {
                    Ok(child) => dump_node(fs, &child, indent + 4, out),
                    Err(e) => out.push_str(&format!("{pad}    unreadable: {e}\n")),
                }
            }
        }
    }
}

/// A tree block and, recursively, its children as JSON.
fn dump_node_json(fs: &FsInfo, n: &Node) -> serde_json::Value {
    use serde_json::json;
    let key = |k: &crate::format::Key| {
        json!({
            "objectid": k.objectid,
            "type": crate::format::item::name(k.ty).map_or_else(|| k.ty.to_string(), str::to_string),
            "offset": k.offset,
        })
    };
    let mut v = json!({
        "addr": n.addr,
        "level": n.level,
        "gen": n.gen,
        "owner": tree_id::name(n.owner),
    });
    match &n.body {
        Body::Leaf(items) => {
            v["items"] = items
                .iter()
                .map(|(k, val)| json!({ "key": key(k), "size": val.len() }))
                .collect();
        }
        Body::Internal(ch) => {
            v["children"] = ch
                .iter()
                .map(|c| {
                    let mut p = json!({ "key": key(&c.key), "addr": c.addr, "gen": c.gen });
                    match fs.load_node(c.addr, c.gen, n.owner, n.level - 1) {
                        Ok(child) => p["node"] = dump_node_json(fs, &child),
                        Err(e) => p["error"] = e.to_string().into(),
                    }
                    p
                })
                .collect();
        }
    }
    v
}

fn dump_tree(devs: &[PathBuf], which: Option<&str>) -> i32 {
    let pool = match Pool::open_paths_no_repair(devs) {
        Ok(p) => p,
        Err(e) => return fail(2, e),
    };
    let fs = pool.fs();
    let roots = crate::util::sync::read(&fs.commit_roots).clone();
    let mut out = String::new();
    let mut trees = Vec::new();
    let names: std::collections::BTreeMap<u64, String> = crate::util::sync::lock(&fs.trans)
        .volumes
        .iter()
        .map(|(n, v)| (v.id, format!("volume:{n}")))
        .collect();
    let mut known = Vec::new();
    for (t, root) in roots.all() {
        let name = match names.get(&t) {
            Some(n) => n.as_str(),
            None => tree_id::name(t),
        };
        known.push(name.to_string());
        if which.is_some_and(|w| w != name) {
            continue;
        }
        if json_out() {
            trees.push(serde_json::json!({
                "tree": name,
                "id": t,
                "generation": roots.gen,
                "root": dump_node_json(fs, root),
            }));
        } else {
            out.push_str(&format!(
                "{name} tree (id {t}, generation {}):\n",
                roots.gen
            ));
            dump_node(fs, root, 2, &mut out);
        }
    }
    if trees.is_empty() && out.is_empty() {
        return fail(
            2,
            format!(
                "unknown tree '{}' (one of: {})",
                which.unwrap_or(""),
                known.join(", ")
            ),
        );
    }
    if json_out() {
        return done("", serde_json::json!({ "trees": trees }));
    }
    // `dump-tree | head` closes the pipe early: that is not an error.
    use std::io::Write;
    match std::io::stdout().lock().write_all(out.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => fail(1, e),
        _ => 0,
    }
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// ADDR:PORT, or unix:PATH.
    #[arg(long, default_value = "127.0.0.1:10809")]
    listen: String,
    /// Control socket (default: chunkvol.sock beside the first device).
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Seconds between background commits.
    #[arg(long, default_value_t = 30)]
    commit_interval: u64,
    /// Relocate block groups whose usage falls below this percent in
    /// the background (0: off), as btrfs's bg_reclaim_threshold.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=99))]
    reclaim_threshold: u64,
    /// Serve although members are missing (see --degraded of pool commands).
    #[arg(long)]
    degraded: bool,
    /// Export every volume read-only (as qemu-nbd -r): writes, trims and
    /// write-zeroes fail with EPERM.
    #[arg(long, short = 'r')]
    read_only: bool,
    /// TLS certificate chain (PEM) for NBD clients (as qemu-nbd's
    /// tls-creds-x509 or nbdkit's --tls-certificates).
    #[arg(long, requires = "tls_key", value_name = "PEM")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert", value_name = "PEM")]
    tls_key: Option<PathBuf>,
    /// CA (PEM) that client certificates must chain to: clients without a
    /// valid certificate are refused.
    #[arg(long, requires = "tls_cert", value_name = "PEM")]
    tls_client_ca: Option<PathBuf>,
    /// With a certificate: `require` (default) refuses clients that do not
    /// start TLS; `on` lets them choose.
    #[arg(long, value_enum, requires = "tls_cert")]
    tls: Option<TlsMode>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics (a bare PORT
    /// listens on 127.0.0.1).
    #[arg(long, value_name = "[ADDR:]PORT", value_parser = crate::service::metrics::parse_addr)]
    metrics: Option<std::net::SocketAddr>,
    /// `on`: a flush writes the changes since the last commit to the
    /// intent log; `off`: every flush commits the whole tree (to compare).
    #[arg(long, value_enum, default_value = "on")]
    intent_log: Switch,
    devs: Vec<PathBuf>,
}

/// An on/off setting.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Switch {
    On,
    Off,
}

/// `serve --tls`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum TlsMode {
    On,
    Require,
}

impl ServeArgs {
    fn into_config(self) -> crate::service::server::ServeConfig {
        crate::service::server::ServeConfig {
            listen: self.listen,
            socket: self.socket,
            commit_interval: std::time::Duration::from_secs(self.commit_interval.max(1)),
            devs: self.devs,
            reclaim_threshold_percent: self.reclaim_threshold,
            degraded: self.degraded,
            read_only: self.read_only,
            tls: self.tls_cert.map(|cert| crate::service::server::TlsFiles {
                cert,
                key: self.tls_key.unwrap_or_default(),
                client_ca: self.tls_client_ca,
                required: !matches!(self.tls, Some(TlsMode::On)),
            }),
            metrics: self.metrics,
            intent_log: self.intent_log == Switch::On,
            json_banner: json_out(),
        }
    }
}

/// Entry point; returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // A parse error cannot read the flag from the parse; look for it.
            let json = std::env::args_os().skip(1).any(|a| a == "--json");
            if json && e.kind() == clap::error::ErrorKind::DisplayVersion {
                let v = serde_json::json!({
                    "name": env!("CARGO_PKG_NAME"),
                    "version": env!("CARGO_PKG_VERSION"),
                });
                println!("{v}");
                return 0;
            }
            if json && e.use_stderr() {
                let _ = JSON_OUTPUT.set(true);
                let text = e.render().to_string();
                let msg = text
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim_start_matches("error: ");
                return fail(2, msg);
            }
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let _ = JSON_OUTPUT.set(cli.json);
    let serving = matches!(cli.cmd, Cmd::Serve { .. });
    init_logging(if serving { "info" } else { "warn" });
    match cli.cmd {
        Cmd::Serve(a) => match crate::service::server::run(a.into_config()) {
            Ok(()) => 0,
            Err(e) => fail(2, e),
        },
        Cmd::Mkfs(a) => mkfs(a),
        Cmd::Stress(a) => stress(a),
        Cmd::BenchCsum {
            buffer_bytes,
            seconds,
        } => bench_csum(buffer_bytes, seconds, json_out()),
        Cmd::Volume { cmd } => volume_cmd(cmd),
        Cmd::Completions { shell } => {
            use clap::CommandFactory;
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "chunkvol", &mut script);
            let script = String::from_utf8_lossy(&script);
            let v = serde_json::json!({ "shell": shell.to_string(), "script": script });
            done(script.trim_end(), v)
        }
        Cmd::Manpage => {
            use clap::CommandFactory;
            let mut roff = Vec::new();
            match clap_mangen::Man::new(Cli::command()).render(&mut roff) {
                Ok(()) => {
                    let roff = String::from_utf8_lossy(&roff);
                    done(roff.trim_end(), serde_json::json!({ "roff": roff }))
                }
                Err(e) => fail(1, e),
            }
        }
        Cmd::Usage { target } => run_op(&target, Op::Usage { json: json_out() }),
        Cmd::Check {
            check_data_csum,
            devs,
        } => check(&devs, check_data_csum, json_out()),
        Cmd::DumpTree { tree, devs } => dump_tree(&devs, tree.as_deref()),
        Cmd::Scrub { cmd } => scrub_cmd(cmd),
        Cmd::Device { cmd } => device_cmd(cmd),
        Cmd::Balance { cmd } => balance_cmd(cmd),
    }
}

/// File arguments travel to the server, whose working directory differs.
fn volume_cmd(cmd: VolumeCmd) -> i32 {
    match cmd {
        VolumeCmd::Create { name, size, target } => run_op(
            &target,
            Op::VolumeCreate {
                name,
                size_bytes: size,
            },
        ),
        VolumeCmd::List { target } => run_op(&target, Op::VolumeList { json: json_out() }),
        VolumeCmd::Delete { name, target } => run_op(&target, Op::VolumeDelete { name }),
        VolumeCmd::Snapshot { src, name, target } => {
            run_op(&target, Op::VolumeSnapshot { src, name })
        }
        VolumeCmd::Clone { src, name, target } => run_op(&target, Op::VolumeClone { src, name }),
        VolumeCmd::Diff { old, new, target } => run_op(
            &target,
            Op::VolumeDiff {
                old,
                new,
                json: json_out(),
            },
        ),
        VolumeCmd::Resize { name, size, target } => run_op(
            &target,
            Op::VolumeResize {
                name,
                size_bytes: size,
            },
        ),
        VolumeCmd::Set {
            name,
            read_only,
            target,
        } => run_op(&target, Op::VolumeSet { name, read_only }),
        VolumeCmd::Import { name, file, target } => {
            let file = absolute(&file);
            let watch = Some(Watch::Task("import", Some(name.clone())));
            run_op_with(&target, Op::VolumeImport { name, file }, watch)
        }
        VolumeCmd::Export { name, file, target } => {
            let file = absolute(&file);
            let watch = Some(Watch::Task("export", Some(name.clone())));
            run_op_with(&target, Op::VolumeExport { name, file }, watch)
        }
    }
}

/// Whether a job command waits for the end (`-B`, and always offline,
/// where nothing would keep the job going), and the bar to show then.
fn waiting(wait: bool, target: &Target, w: Watch) -> (bool, Option<Watch>) {
    let wait = wait || target.socket.is_none();
    (wait, wait.then_some(w))
}

/// Scrub commands; start and resume wait with -B, and always offline.
fn scrub_cmd(cmd: ScrubCmd) -> i32 {
    let json = json_out();
    match cmd {
        ScrubCmd::Start {
            wait,
            readonly,
            devid,
            limit,
            uncached,
            target,
        } => {
            let opts = crate::jobs::scrub::ScrubOptions {
                readonly,
                devid,
                limit_bytes_per_s: limit,
                uncached,
            };
            let (wait, watch) = waiting(wait, &target, Watch::Scrub);
            run_op_with(&target, Op::ScrubStart { opts, json, wait }, watch)
        }
        ScrubCmd::Status { errors, target } => run_op(
            &target,
            Op::ScrubStatus {
                json,
                errors,
                final_exit: false,
            },
        ),
        ScrubCmd::Cancel { target } => run_op(&target, Op::ScrubCancel),
        ScrubCmd::Pause { target } => run_op(&target, Op::ScrubPause),
        ScrubCmd::Resume { wait, target } => {
            let (wait, watch) = waiting(wait, &target, Watch::Scrub);
            run_op_with(&target, Op::ScrubResume { json, wait }, watch)
        }
    }
}

/// A device named by path is made absolute for the server; a DEVID or
/// `missing` passes through.
fn device_arg(dev: String) -> String {
    if dev.parse::<u64>().is_ok() || dev == "missing" {
        dev
    } else {
        absolute(std::path::Path::new(&dev)).display().to_string()
    }
}

/// Device membership commands; replace has its own subcommands.
fn device_cmd(cmd: DeviceCmd) -> i32 {
    match cmd {
        DeviceCmd::Stats { reset, target } => run_op(
            &target,
            Op::DeviceStats {
                json: json_out(),
                reset,
            },
        ),
        DeviceCmd::Add { dev, target } => run_op(
            &target,
            Op::DeviceAdd {
                path: absolute(&dev),
            },
        ),
        DeviceCmd::Remove { dev, target } => {
            let dev = device_arg(dev);
            // The server names a remove's task by devid.
            let subject = dev.parse::<u64>().ok().map(|_| dev.clone());
            let watch = Some(Watch::Task("remove", subject));
            run_op_with(&target, Op::DeviceRemove { dev }, watch)
        }
        DeviceCmd::Replace { cmd } => replace_cmd(cmd),
    }
}

/// Offline, a replace always runs to the end (nothing would keep it going).
fn replace_cmd(cmd: ReplaceCmd) -> i32 {
    let json = json_out();
    match cmd {
        ReplaceCmd::Start {
            src,
            new_dev,
            wait,
            target,
        } => {
            let src = device_arg(src);
            let (wait, watch) = waiting(wait, &target, Watch::Replace);
            let new = absolute(&new_dev);
            let op = Op::DeviceReplaceStart {
                src,
                new,
                json,
                wait,
            };
            run_op_with(&target, op, watch)
        }
        ReplaceCmd::Resume { wait, target } => {
            let (wait, watch) = waiting(wait, &target, Watch::Replace);
            run_op_with(&target, Op::DeviceReplaceResume { json, wait }, watch)
        }
        ReplaceCmd::Status { target } => {
            run_op(&target, Op::DeviceReplaceStatus { json: json_out() })
        }
        ReplaceCmd::Cancel { target } => run_op(&target, Op::DeviceReplaceCancel),
    }
}

/// Offline, a balance always runs to the end (nothing would keep it going).
fn balance_cmd(cmd: BalanceCmd) -> i32 {
    let json = json_out();
    match cmd {
        BalanceCmd::Start {
            data,
            metadata,
            system,
            full,
            wait,
            target,
        } => {
            let args = crate::jobs::balance::BalanceArgs {
                data,
                metadata,
                system,
                full,
            };
            // Filters are checked here too, so a typo fails before any
            // server round trip.
            for f in [&args.data, &args.metadata, &args.system]
                .into_iter()
                .flatten()
            {
                if let Err(e) = crate::jobs::balance::Filters::parse(f) {
                    return fail(2, e);
                }
            }
            let (wait, watch) = waiting(wait, &target, Watch::Balance);
            run_op_with(&target, Op::BalanceStart { args, json, wait }, watch)
        }
        BalanceCmd::Status { target } => run_op(&target, Op::BalanceStatus { json: json_out() }),
        BalanceCmd::Pause { target } => run_op(&target, Op::BalancePause),
        BalanceCmd::Resume { wait, target } => {
            let (wait, watch) = waiting(wait, &target, Watch::Balance);
            run_op_with(&target, Op::BalanceResume { json, wait }, watch)
        }
        BalanceCmd::Cancel { target } => run_op(&target, Op::BalanceCancel),
    }
}
