//! The shared integration harness: mock HTTP upstreams that can be told to answer with a status,
//! a delay, or to stop answering; the real `tollgate` binary started with a generated config on
//! free ports; and `eventually`, a poll with a deadline used instead of sleeps.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use tokio::sync::oneshot;

/// The admin token the harness always presents (tests that configure `admin.token` use it).
pub const ADMIN_TOKEN: &str = "admin-token-for-tests-0123456789";

/// A port that was free a moment ago (bound to 0, then released).
pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// `N` distinct ports that were free a moment ago: all are held until all are picked, so two
/// never come out the same.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<StdListener> = (0..N)
        .map(|_| StdListener::bind("127.0.0.1:0").expect("free port"))
        .collect();
    std::array::from_fn(|i| held[i].local_addr().expect("free port").port())
}

/// Poll `check` until it returns `Some`, or panic with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One request as a mock upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// `HTTP/1.1`, `HTTP/2.0`.
    pub version: String,
    pub method: String,
    pub uri: String,
    pub headers: HashMap<String, String>,
}

struct MockState {
    name: String,
    status: AtomicU16,
    health_status: AtomicU16,
    delay_ms: AtomicU64,
    hang: AtomicBool,
    hits: AtomicUsize,
    health_hits: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    path_status: Mutex<HashMap<String, u16>>,
}

/// A mock HTTP upstream on `127.0.0.1:<free port>`. Answers every path with its name as body
/// (`/big` answers 20 KiB of text, `/health` answers the health status).
pub struct MockUpstream {
    pub addr: SocketAddr,
    state: Arc<MockState>,
    stop: Option<oneshot::Sender<()>>,
}

async fn handle(State(s): State<Arc<MockState>>, req: Request) -> Response {
    let path = req.uri().path().to_string();
    if path == "/health" {
        s.health_hits.fetch_add(1, Ordering::Relaxed);
        return Response::builder()
            .status(s.health_status.load(Ordering::Relaxed))
            .body(Body::from("health"))
            .expect("response");
    }
    s.hits.fetch_add(1, Ordering::Relaxed);
    let seen = Seen {
        version: format!("{:?}", req.version()),
        method: req.method().to_string(),
        uri: req.uri().to_string(),
        headers: req
            .headers()
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    };
    s.seen.lock().expect("lock").push(seen);
    // Like most backends, read the whole body before answering.
    let _ = axum::body::to_bytes(req.into_body(), 16 << 20).await;
    if s.hang.load(Ordering::Relaxed) {
        std::future::pending::<()>().await;
    }
    let delay = s.delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let status = s
        .path_status
        .lock()
        .expect("lock")
        .get(&path)
        .copied()
        .unwrap_or_else(|| s.status.load(Ordering::Relaxed));
    let body = if path == "/big" {
        s.name.repeat(20 * 1024 / s.name.len().max(1))
    } else {
        s.name.clone()
    };
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .header("x-instance", s.name.as_str())
        .header("server", "mock/1.0 (internal build 42)")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "must-not-reach-client")
        .header("keep-alive", "timeout=30")
        .body(Body::from(body))
        .expect("response")
}

