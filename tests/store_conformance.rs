//! The store's contract, checked the same way on every backend: redb, sled and jetstream
//! (a nats-server this test starts). What the embedded engines alone can show (purge
//! batches, the on-disk format) stays in `src/store/kv/tests.rs`.

mod support;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hookrelay::store::jetstream::JetStreamStore;
use hookrelay::store::redb::RedbStore;
use hookrelay::store::sled::SledStore;
use hookrelay::store::*;
use support::NatsServer;

fn ev(id: &str, source: &str, dests: &[&str]) -> NewEvent {
    NewEvent {
        source: source.into(),
        id: id.into(),
        body: Bytes::from(format!(r#"{{"id":"{id}"}}"#)),
        content_type: Some("application/json".into()),
        received_ms: now_ms(),
        destinations: dests.iter().map(|s| s.to_string()).collect(),
        max_queue: Vec::new(),
        order_keys: Vec::new(),
        held: None,
        dedup_window: Duration::from_secs(60),
    }
}

/// Waits (bounded) until `dest` has a pending delivery of `seq` that is due. (An embedded
/// store lists pending deliveries due later too, and the scheduler waits; jetstream hands
/// out only due ones, the server holding the rest.)
async fn due(st: &dyn Store, dest: &str, seq: u64) -> Delivery {
    due_within(st, dest, seq, Duration::from_secs(15)).await
}

/// [`due`], waiting up to `within`.
async fn due_within(st: &dyn Store, dest: &str, seq: u64, within: Duration) -> Delivery {
    let deadline = Instant::now() + within;
    loop {
        let p = st.pending(dest, 64, &|_| false).await.unwrap();
        if let Some(d) = p
            .into_iter()
            .find(|d| d.seq == seq && d.next_due_ms <= now_ms() + 20)
        {
            return d;
        }
        assert!(
            Instant::now() < deadline,
            "delivery {seq} to {dest} never due"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How early (ms) jetstream may hand out a delivery before its due time: the server's
/// timers and the two clocks' reads.
const DUE_SLACK_MS: u64 = 50;

/// Waits (bounded, polling every 5 ms) until `dest` lists a pending delivery of `seq`, due
/// or not; returns it and the time (ms) just after the listing that first showed it (no
/// earlier than when the store handed it out).
async fn first_listed(st: &dyn Store, dest: &str, seq: u64) -> (Delivery, u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let p = st.pending(dest, 64, &|_| false).await.unwrap();
        let at = now_ms();
        if let Some(d) = p.into_iter().find(|d| d.seq == seq) {
            return (d, at);
        }
        assert!(
            Instant::now() < deadline,
            "delivery {seq} to {dest} never listed"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn key(seq: u64, dest: &str) -> DeliveryKey {
    DeliveryKey {
        seq,
        destination: dest.into(),
    }
}

fn dead() -> Outcome {
    Outcome::Dead {
        status: Some(400),
        error: "HTTP 400".into(),
    }
}

/// Event `id` of source `o` to destination `r`, ordered by the key `K`.
fn ordered(id: &str) -> NewEvent {
    NewEvent {
        order_keys: vec![Some("K".into())],
        ..ev(id, "o", &["r"])
    }
}

async fn accepted(st: &dyn Store, e: NewEvent) -> u64 {
    match st.accept(e).await.unwrap() {
        Admission::Accepted { seq } => seq,
        other => panic!("{other:?}"),
    }
}

/// Accept, dedup, an attempt's outcomes, dead letters, replay, lookup, the event list and
/// pauses: what every backend must do alike.
async fn the_contract(name: &str, st: Arc<dyn Store>) {
    let s1 = accepted(st.as_ref(), ev("e1", "x", &["a", "b"])).await;
    let dup = st.accept(ev("e1", "x", &["a", "b"])).await.unwrap();
    assert!(
        matches!(dup, Admission::Duplicate { seq, .. } if seq == s1),
        "{name}: {dup:?}"
    );
    // A queue at its limit (0 here) refuses a new event, but a duplicate is still answered
    // as one: a provider's retry of an accepted event is not told to come back later.
    let full = |id: &str| NewEvent {
        max_queue: vec![0, 0],
        ..ev(id, "x", &["a", "b"])
    };
    let dup = st.accept(full("e1")).await.unwrap();
    assert!(
        matches!(dup, Admission::Duplicate { seq, .. } if seq == s1),
        "{name}: {dup:?}"
    );
    let refused = st.accept(full("e-full")).await.unwrap();
    assert!(
        matches!(refused, Admission::QueueFull { .. }),
        "{name}: {refused:?}"
    );
    // The same id from another source is another event.
    let s2 = accepted(st.as_ref(), ev("e1", "y", &["b"])).await;
    assert_ne!(s1, s2);

    let d = due(st.as_ref(), "a", s1).await;
    assert_eq!((d.state, d.attempts), (DeliveryState::Pending, 0), "{name}");
    assert_eq!(
        st.oldest_pending("a").await.unwrap(),
        Some(d.next_due_ms),
        "{name}: the admin's read of the oldest pending (received when it was first due)"
    );
    let event = st.event(s1).await.unwrap().expect("the event");
    assert_eq!(
        (event.id.as_str(), event.source.as_str()),
        ("e1", "x"),
        "{name}"
    );
    assert_eq!(&event.body[..], br#"{"id":"e1"}"#, "{name}");

    // A retry keeps it pending with its due time and error; then it goes dead.
    let later = now_ms() + 300;
    st.record(
        &key(s1, "a"),
        Outcome::Retry {
            due_ms: later,
            status: Some(503),
            error: "HTTP 503".into(),
            attempt: Some(1),
        },
    )
    .await
    .unwrap();
    // Listed with the retry's due time (an embedded store lists it at once, to be
    // scheduled; jetstream hands it out only once it is due).
    let (d, listed_ms) = first_listed(st.as_ref(), "a", s1).await;
    assert_eq!(d.next_due_ms, later, "{name}: the retry's due time");
    if name == "jetstream" {
        assert!(
            listed_ms + DUE_SLACK_MS >= later,
            "{name}: handed out {} ms before it was due",
            later - listed_ms
        );
    }
    let d = due(st.as_ref(), "a", s1).await;
    assert_eq!(d.next_due_ms, later, "{name}");
    assert_eq!((d.attempts, d.last_status), (1, Some(503)), "{name}");
    st.record(&key(s1, "a"), dead()).await.unwrap();
    let b = due(st.as_ref(), "b", s1).await;
    assert_eq!(b.seq, s1);
    st.record(&key(s1, "b"), Outcome::Delivered { status: 200 })
        .await
        .unwrap();

    let views = st.lookup("e1").await.unwrap();
    assert_eq!(views.len(), 2, "{name}: one per source");
    let mine = views.iter().find(|v| v.event.source == "x").unwrap();
    let state = |dest: &str| {
        mine.deliveries
            .iter()
            .find(|d| d.destination == dest)
            .map(|d| (d.state, d.attempts))
    };
    assert_eq!(state("a"), Some((DeliveryState::Dead, 2)), "{name}");
    assert_eq!(state("b"), Some((DeliveryState::Delivered, 1)), "{name}");

    let dead_a = st.dead(Some("a"), 10).await.unwrap();
    assert_eq!(dead_a.len(), 1, "{name}");
    assert_eq!(
        (dead_a[0].event_id.as_str(), dead_a[0].source.as_str()),
        ("e1", "x"),
        "{name}"
    );
    assert!(st.dead(Some("b"), 10).await.unwrap().is_empty(), "{name}");
    assert_eq!(
        st.replay(ReplaySelector::Destination("a".into()))
            .await
            .unwrap(),
        1,
        "{name}"
    );
    assert!(st.dead(None, 10).await.unwrap().is_empty(), "{name}");
    let d = due(st.as_ref(), "a", s1).await;
    assert_eq!(
        (d.state, d.window_base),
        (DeliveryState::Pending, 2),
        "{name}"
    );
    st.record(&key(s1, "a"), Outcome::Delivered { status: 200 })
        .await
        .unwrap();

    // The event list: newest first, paged, filtered.
    let mut seqs = vec![s1, s2];
    for i in 0..5 {
        let dest = if i % 2 == 0 { "a" } else { "b" };
        seqs.push(accepted(st.as_ref(), ev(&format!("r{i}"), "z", &[dest])).await);
    }
    let mut ids = Vec::new();
    let mut q = EventQuery {
        limit: 3,
        ..EventQuery::default()
    };
    for _ in 0..10 {
        let page = st.recent(&q).await.unwrap();
        ids.extend(page.events.iter().map(|v| v.event.id.clone()));
        match page.next {
            Some(n) => q.before = Some(n),
            None => break,
        }
    }
    assert_eq!(ids, ["r4", "r3", "r2", "r1", "r0", "e1", "e1"], "{name}");
    let page = st
        .recent(&EventQuery {
            source: Some("z".into()),
            destination: Some("b".into()),
            limit: 50,
            ..EventQuery::default()
        })
        .await
        .unwrap();
    let ids: Vec<&str> = page.events.iter().map(|v| v.event.id.as_str()).collect();
    assert_eq!(ids, ["r3", "r1"], "{name}");

    st.set_paused("a", true).await.unwrap();
    assert!(st.paused("a") && !st.paused("b"), "{name}");
    st.set_paused("a", false).await.unwrap();
    assert!(!st.paused("a"), "{name}");
}

/// Event `id` of source `x` to `dest`, received at `ms` (standing in for the clock), with
/// a dedup window of 1 s.
fn received_at(id: &str, dest: &str, ms: u64) -> NewEvent {
    NewEvent {
        dedup_window: Duration::from_secs(1),
        received_ms: ms,
        ..ev(id, "x", &[dest])
    }
}

/// `ev`, an id seen again past its window, accepted as new: its sequence. JetStream answers
/// 503 until the earlier event's fan-out is acked, so that is tried again (bounded).
async fn accepted_again(name: &str, st: &dyn Store, ev: NewEvent) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match st.accept(ev.clone()).await {
            Ok(Admission::Accepted { seq }) => return seq,
            Err(StoreError::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("{name}: past the window: {other:?}"),
        }
    }
}

/// An id seen again past its dedup window is a new event (with its own delivery); within
/// the window of that one, a duplicate of it. `received_ms` stands in for the clock.
async fn an_id_past_its_window_is_new(name: &str, st: &dyn Store) {
    let at = |ms: u64| received_at("again", "w", ms);
    let t0 = now_ms();
    let first = accepted(st, at(t0)).await;
    due(st, "w", first).await;
    let dup = st.accept(at(t0 + 900)).await.unwrap();
    assert!(
        matches!(dup, Admission::Duplicate { seq, .. } if seq == first),
        "{name}: within the window: {dup:?}"
    );
    // Past it: new.
    let second = accepted_again(name, st, at(t0 + 1500)).await;
    assert_ne!(second, first, "{name}");
    let d = due(st, "w", second).await;
    assert_eq!((d.seq, d.state), (second, DeliveryState::Pending), "{name}");
    let dup = st.accept(at(t0 + 2000)).await.unwrap();
    assert!(
        matches!(dup, Admission::Duplicate { seq, .. } if seq == second),
        "{name}: within the new one's window: {dup:?}"
    );
    for seq in [first, second] {
        st.record(&key(seq, "w"), Outcome::Delivered { status: 200 })
            .await
            .unwrap();
    }
}

/// An id used again past its window names two events: the first one's dead delivery is
/// still found by the id, and replayed by it (dead ones stay until replayed).
async fn a_reused_ids_dead_letter_is_found_and_replayed_by_id(name: &str, st: &dyn Store) {
    let at = |ms: u64| received_at("reused", "v", ms);
    let t0 = now_ms();
    let first = accepted(st, at(t0)).await;
    due(st, "v", first).await;
    st.record(&key(first, "v"), dead()).await.unwrap();
    let second = accepted_again(name, st, at(t0 + 1500)).await;
    let found: HashSet<u64> = st
        .lookup("reused")
        .await
        .unwrap()
        .iter()
        .map(|v| v.event.seq)
        .collect();
    assert_eq!(found, HashSet::from([first, second]), "{name}");
    // By id, destination and event: only that one (none to `nope`).
    let to = |destination: &str, seq: u64| ReplaySelector::Delivery {
        id: "reused".into(),
        destination: destination.into(),
        seq: Some(seq),
    };
    assert_eq!(st.replay(to("nope", first)).await.unwrap(), 0, "{name}");
    // The second event's delivery to `v` is not dead: nothing of it to replay.
    assert_eq!(st.replay(to("v", second)).await.unwrap(), 0, "{name}");
    let n = st.replay(to("v", first)).await.unwrap();
    assert_eq!(n, 1, "{name}: the first event's dead delivery");
    let n = st
        .replay(ReplaySelector::EventId("reused".into()))
        .await
        .unwrap();
    assert_eq!(n, 0, "{name}: nothing dead is left");
    let d = due(st, "v", first).await;
    assert_eq!(d.state, DeliveryState::Pending, "{name}");
    for seq in [first, second] {
        st.record(&key(seq, "v"), Outcome::Delivered { status: 200 })
            .await
            .unwrap();
    }
}

/// Dead letters of all destinations are listed oldest first, whatever their names.
async fn dead_letters_oldest_first(name: &str, st: &dyn Store) {
    let old = accepted(st, ev("dead-old", "x", &["zz"])).await;
    let new = accepted(st, ev("dead-new", "x", &["aa"])).await;
    for (seq, dest) in [(old, "zz"), (new, "aa")] {
        due(st, dest, seq).await;
        st.record(&key(seq, dest), dead()).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let listed = loop {
        let listed: Vec<String> = st
            .dead(None, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|n| n.event_id)
            .collect();
        if listed.len() >= 2 || Instant::now() > deadline {
            break listed;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(listed, ["dead-old", "dead-new"], "{name}");
    let first: Vec<String> = st
        .dead(None, 1)
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.event_id)
        .collect();
    assert_eq!(first, ["dead-old"], "{name}");
    // Past the first page: each listed one's cursor goes on after it.
    let third = accepted(st, ev("dead-third", "x", &["zz"])).await;
    due(st, "zz", third).await;
    st.record(&key(third, "zz"), dead()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while st.dead(None, 10).await.unwrap().len() < 3 {
        assert!(Instant::now() < deadline, "{name}: the third never listed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ids = |page: &[hookrelay::store::NamedDelivery]| -> Vec<String> {
        page.iter().map(|n| n.event_id.clone()).collect()
    };
    let page1 = st.dead_after(None, 0, 2).await.unwrap();
    assert_eq!(ids(&page1), ["dead-old", "dead-new"], "{name}");
    let page2 = st.dead_after(None, page1[1].cursor, 2).await.unwrap();
    assert_eq!(ids(&page2), ["dead-third"], "{name}");
    assert!(
        st.dead_after(None, page2[0].cursor, 2)
            .await
            .unwrap()
            .is_empty(),
        "{name}"
    );
    let zz = st
        .dead_after(Some("zz"), page1[0].cursor, 10)
        .await
        .unwrap();
    assert_eq!(ids(&zz), ["dead-third"], "{name}");
    assert!(
        st.dead_after(None, u64::MAX, 2).await.unwrap().is_empty(),
        "{name}"
    );
    // An event dead to two destinations: paged one at a time, every dead letter comes
    // once, none left out at a page's end.
    let two = accepted(st, ev("dead-two", "x", &["aa", "zz"])).await;
    for dest in ["aa", "zz"] {
        due(st, dest, two).await;
        st.record(&key(two, dest), dead()).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while st.dead(None, 10).await.unwrap().len() < 5 {
        assert!(
            Instant::now() < deadline,
            "{name}: dead-two never listed twice"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut seen = Vec::new();
    let mut after = 0;
    for _ in 0..10 {
        let page = st.dead_after(None, after, 1).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.cursor;
        seen.extend(
            page.iter()
                .map(|n| (n.event_id.clone(), n.delivery.destination.clone())),
        );
    }
    seen.sort();
    let pair = |e: &str, d: &str| (e.to_string(), d.to_string());
    assert_eq!(
        seen,
        [
            pair("dead-new", "aa"),
            pair("dead-old", "zz"),
            pair("dead-third", "zz"),
            pair("dead-two", "aa"),
            pair("dead-two", "zz"),
        ],
        "{name}"
    );
}

/// Whether `dest` lists a pending delivery of any of `seqs` now.
async fn lists_any(st: &dyn Store, dest: &str, seqs: &[u64]) -> bool {
    let p = st.pending(dest, 64, &|_| false).await.unwrap();
    p.iter().any(|d| seqs.contains(&d.seq))
}

/// Accepts an event of a key of its own (id `id`, to `o`), waits until it is due, and
/// records it delivered. Events are fanned out in stream order, and a destination's
/// deliveries are handed to the puller in stream order: once the witness is due, every
/// delivery written before it (a key's later events, a replay) has reached the puller too.
/// On jetstream `pending` lists what a background puller already holds, so without this a
/// "nothing else of the key is listed" check could pass only because the puller had not
/// got to the key's later deliveries yet.
async fn witness(st: &dyn Store, id: &str) {
    let w = accepted(
        st,
        NewEvent {
            order_keys: vec![Some(format!("witness-{id}"))],
            ..ev(id, "o", &["o"])
        },
    )
    .await;
    due(st, "o", w).await;
    st.record(&key(w, "o"), Outcome::Delivered { status: 200 })
        .await
        .unwrap();
}

/// Whether the first delivery of each event (by id) is shown waiting behind its key.
async fn waiting(st: &dyn Store, ids: &[&str]) -> Vec<bool> {
    let mut out = Vec::new();
    for id in ids {
        let views = st.lookup(id).await.unwrap();
        out.push(views[0].deliveries[0].waiting);
    }
    out
}

/// `order_by` (CONTRACT §8): a key's deliveries are handed out one at a time in accept
/// order; a retrying head holds back only its own key; a dead head lets the next go; a
/// replayed one rejoins by accept order, behind the one in flight. `other` accepts every second event (on
/// jetstream another instance; on an embedded store the same one).
async fn the_order_contract(name: &str, st: &dyn Store, other: &dyn Store) {
    let ordered = |id: &str, key: &str| NewEvent {
        order_keys: vec![Some(key.into())],
        ..ev(id, "o", &["o"])
    };
    let k0 = accepted(st, ordered("k0", "K")).await;
    let k1 = accepted(other, ordered("k1", "K")).await;
    let l0 = accepted(st, ordered("l0", "L")).await;
    let k2 = accepted(other, ordered("k2", "K")).await;
    let k3 = accepted(st, ordered("k3", "K")).await;
    // A duplicate is answered as one, and takes no place in the line: K-4, after it, is
    // next after K-3 (on jetstream its entry, written first, is deleted again).
    let dup = other.accept(ordered("k1", "K")).await.unwrap();
    assert!(
        matches!(dup, Admission::Duplicate { seq, .. } if seq == k1),
        "{name}: {dup:?}"
    );
    let k4 = accepted(other, ordered("k4", "K")).await;
    // Every K delivery has reached the puller before anything is said about what it lists.
    witness(st, "w0").await;
    due(st, "o", k0).await;
    due(st, "o", l0).await;
    // K-0 fails and is due again; K-1, K-2 and K-3 still wait behind it.
    let retry = Outcome::Retry {
        due_ms: now_ms(),
        status: Some(503),
        error: "HTTP 503".into(),
        attempt: Some(1),
    };
    st.record(&key(k0, "o"), retry).await.unwrap();
    due(st, "o", k0).await;
    assert!(
        !lists_any(st, "o", &[k1, k2, k3, k4]).await,
        "{name}: K's later events wait"
    );
    // The admin API says which wait behind another of their key.
    assert_eq!(
        waiting(st, &["k0", "k1", "k2", "l0"]).await,
        [false, true, true, false],
        "{name}"
    );
    // L goes on meanwhile.
    st.record(&key(l0, "o"), Outcome::Delivered { status: 200 })
        .await
        .unwrap();
    // K-0 goes dead: K-1 is next, K-2 and K-3 still wait.
    st.record(&key(k0, "o"), dead()).await.unwrap();
    due(st, "o", k1).await;
    assert!(
        !lists_any(st, "o", &[k0, k2, k3]).await,
        "{name}: one at a time"
    );
    // K-0 replayed while K-1 is in flight: it rejoins by accept order, after K-1 (in
    // flight) and before K-2 and K-3.
    assert_eq!(
        st.replay(ReplaySelector::EventId("k0".into()))
            .await
            .unwrap(),
        1,
        "{name}"
    );
    // The replayed delivery has reached the puller.
    witness(st, "w1").await;
    assert!(
        !lists_any(st, "o", &[k0, k2, k3]).await,
        "{name}: the replay waits"
    );
    assert_eq!(
        waiting(st, &["k0", "k1", "k2"]).await,
        [true, false, true],
        "{name}"
    );
    for (i, (now, next)) in [(k1, k0), (k0, k2), (k2, k3), (k3, k4)]
        .into_iter()
        .enumerate()
    {
        st.record(&key(now, "o"), Outcome::Delivered { status: 200 })
            .await
            .unwrap();
        let d = due(st, "o", next).await;
        witness(st, &format!("w{}", i + 2)).await;
        let waiting: Vec<u64> = [k0, k1, k2, k3, k4]
            .into_iter()
            .filter(|s| *s != next)
            .collect();
        assert!(
            !lists_any(st, "o", &waiting).await,
            "{name}: only {} is due after {now}",
            d.seq
        );
    }
    st.record(&key(k4, "o"), Outcome::Delivered { status: 200 })
        .await
        .unwrap();
    let views = st.lookup("k0").await.unwrap();
    assert_eq!(
        views[0].deliveries[0].state,
        DeliveryState::Delivered,
        "{name}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_contract_on_redb() {
    let dir = tempfile::tempdir().unwrap();
    let st = RedbStore::open(dir.path()).unwrap();
    the_contract("redb", st.clone()).await;
    the_order_contract("redb", st.as_ref(), st.as_ref()).await;
    dead_letters_oldest_first("redb", st.as_ref()).await;
    an_id_past_its_window_is_new("redb", st.as_ref()).await;
    a_reused_ids_dead_letter_is_found_and_replayed_by_id("redb", st.as_ref()).await;
    st.close().await.unwrap();
    // Closed, it lets go of its file at once, not when its last reference goes: a relay
    // replacing this one opens it meanwhile (redb's lock is the database's).
    let next = RedbStore::open(dir.path()).expect("opened while the closed one lives on");
    assert!(!next.lookup("k0").await.unwrap().is_empty());
    next.close().await.unwrap();
    drop(st);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_contract_on_sled() {
    let dir = tempfile::tempdir().unwrap();
    let st = SledStore::open(dir.path()).unwrap();
    the_contract("sled", st.clone()).await;
    the_order_contract("sled", st.as_ref(), st.as_ref()).await;
    dead_letters_oldest_first("sled", st.as_ref()).await;
    an_id_past_its_window_is_new("sled", st.as_ref()).await;
    a_reused_ids_dead_letter_is_found_and_replayed_by_id("sled", st.as_ref()).await;
    st.close().await.unwrap();
}

async fn jetstream(dir: &Path, nats: &NatsServer) -> Arc<dyn Store> {
    jetstream_with(dir, nats, "").await
}

/// The stream of the stores on `nats` (prefix `c`), read directly.
async fn stream_of(nats: &NatsServer) -> async_nats::jetstream::stream::Stream {
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.get_stream("c").await.unwrap()
}

/// The stream of the stores on `nats`, its fan-out consumer paused (for ten minutes, or
/// until resumed) once a store has made it: accepted events wait to be fanned out.
async fn paused_fanout(nats: &NatsServer) -> async_nats::jetstream::stream::Stream {
    let stream = stream_of(nats).await;
    // The store makes its fan-out consumer in the background: wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while stream
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>("c-fanout")
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "no fan-out consumer");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let later = async_nats::datetime::add_std_duration(
        async_nats::datetime::now(),
        Duration::from_secs(600),
    )
    .unwrap();
    stream.pause_consumer("c-fanout", later).await.unwrap();
    stream
}

/// A jetstream store on `nats` (prefix `c`), with `more` appended to its `[store]` table.
async fn jetstream_with(dir: &Path, nats: &NatsServer, more: &str) -> Arc<dyn Store> {
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nmax_body_bytes = 65536\n\
         [store]\nbackend = \"jetstream\"\nurl = \"{}\"\nprefix = \"c\"\n{more}",
        nats.url()
    );
    let config = hookrelay::config::parse(&text, &dir.join("routes.toml"), &|_| None).unwrap();
    JetStreamStore::open(&config).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_contract_on_jetstream() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let st = jetstream(dir.path(), &nats).await;
    the_contract("jetstream", st.clone()).await;
    let other = jetstream(dir.path(), &nats).await;
    the_order_contract("jetstream", st.as_ref(), other.as_ref()).await;
    dead_letters_oldest_first("jetstream", st.as_ref()).await;
    an_id_past_its_window_is_new("jetstream", st.as_ref()).await;
    a_reused_ids_dead_letter_is_found_and_replayed_by_id("jetstream", st.as_ref()).await;
    other.close().await.unwrap();
    st.close().await.unwrap();
    drop(st);
    // Everything is in JetStream: a second store (another instance) sees it.
    let again = jetstream(dir.path(), &nats).await;
    assert_eq!(again.lookup("r3").await.unwrap().len(), 1);
    again.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_through_one_jetstream_store_is_seen_by_another_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let a = jetstream(dir.path(), &nats).await;
    let b = jetstream(dir.path(), &nats).await;
    // Set right after `b` opened: its watch must already be in place.
    a.set_paused("p", true).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !b.paused("p") {
        assert!(
            Instant::now() < deadline,
            "the other store never saw the pause"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.set_paused("p", false).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.paused("p") {
        assert!(
            Instant::now() < deadline,
            "the first store never saw the resume"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A store opened later starts with the pauses as they are.
    a.set_paused("q", true).await.unwrap();
    let c = jetstream(dir.path(), &nats).await;
    assert!(c.paused("q") && !c.paused("p"));
    for s in [a, b, c] {
        s.close().await.unwrap();
    }
}

/// A dead letter outlives its event's message (kept `max(dedup window, retain, 1 day)`):
/// it is still found by its id, listed, and replayed by its id, also after the same id was
/// accepted again as a new event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_whose_event_expired_is_found_and_replayed_by_its_id() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let st = jetstream_with(
        dir.path(),
        &nats,
        "retain = \"1s\"\n[dedup]\nwindow = \"1s\"\n",
    )
    .await;
    let short = || NewEvent {
        dedup_window: Duration::from_secs(1),
        ..ev("gone", "x", &["a"])
    };
    let seq = accepted(st.as_ref(), short()).await;
    due(st.as_ref(), "a", seq).await;
    st.record(&key(seq, "a"), dead()).await.unwrap();
    // Its message gone, as its TTL would take it a day on: the event is the message at its
    // own sequence.
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let stream = js.get_stream("c").await.unwrap();
    assert!(stream.delete_message(seq).await.unwrap());
    assert!(st.event(seq).await.unwrap().is_none());
    assert_eq!(st.dead(Some("a"), 10).await.unwrap().len(), 1);
    let views = st.lookup("gone").await.unwrap();
    assert_eq!(views.len(), 1, "{views:?}");
    assert_eq!(views[0].event.seq, seq);
    assert_eq!(&views[0].event.body[..], br#"{"id":"gone"}"#);
    let states: Vec<_> = views[0]
        .deliveries
        .iter()
        .map(|d| (d.destination.as_str(), d.state))
        .collect();
    assert_eq!(states, [("a", DeliveryState::Dead)]);
    assert!(st.lookup("other").await.unwrap().is_empty());

    // The same id from the same source, accepted again: a new event, whose delivery must
    // not replace the dead letter (it goes on subjects of its own).
    let again = accepted(st.as_ref(), ev("gone", "x", &["a"])).await;
    assert_ne!(again, seq);
    due(st.as_ref(), "a", again).await;
    let views = st.lookup("gone").await.unwrap();
    let states: Vec<_> = views
        .iter()
        .map(|v| (v.event.seq, v.deliveries[0].state))
        .collect();
    assert_eq!(
        states,
        [(seq, DeliveryState::Dead), (again, DeliveryState::Pending)]
    );
    let dead = st.dead(Some("a"), 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].delivery.seq, seq);
    st.record(&key(again, "a"), Outcome::Delivered { status: 200 })
        .await
        .unwrap();
    assert_eq!(st.dead(Some("a"), 10).await.unwrap().len(), 1, "still dead");

    assert_eq!(
        st.replay(ReplaySelector::EventId("gone".into()))
            .await
            .unwrap(),
        1
    );
    assert!(st.dead(None, 10).await.unwrap().is_empty());
    let d = due(st.as_ref(), "a", seq).await;
    assert_eq!(d.state, DeliveryState::Pending);
    let event = st
        .event(seq)
        .await
        .unwrap()
        .expect("the replayed one's event");
    assert_eq!(&event.body[..], br#"{"id":"gone"}"#);
    st.record(&key(seq, "a"), Outcome::Delivered { status: 200 })
        .await
        .unwrap();
    // The old one is history now (its event expired, its delivery no longer dead); the
    // new one's delivered state may have expired too (retain: 1 s).
    let views = st.lookup("gone").await.unwrap();
    assert!(views.iter().all(|v| v.event.seq == again), "{views:?}");
    assert!(st.dead(None, 10).await.unwrap().is_empty());
    st.close().await.unwrap();
}

/// `max_queue` counts accepted events not fanned out yet: a fan-out that lags (here its
/// consumer is paused) does not let a destination's queue run past its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_queue_counts_events_not_fanned_out_yet() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let st = jetstream(dir.path(), &nats).await;
    // The destination's consumer exists, so the depth counts read it.
    st.pending("a", 1, &|_| false).await.unwrap();
    let stream = paused_fanout(&nats).await;
    let limited = |id: &str| NewEvent {
        max_queue: vec![3],
        ..ev(id, "x", &["a"])
    };
    let mut seqs = Vec::new();
    for i in 0..3 {
        seqs.push(accepted(st.as_ref(), limited(&format!("q{i}"))).await);
    }
    // A count of the queues has run: the destination's consumer holds none of the three.
    let deadline = Instant::now() + Duration::from_secs(10);
    while st.queue_depth("a") > 0 {
        assert!(Instant::now() < deadline, "the depth was never counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let more = st.accept(limited("q3")).await.unwrap();
    assert!(matches!(more, Admission::QueueFull { .. }), "{more:?}");
    stream.resume_consumer("c-fanout").await.unwrap();
    for seq in seqs {
        due(st.as_ref(), "a", seq).await;
    }
    st.close().await.unwrap();
}

/// An outcome's write replaces the held message on its subject, and the server settles a
/// pending message it removes as if acked: the relay sends no ack of its own, and the
/// destination's consumer holds nothing once the outcomes are written, well before the ack
/// wait (6 s) would have the server hand anything out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_messages_are_settled_without_an_ack() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let st = jetstream(dir.path(), &nats).await;
    let mut seqs = Vec::new();
    for i in 0..3 {
        seqs.push(accepted(st.as_ref(), ev(&format!("s{i}"), "x", &["d"])).await);
    }
    for &seq in &seqs {
        due(st.as_ref(), "d", seq).await;
    }
    let recorded = Instant::now();
    for &seq in &seqs {
        st.record(&key(seq, "d"), Outcome::Delivered { status: 200 })
            .await
            .unwrap();
    }
    let stream = stream_of(&nats).await;
    let mut consumer = stream
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>("c-n-d")
        .await
        .unwrap();
    loop {
        // The delivered states are handed to this store's puller, which acks them on sight.
        st.pending("d", 16, &|_| false).await.unwrap();
        let info = consumer.info().await.unwrap().clone();
        if info.num_ack_pending == 0 && info.num_pending == 0 {
            assert_eq!(info.num_redelivered, 0);
            break;
        }
        assert!(
            recorded.elapsed() < Duration::from_secs(8),
            "still held: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    st.close().await.unwrap();
}

/// The admin's read of the oldest pending delivery changes nothing: this instance's puller keeps
/// taking deliveries up to the scheduler's window. (Read through `pending` with a limit of
/// one, as it was, it shrank the window to one until the scheduler's next pass.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_the_oldest_pending_leaves_the_pullers_window_alone() {
    const WINDOW: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let st = jetstream(dir.path(), &nats).await;
    // A scheduler's pass sets the window.
    assert!(st
        .pending("w", WINDOW, &|_| false)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(st.oldest_pending("w").await.unwrap(), None);
    let started = now_ms();
    for i in 0..WINDOW {
        accepted(st.as_ref(), ev(&format!("w{i}"), "x", &["w"])).await;
    }
    let stream = stream_of(&nats).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Only the admin reads meanwhile.
        let due = st.oldest_pending("w").await.unwrap();
        if let Ok(mut consumer) = stream
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>("c-n-w")
            .await
        {
            let info = consumer.info().await.unwrap().clone();
            if info.num_ack_pending == WINDOW {
                let due = due.expect("held deliveries have a due time");
                assert!((started..=now_ms()).contains(&due), "{due}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the puller holds {} of {WINDOW}",
                info.num_ack_pending
            );
        }
        assert!(Instant::now() < deadline, "no consumer for w");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    st.close().await.unwrap();
}

/// Dead letters listed while others are being written: each listed once. (The stream's
/// subject listing is paged by offset over a sorted set, and async-nats asks for one page
/// more than it needs: a subject written between the two requests shifted the set and the
/// last one came again. The admin API showed a dead letter twice, another not at all.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_listed_while_others_are_written_are_each_listed_once() {
    const EVENTS: usize = 60;
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let st = jetstream(dir.path(), &nats).await;
    let mut seqs = Vec::new();
    for i in 0..EVENTS {
        seqs.push(accepted(st.as_ref(), ev(&format!("l{i}"), "x", &["a"])).await);
    }
    for &seq in &seqs {
        due(st.as_ref(), "a", seq).await;
    }
    let writer = {
        let st = st.clone();
        tokio::spawn(async move {
            for seq in seqs {
                st.record(&key(seq, "a"), dead()).await.unwrap();
            }
        })
    };
    // Four listings at a time, for more of them to overlap a write.
    let mut listings = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(
            Instant::now() < deadline,
            "the {EVENTS} dead letters were not written within 30 s ({listings} listings)"
        );
        let done = writer.is_finished();
        let (a, b, c, d) = tokio::join!(
            st.dead(Some("a"), 1000),
            st.dead(Some("a"), 1000),
            st.dead(Some("a"), 1000),
            st.dead(Some("a"), 1000)
        );
        for dead in [a, b, c, d] {
            let dead = dead.unwrap();
            let unique: HashSet<u64> = dead.iter().map(|d| d.delivery.seq).collect();
            assert_eq!(
                unique.len(),
                dead.len(),
                "listing {listings}: a dead letter twice"
            );
            listings += 1;
            if done {
                assert_eq!(dead.len(), EVENTS);
            }
        }
        if done {
            break;
        }
    }
    println!("{listings} listings while {EVENTS} dead letters were written");
    st.close().await.unwrap();
}

/// An instance that dies after writing an ordered head's outcome, before it moved the
/// key's line on, stops nothing: the next delivery of the key, waiting, comes back to a
/// puller after its nak's delay and moves the line on itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_left_behind_by_a_dead_instance_moves_on() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let st = jetstream(dir.path(), &nats).await;
    let k0 = accepted(st.as_ref(), ordered("k0")).await;
    let k1 = accepted(st.as_ref(), ordered("k1")).await;
    due(st.as_ref(), "r", k0).await;
    // K-0's delivered state written as `record` writes it, and nothing after: the line
    // still names K-0 as its head, and K-1 waits.
    let stream = stream_of(&nats).await;
    let info = stream.info_with_subjects("c.q.n-r.>").await.unwrap();
    let subjects: Vec<String> = {
        use futures_util::TryStreamExt;
        info.map_ok(|(s, _)| s).try_collect().await.unwrap()
    };
    let mut head = None;
    for s in subjects {
        let m = stream.get_last_raw_message_by_subject(&s).await.unwrap();
        let text = String::from_utf8_lossy(&m.payload).to_string();
        if text.contains(&format!("\"seq\":{k0},")) {
            head = Some((s, m.sequence, text));
        }
    }
    let (subject, last, text) = head.expect("K-0's state");
    assert!(text.contains("\"state\":\"pending\""), "{text}");
    let delivered = text.replacen("\"state\":\"pending\"", "\"state\":\"delivered\"", 1);
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "Nats-Expected-Last-Subject-Sequence",
        last.to_string().as_str(),
    );
    js.publish_with_headers(subject, headers, delivered.into())
        .await
        .unwrap()
        .await
        .unwrap();
    // K-1 comes back after its first nak (5 s) and goes.
    let started = Instant::now();
    due(st.as_ref(), "r", k1).await;
    println!("K-1 due {:?} after K-0's outcome", started.elapsed());
    st.close().await.unwrap();
}

/// A retry due at once is handed out again at once, every time: the lease on its new state
/// (taken while its outcome was still being written) is kept, not let go for the server to
/// hand out after its ack wait (6 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_due_at_once_is_due_again_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let st = jetstream(dir.path(), &nats).await;
    for i in 0..20 {
        let seq = accepted(st.as_ref(), ev(&format!("now{i}"), "x", &["w"])).await;
        due(st.as_ref(), "w", seq).await;
        let now = Outcome::Retry {
            due_ms: now_ms(),
            status: Some(503),
            error: "HTTP 503".into(),
            attempt: Some(1),
        };
        st.record(&key(seq, "w"), now).await.unwrap();
        // Under the 6 s ack wait it would otherwise take (counted from the hand-out, a little
        // before this wait starts), with room for a loaded machine; twenty rounds catch a
        // build that waits for it.
        due_within(st.as_ref(), "w", seq, Duration::from_secs(5)).await;
        st.record(&key(seq, "w"), Outcome::Delivered { status: 200 })
            .await
            .unwrap();
    }
    st.close().await.unwrap();
}

/// The oldest pending age counts a delivery waiting out a retry's backoff, which the
/// server holds for its redelivery and no instance holds: it does not fall to none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_pending_counts_a_delivery_waiting_out_its_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let st = jetstream(dir.path(), &nats).await;
    st.wakeup("w"); // a known destination, as its scheduler makes it
    let mut e = ev("g1", "x", &["w"]);
    e.received_ms -= 30_000;
    let received = e.received_ms;
    let seq = accepted(st.as_ref(), e).await;
    due(st.as_ref(), "w", seq).await;
    let key = DeliveryKey {
        seq,
        destination: "w".into(),
    };
    let later = Outcome::Retry {
        due_ms: now_ms() + 60_000,
        status: Some(503),
        error: "HTTP 503".into(),
        attempt: Some(1),
    };
    st.record(&key, later).await.unwrap();
    // Seen by the next count (one a second), then on every read after it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while st.oldest_pending("w").await.unwrap() != Some(received) {
        assert!(
            Instant::now() < deadline,
            "the retrying delivery is not counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(st.oldest_pending("w").await.unwrap(), Some(received));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    st.close().await.unwrap();
}

/// The oldest pending age counts the backlog no instance has taken yet: an instance that
/// holds none of a destination's deliveries still shows how long its first has been due.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_pending_counts_the_backlog_no_instance_holds() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let a = jetstream(dir.path(), &nats).await;
    let b = jetstream(dir.path(), &nats).await;
    let before = now_ms();
    for i in 0..40 {
        accepted(a.as_ref(), ev(&format!("b{i}"), "x", &["w"])).await;
    }
    // A takes one at a time and sends none; B takes none at all.
    let deadline = Instant::now() + Duration::from_secs(10);
    while a.pending("w", 1, &|_| false).await.unwrap().is_empty() {
        assert!(Instant::now() < deadline, "A never took one");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    b.hand_back("w", &|_| false).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let due = loop {
        if let Some(due) = b.oldest_pending("w").await.unwrap() {
            break due;
        }
        assert!(
            Instant::now() < deadline,
            "B never saw the backlog's oldest"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        (before..=now_ms()).contains(&due),
        "the backlog's first was due when it was accepted: {due} (accepts began {before})"
    );
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// A line entry whose event never came (an accept that died between writing its entry and
/// its event) holds its line back only until an instance has seen it stand for nothing for
/// 10 s (by its own clock: the entry's time, a minute old here, is not trusted), then it is
/// let go. The waiting delivery behind it checks its line 5 and 15 s after its fan-out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_whose_event_never_came_is_let_go_once_old() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let st = jetstream(dir.path(), &nats).await;
    let minute_ago = now_ms() - 60_000;
    put_line_entry(
        &nats,
        &format!(r#"{{"e":"0000000000000000.0000000000000000","ms":{minute_ago}}}"#),
    )
    .await;
    let k0 = accepted(st.as_ref(), ordered("k0")).await;
    let started = Instant::now();
    due_within(st.as_ref(), "r", k0, Duration::from_secs(40)).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(10),
        "the orphan was let go after {waited:?}, before 10 s of standing for nothing"
    );
    println!("K-0 due after {waited:?}");
    st.close().await.unwrap();
}

/// Puts `payload` first in the line of key `K` to destination `r` (stream prefix `c`):
/// `c.o.n-r.<16 hex digits of SHA-256 of K>.<slot>`, as if an accept had written it.
async fn put_line_entry(nats: &NatsServer, payload: &str) {
    use sha2::Digest;
    let hash: String = sha2::Sha256::digest(b"K")[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    js.publish(
        format!("c.o.n-r.{hash}.00000000deadbeef"),
        payload.to_string().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

/// A damaged line entry at the head of a key's line is let go at once: it held back the
/// key, and the whole event's fan-out (its other destinations too) was tried again forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_line_entry_holds_nothing_back() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let st = jetstream(dir.path(), &nats).await;
    put_line_entry(&nats, "x").await;
    let k0 = accepted(
        st.as_ref(),
        NewEvent {
            order_keys: vec![Some("K".into()), None],
            ..ev("k0", "o", &["r", "u"])
        },
    )
    .await;
    // Under the 10 s an orphan entry waits, with room for a loaded machine.
    due_within(st.as_ref(), "u", k0, Duration::from_secs(9)).await;
    due_within(st.as_ref(), "r", k0, Duration::from_secs(9)).await;
    st.close().await.unwrap();
}

/// An accept refused after writing its line entries (here its event is larger than the
/// server takes) deletes them at once: the key's next event is not held back for the
/// 10 s an orphan entry waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_accepts_line_entries_do_not_hold_its_key_back() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let st = jetstream(dir.path(), &nats).await;
    let too_large = NewEvent {
        body: Bytes::from(vec![b' '; 9 << 20]),
        ..ordered("big")
    };
    let refused = st.accept(too_large).await.unwrap();
    assert!(matches!(refused, Admission::TooLarge { .. }), "{refused:?}");
    let k0 = accepted(st.as_ref(), ordered("k0")).await;
    let started = Instant::now();
    // Under the 10 s an orphan entry waits, with room for a loaded machine.
    due_within(st.as_ref(), "r", k0, Duration::from_secs(9)).await;
    println!("K-0 due after {:?}", started.elapsed());
    st.close().await.unwrap();
}

/// An event stored after its line entry was let go as an orphan (the server was slower than
/// the orphan wait) is not stranded: its fan-out finds the entry gone and puts it back by
/// accept order, behind the line's head (here K-1, which heads the line by then), waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_whose_entry_was_let_go_rejoins_its_line_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let st = jetstream(dir.path(), &nats).await;
    st.pending("r", 1, &|_| false).await.unwrap();
    let stream = paused_fanout(&nats).await;
    let k0 = accepted(st.as_ref(), ordered("k0")).await;
    let k1 = accepted(st.as_ref(), ordered("k1")).await;
    // K-0's entry, the line's first, goes (as an orphan's would).
    let first = stream
        .get_first_raw_message_by_subject("c.o.n-r.*.*", 1)
        .await
        .unwrap();
    assert!(stream.delete_message(first.sequence).await.unwrap());
    stream.resume_consumer("c-fanout").await.unwrap();
    // K-1 heads the line now; K-0 follows it, not stranded.
    due(st.as_ref(), "r", k1).await;
    assert!(!lists_any(st.as_ref(), "r", &[k0]).await, "K-0 waits");
    st.record(&key(k1, "r"), Outcome::Delivered { status: 200 })
        .await
        .unwrap();
    due(st.as_ref(), "r", k0).await;
    st.close().await.unwrap();
}

/// A waiting delivery whose line entry went after its fan-out (an accept that gave up, its
/// ack late, deletes its entries while another instance fans the event out, finding the
/// entry still there) is put back when it comes back for its recheck, and goes once the
/// head is done, where it waited forever before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_delivery_whose_entry_went_after_its_fan_out_still_goes() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let st = jetstream(dir.path(), &nats).await;
    let stream = stream_of(&nats).await;
    let k0 = accepted(st.as_ref(), ordered("k0")).await;
    let k1 = accepted(st.as_ref(), ordered("k1")).await;
    due(st.as_ref(), "r", k0).await;
    // K-1 fanned out, waiting behind K-0 (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(15);
    while st.lookup("k1").await.unwrap()[0].deliveries.is_empty() {
        assert!(Instant::now() < deadline, "K-1 never fanned out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!lists_any(st.as_ref(), "r", &[k1]).await, "K-1 waits");
    // Then its entry, the line's last, goes.
    let last = stream
        .get_last_raw_message_by_subject("c.o.n-r.*.*")
        .await
        .unwrap();
    assert!(stream.delete_message(last.sequence).await.unwrap());
    st.record(&key(k0, "r"), Outcome::Delivered { status: 200 })
        .await
        .unwrap();
    due_within(st.as_ref(), "r", k1, Duration::from_secs(40)).await;
    st.close().await.unwrap();
}

/// Waits until `st` holds `dest`'s delivery `seq` with a scheduler's window of one (so its
/// puller takes no more).
async fn held_alone(st: &dyn Store, dest: &str, seq: u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !st
        .pending(dest, 1, &|_| false)
        .await
        .unwrap()
        .iter()
        .any(|d| d.seq == seq)
    {
        assert!(Instant::now() < deadline, "never held");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A delivery held here, not yet sent, through a JetStream outage longer than the ack wait
/// may have gone to another instance: it is let go, not listed (and so sent) here too. The
/// other instance sends it; for an order key, the key's next may follow it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_held_through_an_outage_is_let_go() {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = NatsServer::start(dir.path()).await;
    let a = jetstream(dir.path(), &nats).await;
    let seq = accepted(a.as_ref(), ev("o1", "x", &["w"])).await;
    // Held by `a`, in a window of one: its puller takes nothing more.
    held_alone(a.as_ref(), "w", seq).await;
    assert!(a.still_held("w", seq), "held, so it may be sent");
    // The outage itself: longer than the 6 s ack wait.
    nats.sigkill();
    // A scheduler that read it before the outage (and waited for a slot or a token) checks
    // this right before sending it: false once the hold lapsed (bounded wait).
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.still_held("w", seq) {
        assert!(Instant::now() < deadline, "still held long after the lapse");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    nats.restart().await;
    let b = jetstream(dir.path(), &nats).await;
    let d = due_within(b.as_ref(), "w", seq, Duration::from_secs(30)).await;
    let key = DeliveryKey {
        seq: d.seq,
        destination: "w".into(),
    };
    b.record(&key, Outcome::Delivered { status: 200 })
        .await
        .unwrap();
    let listed = a.pending("w", 1, &|_| false).await.unwrap();
    assert!(
        listed.iter().all(|d| d.seq != seq),
        "held on here too: {listed:?}"
    );
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// A delivery made here while its hold lapsed (an outage during the attempt), after another
/// instance took it over and stored a retry: the destination has the event, so the retry
/// becomes delivered rather than being sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_made_after_its_hold_lapsed_is_not_sent_again() {
    made_after_its_hold_lapsed("m1", |attempts| Outcome::Retry {
        due_ms: now_ms() + 60_000,
        status: Some(503),
        error: "HTTP 503".into(),
        attempt: Some(attempts + 1),
    })
    .await;
}

/// The same, after the other instance's attempt got a 4xx and made it dead: it is
/// delivered, and off the dead list (a replay would send it again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_made_after_its_hold_lapsed_is_not_left_dead() {
    made_after_its_hold_lapsed("m2", |_| Outcome::Dead {
        status: Some(400),
        error: "HTTP 400".into(),
    })
    .await;
}

/// `id`'s delivery held by `a` through an outage, taken over by `b` whose attempt ends in
/// `b_outcome` (given its attempts so far), then delivered by `a`: delivered, not dead.
async fn made_after_its_hold_lapsed(id: &str, b_outcome: fn(u32) -> Outcome) {
    let dir = tempfile::tempdir().unwrap();
    let mut nats = NatsServer::start(dir.path()).await;
    let a = jetstream(dir.path(), &nats).await;
    let seq = accepted(a.as_ref(), ev(id, "x", &["w"])).await;
    // Held by `a`, in a window of one: its puller takes nothing more (nor this delivery
    // again once the server hands it out after the outage).
    held_alone(a.as_ref(), "w", seq).await;
    // `a` sends it; its answer comes only after an outage longer than the ack wait: until
    // `a`'s hold has lapsed (bounded wait).
    nats.sigkill();
    let deadline = Instant::now() + Duration::from_secs(20);
    while a.still_held("w", seq) {
        assert!(Instant::now() < deadline, "still held long after the lapse");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    nats.restart().await;
    let b = jetstream(dir.path(), &nats).await;
    let d = due_within(b.as_ref(), "w", seq, Duration::from_secs(30)).await;
    let key = DeliveryKey {
        seq: d.seq,
        destination: "w".into(),
    };
    // `b`'s own attempt failed.
    b.record(&key, b_outcome(d.attempts)).await.unwrap();
    // Then `a`'s answer: delivered.
    a.record(&key, Outcome::Delivered { status: 200 })
        .await
        .unwrap();
    let views = b.lookup(id).await.unwrap();
    let states: Vec<DeliveryState> = views
        .iter()
        .flat_map(|v| v.deliveries.iter().map(|d| d.state))
        .collect();
    assert_eq!(states, vec![DeliveryState::Delivered], "{views:?}");
    assert!(
        b.dead(None, 10).await.unwrap().is_empty(),
        "on the dead list"
    );
    a.close().await.unwrap();
    b.close().await.unwrap();
}

/// The oldest pending delivery's age stays what it was while its consumer cannot be read
/// (it is what an operator's alert watches; dropping to nothing would clear the alert).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_pending_is_kept_while_its_consumer_cannot_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let st = jetstream(dir.path(), &nats).await;
    // Paused: nothing is held here, so the figure comes from the consumer's backlog.
    st.set_paused("w", true).await.unwrap();
    st.wakeup("w");
    let received = now_ms();
    accepted(st.as_ref(), ev("b1", "x", &["w"])).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let oldest = loop {
        if let Some(t) = st.oldest_pending("w").await.unwrap() {
            break t;
        }
        assert!(Instant::now() < deadline, "the backlog is never counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!((received..=now_ms()).contains(&oldest), "{oldest}");
    // Its consumer gone (deleted by hand; the puller makes it again only once resumed),
    // the once-a-second counts fail to read it.
    let stream = stream_of(&nats).await;
    stream.delete_consumer("c-n-w").await.unwrap();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(st.oldest_pending("w").await.unwrap(), Some(oldest));
    }
    st.close().await.unwrap();
}

/// Event subjects are named by 64-bit hashes of the id and the source. Another id whose
/// hashes collide with an event kept within the window is refused (the provider retries
/// later), not answered as that event's duplicate and never delivered. The collision is
/// made by hand: a record of id "other" under the subject of id "mine".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_whose_subject_collides_with_another_ids_is_not_a_duplicate() {
    use sha2::Digest;
    let hash = |s: &str| -> String {
        sha2::Sha256::digest(s.as_bytes())[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let dir = tempfile::tempdir().unwrap();
    let nats = NatsServer::start(dir.path()).await;
    let st = jetstream(dir.path(), &nats).await;
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let record = format!(
        "{}\n{{}}",
        serde_json::json!({"id": "other", "source": "x", "received_ms": now_ms(),
            "content_type": null, "destinations": ["w"]})
    );
    js.publish(
        format!("c.ev.{}.{}", hash("mine"), hash("x")),
        record.into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let refused = st.accept(ev("mine", "x", &["w"])).await.unwrap();
    assert!(matches!(refused, Admission::IdCollides), "{refused:?}");
    // The same through the queue-full path, which looks for a duplicate first.
    let full = NewEvent {
        max_queue: vec![0],
        ..ev("mine", "x", &["w"])
    };
    let refused = st.accept(full).await.unwrap();
    assert!(matches!(refused, Admission::IdCollides), "{refused:?}");
    st.close().await.unwrap();
}
