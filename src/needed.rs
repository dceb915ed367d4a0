//! The parts of an event that a source's rules read, and a parser that builds only those.
//!
//! Routing reads a few fields of an event: its `match` keys, its `event_id` and `order_by`
//! paths and its `decode_json` fields. Building the whole JSON tree of every event, only to
//! drop it again, cost as much CPU as all the rest of the ingress handler (profile in
//! docs/performance.md). [`Needed::parse`] still reads, and checks as serde_json's `Value`
//! would (UTF-8, escapes, numbers in range), every byte of the body, and keeps only what a
//! rule can reach; a source with a `filter` or a path that is
//! not plain members (`$.a.b`) needs everything, and gets the whole tree as before.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::{Route, Source};

/// What of an event is kept: all of a value, or some members of an object (each with what
/// of it is kept). A value that is not an object where members are asked for is kept whole.
#[derive(Debug, Clone, PartialEq)]
pub enum Needed {
    All,
    Members(BTreeMap<String, Needed>),
}

impl Needed {
    pub fn nothing() -> Self {
        Needed::Members(BTreeMap::new())
    }

    /// What the rules of `source` and of `routes` (its routes) read.
    pub fn of<'a>(source: &Source, routes: impl IntoIterator<Item = &'a Route>) -> Needed {
        let mut n = Needed::nothing();
        for p in &source.event_id {
            n.add(p.members());
        }
        for f in &source.decode_json {
            n.add(Some(std::slice::from_ref(f)));
        }
        for r in routes {
            for m in &r.matchers {
                n.add(Some(std::slice::from_ref(&m.field)));
            }
            if r.filter.is_some() {
                n.add(None);
            }
            for p in &r.order_by {
                n.add(p.members());
            }
        }
        n
    }

    /// Adds all of the value at the member path `members`; `None` (a path that is not plain
    /// members): everything.
    pub fn add(&mut self, members: Option<&[String]>) {
        let Some(members) = members else {
            *self = Needed::All;
            return;
        };
        let mut node = self;
        for m in members {
            node = match node {
                Needed::All => return,
                Needed::Members(f) => f.entry(m.clone()).or_insert_with(Needed::nothing),
            };
        }
        *node = Needed::All;
    }

    /// Parses `body` (all of it must be one JSON value), keeping what is needed.
    pub fn parse(&self, body: &[u8]) -> serde_json::Result<Value> {
        let mut de = serde_json::Deserializer::from_slice(body);
        let v = self.deserialize(&mut de)?;
        de.end()?;
        Ok(v)
    }
}

impl<'de> DeserializeSeed<'de> for &Needed {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        match self {
            // Not serde_json's own `Value`: with the `raw_value` feature (the admin API's
            // body view) it reads an object whose key is serde_json's private raw-value
            // token as the JSON its string holds, and a body would route as something it
            // is not, differently with and without a `filter` on the source.
            Needed::All => d.deserialize_any(Keep(None)),
            Needed::Members(m) => d.deserialize_any(Keep(Some(m))),
        }
    }
}

/// Builds what serde_json's own `Value` would, except that an object keeps only the
/// members asked for (`None`: all; the others are read and dropped without being built),
/// and that every key is only a key.
struct Keep<'a>(Option<&'a BTreeMap<String, Needed>>);

impl<'de> Visitor<'de> for Keep<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(&Needed::All)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            let needed = match self.0 {
                None => Some(&Needed::All),
                Some(members) => members.get(&*k),
            };
            match needed {
                Some(n) => {
                    let v = map.next_value_seed(n)?;
                    out.insert(k.into_owned(), v); // a repeated key: the last one wins
                }
                None => {
                    map.next_value::<Checked>()?;
                }
            }
        }
        Ok(Value::Object(out))
    }
}

/// A value read and dropped, but checked as building it would check it: serde's
/// `IgnoredAny` skips strings and numbers without looking inside, so a member no rule reads
/// could hold bytes that are not UTF-8, a lone surrogate escape or `1e400`, and a body that
/// is not JSON would be accepted.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(Checked)
    }
}

impl<'de> Visitor<'de> for Checked {
    type Value = Checked;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_str<E>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_unit<E>(self) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_key::<Key<'de>>()?.is_some() {
            map.next_value::<Checked>()?;
        }
        Ok(Checked)
    }
}

