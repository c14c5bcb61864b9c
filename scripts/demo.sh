#!/usr/bin/env bash
# The whole Tollgate stack on this machine, in one command, without Docker:
#
#   scripts/demo.sh                            # Ctrl-C stops everything cleanly
#   DEMO_EXIT_AFTER_READY=1 scripts/demo.sh    # start, print, smoke-test, stop (non-interactive)
#
# Starts a private PostgreSQL (127.0.0.1:$PG_PORT, default 55432) and redis-server
# (127.0.0.1:$REDIS_PORT, default 56379) under run/ (gitignored), three upstream-demo instances on
# 127.0.0.1:3001-3003 (demo-1..3), and the gateway on :8080 (admin 127.0.0.1:9090) with
# conf/demo.yaml (a copy in run/ when REDIS_PORT is not the default). Installs missing packages
# with apt-get when run as root on Debian/Ubuntu, builds both binaries in release mode (honours
# CARGO_TARGET_DIR), generates an RSA key pair for JWTs in run/jwt/ if absent. Running it again
# reuses the database cluster and the keys.
#
# Other knobs: EXTERNAL_FAIL_RATE / EXTERNAL_STALL_RATE (default 0.2 / 0.05) for /api/v1/external
# (changeable while running: PUT 127.0.0.1:300N/api/v1/external/mode, shown below);
# TOLLGATE_ADMIN_TOKEN (default demo-admin-token-not-secret) for the admin API.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
. scripts/lib.sh

PG_PORT=${PG_PORT:-55432}
REDIS_PORT=${REDIS_PORT:-56379}
DEMO_PORTS=(3001 3002 3003)
GATEWAY=127.0.0.1:8080
ADMIN=127.0.0.1:9090
READY_TIMEOUT=${READY_TIMEOUT:-90}
# conf/demo.yaml reads the admin token from this variable (admin.token_env).
export TOLLGATE_ADMIN_TOKEN=${TOLLGATE_ADMIN_TOKEN:-demo-admin-token-not-secret}
run=$root/run
logs=$run/logs
pids=$run/pids
target=${CARGO_TARGET_DIR:-target}
case $target in /*) ;; *) target=$root/$target ;; esac

say() { printf '== %s\n' "$*"; }
die() { printf 'demo.sh: %s\n' "$*" >&2; exit 1; }

# --- packages and build -----------------------------------------------------------------------
ensure_packages redis-server:redis-server redis-cli:redis-tools \
    '/usr/lib/postgresql/*/bin/initdb:postgresql' cmake:cmake openssl:openssl curl:curl \
    gcc:build-essential pkg-config:pkg-config setsid:util-linux
command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs) first"

say "building tollgate and upstream-demo (release)"
cargo build --release -p tollgate -p upstream-demo
tollgate=$target/release/tollgate
demo=$target/release/upstream-demo
[ -x "$tollgate" ] && [ -x "$demo" ] || die "binaries not found under $target/release"

pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
as_pg=()    # PostgreSQL refuses to run as root: run its programs as the postgres user then
[ "$(id -u)" -eq 0 ] && as_pg=(runuser -u postgres --)
pg() { local prog=$1; shift; "${as_pg[@]}" "${pgbin:+$pgbin/}$prog" "$@"; }

mkdir -p "$logs" "$pids" "$run/redis" "$run/jwt"

