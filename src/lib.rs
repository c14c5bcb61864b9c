//! Tollgate: an edge API gateway on Pingora. The binary (`main.rs`) wires these modules into a
//! pingora server; each module owns one concern (see `proxy` for the request flow).

pub mod admin;
pub mod breaker;
pub mod cache;
pub mod clock;
pub mod config;
pub mod control;
pub mod error;
pub mod fields;
pub mod guard;
pub mod health;
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
pub mod store;
pub mod upstream;
