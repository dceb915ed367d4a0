//! The one support module of the integration tests: a relay in this process
//! ([`relay`]), the binary as a process ([`process`]), fake destinations ([`sinks`]),
//! requests ([`http`]), waits and sample payloads. Everything binds to 127.0.0.1; every wait
//! is bounded; every server it starts stops when dropped.
#![allow(dead_code)]

mod http;
mod nats;
mod process;
mod relay;
mod sinks;
mod voice;

use std::time::Duration;

// One flat namespace for the tests; a test binary that uses none of a part is fine.
#[allow(unused_imports)]
pub use {http::*, nats::*, process::*, relay::*, sinks::*, voice::*};

/// How long any wait in these tests may take before it fails.
pub const WAIT: Duration = Duration::from_secs(15);
