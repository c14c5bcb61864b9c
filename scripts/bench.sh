#!/usr/bin/env bash
# Whole-gateway benchmark: Tollgate against NGINX, HAProxy and a bare pingora reference proxy.
#
# Run (from anywhere; root on Debian/Ubuntu installs missing tools with apt-get):
#
#   scripts/bench.sh
#   ROUNDS=5 DURATION=20s scripts/bench.sh              # longer, steadier
#   ROUNDS=1 DURATION=3s BENCH_OUT=/tmp/b.md scripts/bench.sh   # quick smoke run
#   PROXIES="tollgate tollgate-rl-local" scripts/bench.sh   # only some of the runs
#   COUNT=instructions scripts/bench.sh                 # instructions per request (callgrind)
#
# Other knobs (env): CONNECTIONS=64 WRK_THREADS=1 WARMUP=1s PROXY_CPU=1 LOAD_CPU=0
#   UPSTREAM_CPU=<LOAD_CPU on 2 cores, else 2> REDIS_CPU=<UPSTREAM_CPU>
#   BUILD=1 (0 = reuse the binaries already built; tools/bench-report is still built if missing)
#   CARGO_TARGET_DIR (honoured, as cargo does).
#   KEEP_WORK=0 (1 = keep the scratch directory: configs, server logs, raw wrk outputs).
#   COUNT=cpu (default: CPU time per request from /proc, under wrk's saturating load) or
#   COUNT=instructions: the pingora-based proxies (reference and the Tollgate runs) run under
#   valgrind's callgrind, and the table gives instructions executed per request (all threads)
#   over one wrk run of CONNECTIONS (default 4 in this mode) after the warm-up, less what the
#   proxy executes idle over the same time (timer ticks, probes). Instruction
#   counts do not depend on timing or on what else the machine runs: the same binary and load
#   give the same figure to within a fraction of a percent, so small hot-path changes show.
#   PROXIES (space-separated, in table order; default all): nginx haproxy reference tollgate
#   tollgate-rl-local tollgate-rl-exact tollgate-rl-batched.
#   COUNT=idle: memory, not CPU: for each proxy in turn, IDLE_CONNECTIONS (default 10000)
#   keep-alive connections are opened, one request each, and held idle; the table gives the
#   proxy's RSS (all its processes) before and with them open, and the difference per connection.
# TRANSPORT: how clients reach the proxies (default plain):
#   plain     HTTP/1.1 keep-alive in plain text;
#   tls       HTTP/1.1 keep-alive over TLS (the handshakes happen in the warm-up): CPU per request;
#   tls-new   a new TLS connection per request (`Connection: close`, full handshakes: wrk does
#             not resume sessions): CPU per request = per handshake plus one request;
#   h2tls     HTTP/2 over TLS with h2load (-m 10 streams per connection; its report has no
#             percentiles: the p50 and p99 columns hold its mean).
#   The certificate is ECDSA P-256 (scripts/dev-cert.sh), the same file for every proxy; the
#   upstream stays plain HTTP/1.1. Every proxy offers TLS 1.2 and 1.3 (clients negotiate 1.3).
#
# What it does: builds `tollgate` and `examples/reference_proxy.rs` with the release profile,
# starts ONE upstream (NGINX answering "hello"), then the proxies in front of it, each pinned to
# the same core. wrk drives each proxy in interleaved rounds (every proxy once per round, the
# order rotated each round) so machine drift hits all of them equally.
#
# The gateway pair does the same gateway work on both sides: `nginx-gateway` (an API key looked up
# in a `map`, 401 without it, a `limit_req` no run reaches, a JSON access log to a file with
# `buffer=64k`, `X-Request-Id` and `X-Forwarded-For` upstream) and `tollgate-gateway` (the key
# required by the route, a local tier limit no run reaches, the JSON access log to a file,
# Tollgate's defaults). Every run's requests carry the key; the others ignore it.
#
# The proxies: NGINX, HAProxy, the bare pingora reference proxy, plain Tollgate, Tollgate with
# its JSON access log written to a file (`tollgate-log`), and three
# Tollgates that differ from plain Tollgate only by a rate limit no run can reach (every request
# is decided, and allowed): `tollgate-rl-local` (in-process counters), `tollgate-rl-exact` (one
# Redis script per request) and `tollgate-rl-batched` (local decisions, deltas synced to Redis
# every 100 ms). The last two share ONE private redis-server, pinned to the load/upstream core.
#
# What it prints: one line per run, then a table of medians per proxy — requests/s, p50 and p99
# latency, CPU microseconds per request of the proxy's processes (utime+stime from /proc over
# the requests wrk completed), and the ratios CPU/request vs NGINX, vs the reference proxy, and
# p99 vs the reference proxy; then a table of the rate limiter's cost against plain Tollgate:
# CPU/request ratio, p99 difference, and Redis's own CPU/request (not part of the proxy's CPU,
# so shown apart and added in its own ratio). Both tables are also written as markdown to
# BENCH_OUT (default run/bench.md; run/ is gitignored).
#
# This script runs things: tools, builds, ports, servers, pinning, wrk and valgrind, one row of
# counts per run in a results file. The arithmetic, the statistics (medians, per-round paired
# ratios) and the markdown are tools/bench-report's, a small unit-tested program built here too.
#
# Core layout: the proxy under test gets a core of its own (PROXY_CPU); wrk and the upstream
# share the other (LOAD_CPU). On a 2-core machine that is the only split that keeps the proxy's
# CPU time clean: the proxy is what we measure, and wrk + upstream NGINX are cheap per request
# and identical for every proxy, so sharing a core shifts all proxies' throughput alike.
# CPU/request is the headline number: it does not depend on how fast the load side is.
# Redis (REDIS_CPU) joins wrk and the upstream: it is the limiter's backend, not the proxy. It
# is busy only in the exact run, where it takes load-core time from wrk (fewer requests/s) and
# its scheduling shows in that run's latency; the proxy's CPU/request stays clean.

set -euo pipefail

# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib.sh
. "$REPO/scripts/lib.sh"
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-1s}
COUNT=${COUNT:-cpu}
IDLE_CONNECTIONS=${IDLE_CONNECTIONS:-10000}
if [[ $COUNT == instructions ]]; then CONNECTIONS=${CONNECTIONS:-4}; else CONNECTIONS=${CONNECTIONS:-64}; fi
WRK_THREADS=${WRK_THREADS:-1}
BUILD=${BUILD:-1}
KEEP_WORK=${KEEP_WORK:-0}
BENCH_OUT=${BENCH_OUT:-$REPO/run/bench.md}
TRANSPORT=${TRANSPORT:-plain}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
if [[ -z ${UPSTREAM_CPU:-} ]]; then
    # With a third core the upstream gets its own; otherwise it shares wrk's.
    if (($(nproc) >= 3)); then UPSTREAM_CPU=2; else UPSTREAM_CPU=$LOAD_CPU; fi
fi
REDIS_CPU=${REDIS_CPU:-$UPSTREAM_CPU}
# The order of the table; the first round runs them in this order, later rounds rotate it.
ALL_PROXIES=(nginx haproxy nginx-gateway reference tollgate-plain tollgate tollgate-log tollgate-gateway tollgate-rl-local tollgate-rl-exact tollgate-rl-batched)
if [[ $COUNT == instructions ]]; then
    # callgrind follows one process; NGINX and HAProxy are measured by CPU time only.
    read -r -a PROXIES <<<"${PROXIES:-reference tollgate-plain tollgate tollgate-rl-local}"
else
    read -r -a PROXIES <<<"${PROXIES:-${ALL_PROXIES[*]}}"
fi
# The rate-limiter runs' tier limit: never reached (the counter is per client IP, and wrk is one
# client), so every request is counted and allowed.
RL_LIMIT=1000000000
# nginx and haproxy live in /usr/sbin, which is not on a normal user's PATH.
export PATH="$PATH:/usr/sbin:/sbin"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/tollgate-bench.XXXXXX")
# proxy round rps p50_us p99_us cpu_us_per_req requests socket_errors non_2xx
#   redis_cpu_us_per_req redis_fallbacks ("-" for the runs without Redis) steal_percent
# (tab-separated; tools/bench-report reads it: see its src/results.rs)
RESULTS="$WORK/results.tsv"
declare -A PROXY_PID=()     # proxy name -> pid of the process we started (the tree root)
declare -A PROXY_PORT=()    # proxy name -> listening port
declare -A TOLLGATE_PLAIN_PORT=() # Tollgate runs over TLS: their (unused) plain listener
STARTED_PIDS=()             # every pid we started, for cleanup
REDIS_PORT=                 # the private redis-server (only when a run needs it)
REDIS_PID=

log() { printf '[bench] %s\n' "$*" >&2; }
die() {
    log "error: $*"
    exit 1
}

# Whether clients reach the proxies over TLS, and the URL of a proxy (the upstream is plain).
tls_transport() { [[ $TRANSPORT != plain ]]; }
proxy_url() {
    if [[ $1 != upstream ]] && tls_transport; then echo "https://127.0.0.1:$2/"; else echo "http://127.0.0.1:$2/"; fi
}
# wrk's extra arguments: a new connection per request for tls-new.
# The API key every request carries (the gateway runs require it).
BENCH_KEY=tg_bench_key_0123456789abcdef
WRK_EXTRA=(-H "X-API-Key: $BENCH_KEY")
CERT_DIR=
make_certs() {
    [[ $TRANSPORT == tls-new ]] && WRK_EXTRA+=(-H "Connection: close")
    tls_transport || return 0
    CERT_DIR="$WORK/certs"
    "$REPO/scripts/dev-cert.sh" "$CERT_DIR" bench bench.test >/dev/null ||
        die "cannot make the benchmark certificate (scripts/dev-cert.sh)"
    cat "$CERT_DIR/bench.pem" "$CERT_DIR/bench.key" >"$CERT_DIR/bench.combined.pem"
}

# The runs that talk to Redis, and whether the selection has one.
uses_redis() { [[ $1 == tollgate-rl-exact || $1 == tollgate-rl-batched ]]; }
needs_redis() {
    local name
    for name in "${PROXIES[@]}"; do uses_redis "$name" && return 0; done
    return 1
}

# ---------------------------------------------------------------------------------------------
# Cleanup: stop exactly the processes this script started (and their children), remove $WORK.
# ---------------------------------------------------------------------------------------------

# A pid and all its descendants (nginx master -> worker), children first.
tree_pids() {
    local pid=$1 child
    for child in $(ps -o pid= --ppid "$pid" 2>/dev/null); do
        tree_pids "$child"
    done
    echo "$pid"
}

