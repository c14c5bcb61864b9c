//! The dashboard in a real browser: headless Chromium (Debian's `chromium`) driven over the
//! DevTools protocol (a WebSocket, no Node) against a running gateway under light load. The page
//! loads with no console error, exception or failed request; its request rate rises while
//! traffic runs; a killed backend shows as unhealthy within its health-check thresholds (plus one
//! poll of the page); and a screenshot is saved to `<target dir>/test-artifacts/dashboard.png`.
//!
//! The token: the page keeps it in `sessionStorage` under `tollgate.adminToken`, which is what
//! its login form stores. The test stores it there before the page's own script runs
//! (`Page.addScriptToEvaluateOnNewDocument`), so the first poll already carries it: no 401
//! happens, and none is tolerated.
//!
//! Chromium is found at `$TOLLGATE_CHROMIUM`, else `chromium` on `PATH`, else
//! `/usr/bin/chromium`; without it the test fails and says how to install it.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::harness::*;

const INTERVAL_MS: u64 = 100;
/// The probe timeout: long enough that a live backend on a loaded debug-build machine never misses
/// one ("the live backend stays healthy" below), short enough to bound the test.
const TIMEOUT_MS: u64 = 500;
const UNHEALTHY_AFTER: u64 = 2;
/// How often the page polls `/admin/stats`.
const PAGE_POLL: Duration = Duration::from_secs(1);

fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("TOLLGATE_CHROMIUM") {
        return PathBuf::from(p);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("chromium"))
            .find(|p| p.is_file())
    });
    let found = on_path.unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        found.is_file(),
        "the browser test needs Chromium and found none (not on PATH, no /usr/bin/chromium, \
         TOLLGATE_CHROMIUM unset): install Debian's `chromium` package \
         (`apt-get install chromium`; scripts/test.sh does this)"
    );
    found
}

/// The target directory (`<target>/debug/tollgate` is the binary under test).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_tollgate"))
        .ancestors()
        .nth(2)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target"))
}

/// A headless Chromium in its own process group and a fresh profile, killed (group and all)
/// on drop.
struct Browser {
    child: Child,
    ws_url: String,
    stderr: Arc<Mutex<String>>,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn launch(path: &Path) -> Self {
        let profile = tempfile::tempdir().expect("profile dir");
        let mut child = Command::new(path)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--hide-scrollbars",
                "--mute-audio",
                "--window-size=1400,1000",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", path.display()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let pipe = child.stderr.take().expect("stderr");
        let log = stderr.clone();
        // Reads stderr to its end (so Chromium never blocks on a full pipe); the first
        // "DevTools listening on ws://..." line is the endpoint.
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    let _ = tx.send(url.trim().to_string());
                }
                let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut browser = Self {
            child,
            ws_url: String::new(),
            stderr,
            _profile: profile,
        };
        match tokio::time::timeout(Duration::from_secs(20), rx.recv()).await {
            Ok(Some(url)) => browser.ws_url = url,
            Ok(None) => panic!("chromium exited early:\n{}", browser.stderr()),
            Err(_) => panic!(
                "chromium printed no DevTools endpoint in 20 s:\n{}",
                browser.stderr()
            ),
        }
        browser
    }

    fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The whole group: the browser and its renderer, GPU and utility processes.
        let _ = Command::new("kill")
            .arg("-KILL")
            .arg("--")
            .arg(format!("-{}", self.child.id()))
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("---- chromium stderr ----\n{}", self.stderr());
        }
    }
}

/// A DevTools protocol client on the browser endpoint, attached to one page in flat mode.
/// Events that arrive while waiting for an answer are checked for console errors, exceptions
/// and failed loads, which are kept in `problems`.
struct Cdp {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
    session: Option<String>,
    problems: Vec<String>,
    console: Vec<String>,
    /// Names of the events received so far.
    seen: Vec<String>,
}

fn remote_object_text(o: &Value) -> String {
    match o.get("value") {
        Some(Value::String(s)) => s.clone(),
        Some(v) => v.to_string(),
        None => o["description"]
            .as_str()
            .or(o["type"].as_str())
            .unwrap_or("?")
            .to_string(),
    }
}

impl Cdp {
    async fn connect(url: &str) -> Self {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .unwrap_or_else(|e| panic!("DevTools WebSocket {url}: {e}"));
        Self {
            ws,
            next_id: 0,
            session: None,
            problems: Vec::new(),
            console: Vec::new(),
            seen: Vec::new(),
        }
    }

