//! The upstream-demo test harness: a private PostgreSQL cluster (`initdb` into a temp dir, run
//! as the `postgres` user when we are root) and a private `redis-server`, both on free ports and
//! stopped on `Drop`; an RSA key pair made with `openssl`; and the real `upstream-demo` binary
//! started against them with `PORT=0` (it prints the address it bound). Readiness is always
//! polled with a deadline (`eventually`), never assumed after a sleep.

#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Generous deadline for anything starting up on a busy 2-core machine.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
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
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// An HTTP client for the test's own loopback servers: never through a proxy the machine's
/// environment (`http_proxy`, ...) may name.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("HTTP client")
}

/// The same poll for synchronous checks (used while starting processes).
pub fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A PostgreSQL program: from /usr/lib/postgresql/<newest>/bin if present, else from PATH.
fn pg_bin(name: &str) -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    versions.sort();
    versions
        .into_iter()
        .rev()
        .map(|v| v.join("bin").join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Run a PostgreSQL program, as the `postgres` user when we are root (it refuses root).
fn pg_command(name: &str, as_postgres: bool) -> Command {
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(pg_bin(name));
        c
    } else {
        Command::new(pg_bin(name))
    }
}

fn run_ok(mut cmd: Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private PostgreSQL cluster on a free port; stopped (immediate mode) on drop.
pub struct Postgres {
    pub port: u16,
    dir: TempDir,
    as_postgres: bool,
    running: bool,
}

impl Postgres {
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("demo-pg-")
            .tempdir()
            .expect("tempdir");
        let as_postgres = is_root();
        if as_postgres {
            let mut chown = Command::new("chown");
            chown.arg("postgres").arg(dir.path());
            run_ok(chown, "chown postgres");
        }
        let data = dir.path().join("data");
        let mut initdb = pg_command("initdb", as_postgres);
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync"])
            // Whatever LANG the machine has (a fresh one may name a locale it lacks, and
            // initdb refuses those): C collation, UTF-8 text.
            .args(["--no-locale", "-E", "UTF8"]);
        run_ok(initdb, "initdb");
        let mut pg = Self {
            port: 0,
            dir,
            as_postgres,
            running: false,
        };
        // The port can be taken between `free_port` and the server's bind: another port then.
        for attempt in 0..5 {
            pg.port = free_port();
            match pg.start_server() {
                Ok(()) => return pg,
                Err(log) if attempt < 4 && log.contains("in use") => {}
                Err(log) => panic!("pg_ctl start failed:\n{log}"),
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// `Err(server log)` when pg_ctl could not start it.
    fn start_server(&mut self) -> Result<(), String> {
        let dir = self.dir.path();
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c shared_buffers=16MB \
             -c max_connections=60",
            self.port,
            dir.display()
        );
        let mut ctl = pg_command("pg_ctl", self.as_postgres);
        ctl.arg("-D")
            .arg(dir.join("data"))
            .args(["-o", &opts, "-l"])
            .arg(dir.join("log"))
            .args(["-w", "-t", "60", "start"]);
        ctl.stdout(Stdio::null());
        let status = ctl.status().expect("pg_ctl start");
        if !status.success() {
            let log = std::fs::read_to_string(dir.join("log")).unwrap_or_default();
            // The next try appends to the same file: start it afresh.
            let _ = std::fs::remove_file(dir.join("log"));
            return Err(log);
        }
        self.running = true;
        let port = self.port;
        wait_until(START_TIMEOUT, "postgres accepting TCP", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stop the server (immediate mode: we never need its data after a test).
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        self.running = false;
        let mut ctl = pg_command("pg_ctl", self.as_postgres);
        ctl.arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = ctl.status();
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A private `redis-server` on a free port (no persistence); killed on drop.
pub struct Redis {
    pub port: u16,
    child: Option<Child>,
}

impl Redis {
    /// Start on a free port; another port when this one was taken meanwhile (redis-server
    /// exits at once then).
    pub fn start() -> Self {
        for attempt in 0..5 {
            let mut r = Self {
                port: free_port(),
                child: None,
            };
            match r.spawn_and_wait() {
                Ok(()) => return r,
                Err(status) if attempt < 4 => {
                    eprintln!("redis-server on port {} exited ({status})", r.port);
                }
                Err(status) => panic!("redis-server exited ({status}) on five ports in a row"),
            }
        }
        unreachable!("the loop returns or panics")
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Start (again) on the same port, and wait until it answers PING.
    pub fn restart(&mut self) {
        if let Err(status) = self.spawn_and_wait() {
            panic!(
                "redis-server did not restart on port {} ({status}): another process took it",
                self.port
            );
        }
    }

    /// Spawn on `self.port` and poll PING; `Err` as soon as the process has exited.
    fn spawn_and_wait(&mut self) -> Result<(), std::process::ExitStatus> {
        assert!(self.child.is_none(), "redis-server is already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        let port = self.port;
        let child = self.child.insert(child);
        let mut exited = None;
        wait_until(START_TIMEOUT, "redis-server answering PING", || {
            if let Ok(Some(status)) = child.try_wait() {
                exited = Some(status);
                return true;
            }
            ping(port)
        });
        match exited {
            Some(status) => {
                self.child = None;
                Err(status)
            }
            None => Ok(()),
        }
    }

    /// Kill the server (SIGKILL) and reap it: clients see connection refused.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// An RSA key pair for JWTs, made by `openssl` like scripts/demo.sh does.
pub struct Keys {
    dir: TempDir,
}

impl Keys {
    pub fn generate() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("demo-keys-")
            .tempdir()
            .expect("tempdir");
        let private = dir.path().join("private.pem");
        let mut gen = Command::new("openssl");
        gen.args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&private);
        run_ok(gen, "openssl genpkey");
        let mut public = Command::new("openssl");
        public
            .args(["pkey", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(dir.path().join("public.pem"));
        run_ok(public, "openssl pkey -pubout");
        Self { dir }
    }

    pub fn private_pem(&self) -> PathBuf {
        self.dir.path().join("private.pem")
    }

    pub fn public_pem(&self) -> Vec<u8> {
        std::fs::read(self.public_pem_path()).expect("public.pem")
    }

    pub fn public_pem_path(&self) -> PathBuf {
        self.dir.path().join("public.pem")
    }
}

/// One running `upstream-demo` process.
pub struct Demo {
    pub base: String,
    pub instance: String,
    child: Child,
    log: PathBuf,
    _logdir: TempDir,
}

impl Demo {
    /// Start the binary with the stack's URLs plus `extra` variables, wait for its address and
    /// for `/health` to answer 200.
    pub async fn start(stack: &Stack, instance: &str, extra: &[(&str, &str)]) -> Self {
        let logdir = tempfile::Builder::new()
            .prefix("demo-log-")
            .tempdir()
            .expect("tempdir");
        let log = logdir.path().join("demo.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_upstream-demo"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOST", "127.0.0.1")
            .env("PORT", "0")
            .env("INSTANCE_ID", instance)
            .env("DATABASE_URL", stack.pg.url())
            .env("REDIS_URL", stack.redis.url())
            .env("JWT_PRIVATE_KEY", stack.keys.private_pem())
            .env("STARTUP_TIMEOUT_SECS", "30")
            .env("SHUTDOWN_GRACE_SECS", "10")
            .env("RUST_LOG", "info,sqlx=warn");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn upstream-demo");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some((_, addr)) = line.split_once("listening on ") {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        // Poll (not block) so that several instances can start concurrently.
        let deadline = Instant::now() + START_TIMEOUT;
        let base = loop {
            match rx.try_recv() {
                Ok(addr) => break addr,
                Err(mpsc::TryRecvError::Empty) if Instant::now() < deadline => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!(
                            "upstream-demo exited ({status}):\n{}",
                            std::fs::read_to_string(&log).unwrap_or_default()
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "upstream-demo did not start:\n{}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
            }
        };
        let demo = Self {
            base,
            instance: instance.to_string(),
            child,
            log,
            _logdir: logdir,
        };
        let http = http_client();
        let url = demo.url("/health");
        eventually(START_TIMEOUT, "upstream-demo /health = 200", || {
            let http = http.clone();
            let url = url.clone();
            async move {
                let r = http.get(&url).send().await.ok()?;
                (r.status() == 200).then_some(())
            }
        })
        .await;
        demo
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process logged so far (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Send `signal` (e.g. "TERM", "KILL") to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Wait (polling, with a deadline) for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            if Instant::now() > deadline {
                panic!(
                    "upstream-demo did not exit within {timeout:?}:\n{}",
                    self.log()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Postgres + Redis + keys: what an upstream-demo needs.
pub struct Stack {
    pub pg: Postgres,
    pub redis: Redis,
    pub keys: Keys,
}

impl Stack {
    pub fn start() -> Self {
        Self {
            pg: Postgres::start(),
            redis: Redis::start(),
            keys: Keys::generate(),
        }
    }

    /// A direct Postgres connection, to check what the demo stored.
    pub async fn db(&self) -> sqlx::PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&self.pg.url())
            .await
            .expect("connect to the test postgres")
    }

    /// A direct Redis connection.
    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis.url())
            .expect("redis url")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the test redis")
    }
}

/// A stack with one demo instance: the common case.
pub struct One {
    pub demo: Demo,
    pub stack: Stack,
    pub http: reqwest::Client,
}

impl One {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    pub async fn start_with(extra: &[(&str, &str)]) -> Self {
        let stack = Stack::start();
        let demo = Demo::start(&stack, "test-1", extra).await;
        Self {
            demo,
            stack,
            http: http_client(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        self.demo.url(path)
    }
}

/// Path of the workspace's `schema/` directory (for tests that read it).
pub fn schema_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../schema")
}
