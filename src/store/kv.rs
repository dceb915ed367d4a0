//! The store's logic over any [`Engine`]: key layout, dedup, the delivery queue, and group
//! commit.
//!
//! One writer thread applies every mutation. Operations that queue up while a group commits
//! form the next group: one write transaction, one durable commit, then every caller of the
//! group is answered. So 64 concurrent accepts cost one commit, not 64, and committing never
//! blocks the async workers. Because one thread writes, dedup checks and state changes need
//! no locks. Reads go straight to the engine.
//!
//! Keys (integers big-endian so they sort):
//! - `e/<seq>` event: `u32` meta length, meta JSON, body bytes
//! - `d/<id>\0<source>` dedup record: seq, expiry (id first: lookups by id scan a prefix);
//!   expiry is checked when read, and the record goes when its event is purged
//! - `l/<seq><dest>` delivery record (JSON)
//! - `q/<dest>\0<due><seq>` pending deliveries in due order
//! - `z/<dest>\0<seq>` dead deliveries
//! - `r/<seq>` the stored answer of a reply route
//! - `p/<dest>` present while the destination is paused
//! - `m/depth/<dest>` pending deliveries per destination, updated with every group;
//!   `m/clean` marks a clean close, `m/recount` a failed count update. A start reads the
//!   counts instead of scanning the queue, unless they may disagree with it: after a crash
//!   on an engine whose groups are not atomic (sled), or after a failed update.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, Notify};

use super::engine::{Engine, Txn};
use super::*;

/// Operations one commit may cover at most.
const MAX_GROUP: usize = 4096;

/// Events one `recent` call looks at most: a filter that few events match still answers
/// promptly, with a cursor to go on from.
const RECENT_EXAMINE: usize = 10_000;

/// Events one purge operation looks at. A purge is as many operations as it takes, so the
/// writer serves other work between them and holds at most this many events' metadata.
const PURGE_BATCH: usize = 1024;

#[derive(Serialize, Deserialize)]
struct EventMeta {
    id: String,
    source: String,
    received_ms: u64,
    content_type: Option<String>,
}

type Done = Box<dyn FnOnce(Option<StoreError>) + Send>;
type Job = Box<dyn FnOnce(&mut Writer<'_>) -> Done + Send>;

/// Whether a job's caller is waiting on its commit to answer somebody (an accept: the
/// provider waits for its 200) or only bookkeeping that may ride with a later commit
/// (a delivery outcome: lost in a crash, the delivery is made again).
#[derive(Clone, Copy, PartialEq)]
enum Urgency {
    Now,
    CanWait,
}

/// How long a group made only of jobs that can wait stays open for company. Outcomes then
/// share the commit of the next accept instead of paying for one of their own: at 2,000
/// events/s that halves the commits (docs/performance.md).
const COMPANY_WAIT: Duration = Duration::from_millis(2);

struct Shared<E> {
    engine: Arc<E>,
    depth: RwLock<HashMap<String, Arc<AtomicU64>>>,
    wakeups: RwLock<HashMap<String, Arc<Notify>>>,
    /// Paused destinations (`p/` keys), as of the last commit.
    paused: RwLock<HashSet<String>>,
}

/// The writer thread's view of one group.
struct Writer<'a> {
    txn: &'a mut dyn Txn,
    /// Pending counts as of the last commit.
    committed: &'a RwLock<HashMap<String, Arc<AtomicU64>>>,
    next_seq: &'a mut u64,
    /// Queue depth changes, applied once the group is committed.
    depth: HashMap<String, i64>,
    /// Destinations to wake once the group is committed.
    wakes: HashSet<String>,
}