    /// The next message from the browser (panics after the deadline or on a closed socket).
    async fn receive(&mut self, deadline: tokio::time::Instant, what: &str) -> Value {
        loop {
            let frame = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                .unwrap_or_else(|| panic!("DevTools closed the connection waiting for {what}"))
                .unwrap_or_else(|e| panic!("DevTools WebSocket waiting for {what}: {e}"));
            if let Message::Text(text) = frame {
                return serde_json::from_str(text.as_str()).expect("DevTools sends JSON");
            }
        }
    }

    /// Wait for event `method` (or return at once if it already came).
    async fn wait_event(&mut self, method: &str, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.seen.iter().any(|m| m == method) {
            let v = self.receive(deadline, method).await;
            self.event(&v);
        }
    }

    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = &self.session {
            msg["sessionId"] = json!(s);
        }
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .unwrap_or_else(|e| panic!("sending {method}: {e}"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let v = self
                .receive(deadline, &format!("the answer to {method}"))
                .await;
            if v["id"].as_u64() == Some(id) {
                if let Some(e) = v.get("error") {
                    panic!("{method} failed: {e}");
                }
                return v["result"].clone();
            }
            self.event(&v);
        }
    }

    fn event(&mut self, v: &Value) {
        let p = &v["params"];
        if let Some(m) = v["method"].as_str() {
            self.seen.push(m.to_string());
        }
        match v["method"].as_str() {
            Some("Runtime.consoleAPICalled") => {
                let kind = p["type"].as_str().unwrap_or("");
                let text: Vec<String> = p["args"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(remote_object_text)
                    .collect();
                let line = format!("console.{kind}: {}", text.join(" "));
                if kind == "error" || kind == "assert" {
                    self.problems.push(line.clone());
                }
                self.console.push(line);
            }
            Some("Runtime.exceptionThrown") => {
                let d = &p["exceptionDetails"];
                self.problems.push(format!(
                    "uncaught exception: {} {} (line {})",
                    d["text"].as_str().unwrap_or(""),
                    d["exception"]["description"].as_str().unwrap_or(""),
                    d["lineNumber"]
                ));
            }
            Some("Log.entryAdded") => {
                let e = &p["entry"];
                let line = format!(
                    "log {} [{}]: {} {}",
                    e["level"].as_str().unwrap_or(""),
                    e["source"].as_str().unwrap_or(""),
                    e["text"].as_str().unwrap_or(""),
                    e["url"].as_str().unwrap_or("")
                );
                if e["level"] == "error" {
                    self.problems.push(line.clone());
                }
                self.console.push(line);
            }
            _ => {}
        }
    }

    /// Evaluate `expr` in the page and return its value (panics on a thrown exception).
    async fn eval(&mut self, expr: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            panic!("evaluating {expr}: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Poll `expr` until it yields something other than null/false/"", or panic after `timeout`.
    async fn wait_for(&mut self, expr: &str, timeout: Duration, what: &str) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(expr).await;
            if !matches!(&v, Value::Null | Value::Bool(false)) && v != json!("") {
                return v;
            }
            if Instant::now() > deadline {
                let page = self
                    .eval("document.body ? document.body.innerText.slice(0, 3000) : ''")
                    .await;
                panic!(
                    "timed out after {timeout:?} waiting for {what} (last value {v});\n\
                     problems: {:?}\nconsole: {:?}\npage text:\n{}",
                    self.problems,
                    self.console,
                    page.as_str().unwrap_or("")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Requests/s as the page shows it (its unformatted value), or null before the second poll.
const RPS: &str = "(() => { const v = document.getElementById('rps').dataset.value; \
                   return v === undefined || v === '' ? null : Number(v); })()";

fn backend_row(addr: &str, healthy: bool) -> String {
    let (flag, word) = if healthy {
        ("true", "healthy")
    } else {
        ("false", "unhealthy")
    };
    format!(
        "(() => {{ const r = document.querySelector('tr[data-testid=\"backend\"][data-addr=\"{addr}\"]'); \
         return !!r && r.dataset.healthy === '{flag}' && r.cells[1].textContent.trim() === '{word}'; }})()"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_works_in_headless_chromium() {
    let started = Instant::now();
    let chromium = chromium();
    let a = MockUpstream::start("a").await;
    let mut b = MockUpstream::start("b").await;
    let hc = format!(
        "    health_check: {{ path: /health, interval: {INTERVAL_MS}ms, timeout: {TIMEOUT_MS}ms, healthy_after: 1, unhealthy_after: {UNHEALTHY_AFTER} }}\n"
    );
    // An ACME certificate whose CA cannot be reached: the certificates card shows it waiting.
    let acme = "tls:\n  acme: { store: disk }\n  certificates:\n    - { name: site, hosts: [site.test], acme: { directory: \"https://127.0.0.1:1/dir\" } }\n";
    let gw = Gateway::start(&format!(
        "{acme}admin: {{ token: \"{ADMIN_TOKEN}\" }}\nupstreams:\n{}routes:\n  - {{ name: all, upstream: u }}\n",
        upstream_yaml("u", &[&a, &b], &hc)
    ))
    .await;

    let browser = Browser::launch(&chromium).await;
    let mut cdp = Cdp::connect(&browser.ws_url).await;
    let target = cdp
        .call("Target.createTarget", json!({"url": "about:blank"}))
        .await["targetId"]
        .clone();
    let session = cdp
        .call(
            "Target.attachToTarget",
            json!({"targetId": target, "flatten": true}),
        )
        .await["sessionId"]
        .as_str()
        .expect("a session id")
        .to_string();
    cdp.session = Some(session);
    for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
        cdp.call(domain, json!({})).await;
    }
    cdp.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": false}),
    )
    .await;
    // What the login form stores, stored before the page's script runs (see the module docs).
    cdp.call(
        "Page.addScriptToEvaluateOnNewDocument",
        json!({"source": format!(
            "if (location.pathname === '/admin/dashboard') sessionStorage.setItem('tollgate.adminToken', {})",
            json!(ADMIN_TOKEN)
        )}),
    )
    .await;
    let nav = cdp
        .call(
            "Page.navigate",
            json!({"url": gw.admin("/admin/dashboard")}),
        )
        .await;
    assert!(nav.get("errorText").is_none(), "navigation failed: {nav}");
    cdp.wait_event("Page.loadEventFired", Duration::from_secs(10))
        .await;

    // Loaded and live: the stats view, not the login form, with the first poll's data.
    cdp.wait_for(
        "!document.getElementById('main').hidden && document.getElementById('login').hidden \
         && document.getElementById('live-text').textContent.startsWith('live') \
         && document.getElementById('total').textContent === '0'",
        Duration::from_secs(10),
        "the dashboard showing live stats",
    )
    .await;
    // Both backends listed as healthy.
    for m in [&a, &b] {
        cdp.wait_for(
            &backend_row(&m.addr.to_string(), true),
            Duration::from_secs(5),
            &format!("backend {} shown healthy", m.name()),
        )
        .await;
    }
    // The ACME certificate, not issued: a row with its state and no expiry.
    cdp.wait_for(
        "(() => { const rows = [...document.querySelectorAll('#certificates tr')]; \
         return rows.some(r => r.cells[0].textContent === 'site' && r.cells[1].textContent === 'ACME' \
           && /pending|failed/.test(r.cells[2].textContent) && r.cells[3].textContent === '—'); })()",
        Duration::from_secs(5),
        "the ACME certificate in the certificates card",
    )
    .await;
    // No traffic yet: the rate (from the second poll on) is 0.
    let idle = cdp
        .wait_for(RPS, Duration::from_secs(5), "a first request rate")
        .await;
    assert_eq!(idle.as_f64(), Some(0.0), "requests/s before any traffic");

    // Light load: about 40 requests/s, bounded in count and time, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let load = {
        let (stop, ok, url) = (stop.clone(), ok.clone(), gw.url("/load"));
        tokio::spawn(async move {
            let client = http();
            let until = Instant::now() + Duration::from_secs(30);
            for _ in 0..1500 {
                if stop.load(Ordering::Relaxed) || Instant::now() > until {
                    break;
                }
                if let Some((200, _)) = get(&client, &url).await {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    let busy = cdp
        .wait_for(
            &format!("(() => {{ const v = {RPS}; return v !== null && v >= 5 ? v : null; }})()"),
            Duration::from_secs(10),
            "the request rate rising under load",
        )
        .await;
    let shown = cdp.eval("document.getElementById('rps').textContent").await;
    assert!(
        shown.as_str().is_some_and(|t| t != "0" && t != "–"),
        "the visible rate: {shown}"
    );

    // Kill a backend: shown unhealthy within its thresholds (plus the page's poll interval).
    b.stop();
    let killed = Instant::now();
    let probes = Duration::from_millis(UNHEALTHY_AFTER * (INTERVAL_MS + TIMEOUT_MS));
    let slack = Duration::from_millis(1500);
    cdp.wait_for(
        &backend_row(&b.addr.to_string(), false),
        probes + PAGE_POLL + slack + Duration::from_secs(5),
        "the killed backend shown unhealthy",
    )
    .await;
    let took = killed.elapsed();
    assert!(
        took <= probes + PAGE_POLL + slack,
        "the killed backend took {took:?} to show as down (thresholds {probes:?}, page poll {PAGE_POLL:?})"
    );
    assert_eq!(
        cdp.eval(&backend_row(&a.addr.to_string(), true)).await,
        json!(true),
        "the live backend stays healthy"
    );
    let summary = cdp
        .eval("document.getElementById('be-summary').textContent")
        .await;
    assert_eq!(summary, json!("1/2 healthy"));

    // Every backend row shows its in-flight count, and the table fits its card (no column
    // cut off at this width).
    let layout = cdp
        .eval(
            "(() => { const t = document.getElementById('backends-table'); \
             return { fits: t.scrollWidth <= t.parentElement.clientWidth, \
             in_flight: Array.from(t.querySelectorAll('tr[data-testid=\"backend\"]')).map(r => r.cells[3].textContent) }; })()",
        )
        .await;
    assert_eq!(
        layout["fits"],
        json!(true),
        "the backends table is clipped: {layout}"
    );
    let counts = layout["in_flight"].as_array().expect("rows");
    assert_eq!(counts.len(), 2, "{layout}");
    assert!(
        counts
            .iter()
            .all(|c| c.as_str().is_some_and(|t| t.parse::<u64>().is_ok())),
        "{layout}"
    );

    // A few seconds of traffic on the chart (at least 5 samples), then the whole page.
    cdp.wait_for(
        "(() => { const p = document.querySelector('#chart-rps path.s-rps'); \
         return !!p && p.getAttribute('d').split('L').length >= 5; })()",
        Duration::from_secs(10),
        "the request-rate chart with 5 samples",
    )
    .await;
    let height = cdp
        .eval("Math.ceil(document.querySelector('footer').getBoundingClientRect().bottom + window.scrollY)")
        .await
        .as_f64()
        .unwrap_or(1000.0);
    let shot = cdp
        .call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true,
                   "clip": {"x": 0, "y": 0, "width": 1400, "height": height, "scale": 1}}),
        )
        .await;
    let png = base64::engine::general_purpose::STANDARD
        .decode(shot["data"].as_str().expect("screenshot data"))
        .expect("base64 PNG");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 20_000,
        "a real screenshot ({} bytes)",
        png.len()
    );
    let dir = target_dir().join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("artifact dir");
    let path = dir.join("dashboard.png");
    std::fs::write(&path, &png).expect("write the screenshot");

    // The token form: forget the token (the login form comes back, nothing is stored), then
    // type it in and connect: live again, the token back in sessionStorage.
    cdp.eval("document.getElementById('forget').click()").await;
    cdp.wait_for(
        "!document.getElementById('login').hidden && document.getElementById('main').hidden \
         && sessionStorage.getItem('tollgate.adminToken') === null",
        Duration::from_secs(5),
        "the login form after forgetting the token",
    )
    .await;
    cdp.eval("document.getElementById('token').focus()").await;
    cdp.call("Input.insertText", json!({ "text": ADMIN_TOKEN }))
        .await;
    cdp.eval("document.querySelector('#login-form button[type=submit]').click()")
        .await;
    cdp.wait_for(
        &format!(
            "!document.getElementById('main').hidden && document.getElementById('login').hidden \
             && document.getElementById('live-text').textContent.startsWith('live') \
             && sessionStorage.getItem('tollgate.adminToken') === {}",
            json!(ADMIN_TOKEN)
        ),
        Duration::from_secs(5),
        "live again after typing the token",
    )
    .await;

    stop.store(true, Ordering::Relaxed);
    load.await.expect("load task");
    assert!(ok.load(Ordering::Relaxed) >= 20, "the load got answers");

    // Nothing went wrong in the page at any point (a last call flushes pending events).
    cdp.eval("1").await;
    assert!(
        cdp.problems.is_empty(),
        "console errors, exceptions or failed loads: {:#?}\nconsole: {:#?}",
        cdp.problems,
        cdp.console
    );
    drop(cdp);
    drop(browser);
    eprintln!(
        "browser test: {:.1} s, peak {busy} requests/s, backend down shown after {took:?}, screenshot {}",
        started.elapsed().as_secs_f64(),
        path.display()
    );
}
