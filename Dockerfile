# syntax=docker/dockerfile:1
#
# meshlet's three images from one file, one target each:
#
#   docker build --target sidecar       -t meshlet/sidecar:0.1.0 .
#   docker build --target control-plane -t meshlet/control-plane:0.1.0 .
#   docker build --target demo-service  -t meshlet/demo-service:0.1.0 .
#
# One file rather than three because the binaries share one workspace and
# nearly all their dependencies: the `builder` stage compiles the workspace
# once for all of them (BuildKit caches it between the three builds), where
# three Dockerfiles would compile the same crates three times and repeat
# the same builder stage.
#
# Final images are small and run as non-root users: the sidecar on
# debian:bookworm-slim (its init container needs `iptables`, nft and legacy),
# the others on distroless cc (glibc, no shell, UID 65532).

ARG RUST_IMAGE=rust:1-bookworm

FROM ${RUST_IMAGE} AS builder
# protoc: the etcd client crate compiles etcd's .proto files (--store etcd).
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The `dist` profile (Cargo.toml): release plus fat LTO and one codegen
# unit. Line tables are for local profiling; images do without them.
ENV CARGO_PROFILE_DIST_DEBUG=false \
    CARGO_PROFILE_DIST_STRIP=symbols \
    CARGO_PROFILE_DIST_INCREMENTAL=false
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --profile dist --locked \
        --bin sidecar --bin control-plane --bin meshctl --bin demo-service \
    && mkdir -p /out \
    && cp target/dist/sidecar target/dist/control-plane \
          target/dist/meshctl target/dist/demo-service /out/

# The proxy and its init container (`sidecar init-iptables`, which runs as
# root with NET_ADMIN/NET_RAW only in the injected init container).
FROM debian:bookworm-slim AS sidecar
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 1337 meshlet \
    && useradd --uid 1337 --gid 1337 --no-create-home --shell /usr/sbin/nologin meshlet
COPY --from=builder /out/sidecar /usr/local/bin/sidecar
USER 1337:1337
EXPOSE 15001 15006 15020
ENTRYPOINT ["/usr/local/bin/sidecar"]

# The control plane, with meshctl beside it (`kubectl exec ... -- meshctl`),
# and cat (distroless has no shell), so that the CA it writes can be read
# out: `kubectl exec ... -- cat /var/lib/meshlet/ca.crt` (examples/kind/up.sh).
FROM gcr.io/distroless/cc-debian12:nonroot AS control-plane
COPY --from=builder /out/control-plane /out/meshctl /usr/local/bin/
COPY --from=builder /usr/bin/cat /usr/local/bin/cat
USER 65532:65532
EXPOSE 15010
ENTRYPOINT ["/usr/local/bin/control-plane"]
# (the manifests mount a volume at /var/lib/meshlet and pass their own args)
CMD ["--listen", "0.0.0.0:15010", "--data-dir", "/home/nonroot/meshlet-data"]

# The demo app of examples/ (listens on 127.0.0.1, next to its sidecar).
FROM gcr.io/distroless/cc-debian12:nonroot AS demo-service
COPY --from=builder /out/demo-service /usr/local/bin/demo-service
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/demo-service"]
