//! Pool commands shared by the offline CLI and the control socket of a
//! running server: one implementation, two transports.

use std::fs::File;
use std::io::{Read, Write};
use std::path::PathBuf;

use crate::pool::Pool;
use crate::util::error::{Error, Result};
use crate::util::sync::Arc;

/// A command that acts on an open pool.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    Usage {
        json: bool,
    },
    VolumeCreate {
        name: String,
        size_bytes: u64,
    },
    VolumeList {
        json: bool,
    },
    VolumeDelete {
        name: String,
    },
    /// A read-only snapshot of `src` named `name`.
    VolumeSnapshot {
        src: String,
        name: String,
    },
    /// A writable clone of `src` named `name`.
    VolumeClone {
        src: String,
        name: String,
    },
    /// The byte ranges in which `new` differs from `old`.
    VolumeDiff {
        old: String,
        new: String,
        json: bool,
    },
    VolumeResize {
        name: String,
        size_bytes: u64,
    },
    /// Change a volume's properties.
    VolumeSet {
        name: String,
        read_only: Option<bool>,
    },
    VolumeImport {
        name: String,
        file: PathBuf,
    },
    VolumeExport {
        name: String,
        file: PathBuf,
    },
    DeviceStats {
        json: bool,
        reset: bool,
    },
    ScrubStart {
        opts: crate::jobs::scrub::ScrubOptions,
        json: bool,
        /// Wait for the end (offline always waits).
        wait: bool,
    },
    ScrubStatus {
        json: bool,
        errors: bool,
        /// Exit as a finished `scrub -B` would (3 for uncorrectable errors).
        #[serde(default)]
        final_exit: bool,
    },
    ScrubCancel,
    ScrubPause,
    ScrubResume {
        json: bool,
        wait: bool,
    },
    DeviceAdd {
        path: PathBuf,
    },
    DeviceRemove {
        /// DEVID, `missing`, or a device path.
        dev: String,
    },
    DeviceReplaceStart {
        src: String,
        new: PathBuf,
        json: bool,
        wait: bool,
    },
    DeviceReplaceResume {
        json: bool,
        wait: bool,
    },
    DeviceReplaceStatus {
        json: bool,
    },
    DeviceReplaceCancel,
    BalanceStart {
        args: crate::jobs::balance::BalanceArgs,
        json: bool,
        wait: bool,
    },
    BalanceStatus {
        json: bool,
    },
    BalancePause,
    BalanceResume {
        json: bool,
        wait: bool,
    },
    BalanceCancel,
    /// Long operations running now that are not jobs (device remove,
    /// volume import and export): for progress bars.
    Progress,
}

/// What a command prints and how it exits.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct OpOutput {
    pub stdout: String,
    pub stderr: String,
    pub exit: i32,
    /// The result as JSON, for commands whose `stdout` is text only.
    #[serde(default)]
    pub value: Option<serde_json::Value>,
}

impl OpOutput {
    fn ok(stdout: String) -> OpOutput {
        OpOutput {
            stdout,
            ..Default::default()
        }
    }
    /// A finished command: `text` for people, `value` for `--json`.
    fn done(text: String, value: serde_json::Value) -> OpOutput {
        OpOutput {
            stdout: text,
            value: Some(value),
            ..Default::default()
        }
    }
    /// A failed command (exit 1 or 2), message on stderr.
    pub fn err(e: &Error) -> OpOutput {
        let exit = match e {
            Error::Invalid(_) => 2,
            _ => 1,
        };
        OpOutput {
            stderr: format!("error: {e}\n"),
            exit,
            ..Default::default()
        }
    }
}

/// A job control request was accepted (the job acts on it at its next step).
fn requested(job: &str, action: &str) -> OpOutput {
    OpOutput::done(
        format!("{job} {action} requested\n"),
        serde_json::json!({ "job": job, "requested": action }),
    )
}

/// Copy unit for import and export.
const COPY_UNIT_BYTES: usize = 4 << 20;

