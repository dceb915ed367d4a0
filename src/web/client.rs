//! The outbound HTTP client every stage shares (deliveries and reply routes): hyper-util's
//! pooled client over hyper-rustls (ring provider, ALPN h2 and http/1.1; plain `http://`
//! URLs too). It trusts the public roots (webpki-roots) and the system's store, or the
//! file `SSL_CERT_FILE` names, so destinations behind a private CA can be reached.
//! Redirects are not followed. An HTTP/2 connection that stops answering is found out by
//! PINGs and closed ([`H2_PING_AFTER`]).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};

/// How long an idle pooled connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(60);
/// How long a TCP connect may take. The call's own timeout bounds the caller, but a
/// connect the pool finishes in the background (its caller served by a pooled connection
/// meanwhile) has only this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive on outbound connections: a peer gone without a word is found out.
const KEEPALIVE: Duration = Duration::from_secs(60);
/// HTTP/2: a connection with requests open that has heard nothing for this long is sent a
/// PING, and closed if its answer does not come within as long again. TCP keepalive cannot
/// tell a connection black-holed by a failed-over load balancer (its data unacknowledged)
/// from a busy one, and every request to the destination shares that one connection: a
/// timed-out request resets only its stream, so without this the connection, and every
/// delivery over it, hangs until the kernel gives up on it, some 15 minutes.
const H2_PING_AFTER: Duration = Duration::from_secs(5);

/// The pooled outbound client. Cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

/// The public roots, and those of the system's store (or of the file `SSL_CERT_FILE`
/// names): an internal destination's private CA is trusted once the host trusts it.
fn roots() -> rustls::RootCertStore {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let system = rustls_native_certs::load_native_certs();
    for e in &system.errors {
        tracing::warn!(error = %e, "reading the system's trusted certificates failed; the public roots are trusted still");
    }
    let (added, ignored) = roots.add_parsable_certificates(system.certs);
    tracing::debug!(added, ignored, "the system's trusted certificates");
    roots
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpClient")
    }
}

impl HttpClient {
    /// Builds the client with an explicit ring provider (no process-wide default needed).
    pub fn new() -> Result<Self, rustls::Error> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(CONNECT_TIMEOUT));
        http.set_keepalive(Some(KEEPALIVE));
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots())
        .with_no_client_auth();
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_keep_alive_interval(H2_PING_AFTER)
            .http2_keep_alive_timeout(H2_PING_AFTER)
            .http2_keep_alive_while_idle(false)
            .build(https);
        Ok(HttpClient { inner })
    }

    /// Sends `req` on a pooled connection.
    pub fn request(&self, req: Request<Full<Bytes>>) -> ResponseFuture {
        self.inner.request(req)
    }
}
