//! TLS for the ingress: rustls with the ring provider, certificate chain and key from PEM
//! files, ALPN offering HTTP/2 and HTTP/1.1. Each handshake takes the certificate of the
//! config in force, so a reload after a renewal serves the new one.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Which file a problem is about, for the config error.
pub enum TlsProblem {
    Cert(String),
    Key(String),
}

pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsProblem> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| TlsProblem::Cert(format!("cannot read {}: {e}", cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| {
            TlsProblem::Cert(format!("{}: not a PEM certificate ({e})", cert.display()))
        })?;
    if certs.is_empty() {
        return Err(TlsProblem::Cert(format!(
            "{}: no certificate in the file",
            cert.display()
        )));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        TlsProblem::Key(format!(
            "{}: no usable PEM private key ({e})",
            key.display()
        ))
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsProblem::Cert(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| TlsProblem::Key(format!("the key does not fit the certificate: {e}")))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The certificate of the config in force at each handshake.
struct LiveCertificate(Arc<crate::config::Live>);

impl std::fmt::Debug for LiveCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiveCertificate")
    }
}

impl rustls::server::ResolvesServerCert for LiveCertificate {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let config = self.0.get();
        config
            .server
            .tls
            .as_ref()?
            .server_config
            .cert_resolver
            .resolve(hello)
    }
}

/// An acceptor for the ingress that follows reloads: the settings of the config it was
/// started with, the certificate of the one in force. `None` without TLS.
pub fn live_acceptor(live: Arc<crate::config::Live>) -> Option<tokio_rustls::TlsAcceptor> {
    let mut cfg = (*live.get().server.tls.as_ref()?.server_config).clone();
    cfg.cert_resolver = Arc::new(LiveCertificate(live));
    Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}
