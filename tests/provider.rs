//! 8x8 and telecom-style providers: the OAuth2 token flow, Standard Webhooks inbound
//! signatures, and `decode_json` change events (dids fixtures).

mod support;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{KeyInit, Mac};
use support::{fixture, TestRelay};

const CONFIG: &str = r#"
[server]
listen = "127.0.0.1:0"
token_secret = "${TOKEN_SECRET}"

[delivery]
retry = { first = "1h" }

[[sources]]
name = "sms"
path = "/8x8/sms"
auth = { kind = "oauth2", clients = [{ id = "8x8-sms", secret = "s3cr3t&=:x" }], token_ttl = "1h" }
event_id = ["$.payload.umid", "$.payload.status.state"]

[[sources]]
name = "chat"
path = "/8x8/chatapps"
auth = { kind = "oauth2", clients = [{ id = "8x8-chat", secret = "other" }] }

[[sources]]
name = "dids"
path = "/hooks/dids"
auth = { kind = "standard-webhooks", secret = "whsec_c2lnbmluZy1zZWNyZXQtZm9yLWRpZHM=", tolerance = "5m" }
decode_json = ["data"]
event_id = ["$.schema", "$.type", "$.data.id"]

[[destinations]]
name = "messaging"
url = "http://127.0.0.1:9/m"

[[destinations]]
name = "numbers"
url = "http://127.0.0.1:9/n"

[[routes]]
name = "sms"
source = "sms"
match = { namespace = "SMS", eventType = "*" }
to = ["messaging"]

[[routes]]
name = "chat"
source = "chat"
to = ["messaging"]

[[routes]]
name = "did-changes"
source = "dids"
match = { schema = ["dids", "lnp_requests", "sms_enablement"] }
to = ["numbers"]
"#;

const ENV: &[(&str, &str)] = &[("TOKEN_SECRET", "token-signing-key-for-the-provider-tests")];

fn form(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish().into_bytes()
}

const FORM: (&str, &str) = ("content-type", "application/x-www-form-urlencoded");

async fn token_basic(r: &TestRelay, id: &str, secret: &str) -> support::Answer {
    // RFC 6749 §2.3.1: id and secret are form-urlencoded before Basic encoding.
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let basic = format!(
        "Basic {}",
        STANDARD.encode(format!("{}:{}", enc(id), enc(secret)))
    );
    r.post_with(
        "/oauth/token",
        &[FORM, ("authorization", &basic)],
        &form(&[("grant_type", "client_credentials")]),
    )
    .await
}

/// Posts the SMS inbound sample to the sms source with `auth` as its Authorization header.
async fn post_sms(r: &TestRelay, auth: &str) -> support::Answer {
    r.post_with(
        "/8x8/sms",
        &[("authorization", auth)],
        &fixture("8x8/sms-inbound.json"),
    )
    .await
}

fn bearer(a: &support::Answer) -> String {
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.headers["cache-control"], "no-store");
    let v = a.json();
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["expires_in"], 3600);
    format!("Bearer {}", v["access_token"].as_str().unwrap())
}

#[tokio::test]
async fn token_with_basic_credentials_opens_the_source() {
    let r = TestRelay::start_env(CONFIG, ENV).await;
    let auth = bearer(&token_basic(&r, "8x8-sms", "s3cr3t&=:x").await);
    let a = post_sms(&r, &auth).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.json()["id"], "0f7a2c1e-6b9d-4f3a-9e51-2b7c8d1a4e10");
    let a = r
        .post_with(
            "/8x8/sms",
            &[("authorization", &auth)],
            &fixture("8x8/sms-delivery-receipt.json"),
        )
        .await;
    assert_eq!(
        a.json()["id"],
        "5a1e9c0d-2f4b-4c8e-8d3a-7b6f1e2d9c44:delivered"
    );
}

