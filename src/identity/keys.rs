//! API keys: generation (`tollgate key new`), hashing, the stored `sha256:<hex>` form, and the
//! shape check applied to a presented key before any lookup. Keys are looked up by their SHA-256
//! digest, so the plain key is never stored and a lookup's timing depends only on the digest,
//! which an attacker cannot steer towards a stored one.

use base64::Engine;
use sha2::{Digest, Sha256};

/// Every generated key starts with this, so leaked keys are easy to recognise and scan for.
pub const KEY_PREFIX: &str = "tg_";

pub type KeyHash = [u8; 32];

/// A fresh key: the prefix and 32 random bytes (256 bits) in base64url.
pub fn generate() -> String {
    let bytes: [u8; 32] = rand::random();
    format!(
        "{KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

pub fn hash(key: &str) -> KeyHash {
    Sha256::digest(key.as_bytes()).into()
}

/// `sha256:<64 lowercase hex>`, the form stored in the config.
pub fn format_hash(h: &KeyHash) -> String {
    format!("sha256:{}", hex::encode(h))
}

pub fn parse_hash(text: &str) -> Result<KeyHash, String> {
    let hex_part = text
        .strip_prefix("sha256:")
        .ok_or_else(|| "must be `sha256:<64 hex digits>` (run `tollgate key hash`)".to_string())?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part.trim(), &mut out)
        .map_err(|_| "must be `sha256:<64 hex digits>` (run `tollgate key hash`)".to_string())?;
    Ok(out)
}

/// The key a client presented, with optional whitespace around it removed; `None` when it
/// cannot be a key at all (empty, too long, or containing anything but visible ASCII).
pub fn clean(presented: &[u8]) -> Option<&str> {
    let s = std::str::from_utf8(presented)
        .ok()?
        .trim_matches([' ', '\t']);
    let ok = (8..=512).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic());
    ok.then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_unique_and_prefixed() {
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        assert!(a.starts_with(KEY_PREFIX));
        assert_eq!(a.len(), KEY_PREFIX.len() + 43);
        assert!(clean(a.as_bytes()).is_some());
    }

    #[test]
    fn hash_round_trip() {
        let h = hash("tg_secret");
        assert_eq!(parse_hash(&format_hash(&h)), Ok(h));
        assert!(parse_hash("md5:abcd").is_err());
        assert!(parse_hash("sha256:xyz").is_err());
        assert!(parse_hash("sha256:").is_err());
    }

    #[test]
    fn presented_keys_are_trimmed_and_checked() {
        assert_eq!(clean(b"  tg_abcdefgh \t"), Some("tg_abcdefgh"));
        assert_eq!(clean(b"tg_abc defgh"), None);
        assert_eq!(clean(b"short"), None);
        assert_eq!(clean(b"tg_\x00abcdefgh"), None);
        assert_eq!(
            clean(&[0xff, 0xfe, b'a', b'b', b'c', b'd', b'e', b'f', b'g']),
            None
        );
    }
}
