//! HTTP/1.1 load: `http-pub` (keep-alive POSTs over hyper client connections) and
//! `hello-server` (a bare hyper hello-world server, the peer for comparison).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;

use crate::util::{self, Result, Stats};

#[derive(Args, Debug)]
pub struct HttpArgs {
    /// Server address (host:port).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub host: String,
    /// Request path (template, `{i}` = connection index).
    #[arg(long, default_value = "/telemetry")]
    pub path: String,
    /// Request method.
    #[arg(long, default_value = "POST")]
    pub method: String,
    /// Basic auth `user:password` (template, `{i}` = connection index modulo --devices).
    #[arg(long)]
    pub basic: Option<String>,
    /// Number of distinct devices behind `{i}` in --basic (0: one per connection).
    #[arg(long, default_value_t = 0)]
    pub devices: usize,
    /// Extra request header `Name: value` (repeatable).
    #[arg(long = "header")]
    pub headers: Vec<String>,
    /// Content type of the body.
    #[arg(long, default_value = "application/octet-stream")]
    pub content_type: String,
    /// Keep-alive connections, one request at a time each.
    #[arg(long, default_value_t = 16)]
    pub connections: usize,
    /// Body size in bytes (at least 8: the send timestamp).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    #[command(flatten)]
    pub amount: util::Amount<50_000>,
    /// Source addresses to spread the connections over.
    #[arg(long, default_value = "")]
    pub sources: String,
}

fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(T[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

struct Job {
    addr: SocketAddr,
    source: Option<IpAddr>,
    host: String,
    path: String,
    method: hyper::Method,
    auth: Option<String>,
    headers: Vec<(String, String)>,
    content_type: String,
    size: usize,
    quota: u64,
    deadline: Option<Instant>,
}

async fn connection(job: Job) -> Stats {
    let mut s = Stats::default();
    let stream = match util::connect_from(job.addr, job.source).await {
        Ok(st) => st,
        Err(e) => {
            s.fail(format!("connect: {e}"));
            return s;
        }
    };
    let (mut send, conn) =
        match hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await {
            Ok(x) => x,
            Err(e) => {
                s.fail(format!("handshake: {e}"));
                return s;
            }
        };
    let driver = tokio::spawn(conn);
    let mut body = util::payload(job.size);
    let mut done = 0;
    while done < job.quota && job.deadline.is_none_or(|d| Instant::now() < d) {
        if send.ready().await.is_err() {
            s.fail("connection closed");
            break;
        }
        util::stamp(&mut body);
        let mut req = Request::builder()
            .method(job.method.clone())
            .uri(&job.path)
            .header(hyper::header::HOST, &job.host)
            .header(hyper::header::CONTENT_TYPE, &job.content_type);
        if let Some(auth) = &job.auth {
            req = req.header(hyper::header::AUTHORIZATION, auth);
        }
        for (k, v) in &job.headers {
            req = req.header(k, v);
        }
        let req = req.body(Full::new(Bytes::copy_from_slice(&body))).expect("request");
        let t0 = Instant::now();
        match send.send_request(req).await {
            Ok(resp) => {
                let status = resp.status();
                let drained = resp.into_body().collect().await;
                s.lat.record(t0.elapsed());
                done += 1;
                if status.is_success() && drained.is_ok() {
                    s.ok += 1;
                } else {
                    s.errors += 1;
                    s.count(status.as_u16().to_string());
                }
            }
            Err(e) => {
                s.fail(format!("request: {e}"));
                break;
            }
        }
    }
    s.finished = Some(Instant::now());
    drop(send);
    let _ = tokio::time::timeout(Duration::from_secs(2), driver).await;
    s
}

pub async fn run_pub(a: HttpArgs) -> Result<()> {
    util::raise_nofile(1 << 20);
    let addr = util::resolve(&a.host)?;
    let sources = util::parse_sources(&a.sources)?;
    let method: hyper::Method = a.method.parse()?;
    let mut headers = Vec::new();
    for h in &a.headers {
        let (k, v) =
            h.split_once(':').ok_or_else(|| format!("header {h:?}: expected `Name: value`"))?;
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let start = Instant::now();
    let deadline = a.amount.deadline(start);
    let n = a.connections.max(1);
    let mut tasks = Vec::new();
    for i in 0..n {
        let d = util::device(i, a.devices);
        let job = Job {
            addr,
            source: util::spread(&sources, i),
            host: a.host.clone(),
            path: util::expand(&a.path, d),
            method: method.clone(),
            auth: a
                .basic
                .as_ref()
                .map(|b| format!("Basic {}", base64(util::expand(b, d).as_bytes()))),
            headers: headers.clone(),
            content_type: a.content_type.clone(),
            size: a.size,
            quota: a.amount.quota(n, i),
            deadline,
        };
        tasks.push(tokio::spawn(connection(job)));
    }
    let total = util::join_all(tasks).await;
    let seconds = total.seconds_since(start);
    let mut m = util::base("http-pub", total.ok, seconds, total.errors);
    m.insert("connections".into(), json!(n));
    total.report("statuses", "", &mut m);
    util::emit(m);
    Ok(())
}

#[derive(Args, Debug)]
pub struct HelloArgs {
    /// Listen address.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// File that receives the bound address once listening.
    #[arg(long)]
    pub ready_file: Option<std::path::PathBuf>,
}

pub async fn run_hello(a: HelloArgs) -> Result<()> {
    util::raise_nofile(1 << 20);
    let listener = tokio::net::TcpListener::bind(&a.listen).await?;
    let local = listener.local_addr()?;
    util::signal_ready(&a.ready_file, &local.to_string());
    let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let accept = {
        let served = served.clone();
        async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of file descriptors, most likely: do not spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let served = served.clone();
                tokio::spawn(async move {
                    let service =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let served = served.clone();
                            async move {
                                let _ = req.into_body().collect().await;
                                served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                                    b"Hello, World!",
                                ))))
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    };
    tokio::select! {
        _ = accept => {}
        _ = util::until_stopped() => {}
    }
    eprintln!(
        "{}",
        json!({"kind": "hello-server-end", "served": served.load(std::sync::atomic::Ordering::Relaxed)})
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(super::base64(b"dev0@bench:pw"), "ZGV2MEBiZW5jaDpwdw==");
        assert_eq!(super::base64(b"ab"), "YWI=");
        assert_eq!(super::base64(b"abc"), "YWJj");
    }
}