/// RFC 6749 §3.2.1: a client authenticated by HTTP Basic may name itself in the form too;
/// RFC 9110 §11.1: the schemes are case-insensitive.
#[tokio::test]
async fn token_with_basic_credentials_and_the_client_named_in_the_form() {
    let r = TestRelay::start_env(CONFIG, ENV).await;
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    let basic = format!(
        "BASIC {}",
        STANDARD.encode(format!("{}:{}", enc("8x8-sms"), enc("s3cr3t&=:x")))
    );
    let ask = |client_id: &'static str| {
        let basic = basic.clone();
        let r = &r;
        async move {
            r.post_with(
                "/oauth/token",
                &[FORM, ("authorization", &basic)],
                &form(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id),
                ]),
            )
            .await
        }
    };
    let token = bearer(&ask("8x8-sms").await);
    let upper = token.replacen("Bearer", "BEARER", 1);
    let a = post_sms(&r, &upper).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    // Another client named than the one authenticated: refused.
    let a = ask("someone-else").await;
    assert_eq!(a.status, 400, "{:?}", a.body);
    assert_eq!(a.json()["error"], "invalid_request");
}

#[tokio::test]
async fn token_with_form_credentials_and_scope() {
    let r = TestRelay::start_env(CONFIG, ENV).await;
    let a = r
        .post_with(
            "/oauth/token",
            &[FORM],
            &form(&[
                ("grant_type", "client_credentials"),
                ("client_id", "8x8-sms"),
                ("client_secret", "s3cr3t&=:x"),
                ("scope", "webhooks"),
            ]),
        )
        .await;
    assert_eq!(a.json()["scope"], "webhooks");
    let auth = bearer(&a);
    let ok = post_sms(&r, &auth).await;
    assert_eq!(ok.status, 200);
    // A client library that sends its last token along with form credentials: the token
    // is not HTTP Basic, so not a second way of authenticating.
    let again = r
        .post_with(
            "/oauth/token",
            &[FORM, ("authorization", &auth)],
            &form(&[
                ("grant_type", "client_credentials"),
                ("client_id", "8x8-sms"),
                ("client_secret", "s3cr3t&=:x"),
            ]),
        )
        .await;
    assert_eq!(again.status, 200, "{:?}", again.body);
}

#[tokio::test]
async fn wrong_secret_is_invalid_client() {
    let r = TestRelay::start_env(CONFIG, ENV).await;
    let a = token_basic(&r, "8x8-sms", "wrong").await;
    assert_eq!(a.status, 401);
    assert_eq!(a.json()["error"], "invalid_client");
    assert!(a.headers.contains_key("www-authenticate"));
    assert_eq!(a.headers["cache-control"], "no-store");
    let a = token_basic(&r, "nobody", "s3cr3t&=:x").await;
    assert_eq!(a.json()["error"], "invalid_client");
    // No credentials at all.
    let a = r
        .post_with(
            "/oauth/token",
            &[FORM],
            &form(&[("grant_type", "client_credentials")]),
        )
        .await;
    assert_eq!(a.status, 401);
    // A provider with a wrong secret never posts: its failures show under `(token)`.
    assert_eq!(token_basic(&r, "8x8-sms", "s3cr3t&=:x").await.status, 200);
    let text = String::from_utf8(
        support::send(http::Method::GET, &r.admin_url("/metrics"), &[], b"")
            .await
            .body
            .to_vec(),
    )
    .unwrap();
    let count = |status: &str| {
        support::metric(
            &text,
            &format!("hookrelay_ingress_requests_total{{source=\"(token)\",status=\"{status}\"}}"),
        )
    };
    assert_eq!((count("401"), count("200")), (3.0, 1.0), "{text}");
}

#[tokio::test]
async fn bad_grant_and_bad_requests() {
    let r = TestRelay::start_env(CONFIG, ENV).await;
    let a = r
        .post_with(
            "/oauth/token",
            &[FORM],
            &form(&[
                ("grant_type", "password"),
                ("client_id", "8x8-sms"),
                ("client_secret", "s3cr3t&=:x"),
            ]),
        )
        .await;
    assert_eq!(a.status, 400);
    assert_eq!(a.json()["error"], "unsupported_grant_type");
    let a = r
        .post_with(
            "/oauth/token",
            &[FORM],
            &form(&[("client_id", "8x8-sms"), ("client_secret", "s3cr3t&=:x")]),
        )
        .await;
    assert_eq!(a.status, 400);
    assert_eq!(a.json()["error"], "invalid_request");
}

