//! The management HTTP API (Hono Device Registry Management API v1) on hyper.
//!
//! This module parses requests, authenticates operators and maps errors to statuses in
//! one place ([`ApiError::status`]); what is stored is decided by [`Management`].
//! Request bodies are bounded (`max_body_bytes`, 413) and never logged.
//!
//! Size: one route table for every resource, Hono's and Ferrule's device state, so that
//! the API can be read in one place (about 645 lines of code; tests at the end).

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use crate::management::{Management, ManagementError};
use crate::model::{Credentials, Device, DeviceId, Tenant, TenantId};
use crate::search::{Search, SearchError};
use crate::store::StoreError;

/// Ferrule's own OpenAPI document, served at [`OPENAPI_PATH`].
pub const OPENAPI_YAML: &str = include_str!("../openapi/ferrule-device-registry-v1.yaml");
/// Where the OpenAPI document is served (no authentication needed).
pub const OPENAPI_PATH: &str = "/v1/openapi.yaml";

/// Response body type.
pub type Body = Full<Bytes>;

/// Everything a request handler needs; shared by all connections.
pub struct ApiState {
    /// Management operations.
    pub management: Management,
    /// Accepted operator tokens.
    pub tokens: Vec<String>,
    /// Whether requests without credentials are accepted.
    pub allow_anonymous: bool,
    /// Request body limit.
    pub max_body_bytes: usize,
    /// Devices' connection state (`/v1/state/...`), when the platform tracks it.
    pub states: Option<Arc<dyn DeviceStates>>,
}

/// Devices' connection state as the platform knows it (Ferrule's extension of the API):
/// JSON objects with `connected`, `adapter`, `connected-since`, `last-seen`,
/// `last-known-gateway`.
pub trait DeviceStates: Send + Sync + 'static {
    /// The state of one device (`None`: never seen by this instance).
    fn device_state(&self, tenant: &str, device: &str) -> Option<Value>;
    /// Every device of `tenant` this instance has seen, by id.
    fn tenant_states(&self, tenant: &str) -> Vec<(String, Value)>;
    /// The device's latest deferred commands (`id`, `name`, `queued`, `expires`, `status`:
    /// queued, delivered, expired or deleted), oldest first.
    fn deferred_commands(&self, tenant: &str, device: &str) -> Vec<Value>;
    /// Deletes the commands still queued for the device; how many there were.
    fn delete_deferred_commands(&self, tenant: &str, device: &str) -> usize;
}

/// Why a request failed; each variant has one HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Missing or wrong operator credentials (401).
    #[error("authentication required")]
    Unauthorized,
    /// Malformed request (400).
    #[error("{0}")]
    BadRequest(String),
    /// No such resource or route (404).
    #[error("{0}")]
    NotFound(String),
    /// Known path, unsupported method (405).
    #[error("method not allowed")]
    MethodNotAllowed(&'static str),
    /// Body larger than the limit (413).
    #[error("request body too large")]
    TooLarge,
    /// Management layer failure (status by kind).
    #[error(transparent)]
    Management(#[from] ManagementError),
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        Self::Management(ManagementError::Store(e))
    }
}

impl From<SearchError> for ApiError {
    fn from(e: SearchError) -> Self {
        Self::BadRequest(e.0)
    }
}

