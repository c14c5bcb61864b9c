//! Fields Tollgate adds to responses it forwards or serves from cache (X-Request-Id, the
//! rate-limit fields).
//!
//! pingora's `ResponseHeader::insert_header` parses the name again on every call (a custom name
//! is copied to the heap, then shared once more for a second map) and keeps that second map of
//! the names' original spelling, which cannot be sized in advance: the cost of each added field
//! is compared in the `limit/fields_canonical` and `limit/fields_preserve_case` criterion
//! benches (`cargo bench --bench hot_path -- limit/fields`). By default ([`Case::Canonical`]) the added fields go straight into the header map
//! under names made once at compile time, and the response loses its spelling map: pingora then
//! writes a dozen common field names capitalised (`Content-Type`, `Content-Length`, `Date`,
//! `Server`, `Cache-Control`, ...) and every other name in lowercase — what HTTP/2 requires
//! anyway, and what HAProxy and Envoy do for HTTP/1.
//! Field names are case-insensitive (RFC 9110 §5.1). [`Case::Preserve`]
//! (`server.preserve_header_case: true`) keeps the backend's spelling and Tollgate's own
//! (`RateLimit-Policy`) through pingora's insert, at that cost.

use http::{HeaderName, HeaderValue};
use pingora_error::Result;
use pingora_http::ResponseHeader;

/// A field Tollgate adds: its documented spelling and its header-map key.
#[derive(Debug)]
pub struct Field {
    /// Written as is with [`Case::Preserve`].
    pub spelled: &'static str,
    /// The lowercase key, made once.
    pub name: HeaderName,
}

impl Field {
    /// `lower` must be `spelled` in lowercase (checked by a test for every field).
    pub const fn new(spelled: &'static str, lower: &'static str) -> Self {
        Self {
            spelled,
            name: HeaderName::from_static(lower),
        }
    }
}

pub static REQUEST_ID: Field = Field::new("X-Request-Id", "x-request-id");
pub static RATELIMIT_POLICY: Field = Field::new("RateLimit-Policy", "ratelimit-policy");
pub static RATELIMIT: Field = Field::new("RateLimit", "ratelimit");
pub static X_RATELIMIT_LIMIT: Field = Field::new("X-RateLimit-Limit", "x-ratelimit-limit");
pub static X_RATELIMIT_REMAINING: Field =
    Field::new("X-RateLimit-Remaining", "x-ratelimit-remaining");
pub static X_RATELIMIT_RESET: Field = Field::new("X-RateLimit-Reset", "x-ratelimit-reset");
pub static RETRY_AFTER: Field = Field::new("Retry-After", "retry-after");
pub static HSTS: Field = Field::new("Strict-Transport-Security", "strict-transport-security");

/// Every field above (for the spelling test and documentation).
pub static ALL: [&Field; 8] = [
    &REQUEST_ID,
    &RATELIMIT_POLICY,
    &RATELIMIT,
    &X_RATELIMIT_LIMIT,
    &X_RATELIMIT_REMAINING,
    &X_RATELIMIT_RESET,
    &RETRY_AFTER,
    &HSTS,
];

/// How response field names are written (`server.preserve_header_case`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Case {
    /// A dozen common names capitalised, others lowercase; added fields cost a map insert.
    Canonical,
    /// The backend's spelling kept, Tollgate's fields spelled as documented.
    Preserve,
}

/// Adds fields to one response. With [`Case::Canonical`], the first field turns the response
/// into its plain parts (dropping the spelling map) and the last one — on drop — turns it back;
/// a response that gets no field is left as it came.
pub struct Adder<'a> {
    resp: &'a mut ResponseHeader,
    case: Case,
    /// The most fields that will be added: the map grows once for all of them.
    at_most: usize,
    /// `Canonical`, once a field was added: the parts being filled, and the backend's reason
    /// phrase when it is not the standard one (the conversion drops it).
    open: Option<(http::response::Parts, Option<String>)>,
    error: Option<pingora_error::BError>,
}

impl<'a> Adder<'a> {
    pub fn new(resp: &'a mut ResponseHeader, case: Case, at_most: usize) -> Self {
        Self {
            resp,
            case,
            at_most,
            open: None,
            error: None,
        }
    }

