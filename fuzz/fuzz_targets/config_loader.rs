//! The config loader on any bytes: a list of located errors or a config, never a panic.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The loader reads text; bytes that are not UTF-8 arrive as replacement characters.
    let text = String::from_utf8_lossy(data);
    // Key and JWKS files named in the input are read: keep the fuzzer away from device and
    // kernel files (a read of /dev/zero never ends). Relative names resolve under a directory
    // that does not exist.
    if ["/dev", "/proc", "/sys"].iter().any(|p| text.contains(p)) {
        return;
    }
    let path = Path::new("/nonexistent/tollgate-fuzz/tollgate.yaml");
    match tollgate::config::load_str(path, &text) {
        Ok(config) => {
            // The request path indexes upstreams by a route's index without checking.
            for r in &config.routes {
                assert!(
                    r.upstream < config.upstreams.len(),
                    "route {} dangles",
                    r.name
                );
            }
        }
        Err(errors) => {
            assert!(!errors.is_empty(), "an error result with no error");
            for pair in errors.windows(2) {
                assert!(
                    (pair[0].line, pair[0].column) <= (pair[1].line, pair[1].column),
                    "errors out of file order: {errors:?}"
                );
            }
            for e in &errors {
                let line = e.to_string();
                assert!(!line.contains('\n'), "a multi-line error: {line:?}");
                assert!(!e.message.is_empty(), "an empty message: {e:?}");
            }
        }
    }
});
