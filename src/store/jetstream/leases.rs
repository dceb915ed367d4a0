//! Deliveries this instance holds: one puller per destination takes messages from the
//! destination's durable consumer (shared by every instance, so each message goes to one of
//! them at a time), keeps at most the scheduler's window of them, and holds each with a
//! progress signal until its outcome is written (the write replaces the message, which the
//! server then settles as if acked). The signal has a timer of its own ([`renew_every`]): a
//! pull the server is slow to answer, or an outcome's write, never holds it past the ack
//! wait (the server would give the message to another instance while this one still sends
//! it).
//!
//! When the signal may not have reached the server for nearly the ack wait (JetStream out
//! of reach, the consumer made again), the server may have given what is held to another
//! instance: those leases are *stale*. A stale one not yet sent is let go (the other
//! instance sends it, and the key's next may already have followed it); one in flight
//! finishes, and its write, conditional on the state it read, settles which one counts.
//!
//! A message not yet due (a retry's backoff) goes straight back with a delayed nak, so the
//! server holds it until it is due. A delivered or dead state (written to the same subject)
//! is acked on sight. If this instance dies, the server gives its messages to another after
//! the ack wait.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::records::{decode_delivery, DeliveryRecord, Names};
use super::watchers::Pauses;
use super::{lines, pulls, JetStreamStore};
use crate::clock::now_ms;
use crate::store::{DeliveryState, StoreError};

/// How long the server waits for an ack (or progress) before giving a message to another.
pub const ACK_WAIT: Duration = Duration::from_secs(6);
/// How long a delivery state this build cannot read waits before it is offered again.
const UNREADABLE_AGAIN: Duration = Duration::from_secs(300);
/// How often a held message's lease is renewed.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);
/// With no renewal sent while connected for this long, what is held may have been given to
/// another instance: a second's margin under the ack wait.
const LAPSE: Duration = Duration::from_secs(5);
/// Past this many order keys checked, the ones checked longer ago than a recheck's delay
/// are forgotten.
const RECHECKS_KEPT: usize = 4_096;
/// A delivery due within this is taken now rather than sent back.
const EARLY_MS: u64 = 20;

/// One held delivery.
pub struct Lease {
    pub msg: jetstream::Message,
    /// The stream sequence of its state message: the condition of the next write.
    pub state_seq: u64,
    pub rec: DeliveryRecord,
    pub body: Bytes,
    /// Held since before a lapse of its renewals: it may be another instance's now.
    pub stale: bool,
}

/// The deliveries held for one destination.
pub struct Leases {
    pub destination: String,
    pub held: Mutex<HashMap<u64, Lease>>,
    /// The scheduler's window: the most held at once.
    pub window: AtomicUsize,
    /// A lease left (its outcome was written): the puller may take another.
    pub freed: Notify,
    /// Told when a delivery is taken.
    pub wakeup: Arc<Notify>,
    /// When each order key's line was last checked for a waiting delivery that came back:
    /// once per [`lines::WAITING_RECHECK`] is enough, however many of the key wait.
    rechecked: Mutex<HashMap<String, Instant>>,
    /// When the held leases were last renewed while connected.
    renewed: Mutex<Instant>,
}

impl Leases {
    pub fn new(destination: String, wakeup: Arc<Notify>) -> Self {
        Leases {
            destination,
            held: Mutex::default(),
            window: AtomicUsize::new(16),
            freed: Notify::new(),
            wakeup,
            rechecked: Mutex::default(),
            renewed: Mutex::new(Instant::now()),
        }
    }

    /// Marks every held lease stale if the last renewal made while connected is [`LAPSE`]
    /// old: checked at each renewal and each read of what is due.
    pub fn check_lapse(&self) {
        let renewed = *self.renewed.lock().unwrap();
        if renewed.elapsed() > LAPSE {
            self.all_stale();
        }
    }

    /// Marks every held lease stale: the server may have given them to another instance.
    fn all_stale(&self) {
        let mut held = self.held.lock().unwrap();
        let mut marked = 0;
        for l in held.values_mut().filter(|l| !l.stale) {
            l.stale = true;
            marked += 1;
        }
        if marked > 0 {
            warn!(destination = %self.destination, held = marked, "deliveries held here may have gone to another instance (their leases were not renewed in time); those not yet sent are let go");
        }
    }

    /// Lets go, without a word to the server, of the stale leases `in_flight` does not name.
    pub fn drop_stale(&self, in_flight: &(dyn Fn(u64) -> bool + Send + Sync)) {
        let mut held = self.held.lock().unwrap();
        let before = held.len();
        held.retain(|seq, l| !l.stale || in_flight(*seq));
        if held.len() < before {
            drop(held);
            self.freed.notify_one();
        }
    }

    /// Whether the lease for `seq` is held and not stale.
    pub fn holds(&self, seq: u64) -> bool {
        self.held
            .lock()
            .unwrap()
            .get(&seq)
            .is_some_and(|l| !l.stale)
    }

