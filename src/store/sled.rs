//! The sled engine: one tree; each operation's writes go in as one atomic batch, and a
//! group ends with one `flush` (which on Linux is `sync_file_range`, not `fsync`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::engine::{Engine, Txn, Visit};
use super::kv::KvStore;
use super::StoreError;

/// The store on sled.
pub type SledStore = KvStore<SledEngine>;

pub struct SledEngine {
    db: ::sled::Db,
}

impl From<::sled::Error> for StoreError {
    fn from(e: ::sled::Error) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

impl SledStore {
    /// Opens (or creates) the store in the directory `path`.
    pub fn open(path: &Path) -> Result<Arc<Self>, StoreError> {
        KvStore::start(SledEngine::open(path)?)
    }
}

/// How long an open waits for the store directory's lock.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl SledEngine {
    /// Opens (or creates) the engine's files in the directory `path`. The directory's lock
    /// may still be held for a moment by a store just closed (sled's threads let it go
    /// after the close returns) or a process still exiting: it is tried again for up to
    /// [`LOCK_WAIT`] before the error says the store is in use.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        super::engine::refuse_the_other_engines(path, "sled")?;
        let config = ::sled::Config::new()
            .path(path)
            .cache_capacity(32 << 20)
            .mode(::sled::Mode::HighThroughput)
            .flush_every_ms(Some(1000));
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match config.open() {
                Ok(db) => return Ok(SledEngine { db }),
                // sled reports a held lock as an `Other` I/O error with this text.
                // Held by another (EWOULDBLOCK); not a file system without locks (ENOLCK),
                // which no wait would mend.
                Err(::sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && e.to_string().contains("WouldBlock") =>
                {
                    if std::time::Instant::now() >= deadline {
                        return Err(StoreError::InUse(path.display().to_string()));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(StoreError::Unavailable(format!("{}: {e}", path.display()))),
            }
        }
    }
}

fn scan(
    tree: &::sled::Db,
    prefix: &[u8],
    from: &[u8],
    visit: &mut Visit<'_>,
) -> Result<(), StoreError> {
    for kv in tree.range(from.max(prefix)..) {
        let (k, v) = kv?;
        if !k.starts_with(prefix) || !visit(&k, &v)? {
            break;
        }
    }
    Ok(())
}

impl Engine for SledEngine {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get(key)?.map(|v| v.to_vec()))
    }
    fn scan_from(
        &self,
        prefix: &[u8],
        from: &[u8],
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        scan(&self.db, prefix, from, visit)
    }
    fn scan_back(
        &self,
        prefix: &[u8],
        below: &[u8],
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        if below <= prefix {
            return Ok(());
        }
        for kv in self.db.range(prefix..below).rev() {
            let (k, v) = kv?;
            if !visit(&k, &v)? {
                break;
            }
        }
        Ok(())
    }
    fn group(&self, f: &mut dyn FnMut(&mut dyn Txn)) -> Result<(), StoreError> {
        f(&mut SledTxn {
            db: &self.db,
            batch: ::sled::Batch::default(),
            overlay: BTreeMap::new(),
        });
        self.db.flush()?;
        Ok(())
    }
    fn sync(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
    fn atomic_groups(&self) -> bool {
        false // each operation is its own batch
    }
}

