//! Destinations that misbehave: one that hangs does not hold back a healthy one, resets
//! mid-response are retried until answered, a flapping one gets every event and none dead.
//! The relays run in this process; the destinations are [`FaultSink`]s on 127.0.0.1:0; every
//! wait is bounded.

mod support;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hookrelay::store::{DeliveryState, Store};
use support::{client, Action, FaultSink};
use support::{destination_toml, fault_config, post_event, route_toml};
use support::{start_relay, stop_relay, FAULT_WAIT as WAIT};

/// Posts events `<prefix>-0..n`, each must be accepted; returns their ids.
async fn post_all(relay: &hookrelay::Relay, prefix: &str, n: usize) -> HashSet<String> {
    let c = client();
    let mut ids = HashSet::new();
    for i in 0..n {
        let id = format!("{prefix}-{i}");
        let p = post_event(&c, relay, &id, 0).await;
        assert_eq!(p.status, 200, "{id}: {:?}", p.body);
        ids.insert(id);
    }
    ids
}

/// The state of the delivery of event `id` to `dest`.
async fn delivery(
    store: &Arc<dyn Store>,
    id: &str,
    dest: &str,
) -> Option<hookrelay::store::Delivery> {
    store
        .lookup(id)
        .await
        .unwrap()
        .iter()
        .flat_map(|v| v.deliveries.iter())
        .find(|d| d.destination == dest)
        .cloned()
}

