//! The whole platform in one process: every component started from one [`Config`], and
//! stopped tier by tier.
//!
//! Start order: the messaging store and AMQP listener, the ops endpoint, the registry,
//! the command router, then the device adapters. Stop order (each tier has its own
//! shutdown token, and gets `grace` to drain before the next one is told):
//! 1. device adapters (MQTT, HTTP, CoAP): stop accepting, finish in-flight uploads, which
//!    still reach the core;
//! 2. the command router: commands being routed get their outcome (released, as their
//!    devices are gone), its tasks end;
//! 3. the management API and the ops endpoint;
//! 4. the AMQP endpoint (applications): connections closed, unsettled deliveries released;
//! 5. maintenance, then the messaging store is flushed and closed.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use ferrule_adapters::{coap::CoapAdapter, http::HttpAdapter, mqtt, DeviceRegistry, Downstream};
use ferrule_command_control::CommandRouter;
use ferrule_device_registry::{Management, Registry};
use ferrule_messaging::remote::{ConsumerLeases, Provision, Remote};
use ferrule_messaging::{AddressScheme, AmqpServer, BackendKind, Broker};

use crate::cluster::{ClusterCommands, RedisLeases, Role};
use crate::config::Config;
use crate::{ops, wiring};

/// How long each tier gets to drain on shutdown.
const GRACE: Duration = Duration::from_secs(10);

/// The shutdown token of each tier (see the module docs).
struct Tiers {
    devices: CancellationToken,
    management: CancellationToken,
    applications: CancellationToken,
    maintenance: CancellationToken,
}

/// Dropped without a shutdown (a start that failed half-way, a test that ends), every
/// tier is told to stop, so nothing that had started keeps running.
impl Drop for Tiers {
    fn drop(&mut self) {
        for token in [&self.devices, &self.management, &self.applications, &self.maintenance] {
            token.cancel();
        }
    }
}

impl Tiers {
    fn new() -> Self {
        Self {
            devices: CancellationToken::new(),
            management: CancellationToken::new(),
            applications: CancellationToken::new(),
            maintenance: CancellationToken::new(),
        }
    }
}

/// A running platform.
pub struct Platform {
    listeners: Vec<(&'static str, SocketAddr)>,
    tiers: Tiers,
    broker: Broker,
    registry: Registry,
    management: Management,
    ready: ops::Readiness,
    mqtt: Option<mqtt::MqttAdapter>,
    router: CommandRouter,
    devices: Vec<JoinHandle<()>>,
    management_tasks: Vec<JoinHandle<()>>,
    applications: JoinHandle<()>,
    maintenance: JoinHandle<()>,
    /// The OTLP exporter (stops with maintenance, after sending what is queued).
    exporter: Option<JoinHandle<()>>,
    /// The shared broker, in cluster mode.
    remote: Option<Remote>,
    /// Connections to the other instances, in cluster mode.
    commands: Option<ClusterCommands>,
}

impl std::fmt::Debug for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Platform").field("listeners", &self.listeners).finish_non_exhaustive()
    }
}