cleanup() {
    local status=$? pid all=() i alive
    trap - EXIT INT TERM
    for pid in "${STARTED_PIDS[@]}"; do
        # shellcheck disable=SC2207
        all+=($(tree_pids "$pid"))
    done
    if ((${#all[@]})); then
        kill -TERM "${all[@]}" 2>/dev/null || true
        # Give graceful shutdowns (pingora's grace period is set to 1 s) a moment, then force.
        for i in $(seq 50); do
            alive=0
            for pid in "${all[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
            ((alive)) || break
            sleep 0.1
        done
        for pid in "${all[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
        wait 2>/dev/null || true
    fi
    if [[ $KEEP_WORK == 1 ]]; then log "kept $WORK (configs, logs, wrk outputs)"; else rm -rf "$WORK"; fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------------------------------------
# Tools and builds
# ---------------------------------------------------------------------------------------------

# Install what is missing when we can (lib.sh's ensure_packages: root + apt-get), otherwise say
# what to install.
ensure_tools() {
    local tools=(nginx:nginx haproxy:haproxy wrk:wrk cmake:cmake curl:curl taskset:util-linux)
    local services=() service
    command -v cargo >/dev/null 2>&1 || die "missing tool: cargo (install Rust: https://rustup.rs)"
    if needs_redis; then tools+=(redis-server:redis-server redis-cli:redis-tools); fi
    if [[ $COUNT == instructions ]]; then tools+=(valgrind:valgrind callgrind_control:valgrind); fi
    if [[ $TRANSPORT != plain ]]; then tools+=(openssl:openssl); fi
    if [[ $TRANSPORT == h2tls ]]; then tools+=(h2load:nghttp2-client); fi
    # The Debian nginx and redis-server packages start system services (ports 80, 6379): we never
    # use them, so the ones installed now are stopped, not to compete for the cores.
    command -v nginx >/dev/null 2>&1 || services+=(nginx)
    if needs_redis && ! command -v redis-server >/dev/null 2>&1; then services+=(redis-server); fi
    ensure_packages "${tools[@]}" >&2 || die "missing tools (see above)"
    if ((${#services[@]})) && command -v systemctl >/dev/null 2>&1; then
        for service in "${services[@]}"; do systemctl stop "$service" 2>/dev/null || true; done
    fi
}

# Build the binaries with the release profile of the root Cargo.toml (fat LTO, 1 codegen unit,
# mimalloc in tollgate and the reference proxy), at low priority so a build never starves other
# work on the machine. bench-report comes first (plain std, seconds; `cargo run` builds it when
# missing or stale, BUILD=0 or not): it says where cargo puts binaries (CARGO_TARGET_DIR, a
# config's build.target-dir, or target/).
build() {
    local target_dir
    target_dir=$(cd "$REPO" && nice -n 19 cargo run --release -p bench-report -- target-dir)
    BENCH_REPORT="$target_dir/release/bench-report"
    TOLLGATE_BIN="$target_dir/release/tollgate"
    REFERENCE_BIN="$target_dir/release/examples/reference_proxy"
    if [[ $BUILD != 0 ]]; then
        log "building tollgate and examples/reference_proxy (release) into $target_dir"
        (cd "$REPO" && nice -n 19 cargo build --release --bin tollgate --example reference_proxy >&2)
    fi
    [[ -x $TOLLGATE_BIN ]] || die "not built: $TOLLGATE_BIN"
    [[ -x $REFERENCE_BIN ]] || die "not built: $REFERENCE_BIN"
}

# N distinct free TCP ports, chosen by the kernel (bind port 0). All sockets stay open until all
# ports are known, so the N ports differ from each other.
free_ports() { "$BENCH_REPORT" free-ports "$1"; }

# ---------------------------------------------------------------------------------------------
# Servers. Each runs in the foreground of its own background job, pinned with taskset (which
# execs, so $! is the server's own pid and its children inherit the affinity).
# ---------------------------------------------------------------------------------------------

# Start a command pinned to a core; remember its pid. Usage: start NAME CPU CMD...
start() {
    local name=$1 cpu=$2
    shift 2
    if [[ $COUNT == instructions && ($name == reference || $name == tollgate*) ]]; then
        set -- valgrind --tool=callgrind --callgrind-out-file="$WORK/$name.callgrind" "$@"
    fi
    taskset -c "$cpu" "$@" >"$WORK/$name.log" 2>&1 &
    STARTED_PIDS+=($!)
    LAST_PID=$!
}

# Wait until http://127.0.0.1:PORT/ answers 200 (and the process is still alive).
wait_ready() {
    local name=$1 port=$2 pid=$3 i
    for i in $(seq 150); do
        kill -0 "$pid" 2>/dev/null || { tail -20 "$WORK/$name.log" >&2; die "$name exited at start"; }
        if [[ $(curl -sk -H "X-API-Key: $BENCH_KEY" -o /dev/null -w '%{http_code}' "$(proxy_url "$name" "$port")" 2>/dev/null) == 200 ]]; then
            return 0
        fi
        sleep 0.2
    done
    tail -20 "$WORK/$name.log" >&2
    die "$name did not answer 200 on port $port within 30 s"
}

# Settings shared by both NGINX instances: everything under $WORK (no root-owned paths), no
# access log (no proxy here logs requests), and no cap on requests per keep-alive connection
# (NGINX's default closes a connection every 1000 requests; pingora and HAProxy do not).
nginx_common() {
    local dir=$1
    cat <<EOF
worker_processes 1;
daemon off;
master_process on;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
worker_rlimit_nofile 65536;
events { worker_connections 32768; }
EOF
}
nginx_http_common() {
    local dir=$1
    cat <<EOF
    access_log off;
    keepalive_requests 1000000000;
    keepalive_timeout 60s;
    client_body_temp_path $dir/client_body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
EOF
}

# The one upstream every proxy forwards to: NGINX answering a fixed 6-byte body.
start_upstream() {
    local port=$1 dir="$WORK/upstream"
    mkdir -p "$dir"
    {
        nginx_common "$dir"
        echo "http {"
        nginx_http_common "$dir"
        cat <<EOF
    server {
        listen 127.0.0.1:$port;
        location / { default_type text/plain; return 200 "hello\n"; }
    }
}
EOF
    } >"$dir/nginx.conf"
    start upstream "$UPSTREAM_CPU" nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf"
    wait_ready upstream "$port" "$LAST_PID"
}

start_nginx() {
    local port=$1 upstream=$2 dir="$WORK/nginx"
    mkdir -p "$dir"
    {
        nginx_common "$dir"
        echo "http {"
        nginx_http_common "$dir"
        cat <<EOF
    upstream backend {
        server 127.0.0.1:$upstream;
        keepalive 128;
        keepalive_requests 1000000000;
    }
    server {
        listen 127.0.0.1:$port$(tls_transport && echo " ssl")$([[ $TRANSPORT == h2tls ]] && echo " http2");
$(tls_transport && printf '        ssl_certificate %s;\n        ssl_certificate_key %s;\n        ssl_protocols TLSv1.2 TLSv1.3;\n' "$CERT_DIR/bench.pem" "$CERT_DIR/bench.key")
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
    } >"$dir/nginx.conf"
    start nginx "$PROXY_CPU" nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf"
}

# NGINX doing a gateway's work (see the header): key lookup, a limit never reached, a JSON access
# log to a file (buffered), request id and forwarded-for upstream.
start_nginx-gateway() {
    local port=$1 upstream=$2 dir="$WORK/nginx-gateway"
    mkdir -p "$dir"
    {
        nginx_common "$dir"
        echo "http {"
        nginx_http_common "$dir"
        cat <<EOF
    map \$http_x_api_key \$consumer { default ""; "$BENCH_KEY" "bench"; }
    limit_req_zone \$binary_remote_addr zone=perclient:10m rate=100000000r/s;
    log_format gateway escape=json '{"time":"\$time_iso8601","request_id":"\$request_id","client":"\$remote_addr","method":"\$request_method","path":"\$uri","route":"all","status":\$status,"bytes_in":\$request_length,"bytes_out":\$body_bytes_sent,"total_ms":\$request_time,"upstream_ms":"\$upstream_response_time","backend":"\$upstream_addr","consumer":"\$consumer"}';
    upstream backend {
        server 127.0.0.1:$upstream;
        keepalive 128;
        keepalive_requests 1000000000;
    }
    server {
        listen 127.0.0.1:$port;
        access_log $dir/access.log gateway buffer=64k flush=1s;
        location / {
            if (\$consumer = "") { return 401 '{"error":"missing_credentials"}'; }
            limit_req zone=perclient burst=100000000 nodelay;
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Request-Id \$request_id;
            proxy_set_header X-Consumer-Id \$consumer;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        }
    }
}
EOF
    } >"$dir/nginx.conf"
    nginx -t -q -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf" || die "nginx-gateway: nginx rejected its config"
    start nginx-gateway "$PROXY_CPU" nginx -p "$dir" -e "$dir/error.log" -c "$dir/nginx.conf"
}

# One process, one thread (-db: stay in the foreground, no master/worker split). HTTP mode keeps
# both sides alive by default; the options are spelled out so the intent is visible.
start_haproxy() {
    local port=$1 upstream=$2 dir="$WORK/haproxy"
    mkdir -p "$dir"
    cat >"$dir/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn $((IDLE_CONNECTIONS > 4096 ? IDLE_CONNECTIONS + 500 : 4096))

defaults
    mode http
    option http-keep-alive
    http-reuse safe
    timeout connect 1s
    timeout client 60s
    timeout server 30s
    timeout http-keep-alive 60s

frontend fe
    bind 127.0.0.1:$port$(tls_transport && echo " ssl crt $CERT_DIR/bench.combined.pem alpn h2,http/1.1")
    default_backend be

backend be
    server s1 127.0.0.1:$upstream
EOF
    haproxy -c -q -f "$dir/haproxy.cfg" || die "haproxy rejected its config"
    start haproxy "$PROXY_CPU" haproxy -db -f "$dir/haproxy.cfg"
}

start_reference() {
    local port=$1 upstream=$2 dir="$WORK/reference"
    mkdir -p "$dir"
    if tls_transport; then
        REF_TLS_CERT="$CERT_DIR/bench.pem" REF_TLS_KEY="$CERT_DIR/bench.key" \
            REF_PID_FILE="$dir/pid" REF_UPGRADE_SOCK="$dir/upgrade.sock" \
            start reference "$PROXY_CPU" "$REFERENCE_BIN" "127.0.0.1:$port" "127.0.0.1:$upstream"
    else
        REF_PID_FILE="$dir/pid" REF_UPGRADE_SOCK="$dir/upgrade.sock" \
            start reference "$PROXY_CPU" "$REFERENCE_BIN" "127.0.0.1:$port" "127.0.0.1:$upstream"
    fi
}

# The private Redis of the exact and batched runs: no persistence, pinned to the load/upstream
# core (like the upstream, it is the proxy's backend, not the proxy).
start_redis() {
    local port=$1 dir="$WORK/redis" i
    mkdir -p "$dir"
    start redis "$REDIS_CPU" redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" \
        --save "" --appendonly no --daemonize no
    REDIS_PID=$LAST_PID
    for i in $(seq 100); do
        kill -0 "$REDIS_PID" 2>/dev/null || { tail -20 "$WORK/redis.log" >&2; die "redis-server exited at start"; }
        [[ $(redis-cli -p "$port" ping 2>/dev/null) == PONG ]] && return 0
        sleep 0.1
    done
    die "redis-server did not answer PING on port $port within 10 s"
}

# Total calls of the given Redis commands since Redis started (from INFO commandstats).
redis_calls() {
    redis-cli -p "$REDIS_PORT" info commandstats | tr -d '\r' | awk -F'[:,=]' -v cmds=" $* " '
        { sub(/^cmdstat_/, "", $1) }
        index(cmds, " " $1 " ") && $2 == "calls" { n += $3 }
        END { print n + 0 }'
}

# How many times a Tollgate has lost Redis: its store logs each up -> down transition once, and
# the limiter counts locally until Redis answers again.
fallbacks_logged() { grep -c 'unreachable or too slow' "$WORK/$1.log" || true; }

# The Redis commands a limiter run issues for its decisions: one script call per request in
# exact mode, one INCRBY per caller and sync round in batched mode.
limiter_commands() {
    case $1 in
    tollgate-rl-exact) echo evalsha eval ;;
    tollgate-rl-batched) echo incrby ;;
    esac
}

# What a Tollgate run adds to plain Tollgate's config: nothing, or the never-reached tier limit
# (routes get the tier limits without a route setting; anonymous callers are keyed by client
# IP) in one of the limiter modes.
limiter_yaml() {
    [[ $1 == tollgate || $1 == tollgate-log ]] && return 0
    if [[ $1 == tollgate-gateway ]]; then
        cat <<EOF

tiers:
  pro: { limit: $RL_LIMIT, window: 1m }
consumers:
  - { id: bench, tier: pro, api_keys: ["$("$TOLLGATE_BIN" key hash "$BENCH_KEY")"] }
EOF
        return 0
    fi
    if [[ $1 == tollgate-plain ]]; then
        # The same work as the reference proxy: route and forward, no added headers.
        printf '\n'
        return 0
    fi
    cat <<EOF

tiers:
  anonymous: { limit: $RL_LIMIT, window: 1m }
EOF
    case $1 in
    tollgate-rl-local) ;; # no redis section: local mode
    tollgate-rl-exact | tollgate-rl-batched)
        echo "redis: { url: \"redis://127.0.0.1:$REDIS_PORT\", timeout: 50ms }"
        if [[ $1 == tollgate-rl-exact ]]; then
            echo "rate_limit: { mode: exact }"
        else
            echo "rate_limit: { mode: batched, sync_interval: 100ms }"
        fi
        ;;
    *) die "unknown Tollgate run: $1" ;;
    esac
}

# tollgate-plain: no X-Forwarded-*, X-Request-Id or traceparent, backend Server header kept (the
# reference proxy adds and removes nothing either); every other run keeps Tollgate's defaults.
plain_server_yaml() {
    [[ $1 == tollgate-plain ]] || return 0
    printf '  forwarded_headers: false\n  request_id_header: false\n  trace_context: false\n  hide_backend_server: false\n'
}

# Every Tollgate run logs nothing per request (like the NGINX and HAProxy runs), except
# tollgate-log: Tollgate's defaults with the JSON access log to a file.
access_log_of() {
    if [[ $1 == tollgate-log || $1 == tollgate-gateway ]]; then echo "\"$WORK/$1/access.log\""; else echo off; fi
}

# Tollgate's listeners: the measured port, in plain text or with TLS (then its required plain
# listener is on a port of its own, unused).
tollgate_listen() {
    if tls_transport; then
        printf '  listen: ["127.0.0.1:%s"]\n  listen_tls: [{ addr: "127.0.0.1:%s" }]\n' "${TOLLGATE_PLAIN_PORT[$1]}" "$2"
    else
        printf '  listen: ["127.0.0.1:%s"]\n' "$2"
    fi
}

# Tollgate as shipped, cut down to the benchmark: one worker thread, one route, one upstream with
# one backend, no health check (omitted), no admin listener. Its own pid file and upgrade
# socket so it never collides with another Tollgate on the machine. NAME is `tollgate` or one of
# the rate-limiter runs (see limiter_yaml).
start_tollgate() {
    local name=$1 port=$2 upstream=$3 dir="$WORK/$1"
    mkdir -p "$dir"
    {
        cat <<EOF
server:
$(tollgate_listen "$name" "$port")
  threads: 1
  grace_period: 1s
  access_log: $(access_log_of "$name")
$(plain_server_yaml "$name")
  pid_file: $dir/tollgate.pid
  upgrade_sock: $dir/tollgate_upgrade.sock

upstreams:
  bench:
    backends:
      - { addr: "127.0.0.1:$upstream" }

routes:
  - name: all
    match: { path_prefix: / }
    upstream: bench
$([[ $name == tollgate-gateway ]] && echo "    auth: required")
EOF
        if tls_transport; then
            printf '\ntls:\n  certificates:\n    - { name: bench, cert_file: "%s", key_file: "%s" }\n  default_certificate: bench\n' \
                "$CERT_DIR/bench.pem" "$CERT_DIR/bench.key"
        fi
        limiter_yaml "$name"
    } >"$dir/tollgate.yaml"
    "$TOLLGATE_BIN" -t -c "$dir/tollgate.yaml" >&2 || die "$name: tollgate rejected its config"
    # warn: per-request logging is not what we measure (Tollgate logs nothing per request at info
    # either; this only quiets start-up). Redis trouble is logged at error, so it stays visible.
    RUST_LOG=warn start "$name" "$PROXY_CPU" "$TOLLGATE_BIN" -c "$dir/tollgate.yaml"
}

# Start one proxy by its run name. Usage: start_proxy NAME PORT UPSTREAM_PORT
start_proxy() {
    case $1 in
    nginx | haproxy | reference | nginx-gateway) "start_$1" "$2" "$3" ;;
    tollgate | tollgate-plain | tollgate-log | tollgate-gateway | tollgate-rl-*) start_tollgate "$@" ;;
    *) die "unknown proxy: $1" ;;
    esac
}

