//! The ntex server: the worker system, the listeners (plain and TLS, with per-source
//! admission as each connection is accepted), and the v3.1.1 / v5 services wired to the
//! handlers in `connection`, `publish` and `subscribe`.

use std::sync::Arc;

use ntex_mqtt::{v3, v5, Control, MqttServer, MqttServiceConfig, QoS};
use ntex_service::cfg::SharedCfg;
use ntex_service::Service as _;
use ntex_util::time::Seconds;
use tokio_util::sync::CancellationToken;

use super::connection::{connect_v3, connect_v5, stopped, Close, Shared};
use super::inflight::InFlight;
use super::publish::{publish_v3, publish_v5};
use super::session::Session;
use super::subscribe::{protocol_v3, protocol_v5};

/// Runs the ntex system and server on the current thread until `shutdown`.
/// `ready` learns whether the server started.
pub(super) fn serve(
    listener: std::net::TcpListener,
    tls: Option<(std::net::TcpListener, Arc<rustls::ServerConfig>)>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    ready: std::sync::mpsc::Sender<std::io::Result<()>>,
) {
    let system = ntex_rt::System::build()
        .name("ferrule-mqtt")
        .disable_signals()
        .build(ntex_net::DefaultRuntime);
    system.block_on(async move {
        let config = &shared.config;
        // The codec limit bounds memory per packet; payloads slightly over `max_payload`
        // still get a proper answer (error topic / PUBACK reason), bigger ones a protocol
        // error. A whole packet under the limit is delivered in one piece.
        let max_packet =
            u32::try_from(config.max_payload.saturating_add(64 * 1024)).unwrap_or(u32::MAX);
        let connect_timeout =
            Seconds(u16::try_from(config.connect_timeout.as_secs().max(1)).unwrap_or(u16::MAX));
        let mqtt_config = || {
            MqttServiceConfig::new()
                .set_max_qos(QoS::AtLeastOnce)
                .set_max_size(max_packet)
                // MQTT 5 Receive Maximum: what a connection may have in flight here (paho
                // keeps 20 QoS 1 publishes in flight by default; ntex's 16 cut it off).
                .set_max_receive(config.max_in_flight)
                .set_min_chunk_size(max_packet)
                // A silent client is dropped after `connect_timeout` whether it stalls before
                // or inside its CONNECT.
                .protocol_version_timeout(connect_timeout)
                .set_connect_timeout(connect_timeout)
                .set_handshake_timeout(connect_timeout)
                // Without this, QoS 0 publishes that arrive right before a DISCONNECT are
                // dropped (one-shot clients like mosquitto_pub lose messages).
                .set_handle_qos_after_disconnect(Some(QoS::AtLeastOnce))
        };
        let per_worker = config.max_connections.div_ceil(config.workers).max(1);
        let factory_shared = shared.clone();
        let builder = ntex_server::net::ServerBuilder::default()
            .name("ferrule-mqtt")
            .workers(config.workers)
            .disable_signals()
            .maxconn(per_worker)
            .shutdown_timeout(ntex_util::time::Millis(
                u32::try_from(config.shutdown_grace.as_millis()).unwrap_or(u32::MAX),
            ))
            .listen("mqtt", listener, SharedCfg::new("MQTT").add(mqtt_config()), async move |_| {
                let admission = factory_shared.admission.clone();
                ntex_service::apply_fn(
                    build_server(factory_shared.clone()),
                    async move |io: ntex_io::Io, inner| {
                        // Per-source caps and connection rate, checked as the connection is
                        // accepted (before a byte is read); the place is held until it closes.
                        let Some(_admitted) = admit(&admission, &io) else { return Ok(()) };
                        inner.call(io).await
                    },
                )
            });
        let builder = match (builder, tls) {
            (Ok(builder), Some((listener, server_config))) => {
                let tls_config = ntex_tls::TlsConfig::new().set_handshake_timeout(connect_timeout);
                let cfg = SharedCfg::new("MQTTS").add(mqtt_config()).add(tls_config);
                let factory_shared = shared.clone();
                builder.listen("mqtts", listener, cfg, async move |_| {
                    // A failed handshake (bad or expired client certificate, plain text on
                    // the TLS port) ends that connection only.
                    let admission = factory_shared.admission.clone();
                    let tls = ntex_tls::rustls::TlsAcceptor::new(server_config.clone())
                        .map_err(|e| {
                            ntex_mqtt::MqttError::Service(Close(format!(
                                "TLS handshake failed: {e}"
                            )))
                        })
                        .and_then(build_server(factory_shared.clone()));
                    ntex_service::apply_fn(tls, async move |io: ntex_io::Io, inner| {
                        // Admitted before the TLS handshake costs anything.
                        let Some(_admitted) = admit(&admission, &io) else { return Ok(()) };
                        inner.call(io).await
                    })
                })
            }
            (builder, _) => builder,
        };
        let server = match builder {
            Ok(builder) => builder.run(),
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        tokio::select! {
            _ = shutdown.cancelled() => {
                tracing::info!("MQTT adapter stopping");
                // Devices first hear that this server goes away (MQTT 5: 0x8B), and
                // reconnect elsewhere; uploads in flight still finish.
                shared.draining.cancel();
                ntex_util::time::sleep(ntex_util::time::Millis(200)).await;
                server.stop(true).await;
            }
            result = server.clone() => {
                if let Err(e) = result {
                    tracing::error!(error = %e, "MQTT server stopped");
                }
            }
        }
    });
}

/// One worker's MQTT service: v3.1.1 and v5 on the same port; `Req` is the connection
/// (plain or with a TLS filter). The service types are unnameable (closures), hence the
/// long signature.
#[allow(clippy::type_complexity)]
pub(super) fn build_server<Req>(
    shared: Arc<Shared>,
) -> MqttServer<
    (),
    Req,
    impl ntex_service::Service<
        (),
        ntex_service::State<(), ntex_io::IoBoxed>,
        Res = (),
        Error = ntex_mqtt::MqttError<Close>,
    >,
    impl ntex_service::Service<
        (),
        ntex_service::State<(), ntex_io::IoBoxed>,
        Res = (),
        Error = ntex_mqtt::MqttError<Close>,
    >,
    Close,
>
where
    Req: ntex_service::RequestState<ntex_io::IoBoxed, State = ()>,
{
    let in_flight =
        InFlight { max: shared.config.max_in_flight, max_bytes: shared.config.max_in_flight_bytes };
    let (s1, s2, s3, s4) = (shared.clone(), shared.clone(), shared.clone(), shared.clone());
    let (s5, s6, s7, s8) = (shared.clone(), shared.clone(), shared.clone(), shared);
    let v3 =
        v3::MqttServer::new(async move |session: &v3::Session<Session>, publish: v3::Publish| {
            publish_v3(&s1, session, publish).await
        })
        .protocol(async move |session: &v3::Session<Session>, message: v3::ProtocolMessage| {
            protocol_v3(&s2, session, message).await
        })
        .control(async move |session: &v3::Session<Session>, control: Control<Close>| {
            stopped(&s3, session, control);
            Ok::<_, Close>(None)
        })
        .replace_middlewares(in_flight)
        .build(async move |connect: v3::Connect| connect_v3(&s4, connect).await);
    let v5 =
        v5::MqttServer::new(async move |session: &v5::Session<Session>, publish: v5::Publish| {
            publish_v5(&s5, session, publish).await
        })
        .protocol(async move |session: &v5::Session<Session>, message: v5::ProtocolMessage| {
            protocol_v5(&s6, session, message).await
        })
        .control(async move |session: &v5::Session<Session>, control: Control<Close>| {
            stopped(&s7, session, control);
            Ok::<_, Close>(None)
        })
        .replace_middlewares(in_flight)
        .build(async move |connect: v5::Connect| connect_v5(&s8, connect).await);
    MqttServer::new().v3(v3).v5(v5)
}

/// The per-source admission of an accepted connection (caps and connection rate), held
/// until the connection closes; `None`: refused (the connection is closed unanswered, before
/// anything is read, and counted in `ferrule_connections_refused_total`). Connections whose
/// peer address is unknown are admitted.
pub(super) fn admit(
    admission: &Arc<ferrule_net::listener::Admission>,
    io: &ntex_io::Io,
) -> Option<Option<ferrule_net::listener::Admitted>> {
    let Some(ip) = io.query::<ntex_io::types::PeerAddr>().get().map(|peer| peer.0.ip()) else {
        return Some(None);
    };
    match admission.admit_source(ip) {
        Ok(admitted) => Some(Some(admitted)),
        Err(refusal) => {
            tracing::debug!(%ip, reason = refusal.as_str(), "MQTT connection refused");
            None
        }
    }
}
