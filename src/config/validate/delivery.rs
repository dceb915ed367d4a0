//! `[delivery]` defaults and `[[destinations]]`: timeout, limits, retry, rate, breaker.

use std::collections::HashSet;
use std::time::Duration;

use base64::Engine as _;
use http::{HeaderName, HeaderValue, Uri};
use toml::Spanned;

use super::defaults;
use super::values::MAX_DURATION;
use super::Cx;
use crate::config::raw::*;
use crate::config::*;

/// Headers that frame the message or the connection: hyper writes them from the body, and
/// one set by hand would cut the body short or mislabel it. (`Host` may be set: a virtual
/// host behind an address.)
const FRAMING: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// Defaults of `[delivery]`, after the file's own `[delivery]` is applied.
pub(super) struct DeliveryDefaults {
    pub(super) timeout: Duration,
    pub(super) max_in_flight: usize,
    pub(super) max_queue: u64,
    pub(super) retry: RetryPolicy,
    pub(super) rate: Rate,
    pub(super) breaker: Breaker,
}

impl Cx<'_> {
    pub(super) fn retry(&mut self, r: &RawRetry, key: &str, base: &RetryPolicy) -> RetryPolicy {
        let mut p = base.clone();
        p.first = self.duration(&r.first, &format!("{key}.first"), p.first);
        p.max_delay = self.duration(&r.max_delay, &format!("{key}.max_delay"), p.max_delay);
        p.give_up_after = self.duration(
            &r.give_up_after,
            &format!("{key}.give_up_after"),
            p.give_up_after,
        );
        if let (Some(v), true) = (&r.give_up_after, p.give_up_after.is_zero()) {
            self.err(
                Some(v.span()),
                &format!("{key}.give_up_after"),
                "must be more than 0 (for no retries, set max_attempts = 1)",
            );
            p.give_up_after = base.give_up_after;
        }
        if let Some(f) = &r.factor {
            let factor = *f.get_ref();
            // Between 1 and 1.01 the delay would take thousands of steps to grow at all.
            if factor == 1.0 || (factor >= 1.01 && factor.is_finite()) {
                p.factor = factor;
            } else {
                self.err(
                    Some(f.span()),
                    &format!("{key}.factor"),
                    "must be 1 (a fixed delay) or a number >= 1.01",
                );
            }
        }
        if let Some(m) = &r.max_attempts {
            match u32::try_from(*m.get_ref()) {
                Ok(n) => p.max_attempts = n,
                Err(_) => self.err(
                    Some(m.span()),
                    &format!("{key}.max_attempts"),
                    "must be 0 (no limit) or a positive count",
                ),
            }
        }
        if p.first.is_zero() {
            self.err(
                r.first.as_ref().map(|s| s.span()),
                &format!("{key}.first"),
                "must be greater than 0",
            );
        }
        p
    }

    pub(super) fn breaker(&mut self, r: &RawBreaker, key: &str, base: &Breaker) -> Breaker {
        let mut out = base.clone();
        if let Some(f) = &r.failures {
            match u32::try_from(*f.get_ref()) {
                Ok(n) => out.failures = n,
                Err(_) => self.err(
                    Some(f.span()),
                    &format!("{key}.failures"),
                    format!("must be a whole number from 0 (off) to {}", u32::MAX),
                ),
            }
        }
        out.cool_down = self.duration(&r.cool_down, &format!("{key}.cool_down"), out.cool_down);
        if out.cool_down.is_zero() {
            self.err(
                r.cool_down.as_ref().map(|s| s.span()),
                &format!("{key}.cool_down"),
                "must be greater than 0",
            );
        }
        out
    }

    pub(super) fn rate(&mut self, r: &RawRate, key: &str, base: &Rate) -> Rate {
        let mut out = base.clone();
        if let Some(ps) = &r.per_second {
            let per_second = *ps.get_ref();
            // One at least every 100 years (a limiter's period is bounded).
            if per_second.is_finite() && per_second * MAX_DURATION.as_secs_f64() >= 1.0 {
                out.per_second = per_second;
            } else {
                self.err(
                    Some(ps.span()),
                    &format!("{key}.per_second"),
                    "must be greater than 0 (and at least one per 100 years)",
                );
            }
        }
        if let Some(b) = &r.burst {
            let n = self.positive(&Some(b.clone()), &format!("{key}.burst"), 1);
            out.burst = u32::try_from(n).unwrap_or_else(|_| {
                self.err(
                    Some(b.span()),
                    &format!("{key}.burst"),
                    format!("must be at most {}", u32::MAX),
                );
                1
            });
        }
        out
    }

    pub(super) fn delivery_defaults(&mut self, raw: Option<&RawDelivery>) -> DeliveryDefaults {
        let mut d = DeliveryDefaults {
            timeout: defaults::TIMEOUT,
            max_in_flight: defaults::MAX_IN_FLIGHT as usize,
            max_queue: defaults::MAX_QUEUE,
            retry: RetryPolicy {
                first: defaults::RETRY_FIRST,
                factor: defaults::RETRY_FACTOR,
                max_delay: defaults::RETRY_MAX_DELAY,
                give_up_after: defaults::GIVE_UP_AFTER,
                max_attempts: defaults::RETRY_MAX_ATTEMPTS,
            },
            rate: Rate {
                per_second: defaults::RATE_PER_SECOND,
                burst: defaults::RATE_BURST,
            },
            breaker: Breaker {
                failures: defaults::BREAKER_FAILURES,
                cool_down: defaults::BREAKER_COOL_DOWN,
            },
        };
        let Some(r) = raw else { return d };
        if let Some(b) = &r.breaker {
            d.breaker = self.breaker(b.get_ref(), "delivery.breaker", &d.breaker);
        }
        d.timeout = self.duration_nonzero(&r.timeout, "delivery.timeout", d.timeout);
        d.max_in_flight = self.at_once(
            &r.max_in_flight,
            "delivery.max_in_flight",
            d.max_in_flight as u64,
        );
        d.max_queue = self.positive(&r.max_queue, "delivery.max_queue", d.max_queue);
        if let Some(rt) = &r.retry {
            d.retry = self.retry(rt.get_ref(), "delivery.retry", &d.retry);
        }
        if let Some(rate) = &r.rate {
            d.rate = self.rate(rate.get_ref(), "delivery.rate", &d.rate);
        }
        d
    }

    pub(super) fn destination(
        &mut self,
        i: usize,
        d: &Spanned<RawDestination>,
        defaults: &DeliveryDefaults,
        names: &mut HashSet<String>,
    ) -> Destination {
        let key = format!("destinations[{i}]");
        let r = d.get_ref();
        let name = self.name(&r.name, &format!("{key}.name"), names, "destination");
        let text = self.string(&r.url, &format!("{key}.url"));
        // User info (sent as Basic auth), a query or a path (a chat service's incoming
        // webhook) may hold a credential.
        self.expanded_a_secret();
        let url = match text {
            Some(text) => match text.parse::<Uri>() {
                Ok(u)
                    if matches!(u.scheme_str(), Some("http") | Some("https"))
                        && u.host().is_some_and(|h| !h.is_empty())
                        && port_is_valid(&u) =>
                {
                    u
                }
                _ => {
                    self.err(
                        Some(r.url.span()),
                        &format!("{key}.url"),
                        // The text as written (an expanded ${VAR} may hold a credential),
                        // without user info or query (so may the text).
                        format!(
                            "invalid URL {:?}: need http:// or https:// with a host (and a port from 0 to 65535, if any)",
                            crate::config::shown_url_text(r.url.get_ref())
                        ),
                    );
                    Uri::from_static("http://invalid.invalid/")
                }
            },
            None => Uri::from_static("http://invalid.invalid/"),
        };
        let mut headers = Vec::new();
        for (h, v) in r.headers.iter().flatten() {
            let k = format!("{key}.headers.{h}");
            let Some(h) = self.expand(h, v.span(), &k) else {
                continue;
            };
            let Ok(hn) = HeaderName::from_bytes(h.as_bytes()) else {
                self.err(Some(v.span()), &k, format!("invalid header name {h:?}"));
                continue;
            };
            if FRAMING.contains(&hn.as_str()) {
                self.err(
                    Some(v.span()),
                    &k,
                    format!("{h:?} is set by the relay for each request (it frames the message), not by a destination"),
                );
                continue;
            }
            let Some(val) = self.string(v, &k) else {
                continue;
            };
            // An empty variable would send the header empty on every delivery (a key the
            // destination refuses, each time): most likely it was not meant to be empty.
            let from_variable = !self.expanded.is_empty();
            self.expanded_a_secret();
            if val.is_empty() && from_variable {
                self.err(
                    Some(v.span()),
                    &k,
                    "is empty: the variable it is made of holds nothing",
                );
                continue;
            }
            match HeaderValue::from_str(&val) {
                Ok(mut hv) => {
                    hv.set_sensitive(true);
                    headers.push((hn, hv));
                }
                Err(_) => self.err(
                    Some(v.span()),
                    &k,
                    "invalid header value (control characters?)",
                ),
            }
        }
        // `https://user:password@host/` is sent as HTTP Basic (the client would drop the
        // user info): unless the headers already authorize, and never in the URL itself.
        let (url, login) = without_user_info(url);
        if let Some(basic) = login {
            if !headers
                .iter()
                .any(|(h, _)| h == http::header::AUTHORIZATION)
            {
                headers.push((http::header::AUTHORIZATION, basic));
            }
        }
        let sign = r
            .sign
            .as_ref()
            .and_then(|s| self.secret(&s.get_ref().secret, &format!("{key}.sign.secret"), true));
        let retry = match &r.retry {
            Some(rt) => self.retry(rt.get_ref(), &format!("{key}.retry"), &defaults.retry),
            None => defaults.retry.clone(),
        };
        let rate = match &r.rate {
            Some(rt) => self.rate(rt.get_ref(), &format!("{key}.rate"), &defaults.rate),
            None => defaults.rate.clone(),
        };
        let breaker = match &r.breaker {
            Some(b) => self.breaker(b.get_ref(), &format!("{key}.breaker"), &defaults.breaker),
            None => defaults.breaker.clone(),
        };
        let written = r.url.get_ref();
        let shown_url = if written.contains("${") {
            crate::config::shown_url_text(written)
        } else {
            crate::config::shown_url(&url)
        };
        Destination {
            name,
            url,
            shown_url,
            headers,
            sign,
            timeout: self.duration_nonzero(&r.timeout, &format!("{key}.timeout"), defaults.timeout),
            max_in_flight: self.at_once(
                &r.max_in_flight,
                &format!("{key}.max_in_flight"),
                defaults.max_in_flight as u64,
            ),
            max_queue: self.positive(
                &r.max_queue,
                &format!("{key}.max_queue"),
                defaults.max_queue,
            ),
            retry,
            rate,
            breaker,
        }
    }
}