impl Platform {
    /// Starts every component of `config` (its data directory must exist) and marks the
    /// platform ready. Listeners configured on port 0 get a free port: see
    /// [`Platform::addr`].
    ///
    /// # Errors
    /// A component that cannot start (bad configuration, a port in use, an unreadable
    /// store); whatever had started is told to stop (its shutdown token is cancelled).
    pub async fn start(config: &Config) -> anyhow::Result<Platform> {
        let tiers = Tiers::new();
        let metrics = ops::install_recorder()?;
        let ready = ops::Readiness::default();
        // The messaging core knows command & control's addresses only from its rules.
        let mut messaging = ferrule_command_control::messaging_config(config.messaging.clone());
        let shared = config.messaging.backend.kind == BackendKind::Amqp;
        if shared {
            messaging.addresses.splice(0..0, ferrule_messaging::remote::local_rules());
        }
        let broker =
            Broker::open(&messaging, &config.data_dir).context("opening the messaging store")?;
        let instance = config.cluster.instance();
        let (remote, redis) = if shared {
            let (remote, redis) =
                start_remote(config, &broker, &instance, &tiers.maintenance).await?;
            let reachable = remote.clone();
            ready.require(Arc::new(move || {
                (!reachable.broker_reachable()).then_some("the shared broker is unreachable")
            }));
            (Some(remote), redis)
        } else {
            (None, None)
        };
        // Instances hand each other commands as this SASL user.
        let peer_password = &config.cluster.peer_password;
        if shared && !peer_password.is_empty() {
            messaging.sasl.users.push(ferrule_messaging::UserConfig {
                username: crate::cluster::PEER_USER.into(),
                password: peer_password.clone(),
            });
        }
        let roles = &config.cluster;
        // Devices' instances take commands from the others through the AMQP listener.
        let peers = shared && !config.cluster.peer_password.is_empty();
        let amqp = if roles.serves(Role::Applications) || (peers && roles.serves(Role::Devices)) {
            Some(AmqpServer::bind(&messaging, broker.clone()).await?)
        } else {
            None
        };
        let ops_listener = ops::bind(&config.ops).await?;
        // Where devices were last seen: fed by the adapters, read by command routing (the
        // last-known gateway) and the management API (`/v1/state`).
        let presence = Arc::new(ferrule_command_control::presence::Presence::default());
        let states = Arc::new(wiring::States(presence.clone(), broker.clone()));
        let registry = if roles.serves(Role::Management) {
            Registry::start_tracking(
                &config.registry,
                &config.data_dir,
                tiers.management.clone(),
                states,
            )
            .await
        } else {
            Registry::start_without_api(
                &config.registry,
                &config.data_dir,
                tiers.management.clone(),
            )
            .await
        }
        .context("starting the device registry")?;
        // One bounded pool for all password work: device logins, management writes and
        // application (SASL) logins.
        let amqp = amqp.map(|amqp| amqp.with_hash_pool(registry.hash_pool().clone()));
        let devices = wiring::RegistryDevices(registry.auth().clone());
        let device_registry: Arc<dyn DeviceRegistry> = Arc::new(devices.clone());
        let key = config.commands.request_key(&config.data_dir)?;
        // Tracing (off unless an OTLP endpoint is configured).
        let (tracer, exporter) = match crate::otlp::Endpoint::parse(&config.tracing.otlp_endpoint) {
            Some(endpoint) => {
                let (tracer, spans) = ferrule_net::trace::Tracer::new(config.tracing.sample_ratio);
                let service = config.tracing.service_name.clone();
                let stop = tiers.maintenance.clone();
                (tracer, Some(tokio::spawn(crate::otlp::export(endpoint, service, spans, stop))))
            }
            None => (ferrule_net::trace::Tracer::disabled(), None),
        };
        let router = CommandRouter::with_parts(
            broker.clone(),
            Arc::new(devices),
            key,
            presence,
            tracer.clone(),
        );
        let commands = match &redis {
            Some(redis) if !peer_password.is_empty() => {
                let peer_tls = config.cluster.peer_tls_ca_file.clone();
                let bound = amqp.as_ref().and_then(|a| match peer_tls {
                    Some(_) => a.listeners().local_tls_addr(),
                    None => Some(a.listeners().local_addr()),
                });
                let mut advertise = advertised(config, bound)?;
                if peer_tls.is_some() {
                    advertise = format!("amqps://{advertise}");
                }
                let commands = ClusterCommands::start(
                    redis.clone(),
                    broker.clone(),
                    &advertise,
                    peer_password,
                    config.messaging.backend.outcome_timeout,
                    peer_tls,
                )
                .await?;
                router.set_cluster(Arc::new(commands.clone()));
                tracing::info!(%advertise, "commands are routed between instances");
                Some(commands)
            }
            _ => None,
        };
        router.install();
        let downstream = Downstream::new(broker.clone())
            .with_rate_limits(config.adapters.rate_limits())
            .with_presence(router.presence().clone())
            .with_tracer(tracer);
        let mut listeners = vec![("ops", ops_listener.local_addr()?)];
        listeners.extend(registry.api_addr().map(|addr| ("registry", addr)));
        let mut device_tasks = Vec::new();
        let mqtt = if roles.serves(Role::Devices) {
            let commands = Some(router.clone());
            let adapters = &config.adapters;
            let http = HttpAdapter::bind(
                adapters.http.clone(),
                downstream.clone(),
                device_registry.clone(),
                commands.clone(),
            )
            .await?;
            let coap = CoapAdapter::bind(
                adapters.coap.clone(),
                downstream.clone(),
                device_registry.clone(),
                commands.clone(),
            )
            .await?;
            let mqtt = mqtt::start_with_commands(
                adapters.mqtt.clone(),
                downstream,
                device_registry,
                commands,
                tiers.devices.clone(),
            )?;
            listeners.extend([
                ("http", http.listeners().local_addr()),
                ("mqtt", mqtt.local_addr()),
                ("coaps", coap.local_dtls_addr()),
            ]);
            listeners.extend(coap.local_addr().map(|addr| ("coap", addr)));
            listeners.extend(http.listeners().local_tls_addr().map(|addr| ("https", addr)));
            listeners.extend(mqtt.local_tls_addr().map(|addr| ("mqtts", addr)));
            device_tasks = vec![
                tokio::spawn(http.run(tiers.devices.clone())),
                tokio::spawn(coap.run(tiers.devices.clone())),
                tokio::spawn(wiring::close_revoked_connections(
                    registry.auth().applied_changes(),
                    mqtt.revalidator(),
                    tiers.devices.clone(),
                )),
            ];
            Some(mqtt)
        } else {
            None
        };
        if let Some(amqp) = &amqp {
            listeners.push(("amqp", amqp.listeners().local_addr()));
            listeners.extend(amqp.listeners().local_tls_addr().map(|addr| ("amqps", addr)));
        }
        let management_tasks = vec![tokio::spawn(ops::run(
            ops_listener,
            config.ops.clone(),
            metrics,
            ready.clone(),
            broker.clone(),
            tiers.management.clone(),
        ))];
        let applications = match amqp {
            Some(amqp) => tokio::spawn(amqp.run(tiers.applications.clone())),
            None => tokio::spawn(async {}),
        };
        let maintenance = tokio::spawn(
            broker
                .clone()
                .run_maintenance(config.messaging.expiry_check_interval, tiers.maintenance.clone()),
        );
        ready.set(true);
        let management = registry.management().clone();
        Ok(Platform {
            listeners,
            tiers,
            broker,
            registry,
            management,
            ready,
            mqtt,
            router,
            devices: device_tasks,
            management_tasks,
            applications,
            maintenance,
            exporter,
            remote,
            commands,
        })
    }