fn json<T: serde::Serialize>(v: &T) -> String {
    let mut s =
        serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    s.push('\n');
    s
}

/// Run `op` against `pool`.
pub fn run(pool: &Pool, op: &Op) -> OpOutput {
    match run_inner(pool, op) {
        Ok(o) => o,
        Err(e) => OpOutput::err(&e),
    }
}

fn run_inner(pool: &Pool, op: &Op) -> Result<OpOutput> {
    match op {
        Op::ScrubStart { .. }
        | Op::ScrubResume { .. }
        | Op::ScrubStatus { .. }
        | Op::ScrubCancel
        | Op::ScrubPause => scrub_op(pool, op),
        Op::DeviceAdd { .. }
        | Op::DeviceRemove { .. }
        | Op::DeviceReplaceStart { .. }
        | Op::DeviceReplaceResume { .. }
        | Op::DeviceReplaceStatus { .. }
        | Op::DeviceReplaceCancel
        | Op::DeviceStats { .. } => device_op(pool, op),
        Op::BalanceStart { .. }
        | Op::BalanceResume { .. }
        | Op::BalanceStatus { .. }
        | Op::BalancePause
        | Op::BalanceCancel => balance_op(pool, op),
        Op::Usage { json: j } => Ok(usage_output(pool, *j)),
        Op::Progress => Ok(OpOutput::ok(json(&serde_json::json!({
            "tasks": crate::jobs::control::tasks(pool.fs())
        })))),
        Op::VolumeCreate { .. }
        | Op::VolumeList { .. }
        | Op::VolumeDelete { .. }
        | Op::VolumeResize { .. }
        | Op::VolumeSet { .. }
        | Op::VolumeImport { .. }
        | Op::VolumeExport { .. } => volume_op(pool, op),
        Op::VolumeSnapshot { .. } | Op::VolumeClone { .. } | Op::VolumeDiff { .. } => {
            snapshot_op(pool, op)
        }
    }
}

/// Snapshots, clones and the difference between volumes.
fn snapshot_op(pool: &Pool, op: &Op) -> Result<OpOutput> {
    use crate::util::size::human;
    Ok(match op {
        Op::VolumeSnapshot { src, name } => {
            pool.snapshot_volume(src, name)?;
            OpOutput::done(
                format!("created snapshot {name} of {src}\n"),
                serde_json::json!({ "snapshot": name, "source": src }),
            )
        }
        Op::VolumeClone { src, name } => {
            pool.clone_volume(src, name)?;
            OpOutput::done(
                format!("created clone {name} of {src}\n"),
                serde_json::json!({ "clone": name, "source": src }),
            )
        }
        Op::VolumeDiff { old, new, json: j } => {
            let d = pool.volume_diff(old, new)?;
            let total: u64 = d.iter().map(|r| r.1).sum();
            if *j {
                let changed: Vec<serde_json::Value> = d
                    .iter()
                    .map(|(o, l)| serde_json::json!({ "offset_bytes": o, "length_bytes": l }))
                    .collect();
                OpOutput::ok(json(&serde_json::json!({
                    "old": old, "new": new, "changed": changed, "changed_bytes": total
                })))
            } else {
                let mut t = String::from("offset         length\n");
                for (o, l) in &d {
                    t += &format!("{o:<14} {l}\n");
                }
                t += &format!("{} changed in {} ranges\n", human(total), d.len());
                OpOutput::ok(t)
            }
        }
        _ => unreachable!("not a snapshot op: {op:?}"),
    })
}