impl MockUpstream {
    pub async fn start(name: &str) -> Self {
        let state = Arc::new(MockState {
            name: name.to_string(),
            status: AtomicU16::new(200),
            health_status: AtomicU16::new(200),
            delay_ms: AtomicU64::new(0),
            hang: AtomicBool::new(false),
            hits: AtomicUsize::new(0),
            health_hits: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            path_status: Mutex::new(HashMap::new()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut m = Self {
            addr,
            state,
            stop: None,
        };
        m.serve(listener);
        m
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let (tx, rx) = oneshot::channel::<()>();
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(self.state.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await;
        });
        self.stop = Some(tx);
    }

    pub fn name(&self) -> &str {
        &self.state.name
    }
    pub fn set_status(&self, status: u16) {
        self.state.status.store(status, Ordering::Relaxed);
    }
    /// Answer `status` on `path` only.
    pub fn set_path_status(&self, path: &str, status: u16) {
        self.state
            .path_status
            .lock()
            .expect("lock")
            .insert(path.to_string(), status);
    }
    pub fn set_healthy(&self, healthy: bool) {
        self.state
            .health_status
            .store(if healthy { 200 } else { 503 }, Ordering::Relaxed);
    }
    pub fn set_delay(&self, delay: Duration) {
        self.state
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }
    pub fn set_hang(&self, hang: bool) {
        self.state.hang.store(hang, Ordering::Relaxed);
    }
    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::Relaxed)
    }
    pub fn health_hits(&self) -> usize {
        self.state.health_hits.load(Ordering::Relaxed)
    }
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("lock").clone()
    }
    pub fn last_seen(&self) -> Seen {
        self.seen().pop().expect("the upstream saw a request")
    }
    /// Stop listening: new connections are refused.
    pub fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
    /// Listen again on the same address.
    pub async fn restart(&mut self) {
        let listener = eventually(
            Duration::from_secs(5),
            "rebinding the mock port",
            || async { tokio::net::TcpListener::bind(self.addr).await.ok() },
        )
        .await;
        self.serve(listener);
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A private `redis-server` on a free port, killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Child,
    /// False once `stop` reaped the process: its pid may belong to another process by then.
    running: bool,
}

impl RedisServer {
    /// Start on a free port; retried on another port when this one was taken between
    /// `free_port` and redis-server's bind (the process exits at once then).
    pub async fn start() -> Self {
        for attempt in 0..5 {
            let port = free_port();
            let mut r = Self {
                port,
                child: spawn_redis(port),
                running: true,
            };
            match r.wait_ping().await {
                Ok(()) => return r,
                Err(status) if attempt < 4 => {
                    eprintln!("redis-server on port {port} exited ({status}); another port");
                }
                Err(status) => panic!("redis-server exited ({status}) on five ports in a row"),
            }
        }
        unreachable!("the loop returns or panics")
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn ping(&self) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else {
            return false;
        };
        if s.write_all(b"PING\r\n").await.is_err() {
            return false;
        }
        let mut buf = [0u8; 16];
        matches!(tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await, Ok(Ok(n)) if buf[..n].starts_with(b"+PONG"))
    }

    /// Poll until PING answers; `Err` as soon as the process has exited.
    async fn wait_ping(&mut self) -> Result<(), std::process::ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self.ping().await {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                self.running = false;
                return Err(status);
            }
            assert!(
                Instant::now() < deadline,
                "redis-server not answering PING after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGSTOP: Redis hangs (accepts nothing, answers nothing).
    pub fn pause(&self) {
        signal_pid(self.child.id(), "STOP");
    }

    pub fn resume(&self) {
        signal_pid(self.child.id(), "CONT");
    }

    /// Kill it (connections refused), keeping the port for `restart`.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.running = false;
    }

