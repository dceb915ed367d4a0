//! Connecting to NATS and making sure the server can hold what the relay keeps: a
//! JetStream-enabled account on a server new enough (atomic batches, per-message TTL), a
//! `max_payload` that fits the largest accepted body, the stream and two small buckets.
//! Every refusal says which of these failed.

use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use async_nats::jetstream::{self, kv, stream};
use async_nats::{Client, ConnectErrorKind, ServerAddr};

use super::records::{Names, FORMAT};
use crate::config::StoreSettings;

/// The oldest nats-server the backend runs on: atomic batch publish arrived in 2.12.
pub const OLDEST_SERVER: (u64, u64, u64) = (2, 12, 0);

/// How long a member's heartbeat stays in the members bucket.
pub const MEMBER_TTL: Duration = Duration::from_secs(6);

/// How long start-up waits for a cluster's JetStream to be ready.
const SETUP_WAIT: Duration = Duration::from_secs(30);

/// Room a record needs next to its body (the header line and NATS headers).
pub const RECORD_OVERHEAD: u64 = 16 * 1024;
/// The room a delivery record needs beyond its event record's size: its state (attempts,
/// times, the last error, which [`crate::delivery::retry::describe`] keeps short).
pub const DELIVERY_STATE_ROOM: u64 = 4 * 1024;

/// Why start-up could not reach NATS or its JetStream: worth waiting for (a server or a
/// cluster still starting, a network partition), unlike the refusals, which a restart
/// would only repeat.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OutOfReach(pub String);

/// A stream the relay must not use: made beforehand with settings that break its promises
/// ([`stream_problems`]), or written in a newer format than this build reads
/// ([`FORMAT_KEY`]). A start-up error, not waited out.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UnsafeStream(String);

/// The connection, the stream and the buckets.
pub struct Connected {
    pub client: Client,
    pub stream: stream::Stream,
    pub pauses: kv::Store,
    pub members: kv::Store,
}

