//! Transport security: TLS for both listeners and the identity of agents
//! that authenticate with a client certificate (mTLS).
//!
//! When `tls_cert_file` and `tls_key_file` are set, the gRPC listener (tonic's
//! own rustls acceptor) and the HTTP listener ([`TlsListener`], tokio-rustls
//! under axum) serve TLS only; both use the aws-lc-rs provider. With
//! `tls_client_ca_file`, the gRPC listener also asks for client certificates
//! and verifies them against that bundle (`tls_client_auth`: `optional` lets
//! callers without one in, `required` refuses them in the handshake). The
//! HTTP listener never asks for one: browsers reach `/oauth/callback`.
//!
//! **Certificate → agent mapping.** A verified client certificate names an
//! agent by exactly one subject alternative name URI
//! `urn:vaultguard:agent:<agent_id>` ([`AGENT_URI_PREFIX`]). The CA is the
//! platform's: issuing such a certificate is the platform vouching that its
//! holder is that agent. The agent's tenant is read from the agent row, never
//! from the certificate or the request, and its standing is checked as for
//! bearer tokens (`crate::auth`). A certificate without such a URI names no
//! one (the caller then needs a bearer); one with several is refused.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::{ServerTlsConfig, TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Certificate, Identity};

use crate::config::Config;
use crate::error::{Error, Result};

/// The SAN URI prefix by which a client certificate names an agent.
pub const AGENT_URI_PREFIX: &str = "urn:vaultguard:agent:";

/// The longest a TLS handshake may take on either listener.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether a client certificate is optional or required on the gRPC listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    Optional,
    Required,
}

/// The loaded TLS material of one server process.
#[derive(Clone)]
pub struct TlsSetup {
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
    client_ca_pem: Option<Vec<u8>>,
    client_auth: ClientAuth,
    http: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for TlsSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSetup")
            .field("client_auth", &self.client_auth)
            .field("mtls", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

fn read_file(key: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {key} {}: {e}", path.display()))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl TlsSetup {
    /// Loads and checks the configured PEM files; `None` when TLS is off.
    /// Fails on a half configuration (a certificate without its key, a client
    /// CA without a server certificate), unreadable files, a key that does not
    /// match the certificate, or an unknown `tls_client_auth`.
    pub fn from_config(config: &Config) -> anyhow::Result<Option<Self>> {
        let has_cert = !config.tls_cert_file.as_os_str().is_empty();
        let has_key = !config.tls_key_file.as_os_str().is_empty();
        let has_client_ca = !config.tls_client_ca_file.as_os_str().is_empty();
        let client_auth = match config.tls_client_auth.as_str() {
            "" | "optional" => ClientAuth::Optional,
            "required" => ClientAuth::Required,
            other => anyhow::bail!("tls_client_auth must be optional or required, not {other:?}"),
        };
        if !has_cert && !has_key {
            anyhow::ensure!(
                !has_client_ca,
                "tls_client_ca_file needs tls_cert_file and tls_key_file"
            );
            return Ok(None);
        }
        anyhow::ensure!(
            has_cert && has_key,
            "tls_cert_file and tls_key_file must be set together"
        );
        // tonic builds its acceptor with the process default provider, which
        // is ambiguous when several rustls providers are compiled in (ring
        // comes with sqlx); ours is aws-lc-rs. An earlier choice stands.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

        let cert_pem = read_file("tls_cert_file", &config.tls_cert_file)?;
        let key_pem = read_file("tls_key_file", &config.tls_key_file)?;
        let client_ca_pem = if has_client_ca {
            Some(read_file("tls_client_ca_file", &config.tls_client_ca_file)?)
        } else {
            None
        };
        let certs = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("tls_cert_file is not PEM certificates: {e}"))?;
        anyhow::ensure!(!certs.is_empty(), "tls_cert_file holds no certificate");
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|_| anyhow::anyhow!("tls_key_file holds no PEM private key"))?;
        if let Some(ca) = &client_ca_pem {
            let roots = client_roots(ca)?;
            // Built here only to refuse a bad bundle at startup; tonic builds
            // the gRPC listener's own verifier from the same PEM.
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| anyhow::anyhow!("tls_client_ca_file is unusable: {e}"))?;
        }
        let mut http = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow::anyhow!("tls: {e}"))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| anyhow::anyhow!("tls_cert_file and tls_key_file are unusable: {e}"))?;
        http.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(Self {
            cert_pem,
            key_pem,
            client_ca_pem,
            client_auth,
            http: Arc::new(http),
        }))
    }

    /// Whether client certificates are verified (mTLS agent authentication).
    pub fn mtls(&self) -> bool {
        self.client_ca_pem.is_some()
    }

    /// The gRPC listener's TLS settings.
    pub fn grpc_config(&self) -> ServerTlsConfig {
        let config = ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .timeout(HANDSHAKE_TIMEOUT);
        match &self.client_ca_pem {
            Some(ca) => config
                .client_ca_root(Certificate::from_pem(ca))
                .client_auth_optional(self.client_auth == ClientAuth::Optional),
            None => config,
        }
    }

    /// The HTTP listener, serving TLS on `listener`.
    pub fn http_listener(&self, listener: TcpListener) -> TlsListener {
        TlsListener {
            listener,
            acceptor: TlsAcceptor::from(self.http.clone()),
            handshakes: JoinSet::new(),
        }
    }
}

