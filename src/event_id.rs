//! Event ids (the source's `event_id` JSONPaths, or the body's SHA-256) and `order_by`
//! keys: both are the values of compiled JSONPaths, joined.
//!
//! Each path is compiled once. Plain member paths (`$.payload.eventId`) take a direct walk
//! over the JSON tree; anything else goes through the RFC 9535 engine. The values found are
//! joined with [`SEPARATOR`] (strings as they are, other values as compact JSON; beside
//! other paths, those of a path that may find several as one part, joined with `,`); when no
//! path finds anything the id is the lowercase hex SHA-256 of the received bytes. A path
//! that searches descendants within a search is refused at compile ([`searches_once`]).

use std::fmt;

use jsonpath_rust::parser::model::{JpQuery, Segment, Selector};
use jsonpath_rust::parser::parse_json_path;
use jsonpath_rust::query::js_path_process;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Joins the values of several `event_id` paths: `dids:update:48213`.
pub const SEPARATOR: char = ':';

#[derive(Clone)]
pub struct IdPath {
    pub text: String,
    /// `Some` for plain member paths, walked without the JSONPath engine.
    members: Option<Vec<String>>,
    /// It may find several values (a wildcard, a slice, a filter, a union, `..`).
    several: bool,
    query: JpQuery,
}

impl fmt::Debug for IdPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdPath({:?})", self.text)
    }
}

impl IdPath {
    pub fn compile(text: &str) -> Result<Self, String> {
        let query = parse_json_path(text).map_err(|e| e.to_string())?;
        searches_once(text)?;
        Ok(IdPath {
            text: text.to_string(),
            members: plain_members(text),
            several: query.segments.iter().any(finds_several),
            query,
        })
    }

    /// The member names of a plain member path (`$.a.b`); `None` for any other path.
    pub fn members(&self) -> Option<&[String]> {
        self.members.as_deref()
    }

    /// Adds each value this path finds in `event` to `out`; returns whether it found any.
    fn find_into(&self, event: &Value, out: &mut Found) -> bool {
        if let Some(members) = &self.members {
            let mut v = event;
            for m in members {
                match v.get(m) {
                    Some(next) => v = next,
                    None => return false,
                }
            }
            return push_value(v, out);
        }
        let Ok(found) = js_path_process(&self.query, event) else {
            return false;
        };
        let mut any = false;
        for r in found {
            any |= push_value(r.val, out);
        }
        any
    }
}

/// Whether `segment` may select several nodes of one.
fn finds_several(segment: &Segment) -> bool {
    match segment {
        Segment::Descendant(_) => true,
        Segment::Selectors(s) => s.len() > 1 || s.iter().any(|s| !single(s)),
        Segment::Selector(s) => !single(s),
    }
}

fn single(s: &Selector) -> bool {
    matches!(s, Selector::Name(_) | Selector::Index(_))
}

/// `Err` for a JSONPath or filter that searches descendants (`..`) within a search: a `..`
/// after another in one path (`$..a..b`), or in a filter applied below one (`$..[?@..x]`),
/// searches again below every node the first found, which the ingress's one-walk budget for
/// descendant searches does not bound. Searches side by side (`@..a || @..b`) each walk
/// once. What is quoted does not count.
pub fn searches_once(text: &str) -> Result<(), String> {
    // By bracket depth: whether the path read there, or one it is inside, has searched.
    let mut searched = vec![false];
    let (mut quote, mut escaped, mut dot) = (None, false, false);
    for c in text.chars() {
        if let Some(q) = quote {
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                _ if c == q => quote = None,
                _ => {}
            }
            continue;
        }
        let depth = searched.len() - 1;
        let was_dot = std::mem::replace(&mut dot, c == '.');
        match c {
            '\'' | '"' => quote = Some(c),
            '$' | '@' => searched[depth] = depth > 0 && searched[depth - 1],
            '[' => searched.push(searched[depth]),
            ']' if depth > 0 => {
                searched.pop();
            }
            '.' if was_dot => {
                if searched[depth] {
                    return Err(
                        "searches descendants (`..`) within a search of descendants: \
                                each node the first finds is searched again, which a hostile \
                                event could make vast; search once"
                            .into(),
                    );
                }
                searched[depth] = true;
                dot = false;
            }
            _ => {}
        }
    }
    Ok(())
}

/// `$.a.b` → `["a","b"]` when every segment is a plain identifier.
fn plain_members(text: &str) -> Option<Vec<String>> {
    let rest = text.strip_prefix("$.")?;
    let parts: Vec<String> = rest.split('.').map(str::to_string).collect();
    let ok = parts.iter().all(|p| {
        !p.is_empty()
            && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !p.starts_with(|c: char| c.is_ascii_digit())
    });
    ok.then_some(parts)
}