/// Scrub commands; online, start and resume return while the scrub runs.
fn scrub_op(pool: &Pool, op: &Op) -> Result<OpOutput> {
    use crate::jobs::scrub;
    Ok(match op {
        Op::ScrubStart { opts, json, wait } => {
            let run = scrub::start(pool.fs(), opts.clone())?;
            let s = if *wait { run.wait() } else { run.status(false) };
            scrub_output(&s, *json, *wait)
        }
        Op::ScrubResume { json, wait } => {
            let run = scrub::resume(pool.fs())?;
            let s = if *wait { run.wait() } else { run.status(false) };
            scrub_output(&s, *json, *wait)
        }
        Op::ScrubStatus {
            json,
            errors,
            final_exit,
        } => {
            let s = scrub::status(pool.fs(), *errors)?;
            scrub_output(&s, *json, *final_exit)
        }
        Op::ScrubCancel => {
            scrub::cancel(pool.fs())?;
            requested("scrub", "cancel")
        }
        Op::ScrubPause => {
            scrub::pause(pool.fs())?;
            requested("scrub", "pause")
        }
        _ => unreachable!("not a scrub op: {op:?}"),
    })
}

/// A signal stopped an offline command: stop the job it runs so that its
/// progress is saved and `resume` continues it (scrub is canceled, which
/// keeps its position; balance pauses; replace is interrupted).
pub fn interrupt(pool: &Pool) {
    let fs = pool.fs();
    let _ = crate::jobs::scrub::cancel(fs);
    let _ = crate::jobs::balance::pause(fs);
    let _ = crate::jobs::dev_replace::interrupt(fs);
}

/// Device membership, replace and error counters.
fn device_op(pool: &Pool, op: &Op) -> Result<OpOutput> {
    Ok(match op {
        Op::DeviceAdd { path } => {
            crate::jobs::devices::refuse_member(pool.fs(), path)?;
            let d = crate::device::FileDevice::open(path)?;
            let devid = crate::jobs::devices::add(pool.fs(), Arc::new(d))?;
            OpOutput::done(
                format!("added {} as devid {devid}\n", path.display()),
                serde_json::json!({ "added": path, "devid": devid }),
            )
        }
        Op::DeviceRemove { dev } => {
            let devid = crate::jobs::devices::resolve(pool.fs(), dev)?;
            crate::jobs::devices::remove(pool.fs(), devid)?;
            OpOutput::done(
                format!("removed devid {devid}\n"),
                serde_json::json!({ "removed_devid": devid }),
            )
        }
        Op::DeviceReplaceStart {
            src,
            new,
            json: j,
            wait,
        } => {
            let devid = crate::jobs::devices::resolve(pool.fs(), src)?;
            crate::jobs::devices::refuse_member(pool.fs(), new)?;
            let d = crate::device::FileDevice::open(new)?;
            let run = crate::jobs::dev_replace::start(pool.fs(), devid, Arc::new(d), *wait)?;
            let s = if *wait { run.wait() } else { run.status() };
            replace_output(Some(&s), *j)
        }
        Op::DeviceReplaceResume { json: j, wait } => {
            let run = crate::jobs::dev_replace::resume(pool.fs(), *wait)?;
            let s = if *wait { run.wait() } else { run.status() };
            replace_output(Some(&s), *j)
        }
        Op::DeviceReplaceStatus { json: j } => {
            replace_output(crate::jobs::dev_replace::status(pool.fs()).as_ref(), *j)
        }
        Op::DeviceReplaceCancel => {
            crate::jobs::dev_replace::cancel(pool.fs())?;
            requested("device replace", "cancel")
        }
        Op::DeviceStats { json: j, reset } => {
            let stats = pool.device_stats();
            if *reset {
                pool.reset_device_stats();
                pool.flush()?;
            }
            if *j {
                OpOutput::ok(json(&serde_json::json!({ "devices": stats })))
            } else {
                let mut s = String::new();
                for d in stats {
                    let p = &d.path;
                    s += &format!("[{p}].read_errs        {}\n", d.stats.read_errs);
                    s += &format!("[{p}].write_errs       {}\n", d.stats.write_errs);
                    s += &format!("[{p}].flush_errs       {}\n", d.stats.flush_errs);
                    s += &format!("[{p}].corruption_errs  {}\n", d.stats.corruption_errs);
                    s += &format!("[{p}].generation_errs  {}\n", d.stats.generation_errs);
                }
                OpOutput::ok(s)
            }
        }
        _ => unreachable!("not a device op: {op:?}"),
    })
}