/// The servers as logs and errors may show them: without user info (`user:password@`)
/// or query.
pub fn shown_servers(urls: &[String]) -> String {
    urls.iter()
        .map(|u| crate::config::shown_url_text(u))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The credentials a server address carries (`nats://user:password@host`,
/// `nats://token@host`).
#[derive(Debug, PartialEq)]
enum Login {
    UserPassword(String, String),
    Token(String),
}

/// The addresses of `urls` without their credentials, and those credentials, which the
/// client sends itself: async-nats ignores credentials in an address, and would log them
/// with it (its `Debug` shows the password).
fn servers(urls: &[String]) -> anyhow::Result<(Vec<ServerAddr>, Option<Login>)> {
    let mut addrs = Vec::new();
    let mut login = None;
    for u in urls {
        let shown = shown_servers(std::slice::from_ref(u));
        let a: ServerAddr = u
            .parse()
            .map_err(|e| anyhow!("store.url {shown:?} is not a NATS address: {e}"))?;
        let mut plain = a.into_inner();
        let found = match (plain.username(), plain.password()) {
            ("", Some(_)) => return Err(anyhow!("store.url {shown:?}: a password but no user")),
            ("", None) => None,
            (user, Some(password)) => Some(Login::UserPassword(decoded(user), decoded(password))),
            (token, None) => Some(Login::Token(decoded(token))),
        };
        if found.is_some() {
            if login.is_some() && login != found {
                return Err(anyhow!(
                    "store.url: the servers carry different credentials; give each the same"
                ));
            }
            login = found;
        }
        let _ = plain.set_username("");
        let _ = plain.set_password(None);
        addrs.push(
            ServerAddr::from_url(plain)
                .map_err(|e| anyhow!("store.url {shown:?} is not a NATS address: {e}"))?,
        );
    }
    Ok((addrs, login))
}

/// A URL's user info is percent-encoded.
fn decoded(part: &str) -> String {
    percent_encoding::percent_decode_str(part)
        .decode_utf8_lossy()
        .into_owned()
}

/// Parses `2.15.1` (or `2.12.0-beta.1`) into numbers.
pub fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let core = v.trim_start_matches('v').split(['-', '+']).next()?;
    let mut it = core.split('.').map(|p| p.parse::<u64>().ok());
    Some((it.next()??, it.next()??, it.next().flatten().unwrap_or(0)))
}

pub async fn connect(
    s: &StoreSettings,
    max_body_bytes: u64,
    names: &Names,
) -> anyhow::Result<Connected> {
    let (addrs, login) = servers(&s.url)?;
    let shown = shown_servers(&s.url);
    let options = match login {
        Some(Login::UserPassword(user, password)) => {
            async_nats::ConnectOptions::with_user_and_password(user, password)
        }
        Some(Login::Token(token)) => async_nats::ConnectOptions::with_token(token),
        None => async_nats::ConnectOptions::new(),
    };
    let client = options
        .name("hookrelay")
        .connection_timeout(Duration::from_secs(3))
        .request_timeout(Some(Duration::from_secs(5)))
        .connect(addrs)
        .await
        .map_err(|e| match e.kind() {
            ConnectErrorKind::AuthorizationViolation => {
                anyhow!("NATS at {shown} refused the account (authorization violation): {e}")
            }
            _ => OutOfReach(format!("cannot connect to NATS at {shown}: {e}")).into(),
        })?;
    let info = client.server_info();
    let version = parse_version(&info.version).ok_or_else(|| {
        anyhow!(
            "NATS at {shown} reports an unreadable version {:?}",
            info.version
        )
    })?;
    if version < OLDEST_SERVER {
        let (a, b, c) = OLDEST_SERVER;
        bail!(
            "nats-server {} at {shown} is too old: the jetstream backend needs {a}.{b}.{c} or newer \
             (atomic batch publish, per-message TTL)",
            info.version
        );
    }
    let needed = max_body_bytes + RECORD_OVERHEAD;
    if (info.max_payload as u64) < needed {
        bail!(
            "NATS at {shown} takes messages of at most {} bytes (max_payload), but server.max_body_bytes = \
             {max_body_bytes} needs {needed}: raise max_payload in the nats-server config or lower max_body_bytes",
            info.max_payload
        );
    }
    let js = jetstream::new(client.clone());
    // A cluster that has just started may not have elected its JetStream leaders yet (its
    // servers do not answer, or say so): the account's query and the creations are retried
    // for a while (bounded), then the relay waits for JetStream like one out of reach.
    let deadline = tokio::time::Instant::now() + SETUP_WAIT;
    loop {
        use jetstream::context::AccountErrorKind;
        let e = match js.query_account().await {
            Ok(_) => break,
            Err(e) => e,
        };
        let electing = match e.kind() {
            AccountErrorKind::TimedOut => true,
            AccountErrorKind::JetStream(j) => {
                j.error_code() == jetstream::ErrorCode::CLUSTER_NOT_AVAILABLE
            }
            _ => false,
        };
        if !electing {
            bail!(
                "NATS at {shown} offers no JetStream to this account (is nats-server started with -js, \
                 and does the account have JetStream enabled?): {e}"
            );
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(OutOfReach(format!(
                "JetStream at {shown} did not answer within {SETUP_WAIT:?} (a cluster still electing its leader?): {e}"
            ))
            .into());
        }
        tracing::info!(error = %e, "JetStream is not ready yet; trying again");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (stream, pauses, members) = loop {
        match create(&js, s, names).await {
            Ok(made) => break made,
            Err(e) if e.downcast_ref::<UnsafeStream>().is_some() => return Err(e),
            // Settings the server refuses for good: waiting would only repeat it.
            Err(e) if refused_settings(&e) => {
                return Err(e.context(
                    "JetStream refused the store's settings (a single server takes \
                     [store] replicas = 1; another stream may already take this prefix's subjects)",
                ))
            }
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::info!(error = %format!("{e:#}"), "JetStream is not ready yet; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                return Err(OutOfReach(format!(
                    "JetStream at {shown} was not ready within {SETUP_WAIT:?}: {e:#}"
                ))
                .into())
            }
        }
    };
    Ok(Connected {
        client,
        stream,
        pauses,
        members,
    })
}

