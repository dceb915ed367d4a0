//! `hookrelay check`: every rejection the contract lists names the key at fault.

mod common;

use std::path::Path;
use std::process::Command;

const BASE: &str = r#"
[server]
token_secret = "t"

[[sources]]
name = "voice"
path = "/8x8/voice"
event_id = ["$.payload.eventId"]

[[destinations]]
name = "calls"
url = "http://127.0.0.1:8001/hooks"

[[destinations]]
name = "ivr"
url = "http://127.0.0.1:8003/ivr"

[[routes]]
name = "r1"
source = "voice"
match = { eventType = "CALL_STATUS" }
to = ["calls"]
"#;

/// Parses `text` and returns every problem as `file:line:col: key: reason` lines.
fn problems(text: &str) -> Vec<String> {
    match hookrelay::config::parse(text, Path::new("routes.toml"), &|_| None) {
        Ok(_) => vec![],
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

/// Asserts exactly one problem, at `key`, mentioning `why`; returns it.
fn rejects(text: &str, key: &str, why: &str) -> String {
    let p = problems(text);
    assert_eq!(p.len(), 1, "{p:#?}");
    let line = &p[0];
    assert!(line.starts_with("routes.toml:"), "{line}");
    assert!(
        line.contains(&format!(": {key}: ")),
        "expected key {key} in {line}"
    );
    assert!(line.contains(why), "expected {why:?} in {line}");
    line.clone()
}

#[test]
fn base_is_valid() {
    assert!(problems(BASE).is_empty());
}

#[test]
fn shipped_routes_toml_is_valid() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("routes.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    let c = hookrelay::config::parse(&text, &file, &|_| None).unwrap();
    assert!(c.sources.len() >= 4);
}

#[test]
fn duplicate_source_name() {
    let t = format!("{BASE}\n[[sources]]\nname = \"voice\"\npath = \"/other\"\n");
    rejects(&t, "sources[1].name", "duplicate source name");
}

#[test]
fn duplicate_destination_name() {
    let t = format!("{BASE}\n[[destinations]]\nname = \"calls\"\nurl = \"http://x/\"\n");
    rejects(&t, "destinations[2].name", "duplicate destination name");
}

#[test]
fn duplicate_route_name() {
    let t = format!("{BASE}\n[[routes]]\nname = \"r1\"\nsource = \"voice\"\nto = [\"calls\"]\n");
    rejects(&t, "routes[1].name", "duplicate route name");
}

#[test]
fn duplicate_path() {
    let t = format!("{BASE}\n[[sources]]\nname = \"v2\"\npath = \"/8x8/voice\"\n");
    rejects(&t, "sources[1].path", "duplicate path");
}

#[test]
fn unknown_source() {
    let t = format!("{BASE}\n[[routes]]\nname = \"r2\"\nsource = \"nope\"\nto = [\"calls\"]\n");
    rejects(&t, "routes[1].source", "unknown source \"nope\"");
}

#[test]
fn unknown_destination() {
    let t = format!("{BASE}\n[[routes]]\nname = \"r2\"\nsource = \"voice\"\nto = [\"billing\"]\n");
    let line = rejects(&t, "routes[1].to[0]", "unknown destination \"billing\"");
    assert!(line.contains("known: calls, ivr"), "{line}");
}

#[test]
fn invalid_cidr() {
    let t = BASE.replace(
        "path = \"/8x8/voice\"",
        "path = \"/8x8/voice\"\nallow_ips = [\"10.0.0.0/33\"]",
    );
    rejects(&t, "sources[0].allow_ips[0]", "invalid CIDR");
}

#[test]
fn invalid_url() {
    let t = BASE.replace("http://127.0.0.1:8001/hooks", "ftp://calls");
    rejects(&t, "destinations[0].url", "invalid URL");
}

#[test]
fn invalid_duration() {
    let t = format!("{BASE}\n[dedup]\nwindow = \"24 parsecs\"\n");
    rejects(&t, "dedup.window", "invalid duration");
}

#[test]
fn invalid_event_id_jsonpath() {
    let t = BASE.replace("$.payload.eventId", "$.payload[");
    rejects(&t, "sources[0].event_id[0]", "invalid JSONPath");
}

#[test]
fn invalid_filter() {
    let t = BASE.replace(
        "to = [\"calls\"]",
        "filter = \"@.payload.sipCode >=\"\nto = [\"calls\"]",
    );
    rejects(&t, "routes[0].filter", "invalid filter expression");
}

#[test]
fn reply_from_not_in_to() {
    let t = BASE.replace(
        "to = [\"calls\"]",
        "to = [\"calls\"]\nreply = { from = \"ivr\" }",
    );
    rejects(
        &t,
        "routes[0].reply.from",
        "must also be listed in routes[0].to",
    );
}

#[test]
fn token_secret_missing_with_oauth2_source() {
    let t = BASE.replace("token_secret = \"t\"", "").replace(
        "event_id = [\"$.payload.eventId\"]",
        "auth = { kind = \"oauth2\", clients = [{ id = \"a\", secret = \"b\" }] }",
    );
    rejects(
        &t,
        "server.token_secret",
        "required because a source uses oauth2",
    );
}

#[test]
fn unknown_key_is_an_error() {
    let t = BASE.replace("name = \"calls\"", "name = \"calls\"\nurll = \"x\"");
    let line = rejects(&t, "destinations[0].urll", "unknown field `urll`");
    assert!(line.starts_with("routes.toml:12:1:"), "{line}");
}

#[test]
fn unset_variable_is_named() {
    let t = BASE.replace(
        "token_secret = \"t\"",
        "token_secret = \"${NOT_SET_ANYWHERE}\"",
    );
    rejects(
        &t,
        "server.token_secret",
        "environment variable NOT_SET_ANYWHERE is not set",
    );
}

#[test]
fn every_problem_is_listed_at_once() {
    let t = BASE
        .replace("http://127.0.0.1:8001/hooks", "not a url")
        .replace("$.payload.eventId", "$$")
        .replace("source = \"voice\"", "source = \"nope\"");
    assert_eq!(problems(&t).len(), 3, "{:#?}", problems(&t));
}

#[test]
fn the_binary_exits_1_with_every_problem_and_0_when_valid() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("routes.toml");
    std::fs::write(
        &bad,
        BASE.replace("source = \"voice\"", "source = \"nope\"")
            .replace("ftp", "")
            .replace("http://127.0.0.1:8003/ivr", "ivr"),
    )
    .unwrap();
    let out = Command::new(common::bin())
        .arg("check")
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.contains("routes[0].source"), "{text}");
    assert!(text.contains("destinations[1].url"), "{text}");

    std::fs::write(&bad, BASE).unwrap();
    let out = Command::new(common::bin())
        .arg("check")
        .env("HOOKRELAY_CONFIG", &bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("route r1: eventType=CALL_STATUS -> calls"),
        "{text}"
    );
}

#[test]
fn a_burst_beyond_u32_is_refused_not_wrapped() {
    let text = BASE.replace(
        "url = \"http://127.0.0.1:8001/hooks\"",
        "url = \"http://127.0.0.1:8001/hooks\"\nrate = { per_second = 10, burst = 5000000000 }",
    );
    rejects(&text, "destinations[0].rate.burst", "at most 4294967295");
}

#[test]
fn jetstream_is_refused_naming_the_backends_there_are() {
    let text = format!("{BASE}\n[store]\nbackend = \"jetstream\"\n");
    rejects(&text, "store.backend", "use \"sled\" or \"redb\"");
}

#[test]
fn a_missing_field_names_the_table_it_is_missing_from() {
    let text = BASE.replace("name = \"ivr\"\n", "");
    rejects(&text, "destinations[1]", "missing field `name`");
}
