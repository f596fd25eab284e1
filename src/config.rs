//! The platform's configuration: one TOML file, every key with a documented default,
//! every key overridable from the environment.
//!
//! Environment overrides: `FERRULE__SECTION__KEY=value` sets `[section] key = value`
//! (`FERRULE__DATA_DIR=/var/lib/ferrule`, `FERRULE__MESSAGING__LISTEN=127.0.0.1:5673`,
//! `FERRULE__MESSAGING__SASL__USERS='[{username="app@t1", password="s3cret"}]'`).
//! Values are read as TOML values when they parse as one, as strings otherwise.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use ferrule_messaging::MessagingConfig;

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where embedded storage lives (queues, registry, generated credentials).
    pub data_dir: PathBuf,
    pub log: LogConfig,
    pub ops: crate::ops::OpsConfig,
    pub messaging: MessagingConfig,
    pub registry: ferrule_device_registry::RegistryConfig,
    pub adapters: AdaptersConfig,
    pub commands: CommandsConfig,
    pub tracing: TracingConfig,
    pub cluster: crate::cluster::ClusterConfig,
}

/// `[tracing]`: distributed tracing (OpenTelemetry, OTLP/HTTP JSON); off by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// Base URL of an OTLP/HTTP receiver (`http://collector:4318`; spans go to
    /// `/v1/traces`). Empty: tracing off.
    pub otlp_endpoint: String,
    /// Share of new traces sampled for tenants with sampling mode `default` (0.0 to 1.0);
    /// a tenant's `tracing.sampling-mode` `all` or `none` wins.
    pub sample_ratio: f64,
    /// `service.name` of the exported spans.
    pub service_name: String,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self { otlp_endpoint: String::new(), sample_ratio: 0.01, service_name: "ferrule".into() }
    }
}

/// `[commands]`: command & control.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CommandsConfig {
    /// Key of the MAC in command request ids (at least 32 characters). Empty: a random key
    /// generated into `DATA_DIR/command-request-key`. Every instance of a scaled-out
    /// deployment must use the same key.
    pub request_id_key: String,
}

impl CommandsConfig {
    /// The key of this configuration, or the one kept in `data_dir`.
    ///
    /// # Errors
    /// A configured key shorter than 32 bytes, or a key file that cannot be read or made.
    pub fn request_key(
        &self,
        data_dir: &Path,
    ) -> anyhow::Result<ferrule_command_control::RequestKey> {
        if self.request_id_key.is_empty() {
            ferrule_command_control::RequestKey::load_or_create(data_dir).with_context(|| {
                format!(
                    "command request-id key in {}",
                    data_dir.join(ferrule_command_control::KEY_FILE).display()
                )
            })
        } else {
            ferrule_command_control::RequestKey::new(self.request_id_key.as_bytes())
                .map_err(|e| anyhow::anyhow!("[commands] request_id_key: {e}"))
        }
    }
}

/// `[adapters]`: the protocol adapters, each with its own section.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptersConfig {
    /// Messages per second one device may send over all adapters of this instance (a
    /// second's worth may come at once); 0: no limit.
    pub max_messages_per_second_per_device: u32,
    /// Messages per second all devices of one tenant may send; 0: no limit.
    pub max_messages_per_second_per_tenant: u32,
    pub http: ferrule_adapters::http::HttpConfig,
    pub mqtt: ferrule_adapters::mqtt::MqttConfig,
    pub coap: ferrule_adapters::coap::CoapConfig,
}

impl AdaptersConfig {
    /// The message rate limits of `[adapters]`.
    pub fn rate_limits(&self) -> ferrule_adapters::downstream::RateLimits {
        let limit = |n: u32| (n > 0).then_some(n);
        ferrule_adapters::downstream::RateLimits {
            per_device: limit(self.max_messages_per_second_per_device),
            per_tenant: limit(self.max_messages_per_second_per_tenant),
        }
    }
}

impl Config {
    /// This configuration with every secret replaced by `<redacted>` (for `config check`):
    /// application passwords, operator tokens and a password in the Redis URL.
    pub fn redacted(&self) -> Config {
        const REDACTED: &str = "<redacted>";
        let mut c = self.clone();
        for user in &mut c.messaging.sasl.users {
            user.password = REDACTED.into();
        }
        for token in &mut c.registry.auth_tokens {
            *token = REDACTED.into();
        }
        c.registry.redis_url = redact_url_password(&c.registry.redis_url);
        for url in c.cluster.redis_urls.iter_mut().chain(&mut c.registry.redis_cluster_nodes) {
            *url = redact_url_password(url);
        }
        for url in &mut c.messaging.backend.urls {
            *url = redact_url_password(url);
        }
        if !c.messaging.backend.password.is_empty() {
            c.messaging.backend.password = REDACTED.into();
        }
        c.messaging.backend.management_password = REDACTED.into();
        if !c.cluster.peer_password.is_empty() {
            c.cluster.peer_password = REDACTED.into();
        }
        if !c.commands.request_id_key.is_empty() {
            c.commands.request_id_key = REDACTED.into();
        }
        c
    }
}