impl ApiError {
    /// The one place errors become statuses.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Management(ManagementError::BadRequest(_)) => StatusCode::BAD_REQUEST,
            Self::Management(ManagementError::LimitReached(_)) => StatusCode::FORBIDDEN,
            Self::Management(ManagementError::PoolClosed | ManagementError::Busy) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Management(ManagementError::Store(e)) => match e {
                StoreError::NotFound(_) => StatusCode::NOT_FOUND,
                StoreError::AlreadyExists(_)
                | StoreError::Conflict(_)
                | StoreError::CaSubjectInUse { .. } => StatusCode::CONFLICT,
                StoreError::VersionMismatch => StatusCode::PRECONDITION_FAILED,
                StoreError::Backend(_) => StatusCode::SERVICE_UNAVAILABLE,
                StoreError::Corrupt(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }

    fn into_response(self) -> Response<Body> {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(error = %self, "management request failed");
        }
        let body = match &self {
            // Hono's example answer names the subject DN in its own property as well.
            Self::Management(ManagementError::Store(StoreError::CaSubjectInUse { subject_dn })) => {
                json!({ "error": self.to_string(), "subject-dn": subject_dn })
            }
            _ => json!({ "error": self.to_string() }),
        };
        let mut r = json_response(status, &body);
        match self {
            Self::Unauthorized => {
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(
                        "Bearer realm=\"ferrule-registry\", Basic realm=\"ferrule-registry\"",
                    ),
                );
            }
            Self::MethodNotAllowed(allow) => {
                r.headers_mut().insert(header::ALLOW, HeaderValue::from_static(allow));
            }
            _ => {}
        }
        r
    }
}

fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    let body = serde_json::to_vec(v).unwrap_or_else(|_| b"{}".to_vec());
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn with_etag(mut r: Response<Body>, version: &str) -> Response<Body> {
    if let Ok(v) = HeaderValue::from_str(&format!("\"{version}\"")) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = status;
    r
}

/// `Location` must be a URI (the spec says `format: uri`): absolute, built from `Host`.
fn absolute(req: &Request<Bytes>, path: String) -> String {
    match req.headers().get(header::HOST).and_then(|h| h.to_str().ok()) {
        Some(host) if !host.is_empty() && host.chars().all(|c| c.is_ascii_graphic()) => {
            format!("http://{host}{path}")
        }
        _ => path,
    }
}

fn created(location: String, id: &str, version: &str) -> Response<Body> {
    let mut r = with_etag(json_response(StatusCode::CREATED, &json!({ "id": id })), version);
    if let Ok(v) = HeaderValue::from_str(&location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// Percent-decodes one path segment or query component (`+` as space in queries); an
/// escape is exactly two hex digits.
fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    ferrule_net::text::percent_decode(s, plus_is_space)
}

fn query_pairs(q: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    let Some(q) = q else { return Ok(Vec::new()) };
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            match (percent_decode(k, true), percent_decode(v, true)) {
                (Some(k), Some(v)) => Ok((k, v)),
                _ => Err(ApiError::BadRequest("malformed query string".into())),
            }
        })
        .collect()
}

/// Invalid ids are 400, except for deleting a tenant or a device, where the spec documents
/// no 400: no resource can have an invalid id, so it is "not found". (`as_not_found` is
/// true only for those two operations.)
fn id_error(e: crate::model::IdError, as_not_found: bool) -> ApiError {
    if as_not_found {
        ApiError::NotFound(e.to_string())
    } else {
        ApiError::BadRequest(e.to_string())
    }
}

fn tenant_id(s: &str, as_not_found: bool) -> Result<TenantId, ApiError> {
    TenantId::new(s).map_err(|e| id_error(e, as_not_found))
}

fn device_id(s: &str, as_not_found: bool) -> Result<DeviceId, ApiError> {
    DeviceId::new(s).map_err(|e| id_error(e, as_not_found))
}

fn if_match(req: &Request<Bytes>) -> Result<Option<String>, ApiError> {
    match req.headers().get(header::IF_MATCH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.to_owned()))
            .map_err(|_| ApiError::BadRequest("If-Match is not a valid header value".into())),
    }
}

/// Keys whose values are arrays in Hono's schemas.
const ARRAY_KEYS: &[&str] =
    &["adapters", "trusted-ca", "via", "viaGroups", "memberOf", "authorities", "secrets"];
/// Keys whose values are free-form JSON.
const FREE_KEYS: &[&str] = &["ext", "defaults", "headers", "payload-properties"];
/// Properties an adapter entry defines; any other property of an adapter is free-form.
const ADAPTER_KEYS: &[&str] = &["type", "enabled", "device-authentication-required"];

