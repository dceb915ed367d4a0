//! The store's checks, run on every engine.

use bytes::Bytes;

use super::ops::{PURGE_BATCH, REPLAY_CHUNK};
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
        order_keys: Vec::new(),
        held: None,
        dedup_window: Duration::from_secs(60),
    }
}

/// Records a final 400 on the delivery of `seq` to `dest`: it is dead.
async fn refused(st: &dyn Store, seq: u64, dest: &str) {
    let k = DeliveryKey {
        seq,
        destination: dest.into(),
    };
    let dead = Outcome::Dead {
        status: Some(400),
        error: "HTTP 400".into(),
    };
    st.record(&k, dead).await.unwrap();
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
    refused(st.as_ref(), seq, "a").await;
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
    // An id with a NUL in it is another id: a lookup or replay of `e1` leaves it alone.
    let Admission::Accepted { seq: other } = st.accept(ev("e1\0x", &["a"])).await.unwrap() else {
        panic!("accepted")
    };
    refused(st.as_ref(), other, "a").await;
    assert_eq!(st.lookup("e1").await.unwrap().len(), 1);
    assert_eq!(
        st.replay(ReplaySelector::EventId("e1".into()))
            .await
            .unwrap(),
        0
    );
    assert_eq!(st.dead(Some("a"), 10).await.unwrap().len(), 1);
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

/// A purge that removes the newest events does not let a restart give their sequence
/// numbers again (the admin API's cursors and `seq=` name events by them).
#[tokio::test]
async fn sequence_numbers_are_not_given_twice_after_a_purge() {
    for (name, open) in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).unwrap();
        let mut e = ev("n1", &["a"]);
        e.dedup_window = Duration::ZERO;
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
        assert_eq!(st.purge(Duration::ZERO).await.unwrap(), 1, "{name}");
        st.close().await.unwrap();
        drop(st);
        let st = open(dir.path()).unwrap();
        let Admission::Accepted { seq: next } = st.accept(ev("n2", &["a"])).await.unwrap() else {
            panic!()
        };
        assert!(next > seq, "{name}: {next} after {seq}");
        st.close().await.unwrap();
    }
}

/// The sequence numbers of the stored events with `id`.
async fn seqs_with_id(st: &dyn Store, id: &str) -> Vec<u64> {
    st.lookup(id)
        .await
        .unwrap()
        .iter()
        .map(|v| v.event.seq)
        .collect()
}