# --- leftovers of a previous run that did not stop cleanly (killed -9, closed terminal) ---------
# Only processes this script started: their pids are in run/pids, checked against their command.
for f in "$pids"/*.pid; do
    [ -e "$f" ] || continue
    pid=$(cat "$f")
    name=$(basename "$f" .pid)
    if [ -n "$pid" ] && grep -qa -- "${name%%-[0-9]*}" "/proc/$pid/cmdline" 2>/dev/null; then
        say "stopping $name (pid $pid) left over from a previous run"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
done

# --- the PostgreSQL cluster lives in run/pg (reused between runs) -------------------------------
pgdir=$run/pg
mkdir -p "$pgdir"
if [ "$(id -u)" -eq 0 ]; then
    chown postgres "$pgdir"
    if ! "${as_pg[@]}" test -w "$pgdir"; then
        # The checkout is not reachable by the postgres user (e.g. under /root): use /tmp.
        pgdir=${TMPDIR:-/tmp}/tollgate-demo-pg
        mkdir -p "$pgdir" && chown postgres "$pgdir" && chmod 700 "$pgdir"
        say "run/ is not accessible to the postgres user; PostgreSQL data goes to $pgdir"
    fi
fi
if pg pg_ctl -D "$pgdir/data" status >/dev/null 2>&1; then
    say "stopping a PostgreSQL left running in $pgdir"
    pg pg_ctl -D "$pgdir/data" -m fast -w stop >/dev/null
fi
if [ ! -s "$pgdir/data/PG_VERSION" ]; then
    say "initdb $pgdir/data"
    rm -rf "$pgdir/data"
    pg initdb -D "$pgdir/data" -A trust -U postgres --no-sync --no-locale -E UTF8 >"$logs/initdb.log" 2>&1 \
        || { cat "$logs/initdb.log" >&2; die "initdb failed"; }
else
    say "reusing the PostgreSQL cluster in $pgdir/data"
fi

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$PG_PORT" "$REDIS_PORT" "${DEMO_PORTS[@]}" 8080 9090; do
    port_busy "$p" && die "port $p is already in use (PG_PORT / REDIS_PORT are overridable)"
done

# --- from here on, everything started is stopped on exit ----------------------------------------
started=()    # "name:pid", in start order
pg_started=0
stopping=0
cleanup() {
    [ "$stopping" -eq 1 ] && return
    stopping=1
    trap '' INT TERM    # a second Ctrl-C must not leave processes behind
    [ ${#started[@]} -eq 0 ] && [ "$pg_started" -eq 0 ] && return
    echo
    say "stopping"
    # Reverse start order: gateway, then the instances (they drain accepted events into
    # PostgreSQL through Redis), then Redis, then PostgreSQL.
    local i entry name pid
    for ((i = ${#started[@]} - 1; i >= 0; i--)); do
        entry=${started[$i]}; name=${entry%%:*}; pid=${entry##*:}
        kill -0 "$pid" 2>/dev/null || { rm -f "$pids/$name.pid"; continue; }
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$pid" 2>/dev/null; then
            echo "   $name did not stop in 20 s: killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true
        rm -f "$pids/$name.pid"
        echo "   stopped $name"
    done
    if [ "$pg_started" -eq 1 ]; then
        pg pg_ctl -D "$pgdir/data" -m fast -w stop >/dev/null 2>&1 || true
        echo "   stopped postgres"
    fi
    say "all stopped (logs in $logs)"
}
trap 'cleanup' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start NAME CMD...: in its own session, so a Ctrl-C reaches only this script, which then stops
# everything in order.
start() {
    local name=$1; shift
    setsid "$@" >>"$logs/$name.log" 2>&1 </dev/null &
    local pid=$!
    started+=("$name:$pid")
    echo "$pid" >"$pids/$name.pid"
}

# wait_for WHAT CHECK...: poll CHECK until it succeeds; fail after READY_TIMEOUT seconds.
wait_for() {
    local what=$1; shift
    local deadline=$((SECONDS + READY_TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        if [ "$SECONDS" -ge "$deadline" ]; then die "$what not ready after ${READY_TIMEOUT}s"; fi
        sleep 0.2
    done
}

say "postgres on 127.0.0.1:$PG_PORT"
pg_started=1
setsid -w "${as_pg[@]}" "${pgbin:+$pgbin/}pg_ctl" -D "$pgdir/data" -l "$pgdir/postgres.log" \
    -o "-p $PG_PORT -k $pgdir -c listen_addresses=127.0.0.1" -w -t 60 start >/dev/null \
    || { tail -n 20 "$pgdir/postgres.log" >&2; die "PostgreSQL did not start"; }
wait_for postgres pg pg_isready -h 127.0.0.1 -p "$PG_PORT"
if ! pg psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -tAc \
        "SELECT 1 FROM pg_database WHERE datname = 'demo'" | grep -q 1; then
    pg createdb -h 127.0.0.1 -p "$PG_PORT" -U postgres demo
fi
database_url=postgres://postgres@127.0.0.1:$PG_PORT/demo

say "redis on 127.0.0.1:$REDIS_PORT"
start redis redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --daemonize no --dir "$run/redis"
wait_for redis redis-cli -p "$REDIS_PORT" ping

if [ ! -s "$run/jwt/private.pem" ]; then
    say "generating the JWT key pair in run/jwt/"
    (umask 077 && openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 \
        -out "$run/jwt/private.pem" 2>/dev/null)
    rm -f "$run/jwt/public.pem"
fi
[ -s "$run/jwt/public.pem" ] || openssl pkey -in "$run/jwt/private.pem" -pubout -out "$run/jwt/public.pem"

for i in 1 2 3; do
    port=${DEMO_PORTS[$((i - 1))]}
    say "upstream-demo demo-$i on 127.0.0.1:$port"
    start "upstream-demo-$i" env HOST=127.0.0.1 PORT="$port" INSTANCE_ID="demo-$i" \
        DATABASE_URL="$database_url" REDIS_URL="redis://127.0.0.1:$REDIS_PORT" \
        JWT_PRIVATE_KEY="$run/jwt/private.pem" EXTERNAL_CONTROL=1 \
        EXTERNAL_FAIL_RATE="${EXTERNAL_FAIL_RATE:-0.2}" EXTERNAL_STALL_RATE="${EXTERNAL_STALL_RATE:-0.05}" \
        RUST_LOG="${RUST_LOG:-info,sqlx=warn}" "$demo"
done
for i in 1 2 3; do
    port=${DEMO_PORTS[$((i - 1))]}
    wait_for "upstream-demo demo-$i (see $logs/upstream-demo-$i.log)" \
        curl -sf -m 2 "http://127.0.0.1:$port/health"
done

# conf/demo.yaml names the default Redis port; another REDIS_PORT runs a copy in run/ (its
# relative JWT key path, ../run/jwt/public.pem, resolves to the same file from there).
config=conf/demo.yaml
if [ "$REDIS_PORT" != 56379 ]; then
    config=$run/demo.yaml
    sed "s#redis://127\.0\.0\.1:56379#redis://127.0.0.1:$REDIS_PORT#" conf/demo.yaml >"$config"
    grep -q "redis://127.0.0.1:$REDIS_PORT\"" "$config" || die "could not set the Redis port in $config"
fi
say "tollgate on $GATEWAY (admin $ADMIN) with $config"
"$tollgate" -t -c "$config" >/dev/null
start tollgate "$tollgate" -c "$config"
wait_for "tollgate (see $logs/tollgate.log)" curl -sf -m 2 "http://$GATEWAY/api/v1/status"

# --- ready: show it working -------------------------------------------------------------------------
login='{"email":"admin@example.com","password":"admin123"}'
api_key=tg_demo_partner_key_not_secret    # the YAML consumer `partner` (tier pro) in conf/demo.yaml
admin_auth="Authorization: Bearer $TOLLGATE_ADMIN_TOKEN"
cat <<EOF

Tollgate demo is up.
  gateway        http://$GATEWAY          (every request below goes through it)
  admin          http://$ADMIN/admin/status   http://$ADMIN/metrics
                 /admin/* needs: -H '$admin_auth'
  upstream-demo  http://127.0.0.1:3001  http://127.0.0.1:3002  http://127.0.0.1:3003
  postgres       $database_url
  redis          redis://127.0.0.1:$REDIS_PORT
  logs           $logs/

Try:
  TOKEN=\$(curl -s $GATEWAY/api/v1/auth/login -H 'content-type: application/json' \\
            -d '$login' | sed 's/.*"token":"\([^"]*\)".*/\1/')
  curl -s $GATEWAY/api/v1/me -H "Authorization: Bearer \$TOKEN"
  curl -s $GATEWAY/api/v1/me -H "X-API-Key: $api_key"
  curl -s '$GATEWAY/api/v1/resources?per_page=2&fields=id,name'
  curl -s -i -XPOST $GATEWAY/api/v1/resources -H 'content-type: application/json' -d '{"name":"x"}'   # 401
  curl -s -XPOST $GATEWAY/api/v1/resources -H "Authorization: Bearer \$TOKEN" -H 'content-type: application/json' -d '{"name":"x"}'
  for i in \$(seq 10); do curl -s $GATEWAY/api/v1/status; echo; done
  for i in \$(seq 110); do curl -s -o /dev/null -w '%{http_code} ' $GATEWAY/api/v1/status; done   # 429s
  curl -s -XPOST $GATEWAY/api/v1/events -H 'Idempotency-Key: order-42' -H 'content-type: application/json' -d '{"type":"order"}'
  curl -s $ADMIN/admin/status -H '$admin_auth'
  curl -s -i $GATEWAY/api/v1/external      # fails or stalls now and then: watch the breaker
  for p in ${DEMO_PORTS[*]}; do curl -s -XPUT 127.0.0.1:\$p/api/v1/external/mode -H 'content-type: application/json' \\
      -d '{"failRate":1,"stallRate":0}'; echo; done   # make it fail everywhere: the breakers open
  curl -s $ADMIN/admin/upstreams -H '$admin_auth'    # breaker: open, then closed after a PUT of 0

