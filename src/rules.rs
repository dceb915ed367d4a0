//! The compiled rules of a route: `match` and `filter`.
//!
//! A [`Matcher`] compares one top-level field of the event with a string, a set of strings
//! or `"*"` (any present value). A number is compared by value (`"200"` matches `200.0`). A [`Filter`] is an RFC 9535 filter expression
//! compiled once as `$[?<expr>]` and run over a one-element array holding the event,
//! because a JSONPath filter selects children, not the node itself.

use std::fmt;

use jsonpath_rust::parser::model::{JpQuery, Segment, Selector};
use jsonpath_rust::parser::parse_json_path;
use jsonpath_rust::query::js_path_process;
use serde_json::Value;

/// What one `match` key accepts.
#[derive(Debug, Clone)]
pub enum Accept {
    Any,
    /// Small sets: a linear scan beats hashing for the 1–5 values routes carry.
    OneOf(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct Matcher {
    pub field: String,
    pub accept: Accept,
}

impl Matcher {
    pub fn new(field: String, values: Vec<String>) -> Self {
        let accept = if values.iter().any(|v| v == "*") {
            Accept::Any
        } else {
            Accept::OneOf(values)
        };
        Matcher { field, accept }
    }

    pub fn matches(&self, event: &Value) -> bool {
        let Some(v) = event.get(&self.field) else {
            return false;
        };
        match (&self.accept, v) {
            // "*": any present value, `null` too (the contract's words).
            (Accept::Any, _) => true,
            (_, Value::Null) => false,
            (Accept::OneOf(set), Value::String(s)) => set.iter().any(|x| x == s),
            (Accept::OneOf(set), Value::Number(n)) => {
                let text = n.to_string();
                set.contains(&text) || set.iter().any(|v| same_number(n, v))
            }
            (Accept::OneOf(set), Value::Bool(b)) => {
                let text = if *b { "true" } else { "false" };
                set.iter().any(|x| x == text)
            }
            _ => false,
        }
    }
}

/// Whether the number `n` is the value `text` writes, when not written the same: `200.0`
/// and `2e2` are 200. Two integers are compared exactly (ids past a double's 2^53 differ
/// by one); through a double only when either is not an integer.
fn same_number(n: &serde_json::Number, text: &str) -> bool {
    let int = n.as_i64().map(i128::from).or(n.as_u64().map(i128::from));
    match (int, text.parse::<i128>()) {
        (Some(a), Ok(b)) => a == b,
        _ => n
            .as_f64()
            .is_some_and(|x| text.parse::<f64>().is_ok_and(|y| y == x)),
    }
}

impl fmt::Display for Matcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.accept {
            Accept::Any => write!(f, "{}=*", self.field),
            Accept::OneOf(v) if v.len() == 1 => write!(f, "{}={}", self.field, v[0]),
            Accept::OneOf(v) => write!(f, "{}=[{}]", self.field, v.join("|")),
        }
    }
}

/// A compiled `filter` expression.
#[derive(Clone)]
pub struct Filter {
    pub text: String,
    query: JpQuery,
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Filter({:?})", self.text)
    }
}

impl Filter {
    pub fn compile(expr: &str) -> Result<Self, String> {
        let query = parse_json_path(&format!("$[?{expr}]")).map_err(|e| e.to_string())?;
        crate::event_id::searches_once(expr)?;
        // One filter selector and nothing else: `a == 1, 0` would add a selector that
        // takes every event, `a == 1].b[0` a segment.
        if !matches!(
            query.segments.as_slice(),
            [Segment::Selector(Selector::Filter(_))]
        ) {
            return Err("not one filter expression (a `,` or `]` outside quotes ends it)".into());
        }
        Ok(Filter {
            text: expr.to_string(),
            query,
        })
    }

    /// `wrapped` must be the one-element array holding the event.
    pub fn matches(&self, wrapped: &Value) -> bool {
        js_path_process(&self.query, wrapped)
            .map(|r| !r.is_empty())
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn matcher_string_list_star() {
        let ev = json!({"namespace":"VOICE","eventType":"CALL_STATUS","n":3,"z":null});
        assert!(Matcher::new("namespace".into(), vec!["VOICE".into()]).matches(&ev));
        assert!(!Matcher::new("namespace".into(), vec!["SMS".into()]).matches(&ev));
        assert!(
            Matcher::new("eventType".into(), vec!["X".into(), "CALL_STATUS".into()]).matches(&ev)
        );
        assert!(Matcher::new("eventType".into(), vec!["*".into()]).matches(&ev));
        assert!(!Matcher::new("missing".into(), vec!["*".into()]).matches(&ev));
        assert!(Matcher::new("z".into(), vec!["*".into()]).matches(&ev));
        assert!(!Matcher::new("z".into(), vec!["null".into()]).matches(&ev));
        assert!(Matcher::new("n".into(), vec!["3".into()]).matches(&ev));
        for written in ["200.0", "2e2", "200"] {
            let ev: Value = serde_json::from_str(&format!(r#"{{"sipCode":{written}}}"#)).unwrap();
            let m = |v: &str| Matcher::new("sipCode".into(), vec![v.into()]).matches(&ev);
            assert!(m("200") && m("200.0"), "{written}");
            assert!(!m("201") && !m("2000"), "{written}");
        }
        // Integers past a double's precision: exactly, not to the nearest double.
        let ev = json!({"tenantId": 9007199254740992u64, "big": 1200000000000000001u64, "neg": -9007199254740993i64});
        let m = |f: &str, v: &str| Matcher::new(f.into(), vec![v.into()]).matches(&ev);
        assert!(m("tenantId", "9007199254740992"));
        assert!(!m("tenantId", "9007199254740993"));
        assert!(m("big", "1200000000000000001"));
        assert!(!m("big", "1200000000000000000") && !m("big", "1200000000000000100"));
        assert!(m("neg", "-9007199254740993") && !m("neg", "-9007199254740992"));
    }

    #[test]
    fn filter_sees_the_event_itself() {
        let f = Filter::compile("@.payload.callDirection == 'INBOUND' && @.payload.sipCode >= 400")
            .unwrap();
        let yes = json!([{"payload":{"callDirection":"INBOUND","sipCode":486}}]);
        let no = json!([{"payload":{"callDirection":"INBOUND","sipCode":200}}]);
        assert!(f.matches(&yes));
        assert!(!f.matches(&no));
        assert!(Filter::compile("@.a ==").is_err());
    }

    #[test]
    fn a_filter_is_one_filter_expression() {
        // Each would take events the expression before it does not.
        for bad in ["@.a == 1, 0", "@.a == 1, *", "@.a == 1].b[0", "@.a == 1][0"] {
            assert!(Filter::compile(bad).is_err(), "{bad}");
        }
        // A comma or bracket inside quotes is the expression's own.
        let f = Filter::compile("@.a == 'x, 0' || @.b == ']'").unwrap();
        assert!(f.matches(&json!([{"a":"x, 0"}])));
        assert!(f.matches(&json!([{"b":"]"}])));
        assert!(!f.matches(&json!([{"a":2}])));
    }
}
