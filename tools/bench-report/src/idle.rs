//! `idle-connections`: open N keep-alive connections to a proxy, one request each, and hold
//! them idle until standard input closes, so the caller can read the proxy's memory with N
//! idle connections open (issue: memory per idle keep-alive connection).

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// One request on a fresh connection, its answer read whole; the connection is returned open.
fn one(addr: SocketAddr, request: &[u8]) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(request).map_err(|e| format!("write: {e}"))?;
    let mut got = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("the proxy closed the connection".into());
        }
        got.extend_from_slice(&chunk[..n]);
        if let Some(done) = complete(&got) {
            if !done.starts_with("HTTP/1.1 2") {
                return Err(format!("not a 2xx answer: {done}"));
            }
            return Ok(s);
        }
    }
}

/// The status line once the response in `got` is complete (head, and a Content-Length or
/// chunked body).
fn complete(got: &[u8]) -> Option<String> {
    let end = got.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
    let status = head.lines().next().unwrap_or_default().to_uppercase();
    let body = &got[end..];
    if head.contains("transfer-encoding: chunked") {
        return body.ends_with(b"0\r\n\r\n").then_some(status);
    }
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    (body.len() >= length).then_some(status)
}

/// Open `count` connections to `addr` (one request each, with `headers` as extra lines), print
/// `ready COUNT` and hold them until standard input reaches its end.
pub fn run(addr: &str, count: usize, headers: &[String]) -> Result<String, String> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|_| format!("idle-connections: not an address: {addr:?}"))?;
    let mut request = String::from("GET / HTTP/1.1\r\nHost: bench\r\n");
    for h in headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    let mut open = Vec::with_capacity(count);
    for i in 0..count {
        open.push(one(addr, request.as_bytes()).map_err(|e| format!("connection {}: {e}", i + 1))?);
    }
    println!("ready {}", open.len());
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let mut line = String::new();
    let stdin = std::io::stdin();
    while stdin
        .lock()
        .read_line(&mut line)
        .map_err(|e| e.to_string())?
        > 0
    {
        line.clear();
    }
    drop(open);
    Ok(String::new())
}

#[cfg(test)]
mod tests {
    use super::complete;

    #[test]
    fn responses_are_complete_by_length_or_last_chunk() {
        assert_eq!(
            complete(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel"),
            None
        );
        assert_eq!(
            complete(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello").as_deref(),
            Some("HTTP/1.1 200 OK")
        );
        assert_eq!(
            complete(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
                .as_deref(),
            None
        );
        assert!(complete(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        .is_some());
        assert!(complete(b"HTTP/1.1 200 OK\r\nContent-Le").is_none());
    }
}