fn client_roots(pem: &[u8]) -> anyhow::Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert =
            cert.map_err(|e| anyhow::anyhow!("tls_client_ca_file is not PEM certificates: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| anyhow::anyhow!("tls_client_ca_file holds a bad certificate: {e}"))?;
    }
    anyhow::ensure!(!roots.is_empty(), "tls_client_ca_file holds no certificate");
    Ok(roots)
}

/// A tonic server builder, serving TLS when `tls` is set.
pub fn grpc_server_builder(tls: Option<&TlsSetup>) -> anyhow::Result<tonic::transport::Server> {
    let builder = tonic::transport::Server::builder();
    match tls {
        Some(tls) => builder
            .tls_config(tls.grpc_config())
            .map_err(|e| anyhow::anyhow!("tls: {e}")),
        None => Ok(builder),
    }
}

/// The end-entity certificate the caller presented on this call's
/// connection, already verified against `tls_client_ca_file` by the
/// handshake. Only the TLS acceptor sets this extension; no request header
/// can.
pub fn peer_certificate(extensions: &http::Extensions) -> Option<CertificateDer<'static>> {
    let info = extensions.get::<TlsConnectInfo<TcpConnectInfo>>()?;
    info.peer_certs()?.first().cloned()
}

/// The agent a verified client certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateAgent {
    pub agent_id: String,
    /// The certificate's issuer, as WhoAmI reports it.
    pub issuer: String,
    /// The certificate's `notAfter`, seconds since the epoch.
    pub expires_at: i64,
}

/// Reads the agent a verified client certificate names: `None` when it has
/// no `urn:vaultguard:agent:` URI. Refuses a certificate naming several, one
/// that cannot be parsed, and one past its `notAfter` at `now_seconds` (the
/// handshake checked it, but a connection can outlive the certificate).
pub fn certificate_agent(
    der: &CertificateDer<'_>,
    now_seconds: i64,
) -> Result<Option<CertificateAgent>> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::{FromDer, X509Certificate};

    let (_, cert) = X509Certificate::from_der(der.as_ref())
        .map_err(|_| Error::Unauthenticated("client certificate cannot be parsed"))?;
    let expires_at = cert.validity().not_after.timestamp();
    if expires_at <= now_seconds {
        return Err(Error::Unauthenticated("client certificate expired"));
    }
    let names = cert
        .subject_alternative_name()
        .map_err(|_| Error::Unauthenticated("client certificate has a bad subject alt name"))?;
    let mut agents = names
        .iter()
        .flat_map(|san| san.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix(AGENT_URI_PREFIX),
            _ => None,
        });
    let Some(agent_id) = agents.next() else {
        return Ok(None);
    };
    if agents.next().is_some() {
        return Err(Error::Unauthenticated(
            "client certificate names more than one agent",
        ));
    }
    if crate::ids::check_id("agent_id", agent_id, crate::ids::IdKind::Agent).is_err() {
        return Err(Error::Unauthenticated(
            "client certificate names a malformed agent id",
        ));
    }
    Ok(Some(CertificateAgent {
        agent_id: agent_id.to_owned(),
        issuer: cert.issuer().to_string(),
        expires_at,
    }))
}

/// The HTTP listener under TLS: accepts TCP connections (Nagle off, as on
/// the plaintext listener) and hands axum those whose handshake completed.
/// Handshakes run as their own tasks with a timeout, so a slow or silent
/// client never holds up the accept loop.
pub struct TlsListener {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Option<(TlsStream<TcpStream>, SocketAddr)>>,
}

impl TlsListener {
    fn start_handshake(&mut self, stream: TcpStream, peer: SocketAddr) {
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(error = %err, "TCP_NODELAY not set on an HTTP connection");
        }
        let acceptor = self.acceptor.clone();
        self.handshakes.spawn(async move {
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => Some((tls, peer)),
                Ok(Err(err)) => {
                    tracing::debug!(%peer, error = %err, "http tls handshake failed");
                    None
                }
                Err(_) => {
                    tracing::debug!(%peer, "http tls handshake timed out");
                    None
                }
            }
        });
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => self.start_handshake(stream, peer),
                    Err(err) => {
                        // As axum does for plain TCP: per-connection errors
                        // are skipped, others (too many open files) back off.
                        tracing::warn!(error = %err, "http accept failed");
                        if !matches!(
                            err.kind(),
                            std::io::ErrorKind::ConnectionRefused
                                | std::io::ErrorKind::ConnectionAborted
                                | std::io::ErrorKind::ConnectionReset
                        ) {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                },
                Some(done) = self.handshakes.join_next() => {
                    if let Ok(Some(ready)) = done {
                        return ready;
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn half_configurations_are_refused() {
        let cert_only = Config {
            tls_cert_file: "cert.pem".into(),
            ..Config::default()
        };
        assert!(TlsSetup::from_config(&cert_only).is_err());
        let ca_only = Config {
            tls_client_ca_file: "ca.pem".into(),
            ..Config::default()
        };
        assert!(TlsSetup::from_config(&ca_only).is_err());
        let bad_mode = Config {
            tls_client_auth: "sometimes".into(),
            ..Config::default()
        };
        assert!(TlsSetup::from_config(&bad_mode).is_err());
        assert!(TlsSetup::from_config(&Config::default()).unwrap().is_none());
    }
}
