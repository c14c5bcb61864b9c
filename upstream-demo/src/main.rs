//! upstream-demo: the backend Tollgate's demo runs three of. Configured by the environment
//! (see `config`); this file only wires: read the config, wait for Postgres and Redis, apply the
//! migrations, start the event worker and the HTTP server, and shut down in order on
//! SIGTERM/SIGINT — stop accepting, let in-flight requests finish (within the grace period),
//! then let the worker store what was accepted.
//!
//!   DATABASE_URL=postgres://postgres@127.0.0.1:55432/postgres REDIS_URL=redis://127.0.0.1:56379 \
//!   JWT_PRIVATE_KEY=run/jwt/private.pem PORT=3001 INSTANCE_ID=demo-1 cargo run -p upstream-demo
//!   curl -s localhost:3001/health

mod auth;
mod config;
mod db;
mod error;
mod events;
mod external;
mod health;
mod resources;
mod state;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use axum::Router;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::db::Db;
use crate::state::AppState;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Largest request body outside the events route.
const MAX_BODY: usize = 256 * 1024;

fn router(state: AppState) -> Router {
    let mut router = Router::new()
        .route("/health", get(health::health))
        .route("/api/v1/status", get(health::status))
        .route("/api/v1/auth/login", post(auth::login))
        .route("/api/v1/me", get(auth::me))
        .route(
            "/api/v1/resources",
            get(resources::list).post(resources::create),
        )
        .route(
            "/api/v1/resources/{id}",
            get(resources::get)
                .put(resources::replace)
                .delete(resources::delete),
        )
        .route(
            "/api/v1/events",
            post(events::api::accept).layer(DefaultBodyLimit::max(events::api::MAX_EVENT_BYTES)),
        )
        .route("/api/v1/events/{id}", get(events::api::status))
        .route("/api/v1/external", get(external::external));
    if state.config.external_control {
        router = router.route(
            "/api/v1/external/mode",
            get(external::get_mode).put(external::put_mode),
        );
    }
    router
        .fallback(error::not_found)
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), BoxError> {
    let config = Arc::new(Config::from_env()?);
    let signer = auth::TokenSigner::from_file(
        &config.jwt_private_key,
        config.jwt_issuer.clone(),
        config.jwt_audience.clone(),
    )
    .map_err(|e| e.to_string())?;

    let db = Db::connect(&config)
        .await
        .map_err(|e| format!("connecting to PostgreSQL: {e}"))?;
    db.migrate()
        .await
        .map_err(|e| format!("applying migrations: {e}"))?;

    let redis_client =
        redis::Client::open(config.redis_url.as_str()).map_err(|e| format!("REDIS_URL: {e}"))?;
    let redis = connect_redis(&redis_client, &config).await?;

    let state = AppState {
        config: config.clone(),
        db: db.clone(),
        redis,
        signer: Arc::new(signer),
        started: std::time::Instant::now(),
        started_at: chrono::Utc::now(),
        external: Arc::new(external::Rates::new(
            config.external_fail_rate,
            config.external_stall_rate,
        )),
    };

    let listener = tokio::net::TcpListener::bind(SocketAddr::new(config.host, config.port))
        .await
        .map_err(|e| format!("binding {}:{}: {e}", config.host, config.port))?;
    let addr = listener.local_addr()?;

    // Two stages of shutdown: `signal` stops the HTTP server; `worker_stop` comes after the
    // server has finished, so every event accepted by a request reaches the worker's drain.
    let signal = CancellationToken::new();
    let worker_stop = CancellationToken::new();
    tokio::spawn(wait_for_signal(signal.clone()));
    let worker = tokio::spawn(events::worker::run(
        db.write.clone(),
        redis_client,
        config.instance_id.clone(),
        worker_stop.clone(),
        config.shutdown_grace,
    ));

    tracing::info!(instance = %config.instance_id, %addr, "listening");
    // One line on stdout for scripts and tests that started us with PORT=0.
    println!(
        "upstream-demo {} listening on http://{addr}",
        config.instance_id
    );

    let server = axum::serve(listener, router(state))
        .with_graceful_shutdown(signal.clone().cancelled_owned())
        .into_future();
    let mut server = tokio::spawn(server);
    let grace = config.shutdown_grace;
    tokio::select! {
        res = &mut server => res??,
        _ = async { signal.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "in-flight requests outlived the grace period; closing them");
            server.abort();
        }
    }
    tracing::info!("HTTP server stopped; draining the event worker");
    worker_stop.cancel();
    if tokio::time::timeout(grace + Duration::from_secs(2), worker)
        .await
        .is_err()
    {
        tracing::warn!("event worker did not finish in time; unstored events stay on the stream");
    }
    db.close().await;
    tracing::info!("bye");
    Ok(())
}

/// The handlers' Redis connection: multiplexed, reconnecting, every command bounded by a
/// response timeout. Waits for Redis up to the startup timeout.
async fn connect_redis(
    client: &redis::Client,
    cfg: &Config,
) -> Result<ConnectionManager, BoxError> {
    let manager_config = ConnectionManagerConfig::new()
        .set_response_timeout(Some(Duration::from_secs(1)))
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_number_of_retries(2);
    let deadline = tokio::time::Instant::now() + cfg.startup_timeout;
    loop {
        match ConnectionManager::new_with_config(client.clone(), manager_config.clone()).await {
            Ok(c) => return Ok(c),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::info!(error = %e, "waiting for Redis");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => return Err(format!("connecting to Redis: {e}").into()),
        }
    }
}

/// Cancel `token` on the first SIGTERM or SIGINT.
async fn wait_for_signal(token: CancellationToken) {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT: shutting down"),
        _ = term => tracing::info!("SIGTERM: shutting down"),
    }
    token.cancel();
}
