//! `routes.toml` text → [`Config`], collecting every problem.
//!
//! Unknown keys and wrong types are each listed (serde runs again past each one's line); a
//! syntax error stops there. Everything after that (values, references between sections,
//! `${VAR}` expansion) is checked in one pass that keeps going, so one `check` run lists
//! every problem. Each problem reads
//! `routes.toml:LINE:COL: <key path>: <reason>`.

//!
//! The pass is split by section (`server`, `delivery`, `sources`, `routes`) over shared
//! value parsers (`values`); every default lives in `defaults`.

pub(super) mod defaults;
mod delivery;
mod routes;
mod server;
mod sources;
mod values;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::raw::*;
use super::*;

/// One thing wrong with the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: String,
    /// 1-based line and column, when the problem has a place in the file.
    pub at: Option<(usize, usize)>,
    pub key: String,
    pub reason: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.at {
            Some((l, c)) => write!(f, "{}:{l}:{c}: {}: {}", self.file, self.key, self.reason),
            None => write!(f, "{}: {}: {}", self.file, self.key, self.reason),
        }
    }
}

/// Every problem found in one file.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<Problem>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads and validates the file, expanding `${VAR}` from the process environment.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![Problem {
            file: path.display().to_string(),
            at: None,
            key: "(file)".into(),
            reason: format!("cannot read: {e}"),
        }])
    })?;
    parse(&text, path, &|name| std::env::var(name).ok())
}

/// Validates `text` as the contents of `file`; `env` looks up `${VAR}`s.
pub fn parse(
    text: &str,
    file: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, ConfigErrors> {
    let mut cx = Cx {
        file: file.display().to_string(),
        dir: file.parent().map(Path::to_path_buf).unwrap_or_default(),
        text,
        env,
        problems: Vec::new(),
        client_ids: HashSet::new(),
        defaulted: Vec::new(),
        published_secrets: Vec::new(),
        expanded: Vec::new(),
        secret_vars: Vec::new(),
        last_expansion: None,
    };
    let (raw, mut found) = deserialize_all(text);
    found.sort_by_key(|(_, span, _)| span.as_ref().map(|s| s.start));
    for (key, span, reason) in found {
        cx.err(span, &key, in_words(&without_value(reason)));
    }
    let Some(raw) = raw else {
        return Err(ConfigErrors(cx.problems));
    };
    let config = cx.build(raw);
    if cx.problems.is_empty() {
        Ok(config)
    } else {
        // In the order of the file; those without a place last.
        cx.problems.sort_by_key(|p| (p.at.is_none(), p.at));
        for p in &mut cx.problems {
            p.reason = without_secrets(&p.reason, &cx.secret_vars);
        }
        Err(ConfigErrors(cx.problems))
    }
}

/// `reason` with each of `secrets`' values (as they are, or as Debug quotes them) written as
/// its variable, `${NAME}`, in what it quotes (`"…"`, where a reason puts a value): the
/// wording around stays as it is. The longest first, so that one holding another is not
/// shown in part.
fn without_secrets(reason: &str, secrets: &[(String, String)]) -> String {
    let shown: Vec<(String, String)> = secrets
        .iter()
        .map(|(name, value)| (value.clone(), format!("${{{name}}}")))
        .collect();
    without_values(reason, &shown)
}

/// `reason` with each (value, shown) pair's value (as it is, or as Debug quotes it) written
/// as `shown` in what it quotes (`"…"`): the wording around stays as it is. The longest
/// first, so that one holding another is not shown in part.
fn without_values(reason: &str, values: &[(String, String)]) -> String {
    let mut values: Vec<&(String, String)> = values.iter().filter(|(v, _)| !v.is_empty()).collect();
    if values.is_empty() {
        return reason.to_string();
    }
    values.sort_by_key(|(v, _)| std::cmp::Reverse(v.len()));
    // Split at the quotes that are not escaped: odd pieces are quoted.
    let mut pieces = vec![String::new()];
    let mut escaped = false;
    for c in reason.chars() {
        if c == '"' && !escaped {
            pieces.push(String::new());
            continue;
        }
        escaped = c == '\\' && !escaped;
        pieces.last_mut().expect("one at least").push(c);
    }
    for piece in pieces.iter_mut().skip(1).step_by(2) {
        *piece = replaced(piece, &values);
    }
    pieces.join("\"")
}

/// `text` with each (value, shown) pair's value, as it is and as Debug quotes it, written
/// as `shown` (quoted the same way).
fn replaced<P: std::borrow::Borrow<(String, String)>>(text: &str, values: &[P]) -> String {
    let mut text = text.to_string();
    for pair in values {
        let (value, instead) = pair.borrow();
        if text.contains(value.as_str()) {
            text = text.replace(value.as_str(), instead);
        }
        let quoted = format!("{value:?}");
        let quoted = &quoted[1..quoted.len() - 1];
        if quoted != value && text.contains(quoted) {
            let shown = format!("{instead:?}");
            text = text.replace(quoted, &shown[1..shown.len() - 1]);
        }
    }
    text
}

type SerdeProblem = (String, Option<Range<usize>>, String);

/// The most serde problems one run lists.
const MAX_SERDE_PROBLEMS: usize = 32;

/// Deserializes `text`, listing every unknown key and wrong type, not only the first:
/// after each such problem the `key = value` line it is on is blanked (offsets kept, so
/// later spans still point into `text`) and serde runs again. Stops at a problem no line
/// can be blanked for (a syntax error, a missing key, a value over several lines); then
/// there is no config to validate further. A missing key that is only missing because its
/// line was blanked is not listed again.
fn deserialize_all(text: &str) -> (Option<RawConfig>, Vec<SerdeProblem>) {
    let mut text = text.to_string();
    let mut problems: Vec<SerdeProblem> = Vec::new();
    let mut blanked: Vec<String> = Vec::new();
    while problems.len() < MAX_SERDE_PROBLEMS {
        let (key, span, reason) = match deserialize(&text) {
            Ok(raw) => return (Some(raw), problems),
            Err(p) => p,
        };
        let missing_blanked = reason
            .strip_prefix("missing field `")
            .and_then(|r| r.strip_suffix('`'))
            .is_some_and(|field| blanked.iter().any(|b| b == field));
        if !missing_blanked {
            problems.push((key, span.clone(), reason));
        }
        let Some(line) = span.and_then(|s| blankable_line(&text, s.start)) else {
            break;
        };
        let name = text[line.clone()].split('=').next().unwrap_or("").trim();
        blanked.push(name.trim_matches('"').to_string());
        let spaces = " ".repeat(line.len());
        text.replace_range(line, &spaces);
    }
    (None, problems)
}

/// The byte range of the line holding `offset`, without its newline, if it is a whole
/// `key = value` line (a value that ends on it: brackets and braces balanced).
fn blankable_line(text: &str, offset: usize) -> Option<Range<usize>> {
    let start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let line = text[start..end].trim();
    if line.starts_with('[') || !line.contains('=') {
        return None;
    }
    (nesting(line) == Some(0)).then_some(start..end)
}

/// How many brackets and braces `line` leaves open (outside strings and comments); `None`
/// when a string is left open.
fn nesting(line: &str) -> Option<i32> {
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '#') => break,
            (None, '[' | '{') => depth += 1,
            (None, ']' | '}') => depth -= 1,
            _ => {}
        }
    }
    quote.is_none().then_some(depth)
}

