//! One setup for every adapter test: a [`MemoryRegistry`], an in-memory broker (with the
//! real command router installed, for the command tests), and the adapter started on
//! ephemeral ports of 127.0.0.1; all of it stopped when the [`Platform`] is dropped.

use std::net::SocketAddr;
use std::sync::Arc;

use ferrule_adapters::coap::{CoapAdapter, CoapConfig};
use ferrule_adapters::http::{HttpAdapter, HttpConfig};
use ferrule_adapters::mqtt::{self, MqttAdapter, MqttConfig};
use ferrule_adapters::Downstream;
use ferrule_command_control::CommandRouter;
use ferrule_messaging::{Broker, Consumer, Message, Outcome, SubscribeOptions};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{amqp, MemoryRegistry};

/// The tenants and devices most tests use: `t1` with `d1` (password `pw1`), the gateway
/// `gw` (`gwpw`) and `child` (which lists `gw` in `via`); `t2` with `d9` (`pw9`).
pub fn devices() -> MemoryRegistry {
    MemoryRegistry::new()
        .tenant("t1")
        .tenant("t2")
        .device("t1", "d1", "pw1")
        .device("t1", "gw", "gwpw")
        .device_via("t1", "child", "", &["gw"])
        .device("t2", "d9", "pw9")
}

/// [`devices`] with DTLS pre-shared keys: `sensor1` (for d1, key `secret1`) and `gw1`
/// (for gw, `gwsecret`) in t1, `d9` (`secret9`) in t2.
pub fn devices_with_psks() -> MemoryRegistry {
    devices()
        .psk("t1", "sensor1", "d1", b"secret1")
        .psk("t1", "gw1", "gw", b"gwsecret")
        .psk("t2", "d9", "d9", b"secret9")
}

/// d1's DTLS identity and key in [`devices_with_psks`].
pub const SENSOR1: (&str, &str) = ("sensor1@t1", "secret1");
/// The gateway's DTLS identity and key in [`devices_with_psks`].
pub const GW1: (&str, &str) = ("gw1@t1", "gwsecret");

/// What an adapter is started with besides its config.
pub struct Wiring {
    pub downstream: Downstream,
    pub registry: Arc<MemoryRegistry>,
    /// The command router, for the command tests.
    pub router: Option<CommandRouter>,
    pub shutdown: CancellationToken,
}

/// An adapter as a test starts it: listening on ephemeral ports of 127.0.0.1, serving
/// until `shutdown`.
pub trait Adapter: Sized {
    /// The adapter's name in messages' `orig_adapter`.
    const NAME: &'static str;
    type Config;

    async fn start(config: Self::Config, wiring: Wiring) -> Self;
}

impl Adapter for MqttAdapter {
    const NAME: &'static str = "hono-mqtt";
    type Config = MqttConfig;

    async fn start(config: MqttConfig, w: Wiring) -> Self {
        let config = MqttConfig { listen: "127.0.0.1:0".parse().unwrap(), ..config };
        mqtt::start_with_commands(config, w.downstream, w.registry, w.router, w.shutdown)
            .expect("adapter starts")
    }
}

/// The HTTP adapter, serving on `addr`.
pub struct Http {
    pub addr: SocketAddr,
}

impl Adapter for Http {
    const NAME: &'static str = "hono-http";
    type Config = HttpConfig;

    async fn start(config: HttpConfig, w: Wiring) -> Self {
        let config = HttpConfig { listen: "127.0.0.1:0".parse().unwrap(), ..config };
        let adapter = HttpAdapter::bind(config, w.downstream, w.registry, w.router)
            .await
            .expect("adapter binds");
        let addr = adapter.listeners().local_addr();
        tokio::spawn(adapter.run(w.shutdown));
        Http { addr }
    }
}

/// The CoAP adapter, serving DTLS on `dtls` and, where unauthenticated devices are
/// allowed, plain UDP on `udp`.
pub struct Coap {
    pub udp: Option<SocketAddr>,
    pub dtls: SocketAddr,
}

impl Adapter for Coap {
    const NAME: &'static str = "hono-coap";
    type Config = CoapConfig;