/// Balance commands; online, start and resume return while the balance runs.
fn balance_op(pool: &Pool, op: &Op) -> Result<OpOutput> {
    Ok(match op {
        Op::BalanceStart {
            args,
            json: j,
            wait,
        } => {
            let run = crate::jobs::balance::start(pool.fs(), args.clone(), *wait)?;
            let s = if *wait {
                run.wait(pool.fs())
            } else {
                run.status(pool.fs())
            };
            balance_output(&s, *j)
        }
        Op::BalanceResume { json: j, wait } => {
            let run = crate::jobs::balance::resume(pool.fs(), *wait)?;
            let s = if *wait {
                run.wait(pool.fs())
            } else {
                run.status(pool.fs())
            };
            balance_output(&s, *j)
        }
        Op::BalanceStatus { json: j } => {
            balance_output(&crate::jobs::balance::status(pool.fs())?, *j)
        }
        Op::BalancePause => {
            crate::jobs::balance::pause(pool.fs())?;
            requested("balance", "pause")
        }
        Op::BalanceCancel => {
            crate::jobs::balance::cancel(pool.fs())?;
            requested("balance", "cancel")
        }
        _ => unreachable!("not a balance op: {op:?}"),
    })
}

/// Volume commands; each change is flushed before it is reported.
fn volume_op(pool: &Pool, op: &Op) -> Result<OpOutput> {
    use crate::util::size::human;
    Ok(match op {
        Op::VolumeCreate { name, size_bytes } => {
            pool.create_volume(name, *size_bytes)?;
            pool.flush()?;
            OpOutput::done(
                format!("created volume {name} ({})\n", human(*size_bytes)),
                serde_json::json!({ "created": name, "size_bytes": size_bytes }),
            )
        }
        Op::VolumeList { json: j } => {
            let vols = pool.list_volumes()?;
            if *j {
                OpOutput::ok(json(&serde_json::json!({ "volumes": vols })))
            } else {
                let mut s = String::from(
                    "name                 size        allocated   exclusive   flags\n",
                );
                for v in vols {
                    s += &format!(
                        "{:<20} {:<11} {:<11} {:<11} {}\n",
                        v.name,
                        human(v.size_bytes),
                        human(v.allocated_bytes),
                        human(v.exclusive_bytes),
                        if v.read_only { "ro" } else { "-" }
                    );
                }
                OpOutput::ok(s)
            }
        }
        Op::VolumeDelete { name } => {
            pool.delete_volume(name)?;
            pool.flush()?;
            OpOutput::done(
                format!("deleted volume {name}\n"),
                serde_json::json!({ "deleted": name }),
            )
        }
        Op::VolumeResize { name, size_bytes } => {
            pool.resize_volume(name, *size_bytes)?;
            pool.flush()?;
            OpOutput::done(
                format!("resized volume {name} to {}\n", human(*size_bytes)),
                serde_json::json!({ "resized": name, "size_bytes": size_bytes }),
            )
        }
        Op::VolumeSet { name, read_only } => {
            let Some(ro) = read_only else {
                return Err(Error::Invalid(format!(
                    "volume set {name}: nothing to set (--read-only true|false)"
                )));
            };
            pool.set_volume_read_only(name, *ro)?;
            pool.flush()?;
            let what = if *ro { "read-only" } else { "writable" };
            OpOutput::done(
                format!("volume {name} is {what}\n"),
                serde_json::json!({ "volume": name, "read_only": ro }),
            )
        }
        Op::VolumeImport { name, file } => {
            let n = import(pool, name, file)?;
            OpOutput::done(
                format!("imported {} into volume {name}\n", human(n)),
                serde_json::json!({ "imported": name, "file": file, "bytes": n }),
            )
        }
        Op::VolumeExport { name, file } => {
            let n = export(pool, name, file)?;
            OpOutput::done(
                format!("exported {} from volume {name}\n", human(n)),
                serde_json::json!({ "exported": name, "file": file, "bytes": n }),
            )
        }
        _ => unreachable!("not a volume op: {op:?}"),
    })
}

