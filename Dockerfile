# hookrelay: multi-stage build (Debian bookworm builder, slim runtime), non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin hookrelay

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /var/lib/hookrelay hookrelay \
 && mkdir -p /etc/hookrelay /var/lib/hookrelay \
 && chown hookrelay /var/lib/hookrelay
COPY --from=build /src/target/release/hookrelay /usr/local/bin/hookrelay
COPY routes.toml /etc/hookrelay/routes.toml
VOLUME ["/var/lib/hookrelay"]
USER hookrelay
WORKDIR /var/lib/hookrelay
# The shipped routes.toml reads these (see its ${VAR:-default} values).
ENV HOOKRELAY_CONFIG=/etc/hookrelay/routes.toml \
    HOOKRELAY_DATA=/var/lib/hookrelay/data \
    HOOKRELAY_LISTEN=0.0.0.0:8080 \
    HOOKRELAY_ADMIN_LISTEN=0.0.0.0:9090
# 8080: ingress (listen), 9090: admin (admin_listen).
EXPOSE 8080 9090
ENTRYPOINT ["hookrelay"]
CMD ["serve"]
