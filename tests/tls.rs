//! HTTPS on the ingress with a self-signed certificate made in the test: HTTP/1.1 and
//! HTTP/2 over ALPN, a renewed certificate served after a reload, and a bad certificate
//! file as a config error naming it.

mod support;

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use support::{TestRelay, WAIT};

fn config() -> String {
    r#"
[server]
listen = "127.0.0.1:0"
tls = { cert = "relay.crt", key = "relay.key" }
[[sources]]
name = "open"
path = "/open"
"#
    .to_string()
}

fn write_cert(dir: &std::path::Path) -> rustls::RootCertStore {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("relay.crt"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("relay.key"), ck.signing_key.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    roots
}

async fn post_https(
    roots: rustls::RootCertStore,
    port: u16,
    h2: bool,
) -> (u16, http::Version, String) {
    try_post_https(roots, port, h2).await.unwrap()
}

async fn try_post_https(
    roots: rustls::RootCertStore,
    port: u16,
    h2: bool,
) -> Result<(u16, http::Version, String), String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let connector = if h2 {
        b.enable_http2().build()
    } else {
        b.enable_http1().build()
    };
    let client = Client::builder(TokioExecutor::new())
        .http2_only(h2)
        .build::<_, Full<Bytes>>(connector);
    let req = http::Request::post(format!("https://localhost:{port}/open"))
        .body(Full::new(Bytes::from_static(b"{\"tls\":true}")))
        .unwrap();
    let resp = tokio::time::timeout(WAIT, client.request(req))
        .await
        .expect("an answer in time")
        .map_err(|e| format!("{e:?}"))?;
    let (status, version) = (resp.status().as_u16(), resp.version());
    let body = tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .expect("the body in time")
        .unwrap()
        .to_bytes();
    Ok((status, version, String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test]
async fn https_ingress_speaks_http1_and_http2() {
    let dir = tempfile::tempdir().unwrap();
    let roots = write_cert(dir.path());
    let r = TestRelay::start_in(dir, &config(), &[]).await;
    let port = r.addr().port();
    let (status, version, body) = post_https(roots.clone(), port, false).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(version, http::Version::HTTP_11);
    assert!(body.contains("\"accepted\":true"), "{body}");
    let (status, version, _) = post_https(roots, port, true).await;
    assert_eq!(status, 200);
    assert_eq!(version, http::Version::HTTP_2);
}

#[tokio::test]
async fn a_reload_serves_a_renewed_certificate_and_refuses_turning_tls_off() {
    let dir = tempfile::tempdir().unwrap();
    let old = write_cert(dir.path());
    let file = dir.path().join("routes.toml");
    let r = TestRelay::start_in(dir, &config(), &[]).await;
    let port = r.addr().port();
    assert_eq!(post_https(old.clone(), port, false).await.0, 200);

    // Renewed in place, then a reload: new handshakes get the new certificate.
    let new = write_cert(file.parent().unwrap());
    r.app().reload().unwrap();
    assert_eq!(post_https(new.clone(), port, false).await.0, 200);
    assert_eq!(post_https(new.clone(), port, true).await.0, 200);
    // Refused by the certificate check, not by a connection error of another kind.
    let refused = try_post_https(old.clone(), port, false)
        .await
        .expect_err("the old certificate is still served");
    assert!(refused.contains("InvalidCertificate"), "{refused}");

    // TLS off, or another port, takes a restart: the reload says so and changes nothing.
    let text = std::fs::read_to_string(&file).unwrap();
    let plain = text.replace("tls = { cert = \"relay.crt\", key = \"relay.key\" }\n", "");
    std::fs::write(&file, plain).unwrap();
    let err = r.app().reload().unwrap_err().to_string();
    assert!(err.contains("server.tls: changed from on to off"), "{err}");
    assert!(err.contains("takes a restart"), "{err}");
    let moved = text.replacen(
        "\nlisten = \"127.0.0.1:0\"",
        "\nlisten = \"127.0.0.1:1\"",
        1,
    );
    std::fs::write(&file, moved).unwrap();
    let err = r.app().reload().unwrap_err().to_string();
    assert!(
        err.contains("server.listen: changed from 127.0.0.1:0 to 127.0.0.1:1"),
        "{err}"
    );
    assert!(!err.contains("admin_listen"), "{err}");
    assert_eq!(post_https(new, port, false).await.0, 200, "still served");
}

#[tokio::test]
async fn bad_certificate_file_is_a_config_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    write_cert(dir.path());
    std::fs::write(dir.path().join("relay.crt"), "not a certificate").unwrap();
    let file = dir.path().join("routes.toml");
    let err = hookrelay::config::parse(&config(), &file, &|_| None).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("server.tls.cert"), "{text}");
    assert!(text.contains("relay.crt"), "{text}");
    std::fs::remove_file(dir.path().join("relay.key")).unwrap();
    write_cert(dir.path());
    std::fs::write(dir.path().join("relay.key"), "").unwrap();
    let text = hookrelay::config::parse(&config(), &file, &|_| None)
        .unwrap_err()
        .to_string();
    assert!(text.contains("server.tls.key"), "{text}");
}
