//! gRPC through the gateway, end to end over HTTP/2: a gRPC backend (axum, h2c) behind an
//! upstream with `protocol: http2`, and an HTTP/2 client (hyper) over h2c and over TLS. The four
//! call kinds, long streams past the total and body timeouts, the gateway's own answers in gRPC
//! form, and `grpc-timeout`. Messages are opaque bytes in gRPC's length-prefixed framing (gRPC
//! does not need protobuf, and neither does a gateway).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, Request, Response};
use http_body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::mpsc;

use crate::harness::*;
use crate::tls::Pki;

/// A body fed by a channel: frames as they are sent, the end when the sender is dropped.
struct ChannelBody(mpsc::Receiver<Frame<Bytes>>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|f| f.map(Ok))
    }
}

fn message(payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + payload.len());
    b.extend_from_slice(&[0]);
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b.freeze()
}

/// Whole messages out of `buf` (what is left stays for the next read).
fn messages(buf: &mut BytesMut) -> Vec<Bytes> {
    let mut out = Vec::new();
    while buf.len() >= 5 {
        let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
        if buf.len() < 5 + len {
            break;
        }
        buf.advance(5);
        out.push(buf.split_to(len).freeze());
    }
    out
}

fn ok_trailers() -> HeaderMap {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", "0".parse().expect("value"));
    t
}

/// The gRPC backend: `/test.Echo/{Unary, ServerStream, ClientStream, Bidi, Slow}`.
struct Backend {
    addr: SocketAddr,
    /// The `grpc-timeout` of the last call, as the backend got it.
    seen_timeout: Arc<Mutex<Option<String>>>,
    /// What `grpc.health.v1.Health/Check` answers: SERVING or NOT_SERVING.
    serving: Arc<std::sync::atomic::AtomicBool>,
}

async fn serve_call(
    req: Request<Body>,
    seen: Arc<Mutex<Option<String>>>,
    serving: Arc<std::sync::atomic::AtomicBool>,
) -> Response<Body> {
    *seen.lock().expect("lock") = req
        .headers()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let path = req.uri().path().to_string();
    let (tx, rx) = mpsc::channel::<Frame<Bytes>>(64);
    let mut body = req.into_body();
    tokio::spawn(async move {
        use http_body_util::BodyExt;
        let mut buf = BytesMut::new();
        let mut received = Vec::new();
        // Bidi answers each message as it comes; the others read the whole request first.
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                buf.extend_from_slice(&data);
                for m in messages(&mut buf) {
                    if path.ends_with("/Bidi") {
                        let mut echo = b"echo:".to_vec();
                        echo.extend_from_slice(&m);
                        if tx.send(Frame::data(message(&echo))).await.is_err() {
                            return;
                        }
                    }
                    received.push(m);
                }
            }
        }
        match path.rsplit('/').next().unwrap_or("") {
            "Unary" => {
                let mut echo = b"echo:".to_vec();
                echo.extend_from_slice(received.first().map_or(&[][..], |m| &m[..]));
                let _ = tx.send(Frame::data(message(&echo))).await;
            }
            "ServerStream" => {
                let n: usize = received
                    .first()
                    .and_then(|m| std::str::from_utf8(m).ok()?.parse().ok())
                    .unwrap_or(3);
                for i in 0..n {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if tx
                        .send(Frame::data(message(i.to_string().as_bytes())))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
            "ClientStream" => {
                let count = received.len().to_string();
                let _ = tx.send(Frame::data(message(count.as_bytes()))).await;
            }
            "Check" => {
                // HealthCheckResponse { status: SERVING (1) | NOT_SERVING (2) }
                let status = if serving.load(std::sync::atomic::Ordering::Relaxed) {
                    1
                } else {
                    2
                };
                let _ = tx.send(Frame::data(message(&[0x08, status]))).await;
            }
            "Slow" => {
                tokio::time::sleep(Duration::from_secs(3)).await;
                let _ = tx.send(Frame::data(message(b"late"))).await;
            }
            _ => {}
        }
        let _ = tx.send(Frame::trailers(ok_trailers())).await;
    });
    Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .body(Body::new(ChannelBody(rx)))
        .expect("response")
}

impl Backend {
    async fn start() -> Self {
        let seen_timeout = Arc::new(Mutex::new(None));
        let serving = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (seen, up) = (seen_timeout.clone(), serving.clone());
        let app = axum::Router::new().fallback(move |req: Request<Body>| {
            let (seen, up) = (seen.clone(), up.clone());
            async move { serve_call(req, seen, up).await }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            seen_timeout,
            serving,
        }
    }
}

/// One gRPC call's answer.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: HeaderMap,
    messages: Vec<Bytes>,
    /// The trailers, or for a trailers-only answer the headers.
    grpc_status: Option<String>,
    grpc_message: Option<String>,
}