/// `url` without its user info, and that user info as an HTTP Basic `Authorization` value
/// (percent-decoded, marked sensitive).
fn without_user_info(url: Uri) -> (Uri, Option<HeaderValue>) {
    let Some((login, host)) = url.authority().and_then(|a| a.as_str().rsplit_once('@')) else {
        return (url, None);
    };
    let decoded = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let (user, password) = login.split_once(':').unwrap_or((login, ""));
    let credentials = format!("{}:{}", decoded(user), decoded(password));
    let basic = HeaderValue::from_str(&format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(credentials)
    ))
    .ok()
    .map(|mut v| {
        v.set_sensitive(true);
        v
    });
    let mut parts = url.clone().into_parts();
    parts.authority = host.parse().ok();
    match Uri::from_parts(parts) {
        Ok(u) => (u, basic),
        Err(_) => (url, None),
    }
}

/// Whether a URL's port, if it has one, is a number a port can be: `http::Uri` takes any
/// text after the host's `:` (`:80800`, `:8o80`) and then has no port, which would send to
/// the scheme's default port.
fn port_is_valid(u: &Uri) -> bool {
    let Some(authority) = u.authority() else {
        return true;
    };
    let host_port = authority.as_str().rsplit('@').next().unwrap_or_default();
    // After an IPv6 literal's brackets, or the whole of another host.
    let after_host = match host_port.rfind(']') {
        Some(i) => &host_port[i + 1..],
        None => host_port,
    };
    // `host:` with nothing after it is the scheme's default port, as RFC 3986 has it.
    match after_host.rsplit_once(':') {
        None => true,
        Some((_, port)) => port.is_empty() || u.port_u16().is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_info_becomes_basic_auth_and_leaves_the_url() {
        let (u, b) = without_user_info(
            "https://ops%40corp:p%3Ass@hooks.example:8443/in?x=1"
                .parse()
                .unwrap(),
        );
        assert_eq!(u.to_string(), "https://hooks.example:8443/in?x=1");
        // base64("ops@corp:p:ss")
        assert_eq!(b.unwrap().to_str().unwrap(), "Basic b3BzQGNvcnA6cDpzcw==");
        let (u, b) = without_user_info("http://h/".parse().unwrap());
        assert_eq!(u.to_string(), "http://h/");
        assert!(b.is_none());
    }
}