/// The store over engine `E`.
pub struct KvStore<E: Engine> {
    shared: Arc<Shared<E>>,
    jobs: Mutex<Option<mpsc::Sender<(Job, Urgency)>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn be(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

fn read_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

fn key(parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

fn queue_prefix(dest: &str) -> Vec<u8> {
    key(&[b"q/", dest.as_bytes(), b"\0"])
}
fn queue_key(dest: &str, due: u64, seq: u64) -> Vec<u8> {
    key(&[b"q/", dest.as_bytes(), b"\0", &be(due), &be(seq)])
}
fn dead_key(dest: &str, seq: u64) -> Vec<u8> {
    key(&[b"z/", dest.as_bytes(), b"\0", &be(seq)])
}
fn delivery_key(seq: u64, dest: &str) -> Vec<u8> {
    key(&[b"l/", &be(seq), dest.as_bytes()])
}
fn event_key(seq: u64) -> Vec<u8> {
    key(&[b"e/", &be(seq)])
}
fn reply_key(seq: u64) -> Vec<u8> {
    key(&[b"r/", &be(seq)])
}
/// Id first, so a lookup by id is a prefix scan.
fn dedup_key(source: &str, id: &str) -> Vec<u8> {
    key(&[b"d/", id.as_bytes(), b"\0", source.as_bytes()])
}
/// Pending deliveries of a destination, kept with every group.
fn depth_key(dest: &str) -> Vec<u8> {
    key(&[DEPTH_PREFIX, dest.as_bytes()])
}
const DEPTH_PREFIX: &[u8] = b"m/depth/";
/// Present while the store is closed cleanly: the kept counts are then exact.
const CLEAN_KEY: &[u8] = b"m/clean";
/// Present after a failed update of the kept counts: the next start counts the queue.
const RECOUNT_KEY: &[u8] = b"m/recount";
fn paused_key(dest: &str) -> Vec<u8> {
    key(&[PAUSED_PREFIX, dest.as_bytes()])
}
const PAUSED_PREFIX: &[u8] = b"p/";
fn id_prefix(id: &str) -> Vec<u8> {
    key(&[b"d/", id.as_bytes(), b"\0"])
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn encode_event(meta: &EventMeta, body: &[u8]) -> Vec<u8> {
    let m = serde_json::to_vec(meta).expect("meta serializes");
    let mut v = Vec::with_capacity(4 + m.len() + body.len());
    v.extend_from_slice(&(m.len() as u32).to_be_bytes());
    v.extend_from_slice(&m);
    v.extend_from_slice(body);
    v
}

/// An event record's metadata, and where its body starts.
fn decode_meta(raw: &[u8]) -> Result<(EventMeta, usize), StoreError> {
    if raw.len() < 4 {
        return Err(corrupt("short event record"));
    }
    let n = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]) as usize;
    let meta: EventMeta =
        serde_json::from_slice(raw.get(4..4 + n).ok_or_else(|| corrupt("short meta"))?)
            .map_err(corrupt)?;
    Ok((meta, 4 + n))
}

fn decode_event(seq: u64, raw: &[u8]) -> Result<StoredEvent, StoreError> {
    let (meta, body) = decode_meta(raw)?;
    Ok(StoredEvent {
        seq,
        id: meta.id,
        source: meta.source,
        received_ms: meta.received_ms,
        content_type: meta.content_type,
        body: Bytes::copy_from_slice(&raw[body..]),
    })
}

fn decode_delivery(v: &[u8]) -> Result<Delivery, StoreError> {
    serde_json::from_slice(v).map_err(corrupt)
}

fn encode_delivery(d: &Delivery) -> Vec<u8> {
    serde_json::to_vec(d).expect("delivery serializes")
}

/// The destination name in a `q/` or `z/` key.
fn dest_of(k: &[u8]) -> String {
    let end = k[2..]
        .iter()
        .position(|&c| c == 0)
        .map_or(k.len(), |p| p + 2);
    String::from_utf8_lossy(&k[2..end]).into_owned()
}

impl<E: Engine> Shared<E> {
    fn depth_counter(&self, dest: &str) -> Arc<AtomicU64> {
        if let Some(c) = self.depth.read().unwrap().get(dest) {
            return c.clone();
        }
        self.depth
            .write()
            .unwrap()
            .entry(dest.to_string())
            .or_default()
            .clone()
    }

    fn delivery(&self, seq: u64, dest: &str) -> Result<Option<Delivery>, StoreError> {
        self.engine
            .get(&delivery_key(seq, dest))?
            .map(|v| decode_delivery(&v))
            .transpose()
    }

    /// The event's id and source, without its body.
    fn meta(&self, seq: u64) -> Result<Option<EventMeta>, StoreError> {
        self.engine
            .get(&event_key(seq))?
            .map(|raw| decode_meta(&raw).map(|(m, _)| m))
            .transpose()
    }

    fn deliveries_of(&self, seq: u64) -> Result<Vec<Delivery>, StoreError> {
        let mut out = Vec::new();
        self.engine
            .scan_prefix(&key(&[b"l/", &be(seq)]), &mut |_, v| {
                out.push(decode_delivery(v)?);
                Ok(true)
            })?;
        Ok(out)
    }
}

impl Writer<'_> {
    fn committed_depth(&self, dest: &str) -> u64 {
        self.committed
            .read()
            .unwrap()
            .get(dest)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    fn delivery(&mut self, seq: u64, dest: &str) -> Result<Option<Delivery>, StoreError> {
        self.txn
            .get(&delivery_key(seq, dest))?
            .map(|v| decode_delivery(&v))
            .transpose()
    }

    fn deliveries_of(&mut self, seq: u64) -> Result<Vec<Delivery>, StoreError> {
        let mut out = Vec::new();
        self.txn
            .scan_prefix(&key(&[b"l/", &be(seq)]), &mut |_, v| {
                out.push(decode_delivery(v)?);
                Ok(true)
            })?;
        Ok(out)
    }

    fn accept(&mut self, ev: NewEvent) -> Result<Admission, StoreError> {
        let dk = dedup_key(&ev.source, &ev.id);
        if let Some(v) = self.txn.get(&dk)? {
            let (seq, expires) = (read_u64(&v), read_u64(&v[8..]));
            if expires > ev.received_ms {
                let reply = match self.txn.get(&reply_key(seq))? {
                    Some(r) => Some(serde_json::from_slice(&r).map_err(corrupt)?),
                    None => None,
                };
                return Ok(Admission::Duplicate { seq, reply });
            }
        }
        for (i, dest) in ev.destinations.iter().enumerate() {
            let Some(&max) = ev.max_queue.get(i) else {
                continue;
            };
            let committed = self.committed_depth(dest) as i64;
            if committed + self.depth.get(dest).copied().unwrap_or(0) >= max as i64 {
                return Ok(Admission::QueueFull {
                    destination: dest.clone(),
                });
            }
        }
        let seq = *self.next_seq;
        *self.next_seq += 1;
        let expires = ev.received_ms + ev.dedup_window.as_millis() as u64;
        let meta = EventMeta {
            id: ev.id.clone(),
            source: ev.source.clone(),
            received_ms: ev.received_ms,
            content_type: ev.content_type.clone(),
        };
        self.txn
            .put(&event_key(seq), &encode_event(&meta, &ev.body))?;
        self.txn.put(&dk, &key(&[&be(seq), &be(expires)]))?;
        for dest in &ev.destinations {
            let due = match &ev.held {
                Some((held, until)) if held == dest => *until,
                _ => ev.received_ms,
            };
            let d = Delivery {
                seq,
                destination: dest.clone(),
                state: DeliveryState::Pending,
                attempts: 0,
                window_base: 0,
                first_attempt_ms: None,
                next_due_ms: due,
                last_status: None,
                last_error: None,
                updated_ms: ev.received_ms,
            };
            self.txn
                .put(&delivery_key(seq, dest), &encode_delivery(&d))?;
            self.txn.put(&queue_key(dest, due, seq), &[])?;
        }
        for dest in &ev.destinations {
            *self.depth.entry(dest.clone()).or_default() += 1;
            self.wakes.insert(dest.clone());
        }
        Ok(Admission::Accepted { seq })
    }

    fn record(&mut self, k: &DeliveryKey, outcome: Outcome) -> Result<(), StoreError> {
        let Some(mut d) = self.delivery(k.seq, &k.destination)? else {
            return Ok(()); // purged meanwhile: nothing to record
        };
        if d.state != DeliveryState::Pending {
            return Ok(());
        }
        let now = now_ms();
        self.txn
            .delete(&queue_key(&k.destination, d.next_due_ms, k.seq))?;
        d.attempts += 1;
        d.first_attempt_ms.get_or_insert(now);
        d.updated_ms = now;
        let leaves_queue = match outcome {
            Outcome::Delivered { status } => {
                d.state = DeliveryState::Delivered;
                d.last_status = Some(status);
                d.last_error = None;
                true
            }
            Outcome::Retry {
                due_ms,
                status,
                error,
            } => {
                d.next_due_ms = due_ms;
                d.last_status = status;
                d.last_error = Some(error);
                self.txn
                    .put(&queue_key(&k.destination, due_ms, k.seq), &[])?;
                false
            }
            Outcome::Dead { status, error } => {
                d.state = DeliveryState::Dead;
                d.last_status = status;
                d.last_error = Some(error);
                self.txn.put(&dead_key(&k.destination, k.seq), &[])?;
                true
            }
        };
        self.txn
            .put(&delivery_key(k.seq, &k.destination), &encode_delivery(&d))?;
        if leaves_queue {
            *self.depth.entry(k.destination.clone()).or_default() -= 1;
        }
        Ok(())
    }

    fn replay_one(&mut self, seq: u64, dest: &str) -> Result<bool, StoreError> {
        let Some(mut d) = self.delivery(seq, dest)? else {
            return Ok(false);
        };
        if d.state != DeliveryState::Dead {
            return Ok(false);
        }
        let now = now_ms();
        d.state = DeliveryState::Pending;
        d.first_attempt_ms = None;
        d.window_base = d.attempts;
        d.next_due_ms = now;
        d.updated_ms = now;
        self.txn.delete(&dead_key(dest, seq))?;
        self.txn.put(&queue_key(dest, now, seq), &[])?;
        self.txn
            .put(&delivery_key(seq, dest), &encode_delivery(&d))?;
        *self.depth.entry(dest.to_string()).or_default() += 1;
        self.wakes.insert(dest.to_string());
        Ok(true)
    }

    fn replay(&mut self, which: ReplaySelector) -> Result<usize, StoreError> {
        let mut targets: Vec<(u64, String)> = Vec::new();
        match which {
            ReplaySelector::Destination(dest) => {
                self.txn
                    .scan_prefix(&key(&[b"z/", dest.as_bytes(), b"\0"]), &mut |k, _| {
                        targets.push((read_u64(&k[k.len() - 8..]), dest.clone()));
                        Ok(true)
                    })?;
            }
            ReplaySelector::EventId(id) => {
                let mut seqs = Vec::new();
                self.txn.scan_prefix(&id_prefix(&id), &mut |_, v| {
                    seqs.push(read_u64(v));
                    Ok(true)
                })?;
                for seq in seqs {
                    for d in self.deliveries_of(seq)? {
                        targets.push((seq, d.destination));
                    }
                }
            }
        }
        let mut n = 0;
        for (seq, dest) in targets {
            n += usize::from(self.replay_one(seq, &dest)?);
        }
        Ok(n)
    }

    /// Purges among the events from `from` on, looking at [`PURGE_BATCH`] at most. Events
    /// go, with their dedup record, once older than both `retain` and their dedup window and
    /// every delivery is delivered. Events are scanned in sequence (= arrival) order,
    /// stopping at the first one too young. Returns how many went and where the next batch
    /// starts (`None`: no older event left).
    fn purge_batch(
        &mut self,
        retain: Duration,
        from: u64,
    ) -> Result<(usize, Option<u64>), StoreError> {
        let now = now_ms();
        let cutoff = now.saturating_sub(retain.as_millis() as u64);
        let mut old = Vec::new();
        let mut next = None;
        self.txn.scan_from(b"e/", &event_key(from), &mut |k, raw| {
            let seq = read_u64(&k[2..10]);
            if old.len() == PURGE_BATCH {
                next = Some(seq);
                return Ok(false);
            }
            let (meta, _) = decode_meta(raw)?;
            if meta.received_ms >= cutoff {
                return Ok(false);
            }
            old.push((seq, meta));
            Ok(true)
        })?;
        let mut removed = 0;
        for (seq, meta) in old {
            let dk = dedup_key(&meta.source, &meta.id);
            let dedup = self.txn.get(&dk)?;
            let ours = dedup.as_ref().is_some_and(|v| read_u64(v) == seq);
            if ours && dedup.as_ref().is_some_and(|v| read_u64(&v[8..]) > now) {
                continue; // still inside its dedup window
            }
            let deliveries = self.deliveries_of(seq)?;
            if deliveries
                .iter()
                .any(|d| d.state != DeliveryState::Delivered)
            {
                continue;
            }
            if ours {
                self.txn.delete(&dk)?;
            }
            for d in deliveries {
                self.txn.delete(&delivery_key(seq, &d.destination))?;
            }
            self.txn.delete(&event_key(seq))?;
            self.txn.delete(&reply_key(seq))?;
            removed += 1;
        }
        Ok((removed, next))
    }
}

fn writer_loop<E: Engine>(
    shared: Arc<Shared<E>>,
    mut next_seq: u64,
    rx: mpsc::Receiver<(Job, Urgency)>,
) {
    let mut done: Vec<Done> = Vec::with_capacity(MAX_GROUP);
    while let Ok((first, urgency)) = rx.recv() {
        let mut first = Some(first);
        let mut urgent = urgency == Urgency::Now;
        let mut depth = HashMap::new();
        let mut wakes = HashSet::new();
        let committed = shared.engine.group(&mut |txn| {
            let mut w = Writer {
                txn,
                committed: &shared.depth,
                next_seq: &mut next_seq,
                depth: HashMap::new(),
                wakes: HashSet::new(),
            };
            if let Some(job) = first.take() {
                done.push(job(&mut w));
            }
            let company_until = Instant::now() + COMPANY_WAIT;
            while done.len() < MAX_GROUP {
                let (job, urgency) = match rx.try_recv() {
                    Ok(next) => next,
                    Err(_) if urgent => break,
                    Err(_) => {
                        let left = company_until.saturating_duration_since(Instant::now());
                        match rx.recv_timeout(left) {
                            Ok(next) => next,
                            Err(_) => break,
                        }
                    }
                };
                urgent |= urgency == Urgency::Now;
                done.push(job(&mut w));
            }
            if let Err(e) = persist_depth(w.txn, &w.depth) {
                w.txn.abort_op();
                let _ = w.txn.put(RECOUNT_KEY, b"1").and_then(|_| w.txn.end_op());
                tracing::warn!(error = %e, "keeping the queue counts failed; rebuilt at the next start");
            }
            depth = std::mem::take(&mut w.depth);
            wakes = std::mem::take(&mut w.wakes);
        });
        if let Some(job) = first.take() {
            // The transaction could not even start: the operation fails unrun.
            let e = committed
                .err()
                .unwrap_or_else(|| StoreError::Unavailable("no transaction".into()));
            let d = job(&mut Writer {
                txn: &mut FailedTxn(e.clone()),
                committed: &shared.depth,
                next_seq: &mut next_seq,
                depth: HashMap::new(),
                wakes: HashSet::new(),
            });
            d(Some(e));
            continue;
        }
        // Counters first, so a caller that reads them after its answer sees its change.
        if committed.is_ok() {
            for (dest, delta) in depth {
                let c = shared.depth_counter(&dest);
                if delta >= 0 {
                    c.fetch_add(delta as u64, Ordering::Relaxed);
                } else {
                    let down = delta.unsigned_abs();
                    let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                        Some(v.saturating_sub(down))
                    });
                }
            }
        }
        for d in done.drain(..) {
            d(committed.as_ref().err().cloned());
        }
        if committed.is_ok() {
            let wakeups = shared.wakeups.read().unwrap();
            for dest in wakes {
                if let Some(n) = wakeups.get(&dest) {
                    n.notify_one();
                }
            }
        }
    }
    let _ = shared.engine.sync();
}