# The rate-limiter runs must really be limiting: their answers carry the tier's limit.
check_limiter() {
    local name=$1 port=$2
    [[ $name == tollgate-rl-* ]] || return 0
    curl -sk -D - -o /dev/null "$(proxy_url "$name" "$port")" | tr -d '\r' |
        grep -qix "x-ratelimit-limit: $RL_LIMIT" ||
        die "$name answers without X-RateLimit-Limit: $RL_LIMIT (rate limiter not active?)"
}

# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------

# The machine's CPU ticks from /proc/stat: "total steal". Steal is time the hypervisor gave this
# VM's CPUs to someone else: a run with much of it measured a slower machine than its neighbours.
cpu_stat() { awk '/^cpu / { t = 0; for (i = 2; i <= 9; i++) t += $i; print t, $9; exit }' /proc/stat; }

# Resident memory in KiB, summed over a process and all its descendants.
rss_kib() {
    local pid total=0 kib
    for pid in $(tree_pids "$1"); do
        kib=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null) || continue
        total=$((total + ${kib:-0}))
    done
    echo "$total"
}

# COUNT=idle: the proxy's RSS before and with IDLE_CONNECTIONS idle keep-alive connections.
IDLE_RESULTS=()
run_idle() {
    local name=$1 port=${PROXY_PORT[$1]} pid=${PROXY_PID[$1]} before after line
    load "$WARMUP" "$(proxy_url "$name" "$port")" >/dev/null
    before=$(rss_kib "$pid")
    coproc IDLE { "$BENCH_REPORT" idle-connections "127.0.0.1:$port" "$IDLE_CONNECTIONS" "X-API-Key: $BENCH_KEY"; }
    read -r line <&"${IDLE[0]}" || die "$name: the idle connections could not be opened"
    [[ $line == "ready $IDLE_CONNECTIONS" ]] || die "$name: idle-connections said: $line"
    # Let the proxy settle (connections it is still finishing, allocator caches).
    sleep 2
    after=$(rss_kib "$pid")
    exec {IDLE[1]}>&-
    wait "$IDLE_PID" 2>/dev/null || true
    IDLE_RESULTS+=("$name $before $after")
    log "$(printf '%-19s RSS %8s KiB idle, %8s KiB with %s idle connections: %s bytes each' "$name" "$before" "$after" \
        "$IDLE_CONNECTIONS" $(((after - before) * 1024 / IDLE_CONNECTIONS)))"
    # The connections close; give the proxy a moment before the next one is measured.
    sleep 1
}