    /// The bound address of listener `name` (`amqp`, `amqps`, `ops`, `registry`, `http`,
    /// `https`, `mqtt`, `mqtts`, `coap`, `coaps`), if it is on.
    pub fn addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners.iter().find(|(n, _)| *n == name).map(|(_, addr)| *addr)
    }

    /// Every bound listener, by name.
    pub fn listeners(&self) -> &[(&'static str, SocketAddr)] {
        &self.listeners
    }

    /// Registry management operations, for in-process provisioning.
    pub fn management(&self) -> &Management {
        &self.management
    }

    /// The messaging core.
    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Writes the bound addresses to `DATA_DIR/listeners.json`, so that tools and tests can
    /// find listeners configured on port 0.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn write_listeners(&self, data_dir: &Path) -> anyhow::Result<()> {
        let body: Vec<String> =
            self.listeners.iter().map(|(name, addr)| format!("  \"{name}\": \"{addr}\"")).collect();
        let path = data_dir.join("listeners.json");
        let tmp = data_dir.join("listeners.json.tmp");
        std::fs::write(&tmp, format!("{{\n{}\n}}\n", body.join(",\n")))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }

    /// Stops the platform tier by tier (see the module docs) and flushes the store.
    ///
    /// # Errors
    /// The messaging store could not be flushed.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.ready.set(false);
        let tiers = &self.tiers;

        let mqtt = self.mqtt;
        stop_tier("device adapters", Some(&tiers.devices), self.devices, async move {
            if let Some(mqtt) = mqtt {
                mqtt.stopped().await;
            }
        })
        .await;
        // With the device sessions gone, commands in flight are answered or released.
        stop_tier("command router", None, Vec::new(), self.router.stopped()).await;
        let registry = self.registry;
        stop_tier(
            "management API and ops",
            Some(&tiers.management),
            self.management_tasks,
            async move {
                registry.stopped().await;
            },
        )
        .await;
        stop_tier("AMQP endpoint", Some(&tiers.applications), vec![self.applications], async {})
            .await;

        if let Some(commands) = &self.commands {
            commands.close().await;
        }
        if let Some(remote) = &self.remote {
            remote.close().await;
        }
        tiers.maintenance.cancel();
        let _ = self.maintenance.await;
        if let Some(exporter) = self.exporter {
            let _ = tokio::time::timeout(GRACE, exporter).await;
        }
        self.broker.close().await.context("flushing and closing the messaging store")?;
        Ok(())
    }
}

