//! Text written per request without the formatting machinery (`Display` for an IPv4 address
//! costs several hundred instructions through `core::fmt`; by hand it is a few dozen). Used by
//! the access log and X-Forwarded-For; the instruction counts are in docs/benchmarks.md.

use std::net::IpAddr;

/// `ip` as text: IPv4 by hand (the common case), IPv6 through `Display`.
pub fn ip_text(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(digits.format(*octet).as_bytes());
            }
        }
        IpAddr::V6(v6) => {
            use std::io::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ip_text;

    #[test]
    fn addresses_read_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.200.3.255",
            "::1",
            "2001:db8::8a2e:370:7334",
        ] {
            let ip: std::net::IpAddr = ip.parse().expect("ip");
            let mut out = Vec::new();
            ip_text(&mut out, ip);
            assert_eq!(out, ip.to_string().as_bytes());
        }
    }
}