/// Waits (bounded polling of the store: there is no event to await) until the delivery of
/// every id to `dest` is in `state`.
async fn wait_all_in(
    store: &Arc<dyn Store>,
    ids: &HashSet<String>,
    dest: &str,
    state: DeliveryState,
) {
    let deadline = Instant::now() + WAIT;
    loop {
        let mut off = None;
        for id in ids {
            let d = delivery(store, id, dest).await;
            if d.as_ref().map(|d| d.state) != Some(state) {
                off = Some((id.clone(), d));
                break;
            }
        }
        let Some((id, d)) = off else { return };
        assert!(
            Instant::now() < deadline,
            "delivery of {id} to {dest} not {state:?} within {WAIT:?}: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---- (a) one hanging destination does not hold back another ------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_destination_does_not_hold_back_a_healthy_one() {
    const N: usize = 200;
    let slow = FaultSink::start(|_| Action::Hang).await;
    let fast = FaultSink::answering(200).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = fault_config(
        "",
        r#"retry = { first = "100ms", factor = 2.0, max_delay = "500ms" }"#,
        &format!(
            "{}{}{}",
            destination_toml("slow", &slow.url("/slow"), r#"timeout = "200ms""#),
            destination_toml("fast", &fast.url("/fast"), ""),
            route_toml(&["slow", "fast"])
        ),
    );
    let relay = start_relay(dir.path(), &cfg).await;
    let store = relay.app.store.clone();

    let started = Instant::now();
    let ids = post_all(&relay, "hang", N).await;
    let posted = started.elapsed();
    fast.wait_delivered(&ids, Duration::from_secs(5))
        .await
        .unwrap_or_else(|m| panic!("{} events held back from the healthy destination", m.len()));
    let healthy_done = started.elapsed();
    // Meanwhile the hanging destination was tried, and its deliveries wait, pending.
    assert!(
        slow.wait_count(N, WAIT).await,
        "every event was tried at the hanging destination ({} requests)",
        slow.count()
    );
    for id in &ids {
        let d = delivery(&store, id, "slow")
            .await
            .expect("a delivery to slow");
        assert_eq!(d.state, DeliveryState::Pending, "{d:?}");
    }
    assert!(store.dead(Some("slow"), 10).await.unwrap().is_empty());
    let d = delivery(&store, "hang-0", "slow").await.unwrap();
    assert!(
        d.attempts >= 1 && d.last_error.as_deref().unwrap_or("").contains("timed out"),
        "{d:?}"
    );
    println!(
        "hanging destination: {N} events posted in {:.0?}, all at the healthy one after {:.0?}; \
         {} requests to the hanging one, all {N} still pending",
        posted,
        healthy_done,
        slow.count()
    );

    // Not lost: once it answers, everything arrives there too.
    slow.set_behaviour(|_| Action::Answer(200));
    slow.wait_delivered(&ids, WAIT)
        .await
        .unwrap_or_else(|m| panic!("{} events never reached the recovered destination", m.len()));
    wait_all_in(&store, &ids, "slow", DeliveryState::Delivered).await;
    stop_relay(relay).await;
    slow.stop().await;
    fast.stop().await;
}

// ---- (b) connection reset mid-response ----------------------------------------------------

/// A relay's config sending every event to the destination `d` at `sink`, with the
/// `[delivery]` settings `delivery`.
fn to_d(sink: &FaultSink, delivery: &str) -> String {
    fault_config(
        "",
        delivery,
        &format!(
            "{}{}",
            destination_toml("d", &sink.url("/d"), ""),
            route_toml(&["d"])
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_resets_before_the_answer_are_retried_until_answered() {
    const N: usize = 20;
    // Every request is read whole, then the connection is reset before any answer.
    let sink = FaultSink::start(|_| Action::Reset).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = to_d(
        &sink,
        r#"retry = { first = "50ms", factor = 2.0, max_delay = "200ms" }"#,
    );
    let relay = start_relay(dir.path(), &cfg).await;
    let store = relay.app.store.clone();
    let ids = post_all(&relay, "reset", N).await;
    // Every event is tried, cut off, and tried again (each of them: a relay that gave up
    // on one, or counted it delivered, would not send it a third time).
    assert!(
        sink.wait_until(
            |log| ids
                .iter()
                .all(|id| log.iter().filter(|a| &a.id == id).count() >= 3),
            WAIT
        )
        .await,
        "{} requests",
        sink.count()
    );
    for id in &ids {
        let d = delivery(&store, id, "d").await.unwrap();
        assert_eq!(d.state, DeliveryState::Pending, "{d:?}");
        assert!(d.attempts >= 2 && d.last_error.is_some(), "{d:?}");
    }
    let broken = sink.count();

    sink.set_behaviour(|_| Action::Answer(200));
    sink.wait_delivered(&ids, WAIT)
        .await
        .unwrap_or_else(|m| panic!("{} events never arrived after the resets", m.len()));
    wait_all_in(&store, &ids, "d", DeliveryState::Delivered).await;
    assert!(store.dead(None, 10).await.unwrap().is_empty());
    let arrivals = sink.arrivals();
    for id in &ids {
        let mine: Vec<_> = arrivals.iter().filter(|a| &a.id == id).collect();
        assert!(
            mine.first()
                .is_some_and(|a| a.action != Action::Answer(200)),
            "{id} was cut off first: {mine:?}"
        );
        let ok = mine.iter().find(|a| a.delivered()).unwrap();
        assert!(ok.attempt >= 2, "{id} delivered on a retry: {mine:?}");
    }
    println!(
        "connection resets: {N} events, {broken} cut-off attempts, then all {N} delivered, none dead"
    );
    stop_relay(relay).await;
    sink.stop().await;
}

/// A 2xx is the destination's word that it has the event: a body that breaks off after
/// it, or stalls until the timeout, does not make it an attempt to make again (that would
/// only send the event twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2xx_whose_body_breaks_off_or_stalls_is_delivered_once() {
    const N: usize = 6;
    let sink = FaultSink::start(|n| {
        if n % 2 == 0 {
            Action::Truncate
        } else {
            Action::Stall
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = to_d(
        &sink,
        r#"timeout = "500ms"
retry = { first = "50ms", factor = 2.0, max_delay = "200ms" }"#,
    );
    let relay = start_relay(dir.path(), &cfg).await;
    let store = relay.app.store.clone();
    let ids = post_all(&relay, "cut", N).await;
    wait_all_in(&store, &ids, "d", DeliveryState::Delivered).await;
    for id in &ids {
        let d = delivery(&store, id, "d").await.unwrap();
        assert_eq!((d.attempts, d.last_status), (1, Some(200)), "{d:?}");
    }
    assert_eq!(sink.count(), N, "each sent once");
    stop_relay(relay).await;
    sink.stop().await;
}

// ---- (c) a flapping destination ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_destination_gets_every_event_none_dead() {
    const N: usize = 100;
    let sink = FaultSink::start(|n| Action::Answer(if n % 2 == 0 { 503 } else { 200 })).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = fault_config(
        "",
        r#"retry = { first = "50ms", factor = 2.0, max_delay = "200ms" }"#,
        &format!(
            "{}{}",
            destination_toml("d", &sink.url("/d"), ""),
            route_toml(&["d"])
        ),
    );
    let relay = start_relay(dir.path(), &cfg).await;
    let store = relay.app.store.clone();
    let ids = post_all(&relay, "flap", N).await;
    sink.wait_delivered(&ids, WAIT)
        .await
        .unwrap_or_else(|m| panic!("{} events never arrived at the flapping sink", m.len()));
    wait_all_in(&store, &ids, "d", DeliveryState::Delivered).await;
    assert!(store.dead(None, 10).await.unwrap().is_empty());
    let arrivals = sink.arrivals();
    let refused = arrivals
        .iter()
        .filter(|a| a.action == Action::Answer(503))
        .count();
    assert!(refused >= N / 2 - 1, "the sink did flap: {refused} 503s");
    // What was refused was sent again, as a later attempt.
    for a in arrivals.iter().filter(|a| a.action == Action::Answer(503)) {
        assert!(
            arrivals
                .iter()
                .any(|b| b.id == a.id && b.delivered() && b.attempt > a.attempt),
            "{} refused on attempt {} and never delivered later",
            a.id,
            a.attempt
        );
    }
    let (delivered, unique) = sink.delivered_counts();
    println!(
        "flapping destination: {N} events, {} requests ({refused} answered 503), \
         {delivered} answered 200 ({unique} distinct), none dead",
        arrivals.len()
    );
    stop_relay(relay).await;
    sink.stop().await;
}
