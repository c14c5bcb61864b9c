//! gRPC over HTTP/2, as far as a gateway must know it (the gRPC "PROTOCOL-HTTP2" spec): which
//! requests are gRPC calls, the `grpc-timeout` deadline, and the status code of an answer the
//! gateway gives itself. Messages themselves are never looked at.

use std::time::Duration;

use http::HeaderMap;

/// A gRPC call: `content-type: application/grpc` or `application/grpc+<codec>` (not
/// `grpc-web`, which the gRPC-web bridge turns into this).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(http::header::CONTENT_TYPE) else {
        return false;
    };
    let b = ct.as_bytes();
    b.len() >= 16
        && b[..16].eq_ignore_ascii_case(b"application/grpc")
        && matches!(b.get(16), None | Some(b'+') | Some(b';'))
}

/// `grpc-timeout`: 1 to 8 ASCII digits and a unit (`H`, `M`, `S`, `m`, `u`, `n`). `None` for
/// anything else (a malformed timeout is ignored, as gRPC servers do).
pub fn parse_timeout(text: &str) -> Option<Duration> {
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `d` as a `grpc-timeout` value, in whole milliseconds (at least 1).
pub fn format_timeout(d: Duration) -> String {
    format!("{}m", d.as_millis().clamp(1, 99_999_999))
}

/// gRPC status codes the gateway answers with.
pub mod status {
    pub const DEADLINE_EXCEEDED: u8 = 4;
    pub const PERMISSION_DENIED: u8 = 7;
    pub const RESOURCE_EXHAUSTED: u8 = 8;
    pub const UNIMPLEMENTED: u8 = 12;
    pub const INTERNAL: u8 = 13;
    pub const UNAVAILABLE: u8 = 14;
    pub const UNAUTHENTICATED: u8 = 16;
}

/// The gRPC status of a gateway answer that would have had HTTP status `http_status`.
pub fn status_for(http_status: u16) -> u8 {
    match http_status {
        401 => status::UNAUTHENTICATED,
        403 => status::PERMISSION_DENIED,
        404 => status::UNIMPLEMENTED,
        413 | 414 | 429 | 431 => status::RESOURCE_EXHAUSTED,
        408 | 504 => status::DEADLINE_EXCEEDED,
        502 | 503 => status::UNAVAILABLE,
        _ => status::INTERNAL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse_by_the_spec() {
        assert_eq!(parse_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "100", "123456789m", "1.5S", "-1S", "10x", "１S"] {
            assert_eq!(parse_timeout(bad), None, "{bad:?}");
        }
        assert_eq!(format_timeout(Duration::from_micros(10)), "1m");
        assert_eq!(format_timeout(Duration::from_millis(1500)), "1500m");
    }

    #[test]
    fn grpc_calls_are_told_by_their_content_type() {
        let with = |ct: &str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::CONTENT_TYPE, ct.parse().expect("value"));
            is_grpc(&h)
        };
        assert!(with("application/grpc"));
        assert!(with("application/grpc+proto"));
        assert!(with("Application/GRPC;charset=utf-8"));
        assert!(!with("application/grpc-web"));
        assert!(!with("application/grpc-web+proto"));
        assert!(!with("application/json"));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn gateway_answers_map_to_grpc_statuses() {
        assert_eq!(status_for(404), status::UNIMPLEMENTED);
        assert_eq!(status_for(401), status::UNAUTHENTICATED);
        assert_eq!(status_for(403), status::PERMISSION_DENIED);
        assert_eq!(status_for(429), status::RESOURCE_EXHAUSTED);
        assert_eq!(status_for(503), status::UNAVAILABLE);
        assert_eq!(status_for(504), status::DEADLINE_EXCEEDED);
        assert_eq!(status_for(500), status::INTERNAL);
    }
}
