# syntax=docker/dockerfile:1
# Multi-stage build: a Rust toolchain image compiles the release binary; the runtime
# image is Debian slim with CA certificates and a non-root user.
#   docker build -t sandkeep .
#   docker run --rm --stop-timeout 40 -v sk-run:/run/sandkeep -v sk-ws:/workspace \
#     -e SANDKEEP_REMOTE_ENDPOINT=... -e SANDKEEP_REMOTE_BUCKET=... sandkeep
# --stop-timeout (compose: stop_grace_period) must exceed shutdown.deadline (25 s):
# Docker's default of 10 s would SIGKILL the final sync.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY benches ./benches
RUN cargo build --release --locked --bin sandkeep \
 && strip target/release/sandkeep

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 sandkeep \
 && useradd --system --uid 10001 --gid sandkeep --home-dir /var/lib/sandkeep --shell /usr/sbin/nologin sandkeep \
 && mkdir -p /run/sandkeep /var/lib/sandkeep /etc/sandkeep /workspace \
 && chown sandkeep:sandkeep /run/sandkeep /var/lib/sandkeep /workspace \
 && chmod 0700 /var/lib/sandkeep
COPY --from=build /src/target/release/sandkeep /usr/local/bin/sandkeep
COPY config/sandkeep.toml /etc/sandkeep/sandkeep.toml
USER 10001:10001
ENV SANDKEEP_LOG=info
VOLUME ["/run/sandkeep", "/var/lib/sandkeep", "/workspace"]
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
  CMD ["/usr/local/bin/sandkeep", "--config", "/etc/sandkeep/sandkeep.toml", "status", "--ready"]
ENTRYPOINT ["/usr/local/bin/sandkeep"]
CMD ["serve", "--config", "/etc/sandkeep/sandkeep.toml"]