/// serde's "invalid type: string \"…\", expected …" (or "integer `…`", "floating point
/// `…`") without the value: a secret written in the file under the wrong shape
/// (`sign = "whsec_…"` for `sign = { secret = … }`, or a number) is not printed by `check`
/// nor by a reload's answer.
fn without_value(reason: String) -> String {
    let Some(at) = reason.find("invalid type: ") else {
        return reason;
    };
    let start = at + "invalid type: ".len();
    let Some(end) = reason[start..].rfind(", expected").map(|e| start + e) else {
        return reason;
    };
    let what = &reason[start..end];
    let kind = if what.starts_with("string \"") {
        "a string"
    } else if let Some((kind, _)) = what.split_once(" `") {
        kind
    } else {
        return reason;
    };
    format!("{}{kind}{}", &reason[..start], &reason[end..])
}

/// serde's names of the file's own types in words a user writes.
fn in_words(reason: &str) -> String {
    reason
        .replace(
            "data did not match any variant of untagged enum RawMatchValue",
            "must be a string or a list of strings (a number is written as one: \"404\")",
        )
        .replace(
            "internally tagged enum RawAuth",
            "a table such as { kind = \"header\", header = \"…\", value = \"…\" }",
        )
}

fn deserialize(text: &str) -> Result<RawConfig, SerdeProblem> {
    toml::from_str(text).map_err(|e| {
        let key = e
            .span()
            .map(|s| key_path_at(text, s.start))
            .unwrap_or_else(|| "(top level)".into());
        (key, e.span(), e.message().to_string())
    })
}

