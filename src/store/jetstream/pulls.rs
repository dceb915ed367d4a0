//! What the two pullers (the fan-out and each destination's) share: their durable consumer,
//! created or found again until it works (at start, and after a pull ended with an error:
//! it may have been deleted), and one pull of a batch, tried again after a failure. `what`
//! names the puller in the log.

use std::time::Duration;

use async_nats::jetstream::consumer::{self, pull, PullConsumer};
use async_nats::jetstream::stream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, warn};

/// How long one pull waits for messages.
const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// The wait before trying again after a failure.
pub(super) const RETRY: Duration = Duration::from_secs(1);

/// The durable consumer `name` on `stream`, created if missing with the config `make` gives
/// at each try (`None`: it could not be made now, tried again); `None` once `stop`.
pub(super) async fn consumer<F>(
    stream: &stream::Stream,
    name: &str,
    make: impl Fn() -> F,
    what: &str,
    stop: &CancellationToken,
) -> Option<PullConsumer>
where
    F: std::future::Future<Output = Option<pull::Config>>,
{
    loop {
        match make().await {
            Some(config) => match stream.get_or_create_consumer(name, config.clone()).await {
                Ok(c) => {
                    if let Some(c) = set_back(stream, c, config, what).await {
                        return Some(c);
                    }
                }
                Err(e) => {
                    warn!(puller = what, error = %e, "creating the JetStream consumer failed; trying again");
                }
            },
            None => warn!(
                puller = what,
                "reading the stream to make its consumer failed; trying again"
            ),
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// `found` as `want` says, its metadata kept (the fan-out's mark of what it reads again, the
/// server's own keys): a consumer found with other settings (an operator's edit, an older
/// build) is set back to `want`'s, since some of them lose, hold back or stop deliveries.
/// If the server refuses that in place, the log says to delete it (the relay makes it
/// again), and it is used as found unless it would lose or skip deliveries
/// ([`Drift::loses`]): then `None`, and the caller tries again after a while.
async fn set_back(
    stream: &stream::Stream,
    found: PullConsumer,
    mut want: pull::Config,
    what: &str,
) -> Option<PullConsumer> {
    let have = &found.cached_info().config;
    let drift = drift(have, &want);
    if drift.changed.is_empty() {
        return Some(found);
    }
    let changed = drift.changed.join("; ");
    want.metadata = have.metadata.clone();
    let name = want.durable_name.clone().unwrap_or_default();
    match stream.update_consumer(want).await {
        Ok(c) => {
            warn!(
                puller = what,
                consumer = name,
                changed,
                "the JetStream consumer's settings had been changed; set back"
            );
            Some(c)
        }
        Err(e) => {
            error!(
                puller = what,
                consumer = name,
                changed,
                error = %e,
                "the JetStream consumer's settings were changed and cannot be set back in place; \
                 delete it (nats consumer rm {} {name}) and the relay makes it again",
                stream.cached_info().config.name
            );
            (!drift.loses).then_some(found)
        }
    }
}

/// How a consumer's settings differ from what the relay makes.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Drift {
    /// One phrase per setting that differs.
    pub changed: Vec<String>,
    /// One of them would lose or skip deliveries (their acks, policy, subjects, payloads).
    pub loses: bool,
}

/// How the settings `have` differ from `want` where it matters to the relay. Settings the
/// server fills in itself (left at their defaults in `want`) count only when set to
/// something that would hold deliveries back.
pub(super) fn drift(have: &consumer::Config, want: &pull::Config) -> Drift {
    let mut d = Drift::default();
    let mut differs = |loses: bool, name: &str, have: String, want: String| {
        if have != want {
            d.changed.push(format!("{name} is {have}, not {want}"));
            d.loses |= loses;
        }
    };
    let shown = |v: &dyn std::fmt::Debug| format!("{v:?}");
    differs(
        true,
        "deliver_policy",
        shown(&have.deliver_policy),
        shown(&want.deliver_policy),
    );
    differs(
        true,
        "ack_policy",
        shown(&have.ack_policy),
        shown(&want.ack_policy),
    );
    differs(
        true,
        "filter_subject",
        have.filter_subject.clone(),
        want.filter_subject.clone(),
    );
    differs(
        true,
        "filter_subjects",
        shown(&have.filter_subjects),
        shown(&want.filter_subjects),
    );
    differs(
        true,
        "headers_only",
        shown(&have.headers_only),
        shown(&want.headers_only),
    );
    differs(
        false,
        "ack_wait",
        shown(&have.ack_wait),
        shown(&want.ack_wait),
    );
    differs(
        false,
        "max_deliver",
        shown(&have.max_deliver),
        shown(&want.max_deliver),
    );
    differs(
        false,
        "max_ack_pending",
        shown(&have.max_ack_pending),
        shown(&want.max_ack_pending),
    );
    differs(
        false,
        "replay_policy",
        shown(&have.replay_policy),
        shown(&want.replay_policy),
    );
    differs(
        false,
        "memory_storage",
        shown(&have.memory_storage),
        shown(&want.memory_storage),
    );
    differs(false, "backoff", shown(&have.backoff), shown(&want.backoff));
    differs(
        false,
        "rate_limit",
        shown(&have.rate_limit),
        shown(&want.rate_limit),
    );
    differs(
        false,
        "priority_groups",
        shown(&have.priority_groups),
        shown(&want.priority_groups),
    );
    let unset = String::from("unset");
    let or_unset = |set: bool, v: String| if set { v } else { unset.clone() };
    differs(
        false,
        "inactive_threshold",
        or_unset(
            have.inactive_threshold > Duration::ZERO,
            shown(&have.inactive_threshold),
        ),
        unset.clone(),
    );
    differs(
        false,
        "max_batch",
        or_unset(have.max_batch > 0, shown(&have.max_batch)),
        unset.clone(),
    );
    differs(
        false,
        "max_bytes",
        or_unset(have.max_bytes > 0, shown(&have.max_bytes)),
        unset.clone(),
    );
    differs(
        false,
        "max_expires",
        or_unset(have.max_expires > Duration::ZERO, shown(&have.max_expires)),
        unset.clone(),
    );
    differs(
        false,
        "pause_until",
        or_unset(have.pause_until.is_some(), "set".into()),
        unset.clone(),
    );
    d
}

/// After a pull ended with an error (the consumer deleted, no leader during an election, no
/// responders): logs it and waits `RETRY` before the caller finds or creates the consumer
/// again ([`consumer`]); false once `stop`.
pub(super) async fn pause_after(
    what: &str,
    error: &async_nats::Error,
    stop: &CancellationToken,
) -> bool {
    warn!(puller = what, error = %error, "a pull ended with an error; trying again");
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(RETRY) => true,
    }
}

/// One pull of at most `max` messages; `None` after a failed one, once `RETRY` has passed
/// (or `stop`).
pub(super) async fn batch(
    consumer: &PullConsumer,
    max: usize,
    what: &str,
    stop: &CancellationToken,
) -> Option<pull::Batch> {
    match consumer
        .fetch()
        .max_messages(max)
        .expires(PULL_EXPIRES)
        .messages()
        .await
    {
        Ok(b) => Some(b),
        Err(e) => {
            debug!(puller = what, error = %e, "a pull failed; trying again");
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(RETRY) => {}
            }
            None
        }
    }
}
