//! Without an admin token, refuses admin requests that a web page on another site makes
//! through the operator's browser: a cross-site fetch or form post (told by
//! `Sec-Fetch-Site`, or `Origin` when the browser sends no `Sec-Fetch-Site`), and a `Host`
//! that is not a loopback name (DNS rebinding: a page whose name was made to point at
//! 127.0.0.1 reading events or pausing destinations). With a token, the token does that.
//! Clients that are not browsers send none of these headers and are not affected.

use http::{header, Request, StatusCode};

use crate::web::response::ApiError;

/// `Err(403)` when `req` comes from another site's page, or names a host that is not this
/// machine. With an `admin_token` (`token_set`) none of this is needed: another site's page
/// cannot send the token, and the console may sit behind a proxy that rewrites `Host`.
pub fn same_site<B>(req: &Request<B>, token_set: bool) -> Result<(), ApiError> {
    if token_set {
        return Ok(());
    }
    let h = req.headers();
    let host = h
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    // The browser's own word first; `Origin` for browsers that do not send it.
    if let Some(site) = h.get("sec-fetch-site") {
        if !matches!(site.as_bytes(), b"same-origin" | b"none") {
            return Err(refused("the request came from another site's page"));
        }
    } else if let Some(origin) = h.get(header::ORIGIN) {
        let from = origin
            .to_str()
            .ok()
            .and_then(|o| o.split_once("://"))
            .map(|(_, authority)| authority);
        let same = matches!((from, host), (Some(f), Some(h)) if f.eq_ignore_ascii_case(h));
        if !same {
            return Err(refused("the request came from another origin"));
        }
    }
    if let Some(host) = host {
        if !loopback_name(host) {
            return Err(refused(
                "without an admin_token the admin API answers only to a loopback host name",
            ));
        }
    }
    Ok(())
}

/// Whether `host` (a Host header: name or address, maybe a port) names this machine.
fn loopback_name(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(n, _)| n),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn refused(why: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        format!("{why}; open the console from the admin address itself"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::post("/api/reload");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn the_console_and_scripts_pass() {
        let console = [
            ("host", "127.0.0.1:9090"),
            ("origin", "http://127.0.0.1:9090"),
            ("sec-fetch-site", "same-origin"),
        ];
        assert!(same_site(&req(&console), false).is_ok());
        assert!(same_site(&req(&[("host", "localhost:9090")]), false).is_ok());
        assert!(same_site(&req(&[("host", "[::1]:9090")]), false).is_ok());
        assert!(same_site(&req(&[]), false).is_ok());
        // A token protects a non-loopback listener: any host name may reach it.
        assert!(same_site(&req(&[("host", "relay.internal:9090")]), true).is_ok());
    }

    #[test]
    fn another_sites_page_is_refused() {
        let form = [
            ("host", "127.0.0.1:9090"),
            ("origin", "https://evil.example"),
            ("sec-fetch-site", "cross-site"),
        ];
        assert!(same_site(&req(&form), false).is_err());
        // With a token the page cannot send it: the token refuses it.
        assert!(same_site(&req(&form), true).is_ok());
        let old_browser = [
            ("host", "127.0.0.1:9090"),
            ("origin", "https://evil.example"),
        ];
        assert!(same_site(&req(&old_browser), false).is_err());
        assert!(same_site(
            &req(&[("origin", "null"), ("host", "127.0.0.1:9090")]),
            false
        )
        .is_err());
        assert!(same_site(&req(&[("sec-fetch-site", "same-site")]), false).is_err());
        // A proxy that rewrites Host: the browser's Sec-Fetch-Site decides.
        let proxied = [
            ("host", "127.0.0.1:9090"),
            ("origin", "https://relay-admin.corp"),
            ("sec-fetch-site", "same-origin"),
        ];
        assert!(same_site(&req(&proxied), false).is_ok());
    }

    #[test]
    fn a_rebound_name_is_refused_without_a_token() {
        let rebound = [
            ("host", "evil.example:9090"),
            ("sec-fetch-site", "same-origin"),
        ];
        assert!(same_site(&req(&rebound), false).is_err());
        assert!(same_site(&req(&[("host", "127.0.0.1.evil.example")]), false).is_err());
        assert!(same_site(&req(&[("host", "10.0.0.5:9090")]), false).is_err());
    }
}
