//! DNS names as certificates and SNI carry them: compared without case and without a trailing
//! dot; a wildcard (`*.example.com`) stands for exactly one leftmost label (RFC 6125 §6.4.3),
//! so it covers `api.example.com` but neither `example.com` nor `a.b.example.com`.

/// Lowercase ASCII, trailing dot removed.
pub fn normalize_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Whether a certificate valid for `names` (normalised) covers `host`: exactly, or through a
/// wildcard. A wildcard host (`*.example.com`, a route pattern) is covered only by the same
/// wildcard.
pub fn covers(names: &[String], host: &str) -> bool {
    let host = normalize_name(host);
    names.iter().any(|n| {
        *n == host
            || match (n.strip_prefix("*."), host.split_once('.')) {
                (Some(parent), Some((label, rest))) => {
                    !label.is_empty() && label != "*" && rest == parent
                }
                _ => false,
            }
    })
}
