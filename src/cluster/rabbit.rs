//! RabbitMQ's management API: what its AMQP 1.0 plugin cannot declare.

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use http_body_util::{BodyExt, Full};

use ferrule_messaging::remote::Provision;

/// RabbitMQ's management API: quorum queues for events, the telemetry policy.
pub struct RabbitAdmin {
    authority: String,
    base_path: String,
    authorization: String,
}

impl RabbitAdmin {
    /// # Errors
    /// `url` is not `http://host[:port][/path]`.
    pub fn new(url: &str, username: &str, password: &str) -> anyhow::Result<Self> {
        use base64::Engine;
        let rest = url.strip_prefix("http://").context("management_url must be http://")?;
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        anyhow::ensure!(!authority.is_empty(), "management_url has no host");
        let authority =
            if authority.contains(':') { authority.to_owned() } else { format!("{authority}:80") };
        let credentials =
            base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
        Ok(Self {
            authority,
            base_path: format!("/{}", path.trim_end_matches('/')).trim_end_matches('/').to_owned(),
            authorization: format!("Basic {credentials}"),
        })
    }

    /// Makes the policy that bounds telemetry queues: messages live 2 s, at most 100,000
    /// per queue (oldest dropped, never `reject-publish`, which crashes 3.x sessions), and
    /// a queue nobody consumed for 60 s goes away.
    pub async fn telemetry_policy(&self) -> anyhow::Result<()> {
        let body = serde_json::json!({
            "pattern": "^telemetry\\.",
            "apply-to": "queues",
            "priority": 0,
            "definition": {"message-ttl": 2000, "max-length": 100000, "overflow": "drop-head", "expires": 60000}
        });
        self.put("/api/policies/%2F/ferrule-telemetry", body).await
    }

    async fn put(&self, path: &str, body: serde_json::Value) -> anyhow::Result<()> {
        let connect = tokio::net::TcpStream::connect(&self.authority);
        let stream = tokio::time::timeout(Duration::from_secs(5), connect).await??;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let request = hyper::Request::put(format!("{}{path}", self.base_path))
            .header(hyper::header::HOST, self.authority.as_str())
            .header(hyper::header::AUTHORIZATION, self.authorization.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))?;
        let response =
            tokio::time::timeout(Duration::from_secs(10), sender.send_request(request)).await??;
        let status = response.status();
        if !status.is_success() {
            let body =
                response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            anyhow::bail!(
                "{path}: {status} {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            );
        }
        Ok(())
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn encode_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Provision for RabbitAdmin {
    fn event_queue(&self, tenant: &str) -> BoxFuture<'static, Result<(), String>> {
        let path = format!("/api/queues/%2F/{}", encode_segment(&format!("event.{tenant}")));
        let admin = RabbitAdmin {
            authority: self.authority.clone(),
            base_path: self.base_path.clone(),
            authorization: self.authorization.clone(),
        };
        Box::pin(async move {
            let body =
                serde_json::json!({"durable": true, "arguments": {"x-queue-type": "quorum"}});
            admin.put(&path, body).await.map_err(|e| format!("provisioning the event queue: {e:#}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_segments() {
        assert_eq!(encode_segment("event.a b/c"), "event.a%20b%2Fc");
        let admin = RabbitAdmin::new("http://127.0.0.1:15672", "guest", "guest").unwrap();
        assert_eq!((admin.authority.as_str(), admin.base_path.as_str()), ("127.0.0.1:15672", ""));
        assert_eq!(admin.authorization, "Basic Z3Vlc3Q6Z3Vlc3Q=");
        let admin = RabbitAdmin::new("http://rabbit/mgmt/", "u", "p").unwrap();
        assert_eq!((admin.authority.as_str(), admin.base_path.as_str()), ("rabbit:80", "/mgmt"));
        assert!(RabbitAdmin::new("https://rabbit", "u", "p").is_err());
    }
}
