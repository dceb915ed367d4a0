//! Every default of `routes.toml` in one place: what a key means when the file leaves it out.

use std::time::Duration;

pub const LISTEN: &str = "0.0.0.0:8080";
pub const ADMIN_LISTEN: &str = "127.0.0.1:9090";
pub const MAX_BODY_BYTES: u64 = 1 << 20;
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_CONNECTIONS: u64 = 10_000;

pub const BACKEND: crate::config::Backend = crate::config::Backend::Redb;
pub const STORE_PATH: &str = "data";
pub const RETAIN: Duration = Duration::from_secs(7 * 24 * 3600);
/// What the names of everything the jetstream backend creates start with.
pub const JETSTREAM_PREFIX: &str = "hookrelay";
pub const JETSTREAM_REPLICAS: usize = 1;
pub const DEDUP_WINDOW: Duration = Duration::from_secs(24 * 3600);

pub const TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_IN_FLIGHT: u64 = 32;
pub const MAX_QUEUE: u64 = 100_000;
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
pub const RETRY_FACTOR: f64 = 2.0;
pub const RETRY_MAX_DELAY: Duration = Duration::from_secs(600);
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);
/// 0: no limit on attempts, only `give_up_after`.
pub const RETRY_MAX_ATTEMPTS: u32 = 0;
pub const RATE_PER_SECOND: f64 = 100.0;
pub const RATE_BURST: u32 = 100;
/// 0: the breaker is off unless the file sets it.
pub const BREAKER_FAILURES: u32 = 0;
pub const BREAKER_COOL_DOWN: Duration = Duration::from_secs(30);

pub const TOKEN_TTL: Duration = Duration::from_secs(3600);
pub const SIGNATURE_TOLERANCE: Duration = Duration::from_secs(300);

pub const FALLBACK_STATUS: u16 = 502;
pub const FALLBACK_BODY: &str =
    r#"{"error":"reply_unavailable","message":"the reply destination did not answer"}"#;
pub const FALLBACK_CONTENT_TYPE: &str = "application/json";
