//! The gateway side of the stack test: find the `tollgate` binary next to `upstream-demo`, turn
//! the shipped `conf/demo.yaml` into a copy for this test (only addresses and paths change), and
//! run it on free ports until its listener and admin API answer.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;
use tempfile::TempDir;

use crate::harness::{free_port, START_TIMEOUT};

/// The admin token the test gives the gateway (conf/demo.yaml reads it from `admin.token_env`).
pub const ADMIN_TOKEN: &str = "stack-test-admin-token-0123456789";

/// The shipped config, at the workspace root.
pub fn demo_yaml() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/demo.yaml")
}

/// `<target dir>/<profile>/tollgate`, next to the `upstream-demo` binary cargo built for this
/// test. `tollgate` is not a dependency of upstream-demo, so cargo does not build it for
/// `cargo test -p upstream-demo`.
pub fn tollgate_bin() -> PathBuf {
    let demo = Path::new(env!("CARGO_BIN_EXE_upstream-demo"));
    let bin = demo.with_file_name(format!("tollgate{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "the gateway binary {} does not exist: this test runs the real `tollgate` next to \
         `upstream-demo`; build both first with `cargo build --workspace --bins` (same \
         CARGO_TARGET_DIR and profile as this test)",
        bin.display()
    );
    bin
}

/// Where the test's processes are: each shipped address maps to the test's own.
pub struct Addresses<'a> {
    /// `"127.0.0.1:3001"` (as in conf/demo.yaml) -> the instance's `"127.0.0.1:PORT"`.
    pub backends: &'a HashMap<String, String>,
    pub redis_url: &'a str,
    pub jwt_public_key: &'a Path,
}

/// conf/demo.yaml with the test's addresses: backends, Redis, JWT key, and (per start attempt)
/// listener ports and absolute pid/upgrade paths (and a longer Redis timeout). Routes, tiers, breaker, health checks and
/// everything else stay as shipped. Panics naming anything it does not recognise, so a change to
/// conf/demo.yaml that this test cannot follow fails loudly instead of testing something else.
pub fn test_config(shipped: &str, addrs: &Addresses<'_>) -> Yaml {
    let mut v: Yaml = serde_yaml_ng::from_str(shipped).expect("conf/demo.yaml is valid YAML");
    v["redis"]["url"] = Yaml::from(addrs.redis_url);
    // The one setting besides addresses: the shipped 200 ms also bounds the first call's connect,
    // and the test asserts the limits were never decided by the fallback; a loaded CI machine
    // must not push it there.
    v["redis"]["timeout"] = Yaml::from("1s");
    let upstreams = v["upstreams"]
        .as_mapping_mut()
        .expect("conf/demo.yaml has upstreams");
    for (name, upstream) in upstreams.iter_mut() {
        let backends = upstream["backends"]
            .as_sequence_mut()
            .unwrap_or_else(|| panic!("upstream {name:?} has no backends list"));
        for b in backends {
            let shipped_addr = b["addr"].as_str().expect("backend addr").to_string();
            let ours = addrs.backends.get(&shipped_addr).unwrap_or_else(|| {
                panic!(
                    "upstream {name:?}: backend {shipped_addr} is not one of the demo instances \
                     this test starts ({:?})",
                    addrs.backends.keys().collect::<Vec<_>>()
                )
            });
            b["addr"] = Yaml::from(ours.as_str());
        }
    }
    let keys = v["auth"]["jwt"]["keys"]
        .as_sequence_mut()
        .expect("conf/demo.yaml verifies JWTs with a key file");
    for k in keys {
        assert!(
            k.get("public_key_file").is_some(),
            "JWT key without public_key_file: {k:?}"
        );
        k["public_key_file"] = Yaml::from(addrs.jwt_public_key.display().to_string());
    }
    v
}

/// A running `tollgate` with its temp dir (config, log, pid file, upgrade socket).
pub struct Gateway {
    pub port: u16,
    pub admin_port: u16,
    child: Child,
    dir: TempDir,
}

