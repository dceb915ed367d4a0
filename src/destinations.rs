//! What the delivery side knows of each destination right now, for the admin API and the
//! console: requests in flight, consecutive failed attempts and the last error. Written by
//! the schedulers, read by the admin listener; kept in memory only (a restart starts at
//! zero, while pauses, which are the operator's decision, live in the store).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

/// One destination's live figures.
#[derive(Debug, Default)]
pub struct DestinationStatus {
    in_flight: AtomicU64,
    consecutive_failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl DestinationStatus {
    pub fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn finished(&self) {
        let _ = self
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
    }

    /// An attempt succeeded (`None`) or failed with `error`.
    pub fn outcome(&self, error: Option<&str>) {
        match error {
            None => self.consecutive_failures.store(0, Ordering::Relaxed),
            Some(_) => {
                self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        *self.last_error.lock().unwrap() = error.map(str::to_string);
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn consecutive_failures(&self) -> u64 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap().clone()
    }
}

/// Every destination's status, by name.
#[derive(Debug, Default)]
pub struct Statuses(RwLock<HashMap<String, Arc<DestinationStatus>>>);

impl Statuses {
    pub fn of(&self, name: &str) -> Arc<DestinationStatus> {
        if let Some(s) = self.0.read().unwrap().get(name) {
            return s.clone();
        }
        self.0
            .write()
            .unwrap()
            .entry(name.to_string())
            .or_default()
            .clone()
    }
}
