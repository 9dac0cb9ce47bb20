# The hub's container image (for the terraform module's instance group and Cloud Run).
# docker build -t REGION-docker.pkg.dev/PROJECT/workspace-hub/hub:TAG .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release -p workspace-hub --bin workspace-hub

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/workspace-hub /usr/local/bin/workspace-hub
ENTRYPOINT ["workspace-hub"]
CMD ["serve", "--config", "/etc/workspace-hub/hub.toml"]
