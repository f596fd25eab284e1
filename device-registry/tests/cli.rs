//! The operator CLI against the live in-process API.

mod support;

use clap::Parser;
use ferrule_device_registry::cli::run_cli_to;
use ferrule_device_registry::CliCommand;
use support::{TestRegistry, TOKEN};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: CliCommand,
}

async fn run(reg: &TestRegistry, args: &[&str]) -> anyhow::Result<String> {
    // `ferrule <kind> --url U --token T <action> ...`
    let url = reg.base_url();
    let mut full = vec!["ferrule", args[0], "--url", url.as_str(), "--token", TOKEN];
    full.extend_from_slice(&args[1..]);
    let cli = Cli::try_parse_from(full)?;
    let mut out = Vec::new();
    run_cli_to(cli.cmd, &mut out).await?;
    Ok(String::from_utf8(out)?)
}

#[tokio::test]
async fn cli_manages_tenants_devices_and_credentials() {
    let reg = TestRegistry::embedded().await;
    assert_eq!(run(&reg, &["tenant", "create", "acme"]).await.unwrap().trim(), "acme");
    let generated = run(&reg, &["tenant", "create"]).await.unwrap();
    assert!(!generated.trim().is_empty());
    let got = run(&reg, &["tenant", "get", "acme"]).await.unwrap();
    assert!(got.contains("\"enabled\": true"));
    let listed = run(&reg, &["tenant", "list", "--filter", r#"{"field":"/id","value":"acme"}"#])
        .await
        .unwrap();
    assert!(listed.contains("\"total\": 1"));
    let out =
        run(&reg, &["tenant", "update", "acme", "--data", r#"{"enabled":false}"#]).await.unwrap();
    assert!(out.starts_with("version "));

    assert_eq!(
        run(&reg, &["device", "create", "acme", "dev-1", "--data", r#"{"ext":{"k":"v"}}"#])
            .await
            .unwrap()
            .trim(),
        "dev-1"
    );
    assert!(run(&reg, &["device", "list", "acme"]).await.unwrap().contains("dev-1"));
    assert!(run(&reg, &["device", "get", "acme", "dev-1"]).await.unwrap().contains("\"k\": \"v\""));
    run(&reg, &["device", "update", "acme", "dev-1", "--data", r#"{"enabled":false}"#])
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("creds.json");
    std::fs::write(&file, r#"[{"type":"hashed-password","auth-id":"dev-1","secrets":[{"pwd-plain":"cli-password-123"}]}]"#).unwrap();
    run(&reg, &["credentials", "set", "acme", "dev-1", "--data", &format!("@{}", file.display())])
        .await
        .unwrap();
    let creds = run(&reg, &["credentials", "get", "acme", "dev-1"]).await.unwrap();
    assert!(creds.contains("dev-1") && !creds.contains("cli-password-123"));

    // Errors carry the registry's message and status.
    let err = run(&reg, &["device", "get", "acme", "missing"]).await.unwrap_err().to_string();
    assert!(err.contains("404"), "{err}");
    let err = run(&reg, &["tenant", "delete", "acme", "--if-match", "stale"])
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("412"), "{err}");
    run(&reg, &["device", "delete", "acme", "dev-1"]).await.unwrap();
    run(&reg, &["tenant", "delete", "acme"]).await.unwrap();
    assert!(run(&reg, &["tenant", "get", "acme"]).await.is_err());

    // Wrong token: 401.
    let url = reg.base_url();
    let cli = Cli::try_parse_from([
        "ferrule",
        "tenant",
        "--url",
        url.as_str(),
        "--token",
        "not-the-token-at-all",
        "list",
    ])
    .unwrap();
    let err = run_cli_to(cli.cmd, &mut Vec::new()).await.unwrap_err().to_string();
    assert!(err.contains("401"), "{err}");
}
