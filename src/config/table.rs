//! The routing table as text: what `check` prints and what a reload answers with.
//! Shows names, paths, match values and filters; never a secret.

use std::fmt::Write;

use super::{Auth, Config};

pub fn routing_table(c: &Config) -> String {
    let mut out = String::new();
    for s in &c.sources {
        let auth = match &s.auth {
            Auth::None => "none".to_string(),
            Auth::Header { header, .. } => format!("header {header}"),
            Auth::OAuth2 { clients, .. } => format!("oauth2 ({} client(s))", clients.len()),
            Auth::StandardWebhooks { .. } => "standard-webhooks".to_string(),
        };
        let allow = if s.allow_ips.is_empty() {
            "any".to_string()
        } else {
            s.allow_ips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let ids = if s.event_id.is_empty() {
            "sha256(body)".to_string()
        } else {
            s.event_id
                .iter()
                .map(|p| p.text.as_str())
                .collect::<Vec<_>>()
                .join(" + ")
        };
        let _ = writeln!(
            out,
            "source {}  POST {}  auth: {auth}  allow: {allow}  event id: {ids}",
            s.name, s.path
        );
        if s.routes.is_empty() {
            let _ = writeln!(out, "  (no routes: events are accepted and not delivered)");
        }
        for &ri in &s.routes {
            let r = &c.routes[ri];
            let mut cond: Vec<String> = r.matchers.iter().map(ToString::to_string).collect();
            if cond.is_empty() {
                cond.push("every event".into());
            }
            if let Some(f) = &r.filter {
                cond.push(format!("filter {}", f.text));
            }
            let to: Vec<&str> =
                r.to.iter()
                    .map(|&d| c.destinations[d].name.as_str())
                    .collect();
            let _ = write!(
                out,
                "  route {}: {} -> {}",
                r.name,
                cond.join(" "),
                to.join(", ")
            );
            if let Some(rp) = &r.reply {
                let _ = write!(
                    out,
                    "  (reply from {} within {:?}, else {})",
                    c.destinations[rp.from].name, rp.timeout, rp.fallback_status
                );
            }
            out.push('\n');
        }
    }
    for d in &c.destinations {
        let _ = writeln!(
            out,
            "destination {}  {}  timeout {:?}  rate {}/s burst {}  max_in_flight {}{}",
            d.name,
            d.url,
            d.timeout,
            d.rate.per_second,
            d.rate.burst,
            d.max_in_flight,
            if d.sign.is_some() { "  signed" } else { "" }
        );
    }
    out
}
