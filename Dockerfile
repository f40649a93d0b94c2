# Multi-stage build: compile with the full Rust toolchain, run on a slim Debian as a non-root user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY sql ./sql
RUN cargo build --release --locked --bin outbox-relay

FROM debian:bookworm-slim
# OpenSSL for TLS to Kafka and PostgreSQL; the CA bundle for verifying servers without a CA file.
RUN apt-get update && apt-get install -y --no-install-recommends libssl3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin relay
COPY --from=build /src/target/release/outbox-relay /usr/local/bin/outbox-relay
USER 10001
ENV OUTBOX_RELAY_METRICS__LISTEN=0.0.0.0:9187
EXPOSE 9187
ENTRYPOINT ["outbox-relay"]
CMD ["run"]
