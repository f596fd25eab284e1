//! Connections to the shared broker: made on first use, one per instance (or one per
//! tenant for a Ferrule broker's `name@*` user), tried URL by URL, made again once lost.
//! Every link gets its own session (RabbitMQ 3.x ends the whole session on an attach
//! error, which would take the other links with it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::{Connection, Session};

use crate::config::BackendConfig;

/// How long opening a connection or beginning a session may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often [`Pool::check`] runs (the readiness probe reads its last answer).
pub(crate) const CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// Largest frame this side accepts (advertised in `open`).
const MAX_FRAME_SIZE: u32 = 65_536;
/// Largest message a bridge link takes from the broker (the receiver refuses larger ones
/// itself, so the frame checker need not copy them).
pub(crate) const MAX_MESSAGE_SIZE: u64 = 16 * 1024 * 1024;

/// One broker to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host:port`.
    pub address: String,
    /// `amqps://`: TLS, the certificate checked against `host`.
    pub tls: bool,
}

impl Endpoint {
    fn host(&self) -> &str {
        let host = self.address.rsplit_once(':').map_or(self.address.as_str(), |(h, _)| h);
        host.trim_start_matches('[').trim_end_matches(']')
    }
}

/// The endpoint of an `amqp[s]://[user:password@]host[:port]` URL (credentials come from
/// the configuration, not the URL; ports default to 5672 and 5671).
pub fn parse_url(url: &str) -> Result<Endpoint, String> {
    let (rest, tls) = match (url.strip_prefix("amqp://"), url.strip_prefix("amqps://")) {
        (Some(rest), _) => (rest, false),
        (_, Some(rest)) => (rest, true),
        _ => return Err("only amqp:// and amqps:// URLs are supported".into()),
    };
    let rest = rest.split('/').next().unwrap_or_default();
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    if host.is_empty() {
        return Err("no host".into());
    }
    let address = if host.rsplit_once(':').is_some_and(|(_, port)| port.parse::<u16>().is_ok()) {
        host.to_owned()
    } else {
        format!("{host}:{}", if tls { 5671 } else { 5672 })
    };
    Ok(Endpoint { address, tls })
}

pub(crate) struct Pool {
    hosts: Vec<Endpoint>,
    /// For `amqps://` endpoints (`tls_ca_file`); `Err` keeps why it could not be made.
    tls: Result<ferrule_net::tls::TlsConnector, String>,
    next: AtomicUsize,
    username: String,
    password: String,
    /// `name` of a `name@*` user: one connection per tenant, as `name@TENANT`.
    per_tenant: Option<String>,
    container: String,
    /// Connection key (tenant, or "" when shared) → connection.
    conns: tokio::sync::Mutex<HashMap<String, ConnectionHandle<()>>>,
    /// The broker's state as last seen: a connection opened (or kept open), or every URL
    /// failed. What `/health/ready` reports in cluster mode.
    reachable: AtomicBool,
}

impl Pool {
    pub(crate) fn new(config: &BackendConfig, instance: &str) -> Self {
        Self {
            hosts: config.urls.iter().filter_map(|u| parse_url(u).ok()).collect(),
            tls: match &config.tls_ca_file {
                Some(path) => ferrule_net::tls::client_connector(path).map_err(|e| e.to_string()),
                None => Err("no tls_ca_file configured".into()),
            },
            next: AtomicUsize::new(0),
            username: config.username.clone(),
            password: config.password.clone(),
            per_tenant: config.username.strip_suffix("@*").map(str::to_owned),
            container: format!("ferrule-{instance}"),
            conns: Default::default(),
            reachable: AtomicBool::new(false),
        }
    }

    /// Whether the broker was reachable when last checked or used.
    pub(crate) fn reachable(&self) -> bool {
        self.reachable.load(Ordering::Acquire)
    }

    /// Checks the broker and records the answer ([`Pool::reachable`]): the shared
    /// connection is kept open (made again if it was lost), so that an instance that lost
    /// the broker is seen as such before a device sends anything. With one connection per
    /// tenant there is no connection to keep for nobody: any live one will do, else the
    /// brokers' TCP listeners must answer.
    pub(crate) async fn check(&self) {
        let ok = if self.per_tenant.is_none() {
            let mut conns = self.conns.lock().await;
            if conns.get("").is_some_and(|c| !c.is_closed()) {
                true
            } else {
                if let Some(mut lost) = conns.remove("") {
                    let _ = lost.close().await;
                }
                match self.connect("").await {
                    Ok(conn) => {
                        conns.insert(String::new(), conn);
                        true
                    }
                    Err(_) => false,
                }
            }
        } else {
            self.conns.lock().await.values().any(|c| !c.is_closed()) || self.a_host_answers().await
        };
        self.reachable.store(ok, Ordering::Release);
    }

    /// Whether one of the brokers accepts a TCP connection.
    async fn a_host_answers(&self) -> bool {
        for host in &self.hosts {
            let connect = tokio::net::TcpStream::connect(&host.address);
            if matches!(tokio::time::timeout(CONNECT_TIMEOUT, connect).await, Ok(Ok(_))) {
                return true;
            }
        }
        false
    }

