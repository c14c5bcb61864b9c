//! Integration tests of upstream-demo against real PostgreSQL and Redis processes (see
//! `harness`): login and JWTs, resources CRUD, events idempotency and the worker, health and
//! shutdown. Run with `cargo test -p upstream-demo` (needs postgresql, redis-server, openssl).

mod auth;
mod events;
mod harness;
mod lifecycle;
mod resources;
