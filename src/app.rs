//! What the running relay shares between its parts: the config in force, the store, the
//! metrics, and whether it is stopping.
//!
//! The config is swapped whole on reload; a request keeps the `Arc<Config>` it started with.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::config::{self, Config, ConfigErrors};
use crate::destinations::Statuses;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::web::client::HttpClient;

pub struct App {
    config: RwLock<Arc<Config>>,
    /// Bumped on every reload, so long-lived parts (delivery) can pick up new destinations.
    generation: watch::Sender<u64>,
    pub store: Arc<dyn Store>,
    pub metrics: Metrics,
    /// The outbound client: deliveries and reply routes share its connection pool.
    pub client: HttpClient,
    /// Live figures per destination (in flight, failures), reported by delivery.
    pub statuses: Statuses,
    stopping: AtomicBool,
    /// False after the store failed a write, until one succeeds again.
    store_healthy: AtomicBool,
}

impl App {
    pub fn new(config: Config, store: Arc<dyn Store>) -> Result<Arc<Self>, rustls::Error> {
        let client = HttpClient::new()?;
        let metrics = Metrics::new();
        for d in &config.destinations {
            metrics.announce_destination(&d.name);
        }
        Ok(Arc::new(App {
            config: RwLock::new(Arc::new(config)),
            generation: watch::channel(0).0,
            store,
            metrics,
            client,
            statuses: Statuses::default(),
            stopping: AtomicBool::new(false),
            store_healthy: AtomicBool::new(true),
        }))
    }

    /// The config in force now.
    pub fn config(&self) -> Arc<Config> {
        self.config.read().unwrap().clone()
    }

    /// Puts `config` in force for every request that starts from now on.
    pub fn swap_config(&self, config: Config) {
        for d in &config.destinations {
            self.metrics.announce_destination(&d.name);
        }
        *self.config.write().unwrap() = Arc::new(config);
        self.generation.send_modify(|g| *g += 1);
    }

    /// Re-reads the config file; on success swaps it in and returns the routing table.
    /// On any problem the config in force stays.
    pub fn reload(&self) -> Result<String, ConfigErrors> {
        let path = self.config().file.clone();
        let new = config::load(&path)?;
        let table = config::routing_table(&new);
        self.swap_config(new);
        Ok(table)
    }

    /// Changes whenever the config is swapped.
    pub fn config_changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    pub fn set_store_healthy(&self, ok: bool) {
        self.store_healthy.store(ok, Ordering::Relaxed);
    }

    /// Whether the last write the ingress asked of the store succeeded.
    pub fn store_healthy(&self) -> bool {
        self.store_healthy.load(Ordering::Relaxed)
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}
