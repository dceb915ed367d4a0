//! The jetstream backend: every instance keeps its state in one NATS JetStream, so any
//! instance accepts and any delivers (CONTRACT §7).
//!
//! - **Accept** is one conditional publish: the event with its destinations, on a subject
//!   of its own, written only if that subject is empty (the dedup check and the write are
//!   one step, race-free across instances). 200 comes after the server's ack (with
//!   `replicas = 3`, a quorum stored it). A shared consumer fans each event out into its
//!   deliveries, idempotently ([`fanout`]): no accepted event is ever left without one.
//! - **Deliver**: each destination has one durable pull consumer shared by every instance
//!   ([`leases`]); an outcome is written to the delivery's own subject, conditional on the
//!   state it was read from; that write replaces the held message, which the server then
//!   settles as if acked (no ack is sent). A retry is written as a new
//!   pending state with its due time and handed back with a delayed nak until then.
//! - **Limits across instances**: each instance takes `1/n` of `rate` and `max_in_flight`,
//!   `n` being the live members (a heartbeat bucket with a 6 s TTL), see [`Store::share`];
//!   with a smaller `max_in_flight` or `burst`, only that many send ([`Store::delivers`]).
//! - **Ordering** (`order_by`): each ordered delivery has an entry in its key's line,
//!   written with the event; only the line's head is sent, the others wait ([`lines`]).
//! - Pauses live in a bucket every instance watches; dead letters have an index subject;
//!   lookups, lists and replays read the stream, so any instance sees everything.

mod batch;
mod breakers;
mod fanout;
mod leases;
mod lines;
mod outcomes;
mod pulls;
mod reads;
mod records;
mod setup;
pub use setup::OutOfReach;
mod watchers;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::kv;
use async_nats::jetstream::stream;
use async_nats::Client;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use self::batch::{write, Write, Written};
use self::leases::Leases;
use self::records::*;
pub use self::setup::OLDEST_SERVER;
use super::*;
use crate::config::Config;

/// The least an event (and what is kept with it) stays in the stream, whatever `retain`
/// and the dedup window say: until its fan-out has written its deliveries, nothing else
/// holds them.
const UNFANNED_KEPT: Duration = Duration::from_secs(24 * 3600);

/// The longest one write waits for JetStream's ack (the ingress gives up sooner, at its own
/// timeout: a dropped accept leaves its line entries to their line, [`lines::Entries`]).
const WRITE_TIMEOUT: Duration = Duration::from_secs(4);
/// Tries at recording a reply route's call, 250 ms apart and doubling up to 4 s: about
/// 16 s in all, so an outage of a few seconds does not have the delivery sent again.
const REPLY_TRIES: usize = 8;
/// How often each instance renews its membership and recounts the members.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// How often queue depths are read from the consumers.
const DEPTH_EVERY: Duration = Duration::from_secs(1);
/// A replayed dead letter's index entry (`replayed`) stays this long.
const REPLAYED_TTL: Duration = Duration::from_secs(1);
/// The most a close waits for the server to take back what this instance holds.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

pub struct JetStreamStore {
    client: Client,
    stream: stream::Stream,
    names: Names,
    pauses: kv::Store,
    paused: Arc<watchers::Pauses>,
    leases: Mutex<HashMap<String, Arc<Leases>>>,
    wakeups: Mutex<HashMap<String, Arc<Notify>>>,
    depths: Arc<Mutex<HashMap<String, u64>>>,
    /// When the event of each destination's first pending delivery that its consumer has
    /// not had acknowledged was received (as of the last count).
    backlog_oldest: Mutex<HashMap<String, u64>>,
    /// Line entries seen standing for nothing, and when first ([`lines`]).
    orphans: Mutex<HashMap<u64, std::time::Instant>>,
    /// Accepted events not fanned out yet (as of the last count): each may add a delivery
    /// to any destination, so `max_queue` counts them for every one.
    unfanned: AtomicU64,
    members: Arc<watchers::Membership>,
    /// This instance's breaker changes, for its publisher ([`breakers::publish`]).
    breaker_changes: tokio::sync::mpsc::Sender<(String, bool)>,
    /// Other instances' breaker changes, until the delivery engine takes them.
    breaker_news: Mutex<Option<crate::store::BreakerNews>>,
    /// `max(dedup window, retain, 1 day)` at start: how long the records of an event accepted by
    /// an earlier build (which did not say, [`EventMeta::keep_ms`]) are kept.
    keep_events: Duration,
    retain: Duration,
    /// The stream's replicas the config asks for, to check it against while running
    /// ([`setup::watch_stream`]).
    replicas: usize,
    /// What is wrong with the stream's settings as last read (an operator's edit since the
    /// start): while set, nothing is accepted.
    stream_problem: Mutex<Option<String>>,
    stop: CancellationToken,
    pub(super) tasks: TaskTracker,
    /// Itself, for work that outlives a call (a reply route's background write).
    me: std::sync::Weak<JetStreamStore>,
}