    pub async fn restart(&mut self) {
        self.child = spawn_redis(self.port);
        self.running = true;
        if let Err(status) = self.wait_ping().await {
            panic!(
                "redis-server did not restart on port {} ({status}): another process took it",
                self.port
            );
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.running {
            // A paused server must run again to act on the kill.
            signal_pid(self.child.id(), "CONT");
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A throwaway redis-server on `port`: loopback only, no persistence.
fn spawn_redis(port: u16) -> Child {
    Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (install it, or run scripts/test.sh)")
}

fn signal_pid(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// A running `tollgate` process with its own temp dir, config and free ports.
pub struct Gateway {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub admin_port: u16,
    /// A third free port, for a TLS listener: `{tls}` in `server_extra` is replaced by it.
    pub tls_port: u16,
    pub config_path: PathBuf,
    pub child: Child,
    server_extra: String,
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
        .expect("client")
}

impl Gateway {
    /// The `server:` section the harness writes; `extra` adds lines inside it (2-space indent).
    fn server_yaml(&self) -> String {
        format!(
            "server:\n  listen: [\"127.0.0.1:{}\"]\n  admin_listen: \"127.0.0.1:{}\"\n  threads: 2\n  grace_period: 1s\n  pid_file: {}\n  upgrade_sock: {}\n{}",
            self.port,
            self.admin_port,
            self.dir.path().join("tollgate.pid").display(),
            self.dir.path().join("upgrade.sock").display(),
            self.server_extra.replace("{tls}", &self.tls_port.to_string())
        )
    }

    /// Start the gateway with `body` (upstreams and routes) and wait until its admin answers.
    pub async fn start(body: &str) -> Self {
        Self::start_with(body, "").await
    }

    pub async fn start_with(body: &str, server_extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("tollgate.yaml");
        let [port, admin_port, tls_port] = free_ports();
        let mut gw = Self {
            port,
            admin_port,
            tls_port,
            config_path,
            child: Command::new("true").spawn().expect("placeholder"),
            dir,
            server_extra: server_extra.to_string(),
        };
        gw.write(body);
        // Ports come from `free_port`, which can race with other tests: retry a bind failure.
        for attempt in 0..5 {
            gw.child = gw.spawn(false);
            match gw.wait_ready().await {
                Ok(()) => return gw,
                Err(log) if attempt < 4 && log.contains("in use") => {
                    [gw.port, gw.admin_port, gw.tls_port] = free_ports();
                    gw.write(body);
                    let _ = std::fs::remove_file(gw.dir.path().join("gateway.log"));
                }
                Err(log) => panic!("tollgate did not start:\n{log}"),
            }
        }
        unreachable!("the loop returns or panics")
    }

    pub fn spawn(&self, upgrade: bool) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("gateway.log"))
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.arg("-c").arg(&self.config_path);
        if upgrade {
            cmd.arg("-u");
        }
        cmd.env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn tollgate")
    }

    pub fn write(&self, body: &str) {
        std::fs::write(&self.config_path, format!("{}{}", self.server_yaml(), body))
            .expect("write config");
    }

    pub fn write_raw(&self, text: &str) {
        std::fs::write(&self.config_path, text).expect("write config");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// `https://HOST:<tls port>PATH` (resolve HOST to 127.0.0.1 in the client).
    pub fn tls_url(&self, host: &str, path: &str) -> String {
        format!("https://{host}:{}{path}", self.tls_port)
    }

    pub fn admin(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.admin_port, path)
    }

    /// A raw TCP connection to the public listener (for bytes no HTTP client would send).
    pub async fn connect(&self) -> tokio::net::TcpStream {
        tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("connect")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    pub async fn status(&self) -> Option<serde_json::Value> {
        let r = http()
            .get(self.admin("/admin/status"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .ok()?;
        r.json().await.ok()
    }

    pub async fn generation(&self) -> u64 {
        self.status()
            .await
            .and_then(|s| s["config_generation"].as_u64())
            .unwrap_or(0)
    }

    /// Wait for the admin API to report generation 1 and the proxy listener to accept (the
    /// admin service can start first); `Err(log)` if the process exited.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(s) = self.status().await {
                if s["config_generation"].as_u64() >= Some(1)
                    && tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                        .await
                        .is_ok()
                {
                    return Ok(());
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited with {status}:\n{}", self.log()));
            }
            if Instant::now() > deadline {
                panic!("tollgate did not become ready:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Poll until the gateway process exits (panics after `timeout`).
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "tollgate still running after {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn signal(&self, pid: u32, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(pid.to_string())
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} {pid} failed");
    }

    /// SIGHUP, then wait until the generation moves past `before` or the last reload fails.
    pub async fn sighup_and_wait(&self) -> serde_json::Value {
        let before = self.status().await.expect("status");
        let before_at = before["last_reload"].clone();
        self.signal(self.child.id(), "HUP");
        eventually(
            Duration::from_secs(10),
            "a reload result after SIGHUP",
            || async {
                let s = self.status().await?;
                (s["last_reload"] != before_at && !s["last_reload"].is_null()).then_some(s)
            },
        )
        .await
    }

    /// One field of every backend of the first upstream, from `/admin/upstreams`.
    pub async fn backend_field(&self, field: &str) -> Vec<serde_json::Value> {
        let v: serde_json::Value = http()
            .get(self.admin("/admin/upstreams"))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("admin")
            .json()
            .await
            .expect("json");
        v["upstreams"][0]["backends"]
            .as_array()
            .expect("backends")
            .iter()
            .map(|b| b[field].clone())
            .collect()
    }

    /// The body of a metrics line, e.g. `tollgate_config_reloads_total{result="error"}`.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = http()
            .get(self.admin("/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- gateway log ----\n{}", self.log());
        }
    }
}

/// YAML for one upstream named `name` over `backends`, with extra lines (4-space indent).
pub fn upstream_yaml(name: &str, backends: &[&MockUpstream], extra: &str) -> String {
    let mut s = format!("  {name}:\n    backends:\n");
    for b in backends {
        s.push_str(&format!("      - {{ addr: \"{}\" }}\n", b.addr));
    }
    s.push_str(extra);
    s
}

/// A config body with one upstream `u` over `backends` and one catch-all route `r` to it.
pub fn one_route(backends: &[&MockUpstream]) -> String {
    format!(
        "upstreams:\n{}routes:\n  - {{ name: r, upstream: u }}\n",
        upstream_yaml("u", backends, "")
    )
}

/// GET `url` and return (status, body), or None on a transport error.
pub async fn get(client: &reqwest::Client, url: &str) -> Option<(u16, String)> {
    let r = client.get(url).send().await.ok()?;
    let status = r.status().as_u16();
    Some((status, r.text().await.ok()?))
}

/// A raw TCP backend on `127.0.0.1:<free port>`: `serve` runs for each accepted connection.
pub async fn raw_backend<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(serve(conn));
        }
    });
    addr
}

/// One connection the recording upstream accepted.
#[derive(Debug, Clone, Default)]
pub struct RecordedConn {
    /// Every byte received on it, in order.
    pub bytes: Vec<u8>,
    /// Complete requests parsed from it.
    pub requests: usize,
    /// The gateway closed it (EOF or error).
    pub closed: bool,
}

/// A point in a `RecordingUpstream`'s history (see `RecordingUpstream::since`).
#[derive(Debug, Clone)]
pub struct Mark(Vec<usize>);

/// A raw HTTP/1.1 upstream that records every byte it receives, per connection. It parses each
/// request (httparse; Content-Length or chunked body) and answers `200` with body `ok`; it
/// answers `100 Continue` as soon as the head of an `Expect: 100-continue` request is in, a
/// `101` to an `Upgrade` request (then echoes whatever arrives), and `400` (then closes) to
/// bytes it cannot parse.
pub struct RecordingUpstream {
    pub addr: SocketAddr,
    conns: Arc<Mutex<Vec<RecordedConn>>>,
}

impl RecordingUpstream {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let conns: Arc<Mutex<Vec<RecordedConn>>> = Arc::default();
        let all = conns.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let index = {
                    let mut all = all.lock().expect("lock");
                    all.push(RecordedConn::default());
                    all.len() - 1
                };
                tokio::spawn(record_conn(conn, index, all.clone()));
            }
        });
        Self { addr, conns }
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.conns.lock().expect("lock").len()
    }

    pub fn conn(&self, i: usize) -> RecordedConn {
        self.conns.lock().expect("lock")[i].clone()
    }

    /// Complete requests parsed, on every connection.
    pub fn requests(&self) -> usize {
        self.conns
            .lock()
            .expect("lock")
            .iter()
            .map(|c| c.requests)
            .sum()
    }

    pub fn mark(&self) -> Mark {
        Mark(
            self.conns
                .lock()
                .expect("lock")
                .iter()
                .map(|c| c.bytes.len())
                .collect(),
        )
    }

    /// Bytes received since `mark`, as (connection index, bytes), connections in accept order.
    pub fn since(&self, mark: &Mark) -> Vec<(usize, Vec<u8>)> {
        let conns = self.conns.lock().expect("lock");
        conns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let from = mark.0.get(i).copied().unwrap_or(0);
                (c.bytes.len() > from).then(|| (i, c.bytes[from..].to_vec()))
            })
            .collect()
    }
}

