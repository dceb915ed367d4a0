//! Prometheus metrics of one relay (a registry per relay, no global state).
//!
//! The contract's names: `hookrelay_ingress_requests_total{source,status}`,
//! `hookrelay_events_duplicate_total{source}`, `hookrelay_deliveries_total{destination,outcome}`,
//! `hookrelay_queue_depth{destination}`, `hookrelay_delivery_duration_seconds{destination}`;
//! plus `hookrelay_events_unrouted_total{source}`,
//! `hookrelay_oldest_pending_age_seconds{destination}`,
//! `hookrelay_destination_state{destination,state}` and
//! `hookrelay_store_accept_duration_seconds`. Label values are config names, status codes and
//! outcome words only: never ids, addresses or secrets.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceStatus {
    pub source: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationOutcome {
    pub destination: String,
    /// `delivered`, `retried` or `dead`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationState {
    pub destination: String,
    pub state: &'static str,
}

/// The states `hookrelay_destination_state` shows (1 for the current one, 0 for the others).
pub const DESTINATION_STATES: [&str; 3] = ["ok", "open", "paused"];

/// A destination's gauges as one scrape read them.
pub struct DestinationGauges {
    pub name: String,
    pub depth: i64,
    pub oldest_pending_age: i64,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabel {
    pub destination: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 1 ms .. ~33 s
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    pub ingress_requests: Family<SourceStatus, Counter>,
    pub duplicates: Family<SourceLabel, Counter>,
    pub unrouted: Family<SourceLabel, Counter>,
    pub deliveries: Family<DestinationOutcome, Counter>,
    pub delivery_duration: HistogramFamily<DestinationLabel>,
    pub queue_depth: Family<DestinationLabel, Gauge>,
    pub oldest_pending_age: Family<DestinationLabel, Gauge>,
    pub destination_state: Family<DestinationState, Gauge>,
    pub accept_duration: Histogram,
    /// The destinations the gauges above were last set for.
    gauged: std::sync::Mutex<Vec<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("hookrelay");
        let m = Metrics {
            registry: Registry::default(),
            ingress_requests: Family::default(),
            duplicates: Family::default(),
            unrouted: Family::default(),
            deliveries: Family::default(),
            delivery_duration: Family::new_with_constructor(latency_histogram),
            queue_depth: Family::default(),
            oldest_pending_age: Family::default(),
            destination_state: Family::default(),
            accept_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            gauged: Default::default(),
        };
        registry.register(
            "ingress_requests",
            "Requests answered by the ingress, by source and status",
            m.ingress_requests.clone(),
        );
        registry.register(
            "events_duplicate",
            "Events answered as duplicates within the dedup window",
            m.duplicates.clone(),
        );
        registry.register(
            "events_unrouted",
            "Events accepted that matched no route",
            m.unrouted.clone(),
        );
        registry.register(
            "deliveries",
            "Delivery attempts by destination and outcome (delivered, retried, dead)",
            m.deliveries.clone(),
        );
        registry.register(
            "delivery_duration_seconds",
            "Time of one delivery attempt, request to answer",
            m.delivery_duration.clone(),
        );
        registry.register(
            "queue_depth",
            "Pending deliveries per destination",
            m.queue_depth.clone(),
        );
        registry.register(
            "oldest_pending_age_seconds",
            "Age of the event of the oldest pending delivery (0 with none pending), per destination",
            m.oldest_pending_age.clone(),
        );
        registry.register(
            "destination_state",
            "1 for the state each destination is in (ok, open, paused), 0 for the others",
            m.destination_state.clone(),
        );
        registry.register(
            "store_accept_duration_seconds",
            "Time for the store to accept and flush one event",
            m.accept_duration.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The exposition: OpenMetrics text, or with `openmetrics` false the Prometheus text
    /// format 0.0.4 (what a scraper gets that does not ask for OpenMetrics).
    pub fn render(&self, openmetrics: bool) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        if openmetrics {
            out
        } else {
            prometheus_text(&out)
        }
    }

    pub fn ingress(&self, source: &str, status: u16) {
        self.ingress_requests
            .get_or_create(&SourceStatus {
                source: source.to_string(),
                status,
            })
            .inc();
    }

    /// Creates a destination's series at zero, so they show before its first delivery.
    pub fn announce_destination(&self, destination: &str) {
        for outcome in crate::store::Outcome::WORDS {
            let _ = self.deliveries.get_or_create(&DestinationOutcome {
                destination: destination.to_string(),
                outcome,
            });
        }
        let label = DestinationLabel {
            destination: destination.to_string(),
        };
        let _ = self.delivery_duration.get_or_create(&label);
        let _ = self.queue_depth.get_or_create(&label);
        // Its series go with the next scrape if it is gone by then (removed before any).
        let mut gauged = self.gauged.lock().unwrap();
        if !gauged.iter().any(|d| d == destination) {
            gauged.push(destination.to_string());
        }
    }

    pub fn delivery(&self, destination: &str, outcome: &'static str, seconds: f64) {
        self.deliveries
            .get_or_create(&DestinationOutcome {
                destination: destination.to_string(),
                outcome,
            })
            .inc();
        self.delivery_duration
            .get_or_create(&DestinationLabel {
                destination: destination.to_string(),
            })
            .observe(seconds);
    }

    /// Sets `hookrelay_destination_state` of `destination` to `state`.
    /// Sets the destination gauges to `gauges`, and takes away the series of any other
    /// destination (one a reload removed, with nothing pending: its gauges, counters and
    /// histogram), so an alert on them clears.
    /// All under one lock: a concurrent scrape cannot put a removed one back. `current`
    /// names the destinations now (read under the lock): one a reload added after `gauges`
    /// were read keeps its series, as the reload announced them.
    pub fn set_destination_gauges(
        &self,
        gauges: &[DestinationGauges],
        current: &dyn Fn() -> Vec<String>,
    ) {
        let mut gauged = self.gauged.lock().unwrap();
        let mut destinations: Vec<String> = gauges.iter().map(|g| g.name.clone()).collect();
        for d in current() {
            if !destinations.contains(&d) && gauged.contains(&d) {
                destinations.push(d);
            }
        }
        for gone in gauged.iter().filter(|d| !destinations.contains(d)) {
            let label = DestinationLabel {
                destination: gone.clone(),
            };
            self.queue_depth.remove(&label);
            self.oldest_pending_age.remove(&label);
            self.delivery_duration.remove(&label);
            for outcome in crate::store::Outcome::WORDS {
                self.deliveries.remove(&DestinationOutcome {
                    destination: gone.clone(),
                    outcome,
                });
            }
            for state in DESTINATION_STATES {
                self.destination_state.remove(&DestinationState {
                    destination: gone.clone(),
                    state,
                });
            }
        }
        for g in gauges {
            let label = DestinationLabel {
                destination: g.name.clone(),
            };
            self.queue_depth.get_or_create(&label).set(g.depth);
            self.oldest_pending_age
                .get_or_create(&label)
                .set(g.oldest_pending_age);
            self.destination_state(&g.name, g.state);
        }
        *gauged = destinations;
    }

    pub fn destination_state(&self, destination: &str, state: &str) {
        for s in DESTINATION_STATES {
            self.destination_state
                .get_or_create(&DestinationState {
                    destination: destination.to_string(),
                    state: s,
                })
                .set(i64::from(s == state));
        }
    }
}

/// The Content-Type of each exposition [`Metrics::render`] writes.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics text as Prometheus text 0.0.4. The samples are the same; what differs is
/// the metadata: a counter family is named with its `_total` (OpenMetrics names it without),
/// and there is no `# UNIT` line and no `# EOF`.
fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                if !tail.is_empty() {
                    out.push(' ');
                    out.push_str(tail);
                }
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scrape read its gauges, then a reload added a destination: the scrape's gauges
    /// leave that destination's series in place; one gone from the config loses them.
    #[test]
    fn a_scrape_around_a_reload_keeps_the_new_destinations_series() {
        let m = Metrics::new();
        let gauge = |name: &str| DestinationGauges {
            name: name.into(),
            depth: 0,
            oldest_pending_age: 0,
            state: "ok",
        };
        m.announce_destination("old");
        m.announce_destination("gone");
        let read_before_the_reload = [gauge("old")];
        m.announce_destination("new");
        m.set_destination_gauges(&read_before_the_reload, &|| {
            vec!["old".to_string(), "new".to_string()]
        });
        let text = m.render(false);
        assert!(
            text.contains(r#"hookrelay_queue_depth{destination="new"} 0"#),
            "{text}"
        );
        assert!(!text.contains(r#"destination="gone""#), "{text}");
    }

    #[test]
    fn prometheus_text_names_counters_with_their_total_and_has_no_eof() {
        let m = Metrics::new();
        m.ingress("voice", 200);
        m.set_destination_gauges(
            &[DestinationGauges {
                name: "calls".into(),
                depth: 3,
                oldest_pending_age: 0,
                state: "ok",
            }],
            &Vec::new,
        );
        let text = m.render(false);
        assert!(
            text.contains("# HELP hookrelay_ingress_requests_total "),
            "{text}"
        );
        assert!(
            text.contains("# TYPE hookrelay_ingress_requests_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("hookrelay_ingress_requests_total{source=\"voice\",status=\"200\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE hookrelay_queue_depth gauge\n"),
            "{text}"
        );
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        let open = m.render(true);
        assert!(
            open.contains("# TYPE hookrelay_ingress_requests counter\n"),
            "{open}"
        );
        assert!(open.ends_with("# EOF\n"), "{open}");
    }
}