impl JetStreamStore {
    /// Connects, checks the server (version, JetStream, max_payload), creates the stream
    /// and buckets if missing, and starts the membership, pause and depth watchers.
    pub async fn open(config: &Config) -> anyhow::Result<Arc<Self>> {
        let s = &config.store;
        let names = Names {
            prefix: s.prefix.clone(),
        };
        let c = setup::connect(s, config.server.max_body_bytes, &names).await?;
        info!(
            servers = %setup::shown_servers(&s.url),
            version = %c.client.server_info().version,
            stream = %names.stream(),
            replicas = s.replicas,
            "store: JetStream"
        );
        let me_id = format!("{:032x}", rand::random::<u128>());
        let (news, breaker_news) = tokio::sync::mpsc::channel(breakers::BACKLOG);
        let (breaker_changes, changes) = tokio::sync::mpsc::channel(breakers::BACKLOG);
        let store = Arc::new_cyclic(|me| JetStreamStore {
            client: c.client,
            stream: c.stream,
            names,
            pauses: c.pauses,
            paused: Arc::default(),
            leases: Mutex::default(),
            wakeups: Mutex::default(),
            depths: Arc::default(),
            backlog_oldest: Mutex::default(),
            orphans: Mutex::default(),
            unfanned: AtomicU64::new(0),
            members: Arc::new(watchers::Membership::new()),
            breaker_changes,
            breaker_news: Mutex::new(Some(breaker_news)),
            keep_events: config.dedup_window.max(s.retain),
            retain: s.retain,
            replicas: s.replicas,
            stream_problem: Mutex::default(),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
            me: me.clone(),
        });
        // Watching starts before the first read, so no pause or resume falls between.
        let watch = store.pauses.watch_with_history(">").await?;
        store.load_pauses().await?;
        store.tasks.spawn(breakers::listen(
            store.client.clone(),
            store.names.prefix.clone(),
            me_id.clone(),
            news,
            store.stop.clone(),
        ));
        store.tasks.spawn(breakers::publish(
            store.client.clone(),
            store.names.prefix.clone(),
            me_id.clone(),
            changes,
            store.stop.clone(),
        ));
        // Counted before any scheduler asks whether this instance sends to a destination.
        watchers::beat(&c.members, &store.members, &me_id).await;
        store.tasks.spawn(watchers::heartbeat(
            c.members,
            store.members.clone(),
            me_id,
            store.stop.clone(),
        ));
        let me = Arc::downgrade(&store);
        store.tasks.spawn(watchers::watch_pauses(
            me.clone(),
            watch,
            store.stop.clone(),
        ));
        store
            .tasks
            .spawn(watchers::count_depths(me.clone(), store.stop.clone()));
        store
            .tasks
            .spawn(setup::watch_stream(me.clone(), store.stop.clone()));
        store
            .tasks
            .spawn(fanout::run(me, store.stream.clone(), store.stop.clone()));
        Ok(store)
    }

