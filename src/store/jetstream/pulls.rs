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

/// `found`, or `found` set back to `want`'s settings when it was found with others (an
/// operator's edit, an older build's), since some of them hold back or stop deliveries.
/// Settings the server cannot change in place (or whose change would not bring back what
/// they made it pass over: its subjects) are not changed: the log says to delete it (the
/// relay then makes it again, and reads everything kept once more), and it is used as
/// found unless it would lose or skip deliveries ([`Drift::loses`]): then `None`, and the
/// caller tries again after a while.
async fn set_back(
    stream: &stream::Stream,
    found: PullConsumer,
    mut want: pull::Config,
    what: &str,
) -> Option<PullConsumer> {
    let have = &found.cached_info().config;
    let drift = drift(have, &want);
    let name = want.durable_name.clone().unwrap_or_default();
    if !drift.fixed_only_by_delete.is_empty() {
        error!(
            puller = what,
            consumer = name,
            changed = drift.fixed_only_by_delete.join("; "),
            "the JetStream consumer's settings were changed in a way that cannot be set back \
             in place; delete it (nats consumer rm {} {name}) and the relay makes it again",
            stream.cached_info().config.name
        );
        if drift.loses {
            return None;
        }
    }
    if drift.fixable.is_empty() {
        return Some(found);
    }
    let changed = drift.fixable.join("; ");
    // What the server fills in or will not change in place stays as found, so that the
    // update is not refused for it.
    want.metadata = have.metadata.clone();
    want.max_waiting = have.max_waiting;
    want.replay_policy = have.replay_policy;
    want.memory_storage = have.memory_storage;
    want.max_batch = have.max_batch;
    want.max_bytes = have.max_bytes;
    want.max_expires = have.max_expires;
    want.num_replicas = have.num_replicas;
    want.pause_until = have.pause_until;
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
                "setting the JetStream consumer's changed settings back failed; it is used as \
                 it is; delete it (nats consumer rm {} {name}) and the relay makes it again",
                stream.cached_info().config.name
            );
            (!drift.loses).then_some(found)
        }
    }
}

/// How a consumer's settings differ from what the relay makes, one phrase per setting.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Drift {
    /// Settings an update sets back in place.
    pub fixable: Vec<String>,
    /// Settings only a new consumer sets back: the server will not change them, or a
    /// change would not bring back what they made it pass over (other subjects).
    pub fixed_only_by_delete: Vec<String>,
    /// One of them loses or skips deliveries (acks, deliver policy, subjects, payloads):
    /// such a consumer is not used.
    pub loses: bool,
}

/// How the settings `have` differ from `want` where it matters to the relay. Settings the
/// server fills in itself, or that its limits may set (`max_batch`, `max_expires`, …), are
/// not compared, nor a pause (an operator's own tool: the relay has its own pause).
pub(super) fn drift(have: &consumer::Config, want: &pull::Config) -> Drift {
    let mut d = Drift::default();
    let shown = |v: &dyn std::fmt::Debug| format!("{v:?}");
    let mut differs = |class: Class, name: &str, have: String, want: String| {
        if have == want {
            return;
        }
        let phrase = format!("{name} is {have}, not {want}");
        match class {
            Class::Fixable => d.fixable.push(phrase),
            Class::ByDelete => d.fixed_only_by_delete.push(phrase),
            Class::Loses => {
                d.fixed_only_by_delete.push(phrase);
                d.loses = true;
            }
        }
    };
    use Class::*;
    differs(
        Loses,
        "deliver_policy",
        shown(&have.deliver_policy),
        shown(&want.deliver_policy),
    );
    differs(
        Loses,
        "ack_policy",
        shown(&have.ack_policy),
        shown(&want.ack_policy),
    );
    differs(
        Loses,
        "filter_subject",
        have.filter_subject.clone(),
        want.filter_subject.clone(),
    );
    differs(
        Loses,
        "filter_subjects",
        shown(&have.filter_subjects),
        shown(&want.filter_subjects),
    );
    differs(
        Loses,
        "headers_only",
        shown(&have.headers_only),
        shown(&want.headers_only),
    );
    differs(
        ByDelete,
        "replay_policy",
        shown(&have.replay_policy),
        shown(&want.replay_policy),
    );
    differs(
        ByDelete,
        "memory_storage",
        shown(&have.memory_storage),
        shown(&want.memory_storage),
    );
    differs(
        Fixable,
        "ack_wait",
        shown(&have.ack_wait),
        shown(&want.ack_wait),
    );
    differs(
        Fixable,
        "max_deliver",
        shown(&have.max_deliver),
        shown(&want.max_deliver),
    );
    differs(
        Fixable,
        "max_ack_pending",
        shown(&have.max_ack_pending),
        shown(&want.max_ack_pending),
    );
    differs(
        Fixable,
        "backoff",
        shown(&have.backoff),
        shown(&want.backoff),
    );
    differs(
        Fixable,
        "rate_limit",
        shown(&have.rate_limit),
        shown(&want.rate_limit),
    );
    differs(
        Fixable,
        "priority_groups",
        shown(&have.priority_groups),
        shown(&want.priority_groups),
    );
    let unset = String::from("unset");
    let threshold = match have.inactive_threshold > Duration::ZERO {
        true => shown(&have.inactive_threshold),
        false => unset.clone(),
    };
    differs(Fixable, "inactive_threshold", threshold, unset);
    d
}

/// How a changed setting is set back.
enum Class {
    /// By an update in place.
    Fixable,
    /// Only by a new consumer.
    ByDelete,
    /// Only by a new consumer, and the found one is not used meanwhile.
    Loses,
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
