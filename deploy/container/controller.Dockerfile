# walbridge-controller image. Build from the repository root:
#   docker build -f deploy/container/controller.Dockerfile -t walbridge-controller .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p walbridge-controller -p walbridge-cli

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/walbridge walbridge \
 && mkdir -p /var/lib/walbridge/controller && chown -R walbridge /var/lib/walbridge
COPY --from=build /src/target/release/walbridge-controller /usr/local/bin/walbridge-controller
# The CLI, for `kubectl exec ... walbridge status` over the unix socket.
COPY --from=build /src/target/release/walbridge /usr/local/bin/walbridge
ENV WALBRIDGE_DATA_DIR=/var/lib/walbridge/controller
VOLUME ["/var/lib/walbridge/controller"]
USER 10001
EXPOSE 7400 7401 9187
ENTRYPOINT ["/usr/local/bin/walbridge-controller"]
