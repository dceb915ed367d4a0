//! Value parsers: `${VAR}` expansion, durations, numbers, addresses, CIDRs, secrets, names;
//! each records a problem at the value's place and returns something usable.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

/// The longest duration a config may give: longer ones are mistakes (or "never", which
/// `0` says where it is allowed), and times computed from them would overflow.
/// humantime's year is 365.25 days, so `"100y"` is this.
pub(crate) const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);

use ipnet::IpNet;
use toml::Spanned;

use super::Cx;
use crate::config::raw::*;
use crate::config::*;
use crate::signature::decode_secret;

/// The longest name of a source, destination or route ([`Cx::name`]).
const MAX_NAME: usize = 100;
/// The most connections or requests a limit may allow at once ([`Cx::at_once`]).
const MAX_AT_ONCE: u64 = 1_000_000;

impl Cx<'_> {
    /// Expands `${VAR}` in a string value.
    pub(super) fn string(&mut self, s: &Str, key: &str) -> Option<String> {
        self.expand(s.get_ref(), s.span(), key)
    }

    /// Expands `${VAR}` (or `${VAR:-default}`) in `v`, found at `span`.
    pub(super) fn expand(&mut self, v: &str, span: Range<usize>, key: &str) -> Option<String> {
        self.defaulted.clear();
        self.expanded.clear();
        let mut out = String::with_capacity(v.len());
        let mut rest = v;
        while let Some(i) = rest.find("${") {
            out.push_str(&rest[..i]);
            let after = &rest[i + 2..];
            let Some(end) = after.find('}') else {
                self.err(Some(span.clone()), key, "unterminated ${ in value");
                return None;
            };
            // `${NAME:-default}` falls back to `default` when NAME is unset.
            let (name, default) = match after[..end].split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (&after[..end], None),
            };
            let valid = !name.is_empty()
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !valid {
                self.err(
                    Some(span.clone()),
                    key,
                    format!("${{{name}}} is not a valid environment variable name"),
                );
                return None;
            }
            // As in a shell, `:-` stands in for an empty value too.
            let value = (self.env)(name).filter(|v| !v.is_empty() || default.is_none());
            match (value, default) {
                (Some(val), _) => {
                    out.push_str(&val);
                    self.expanded.push((name.to_string(), val));
                }
                (None, Some(default)) => {
                    out.push_str(default);
                    self.defaulted.push(name.to_string());
                }
                (None, None) => {
                    self.err(
                        Some(span.clone()),
                        key,
                        format!("environment variable {name} is not set"),
                    );
                    return None;
                }
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        let used_vars = !self.expanded.is_empty() || !self.defaulted.is_empty();
        self.last_expansion = used_vars.then(|| (span, v.to_string(), out.clone()));
        Some(out)
    }

    pub(super) fn duration(&mut self, s: &Option<Str>, key: &str, default: Duration) -> Duration {
        match s {
            Some(s) => self.duration_at(s.get_ref(), s.span(), key, default),
            None => default,
        }
    }

    /// A duration that must be more than zero: at zero it would cut off or refuse every
    /// request (a timeout, a token's or a signature's lifetime).
    pub(super) fn duration_nonzero(
        &mut self,
        s: &Option<Str>,
        key: &str,
        default: Duration,
    ) -> Duration {
        match s {
            Some(s) => self.duration_at_nonzero(s.get_ref(), s.span(), key, default),
            None => default,
        }
    }

    pub(super) fn duration_at_nonzero(
        &mut self,
        v: &str,
        span: Range<usize>,
        key: &str,
        default: Duration,
    ) -> Duration {
        let d = self.duration_at(v, span.clone(), key, default);
        if d.is_zero() {
            self.err(Some(span), key, "must be more than 0");
            return default;
        }
        d
    }

    pub(super) fn duration_at(
        &mut self,
        v: &str,
        span: Range<usize>,
        key: &str,
        default: Duration,
    ) -> Duration {
        let Some(text) = self.expand(v, span.clone(), key) else {
            return default;
        };
        match humantime::parse_duration(text.trim()) {
            Ok(d) if d > MAX_DURATION => {
                self.err(
                    Some(span),
                    key,
                    format!("{text:?} is longer than the most a duration may be (\"100y\")"),
                );
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.err(
                    Some(span),
                    key,
                    format!("invalid duration {text:?} ({e}); write e.g. \"250ms\", \"5s\", \"10m\", \"24h\""),
                );
                default
            }
        }
    }

    /// A count of things held at once (connections, requests in flight): more than 0, at
    /// most [`MAX_AT_ONCE`] (a larger one could not be counted by a semaphore).
    pub(super) fn at_once(&mut self, v: &Option<Spanned<i64>>, key: &str, default: u64) -> usize {
        let n = self.positive(v, key, default);
        if n > MAX_AT_ONCE {
            let span = v.as_ref().map(|n| n.span());
            self.err(span, key, format!("must be at most {MAX_AT_ONCE}"));
            return default as usize;
        }
        n as usize
    }

    pub(super) fn positive(&mut self, v: &Option<Spanned<i64>>, key: &str, default: u64) -> u64 {
        match v {
            None => default,
            Some(n) if *n.get_ref() > 0 => *n.get_ref() as u64,
            Some(n) => {
                self.err(Some(n.span()), key, "must be greater than 0");
                default
            }
        }
    }

    pub(super) fn addr(&mut self, s: &Option<Str>, key: &str, default: &str) -> SocketAddr {
        let fallback: SocketAddr = default.parse().expect("default address");
        let Some(s) = s else { return fallback };
        let Some(text) = self.string(s, key) else {
            return fallback;
        };
        match text.parse() {
            Ok(a) => a,
            Err(_) => {
                self.err(
                    Some(s.span()),
                    key,
                    format!("invalid address {text:?}; write IP:PORT, e.g. \"0.0.0.0:8080\""),
                );
                fallback
            }
        }
    }

    /// Takes `n` into `out` if it is a network as written: one with bits set past its
    /// prefix (`10.1.2.3/8`) is refused, not widened, as it is most likely a typo for one
    /// address that would open the list to a whole network.
    fn network(&mut self, n: IpNet, s: &Str, key: &str, text: &str, out: &mut Vec<IpNet>) {
        if n.trunc() == n {
            out.push(n);
            return;
        }
        let one = IpNet::from(n.addr());
        // An IPv4-mapped network is read as its IPv4 one: said so, the prefix is clear.
        let read_as = if n.to_string() == text {
            String::new()
        } else {
            format!(" (read as {n})")
        };
        self.err(
            Some(s.span()),
            key,
            format!(
                "{text:?}{read_as} has bits set past its /{} prefix; write the network {} or the one address {one}",
                n.prefix_len(),
                n.trunc()
            ),
        );
    }

    pub(super) fn cidrs(&mut self, list: &Option<Vec<Str>>, key: &str) -> Vec<IpNet> {
        let mut out = Vec::new();
        for (i, s) in list.iter().flatten().enumerate() {
            let k = format!("{key}[{i}]");
            let Some(text) = self.string(s, &k) else {
                continue;
            };
            let parsed = text
                .parse::<IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from));
            match parsed {
                // An IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`, as a `[::]` listener
                // logs its peers) as the IPv4 one: peers are compared as IPv4.
                Ok(IpNet::V6(n)) if n.prefix_len() >= 96 && n.addr().to_ipv4_mapped().is_some() => {
                    let v4 = n
                        .addr()
                        .to_ipv4_mapped()
                        .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
                    match ipnet::Ipv4Net::new(v4, n.prefix_len() - 96) {
                        Ok(n) => self.network(IpNet::V4(n), s, &k, &text, &mut out),
                        Err(_) => self.network(IpNet::V6(n), s, &k, &text, &mut out),
                    }
                }
                Ok(n) => self.network(n, s, &k, &text, &mut out),
                Err(_) => self.err(
                    Some(s.span()),
                    &k,
                    format!("invalid CIDR {text:?}; write e.g. \"203.0.113.0/24\" or \"10.0.0.1\""),
                ),
            }
        }
        out
    }

    pub(super) fn secret(&mut self, s: &Str, key: &str, signing: bool) -> Option<Secret> {
        self.secret_at(s.get_ref(), s.span(), key, signing)
    }

    /// A secret value; `signing` secrets may be `whsec_<base64>`.
    pub(super) fn secret_at(
        &mut self,
        v: &str,
        span: Range<usize>,
        key: &str,
        signing: bool,
    ) -> Option<Secret> {
        let text = self.expand(v, span.clone(), key)?;
        self.expanded_a_secret();
        if !self.defaulted.is_empty() {
            let vars = std::mem::take(&mut self.defaulted);
            self.published_secrets
                .push((span.clone(), key.to_string(), vars));
        }
        let decoded = if signing {
            decode_secret(&text)
        } else if text.is_empty() {
            Err("the secret is empty".to_string())
        } else {
            Ok(text.into_bytes())
        };
        match decoded {
            Ok(b) => Some(Secret::new(b)),
            Err(e) => {
                self.err(Some(span), key, e);
                None
            }
        }
    }

    /// A name's longest: JetStream names a destination's consumer after it (in hex when it
    /// holds a dot), within its 255 characters with the longest `prefix`.
    pub(super) fn name(
        &mut self,
        s: &Str,
        key: &str,
        seen: &mut HashSet<String>,
        what: &str,
    ) -> String {
        let Some(name) = self.string(s, key) else {
            return String::new();
        };
        let ok = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            self.err(
                Some(s.span()),
                key,
                format!("invalid {what} name {name:?}: use letters, digits, '-', '_' or '.'"),
            );
        } else if name.len() > MAX_NAME {
            self.err(
                Some(s.span()),
                key,
                format!(
                    "the {what} name is {} characters long: at most {MAX_NAME}",
                    name.len()
                ),
            );
        } else if !seen.insert(name.clone()) {
            self.err(
                Some(s.span()),
                key,
                format!("duplicate {what} name {name:?}"),
            );
        }
        name
    }
}
