#!/usr/bin/env bash
# Everything CI checks, in one command (what `.ci/run` calls):
#
#   scripts/test.sh
#
# Installs what is missing (redis-server, postgresql, cmake, pebble) on Debian/Ubuntu, then runs
# rustfmt, clippy (warnings are errors; with and without the `otlp` feature), `tollgate -t` on
# every shipped config, every test of the workspace (unit, property, integration against the
# real binaries with a private PostgreSQL and redis-server, benches in test mode), then the
# tests of the `otlp` feature (OTLP trace export) in a build with it.
# Set CARGO_TARGET_DIR to a directory outside the clone to reuse builds between runs.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_packages cmake:cmake redis-server:redis-server '/usr/lib/postgresql/*/bin/initdb:postgresql' \
    gcc:build-essential pkg-config:pkg-config openssl:openssl chromium:chromium /bin/kill:procps \
    flock:util-linux runuser:util-linux pebble:pebble pebble-challtestsrv:pebble redis-cli:redis-tools
# The audit's advisory snapshot is checked now, not after half an hour of tests.
advisories=${TOLLGATE_ADVISORY_DB:-../shared/advisory-db}
[ -d "$advisories" ] || { echo "no advisory database at $advisories (set TOLLGATE_ADVISORY_DB; see scripts/audit.sh)" >&2; exit 1; }
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
target=${CARGO_TARGET_DIR:-target}
# One run at a time per target directory: a second run (another clone sharing CARGO_TARGET_DIR)
# waits here instead of interleaving its builds, fuzz corpora and binaries with this one's.
mkdir -p "$target"
exec 9>"$target/.tollgate-test.lock"
flock -n 9 || { echo "== waiting for another scripts/test.sh using $target"; flock 9; }

echo "== rustfmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo clippy --locked --all-targets --features otlp -- -D warnings
echo "== build"
cargo build --locked --workspace --bins
echo "== check shipped configs"
for f in conf/tollgate.yaml conf/examples/*.yaml; do
    [ -e "$f" ] || continue
    if grep -q '^  listen_tls:' "$f"; then
        # Certificates are not shipped (they would expire): made now, next to a copy.
        tls_dir=$(mktemp -d)
        cp "$f" "$tls_dir/"
        scripts/dev-cert.sh "$tls_dir/certs" example example.test api.example.test >/dev/null
        "$target/debug/tollgate" -t -c "$tls_dir/$(basename "$f")"
        rm -rf "$tls_dir"
    else
        "$target/debug/tollgate" -t -c "$f"
    fi
done
echo "== tests"
cargo test --locked --workspace --all-targets
echo "== tests with the otlp feature (OTLP trace export)"
cargo test --locked --features otlp --lib --test gateway -- otlp
echo "== fuzz (every target ${FUZZ_SECONDS:-5}s; longer by hand: FUZZ_SECONDS=600 scripts/fuzz.sh [target...])"
FUZZ_TARGET_DIR="$target/fuzz" scripts/fuzz.sh
echo "== dependency audit (cargo-deny, offline advisory snapshot)"
scripts/audit.sh
echo "== all checks passed"
