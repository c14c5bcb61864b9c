//! `GET /admin/dashboard`: one self-contained page compiled into the binary. It holds no data
//! (so it is served without the admin token); its script polls `GET /admin/stats` every second
//! with the token the operator types in, kept in `sessionStorage` and sent as a bearer header.
//!
//! The page is served with a Content-Security-Policy that allows exactly its own inline style
//! and script (by SHA-256), requests to this origin only, and no framing: it can load nothing
//! from elsewhere, and an injected script would not run.

use std::sync::LazyLock;

use base64::Engine;
use http::Response;
use sha2::{Digest, Sha256};

pub const HTML: &str = include_str!("dashboard.html");

/// The text between the first `open` tag and the following `close` tag.
fn inline_block<'a>(html: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let start = html.find(open)? + open.len();
    let len = html[start..].find(close)?;
    Some(&html[start..start + len])
}

fn source_hash(block: Option<&str>) -> String {
    match block {
        Some(text) => format!(
            "'sha256-{}'",
            base64::engine::general_purpose::STANDARD.encode(Sha256::digest(text.as_bytes()))
        ),
        None => "'none'".to_string(),
    }
}

static CSP: LazyLock<String> = LazyLock::new(|| {
    format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src data:; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        source_hash(inline_block(HTML, "<script>", "</script>")),
        source_hash(inline_block(HTML, "<style>", "</style>")),
    )
});

pub fn response() -> Response<Vec<u8>> {
    let body = HTML.as_bytes().to_vec();
    Response::builder()
        .status(200)
        .header("Content-Type", "text/html; charset=utf-8")
        .header("Content-Length", body.len())
        .header("Content-Security-Policy", CSP.as_str())
        .header("X-Content-Type-Options", "nosniff")
        .header("Referrer-Policy", "no-referrer")
        .header("Cache-Control", "no-store")
        .body(body)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_has_one_inline_script_and_style_both_hashed() {
        assert_eq!(HTML.matches("<script").count(), 1);
        assert_eq!(HTML.matches("<style").count(), 1);
        assert!(!CSP.contains("'none'; style-src 'none'"));
        assert_eq!(CSP.matches("'sha256-").count(), 2);
        assert!(!HTML.contains("http://") && !HTML.contains("https://"));
    }
}
