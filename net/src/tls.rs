//! TLS for Ferrule's TCP listeners (rustls with the ring provider, PEM files from config).

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
pub use tokio_rustls::{TlsAcceptor, TlsConnector};

/// TLS settings of one listener. TLS is on when both `cert` and `key` are set. The files
/// are re-read when they change (checked once a second, in the background).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the server certificate chain (leaf first).
    pub cert: Option<PathBuf>,
    /// PEM file with the server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<PathBuf>,
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Only one of `cert` and `key` is set.
    #[error("TLS needs both `cert` and `key`")]
    Incomplete,
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {reason}")]
    Pem { path: PathBuf, reason: String },
    /// rustls refused the certificate/key pair.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert.is_some() || self.key.is_some()
    }

    /// Builds the acceptor, reading the PEM files now (so errors show at start-up).
    pub fn acceptor(&self) -> Result<TlsAcceptor, TlsError> {
        Ok(TlsAcceptor::from(self.server_config(None)?))
    }

    /// The rustls server configuration, reading the PEM files now; with `client_auth`,
    /// clients are asked for certificates, which that verifier checks.
    pub fn server_config(
        &self,
        client_auth: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    ) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
            return Err(TlsError::Incomplete);
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let resolver = ReloadingCert::new(cert.clone(), key.clone(), provider.clone())?;
        let builder = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?;
        let builder = match client_auth {
            Some(verifier) => builder.with_client_cert_verifier(verifier),
            None => builder.with_no_client_auth(),
        };
        Ok(Arc::new(builder.with_cert_resolver(Arc::new(resolver))))
    }
}

/// How often the certificate files are checked for changes.
const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The server certificate, reloaded when its PEM files change (hot rotation, e.g. by
/// cert-manager or certbot). A background thread compares the files' modification times
/// and sizes with the loaded ones every [`RELOAD_CHECK_INTERVAL`] and swaps in the new
/// pair; handshakes only read the current one (no file access in a handshake). A new pair
/// that does not load (half-written file, key not matching) is logged and the previous
/// certificate stays in use. The thread ends when the configuration is dropped.
#[derive(Debug)]
struct ReloadingCert {
    current: Arc<RwLock<Arc<CertifiedKey>>>,
}

impl ReloadingCert {
    fn new(
        cert: PathBuf,
        key: PathBuf,
        provider: Arc<rustls::crypto::CryptoProvider>,
    ) -> Result<Self, TlsError> {
        let mut loaded_stamp = stamp(&cert, &key);
        let current = Arc::new(RwLock::new(load(&cert, &key, &provider)?));
        let watched = Arc::downgrade(&current);
        let watch = move || loop {
            std::thread::sleep(RELOAD_CHECK_INTERVAL);
            let Some(current) = watched.upgrade() else { return };
            let now = stamp(&cert, &key);
            if now.is_none() || now == loaded_stamp {
                continue;
            }
            match load(&cert, &key, &provider) {
                Ok(key) => {
                    tracing::info!(cert = %cert.display(), "TLS certificate reloaded");
                    *current.write().unwrap_or_else(|p| p.into_inner()) = key;
                    loaded_stamp = now;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "TLS certificate changed but does not load; keeping the previous one");
                    // Tried once per change: a broken pair is not reloaded every second.
                    loaded_stamp = now;
                }
            }
        };
        std::thread::Builder::new()
            .name("ferrule-tls-reload".into())
            .spawn(watch)
            .map_err(|e| TlsError::Pem { path: PathBuf::new(), reason: e.to_string() })?;
        Ok(Self { current })
    }
}

fn stamp(cert: &Path, key: &Path) -> Option<[(SystemTime, u64); 2]> {
    let one =
        |p: &Path| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
    Some([one(cert)?, one(key)?])
}

fn load(
    cert: &Path,
    key: &Path,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let pem = |path: &Path, reason: String| TlsError::Pem { path: path.to_owned(), reason };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem(cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem(cert, "no certificate found".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| pem(key, e.to_string()))?;
    let certified = CertifiedKey::from_der(chain, key_der, provider)?;
    Ok(Arc::new(certified))
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// A TLS client trusting only the CA certificates in `ca_file` (PEM): for Ferrule's own
/// outgoing connections (the shared broker in cluster mode).
///
/// # Errors
/// The file cannot be read or holds no usable certificate.
pub fn client_connector(ca_file: &Path) -> Result<tokio_rustls::TlsConnector, TlsError> {
    let pem = |reason: String| TlsError::Pem { path: ca_file.to_owned(), reason };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).map_err(|e| pem(e.to_string()))? {
        roots.add(cert.map_err(|e| pem(e.to_string()))?).map_err(|e| pem(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(pem("no certificate found".into()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Opens TLS over `stream` to `host` (a DNS name or an IP address, checked against the
/// server's certificate).
///
/// # Errors
/// `host` is not a valid name, or the handshake failed (untrusted certificate, ...).
pub async fn connect(
    connector: &tokio_rustls::TlsConnector,
    host: &str,
    stream: TcpStream,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}

/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs the server side of a TLS handshake, bounded by [`HANDSHAKE_TIMEOUT`]; a failed or
/// stalled handshake is logged (it is the client's problem, not the server's) and `None`.
pub async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    peer: std::net::SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(e)) => {
            tracing::info!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::info!(%peer, "TLS handshake timed out");
            None
        }
    }
}