/// An id used again past its window: once the newer event is delivered and purged, the
/// earlier one, dead, is still found and replayed by the id (the dedup record is kept for
/// it, not deleted with the newer event).
async fn purge_keeps_an_earlier_dead_event_of_the_id_reachable(st: Arc<dyn Store>) {
    let mut e = ev("e1", &["a"]);
    e.dedup_window = Duration::from_millis(1);
    e.received_ms -= 10;
    let Admission::Accepted { seq: old } = st.accept(e.clone()).await.unwrap() else {
        panic!()
    };
    let key = |seq| DeliveryKey {
        seq,
        destination: "a".into(),
    };
    let dead = Outcome::Dead {
        status: Some(400),
        error: "HTTP 400".into(),
    };
    st.record(&key(old), dead).await.unwrap();
    let mut again = ev("e1", &["a"]);
    again.dedup_window = Duration::from_millis(1);
    again.received_ms -= 5;
    let Admission::Accepted { seq: new } = st.accept(again).await.unwrap() else {
        panic!()
    };
    st.record(&key(new), Outcome::Delivered { status: 200 })
        .await
        .unwrap();
    assert_eq!(st.purge(Duration::ZERO).await.unwrap(), 1);
    assert!(st.event(new).await.unwrap().is_none());
    assert_eq!(seqs_with_id(st.as_ref(), "e1").await, [old]);
    let n = st
        .replay(ReplaySelector::EventId("e1".into()))
        .await
        .unwrap();
    assert_eq!(n, 1);
    // And the id is new again (its window long past).
    assert!(matches!(
        st.accept(ev("e1", &["a"])).await.unwrap(),
        Admission::Accepted { .. }
    ));
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

/// A destination's dead letters, more than two of a replay's chunks, are all replayed
/// (and another destination's are not).
async fn replay_crosses_chunks(st: Arc<dyn Store>) {
    let n = 2 * REPLAY_CHUNK + 5;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let st = st.clone();
        tasks.spawn(async move {
            let Admission::Accepted { seq } =
                st.accept(ev(&format!("d-{i}"), &["a"])).await.unwrap()
            else {
                panic!()
            };
            refused(st.as_ref(), seq, "a").await;
        });
    }
    while tasks.join_next().await.is_some() {}
    let Admission::Accepted { seq } = st.accept(ev("e1", &["b"])).await.unwrap() else {
        panic!()
    };
    refused(st.as_ref(), seq, "b").await;
    assert_eq!(st.queue_depth("a"), 0);
    let replayed = st.replay(ReplaySelector::Destination("a".into())).await;
    assert_eq!(replayed.unwrap(), n);
    assert_eq!(st.queue_depth("a"), n as u64);
    assert!(st.dead(Some("a"), 10).await.unwrap().is_empty());
    assert_eq!(st.dead(Some("b"), 10).await.unwrap().len(), 1);
    assert_eq!(st.pending("a", n + 1, &|_| false).await.unwrap().len(), n);
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

/// An id used again as many times as its record names: once the newer events but the
/// newest are purged, its oldest one, dead, is still found by the id (the record names the
/// stored ones, not the first so many it named).
async fn an_id_used_often_keeps_its_oldest_stored_event_reachable(st: Arc<dyn Store>) {
    let base = now_ms() - 1_000;
    let at = |i: u64| {
        let mut e = ev("e1", &["a"]);
        e.dedup_window = Duration::from_millis(1);
        e.received_ms = base + 2 * i;
        e
    };
    let key = |seq| DeliveryKey {
        seq,
        destination: "a".into(),
    };
    let Admission::Accepted { seq: old } = st.accept(at(0)).await.unwrap() else {
        panic!()
    };
    let dead = Outcome::Dead {
        status: Some(400),
        error: "HTTP 400".into(),
    };
    st.record(&key(old), dead).await.unwrap();
    let newer = EARLIER_KEPT as u64;
    let mut pending = 0;
    for i in 1..=newer {
        let Admission::Accepted { seq } = st.accept(at(i)).await.unwrap() else {
            panic!()
        };
        // The newest stays pending, so the purge keeps it and the record it heads.
        if i < newer {
            st.record(&key(seq), Outcome::Delivered { status: 200 })
                .await
                .unwrap();
        } else {
            pending = seq;
        }
    }
    assert_eq!(st.purge(Duration::ZERO).await.unwrap(), newer as usize - 1);
    let Admission::Accepted { seq: last } = st.accept(at(newer + 1)).await.unwrap() else {
        panic!()
    };
    let mut found = seqs_with_id(st.as_ref(), "e1").await;
    found.sort_unstable();
    assert_eq!(found, [old, pending, last]);
    st.close().await.unwrap();
}

/// An event stamped a year ahead (accepted while the clock was ahead, set back since) does
/// not stop the purge of the older events accepted after it.
async fn an_event_stamped_ahead_does_not_stop_the_purge(st: Arc<dyn Store>) {
    let key = |seq| DeliveryKey {
        seq,
        destination: "a".into(),
    };
    let mut ahead = ev("e1", &["a"]);
    ahead.received_ms = now_ms() + 365 * 24 * 3600 * 1000;
    ahead.dedup_window = Duration::ZERO;
    let mut old = ev("old", &["a"]);
    old.received_ms = now_ms() - 10_000;
    old.dedup_window = Duration::ZERO;
    for e in [ahead, old] {
        let Admission::Accepted { seq } = st.accept(e).await.unwrap() else {
            panic!()
        };
        st.record(&key(seq), Outcome::Delivered { status: 200 })
            .await
            .unwrap();
    }
    assert_eq!(st.purge(Duration::ZERO).await.unwrap(), 1, "the old one");
    assert_eq!(st.lookup("e1").await.unwrap().len(), 1, "the one ahead");
    assert!(st.lookup("old").await.unwrap().is_empty());
}

type BoxCheck = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

#[tokio::test]
async fn accept_dedup_record_replay_on_every_engine() {
    on_every_engine(|st| Box::pin(accept_dedup_record_replay(st))).await;
    on_every_engine(|st| Box::pin(replay_crosses_chunks(st))).await;
}

#[tokio::test]
async fn purge_on_every_engine() {
    on_every_engine(|st| Box::pin(dedup_expires_and_purge_keeps_undelivered(st))).await;
    on_every_engine(|st| Box::pin(purge_crosses_batches(st))).await;
    on_every_engine(|st| Box::pin(purge_keeps_an_earlier_dead_event_of_the_id_reachable(st))).await;
    on_every_engine(|st| Box::pin(an_id_used_often_keeps_its_oldest_stored_event_reachable(st)))
        .await;
    on_every_engine(|st| Box::pin(an_event_stamped_ahead_does_not_stop_the_purge(st))).await;
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

/// The oldest pending delivery is the one whose event came first, whenever it is due: a
/// retry waiting out its backoff still counts; a delivered one stops counting; a replayed
/// one counts again, on every engine.
#[tokio::test]
async fn the_oldest_pending_is_by_receipt_not_by_due_time() {
    for (name, open) in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).unwrap();
        let mut seqs = Vec::new();
        let mut received = Vec::new();
        for (i, ago) in [50_000, 10_000].into_iter().enumerate() {
            let mut e = ev(&format!("old{i}"), &["a", "b"]);
            e.received_ms -= ago;
            received.push(e.received_ms);
            let Admission::Accepted { seq } = st.accept(e).await.unwrap() else {
                panic!()
            };
            seqs.push(seq);
        }
        let key = |i: usize| DeliveryKey {
            seq: seqs[i],
            destination: "a".into(),
        };
        assert_eq!(
            st.oldest_pending("a").await.unwrap(),
            Some(received[0]),
            "{name}"
        );
        let later = Outcome::Retry {
            due_ms: now_ms() + 60_000,
            status: Some(503),
            error: "HTTP 503".into(),
            attempt: Some(1),
        };
        st.record(&key(0), later).await.unwrap();
        assert_eq!(
            st.oldest_pending("a").await.unwrap(),
            Some(received[0]),
            "{name}: retrying, still the oldest"
        );
        st.record(&key(0), Outcome::Delivered { status: 200 })
            .await
            .unwrap();
        assert_eq!(
            st.oldest_pending("a").await.unwrap(),
            Some(received[1]),
            "{name}"
        );
        refused(st.as_ref(), seqs[1], "a").await;
        assert_eq!(
            st.oldest_pending("a").await.unwrap(),
            None,
            "{name}: none pending"
        );
        assert_eq!(
            st.oldest_pending("b").await.unwrap(),
            Some(received[0]),
            "{name}: another destination's own"
        );
        st.replay(ReplaySelector::Destination("a".into()))
            .await
            .unwrap();
        assert_eq!(
            st.oldest_pending("a").await.unwrap(),
            Some(received[1]),
            "{name}: replayed, pending again"
        );
        st.close().await.unwrap();
    }
}

