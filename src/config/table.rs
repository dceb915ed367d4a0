//! The routing table as text: what `check` prints and what a reload answers with.
//! Shows names, paths, match values and filters as the file writes them (a `${VAR}` is not
//! filled in: it may hold a secret); never a secret.

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
            s.name, s.shown_path
        );
        if s.routes.is_empty() {
            let _ = writeln!(out, "  (no routes: events are accepted and not delivered)");
        }
        for &ri in &s.routes {
            let r = &c.routes[ri];
            let to: Vec<&str> =
                r.to.iter()
                    .map(|&d| c.destinations[d].name.as_str())
                    .collect();
            let _ = write!(
                out,
                "  route {}: {} -> {}",
                r.name,
                r.shown_when,
                to.join(", ")
            );
            if !r.order_by.is_empty() {
                let keys: Vec<&str> = r.order_by.iter().map(|p| p.text.as_str()).collect();
                let _ = write!(out, "  (in order per {})", keys.join(" + "));
            }
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
            d.shown_url,
            d.timeout,
            d.rate.per_second,
            d.rate.burst,
            d.max_in_flight,
            if d.sign.is_some() { "  signed" } else { "" }
        );
    }
    out
}

/// A destination URL without what may carry a credential (user info, query): the table is
/// printed by `check` and returned by `/api/reload`.
pub fn shown_url(u: &http::Uri) -> String {
    let host = u.authority().map_or("", |a| {
        let a = a.as_str();
        a.rsplit_once('@').map_or(a, |(_, host)| host)
    });
    format!("{}://{host}{}", u.scheme_str().unwrap_or("http"), u.path())
}

/// A URL as written, for an error about it: without user info or query (either may hold a
/// credential), even when the text is no valid URL.
pub fn shown_url_text(text: &str) -> String {
    let (scheme, rest) = match text.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, text),
    };
    // Everything up to the last `@` may be user info (a password may hold `/`); dropping a
    // path's `@` with it only shows less. When a `?` or `#` comes before that `@`, the `@`
    // may be the query's (`?user=ops@corp&token=…`) and what follows it the query too: none
    // of it is shown (a password holding `?` or `#` is shown as less than it could be).
    let shown = match rest.rsplit_once('@') {
        Some((before, _)) if before.contains(['?', '#']) => "…",
        Some((_, after)) => after.split(['?', '#']).next().unwrap_or(""),
        None => rest.split(['?', '#']).next().unwrap_or(""),
    };
    match scheme {
        Some(s) => format!("{s}://{shown}"),
        None => shown.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::{shown_url, shown_url_text};

    #[test]
    fn urls_as_written_lose_user_info_and_query_valid_or_not() {
        assert_eq!(
            shown_url_text("htps://ops:S3cret@hooks.example/in?key=k"),
            "htps://hooks.example/in"
        );
        assert_eq!(shown_url_text("ops:S3cret@hooks"), "hooks");
        assert_eq!(shown_url_text("http://relay:pw@"), "http://");
        assert_eq!(
            shown_url_text("nats://u:p@10.0.0.5:4222"),
            "nats://10.0.0.5:4222"
        );
        // A password holding what ends an authority, a path or a query.
        assert_eq!(
            shown_url_text("https://ops:ab/cd@hooks/in"),
            "https://hooks/in"
        );
        assert_eq!(shown_url_text("https://ops:p#ss@h/in"), "https://…");
        assert_eq!(shown_url_text("https://ops:p?s@h/in?k=v"), "https://…");
        // An `@` of the query: what follows it is the query too.
        assert_eq!(
            shown_url_text("https://h:80800/in?user=ops@corp.com&token=S3CRET"),
            "https://…"
        );
        assert_eq!(
            shown_url_text("https://h:80800?user=ops@corp&token=S3CRET"),
            "https://…"
        );
    }

    #[test]
    fn shown_urls_drop_user_info_and_query() {
        let u = "https://user:p4ss@hooks.example:8443/in/x?key=s3cret"
            .parse()
            .unwrap();
        assert_eq!(shown_url(&u), "https://hooks.example:8443/in/x");
        let u = "http://127.0.0.1:9/calls".parse().unwrap();
        assert_eq!(shown_url(&u), "http://127.0.0.1:9/calls");
    }
}
