//! Reads the process environment into one typed `Config`, reporting every bad variable at once.
//! It only parses: it never opens a file, a socket or a database connection.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Everything the demo is configured with (see the README table in `scripts/demo.sh`).
#[derive(Debug, Clone)]
pub struct Config {
    /// `HOST` (default `0.0.0.0`) and `PORT` (default 3000; 0 picks a free port).
    pub host: IpAddr,
    pub port: u16,
    /// `INSTANCE_ID`: names this instance in responses and as its Redis Stream consumer.
    pub instance_id: String,
    /// `DATABASE_URL` (writes, migrations) and `DATABASE_READ_URL` (reads; defaults to the former).
    pub database_url: String,
    pub database_read_url: String,
    /// `DATABASE_POOL_SIZE`: the bound of EACH pool (write and read), default 5.
    pub pool_size: u32,
    /// `DATABASE_ACQUIRE_TIMEOUT_MS`: how long a request waits for a pooled connection, default 2000.
    pub acquire_timeout: Duration,
    /// `REDIS_URL`.
    pub redis_url: String,
    /// `JWT_PRIVATE_KEY`: path to an RSA private key (PEM) that signs login tokens.
    pub jwt_private_key: PathBuf,
    /// `JWT_ISSUER` (default `tollgate-demo`) and `JWT_AUDIENCE` (default `tollgate`).
    pub jwt_issuer: String,
    pub jwt_audience: String,
    /// `EXTERNAL_FAIL_RATE` and `EXTERNAL_STALL_RATE`, each in 0..=1 (default 0): the rates
    /// `/api/v1/external` starts with.
    pub external_fail_rate: f64,
    pub external_stall_rate: f64,
    /// `EXTERNAL_CONTROL` (`1`/`true`, default off): serve `GET`/`PUT /api/v1/external/mode`,
    /// which read and change those rates at runtime (for demos and tests of the gateway's
    /// breaker). Off, the route does not exist.
    pub external_control: bool,
    /// `STARTUP_TIMEOUT_SECS`: how long to wait for Postgres and Redis at start, default 30.
    pub startup_timeout: Duration,
    /// `SHUTDOWN_GRACE_SECS`: how long in-flight requests and the event worker get, default 10.
    pub shutdown_grace: Duration,
}

/// Every variable that was missing or malformed, one per line.
#[derive(Debug)]
pub struct ConfigError(pub Vec<String>);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid environment:\n  {}", self.0.join("\n  "))
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// Parse from any lookup (the environment in production, a map in tests).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut errors = Vec::new();
        let mut required = |key: &str| {
            get(key).unwrap_or_else(|| {
                errors.push(format!("{key} is required"));
                String::new()
            })
        };
        let database_url = required("DATABASE_URL");
        let redis_url = required("REDIS_URL");
        let jwt_private_key = PathBuf::from(required("JWT_PRIVATE_KEY"));

        let host = parse(&get, &mut errors, "HOST", "0.0.0.0".parse().ok());
        let port = parse(&get, &mut errors, "PORT", Some(3000u16));
        let pool_size = parse(&get, &mut errors, "DATABASE_POOL_SIZE", Some(5u32));
        if pool_size == Some(0) {
            errors.push("DATABASE_POOL_SIZE must be at least 1".into());
        }
        let acquire_ms = parse(
            &get,
            &mut errors,
            "DATABASE_ACQUIRE_TIMEOUT_MS",
            Some(2000u64),
        );
        let startup = parse(&get, &mut errors, "STARTUP_TIMEOUT_SECS", Some(30u64));
        let grace = parse(&get, &mut errors, "SHUTDOWN_GRACE_SECS", Some(10u64));
        let fail_rate = rate(&get, &mut errors, "EXTERNAL_FAIL_RATE");
        let stall_rate = rate(&get, &mut errors, "EXTERNAL_STALL_RATE");
        let external_control = flag(&get, &mut errors, "EXTERNAL_CONTROL");

        if !errors.is_empty() {
            return Err(ConfigError(errors));
        }
        Ok(Self {
            host: host.unwrap_or(IpAddr::from([0, 0, 0, 0])),
            port: port.unwrap_or(3000),
            instance_id: get("INSTANCE_ID").unwrap_or_else(|| "demo".to_string()),
            database_read_url: get("DATABASE_READ_URL").unwrap_or_else(|| database_url.clone()),
            database_url,
            pool_size: pool_size.unwrap_or(5),
            acquire_timeout: Duration::from_millis(acquire_ms.unwrap_or(2000)),
            redis_url,
            jwt_private_key,
            jwt_issuer: get("JWT_ISSUER").unwrap_or_else(|| "tollgate-demo".to_string()),
            jwt_audience: get("JWT_AUDIENCE").unwrap_or_else(|| "tollgate".to_string()),
            external_fail_rate: fail_rate,
            external_stall_rate: stall_rate,
            external_control,
            startup_timeout: Duration::from_secs(startup.unwrap_or(30)),
            shutdown_grace: Duration::from_secs(grace.unwrap_or(10)),
        })
    }
}

