//! Shared helpers: timestamps in payloads, latency statistics, the JSON result line,
//! readiness signalling, file-descriptor limits, sockets bound to source addresses, the
//! options common to several subcommands (`Amount`, `Sending`, `Until`) and the per-task
//! statistics of the sending ones (`Stats`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use serde_json::{json, Map, Value};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Nanoseconds since the UNIX epoch (wall clock: sender and receiver are different
/// processes on the same machine).
pub fn now_ns() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// A payload of `size` bytes (at least 8): the send timestamp, big-endian, then filler.
pub fn payload(size: usize) -> Vec<u8> {
    let mut p = vec![b'x'; size.max(8)];
    stamp(&mut p);
    p
}

/// Writes the current time into the first 8 bytes.
pub fn stamp(buf: &mut [u8]) {
    buf[..8].copy_from_slice(&now_ns().to_be_bytes());
}

/// The send timestamp in a payload, if it has one that looks plausible (within a day).
pub fn stamped_at(buf: &[u8]) -> Option<u64> {
    if buf.len() < 8 {
        return None;
    }
    let ts = u64::from_be_bytes(buf[..8].try_into().ok()?);
    let now = now_ns();
    (ts <= now + 1_000_000_000 && now - ts.min(now) < 86_400_000_000_000).then_some(ts)
}

/// Latency samples in microseconds.
#[derive(Default, Clone)]
pub struct Latencies(Vec<u32>);

impl Latencies {
    pub fn with_capacity(n: usize) -> Self {
        Latencies(Vec::with_capacity(n.min(10_000_000)))
    }
    pub fn record_ns(&mut self, ns: u64) {
        self.0.push((ns / 1000).min(u32::MAX as u64) as u32);
    }
    pub fn record_since(&mut self, sent_ns: u64) {
        self.record_ns(now_ns().saturating_sub(sent_ns));
    }
    pub fn record(&mut self, d: Duration) {
        self.record_ns(d.as_nanos() as u64);
    }
    pub fn merge(&mut self, other: Latencies) {
        self.0.extend(other.0);
    }
    /// Adds `p50_ms`, `p99_ms`, `max_ms` (prefixed) to `out`.
    pub fn report(mut self, prefix: &str, out: &mut Map<String, Value>) {
        if self.0.is_empty() {
            return;
        }
        self.0.sort_unstable();
        let pick = |q: f64| {
            let i = ((self.0.len() as f64 * q).ceil() as usize).clamp(1, self.0.len()) - 1;
            ms(self.0[i])
        };
        out.insert(format!("{prefix}p50_ms"), json!(pick(0.50)));
        out.insert(format!("{prefix}p99_ms"), json!(pick(0.99)));
        out.insert(format!("{prefix}max_ms"), json!(ms(*self.0.last().unwrap())));
        out.insert(format!("{prefix}samples"), json!(self.0.len()));
    }
}

fn ms(us: u32) -> f64 {
    (us as f64 / 1000.0 * 1000.0).round() / 1000.0
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// The one JSON line of results on stdout.
pub fn emit(out: Map<String, Value>) {
    println!("{}", Value::Object(out));
}

/// Base result fields: msgs, seconds, msgs_per_s, errors.
pub fn base(kind: &str, msgs: u64, seconds: f64, errors: u64) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("kind".into(), json!(kind));
    m.insert("msgs".into(), json!(msgs));
    m.insert("seconds".into(), json!(round3(seconds)));
    m.insert("msgs_per_s".into(), json!(per_s(msgs, seconds)));
    m.insert("errors".into(), json!(errors));
    m
}

/// Tells the orchestrator that we are ready: a `ready` line on stderr and, if asked,
/// a file (written then renamed, so its presence means complete content).
pub fn signal_ready(file: &Option<PathBuf>, detail: &str) {
    eprintln!("ready {detail}");
    if let Some(path) = file {
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, detail).and_then(|_| std::fs::rename(&tmp, path)).is_err() {
            eprintln!("cannot write ready file {}", path.display());
        }
    }
}

