//! Where ACME accounts and certificates live. `Disk`: one node's directory (created 0700, every
//! file 0600, written to a temporary name and renamed, so a crash never leaves half a file).
//! `Redis`: the fleet's store; the ordering node holds a lock with a lease, challenge answers
//! live there (any node answers a validation), and new certificates and TLS-ALPN-01 challenges
//! are announced on a pub/sub channel. Redis keys carry a hash tag per certificate, account,
//! token or host, so they spread over a cluster's slots.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{Acme, CertSpec};
use crate::store::Store;

const PREFIX: &str = "tollgate:acme";
const EVENTS: &str = "tollgate:acme:events";
/// How long a challenge answer stays in Redis when the order never cleans it up.
const CHALLENGE_TTL_SECS: u64 = 600;

/// A certificate as stored: the chain (leaf first) and its key, PEM, with what it was ordered
/// for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stored {
    pub directory: String,
    pub hosts: Vec<String>,
    pub chain_pem: String,
    pub key_pem: String,
}

impl Stored {
    /// Was it ordered for these hosts from this directory?
    pub fn matches(&self, spec: &CertSpec) -> bool {
        self.directory == spec.directory && self.hosts == spec.hosts
    }
}

pub enum Storage {
    Disk(PathBuf),
    Redis(Arc<Store>),
}

fn hash16(text: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(text.as_bytes())[..8])
}

/// The storage key of an account: one per directory and contact list.
pub fn account_id(spec: &CertSpec) -> String {
    hash16(&format!("{}\n{}", spec.directory, spec.contact.join(",")))
}

fn cert_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.json"))
}

