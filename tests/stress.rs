//! The stress harness in the suite, through the real `chunkvol stress`
//! binary: every profile in normal mode (every actor at once), the
//! redundant profiles in fault mode (bit rot, read and write errors, a
//! device that vanishes and is replaced), all with a bounded duration.
//! Crash mode runs in tests/crash.rs.
//!
//! CHUNKVOL_STRESS_SECS sets the duration per profile (default 60);
//! CHUNKVOL_STRESS_SEED sets the seed (default: a fixed seed per test, so
//! the suite replays the same operation sequences while thread interleavings
//! still vary; `random` takes one from the clock). A failure prints the seed
//! and the command that replays it.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_chunkvol");

fn secs() -> String {
    std::env::var("CHUNKVOL_STRESS_SECS").unwrap_or_else(|_| "60".into())
}

fn seed(mode: &str, profile: &str) -> String {
    match std::env::var("CHUNKVOL_STRESS_SEED").as_deref() {
        Ok("random") => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            (t.as_nanos() as u64 % 1_000_000_007).to_string()
        }
        Ok(s) => s.to_string(),
        // Fixed per test: mode and profile name bytes.
        Err(_) => format!("{mode}{profile}")
            .bytes()
            .fold(1469598103934665603u64, |h, b| {
                (h ^ b as u64).wrapping_mul(1099511628211)
            })
            .to_string(),
    }
}

fn stress(mode: &str, profile: &str) -> String {
    let seed = seed(mode, profile);
    let out = Command::new(BIN)
        .args([
            "stress",
            "--mode",
            mode,
            "--profile",
            profile,
            "--duration",
            &secs(),
            "--seed",
            &seed,
        ])
        .env("CHUNKVOL_LOG", "error")
        .output()
        .expect("run chunkvol stress");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success() && text.contains("  ok in "),
        "chunkvol stress --mode {mode} --profile {profile} --seed {seed} failed:\n{text}"
    );
    text
}

fn counter(text: &str, name: &str) -> u64 {
    let i = text
        .find(&format!("{name} "))
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"));
    text[i + name.len() + 1..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("bad {name} in:\n{text}"))
}

/// Every actor really ran: a storm where, say, balance never relocated
/// anything would prove nothing.
fn assert_busy(text: &str, replaces: bool) {
    for c in [
        "writes",
        "reads-verified",
        "trims",
        "flushes",
        "scrubs",
        "balances",
        "snapshots",
        "clones",
        "deletes",
        "diffs",
    ] {
        assert!(counter(text, c) > 0, "{c} never ran:\n{text}");
    }
    assert!(
        counter(text, "relocated") > 0,
        "balance relocated nothing:\n{text}"
    );
    if replaces {
        assert!(
            counter(text, "replaces") > 0,
            "no replace finished:\n{text}"
        );
    }
}

#[test]
fn normal_single() {
    assert_busy(&stress("normal", "single"), true);
}
#[test]
fn normal_dup() {
    assert_busy(&stress("normal", "dup"), true);
}
#[test]
fn normal_raid1() {
    assert_busy(&stress("normal", "raid1"), true);
}
#[test]
fn normal_raid1c3() {
    assert_busy(&stress("normal", "raid1c3"), true);
}
#[test]
fn normal_raid10() {
    assert_busy(&stress("normal", "raid10"), true);
}

/// Fault mode checks inside the run that every error was counted against
/// the faulty device only, that no byte was lost, and that scrubs after
/// healing correct everything; here, that the faults were injected and
/// counted.
fn fault(profile: &str) {
    let t = stress("fault", profile);
    assert_busy(&t, true);
    assert!(counter(&t, "injected") > 0, "{t}");
    for c in ["read_errs", "corruption_errs"] {
        assert!(counter(&t, c) > 0, "{c} not counted:\n{t}");
    }
}

#[test]
fn fault_raid1() {
    fault("raid1");
}
#[test]
fn fault_raid1c3() {
    fault("raid1c3");
}
#[test]
fn fault_raid10() {
    fault("raid10");
}
