# syntax=docker/dockerfile:1
# One image with both binaries: `tollgate` (the gateway, the default command) and
# `upstream-demo` (the demo backend). docker-compose.yml runs the whole demo from it:
#
#   docker compose up --build
#   curl -s localhost:8080/api/v1/status
#
# Or alone:  docker build -t tollgate . && docker run --rm -p 8080:8080 tollgate

# --- build ---------------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the target dir between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tollgate -p upstream-demo \
    && mkdir -p /out \
    && cp target/release/tollgate target/release/upstream-demo /out/

# --- run -----------------------------------------------------------------------------------------
FROM debian:bookworm-slim
# curl for HEALTHCHECK, openssl to generate the demo's JWT key pair (compose's jwt-keys service).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl openssl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /app --shell /usr/sbin/nologin tollgate
WORKDIR /app
COPY --from=builder /out/tollgate /out/upstream-demo /usr/local/bin/
COPY conf/ /app/conf/
RUN mkdir -p /app/run/jwt && chown -R tollgate:tollgate /app
USER tollgate:tollgate
EXPOSE 8080 9090
# The gateway answers its admin /metrics on loopback; an upstream-demo container sets
# HEALTHCHECK_URL to its own /health instead.
ENV HEALTHCHECK_URL=http://127.0.0.1:9090/metrics
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD curl -fsS -o /dev/null "$HEALTHCHECK_URL" || exit 1
STOPSIGNAL SIGTERM
CMD ["tollgate", "-c", "/app/conf/tollgate.yaml"]
