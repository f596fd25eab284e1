//! A small HTTP/1.1 client for the management API (used by the CLI and by tests).
//! One connection per request: operators' CLI calls are rare, and it keeps the client
//! free of pooling state.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Largest response body the client reads.
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// Client failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The base URL is not `http://host:port[/prefix]`.
    #[error("invalid registry URL {0:?}: expected http://host:port")]
    BadUrl(String),
    /// Connecting or talking HTTP failed.
    #[error("cannot reach the registry at {url}: {reason}")]
    Connection {
        /// Base URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The registry answered with an error status.
    #[error("registry answered {status}: {message}")]
    Status {
        /// HTTP status.
        status: StatusCode,
        /// The `error` field of the body, or the raw body.
        message: String,
    },
}

/// A response from the registry.
#[derive(Debug, Clone)]
pub struct ClientResponse {
    /// HTTP status.
    pub status: StatusCode,
    /// `ETag` header, quotes removed.
    pub etag: Option<String>,
    /// `Location` header.
    pub location: Option<String>,
    /// `WWW-Authenticate` header.
    pub www_authenticate: Option<String>,
    /// Body bytes.
    pub body: Bytes,
}

impl ClientResponse {
    /// The body as JSON (`Null` if empty or not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// Turns error statuses into [`ClientError::Status`].
    ///
    /// # Errors
    /// [`ClientError::Status`] for 4xx/5xx.
    pub fn ok(self) -> Result<Self, ClientError> {
        if self.status.is_client_error() || self.status.is_server_error() {
            let message = self
                .json()
                .get("error")
                .and_then(|e| e.as_str())
                .map(str::to_owned)
                .unwrap_or_else(|| String::from_utf8_lossy(&self.body).into_owned());
            return Err(ClientError::Status { status: self.status, message });
        }
        Ok(self)
    }
}

/// Management API client.
#[derive(Clone)]
pub struct RegistryClient {
    base: String,
    authority: String,
    prefix: String,
    token: Option<String>,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl RegistryClient {
    /// A client for `base_url` (`http://host:port`, optionally with a path prefix before
    /// `/v1`), sending `token` as a bearer token.
    ///
    /// # Errors
    /// [`ClientError::BadUrl`] for anything but a plain http URL.
    pub fn new(base_url: &str, token: Option<String>) -> Result<Self, ClientError> {
        let uri: Uri = base_url.parse().map_err(|_| ClientError::BadUrl(base_url.to_owned()))?;
        if uri.scheme_str() != Some("http") {
            return Err(ClientError::BadUrl(base_url.to_owned()));
        }
        let authority = uri.authority().ok_or_else(|| ClientError::BadUrl(base_url.to_owned()))?;
        let host_port = if authority.port().is_some() {
            authority.as_str().to_owned()
        } else {
            format!("{}:80", authority.host())
        };
        Ok(Self {
            base: base_url.to_owned(),
            authority: host_port,
            prefix: uri.path().trim_end_matches('/').to_owned(),
            token,
        })
    }

    /// Sends one request; `path` starts with `/v1/`. Returns any status.
    ///
    /// # Errors
    /// [`ClientError::Connection`] if the registry cannot be reached.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
        if_match: Option<&str>,
    ) -> Result<ClientResponse, ClientError> {
        let conn_err = |reason: String| ClientError::Connection { url: self.base.clone(), reason };
        let stream =
            TcpStream::connect(&self.authority).await.map_err(|e| conn_err(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| conn_err(e.to_string()))?;
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.prefix, path))
            .header(header::HOST, self.authority.as_str());
        if let Some(t) = &self.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if let Some(v) = if_match {
            req = req.header(header::IF_MATCH, v);
        }
        let bytes = match body {
            Some(b) => {
                req =
                    req.header(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                Bytes::from(serde_json::to_vec(b).map_err(|e| conn_err(e.to_string()))?)
            }
            None => Bytes::new(),
        };
        let req = req.body(Full::new(bytes)).map_err(|e| conn_err(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(|e| conn_err(e.to_string()))?;
        let (parts, body) = resp.into_parts();
        let body = http_body_util::Limited::new(body, MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| conn_err(e.to_string()))?
            .to_bytes();
        driver.abort();
        let h = |name: header::HeaderName| {
            parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
        };
        Ok(ClientResponse {
            status: parts.status,
            etag: h(header::ETAG).map(|e| e.trim_matches('"').to_owned()),
            location: h(header::LOCATION),
            www_authenticate: h(header::WWW_AUTHENTICATE),
            body,
        })
    }
}