/// Adds a group's queue changes to the kept counts (an operation of its own, last).
fn persist_depth(txn: &mut dyn Txn, deltas: &HashMap<String, i64>) -> Result<(), StoreError> {
    for (dest, delta) in deltas {
        if *delta == 0 {
            continue;
        }
        let k = depth_key(dest);
        let cur = txn.get(&k)?.map_or(0, |v| read_u64(&v));
        let new = if *delta >= 0 {
            cur.saturating_add(*delta as u64)
        } else {
            cur.saturating_sub(delta.unsigned_abs())
        };
        txn.put(&k, &be(new))?;
    }
    txn.end_op()
}

/// The pending count per destination: the kept counts after a clean close, else a count of
/// the queue (which then replaces the kept counts). Marks the store as open (not clean).
fn load_depths<E: Engine>(engine: &E) -> Result<HashMap<String, u64>, StoreError> {
    let trusted = engine.get(RECOUNT_KEY)?.is_none()
        && (engine.get(CLEAN_KEY)?.is_some() || engine.atomic_groups());
    let mut kept: HashMap<String, u64> = HashMap::new();
    engine.scan_prefix(DEPTH_PREFIX, &mut |k, v| {
        let dest = String::from_utf8_lossy(&k[DEPTH_PREFIX.len()..]).into_owned();
        kept.insert(dest, read_u64(v));
        Ok(true)
    })?;
    let depth = if trusted {
        kept.clone()
    } else {
        let mut counted: HashMap<String, u64> = HashMap::new();
        engine.scan_prefix(b"q/", &mut |k, _| {
            *counted.entry(dest_of(k)).or_default() += 1;
            Ok(true)
        })?;
        counted
    };
    let mut failed = None;
    engine.group(&mut |txn| {
        let mut write = || -> Result<(), StoreError> {
            txn.delete(CLEAN_KEY)?;
            txn.delete(RECOUNT_KEY)?;
            if !trusted {
                for dest in kept.keys() {
                    txn.put(&depth_key(dest), &be(depth.get(dest).copied().unwrap_or(0)))?;
                }
                for (dest, n) in &depth {
                    txn.put(&depth_key(dest), &be(*n))?;
                }
            }
            txn.end_op()
        };
        failed = write().err();
    })?;
    match failed {
        Some(e) => Err(e),
        None => Ok(depth),
    }
}

