#!/usr/bin/env bash
# Dependency audit with cargo-deny, offline, against a local RustSec advisory snapshot:
#
#   scripts/audit.sh
#
# The database defaults to ../shared/advisory-db (a snapshot beside the clone); point
# TOLLGATE_ADVISORY_DB at any checkout of https://github.com/rustsec/advisory-db for a fresher
# one (`git clone https://github.com/rustsec/advisory-db` where the network allows). Fails on any
# advisory that affects the build (except those ignored, with reasons, in deny.toml) and on a
# licence outside deny.toml's allow list. Installs cargo-deny if missing (about 5 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
src=${TOLLGATE_ADVISORY_DB:-../shared/advisory-db}
[ -d "$src" ] || { echo "no advisory database at $src (set TOLLGATE_ADVISORY_DB)" >&2; exit 1; }
command -v cargo-deny >/dev/null || cargo install cargo-deny --locked --version 0.20.2
root=${TOLLGATE_ADVISORY_DB_ROOT:-target/advisory-dbs}
export TOLLGATE_ADVISORY_DB_ROOT=$root
# cargo-deny opens <db-path>/advisory-db-<hash of the default URL> as a git repository.
db="$root/advisory-db-3157b0e258782691"
rm -rf "$db"
mkdir -p "$root"
cp -r "$src" "$db"
rm -rf "$db/.git"
(
    cd "$db"
    git init -q
    git add -A
    GIT_AUTHOR_DATE="2026-01-01T00:00:00Z" GIT_COMMITTER_DATE="2026-01-01T00:00:00Z" \
        git -c user.name=tollgate -c user.email=ci@tollgate.invalid commit -q -m "advisory snapshot"
)
cargo fetch --locked >/dev/null
cargo deny --offline check advisories licenses sources