/// A recount (sled after a crash, redb when marked) counts the deliveries waiting in an
/// order key's line behind its head, not only the due queue.
#[tokio::test]
async fn a_recount_counts_what_waits_behind_a_line_head() {
    use super::keys::RECOUNT_KEY;
    use crate::store::engine::Engine;
    for (name, open) in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).unwrap();
        for (id, order) in [
            ("o1", "k"),
            ("o2", "k"),
            ("o3", "k"),
            ("p1", "j"),
            ("u1", ""),
        ] {
            let mut e = ev(id, &["a"]);
            e.order_keys = vec![(!order.is_empty()).then(|| order.to_string())];
            st.accept(e).await.unwrap();
        }
        assert_eq!(st.queue_depth("a"), 5, "{name}");
        if name == "redb" {
            // redb trusts its kept counts after a crash: ask for a recount.
            st.close().await.unwrap();
            drop(st);
            let engine = crate::store::redb::RedbEngine::create(dir.path()).unwrap();
            engine
                .group(&mut |txn| {
                    txn.put(RECOUNT_KEY, b"1").unwrap();
                    txn.end_op().unwrap();
                })
                .unwrap();
            drop(engine);
        } else {
            drop(st); // a crash: no clean mark
        }
        let st = open(dir.path()).unwrap();
        assert_eq!(st.queue_depth("a"), 5, "{name}: after the recount");
        st.close().await.unwrap();
    }
}