/// The values paths found, as text.
#[derive(Default)]
struct Found {
    values: Vec<String>,
    /// Whether a value held an integer past 64 bits: read as a double, it stands for other
    /// integers as well (`123456789012345678901` and `…902` read the same).
    inexact: bool,
}

/// Adds `v` to `out` (a string as it is, another value as compact JSON); `null` is no value.
fn push_value(v: &Value, out: &mut Found) -> bool {
    match v {
        Value::Null => return false,
        Value::String(s) => out.values.push(s.clone()),
        other => {
            out.inexact |= !exact(other);
            out.values.push(other.to_string())
        }
    }
    true
}

/// Whether `v` holds no integer past 64 bits (read as a double of 2^53 or more, where
/// neighbouring integers read the same). A fraction is taken as it reads, as by earlier
/// builds: ids made of one stay what they were.
fn exact(v: &Value) -> bool {
    match v {
        Value::Number(n) => {
            n.is_i64()
                || n.is_u64()
                || n.as_f64()
                    .is_some_and(|f| f.abs() < 9_007_199_254_740_992.0)
        }
        Value::Array(a) => a.iter().all(exact),
        Value::Object(o) => o.values().all(exact),
        _ => true,
    }
}

/// Stands for a path that found nothing, before a later one that found a value: by
/// `["$.a", "$.b"]`, `{"a":"x"}` is `x` and `{"b":"x"}` is `\-:x`. No value is written
/// this way (escaping makes only `\\` and `\:`).
const MISSING: &str = "\\-";

/// The value of a single plain member path (which finds one value at most) as it is;
/// otherwise the values joined with [`SEPARATOR`], each with `\` and the separator escaped
/// (`\\`, `\:`), so that different values never join the same (`a:b` + `c` and `a` +
/// `b:c`; nor `x:y` found alone, by one of several paths or by a path that may find several,
/// and `x` + `y`). `None` parts are paths that found nothing ([`MISSING`]).
fn join(mut parts: Vec<Option<String>>, paths: &[IdPath]) -> Option<String> {
    let single = matches!(paths, [p] if p.members.is_some());
    if single {
        return parts.pop().flatten();
    }
    if parts.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(parts.iter().flatten().map(|p| p.len() + 1).sum());
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            out.push(SEPARATOR);
        }
        let Some(p) = p else {
            out.push_str(MISSING);
            continue;
        };
        escape_into(&mut out, p, SEPARATOR);
    }
    Some(out)
}

/// Appends `s` to `out` with `\` and `sep` escaped (`\\`, `\<sep>`).
fn escape_into(out: &mut String, s: &str, sep: char) {
    for c in s.chars() {
        if c == '\\' || c == sep {
            out.push('\\');
        }
        out.push(c);
    }
}

/// The values `paths` find in `event`, joined ([`join`]), with a path that found nothing
/// marked when a later one found a value (not when none after it did: a trailing path is
/// often optional); `None` when none finds one. An empty string is no value here (every
/// event with an empty id would be one event). Event ids are made this way.
pub fn joined(paths: &[IdPath], event: &Value) -> Option<String> {
    let mut parts = Vec::with_capacity(paths.len());
    let (mut found, mut missing) = (Found::default(), 0);
    let grouped = grouped(paths);
    for p in paths {
        p.find_into(event, &mut found);
        found.values.retain(|v: &String| !v.is_empty());
        if !found.values.is_empty() {
            parts.extend(std::iter::repeat_n(None, missing));
            take_found(p, grouped, &mut found.values, &mut parts);
            missing = 0;
        } else {
            missing += 1;
        }
    }
    // Two events whose ids differ past 64 bits would be one event, the second answered as
    // a duplicate and never delivered: the body's hash stands in instead.
    if found.inexact {
        return None;
    }
    join(parts, paths)
}

/// An `order_by` key: the values `paths` find in `event`, joined; `None` (not ordered) when
/// a path finds none, so that events missing part of the key do not share one line. (A key
/// read inexactly at worst puts two events in one line: they are still delivered.)
pub fn order_key(paths: &[IdPath], event: &Value) -> Option<String> {
    let mut found = Found::default();
    let mut parts = Vec::with_capacity(paths.len());
    let grouped = grouped(paths);
    for p in paths {
        if !p.find_into(event, &mut found) {
            return None;
        }
        take_found(p, grouped, &mut found.values, &mut parts);
    }
    join(parts, paths)
}