/// Connects the messaging core to the shared broker of `[messaging.backend]` (with
/// RabbitMQ: consumer leases in Redis and the telemetry policy made first).
async fn start_remote(
    config: &Config,
    broker: &Broker,
    instance: &str,
    stop: &CancellationToken,
) -> anyhow::Result<(Remote, Option<Arc<RedisLeases>>)> {
    let backend = &config.messaging.backend;
    let redis = if config.cluster.redis_urls.is_empty() {
        None
    } else {
        Some(
            RedisLeases::start(&config.cluster, instance, stop.clone())
                .await
                .context("leases in Redis ([cluster] redis_urls)")?,
        )
    };
    let (leases, provision) = match (&redis, backend.addresses) {
        (Some(redis), AddressScheme::Rabbitmq) => {
            let admin = crate::cluster::RabbitAdmin::new(
                &backend.management_url,
                &backend.management_username,
                &backend.management_password,
            )
            .context("[messaging.backend] management_url")?;
            let admin = Arc::new(admin);
            // The broker may come up after this instance (Kubernetes starts them together):
            // no reason to refuse to start; the policy applies to queues made meanwhile too.
            if let Err(e) = admin.telemetry_policy().await {
                tracing::warn!(error = %format!("{e:#}"), "cannot make the telemetry policy at RabbitMQ yet; retrying every 5 s");
                tokio::spawn(retry_telemetry_policy(admin.clone(), stop.clone()));
            }
            let leases: Arc<dyn ConsumerLeases> = Arc::new(crate::cluster::Leases(redis.clone()));
            let provision: Arc<dyn Provision> = admin;
            (Some(leases), Some(provision))
        }
        _ => (None, None),
    };
    tracing::info!(instance, brokers = ?backend.urls, addresses = ?backend.addresses, "cluster mode: telemetry and events go through the shared broker");
    Ok((Remote::install(broker, backend, instance, leases, provision), redis))
}

/// Makes RabbitMQ's telemetry policy once the management API answers.
async fn retry_telemetry_policy(admin: Arc<crate::cluster::RabbitAdmin>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        if admin.telemetry_policy().await.is_ok() {
            tracing::info!("telemetry policy made at RabbitMQ");
            return;
        }
    }
}

/// Where the other instances reach this one's AMQP listener: `[cluster] advertise`, else
/// the bound address when it is a concrete one.
fn advertised(config: &Config, bound: Option<SocketAddr>) -> anyhow::Result<String> {
    if !config.cluster.advertise.is_empty() {
        return Ok(config.cluster.advertise.clone());
    }
    match bound {
        Some(addr) if !addr.ip().is_unspecified() => Ok(addr.to_string()),
        Some(_) => anyhow::bail!(
            "[cluster] advertise is needed: [messaging] listen is a wildcard address, which \
             other instances cannot connect to"
        ),
        None => anyhow::bail!(
            "[cluster] peer_password needs the applications role (the AMQP listener), which \
             is how other instances hand commands to this one"
        ),
    }
}

/// Tells a tier to stop (cancels its token, if it has one) and waits up to [`GRACE`] for
/// its tasks and `also` to end.
async fn stop_tier(
    tier: &str,
    token: Option<&CancellationToken>,
    tasks: Vec<JoinHandle<()>>,
    also: impl std::future::Future<Output = ()>,
) {
    if let Some(token) = token {
        token.cancel();
    }
    let stopped = async {
        for task in tasks {
            let _ = task.await;
        }
        also.await;
    };
    if tokio::time::timeout(GRACE, stopped).await.is_err() {
        tracing::warn!(tier, "still open after {GRACE:?}; going on with the shutdown");
    }
}
