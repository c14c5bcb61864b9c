//! docker-compose.yml and conf/demo.yaml describe the same demo: this test parses both (no
//! Docker needed) and checks that the services exist, that the gateway publishes the listener
//! and admin ports demo.yaml names and mounts demo.yaml itself, that the instances listen where
//! demo.yaml's backends point, that Redis is where demo.yaml's `redis.url` points, and that the
//! JWT key and admin token demo.yaml asks for are provided.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_yaml_ng::{Mapping, Value};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn load(path: &str) -> Value {
    let text = std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut v: Value = serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    // Compose files use `<<: *anchor` merge keys.
    v.apply_merge()
        .unwrap_or_else(|e| panic!("{path}: merge keys: {e}"));
    v
}

fn str_of<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {v:?}"))
}

/// `"HOST:PORT"` -> port.
fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr:?}"))
}

/// A service's environment as (name, value) pairs (compose allows a map or `NAME=value` list).
fn env_of(service: &Value) -> Vec<(String, String)> {
    match &service["environment"] {
        Value::Mapping(m) => m
            .iter()
            .map(|(k, v)| {
                let value = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    other => panic!("environment value {other:?}"),
                };
                (str_of(k, "environment name").to_string(), value)
            })
            .collect(),
        Value::Sequence(list) => list
            .iter()
            .map(|item| {
                let s = str_of(item, "environment entry");
                let (k, v) = s.split_once('=').unwrap_or((s, ""));
                (k.to_string(), v.to_string())
            })
            .collect(),
        Value::Null => Vec::new(),
        other => panic!("environment: {other:?}"),
    }
}