/// Whether each path's values make one part: with several paths of which one may find
/// several values, where they end must show (by `["$.p[*]", "$.q"]`, `{"p":["x","y"]}`
/// and `{"p":["x"],"q":"y"}` would both join `x:y`). One path alone, or only plain member
/// paths (one value each), join their values as they are.
fn grouped(paths: &[IdPath]) -> bool {
    paths.len() > 1 && paths.iter().any(|p| p.several)
}

/// Moves the values `p` found into `parts`: one part each, or, `grouped` and `p` able to
/// find several, one part of them all, joined with `,` (`\` and `,` inside escaped).
fn take_found(
    p: &IdPath,
    grouped: bool,
    values: &mut Vec<String>,
    parts: &mut Vec<Option<String>>,
) {
    if !grouped || !p.several {
        parts.extend(values.drain(..).map(Some));
        return;
    }
    let mut group = String::new();
    for (i, v) in values.drain(..).enumerate() {
        if i > 0 {
            group.push(',');
        }
        escape_into(&mut group, &v, ',');
    }
    parts.push(Some(group));
}

/// The event id of `event` (the decoded JSON) received as `body`.
pub fn event_id(paths: &[IdPath], event: &Value, body: &[u8]) -> String {
    joined(paths, event).unwrap_or_else(|| body_hash(body))
}

