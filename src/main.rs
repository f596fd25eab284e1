//! The `ferrule` binary: parses the command line, loads the configuration, starts the
//! [`Platform`] and maps errors to exit codes. Everything else lives in the library and
//! the component crates.

/// mimalloc instead of glibc malloc: malloc/free were 11-13 % of the broker's CPU under
/// load; with mimalloc QoS 1 and durable events go up 16-19 % (BENCHMARKS.md, round 2).
/// Feature `system-alloc` keeps glibc malloc, for heap profilers that hook it.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};

use ferrule::{config, Platform};
use ferrule_messaging::UserConfig;

#[derive(Parser)]
#[command(
    name = "ferrule",
    version,
    about = "IoT device connectivity: MQTT, HTTP and CoAP devices, AMQP 1.0 applications"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the platform (all components in one process, embedded storage).
    Serve {
        /// Configuration file (TOML); without it the defaults apply.
        #[arg(long, short, env = "FERRULE_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    #[command(flatten)]
    Registry(ferrule_device_registry::CliCommand),
    #[command(flatten)]
    App(ferrule::app_cli::AppCommand),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the default configuration, with every key documented.
    PrintDefault,
    /// Load and validate a configuration (with environment overrides), print the result.
    Check {
        #[arg(long, short, env = "FERRULE_CONFIG")]
        config: Option<PathBuf>,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Config { command: ConfigCommand::PrintDefault } => {
            print!("{}", config::default_toml());
            Ok(())
        }
        Command::Config { command: ConfigCommand::Check { config } } => {
            config::load(config.as_deref()).map(|c| {
                print!("{}", toml::to_string_pretty(&c.redacted()).expect("config serialises"));
            })
        }
        Command::Serve { config } => serve(config.as_deref()),
        Command::Registry(command) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(ferrule_device_registry::run_cli(command))),
        Command::App(command) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(ferrule::app_cli::run(command))),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrule: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(log: &config::LogConfig) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match log.format {
        config::LogFormat::Text => builder.init(),
        config::LogFormat::Json => builder.json().init(),
    }
}

fn serve(path: Option<&Path>) -> anyhow::Result<()> {
    let mut config = config::load(path)?;
    init_logging(&config.log);
    ferrule_net::private::create_dir(&config.data_dir)
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    ensure_application_user(&mut config)?;
    ensure_operator_token(&mut config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(config))
}

async fn run(config: config::Config) -> anyhow::Result<()> {
    let platform = Platform::start(&config).await?;
    platform.write_listeners(&config.data_dir)?;
    tracing::info!(data_dir = %config.data_dir.display(), "ferrule is up");
    wait_for_signal().await;
    tracing::info!("shutting down");
    platform.shutdown().await?;
    tracing::info!("bye");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// With no application user configured and anonymous access off, nobody could connect:
/// create `admin@*` with a random password, kept in `DATA_DIR/admin-credentials` (mode
/// 0600) and reused on later starts. The password itself is never logged.
fn ensure_application_user(config: &mut config::Config) -> anyhow::Result<()> {
    let sasl = &mut config.messaging.sasl;
    if !sasl.users.is_empty() || sasl.allow_anonymous {
        return Ok(());
    }
    let path = config.data_dir.join("admin-credentials");
    let password = match std::fs::read_to_string(&path) {
        Ok(text) => text
            .lines()
            .find_map(|l| l.strip_prefix("password="))
            .map(str::to_owned)
            .with_context(|| format!("{} has no password= line", path.display()))?,
        Err(_) => {
            use rand::distr::{Alphanumeric, SampleString};
            let password = Alphanumeric.sample_string(&mut rand::rng(), 24);
            write_private(&path, &format!("# AMQP application user created by ferrule serve\nusername=admin@*\npassword={password}\n"))?;
            password
        }
    };
    tracing::info!(user = "admin@*", credentials = %path.display(), "no application users configured; using the generated admin user (log in as admin@TENANT)");
    sasl.users.push(UserConfig { username: "admin@*".into(), password });
    Ok(())
}

/// Likewise for operators: with no management API token configured and anonymous access
/// off, generate one into `DATA_DIR/operator-token` (mode 0600), reused on later starts.
fn ensure_operator_token(config: &mut config::Config) -> anyhow::Result<()> {
    let registry = &mut config.registry;
    if !registry.auth_tokens.is_empty() || registry.allow_anonymous {
        return Ok(());
    }
    let path = config.data_dir.join("operator-token");
    let token = match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().to_owned(),
        Err(_) => {
            use rand::distr::{Alphanumeric, SampleString};
            let token = Alphanumeric.sample_string(&mut rand::rng(), 32);
            write_private(&path, &format!("{token}\n"))?;
            token
        }
    };
    anyhow::ensure!(
        token.len() >= 16,
        "{} holds a token shorter than 16 characters",
        path.display()
    );
    tracing::info!(token_file = %path.display(), "no operator token configured; using the generated one");
    registry.auth_tokens.push(token);
    Ok(())
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(contents.as_bytes())?;
    Ok(())
}