/// What in a stream made before this start (by an operator, or by hand) breaks what the
/// relay promises; empty when it is as the relay makes it.
fn stream_problems(c: &stream::Config, replicas: usize, names: &Names) -> Vec<String> {
    let mut p = Vec::new();
    if c.storage != stream::StorageType::File {
        p.push("storage is memory (a server's restart would lose every accepted event)".into());
    }
    if c.persist_mode == Some(stream::PersistenceMode::Async) {
        p.push("persist_mode is async (the server would ack a write before it is stored)".into());
    }
    if c.num_replicas > replicas {
        p.push(format!(
            "it has {} replicas and [store] replicas = {} (lowering them is not done at start: \
             set replicas = {0}, or lower the stream's by hand)",
            c.num_replicas, replicas
        ));
    }
    if !c.subjects.contains(&names.all()) {
        p.push(format!(
            "its subjects are {:?}, not {:?} (writes outside them would find no stream)",
            c.subjects,
            names.all()
        ));
    }
    if c.retention != stream::RetentionPolicy::Limits {
        p.push(format!(
            "retention is {:?}, not limits (the server would delete what consumers ack)",
            c.retention
        ));
    }
    if c.max_messages_per_subject != 1 {
        p.push(format!(
            "max_msgs_per_subject is {}, not 1 (a state would not replace the last)",
            c.max_messages_per_subject
        ));
    }
    if c.max_age > Duration::ZERO || c.max_messages > 0 || c.max_bytes > 0 {
        p.push(
            "it has max_age, max_msgs or max_bytes limits (the server would delete pending \
             deliveries and dead letters)"
                .into(),
        );
    }
    if !c.allow_message_ttl || !c.allow_atomic_publish {
        p.push("per-message TTL and atomic batch publish must be allowed".into());
    }
    if c.subject_delete_marker_ttl.is_some() {
        p.push("subject delete markers are on (a marker would stand for a record)".into());
    }
    if c.no_ack || c.sealed || c.deny_delete || c.mirror.is_some() {
        p.push("it takes no acks, is sealed, denies deletes, or mirrors another stream".into());
    }
    if c.max_message_size > 0 {
        p.push(format!(
            "max_msg_size is {} (a delivery's record, larger than its event, could be refused after the event was accepted)",
            c.max_message_size
        ));
    }
    if c.subject_transform.is_some() || c.sources.as_ref().is_some_and(|s| !s.is_empty()) {
        p.push(
            "it transforms subjects or takes messages from other streams (records would be stored where the relay does not look, or appear where it did not write)"
                .into(),
        );
    }
    if c.discard_new_per_subject {
        p.push(
            "discard_new_per_subject is on (every change of a delivery's state would be refused)"
                .into(),
        );
    }
    p
}

/// How often a running instance reads the stream's settings again.
const STREAM_CHECK_EVERY: Duration = Duration::from_secs(10);

/// Reads the stream's settings every [`STREAM_CHECK_EVERY`] until `stop`: one changed by
/// an operator since the start (`nats stream edit` adding `max_age`, say, under which the
/// server deletes pending deliveries), or marked by a newer build, makes the store
/// unavailable (the ingress answers 503, `/readyz` says why) until it is set back, as it
/// would have refused the start. A read that fails changes nothing (the connection's own
/// state says that).
pub(super) async fn watch_stream(
    store: std::sync::Weak<super::JetStreamStore>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(STREAM_CHECK_EVERY) => {}
        }
        let Some(s) = store.upgrade() else { return };
        let Ok(Ok(info)) = tokio::time::timeout(STREAM_CHECK_EVERY, s.stream.get_info()).await
        else {
            continue;
        };
        let problems = running_problems(&info.config, s.replicas, &s.names);
        let problem = (!problems.is_empty()).then(|| {
            format!(
                "the stream {:?} was changed since the start and the relay cannot keep its \
                 promises on it: {}; events are refused until it is set back",
                s.names.stream(),
                problems.join("; ")
            )
        });
        let mut was = s.stream_problem.lock().unwrap();
        if *was != problem {
            match &problem {
                Some(p) => tracing::error!("{p}"),
                None => {
                    tracing::info!(stream = %s.names.stream(), "the stream's settings are as the relay needs again")
                }
            }
            *was = problem;
        }
    }
}