/// Lowercase hex SHA-256 of `body`.
pub fn body_hash(body: &[u8]) -> String {
    let digest = Sha256::digest(body);
    let mut s = String::with_capacity(64);
    for b in digest.iter() {
        use std::fmt::Write;
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn paths(p: &[&str]) -> Vec<IdPath> {
        p.iter().map(|s| IdPath::compile(s).unwrap()).collect()
    }

    #[test]
    fn joins_found_values() {
        let ev = json!({"schema":"dids","type":"update","data":{"id":48213}});
        let id = event_id(&paths(&["$.schema", "$.type", "$.data.id"]), &ev, b"x");
        assert_eq!(id, "dids:update:48213");
    }

    #[test]
    fn ids_past_a_doubles_precision_are_not_one_id() {
        let p = paths(&["$.payload.eventId"]);
        let id = |body: &str| {
            let ev: Value = serde_json::from_str(body).unwrap();
            event_id(&p, &ev, body.as_bytes())
        };
        let one = id(r#"{"payload":{"eventId":123456789012345678901}}"#);
        let two = id(r#"{"payload":{"eventId":123456789012345678902}}"#);
        assert_ne!(one, two, "two events, not a duplicate");
        assert_eq!(one.len(), 64, "the body's hash: {one}");
        // Inside a value found, too.
        let one = id(r#"{"payload":{"eventId":{"n":1e20,"k":1}}}"#);
        let two = id(r#"{"payload":{"eventId":{"n":100000000000000000001,"k":1}}}"#);
        assert_ne!(one, two);
        // A fraction is the id it was (a price in an object found, say).
        assert_eq!(id(r#"{"payload":{"eventId":{"p":12.5}}}"#), r#"{"p":12.5}"#);
        // A 64-bit integer is exact, and its digits are the id.
        assert_eq!(
            id(r#"{"payload":{"eventId":18446744073709551615}}"#),
            "18446744073709551615"
        );
        assert_eq!(
            id(r#"{"payload":{"eventId":-9223372036854775808}}"#),
            "-9223372036854775808"
        );
    }

    #[test]
    fn skips_missing_and_falls_back_to_hash() {
        let ev = json!({"payload":{"umid":"u1"}});
        let p = paths(&["$.payload.umid", "$.payload.status.state"]);
        assert_eq!(event_id(&p, &ev, b"x"), "u1");
        let none = event_id(&paths(&["$.nope"]), &ev, b"abc");
        assert_eq!(
            none,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn joined_values_never_run_together() {
        let p = paths(&["$.a", "$.b"]);
        let one = event_id(&p, &json!({"a":"x:y","b":"z"}), b"1");
        let two = event_id(&p, &json!({"a":"x","b":"y:z"}), b"2");
        assert_ne!(one, two);
        assert_eq!(one, r"x\:y:z");
        // A single value of a single path stays as it is.
        assert_eq!(
            event_id(&paths(&["$.a"]), &json!({"a":"urn:x"}), b""),
            "urn:x"
        );
        // One of several paths finding one value: escaped all the same, or `x:y` found
        // alone would be the id of `x` and `y` found by both.
        let alone = event_id(&p, &json!({"a":"x:y"}), b"3");
        assert_eq!(alone, r"x\:y");
        assert_ne!(alone, event_id(&p, &json!({"a":"x","b":"y"}), b"4"));
        // A null among several values found is no value (no empty part).
        let many = paths(&["$.p[*]"]);
        assert_eq!(event_id(&many, &json!({"p":["a",null,"b"]}), b""), "a:b");
        assert_eq!(event_id(&many, &json!({"p":["a",null]}), b""), "a");
        // A path that may find several values escapes one found alone.
        let alone = event_id(&many, &json!({"p":["x:y"]}), b"5");
        assert_eq!(alone, r"x\:y");
        assert_ne!(alone, event_id(&many, &json!({"p":["x","y"]}), b"6"));
        // The same value found by different paths: a path that found nothing before one
        // that did is marked, so they are different ids; one after the last found is not.
        let by_b = event_id(&p, &json!({"b":"x"}), b"7");
        assert_eq!(by_b, r"\-:x");
        assert_ne!(by_b, event_id(&p, &json!({"a":"x"}), b"8"));
        assert_eq!(event_id(&p, &json!({"a":"x","b":null}), b"9"), "x");
        assert_ne!(by_b, event_id(&p, &json!({"a":"-","b":"x"}), b"10"));
        assert_ne!(by_b, event_id(&p, &json!({"a":"\\-","b":"x"}), b"11"));
        // An empty string is no value: every event with an empty id would be one event.
        assert_eq!(
            event_id(&paths(&["$.id"]), &json!({"id":""}), b"abc"),
            body_hash(b"abc")
        );
    }

    #[test]
    fn where_a_paths_several_values_end_shows_beside_other_paths() {
        let p = paths(&["$.p[*]", "$.q"]);
        let id = |v: Value| event_id(&p, &v, b"");
        assert_ne!(id(json!({"p":["x","y"]})), id(json!({"p":["x"],"q":"y"})));
        assert_ne!(
            id(json!({"p":["x","y","z"]})),
            id(json!({"p":["x","y"],"q":"z"}))
        );
        assert_ne!(id(json!({"p":["x,y"]})), id(json!({"p":["x","y"]})));
        assert_eq!(id(json!({"p":["x","y"],"q":"z"})), "x,y:z");
        // The same for order keys.
        let key = |v: Value| order_key(&p, &v);
        assert_ne!(
            key(json!({"p":["x","y"],"q":"z"})),
            key(json!({"p":["x"],"q":"y:z"}))
        );
        assert_ne!(
            key(json!({"p":["x","y"],"q":"z"})),
            key(json!({"p":["x,y"],"q":"z"}))
        );
    }

    #[test]
    fn a_search_within_a_search_is_refused_but_side_by_side_ones_are_not() {
        for once in [
            "$..eventId",
            "$.a.b",
            "@..x == 'a..b'",
            "$['a..b']..c",
            "@.u == \"..\"",
            "@..a || @..b",
            "@..a == @..b",
            "$.a[?@..x]",
            "$..[?@.x == 1]",
        ] {
            assert!(searches_once(once).is_ok(), "{once}");
        }
        for nested in ["$..a..b", "$..[?@..x]", "$.a..b[?@..c]", "@..a..b || @.c"] {
            assert!(searches_once(nested).is_err(), "{nested}");
        }
    }

    #[test]
    fn only_paths_that_may_find_several_values_are_grouped() {
        for (text, several) in [
            ("$.a", false),
            ("$['a']", false),
            ("$.a[0]", false),
            ("$.a[*]", true),
            ("$..a", true),
            ("$.a[0:2]", true),
            ("$.a[?@.b]", true),
            ("$['a','b']", true),
        ] {
            assert_eq!(IdPath::compile(text).unwrap().several, several, "{text}");
        }
        // A single value beside another path is joined as before, `,` and all.
        let p = paths(&["$['a']", "$.b"]);
        assert_eq!(event_id(&p, &json!({"a":"x,y","b":"z"}), b""), "x,y:z");
    }

    #[test]
    fn an_order_key_needs_every_part() {
        let p = paths(&["$.schema", "$.data.id"]);
        assert_eq!(
            order_key(&p, &json!({"schema":"dids","data":{"id":7}})).as_deref(),
            Some("dids:7")
        );
        assert_eq!(order_key(&p, &json!({"schema":"sms_enablement"})), None);
        // An empty string is a value of a key (unlike an id's).
        assert_eq!(
            order_key(&p, &json!({"schema":"dids","data":{"id":""}})).as_deref(),
            Some("dids:")
        );
    }

    #[test]
    fn general_paths_use_the_engine() {
        let ev = json!({"payload":[{"eventId":"a"},{"eventId":"b"}]});
        let p = paths(&["$.payload[*].eventId"]);
        assert!(p[0].members.is_none());
        assert_eq!(event_id(&p, &ev, b"x"), "a:b");
    }
}
