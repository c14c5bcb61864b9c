//! Integration tests: the real `tollgate` binary against mock upstreams, on free ports.
//! Run with `cargo test --test gateway` (or `scripts/test.sh` for everything).

mod harness;

mod acme;
mod admin;
mod balancing;
mod browser;
mod cache;
mod grpc;
mod health;
mod hygiene;
mod identity;
mod lifecycle;
mod malformed;
mod mutation;
mod observe;
mod otlp;
mod ratelimit;
mod reload;
mod resilience;
mod routing;
mod tls;