/// Parse `key` if set, else `default`; a malformed value is recorded and yields `None`.
fn parse<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    errors: &mut Vec<String>,
    key: &str,
    default: Option<T>,
) -> Option<T> {
    match get(key) {
        None => default,
        Some(raw) => match raw.trim().parse() {
            Ok(v) => Some(v),
            Err(_) => {
                errors.push(format!("{key}: cannot parse {raw:?}"));
                None
            }
        },
    }
}

/// A probability in 0..=1, default 0.
fn rate(get: &impl Fn(&str) -> Option<String>, errors: &mut Vec<String>, key: &str) -> f64 {
    match parse::<f64>(get, errors, key, Some(0.0)) {
        Some(r) if (0.0..=1.0).contains(&r) => r,
        Some(r) => {
            errors.push(format!("{key} must be between 0 and 1, got {r}"));
            0.0
        }
        None => 0.0,
    }
}

/// A boolean: `1`/`true`/`yes`/`on` or `0`/`false`/`no`/`off` (any case), default false.
fn flag(get: &impl Fn(&str) -> Option<String>, errors: &mut Vec<String>, key: &str) -> bool {
    let Some(raw) = get(key) else { return false };
    match raw.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => true,
        "0" | "false" | "no" | "off" => false,
        _ => {
            errors.push(format!("{key}: expected 1/true or 0/false, got {raw:?}"));
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn lookup(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const BASE: [(&str, &str); 3] = [
        ("DATABASE_URL", "postgres://w"),
        ("REDIS_URL", "redis://r"),
        ("JWT_PRIVATE_KEY", "/k.pem"),
    ];

    #[test]
    fn defaults() {
        let c = Config::from_lookup(lookup(&BASE)).unwrap();
        assert_eq!(c.database_read_url, "postgres://w");
        assert_eq!(c.jwt_issuer, "tollgate-demo");
        assert_eq!(c.jwt_audience, "tollgate");
        assert_eq!(c.port, 3000);
        assert_eq!(c.external_fail_rate, 0.0);
        assert!(!c.external_control);
    }

    #[test]
    fn read_url_and_rates() {
        let mut pairs = BASE.to_vec();
        pairs.extend([
            ("DATABASE_READ_URL", "postgres://r"),
            ("EXTERNAL_FAIL_RATE", "0.25"),
            ("EXTERNAL_STALL_RATE", "1"),
            ("PORT", "0"),
            ("EXTERNAL_CONTROL", "True"),
        ]);
        let c = Config::from_lookup(lookup(&pairs)).unwrap();
        assert_eq!(c.database_read_url, "postgres://r");
        assert_eq!(c.external_fail_rate, 0.25);
        assert_eq!(c.external_stall_rate, 1.0);
        assert_eq!(c.port, 0);
        assert!(c.external_control);
    }

    #[test]
    fn every_error_at_once() {
        let err = Config::from_lookup(lookup(&[
            ("PORT", "http"),
            ("EXTERNAL_FAIL_RATE", "1.5"),
            ("DATABASE_POOL_SIZE", "0"),
            ("EXTERNAL_CONTROL", "maybe"),
        ]))
        .unwrap_err();
        let text = err.to_string();
        for needle in [
            "DATABASE_URL is required",
            "REDIS_URL is required",
            "JWT_PRIVATE_KEY is required",
            "PORT: cannot parse",
            "EXTERNAL_FAIL_RATE must be between 0 and 1",
            "DATABASE_POOL_SIZE must be at least 1",
            "EXTERNAL_CONTROL: expected 1/true or 0/false",
        ] {
            assert!(text.contains(needle), "{needle} missing from {text}");
        }
    }
}
