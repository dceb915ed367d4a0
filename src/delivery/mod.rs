//! Delivery: gets every accepted event to every matched destination, at least once.
//!
//! - [`scheduler`]: one task per destination reads due deliveries from the store (a bounded
//!   window, never the whole queue), applies the destination's rate limit and in-flight
//!   limit, and starts one attempt per delivery.
//! - [`client`]: the pooled HTTP client and [`send_once`], the one request of an attempt
//!   (also what a reply route calls).
//! - [`retry`]: what an answer means (delivered, retried, dead) and when the next attempt is
//!   due; computed from the stored attempt count, so a restart resumes the schedule.
//!
//! The store is the truth: a delivery is pending until an attempt's outcome is recorded, so
//! whatever is in flight when the relay stops (or dies) is sent again after a restart.
//! Schedulers start for the destinations configured at start and for those a reload adds.
//! At shutdown the schedulers stop taking work; attempts in flight continue and are waited
//! for by [`Engine::wait`] (which the caller bounds with `shutdown_grace`); dropping the
//! [`Engine`] abandons those still unfinished, which stay pending in the store.

pub mod client;
pub mod retry;
mod scheduler;

use std::collections::HashSet;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::App;

pub use client::{send_once, Answer, AttemptResult, HttpClient, SendError};

/// What the schedulers and their attempts share.
struct Context {
    app: Arc<App>,
    client: HttpClient,
    stop: CancellationToken,
    /// Cancelled when the engine is dropped: attempts still in flight are abandoned (their
    /// deliveries stay pending and go out again after a restart).
    abort: CancellationToken,
    /// Schedulers and attempts in flight.
    tasks: TaskTracker,
}

/// The running delivery engine. Dropping it abandons attempts still in flight.
pub struct Engine {
    tasks: TaskTracker,
    abort: CancellationToken,
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.abort.cancel();
    }
}

impl Engine {
    /// Waits until every scheduler has stopped (after the stop token) and every attempt in
    /// flight has finished and stored its outcome.
    pub async fn wait(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }
}

/// Starts the engine: a scheduler per configured destination, and one for each destination
/// a later reload adds. Stops taking work when `stop` is cancelled.
pub fn start(app: Arc<App>, stop: CancellationToken) -> Engine {
    let tasks = TaskTracker::new();
    let abort = CancellationToken::new();
    let ctx = Arc::new(Context {
        // The reply route's client: one connection pool for all outbound requests.
        client: app.client.clone(),
        app,
        stop,
        abort: abort.clone(),
        tasks: tasks.clone(),
    });
    tasks.spawn(supervise(ctx));
    Engine { tasks, abort }
}

/// Starts a scheduler for every destination in the config, now and after each reload.
/// A scheduler whose destination leaves the config idles until it comes back.
async fn supervise(ctx: Arc<Context>) {
    let mut running: HashSet<String> = HashSet::new();
    let mut changes = ctx.app.config_changes();
    loop {
        for d in &ctx.app.config().destinations {
            if running.insert(d.name.clone()) {
                ctx.tasks.spawn(scheduler::run(ctx.clone(), d.name.clone()));
            }
        }
        tokio::select! {
            _ = ctx.stop.cancelled() => return,
            r = changes.changed() => if r.is_err() {
                ctx.stop.cancelled().await;
                return;
            },
        }
    }
}