/// serde's derived structs also accept a JSON *array* of field values; the spec only allows
/// objects. This walk rejects an array anywhere the schema has an object (and a non-object
/// element in an array of objects) before the typed parse.
fn reject_arrays_for_objects(v: &Value, in_adapter: bool) -> Result<(), ApiError> {
    let Value::Object(m) = v else { return Ok(()) };
    for (k, x) in m {
        if FREE_KEYS.contains(&k.as_str()) || (in_adapter && !ADAPTER_KEYS.contains(&k.as_str())) {
            continue;
        }
        match x {
            Value::Array(items) if ARRAY_KEYS.contains(&k.as_str()) => {
                for item in items {
                    if item.is_array() {
                        return Err(ApiError::BadRequest(format!(
                            "elements of {k} must not be arrays"
                        )));
                    }
                    reject_arrays_for_objects(item, k == "adapters")?;
                }
            }
            Value::Array(_) => {
                return Err(ApiError::BadRequest(format!("{k} must be an object, not an array")))
            }
            other => reject_arrays_for_objects(other, false)?,
        }
    }
    Ok(())
}

/// Parses a JSON body; an empty body means `{}` where `empty_ok`. `array_root`: the body
/// is an array of objects (credentials), else an object. For credentials the error message
/// never quotes input values: they may be passwords.
fn parse_body<T: DeserializeOwned>(
    req: &Request<Bytes>,
    empty_ok: bool,
    confidential: bool,
) -> Result<T, ApiError> {
    let body = req.body();
    // No body at all is `{}` where one is optional; a body of white space is not JSON.
    if body.is_empty() && empty_ok {
        return serde_json::from_slice(b"{}").map_err(|e| ApiError::BadRequest(e.to_string()));
    }
    if body.iter().all(u8::is_ascii_whitespace) && !empty_ok {
        return Err(ApiError::BadRequest("request body required".into()));
    }
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("");
        let mime = ct.split(';').next().unwrap_or("").trim();
        if !mime.eq_ignore_ascii_case("application/json") {
            return Err(ApiError::BadRequest("Content-Type must be application/json".into()));
        }
    }
    let describe = |e: serde_json::Error| {
        let msg = e.to_string();
        if !confidential
            || msg.starts_with("unknown field")
            || msg.starts_with("missing field")
            || msg.starts_with("unknown variant")
        {
            ApiError::BadRequest(format!("invalid request body: {msg}"))
        } else {
            let kind = match e.classify() {
                serde_json::error::Category::Syntax | serde_json::error::Category::Eof => "syntax",
                _ => "data",
            };
            ApiError::BadRequest(format!("invalid request body: {kind} error (values not shown)"))
        }
    };
    let value: Value = serde_json::from_slice(body).map_err(describe)?;
    // Credentials bodies are arrays of objects; tenants and devices are objects.
    match (&value, confidential) {
        (Value::Array(items), true) => {
            for item in items {
                if !item.is_object() {
                    return Err(ApiError::BadRequest(
                        "credentials must be an array of objects".into(),
                    ));
                }
                reject_arrays_for_objects(item, false)?;
            }
        }
        (Value::Object(_), false) => reject_arrays_for_objects(&value, false)?,
        (_, true) => {
            return Err(ApiError::BadRequest("credentials must be an array of objects".into()))
        }
        (_, false) => {
            return Err(ApiError::BadRequest("request body must be a JSON object".into()))
        }
    }
    serde_json::from_value(value).map_err(describe)
}

fn authorized(state: &ApiState, req: &Request<hyper::body::Incoming>) -> bool {
    if state.allow_anonymous {
        return true;
    }
    let Some(h) = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let presented: Vec<u8> =
        if let Some(t) = h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")) {
            t.trim().as_bytes().to_vec()
        } else if let Some(b) = h.strip_prefix("Basic ").or_else(|| h.strip_prefix("basic ")) {
            use base64::Engine;
            let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(b.trim()) else {
                return false;
            };
            match raw.iter().position(|&c| c == b':') {
                Some(i) => raw[i + 1..].to_vec(),
                None => return false,
            }
        } else {
            return false;
        };
    // Check every token in constant time so timing does not reveal which one matched.
    state.tokens.iter().fold(false, |ok, t| {
        ok | (t.len() == presented.len() && bool::from(t.as_bytes().ct_eq(&presented)))
    })
}

