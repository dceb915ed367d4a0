//! The config in force, shared by every stage: swapped whole on reload (a request keeps the
//! `Arc<Config>` it started with), with a generation counter that long-lived parts
//! (delivery) watch to pick up new destinations.

use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use super::Config;

pub struct Live {
    current: RwLock<Arc<Config>>,
    /// Bumped on every swap.
    generation: watch::Sender<u64>,
}

impl Live {
    pub fn new(config: Config) -> Self {
        Live {
            current: RwLock::new(Arc::new(config)),
            generation: watch::channel(0).0,
        }
    }

    /// The config in force now.
    pub fn get(&self) -> Arc<Config> {
        self.current.read().unwrap().clone()
    }

    /// Puts `config` in force for everything that starts from now on.
    pub fn swap(&self, config: Config) {
        *self.current.write().unwrap() = Arc::new(config);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Changes whenever the config is swapped.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }
}