    /// Whether `key`'s line is due a check now (and notes that it is checked).
    fn recheck(&self, key: &str) -> bool {
        let now = Instant::now();
        let mut all = self.rechecked.lock().unwrap();
        if all.len() >= RECHECKS_KEPT {
            all.retain(|_, at| now.duration_since(*at) < lines::WAITING_RECHECK);
        }
        match all.get(key) {
            Some(at) if now.duration_since(*at) < lines::WAITING_RECHECK => false,
            _ => {
                all.insert(key.to_string(), now);
                true
            }
        }
    }

    /// A copy of what a held delivery's outcome is written from: the sequence its state was
    /// read at, its record and body. The lease stays held (and renewed) until
    /// [`Leases::take`].
    pub fn get(&self, seq: u64) -> Option<(u64, DeliveryRecord, Bytes)> {
        let held = self.held.lock().unwrap();
        let l = held.get(&seq)?;
        Some((l.state_seq, l.rec.clone(), l.body.clone()))
    }

    /// Lets go of the lease held for `seq`, if it is still the one on the state at
    /// `state_seq`: a retry due at once may already be held again on its new state, which
    /// must stay held (and renewed).
    pub fn take_if(&self, seq: u64, state_seq: u64) -> Option<Lease> {
        let mut held = self.held.lock().unwrap();
        if held.get(&seq)?.state_seq != state_seq {
            return None;
        }
        let l = held.remove(&seq);
        drop(held);
        self.freed.notify_one();
        l
    }

    /// Holds a pulled delivery, unless this destination was handed back meanwhile (its
    /// window 0, read under the lock [`release_idle`](Self::release_idle) takes after
    /// setting it): then the lease is returned, to be handed back too.
    fn hold(&self, lease: Lease) -> Option<Lease> {
        let mut held = self.held.lock().unwrap();
        if self.window.load(Ordering::Relaxed) == 0 {
            return Some(lease);
        }
        held.insert(lease.rec.delivery.seq, lease);
        None
    }

    /// Hands back every held delivery that `in_flight` does not name, so that another
    /// instance may send it.
    pub async fn release_idle(&self, in_flight: &(dyn Fn(u64) -> bool + Send + Sync)) {
        let idle: Vec<Lease> = {
            let mut held = self.held.lock().unwrap();
            let seqs: Vec<u64> = held.keys().copied().filter(|s| !in_flight(*s)).collect();
            seqs.into_iter().filter_map(|s| held.remove(&s)).collect()
        };
        for l in idle {
            let _ = l.msg.ack_with(AckKind::Nak(None)).await;
        }
    }

    /// Hands every held message back to the server for another instance at once.
    pub async fn release(&self) {
        let all: Vec<Lease> = self.held.lock().unwrap().drain().map(|(_, l)| l).collect();
        for l in all {
            let _ = l.msg.ack_with(AckKind::Nak(None)).await;
        }
    }
}

/// The durable consumer of one destination's deliveries; every instance creates it with
/// the same settings.
pub fn consumer_config(names: &Names, destination: &str) -> pull::Config {
    pull::Config {
        durable_name: Some(names.consumer(destination)),
        description: Some(format!("hookrelay deliveries to {destination}")),
        filter_subject: names.deliveries_of(destination),
        ack_policy: AckPolicy::Explicit,
        deliver_policy: DeliverPolicy::All,
        ack_wait: ACK_WAIT,
        max_deliver: -1,
        // Retries waiting out their backoff (delayed naks) count here; the scheduler's
        // window, not this, bounds what one instance holds.
        max_ack_pending: 1_000_000,
        ..Default::default()
    }
}

/// Takes and holds deliveries of one destination until `stop`.
pub async fn pull(
    store: Weak<JetStreamStore>,
    leases: Arc<Leases>,
    stream: stream::Stream,
    names: Names,
    paused: Arc<Pauses>,
    stop: CancellationToken,
) {
    let dest = leases.destination.clone();
    let name = names.consumer(&dest);
    let what = format!("deliveries of {dest}");
    // Not marked as the fan-out's is: its filter holds a small part of the stream, so the
    // stream's sequences would discount what is really queued (all of it while paused).
    let config = consumer_config(&names, &dest);
    let make = || async { Some(config.clone()) };
    let Some(mut consumer) = pulls::consumer(&stream, &name, make, &what, &stop).await else {
        return;
    };
    debug!(destination = %dest, consumer = %name, "taking deliveries from JetStream");
    while !stop.is_cancelled() {
        if paused.contains(&dest) {
            // Paused (on every instance): take nothing more. What is held stays held (and
            // renewed), so an attempt in flight still records its outcome. A resume wakes
            // the scheduler, whose next read frees this wait.
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = leases.freed.notified() => {}
                _ = tokio::time::sleep(PROGRESS_EVERY) => {}
            }
            continue;
        }
        let held = leases.held.lock().unwrap().len();
        let free = leases.window.load(Ordering::Relaxed).saturating_sub(held);
        if free == 0 {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = leases.freed.notified() => {}
                _ = tokio::time::sleep(PROGRESS_EVERY) => {}
            }
            continue;
        }
        let Some(mut batch) = pulls::batch(&consumer, free, &what, &stop).await else {
            continue;
        };
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => break,
                n = batch.next() => n,
            };
            match next {
                None => break,
                Some(Err(e)) => {
                    if !pulls::pause_after(&what, &e, &stop).await {
                        return;
                    }
                    let made = consumer.cached_info().created;
                    let again = pulls::consumer(&stream, &name, make, &what, &stop);
                    let Some(c) = again.await else { return };
                    // Made again, the consumer hands out what was held here afresh. The
                    // same one (a pull that failed in a server's failover) still counts the
                    // holds this instance renews: they stand (one that lapsed meanwhile is
                    // let go by its own check), not sent a second time by another instance.
                    if c.cached_info().created != made {
                        leases.all_stale();
                    }
                    consumer = c;
                    break;
                }
                Some(Ok(m)) => take(&store, &leases, m).await,
            }
        }
    }
}

