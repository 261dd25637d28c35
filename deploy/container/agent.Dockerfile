# walbridge-agent image. Build from the repository root:
#   docker build -f deploy/container/agent.Dockerfile -t walbridge-agent .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p walbridge-agent

FROM debian:bookworm-slim
# pg_dump from PGDG: the newest major dumps every older server, and the
# agent refuses a pg_dump older than its source.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates postgresql-common \
 && /usr/share/postgresql-common/pgdg/apt.postgresql.org.sh -y \
 && apt-get install -y --no-install-recommends postgresql-client-18 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/walbridge walbridge \
 && mkdir -p /var/lib/walbridge/agent && chown -R walbridge /var/lib/walbridge
COPY --from=build /src/target/release/walbridge-agent /usr/local/bin/walbridge-agent
ENV WALBRIDGE_DATA_DIR=/var/lib/walbridge/agent \
    WALBRIDGE_SOURCE_PG_DUMP=/usr/lib/postgresql/18/bin/pg_dump
VOLUME ["/var/lib/walbridge/agent"]
USER 10001
ENTRYPOINT ["/usr/local/bin/walbridge-agent"]
