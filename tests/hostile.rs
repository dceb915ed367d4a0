//! Hostile input never panics: config text, JSON + routing + event ids, X-Forwarded-For,
//! tokens and signature headers, driven by proptest (random and mutated inputs).

use std::path::Path;

use proptest::prelude::*;

const BASE: &str = include_str!("../routes.toml");

fn cfg() -> hookrelay::config::Config {
    hookrelay::config::parse(BASE, Path::new("routes.toml"), &|_| None).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn config_parsing_never_panics(s in "\\PC{0,400}") {
        let _ = hookrelay::config::parse(&s, Path::new("x.toml"), &|_| None);
    }

    #[test]
    fn mutated_config_never_panics(at in 0usize..6000, junk in "[\\[\\]{}=\"'$#\\n a-z0-9.,*@?]{1,12}") {
        let mut t = BASE.to_string();
        let at = at.min(t.len());
        let at = (0..=at).rev().find(|i| t.is_char_boundary(*i)).unwrap_or(0);
        t.insert_str(at, &junk);
        let _ = hookrelay::config::parse(&t, Path::new("x.toml"), &|_| Some("v".into()));
    }

    #[test]
    fn json_routing_and_ids_never_panic(body in prop_oneof![
        "\\PC{0,200}",
        r#"\{"namespace":"(VOICE|SMS)","eventType":"[A-Z_]{0,12}","payload":\{"eventId":"[a-z0-9-]{0,8}","callDirection":"(INBOUND|OUTBOUND)","sipCode":[0-9]{1,3}\}\}"#,
        r#"\{"type":"update","schema":"dids","data":"[\\{\\}a-z:0-9\\\\\"]{0,30}"\}"#,
    ]) {
        let c = cfg();
        for s in &c.sources {
            if let Ok(wrapped) = hookrelay::ingress::parse_event(s, body.as_bytes()) {
                let _ = hookrelay::event_id::event_id(&s.event_id, &wrapped[0], body.as_bytes());
                let _ = hookrelay::routing::route(&c, s, &wrapped);
            }
        }
    }

    #[test]
    fn forwarded_for_never_panics(xff in "[0-9a-f.:\\[\\], ]{0,60}", peer in any::<[u8; 4]>()) {
        let mut h = http::HeaderMap::new();
        if let Ok(v) = http::HeaderValue::from_str(&xff) {
            h.insert("x-forwarded-for", v);
        }
        let proxies = vec!["0.0.0.0/0".parse().unwrap()];
        let ip = hookrelay::ingress::client_ip::client_ip(std::net::IpAddr::from(peer), &h, &proxies);
        let _ = hookrelay::ingress::client_ip::allowed(ip, &proxies);
    }

    #[test]
    fn tokens_never_panic(t in "[A-Za-z0-9_.\\-=]{0,120}") {
        let _ = hookrelay::token::verify(b"k", &t, 0);
    }

    #[test]
    fn signature_headers_never_panic(h in "[v1, A-Za-z0-9+/=]{0,120}") {
        let _ = hookrelay::signature::verify(b"k", "id", "1", b"{}", &h);
    }

    #[test]
    fn a_forged_token_never_verifies(exp in any::<u64>(), src in "[a-z]{1,8}") {
        let claims = hookrelay::token::Claims { source: src, client: "c".into(), scope: None, exp, iat: 0, secret: String::new() };
        let t = hookrelay::token::issue(b"other key", &claims);
        prop_assert!(hookrelay::token::verify(b"k", &t, 0).is_err());
    }
}
