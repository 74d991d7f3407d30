//! Failpoints: named places where a test can pause a thread to force an
//! interleaving. Compiled to nothing unless the `failpoints` feature is on.

#[cfg(feature = "failpoints")]
mod imp {
    use std::collections::HashMap;
    use std::sync::{Condvar, Mutex, OnceLock};

    /// What a failpoint does when reached.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Action {
        /// Block until the test calls [`release`].
        Pause,
        /// Return an error from the enclosing function (where supported).
        Off,
    }

    #[derive(Default)]
    struct Registry {
        actions: HashMap<String, Action>,
        /// How many threads reached each point.
        hits: HashMap<String, u64>,
    }

    fn reg() -> &'static (Mutex<Registry>, Condvar) {
        static R: OnceLock<(Mutex<Registry>, Condvar)> = OnceLock::new();
        R.get_or_init(Default::default)
    }

    /// Arm a failpoint.
    pub fn set(name: &str, a: Action) {
        let (m, _) = reg();
        m.lock().unwrap().actions.insert(name.into(), a);
    }

    /// Disarm and wake anyone paused there.
    pub fn release(name: &str) {
        let (m, c) = reg();
        m.lock().unwrap().actions.remove(name);
        c.notify_all();
    }

    /// Times `name` was reached.
    pub fn hits(name: &str) -> u64 {
        reg().0.lock().unwrap().hits.get(name).copied().unwrap_or(0)
    }

    /// Wait until `name` has been reached `n` times (for tests).
    pub fn wait_hits(name: &str, n: u64) {
        let (m, c) = reg();
        let mut g = m.lock().unwrap();
        while g.hits.get(name).copied().unwrap_or(0) < n {
            g = c
                .wait_timeout(g, std::time::Duration::from_millis(20))
                .unwrap()
                .0;
        }
    }

    /// Called at the failpoint.
    pub fn hit(name: &str) {
        let (m, c) = reg();
        let mut g = m.lock().unwrap();
        *g.hits.entry(name.into()).or_insert(0) += 1;
        c.notify_all();
        while g.actions.get(name) == Some(&Action::Pause) {
            g = c.wait(g).unwrap();
        }
    }
}

#[cfg(feature = "failpoints")]
pub use imp::*;

/// Mark a failpoint.
#[macro_export]
macro_rules! failpoint {
    ($name:expr) => {
        #[cfg(feature = "failpoints")]
        $crate::failpoint::hit($name);
    };
}
