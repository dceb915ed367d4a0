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

#[cfg(test)]
mod tests {
    use super::*;

    /// Two routes send a CALL_STATUS to `calls`, the second ordering it: the first in the
    /// file decides (CONTRACT §8), and `calls` gets it once. The second alone sends to
    /// `alerts`, so it is `alerts`' route.
    #[test]
    fn each_destination_once_by_the_first_route_in_the_file() {
        let text = r#"
[[sources]]
name = "voice"
path = "/voice"

[[destinations]]
name = "calls"
url = "http://127.0.0.1:9/calls"

[[destinations]]
name = "alerts"
url = "http://127.0.0.1:9/alerts"

[[routes]]
name = "unordered"
source = "voice"
match = { eventType = "CALL_STATUS" }
to = ["calls"]

[[routes]]
name = "ordered"
source = "voice"
order_by = ["$.payload.callId"]
to = ["alerts", "calls"]
"#;
        let config =
            crate::config::parse(text, std::path::Path::new("routes.toml"), &|_| None).unwrap();
        let source = &config.sources[0];
        let event = serde_json::json!([{"eventType": "CALL_STATUS", "payload": {"callId": "c1"}}]);
        let f = route(&config, source, &event);
        let names: Vec<&str> = f
            .destinations
            .iter()
            .map(|&d| config.destinations[d].name.as_str())
            .collect();
        let via: Vec<&str> = f
            .via
            .iter()
            .map(|&r| config.routes[r].name.as_str())
            .collect();
        assert_eq!(names, ["calls", "alerts"]);
        assert_eq!(via, ["unordered", "ordered"]);
        assert_eq!(f.reply_route, None);
        // Not a CALL_STATUS: the ordered route alone, for both.
        let other = serde_json::json!([{"eventType": "SESSION_SUMMARY"}]);
        let f = route(&config, source, &other);
        assert_eq!(f.via, vec![1, 1]);
    }
}
