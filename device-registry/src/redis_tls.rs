//! TLS to Redis: how the registry's store and cluster mode's leases connect to Redis.
//!
//! A `rediss://` URL connects over TLS (rustls, the ring provider every other listener
//! uses) and verifies the server's certificate and name: against the certificates of a CA
//! file when one is configured (a private CA, as managed Redis services and self-run
//! clusters often use), else against the system's roots. A `redis://` URL stays plain
//! text. A Redis Cluster's nodes are all reached the way the seed URLs say.

use std::path::Path;
use std::sync::Arc;

use redis::cluster::ClusterClientBuilder;

/// The trust for `rediss://` connections: the certificates of a CA file, or the system's
/// roots. Cheap to clone.
#[derive(Clone, Default)]
pub struct RedisTls {
    /// The CA file's PEM (`None`: the system's roots).
    ca_pem: Option<Arc<[u8]>>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let roots = if self.ca_pem.is_some() { "CA file" } else { "system roots" };
        f.debug_struct("RedisTls").field("roots", &roots).finish()
    }
}

/// Whether `url` asks for TLS (`rediss://`).
pub fn is_tls_url(url: &str) -> bool {
    url.get(..9).is_some_and(|s| s.eq_ignore_ascii_case("rediss://"))
}

impl RedisTls {
    /// Trust the certificates of the PEM file at `ca_file`; `None`: the system's roots.
    ///
    /// # Errors
    /// The file cannot be read or holds no usable certificate (checked as every other
    /// CA file is, by [`ferrule_net::tls::client_connector`]).
    pub fn from_ca_file(ca_file: Option<&Path>) -> std::io::Result<Self> {
        let Some(path) = ca_file else { return Ok(Self::default()) };
        ferrule_net::tls::client_connector(path).map_err(std::io::Error::other)?;
        Ok(Self { ca_pem: Some(std::fs::read(path)?.into()) })
    }

    fn certificates(&self) -> Option<redis::TlsCertificates> {
        let pem = self.ca_pem.as_ref()?;
        Some(redis::TlsCertificates { client_tls: None, root_cert: Some(pem.to_vec()) })
    }

    /// A client for the server at `url`.
    ///
    /// # Errors
    /// An invalid URL (or a CA file's certificates rustls cannot use).
    pub fn client(&self, url: &str) -> redis::RedisResult<redis::Client> {
        match self.certificates() {
            Some(certs) if is_tls_url(url) => redis::Client::build_with_tls(url, certs),
            _ => redis::Client::open(url),
        }
    }

    /// A builder of a client for the Redis Cluster whose seed nodes are `nodes`.
    pub fn cluster<'a>(&self, nodes: impl IntoIterator<Item = &'a str>) -> ClusterClientBuilder {
        let nodes: Vec<&str> = nodes.into_iter().collect();
        let tls = nodes.iter().any(|n| is_tls_url(n));
        let builder = ClusterClientBuilder::new(nodes);
        match self.certificates() {
            Some(certs) if tls => builder.certs(certs),
            _ => builder,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_urls_and_ca_files() {
        assert!(is_tls_url("rediss://r:6380/0") && is_tls_url("REDISS://r/"));
        assert!(!is_tls_url("redis://r:6379/0") && !is_tls_url("rediss:/"));
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("not-pem");
        std::fs::write(&not_pem, b"hello").unwrap();
        assert!(RedisTls::from_ca_file(Some(&not_pem)).is_err());
        assert!(RedisTls::from_ca_file(Some(&dir.path().join("missing"))).is_err());
        assert!(RedisTls::from_ca_file(None).unwrap().ca_pem.is_none());
        // A plain URL is plain whatever the trust; a TLS URL takes the CA file.
        let tls = RedisTls::default();
        assert!(tls.client("redis://127.0.0.1:6379/0").is_ok());
        assert!(tls.client("rediss://127.0.0.1:6380/0").is_ok());
    }
}