/// Raises RLIMIT_NOFILE as far as allowed: first to `want` for both limits (works as
/// root), else the soft limit to the hard one. Returns the soft limit in force.
pub fn raise_nofile(want: u64) -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit struct.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_max < want as libc::rlim_t {
            let up =
                libc::rlimit { rlim_cur: want as libc::rlim_t, rlim_max: want as libc::rlim_t };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &up) == 0 {
                return want;
            }
        }
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur
    }
}

/// Parses "127.0.0.2,127.0.0.3" (empty: no binding).
pub fn parse_sources(list: &str) -> Result<Vec<IpAddr>> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<IpAddr>().map_err(|e| format!("source address {s:?}: {e}").into()))
        .collect()
}

/// TCP connection to `target`, from `source` if given. With a source address the
/// socket gets IP_BIND_ADDRESS_NO_PORT, so the port is picked at connect time per
/// 4-tuple (each source address gives a full ephemeral range per destination, and
/// TIME_WAIT reuse works as without binding).
pub async fn connect_from(
    target: SocketAddr,
    source: Option<IpAddr>,
) -> std::io::Result<TcpStream> {
    let stream = match source {
        None => TcpStream::connect(target).await?,
        Some(ip) => {
            let socket = if target.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
            #[cfg(target_os = "linux")]
            {
                use std::os::fd::AsRawFd;
                let one: libc::c_int = 1;
                // SAFETY: setsockopt on a valid socket with a pointer to a c_int.
                unsafe {
                    libc::setsockopt(
                        socket.as_raw_fd(),
                        libc::IPPROTO_IP,
                        libc::IP_BIND_ADDRESS_NO_PORT,
                        &one as *const libc::c_int as *const libc::c_void,
                        std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                    );
                }
            }
            socket.bind(SocketAddr::new(ip, 0))?;
            socket.connect(target).await?
        }
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Resolves "host:port" (numeric or a name).
pub fn resolve(addr: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()?.next().ok_or_else(|| format!("cannot resolve {addr}").into())
}

/// Spreads `total` over `parts` as evenly as possible; part `i`'s share.
pub fn share(total: u64, parts: usize, i: usize) -> u64 {
    let parts = parts.max(1) as u64;
    total / parts + u64::from((i as u64) < total % parts)
}

/// Expands `{i}` in a template.
pub fn expand(template: &str, i: usize) -> String {
    template.replace("{i}", &i.to_string())
}

/// Waits for SIGINT, SIGTERM or end of stdin, whichever comes first.
pub async fn until_stopped() {
    // tokio's stdin needs the io-std feature; a plain thread keeps the workspace's
    // tokio feature set unchanged.
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 256];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        let _ = tx.send(());
    });
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = rx => {}
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Receive-side accounting shared by the receiving tasks of one measurement
/// (several MQTT subscriptions or AMQP links).
pub struct Collector {
    pub count: std::sync::atomic::AtomicU64,
    pub skipped: std::sync::atomic::AtomicU64,
    pub errors: std::sync::atomic::AtomicU64,
    first_ns: std::sync::atomic::AtomicU64,
    last_ns: std::sync::atomic::AtomicU64,
    latencies: std::sync::Mutex<Latencies>,
}

impl Default for Collector {
    fn default() -> Self {
        use std::sync::atomic::AtomicU64;
        Collector {
            count: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            first_ns: AtomicU64::new(u64::MAX),
            last_ns: AtomicU64::new(0),
            latencies: std::sync::Mutex::new(Latencies::default()),
        }
    }
}

/// A receiving task's local batch, merged into the collector now and then.
#[derive(Default)]
pub struct LocalBatch {
    n: u64,
    first: u64,
    last: u64,
    lat: Latencies,
}

impl LocalBatch {
    /// One measured message with a payload (its timestamp gives the latency).
    pub fn message(&mut self, payload: &[u8]) -> bool {
        let Some(ts) = stamped_at(payload) else { return false };
        let now = now_ns();
        if self.n == 0 {
            self.first = now;
        }
        self.last = now;
        self.n += 1;
        self.lat.record_ns(now.saturating_sub(ts));
        true
    }
    pub fn len(&self) -> u64 {
        self.n
    }
}

