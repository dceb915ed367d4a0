//! Starting and stopping the relay: store, ingress, delivery, background upkeep, signals.
//!
//! Shutdown order: stop accepting → let requests in flight finish → give deliveries in
//! flight `shutdown_grace` → close (flush) the store.

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::app::App;
use crate::config::{self, Config};
use crate::starting;
use crate::store::Store;

/// How long abandoned attempts get to end before the store closes.
const ABANDON_WAIT: Duration = Duration::from_secs(1);

/// How often expired dedup records and old delivered events are purged.
const PURGE_EVERY: Duration = Duration::from_secs(60);

/// A running relay.
pub struct Relay {
    pub ingress: SocketAddr,
    pub admin: SocketAddr,
    pub app: Arc<App>,
    shutdown: CancellationToken,
    /// Cut the shutdown short: what is in flight is dropped (deliveries stay pending), and
    /// the store closes at once.
    hurry: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Relay {
    /// Binds the listeners, opens the store (they answer 503 meanwhile: [`starting`]) and
    /// starts every part.
    pub async fn start(config: Config) -> anyhow::Result<Relay> {
        let (listener, admin_listener) = bind(&config).await?;
        let store = starting::open_store(&config, &listener, &admin_listener).await?;
        Self::start_on(config, store, listener, admin_listener)
    }

    /// Starts the relay on an already opened store (any [`Store`] implementation).
    pub async fn start_with_store(config: Config, store: Arc<dyn Store>) -> anyhow::Result<Relay> {
        let (listener, admin_listener) = bind(&config).await?;
        Self::start_on(config, store, listener, admin_listener)
    }

    fn start_on(
        config: Config,
        store: Arc<dyn Store>,
        listener: TcpListener,
        admin_listener: TcpListener,
    ) -> anyhow::Result<Relay> {
        let ingress = listener.local_addr()?;
        let admin = admin_listener.local_addr()?;
        let app = App::new(config, store).context("building the HTTP client")?;
        let shutdown = CancellationToken::new();
        let hurry = CancellationToken::new();
        let admin_stop = CancellationToken::new();
        tokio::spawn(crate::admin::serve(
            admin_listener,
            app.clone(),
            admin_stop.clone(),
        ));
        let task = {
            let (app, shutdown, hurry) = (app.clone(), shutdown.clone(), hurry.clone());
            tokio::spawn(async move {
                let r = run(app, listener, shutdown, hurry).await;
                admin_stop.cancel();
                r
            })
        };
        Ok(Relay {
            ingress,
            admin,
            app,
            shutdown,
            hurry,
            task,
        })
    }

    /// Asks the relay to stop (as SIGTERM does).
    pub fn shutdown(&self) {
        self.shutdown.cancel();
    }

    /// Waits until the relay has stopped.
    pub async fn stopped(self) -> anyhow::Result<()> {
        self.task.await?
    }
}

/// The ingress and admin listeners, bound.
async fn bind(config: &Config) -> anyhow::Result<(TcpListener, TcpListener)> {
    let listener = TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("binding server.listen {}", config.server.listen))?;
    let admin = TcpListener::bind(config.server.admin_listen)
        .await
        .with_context(|| format!("binding server.admin_listen {}", config.server.admin_listen))?;
    Ok((listener, admin))
}