    /// Set `field` to `value`, replacing any value the response had for it.
    pub fn insert(&mut self, field: &Field, value: HeaderValue) {
        match self.case {
            Case::Preserve => {
                if let Err(e) = self.resp.insert_header(field.spelled, value) {
                    self.error.get_or_insert(e);
                }
            }
            Case::Canonical => {
                let at_most = self.at_most;
                let (parts, _) = self.open.get_or_insert_with(|| {
                    let reason = self
                        .resp
                        .get_reason_phrase()
                        .filter(|r| Some(*r) != self.resp.status.canonical_reason())
                        .map(str::to_owned);
                    let placeholder = ResponseHeader::from(http::Response::new(()).into_parts().0);
                    let mut parts =
                        http::response::Parts::from(std::mem::replace(self.resp, placeholder));
                    // The map grows once for every field to come; a failed reservation (past
                    // the map's maximum size) is left to the insert below.
                    let _ = parts.headers.try_reserve(at_most);
                    (parts, reason)
                });
                if let Err(e) = parts.headers.try_insert(field.name.clone(), value) {
                    self.error.get_or_insert(pingora_error::Error::because(
                        pingora_error::ErrorType::InvalidHTTPHeader,
                        "adding a response field",
                        e,
                    ));
                }
            }
        }
    }

    /// Put the response back and report the first failure, if any.
    pub fn finish(mut self) -> Result<()> {
        self.close();
        self.error.take().map_or(Ok(()), Err)
    }

    fn close(&mut self) {
        if let Some((parts, reason)) = self.open.take() {
            *self.resp = ResponseHeader::from(parts);
            if let Some(reason) = reason {
                // Never fails: pingora stores the phrase as given.
                let _ = self.resp.set_reason_phrase(Some(&reason));
            }
        }
    }
}

impl Drop for Adder<'_> {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream_response() -> ResponseHeader {
        let mut r = ResponseHeader::build(201, Some(2)).expect("build");
        r.append_header("X-Backend-Thing", "a").expect("append");
        r.append_header("Content-Type", "text/plain")
            .expect("append");
        r.append_header("X-Request-Id", "from-backend")
            .expect("append");
        r.set_reason_phrase(Some("Made It")).expect("reason");
        r
    }

    fn wire(r: &ResponseHeader) -> String {
        let mut buf = bytes::BytesMut::new();
        r.header_to_h1_wire(&mut buf);
        String::from_utf8(buf.to_vec()).expect("utf8")
    }

    fn add_three(r: &mut ResponseHeader, case: Case) {
        let mut a = Adder::new(r, case, 3);
        a.insert(&REQUEST_ID, HeaderValue::from_static("ours"));
        a.insert(&RATELIMIT, HeaderValue::from_static("\"t\";r=1;t=2"));
        a.insert(&RETRY_AFTER, HeaderValue::from_static("3"));
        a.finish().expect("finish");
    }

    #[test]
    fn every_field_key_is_its_spelling_in_lowercase() {
        for f in ALL {
            assert_eq!(
                f.name.as_str(),
                f.spelled.to_ascii_lowercase(),
                "{}",
                f.spelled
            );
        }
    }

    /// The backend's response after `add_three` in `case`, on the wire; checks what both
    /// spellings share: status, reason phrase, one value per field.
    fn added_in(case: Case) -> String {
        let mut r = upstream_response();
        add_three(&mut r, case);
        assert_eq!(r.status.as_u16(), 201);
        assert_eq!(r.get_reason_phrase(), Some("Made It"));
        let ids: Vec<_> = r.headers.get_all("x-request-id").iter().collect();
        assert_eq!(ids, ["ours"], "the backend's value is replaced");
        assert_eq!(r.headers["x-backend-thing"], "a");
        assert_eq!(r.headers.len(), 5);
        wire(&r)
    }

    #[test]
    fn canonical_case_writes_common_names_capitalised_and_the_rest_lowercase() {
        let w = added_in(Case::Canonical);
        for line in [
            "x-backend-thing: a\r\n",
            "Content-Type: text/plain\r\n",
            "x-request-id: ours\r\n",
            "ratelimit: \"t\";r=1;t=2\r\n",
            "retry-after: 3\r\n",
        ] {
            assert!(w.contains(line), "{line:?} in {w:?}");
        }
    }

    #[test]
    fn preserved_case_keeps_every_spelling() {
        let w = added_in(Case::Preserve);
        let want = "X-Backend-Thing: a\r\nContent-Type: text/plain\r\nX-Request-Id: ours\r\n\
            RateLimit: \"t\";r=1;t=2\r\nRetry-After: 3\r\n";
        assert_eq!(w, want);
    }

    #[test]
    fn a_response_given_no_field_is_left_as_it_came() {
        let mut r = upstream_response();
        Adder::new(&mut r, Case::Canonical, 3)
            .finish()
            .expect("finish");
        assert!(r.has_case());
        assert!(wire(&r).contains("X-Backend-Thing: a\r\n"));
    }

    #[test]
    fn a_standard_reason_phrase_stays_standard() {
        let mut r = ResponseHeader::build(404, None).expect("build");
        add_three(&mut r, Case::Canonical);
        assert_eq!(r.get_reason_phrase(), Some("Not Found"));
    }
}