async fn record_conn(
    mut conn: tokio::net::TcpStream,
    index: usize,
    all: Arc<Mutex<Vec<RecordedConn>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 8192];
    let mut continued = false;
    let mut tunnel = false;
    loop {
        // Answer as many complete requests as the buffer holds.
        while !tunnel {
            let mut headers = [httparse::EMPTY_HEADER; 128];
            let mut req = httparse::Request::new(&mut headers);
            let n = match req.parse(&buf) {
                Ok(httparse::Status::Complete(n)) => n,
                Ok(httparse::Status::Partial) => break,
                Err(_) => {
                    let _ = conn
                        .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await;
                    all.lock().expect("lock")[index].closed = true;
                    return;
                }
            };
            let header = |name: &str| {
                req.headers
                    .iter()
                    .filter(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| String::from_utf8_lossy(h.value).into_owned())
                    .collect::<Vec<_>>()
            };
            let chunked = header("transfer-encoding")
                .last()
                .is_some_and(|te| te.to_ascii_lowercase().trim_end().ends_with("chunked"));
            let cl = header("content-length")
                .first()
                .and_then(|v| v.trim().parse::<usize>().ok());
            if !header("upgrade").is_empty() {
                let _ = conn
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
                    .await;
                buf.drain(..n);
                tunnel = true;
                all.lock().expect("lock")[index].requests += 1;
                break;
            }
            let body_end = if chunked {
                chunked_end(&buf[n..]).map(|e| n + e)
            } else {
                Some(n + cl.unwrap_or(0))
            };
            let Some(body_end) = body_end.filter(|&e| e <= buf.len()) else {
                let expects = header("expect")
                    .iter()
                    .any(|v| v.eq_ignore_ascii_case("100-continue"));
                if expects && !continued {
                    continued = true;
                    if conn
                        .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                break;
            };
            buf.drain(..body_end);
            continued = false;
            all.lock().expect("lock")[index].requests += 1;
            if conn
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .is_err()
            {
                return;
            }
        }
        if tunnel && !buf.is_empty() {
            if conn.write_all(&buf).await.is_err() {
                return;
            }
            buf.clear();
        }
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                all.lock().expect("lock")[index].closed = true;
                return;
            }
            Ok(n) => {
                all.lock().expect("lock")[index]
                    .bytes
                    .extend_from_slice(&chunk[..n]);
                buf.extend_from_slice(&chunk[..n]);
            }
        }
    }
}

/// End of a chunked body (index after the final CRLF), if complete.
pub fn chunked_end(b: &[u8]) -> Option<usize> {
    let mut i = 0;
    loop {
        let line_end = b.get(i..)?.windows(2).position(|w| w == b"\r\n")? + i;
        let size_txt = std::str::from_utf8(&b[i..line_end]).ok()?;
        let size = usize::from_str_radix(size_txt.split(';').next()?.trim(), 16).ok()?;
        i = line_end + 2;
        if size == 0 {
            // Trailers, then the blank line.
            let end = b.get(i..)?.windows(2).position(|w| w == b"\r\n")? + i;
            return Some(end + 2);
        }
        i += size + 2;
        if i > b.len() {
            return None;
        }
    }
}
