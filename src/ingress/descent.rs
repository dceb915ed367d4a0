//! A guard for JSONPaths that search descendants (`$..eventId`): jsonpath-rust writes the
//! whole path of every node it visits, so a hostile body (deep, with long keys, ending in
//! a large array) could make it write tens of gigabytes from one 1 MiB event; so could a
//! wildcard or a filter selector under a member with a long key (`$.*[*]`). For a source
//! whose rules use `..`, `*` or `?`, an event is refused (400) when those paths would exceed
//! [`PATH_BUDGET`] bytes; any ordinary event stays far below it.

use serde_json::Value;

use crate::web::response::ApiError;

/// The most bytes of node paths one descendant search of an event may write.
pub const PATH_BUDGET: u64 = 16 << 20;

/// `Err(400)` when a search of every descendant of `event` would write more than
/// [`PATH_BUDGET`] bytes of paths.
pub fn check(event: &Value) -> Result<(), ApiError> {
    let mut left = PATH_BUDGET;
    if fits(event, 1, &mut left) {
        Ok(())
    } else {
        Err(ApiError::bad_json(
            "the event is too deeply nested, with keys too long, for this source's JSONPaths",
        ))
    }
}

/// Takes from `left` the path of `v` (`path` bytes, as `$['a'][0]`) and those of its
/// descendants; false once it runs out. Recursion is bounded by the parser's depth limit.
fn fits(v: &Value, path: u64, left: &mut u64) -> bool {
    let Some(rest) = left.checked_sub(path) else {
        return false;
    };
    *left = rest;
    match v {
        Value::Array(items) => items.iter().enumerate().all(|(i, item)| {
            let index = i.checked_ilog10().unwrap_or(0) as u64 + 1;
            fits(item, path + index + 2, left)
        }),
        Value::Object(members) => members
            .iter()
            .all(|(k, item)| fits(item, path + k.len() as u64 + 4, left)),
        _ => true,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `depth` objects, each with one key of `key` bytes, around an array of `n` zeros.
    pub(crate) fn hostile(depth: usize, key: usize, n: usize) -> Value {
        let mut v = Value::Array(vec![Value::from(0); n]);
        for _ in 0..depth {
            let mut m = serde_json::Map::new();
            m.insert("k".repeat(key), v);
            v = Value::Object(m);
        }
        v
    }

    #[test]
    fn an_ordinary_event_passes_and_a_hostile_one_is_refused() {
        let voice: Value = serde_json::from_slice(include_bytes!(
            "../../examples/payloads/8x8/voice-call-status.json"
        ))
        .unwrap();
        assert!(check(&voice).is_ok());
        // ~600 KB of JSON; its search would write ~40 GB of paths.
        assert!(check(&hostile(100, 4000, 100_000)).is_err());
        // Deep but with short keys and a small array: fine.
        assert!(check(&hostile(100, 8, 100)).is_ok());
    }
}
