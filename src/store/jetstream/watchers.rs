//! The background work each instance does for the others: a membership heartbeat (the
//! share count), the pause watch, and the queue depths read from the consumers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::kv::{self, Operation};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::records::untoken;
use super::{JetStreamStore, DEPTH_EVERY, HEARTBEAT};

/// Renews this instance's membership and counts the live members.
pub(super) async fn heartbeat(
    members: kv::Store,
    count: Arc<AtomicUsize>,
    me: String,
    stop: CancellationToken,
) {
    loop {
        if members.put(&me, Bytes::from_static(b"1")).await.is_ok() {
            if let Ok(mut keys) = members.keys().await {
                let mut n = 0;
                while let Some(Ok(_)) = keys.next().await {
                    n += 1;
                }
                count.store(n.max(1), Ordering::Relaxed);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
    }
    let _ = members.purge(&me).await;
}

/// Follows the pauses bucket: a pause or resume through any instance holds on all.
pub(super) async fn watch_pauses(
    store: Weak<JetStreamStore>,
    first: kv::Watch,
    stop: CancellationToken,
) {
    let mut first = Some(first);
    loop {
        let watch = match first.take() {
            Some(w) => Ok(w),
            None => {
                let Some(s) = store.upgrade() else { return };
                // Every key's current value first, then each change: no gap.
                let w = s.pauses.watch_with_history(">").await;
                drop(s);
                w
            }
        };
        if let Ok(mut w) = watch {
            loop {
                let entry = tokio::select! {
                    _ = stop.cancelled() => return,
                    e = w.next() => e,
                };
                let Some(Ok(entry)) = entry else { break };
                let Some(s) = store.upgrade() else { return };
                if let Some(name) = untoken(&entry.key) {
                    let on = entry.operation == Operation::Put && &entry.value[..] == b"1";
                    let changed = if on {
                        s.paused.write().unwrap().insert(name.clone())
                    } else {
                        s.paused.write().unwrap().remove(&name)
                    };
                    if changed {
                        s.wakeup_of(&name).notify_one();
                    }
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
    }
}

/// Reads each known destination's queue depth (pending + held) from its consumer.
pub(super) async fn count_depths(store: Weak<JetStreamStore>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(DEPTH_EVERY) => {}
        }
        let Some(s) = store.upgrade() else { return };
        let known: Vec<String> = s.wakeups.lock().unwrap().keys().cloned().collect();
        for d in known {
            let consumer = s
                .stream
                .get_consumer::<pull::Config>(&s.names.consumer(&d))
                .await;
            if let Ok(mut c) = consumer {
                if let Ok(info) = c.info().await {
                    let n = info.num_pending + info.num_ack_pending as u64;
                    s.depths.lock().unwrap().insert(d, n);
                }
            }
        }
    }
}