/// Holds a pulled message, or hands it back / acks it when it is not for sending now.
async fn take(store: &Weak<JetStreamStore>, leases: &Leases, m: jetstream::Message) {
    let Ok(state_seq) = m.info().map(|i| i.stream_sequence) else {
        return;
    };
    let (rec, body) = match decode_delivery(&m.payload) {
        Ok(r) => r,
        // A newer build's (a rolling upgrade): handed back to be offered again later, never
        // terminated, since the consumer is every instance's and a terminated state would be
        // sent by none, even once every instance runs the build that reads it.
        Err(e @ StoreError::Format(_)) => {
            warn!(destination = %leases.destination, seq = state_seq, error = %e, "a delivery record of a newer format; offered again in {UNREADABLE_AGAIN:?}");
            let _ = m.ack_with(AckKind::Nak(Some(UNREADABLE_AGAIN))).await;
            return;
        }
        // Damaged: no build will read it, and held it would stand at the consumer's floor
        // for ever (its oldest-pending age and its depth wrong).
        Err(e) => {
            tracing::error!(destination = %leases.destination, seq = state_seq, error = %e, "a damaged delivery record; set aside");
            let _ = m.ack_with(AckKind::Term).await;
            return;
        }
    };
    if rec.delivery.state != DeliveryState::Pending {
        let _ = m.ack().await;
        return;
    }
    if rec.waiting {
        // Behind an earlier delivery of its order key: back to the server until its line's
        // head tells it to go (a new state, so a new message). Back here again, it checks
        // the line, in case the instance moving it on died.
        let delivered = m.info().map(|i| i.delivered).unwrap_or(1);
        let _ = m
            .ack_with(AckKind::Nak(Some(lines::waiting_delay(delivered))))
            .await;
        let Some(key) = rec.delivery.order_key.as_deref().filter(|_| delivered > 1) else {
            return;
        };
        // In a task of its own: the rest of the batch, delivered to this instance already,
        // must be held (and so renewed) meanwhile, not wait for a long line to be read.
        if let (true, Some(s)) = (leases.recheck(key), store.upgrade()) {
            let dest = leases.destination.clone();
            let tasks = s.tasks.clone();
            tasks.spawn(async move {
                if let Err(e) = s.recheck_waiting(&rec).await {
                    debug!(destination = %dest, error = %e, "checking an order key's line failed");
                }
            });
        }
        return;
    }
    let now = now_ms();
    if rec.delivery.next_due_ms > now + EARLY_MS {
        let delay = Duration::from_millis(rec.delivery.next_due_ms - now);
        let _ = m.ack_with(AckKind::Nak(Some(delay))).await;
        return;
    }
    let lease = Lease {
        msg: m,
        state_seq,
        rec,
        body,
        stale: false,
    };
    if let Some(back) = leases.hold(lease) {
        // Handed back (the destination left this instance's config, or it stops): what a
        // pull still open brings in goes back at once, to an instance that sends it.
        let _ = back.msg.ack_with(AckKind::Nak(None)).await;
        return;
    }
    leases.wakeup.notify_one();
}

/// Renews every held lease each [`PROGRESS_EVERY`], until `stop`.
pub async fn renew_every(leases: Arc<Leases>, client: async_nats::Client, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PROGRESS_EVERY) => {}
        }
        let connected = client.connection_state() == async_nats::connection::State::Connected;
        renew(&leases, connected).await;
    }
}

/// Tells the server every held message is still being worked on (marking them all stale
/// first if the last renewal made while `connected` is [`LAPSE`] old).
async fn renew(leases: &Leases, connected: bool) {
    let started = Instant::now();
    leases.check_lapse();
    let msgs: Vec<jetstream::Message> = leases
        .held
        .lock()
        .unwrap()
        .values()
        .filter(|l| !l.stale)
        .map(|l| l.msg.clone())
        .collect();
    for m in msgs {
        let _ = m.ack_with(AckKind::Progress).await;
    }
    if connected {
        *leases.renewed.lock().unwrap() = started;
    }
}
