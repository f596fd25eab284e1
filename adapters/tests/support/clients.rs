//! The device clients nobody here wrote, run as processes: mosquitto_pub / mosquitto_sub,
//! curl, and libcoap's coap-client (the CoAP tests read its output each their own way).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Command, Output};

use tokio::task::JoinHandle;

/// How a mosquitto client ended.
#[derive(Debug)]
pub struct Run {
    pub code: Option<i32>,
    /// stdout, then stderr (with `-d`: the packets it sent and received).
    pub output: String,
}

/// Runs `tool` (`mosquitto_pub`, `mosquitto_sub`) against `addr` with protocol `version`
/// (`mqttv311`, `mqttv5`), `args` and a hard time limit.
pub fn mosquitto(tool: &str, addr: SocketAddr, version: &str, args: &[&str]) -> JoinHandle<Run> {
    let mut command = Command::new("timeout");
    command.args(["20", tool, "-h", "127.0.0.1", "-p", &addr.port().to_string(), "-V", version]);
    command.args(args);
    tokio::task::spawn_blocking(move || {
        let output = command.output().expect("mosquitto-clients is installed");
        let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&output.stderr));
        Run { code: output.status.code(), output: text }
    })
}

/// Waits for a mosquitto client started with [`mosquitto`] and asserts it exited with 0
/// (`context` in the message).
pub async fn assert_success(client: JoinHandle<Run>, context: &str) -> Run {
    let run = client.await.expect("not cancelled");
    assert_eq!(run.code, Some(0), "{context}: {}", run.output);
    run
}

/// What curl saw: status (0: no answer), headers (names lower-cased), body.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl HttpAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// Runs curl with `args` (`-i` prints the response head before the body).
pub async fn curl(args: Vec<String>) -> HttpAnswer {
    let output = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-s", "-i", "--max-time", "20"])
            .args(&args)
            .output()
            .expect("curl is installed")
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    HttpAnswer { status, headers, body: body.to_owned() }
}

/// curl's arguments for a `method` request to `url` with basic auth `user` (`name:password`),
/// `body` and `headers` (`name: value`); `content-type: text/plain` unless `headers` name
/// a content type (`content-type:` alone: none at all).
pub fn request(
    method: &str,
    url: &str,
    user: Option<&str>,
    body: &str,
    headers: &[&str],
) -> Vec<String> {
    let mut args =
        vec!["-X".into(), method.into(), url.into(), "--data-binary".into(), body.into()];
    if let Some(user) = user {
        args.extend(["-u".into(), user.into()]);
    }
    if !headers.iter().any(|h| h.to_ascii_lowercase().starts_with("content-type:")) {
        args.extend(["-H".into(), "content-type: text/plain".into()]);
    }
    for h in headers {
        args.extend(["-H".into(), h.to_string()]);
    }
    args
}

/// A libcoap client: `coap-client-openssl` over DTLS with `psk` = (identity, key) to
/// `coaps://ADDR{path}`, or, without, `coap-client-notls` to `coap://ADDR{path}`; `args`
/// before the URI.
pub fn coap_client(
    addr: SocketAddr,
    psk: Option<(&str, &str)>,
    args: &[&str],
    path: &str,
) -> Command {
    let (program, scheme) = match psk {
        Some(_) => ("coap-client-openssl", "coaps"),
        None => ("coap-client-notls", "coap"),
    };
    let mut command = Command::new(program);
    if let Some((identity, key)) = psk {
        command.args(["-u", identity, "-k", key]);
    }
    command.args(args).arg(format!("{scheme}://{addr}{path}"));
    command
}

/// Runs `command` (a libcoap client) to its end; returns its output.
pub async fn run_to_end(mut command: Command) -> Output {
    tokio::task::spawn_blocking(move || command.output().expect("libcoap3-bin is installed"))
        .await
        .expect("not cancelled")
}
