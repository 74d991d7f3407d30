//! Progress bars for commands that wait for a long operation (scrub,
//! balance, replace, remove, import, export), online and offline. A thread
//! polls the operation's status through the same requests `status` uses, so
//! rate and time left are the engine's (paused time excluded), and draws an
//! `indicatif` bar on stderr. Nothing is drawn unless stderr is a terminal.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::service::ops::{Op, OpOutput};
use crate::util::size::human;

/// How often the status is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How often the status is polled until the operation is seen.
const QUICK_POLL: Duration = Duration::from_millis(20);
/// How often the bar is redrawn.
const TICK: Duration = Duration::from_millis(100);

/// Which operation a bar follows.
#[derive(Debug, Clone)]
pub enum Watch {
    Scrub,
    Balance,
    Replace,
    /// A tracked operation of a kind (`remove`, `import`, `export`) and,
    /// when known, its subject (the volume), so that another client's
    /// operation of the same kind is not taken for this one.
    Task(&'static str, Option<String>),
}

/// Sends a request where the operation runs: the server, or the pool
/// opened by this process.
pub type Poll = Box<dyn Fn(&Op) -> Option<OpOutput> + Send + Sync>;

/// One look at the operation.
#[derive(Debug, Clone, PartialEq)]
struct Snapshot {
    done: u64,
    total: u64,
    /// Units are block groups (balance, replace) instead of bytes.
    groups: bool,
    /// `running`, `paused`, or how it ended.
    state: String,
    rate_bytes_per_s: u64,
    eta_s: Option<u64>,
}

impl Watch {
    fn request(&self) -> Op {
        match self {
            Watch::Scrub => Op::ScrubStatus {
                json: true,
                errors: false,
                final_exit: false,
            },
            Watch::Balance => Op::BalanceStatus { json: true },
            Watch::Replace => Op::DeviceReplaceStatus { json: true },
            Watch::Task(..) => Op::Progress,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Watch::Scrub => "scrub",
            Watch::Balance => "balance",
            Watch::Replace => "replace",
            Watch::Task(k, _) => k,
        }
    }

    /// Read a status reply; None when it says nothing about the operation.
    fn parse(&self, out: &OpOutput) -> Option<Snapshot> {
        let v: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
        let v = match self {
            Watch::Task(kind, subject) => v["tasks"]
                .as_array()?
                .iter()
                .find(|t| {
                    t["kind"] == *kind && subject.as_ref().is_none_or(|s| t["subject"] == **s)
                })?
                .clone(),
            _ => v,
        };
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        let state = v["state"].as_str().unwrap_or("running");
        let (done, total, groups) = match self {
            Watch::Scrub => (n("bytes_scrubbed"), n("bytes_total"), false),
            Watch::Balance | Watch::Replace => {
                (n("block_groups_done"), n("block_groups_total"), true)
            }
            Watch::Task(..) => (n("done_bytes"), n("total_bytes"), false),
        };
        Some(Snapshot {
            done,
            total,
            groups,
            state: state.to_string(),
            rate_bytes_per_s: n("rate_bytes_per_s"),
            eta_s: v["eta_s"].as_u64(),
        })
    }
}

impl Snapshot {
    fn active(&self) -> bool {
        self.state == "running" || self.state == "paused"
    }