type Sender = hyper::client::conn::http2::SendRequest<ChannelBody>;

async fn h2c(addr: SocketAddr) -> Sender {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2c handshake");
    tokio::spawn(conn);
    sender
}

async fn h2_tls(addr: SocketAddr, pki: &Pki, name: &str) -> Sender {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der()).expect("root");
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string()).expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(server_name, tcp)
        .await
        .expect("tls handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    sender
}

/// Read the rest of an answer.
async fn finish(resp: hyper::Response<hyper::body::Incoming>) -> Answer {
    use http_body_util::BodyExt;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut trailers = None;
    let trailers_only = headers.contains_key("grpc-status");
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("frame in time")
    {
        // After a trailers-only answer (its headers end the stream), a reset of the stream is
        // no error: gRPC clients read the status from those headers (the gateway resets a
        // stream it answered after a failed upstream attempt).
        let frame = match frame {
            Err(e) if trailers_only => {
                eprintln!("reset after a trailers-only answer: {e}");
                break;
            }
            f => f.expect("frame"),
        };
        match frame.into_data() {
            Ok(d) => {
                buf.extend_from_slice(&d);
                out.extend(messages(&mut buf));
            }
            Err(f) => trailers = f.into_trailers().ok(),
        }
    }
    let from = trailers.as_ref().unwrap_or(&headers);
    let get = |k: &str| {
        from.get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    Answer {
        status,
        grpc_status: get("grpc-status"),
        grpc_message: get("grpc-message"),
        headers,
        messages: out,
    }
}

/// A unary-shaped call: send `msgs`, end the request, read the answer.
async fn call(
    sender: &mut Sender,
    authority: &str,
    path: &str,
    msgs: &[&[u8]],
    headers: &[(&str, &str)],
) -> Answer {
    let (tx, rx) = mpsc::channel(64);
    for m in msgs {
        tx.send(Frame::data(message(m))).await.expect("queue");
    }
    drop(tx);
    let mut req = Request::post(format!("http://{authority}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    sender.ready().await.expect("ready");
    let resp = tokio::time::timeout(
        Duration::from_secs(10),
        sender.send_request(req.body(ChannelBody(rx)).expect("request")),
    )
    .await
    .expect("answer in time")
    .expect("answer");
    finish(resp).await
}

fn gateway_body(backend: SocketAddr) -> String {
    format!(
        "tiers:\n  anonymous: {{ limit: 100000, window: 1m }}\nconsumers:\n  - {{ id: svc, tier: pro, api_keys: [\"{}\"] }}\nupstreams:\n  grpc:\n    backends: [{{ addr: \"{backend}\" }}]\n    protocol: http2\n    retries: {{ attempts: 1 }}\n    timeouts: {{ read: 5s, total: 1s }}\n  down:\n    backends: [{{ addr: \"127.0.0.1:1\" }}]\n    protocol: http2\n    retries: {{ attempts: 1 }}\nroutes:\n  - {{ name: secure, match: {{ path_prefix: /test.Secure }}, upstream: grpc, auth: required }}\n  - {{ name: limited, match: {{ path_prefix: /test.Limited }}, upstream: grpc, rate_limit: {{ limits: {{ anonymous: {{ limit: 1, window: 1m }} }} }} }}\n  - {{ name: down, match: {{ path_prefix: /test.Down }}, upstream: down }}\n  - {{ name: echo, match: {{ path_prefix: /test.Echo }}, upstream: grpc, grpc_web: true }}\n",
        "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    )
}

async fn start_gateway(backend: &Backend, pki: &Pki) -> Gateway {
    let leaf = pki.leaf("grpc", &["grpc.test"]);
    let body = format!(
        "tls:\n  certificates:\n    - {{ name: grpc, cert_file: \"{}\", key_file: \"{}\" }}\n{}",
        leaf.cert.display(),
        leaf.key.display(),
        gateway_body(backend.addr)
    );
    Gateway::start_with(
        &body,
        "  body_timeout: 1s\n  listen_tls:\n    - { addr: \"127.0.0.1:{tls}\" }\n",
    )
    .await
}

/// The four call kinds, over one connection.
async fn four_kinds(sender: &mut Sender, authority: &str) {
    let a = call(sender, authority, "/test.Echo/Unary", &[b"hi"], &[]).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.grpc_status.as_deref(), Some("0"), "{a:?}");
    assert_eq!(a.messages, vec![Bytes::from_static(b"echo:hi")]);

    // Server streaming for longer than the route's total timeout (1 s): never cut.
    let started = Instant::now();
    let a = call(sender, authority, "/test.Echo/ServerStream", &[b"15"], &[]).await;
    assert_eq!(a.grpc_status.as_deref(), Some("0"), "{a:?}");
    assert_eq!(a.messages.len(), 15);
    assert!(started.elapsed() > Duration::from_secs(1));

    // Client streaming for longer than server.body_timeout (1 s): never cut.
    let (tx, rx) = mpsc::channel(64);
    let mut req_sender = sender.clone();
    let path = format!("http://{authority}/test.Echo/ClientStream");
    let pending = tokio::spawn(async move {
        let req = Request::post(path)
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(ChannelBody(rx))
            .expect("request");
        req_sender.ready().await.expect("ready");
        let resp = req_sender.send_request(req).await.expect("answer");
        finish(resp).await
    });
    for i in 0..12 {
        tx.send(Frame::data(message(format!("m{i}").as_bytes())))
            .await
            .expect("send");
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    drop(tx);
    let a = pending.await.expect("client stream");
    assert_eq!(a.grpc_status.as_deref(), Some("0"), "{a:?}");
    assert_eq!(a.messages, vec![Bytes::from_static(b"12")]);

    // Bidirectional: each message is echoed before the next is sent.
    let (tx, resp) = {
        let (tx, rx) = mpsc::channel(64);
        tx.send(Frame::data(message(b"first"))).await.expect("send");
        let req = Request::post(format!("http://{authority}/test.Echo/Bidi"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(ChannelBody(rx))
            .expect("request");
        sender.ready().await.expect("ready");
        let resp = sender.send_request(req).await.expect("answer head");
        (tx, resp)
    };
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    for next in ["second", "third", ""] {
        use http_body_util::BodyExt;
        let got = loop {
            let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .expect("echo in time")
                .expect("a frame")
                .expect("frame");
            if let Ok(d) = frame.into_data() {
                buf.extend_from_slice(&d);
                if let Some(m) = messages(&mut buf).pop() {
                    break m;
                }
            }
        };
        assert!(got.starts_with(b"echo:"), "{got:?}");
        if next.is_empty() {
            break;
        }
        tx.send(Frame::data(message(next.as_bytes())))
            .await
            .expect("send");
    }
    drop(tx);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_four_call_kinds_pass_over_h2c_and_tls() {
    let backend = Backend::start().await;
    let pki = Pki::new();
    let gw = start_gateway(&backend, &pki).await;
    let plain: SocketAddr = format!("127.0.0.1:{}", gw.port).parse().expect("addr");
    let mut sender = h2c(plain).await;
    four_kinds(&mut sender, &plain.to_string()).await;
    let tls: SocketAddr = format!("127.0.0.1:{}", gw.tls_port).parse().expect("addr");
    let mut sender = h2_tls(tls, &pki, "grpc.test").await;
    four_kinds(&mut sender, "grpc.test").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_own_answers_are_grpc_statuses() {
    let backend = Backend::start().await;
    let pki = Pki::new();
    let gw = start_gateway(&backend, &pki).await;
    let addr: SocketAddr = format!("127.0.0.1:{}", gw.port).parse().expect("addr");
    let authority = addr.to_string();
    let mut s = h2c(addr).await;
    for (path, headers, want) in [
        ("/test.Down/Call", vec![], "14"),     // 502: UNAVAILABLE
        ("/other.Service/Call", vec![], "12"), // no route: UNIMPLEMENTED
        ("/test.Secure/Call", vec![], "16"),   // 401: UNAUTHENTICATED
        (
            "/test.Secure/Call",
            vec![("x-api-key", "wrong-key-123")],
            "16",
        ),
    ] {
        let a = call(&mut s, &authority, path, &[b"x"], &headers).await;
        assert_eq!(a.status, 200, "{path}: {a:?}");
        assert_eq!(a.grpc_status.as_deref(), Some(want), "{path}: {a:?}");
        assert!(a.messages.is_empty());
        assert!(a.grpc_message.is_some(), "{a:?}");
        assert_eq!(
            a.headers.get("content-type").map(|v| v.as_bytes()),
            Some(&b"application/grpc"[..])
        );
        assert!(
            a.headers.contains_key("grpc-status"),
            "trailers-only: {a:?}"
        );
    }
    // 429: RESOURCE_EXHAUSTED, with the rate-limit fields.
    let first = call(&mut s, &authority, "/test.Limited/Unary", &[b"x"], &[]).await;
    assert_eq!(first.grpc_status.as_deref(), Some("0"), "{first:?}");
    let second = call(&mut s, &authority, "/test.Limited/Unary", &[b"x"], &[]).await;
    assert_eq!(second.grpc_status.as_deref(), Some("8"), "{second:?}");
    assert!(second.headers.contains_key("retry-after"));
    // A plain HTTP client on the same route still gets JSON.
    let r = http()
        .get(gw.url("/other.Service/Call"))
        .send()
        .await
        .expect("json");
    assert_eq!(r.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_is_the_calls_deadline_and_travels_on() {
    let backend = Backend::start().await;
    let pki = Pki::new();
    let gw = start_gateway(&backend, &pki).await;
    let addr: SocketAddr = format!("127.0.0.1:{}", gw.port).parse().expect("addr");
    let authority = addr.to_string();
    let mut s = h2c(addr).await;
    let started = Instant::now();
    let a = call(
        &mut s,
        &authority,
        "/test.Echo/Slow",
        &[b"x"],
        &[("grpc-timeout", "300m")],
    )
    .await;
    let took = started.elapsed();
    assert_eq!(
        a.grpc_status.as_deref(),
        Some("4"),
        "DEADLINE_EXCEEDED: {a:?}"
    );
    assert!(took < Duration::from_secs(2), "answered after {took:?}");
    let seen = backend
        .seen_timeout
        .lock()
        .expect("lock")
        .clone()
        .expect("forwarded");
    let ms: u64 = seen.trim_end_matches('m').parse().expect("ms");
    assert!(ms <= 300 && seen.ends_with('m'), "{seen}");
    // A malformed timeout is ignored (the call runs under the route's timeouts).
    let a = call(
        &mut s,
        &authority,
        "/test.Echo/Unary",
        &[b"y"],
        &[("grpc-timeout", "soon")],
    )
    .await;
    assert_eq!(a.grpc_status.as_deref(), Some("0"), "{a:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_health_check_takes_a_not_serving_backend_out() {
    let backend = Backend::start().await;
    let gw = Gateway::start(&format!(
        "upstreams:\n  grpc:\n    backends: [{{ addr: \"{}\" }}]\n    protocol: http2\n    health_check: {{ type: grpc, interval: 200ms, timeout: 1s, unhealthy_after: 1, healthy_after: 1 }}\nroutes:\n  - {{ name: echo, upstream: grpc }}\n",
        backend.addr
    ))
    .await;
    let addr: SocketAddr = format!("127.0.0.1:{}", gw.port).parse().expect("addr");
    let authority = addr.to_string();
    let mut s = h2c(addr).await;
    let a = call(&mut s, &authority, "/test.Echo/Unary", &[b"x"], &[]).await;
    assert_eq!(a.grpc_status.as_deref(), Some("0"), "{a:?}");
    backend
        .serving
        .store(false, std::sync::atomic::Ordering::Relaxed);
    eventually(
        Duration::from_secs(10),
        "the backend marked unhealthy",
        || async {
            (gw.backend_field("healthy").await == vec![serde_json::Value::Bool(false)])
                .then_some(())
        },
    )
    .await;
    let a = call(&mut s, &authority, "/test.Echo/Unary", &[b"x"], &[]).await;
    assert_eq!(a.grpc_status.as_deref(), Some("14"), "UNAVAILABLE: {a:?}");
    backend
        .serving
        .store(true, std::sync::atomic::Ordering::Relaxed);
    eventually(
        Duration::from_secs(10),
        "the backend healthy again",
        || async {
            (gw.backend_field("healthy").await == vec![serde_json::Value::Bool(true)]).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_web_calls_are_bridged_to_the_grpc_backend() {
    let backend = Backend::start().await;
    let pki = Pki::new();
    let gw = start_gateway(&backend, &pki).await;
    let r = http()
        .post(gw.url("/test.Echo/Unary"))
        .header("content-type", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(message(b"web"))
        .send()
        .await
        .expect("grpc-web");
    assert_eq!(r.status(), 200);
    let ct = r.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(ct.starts_with("application/grpc-web"), "{ct}");
    let body = r.bytes().await.expect("body");
    let mut buf = BytesMut::from(&body[..]);
    // A data frame, then the trailers as a frame flagged 0x80.
    let first = messages(&mut BytesMut::from(&buf[..buf.len()]));
    assert_eq!(
        first.first().map(|m| &m[..]),
        Some(&b"echo:web"[..]),
        "{body:?}"
    );
    let data_len = 5 + first[0].len();
    buf.advance(data_len);
    assert_eq!(buf.first(), Some(&0x80), "{body:?}");
    let trailers = String::from_utf8_lossy(&buf[5..]).to_ascii_lowercase();
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
}