    async fn start(config: CoapConfig, w: Wiring) -> Self {
        let any = "127.0.0.1:0".parse().unwrap();
        let config = CoapConfig { listen: any, listen_dtls: any, ..config };
        let adapter = CoapAdapter::bind(config, w.downstream, w.registry, w.router)
            .await
            .expect("adapter binds");
        let (udp, dtls) = (adapter.local_addr(), adapter.local_dtls_addr());
        tokio::spawn(adapter.run(w.shutdown));
        Coap { udp, dtls }
    }
}

/// A running adapter with its registry and broker; stops the adapter when dropped.
pub struct Platform<A> {
    pub adapter: A,
    pub broker: Broker,
    /// The adapter's downstream (its counters).
    pub downstream: Downstream,
    pub registry: MemoryRegistry,
    pub shutdown: CancellationToken,
}

impl<A> Drop for Platform<A> {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl<A: Adapter> Platform<A> {
    /// Starts the adapter without commands.
    pub async fn start(registry: MemoryRegistry, config: A::Config) -> Self {
        Self::launch(registry, config, false).await
    }

    /// Starts the adapter with the command router installed (see
    /// [`super::broker_with_commands`]).
    pub async fn with_commands(registry: MemoryRegistry, config: A::Config) -> Self {
        Self::launch(registry, config, true).await
    }

    async fn launch(registry: MemoryRegistry, config: A::Config, commands: bool) -> Self {
        let (broker, router) = if commands {
            let (broker, router) = super::broker_with_commands(&registry);
            (broker, Some(router))
        } else {
            (Broker::in_memory(&Default::default()), None)
        };
        let downstream = Downstream::new(broker.clone());
        let shutdown = CancellationToken::new();
        let wiring = Wiring {
            downstream: downstream.clone(),
            registry: Arc::new(registry.clone()),
            router,
            shutdown: shutdown.clone(),
        };
        let adapter = A::start(config, wiring).await;
        Platform { adapter, broker, downstream, registry, shutdown }
    }
}

impl<A: Adapter> Platform<A> {
    /// The `ttd` of the adapter's next notification for `device` on `events`.
    pub async fn ttd(&self, events: &mut Consumer, device: &str) -> i32 {
        amqp::ttd(events, A::NAME, device).await
    }

    /// Waits until each of `devices` has announced that it waits for a command.
    pub async fn ready(&self, events: &mut Consumer, devices: &[&str]) {
        amqp::ready(events, A::NAME, devices).await;
    }

    /// Once `device` has announced that it waits (in `wait`, running), sends it `command`,
    /// asserts that it was accepted and returns what `wait` got.
    pub async fn command_when_waiting<T>(
        &self,
        events: &mut Consumer,
        device: &str,
        wait: JoinHandle<T>,
        command: Message,
    ) -> T {
        self.ready(events, &[device]).await;
        let outcome = self.send_command(command).await.expect("not cancelled");
        assert_eq!(outcome, Outcome::Accepted, "the command for {device}");
        wait.await.expect("not cancelled")
    }
}

impl<A> Platform<A> {
    /// A consumer on `address` with `credit`.
    pub fn consumer(&self, address: &str, credit: u32) -> Consumer {
        let consumer =
            self.broker.subscribe(address, &SubscribeOptions::default()).expect("address exists");
        consumer.add_credit(credit);
        consumer
    }

    /// Sends a command as the application (to `command/t1`); resolves to its disposition.
    pub fn send_command(&self, message: Message) -> JoinHandle<Outcome> {
        let submission = self.broker.submit("command/t1", message, false);
        tokio::spawn(submission.outcome())
    }
}

impl Platform<MqttAdapter> {
    pub fn addr(&self) -> SocketAddr {
        self.adapter.local_addr()
    }
}

impl Platform<Http> {
    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.adapter.addr)
    }
}

impl Platform<Coap> {
    pub fn udp(&self) -> SocketAddr {
        self.adapter.udp.expect("plain UDP is on (allow_unauthenticated)")
    }

    pub fn dtls(&self) -> SocketAddr {
        self.adapter.dtls
    }
}