/// The key path (`sources[1].auth`) of the line holding byte `offset`, for serde's errors,
/// which carry a span but no path (serde_path_to_error cannot see through `Spanned`).
fn key_path_at(text: &str, offset: usize) -> String {
    let mut table = String::new();
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut line_start = 0;
    // A value over several lines (`to = [` … `]`): its key, and the brackets still open.
    let mut open: Option<(String, i32)> = None;
    for line in text.split_inclusive('\n') {
        let end = line_start + line.len();
        let t = line.trim();
        let mut key = String::new();
        // A header line belongs to the table it opens (serde points a missing field there).
        let header = if open.is_some() {
            false
        } else if let Some(name) = t.strip_prefix("[[").and_then(|r| r.split("]]").next()) {
            let name = name.trim().to_string();
            let n = counts.entry(name.clone()).or_insert(0);
            table = format!("{name}[{n}]");
            *n += 1;
            true
        } else if let Some(name) = t.strip_prefix('[').and_then(|r| r.split(']').next()) {
            table = within_array_table(name.trim(), &counts);
            true
        } else {
            false
        };
        if let Some((k, depth)) = &mut open {
            key = k.clone();
            *depth += nesting(t).unwrap_or(0);
            if *depth <= 0 {
                open = None;
            }
        } else if !header {
            if let Some((k, value)) = t.split_once('=') {
                key = k.trim().trim_matches('"').to_string();
                if let Some(d @ 1..) = nesting(value) {
                    open = Some((key.clone(), d));
                }
            }
        }
        if offset < end {
            let key = key.as_str();
            return match (table.is_empty(), key.is_empty()) {
                (true, true) => "(top level)".into(),
                (true, false) => key.to_string(),
                (false, true) => table,
                (false, false) => format!("{table}.{key}"),
            };
        }
        line_start = end;
    }
    "(end of file)".into()
}

/// A table header's name as a key path: a sub-table of an array table's latest element
/// (`[destinations.retry]` after the first `[[destinations]]`) is `destinations[0].retry`.
fn within_array_table(name: &str, counts: &HashMap<String, usize>) -> String {
    let mut cut = name.len();
    while let Some(dot) = name[..cut].rfind('.') {
        if let Some(n) = counts.get(&name[..dot]) {
            return format!("{}[{}]{}", &name[..dot], n.saturating_sub(1), &name[dot..]);
        }
        cut = dot;
    }
    name.to_string()
}

struct Cx<'a> {
    file: String,
    dir: PathBuf,
    text: &'a str,
    env: &'a dyn Fn(&str) -> Option<String>,
    problems: Vec<Problem>,
    /// OAuth2 client ids seen so far: unique across sources, since a token names one.
    client_ids: HashSet<String>,
    /// Variables whose `${VAR:-default}` default was used by the last expansion.
    defaulted: Vec<String>,
    /// Secrets that took a default written in the file: (place, key, variables).
    published_secrets: Vec<(Range<usize>, String, Vec<String>)>,
    /// Variables (name, value) the last expansion used.
    expanded: Vec<(String, String)>,
    /// Variables (name, value) expanded into a secret: a problem quoting one of their values
    /// (the same variable put in another key as well, by mistake) shows `${NAME}` instead.
    secret_vars: Vec<(String, String)>,
    /// The last value expanded with variables: (its place, as written, as filled in).
    last_expansion: Option<(Range<usize>, String, String)>,
}

/// How long a filled-in value must be to be replaced where a problem's wording shows it
/// unquoted (a parser's echo of its input): a shorter one could be part of a word.
const ECHO_MIN: usize = 8;

