//! What the two pullers (the fan-out and each destination's) share: their durable consumer,
//! created or found again until it works (at start, and after a pull ended with an error:
//! it may have been deleted), and one pull of a batch, tried again after a failure. `what`
//! names the puller in the log.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, PullConsumer};
use async_nats::jetstream::stream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

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