/// What in the stream's settings, read while running, breaks what the relay promises:
/// [`stream_problems`], but for more replicas than this instance's config asks (another
/// instance, or the operator, raised them: safer, not a problem; the start refuses it only
/// so that a stale config does not lower the buckets it makes), and fewer replicas, or a
/// newer build's format mark.
fn running_problems(c: &stream::Config, replicas: usize, names: &Names) -> Vec<String> {
    let mut problems = stream_problems(c, replicas.max(c.num_replicas), names);
    if c.num_replicas < replicas {
        problems.push(format!(
            "it has {} replicas and [store] replicas = {replicas}",
            c.num_replicas
        ));
    }
    if marked_format(c) > FORMAT {
        problems.push(format!(
            "a newer hookrelay marked it with format {:?} (this build reads up to {FORMAT})",
            c.metadata.get(FORMAT_KEY).map_or("", |v| v.as_str())
        ));
    }
    problems
}

/// JetStream's error codes for settings it will never take (as opposed to a cluster still
/// electing its leaders, or servers not yet joined): replicas above 1 on a server that is
/// not clustered, or not to be changed; subjects another stream takes; an invalid stream
/// config or one a name already has; the account's limits.
const REFUSED_SETTINGS: [u64; 7] = [10074, 10061, 10065, 10052, 10058, 10002, 10027];

/// Whether `e` (or what caused it) is JetStream refusing settings for good.
fn refused_settings(e: &anyhow::Error) -> bool {
    // async-nats gives the code only in its errors' text: "… (code 400, error code 10074)".
    let text = format!("{e:#}");
    REFUSED_SETTINGS
        .iter()
        .any(|code| text.contains(&format!("error code {code})")))
}