report_idle() {
    local name before after
    printf '# Memory per idle keep-alive connection\n\n'
    printf -- '- %s UTC, tollgate %s\n' "$(date -u '+%Y-%m-%d %H:%M')" "$(commit_measured)"
    printf -- '- %s connections opened one after another, one `GET /` each (HTTP/1.1 keep-alive, %s), then held idle; RSS summed over the proxy'"'"'s processes (VmRSS), 2 s after the last one\n\n' \
        "$IDLE_CONNECTIONS" "$TRANSPORT"
    printf '| proxy | RSS idle (MiB) | RSS with the connections (MiB) | bytes per connection |\n|---|---:|---:|---:|\n'
    for line in "${IDLE_RESULTS[@]}"; do
        read -r name before after <<<"$line"
        awk -v n="$name" -v b="$before" -v a="$after" -v c="$IDLE_CONNECTIONS" \
            'BEGIN { printf "| %s | %.1f | %.1f | %d |\n", n, b / 1024, a / 1024, (a - b) * 1024 / c }'
    done
}

# utime+stime in clock ticks, summed over a process and all its descendants.
cpu_ticks() {
    local pid total=0 stat fields
    for pid in $(tree_pids "$1"); do
        stat=$(cat "/proc/$pid/stat" 2>/dev/null) || continue
        # The command name (field 2) may hold spaces: cut everything up to its closing ')'.
        # shellcheck disable=SC2206
        fields=(${stat##*) })
        # After the cut, fields[0] is field 3 (state); utime and stime are fields 14 and 15.
        total=$((total + fields[11] + fields[12]))
    done
    echo "$total"
}

# Parse wrk --latency output into: rps p50_us p99_us requests socket_errors non_2xx
# (non_2xx = non-2xx/3xx responses; any error makes the run suspect).
parse_wrk() {
    awk '
        function us(v) {
            if (v ~ /us$/) return v + 0
            if (v ~ /ms$/) return v * 1000
            if (v ~ /s$/)  return v * 1000000
            return v + 0
        }
        $1 == "50%"               { p50 = us($2) }
        $1 == "99%"               { p99 = us($2) }
        $2 == "requests" && $3 == "in" { requests = $1 }
        /^Requests\/sec:/         { rps = $2 }
        /Non-2xx or 3xx/          { non2xx += $NF }
        /Socket errors:/ {
            for (i = 1; i <= NF; i++) if ($i ~ /^[0-9]+,?$/) errors += $i + 0
        }
        END {
            if (rps == "" || p50 == "" || p99 == "" || requests == "") exit 1
            printf "%s %.0f %.0f %s %d %d\n", rps, p50, p99, requests, errors, non2xx
        }'
}

# h2load's output in parse_wrk's shape: rps mean_us mean_us requests errors failed (h2load
# reports no percentiles: the mean stands in for both).
parse_h2load() {
    awk '
        function us(v) {
            if (v ~ /us$/) return v + 0
            if (v ~ /ms$/) return v * 1000
            if (v ~ /s$/)  return v * 1000000
            return v + 0
        }
        /^finished in/ { rps = $4 }
        /^requests:/ { done = $8; failed = $10; errored = $12 }
        /^time for request:/ { mean = us($6) }
        END {
            if (rps == "" || done == "" || mean == "") exit 1
            printf "%s %.0f %.0f %s %d %d\n", rps, mean, mean, done, errored, failed
        }'
}

# One load run of DURATION against URL, in the shape parse_load reads: wrk, or h2load for h2tls.
load() {
    local duration=$1 url=$2
    if [[ $TRANSPORT == h2tls ]]; then
        taskset -c "$LOAD_CPU" h2load -t"$WRK_THREADS" -c"$CONNECTIONS" -m10 -D"${duration%s}" \
            -H "X-API-Key: $BENCH_KEY" "$url"
    else
        taskset -c "$LOAD_CPU" wrk -t"$WRK_THREADS" -c"$CONNECTIONS" -d"$duration" --latency "${WRK_EXTRA[@]}" "$url"
    fi
}
parse_load() { if [[ $TRANSPORT == h2tls ]]; then parse_h2load; else parse_wrk; fi; }

# CPU microseconds per request from a clock-tick delta. Usage: per_req TICKS REQUESTS
per_req() { "$BENCH_REPORT" cpu-per-request "$1" "$CLK_TCK" "$2"; }

# One measured run of one proxy: warm-up (fills connection pools), then wrk with CPU sampled
# around it (the proxy's, and Redis's for the runs that use it). Appends a line to $RESULTS and
# prints it.
run_one() {
    local name=$1 round=$2 port=${PROXY_PORT[$1]} pid=${PROXY_PID[$1]}
    local url out before after parsed rps p50 p99 requests errors non2xx
    url=$(proxy_url "$name" "$port")
    local cpu_us redis_us=- redis_before redis_after calls_before calls_after note=""
    local fallbacks=- fallbacks_before steal stat_total0 stat_steal0 stat_total1 stat_steal1
    load "$WARMUP" "$url" >/dev/null
    if uses_redis "$name"; then
        # shellcheck disable=SC2046
        calls_before=$(redis_calls $(limiter_commands "$name"))
        fallbacks_before=$(fallbacks_logged "$name")
        redis_before=$(cpu_ticks "$REDIS_PID")
    fi
    before=$(cpu_ticks "$pid")
    read -r stat_total0 stat_steal0 <<<"$(cpu_stat)"
    out=$(load "$DURATION" "$url")
    read -r stat_total1 stat_steal1 <<<"$(cpu_stat)"
    after=$(cpu_ticks "$pid")
    steal=$("$BENCH_REPORT" steal-percent $((stat_steal1 - stat_steal0)) $((stat_total1 - stat_total0)))
    if uses_redis "$name"; then
        redis_after=$(cpu_ticks "$REDIS_PID")
        # shellcheck disable=SC2046
        calls_after=$(redis_calls $(limiter_commands "$name"))
        fallbacks=$(($(fallbacks_logged "$name") - fallbacks_before))
    fi
    echo "$out" >"$WORK/wrk.$name.$round.txt"
    kill -0 "$pid" 2>/dev/null || { tail -20 "$WORK/$name.log" >&2; die "$name died during the run"; }
    parsed=$(parse_load <<<"$out") || { echo "$out" >&2; die "cannot parse the load tool's output for $name"; }
    read -r rps p50 p99 requests errors non2xx <<<"$parsed"
    ((requests > 0)) || die "$name: the load completed no requests"
    cpu_us=$(per_req $((after - before)) "$requests")
    if uses_redis "$name"; then
        redis_us=$(per_req $((redis_after - redis_before)) "$requests")
        note=$(printf '  Redis %6s us CPU/req, %s %s calls' "$redis_us" \
            $((calls_after - calls_before)) "$(limiter_commands "$name" | cut -d' ' -f1)")
    fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$round" "$rps" "$p50" "$p99" \
        "$cpu_us" "$requests" "$errors" "$non2xx" "$redis_us" "$fallbacks" "$steal" >>"$RESULTS"
    log "$(printf 'round %s  %-19s %8.0f req/s  p50 %6s us  p99 %6s us  %6s us CPU/req  steal %4s%%  errors %s  non-2xx %s%s' \
        "$round" "$name" "$rps" "$p50" "$p99" "$cpu_us" "$steal" "$errors" "$non2xx" "$note")"
    ((errors + non2xx == 0)) || log "WARNING: $name had $errors socket errors and $non2xx non-2xx answers in round $round"
    # A limiter that lost Redis falls back to local counting and would pass for a Redis run.
    if [[ $fallbacks != - ]] && ((fallbacks > 0)); then
        log "WARNING: $name lost Redis during the run ($fallbacks fallback(s) logged): it counted locally for a while"
    fi
    if [[ $name == tollgate-rl-exact ]] && ((calls_after - calls_before < requests)); then
        log "WARNING: $name: $((calls_after - calls_before)) Redis script calls for $requests requests: it fell back to local counting"
    elif [[ $name == tollgate-rl-batched ]] && ((calls_after == calls_before)); then
        log "WARNING: $name: no delta reached Redis during the run: it fell back to local counting"
    fi
}

# Dump a callgrind-run proxy's counters and print the instructions since they were last zeroed
# (callgrind writes one file per dump; this sums what this dump wrote).
callgrind_dump() {
    local name=$1 pid=$2 dump ir=0
    rm -f "$WORK/$name.callgrind".*
    callgrind_control -d "$pid" >/dev/null 2>&1
    for dump in "$WORK/$name.callgrind".*; do
        [[ -e $dump ]] || continue
        ir=$((ir + $(awk '/^(summary|totals):/ { print $2; exit }' "$dump")))
    done
    echo "$ir"
}

# COUNT=instructions: one run of one proxy under callgrind. Counters are zeroed after the warm-up
# and dumped after the wrk run, so the dump holds exactly the measured requests' instructions
# (every thread of the process: workers, runtime, background services).
run_one_instructions() {
    local name=$1 round=$2 port=${PROXY_PORT[$1]} pid=${PROXY_PID[$1]}
    local url out parsed rps p50 p99 requests errors non2xx dump ir per
    local idle_ir
    url=$(proxy_url "$name" "$port")
    taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"$WARMUP" "${WRK_EXTRA[@]}" "$url" >/dev/null
    # The idle cost over the same time (timer threads, health and clock ticks) is counted first
    # and taken off: what is left is what the requests cost.
    callgrind_control -z "$pid" >/dev/null 2>&1
    sleep "$DURATION"
    idle_ir=$(callgrind_dump "$name" "$pid")
    callgrind_control -z "$pid" >/dev/null 2>&1
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "${WRK_EXTRA[@]}" "$url")
    ir=$(callgrind_dump "$name" "$pid")
    kill -0 "$pid" 2>/dev/null || { tail -20 "$WORK/$name.log" >&2; die "$name died during the run"; }
    parsed=$(parse_wrk <<<"$out") || { echo "$out" >&2; die "cannot parse wrk output for $name"; }
    read -r rps p50 p99 requests errors non2xx <<<"$parsed"
    ((requests > 0)) || die "$name: wrk completed no requests"
    ((ir > 0)) || die "$name: no callgrind dump"
    per=$("$BENCH_REPORT" instructions-per-request "$ir" "$idle_ir" "$requests")
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t-\t-\t-\n' "$name" "$round" "$rps" "$p50" "$p99" \
        "$per" "$requests" "$errors" "$non2xx" >>"$RESULTS"
    log "$(printf 'round %s  %-19s %6s requests  %8s instructions/req  errors %s  non-2xx %s' \
        "$round" "$name" "$requests" "$per" "$errors" "$non2xx")"
}

# A tool's version, for the report (wrk -v exits 1: a version never fails the script).
version_of() {
    case $1 in
    nginx) nginx -v 2>&1 | sed 's/^nginx version: //' ;;
    haproxy) haproxy -v | awk 'NR == 1 { print $3 }' ;;
    wrk) wrk -v 2>&1 | awk 'NR == 1 { print $1, $2 }' ;;
    redis-server) redis-server --version | awk '{ sub(/^v=/, "", $3); print $3 }' ;;
    esac || true
}

