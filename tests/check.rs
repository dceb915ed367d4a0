//! `hookrelay check`: every rejection the contract lists names the key at fault.

mod support;

use std::path::Path;
use std::process::Command;

const BASE: &str = r#"
[server]
token_secret = "tok-secret-for-tests-0123456789abcdef"

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
    problems_with(text, &|_| None)
}

/// [`problems`] with the environment variables `env` gives.
fn problems_with(text: &str, env: &dyn Fn(&str) -> Option<String>) -> Vec<String> {
    match hookrelay::config::parse(text, Path::new("routes.toml"), env) {
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
fn a_port_that_is_no_number_is_an_invalid_url() {
    // `http::Uri` takes these, with no port: sent to port 80, not where they meant.
    for url in [
        "http://127.0.0.1:80800/hooks",
        "http://calls:8o80/hooks",
        "http://[::1]:99999/",
    ] {
        let t = BASE.replace("http://127.0.0.1:8001/hooks", url);
        rejects(&t, "destinations[0].url", "invalid URL");
    }
    for url in [
        "http://[::1]:8080/",
        "https://user:pw@calls/x",
        "http://calls:65535/",
        "http://calls:/x",
    ] {
        let t = BASE.replace("http://127.0.0.1:8001/hooks", url);
        assert!(problems(&t).is_empty(), "{url}: {:#?}", problems(&t));
    }
}

#[test]
fn durations_and_rates_past_a_century_are_refused() {
    let t = format!("{BASE}\n[delivery]\nretry = {{ give_up_after = \"101y\" }}\n");
    rejects(&t, "delivery.retry.give_up_after", "longer than the most");
    let t = BASE.replace(
        "url = \"http://127.0.0.1:8001/hooks\"",
        "url = \"http://127.0.0.1:8001/hooks\"\nrate = { per_second = 1e-11 }",
    );
    rejects(&t, "destinations[0].rate.per_second", "per 100 years");
    let t = format!("{BASE}\n[delivery]\nretry = {{ give_up_after = \"100y\" }}\n");
    assert!(problems(&t).is_empty(), "{:#?}", problems(&t));
}

/// Counts held at once are counted by semaphores: a count past what one holds (which
/// panicked at start) is refused by `check`.
#[test]
fn connections_and_requests_at_once_have_a_ceiling() {
    let many = "3000000000000000000";
    let t = BASE.replace(
        "token_secret = \"tok-secret-for-tests-0123456789abcdef\"",
        &format!(
            "token_secret = \"tok-secret-for-tests-0123456789abcdef\"\nmax_connections = {many}"
        ),
    );
    rejects(&t, "server.max_connections", "at most 1000000");
    let t = BASE.replace(
        "url = \"http://127.0.0.1:8003/ivr\"",
        &format!("url = \"http://127.0.0.1:8003/ivr\"\nmax_in_flight = {many}"),
    );
    rejects(&t, "destinations[1].max_in_flight", "at most 1000000");
    let t = format!("{BASE}\n[delivery]\nmax_in_flight = {many}\n");
    rejects(&t, "delivery.max_in_flight", "at most 1000000");
    let t = BASE.replace(
        "token_secret = \"tok-secret-for-tests-0123456789abcdef\"",
        "token_secret = \"tok-secret-for-tests-0123456789abcdef\"\nmax_connections = 1000000",
    );
    assert!(problems(&t).is_empty());
}

#[test]
fn a_fallback_content_type_a_header_cannot_carry_is_refused() {
    let t = BASE.replace(
        "to = [\"calls\"]\n",
        "to = [\"calls\", \"ivr\"]\nreply = { from = \"ivr\", fallback = { content_type = \"text/plain\\u0000\" } }\n",
    );
    rejects(&t, "routes[0].reply.fallback.content_type", "Content-Type");
}

#[test]
fn a_dedup_window_shorter_than_a_signatures_life_is_refused() {
    // Accepted for 5 minutes either side of its timestamp, a signed message must be
    // remembered for 10, or a copy of it is a new event.
    let signed = BASE.replace(
        "event_id = [\"$.payload.eventId\"]\n",
        "event_id = [\"$.payload.eventId\"]\nauth = { kind = \"standard-webhooks\", secret = \"whsec_c2VjcmV0\", tolerance = \"5m\" }\n",
    );
    assert!(problems(&signed).is_empty(), "{:#?}", problems(&signed));
    let short = format!("{signed}\n[dedup]\nwindow = \"9m\"\n");
    let line = rejects(&short, "sources[0].auth.tolerance", "dedup.window");
    assert!(line.contains("at least 10m"), "{line}");
    assert!(problems(&format!("{signed}\n[dedup]\nwindow = \"10m\"\n")).is_empty());
}

#[test]
fn a_path_searching_descendants_twice_is_refused() {
    let t = BASE.replace("[\"$.payload.eventId\"]", "[\"$..a..b\"]");
    assert_ne!(t, BASE);
    rejects(&t, "sources[0].event_id[0]", "within a search");
}

/// A network with bits set past its prefix is most likely a typo for one address: refused,
/// not widened to the whole network.
#[test]
fn a_network_with_host_bits_is_refused_not_widened() {
    let t = BASE.replace(
        "path = \"/8x8/voice\"",
        "path = \"/8x8/voice\"\nallow_ips = [\"10.1.2.3/8\"]",
    );
    let line = rejects(&t, "sources[0].allow_ips[0]", "bits set past its /8 prefix");
    assert!(
        line.contains("10.0.0.0/8") && line.contains("10.1.2.3/32"),
        "{line}"
    );
    let proxies = BASE.replace(
        "token_secret = \"tok-secret-for-tests-0123456789abcdef\"",
        "token_secret = \"tok-secret-for-tests-0123456789abcdef\"\ntrusted_proxies = [\"::ffff:10.0.0.5/100\"]",
    );
    rejects(
        &proxies,
        "server.trusted_proxies[0]",
        "(read as 10.0.0.5/4) has bits set past its /4 prefix",
    );
}

/// Values that would pass and misbehave: a store path that puts its files beside the
/// config, a body limit no read could reach beside another, a retry limit of no time at all.
#[test]
fn an_empty_store_path_a_body_past_the_memory_budget_and_no_time_to_retry_are_refused() {
    let path = format!("{BASE}\n[store]\npath = \"\"\n");
    rejects(&path, "store.path", "is empty");
    let body = BASE.replace("[server]\n", "[server]\nmax_body_bytes = 67108865\n");
    rejects(&body, "server.max_body_bytes", "must be at most 67108864");
    let most = BASE.replace("[server]\n", "[server]\nmax_body_bytes = 67108864\n");
    assert_eq!(problems(&most), Vec::<String>::new());
    let retry = format!("{BASE}\n[delivery]\nretry = {{ give_up_after = \"0s\" }}\n");
    rejects(
        &retry,
        "delivery.retry.give_up_after",
        "must be more than 0 (for no retries, set max_attempts = 1)",
    );
}

/// A wrong shape is said in the file's words, and a value written where a secret goes is
/// not quoted back, whatever its type.
#[test]
fn a_number_in_match_and_a_secret_of_the_wrong_type_are_said_plainly() {
    let t = BASE.replace(
        "match = { eventType = \"CALL_STATUS\" }",
        "match = { sipCode = 404 }",
    );
    rejects(
        &t,
        "routes[0].match",
        "must be a string or a list of strings",
    );
    let t = BASE.replace(
        "url = \"http://127.0.0.1:8001/hooks\"\n",
        "url = \"http://127.0.0.1:8001/hooks\"\nsign = { secret = 12345678 }\n",
    );
    let line = rejects(
        &t,
        "destinations[0].sign",
        "invalid type: integer, expected",
    );
    assert!(!line.contains("12345678"), "{line}");
    let t = BASE.replace(
        "path = \"/8x8/voice\"",
        "path = \"/8x8/voice\"\nauth = \"k-0123\"",
    );
    let line = rejects(&t, "sources[0].auth", "a table such as { kind =");
    assert!(!line.contains("k-0123"), "{line}");
}

/// A problem inside a value written over several lines, or inside a sub-table of an array
/// table's element, names the key it belongs to.
#[test]
fn a_problem_in_a_multi_line_value_or_an_elements_sub_table_names_its_key() {
    let t = BASE.replace("to = [\"calls\"]", "to = [\n  \"calls\",\n  5,\n]");
    rejects(&t, "routes[0].to", "invalid type: integer");
    let t = BASE.replace(
        "url = \"http://127.0.0.1:8003/ivr\"\n",
        "url = \"http://127.0.0.1:8003/ivr\"\n[destinations.retry]\nfrist = \"1s\"\n",
    );
    rejects(&t, "destinations[1].retry.frist", "unknown field `frist`");
}

/// `${VAR:-default}` takes the default for an empty variable too, as a shell does.
#[test]
fn a_default_stands_in_for_an_empty_variable() {
    let t = BASE.replace(
        "[server]\n",
        "[server]\nlisten = \"${LISTEN:-127.0.0.1:8085}\"\n",
    );
    let env = |k: &str| (k == "LISTEN").then(String::new);
    let c = hookrelay::config::parse(&t, Path::new("routes.toml"), &env).unwrap();
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:8085");
}

#[test]
fn invalid_duration() {
    let t = format!("{BASE}\n[dedup]\nwindow = \"24 parsecs\"\n");
    rejects(&t, "dedup.window", "invalid duration");
}

#[test]
fn a_zero_timeout_or_lifetime_is_an_error() {
    let server = BASE.replace("[server]\n", "[server]\nread_timeout = \"0s\"\n");
    rejects(&server, "server.read_timeout", "must be more than 0");
    let dest = BASE.replace(
        "url = \"http://127.0.0.1:8001/hooks\"\n",
        "url = \"http://127.0.0.1:8001/hooks\"\ntimeout = \"0ms\"\n",
    );
    rejects(&dest, "destinations[0].timeout", "must be more than 0");
    let ttl = format!(
        "{BASE}\n[[sources]]\nname = \"sms\"\npath = \"/sms\"\n\
         auth = {{ kind = \"oauth2\", clients = [{{ id = \"c\", secret = \"s\" }}], token_ttl = \"0s\" }}\n"
    );
    rejects(&ttl, "sources[1].auth.token_ttl", "must be more than 0");
}

#[test]
fn invalid_event_id_jsonpath() {
    let t = BASE.replace("$.payload.eventId", "$.payload[");
    rejects(&t, "sources[0].event_id[0]", "invalid JSONPath");
}

#[test]
fn a_jsonpath_as_a_decode_json_field() {
    let t = BASE.replace(
        "event_id = [\"$.payload.eventId\"]",
        "event_id = [\"$.payload.eventId\"]\ndecode_json = [\"data\", \"$.data\"]",
    );
    rejects(
        &t,
        "sources[0].decode_json[1]",
        "not a top-level field name",
    );
}

#[test]
fn a_jsonpath_as_a_match_key() {
    let t = BASE.replace(
        "match = { eventType = \"CALL_STATUS\" }",
        "match = { \"$.payload.callDirection\" = \"INBOUND\" }",
    );
    rejects(
        &t,
        "routes[0].match.$.payload.callDirection",
        "not a top-level field name",
    );
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
    let t = BASE
        .replace(
            "token_secret = \"tok-secret-for-tests-0123456789abcdef\"",
            "",
        )
        .replace(
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
fn an_empty_signing_key_is_refused() {
    // `whsec_` and nothing (an unset variable after it, say) would be a key anybody has.
    let t = BASE.replace(
        "url = \"http://127.0.0.1:8001/hooks\"",
        "url = \"http://127.0.0.1:8001/hooks\"\nsign = { secret = \"whsec_\" }",
    );
    rejects(
        &t,
        "destinations[0].sign.secret",
        "the secret is empty after whsec_",
    );
    let t = BASE.replace(
        "event_id = [\"$.payload.eventId\"]",
        "auth = { kind = \"standard-webhooks\", secret = \"whsec_\" }",
    );
    rejects(
        &t,
        "sources[0].auth.secret",
        "the secret is empty after whsec_",
    );
}

#[test]
fn unknown_key_is_an_error() {
    let t = BASE.replace("name = \"calls\"", "name = \"calls\"\nurll = \"x\"");
    let line = rejects(&t, "destinations[0].urll", "unknown field `urll`");
    assert!(line.starts_with("routes.toml:12:1:"), "{line}");
}

#[test]
fn an_unknown_key_inside_an_inline_table_is_an_error() {
    let t = BASE.replace(
        "event_id = [\"$.payload.eventId\"]",
        "event_id = [\"$.payload.eventId\"]\nauth = { kind = \"header\", header = \"X-Key\", value = \"k\", vaule = \"k\" }",
    );
    rejects(&t, "sources[0].auth", "unknown field `vaule`");
}

#[test]
fn ipv4_mapped_networks_are_read_as_ipv4() {
    let t = BASE
        .replace(
            "token_secret = \"tok-secret-for-tests-0123456789abcdef\"",
            "token_secret = \"tok-secret-for-tests-0123456789abcdef\"\ntrusted_proxies = [\"::ffff:10.0.0.5\"]",
        )
        .replace(
            "event_id = [\"$.payload.eventId\"]",
            "event_id = [\"$.payload.eventId\"]\nallow_ips = [\"::ffff:203.0.113.0/120\", \"2001:db8::/32\"]",
        );
    let c = hookrelay::config::parse(&t, Path::new("routes.toml"), &|_| None).unwrap();
    let shown = |n: &[ipnet::IpNet]| n.iter().map(ToString::to_string).collect::<Vec<_>>();
    assert_eq!(shown(&c.server.trusted_proxies), ["10.0.0.5/32"]);
    assert_eq!(
        shown(&c.sources[0].allow_ips),
        ["203.0.113.0/24", "2001:db8::/32"]
    );
}

#[test]
fn unset_variable_is_named() {
    let t = BASE.replace(
        "token_secret = \"tok-secret-for-tests-0123456789abcdef\"",
        "token_secret = \"${NOT_SET_ANYWHERE}\"",
    );
    rejects(
        &t,
        "server.token_secret",
        "environment variable NOT_SET_ANYWHERE is not set",
    );
}

/// A value that could not be read (its variable unset or empty) is one problem, not that
/// one and another about the empty value it left.
#[test]
fn a_variable_that_is_not_set_is_one_problem_not_two() {
    let path = BASE.replace("path = \"/8x8/voice\"", "path = \"${VOICE_PATH}\"");
    rejects(&path, "sources[0].path", "VOICE_PATH is not set");
    let source = BASE.replace("source = \"voice\"", "source = \"${SOURCE}\"");
    rejects(&source, "routes[0].source", "SOURCE is not set");
    let secret = format!(
        "{}\n[[sources]]\nname = \"sms\"\npath = \"/sms\"\n\
         auth = {{ kind = \"oauth2\", clients = [{{ id = \"c\", secret = \"s\" }}] }}\n",
        BASE.replace(
            "token_secret = \"tok-secret-for-tests-0123456789abcdef\"",
            "token_secret = \"${TOKEN_SECRET}\""
        )
    );
    let empty = |k: &str| (k == "TOKEN_SECRET").then(String::new);
    let p = problems_with(&secret, &empty);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(p[0].contains("server.token_secret: "), "{p:#?}");
}

/// A `token_secret` shorter than 32 bytes is refused, not quoted, whether written or read
/// from the environment: one token is enough to find a short key by trying keys.
#[test]
fn a_short_token_secret_is_refused_without_quoting_it() {
    let short = BASE.replace(
        "token_secret = \"tok-secret-for-tests-0123456789abcdef\"",
        "token_secret = \"short-secret-xyz\"",
    );
    let line = rejects(&short, "server.token_secret", "is 16 bytes");
    assert!(line.contains("32 random bytes or more"), "{line}");
    assert!(!line.contains("short-secret-xyz"), "{line}");
    let from_env = BASE.replace(
        "token_secret = \"tok-secret-for-tests-0123456789abcdef\"",
        "token_secret = \"${TOKEN_SECRET}\"",
    );
    let env = |k: &str| (k == "TOKEN_SECRET").then(|| "a".repeat(31));
    let p = problems_with(&from_env, &env);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(p[0].contains("server.token_secret: is 31 bytes"), "{p:#?}");
    assert!(!p[0].contains(&"a".repeat(31)), "{p:#?}");
    let env = |k: &str| (k == "TOKEN_SECRET").then(|| "a".repeat(32));
    assert_eq!(problems_with(&from_env, &env), Vec::<String>::new());
}

/// A header made of a variable that holds nothing is refused; one written empty on purpose
/// (`${KEY:-}`) is not.
#[test]
fn a_header_made_of_an_empty_variable_is_refused() {
    let t = BASE.replace(
        "url = \"http://127.0.0.1:8001/hooks\"\n",
        "url = \"http://127.0.0.1:8001/hooks\"\nheaders = { \"X-Api-Key\" = \"${CALLS_KEY}\" }\n",
    );
    let empty = |k: &str| (k == "CALLS_KEY").then(String::new);
    let p = problems_with(&t, &empty);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(
        p[0].contains("destinations[0].headers.X-Api-Key: is empty"),
        "{p:#?}"
    );
    let on_purpose = t.replace("${CALLS_KEY}", "${CALLS_KEY:-}");
    assert_eq!(problems_with(&on_purpose, &empty), Vec::<String>::new());
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
fn unknown_keys_and_wrong_types_are_each_listed_with_the_rest() {
    let t = BASE
        .replace("[[sources]]\n", "[[sources]]\ncolour = \"blue\"\n")
        .replacen(
            "[[destinations]]\n",
            "[[destinations]]\nmax_in_flight = \"many\"\ntimeot = \"5s\"\n",
            1,
        )
        .replace("http://127.0.0.1:8001/hooks", "not a url");
    let p = problems(&t);
    let has = |key: &str, why: &str| {
        p.iter()
            .any(|l| l.contains(&format!(": {key}: ")) && l.contains(why))
    };
    assert!(has("sources[0].colour", "unknown field `colour`"), "{p:#?}");
    assert!(
        has("destinations[0].max_in_flight", "invalid type"),
        "{p:#?}"
    );
    assert!(
        has("destinations[0].timeot", "unknown field `timeot`"),
        "{p:#?}"
    );
    assert!(has("destinations[0].url", "invalid URL"), "{p:#?}");
    assert_eq!(p.len(), 4, "{p:#?}");
    // In the order of the file, each where it is.
    let lines: Vec<usize> = p
        .iter()
        .map(|l| l.split(':').nth(1).unwrap().parse().unwrap())
        .collect();
    assert!(lines.windows(2).all(|w| w[0] <= w[1]), "{p:#?}");
    // A syntax error is the one problem listed: the file cannot be read past it.
    let broken = t.replace("[[routes]]", "[[routes]");
    let p = problems(&broken);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(p[0].contains("unclosed array table"), "{p:#?}");
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
    let out = Command::new(support::bin())
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
    let out = Command::new(support::bin())
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

    // A log filter that does not parse is said, not silently replaced.
    let out = Command::new(support::bin())
        .arg("check")
        .env("HOOKRELAY_CONFIG", &bad)
        .env("HOOKRELAY_LOG", "hookrelay=dbug")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("HOOKRELAY_LOG=\"hookrelay=dbug\" is not a valid filter"),
        "{err}"
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
fn jetstream_needs_a_url_and_its_keys_need_jetstream() {
    let text = format!("{BASE}\n[store]\nbackend = \"jetstream\"\n");
    rejects(&text, "store.url", "required with backend = \"jetstream\"");
    let text = format!("{BASE}\n[store]\nbackend = \"redb\"\nprefix = \"x\"\n");
    rejects(
        &text,
        "store.prefix",
        "allowed only with backend = \"jetstream\"",
    );
    let text = format!(
        "{BASE}\n[store]\nbackend = \"jetstream\"\nurl = [\"nats://127.0.0.1:4222\", \"http://x\"]\n"
    );
    rejects(&text, "store.url[1]", "not a NATS server address");
    let text = format!(
        "{BASE}\n[store]\nbackend = \"jetstream\"\nurl = \"nats://127.0.0.1:4222\"\nreplicas = 7\n"
    );
    rejects(&text, "store.replicas", "must be 1 to 5");
    let text = format!(
        "{BASE}\n[store]\nbackend = \"jetstream\"\nurl = \"nats://127.0.0.1:4222\"\nprefix = \"a.b\"\n"
    );
    rejects(&text, "store.prefix", "letters, digits");
}

#[test]
fn a_missing_field_names_the_table_it_is_missing_from() {
    let text = BASE.replace("name = \"ivr\"\n", "");
    rejects(&text, "destinations[1]", "missing field `name`");
}

#[test]
fn an_admin_listener_other_hosts_reach_needs_a_token() {
    let open = BASE.replace(
        "token_secret = \"tok-secret-for-tests-0123456789abcdef\"\n",
        "token_secret = \"tok-secret-for-tests-0123456789abcdef\"\nadmin_listen = \"0.0.0.0:9090\"\n",
    );
    rejects(&open, "server.admin_listen", "set server.admin_token");
    let empty = BASE.replace(
        "token_secret = \"tok-secret-for-tests-0123456789abcdef\"\n",
        "token_secret = \"tok-secret-for-tests-0123456789abcdef\"\nadmin_listen = \"0.0.0.0:9090\"\nadmin_token = \"\"\n",
    );
    rejects(&empty, "server.admin_listen", "set server.admin_token");
    let guarded = BASE.replace(
        "token_secret = \"tok-secret-for-tests-0123456789abcdef\"\n",
        "token_secret = \"tok-secret-for-tests-0123456789abcdef\"\nadmin_listen = \"0.0.0.0:9090\"\nadmin_token = \"s3cret\"\n",
    );
    assert!(problems(&guarded).is_empty(), "{:#?}", problems(&guarded));
}

#[test]
fn the_store_is_redb_unless_told_otherwise() {
    let c = hookrelay::config::parse(BASE, Path::new("routes.toml"), &|_| None).unwrap();
    assert_eq!(c.store.backend, hookrelay::config::Backend::Redb);
    let sled = format!("{BASE}\n[store]\nbackend = \"sled\"\n");
    let c = hookrelay::config::parse(&sled, Path::new("routes.toml"), &|_| None).unwrap();
    assert_eq!(c.store.backend, hookrelay::config::Backend::Sled);
}

/// Names, `to`, `match` keys and values, route sources and header names expand `${VAR}`
/// like every other string; an unset one is an error at its key, never a literal `${...}`.
#[test]
fn every_string_expands_variables() {
    let text = r#"
[[sources]]
name = "${SRC}"
path = "/in"

[[destinations]]
name = "${DEST}"
url = "http://127.0.0.1:8001/"
headers = { "${HEADER}" = "v" }

[[routes]]
name = "${ROUTE}"
source = "${SRC}"
match = { "${FIELD}" = ["${VALUE}", "fixed"] }
to = ["${DEST}"]
"#;
    let env = |k: &str| {
        Some(
            match k {
                "SRC" => "voice",
                "DEST" => "calls",
                "HEADER" => "x-team",
                "ROUTE" => "r",
                "FIELD" => "eventType",
                "VALUE" => "CALL_STATUS",
                _ => return None,
            }
            .to_string(),
        )
    };
    let c = hookrelay::config::parse(text, Path::new("routes.toml"), &env).unwrap();
    assert_eq!(c.sources[0].name, "voice");
    assert_eq!(c.destinations[0].name, "calls");
    assert_eq!(c.destinations[0].headers[0].0.as_str(), "x-team");
    assert_eq!(c.routes[0].name, "r");
    assert_eq!(
        c.routes[0].matchers[0].to_string(),
        "eventType=[CALL_STATUS|fixed]"
    );
    // The routing table shows names filled in, and match values as the file writes them
    // (a variable there may hold a secret).
    let table = hookrelay::config::routing_table(&c);
    assert!(
        table.contains("route r: ${FIELD}=[${VALUE}|fixed] -> calls"),
        "{table}"
    );
    assert!(table.contains("source voice  POST /in"), "{table}");

    let only_src = |k: &str| (k == "SRC").then(|| "voice".to_string());
    let p: Vec<String> = match hookrelay::config::parse(text, Path::new("routes.toml"), &only_src) {
        Ok(_) => panic!("unset variables must be refused"),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    };
    for key in [
        "destinations[0].name",
        "routes[0].name",
        "routes[0].match.${FIELD}",
        "routes[0].to[0]",
    ] {
        assert!(
            p.iter()
                .any(|l| l.contains(&format!(": {key}: ")) && l.contains("is not set")),
            "{key} in {p:#?}"
        );
    }
}

#[test]
fn order_by_and_breaker_are_checked() {
    let bad_path = BASE.replace("to = [\"calls\"]", "to = [\"calls\"]\norder_by = [\"$$\"]");
    rejects(&bad_path, "routes[0].order_by[0]", "invalid JSONPath");
    let bad_failures = BASE.replace(
        "url = \"http://127.0.0.1:8001/hooks\"",
        "url = \"http://127.0.0.1:8001/hooks\"\nbreaker = { failures = -1 }",
    );
    rejects(
        &bad_failures,
        "destinations[0].breaker.failures",
        "whole number",
    );
    let bad_cool =
        format!("{BASE}\n[delivery]\nbreaker = {{ failures = 3, cool_down = \"0s\" }}\n");
    rejects(&bad_cool, "delivery.breaker.cool_down", "greater than 0");
    let good = BASE.replace(
        "to = [\"calls\"]",
        "to = [\"calls\"]\norder_by = [\"$.payload.callId\"]",
    );
    let c = hookrelay::config::parse(&good, Path::new("routes.toml"), &|_| None).unwrap();
    assert_eq!(c.routes[0].order_by.len(), 1);
    assert_eq!(c.destinations[0].breaker.failures, 0, "off unless set");
}

#[test]
fn a_published_default_secret_is_refused_once_the_ingress_is_public() {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/routes.toml")).unwrap();
    let file = Path::new("routes.toml");
    let public = |k: &str| match k {
        "HOOKRELAY_LISTEN" => Some("0.0.0.0:8080".to_string()),
        _ => None,
    };
    let err = hookrelay::config::parse(&shipped, file, &public)
        .unwrap_err()
        .to_string();
    // Every secret of the shipped file that fell back to its default, each by its key.
    for (key, var) in [
        ("server.token_secret", "HOOKRELAY_TOKEN_SECRET"),
        ("sources[0].auth.value", "VOICE_AUTH"),
        ("SMS_CLIENT_SECRET", "SMS_CLIENT_SECRET"),
        ("DIDS_SIGNING_SECRET", "DIDS_SIGNING_SECRET"),
        ("sign.secret", "CALLS_SIGNING_SECRET"),
    ] {
        assert!(
            err.lines()
                .any(|l| l.contains(key) && l.contains(&format!("set {var}"))),
            "{key} / {var} not named in:\n{err}"
        );
    }
    assert!(
        err.contains("0.0.0.0:8080 is reachable from other hosts"),
        "{err}"
    );
    assert!(
        !err.contains("dev-token-secret"),
        "a secret was shown:\n{err}"
    );
    // On a loopback address the defaults serve for trying it; set, they are not defaults.
    assert!(hookrelay::config::parse(&shipped, file, &|_| None).is_ok());
    let everything_set = |k: &str| match k {
        "HOOKRELAY_LISTEN" => Some("0.0.0.0:8080".to_string()),
        "DIDS_SIGNING_SECRET" | "CALLS_SIGNING_SECRET" => {
            Some("whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ=".to_string())
        }
        "HOOKRELAY_ADMIN_LISTEN" | "HOOKRELAY_DATA" | "HOOKRELAY_ADMIN_TOKEN" => None,
        _ => Some("set-by-the-operator-of-this-relay".to_string()),
    };
    if let Err(e) = hookrelay::config::parse(&shipped, file, &everything_set) {
        panic!("{e}");
    }
    // The admin token likewise, once the admin API is reachable from others.
    let admin = shipped.replace(
        "${HOOKRELAY_ADMIN_TOKEN:-}",
        "${HOOKRELAY_ADMIN_TOKEN:-letmein}",
    );
    assert!(hookrelay::config::parse(&admin, file, &|_| None).is_ok());
    let public_admin = |k: &str| match k {
        "HOOKRELAY_ADMIN_LISTEN" => Some("0.0.0.0:9090".to_string()),
        _ => None,
    };
    let err = hookrelay::config::parse(&admin, file, &public_admin)
        .unwrap_err()
        .to_string();
    assert!(
        err.lines().any(|l| l.contains("server.admin_token")
            && l.contains("set HOOKRELAY_ADMIN_TOKEN")
            && l.contains("0.0.0.0:9090 is reachable from other hosts")),
        "{err}"
    );
    assert!(!err.contains("letmein"), "the token was shown:\n{err}");
    let set = |k: &str| match k {
        "HOOKRELAY_ADMIN_LISTEN" => Some("0.0.0.0:9090".to_string()),
        "HOOKRELAY_ADMIN_TOKEN" => Some("set-by-the-operator".to_string()),
        _ => None,
    };
    assert!(hookrelay::config::parse(&admin, file, &set).is_ok());
}

#[test]
fn pem_text_where_a_tls_path_goes_is_not_printed() {
    let t = BASE.replace(
        "token_secret = \"tok-secret-for-tests-0123456789abcdef\"",
        "token_secret = \"tok-secret-for-tests-0123456789abcdef\"\ntls = { cert = \"cert.pem\", key = \"${TLS_KEY}\" }",
    );
    let env = |n: &str| {
        (n == "TLS_KEY")
            .then(|| "-----BEGIN PRIVATE KEY-----\nMIIEvQ\n-----END PRIVATE KEY-----".to_string())
    };
    let p = problems_with(&t, &env);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(
        p[0].contains("server.tls.key") && p[0].contains("PEM text"),
        "{p:#?}"
    );
    assert!(!p[0].contains("MIIEvQ"), "{p:#?}");
}

#[test]
fn a_secret_in_the_wrong_place_is_not_printed() {
    // A secret's variable put in another key too, by mistake: the problem quoting its value
    // shows the variable.
    let t = BASE.replace(
        "url = \"http://127.0.0.1:8001/hooks\"",
        "url = \"http://127.0.0.1:8001/hooks\"\nheaders = { \"X-Api-Key\" = \"${CALLS_KEY}\" }",
    ) + "\n[dedup]\nwindow = \"${CALLS_KEY}\"\n";
    let env = |n: &str| (n == "CALLS_KEY").then(|| "sk_live_S3CRET".to_string());
    let p = problems_with(&t, &env);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(p[0].contains("dedup.window"), "{p:#?}");
    assert!(
        !p[0].contains("S3CRET") && p[0].contains("${CALLS_KEY}"),
        "{p:#?}"
    );
    // The same for the admin token, and for a password in a destination URL; one secret
    // holding another is not shown in part; the wording around a value stays as it is.
    let t =
        BASE.replace(
            "token_secret = \"tok-secret-for-tests-0123456789abcdef\"",
            "token_secret = \"tok-secret-for-tests-0123456789abcdef\"\nadmin_token = \"${ADMIN}\"",
        )
        .replace(
            "http://127.0.0.1:8001/hooks",
            "http://ops:${PW}@127.0.0.1:8001/hooks",
        ) + "\n[dedup]\nwindow = \"${ADMIN}\"\n[delivery]\ntimeout = \"${PW}\"\n";
    let env = |n: &str| match n {
        "ADMIN" => Some("adm1n-T0KEN".to_string()),
        "PW" => Some("adm1n-T0KEN-and-more".to_string()),
        _ => None,
    };
    let p = problems_with(&t, &env);
    assert_eq!(p.len(), 2, "{p:#?}");
    assert!(p.iter().all(|l| !l.contains("T0KEN")), "{p:#?}");
    assert!(
        p[0].contains("\"${ADMIN}\"") && p[1].contains("\"${PW}\""),
        "{p:#?}"
    );
    assert!(p[0].contains("write e.g. \"250ms\""), "{p:#?}");
    // A secret written in the file in the wrong shape: serde's message quotes it.
    let t = BASE.replace(
        "url = \"http://127.0.0.1:8001/hooks\"",
        "url = \"http://127.0.0.1:8001/hooks\"\nsign = \"whsec_S3CRET\"",
    );
    let p = problems(&t);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(p[0].contains("destinations[0].sign"), "{p:#?}");
    assert!(
        !p[0].contains("S3CRET") && p[0].contains("a string"),
        "{p:#?}"
    );
}

/// A problem with a value filled in from the environment quotes the value as the file
/// writes it, its `${VAR}`s unfilled: a source path, a filter or a destination URL may hold
/// a credential, and `check`'s output ends up in CI logs. The routing table shows a
/// destination URL with variables as written too.
#[test]
fn a_filled_in_value_is_quoted_as_written() {
    let env = |n: &str| match n {
        "HOOK_TOKEN" => Some("p4th-S3CRET".to_string()),
        "VERIFY" => Some("ab'cd-S3CRET".to_string()),
        "SLACK" => Some("https://hooks.slack.example/services/T0/B0/S3CRET".to_string()),
        "WAIT" => Some("ten seconds".to_string()),
        _ => None,
    };
    let t = BASE
        .replace("path = \"/8x8/voice\"", "path = \"/in/${HOOK_TOKEN}\"")
        .replace(
            "to = [\"calls\"]",
            "to = [\"calls\"]\nfilter = \"@.token == '${VERIFY}'\"",
        )
        + "\n[[sources]]\nname = \"again\"\npath = \"/in/${HOOK_TOKEN}\"\n"
        + "\n[delivery]\ntimeout = \"${WAIT}\"\n";
    let p = problems_with(&t, &env);
    assert_eq!(p.len(), 3, "{p:#?}");
    assert!(p.iter().all(|l| !l.contains("S3CRET")), "{p:#?}");
    let at = |key: &str| {
        p.iter()
            .find(|l| l.contains(key))
            .unwrap_or_else(|| panic!("{key}: {p:#?}"))
    };
    assert!(
        at("sources[1].path").contains("\"/in/${HOOK_TOKEN}\""),
        "{p:#?}"
    );
    assert!(at("routes[0].filter").contains("${VERIFY}"), "{p:#?}");
    // A value that is no secret is shown as written as well, with what it is made of.
    assert!(at("delivery.timeout").contains("\"${WAIT}\""), "{p:#?}");
    let t = BASE.replace("http://127.0.0.1:8003/ivr", "${SLACK}");
    let c = hookrelay::config::parse(&t, Path::new("routes.toml"), &env).unwrap();
    let table = hookrelay::config::routing_table(&c);
    assert!(
        !table.contains("S3CRET") && table.contains("${SLACK}"),
        "{table}"
    );
    assert_eq!(c.destination("ivr").unwrap().shown_url, "${SLACK}");
    assert!(table.contains("http://127.0.0.1:8001/hooks"), "{table}");
}

#[test]
fn the_contract_defaults_hold_and_a_destination_inherits_what_it_does_not_set() {
    use std::time::Duration;
    let text = format!(
        "{BASE}\n[delivery]\nretry = {{ max_delay = \"1m\" }}\nbreaker = {{ failures = 4 }}\n"
    )
    .replace(
        "url = \"http://127.0.0.1:8003/ivr\"",
        "url = \"http://127.0.0.1:8003/ivr\"\nretry = { first = \"5s\" }\nmax_in_flight = 3",
    );
    let c = hookrelay::config::parse(&text, Path::new("routes.toml"), &|_| None).unwrap();
    let s = &c.server;
    assert_eq!(s.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(s.admin_listen.to_string(), "127.0.0.1:9090");
    assert_eq!(s.max_body_bytes, 1_048_576);
    assert_eq!(s.shutdown_grace, Duration::from_secs(10));
    assert!(s.trusted_proxies.is_empty() && s.tls.is_none());
    assert_eq!(c.store.backend, hookrelay::config::Backend::Redb);
    assert_eq!(c.store.retain, Duration::from_secs(7 * 86_400));
    assert_eq!(c.dedup_window, Duration::from_secs(86_400));
    let calls = c.destination("calls").unwrap();
    assert_eq!(calls.timeout, Duration::from_secs(10));
    assert_eq!(calls.max_in_flight, 32);
    assert_eq!(calls.max_queue, 100_000);
    let r = &calls.retry;
    assert_eq!(
        (
            r.first,
            r.factor,
            r.max_delay,
            r.give_up_after,
            r.max_attempts
        ),
        (
            Duration::from_secs(1),
            2.0,
            Duration::from_secs(60),
            Duration::from_secs(86_400),
            0
        )
    );
    assert_eq!((calls.rate.per_second, calls.rate.burst), (100.0, 100));
    assert_eq!(calls.breaker.failures, 4);
    assert_eq!(calls.breaker.cool_down, Duration::from_secs(30));
    // `ivr` sets its first retry and max_in_flight; the rest comes from [delivery].
    let ivr = c.destination("ivr").unwrap();
    assert_eq!(ivr.retry.first, Duration::from_secs(5));
    assert_eq!(ivr.retry.max_delay, Duration::from_secs(60));
    assert_eq!(ivr.retry.factor, 2.0);
    assert_eq!(ivr.max_in_flight, 3);
    assert_eq!(ivr.breaker.failures, 4);
    assert_eq!(ivr.timeout, Duration::from_secs(10));
}

#[test]
fn the_contracts_complete_example_is_accepted_once_its_variables_are_set() {
    let text = include_str!("data/contract-example.toml");
    let env = |name: &str| {
        [
            "CALLS_KEY",
            "CALLS_SIGNING_SECRET",
            "DIDS_SIGNING_SECRET",
            "HOOKRELAY_ADMIN_TOKEN",
            "HOOKRELAY_TOKEN_SECRET",
            "SMS_CLIENT_SECRET",
            "VOICE_AUTH",
        ]
        .contains(&name)
        .then(|| format!("value-of-{name}-set-by-this-test"))
    };
    assert_eq!(problems_with(text, &env), Vec::<String>::new());
    // Without them, each is named.
    let p = problems(text).join("\n");
    assert!(
        p.contains("VOICE_AUTH") && p.contains("SMS_CLIENT_SECRET"),
        "{p}"
    );
}

#[test]
fn the_config_is_the_flags_then_the_environments_then_routes_toml_where_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("routes.toml");
    std::fs::write(&good, BASE).unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        BASE.replace("source = \"voice\"", "source = \"nope\""),
    )
    .unwrap();
    let check = |args: &[&Path], env: Option<&Path>| {
        let mut c = Command::new(support::bin());
        c.arg("check").current_dir(dir.path());
        c.env_remove("HOOKRELAY_CONFIG");
        for a in args {
            c.arg(a);
        }
        if let Some(e) = env {
            c.env("HOOKRELAY_CONFIG", e);
        }
        c.output().unwrap().status.code()
    };
    // No flag, no variable: ./routes.toml.
    assert_eq!(check(&[], None), Some(0));
    // The variable over ./routes.toml.
    assert_eq!(check(&[], Some(&bad)), Some(1));
    // The flag over the variable.
    assert_eq!(check(&[Path::new("--config"), &good], Some(&bad)), Some(0));
    assert_eq!(check(&[Path::new("--config"), &bad], Some(&good)), Some(1));
}

#[test]
fn a_destination_header_that_frames_the_message_is_refused() {
    // hyper would send a hand-set Content-Length as it is: the body cut short, its
    // signature then wrong at the destination.
    for name in [
        "Content-Length",
        "transfer-encoding",
        "Connection",
        "Upgrade",
    ] {
        let t = BASE.replace(
            "url = \"http://127.0.0.1:8001/hooks\"",
            &format!("url = \"http://127.0.0.1:8001/hooks\"\nheaders = {{ \"{name}\" = \"0\" }}"),
        );
        rejects(
            &t,
            &format!("destinations[0].headers.{name}"),
            "set by the relay",
        );
    }
}

#[test]
fn the_admin_api_needs_a_port_of_its_own() {
    for (listen, admin) in [
        ("127.0.0.1:18080", "127.0.0.1:18080"),
        ("0.0.0.0:18080", "127.0.0.1:18080"),
    ] {
        let t = BASE.replace(
            "token_secret = \"tok-secret-for-tests-0123456789abcdef\"\n",
            &format!("token_secret = \"tok-secret-for-tests-0123456789abcdef\"\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\n"),
        );
        rejects(&t, "server.admin_listen", "takes the port of server.listen");
    }
    // Another address on the same port is another socket.
    let t = BASE.replace(
        "token_secret = \"tok-secret-for-tests-0123456789abcdef\"\n",
        "token_secret = \"tok-secret-for-tests-0123456789abcdef\"\nlisten = \"127.0.0.2:18080\"\nadmin_listen = \"127.0.0.1:18080\"\n",
    );
    assert!(problems(&t).is_empty(), "{:?}", problems(&t));
}

#[test]
fn a_name_longer_than_jetstream_takes_is_refused() {
    // A destination's consumer is named after it (in hex, with a dot): 125 characters with a
    // dot made a consumer name JetStream refused, and nothing was ever delivered.
    let long = format!("a.{}", "x".repeat(123));
    let t = BASE.replace("name = \"voice\"", &format!("name = \"{long}\""));
    let t = t.replace("source = \"voice\"", &format!("source = \"{long}\""));
    rejects(&t, "sources[0].name", "at most 100");
    let ok = format!("a.{}", "x".repeat(98));
    let t = BASE.replace("name = \"voice\"", &format!("name = \"{ok}\""));
    let t = t.replace("source = \"voice\"", &format!("source = \"{ok}\""));
    assert!(problems(&t).is_empty(), "{:?}", problems(&t));
}