/// Stands in when a group's transaction cannot even start: every operation fails.
struct FailedTxn(StoreError);

impl Txn for FailedTxn {
    fn get(&mut self, _: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Err(self.0.clone())
    }
    fn scan_from(
        &mut self,
        _: &[u8],
        _: &[u8],
        _: &mut engine::Visit<'_>,
    ) -> Result<(), StoreError> {
        Err(self.0.clone())
    }
    fn put(&mut self, _: &[u8], _: &[u8]) -> Result<(), StoreError> {
        Err(self.0.clone())
    }
    fn delete(&mut self, _: &[u8]) -> Result<(), StoreError> {
        Err(self.0.clone())
    }
    fn end_op(&mut self) -> Result<(), StoreError> {
        Err(self.0.clone())
    }
    fn abort_op(&mut self) {}
}

impl<E: Engine> KvStore<E> {
    /// Starts the store over an opened engine: counts pending deliveries per destination
    /// and starts the writer thread.
    pub fn start(engine: E) -> Result<Arc<Self>, StoreError> {
        let engine = Arc::new(engine);
        let depth: HashMap<String, Arc<AtomicU64>> = load_depths(engine.as_ref())?
            .into_iter()
            .map(|(d, n)| (d, Arc::new(AtomicU64::new(n))))
            .collect();
        let next_seq = match engine.last_with_prefix(b"e/")? {
            Some(k) if k.len() >= 10 => read_u64(&k[2..10]) + 1,
            _ => 1,
        };
        let mut paused = HashSet::new();
        engine.scan_prefix(PAUSED_PREFIX, &mut |k, _| {
            paused.insert(String::from_utf8_lossy(&k[PAUSED_PREFIX.len()..]).into_owned());
            Ok(true)
        })?;
        let shared = Arc::new(Shared {
            engine,
            depth: RwLock::new(depth),
            wakeups: RwLock::new(HashMap::new()),
            paused: RwLock::new(paused),
        });
        let (tx, rx) = mpsc::channel::<(Job, Urgency)>();
        let s2 = shared.clone();
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(s2, next_seq, rx))
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(Arc::new(KvStore {
            shared,
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
        }))
    }

    /// Runs `f` on the writer thread as one atomic operation and waits until its group is
    /// committed.
    async fn submit<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Writer<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.submit_with(Urgency::Now, f).await
    }

    async fn submit_with<T: Send + 'static>(
        &self,
        urgency: Urgency,
        f: impl FnOnce(&mut Writer<'_>) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |w: &mut Writer<'_>| {
            let r = match f(w) {
                Ok(v) => w.txn.end_op().map(|_| v),
                Err(e) => {
                    w.txn.abort_op();
                    Err(e)
                }
            };
            Box::new(move |commit_err: Option<StoreError>| {
                let _ = tx.send(match commit_err {
                    Some(e) => Err(e),
                    None => r,
                });
            })
        });
        {
            let guard = self.jobs.lock().unwrap();
            let sender = guard.as_ref().ok_or(StoreError::Closed)?;
            sender
                .send((job, urgency))
                .map_err(|_| StoreError::Closed)?;
        }
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