    /// Rate and time left (the amounts come from the bar's own state, so
    /// a frame never shows a percentage and an amount of two snapshots).
    fn message(&self) -> String {
        let rate = human(self.rate_bytes_per_s);
        match (self.state.as_str(), self.eta_s) {
            ("running", Some(e)) => format!("{rate}/s eta {e}s"),
            ("running", None) => format!("{rate}/s eta -"),
            (state, _) => format!("{rate}/s {state}"),
        }
    }
}

/// A bar being drawn; [`finish`](Self::finish) it when the command returns.
pub struct Bar {
    bar: ProgressBar,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Option<Snapshot>>,
    watch: Watch,
    poll: Arc<Poll>,
    started: std::time::Instant,
}

/// Start drawing, when stderr is a terminal.
pub fn start(watch: Watch, poll: Poll) -> Option<Bar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let amounts = match &watch {
        Watch::Balance | Watch::Replace => "{pos}/{len} groups",
        _ => "{binary_bytes}/{binary_total_bytes}",
    };
    let template = format!("{{prefix}} [{{bar:20}}] {{percent:>3}}% {amounts} {{msg}}");
    let style = ProgressStyle::with_template(&template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    // Hidden until the first snapshot, so no frame shows an empty length.
    let bar = ProgressBar::with_draw_target(Some(1), ProgressDrawTarget::hidden())
        .with_style(style)
        .with_prefix(watch.label());
    let stop = Arc::new(AtomicBool::new(false));
    let poll = Arc::new(poll);
    let thread = {
        let (bar, stop, poll, watch) = (bar.clone(), stop.clone(), poll.clone(), watch.clone());
        std::thread::spawn(move || {
            let started = std::time::Instant::now();
            let mut last = None;
            // A job's status shows the last run until this one starts.
            let mut seen_running = false;
            while !stop.load(Ordering::Acquire) {
                if let Some(s) = poll(&watch.request()).and_then(|o| watch.parse(&o)) {
                    seen_running |= s.active();
                    if seen_running {
                        draw(&bar, &s);
                        last = Some(s);
                    }
                }
                // Quick looks first, so that a short operation still shows.
                let quick = !seen_running && started.elapsed() < Duration::from_secs(2);
                std::thread::sleep(if quick { QUICK_POLL } else { POLL_INTERVAL });
            }
            last
        })
    };
    Some(Bar {
        bar,
        stop,
        thread,
        watch,
        poll,
        started: std::time::Instant::now(),
    })
}

/// Update the bar, which the steady tick draws.
fn draw(bar: &ProgressBar, s: &Snapshot) {
    bar.set_length(s.total.max(1));
    bar.set_position(s.done.min(s.total));
    bar.set_message(s.message());
    if bar.is_hidden() {
        bar.set_draw_target(ProgressDrawTarget::stderr());
        bar.enable_steady_tick(TICK);
    }
}

impl Bar {
    /// Stop polling and leave the final state on screen: the job's own
    /// final status, or for a tracked operation, complete when `ok`.
    pub fn finish(self, ok: bool) {
        self.stop.store(true, Ordering::Release);
        let last = self.thread.join().ok().flatten();
        let end = match &self.watch {
            Watch::Task(..) => last.map(|mut s| {
                if !ok {
                    s.state = "failed".into();
                } else {
                    // The operation is gone from the list: its end is ours.
                    let secs = self.started.elapsed().as_secs_f64();
                    s = Snapshot {
                        done: s.total,
                        rate_bytes_per_s: (s.total as f64 / secs.max(1e-3)) as u64,
                        state: "done".into(),
                        ..s
                    };
                }
                s
            }),
            _ => (self.poll)(&self.watch.request()).and_then(|o| self.watch.parse(&o)),
        };
        if let Some(s) = end {
            draw(&self.bar, &s);
        }
        let drawn = !self.bar.is_hidden();
        self.bar.abandon();
        if drawn {
            eprintln!(); // the command's output starts on a line of its own
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrub_status_reads_as_bytes_with_rate_and_eta() {
        let out = OpOutput {
            stdout: r#"{"state":"running","bytes_scrubbed":1048576,"bytes_total":4194304,
                "rate_bytes_per_s":2097152,"eta_s":2}"#
                .into(),
            ..Default::default()
        };
        let s = Watch::Scrub.parse(&out).unwrap();
        assert_eq!((s.done, s.total, s.active()), (1 << 20, 4 << 20, true));
        assert_eq!(s.message(), "2.00MiB/s eta 2s");
    }

    #[test]
    fn a_task_is_found_by_kind_and_a_pause_shows() {
        let out = OpOutput {
            stdout: r#"{"tasks":[{"kind":"export","done_bytes":1,"total_bytes":2},
                {"kind":"import","done_bytes":3,"total_bytes":8,"rate_bytes_per_s":1,"eta_s":5}]}"#
                .into(),
            ..Default::default()
        };
        let s = Watch::Task("import", None).parse(&out).unwrap();
        assert_eq!((s.done, s.total, s.eta_s), (3, 8, Some(5)));
        assert!(Watch::Task("remove", None).parse(&out).is_none());
        let other = Watch::Task("import", Some("w".into()));
        assert!(other.parse(&out).is_none(), "another volume's import");
        let b = OpOutput {
            stdout: r#"{"state":"paused","block_groups_done":2,"block_groups_total":5}"#.into(),
            ..Default::default()
        };
        let s = Watch::Balance.parse(&b).unwrap();
        assert_eq!(s.message(), "0B/s paused");
    }
}