/// Handles one request. Never fails: errors become JSON error responses.
pub async fn handle(
    state: Arc<ApiState>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = match dispatch(&state, req).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    // Paths hold only ids; bodies (which may hold passwords) are never logged.
    tracing::info!(%method, path, status = resp.status().as_u16(), "management request");
    Ok(resp)
}

async fn dispatch(
    state: &ApiState,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, ApiError> {
    if req.uri().path() == OPENAPI_PATH && req.method() == Method::GET {
        let mut r = Response::new(Full::new(Bytes::from_static(OPENAPI_YAML.as_bytes())));
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/yaml"));
        return Ok(r);
    }
    if !authorized(state, &req) {
        return Err(ApiError::Unauthorized);
    }
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, state.max_body_bytes).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            return Err(ApiError::TooLarge)
        }
        Err(_) => return Err(ApiError::BadRequest("could not read request body".into())),
    };
    let req = Request::from_parts(parts, body);
    let raw_path = req.uri().path().to_owned();
    let segs: Vec<String> = raw_path
        .strip_prefix("/v1/")
        .ok_or_else(|| ApiError::NotFound("no such resource".into()))?
        .split('/')
        .map(|s| {
            percent_decode(s, false).ok_or_else(|| ApiError::BadRequest("malformed path".into()))
        })
        .collect::<Result<_, _>>()?;
    let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
    let m = &state.management;
    let method = req.method().clone();
    match (segs.as_slice(), &method) {
        (["tenants"], &Method::POST) => {
            let t: Tenant = parse_body(&req, true, false)?;
            let (id, v) = m.create_tenant(None, t).await?;
            Ok(created(absolute(&req, format!("/v1/tenants/{id}")), id.as_str(), &v))
        }
        (["tenants"], &Method::GET) => search_tenants(state, &req).await,
        (["tenants"], _) => Err(ApiError::MethodNotAllowed("GET, POST")),
        (["tenants", tid], method) => {
            let tid = tenant_id(tid, *method == Method::DELETE)?;
            match *method {
                Method::POST => {
                    let t: Tenant = parse_body(&req, true, false)?;
                    let (id, v) = m.create_tenant(Some(tid), t).await?;
                    Ok(created(absolute(&req, format!("/v1/tenants/{id}")), id.as_str(), &v))
                }
                Method::GET => {
                    let t = m
                        .store()
                        .get_tenant(&tid)
                        .await?
                        .ok_or_else(|| ApiError::NotFound("tenant not found".into()))?;
                    Ok(with_etag(json_response(StatusCode::OK, &to_value(&t.value)?), &t.version))
                }
                Method::PUT => {
                    // The spec makes the body required for updates (unlike creates).
                    let t: Tenant = parse_body(&req, false, false)?;
                    let v = m.update_tenant(&tid, t, if_match(&req)?.as_deref()).await?;
                    Ok(with_etag(empty(StatusCode::NO_CONTENT), &v))
                }
                Method::DELETE => {
                    m.store().delete_tenant(&tid, if_match(&req)?.as_deref()).await?;
                    Ok(empty(StatusCode::NO_CONTENT))
                }
                _ => Err(ApiError::MethodNotAllowed("GET, POST, PUT, DELETE")),
            }
        }
        (["state", tid], method) => {
            let tid = tenant_id(tid, false)?;
            if *method != Method::GET {
                return Err(ApiError::MethodNotAllowed("GET"));
            }
            let states = state.states.as_ref().ok_or_else(no_states)?;
            let search = Search::from_query(&query_pairs(req.uri().query())?)?;
            if m.store().get_tenant(&tid).await?.is_none() {
                return Err(ApiError::NotFound("tenant not found".into()));
            }
            let items: Vec<Value> = states
                .tenant_states(tid.as_str())
                .into_iter()
                .map(|(device, v)| with_id(&device, v))
                .collect();
            let (total, page) = search.apply(items);
            search_response(total, page)
        }
        (["state", tid, did], method) => {
            let (tid, did) = (tenant_id(tid, false)?, device_id(did, false)?);
            if *method != Method::GET {
                return Err(ApiError::MethodNotAllowed("GET"));
            }
            let states = state.states.as_ref().ok_or_else(no_states)?;
            if m.store().get_device(&tid, &did).await?.is_none() {
                return Err(ApiError::NotFound("device not found".into()));
            }
            let v = states
                .device_state(tid.as_str(), did.as_str())
                .unwrap_or_else(|| serde_json::json!({ "connected": false }));
            Ok(json_response(StatusCode::OK, &with_id(did.as_str(), v)))
        }
        (["commands", tid, did], method) => {
            let (tid, did) = (tenant_id(tid, false)?, device_id(did, false)?);
            let states = state.states.as_ref().ok_or_else(no_states)?;
            if m.store().get_device(&tid, &did).await?.is_none() {
                return Err(ApiError::NotFound("device not found".into()));
            }
            match *method {
                Method::GET => {
                    let list = states.deferred_commands(tid.as_str(), did.as_str());
                    search_response(list.len(), list)
                }
                Method::DELETE => {
                    states.delete_deferred_commands(tid.as_str(), did.as_str());
                    Ok(empty(StatusCode::NO_CONTENT))
                }
                _ => Err(ApiError::MethodNotAllowed("GET, DELETE")),
            }
        }
        (["devices", tid], method) => {
            let tid = tenant_id(tid, false)?;
            match *method {
                Method::POST => {
                    let d: Device = parse_body(&req, true, false)?;
                    let (id, v) = m.create_device(&tid, None, d).await?;
                    Ok(created(absolute(&req, format!("/v1/devices/{tid}/{id}")), id.as_str(), &v))
                }
                Method::GET => search_devices(state, &tid, &req).await,
                Method::DELETE => {
                    // The spec documents no 404 here: deleting the devices of an unknown
                    // tenant deletes nothing and succeeds.
                    match m.store().delete_devices_of_tenant(&tid).await {
                        Ok(()) | Err(StoreError::NotFound(_)) => Ok(empty(StatusCode::NO_CONTENT)),
                        Err(e) => Err(e.into()),
                    }
                }
                _ => Err(ApiError::MethodNotAllowed("GET, POST, DELETE")),
            }
        }
        (["devices", tid, did], method) => {
            let tid = tenant_id(tid, *method == Method::DELETE)?;
            let did = device_id(did, *method == Method::DELETE)?;
            match *method {
                Method::POST => {
                    let d: Device = parse_body(&req, true, false)?;
                    let (id, v) = m.create_device(&tid, Some(did), d).await?;
                    Ok(created(absolute(&req, format!("/v1/devices/{tid}/{id}")), id.as_str(), &v))
                }
                Method::GET => {
                    let d = m
                        .store()
                        .get_device(&tid, &did)
                        .await?
                        .ok_or_else(|| ApiError::NotFound("device not found".into()))?;
                    Ok(with_etag(json_response(StatusCode::OK, &to_value(&d.value)?), &d.version))
                }
                Method::PUT => {
                    let d: Device = parse_body(&req, false, false)?;
                    let v = m.update_device(&tid, &did, d, if_match(&req)?.as_deref()).await?;
                    Ok(with_etag(empty(StatusCode::NO_CONTENT), &v))
                }
                Method::DELETE => {
                    m.store().delete_device(&tid, &did, if_match(&req)?.as_deref()).await?;
                    Ok(empty(StatusCode::NO_CONTENT))
                }
                _ => Err(ApiError::MethodNotAllowed("GET, POST, PUT, DELETE")),
            }
        }
        (["credentials", tid, did], method) => {
            let tid = tenant_id(tid, false)?;
            let did = device_id(did, false)?;
            match *method {
                Method::GET => {
                    let c = m
                        .get_credentials(&tid, &did)
                        .await?
                        .ok_or_else(|| ApiError::NotFound("device not found".into()))?;
                    Ok(with_etag(json_response(StatusCode::OK, &to_value(&c.value)?), &c.version))
                }
                Method::PUT => {
                    let c: Vec<Credentials> = parse_body(&req, false, true)?;
                    let v = m.set_credentials(&tid, &did, c, if_match(&req)?.as_deref()).await?;
                    Ok(with_etag(empty(StatusCode::NO_CONTENT), &v))
                }
                _ => Err(ApiError::MethodNotAllowed("GET, PUT")),
            }
        }
        _ => Err(ApiError::NotFound("no such resource".into())),
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<Value, ApiError> {
    serde_json::to_value(v).map_err(|e| ApiError::from(StoreError::Corrupt(e.to_string())))
}

fn no_states() -> ApiError {
    ApiError::NotFound("device state is not tracked by this registry".into())
}

fn with_id(id: &str, v: Value) -> Value {
    match v {
        Value::Object(mut o) => {
            o.insert("id".into(), Value::String(id.to_owned()));
            Value::Object(o)
        }
        other => other,
    }
}

fn search_response(total: usize, page: Vec<Value>) -> Result<Response<Body>, ApiError> {
    // Hono answers an empty result with 404.
    if page.is_empty() {
        return Err(ApiError::NotFound("no matching objects".into()));
    }
    Ok(json_response(StatusCode::OK, &json!({ "total": total, "result": page })))
}

async fn search_tenants(
    state: &ApiState,
    req: &Request<Bytes>,
) -> Result<Response<Body>, ApiError> {
    let search = Search::from_query(&query_pairs(req.uri().query())?)?;
    let all = state.management.store().list_tenants().await?;
    let items = all
        .into_iter()
        .map(|(id, t)| Ok(with_id(id.as_str(), to_value(&t.value)?)))
        .collect::<Result<Vec<_>, ApiError>>()?;
    let (total, page) = search.apply(items);
    search_response(total, page)
}

async fn search_devices(
    state: &ApiState,
    tenant: &TenantId,
    req: &Request<Bytes>,
) -> Result<Response<Body>, ApiError> {
    let search = Search::from_query(&query_pairs(req.uri().query())?)?;
    let store = state.management.store();
    if store.get_tenant(tenant).await?.is_none() {
        return Err(ApiError::NotFound("tenant not found".into()));
    }
    let all = store.list_devices(tenant).await?;
    // Hono: a gateway is a device that other devices list in `via`, or that is a member
    // of a gateway group.
    let gateways: std::collections::HashSet<String> = all
        .iter()
        .flat_map(|(_, d)| d.value.via.iter().flatten().cloned())
        .chain(
            all.iter()
                .filter(|(_, d)| d.value.member_of.as_ref().is_some_and(|m| !m.is_empty()))
                .map(|(id, _)| id.to_string()),
        )
        .collect();
    let items = all
        .into_iter()
        .filter(|(id, _)| search.is_gateway.is_none_or(|g| g == gateways.contains(id.as_str())))
        .map(|(id, d)| Ok(with_id(id.as_str(), to_value(&d.value)?)))
        .collect::<Result<Vec<_>, ApiError>>()?;
    let (total, page) = search.apply(items);
    search_response(total, page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_where_objects_belong_are_refused() {
        let ok = json!({"tracing": {}, "adapters": [{"type": "x", "extra": [1]}], "ext": {"a": [1]}, "via": ["g"]});
        assert!(reject_arrays_for_objects(&ok, false).is_ok());
        assert!(reject_arrays_for_objects(&json!({"tracing": []}), false).is_err());
        assert!(reject_arrays_for_objects(&json!({"resource-limits": {"data-volume": []}}), false)
            .is_err());
        assert!(reject_arrays_for_objects(&json!({"trusted-ca": [[]]}), false).is_err());
        assert!(reject_arrays_for_objects(&json!({"secrets": [{"comment": "x"}]}), false).is_ok());
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%3Ab", false).as_deref(), Some("a:b"));
        assert_eq!(percent_decode("a+b", true).as_deref(), Some("a b"));
        assert_eq!(percent_decode("a+b", false).as_deref(), Some("a+b"));
        assert_eq!(percent_decode("%zz", false), None);
        assert_eq!(percent_decode("%4", false), None);
    }
}