impl<E: Engine> Drop for KvStore<E> {
    /// Stops the writer after what is queued (without the clean mark `close` writes), so
    /// the engine's files are released when the store is.
    fn drop(&mut self) {
        drop(self.jobs.lock().unwrap().take());
        if let Some(h) = self.writer.lock().unwrap().take() {
            let _ = h.join();
        }
    }
}

#[async_trait]
impl<E: Engine> Store for KvStore<E> {
    async fn accept(&self, ev: NewEvent) -> Result<Admission, StoreError> {
        self.submit(move |w| w.accept(ev)).await
    }

    async fn pending(
        &self,
        destination: &str,
        limit: usize,
        skip: &(dyn Fn(u64) -> bool + Send + Sync),
    ) -> Result<Vec<Delivery>, StoreError> {
        let prefix = queue_prefix(destination);
        let mut found = Vec::new();
        self.shared.engine.scan_prefix(&prefix, &mut |k, _| {
            if found.len() >= limit {
                return Ok(false);
            }
            let seq = read_u64(&k[k.len() - 8..]);
            if !skip(seq) {
                found.push((seq, read_u64(&k[prefix.len()..])));
            }
            Ok(true)
        })?;
        let mut out = Vec::with_capacity(found.len());
        for (seq, due) in found {
            if let Some(mut d) = self.shared.delivery(seq, destination)? {
                if d.state == DeliveryState::Pending {
                    d.next_due_ms = due;
                    out.push(d);
                }
            }
        }
        Ok(out)
    }

