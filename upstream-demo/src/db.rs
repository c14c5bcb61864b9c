//! The PostgreSQL side: two bounded pools (writes and migrations on `DATABASE_URL`, reads on
//! `DATABASE_READ_URL`), waiting for the database at start, and the embedded migrations from
//! `schema/` (users, resources, events, seed data). It owns connections, never request logic.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::time::Instant;

use crate::config::Config;

/// The migrations and seed data in `schema/`, compiled into the binary. `Migrator::run` takes a
/// Postgres advisory lock, so several instances starting at once apply them exactly once.
pub static MIGRATOR: Migrator = sqlx::migrate!("../schema");

/// Both pools. Handlers that only read use `read`; everything that writes uses `write`.
#[derive(Clone, Debug)]
pub struct Db {
    pub write: PgPool,
    pub read: PgPool,
}

impl Db {
    /// Connect both pools, retrying until `cfg.startup_timeout` (the database may start after us).
    pub async fn connect(cfg: &Config) -> Result<Self, sqlx::Error> {
        let deadline = Instant::now() + cfg.startup_timeout;
        let write = connect_pool(&cfg.database_url, cfg, deadline).await?;
        let read = if cfg.database_read_url == cfg.database_url {
            // Same server: still a separate pool, so reads cannot starve writes of connections.
            pool_options(cfg).connect_lazy(&cfg.database_read_url)?
        } else {
            connect_pool(&cfg.database_read_url, cfg, deadline).await?
        };
        Ok(Self { write, read })
    }

    /// Apply pending migrations (idempotent; safe to race with other instances).
    pub async fn migrate(&self) -> Result<(), sqlx::migrate::MigrateError> {
        MIGRATOR.run(&self.write).await
    }

    /// Close both pools, waiting for checked-out connections to come back.
    pub async fn close(&self) {
        self.write.close().await;
        self.read.close().await;
    }
}

fn pool_options(cfg: &Config) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(cfg.pool_size)
        .min_connections(0)
        .acquire_timeout(cfg.acquire_timeout)
        .idle_timeout(Duration::from_secs(60))
}

async fn connect_pool(url: &str, cfg: &Config, deadline: Instant) -> Result<PgPool, sqlx::Error> {
    loop {
        match pool_options(cfg).connect(url).await {
            Ok(pool) => return Ok(pool),
            Err(e) if Instant::now() < deadline && is_transient(&e) => {
                tracing::info!(error = %e, "waiting for PostgreSQL");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Errors worth retrying at start: the server is not up yet, or is still starting.
fn is_transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
        // 57P03: cannot_connect_now ("the database system is starting up").
        sqlx::Error::Database(db) => db.code().as_deref() == Some("57P03"),
        _ => false,
    }
}
