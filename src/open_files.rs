//! The process's open-file limit: raised to its hard limit at start (the soft one is often
//! 1,024, far below `max_connections`), and a warning when it still cannot hold the
//! connections the config allows: past it, accepts fail, and so do outbound connections to
//! destinations and to NATS, while the limit is taken by clients.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Descriptors kept for what is not an ingress connection: the store's files, the
/// listeners, the admin API, outbound connections.
pub const RESERVE: u64 = 256;

/// What an unlimited hard limit raises the soft one to (Linux's default `nr_open`).
const UNLIMITED_AS: u64 = 1 << 20;

/// Raises the soft open-file limit to the hard one; the limit in force afterwards (`None`:
/// unlimited).
pub fn raise() -> Option<u64> {
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_some() && limit.current != limit.maximum {
        // An unlimited hard limit is no soft one the kernel takes: Linux's usual ceiling.
        let raised = Rlimit {
            current: limit.maximum.or(Some(UNLIMITED_AS)),
            maximum: limit.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::debug!(error = %e, "raising the open-file limit failed");
        }
    }
    getrlimit(Resource::Nofile).current
}

/// Says when `max_connections` and [`RESERVE`] need more descriptors than `limit`.
pub fn check(limit: Option<u64>, max_connections: usize) {
    let Some(limit) = limit else { return };
    let wanted = max_connections as u64 + RESERVE;
    if wanted > limit {
        tracing::warn!(
            limit,
            max_connections,
            "the open-file limit is below what max_connections needs (and {RESERVE} more for \
             the store, the admin API and outbound connections): raise it (ulimit -n, \
             LimitNOFILE=) or lower max_connections, or clients can take the descriptors \
             deliveries and the admin API need"
        );
    }
}