/// Buffers one operation's writes (readable through `overlay`) until `end_op`.
struct SledTxn<'a> {
    db: &'a ::sled::Db,
    batch: ::sled::Batch,
    overlay: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl Txn for SledTxn<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        Ok(self.db.get(key)?.map(|v| v.to_vec()))
    }
    /// Sees earlier operations of the group and the current one's own writes.
    fn scan_from(
        &mut self,
        prefix: &[u8],
        from: &[u8],
        visit: &mut Visit<'_>,
    ) -> Result<(), StoreError> {
        let start = from.max(prefix).to_vec();
        let mut mine = self
            .overlay
            .range(start.clone()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .peekable();
        let mut stored = self.db.range(start..).peekable();
        loop {
            let next_stored = match stored.peek() {
                Some(Ok((k, _))) if k.starts_with(prefix) => Some(k.to_vec()),
                Some(Err(_)) => return Err(stored.next().unwrap().unwrap_err().into()),
                _ => None,
            };
            let (k, v): (Vec<u8>, Option<Vec<u8>>) = match (mine.peek(), next_stored) {
                (None, None) => return Ok(()),
                // This operation's write comes first, or replaces the stored value.
                (Some((mk, _)), s) if s.as_ref().is_none_or(|sk| *mk <= sk) => {
                    if s.as_ref() == Some(*mk) {
                        stored.next();
                    }
                    let (mk, mv) = mine.next().unwrap();
                    (mk.clone(), mv.clone())
                }
                _ => {
                    let (k, v) = stored.next().unwrap()?;
                    (k.to_vec(), Some(v.to_vec()))
                }
            };
            if let Some(v) = v {
                if !visit(&k, &v)? {
                    return Ok(());
                }
            }
        }
    }
    fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.batch.insert(key, value);
        self.overlay.insert(key.to_vec(), Some(value.to_vec()));
        Ok(())
    }
    fn delete(&mut self, key: &[u8]) -> Result<(), StoreError> {
        self.batch.remove(key);
        self.overlay.insert(key.to_vec(), None);
        Ok(())
    }
    fn end_op(&mut self) -> Result<(), StoreError> {
        self.overlay.clear();
        self.db.apply_batch(std::mem::take(&mut self.batch))?;
        Ok(())
    }
    fn abort_op(&mut self) {
        self.overlay.clear();
        self.batch = ::sled::Batch::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Admission, DeliveryKey, NewEvent, Outcome, Store};
    use std::sync::{mpsc, Mutex};
    use std::time::Duration;

    /// A store whose directory is still locked (a store just closed, a process exiting)
    /// opens once the lock is let go within the wait; one locked past it is an error that
    /// says so.
    #[test]
    fn an_open_waits_for_the_directory_lock() {
        let dir = tempfile::tempdir().unwrap();
        let held = SledEngine::open(dir.path()).unwrap();
        let (tx, rx) = mpsc::channel();
        let releaser = std::thread::spawn(move || {
            rx.recv().unwrap();
            std::thread::sleep(Duration::from_millis(300));
            drop(held);
        });
        // Still held: the open waits, then fails: in use.
        let path = dir.path().to_path_buf();
        let started = std::time::Instant::now();
        let second = std::thread::spawn(move || SledEngine::open(&path).map(|_| ()));
        let e = match second.join().unwrap() {
            Err(e) => e,
            Ok(()) => panic!("opened while held"),
        };
        let gave_up = started.elapsed();
        assert!(matches!(e, StoreError::InUse(_)), "{e}");
        assert!(
            gave_up >= LOCK_WAIT,
            "gave up after {gave_up:?}, before the {LOCK_WAIT:?} wait"
        );
        // Let go 300 ms into the next open: it gets the store, having waited for it.
        let started = std::time::Instant::now();
        tx.send(()).unwrap();
        SledEngine::open(dir.path()).expect("opened once the lock was let go");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(250),
            "opened after {waited:?}: the lock was let go only 300 ms in"
        );
        releaser.join().unwrap();
    }

    /// sled under switches: when `armed`, a group stops between its writes (visible to
    /// readers: sled applies each operation's batch at once) and its flush, until released;
    /// with `fail_flush`, the next group's flush fails (its writes are made); reads and
    /// writes of keys under one of `fail_keys` fail.
    struct HeldSled {
        inner: SledEngine,
        armed: Arc<Mutex<Option<Hold>>>,
        fail_flush: Arc<std::sync::atomic::AtomicBool>,
        fail_keys: Arc<Mutex<&'static [&'static [u8]]>>,
    }

    impl HeldSled {
        fn new(inner: SledEngine) -> Self {
            HeldSled {
                inner,
                armed: Default::default(),
                fail_flush: Default::default(),
                fail_keys: Arc::new(Mutex::new(&[])),
            }
        }
    }

    /// Says the group reached its flush; then waits for the word to go on.
    type Hold = (mpsc::Sender<()>, mpsc::Receiver<()>);

    /// A group's transaction whose reads and writes of keys under one of `fail` fail.
    struct FailingKeys<'a> {
        inner: &'a mut dyn Txn,
        fail: &'static [&'static [u8]],
    }

    impl FailingKeys<'_> {
        fn check(&self, key: &[u8]) -> Result<(), StoreError> {
            match self.fail.iter().any(|p| key.starts_with(p)) {
                true => Err(StoreError::Unavailable("failed".into())),
                false => Ok(()),
            }
        }
    }

    impl Txn for FailingKeys<'_> {
        fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.check(key)?;
            self.inner.get(key)
        }
        fn scan_from(
            &mut self,
            p: &[u8],
            f: &[u8],
            visit: &mut Visit<'_>,
        ) -> Result<(), StoreError> {
            self.check(p)?;
            self.inner.scan_from(p, f, visit)
        }
        fn put(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
            self.check(key)?;
            self.inner.put(key, value)
        }
        fn delete(&mut self, key: &[u8]) -> Result<(), StoreError> {
            self.check(key)?;
            self.inner.delete(key)
        }
        fn end_op(&mut self) -> Result<(), StoreError> {
            self.inner.end_op()
        }
        fn abort_op(&mut self) {
            self.inner.abort_op()
        }
    }

    impl Engine for HeldSled {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
            self.inner.get(key)
        }
        fn scan_from(
            &self,
            prefix: &[u8],
            from: &[u8],
            visit: &mut Visit<'_>,
        ) -> Result<(), StoreError> {
            self.inner.scan_from(prefix, from, visit)
        }
        fn scan_back(&self, p: &[u8], b: &[u8], visit: &mut Visit<'_>) -> Result<(), StoreError> {
            self.inner.scan_back(p, b, visit)
        }
        fn group(&self, f: &mut dyn FnMut(&mut dyn Txn)) -> Result<(), StoreError> {
            let held = self.armed.lock().unwrap().take();
            let fail = *self.fail_keys.lock().unwrap();
            self.inner.group(&mut |txn| {
                f(&mut FailingKeys { inner: txn, fail });
                if let Some((reached, release)) = &held {
                    reached.send(()).unwrap();
                    release.recv_timeout(Duration::from_secs(10)).unwrap();
                }
            })?;
            if self
                .fail_flush
                .swap(false, std::sync::atomic::Ordering::Relaxed)
            {
                return Err(StoreError::Unavailable("flush failed".into()));
            }
            Ok(())
        }
        fn sync(&self) -> Result<(), StoreError> {
            self.inner.sync()
        }
        fn atomic_groups(&self) -> bool {
            false
        }
    }

    fn ordered_event(id: &str) -> NewEvent {
        NewEvent {
            source: "s".into(),
            id: id.into(),
            body: bytes::Bytes::from_static(b"{}"),
            content_type: None,
            received_ms: crate::clock::now_ms(),
            destinations: vec!["a".into()],
            max_queue: Vec::new(),
            order_keys: vec![Some("k".into())],
            held: None,
            dedup_window: Duration::from_secs(60),
        }
    }

    /// The pending count follows what sled holds when something fails: a group whose flush
    /// failed still made its writes (they count), an operation that failed made none (its
    /// changes do not count). Both were once counted the other way round.
    #[tokio::test]
    async fn queue_counts_follow_the_store_through_failures() {
        let dir = tempfile::tempdir().unwrap();
        let db = ::sled::Config::new().path(dir.path()).open().unwrap();
        let engine = HeldSled::new(SledEngine { db });
        let (fail_flush, fail_keys) = (engine.fail_flush.clone(), engine.fail_keys.clone());
        let st = crate::store::kv::KvStore::start(engine).unwrap();
        fail_flush.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(
            st.accept(ordered_event("k1")).await.is_err(),
            "the flush failed"
        );
        let Admission::Duplicate { seq, .. } = st.accept(ordered_event("k1")).await.unwrap() else {
            panic!("the event was written")
        };
        assert_eq!(st.queue_depth("a"), 1, "after the failed flush");
        // Delivered, but the operation fails at its last step (moving the key's line on).
        *fail_keys.lock().unwrap() = &[b"o/"];
        let key = DeliveryKey {
            seq,
            destination: "a".into(),
        };
        let delivered = Outcome::Delivered { status: 200 };
        assert!(st.record(&key, delivered.clone()).await.is_err());
        *fail_keys.lock().unwrap() = &[];
        assert_eq!(st.queue_depth("a"), 1, "after the failed operation");
        assert_eq!(st.pending("a", 10, &|_| false).await.unwrap().len(), 1);
        st.record(&key, delivered).await.unwrap();
        assert_eq!(st.queue_depth("a"), 0, "once delivered");
        st.close().await.unwrap();
    }

    /// A retry's outcome whose flush failed was still written: stored again (the scheduler
    /// tries until it is), it counts one attempt, not two.
    #[tokio::test]
    async fn a_retry_stored_again_after_a_failed_flush_counts_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = ::sled::Config::new().path(dir.path()).open().unwrap();
        let engine = HeldSled::new(SledEngine { db });
        let fail_flush = engine.fail_flush.clone();
        let st = crate::store::kv::KvStore::start(engine).unwrap();
        let Admission::Accepted { seq } = st.accept(ordered_event("k1")).await.unwrap() else {
            panic!()
        };
        let key = DeliveryKey {
            seq,
            destination: "a".into(),
        };
        let retry = Outcome::Retry {
            due_ms: crate::clock::now_ms(),
            status: Some(503),
            error: "HTTP 503".into(),
            attempt: Some(1),
        };
        fail_flush.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(st.record(&key, retry.clone()).await.is_err());
        st.record(&key, retry).await.unwrap();
        let due = st.pending("a", 10, &|_| false).await.unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].attempts, 1);
        st.close().await.unwrap();
    }

    /// A pause or a replay whose flush failed was still made (sled applies it first): the
    /// relay's view follows the store, so the destination is paused, and the replayed
    /// delivery counts as the oldest pending again.
    #[tokio::test]
    async fn a_pause_or_replay_whose_flush_failed_is_seen_as_made() {
        let dir = tempfile::tempdir().unwrap();
        let db = ::sled::Config::new().path(dir.path()).open().unwrap();
        let engine = HeldSled::new(SledEngine { db });
        let fail_flush = engine.fail_flush.clone();
        let st = crate::store::kv::KvStore::start(engine).unwrap();
        fail_flush.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(st.set_paused("a", true).await.is_err());
        assert!(st.paused("a"), "paused in the store, so paused");
        st.set_paused("a", false).await.unwrap();
        let (mut seqs, mut received) = (Vec::new(), Vec::new());
        for (id, ago) in [("e1", 2_000), ("e2", 1_000)] {
            let mut e = ordered_event(id);
            e.order_keys = Vec::new();
            e.received_ms -= ago;
            received.push(e.received_ms);
            let Admission::Accepted { seq } = st.accept(e).await.unwrap() else {
                panic!()
            };
            seqs.push(seq);
        }
        let first = DeliveryKey {
            seq: seqs[0],
            destination: "a".into(),
        };
        let dead = Outcome::Dead {
            status: Some(400),
            error: "HTTP 400".into(),
        };
        st.record(&first, dead).await.unwrap();
        assert_eq!(st.oldest_pending("a").await.unwrap(), Some(received[1]));
        fail_flush.store(true, std::sync::atomic::Ordering::Relaxed);
        let replay = crate::store::ReplaySelector::EventId("e1".into());
        assert!(st.replay(replay).await.is_err());
        assert_eq!(st.oldest_pending("a").await.unwrap(), Some(received[0]));
        st.close().await.unwrap();
    }

    /// When neither the kept counts nor the word to rebuild them can be written, the close
    /// does not mark the store clean, and the next start counts the queue.
    #[tokio::test]
    async fn counts_that_could_not_be_kept_are_rebuilt_at_the_next_start() {
        let dir = tempfile::tempdir().unwrap();
        let db = ::sled::Config::new().path(dir.path()).open().unwrap();
        let engine = HeldSled::new(SledEngine { db });
        let fail_keys = engine.fail_keys.clone();
        let st = crate::store::kv::KvStore::start(engine).unwrap();
        *fail_keys.lock().unwrap() = &[b"m/depth/", b"m/recount"];
        st.accept(ordered_event("k1")).await.unwrap();
        *fail_keys.lock().unwrap() = &[];
        st.close().await.unwrap();
        drop(st);
        let st = SledStore::open(dir.path()).unwrap();
        assert_eq!(st.queue_depth("a"), 1);
        st.close().await.unwrap();
    }

    /// The next of an order key's line, put in the due queue by its predecessor's outcome,
    /// is not handed to the scheduler before that outcome's group is flushed: a crash could
    /// take the outcome back, and the predecessor would then be sent after it.
    #[tokio::test]
    async fn a_due_entry_waits_for_its_groups_flush() {
        let dir = tempfile::tempdir().unwrap();
        let db = ::sled::Config::new().path(dir.path()).open().unwrap();
        let engine = HeldSled::new(SledEngine { db });
        let armed = engine.armed.clone();
        let st = crate::store::kv::KvStore::start(engine).unwrap();
        let mut seqs = Vec::new();
        for id in ["k1", "k2"] {
            let Admission::Accepted { seq } = st.accept(ordered_event(id)).await.unwrap() else {
                panic!("accepted")
            };
            seqs.push(seq);
        }
        let due = |st: Arc<KvStore<HeldSled>>| async move {
            let p = st.pending("a", 10, &|_| false).await.unwrap();
            p.iter().map(|d| d.seq).collect::<Vec<_>>()
        };
        assert_eq!(due(st.clone()).await, [seqs[0]]);
        let (reached_tx, reached) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        *armed.lock().unwrap() = Some((reached_tx, release_rx));
        let key = DeliveryKey {
            seq: seqs[0],
            destination: "a".into(),
        };
        let recording = {
            let st = st.clone();
            tokio::spawn(async move { st.record(&key, Outcome::Delivered { status: 200 }).await })
        };
        tokio::task::spawn_blocking(move || reached.recv_timeout(Duration::from_secs(10)))
            .await
            .unwrap()
            .expect("the group reached its flush");
        assert!(
            due(st.clone()).await.is_empty(),
            "the promoted head is not due before its group's flush"
        );
        release.send(()).unwrap();
        recording.await.unwrap().unwrap();
        assert_eq!(due(st.clone()).await, [seqs[1]], "due once flushed");
        st.close().await.unwrap();
    }

    /// A scan inside an operation sees that operation's own puts and deletes, merged in key
    /// order with what is stored.
    #[test]
    fn a_scan_sees_the_operations_own_writes() {
        let dir = tempfile::tempdir().unwrap();
        let db = ::sled::Config::new().path(dir.path()).open().unwrap();
        for k in [b"p/a", b"p/c", b"p/e"] {
            db.insert(k, b"stored").unwrap();
        }
        let engine = SledEngine { db };
        let mut seen = Vec::new();
        engine
            .group(&mut |txn| {
                txn.delete(b"p/c").unwrap();
                txn.put(b"p/b", b"mine").unwrap();
                txn.put(b"p/e", b"mine").unwrap();
                txn.put(b"q/x", b"other prefix").unwrap();
                txn.scan_prefix(b"p/", &mut |k, v| {
                    seen.push((k.to_vec(), v.to_vec()));
                    Ok(true)
                })
                .unwrap();
                txn.end_op().unwrap();
            })
            .unwrap();
        let seen: Vec<(&[u8], &[u8])> = seen.iter().map(|(k, v)| (&k[..], &v[..])).collect();
        assert_eq!(
            seen,
            [
                (&b"p/a"[..], &b"stored"[..]),
                (b"p/b", b"mine"),
                (b"p/e", b"mine")
            ]
        );
    }
}
