//! A few thousand mutated requests through a running gateway to a raw recording upstream: no
//! panic, no 5xx caused by a request, and never more requests reaching the upstream than the
//! gateway answered (a smuggled second request on one upstream connection would show up there).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, TestRng, TestRunner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

const BASES: [&[u8]; 4] = [
    b"GET /x?a=1 HTTP/1.1\r\nHost: gw\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /x HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\nGET /x HTTP/1.1\r\nHost: gw\r\n\r\n",
];

/// Insertions that target framing and parsing.
const NASTY: [&[u8]; 14] = [
    b"\r\nTransfer-Encoding: chunked",
    b"\r\nContent-Length: 3",
    b"\r\nContent-Length: 5, 6",
    b"\r\nTransfer-Encoding: gzip, chunked",
    b"\r\nTransfer-Encoding : chunked",
    b"\r\n Folded: value",
    b"\x00",
    b"\r",
    b"\n",
    b" ",
    b"\r\nHost: other",
    b"\r\nX_Consumer_Id: root",
    b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: gw\r\n\r\n",
    b"\r\nExpect: 100-continue",
];

fn mutation() -> impl Strategy<Value = Vec<u8>> {
    (
        0..BASES.len(),
        proptest::collection::vec(
            (
                any::<prop::sample::Index>(),
                0..NASTY.len() + 3,
                any::<u8>(),
            ),
            1..4,
        ),
    )
        .prop_map(|(base, edits)| {
            let mut r = BASES[base].to_vec();
            for (at, kind, byte) in edits {
                let i = at.index(r.len() + 1);
                match kind {
                    k if k < NASTY.len() => {
                        let tail = r.split_off(i);
                        r.extend_from_slice(NASTY[k]);
                        r.extend_from_slice(&tail);
                    }
                    k if k == NASTY.len() => {
                        if i < r.len() {
                            r[i] = byte;
                        }
                    }
                    k if k == NASTY.len() + 1 => {
                        if i < r.len() {
                            r.remove(i);
                        }
                    }
                    _ => r.insert(i.min(r.len()), byte),
                }
            }
            r
        })
}

/// Send raw bytes, read whatever comes back until the gateway closes or goes quiet. (No
/// half-close: like NGINX, pingora takes a client's FIN as the client going away.) The first
/// answer may take up to the 2 s header/body deadlines (and a loaded machine); after it, 600 ms
/// without a byte ends the exchange (a pipelined second answer comes well within that).
async fn exchange(port: u16, bytes: &[u8]) -> Vec<u8> {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await else {
        return Vec::new();
    };
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let quiet = if out.is_empty() {
            Duration::from_secs(4)
        } else {
            Duration::from_millis(600)
        };
        match tokio::time::timeout(quiet, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => return out,
        }
    }
}

fn statuses(resp: &[u8]) -> Vec<u16> {
    let mut found = Vec::new();
    let mut rest = resp;
    while let Some(i) = rest.windows(9).position(|w| w == b"HTTP/1.1 ") {
        let code = std::str::from_utf8(&rest[i + 9..(i + 12).min(rest.len())])
            .ok()
            .and_then(|c| c.parse().ok());
        if let Some(c) = code {
            found.push(c);
        }
        rest = &rest[i + 9..];
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_requests_never_confuse_the_gateway() {
    let upstream = RecordingUpstream::start().await;
    let addr = upstream.addr;
    let body = format!(
        "upstreams:\n  u:\n    backends: [{{ addr: \"{addr}\" }}]\n    retries: {{ attempts: 1 }}\n    timeouts: {{ read: 3s, total: 4s }}\nroutes:\n  - {{ name: r, upstream: u }}\n"
    );
    let gw = Gateway::start_with(&body, "  header_timeout: 2s\n  body_timeout: 1s\n").await;
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha),
    );
    let strategy = mutation();
    let cases: Vec<Vec<u8>> = (0..2000)
        .map(|_| strategy.new_tree(&mut runner).expect("case").current())
        .collect();
    let answered_ok = Arc::new(AtomicUsize::new(0));
    let bad = Arc::new(std::sync::Mutex::new(Vec::new()));
    let port = gw.port;
    let mut tasks = Vec::new();
    for group in cases.chunks(20) {
        let group = group.to_vec();
        let (answered_ok, bad) = (answered_ok.clone(), bad.clone());
        tasks.push(tokio::spawn(async move {
            for case in group {
                let resp = exchange(port, &case).await;
                for code in statuses(&resp) {
                    if (200..300).contains(&code) {
                        answered_ok.fetch_add(1, Ordering::SeqCst);
                    } else if code >= 500 {
                        bad.lock()
                            .expect("lock")
                            .push((code, String::from_utf8_lossy(&case).into_owned()));
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let bad = bad.lock().expect("lock").clone();
    assert!(
        bad.is_empty(),
        "{} requests got a 5xx, e.g. {:?}",
        bad.len(),
        &bad[..bad.len().min(3)]
    );
    // Every request the upstream parsed was answered to a client: nothing was smuggled.
    let parsed = upstream.requests();
    let ok = answered_ok.load(Ordering::SeqCst);
    assert!(
        parsed <= ok,
        "the upstream parsed {parsed} requests but clients got {ok} answers"
    );
    assert!(
        ok > 200,
        "too few requests got through ({ok}): the test is not exercising the proxy"
    );
    // Still alive, and no panic anywhere.
    assert!(gw.status().await.is_some(), "the gateway died");
    assert!(!gw.log().contains("panicked"), "a panic was logged");
}