/// Pauses survive a reopen; `recent` pages newest first through its cursor and filters by
/// source, destination and state, on every engine.
#[tokio::test]
async fn pauses_and_the_event_list_on_every_engine() {
    for (name, open) in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).unwrap();
        st.set_paused("a", true).await.unwrap();
        let mut seqs = Vec::new();
        for i in 0..7 {
            let mut e = ev(&format!("r{i}"), if i % 2 == 0 { &["a"] } else { &["b"] });
            e.source = if i < 3 { "x".into() } else { "y".into() };
            let Admission::Accepted { seq } = st.accept(e).await.unwrap() else {
                panic!()
            };
            seqs.push(seq);
        }
        refused(st.as_ref(), seqs[2], "a").await;
        st.close().await.unwrap();
        drop(st);

        let st = open(dir.path()).unwrap();
        assert!(
            st.paused("a") && !st.paused("b"),
            "{name}: the pause is kept"
        );
        let ids = |q: EventQuery| {
            let st = st.clone();
            async move {
                let mut out = Vec::new();
                let mut q = q;
                for _ in 0..10 {
                    let page = st.recent(&q).await.unwrap();
                    out.extend(page.events.iter().map(|v| v.event.id.clone()));
                    match page.next {
                        Some(n) => q.before = Some(n),
                        None => return out,
                    }
                }
                panic!("too many pages")
            }
        };
        let q = |limit| EventQuery {
            limit,
            ..EventQuery::default()
        };
        assert_eq!(
            ids(q(3)).await,
            ["r6", "r5", "r4", "r3", "r2", "r1", "r0"],
            "{name}"
        );
        let by_source = EventQuery {
            source: Some("x".into()),
            ..q(2)
        };
        assert_eq!(ids(by_source).await, ["r2", "r1", "r0"], "{name}");
        let to_b = EventQuery {
            destination: Some("b".into()),
            ..q(50)
        };
        assert_eq!(ids(to_b).await, ["r5", "r3", "r1"], "{name}");
        let dead = EventQuery {
            state: Some(DeliveryState::Dead),
            ..q(50)
        };
        assert_eq!(ids(dead).await, ["r2"], "{name}");
        st.set_paused("a", false).await.unwrap();
        assert!(!st.paused("a"), "{name}");
        st.close().await.unwrap();
    }
}

/// A store marked with a newer format than this build reads is refused at start, saying
/// so; one without a marker (written before it existed) opens and is marked.
#[test]
fn a_newer_format_is_refused_and_an_older_one_read() {
    use super::keys::{FORMAT, FORMAT_KEY};
    use crate::store::engine::Engine;
    let dir = tempfile::tempdir().unwrap();
    let engine = crate::store::redb::RedbEngine::create(dir.path()).unwrap();
    engine
        .group(&mut |txn| {
            txn.put(FORMAT_KEY, &(FORMAT + 1).to_be_bytes()).unwrap();
            txn.end_op().unwrap();
        })
        .unwrap();
    let err = KvStore::start(engine).err().expect("refused");
    let text = err.to_string();
    assert!(text.contains(&format!("format {}", FORMAT + 1)), "{text}");
    assert!(text.contains("newer hookrelay"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    let engine = crate::store::redb::RedbEngine::create(dir.path()).unwrap();
    let st = KvStore::start(engine).unwrap();
    assert_eq!(
        st.shared.engine.get(FORMAT_KEY).unwrap().unwrap(),
        FORMAT.to_be_bytes()
    );
}

/// One key's line on every engine: only the head is due; a dead head lets the next go; a
/// replayed earlier one goes before a later one that retries; the line empties in order.
#[tokio::test]
async fn an_order_keys_line_on_every_engine() {
    for (name, open) in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).unwrap();
        let mut seqs = Vec::new();
        for i in 0..2 {
            let mut e = ev(&format!("o{i}"), &["a"]);
            e.order_keys = vec![Some("k".into())];
            let Admission::Accepted { seq } = st.accept(e).await.unwrap() else {
                panic!()
            };
            seqs.push(seq);
        }
        let due = |st: Arc<dyn Store>| async move {
            let p = st.pending("a", 10, &|_| false).await.unwrap();
            p.iter().map(|d| d.seq).collect::<Vec<_>>()
        };
        assert_eq!(due(st.clone()).await, [seqs[0]], "{name}: only the head");
        refused(st.as_ref(), seqs[0], "a").await;
        assert_eq!(
            due(st.clone()).await,
            [seqs[1]],
            "{name}: past the dead head"
        );
        assert_eq!(
            st.replay(ReplaySelector::EventId("o0".into()))
                .await
                .unwrap(),
            1
        );
        assert_eq!(due(st.clone()).await, [seqs[1]], "{name}: the head stays");
        // A reply route's call for a later one of the key, made at once while it waits in
        // the line: its outcome hands the queued place to nobody.
        let mut held = ev("o2", &["a"]);
        held.order_keys = vec![Some("k".into())];
        held.held = Some(("a".into(), now_ms() + 60_000));
        let Admission::Accepted { seq: s2 } = st.accept(held).await.unwrap() else {
            panic!()
        };
        let k2 = DeliveryKey {
            seq: s2,
            destination: "a".into(),
        };
        st.after_reply(
            s2,
            None,
            Some((k2, Outcome::Delivered { status: 200 })),
            true,
        )
        .unwrap();
        st.set_paused("x", false).await.unwrap(); // after the reply's write
        assert_eq!(
            due(st.clone()).await,
            [seqs[1]],
            "{name}: still only the head after the reply call"
        );
        let k1 = DeliveryKey {
            seq: seqs[1],
            destination: "a".into(),
        };
        let retry = Outcome::Retry {
            due_ms: now_ms(),
            status: Some(503),
            error: "HTTP 503".into(),
            attempt: Some(1),
        };
        st.record(&k1, retry).await.unwrap();
        assert_eq!(
            due(st.clone()).await,
            [seqs[0]],
            "{name}: the replayed one first"
        );
        let k0 = DeliveryKey {
            seq: seqs[0],
            destination: "a".into(),
        };
        st.record(&k0, Outcome::Delivered { status: 200 })
            .await
            .unwrap();
        assert_eq!(
            due(st.clone()).await,
            [seqs[1]],
            "{name}: then the later one"
        );
        st.record(&k1, Outcome::Delivered { status: 200 })
            .await
            .unwrap();
        assert!(due(st.clone()).await.is_empty(), "{name}");
        assert_eq!(st.queue_depth("a"), 0, "{name}");
        st.close().await.unwrap();
    }
}