/// `usage` as JSON, or as the three text tables.
fn usage_output(pool: &Pool, j: bool) -> OpOutput {
    use crate::util::size::human;
    let u = pool.usage();
    if j {
        OpOutput::ok(json(&u))
    } else {
        let mut s = String::new();
        s += &format!(
            "Device size:     {:>12}\nDevice allocated:{:>12}\nDevice unallocated:{:>10}\nUsed:            {:>12}\nData ratio: {:.2}  Metadata ratio: {:.2}\n\n",
            human(u.device_size_bytes),
            human(u.allocated_bytes),
            human(u.unallocated_bytes),
            human(u.used_bytes),
            u.data_ratio,
            u.metadata_ratio
        );
        if u.data_worst_case_bytes > u.data_capacity_bytes {
            s += &format!(
                "Warning: thin volumes and snapshots can outgrow the pool: overwriting every writable volume while its snapshots keep the old data needs {} of data space, the pool has {}\n\n",
                human(u.data_worst_case_bytes),
                human(u.data_capacity_bytes)
            );
        }
        s += "devid  size        allocated   path\n";
        for d in &u.devices {
            s += &format!(
                "{:<6} {:<11} {:<11} {}\n",
                d.devid,
                human(d.size_bytes),
                human(d.allocated_bytes),
                d.path
            );
        }
        s += "\nblock group          type      profile  length      used\n";
        for b in &u.block_groups {
            s += &format!(
                "{:<20} {:<9} {:<8} {:<11} {}{}\n",
                format!("{:#x}", b.start),
                b.bg_type,
                b.profile,
                human(b.length),
                human(b.used_bytes),
                if b.ro { " (ro)" } else { "" }
            );
        }
        OpOutput::ok(s)
    }
}

fn io_err(file: &std::path::Path, what: &str, e: std::io::Error) -> Error {
    Error::Device {
        path: file.into(),
        msg: format!("{what}: {e}"),
    }
}

/// Copy a file's bytes into a volume; all-zero sectors stay unallocated.
pub fn import(pool: &Pool, name: &str, file: &std::path::Path) -> Result<u64> {
    let v = pool.volume(name)?;
    let mut f = File::open(file).map_err(|e| io_err(file, "cannot open", e))?;
    let len = f
        .metadata()
        .map_err(|e| io_err(file, "cannot stat", e))?
        .len();
    let size = v.size_bytes()?;
    if len > size {
        return Err(Error::Invalid(format!(
            "{} is {len} bytes, larger than volume {name} ({size} bytes)",
            file.display()
        )));
    }
    let task = crate::jobs::control::begin_task(pool.fs(), "import", name.into(), len);
    let mut buf = vec![0u8; COPY_UNIT_BYTES];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(COPY_UNIT_BYTES as u64) as usize;
        f.read_exact(&mut buf[..n])
            .map_err(|e| io_err(file, "read failed", e))?;
        v.write_at(&buf[..n], off)?;
        off += n as u64;
        task.advance(n as u64);
    }
    v.flush()?;
    Ok(len)
}

/// Copy a volume into a file (sparse where the volume has holes).
pub fn export(pool: &Pool, name: &str, file: &std::path::Path) -> Result<u64> {
    let v = pool.volume(name)?;
    let size = v.size_bytes()?;
    let mut f = File::create(file).map_err(|e| io_err(file, "cannot create", e))?;
    let task = crate::jobs::control::begin_task(pool.fs(), "export", name.into(), size);
    let mut buf = vec![0u8; COPY_UNIT_BYTES];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(COPY_UNIT_BYTES as u64) as usize;
        v.read_at(&mut buf[..n], off)?;
        if buf[..n].iter().all(|&b| b == 0) {
            use std::io::Seek;
            f.seek(std::io::SeekFrom::Current(n as i64))
                .map_err(|e| io_err(file, "seek failed", e))?;
        } else {
            f.write_all(&buf[..n])
                .map_err(|e| io_err(file, "write failed", e))?;
        }
        off += n as u64;
        task.advance(n as u64);
    }
    f.set_len(size)
        .map_err(|e| io_err(file, "cannot size", e))?;
    f.sync_all().map_err(|e| io_err(file, "sync failed", e))?;
    Ok(size)
}

