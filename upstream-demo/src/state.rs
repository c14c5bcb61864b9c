//! What every handler shares: the config, both database pools, the Redis connection, the JWT
//! signing key, the start time and `/api/v1/external`'s current rates. Built once in `main`, cloned cheaply per request.

use std::sync::Arc;
use std::time::Instant;

use redis::aio::ConnectionManager;

use crate::auth::TokenSigner;
use crate::config::Config;
use crate::db::Db;
use crate::external::Rates;

#[derive(Clone)]
pub struct AppState {
    pub config: Arc<Config>,
    pub db: Db,
    /// Multiplexed, reconnecting connection for request handlers. Never used for blocking
    /// commands (the event worker has its own connection for those).
    pub redis: ConnectionManager,
    pub signer: Arc<TokenSigner>,
    pub started: Instant,
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// Start from the config; changed by `PUT /api/v1/external/mode` when enabled.
    pub external: Arc<Rates>,
}
