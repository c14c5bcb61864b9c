//! A bare pingora 0.9.1 reverse proxy: the floor Tollgate is benchmarked against.
//!
//! One `ProxyHttp` that sends every request to one fixed `HttpPeer`, on one worker thread, built
//! from this repository with the same release profile (fat LTO, one codegen unit, abort on panic)
//! and the same mimalloc global allocator as `src/main.rs`. Whatever Tollgate costs above this
//! proxy is the cost of Tollgate itself, not of pingora.
//!
//! ```text
//! cargo build --release --example reference_proxy
//! target/release/examples/reference_proxy LISTEN_ADDR UPSTREAM_ADDR
//! # or: REF_LISTEN=127.0.0.1:6188 REF_UPSTREAM=127.0.0.1:8000 target/release/examples/reference_proxy
//! ```
//!
//! Defaults: listen on `127.0.0.1:6188`, upstream `127.0.0.1:8000`. Set `REF_PID_FILE` and
//! `REF_UPGRADE_SOCK` (absolute paths) to run several instances side by side. With
//! `REF_TLS_CERT` and `REF_TLS_KEY` (PEM files) it listens with TLS instead: pingora's own TLS
//! listener (rustls, the library Tollgate uses), ALPN `h2` and `http/1.1`.
//! `scripts/bench.sh` builds and runs it.
//!
//! Parity with Tollgate's hot path, and nothing more: upstream connections are pooled (pingora's
//! default keep-alive pool), every peer timeout is set (they all default to `None`), and the
//! downstream keep-alive gets an idle timeout (pingora's default never times out).

use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_core::Result;
use pingora_proxy::{ProxyHttp, Session};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Idle time after which a downstream keep-alive connection is closed (Tollgate's default).
const DOWNSTREAM_KEEPALIVE_SECS: u64 = 60;

/// The whole proxy: the peer is built once and cloned per request.
struct Reference {
    peer: HttpPeer,
}

#[async_trait]
impl ProxyHttp for Reference {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> Result<bool> {
        session.set_keepalive(Some(DOWNSTREAM_KEEPALIVE_SECS));
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.peer.clone()))
    }
}

/// Positional argument `index`, else the environment variable `env`, else `default`.
fn setting(index: usize, env: &str, default: &str) -> String {
    std::env::args()
        .nth(index)
        .or_else(|| std::env::var(env).ok())
        .unwrap_or_else(|| default.to_string())
}

fn main() {
    let listen = setting(1, "REF_LISTEN", "127.0.0.1:6188");
    let upstream = setting(2, "REF_UPSTREAM", "127.0.0.1:8000");

    let mut peer = HttpPeer::new(upstream.as_str(), false, String::new());
    // The same values as Tollgate's defaults (src/config/schema.rs).
    peer.options.connection_timeout = Some(Duration::from_secs(1));
    peer.options.total_connection_timeout = Some(Duration::from_secs(1));
    peer.options.read_timeout = Some(Duration::from_secs(30));
    peer.options.write_timeout = Some(Duration::from_secs(30));
    peer.options.idle_timeout = Some(Duration::from_secs(60));

    let conf = ServerConf {
        threads: 1,
        grace_period_seconds: Some(1),
        graceful_shutdown_timeout_seconds: Some(1),
        pid_file: std::env::var("REF_PID_FILE")
            .unwrap_or_else(|_| "/tmp/reference_proxy.pid".into()),
        upgrade_sock: std::env::var("REF_UPGRADE_SOCK")
            .unwrap_or_else(|_| "/tmp/reference_proxy_upgrade.sock".into()),
        ..ServerConf::default()
    };
    // `Opt::default()`, not `Opt::parse_args()`: pingora's parser rejects our positional arguments.
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();

    let mut proxy = pingora_proxy::http_proxy_service(&server.configuration, Reference { peer });
    match (std::env::var("REF_TLS_CERT"), std::env::var("REF_TLS_KEY")) {
        (Ok(cert), Ok(key)) => {
            let mut tls = pingora_core::listeners::tls::TlsSettings::intermediate(&cert, &key)
                .expect("TLS settings");
            tls.enable_h2();
            proxy.add_tls_with_settings(&listen, None, tls);
        }
        _ => proxy.add_tcp(&listen),
    }
    server.add_service(proxy);
    server.run_forever()
}
