//! Until the store is open: both listeners are bound and answer, so a balancer and a
//! provider hear "not ready yet" (503 with `Retry-After`, `/readyz` saying why) instead of a
//! refused connection. A JetStream out of reach, or an embedded store another process holds
//! (the relay this one replaces, still stopping), is waited for instead of ending the
//! process. What a restart would only repeat (a store unreadable, NATS refusing the account
//! or too old) still ends it, with the reason.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use http::{Method, StatusCode};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{Backend, Config};
use crate::store::jetstream::{JetStreamStore, OutOfReach};
use crate::store::redb::RedbStore;
use crate::store::sled::SledStore;
use crate::store::{Store, StoreError};
use crate::web::response::{json_response, ApiError};
use crate::web::server::{self, Drain};

/// The first wait before trying JetStream again; it doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(10);
/// How long the stand-in answers get to finish once the store is open.
const HAND_OVER: Duration = Duration::from_secs(1);

/// Opens the store named by `config`, answering on `ingress` and `admin` meanwhile; the
/// listeners are lent, and left open for the relay itself.
pub async fn open_store(
    config: &Config,
    ingress: &TcpListener,
    admin: &TcpListener,
) -> anyhow::Result<Arc<dyn Store>> {
    let why = Arc::new(Mutex::new("the store is being opened".to_string()));
    // Said before the open, which may take a while (a store not closed cleanly is
    // recovered; one in use is waited for): the listeners answer 503 meanwhile.
    let embedded = match config.store.backend {
        Backend::Redb => Some("redb"),
        Backend::Sled => Some("sled"),
        Backend::Jetstream => None,
    };
    if let Some(backend) = embedded {
        info!(
            backend,
            path = %config.store.path.display(),
            ingress = %ingress.local_addr()?,
            admin = %admin.local_addr()?,
            "opening the store; answering 503 until it is open"
        );
    }
    let opened = CancellationToken::new();
    let opening = async {
        let store = open_waiting(config, &why).await;
        opened.cancel();
        store
    };
    let answering = async {
        let mut admin_limits = crate::admin::limits(config);
        admin_limits.drain = Drain::fixed(HAND_OVER);
        let why = why.clone();
        tokio::join!(
            server::serve(
                ingress,
                crate::ingress::limits(config, Drain::fixed(HAND_OVER)),
                opened.clone(),
                |_, _| async {
                    ApiError::unavailable("the relay is starting; try again shortly", "5")
                        .into_response()
                },
            ),
            server::serve(admin, admin_limits, opened.clone(), move |_, req| {
                let why = why.lock().unwrap().clone();
                async move {
                    if req.uri().path() == "/healthz" && req.method() == Method::GET {
                        return json_response(StatusCode::OK, json!({"status": "ok"}).to_string());
                    }
                    // What is awaited (servers, their errors) only where readiness is asked:
                    // the other paths need the admin token, which is not checked yet.
                    if req.uri().path() == "/readyz" {
                        return ApiError::unavailable(format!("the relay is starting: {why}"), "5")
                            .into_response();
                    }
                    ApiError::unavailable("the relay is starting; try again shortly", "5")
                        .into_response()
                }
            })
        );
    };
    tokio::join!(opening, answering).0
}

/// Opens the store; a JetStream out of reach, or an embedded store another process holds
/// (the relay this one replaces, still stopping), is tried again (1 s, doubling to 10 s)
/// until it opens, `why` saying what is awaited.
async fn open_waiting(config: &Config, why: &Mutex<String>) -> anyhow::Result<Arc<dyn Store>> {
    let mut wait = FIRST_RETRY;
    loop {
        let e = match open_once(config).await {
            Ok(store) => return Ok(store),
            Err(e) => e,
        };
        let Some(what) = waitable(&e) else {
            return Err(e);
        };
        let text = format!("{e:#}");
        warn!(error = %text, retry_in = ?wait, "{what}; answering 503 until it opens");
        *why.lock().unwrap() = format!("{text} (trying again every {MAX_RETRY:?} at most)");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(MAX_RETRY);
    }
}

/// What keeps the store from opening for now, if that is why `e` came: a JetStream out of
/// reach, or an embedded store another process holds.
fn waitable(e: &anyhow::Error) -> Option<&'static str> {
    if e.downcast_ref::<OutOfReach>().is_some() {
        return Some("JetStream is out of reach");
    }
    matches!(e.downcast_ref::<StoreError>(), Some(StoreError::InUse(_)))
        .then_some("the store is in use by another process")
}

async fn open_once(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match config.store.backend {
        Backend::Sled => {
            let path = config.store.path.clone();
            tokio::task::spawn_blocking(move || SledStore::open(&path))
                .await?
                .context("opening the store")?
        }
        Backend::Redb => {
            let path = config.store.path.clone();
            tokio::task::spawn_blocking(move || RedbStore::open(&path))
                .await?
                .context("opening the store")?
        }
        Backend::Jetstream => JetStreamStore::open(config)
            .await
            .context("opening the JetStream store")?,
    })
}
