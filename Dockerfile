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
# The shipped routes.toml reads these (see its ${VAR:-default} values). The store is redb
# (the default) in the volume. The listeners are reachable from outside the container, so
# `check` and `serve` refuse to start without an admin token, and with the development
# fallback of any secret the relay checks: pass them at run time (an env file is easiest),
#   docker run --env-file hookrelay.env -p 8080:8080 -p 9090:9090 hookrelay
# with HOOKRELAY_ADMIN_TOKEN, HOOKRELAY_TOKEN_SECRET, VOICE_AUTH, SMS_CLIENT_SECRET,
# CHATAPPS_CLIENT_SECRET, DIDS_SIGNING_SECRET, CALLS_SIGNING_SECRET and CALLS_KEY set
# (e.g. each to "$(openssl rand -hex 32)"). Send the admin token as
# `Authorization: Bearer <token>` (the console at :9090 asks for it).
ENV HOOKRELAY_CONFIG=/etc/hookrelay/routes.toml \
    HOOKRELAY_DATA=/var/lib/hookrelay/data \
    HOOKRELAY_LISTEN=0.0.0.0:8080 \
    HOOKRELAY_ADMIN_LISTEN=0.0.0.0:9090
# 8080: ingress (listen), 9090: admin (admin_listen).
EXPOSE 8080 9090
ENTRYPOINT ["hookrelay"]
CMD ["serve"]