/// The certificate stored on disk for `name`, read synchronously (at start, so a certificate
/// already issued serves from the first handshake).
pub fn read_disk_cert(dir: &Path, name: &str) -> Result<Option<Stored>, String> {
    read_json(&cert_path(dir, name))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, String> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("{}: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// Write `bytes` to `path` with mode 0600 (in a directory created 0700), atomically.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("cannot write {}: {e}", tmp.display()));
    }
    std::fs::rename(&tmp, path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn redis_err(op: &str) -> impl Fn(crate::store::StoreError) -> String + '_ {
    move |e| format!("Redis {op}: {e:?}")
}

/// `GET key` as a background call (`op` names it in the metrics).
async fn get(store: &Store, op: &'static str, key: String) -> Result<Option<String>, String> {
    store
        .call(op, |mut c| async move {
            redis::cmd("GET").arg(&key).query_async(&mut c).await
        })
        .await
        .map_err(redis_err("GET"))
}

impl Storage {
    pub async fn load_cert(&self, name: &str) -> Result<Option<Stored>, String> {
        match self {
            Self::Disk(dir) => {
                let path = cert_path(dir, name);
                tokio::task::spawn_blocking(move || read_json(&path))
                    .await
                    .map_err(|e| e.to_string())?
            }
            Self::Redis(store) => {
                let key = format!("{PREFIX}:{{{name}}}:cert");
                let text = get(store, "acme_load", key).await?;
                text.map(|t| {
                    serde_json::from_str(&t).map_err(|e| format!("stored certificate: {e}"))
                })
                .transpose()
            }
        }
    }

    pub async fn save_cert(&self, name: &str, stored: &Stored) -> Result<(), String> {
        let json = serde_json::to_string(stored).map_err(|e| e.to_string())?;
        match self {
            Self::Disk(dir) => {
                let path = cert_path(dir, name);
                tokio::task::spawn_blocking(move || write_private(&path, json.as_bytes()))
                    .await
                    .map_err(|e| e.to_string())?
            }
            Self::Redis(store) => {
                let key = format!("{PREFIX}:{{{name}}}:cert");
                let event = format!("cert\t{name}");
                store
                    .call("acme_save", |mut c| async move {
                        redis::pipe()
                            .set(&key, &json)
                            .ignore()
                            .publish(EVENTS, &event)
                            .ignore()
                            .query_async::<()>(&mut c)
                            .await
                    })
                    .await
                    .map_err(redis_err("SET"))
            }
        }
    }

    pub async fn load_account(&self, id: &str) -> Result<Option<String>, String> {
        match self {
            Self::Disk(dir) => {
                let path = dir.join("accounts").join(format!("{id}.json"));
                tokio::task::spawn_blocking(move || match std::fs::read_to_string(&path) {
                    Ok(t) => Ok(Some(t)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(format!("{}: {e}", path.display())),
                })
                .await
                .map_err(|e| e.to_string())?
            }
            Self::Redis(store) => {
                let key = format!("{PREFIX}:account:{{{id}}}");
                get(store, "acme_account", key).await
            }
        }
    }

    pub async fn save_account(&self, id: &str, json: String) -> Result<(), String> {
        match self {
            Self::Disk(dir) => {
                let path = dir.join("accounts").join(format!("{id}.json"));
                tokio::task::spawn_blocking(move || write_private(&path, json.as_bytes()))
                    .await
                    .map_err(|e| e.to_string())?
            }
            Self::Redis(store) => {
                let key = format!("{PREFIX}:account:{{{id}}}");
                store
                    .call("acme_account", |mut c| async move {
                        redis::cmd("SET")
                            .arg(&key)
                            .arg(&json)
                            .query_async(&mut c)
                            .await
                    })
                    .await
                    .map_err(redis_err("SET"))
            }
        }
    }

    pub async fn forget_account(&self, id: &str) {
        match self {
            Self::Disk(dir) => {
                let _ = std::fs::remove_file(dir.join("accounts").join(format!("{id}.json")));
            }
            Self::Redis(store) => {
                let key = format!("{PREFIX}:account:{{{id}}}");
                let _ = store
                    .call("acme_account", |mut c| async move {
                        redis::cmd("DEL").arg(&key).query_async::<()>(&mut c).await
                    })
                    .await;
            }
        }
    }

    /// Take the order lock of `name` for `lease` (always granted on disk: one node).
    pub async fn lock(&self, name: &str, holder: &str, lease: Duration) -> Result<bool, String> {
        let Self::Redis(store) = self else {
            return Ok(true);
        };
        let key = format!("{PREFIX}:{{{name}}}:lock");
        let holder = holder.to_string();
        let ms = lease.as_millis().max(1) as u64;
        let set: Option<String> = store
            .call("acme_lock", |mut c| async move {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(&holder)
                    .arg("NX")
                    .arg("PX")
                    .arg(ms)
                    .query_async(&mut c)
                    .await
            })
            .await
            .map_err(redis_err("SET NX"))?;
        Ok(set.is_some())
    }

    /// Extend the lease of a lock this holder has; false: it lost the lock.
    pub async fn refresh(&self, name: &str, holder: &str, lease: Duration) -> Result<bool, String> {
        let Self::Redis(store) = self else {
            return Ok(true);
        };
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                 return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end",
            )
        });
        let key = format!("{PREFIX}:{{{name}}}:lock");
        let holder = holder.to_string();
        let ms = lease.as_millis().max(1) as u64;
        let n: i64 = store
            .call("acme_lock", |mut c| async move {
                SCRIPT
                    .key(&key)
                    .arg(&holder)
                    .arg(ms)
                    .invoke_async(&mut c)
                    .await
            })
            .await
            .map_err(redis_err("PEXPIRE"))?;
        Ok(n == 1)
    }

    /// Release a lock this holder has (no-op when it expired and another node took it).
    pub async fn unlock(&self, name: &str, holder: &str) {
        let Self::Redis(store) = self else {
            return;
        };
        static SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
            redis::Script::new(
                "if redis.call('GET', KEYS[1]) == ARGV[1] then \
                 return redis.call('DEL', KEYS[1]) else return 0 end",
            )
        });
        let key = format!("{PREFIX}:{{{name}}}:lock");
        let holder = holder.to_string();
        let _ = store
            .call("acme_lock", |mut c| async move {
                SCRIPT
                    .key(&key)
                    .arg(&holder)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await;
    }

    /// Make an HTTP-01 answer visible to the fleet (a no-op on disk: this node answers).
    pub async fn put_http01(
        &self,
        token: &str,
        key_authorization: Option<&str>,
    ) -> Result<(), String> {
        let Self::Redis(store) = self else {
            return Ok(());
        };
        let key = format!("{PREFIX}:http01:{{{token}}}");
        let value = key_authorization.map(str::to_string);
        store
            .call("acme_challenge", |mut c| async move {
                match value {
                    Some(v) => {
                        redis::cmd("SET")
                            .arg(&key)
                            .arg(v)
                            .arg("EX")
                            .arg(CHALLENGE_TTL_SECS)
                            .query_async::<()>(&mut c)
                            .await
                    }
                    None => redis::cmd("DEL").arg(&key).query_async::<()>(&mut c).await,
                }
            })
            .await
            .map_err(redis_err("challenge"))
    }

    pub async fn get_http01(&self, token: &str) -> Option<String> {
        let Self::Redis(store) = self else {
            return None;
        };
        let key = format!("{PREFIX}:http01:{{{token}}}");
        store
            .call_for_request("acme_challenge", |mut c| async move {
                redis::cmd("GET").arg(&key).query_async(&mut c).await
            })
            .await
            .ok()
            .flatten()
    }

    /// Make a TLS-ALPN-01 challenge certificate visible to the fleet and tell every node to
    /// load it (`None`: withdraw it).
    pub async fn put_alpn(&self, host: &str, pem: Option<(&str, &str)>) -> Result<(), String> {
        let Self::Redis(store) = self else {
            return Ok(());
        };
        let key = format!("{PREFIX}:alpn:{{{host}}}");
        let value = pem.map(|(c, k)| format!("{c}\n{k}"));
        let event = format!("alpn\t{host}");
        store
            .call("acme_challenge", |mut c| async move {
                let mut pipe = redis::pipe();
                match value {
                    Some(v) => pipe
                        .cmd("SET")
                        .arg(&key)
                        .arg(v)
                        .arg("EX")
                        .arg(CHALLENGE_TTL_SECS),
                    None => pipe.cmd("DEL").arg(&key),
                };
                pipe.ignore()
                    .publish(EVENTS, &event)
                    .ignore()
                    .query_async::<()>(&mut c)
                    .await
            })
            .await
            .map_err(redis_err("challenge"))
    }
}

