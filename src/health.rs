//! Two flags the ingress keeps and readiness reports: the relay is stopping, and the store
//! took (or failed) the last write asked of it (readiness probes it again after a failure).

use std::sync::atomic::{AtomicBool, Ordering};

/// Whether the relay is stopping, and whether the store took the last write asked of it.
#[derive(Debug)]
pub struct Health {
    stopping: AtomicBool,
    store_ok: AtomicBool,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            stopping: AtomicBool::new(false),
            store_ok: AtomicBool::new(true),
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

    /// Whether the last write the ingress asked of the store succeeded (or, since it failed,
    /// a probe by readiness).
    pub fn store_healthy(&self) -> bool {
        self.store_ok.load(Ordering::Relaxed)
    }
}