    /// A new session for a link of `tenant`'s, on a live connection.
    pub(crate) async fn session(&self, tenant: &str) -> Result<SessionHandle<()>, String> {
        let key = if self.per_tenant.is_some() { tenant } else { "" };
        let mut conns = self.conns.lock().await;
        if let Some(conn) = conns.get_mut(key) {
            match tokio::time::timeout(CONNECT_TIMEOUT, Session::begin(conn)).await {
                Ok(Ok(session)) => return Ok(session),
                // The connection is gone (or stuck): make a new one.
                _ => {
                    if let Some(mut conn) = conns.remove(key) {
                        let _ = conn.close().await;
                    }
                }
            }
        }
        let mut conn = self.connect(tenant).await?;
        let session = tokio::time::timeout(CONNECT_TIMEOUT, Session::begin(&mut conn))
            .await
            .map_err(|_| "beginning a session timed out".to_owned())?
            .map_err(|e| format!("beginning a session: {e}"))?;
        conns.insert(key.to_owned(), conn);
        Ok(session)
    }

    /// Opens a connection to the next broker that answers.
    async fn connect(&self, tenant: &str) -> Result<ConnectionHandle<()>, String> {
        let mut last = String::from("no broker URL");
        for _ in 0..self.hosts.len() {
            let host = &self.hosts[self.next.fetch_add(1, Ordering::Relaxed) % self.hosts.len()];
            let host_name = &host.address;
            match tokio::time::timeout(CONNECT_TIMEOUT, self.open(host, tenant)).await {
                Ok(Ok(conn)) => {
                    tracing::info!(endpoint = %host_name, tls = host.tls, "connected (cluster mode)");
                    self.reachable.store(true, Ordering::Release);
                    return Ok(conn);
                }
                Ok(Err(e)) => last = format!("{host_name}: {e}"),
                Err(_) => last = format!("{host_name}: timed out"),
            }
        }
        self.reachable.store(false, Ordering::Release);
        Err(last)
    }

    async fn open(&self, host: &Endpoint, tenant: &str) -> Result<ConnectionHandle<()>, String> {
        let stream =
            tokio::net::TcpStream::connect(&host.address).await.map_err(|e| e.to_string())?;
        // fe2o3-amqp does not set it; without it Nagle delays every small transfer.
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let hostname = host.host();
        let builder = Connection::builder()
            .container_id(format!("{}-{}", self.container, uuid::Uuid::new_v4().simple()))
            .hostname(hostname)
            .max_frame_size(MAX_FRAME_SIZE)
            .idle_time_out(60_000u32);
        let builder = if self.username.is_empty() {
            builder
        } else {
            let username = match &self.per_tenant {
                Some(name) => format!("{name}@{tenant}"),
                None => self.username.clone(),
            };
            builder.sasl_profile(SaslProfile::Plain { username, password: self.password.clone() })
        };
        if host.tls {
            // TLS below fe2o3 (it sees a plain stream): the crate's own TLS features would
            // bring a second TLS stack into the build.
            let connector = self.tls.as_ref().map_err(|e| format!("amqps: {e}"))?;
            let stream = ferrule_net::tls::connect(connector, hostname, stream)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            builder.open_with_stream(guarded(stream)).await.map_err(|e| e.to_string())
        } else {
            builder.open_with_stream(guarded(stream)).await.map_err(|e| e.to_string())
        }
    }

    /// Closes every connection.
    pub(crate) async fn close(&self) {
        let conns: Vec<_> = self.conns.lock().await.drain().collect();
        for (_, mut conn) in conns {
            let _ = tokio::time::timeout(CONNECT_TIMEOUT, conn.close()).await;
        }
    }
}

/// What the broker (or a peer) sends is checked frame by frame before fe2o3-amqp decodes
/// it, as on the listener: a message nested past the guard's depth, published by anyone
/// who can write to the broker's queues, would otherwise overflow a decoding task's stack
/// (serde_amqp decodes recursively).
fn guarded<S>(stream: S) -> crate::guard::Guarded<S> {
    let checker = crate::guard::FrameChecker::new(MAX_FRAME_SIZE, MAX_MESSAGE_SIZE as usize);
    crate::guard::Guarded::new(stream, checker)
}

#[cfg(test)]
mod tests {
    use super::parse_url;

    #[test]
    fn urls() {
        let at = |url| parse_url(url).map(|e| (e.address, e.tls));
        assert_eq!(at("amqp://127.0.0.1:5681").unwrap(), ("127.0.0.1:5681".into(), false));
        assert_eq!(at("amqp://u:p@rabbit/").unwrap(), ("rabbit:5672".into(), false));
        assert_eq!(at("amqps://rabbit").unwrap(), ("rabbit:5671".into(), true));
        assert_eq!(parse_url("amqps://[::1]:5671").unwrap().host(), "::1");
        assert!(parse_url("http://rabbit").is_err());
        assert!(parse_url("amqp://").is_err());
    }
}