fn env_var(service: &Value, name: &str) -> Option<String> {
    env_of(service)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

/// `(host side, container port)` of each `ports:` entry (`"8080:8080"`,
/// `"127.0.0.1:9090:9090"`).
fn published(service: &Value) -> Vec<(String, u16)> {
    service["ports"]
        .as_sequence()
        .map(|list| {
            list.iter()
                .map(|p| {
                    let s = str_of(p, "ports entry");
                    let (host, container) = s.rsplit_once(':').expect("HOST:CONTAINER");
                    let container = container.split('/').next().unwrap_or(container);
                    (host.to_string(), container.parse().expect("container port"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `(source, target)` of each `volumes:` entry of a service.
fn volumes(service: &Value) -> Vec<(String, String)> {
    service["volumes"]
        .as_sequence()
        .map(|list| {
            list.iter()
                .map(|v| {
                    let s = str_of(v, "volumes entry");
                    let mut parts = s.split(':');
                    let source = parts.next().unwrap_or_default().to_string();
                    let target = parts.next().unwrap_or_default().to_string();
                    (source, target)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The service's command as one string (list entries joined by spaces).
fn command_text(service: &Value) -> String {
    match &service["command"] {
        Value::String(s) => s.clone(),
        Value::Sequence(list) => list
            .iter()
            .map(|p| str_of(p, "command part").to_string())
            .collect::<Vec<_>>()
            .join(" "),
        other => panic!("command: {other:?}"),
    }
}

fn shares_gateway_network(service: &Value) -> bool {
    service["network_mode"].as_str() == Some("service:gateway")
}

#[test]
fn compose_and_demo_yaml_agree() {
    let compose = load("docker-compose.yml");
    let demo = load("conf/demo.yaml");
    let services: &Mapping = compose["services"].as_mapping().expect("services:");
    let names: BTreeSet<&str> = services.keys().filter_map(Value::as_str).collect();
    for needed in ["postgres", "redis", "gateway", "demo-1", "demo-2", "demo-3"] {
        assert!(
            names.contains(needed),
            "service {needed} missing: {names:?}"
        );
    }
    let service = |name: &str| &compose["services"][name];
    let gateway = service("gateway");

    // The gateway runs conf/demo.yaml, mounted from the repository.
    let mounts = volumes(gateway);
    let config_mount = mounts
        .iter()
        .find(|(source, _)| source == "./conf/demo.yaml")
        .unwrap_or_else(|| panic!("the gateway does not mount ./conf/demo.yaml: {mounts:?}"));
    let config_in_container = Path::new(&config_mount.1);
    let command = command_text(gateway);
    assert!(
        command.contains(&config_mount.1),
        "the gateway's command does not use {}: {command}",
        config_mount.1
    );
    assert!(command.contains("tollgate -t -c"), "{command}");

    // It publishes the listener and the admin port, the admin one on the host's loopback only.
    let listen = demo["server"]["listen"]
        .as_sequence()
        .expect("server.listen");
    let ports = published(gateway);
    for l in listen {
        let port = port_of(str_of(l, "server.listen"));
        assert!(
            ports.iter().any(|(_, p)| *p == port),
            "listener port {port} is not published: {ports:?}"
        );
    }
    let admin = str_of(&demo["server"]["admin_listen"], "server.admin_listen");
    let admin_port = port_of(admin);
    let admin_published = ports
        .iter()
        .find(|(_, p)| *p == admin_port)
        .unwrap_or_else(|| panic!("admin port {admin_port} is not published: {ports:?}"));
    assert!(
        admin_published.0.starts_with("127.0.0.1:"),
        "the admin API must stay on the host's loopback: {admin_published:?}"
    );
    // demo.yaml binds the admin listener to loopback, which a published port cannot reach;
    // the gateway's command must rewrite exactly that address to 0.0.0.0.
    if admin.starts_with("127.0.0.1:") {
        assert!(
            command.contains("admin_listen") && command.contains("0.0.0.0"),
            "the gateway's command does not rebind admin_listen: {command}"
        );
    }

    // The admin token: demo.yaml names an environment variable; the gateway gets it.
    if let Some(var) = demo["admin"]["token_env"].as_str() {
        let value = env_var(gateway, var).unwrap_or_else(|| {
            panic!("demo.yaml's admin.token_env {var} is not set for the gateway")
        });
        assert!(!value.is_empty());
    }

    // The JWT public key: demo.yaml names it relative to itself; the jwt volume provides it.
    let keys = demo["auth"]["jwt"]["keys"].as_sequence().expect("jwt keys");
    for k in keys {
        let file = str_of(&k["public_key_file"], "public_key_file");
        let resolved = normalize(&config_in_container.parent().expect("dir").join(file));
        let dir = resolved
            .parent()
            .expect("key dir")
            .to_string_lossy()
            .to_string();
        assert!(
            mounts
                .iter()
                .any(|(source, target)| source == "jwt" && *target == dir),
            "{} must come from the jwt volume mounted at {dir}: {mounts:?}",
            resolved.display()
        );
        // ...which jwt-keys fills with public.pem next to the private key the instances use.
        let name = resolved
            .file_name()
            .expect("file")
            .to_string_lossy()
            .to_string();
        let jwt_keys = command_text(service("jwt-keys"));
        assert!(jwt_keys.contains(&name), "jwt-keys does not write {name}");
        assert!(
            volumes(service("jwt-keys"))
                .iter()
                .any(|(s, t)| s == "jwt" && *t == dir),
            "jwt-keys does not write into {dir}"
        );
    }

    // The instances: in the gateway's network namespace, listening where the backends point.
    let mut backend_ports = BTreeSet::new();
    for (name, upstream) in demo["upstreams"].as_mapping().expect("upstreams") {
        for b in upstream["backends"].as_sequence().expect("backends") {
            let addr = str_of(&b["addr"], "addr");
            assert!(
                addr.starts_with("127.0.0.1:"),
                "{name:?}: {addr} is only reachable in compose on the shared loopback"
            );
            backend_ports.insert(port_of(addr));
        }
    }
    let redis_url = str_of(&demo["redis"]["url"], "redis.url");
    let mut instance_ports = BTreeSet::new();
    for i in 1..=3 {
        let name = format!("demo-{i}");
        let d = service(&name);
        assert!(
            shares_gateway_network(d),
            "{name} must share the gateway's network"
        );
        assert_eq!(env_var(d, "HOST").as_deref(), Some("127.0.0.1"), "{name}");
        assert_eq!(env_var(d, "INSTANCE_ID"), Some(name.clone()));
        let port: u16 = env_var(d, "PORT")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("{name}: no PORT"));
        instance_ports.insert(port);
        assert_eq!(
            env_var(d, "HEALTHCHECK_URL"),
            Some(format!("http://127.0.0.1:{port}/health")),
            "{name}"
        );
        assert_eq!(
            env_var(d, "REDIS_URL").as_deref(),
            Some(redis_url),
            "{name} must use the Redis the gateway uses"
        );
        let key = env_var(d, "JWT_PRIVATE_KEY").unwrap_or_else(|| panic!("{name}: no key"));
        let key_dir = Path::new(&key)
            .parent()
            .expect("dir")
            .to_string_lossy()
            .to_string();
        assert!(
            volumes(d).iter().any(|(s, t)| s == "jwt" && *t == key_dir),
            "{name}: {key} is not on the jwt volume"
        );
    }
    assert_eq!(
        instance_ports, backend_ports,
        "the instances' PORTs and demo.yaml's backends differ"
    );

    // Redis: in the gateway's namespace, on the port of demo.yaml's redis.url.
    let redis = service("redis");
    let (host, port) = redis_url
        .trim_start_matches("redis://")
        .split('/')
        .next()
        .and_then(|hp| hp.rsplit_once(':'))
        .expect("redis://HOST:PORT");
    assert_eq!(
        host, "127.0.0.1",
        "redis.url must be on the shared loopback"
    );
    assert!(
        shares_gateway_network(redis),
        "redis must share the gateway's network"
    );
    let redis_command = command_text(redis);
    assert!(
        redis_command.contains(&format!("--port {port}")),
        "redis does not listen on {port}: {redis_command}"
    );
    assert!(
        redis["healthcheck"]["test"]
            .as_sequence()
            .is_some_and(|t| t.iter().any(|p| p.as_str() == Some(port))),
        "redis's healthcheck does not ping port {port}"
    );
    // Postgres is reached by name from the instances.
    for i in 1..=3 {
        let url = env_var(service(&format!("demo-{i}")), "DATABASE_URL").expect("DATABASE_URL");
        assert!(url.contains("@postgres:5432/"), "{url}");
    }
}

/// `a/b/../c` -> `a/c` (lexically; the path need not exist).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}
