//! Two flags the ingress keeps and readiness reports: the relay is stopping, and the store
//! took (or failed) the last write asked of it (readiness probes it again after a failure).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::clock::now_ms;

/// The least time between two readiness probes of the store.
const PROBE_EVERY_MS: u64 = 1_000;

/// Whether the relay is stopping, and whether the store took the last write asked of it.
#[derive(Debug)]
pub struct Health {
    stopping: AtomicBool,
    store_ok: AtomicBool,
    /// When readiness last probed the store (ms).
    probed_ms: AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            stopping: AtomicBool::new(false),
            store_ok: AtomicBool::new(true),
            probed_ms: AtomicU64::new(0),
        }
    }
}

impl Health {
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub fn set_store_healthy(&self, ok: bool) {
        self.store_ok.store(ok, Ordering::Relaxed);
    }

    /// Whether readiness may probe the store now (at most once a second: `/readyz` needs no
    /// token, and a probe is a durable write); takes the turn if so.
    pub fn probe_turn(&self) -> bool {
        let now = now_ms();
        let last = self.probed_ms.load(Ordering::Relaxed);
        now.saturating_sub(last) >= PROBE_EVERY_MS
            && self
                .probed_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// Whether the last write the ingress asked of the store succeeded (or, since it failed,
    /// a probe by readiness).
    pub fn store_healthy(&self) -> bool {
        self.store_ok.load(Ordering::Relaxed)
    }
}
