//! The instances' breakers told to each other (CONTRACT §8 across §7): when one instance's
//! breaker for a destination opens or closes, it publishes that on core NATS
//! (`<prefix>_breakers.<destination token>`, outside the stream: nothing is stored), and
//! every other instance applies it to its own ([`crate::destinations`]). At most once: an
//! instance that misses a change (disconnected then) goes on with its own breaker.

use async_nats::Client;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::records::{token, untoken};

/// The subject of `destination`'s breaker news.
pub(super) fn subject(prefix: &str, destination: &str) -> String {
    format!("{prefix}_breakers.{}", token(destination))
}

/// `<instance id> <open since ms>`; 0 for closed.
fn encode(me: &str, open_since_ms: Option<u64>) -> Bytes {
    Bytes::from(format!("{me} {}", open_since_ms.unwrap_or(0)))
}

/// The sender's id and the state it says.
fn decode(payload: &[u8]) -> Option<(&str, Option<u64>)> {
    let (id, since) = std::str::from_utf8(payload).ok()?.split_once(' ')?;
    let since: u64 = since.parse().ok()?;
    Some((id, (since > 0).then_some(since)))
}

/// Publishes this instance's change (in the background: nothing waits for it).
pub(super) fn publish(
    client: &Client,
    prefix: &str,
    me: &str,
    destination: &str,
    open_since_ms: Option<u64>,
) {
    let (client, subject) = (client.clone(), subject(prefix, destination));
    let payload = encode(me, open_since_ms);
    tokio::spawn(async move {
        if let Err(e) = client.publish(subject, payload).await {
            debug!(error = %e, "telling the other instances of a breaker's change failed");
        }
    });
}

/// Hands every other instance's change to `news` until `stop` (the subscription follows
/// the connection through reconnects).
pub(super) async fn listen(
    client: Client,
    prefix: String,
    me: String,
    news: UnboundedSender<(String, Option<u64>)>,
    stop: CancellationToken,
) {
    let mut sub = match client.subscribe(format!("{prefix}_breakers.*")).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot hear the other instances' breakers; each goes on with its own");
            return;
        }
    };
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return,
            m = sub.next() => m,
        };
        let Some(msg) = msg else { return };
        let dest = msg.subject.rsplit('.').next().and_then(untoken);
        if let (Some(dest), Some((from, state))) = (dest, decode(&msg.payload)) {
            if from != me && news.send((dest, state)).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn news_reads_back_as_written() {
        assert_eq!(decode(&encode("a1", Some(5))), Some(("a1", Some(5))));
        assert_eq!(decode(&encode("a1", None)), Some(("a1", None)));
        assert_eq!(decode(b"nonsense"), None);
        assert_eq!(
            subject("hr", "x.y"),
            format!("hr_breakers.{}", token("x.y"))
        );
    }
}
