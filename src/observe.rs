//! Request identity for operators: the request id (a valid incoming `X-Request-Id` is kept,
//! otherwise a UUIDv7 is made), W3C trace context (`traceparent` continued with a new span id,
//! or started; `tracestate` passed through). The access log itself is `access_log`.

/// Longest request id accepted from a client.
pub const MAX_REQUEST_ID: usize = 128;

/// A client-sent request id is kept when it is 1-128 characters of `[A-Za-z0-9._~+/=:-]`.
pub fn valid_request_id(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= MAX_REQUEST_ID
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || b"._~+/=:-".contains(b))
}

/// The request id to use: the client's when valid, else a fresh UUIDv7.
pub fn request_id(incoming: Option<&[u8]>) -> String {
    match incoming {
        Some(v) if valid_request_id(v) => String::from_utf8_lossy(v).into_owned(),
        _ => {
            // Encoded directly (`to_string` goes through the formatting machinery).
            let mut text = uuid::Uuid::encode_buffer();
            uuid::Uuid::now_v7()
                .hyphenated()
                .encode_lower(&mut text)
                .to_owned()
        }
    }
}

/// A parsed `traceparent`, or this hop's trace context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
    /// The caller's span id when this hop continues its trace (`None` when parsed, or when
    /// the trace starts here).
    pub parent: Option<[u8; 8]>,
}

impl TraceParent {
    /// Parse version 00 (`00-<32 hex>-<16 hex>-<2 hex>`); all-zero ids are invalid.
    pub fn parse(v: &[u8]) -> Option<Self> {
        let s = std::str::from_utf8(v).ok()?.trim();
        let mut parts = s.split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() && version == "00" {
            return None;
        }
        if version.len() != 2
            || version == "ff"
            || trace.len() != 32
            || span.len() != 16
            || flags.len() != 2
        {
            return None;
        }
        if !version
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        let mut flag = [0u8; 1];
        let lower = |x: &str| !x.bytes().any(|b| b.is_ascii_uppercase());
        if !(lower(trace) && lower(span) && lower(flags)) {
            return None;
        }
        hex::decode_to_slice(trace, &mut trace_id).ok()?;
        hex::decode_to_slice(span, &mut span_id).ok()?;
        hex::decode_to_slice(flags, &mut flag).ok()?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags: flag[0],
            parent: None,
        })
    }

    /// Continue an incoming trace (new span id for this hop) or start a sampled one.
    pub fn next(incoming: Option<&[u8]>) -> Self {
        let span_id = loop {
            let s: [u8; 8] = rand::random();
            if s != [0; 8] {
                break s;
            }
        };
        match incoming.and_then(Self::parse) {
            Some(caller) => Self {
                span_id,
                parent: Some(caller.span_id),
                ..caller
            },
            None => Self {
                trace_id: loop {
                    let t: [u8; 16] = rand::random();
                    if t != [0; 16] {
                        break t;
                    }
                },
                span_id,
                flags: 1,
                parent: None,
            },
        }
    }

    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex::encode(self.trace_id),
            hex::encode(self.span_id),
            self.flags
        )
    }

    /// The `traceparent` value, built without intermediate strings.
    pub fn header_value(&self) -> http::HeaderValue {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 55];
        out[..3].copy_from_slice(b"00-");
        let mut i = 3;
        for b in self.trace_id.iter().chain(self.span_id.iter()) {
            if i == 35 {
                out[i] = b'-';
                i += 1;
            }
            out[i] = HEX[(b >> 4) as usize];
            out[i + 1] = HEX[(b & 15) as usize];
            i += 2;
        }
        out[52] = b'-';
        out[53] = HEX[(self.flags >> 4) as usize];
        out[54] = HEX[(self.flags & 15) as usize];
        http::HeaderValue::from_bytes(&out).unwrap_or_else(|_| {
            http::HeaderValue::from_static(
                "00-00000000000000000000000000000000-0000000000000000-00",
            )
        })
    }

    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }
}

/// Where access log lines go (the log itself is `access_log`).
pub use crate::access_log::LogTarget;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids() {
        assert_eq!(request_id(Some(b"abc-123")), "abc-123");
        let made = request_id(Some(b"bad id with spaces"));
        assert_eq!(made.len(), 36);
        assert_eq!(
            uuid::Uuid::parse_str(&made).map(|u| u.get_version_num()),
            Ok(7)
        );
        assert_ne!(request_id(None), request_id(None));
        assert!(!valid_request_id(&[b'a'; 129]));
        assert!(!valid_request_id(b"a\r\nb"));
    }

    #[test]
    fn traceparent_parse_and_continue() {
        let tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let parsed = TraceParent::parse(tp).expect("valid");
        assert_eq!(parsed.flags, 1);
        let next = TraceParent::next(Some(tp));
        assert_eq!(next.trace_id, parsed.trace_id);
        assert_ne!(next.span_id, parsed.span_id);
        assert_eq!(next.parent, Some(parsed.span_id));
        assert!(next
            .header()
            .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        for bad in [
            &b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"[..],
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            b"garbage",
        ] {
            assert!(
                TraceParent::parse(bad).is_none(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let fresh = TraceParent::next(None);
        assert_eq!(fresh.parent, None);
        assert_eq!(fresh.header().len(), 55);
        assert_eq!(
            fresh.header_value().to_str().expect("ascii"),
            fresh.header()
        );
        assert!(TraceParent::parse(fresh.header().as_bytes()).is_some());
    }
}
