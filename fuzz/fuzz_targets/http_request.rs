//! HTTP request mapping (`http/mapping.rs`): what the adapter reads from a request before
//! and while it authenticates it: `resource` (and `route`) from method and path, the
//! query (`hono-ttd`, `hono-cmd-status`), the `QoS-Level`, `hono-ttl`, `hono-ttd` and
//! `hono-cmd-status` headers, and the `auth-id@tenant` Basic username.
//!
//! Input: newline-separated fields `METHOD`, `PATH`, `QUERY`, `QOS-LEVEL`, `HONO-TTL`,
//! `HONO-TTD`, `HONO-CMD-STATUS`, `USERNAME` (lossy UTF-8; missing fields are absent
//! headers). Checked: no panic, bounded time and memory; `hono-ttd` never exceeds its
//! cap and a command status is always 200-599.
#![no_main]

use std::time::Duration;

use ferrule_adapters::http::mapping::{self, Resource};
use libfuzzer_sys::fuzz_target;

const MAX_TTD: Duration = Duration::from_secs(60);

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut fields = text.split('\n');
    let method = fields.next().unwrap_or_default();
    let path = fields.next().unwrap_or_default();
    let mut next = || fields.next();
    let (query, qos, ttl, ttd, status, username) = (next(), next(), next(), next(), next(), next());
    if let Ok(Resource::Upload(route)) = mapping::resource(method, path) {
        let _ = mapping::qos(route.endpoint, qos);
    }
    let _ = mapping::route(method, path);
    let _ = mapping::query_param(query, "hono-ttd");
    let _ = mapping::ttl(ttl);
    if let Ok(Some(wait)) = mapping::ttd(ttd, query, MAX_TTD) {
        assert!(!wait.is_zero() && wait <= MAX_TTD, "{wait:?}");
    }
    if let Ok(code) = mapping::command_status(status, query) {
        assert!((200..600).contains(&code), "{code}");
    }
    let _ = username.map(ferrule_adapters::door::split_auth_id);
});