#[tokio::test]
async fn token_of_another_source_is_refused() {
    let r = TestRelay::start_env(CONFIG, ENV).await;
    let chat = bearer(&token_basic(&r, "8x8-chat", "other").await);
    let a = post_sms(&r, &chat).await;
    let msg = a.error(401, "unauthorized");
    assert!(msg.contains("another source"), "{msg}");
    // RFC 6750 §3.1: a presented token that is refused says so.
    assert_eq!(
        a.headers["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
}

#[tokio::test]
async fn expired_token_is_refused() {
    let r = TestRelay::start_env(CONFIG, ENV).await;
    let claims = hookrelay::token::Claims {
        source: "sms".into(),
        client: "8x8-sms".into(),
        scope: None,
        exp: hookrelay::store::now_ms() / 1000 - 1,
        iat: hookrelay::store::now_ms() / 1000 - 61,
        secret: hookrelay::token::secret_mark(
            b"token-signing-key-for-the-provider-tests",
            b"s3cr3t&=:x",
        ),
    };
    let old = hookrelay::token::issue(b"token-signing-key-for-the-provider-tests", &claims);
    let a = r
        .post_with(
            "/8x8/sms",
            &[("authorization", &format!("Bearer {old}"))],
            b"{}",
        )
        .await;
    let msg = a.error(401, "unauthorized");
    assert!(msg.contains("expired"), "{msg}");
}

#[tokio::test]
async fn token_stays_valid_after_a_restart() {
    let r = TestRelay::start_env(CONFIG, ENV).await;
    let auth = bearer(&token_basic(&r, "8x8-sms", "s3cr3t&=:x").await);
    let dir = r.stop().await;
    let r = TestRelay::start_in(dir, CONFIG, ENV).await;
    let a = post_sms(&r, &auth).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
}

#[tokio::test]
async fn a_removed_clients_token_is_refused() {
    let r = TestRelay::start_env(CONFIG, ENV).await;
    let auth = bearer(&token_basic(&r, "8x8-sms", "s3cr3t&=:x").await);
    let dir = r.stop().await;
    let without = CONFIG.replace(r#"id = "8x8-sms""#, r#"id = "8x8-sms-new""#);
    let r = TestRelay::start_in(dir, &without, ENV).await;
    let a = post_sms(&r, &auth).await;
    let msg = a.error(401, "unauthorized");
    assert!(msg.contains("no longer configured"), "{msg}");
}

#[tokio::test]
async fn a_token_issued_against_a_rotated_secret_is_refused() {
    let r = TestRelay::start_env(CONFIG, ENV).await;
    let auth = bearer(&token_basic(&r, "8x8-sms", "s3cr3t&=:x").await);
    let dir = r.stop().await;
    let rotated = CONFIG.replace(r#"secret = "s3cr3t&=:x""#, r#"secret = "rotated-secret""#);
    assert_ne!(rotated, CONFIG);
    let r = TestRelay::start_in(dir, &rotated, ENV).await;
    let msg = post_sms(&r, &auth).await.error(401, "unauthorized");
    assert!(msg.contains("secret changed"), "{msg}");
    // A token issued against the new secret opens the source.
    let auth = bearer(&token_basic(&r, "8x8-sms", "rotated-secret").await);
    assert_eq!(post_sms(&r, &auth).await.status, 200);
}

/// A token without the mark of its client's secret (as a build before the mark issued it)
/// is refused: it would open the source to whoever holds the token key, without the
/// client's secret.
#[tokio::test]
async fn a_token_without_the_mark_of_its_clients_secret_is_refused() {
    let r = TestRelay::start_env(CONFIG, ENV).await;
    let now = hookrelay::store::now_ms() / 1000;
    let claims = hookrelay::token::Claims {
        source: "sms".into(),
        client: "8x8-sms".into(),
        scope: None,
        exp: now + 600,
        iat: now,
        secret: String::new(),
    };
    let token = hookrelay::token::issue(b"token-signing-key-for-the-provider-tests", &claims);
    let a = post_sms(&r, &format!("Bearer {token}")).await;
    a.error(401, "unauthorized");
    assert_eq!(
        a.headers["www-authenticate"],
        "Bearer error=\"invalid_token\""
    );
}

#[tokio::test]
async fn a_token_outliving_the_token_ttl_is_refused() {
    // Signed with the right key, issued 2 h ago for 30 days (as under a longer token_ttl,
    // before it was lowered to 1 h): older than the token_ttl in force.
    let r = TestRelay::start_env(CONFIG, ENV).await;
    let now = hookrelay::store::now_ms() / 1000;
    let claims = hookrelay::token::Claims {
        source: "sms".into(),
        client: "8x8-sms".into(),
        scope: None,
        exp: now + 30 * 24 * 3600,
        iat: now - 2 * 3600,
        secret: hookrelay::token::secret_mark(
            b"token-signing-key-for-the-provider-tests",
            b"s3cr3t&=:x",
        ),
    };
    let long = format!(
        "Bearer {}",
        hookrelay::token::issue(b"token-signing-key-for-the-provider-tests", &claims)
    );
    let msg = post_sms(&r, &long).await.error(401, "unauthorized");
    assert!(msg.contains("token_ttl"), "{msg}");
    // Issued 2 h ago for 2 h 10 min, before token_ttl was lowered to 1 h: it expires within
    // the hour, yet it is older than the token_ttl in force.
    let issued = hookrelay::token::Claims {
        exp: now + 600,
        ..claims
    };
    let old = format!(
        "Bearer {}",
        hookrelay::token::issue(b"token-signing-key-for-the-provider-tests", &issued)
    );
    let msg = post_sms(&r, &old).await.error(401, "unauthorized");
    assert!(msg.contains("token_ttl"), "{msg}");
    // Issued a minute ago under a longer token_ttl: its expiry is far off, but counted from
    // its issue time it is within the hour in force, so it passes until then.
    let recent = hookrelay::token::Claims {
        exp: now + 30 * 24 * 3600,
        iat: now - 60,
        ..issued
    };
    let recent = format!(
        "Bearer {}",
        hookrelay::token::issue(b"token-signing-key-for-the-provider-tests", &recent)
    );
    assert_eq!(post_sms(&r, &recent).await.status, 200);
    // One the endpoint issues passes.
    let auth = bearer(&token_basic(&r, "8x8-sms", "s3cr3t&=:x").await);
    assert_eq!(post_sms(&r, &auth).await.status, 200);
}

// ---- Standard Webhooks inbound ----

const DIDS_SECRET: &[u8] = b"signing-secret-for-dids";

/// An independent Standard Webhooks signature (not hookrelay's code).
fn signed_headers(id: &str, ts: u64, body: &[u8]) -> Vec<(String, String)> {
    let mut m = <hmac::Hmac<sha2::Sha256> as KeyInit>::new_from_slice(DIDS_SECRET).unwrap();
    m.update(format!("{id}.{ts}.").as_bytes());
    m.update(body);
    let sig = STANDARD.encode(m.finalize().into_bytes());
    vec![
        ("webhook-id".into(), id.into()),
        ("webhook-timestamp".into(), ts.to_string()),
        ("webhook-signature".into(), format!("v1,AAAA v1,{sig}")),
    ]
}

async fn post_signed(r: &TestRelay, headers: &[(String, String)], body: &[u8]) -> support::Answer {
    let h: Vec<(&str, &str)> = headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    r.post_with("/hooks/dids", &h, body).await
}

fn now_s() -> u64 {
    hookrelay::store::now_ms() / 1000
}

#[tokio::test]
async fn signed_request_accepted_tampered_and_stale_refused() {
    let r = TestRelay::start_env(CONFIG, ENV).await;
    let body = fixture("dids/dids-update.json");
    let h = signed_headers("msg_1", now_s(), &body);
    assert_eq!(post_signed(&r, &h, &body).await.status, 200);
    // The signatures on two header lines, the valid one second: one list.
    let mut lines = h.clone();
    let both = lines.pop().unwrap().1;
    let (stale, valid) = both.split_once(' ').unwrap();
    lines.push(("webhook-signature".into(), stale.into()));
    lines.push(("webhook-signature".into(), valid.into()));
    let a = post_signed(&r, &lines, &body).await;
    assert_eq!(a.status, 200, "{:?}", a.body);

    let mut tampered = body.clone();
    let at = tampered.iter().position(|&b| b == b'7').unwrap();
    tampered[at] = b'8';
    let msg = post_signed(&r, &h, &tampered)
        .await
        .error(401, "unauthorized");
    assert!(msg.contains("signature"), "{msg}");

    let stale = signed_headers("msg_2", now_s() - 600, &body);
    let msg = post_signed(&r, &stale, &body)
        .await
        .error(401, "unauthorized");
    assert!(msg.contains("tolerance"), "{msg}");
    // A timestamp as far ahead is refused too.
    let ahead = signed_headers("msg_3", now_s() + 600, &body);
    let msg = post_signed(&r, &ahead, &body)
        .await
        .error(401, "unauthorized");
    assert!(msg.contains("tolerance"), "{msg}");

    r.post("/hooks/dids", &body)
        .await
        .error(401, "unauthorized");
}

#[tokio::test]
async fn a_raw_signing_secret_is_the_key_itself() {
    // The same key written as raw text instead of `whsec_<base64>`.
    let whsec = "whsec_c2lnbmluZy1zZWNyZXQtZm9yLWRpZHM=";
    assert!(CONFIG.contains(whsec));
    let raw = CONFIG.replace(whsec, std::str::from_utf8(DIDS_SECRET).unwrap());
    let r = TestRelay::start_env(&raw, ENV).await;
    let body = fixture("dids/dids-update.json");
    let h = signed_headers("msg_raw", now_s(), &body);
    assert_eq!(post_signed(&r, &h, &body).await.status, 200);
    let mut wrong = h.clone();
    wrong[2].1 = signed_headers("msg_raw", now_s(), b"{}")[2].1.clone();
    post_signed(&r, &wrong, &body)
        .await
        .error(401, "unauthorized");
}

#[tokio::test]
async fn every_dids_fixture_routed_and_deduplicated_by_decoded_id() {
    let r = TestRelay::start_env(CONFIG, ENV).await;
    let cases = [
        ("dids-delete.json", "dids:delete:48213"),
        ("dids-insert.json", "dids:insert:48214"),
        ("dids-update.json", "dids:update:48213"),
        ("lnp-request-update.json", "lnp_requests:update:901"),
        ("sms-enablement-error.json", "sms_enablement:update"),
    ];
    for (i, (f, id)) in cases.iter().enumerate() {
        let body = fixture(&format!("dids/{f}"));
        let h = signed_headers(&format!("m{i}"), now_s(), &body);
        let a = post_signed(&r, &h, &body).await;
        assert_eq!(a.status, 200, "{f}: {:?}", a.body);
        let v = a.json();
        assert_eq!(v["id"], *id, "{f}");
        assert_eq!(v["deliveries"], 1, "{f}");
        assert_eq!(v["duplicate"], false, "{f}");
        // The same change again (a provider retry, new message id) is a duplicate.
        let h = signed_headers(&format!("retry{i}"), now_s(), &body);
        let v = post_signed(&r, &h, &body).await.json();
        assert_eq!(v["duplicate"], true, "{f}");
        // Stored byte-for-byte, not the decoded form.
        let views = r.app().store.lookup(id).await.unwrap();
        assert_eq!(&views[0].event.body[..], &body[..], "{f}");
    }
    assert_eq!(r.app().store.queue_depth("numbers"), cases.len() as u64);
}

/// Without `event_id`, a signed message's `webhook-id` is its id (the same on a resend,
/// Standard Webhooks says): a record set back to an earlier state (delete, insert, delete:
/// the same bytes twice) is a new change, not a duplicate of the first, as the body's hash
/// made it.
#[tokio::test]
async fn without_event_id_a_signed_messages_webhook_id_is_its_id() {
    let config = CONFIG.replace("event_id = [\"$.schema\", \"$.type\", \"$.data.id\"]\n", "");
    assert_ne!(config, CONFIG);
    let r = TestRelay::start_env(&config, ENV).await;
    let delete = fixture("dids/dids-delete.json");
    let insert = fixture("dids/dids-insert.json");
    for (id, body) in [("m1", &delete), ("m2", &insert), ("m3", &delete)] {
        let v = post_signed(&r, &signed_headers(id, now_s(), body), body)
            .await
            .json();
        assert_eq!(v["id"], id, "{v}");
        assert_eq!(v["duplicate"], false, "{id}: {v}");
    }
    // The sender's resend of one (its id kept, signed anew) is a duplicate.
    let v = post_signed(&r, &signed_headers("m3", now_s(), &delete), &delete)
        .await
        .json();
    assert_eq!(v["duplicate"], true, "{v}");
    assert_eq!(r.app().store.queue_depth("numbers"), 3);
}

#[tokio::test]
async fn decode_json_field_that_is_not_json_is_400_naming_it() {
    let r = TestRelay::start_env(CONFIG, ENV).await;
    let body = br#"{"type":"update","schema":"dids","data":"{not json"}"#;
    let h = signed_headers("bad", now_s(), body);
    let msg = post_signed(&r, &h, body).await.error(400, "invalid_json");
    assert!(msg.contains("\"data\""), "{msg}");
}

/// From an address one token source allows but the client's own source does not, a right
/// secret and a wrong one get the same answer: the endpoint is no oracle for the secrets of
/// sources the address may not use.
#[tokio::test]
async fn a_client_s_secret_is_not_told_to_an_address_its_source_refuses() {
    let text = CONFIG.replace(
        "path = \"/8x8/chatapps\"\n",
        "path = \"/8x8/chatapps\"\nallow_ips = [\"203.0.113.0/24\"]\n",
    );
    assert_ne!(text, CONFIG);
    let r = TestRelay::start_env(&text, ENV).await;
    let right = token_basic(&r, "8x8-chat", "other").await;
    let wrong = token_basic(&r, "8x8-chat", "not-it").await;
    for a in [&right, &wrong] {
        assert_eq!(a.status, 403, "{:?}", a.body);
        assert_eq!(a.json()["error"], "access_denied");
    }
    assert_eq!(right.body, wrong.body);
    // The source that allows the address still issues.
    assert_eq!(token_basic(&r, "8x8-sms", "s3cr3t&=:x").await.status, 200);
}

/// An address no token source allows is refused before anything else: its form is not
/// read, and its method or missing fields are not told apart.
#[tokio::test]
async fn an_address_no_token_source_allows_is_refused_first() {
    let text = CONFIG
        .replace(
            "path = \"/8x8/chatapps\"\n",
            "path = \"/8x8/chatapps\"\nallow_ips = [\"203.0.113.0/24\"]\n",
        )
        .replace(
            "path = \"/8x8/sms\"\n",
            "path = \"/8x8/sms\"\nallow_ips = [\"203.0.113.0/24\"]\n",
        );
    assert_eq!(text.matches("203.0.113.0/24").count(), 2);
    let r = TestRelay::start_env(&text, ENV).await;
    for method in [http::Method::POST, http::Method::GET] {
        let a = support::send(method.clone(), &r.url("/oauth/token"), &[], b"").await;
        assert_eq!(a.status, 403, "{method}: {:?}", a.body);
        assert_eq!(a.json()["error"], "access_denied");
        assert_eq!(a.headers["cache-control"], "no-store");
    }
}
