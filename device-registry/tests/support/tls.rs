//! Test support: a private CA and a server certificate for 127.0.0.1, as PEM files, and
//! the redis-server arguments that serve TLS with them.

use std::path::PathBuf;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// A CA certificate and a server certificate (with its key) it signed, for `127.0.0.1`
/// and `localhost`, in a temporary directory.
pub struct TlsFiles {
    pub dir: tempfile::TempDir,
}

impl TlsFiles {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // Distinct names: OpenSSL (redis-cli, the cluster bus) takes a certificate whose
        // issuer is its own subject for self-signed.
        ca.distinguished_name.push(DnType::CommonName, "ferrule test Redis CA");
        let ca = ca.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let names = vec!["127.0.0.1".to_owned(), "localhost".to_owned()];
        let mut server = CertificateParams::new(names).unwrap();
        server.distinguished_name.push(DnType::CommonName, "127.0.0.1");
        let cert = server.signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("server.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
        Self { dir }
    }

    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }

    /// redis-server arguments: TLS on `tls_port` besides the plain port (which the test
    /// support's PING and node commands use), clients not asked for certificates.
    pub fn server_args(&self, tls_port: u16) -> Vec<String> {
        let mut args: Vec<String> = ["--tls-port", &tls_port.to_string()].map(String::from).into();
        for (flag, file) in [
            ("--tls-cert-file", "server.pem"),
            ("--tls-key-file", "server.key"),
            ("--tls-ca-cert-file", "ca.pem"),
        ] {
            args.extend([flag.to_owned(), self.path(file)]);
        }
        args.extend(["--tls-auth-clients", "no"].map(String::from));
        args
    }
}