impl Collector {
    pub fn flush(&self, batch: &mut LocalBatch) {
        use std::sync::atomic::Ordering::Relaxed;
        if batch.n == 0 {
            return;
        }
        let b = std::mem::take(batch);
        self.first_ns.fetch_min(b.first, Relaxed);
        self.last_ns.fetch_max(b.last, Relaxed);
        self.latencies.lock().unwrap().merge(b.lat);
        self.count.fetch_add(b.n, Relaxed);
    }

    /// Waits until `expect` messages arrived (0: no bound), or nothing came for `idle`
    /// after the first one, or nothing at all within `start_timeout`.
    pub async fn wait(&self, expect: u64, idle: Duration, start_timeout: Duration) -> &'static str {
        use std::sync::atomic::Ordering::Relaxed;
        let started = Instant::now();
        let mut seen = 0;
        let mut last_change = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let n = self.count.load(Relaxed);
            if expect > 0 && n >= expect {
                return "complete";
            }
            if n != seen {
                seen = n;
                last_change = Instant::now();
            }
            if n == 0 {
                if started.elapsed() > start_timeout {
                    return "start-timeout";
                }
            } else if last_change.elapsed() > idle {
                return "idle-timeout";
            }
        }
    }

    pub fn report(&self, kind: &str, expect: u64, end: &str) -> Map<String, Value> {
        use std::sync::atomic::Ordering::Relaxed;
        let n = self.count.load(Relaxed);
        let (first, last) = (self.first_ns.load(Relaxed), self.last_ns.load(Relaxed));
        let seconds = if n > 1 && last > first { (last - first) as f64 / 1e9 } else { 0.0 };
        // n messages over the interval between the first and the last: n-1 gaps.
        let mut m = base(kind, n, seconds, self.errors.load(Relaxed));
        if n > 1 && seconds > 0.0 {
            m.insert("msgs_per_s".into(), json!(((n - 1) as f64 / seconds).round()));
        }
        m.insert("expected".into(), json!(expect));
        if expect > 0 {
            m.insert("lost".into(), json!(expect.saturating_sub(n)));
        }
        m.insert("skipped".into(), json!(self.skipped.load(Relaxed)));
        m.insert("end".into(), json!(end));
        let lat = std::mem::take(&mut *self.latencies.lock().unwrap());
        lat.report("", &mut m);
        m
    }
}

/// Messages (requests, connects, commands) per second, rounded; 0 over no time.
pub fn per_s(n: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        (n as f64 / seconds).round()
    } else {
        0.0
    }
}

/// Source address `i` of a list, round robin (none for an empty list).
pub fn spread(sources: &[IpAddr], i: usize) -> Option<IpAddr> {
    (!sources.is_empty()).then(|| sources[i % sources.len()])
}

/// The device behind client `i` for `{i}` templates: `i` modulo `devices` (0: one each).
pub fn device(i: usize, devices: usize) -> usize {
    if devices > 0 {
        i % devices
    } else {
        i
    }
}

/// How much load: a total count or a duration, the same for every sending subcommand
/// but for the default count.
#[derive(Args, Debug, Clone)]
pub struct Amount<const COUNT: u64> {
    /// Total messages (requests, CONNECTs, commands) over all connections (unless
    /// --duration).
    #[arg(long, default_value = default_str(COUNT))]
    pub count: u64,
    /// Send for this many seconds instead of a count.
    #[arg(long)]
    pub duration: Option<f64>,
}

/// `n` as a clap default value. Not `default_value_t`: the derive keeps that string in a
/// static, which every `Amount<COUNT>` would share. Leaks a few bytes per subcommand, once.
fn default_str(n: u64) -> &'static str {
    n.to_string().leak()
}

impl<const COUNT: u64> Amount<COUNT> {
    /// When sending stops, for a load that started at `start` (none: at the count).
    pub fn deadline(&self, start: Instant) -> Option<Instant> {
        self.duration.map(|d| start + Duration::from_secs_f64(d))
    }

    /// Part `i` of `parts`' share of the count (unbounded with a duration).
    pub fn quota(&self, parts: usize, i: usize) -> u64 {
        if self.duration.is_some() {
            u64::MAX
        } else {
            share(self.count, parts, i)
        }
    }
}