    async fn event(&self, seq: u64) -> Result<Option<StoredEvent>, StoreError> {
        self.shared
            .engine
            .get(&event_key(seq))?
            .map(|raw| decode_event(seq, &raw))
            .transpose()
    }

    async fn record(&self, key: &DeliveryKey, outcome: Outcome) -> Result<(), StoreError> {
        let k = key.clone();
        self.submit_with(Urgency::CanWait, move |w| w.record(&k, outcome))
            .await
    }

    fn after_reply(
        &self,
        seq: u64,
        reply: Option<StoredReply>,
        attempt: Option<(DeliveryKey, Outcome)>,
    ) -> Result<(), StoreError> {
        let job: Job = Box::new(move |w: &mut Writer<'_>| {
            let mut r = Ok(());
            if let Some(reply) = reply {
                let v = serde_json::to_vec(&reply).expect("reply serializes");
                r = w.txn.put(&reply_key(seq), &v);
            }
            if let (Ok(()), Some((key, outcome))) = (&r, attempt) {
                r = w.record(&key, outcome);
            }
            r = match r {
                Ok(()) => w.txn.end_op(),
                Err(e) => {
                    w.txn.abort_op();
                    Err(e)
                }
            };
            Box::new(move |commit_err: Option<StoreError>| {
                if let Some(e) = commit_err.or(r.err()) {
                    tracing::warn!(seq, error = %e, "keeping a reply route's answer failed");
                }
            })
        });
        let guard = self.jobs.lock().unwrap();
        let sender = guard.as_ref().ok_or(StoreError::Closed)?;
        sender
            .send((job, Urgency::CanWait))
            .map_err(|_| StoreError::Closed)
    }

    async fn dead(
        &self,
        destination: Option<&str>,
        limit: usize,
    ) -> Result<Vec<NamedDelivery>, StoreError> {
        let prefix = match destination {
            Some(d) => key(&[b"z/", d.as_bytes(), b"\0"]),
            None => b"z/".to_vec(),
        };
        let mut found = Vec::new();
        self.shared.engine.scan_prefix(&prefix, &mut |k, _| {
            if found.len() >= limit {
                return Ok(false);
            }
            found.push((read_u64(&k[k.len() - 8..]), dest_of(k)));
            Ok(true)
        })?;
        let mut out = Vec::new();
        for (seq, dest) in found {
            let (Some(delivery), Some(meta)) =
                (self.shared.delivery(seq, &dest)?, self.shared.meta(seq)?)
            else {
                continue;
            };
            out.push(NamedDelivery {
                event_id: meta.id,
                source: meta.source,
                delivery,
            });
        }
        Ok(out)
    }

    async fn recent(&self, q: &EventQuery) -> Result<EventPage, StoreError> {
        let below = event_key(q.before.unwrap_or(u64::MAX));
        let limit = q.limit.max(1);
        let mut events = Vec::new();
        let mut next = None;
        let mut examined = 0;
        let shared = &self.shared;
        shared.engine.scan_back(b"e/", &below, &mut |k, raw| {
            let seq = read_u64(&k[2..10]);
            if events.len() == limit || examined == RECENT_EXAMINE {
                next = Some(seq + 1);
                return Ok(false);
            }
            examined += 1;
            let event = decode_event(seq, raw)?;
            if q.source.as_ref().is_some_and(|s| &event.source != s) {
                return Ok(true);
            }
            let deliveries = shared.deliveries_of(seq)?;
            let wanted = |d: &Delivery| {
                q.destination.as_ref().is_none_or(|n| &d.destination == n)
                    && q.state.is_none_or(|s| d.state == s)
            };
            if (q.destination.is_some() || q.state.is_some()) && !deliveries.iter().any(wanted) {
                return Ok(true);
            }
            events.push(EventView { event, deliveries });
            Ok(true)
        })?;
        Ok(EventPage { events, next })
    }

    async fn set_paused(&self, destination: &str, paused: bool) -> Result<(), StoreError> {
        let dest = destination.to_string();
        self.submit(move |w| {
            if paused {
                w.txn.put(&paused_key(&dest), b"1")
            } else {
                w.txn.delete(&paused_key(&dest))
            }
        })
        .await?;
        let mut set = self.shared.paused.write().unwrap();
        if paused {
            set.insert(destination.to_string());
        } else {
            set.remove(destination);
            drop(set);
            self.wakeup(destination).notify_one();
        }
        Ok(())
    }

    fn paused(&self, destination: &str) -> bool {
        self.shared.paused.read().unwrap().contains(destination)
    }

    async fn replay(&self, which: ReplaySelector) -> Result<usize, StoreError> {
        self.submit(move |w| w.replay(which)).await
    }

    async fn lookup(&self, id: &str) -> Result<Vec<EventView>, StoreError> {
        let mut seqs = Vec::new();
        self.shared
            .engine
            .scan_prefix(&id_prefix(id), &mut |_, v| {
                seqs.push(read_u64(v));
                Ok(true)
            })?;
        let mut out = Vec::new();
        for seq in seqs {
            if let Some(event) = self.event(seq).await? {
                out.push(EventView {
                    event,
                    deliveries: self.shared.deliveries_of(seq)?,
                });
            }
        }
        Ok(out)
    }

    async fn purge(&self, retain: Duration) -> Result<usize, StoreError> {
        let (mut removed, mut from) = (0, 0);
        loop {
            let (n, next) = self.submit(move |w| w.purge_batch(retain, from)).await?;
            removed += n;
            match next {
                Some(seq) if seq > from => from = seq,
                _ => return Ok(removed),
            }
        }
    }

    fn queue_depth(&self, destination: &str) -> u64 {
        self.shared
            .depth
            .read()
            .unwrap()
            .get(destination)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    fn queue_depths(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .shared
            .depth
            .read()
            .unwrap()
            .iter()
            .map(|(k, c)| (k.clone(), c.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect();
        v.sort();
        v
    }

    fn wakeup(&self, destination: &str) -> Arc<Notify> {
        if let Some(n) = self.shared.wakeups.read().unwrap().get(destination) {
            return n.clone();
        }
        self.shared
            .wakeups
            .write()
            .unwrap()
            .entry(destination.to_string())
            .or_default()
            .clone()
    }

    async fn close(&self) -> Result<(), StoreError> {
        let sender = self.jobs.lock().unwrap().take();
        drop(sender);
        let handle = self.writer.lock().unwrap().take();
        if let Some(h) = handle {
            tokio::task::spawn_blocking(move || h.join())
                .await
                .map_err(|e| StoreError::Unavailable(e.to_string()))?
                .map_err(|_| StoreError::Unavailable("writer thread panicked".into()))?;
        }
        // Every write is done: the kept counts are exact; say so for the next start.
        let engine = self.shared.engine.clone();
        tokio::task::spawn_blocking(move || {
            let mut marked = Ok(());
            engine.group(&mut |txn| {
                marked = txn.put(CLEAN_KEY, b"1").and_then(|_| txn.end_op());
            })?;
            marked?;
            engine.sync()
        })
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(id: &str, dests: &[&str]) -> NewEvent {
        NewEvent {
            source: "s".into(),
            id: id.into(),
            body: Bytes::from_static(b"{}"),
            content_type: Some("application/json".into()),
            received_ms: now_ms(),
            destinations: dests.iter().map(|s| s.to_string()).collect(),
            max_queue: Vec::new(),
            held: None,
            dedup_window: Duration::from_secs(60),
        }
    }

    async fn accept_dedup_record_replay(st: Arc<dyn Store>) {
        let a = st.accept(ev("e1", &["a", "b"])).await.unwrap();
        let Admission::Accepted { seq } = a else {
            panic!("{a:?}")
        };
        assert!(matches!(
            st.accept(ev("e1", &["a", "b"])).await.unwrap(),
            Admission::Duplicate { .. }
        ));
        assert_eq!(st.queue_depth("a"), 1);
        let p = st.pending("a", 10, &|_| false).await.unwrap();
        assert_eq!(p.len(), 1);
        let k = DeliveryKey {
            seq,
            destination: "a".into(),
        };
        st.record(
            &k,
            Outcome::Dead {
                status: Some(400),
                error: "HTTP 400".into(),
            },
        )
        .await
        .unwrap();
        assert_eq!(st.queue_depth("a"), 0);
        assert_eq!(st.dead(Some("a"), 10).await.unwrap().len(), 1);
        assert_eq!(st.dead(None, 10).await.unwrap().len(), 1);
        assert_eq!(
            st.replay(ReplaySelector::EventId("e1".into()))
                .await
                .unwrap(),
            1
        );
        assert_eq!(st.queue_depth("a"), 1);
        assert!(st.dead(None, 10).await.unwrap().is_empty());
        let views = st.lookup("e1").await.unwrap();
        assert_eq!(views.len(), 1);
        assert_eq!(views[0].deliveries.len(), 2);
        st.close().await.unwrap();
    }

    async fn dedup_expires_and_purge_keeps_undelivered(st: Arc<dyn Store>) {
        let mut e = ev("e2", &["a"]);
        e.dedup_window = Duration::from_millis(1);
        e.received_ms -= 10;
        let Admission::Accepted { seq: old } = st.accept(e.clone()).await.unwrap() else {
            panic!()
        };
        // Window passed: the same id is a new event.
        assert!(matches!(
            st.accept(ev("e2", &["a"])).await.unwrap(),
            Admission::Accepted { .. }
        ));
        // Nothing delivered yet: nothing goes.
        assert_eq!(st.purge(Duration::ZERO).await.unwrap(), 0);
        let k = DeliveryKey {
            seq: old,
            destination: "a".into(),
        };
        st.record(&k, Outcome::Delivered { status: 200 })
            .await
            .unwrap();
        assert_eq!(st.purge(Duration::ZERO).await.unwrap(), 1);
        assert!(st.event(old).await.unwrap().is_none());
        // The newer event, still pending, stays and is found by id.
        assert_eq!(st.lookup("e2").await.unwrap().len(), 1);
        st.close().await.unwrap();
    }

    /// Old undelivered events fill more than one purge batch; a delivered event after them
    /// still goes, and the undelivered ones stay.
    async fn purge_crosses_batches(st: Arc<dyn Store>) {
        let n = PURGE_BATCH as u64 + 100;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let st = st.clone();
            tasks.spawn(async move {
                let mut e = ev(&format!("old-{i}"), &["a"]);
                e.dedup_window = Duration::ZERO;
                e.received_ms -= 10;
                st.accept(e).await.unwrap();
            });
        }
        while tasks.join_next().await.is_some() {}
        let mut e = ev("e1", &["a"]);
        e.dedup_window = Duration::ZERO;
        e.received_ms -= 10;
        let Admission::Accepted { seq } = st.accept(e).await.unwrap() else {
            panic!()
        };
        let k = DeliveryKey {
            seq,
            destination: "a".into(),
        };
        st.record(&k, Outcome::Delivered { status: 200 })
            .await
            .unwrap();
        assert_eq!(st.purge(Duration::ZERO).await.unwrap(), 1);
        assert!(st.event(seq).await.unwrap().is_none());
        assert_eq!(st.queue_depth("a"), n);
        assert_eq!(st.lookup("old-0").await.unwrap().len(), 1);
        // Keep one event for the reopen check of `on_every_engine`.
        st.accept(ev("e1", &["a"])).await.unwrap();
    }

    type Open = fn(&std::path::Path) -> Result<Arc<dyn Store>, StoreError>;

    /// Every engine, by name, with how to open a store on it.
    const ENGINES: [(&str, Open); 2] = [
        ("sled", |p| {
            Ok(crate::store::sled::SledStore::open(p)? as Arc<dyn Store>)
        }),
        ("redb", |p| {
            Ok(crate::store::redb::RedbStore::open(p)? as Arc<dyn Store>)
        }),
    ];

    /// Every engine passes the same checks, and keeps its data across a reopen.
    async fn on_every_engine(check: fn(Arc<dyn Store>) -> BoxCheck) {
        for (name, open) in ENGINES {
            let dir = tempfile::tempdir().unwrap();
            let st = open(dir.path()).unwrap_or_else(|e| panic!("{name}: {e}"));
            check(st.clone()).await;
            st.close().await.unwrap();
            drop(st);
            let again = open(dir.path()).unwrap_or_else(|e| panic!("{name} reopen: {e}"));
            assert!(
                !again.lookup("e1").await.unwrap().is_empty()
                    || !again.lookup("e2").await.unwrap().is_empty(),
                "{name}: data survives a reopen"
            );
            again.close().await.unwrap();
        }
    }

    type BoxCheck = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

    #[tokio::test]
    async fn accept_dedup_record_replay_on_every_engine() {
        on_every_engine(|st| Box::pin(accept_dedup_record_replay(st))).await;
    }

    #[tokio::test]
    async fn purge_on_every_engine() {
        on_every_engine(|st| Box::pin(dedup_expires_and_purge_keeps_undelivered(st))).await;
        on_every_engine(|st| Box::pin(purge_crosses_batches(st))).await;
    }

    /// Queue counts come back exact after a clean close (read, not counted) and after a
    /// crash (rebuilt from the queue on sled, read on redb whose groups are atomic), on
    /// every engine.
    #[tokio::test]
    async fn queue_counts_survive_close_and_crash() {
        for (name, open) in ENGINES {
            let dir = tempfile::tempdir().unwrap();
            let st = open(dir.path()).unwrap();
            let mut seqs = Vec::new();
            for i in 0..3 {
                match st.accept(ev(&format!("q{i}"), &["a", "b"])).await.unwrap() {
                    Admission::Accepted { seq } => seqs.push(seq),
                    d => panic!("{d:?}"),
                }
            }
            let k = DeliveryKey {
                seq: seqs[0],
                destination: "a".into(),
            };
            st.record(&k, Outcome::Delivered { status: 200 })
                .await
                .unwrap();
            st.close().await.unwrap();
            drop(st);
            let st = open(dir.path()).unwrap();
            assert_eq!(st.queue_depth("a"), 2, "{name}: after a clean close");
            assert_eq!(st.queue_depth("b"), 3, "{name}: after a clean close");
            // A crash: no close, so no clean mark; one more accepted first.
            st.accept(ev("q9", &["a"])).await.unwrap();
            drop(st);
            let st = open(dir.path()).unwrap();
            assert_eq!(st.queue_depth("a"), 3, "{name}: after a crash");
            assert_eq!(st.queue_depth("b"), 3, "{name}: after a crash");
            st.close().await.unwrap();
        }
    }
}