pub fn http() -> reqwest::Client {
    // `--workspace` builds unify features: the gateway's tests turn reqwest's gzip on, which
    // would decompress bodies and hide Content-Encoding from the compression check.
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .no_gzip()
        .no_proxy()
        .build()
        .expect("HTTP client")
}

impl Gateway {
    /// Start `config` (from `test_config`) on free ports; retried when a port was taken
    /// between `free_port` and the bind. Returns once `/health` answers 200 through the
    /// gateway and the admin API reports every backend healthy.
    pub async fn start(config: &Yaml) -> Self {
        let bin = tollgate_bin();
        for attempt in 0..5 {
            let dir = tempfile::Builder::new()
                .prefix("stack-gw-")
                .tempdir()
                .expect("tempdir");
            let (port, admin_port) = (free_port(), free_port());
            let mut config = config.clone();
            let server = &mut config["server"];
            server["listen"] = Yaml::Sequence(vec![Yaml::from(format!("127.0.0.1:{port}"))]);
            server["admin_listen"] = Yaml::from(format!("127.0.0.1:{admin_port}"));
            server["pid_file"] = Yaml::from(dir.path().join("tollgate.pid").display().to_string());
            server["upgrade_sock"] =
                Yaml::from(dir.path().join("upgrade.sock").display().to_string());
            let path = dir.path().join("demo.yaml");
            std::fs::write(
                &path,
                serde_yaml_ng::to_string(&config).expect("serialise config"),
            )
            .expect("write config");

            let log = dir.path().join("tollgate.log");
            let log_file = File::create(&log).expect("log file");
            let child = Command::new(&bin)
                .arg("-c")
                .arg(&path)
                .env("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
                .env("RUST_LOG", "info")
                .stdout(Stdio::from(log_file.try_clone().expect("log file")))
                .stderr(Stdio::from(log_file))
                .spawn()
                .expect("spawn tollgate");
            let mut gw = Self {
                port,
                admin_port,
                child,
                dir,
            };
            match gw.wait_ready().await {
                Ok(()) => return gw,
                // Dropping `gw` kills the process; the next try starts afresh.
                Err(text) if attempt < 4 && text.contains("in use") => {}
                Err(text) => panic!("tollgate did not start:\n{text}"),
            }
        }
        unreachable!("the loop returns or panics")
    }

    /// Poll until ready; `Err(log)` when the process exited first.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let http = http();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("tollgate exited ({status}):\n{}", self.log()));
            }
            let health = http.get(self.url("/health")).send().await;
            if health.is_ok_and(|r| r.status() == 200) {
                if let Some(ups) = self.upstreams().await {
                    let all_healthy = backends(&ups)
                        .iter()
                        .all(|b| b["healthy"].as_bool() == Some(true));
                    if all_healthy {
                        return Ok(());
                    }
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "not ready after {START_TIMEOUT:?}:\n{}",
                    self.log()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn admin(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tollgate.log")).unwrap_or_default()
    }

    /// `GET /admin/{what}` with the admin token.
    pub async fn admin_get(&self, what: &str) -> Option<Json> {
        let r = http()
            .get(self.admin(&format!("/admin/{what}")))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .ok()?;
        if r.status() != 200 {
            return None;
        }
        r.json().await.ok()
    }

    pub async fn upstreams(&self) -> Option<Json> {
        self.admin_get("upstreams").await
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Every backend of every upstream in an `/admin/upstreams` answer.
pub fn backends(upstreams: &Json) -> Vec<&Json> {
    upstreams["upstreams"]
        .as_array()
        .map(|list| {
            list.iter()
                .flat_map(|u| u["backends"].as_array().into_iter().flatten())
                .collect()
        })
        .unwrap_or_default()
}

/// The backends of the upstream called `name`.
pub fn upstream_backends<'a>(upstreams: &'a Json, name: &str) -> Vec<&'a Json> {
    upstreams["upstreams"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|u| u["name"] == name)
        .flat_map(|u| u["backends"].as_array().into_iter().flatten())
        .collect()
}