    async fn load_pauses(&self) -> anyhow::Result<()> {
        let mut keys = self.pauses.keys().await?;
        while let Some(k) = keys.next().await {
            let k = k?;
            if let (Some(e), Some(name)) = (self.pauses.entry(&k).await?, untoken(&k)) {
                let on = e.operation == kv::Operation::Put && &e.value[..] == b"1";
                self.paused.apply(&name, on, e.revision);
            }
        }
        Ok(())
    }

    fn leases_of(&self, destination: &str) -> Arc<Leases> {
        let mut all = self.leases.lock().unwrap();
        if let Some(l) = all.get(destination) {
            return l.clone();
        }
        let l = Arc::new(Leases::new(
            destination.to_string(),
            self.wakeup_of(destination),
        ));
        all.insert(destination.to_string(), l.clone());
        self.tasks.spawn(leases::pull(
            self.me.clone(),
            l.clone(),
            self.stream.clone(),
            self.names.clone(),
            self.paused.clone(),
            self.stop.clone(),
        ));
        self.tasks.spawn(leases::renew_every(
            l.clone(),
            self.client.clone(),
            self.stop.clone(),
        ));
        l
    }

    fn wakeup_of(&self, destination: &str) -> Arc<Notify> {
        self.wakeups
            .lock()
            .unwrap()
            .entry(destination.to_string())
            .or_default()
            .clone()
    }

    /// The last message on `subject`, if any.
    async fn last(&self, subject: &str) -> Result<Option<(u64, Bytes)>, StoreError> {
        match self.stream.get_last_raw_message_by_subject(subject).await {
            Ok(m) => Ok(Some((m.sequence, m.payload))),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(StoreError::Unavailable(format!(
                "reading {subject} from JetStream: {e}"
            ))),
        }
    }

    /// The event kept with the token `e`, if any: its sequence and when it was received.
    async fn kept_event(&self, e: &str) -> Result<Option<(u64, EventMeta)>, StoreError> {
        let Some((seq, payload)) = self.last(&self.names.event(e)).await? else {
            return Ok(None);
        };
        let (meta, _) = decode_event(seq, &payload)?;
        Ok(Some((seq, meta)))
    }

    /// Whether the event `meta` kept within the dedup window under `ev`'s token is `ev`'s
    /// duplicate. Tokens are 64-bit hashes of the id and the source: another id whose
    /// token collides is refused ([`Admission::IdCollides`], logged) rather than answered
    /// as a duplicate and never delivered.
    fn same_event(meta: &EventMeta, ev: &NewEvent) -> bool {
        if meta.id == ev.id && meta.source == ev.source {
            return true;
        }
        static SAID: crate::telemetry::Throttle = crate::telemetry::Throttle::new();
        if let Some(held_back) = SAID.pass(now_ms()) {
            tracing::error!(
                source = %ev.source,
                held_back,
                "an event id's subject token collides with another id's kept within the dedup window; the event is refused (503) until that one leaves the window"
            );
        }
        false
    }

    /// The answer to `ev`, whose token `e` names the event `meta` kept at `seq` within the
    /// dedup window: its duplicate, unless another id's token collides with it.
    async fn kept_answer(
        &self,
        seq: u64,
        meta: &EventMeta,
        e: &str,
        ev: &NewEvent,
    ) -> Result<Admission, StoreError> {
        if !Self::same_event(meta, ev) {
            return Ok(Admission::IdCollides);
        }
        self.duplicate_of(seq, e).await
    }

    /// The answer to a duplicate of the event at `seq` (token `e`): its sequence and the
    /// reply kept for it (a reply written before `seq` was an earlier event's).
    async fn duplicate_of(&self, seq: u64, e: &str) -> Result<Admission, StoreError> {
        let reply = match self.last(&self.names.reply(e)).await? {
            // Unreadable, it is an error (the caller is answered 503), not "no reply": the
            // call action would be asked for a second time.
            Some((at, p)) if at > seq => Some(StoredReply::decode(&p)?),
            _ => None,
        };
        Ok(Admission::Duplicate { seq, reply })
    }