/// What a publisher sends: how much, of which size and how fast.
#[derive(Args, Debug, Clone)]
pub struct Sending<const COUNT: u64> {
    #[command(flatten)]
    pub amount: Amount<COUNT>,
    /// Payload size in bytes (at least 8: the send timestamp).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Target rate in messages (requests) per second over all connections (clients);
    /// default: flat out.
    #[arg(long)]
    pub rate: Option<f64>,
}

impl<const COUNT: u64> Sending<COUNT> {
    /// Each of `parts` connections' share of the target rate.
    pub fn rate_of(&self, parts: usize) -> Option<f64> {
        self.rate.map(|r| r / parts as f64)
    }
}

/// When a receiving subcommand stops, and how it says it is ready.
#[derive(Args, Debug)]
pub struct Until {
    /// Stop after this many messages (0: only on the idle timeout).
    #[arg(long, default_value_t = 0)]
    pub expect: u64,
    /// Stop when nothing arrived for this many seconds (after the first message).
    #[arg(long, default_value_t = 3.0)]
    pub idle_timeout: f64,
    /// Give up when nothing arrived within this many seconds.
    #[arg(long, default_value_t = 120.0)]
    pub start_timeout: f64,
    /// File created once receiving (subscribed, links attached).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

impl Until {
    /// Signals readiness (`detail`), then waits as the options say for the messages
    /// `collector` counts; returns how that ended (see [`Collector::wait`]).
    pub async fn wait(&self, collector: &Collector, detail: &str) -> &'static str {
        signal_ready(&self.ready_file, detail);
        collector
            .wait(
                self.expect,
                Duration::from_secs_f64(self.idle_timeout),
                Duration::from_secs_f64(self.start_timeout),
            )
            .await
    }
}

/// What one task of a load counted, added up over all of them; each subcommand uses the
/// counters that apply to it.
#[derive(Default)]
pub struct Stats {
    /// Messages (requests) sent.
    pub sent: u64,
    /// Successful outcomes: PUBACKs, 2xx or 2.xx responses, accepted CONNECTs.
    pub ok: u64,
    pub errors: u64,
    /// Requests without a response in time.
    pub timeouts: u64,
    pub lat: Latencies,
    /// Failures by kind: HTTP status, CoAP response code, CONNACK code or error.
    pub codes: BTreeMap<String, u64>,
    /// The first error.
    pub error: Option<String>,
    /// When the task was done (its last response, or its last send).
    pub finished: Option<Instant>,
}

impl Stats {
    /// One error; the first one is kept.
    pub fn fail(&mut self, error: impl Into<String>) {
        self.errors += 1;
        self.error.get_or_insert(error.into());
    }

    /// One failure of kind `code`.
    pub fn count(&mut self, code: impl Into<String>) {
        *self.codes.entry(code.into()).or_default() += 1;
    }

    pub fn merge(&mut self, other: Stats) {
        self.sent += other.sent;
        self.ok += other.ok;
        self.errors += other.errors;
        self.timeouts += other.timeouts;
        self.lat.merge(other.lat);
        for (k, v) in other.codes {
            *self.codes.entry(k).or_default() += v;
        }
        self.error = self.error.take().or(other.error);
        self.finished = self.finished.max(other.finished);
    }

    /// From `start` to when the last task was done.
    pub fn seconds_since(&self, start: Instant) -> f64 {
        self.finished.map_or(0.0, |f| f.saturating_duration_since(start).as_secs_f64())
    }

    /// Adds the failures by kind (under `codes_key`, if any), the latencies (prefixed)
    /// and the first error to `out`.
    pub fn report(self, codes_key: &str, lat_prefix: &str, out: &mut Map<String, Value>) {
        if !self.codes.is_empty() {
            out.insert(codes_key.into(), json!(self.codes));
        }
        self.lat.report(lat_prefix, out);
        if let Some(e) = self.error {
            out.insert("first_error".into(), json!(e));
        }
    }
}

/// Waits for every task and adds up their statistics; a task that did not return (it
/// panicked) counts as one error.
pub async fn join_all(tasks: Vec<JoinHandle<Stats>>) -> Stats {
    let mut total = Stats::default();
    for t in tasks {
        match t.await {
            Ok(s) => total.merge(s),
            Err(e) => total.fail(e.to_string()),
        }
    }
    total
}