/// `scheme://user:password@host/...` with the password replaced (the URL kept otherwise).
pub(crate) fn redact_url(url: &str) -> String {
    redact_url_password(url)
}

/// `scheme://user:password@host/...` with the password replaced (the URL kept otherwise).
fn redact_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let Some((userinfo, host)) = rest.rsplit_once('@') else { return url.to_owned() };
    let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
    format!("{scheme}://{user}:<redacted>@{host}")
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            log: LogConfig::default(),
            ops: Default::default(),
            messaging: MessagingConfig::default(),
            registry: Default::default(),
            adapters: Default::default(),
            commands: Default::default(),
            tracing: Default::default(),
            cluster: Default::default(),
        }
    }
}

/// `[log]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter (`info`, `ferrule_messaging=debug,info`); `RUST_LOG` wins if set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Text, level: "info".into() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

const ROOT_DEFAULT_TOML: &str = r#"# Ferrule configuration. Every key is optional; shown here with its default.
# Any key can be overridden from the environment: FERRULE__SECTION__KEY=value, e.g.
# FERRULE__DATA_DIR=/var/lib/ferrule or FERRULE__MESSAGING__LISTEN=127.0.0.1:5673.

# Where embedded storage lives (queues, registry, generated credentials).
data_dir = "./data"

[log]
# text | json
format = "text"
# A tracing filter, e.g. "info" or "ferrule_messaging=debug,info"; RUST_LOG wins if set.
level = "info"

[commands]
# Key of the MAC in command request ids, so that only the device a command went to (or
# its gateway) can answer it; at least 32 characters. Empty: a random key kept in
# DATA_DIR/command-request-key. Scaled-out instances must all use the same key.
request_id_key = ""

[tracing]
# OpenTelemetry: base URL of an OTLP/HTTP receiver (spans are POSTed as JSON to
# URL/v1/traces), e.g. "http://127.0.0.1:4318". Empty: tracing off. Device uploads and
# commands get spans; messages carry a W3C `traceparent` application property (Hono).
otlp_endpoint = ""
# Share of traces sampled for tenants whose tracing.sampling-mode is "default" (0.0-1.0).
sample_ratio = 0.01
service_name = "ferrule"

"#;

const ADAPTERS_DEFAULT_TOML: &str = r#"[adapters]
# Message rate limits over all device adapters of this instance (telemetry and events;
# a second's worth may come at once). Over them: HTTP 429, CoAP 4.29,
# MQTT 5 PUBACK 0x97 (MQTT 3.1.1: as any failed publish). 0: no limit.
max_messages_per_second_per_device = 0
max_messages_per_second_per_tenant = 0

"#;

/// The default configuration as commented TOML.
pub fn default_toml() -> String {
    [
        ROOT_DEFAULT_TOML,
        crate::ops::DEFAULT_TOML,
        ferrule_messaging::config::DEFAULT_TOML,
        "\n",
        ferrule_device_registry::DEFAULT_TOML,
        "\n",
        crate::cluster::DEFAULT_TOML,
        ADAPTERS_DEFAULT_TOML,
        ferrule_adapters::http::DEFAULT_TOML,
        "\n",
        ferrule_adapters::mqtt::DEFAULT_TOML,
        "\n",
        ferrule_adapters::coap::DEFAULT_TOML,
    ]
    .concat()
}

const ENV_PREFIX: &str = "FERRULE__";

/// Reads `path` (if any), applies environment overrides, and validates.
pub fn load(path: Option<&Path>) -> anyhow::Result<Config> {
    let text = match path {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        None => String::new(),
    };
    let mut table: toml::Table = toml::from_str(&text).with_context(|| match path {
        Some(path) => format!("parsing {}", path.display()),
        None => "parsing configuration".into(),
    })?;
    let defaults = toml::Table::try_from(Config::default()).unwrap_or_default();
    for (key, value) in std::env::vars() {
        if let Some(rest) = key.strip_prefix(ENV_PREFIX) {
            apply_override(&mut table, &defaults, rest, &value)
                .with_context(|| format!("environment variable {key}"))?;
        }
    }
    let config: Config = toml::Value::Table(table)
        .try_into()
        .map_err(|e: toml::de::Error| anyhow::anyhow!("invalid configuration: {e}"))?;
    validate(&config)?;
    Ok(config)
}