    /// The duplicate answer for an event with token `e` received at `now_ms`, if an event
    /// with its id was received within `window` before.
    async fn duplicate(&self, e: &str, ev: &NewEvent) -> Result<Option<Admission>, StoreError> {
        match self.kept_event(e).await? {
            Some((seq, meta)) if within(&meta, ev.dedup_window, ev.received_ms) => {
                Ok(Some(self.kept_answer(seq, &meta, e, ev).await?))
            }
            _ => Ok(None),
        }
    }

    /// Whether every delivery of the event at `seq` is written (its fan-out is done). Read
    /// from the deliveries themselves: the fan-out's ack floor can stand still behind
    /// another event for long.
    async fn deliveries_written(
        &self,
        seq: u64,
        meta: &EventMeta,
        e: &str,
    ) -> Result<bool, StoreError> {
        for dest in &meta.destinations {
            if self.state_of(seq, dest, e).await?.is_none() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// A delivery's current state: (its stream sequence, record, body).
    async fn delivery_state(
        &self,
        destination: &str,
        e: &str,
    ) -> Result<Option<(u64, DeliveryRecord, Bytes)>, StoreError> {
        let Some((seq, payload)) = self.last(&self.names.delivery(destination, e)).await? else {
            return Ok(None);
        };
        let (rec, body) = decode_delivery(&payload)?;
        Ok(Some((seq, rec, body)))
    }

    /// How long the records that live as long as `meta`'s event are kept.
    fn keep(&self, meta: &EventMeta) -> Duration {
        let kept = match meta.keep_ms {
            0 => self.keep_events,
            ms => Duration::from_millis(ms),
        };
        // Until its fan-out writes the deliveries, the event is the only copy of them: it
        // is kept a day at least, however short `retain` and the window are (relays all
        // down, or the fan-out failing, for longer than those). What is kept with it, its
        // delivered states, stays as long: a fan-out made again reads every event kept, and
        // one whose states were gone would be sent again.
        kept.max(UNFANNED_KEPT)
    }

    /// The delivery of the event at `seq` (its event part `e`) to `destination`: on its
    /// usual subject, or kept apart on its own.
    async fn state_of(
        &self,
        seq: u64,
        destination: &str,
        e: &str,
    ) -> Result<Option<(u64, DeliveryRecord, Bytes)>, StoreError> {
        match self.delivery_state(destination, e).await? {
            Some(t) if t.1.delivery.seq == seq => Ok(Some(t)),
            // Another event's state, or none (any more: a delivered state expires).
            _ => Ok(self
                .delivery_state(destination, &apart(e, seq))
                .await?
                .filter(|t| t.1.delivery.seq == seq)),
        }
    }

    async fn write(&self, writes: &[Write]) -> Result<Written, StoreError> {
        // The stream is named by the prefix: no name built per write.
        write(&self.client, &self.names.prefix, writes, WRITE_TIMEOUT).await
    }
}

/// Dead letters one replay of a destination holds at once.
const REPLAY_CHUNK: usize = 256;

/// How many times an accept tries its conditional write while other instances change the
/// event's subject (a renewal racing another).
const RENEW_TRIES: usize = 3;

/// Whether the event `meta` was received within `window` before `now_ms`: a new event with
/// its id is then its duplicate.
fn within(meta: &EventMeta, window: Duration, now_ms: u64) -> bool {
    now_ms.saturating_sub(meta.received_ms) < window.as_millis() as u64
}

/// Whether a read or delete failed because the message is not there (and not because the
/// stream or anything else is missing).
fn not_found(e: &impl std::fmt::Display) -> bool {
    let s = e.to_string().to_lowercase();
    s.contains("no message found") || (s.contains("sequence") && s.contains("not found"))
}

#[async_trait]
impl Store for JetStreamStore {
    async fn accept(&self, ev: NewEvent) -> Result<Admission, StoreError> {
        let e = event_token(&ev.source, &ev.id);
        for (i, d) in ev.destinations.iter().enumerate() {
            if let Some(&max) = ev.max_queue.get(i) {
                if self.queue_depth(d) + self.unfanned.load(Ordering::Relaxed) >= max {
                    // A retry of an accepted event is still answered as the duplicate it is
                    // (with its kept reply), as the embedded stores do.
                    if let Some(dup) = self.duplicate(&e, &ev).await? {
                        return Ok(dup);
                    }
                    return Ok(Admission::QueueFull {
                        destination: d.clone(),
                    });
                }
            }
        }
        // An ordered event's places in its keys' lines come first, each a write of its own:
        // the order of a key's entries is its accept order. (An atomic batch with the event
        // would tie them to it, but nats-server stages each batch in a file store of its
        // own with one replica: a few hundred a second.)
        let mut lines: Vec<Option<Line>> = ev
            .order_keys
            .iter()
            .map(|k| k.clone().map(Line::new))
            .collect();
        let ordered = lines.iter().any(Option::is_some);
        let entries = match ordered {
            true => self.write_entries(&e, &ev.destinations, &mut lines).await?,
            false => lines::Entries::none(),
        };
        let meta = EventMeta {
            v: FORMAT,
            id: ev.id.clone(),
            source: ev.source.clone(),
            received_ms: ev.received_ms,
            content_type: ev.content_type.clone(),
            keep_ms: ev.dedup_window.max(self.retain).as_millis() as u64,
            destinations: ev.destinations.clone(),
            held: ev.held.clone(),
            lines: if ordered { lines } else { Vec::new() },
        };
        // One conditional write: the event with its destinations, only if no event with
        // this id is kept. An event with this id kept past its dedup window (it stays for
        // `retain`) is replaced instead, once its deliveries are written: this one is new.
        let window = ev.dedup_window;
        let payload = encode_event(&meta, &ev.body);
        // Each delivery record carries what the event record does (less the other
        // destinations' lines) and its own state: one that could not be written would
        // leave the event accepted but never fanned out.
        let limit = self.client.server_info().max_payload as u64;
        if payload.len() as u64 + setup::DELIVERY_STATE_ROOM > limit {
            entries.forget().await;
            return Ok(Admission::TooLarge { limit });
        }
        // Whether a write of the event failed without an answer: it may have landed.
        let mut unknown = false;
        let stored = async {
            let mut expect = 0;
            for _ in 0..RENEW_TRIES {
                let writes = [Write::new(self.names.event(&e), payload.clone())
                    .expect(expect)
                    .ttl(self.keep(&meta))];
                let written = self.write(&writes).await.inspect_err(|_| unknown = true)?;
                if let Written::Stored { first } = written {
                    let mut depths = self.depths.lock().unwrap();
                    for d in &ev.destinations {
                        *depths.entry(d.clone()).or_default() += 1;
                    }
                    return Ok(Admission::Accepted { seq: first });
                }
                match self.kept_event(&e).await? {
                    // Expired between the write and the read: write it as new.
                    None => expect = 0,
                    Some((seq, old)) if within(&old, window, ev.received_ms) => {
                        return self.kept_answer(seq, &old, &e, &ev).await;
                    }
                    Some((seq, old)) => {
                        if !self.deliveries_written(seq, &old, &e).await? {
                            break;
                        }
                        expect = seq;
                    }
                }
            }
            Err(StoreError::Unavailable(
                "an earlier event with this id is being replaced or fanned out; try again".into(),
            ))
        };
        let stored = stored.await;
        // Entries stand for the event once it is stored; they go now when it certainly is
        // not (a duplicate, every write refused), and are left to their line after a write
        // that failed unanswered (the event may have been stored all the same), as when
        // this accept is dropped (the ingress gave up).
        match &stored {
            Ok(Admission::Accepted { .. }) => {}
            Err(_) if unknown => {}
            _ => entries.forget().await,
        }
        stored
    }

    async fn pending(
        &self,
        destination: &str,
        limit: usize,
        skip: &(dyn Fn(u64) -> bool + Send + Sync),
    ) -> Result<Vec<Delivery>, StoreError> {
        let leases = self.leases_of(destination);
        leases.check_lapse();
        leases.drop_stale(skip);
        leases.window.store(limit.max(1), Ordering::Relaxed);
        leases.freed.notify_one();
        let mut out: Vec<Delivery> = leases
            .held
            .lock()
            .unwrap()
            .values()
            .filter(|l| !skip(l.rec.delivery.seq) && !l.stale)
            .map(|l| l.rec.delivery.clone())
            .collect();
        out.sort_by_key(|d| (d.next_due_ms, d.seq));
        out.truncate(limit);
        Ok(out)
    }

    fn still_held(&self, destination: &str, seq: u64) -> bool {
        let Some(leases) = self.leases.lock().unwrap().get(destination).cloned() else {
            return false;
        };
        leases.check_lapse();
        leases.holds(seq)
    }

    async fn hand_back(&self, destination: &str, in_flight: &(dyn Fn(u64) -> bool + Send + Sync)) {
        let leases = self.leases_of(destination);
        leases.window.store(0, Ordering::Relaxed);
        leases.release_idle(in_flight).await;
    }

    /// The earlier of what this instance holds and the backlog no instance has taken yet
    /// (deliveries other instances hold are being sent).
    async fn oldest_pending(&self, destination: &str) -> Result<Option<u64>, StoreError> {
        let backlog = self
            .backlog_oldest
            .lock()
            .unwrap()
            .get(destination)
            .copied();
        let Some(leases) = self.leases.lock().unwrap().get(destination).cloned() else {
            return Ok(backlog);
        };
        let held = leases.held.lock().unwrap();
        let held = held.values().map(|l| l.rec.event.received_ms).min();
        Ok(held.into_iter().chain(backlog).min())
    }

    async fn event(&self, seq: u64) -> Result<Option<StoredEvent>, StoreError> {
        let held: Vec<Arc<Leases>> = self.leases.lock().unwrap().values().cloned().collect();
        for l in held {
            if let Some(lease) = l.held.lock().unwrap().get(&seq) {
                return Ok(Some(stored_event(&lease.rec, lease.body.clone())));
            }
        }
        match self.stream.get_raw_message(seq).await {
            Ok(m) if self.names.is_event(&m.subject) => Ok(Some(decode_event(seq, &m.payload)?.1)),
            Ok(_) => Ok(None),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(StoreError::Unavailable(e.to_string())),
        }
    }

    async fn record(&self, key: &DeliveryKey, outcome: Outcome) -> Result<(), StoreError> {
        let leases = self.leases_of(&key.destination);
        // The lease stays held, and renewed, while its outcome is written.
        let Some((state_seq, mut rec, body)) = leases.get(key.seq) else {
            return Ok(()); // not held here (any more): another instance owns it
        };
        if let Outcome::Retry {
            attempt: Some(n), ..
        } = &outcome
        {
            if rec.delivery.attempts >= *n {
                // Counted already: the write landed though its answer never came, and
                // its new state is held again here. That lease stays, to be sent when due.
                return Ok(());
            }
        }
        let window_base = rec.delivery.window_base;
        rec.delivery.apply(&outcome, now_ms());
        let writes = self.state_writes(state_seq, &rec, &body);
        match self.write(&writes).await {
            Ok(w @ (Written::Stored { .. } | Written::Conflict)) => {
                // Conflict: another instance moved it on (a replay, or a lease it took
                // over); its state stands, but for a delivery made here all the same.
                let mut written = matches!(w, Written::Stored { .. });
                // A dead one it made delivered had left its order line when it died.
                let mut in_line = true;
                if !written && matches!(outcome, Outcome::Delivered { .. }) {
                    match self.delivered_over(&rec, window_base, &outcome).await {
                        Ok(Some((new_seq, new_rec, revived))) => {
                            leases.take_if(key.seq, new_seq);
                            (written, rec, in_line) = (true, new_rec, !revived);
                        }
                        Ok(None) => {}
                        Err(e) => {
                            warn!(destination = %key.destination, error = %e, "marking a delivery made after its hold lapsed as delivered failed; it may be sent again");
                        }
                    }
                }
                if !matches!(outcome, Outcome::Retry { .. }) {
                    let mut depths = self.depths.lock().unwrap();
                    if let Some(n) = depths.get_mut(&key.destination) {
                        *n = n.saturating_sub(1);
                    }
                }
                // No ack: the write replaced the held message on its subject (one message
                // per subject), and the server settles a pending message it removes as if
                // acked. An ack now would be one more operation per delivery for nothing.
                leases.take_if(key.seq, state_seq);
                if in_line {
                    self.advance_after(&rec, written).await;
                }
                Ok(())
            }
            // Still held as it was read: the write is tried again, or another instance
            // takes the delivery once the lease lapses.
            Err(e) => Err(e),
        }
    }

    fn after_reply(
        &self,
        seq: u64,
        reply: Option<StoredReply>,
        attempt: Option<(DeliveryKey, Outcome)>,
        fresh: bool,
    ) -> Result<(), StoreError> {
        let Some(me) = self.me.upgrade() else {
            return Err(StoreError::Closed);
        };
        self.tasks.spawn(async move {
            // The attempt is tried again a few times: not recorded before the held
            // delivery falls due, it is sent again.
            let (mut reply, mut attempt) = (reply, attempt);
            let mut pause = Duration::from_millis(250);
            for tries in 1.. {
                let Err(e) = me.store_reply(seq, reply.take(), &mut attempt, fresh).await else {
                    break;
                };
                if tries == REPLY_TRIES || me.stop.is_cancelled() {
                    warn!(error = %e, "recording a reply route's call failed; the delivery is sent again when it falls due");
                    break;
                }
                tokio::select! {
                    _ = me.stop.cancelled() => {}
                    _ = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(Duration::from_secs(4));
            }
        });
        Ok(())
    }

    async fn dead_after(
        &self,
        destination: Option<&str>,
        after: u64,
        limit: usize,
    ) -> Result<Vec<NamedDelivery>, StoreError> {
        // The cursor is the dead-letter index entry's sequence.
        let Some(from) = after.checked_add(1) else {
            return Ok(Vec::new());
        };
        Ok(self
            .dead_letters(destination, (from, u64::MAX), limit)
            .await?
            .into_iter()
            .map(|(entry, _, rec, _)| NamedDelivery {
                event_id: rec.event.id,
                source: rec.event.source,
                delivery: rec.delivery,
                cursor: entry,
            })
            .collect())
    }

    async fn replay(&self, which: ReplaySelector) -> Result<usize, StoreError> {
        let targets: Vec<(u64, DeliveryRecord, Bytes)> = match which {
            ReplaySelector::Destination(d) => {
                // All of them, a chunk at a time (bodies in memory: a chunk's), each index
                // entry once: the walk goes on past the last one read, and stops at the
                // stream's end as it was, so one that dies again meanwhile (a new index
                // entry) is not replayed twice by this request.
                let until = {
                    let mut stream = self.stream.clone();
                    let info = stream.info().await;
                    info.map_err(|e| StoreError::Unavailable(e.to_string()))?
                        .state
                        .last_sequence
                };
                let mut n = 0;
                let mut from = 1;
                loop {
                    let chunk = self
                        .dead_letters(Some(&d), (from, until), REPLAY_CHUNK)
                        .await?;
                    let Some(last) = chunk.last().map(|c| c.0) else {
                        break;
                    };
                    from = last + 1;
                    for (_, state_seq, rec, body) in chunk {
                        n += usize::from(self.reopen(state_seq, rec, body).await?);
                    }
                }
                return Ok(n);
            }
            ReplaySelector::EventId(id) => self.dead_with_id(&id).await?,
            ReplaySelector::Delivery {
                id,
                destination,
                seq,
            } => {
                let mut all = self.dead_with_id(&id).await?;
                all.retain(|(_, rec, _)| {
                    rec.delivery.destination == destination
                        && seq.is_none_or(|s| s == rec.delivery.seq)
                });
                all
            }
        };
        let mut n = 0;
        for (state_seq, rec, body) in targets {
            if self.reopen(state_seq, rec, body).await? {
                n += 1;
            }
        }
        Ok(n)
    }

    async fn lookup(&self, id: &str) -> Result<Vec<EventView>, StoreError> {
        self.events_with_id(id).await
    }

    async fn kept(&self, source: &str, id: &str) -> Result<bool, StoreError> {
        let e = event_token(source, id);
        Ok(self.last(&self.names.event(&e)).await?.is_some())
    }

    async fn recent(&self, query: &EventQuery) -> Result<EventPage, StoreError> {
        self.walk_back(query).await
    }

    async fn set_paused(&self, destination: &str, paused: bool) -> Result<(), StoreError> {
        let v = Bytes::from_static(if paused { b"1" } else { b"0" });
        let revision = self
            .pauses
            .put(token(destination), v)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        self.paused.apply(destination, paused, revision);
        self.wakeup_of(destination).notify_one();
        Ok(())
    }

    fn paused(&self, destination: &str) -> bool {
        self.paused.contains(destination)
    }

    async fn purge(&self, _retain: Duration) -> Result<usize, StoreError> {
        Ok(0) // the server does it: every record that ends carries its time to live
    }

    fn queue_depth(&self, destination: &str) -> u64 {
        self.depths
            .lock()
            .unwrap()
            .get(destination)
            .copied()
            .unwrap_or(0)
    }

    fn queue_depths(&self) -> Vec<(String, u64)> {
        self.depths
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(d, n)| (d.clone(), *n))
            .collect()
    }

    fn wakeup(&self, destination: &str) -> Arc<Notify> {
        self.leases_of(destination);
        self.wakeup_of(destination)
    }

    fn share(&self) -> usize {
        self.members.count()
    }

    fn share_breaker(&self, destination: &str, open: bool) {
        // At most once: a full backlog drops it, as a lost message would.
        let _ = self
            .breaker_changes
            .try_send((destination.to_string(), open));
    }

    fn breaker_news(&self) -> Option<crate::store::BreakerNews> {
        self.breaker_news.lock().unwrap().take()
    }

    fn largest_body(&self) -> Option<u64> {
        Some((self.client.server_info().max_payload as u64).saturating_sub(setup::RECORD_OVERHEAD))
    }

    fn delivers(&self, senders: usize) -> bool {
        self.members.rank() < senders.max(1)
    }

    fn available(&self) -> Result<(), String> {
        match self.client.connection_state() {
            State::Connected => {}
            other => return Err(format!("JetStream is not reachable ({other})")),
        }
        match self.stream_problem.lock().unwrap().as_ref() {
            Some(problem) => Err(problem.clone()),
            None => Ok(()),
        }
    }

    async fn probe(&self, _bytes: usize) -> Result<(), StoreError> {
        self.available().map_err(StoreError::Unavailable)?;
        // The stream's leader answers (a write needs it).
        match tokio::time::timeout(WRITE_TIMEOUT, self.stream.get_info()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Unavailable(e.to_string())),
            Err(_) => Err(StoreError::Unavailable(format!(
                "the stream did not answer within {WRITE_TIMEOUT:?}"
            ))),
        }
    }

    async fn close(&self) -> Result<(), StoreError> {
        self.stop.cancel();
        self.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(3), self.tasks.wait()).await;
        let all: Vec<Arc<Leases>> = self.leases.lock().unwrap().values().cloned().collect();
        // Handing back what this instance holds, and the flush, need the server (the
        // client answers a flush only once connected): out of reach, they are given up.
        // Every accept and outcome was acknowledged before it was answered or counted;
        // what is held here goes to the other instances once its ack wait lapses.
        let hand_back = async {
            for l in all {
                l.release().await;
            }
            let _ = self.client.flush().await;
        };
        if tokio::time::timeout(CLOSE_WAIT, hand_back).await.is_err() {
            tracing::warn!(
                "JetStream did not take the hand-back of held deliveries within {CLOSE_WAIT:?}; \
                 they go to the other instances once their ack wait lapses"
            );
        }
        Ok(())
    }
}
