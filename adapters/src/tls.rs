//! TLS for the device-facing listeners (MQTT 8883, HTTPS 8443): the server certificate
//! from config, and optional X.509 client certificates.
//!
//! Devices may present a client certificate; they need not (username/password over TLS
//! stays possible). During the handshake [`DeviceCertVerifier`] only checks what needs
//! no registry: the certificate parses, is valid now, and the client holds its key (the
//! handshake signature). An expired or malformed certificate ends the handshake with a
//! TLS alert. Handshake signatures are checked by webpki, which accepts X.509 v3
//! certificates only (v1 certificates are refused in the handshake). Which tenant trusts the issuer, the issuer's signature and the device
//! behind the subject DN are checked after the handshake by
//! [`crate::device::DeviceRegistry::authenticate_certificate`], since tenants' trusted
//! CAs live in the registry and change at run time.

use std::sync::Arc;

use ferrule_net::tls::{TlsConfig, TlsError};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The rustls configuration of a device listener: `tls`'s certificate and key, client
/// certificates requested (optional) and checked by [`DeviceCertVerifier`].
///
/// # Errors
/// As [`TlsConfig::server_config`].
pub fn device_server_config(tls: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    tls.server_config(Some(Arc::new(DeviceCertVerifier::new())))
}

/// See the module documentation.
#[derive(Debug)]
pub struct DeviceCertVerifier {
    algorithms: WebPkiSupportedAlgorithms,
}

impl DeviceCertVerifier {
    pub fn new() -> Self {
        let provider: CryptoProvider = rustls::crypto::ring::default_provider();
        Self { algorithms: provider.signature_verification_algorithms }
    }
}

impl Default for DeviceCertVerifier {
    fn default() -> Self {
        Self::new()
    }
}

impl ClientCertVerifier for DeviceCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Tenants' CAs are many and change; clients send their certificate regardless.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let Ok((_, cert)) = X509Certificate::from_der(end_entity.as_ref()) else {
            return Err(rustls::Error::InvalidCertificate(CertificateError::BadEncoding));
        };
        let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
        let validity = cert.validity();
        if now < validity.not_before.timestamp() {
            return Err(rustls::Error::InvalidCertificate(CertificateError::NotValidYet));
        }
        if now > validity.not_after.timestamp() {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Expired));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