impl Cx<'_> {
    fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let col = before.rfind('\n').map_or(offset, |nl| offset - nl - 1) + 1;
        (line, col)
    }

    fn err(&mut self, span: Option<Range<usize>>, key: &str, reason: impl Into<String>) {
        let mut reason = reason.into();
        // A problem with the value just expanded quotes it as the file writes it: a value
        // filled in from the environment may be a secret URL path or token, and `check`'s
        // output and a reload's answer end up in CI logs and terminals.
        if let (Some(s), Some((at, written, filled))) = (&span, &self.last_expansion) {
            if s == at && !filled.is_empty() {
                let pair = [(filled.clone(), written.clone())];
                reason = if filled.len() >= ECHO_MIN {
                    // Unquoted too: a parser's message echoes its input.
                    replaced(&reason, &pair)
                } else {
                    without_values(&reason, &pair)
                };
            }
        }
        let at = span.map(|s| self.line_col(s.start));
        self.problems.push(Problem {
            file: self.file.clone(),
            at,
            key: key.to_string(),
            reason,
        });
    }

    /// The variables of the last expansion made a secret ([`Cx::secret_vars`]).
    fn expanded_a_secret(&mut self) {
        let used = std::mem::take(&mut self.expanded);
        self.secret_vars.extend(used);
    }

    /// Every section in turn, then the references between them.
    fn build(&mut self, raw: RawConfig) -> Config {
        let server = self.server(raw.server.as_ref());
        let store = self.store(raw.store.as_ref());
        let dedup_window = self.duration(
            &raw.dedup.as_ref().and_then(|d| d.get_ref().window.clone()),
            "dedup.window",
            defaults::DEDUP_WINDOW,
        );
        let defaults = self.delivery_defaults(raw.delivery.as_ref().map(|d| d.get_ref()));

        let mut names = HashSet::new();
        let mut destinations = Vec::new();
        for (i, d) in raw.destinations.iter().enumerate() {
            let dest = self.destination(i, d, &defaults, &mut names);
            destinations.push(Arc::new(dest));
        }
        let dest_index: HashMap<String, usize> = destinations
            .iter()
            .enumerate()
            .map(|(i, d)| (d.name.clone(), i))
            .collect();

        let mut names = HashSet::new();
        let mut paths = HashMap::new();
        let mut sources = Vec::new();
        let mut any_oauth = None;
        for (i, s) in raw.sources.iter().enumerate() {
            let src = self.source(i, s, &mut names, &mut paths);
            if matches!(src.auth, Auth::OAuth2 { .. }) && any_oauth.is_none() {
                any_oauth = Some(s.span());
            }
            // A signed message is taken for 2 × tolerance (a timestamp that far either side
            // of now): its id must be remembered as long, or it can be posted again, by
            // anyone who saw it, as a new event.
            if let Auth::StandardWebhooks { tolerance, .. } = &src.auth {
                if dedup_window < *tolerance * 2 {
                    self.err(
                        Some(s.span()),
                        &format!("sources[{i}].auth.tolerance"),
                        format!(
                            "a signed message is accepted for twice the tolerance ({}), longer than dedup.window ({}) remembers its id: a copy could be posted again as a new event; make dedup.window at least {}",
                            humantime::format_duration(*tolerance * 2),
                            humantime::format_duration(dedup_window),
                            humantime::format_duration(*tolerance * 2),
                        ),
                    );
                }
            }
            sources.push(src);
        }
        // A secret written but not read (an unset or empty variable) is said already.
        let written = raw
            .server
            .as_ref()
            .is_some_and(|s| s.get_ref().token_secret.is_some());
        if let (Some(span), None, false) = (any_oauth, &server.token_secret, written) {
            self.err(
                Some(span),
                "server.token_secret",
                "required because a source uses oauth2 auth (it signs the access tokens)",
            );
        }
        let src_index: HashMap<String, usize> = sources
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();

        let mut names = HashSet::new();
        let mut routes = Vec::new();
        for (i, r) in raw.routes.iter().enumerate() {
            if let Some(route) =
                self.route(i, r, &src_index, &dest_index, &destinations, &mut names)
            {
                sources[route.source].routes.push(routes.len());
                routes.push(Arc::new(route));
            }
        }

        for s in &mut sources {
            s.needs = crate::needed::Needed::of(s, s.routes.iter().map(|&i| routes[i].as_ref()));
            let mut texts =
                s.event_id
                    .iter()
                    .map(|p| p.text.as_str())
                    .chain(s.routes.iter().flat_map(|&i| {
                        let r = &routes[i];
                        r.order_by
                            .iter()
                            .map(|p| p.text.as_str())
                            .chain(r.filter.iter().map(|f| f.text.as_str()))
                    }));
            // A search of descendants, a wildcard or a filter selector may visit nodes
            // below a member whose long key every one of their paths repeats.
            s.descends = texts.any(|t| t.contains("..") || t.contains('*') || t.contains('?'));
        }
        // A secret's default is written in the file for anyone to read: fine for trying
        // the relay on this host, not once the ingress takes requests from others.
        if !server.listen.ip().is_loopback() {
            for (span, key, vars) in std::mem::take(&mut self.published_secrets) {
                self.err(
                    Some(span),
                    &key,
                    format!(
                        "{} not set, so this secret is the default written in the file, while \
                         server.listen {} is reachable from other hosts: set {}",
                        vars.join(", "),
                        server.listen,
                        vars.join(" and ")
                    ),
                );
            }
        }
        Config {
            file: PathBuf::from(&self.file),
            server,
            store,
            dedup_window,
            sources: sources.into_iter().map(Arc::new).collect(),
            destinations,
            routes,
            by_path: paths,
        }
    }
}

fn sorted(mut v: Vec<&str>) -> String {
    v.sort_unstable();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}
