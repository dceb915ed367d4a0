//! What the two pullers (the fan-out and each destination's) share: their durable consumer,
//! created or found again until it works (at start, and after a pull ended with an error:
//! it may have been deleted) and marked with where what it reads again ends, one pull of a
//! batch, tried again after a failure, and its count of what it has not handed out. `what`
//! names the puller in the log.

use std::time::Duration;

use async_nats::jetstream::consumer::{self, pull, PullConsumer};
use async_nats::jetstream::stream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How long one pull waits for messages.
const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// The wait before trying again after a failure.
pub(super) const RETRY: Duration = Duration::from_secs(1);

/// A consumer's metadata key for the stream's last sequence when it was made: a consumer
/// made again (deleted by hand, lost with a server) reads every message kept up to there a
/// second time ([`unread`]). Only for a consumer that takes most of the stream's messages
/// and is never paused (the fan-out's): for one of a few subjects the discount would hide
/// what it has not read at all.
pub const REPLAY_UNTIL: &str = "hookrelay_replay_until";

/// `config` marked with the stream's last sequence now, for a consumer about to be made (an
/// existing one keeps its own mark); `None` if the stream cannot be read.
pub(super) async fn marked(
    stream: &stream::Stream,
    mut config: pull::Config,
) -> Option<pull::Config> {
    let info = stream.get_info().await.ok()?;
    config
        .metadata
        .insert(REPLAY_UNTIL.into(), info.state.last_sequence.to_string());
    Some(config)
}

/// What a consumer has not handed out yet, less what it is reading a second time: all of it
/// counted against `max_queue` (kept events to fan out again) would refuse every accept
/// until it is through ([`unread_of`]).
pub(super) fn unread(info: &consumer::Info) -> u64 {
    let until = info
        .config
        .metadata
        .get(REPLAY_UNTIL)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    unread_of(info.num_pending, info.delivered.stream_sequence, until)
}

/// `pending` less the messages read again: the stream sequences between the last one handed
/// out (`delivered`) and the stream's last when the consumer was made (`replay_until`) are
/// at least as many. They are usually many more (the stream holds the other subjects too),
/// so until it is past them the messages written meanwhile, and the few the old consumer
/// left, are mostly not counted: `max_queue` holds back less for that while, rather than
/// refusing everything.
fn unread_of(pending: u64, delivered: u64, replay_until: u64) -> u64 {
    pending.saturating_sub(replay_until.saturating_sub(delivered))
}

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
            Some(config) => match stream.get_or_create_consumer(name, config).await {
                Ok(c) => return Some(c),
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

#[cfg(test)]
mod tests {
    use super::unread_of;

    #[test]
    fn messages_read_again_by_a_consumer_made_again_are_not_counted() {
        // Made again when the stream's last sequence was 1,000: 900 messages to read again,
        // 100 of them read so far (up to sequence 150), 5 new ones since.
        assert_eq!(unread_of(805, 150, 1_000), 0);
        // Past the replay, new messages count in full.
        assert_eq!(unread_of(5, 1_000, 1_000), 5);
        assert_eq!(unread_of(5, 1_020, 1_000), 5);
        // Nearly through: only what lies past the replay's end counts.
        assert_eq!(unread_of(30, 990, 1_000), 20);
        // Never marked (made by an older build): all of it counts.
        assert_eq!(unread_of(30, 0, 0), 30);
    }
}