/// Damaged records cost their own event or delivery only: a dedup record too short is an
/// error for its id (the writer goes on), an unreadable delivery record is skipped by the
/// queue's reads.
#[tokio::test]
async fn a_damaged_record_holds_back_only_its_own() {
    use super::keys::*;
    use crate::store::engine::Engine;
    let dir = tempfile::tempdir().unwrap();
    let engine = crate::store::redb::RedbEngine::create(dir.path()).unwrap();
    engine
        .group(&mut |txn| {
            txn.put(&dedup_key("s", "bad"), &[1, 2, 3, 4]).unwrap();
            // More of them at the head of the queue than one read takes (10 below).
            for seq in 5..25 {
                txn.put(&delivery_key(seq, "a"), b"\xff\xff").unwrap();
                txn.put(&queue_key("a", 1, seq), &[]).unwrap();
            }
            // And a dead letter of another destination whose record is damaged.
            txn.put(&delivery_key(1, "z"), b"\xff\xff").unwrap();
            txn.put(&dead_key("z", 1), &[]).unwrap();
            // And a damaged event record.
            txn.put(&event_key(2), b"\xb3x").unwrap();
            txn.end_op().unwrap();
        })
        .unwrap();
    let st = KvStore::start(engine).unwrap();
    assert!(matches!(
        st.accept(ev("bad", &["a"])).await,
        Err(StoreError::Corrupt(_))
    ));
    let Admission::Accepted { seq } = st.accept(ev("good", &["a"])).await.unwrap() else {
        panic!()
    };
    let due = st.pending("a", 10, &|_| false).await.unwrap();
    assert_eq!(due.iter().map(|d| d.seq).collect::<Vec<_>>(), [seq]);
    // A replay of that destination leaves it and goes on (none other to replay here).
    let replayed = st.replay(ReplaySelector::Destination("z".into())).await;
    assert_eq!(replayed.unwrap(), 0);
    // The operator's lists leave the damaged records out, and show the rest.
    assert!(st.dead(None, 10).await.unwrap().is_empty());
    let page = st
        .recent(&EventQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let listed: Vec<u64> = page.events.iter().map(|v| v.event.seq).collect();
    assert_eq!(listed, [seq]);
    st.close().await.unwrap();
}

/// A store written in format 2 (JSON records, as the builds before binary records wrote
/// them) is read: its pending delivery is due, its event reads back, an outcome is recorded
/// over it, and the store is then marked with this build's format.
#[tokio::test]
async fn a_format_2_store_is_read() {
    use super::keys::*;
    use crate::store::engine::Engine;
    let dir = tempfile::tempdir().unwrap();
    let engine = crate::store::redb::RedbEngine::create(dir.path()).unwrap();
    let d = Delivery {
        seq: 1,
        destination: "a".into(),
        state: DeliveryState::Pending,
        attempts: 1,
        window_base: 0,
        first_attempt_ms: Some(5),
        next_due_ms: 10,
        last_status: Some(503),
        last_error: Some("HTTP 503".into()),
        updated_ms: 5,
        order_key: None,
        waiting: false,
    };
    let meta = serde_json::json!({"id": "old-1", "source": "s", "received_ms": 1,
        "content_type": "application/json"});
    let meta = serde_json::to_vec(&meta).unwrap();
    let mut event = (meta.len() as u32).to_be_bytes().to_vec();
    event.extend_from_slice(&meta);
    event.extend_from_slice(br#"{"old":true}"#);
    engine
        .group(&mut |txn| {
            txn.put(FORMAT_KEY, &2u32.to_be_bytes()).unwrap();
            txn.put(&event_key(1), &event).unwrap();
            txn.put(&dedup_key("s", "old-1"), &key(&[&be(1), &be(u64::MAX)]))
                .unwrap();
            txn.put(&delivery_key(1, "a"), &serde_json::to_vec(&d).unwrap())
                .unwrap();
            txn.put(&queue_key("a", 10, 1), &[]).unwrap();
            txn.end_op().unwrap();
        })
        .unwrap();
    let st = KvStore::start(engine).unwrap();
    // An older build's store holds no kept count (or not this build's): counted at start.
    assert_eq!(st.queue_depth("a"), 1);
    let due = st.pending("a", 10, &|_| false).await.unwrap();
    assert_eq!(due, [d]);
    let e = st.event(1).await.unwrap().unwrap();
    assert_eq!((&e.id[..], &e.body[..]), ("old-1", &br#"{"old":true}"#[..]));
    assert!(matches!(
        st.accept(ev("old-1", &["a"])).await.unwrap(),
        Admission::Duplicate { seq: 1, .. }
    ));
    let k = DeliveryKey {
        seq: 1,
        destination: "a".into(),
    };
    st.record(&k, Outcome::Delivered { status: 200 })
        .await
        .unwrap();
    assert!(st.pending("a", 10, &|_| false).await.unwrap().is_empty());
    assert_eq!(st.queue_depth("a"), 0);
    assert_eq!(
        st.shared.engine.get(FORMAT_KEY).unwrap().unwrap(),
        FORMAT.to_be_bytes()
    );
}

/// An accepted event is kept in memory with one use per delivery due at once: not one held
/// for a reply route, not one waiting behind an earlier one of its order key; its body is a
/// copy, not a slice of the received bytes. `event` takes the uses, then reads the store.
#[tokio::test]
async fn accepted_events_are_kept_for_their_first_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let st = crate::store::redb::RedbStore::open(dir.path()).unwrap();
    let accept = |e: NewEvent| {
        let st = st.clone();
        async move {
            match st.accept(e).await.unwrap() {
                Admission::Accepted { seq } => seq,
                other => panic!("{other:?}"),
            }
        }
    };
    let mut two = ev("two", &["a", "b"]);
    two.body = Bytes::from(br#"{"n":2}"#.to_vec());
    let received = two.body.clone();
    let seq = accept(two).await;
    let (uses, body) = st.shared.fresh.peek(seq).unwrap();
    assert_eq!((uses, &body[..]), (2, &received[..]));
    assert_ne!(body.as_ptr(), received.as_ptr(), "a copy of its own");
    for _ in 0..3 {
        assert_eq!(
            &st.event(seq).await.unwrap().unwrap().body[..],
            br#"{"n":2}"#
        );
    }
    assert!(st.shared.fresh.peek(seq).is_none(), "both uses taken");

    let mut held = ev("held", &["a", "b"]);
    held.held = Some(("a".into(), now_ms() + 60_000));
    let seq = accept(held).await;
    assert_eq!(
        st.shared.fresh.peek(seq).unwrap().0,
        1,
        "only b's is due at once"
    );

    let ordered = |id: &str| {
        let mut e = ev(id, &["a"]);
        e.order_keys = vec![Some("k".into())];
        e
    };
    let head = accept(ordered("o1")).await;
    let behind = accept(ordered("o2")).await;
    assert_eq!(st.shared.fresh.peek(head).unwrap().0, 1);
    assert!(st.shared.fresh.peek(behind).is_none(), "waits behind o1");
    st.close().await.unwrap();
}

/// A delivery record that cannot be read stops neither its key's line (the head's outcome
/// moves it on to the next one readable) nor a purge (the other events go): on redb, a
/// failed operation would take its whole group with it, again at every try.
#[tokio::test]
async fn a_damaged_delivery_stops_neither_its_keys_line_nor_the_purge() {
    use super::keys::*;
    use crate::store::engine::Engine;
    let dir = tempfile::tempdir().unwrap();
    let st = crate::store::redb::RedbStore::open(dir.path()).unwrap();
    let mut line = Vec::new();
    for i in 0..3 {
        let mut e = ev(&format!("o{i}"), &["a"]);
        e.order_keys = vec![Some("k".into())];
        let Admission::Accepted { seq } = st.accept(e).await.unwrap() else {
            panic!()
        };
        line.push(seq);
    }
    let mut old = Vec::new();
    for i in 0..2 {
        let mut e = ev(&format!("p{i}"), &["b"]);
        e.dedup_window = Duration::ZERO;
        e.received_ms = now_ms() - 10_000;
        let Admission::Accepted { seq } = st.accept(e).await.unwrap() else {
            panic!()
        };
        let k = DeliveryKey {
            seq,
            destination: "b".into(),
        };
        st.record(&k, Outcome::Delivered { status: 200 })
            .await
            .unwrap();
        old.push(seq);
    }
    st.close().await.unwrap();
    drop(st);
    let engine = crate::store::redb::RedbEngine::create(dir.path()).unwrap();
    engine
        .group(&mut |txn| {
            txn.put(&delivery_key(line[1], "a"), b"\xff\xff").unwrap();
            txn.put(&delivery_key(old[0], "b"), b"\xff\xff").unwrap();
            txn.end_op().unwrap();
        })
        .unwrap();
    let st = KvStore::start(engine).unwrap();
    let head = DeliveryKey {
        seq: line[0],
        destination: "a".into(),
    };
    st.record(&head, Outcome::Delivered { status: 200 })
        .await
        .expect("the head's outcome is kept");
    let due = st.pending("a", 10, &|_| false).await.unwrap();
    assert_eq!(due.iter().map(|d| d.seq).collect::<Vec<_>>(), [line[2]]);
    let depth = |st: &KvStore<crate::store::redb::RedbEngine>| {
        st.queue_depths()
            .into_iter()
            .find(|(d, _)| d == "a")
            .map_or(0, |(_, n)| n)
    };
    assert_eq!(depth(&st), 1, "the damaged one no longer counts as pending");
    assert_eq!(
        st.purge(Duration::ZERO).await.unwrap(),
        1,
        "the readable one"
    );
    assert!(st.event(old[0]).await.unwrap().is_some());
    assert!(st.event(old[1]).await.unwrap().is_none());
    st.close().await.unwrap();
}

/// A kept queue count that cannot be read (damaged on disk) is counted again at start,
/// where reading it panicked before (the writer reads it too, for each group that changes
/// it: there it is taken as 0 and marked to be counted again at the next start).
#[tokio::test]
async fn a_damaged_queue_count_is_counted_again_not_a_panic() {
    use super::keys::depth_key;
    use crate::store::engine::Engine;
    let dir = tempfile::tempdir().unwrap();
    let st = crate::store::redb::RedbStore::open(dir.path()).unwrap();
    for id in ["c1", "c2"] {
        st.accept(ev(id, &["a"])).await.unwrap();
    }
    st.close().await.unwrap();
    drop(st);
    let engine = crate::store::redb::RedbEngine::create(dir.path()).unwrap();
    engine
        .group(&mut |txn| {
            txn.put(&depth_key("a"), b"xyz").unwrap();
            txn.end_op().unwrap();
        })
        .unwrap();
    drop(engine);
    let st = crate::store::redb::RedbStore::open(dir.path()).unwrap();
    assert_eq!(st.queue_depth("a"), 2, "counted at start");
    st.accept(ev("c3", &["a"])).await.unwrap();
    st.close().await.unwrap();
    drop(st);
    let st = crate::store::redb::RedbStore::open(dir.path()).unwrap();
    assert_eq!(st.queue_depth("a"), 3, "the count written again is read");
    st.close().await.unwrap();
}