async fn run(
    app: Arc<App>,
    listener: TcpListener,
    shutdown: CancellationToken,
    hurry: CancellationToken,
) -> anyhow::Result<()> {
    let delivery_stop = CancellationToken::new();
    let delivery = crate::delivery::start(app.delivery(), delivery_stop.clone());
    let upkeep = tokio::spawn(purge_loop(app.clone(), shutdown.clone()));
    {
        // readyz answers 503 from the moment shutdown starts.
        let (app, shutdown) = (app.clone(), shutdown.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            app.health.set_stopping();
        });
    }
    // A second signal cuts each wait short: requests still in flight get no answer (their
    // senders try again; what was stored stays), deliveries stay pending.
    tokio::select! {
        _ = crate::ingress::serve(listener, app.ingress(), shutdown.clone()) => {}
        _ = hurry.cancelled() => {}
    }
    let grace = app.config().server.shutdown_grace;
    delivery_stop.cancel();
    // Reply calls whose provider hung up and replays of whole destinations get the same
    // grace: their outcomes go into the store before it closes.
    app.background.close();
    let both = futures_util::future::join(delivery.wait(), app.background.wait());
    tokio::select! {
        waited = tokio::time::timeout(grace, both) => if waited.is_err() {
            warn!(
                ?grace,
                in_flight_apart = app.background.len(),
                "deliveries, reply calls or a replay still under way after shutdown_grace; \
                 what they did not record stays pending (a replay: dead)"
            );
        },
        _ = hurry.cancelled() => {}
    }
    // Attempts past the grace are abandoned (they stay pending) before the store closes,
    // not left to answer into a closing store.
    delivery.abandon();
    let _ = tokio::time::timeout(ABANDON_WAIT, delivery.wait()).await;
    upkeep.abort();
    app.store.close().await.context("flushing the store")?;
    info!("stopped");
    Ok(())
}

async fn purge_loop(app: Arc<App>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(PURGE_EVERY) => {}
        }
        let retain = app.config().store.retain;
        match app.store.purge(retain).await {
            Ok(n) if n > 0 => info!(removed = n, "purged expired records"),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "purge failed"),
        }
    }
}

/// `hookrelay serve`: runs until SIGTERM or Ctrl-C; a second signal drops what is in flight
/// and exits once the store is closed (status 1), a third without closing it.
pub async fn run_serve(path: &Path) -> anyhow::Result<ExitCode> {
    // Handlers are in place before anything else (the config's files are read first), so
    // no early signal takes the default action, which would kill the process.
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let config = match config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            return Ok(ExitCode::FAILURE);
        }
    };
    crate::open_files::check(crate::open_files::raise(), config.server.max_connections);
    // Nothing is accepted before the store is open, so a signal then simply ends it.
    let relay = tokio::select! {
        r = Relay::start(config) => r?,
        _ = term.recv() => return Ok(stopped_while_starting()),
        _ = int.recv() => return Ok(stopped_while_starting()),
    };
    println!(
        "hookrelay listening ingress={} admin={}",
        relay.ingress, relay.admin
    );
    info!(ingress = %relay.ingress, admin = %relay.admin, "listening");
    tokio::spawn(reload_on_sighup(relay.app.clone(), hup));
    let (stop, hurry) = (relay.shutdown.clone(), relay.hurry.clone());
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        info!("stopping: finishing requests and deliveries in flight");
        stop.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        error!("second signal: dropping what is in flight (it stays pending), closing the store and exiting");
        hurry.cancel();
        // The store's close is quick; should it hang, a third signal ends the process.
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        error!("third signal: exiting without closing the store");
        std::process::exit(1);
    });
    let hurried = relay.hurry.clone();
    relay.stopped().await?;
    Ok(match hurried.is_cancelled() {
        true => ExitCode::FAILURE,
        false => ExitCode::SUCCESS,
    })
}

fn stopped_while_starting() -> ExitCode {
    info!("stopped before the store was open; nothing was accepted");
    ExitCode::SUCCESS
}

/// SIGHUP: reload as `POST /api/reload` does; on errors the old config stays.
async fn reload_on_sighup(app: Arc<App>, mut hup: Signal) {
    while hup.recv().await.is_some() {
        if app.health.is_stopping() {
            info!("SIGHUP while stopping: the config is read at the next start");
            continue;
        }
        match app.reload() {
            Ok(_) => info!("config reloaded (SIGHUP)"),
            Err(errors) => {
                for p in &errors.0 {
                    warn!(problem = %p, "config reload refused; the old config stays");
                }
            }
        }
    }
}
