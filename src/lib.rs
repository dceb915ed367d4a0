//! hookrelay: a webhook fan-out relay for provider callbacks.
//!
//! # Layout
//! - [`web`], [`clock`]: the bottom layer: the HTTP server loop every listener shares, JSON
//!   answers, the outbound client; the one clock.
//! - [`config`]: `routes.toml` → a validated, compiled [`config::Config`].
//! - [`ingress`]: the public listener; checks, routes and durably accepts events.
//! - [`rules`], [`routing`], [`event_id`]: a route's compiled match and filter, which
//!   destinations an event goes to, its id and its order keys.
//! - [`store`]: the narrow storage trait, its logic over a key-value engine (group commit),
//!   the redb and sled engines; `store::jetstream`, the shared NATS JetStream backend.
//! - [`delivery`]: per-destination schedulers that send, retry, order and dead-letter;
//!   [`destinations`]: each destination's live state and breaker.
//! - [`signature`], [`token`]: Standard Webhooks HMACs and self-issued OAuth2 tokens.
//! - [`sink`]: `hookrelay sink`, a local receiver for trying routes.
//! - [`admin`]: health, readiness, metrics, the admin API and the operator console.
//! - [`app`]: the composition root, which hands each stage its parts; [`health`]: the
//!   stopping and store-health flags.
//! - [`relay`]: starts and stops the whole thing; [`telemetry`]: logs; [`metrics`].

pub mod admin;
pub mod app;
pub mod cli;
pub mod clock;
pub mod config;
pub mod delivery;
pub mod destinations;
pub mod event_id;
pub mod health;
pub mod ingress;
pub mod metrics;
pub mod needed;
pub mod open_files;
pub mod relay;
pub mod routing;
pub mod rules;
pub mod signature;
pub mod sink;
pub mod starting;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod web;

use std::path::Path;
use std::process::ExitCode;

pub use relay::{run_serve, Relay};

/// `hookrelay check`: prints the routing table, or every problem.
pub fn run_check(path: &Path) -> anyhow::Result<ExitCode> {
    match config::load(path) {
        Ok(c) => {
            print!("{}", config::routing_table(&c));
            println!("{}: OK", path.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            println!("{errors}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// jemalloc, for the binary and for every test and bench built on this crate. Under load,
/// glibc's malloc made 0.79 `futex` calls per event, most of them on its arena locks (an
/// event's buffers are allocated on one thread and freed on another); jemalloc makes 0.16,
/// and the relay uses ~6 % less CPU per event (docs/performance.md, 2026-12-06).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
