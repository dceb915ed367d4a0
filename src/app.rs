//! What the running relay shares between its parts: the config in force and the store.
//!
//! The config is swapped whole on reload; a request keeps the `Arc<Config>` it started with.

use std::sync::{Arc, RwLock};

use crate::config::Config;
use crate::store::Store;

pub struct App {
    config: RwLock<Arc<Config>>,
    pub store: Arc<dyn Store>,
}

impl App {
    pub fn new(config: Config, store: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(App {
            config: RwLock::new(Arc::new(config)),
            store,
        })
    }

    /// The config in force now.
    pub fn config(&self) -> Arc<Config> {
        self.config.read().unwrap().clone()
    }

    /// Puts `config` in force for every request that starts from now on.
    pub fn swap_config(&self, config: Config) {
        *self.config.write().unwrap() = Arc::new(config);
    }
}