# The commit measured: its short hash, and " (dirty)" when the work tree differs from it.
commit_measured() {
    local commit dirty=
    commit=$(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null) || commit='?'
    (cd "$REPO" && git diff --quiet HEAD 2>/dev/null) || dirty=' (dirty)'
    echo "$commit$dirty"
}

# The markdown report of $RESULTS (tools/bench-report renders it): COUNT=cpu gives medians per
# proxy with the ratios, then the rate limiter's cost; COUNT=instructions gives instructions per
# request. The program is told what the results do not hold: when, which commit, the settings,
# and for COUNT=cpu the machine, the tools' versions and how often each Redis run's log says it
# lost Redis over the whole benchmark (the results count the losses during measured runs).
report() {
    local name args
    args=(--proxies "${PROXIES[*]}" --date "$(date -u '+%Y-%m-%d %H:%M UTC')" --commit "$(commit_measured)"
        --warmup "$WARMUP" --connections "$CONNECTIONS" --duration "$DURATION" --rounds "$ROUNDS")
    if [[ $COUNT == instructions ]]; then
        "$BENCH_REPORT" report-instructions "$RESULTS" "${args[@]}"
        return
    fi
    args+=(--cores "$(nproc)" --cpu-model "$(awk -F': ' '/model name/ { print $2; exit }' /proc/cpuinfo)"
        --proxy-cpu "$PROXY_CPU" --load-cpu "$LOAD_CPU" --upstream-cpu "$UPSTREAM_CPU"
        --redis-cpu "$REDIS_CPU" --wrk-threads "$WRK_THREADS" --rl-limit "$RL_LIMIT"
        --nginx "$(version_of nginx)" --haproxy "$(version_of haproxy)" --wrk "$(version_of wrk)")
    if needs_redis; then
        args+=(--redis "$(version_of redis-server)")
        for name in "${PROXIES[@]}"; do
            if uses_redis "$name"; then args+=(--redis-losses "$name=$(fallbacks_logged "$name")"); fi
        done
    fi
    "$BENCH_REPORT" report "$RESULTS" "${args[@]}"
}

# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
main() {
    local ports upstream_port name round i order
    local -A seen=()
    ((${#PROXIES[@]})) || die "PROXIES is empty"
    for name in "${PROXIES[@]}"; do
        [[ " ${ALL_PROXIES[*]} " == *" $name "* ]] || die "unknown proxy in PROXIES: $name (known: ${ALL_PROXIES[*]})"
        [[ $COUNT != instructions || $name == reference || $name == tollgate* ]] ||
            die "COUNT=instructions measures the pingora-based proxies only (reference, tollgate*), not $name"
        [[ -z ${seen[$name]:-} ]] || die "proxy listed twice in PROXIES: $name"
        seen[$name]=1
    done
    [[ $COUNT == cpu || $COUNT == instructions || $COUNT == idle ]] || die "COUNT is cpu, instructions or idle, not $COUNT"
    if [[ $COUNT == idle ]]; then
        [[ $TRANSPORT == plain ]] || die "COUNT=idle opens plain HTTP/1.1 connections: TRANSPORT=plain only"
        # Every connection is a descriptor in the proxy and in the client.
        ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
        # HAProxy reserves two descriptors per connection (client and server side) up front.
        local most=$((($(ulimit -n) - 200) / 2 - 500))
        if ((IDLE_CONNECTIONS > most)); then
            log "ulimit -n is $(ulimit -n) here (a container's hard limit): $most idle connections instead of $IDLE_CONNECTIONS"
            IDLE_CONNECTIONS=$most
        fi
    fi
    [[ " plain tls tls-new h2tls " == *" $TRANSPORT "* ]] || die "TRANSPORT is plain, tls, tls-new or h2tls, not $TRANSPORT"
    [[ $COUNT != instructions || $TRANSPORT != h2tls ]] || die "COUNT=instructions runs wrk: not with TRANSPORT=h2tls"
    ensure_tools
    make_certs
    build
    CLK_TCK=$(getconf CLK_TCK)
    (($(nproc) >= 2)) || log "WARNING: one core only: proxy and load share it, numbers are not meaningful"

    # shellcheck disable=SC2207
    ports=($(free_ports $((2 * ${#PROXIES[@]} + 2))))
    upstream_port=${ports[0]}
    REDIS_PORT=${ports[1]}
    for i in "${!PROXIES[@]}"; do
        PROXY_PORT[${PROXIES[$i]}]=${ports[$((i + 2))]}
        TOLLGATE_PLAIN_PORT[${PROXIES[$i]}]=${ports[$((i + 2 + ${#PROXIES[@]}))]}
    done

    log "upstream NGINX on 127.0.0.1:$upstream_port (CPU $UPSTREAM_CPU)"
    start_upstream "$upstream_port"
    if needs_redis; then
        start_redis "$REDIS_PORT"
        log "redis-server on 127.0.0.1:$REDIS_PORT (pid $REDIS_PID, CPU $REDIS_CPU)"
    fi

    # All proxies stay up for the whole benchmark: an idle proxy costs nothing, and starting them
    # once keeps start-up work (and Tollgate's first health/config pass) out of every run.
    for name in "${PROXIES[@]}"; do
        start_proxy "$name" "${PROXY_PORT[$name]}" "$upstream_port"
        PROXY_PID[$name]=$LAST_PID
        wait_ready "$name" "${PROXY_PORT[$name]}" "$LAST_PID"
        check_limiter "$name" "${PROXY_PORT[$name]}"
        log "$name on 127.0.0.1:${PROXY_PORT[$name]} (pid $LAST_PID, CPU $PROXY_CPU)"
    done

    if [[ $COUNT == idle ]]; then
        for name in "${PROXIES[@]}"; do run_idle "$name"; done
        mkdir -p "$(dirname "$BENCH_OUT")"
        report_idle >"$BENCH_OUT"
        echo
        cat "$BENCH_OUT"
        log "written to $BENCH_OUT"
        return 0
    fi
    : >"$RESULTS"
    for round in $(seq "$ROUNDS"); do
        # Rotate the order each round so no proxy always runs first (or right after another).
        order=()
        for i in "${!PROXIES[@]}"; do
            order+=("${PROXIES[$(((i + round - 1) % ${#PROXIES[@]}))]}")
        done
        for name in "${order[@]}"; do
            if [[ $COUNT == instructions ]]; then
                run_one_instructions "$name" "$round"
            else
                run_one "$name" "$round"
            fi
        done
    done

    mkdir -p "$(dirname "$BENCH_OUT")"
    {
        [[ $TRANSPORT == plain ]] || printf 'Transport: %s (see TRANSPORT in scripts/bench.sh)\n\n' "$TRANSPORT"
        report
    } >"$BENCH_OUT"
    echo
    cat "$BENCH_OUT"
    echo
    log "written to $BENCH_OUT"
}

main "$@"
