# syntax=docker/dockerfile:1
# plinthd: every Plinth component in one binary; `--only X` picks one.
#
#   docker build -t plinth:dev .
#   docker run --rm -p 8080:8080 -p 50051:50051 plinth:dev                  # all components, embedded defaults
#   docker run --rm plinth:dev --only auth                                  # one component (set PLINTH_DATABASE_URL etc.)
#
# The runtime image is distroless (no shell, no package manager), runs as the
# unprivileged user 65532 and writes nothing outside PLINTH_DATA_DIR, which is
# only used when no PLINTH_DATABASE_URL is set: run it with a read-only root
# filesystem and mount a volume there for the embedded SQLite files. There is
# no HEALTHCHECK: orchestrators probe grpc.health.v1 on 50051 or /healthz on 8080.

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
# protox compiles the protos in build.rs: no protoc and no system libraries
# (rustls with ring, bundled SQLite) are needed beyond the image's C compiler.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p plinthd \
 && install -D -m 0755 target/release/plinthd /out/bin/plinthd \
 && install -d -m 0750 /out/data

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="plinthd" \
      org.opencontainers.image.description="Plinth shared backend services: gateway, config, queue, audit, ai, auth" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/bin/plinthd /usr/local/bin/plinthd
COPY --from=build --chown=65532:65532 /out/data /var/lib/plinth
ENV PLINTH_DATA_DIR=/var/lib/plinth
WORKDIR /var/lib/plinth
USER 65532:65532
# 50051: gRPC (every component, grpc.health.v1, reflection)
# 8080: HTTP (the gateway's HTTP/JSON, /metrics, /healthz, /readyz)
EXPOSE 50051 8080
ENTRYPOINT ["/usr/local/bin/plinthd"]
