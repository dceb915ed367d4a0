//! Delivery: per-destination schedulers that send pending deliveries, retry and dead-letter.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::App;

/// The running delivery engine.
pub struct Engine {
    tasks: TaskTracker,
}

impl Engine {
    /// Waits for every scheduler to stop.
    pub async fn wait(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

pub fn start(_app: Arc<App>, _stop: CancellationToken) -> Engine {
    Engine {
        tasks: TaskTracker::new(),
    }
}