/// Unix seconds as local RFC 3339 (`2026-12-01T06:10:00+01:00`), as an
/// operator reads them; UTC when the zone is unknown.
pub fn local_time(unix_s: u64) -> String {
    let Ok(ts) = jiff::Timestamp::from_second(unix_s.min(i64::MAX as u64) as i64) else {
        return format!("@{unix_s}");
    };
    let zoned = ts.to_zoned_datetime(jiff::tz::TimeZone::system());
    zoned.strftime("%Y-%m-%dT%H:%M:%S%:z").to_string()
}

/// A run's duration, rate and time left, as `status` prints them.
fn pace_text(p: &crate::jobs::control::Pace) -> String {
    if p.duration_s == 0.0 {
        return String::new(); // a run of an earlier process: not recorded
    }
    let mut t = format!(
        "Duration:         {:.1}s\nRate:             {}/s\n",
        p.duration_s,
        crate::util::size::human(p.rate_bytes_per_s)
    );
    if let Some(e) = p.eta_s {
        t += &format!("Time left:        {e}s\n");
    }
    t
}

/// Print a balance status; exit 1 when it stopped on a failure.
pub fn balance_output(s: &crate::jobs::balance::BalanceStatus, as_json: bool) -> OpOutput {
    let mut out = if as_json {
        OpOutput::ok(json(s))
    } else {
        let mut t = format!("Balance state:    {}\n", s.state.name());
        t += &format!(
            "Block groups:     {} of {} done, {} left\n",
            s.block_groups_done, s.block_groups_total, s.block_groups_left
        );
        if s.started_at > 0 {
            t += &format!("Started at:       {}\n", local_time(s.started_at));
        }
        t += &format!(
            "Relocated:        {}\n",
            crate::util::size::human(s.bytes_relocated)
        );
        t += &pace_text(&s.pace);
        if let Some(f) = &s.failure {
            t += &format!("Failure:          {f}\n");
        }
        OpOutput::ok(t)
    };
    if s.failure.is_some() && s.state == crate::jobs::balance::State::Interrupted {
        out.exit = 1;
    }
    out
}

/// Print a device replace status; exit 1 when it failed.
pub fn replace_output(
    s: Option<&crate::jobs::dev_replace::ReplaceStatus>,
    as_json: bool,
) -> OpOutput {
    let Some(s) = s else {
        return if as_json {
            OpOutput::ok(json(&serde_json::json!({ "state": "never" })))
        } else {
            OpOutput::ok("Replace state:    never\n".into())
        };
    };
    let mut out = if as_json {
        OpOutput::ok(json(s))
    } else {
        let mut t = format!(
            "Replace state:    {} (devid {} -> devid {} {})\n",
            s.state.name(),
            s.src_devid,
            s.target_devid,
            s.target_path
        );
        if s.started_at > 0 {
            t += &format!("Started at:       {}\n", local_time(s.started_at));
        }
        t += &format!(
            "Block groups:     {} of {} copied, {}\n",
            s.block_groups_done,
            s.block_groups_total,
            crate::util::size::human(s.bytes_copied),
        );
        t += &pace_text(&s.pace);
        if s.target_left {
            t += &format!(
                "New device:       left the pool again; {} can be used anew\n",
                s.target_path
            );
        }
        if s.uncorrectable_errors > 0 {
            t += &format!(
                "Uncorrectable:    {} sectors with no good copy (copied as they were; reads of them fail)\n",
                s.uncorrectable_errors
            );
        }
        for e in &s.errors {
            t += &format!(
                "  logical {:#x}: {} on devid {} physical {:#x}{}\n",
                e.logical,
                e.kind,
                e.devid,
                e.physical,
                match e.owners_text() {
                    t if t.is_empty() => t,
                    t => format!(",{t}"),
                }
            );
        }
        if let Some(f) = &s.failure {
            t += &format!("Failure:          {f}\n");
        }
        OpOutput::ok(t)
    };
    match s.state {
        crate::jobs::dev_replace::State::Failed => out.exit = 1,
        // As scrub: finished, but data was lost.
        crate::jobs::dev_replace::State::Finished if s.uncorrectable_errors > 0 => out.exit = 3,
        _ => {}
    }
    out
}