/// An object's key, borrowed from the body unless it has escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event_id::{joined, IdPath};

    #[test]
    fn every_key_is_only_a_key() {
        // serde_json's private raw-value token as a key: a key like any other, whether the
        // whole tree is built or only some members.
        let body = br#"{"$serde_json::private::RawValue":"{\"eventType\":\"CALL_ACTION\"}","n":[{"$serde_json::private::RawValue":"1"}]}"#;
        let whole = Needed::All.parse(body).unwrap();
        assert_eq!(whole["eventType"], Value::Null, "{whole}");
        assert_eq!(
            whole["$serde_json::private::RawValue"],
            "{\"eventType\":\"CALL_ACTION\"}"
        );
        assert_eq!(whole["n"][0]["$serde_json::private::RawValue"], "1");
        let (some, _) = needed(&["$.eventType"]);
        assert_eq!(some.parse(body).unwrap()["eventType"], Value::Null);
    }

    fn needed(paths: &[&str]) -> (Needed, Vec<IdPath>) {
        let paths: Vec<IdPath> = paths.iter().map(|p| IdPath::compile(p).unwrap()).collect();
        let mut n = Needed::nothing();
        for p in &paths {
            n.add(p.members());
        }
        (n, paths)
    }

    #[test]
    fn only_what_the_paths_reach_is_built() {
        let (n, _) = needed(&["$.payload.eventId", "$.eventType"]);
        let body = br#"{"namespace":"VOICE","eventType":"CALL_STATUS","payload":
            {"eventId":"e1","callId":"c1","nested":{"deep":[1,2,{"x":null}]}},"eventType":"LAST"}"#;
        let v = n.parse(body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"eventType": "LAST", "payload": {"eventId": "e1"}})
        );
        // A value that is not an object where members are asked for is kept as it is.
        let v = n
            .parse(br#"{"payload":[1,"a"],"eventType":{"a":1}}"#)
            .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"payload": [1, "a"], "eventType": {"a": 1}})
        );
        assert_eq!(n.parse(b"[1,2]").unwrap(), serde_json::json!([1, 2]));
        assert_eq!(n.parse(br#""text""#).unwrap(), serde_json::json!("text"));
    }

    #[test]
    fn every_byte_is_still_checked() {
        let (n, _) = needed(&["$.a"]);
        for bad in [
            &br#"{"a":1,"b":[1,2}"#[..],
            br#"{"a":1,"b":tru}"#,
            br#"{"a":1} trailing"#,
            br#"{"a":1,"b":"\x"}"#,
            b"",
            // In members no rule reads: not UTF-8, a lone surrogate, a number out of range.
            b"{\"a\":1,\"b\":\"\xff\"}",
            b"{\"a\":1,\"b\":{\"c\":[\"\xc3\"]}}",
            br#"{"a":1,"b":"\ud800"}"#,
            br#"{"a":1,"b":[1e400]}"#,
            b"{\"a\":1,\"\xff\":2}",
        ] {
            assert!(serde_json::from_slice::<Value>(bad).is_err());
            assert!(n.parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        // Escaped keys are compared by their text.
        let v = n.parse(br#"{"\u0061":5,"b":1}"#).unwrap();
        assert_eq!(v, serde_json::json!({"a": 5}));
    }

    #[test]
    fn a_path_that_is_not_plain_members_needs_everything() {
        let (n, _) = needed(&["$.a", "$..id"]);
        assert_eq!(n, Needed::All);
        let (n, _) = needed(&["$.a.b", "$.a"]);
        assert_eq!(
            n,
            Needed::Members(BTreeMap::from([("a".to_string(), Needed::All)]))
        );
    }

    /// On every sample payload, what the paths find in the kept part is what they find in
    /// the whole event.
    #[test]
    fn the_paths_find_the_same_in_the_kept_part() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/payloads");
        let sets: [&[&str]; 4] = [
            &["$.payload.eventId"],
            &["$.type", "$.schema", "$.data"],
            &[
                "$.eventType",
                "$.payload.callId",
                "$.payload.missing.deeper",
            ],
            &["$.namespace", "$.payload"],
        ];
        let mut seen = 0;
        for sub in ["8x8", "dids"] {
            for f in std::fs::read_dir(format!("{dir}/{sub}")).unwrap() {
                let body = std::fs::read(f.unwrap().path()).unwrap();
                let whole: Value = serde_json::from_slice(&body).unwrap();
                for set in sets {
                    let (n, paths) = needed(set);
                    let kept = n.parse(&body).unwrap();
                    for p in &paths {
                        let one = std::slice::from_ref(p);
                        assert_eq!(joined(one, &kept), joined(one, &whole), "{}", p.text);
                    }
                }
                seen += 1;
            }
        }
        assert!(seen >= 10, "{seen} sample payloads");
    }
}