/// The stream and the two buckets, created if missing (the same settings from every
/// instance, so concurrent starts agree).
async fn create(
    js: &jetstream::Context,
    s: &StoreSettings,
    names: &Names,
) -> anyhow::Result<(stream::Stream, kv::Store, kv::Store)> {
    let stream = js
        .get_or_create_stream(stream::Config {
            name: names.stream(),
            description: Some("hookrelay: events, deliveries, dead letters, replies".into()),
            subjects: vec![names.all()],
            max_messages_per_subject: 1,
            num_replicas: s.replicas,
            storage: stream::StorageType::File,
            allow_message_ttl: true,
            allow_atomic_publish: true,
            metadata: format_marker(),
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating the stream {:?}", names.stream()))?;
    // Marked first: the mark is written on the whole config as read then, and so, made
    // after the raise below, it could set back another instance's raise.
    let stream = marked(js, stream, names).await?;
    let stream = with_replicas(js, stream, s, names).await?;
    // Before the buckets are made or changed (a stale `replicas` would lower theirs).
    let problems = stream_problems(&stream.cached_info().config, s.replicas, names);
    if !problems.is_empty() {
        return Err(UnsafeStream(format!(
            "the stream {:?} was made with settings the relay cannot keep its promises on: {}. \
             Change them (`nats stream edit {0}`), or remove the stream (it holds the relay's \
             events and deliveries) and let the relay make it",
            names.stream(),
            problems.join("; ")
        ))
        .into());
    }
    let bucket = |name: String, max_age: Duration| kv::Config {
        bucket: name,
        history: 1,
        max_age,
        num_replicas: s.replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    };
    let pauses = js
        .create_or_update_key_value(bucket(names.pauses_bucket(), Duration::ZERO))
        .await
        .with_context(|| format!("creating the bucket {:?}", names.pauses_bucket()))?;
    let members = js
        .create_or_update_key_value(bucket(names.members_bucket(), MEMBER_TTL))
        .await
        .with_context(|| format!("creating the bucket {:?}", names.members_bucket()))?;
    Ok((stream, pauses, members))
}

/// The stream with at least `s.replicas` replicas. A stream made earlier keeps its
/// settings; `replicas` is the one an operator changes (1 → 3 when a cluster grows), and it
/// must hold, or one server's loss loses events. Lowered, it is refused
/// ([`stream_problems`]): an instance with a stale config would weaken every other's 200.
/// Raised on the config as read afresh, and read again after: another instance's write of
/// the whole config (its format mark) may have set it back meanwhile.
async fn with_replicas(
    js: &jetstream::Context,
    mut stream: stream::Stream,
    s: &StoreSettings,
    names: &Names,
) -> anyhow::Result<stream::Stream> {
    let read = |js: &jetstream::Context| {
        let js = js.clone();
        async move {
            js.get_stream(names.stream())
                .await
                .with_context(|| format!("reading the stream {:?}", names.stream()))
        }
    };
    for _ in 0..RAISE_TRIES {
        let was = stream.cached_info().config.num_replicas;
        if was >= s.replicas {
            return Ok(stream);
        }
        let mut config = read(js).await?.cached_info().config.clone();
        config.num_replicas = config.num_replicas.max(s.replicas);
        js.update_stream(&config).await.with_context(|| {
            format!(
                "changing the stream {:?} from {was} to {} replicas",
                names.stream(),
                s.replicas
            )
        })?;
        tracing::info!(stream = %names.stream(), was, now = s.replicas, "the stream's replicas follow the config");
        stream = read(js).await?;
    }
    let now = stream.cached_info().config.num_replicas;
    if now >= s.replicas {
        return Ok(stream);
    }
    anyhow::bail!(
        "the stream {:?} keeps {now} replicas though [store] replicas = {} (another instance \
         with an older config sets them back?)",
        names.stream(),
        s.replicas
    )
}

/// Raises of the stream's replicas tried before the start gives up.
const RAISE_TRIES: usize = 3;

/// The stream's metadata key naming the format of the records in it ([`FORMAT`]).
pub const FORMAT_KEY: &str = "hookrelay_format";

fn format_marker() -> std::collections::HashMap<String, String> {
    [(FORMAT_KEY.to_string(), FORMAT.to_string())].into()
}

/// The stream, refused when a newer build has marked it with a format this one does not
/// read (it would misread that build's records); marked with this build's format when
/// unmarked (made by a build before the marker) or older. The mark is written on the
/// stream's settings as read afresh (another instance may have raised its replicas since),
/// and a failure to write it (an account that may not edit streams) is only said.
async fn marked(
    js: &jetstream::Context,
    stream: stream::Stream,
    names: &Names,
) -> anyhow::Result<stream::Stream> {
    if stream_format(&stream, names)? == FORMAT {
        return Ok(stream);
    }
    let fresh = js
        .get_stream(names.stream())
        .await
        .with_context(|| format!("reading the stream {:?}", names.stream()))?;
    if stream_format(&fresh, names)? == FORMAT {
        return Ok(fresh);
    }
    let mut config = fresh.cached_info().config.clone();
    config.metadata.extend(format_marker());
    if let Err(e) = js.update_stream(&config).await {
        tracing::warn!(stream = %names.stream(), error = %e, "marking the stream with its records' format failed; an older build would not know to refuse it");
    }
    Ok(fresh)
}

/// The format the stream is marked with (0: none); an error when it is newer than
/// [`FORMAT`].
fn stream_format(stream: &stream::Stream, names: &Names) -> anyhow::Result<u32> {
    let found = stream.cached_info().config.metadata.get(FORMAT_KEY);
    let format = marked_format(&stream.cached_info().config);
    if format > FORMAT {
        return Err(UnsafeStream(format!(
            "the stream {:?} holds records in format {} (its metadata {FORMAT_KEY:?}), \
             written by a newer hookrelay; this build reads formats up to {FORMAT}. Run the \
             newer build on every instance, or give this one another [store] prefix",
            names.stream(),
            found.map_or("", |v| v.as_str()),
        ))
        .into());
    }
    Ok(format)
}

/// The format a stream's config is marked with: 0 when unmarked, `u32::MAX` (newer than
/// any) when the mark is not a number.
fn marked_format(c: &stream::Config) -> u32 {
    match c.metadata.get(FORMAT_KEY).map(|v| v.parse::<u32>()) {
        Some(Ok(n)) => n,
        None => 0,
        Some(Err(_)) => u32::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_leave_the_addresses_for_the_client_options() {
        let (addrs, login) = servers(&[
            "nats://relay:s%40cret@10.0.0.1:4222".to_string(),
            "nats://10.0.0.2:4222".to_string(),
        ])
        .unwrap();
        assert_eq!(
            login,
            Some(Login::UserPassword("relay".into(), "s@cret".into()))
        );
        for a in &addrs {
            let shown = format!("{a:?}");
            assert!(
                !shown.contains("cret") && !shown.contains("relay"),
                "{shown}"
            );
        }
        let (_, login) = servers(&["tls://tok3n@nats.example:4222".to_string()]).unwrap();
        assert_eq!(login, Some(Login::Token("tok3n".into())));
        let (_, login) = servers(&["127.0.0.1:4222".to_string()]).unwrap();
        assert_eq!(login, None);
        let two = [
            "nats://a:1@h:4222".to_string(),
            "nats://b:2@h:4223".to_string(),
        ];
        assert!(servers(&two).is_err());
    }

    #[test]
    fn shown_servers_drop_credentials() {
        let urls = vec![
            "nats://relay:s3cret@10.0.0.1:4222".to_string(),
            "tls://tok3n@nats.example:4222?x=1".to_string(),
            "127.0.0.1:4222".to_string(),
        ];
        let shown = shown_servers(&urls);
        assert_eq!(
            shown,
            "nats://10.0.0.1:4222, tls://nats.example:4222, 127.0.0.1:4222"
        );
        assert!(!shown.contains("s3cret") && !shown.contains("tok3n"));
    }

    /// While running, a stream with more replicas than this instance's config (another
    /// instance raised them) is fine; fewer, or a newer build's mark, is not.
    #[test]
    fn more_replicas_than_the_config_are_no_problem_while_running() {
        let names = Names { prefix: "t".into() };
        let made = |replicas| stream::Config {
            name: names.stream(),
            subjects: vec![names.all()],
            max_messages_per_subject: 1,
            num_replicas: replicas,
            storage: stream::StorageType::File,
            allow_message_ttl: true,
            allow_atomic_publish: true,
            metadata: format_marker(),
            ..Default::default()
        };
        assert_eq!(running_problems(&made(3), 1, &names), Vec::<String>::new());
        assert!(!stream_problems(&made(3), 1, &names).is_empty(), "at start");
        let fewer = running_problems(&made(1), 3, &names);
        assert!(fewer.iter().any(|p| p.contains("1 replicas")), "{fewer:?}");
        let mut newer = made(1);
        newer
            .metadata
            .insert(FORMAT_KEY.into(), (FORMAT + 1).to_string());
        let newer = running_problems(&newer, 1, &names);
        assert!(
            newer.iter().any(|p| p.contains("newer hookrelay")),
            "{newer:?}"
        );
        let mut aged = made(1);
        aged.max_age = Duration::from_secs(3600);
        assert!(!running_problems(&aged, 1, &names).is_empty());
    }

    #[test]
    fn settings_jetstream_refuses_for_good_are_told_from_waiting() {
        let refused = anyhow::anyhow!(
            "jetstream error: replicas > 1 not supported in non-clustered mode (code 400, error code 10074)"
        )
        .context("creating the stream \"hookrelay\"");
        assert!(refused_settings(&refused));
        let electing = anyhow::anyhow!(
            "jetstream error: JetStream system temporarily unavailable (code 503, error code 10008)"
        );
        assert!(!refused_settings(&electing));
        let short = anyhow::anyhow!("jetstream error: x (code 400, error code 100740)");
        assert!(!refused_settings(&short));
    }

    #[test]
    fn versions_compare_as_numbers() {
        assert_eq!(parse_version("2.15.1"), Some((2, 15, 1)));
        assert_eq!(parse_version("v2.12.0-beta.2"), Some((2, 12, 0)));
        assert!(parse_version("2.9.10").unwrap() < OLDEST_SERVER);
        assert!(parse_version("2.10.8").unwrap() < OLDEST_SERVER);
        assert!(parse_version("2.12.0").unwrap() >= OLDEST_SERVER);
        assert_eq!(parse_version("junk"), None);
    }
}
