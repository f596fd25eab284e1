//! Serves the management API on an embedded store in a temporary directory, for
//! schemathesis and manual testing:
//!
//! ```sh
//! cargo run -p ferrule-device-registry --example serve -- --port 28080 --token TOKEN
//! ```
//!
//! Prints `listening on http://ADDR` once ready; stops on Ctrl-C or SIGTERM.

use clap::Parser;
use ferrule_device_registry::{Registry, RegistryConfig};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    /// Port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Operator token (at least 16 characters).
    #[arg(long, env = "FERRULE_REGISTRY_TOKEN")]
    token: String,
    /// Data directory (default: a temporary directory removed on exit).
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    let tmp = tempfile::tempdir()?;
    let data_dir = args.data_dir.unwrap_or_else(|| tmp.path().to_owned());
    let config = RegistryConfig {
        listen: ([127, 0, 0, 1], args.port).into(),
        auth_tokens: vec![args.token],
        ..RegistryConfig::default()
    };
    let shutdown = CancellationToken::new();
    let registry = Registry::start(&config, &data_dir, shutdown.clone()).await?;
    println!("listening on http://{}", registry.local_addr());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    registry.stop().await;
    Ok(())
}