/// Print a scrub status; exit 3 when a finished scrub left uncorrectable errors.
pub fn scrub_output(
    s: &crate::jobs::scrub::ScrubStatus,
    as_json: bool,
    final_status: bool,
) -> OpOutput {
    use crate::util::size::human;
    let mut out = if as_json {
        OpOutput::ok(json(s))
    } else {
        let c = &s.counters;
        let mut t = String::new();
        t += &format!(
            "Scrub state:      {}{}\n",
            s.state.name(),
            if s.readonly { " (read-only)" } else { "" }
        );
        if s.started_at > 0 {
            t += &format!("Started at:       {}\n", local_time(s.started_at));
        }
        t += &format!(
            "Duration:         {:.1}s (paused time excluded)\n",
            s.duration_s
        );
        if let Some(e) = s.eta_s {
            t += &format!("Time left:        {e}s\n");
        }
        let pct = if s.bytes_total > 0 {
            100.0 * c.bytes_scrubbed as f64 / s.bytes_total as f64
        } else {
            100.0
        };
        t += &format!("Total to scrub:   {}\n", human(s.bytes_total));
        t += &format!(
            "Bytes scrubbed:   {} ({pct:.1}%)  data {} tree {}\n",
            human(c.bytes_scrubbed),
            human(c.data_bytes_scrubbed),
            human(c.tree_bytes_scrubbed)
        );
        if s.state == crate::jobs::scrub::State::Finished && c.bytes_scrubbed < s.bytes_total {
            t += &format!(
                "Not scrubbed:     {} (freed or moved while the scrub ran)\n",
                human(s.bytes_total - c.bytes_scrubbed)
            );
        }
        if !s.departed_devids.is_empty() {
            t += &format!(
                "Not counted:      devid {:?} (left the pool after it was scrubbed)\n",
                s.departed_devids
            );
        }
        t += &format!("Rate:             {}/s\n", human(s.rate_bytes_per_s));
        t += &format!(
            "Error summary:    read={} super={} verify={} csum={}\n  Corrected:      {}\n  Uncorrectable:  {}\n  Unverified:     {}\n",
            c.read_errors, c.super_errors, c.verify_errors, c.csum_errors, c.corrected_errors, c.uncorrectable_errors, c.unverified_errors
        );
        t += &format!(
            "No-csum sectors:  {}\nGroups skipped (removed meanwhile): {}\n",
            c.no_csum_sectors, c.block_groups_skipped_removed
        );
        if let Some(f) = &s.failure {
            t += &format!("Failure:          {f}\n");
        }
        if let Some(errs) = &s.errors {
            for e in errs {
                t += &format!(
                    "  {} devid {} physical {:#x} logical {:#x}{} {} bytes{}\n",
                    e.kind,
                    e.devid,
                    e.physical,
                    e.logical,
                    e.owners_text(),
                    e.length_bytes,
                    if e.repaired { " repaired" } else { "" }
                );
            }
        }
        OpOutput::ok(t)
    };
    if final_status && s.counters.uncorrectable_errors > 0 {
        out.exit = 3;
    }
    if final_status && s.failure.is_some() {
        out.exit = 1;
    }
    out
}
