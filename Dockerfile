# syntax=docker/dockerfile:1.7
# The three component images, from one build stage:
#   docker build --target cluster-gateway       --tag buildplane/cluster-gateway:dev .
#   docker build --target buildplane-controller --tag buildplane/buildplane-controller:dev .
#   docker build --target cluster-agent         --tag buildplane/cluster-agent:dev .
# `cargo xtask k3d up` (or `deploy`) runs these and imports the images with `k3d image import`.

ARG RUST_VERSION=1.89
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
COPY . .
# The registry and target caches survive between builds (BuildKit); the binaries are copied out
# of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        -p cluster-gateway -p cluster-agent -p buildplane-controller \
 && mkdir -p /out \
 && cp target/release/cluster-gateway target/release/cluster-agent target/release/buildplane-controller /out/

# A small Debian rather than distroless: the harness runs `cat` and the agent's own subcommands
# in agent pods with `kubectl exec`. The manifests run every container as user 65532.
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
RUN groupadd --gid 65532 nonroot \
 && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin nonroot
USER 65532:65532

FROM runtime AS cluster-gateway
COPY --from=builder /out/cluster-gateway /usr/local/bin/cluster-gateway
EXPOSE 8443 8444 8080
ENTRYPOINT ["/usr/local/bin/cluster-gateway"]

FROM runtime AS buildplane-controller
COPY --from=builder /out/buildplane-controller /usr/local/bin/buildplane-controller
EXPOSE 8082
ENTRYPOINT ["/usr/local/bin/buildplane-controller"]

FROM runtime AS cluster-agent
COPY --from=builder /out/cluster-agent /usr/local/bin/cluster-agent
EXPOSE 8081
ENTRYPOINT ["/usr/local/bin/cluster-agent"]
