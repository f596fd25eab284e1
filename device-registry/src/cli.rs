//! Operator CLI: `ferrule tenant|device|credentials ...` against a running management API.
//! The binary mounts [`CliCommand`] as subcommands and calls [`run_cli`].
//!
//! JSON documents are given with `--data`: inline JSON, `@FILE`, or `-` for stdin (so
//! passwords need not appear on the command line or in `ps`).

use std::io::{Read, Write};

use anyhow::Context;
use clap::{Args, Subcommand};
use http::Method;
use serde_json::Value;

use crate::client::RegistryClient;

/// Where the management API is and how to authenticate.
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// Management API base URL.
    #[arg(long, env = "FERRULE_REGISTRY_URL", default_value = "http://127.0.0.1:28080")]
    pub url: String,
    /// Operator bearer token.
    #[arg(long, env = "FERRULE_REGISTRY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Search options shared by the `list` commands.
#[derive(Debug, Clone, Args)]
pub struct ListOptions {
    /// Maximum number of results (0..=200).
    #[arg(long, default_value_t = 30)]
    pub page_size: u32,
    /// Offset into the result set.
    #[arg(long, default_value_t = 0)]
    pub page_offset: u32,
    /// Filter, Hono's filterJson, e.g. '{"field":"/enabled","value":true}' (repeatable).
    #[arg(long)]
    pub filter: Vec<String>,
    /// Sort option, Hono's sortJson, e.g. '{"field":"/ext/brand"}' (repeatable).
    #[arg(long)]
    pub sort: Vec<String>,
}

/// The registry subcommands.
#[derive(Debug, Clone, Subcommand)]
pub enum CliCommand {
    /// Manage tenants.
    Tenant {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        action: TenantAction,
    },
    /// Manage devices.
    Device {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        action: DeviceAction,
    },
    /// Manage device credentials.
    Credentials {
        #[command(flatten)]
        conn: Connection,
        #[command(subcommand)]
        action: CredentialsAction,
    },
}

/// Tenant operations.
#[derive(Debug, Clone, Subcommand)]
pub enum TenantAction {
    /// Create a tenant (id generated if omitted); prints the id.
    Create {
        /// Tenant id.
        id: Option<String>,
        /// Tenant JSON (inline, @FILE or -); default {}.
        #[arg(long)]
        data: Option<String>,
    },
    /// Search tenants.
    List {
        #[command(flatten)]
        options: ListOptions,
    },
    /// Show a tenant.
    Get {
        /// Tenant id.
        id: String,
    },
    /// Replace a tenant's configuration.
    Update {
        /// Tenant id.
        id: String,
        /// Tenant JSON (inline, @FILE or -).
        #[arg(long)]
        data: String,
        /// Only if the resource version still is this.
        #[arg(long)]
        if_match: Option<String>,
    },
    /// Delete a tenant with all its devices.
    Delete {
        /// Tenant id.
        id: String,
        /// Only if the resource version still is this.
        #[arg(long)]
        if_match: Option<String>,
    },
}

/// Device operations.
#[derive(Debug, Clone, Subcommand)]
pub enum DeviceAction {
    /// Register a device (id generated if omitted); prints the id.
    Create {
        /// Tenant id.
        tenant: String,
        /// Device id.
        id: Option<String>,
        /// Device JSON (inline, @FILE or -); default {}.
        #[arg(long)]
        data: Option<String>,
    },
    /// Search a tenant's devices.
    List {
        /// Tenant id.
        tenant: String,
        #[command(flatten)]
        options: ListOptions,
    },
    /// Show a device.
    Get {
        /// Tenant id.
        tenant: String,
        /// Device id.
        id: String,
    },
    /// Replace a device's registration.
    Update {
        /// Tenant id.
        tenant: String,
        /// Device id.
        id: String,
        /// Device JSON (inline, @FILE or -).
        #[arg(long)]
        data: String,
        /// Only if the resource version still is this.
        #[arg(long)]
        if_match: Option<String>,
    },
    /// Delete a device and its credentials.
    Delete {
        /// Tenant id.
        tenant: String,
        /// Device id.
        id: String,
        /// Only if the resource version still is this.
        #[arg(long)]
        if_match: Option<String>,
    },
}

/// Credentials operations.
#[derive(Debug, Clone, Subcommand)]
pub enum CredentialsAction {
    /// Show a device's credentials (without secret material).
    Get {
        /// Tenant id.
        tenant: String,
        /// Device id.
        device: String,
    },
    /// Replace a device's credentials (Hono's credentials set JSON array).
    Set {
        /// Tenant id.
        tenant: String,
        /// Device id.
        device: String,
        /// Credentials JSON array (inline, @FILE or -).
        #[arg(long)]
        data: String,
        /// Only if the resource version still is this.
        #[arg(long)]
        if_match: Option<String>,
    },
}

fn read_data(arg: &str) -> anyhow::Result<Value> {
    let text = if arg == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("reading JSON from stdin")?;
        s
    } else if let Some(path) = arg.strip_prefix('@') {
        std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?
    } else {
        arg.to_owned()
    };
    // Do not echo the input in the error: it may contain a password.
    serde_json::from_str(&text).map_err(|e| {
        anyhow::anyhow!("--data is not valid JSON (line {}, column {})", e.line(), e.column())
    })
}

fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn list_query(o: &ListOptions) -> String {
    let mut q = format!("?pageSize={}&pageOffset={}", o.page_size, o.page_offset);
    for f in &o.filter {
        q.push_str(&format!("&filterJson={}", enc(f)));
    }
    for s in &o.sort {
        q.push_str(&format!("&sortJson={}", enc(s)));
    }
    q
}

/// The HTTP request a subcommand makes.
struct Request {
    method: Method,
    path: String,
    body: Option<Value>,
    if_match: Option<String>,
}

impl Request {
    fn new(method: Method, path: String, body: Option<Value>, if_match: Option<String>) -> Self {
        Self { method, path, body, if_match }
    }

    fn get(path: String) -> Self {
        Self::new(Method::GET, path, None, None)
    }

    /// A create: the body is `data` (see [`read_data`]) or `{}` without it.
    fn post(path: String, data: Option<&str>) -> anyhow::Result<Self> {
        let body = data.map(read_data).transpose()?.unwrap_or_else(|| serde_json::json!({}));
        Ok(Self::new(Method::POST, path, Some(body), None))
    }

    fn put(path: String, data: &str, if_match: Option<String>) -> anyhow::Result<Self> {
        Ok(Self::new(Method::PUT, path, Some(read_data(data)?), if_match))
    }

    fn delete(path: String, if_match: Option<String>) -> Self {
        Self::new(Method::DELETE, path, None, if_match)
    }
}

fn tenant_request(action: TenantAction) -> anyhow::Result<Request> {
    let path = |id: &str| format!("/v1/tenants/{}", enc(id));
    Ok(match action {
        TenantAction::Create { id, data } => {
            Request::post(id.map_or("/v1/tenants".to_owned(), |id| path(&id)), data.as_deref())?
        }
        TenantAction::List { options } => {
            Request::get(format!("/v1/tenants{}", list_query(&options)))
        }
        TenantAction::Get { id } => Request::get(path(&id)),
        TenantAction::Update { id, data, if_match } => Request::put(path(&id), &data, if_match)?,
        TenantAction::Delete { id, if_match } => Request::delete(path(&id), if_match),
    })
}

fn device_request(action: DeviceAction) -> anyhow::Result<Request> {
    let path = |tenant: &str, id: &str| format!("/v1/devices/{}/{}", enc(tenant), enc(id));
    Ok(match action {
        DeviceAction::Create { tenant, id, data } => {
            let p = id.map_or(format!("/v1/devices/{}", enc(&tenant)), |id| path(&tenant, &id));
            Request::post(p, data.as_deref())?
        }
        DeviceAction::List { tenant, options } => {
            Request::get(format!("/v1/devices/{}{}", enc(&tenant), list_query(&options)))
        }
        DeviceAction::Get { tenant, id } => Request::get(path(&tenant, &id)),
        DeviceAction::Update { tenant, id, data, if_match } => {
            Request::put(path(&tenant, &id), &data, if_match)?
        }
        DeviceAction::Delete { tenant, id, if_match } => {
            Request::delete(path(&tenant, &id), if_match)
        }
    })
}

fn credentials_request(action: CredentialsAction) -> anyhow::Result<Request> {
    let path = |tenant: &str, id: &str| format!("/v1/credentials/{}/{}", enc(tenant), enc(id));
    Ok(match action {
        CredentialsAction::Get { tenant, device } => Request::get(path(&tenant, &device)),
        CredentialsAction::Set { tenant, device, data, if_match } => {
            Request::put(path(&tenant, &device), &data, if_match)?
        }
    })
}

/// Runs a registry subcommand, printing results to stdout.
///
/// # Errors
/// Connection failures and error statuses, with the registry's message.
pub async fn run_cli(cmd: CliCommand) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let mut buf = Vec::new();
    let r = run_cli_to(cmd, &mut buf).await;
    out.write_all(&buf)?;
    r
}

/// Runs a registry subcommand, writing results to `out` (for tests and embedding).
///
/// # Errors
/// As [`run_cli`].
pub async fn run_cli_to(cmd: CliCommand, out: &mut Vec<u8>) -> anyhow::Result<()> {
    let (conn, req) = match cmd {
        CliCommand::Tenant { conn, action } => (conn, tenant_request(action)?),
        CliCommand::Device { conn, action } => (conn, device_request(action)?),
        CliCommand::Credentials { conn, action } => (conn, credentials_request(action)?),
    };
    let Request { method, path, body, if_match } = req;
    let client = RegistryClient::new(&conn.url, conn.token)?;
    let resp =
        client.request(method.clone(), &path, body.as_ref(), if_match.as_deref()).await?.ok()?;
    match method {
        Method::POST => {
            let id = resp.json().get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
            writeln!(out, "{id}")?;
        }
        Method::GET => {
            writeln!(out, "{}", serde_json::to_string_pretty(&resp.json())?)?;
        }
        Method::PUT => {
            if let Some(v) = resp.etag {
                writeln!(out, "version {v}")?;
            }
        }
        _ => {}
    }
    Ok(())
}