/// Split the PEM of a stored TLS-ALPN-01 challenge into certificate and key.
pub(super) fn split_pem(text: &str) -> Option<(&str, &str)> {
    let at = text.find("-----BEGIN PRIVATE KEY-----")?;
    Some(text.split_at(at))
}

/// Follow the fleet's ACME events until `stop` fires: a certificate stored by another node
/// wakes that certificate's task; a TLS-ALPN-01 challenge set (or withdrawn) by another node is
/// loaded into this node's SNI table. Reconnects on its own; the tasks' periodic check covers
/// what is published while it is away.
pub async fn follow_events(acme: Weak<Acme>, store: Arc<Store>, mut stop: watch::Receiver<bool>) {
    use futures_util::StreamExt;
    loop {
        let subscribed = async {
            let mut pubsub = store.client.get_async_pubsub().await.ok()?;
            pubsub.subscribe(EVENTS).await.ok()?;
            Some(pubsub)
        };
        let pubsub = tokio::select! {
            p = tokio::time::timeout(Duration::from_secs(2), subscribed) => p.ok().flatten(),
            _ = stop.changed() => return,
        };
        if let Some(mut pubsub) = pubsub {
            let mut messages = pubsub.on_message();
            loop {
                let msg = tokio::select! {
                    m = messages.next() => m,
                    _ = stop.changed() => return,
                };
                let Some(msg) = msg else { break };
                let payload: String = msg.get_payload().unwrap_or_default();
                let Some(acme) = acme.upgrade() else { return };
                match payload.split_once('\t') {
                    Some(("cert", name)) => acme.wake(name),
                    Some(("alpn", host)) => {
                        let Some(live) = acme.live_for_host(host) else {
                            continue;
                        };
                        let key = format!("{PREFIX}:alpn:{{{host}}}");
                        let text = get(&store, "acme_challenge", key).await.ok().flatten();
                        let challenge = text
                            .as_deref()
                            .and_then(split_pem)
                            .and_then(|(c, k)| super::certified_from_pem(c, k));
                        live.set_alpn_challenge(host, challenge);
                    }
                    _ => {}
                }
            }
            log::warn!("ACME event feed from redis lost; reconnecting");
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stop.changed() => return,
        }
    }
}
