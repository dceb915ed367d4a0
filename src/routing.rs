//! Routing: the fan-out of one event. Runs the source's routes (their compiled
//! [`rules`](crate::rules)) over the event and returns destination indexes, each once, with
//! the first route (in file order) that sends the event to each. Never allocates per route.

use serde_json::Value;

use crate::config::{Config, Source};

/// The outcome of routing one event of one source.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Fanout {
    /// Destination indexes, each once, in the order routes name them.
    pub destinations: Vec<usize>,
    /// For each destination, the first route (in file order) that sends the event there:
    /// its `order_by` orders the delivery.
    pub via: Vec<usize>,
    /// Index of the first matching route that has a `reply`.
    pub reply_route: Option<usize>,
}

/// Runs every route of `source` over the event. `wrapped` is `[event]`.
pub fn route(config: &Config, source: &Source, wrapped: &Value) -> Fanout {
    let event = &wrapped[0];
    let mut out = Fanout::default();
    for &ri in &source.routes {
        let r = &config.routes[ri];
        if !r.matchers.iter().all(|m| m.matches(event)) {
            continue;
        }
        if let Some(f) = &r.filter {
            if !f.matches(wrapped) {
                continue;
            }
        }
        if r.reply.is_some() && out.reply_route.is_none() {
            out.reply_route = Some(ri);
        }
        for &d in &r.to {
            if !out.destinations.contains(&d) {
                out.destinations.push(d);
                out.via.push(ri);
            }
        }
    }
    out
}