Smoke test (the same calls, run now):
EOF
curl() { command curl -m 10 "$@"; }    # no smoke call may hang the script
token=$(curl -sf "http://$GATEWAY/api/v1/auth/login" -H 'content-type: application/json' -d "$login" \
    | sed 's/.*"token":"\([^"]*\)".*/\1/')
[ -n "$token" ] || die "login through the gateway failed"
echo "  login            token ${token:0:24}..."
echo "  me               $(curl -s "http://$GATEWAY/api/v1/me" -H "Authorization: Bearer $token")"
echo "  me (no token)    $(curl -s -o /dev/null -w '%{http_code}' "http://$GATEWAY/api/v1/me")"
echo "  me (api key)     $(curl -s "http://$GATEWAY/api/v1/me" -H "X-API-Key: $api_key")"
echo "  resources        $(curl -s "http://$GATEWAY/api/v1/resources?per_page=2&fields=id,name")"
echo -n "  status x10       "
for _ in $(seq 10); do
    printf '%s ' "$(curl -s "http://$GATEWAY/api/v1/status" | sed 's/.*"instanceId":"\([^"]*\)".*/\1/')"
done
echo
key="demo-$(date +%s)-$$"
event=$(curl -s -XPOST "http://$GATEWAY/api/v1/events" -H "Idempotency-Key: $key" \
    -H 'content-type: application/json' -d '{"type":"demo"}')
echo "  event            $event"
echo "  admin status     $(curl -s "http://$ADMIN/admin/status" -H "$admin_auth" | head -c 300)"
echo

if [ "${DEMO_EXIT_AFTER_READY:-0}" = "1" ]; then
    say "DEMO_EXIT_AFTER_READY=1: stopping"
    exit 0
fi
echo "Press Ctrl-C to stop everything."
# Wait until Ctrl-C, or until one of the processes dies on its own (then stop the rest).
set +e
wait -n $(for e in "${started[@]}"; do echo "${e##*:}"; done)
set -e
[ "$stopping" -eq 1 ] || die "a process exited unexpectedly; see $logs/"
