//! HTTPS on the ingress with a self-signed certificate made in the test: HTTP/1.1 and
//! HTTP/2 over ALPN, a renewed certificate served after a reload, and a bad certificate
//! file as a config error naming it. HTTPS to a destination whose certificate only the
//! host trusts (`SSL_CERT_FILE`), as an internal service's private CA.

mod support;

use std::sync::Arc;
use std::time::Duration;

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

/// An HTTPS destination on 127.0.0.1 with a certificate for `localhost` that only the file
/// it writes in `dir` trusts (its path is returned, for `SSL_CERT_FILE`), offering HTTP/2
/// over ALPN when `h2`. Also returned: its port, a count of the requests it got (and of
/// those over HTTP/2), and its task.
async fn https_sink(
    dir: &std::path::Path,
    h2: bool,
) -> (
    std::path::PathBuf,
    u16,
    tokio::sync::watch::Receiver<(usize, usize)>,
    tokio::task::JoinHandle<()>,
) {
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;

    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let ca_file = dir.join("internal-ca.pem");
    std::fs::write(&ca_file, ck.cert.pem()).unwrap();
    let key = rustls_pki_types::PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key)
    .unwrap();
    if h2 {
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (told, arrived) = tokio::sync::watch::channel((0usize, 0usize));
    let server = tokio::spawn(async move {
        // Its connections end with it.
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            };
            let (acceptor, told) = (acceptor.clone(), told.clone());
            connections.spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let over_h2 = (req.version() == http::Version::HTTP_2) as usize;
                    told.send_modify(|(n, h2)| {
                        *n += 1;
                        *h2 += over_h2;
                    });
                    async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::new(),
                        )))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (ca_file, port, arrived, server)
}

/// A relay delivering whatever `/open` gets to `url`, retried every 100–200 ms, its attempts
/// timed out after `timeout`, trusting the certificates of `ca_file`.
async fn relay_to(
    dir: &std::path::Path,
    url: &str,
    timeout: &str,
    ca_file: &std::path::Path,
) -> support::RelayProcess {
    let config = format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"

[store]
path = "data"

[[sources]]
name = "open"
path = "/open"

[[destinations]]
name = "internal"
url = "{url}"
timeout = "{timeout}"
retry = {{ first = "100ms", max_delay = "200ms" }}

[[routes]]
name = "all"
source = "open"
to = ["internal"]
"#
    );
    let cfg = dir.join("routes.toml");
    std::fs::write(&cfg, config).unwrap();
    support::RelayProcess::spawn_with_env(
        &cfg,
        &dir.join("relay.log"),
        &[("SSL_CERT_FILE", ca_file.to_str().unwrap())],
    )
    .await
}

async fn post_open(relay: &support::RelayProcess, body: &[u8]) {
    let answer = support::try_post(
        &support::client(),
        &format!("http://{}/open", relay.ingress),
        body.to_vec(),
        WAIT,
    )
    .await
    .expect("an answer");
    assert_eq!(answer.status, 200);
}

/// A destination whose certificate only the host trusts (here through `SSL_CERT_FILE`, as
/// a private CA added to the system's store would be), is delivered to.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_behind_a_ca_the_host_trusts_is_delivered_to() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_file, port, mut arrived, server) = https_sink(dir.path(), false).await;
    let url = format!("https://localhost:{port}/hook");
    let relay = relay_to(dir.path(), &url, "10s", &ca_file).await;
    post_open(&relay, br#"{"internal":true}"#).await;
    let delivered = tokio::time::timeout(WAIT, arrived.wait_for(|(n, _)| *n >= 1)).await;
    if !matches!(delivered, Ok(Ok(_))) {
        let log = relay.finish().await;
        server.abort();
        panic!("never delivered over HTTPS; the relay's log:\n{log}");
    }
    relay.sigterm(std::time::Duration::from_secs(10)).await;
    server.abort();
}

/// A TCP proxy to 127.0.0.1:`to` that can freeze the connections it has: once `freeze`
/// is sent a number above theirs, they stop passing bytes with their sockets kept open (a
/// path black-holed by a failed-over load balancer), while connections made later pass.
async fn freezing_proxy(
    to: u16,
) -> (
    u16,
    tokio::sync::watch::Sender<u64>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (freeze, frozen) = tokio::sync::watch::channel(0u64);
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((mut inbound, _)) = listener.accept().await {
            let mut frozen = frozen.clone();
            let generation = *frozen.borrow();
            connections.spawn(async move {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await
                else {
                    return;
                };
                let froze = tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => false,
                    _ = frozen.wait_for(|g| *g > generation) => true,
                };
                if froze {
                    // Held open, passing nothing, until the proxy ends.
                    std::future::pending::<()>().await;
                }
            });
        }
    });
    (port, freeze, task)
}

/// An HTTP/2 destination whose connection goes silent (no FIN, no RST: a black-holed path)
/// is reached again over a new one: the relay's PINGs find the old one dead. Without them
/// every attempt went out over the dead connection, each timing out, for as long as the
/// kernel kept it (some 15 minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_http2_connection_is_dropped_and_the_destination_reached_again() {
    let dir = tempfile::tempdir().unwrap();
    let (ca_file, sink_port, mut arrived, server) = https_sink(dir.path(), true).await;
    let (port, freeze, proxy) = freezing_proxy(sink_port).await;
    let url = format!("https://localhost:{port}/hook");
    let relay = relay_to(dir.path(), &url, "1s", &ca_file).await;
    post_open(&relay, br#"{"n":1}"#).await;
    let first = tokio::time::timeout(WAIT, arrived.wait_for(|(n, _)| *n >= 1))
        .await
        .map(|r| r.map(|seen| *seen));
    assert!(
        matches!(first, Ok(Ok((1, 1)))),
        "the first event, over HTTP/2: {first:?}"
    );
    freeze.send_replace(1);
    post_open(&relay, br#"{"n":2}"#).await;
    // A PING after 5 s without a frame, its answer awaited 5 s more, then a new connection.
    let second = tokio::time::timeout(Duration::from_secs(30), arrived.wait_for(|(n, _)| *n >= 2))
        .await
        .map(|r| r.map(|seen| *seen));
    let reached = matches!(second, Ok(Ok(_)));
    if !reached {
        let log = relay.finish().await;
        proxy.abort();
        server.abort();
        panic!("never reached over a new connection; the relay's log:\n{log}");
    }
    // At least once (an attempt timed out on the dead connection may be sent again), and
    // all of it over HTTP/2.
    assert!(
        matches!(second, Ok(Ok((n, h2))) if n == h2),
        "over HTTP/2: {second:?}"
    );
    relay.sigterm(Duration::from_secs(10)).await;
    proxy.abort();
    server.abort();
}
