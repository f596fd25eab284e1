//! ferrule-loadgen: the load generator of Ferrule's benchmark suite
//! (`python3 tests/loadgen/bench.py`). Every subcommand drives real sockets and prints
//! one JSON line of results on stdout; progress and readiness go to stderr.

mod amqp_load;
mod coap_load;
mod http_load;
mod mqtt;
mod mqtt_load;
mod util;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "ferrule-loadgen",
    version,
    about = "Load generator for Ferrule benchmarks (MQTT, AMQP, HTTP, CoAP)"
)]
struct Cli {
    /// Tokio worker threads (0: one per core).
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// MQTT 3.1.1 publishers: N connections, QoS 0 or 1 (windowed), count or duration,
    /// flat out or at a target rate; payloads carry the send timestamp.
    MqttPub(mqtt_load::PubArgs),
    /// MQTT subscriber(s): counts messages and their end-to-end latency.
    MqttSub(mqtt_load::SubArgs),
    /// AMQP 1.0 receiver (SASL PLAIN): accepts every message, counts, latency from the body.
    AmqpRecv(amqp_load::RecvArgs),
    /// AMQP 1.0 producer to any address (SASL PLAIN or ANONYMOUS): unsettled, windowed,
    /// optionally durable; counts accepted outcomes.
    AmqpSend(amqp_load::SendArgs),
    /// HTTP/1.1 keep-alive POSTs, one request at a time per connection.
    HttpPub(http_load::HttpArgs),
    /// A bare hyper hello-world HTTP/1.1 server (the peer for http-pub).
    HelloServer(http_load::HelloArgs),
    /// CoAP over UDP, CON or NON, with a window of outstanding requests per client.
    CoapPub(coap_load::CoapArgs),
    /// Opens N idle MQTT connections and holds them until stdin closes or a signal.
    Idle(mqtt_load::IdleArgs),
    /// CONNECT→CONNACK→DISCONNECT cycles as fast as possible over concurrent workers.
    ConnectStorm(mqtt_load::StormArgs),
    /// Request/response commands from an AMQP application to MQTT devices run here.
    Commands(amqp_load::CommandArgs),
}

fn main() {
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if cli.threads > 0 {
        rt.worker_threads(cli.threads);
    }
    let rt = rt.build().expect("tokio runtime");
    let result = rt.block_on(async move {
        match cli.command {
            Command::MqttPub(a) => mqtt_load::run_pub(a).await,
            Command::MqttSub(a) => mqtt_load::run_sub(a).await,
            Command::AmqpRecv(a) => amqp_load::run_recv(a).await,
            Command::AmqpSend(a) => amqp_load::run_send(a).await,
            Command::HttpPub(a) => http_load::run_pub(a).await,
            Command::HelloServer(a) => http_load::run_hello(a).await,
            Command::CoapPub(a) => coap_load::run_pub(a).await,
            Command::Idle(a) => mqtt_load::run_idle(a).await,
            Command::ConnectStorm(a) => mqtt_load::run_storm(a).await,
            Command::Commands(a) => amqp_load::run_commands(a).await,
        }
    });
    // Open connections and tasks are not worth an orderly shutdown here.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    if let Err(e) = result {
        eprintln!("ferrule-loadgen: {e}");
        std::process::exit(1);
    }
}
