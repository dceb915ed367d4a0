//! The composition root: what the running relay is made of. Each stage is handed only the
//! parts it uses ([`App::ingress`], [`App::delivery`]); the admin listener, the operator's
//! view of everything, gets the whole.

use std::sync::Arc;

use tokio::sync::watch;

use crate::config::{self, Config, ConfigErrors, Live};
use crate::destinations::Statuses;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::web::client::HttpClient;

pub struct App {
    pub live: Arc<Live>,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    /// The outbound client: deliveries and reply routes share its connection pool.
    pub client: HttpClient,
    /// Live figures per destination (in flight, failures, breaker), reported by delivery.
    pub statuses: Arc<Statuses>,
    pub health: Arc<Health>,
    /// The room request bodies may take in memory at once.
    pub bodies: Arc<crate::ingress::body_memory::BodyMemory>,
    reloading: std::sync::Mutex<()>,
    replies: Arc<crate::ingress::ReplyCalls>,
    /// Work that goes on when its request is gone (a reply route's call, a replay of a
    /// whole destination): the shutdown waits for it, within `shutdown_grace`, before the
    /// store closes under it.
    pub background: tokio_util::task::TaskTracker,
}

impl App {
    pub fn new(config: Config, store: Arc<dyn Store>) -> Result<Arc<Self>, rustls::Error> {
        let client = HttpClient::new()?;
        let metrics = Metrics::new();
        for d in &config.destinations {
            metrics.announce_destination(&d.name);
        }
        Ok(Arc::new(App {
            live: Arc::new(Live::new(config)),
            store,
            metrics: Arc::new(metrics),
            client,
            statuses: Arc::default(),
            health: Arc::default(),
            bodies: Arc::default(),
            reloading: std::sync::Mutex::default(),
            replies: Arc::default(),
            background: tokio_util::task::TaskTracker::new(),
        }))
    }

    /// What the ingress uses.
    pub fn ingress(&self) -> crate::ingress::Deps {
        crate::ingress::Deps {
            live: self.live.clone(),
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            client: self.client.clone(),
            health: self.health.clone(),
            statuses: self.statuses.clone(),
            bodies: self.bodies.clone(),
            replies: self.replies.clone(),
            background: self.background.clone(),
        }
    }

    /// What delivery uses.
    pub fn delivery(&self) -> crate::delivery::Deps {
        crate::delivery::Deps {
            live: self.live.clone(),
            store: self.store.clone(),
            metrics: self.metrics.clone(),
            client: self.client.clone(),
            statuses: self.statuses.clone(),
        }
    }

    /// The config in force now.
    pub fn config(&self) -> Arc<Config> {
        self.live.get()
    }

    /// Puts `config` in force for every request that starts from now on.
    pub fn swap_config(&self, config: Config) {
        self.live.swap(config);
        // After the swap: a scrape between the two, reading the old config, would take a
        // new destination's zero series out again. A breaker the config turns off is
        // closed now: the API and the gauge would say `open` until an attempt next passed it.
        let now = crate::clock::now_ms();
        for d in &self.config().destinations {
            self.metrics.announce_destination(&d.name);
            let status = self.statuses.of(&d.name);
            // A quiet asked for (Retry-After) lasts no longer than the new `max_delay`.
            let longest = crate::delivery::retry::longest_delay(&d.retry).as_millis() as u64;
            status.quiet_at_most(now.saturating_add(longest));
            if status.set_breaker_on(d.breaker.failures > 0) {
                tracing::info!(destination = %d.name, "breaker closed: the config turns it off (failures = 0)");
            }
        }
    }

    /// Re-reads the config file; on success swaps it in and returns the routing table.
    /// On any problem, or a change that takes a restart, the config in force stays.
    /// One reload at a time: two at once cannot leave the older file in force.
    pub fn reload(&self) -> Result<String, ConfigErrors> {
        let _one = self.reloading.lock().unwrap_or_else(|e| e.into_inner());
        let running = self.config();
        let new = config::load(&running.file)?;
        let mut refused = config::needs_restart(&running, &new);
        if let Some(largest) = self.store.largest_body() {
            if new.server.max_body_bytes > largest {
                refused.push(config::Problem {
                    file: new.file.display().to_string(),
                    at: None,
                    key: "server.max_body_bytes".into(),
                    reason: format!(
                        "{} is more than the store takes ({largest}: NATS max_payload less the \
                         record's own room); raise max_payload in the nats-server config first",
                        new.server.max_body_bytes
                    ),
                });
            }
        }
        if !refused.is_empty() {
            return Err(ConfigErrors(refused));
        }
        let table = config::routing_table(&new);
        self.swap_config(new);
        Ok(table)
    }

    /// Changes whenever the config is swapped.
    pub fn config_changes(&self) -> watch::Receiver<u64> {
        self.live.changes()
    }
}
