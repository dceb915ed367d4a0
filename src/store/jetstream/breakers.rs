//! The instances' breakers told to each other (CONTRACT §8 across §7): when one instance's
//! breaker for a destination opens or closes, it publishes that on core NATS, subject
//! `hookrelay~breakers.<prefix>.<destination token>` (outside every relay's stream: no
//! prefix can hold a `~`, so nothing is stored), and every other instance of the prefix
//! applies it to its own ([`crate::destinations`]). One publisher per instance keeps its
//! changes in order; nothing carries a clock. At most once: an instance that misses a
//! change (disconnected then) goes on with its own breaker.

use async_nats::Client;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc::{Receiver, Sender};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::records::{token, untoken};

/// Changes waiting to be published, or heard and not yet applied, at most: past it they
/// are dropped (at most once, as the news is).
pub(super) const BACKLOG: usize = 256;

/// The subjects of a prefix's breaker news: all of them, or `destination`'s.
fn subject(prefix: &str, destination: Option<&str>) -> String {
    match destination {
        Some(d) => format!("hookrelay~breakers.{prefix}.{}", token(d)),
        None => format!("hookrelay~breakers.{prefix}.*"),
    }
}

/// `<instance id> open` or `<instance id> closed`.
fn encode(me: &str, open: bool) -> Bytes {
    Bytes::from(format!("{me} {}", if open { "open" } else { "closed" }))
}

/// The sender's id and whether it says open.
fn decode(payload: &[u8]) -> Option<(&str, bool)> {
    match std::str::from_utf8(payload).ok()?.split_once(' ')? {
        (id, "open") => Some((id, true)),
        (id, "closed") => Some((id, false)),
        _ => None,
    }
}

/// Publishes this instance's changes, in the order they came, until `stop` (then what is
/// still queued, and a flush).
pub(super) async fn publish(
    client: Client,
    prefix: String,
    me: String,
    mut changes: Receiver<(String, bool)>,
    stop: CancellationToken,
) {
    let send = |(dest, open): (String, bool)| {
        let (client, subject) = (client.clone(), subject(&prefix, Some(&dest)));
        let payload = encode(&me, open);
        async move {
            if let Err(e) = client.publish(subject, payload).await {
                debug!(error = %e, "telling the other instances of a breaker's change failed");
            }
        }
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            c = changes.recv() => match c {
                Some(c) => send(c).await,
                None => return,
            },
        }
    }
    while let Ok(c) = changes.try_recv() {
        send(c).await;
    }
    let _ = client.flush().await;
}

/// Hands every other instance's change to `news` until `stop` (the subscription follows
/// the connection through reconnects).
pub(super) async fn listen(
    client: Client,
    prefix: String,
    me: String,
    news: Sender<(String, bool)>,
    stop: CancellationToken,
) {
    let mut sub = match client.subscribe(subject(&prefix, None)).await {
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
        if let (Some(dest), Some((from, open))) = (dest, decode(&msg.payload)) {
            if from != me {
                let _ = news.try_send((dest, open));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn news_reads_back_as_written() {
        assert_eq!(decode(&encode("a1", true)), Some(("a1", true)));
        assert_eq!(decode(&encode("a1", false)), Some(("a1", false)));
        assert_eq!(decode(b"a1 5"), None);
        assert_eq!(decode(b"nonsense"), None);
        assert_eq!(
            subject("hr", Some("x.y")),
            format!("hookrelay~breakers.hr.{}", token("x.y"))
        );
        assert_eq!(subject("hr", None), "hookrelay~breakers.hr.*");
    }
}