/// Sets the key `path` (`SECTION__KEY`, any case) of `table` to `value`, read as TOML (a
/// number, a list, a quoted string…), or as the plain string it is when it does not read
/// as TOML or when the key's default (in `defaults`) is a string: a password or token of
/// digits only stays a string.
fn apply_override(
    table: &mut toml::Table,
    defaults: &toml::Table,
    path: &str,
    value: &str,
) -> anyhow::Result<()> {
    let keys: Vec<String> = path.split("__").map(|k| k.to_ascii_lowercase()).collect();
    if keys.iter().any(String::is_empty) {
        bail!("empty key segment in {path:?}");
    }
    let mut default = Some(defaults);
    for key in &keys[..keys.len() - 1] {
        default = default.and_then(|t| t.get(key)).and_then(toml::Value::as_table);
    }
    let wants_string =
        matches!(default.and_then(|t| t.get(&keys[keys.len() - 1])), Some(toml::Value::String(_)));
    let parsed = match toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
    {
        Some(quoted @ toml::Value::String(_)) => quoted,
        Some(other) if !wants_string => other,
        _ => toml::Value::String(value.to_owned()),
    };
    let (last, parents) = keys.split_last().expect("at least one key");
    let mut current = table;
    for key in parents {
        let entry =
            current.entry(key.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = match entry {
            toml::Value::Table(t) => t,
            _ => bail!("{key} is not a section"),
        };
    }
    current.insert(last.clone(), parsed);
    Ok(())
}

/// Every section's `validate()`: the first bad key, named with its section.
fn validate(config: &Config) -> Result<(), ferrule_net::ConfigError> {
    config.ops.validate()?;
    config.messaging.validate()?;
    config.registry.validate()?;
    config.cluster.validate(&config.messaging)?;
    config.adapters.http.validate()?;
    config.adapters.mqtt.validate()?;
    config.adapters.coap.validate()?;
    if config.messaging.backend.kind == ferrule_messaging::BackendKind::Amqp {
        // What every instance of a deployment must share, and would otherwise make up on
        // its own (and then disagree): the request-id key (a response may come back
        // through another instance) and the application users.
        if config.commands.request_id_key.is_empty() {
            return Err(ferrule_net::ConfigError::new(
                "commands",
                "request_id_key",
                "is needed with a shared broker (the same on every instance)",
            ));
        }
        let sasl = &config.messaging.sasl;
        if sasl.users.is_empty() && !sasl.allow_anonymous {
            return Err(ferrule_net::ConfigError::new(
                "messaging.sasl",
                "users",
                "are needed with a shared broker (every instance would make up its own admin password)",
            ));
        }
    }
    let key = &config.commands.request_id_key;
    if !key.is_empty() && key.len() < 32 {
        return Err(ferrule_net::ConfigError::new(
            "commands",
            "request_id_key",
            "at least 32 characters (or empty for a generated key)",
        ));
    }
    let tracing = &config.tracing;
    if !tracing.otlp_endpoint.is_empty()
        && crate::otlp::Endpoint::parse(&tracing.otlp_endpoint).is_none()
    {
        return Err(ferrule_net::ConfigError::new(
            "tracing",
            "otlp_endpoint",
            "must look like http://HOST:PORT[/PATH] (plain HTTP)",
        ));
    }
    if !(0.0..=1.0).contains(&tracing.sample_ratio) {
        return Err(ferrule_net::ConfigError::new("tracing", "sample_ratio", "0.0 to 1.0"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printed_defaults_are_the_defaults() {
        let parsed: Config = toml::from_str(&default_toml()).expect("default TOML parses");
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn overrides() {
        let mut table = toml::Table::new();
        let defaults = toml::Table::try_from(Config::default()).unwrap();
        let mut set = |path, value| apply_override(&mut table, &defaults, path, value).unwrap();
        set("MESSAGING__LISTEN", "127.0.0.1:5999");
        set("MESSAGING__QUEUE_MAX_DEPTH", "7");
        set("MESSAGING__SASL__USERS", r#"[{username="a@t", password="p"}]"#);
        set("DATA_DIR", "/tmp/x");
        // Secrets of digits only, or that read as TOML booleans, stay strings; a quoted
        // value is its string (as the runbook once asked for).
        set("CLUSTER__PEER_PASSWORD", "1234567890123456789");
        set("COMMANDS__REQUEST_ID_KEY", "true");
        set("MESSAGING__BACKEND__PASSWORD", r#""0042""#);
        let config: Config = toml::Value::Table(table).try_into().unwrap();
        assert_eq!(config.cluster.peer_password, "1234567890123456789");
        assert_eq!(config.commands.request_id_key, "true");
        assert_eq!(config.messaging.backend.password, "0042");
        assert_eq!(config.messaging.listen.port(), 5999);
        assert_eq!(config.messaging.queue_max_depth, 7);
        assert_eq!(config.messaging.sasl.users[0].username, "a@t");
        assert_eq!(config.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn every_section_names_its_bad_key() {
        assert_eq!(validate(&Config::default()), Ok(()));
        type Spoil = fn(&mut Config);
        let cases: [(Spoil, &str); 11] = [
            (|c| c.ops.max_connections = 0, "ops.max_connections"),
            (|c| c.messaging.max_frame_size = 100, "messaging.max_frame_size"),
            (|c| c.messaging.connection_rate_per_ip = 0.0, "messaging.connection_rate_per_ip"),
            (|c| c.registry.max_body_bytes = 10, "registry.max_body_bytes"),
            (
                |c| c.adapters.http.header_read_timeout = std::time::Duration::ZERO,
                "adapters.http.header_read_timeout",
            ),
            (|c| c.adapters.mqtt.workers = 0, "adapters.mqtt.workers"),
            (|c| c.adapters.coap.max_payload = 70_000, "adapters.coap.max_payload"),
            (|c| c.commands.request_id_key = "short".into(), "commands.request_id_key"),
            (
                // A CA file for Redis TLS, but a plain redis:// URL.
                |c| {
                    c.registry.storage = ferrule_device_registry::StorageKind::Redis;
                    c.registry.redis_tls_ca_file = Some("/etc/hostname".into());
                },
                "registry.redis_tls_ca_file",
            ),
            (
                |c| {
                    c.cluster.redis_urls = vec!["rediss://r:6380/".into()];
                    c.cluster.redis_tls_ca_file = Some("/nonexistent/ca.pem".into());
                },
                "cluster.redis_tls_ca_file",
            ),
            (
                // TLS between instances without the AMQP TLS listener.
                |c| {
                    c.cluster.peer_password = "a-peer-password-of-length".into();
                    c.cluster.peer_tls_ca_file = Some("/etc/hostname".into());
                },
                "cluster.peer_tls_ca_file",
            ),
        ];
        for (spoil, key) in cases {
            let mut c = Config::default();
            spoil(&mut c);
            assert_eq!(validate(&c).unwrap_err().key, key);
        }
    }

    #[test]
    fn redacted_hides_every_secret() {
        let mut c = Config::default();
        c.registry.auth_tokens = vec!["op-secret".into()];
        c.registry.redis_url = "redis://app:redis-secret@db:6379/0".into();
        c.messaging.sasl.users = vec![ferrule_messaging::UserConfig {
            username: "app@t1".into(),
            password: "sasl-secret".into(),
        }];
        c.commands.request_id_key = "command-key-secret-0123456789abcdef".into();
        c.registry.redis_cluster_nodes = vec!["redis://:cluster-secret@r1:7001/".into()];
        c.cluster.redis_urls = vec!["redis://u:lease-secret@r1:7001/".into()];
        c.messaging.backend.urls = vec!["amqp://u:url-secret@rabbit:5672".into()];
        c.messaging.backend.password = "broker-secret".into();
        c.messaging.backend.management_password = "mgmt-secret".into();
        c.cluster.peer_password = "peer-secret-0123456789".into();
        let text = toml::to_string_pretty(&c.redacted()).unwrap();
        for secret in [
            "op-secret",
            "redis-secret",
            "sasl-secret",
            "command-key-secret",
            "cluster-secret",
            "lease-secret",
            "url-secret",
            "broker-secret",
            "mgmt-secret",
            "peer-secret",
        ] {
            assert!(!text.contains(secret), "{secret} printed: {text}");
        }
        assert!(text.contains("redis://app:<redacted>@db:6379/0"), "{text}");
        assert_eq!(redact_url_password("redis://127.0.0.1:6379/0"), "redis://127.0.0.1:6379/0");
        assert_eq!(redact_url_password("redis://:pw@h/0"), "redis://:<redacted>@h/0");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = toml::from_str::<Config>("[messaging]\nlisten_port = 1").unwrap_err();
        assert!(e.to_string().contains("listen_port"), "{e}");
    }
}
