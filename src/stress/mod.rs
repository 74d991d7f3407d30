//! The stress harness (`chunkvol stress`): chunkvol's own btrfs/071.
//! - normal: every actor at once on one pool ([`storm`]);
//! - fault: the same storm with bit rot and I/O errors injected into one
//!   device; redundancy must serve every byte and the errors are counted;
//! - crash: power cuts at random points, then durability checks ([`crash`]).
//!
//! Every run prints its seed. A seed fixes each actor's sequence of
//! operations (and the crash campaign completely); thread interleavings of
//! the storm vary from run to run, which is the point of running it long.

pub mod crash;
mod crash_snaps;
pub mod model;
mod snapshots;
pub mod storm;

use std::time::{Duration, Instant};

use crate::format::Profile;

/// Which harness to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Normal,
    Fault,
    Crash,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode, String> {
        match s {
            "normal" => Ok(Mode::Normal),
            "fault" => Ok(Mode::Fault),
            "crash" => Ok(Mode::Crash),
            _ => Err(format!("unknown stress mode '{s}' (normal, fault, crash)")),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Mode::Normal => "normal",
            Mode::Fault => "fault",
            Mode::Crash => "crash",
        }
    }
}

/// Knobs of one run.
#[derive(Debug, Clone)]
pub struct StressOptions {
    pub mode: Mode,
    pub duration: Duration,
    pub seed: u64,
    pub profile: Profile,
    pub devices: usize,
    pub writers: usize,
    pub readers: usize,
    pub volumes: usize,
    pub device_bytes: u64,
    pub volume_bytes: u64,
    /// Crash mode: power cuts to run (instead of a duration).
    pub crash_points: u64,
    /// Every failpoint sleeps up to this long (or yields) by a seeded
    /// choice, widening the windows between lifecycle steps (0: off).
    pub chaos_us: u64,
}

impl StressOptions {
    /// Defaults for a profile: enough devices for it, plus one so that a
    /// device replace always has somewhere to go.
    pub fn for_profile(profile: Profile, mode: Mode, seed: u64, duration: Duration) -> Self {
        let devices = match profile {
            Profile::Single | Profile::Dup => 3,
            Profile::Raid1 => 3,
            Profile::Raid1c3 => 4,
            Profile::Raid10 => 5,
        };
        StressOptions {
            mode,
            duration,
            seed,
            profile,
            devices,
            writers: 3,
            readers: 2,
            volumes: 2,
            device_bytes: 128 << 20,
            volume_bytes: 16 << 20,
            crash_points: 500,
            chaos_us: 500,
        }
    }

    /// Check the knobs before anything runs.
    pub fn validate(&self) -> Result<(), String> {
        if self.devices < self.profile.min_devices() {
            return Err(format!(
                "profile {} needs {} devices, --devices is {}",
                self.profile.name(),
                self.profile.min_devices(),
                self.devices
            ));
        }
        if self.mode == Mode::Fault && self.profile.copies() < 2 {
            return Err(format!(
                "fault mode needs a redundant profile, not {}",
                self.profile.name()
            ));
        }
        if self.mode == Mode::Fault && self.profile == Profile::Dup {
            return Err("fault mode injects into one device; dup keeps both copies on one".into());
        }
        if self.volume_bytes < 1 << 20 || !self.volume_bytes.is_multiple_of(4096) {
            return Err("--volume-size must be a multiple of 4096 of at least 1M".into());
        }
        if self.device_bytes < 32 << 20 {
            return Err("--device-size must be at least 32M".into());
        }
        if self.writers == 0 || self.volumes == 0 {
            return Err("--writers and --volumes must be at least 1".into());
        }
        Ok(())
    }
}

/// What a successful run did.
#[derive(Debug, Clone, Default)]
pub struct StressReport {
    pub seconds: f64,
    pub lines: Vec<String>,
}

/// Run the harness; an error carries the seed that reproduces it.
pub fn run(opts: &StressOptions) -> Result<StressReport, String> {
    opts.validate()?;
    match opts.mode {
        Mode::Normal | Mode::Fault => storm::run(opts),
        Mode::Crash => {
            let t = Instant::now();
            let s = crash::campaign(opts.profile, opts.seed, opts.crash_points)?;
            Ok(StressReport {
                seconds: t.elapsed().as_secs_f64(),
                lines: vec![
                    format!(
                        "{} crash points, {} operations, {} relocations, {} power cuts inside a commit",
                        s.points, s.ops, s.relocations, s.cut_in_commit
                    ),
                    format!(
                        "snapshots {} clones {} deletes {} (some cut in their commit)",
                        s.snapshots, s.clones, s.deletes
                    ),
                ],
            })
        }
    }
}
