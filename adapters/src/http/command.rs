//! The HTTP answer carrying a command to a device that waited for one (`hono-ttd`; the
//! wait itself is [`crate::poll`], shared with CoAP).

use bytes::Bytes;
use ferrule_command_control::Command;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Response, StatusCode};

/// 200 with the command: `hono-command`, `hono-cmd-req-id` (request/response only),
/// `hono-cmd-target-device` (when a gateway asked for another device), content type and
/// body from the command.
pub(super) fn response(command: Command, via_gateway: bool) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(command.payload));
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    let mut set = |name: &'static str, value: &str| match HeaderValue::from_str(value) {
        Ok(value) => {
            headers.insert(name, value);
        }
        Err(_) => tracing::debug!(name, value, "command field not representable as an HTTP header"),
    };
    set("hono-command", &command.name);
    if let Some(request_id) = &command.request_id {
        set("hono-cmd-req-id", request_id);
    }
    if via_gateway {
        set("hono-cmd-target-device", &command.device_id);
    }
    if let Some(content_type) = &command.content_type {
        set(CONTENT_TYPE.as_str(), content_type);
    }
    response
}
