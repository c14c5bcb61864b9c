//! Tollgate: an edge API gateway on Pingora. The binary (`main.rs`) wires these modules into a
//! pingora server; each module owns one concern (see `proxy` for the request flow).
//!
//! Layers, bottom to top (a module imports only from its own layer or the ones below it, and
//! never in a cycle; `tests/layers.rs` checks both):
//! 1. foundation, no Tollgate state: `http` (message rules, head syntax, added fields), `clock`,
//!    `metrics`, `error`;
//! 2. concerns: `store` (Redis), `observe`, `access_log`, `otlp`, `upstream` (specs, selection, backends,
//!    breakers, health probes), `shed`, `identity`, `limit`, `cache`, `route`, `admission`,
//!    `tls` (certificates, SNI, listeners' TLS settings), `acme` (certificates obtained
//!    and renewed by ACME), `front` (the connection's front end);
//! 3. `config`: the YAML file compiled into the concerns' types;
//! 4. `state`: what survives reloads (backend states, budgets, shedders);
//! 5. `snapshot`: one immutable generation of the running config (a `RouteRuntime` per route);
//! 6. `proxy` (the request flow), `control` (load, reload, background work), `admin`.

pub mod access_log;
pub mod acme;
pub mod admin;
pub mod admission;
pub mod cache;
pub mod clock;
pub mod config;
pub mod control;
pub mod error;
pub mod front;
pub mod http;
pub mod identity;
pub mod limit;
pub mod metrics;
pub mod observe;
#[cfg(feature = "otlp")]
pub mod otlp;
pub mod proxy;
pub mod route;
pub mod shed;
pub mod snapshot;
pub mod state;
pub mod store;
pub mod tls;
pub mod upstream;
