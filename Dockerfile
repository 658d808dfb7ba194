# ecs-state-relay: multi-stage build, small non-root runtime image.
#   docker build -t ecs-state-relay .
# The image holds both binaries: `ecs-state-relay` (entrypoint; default command `worker`) and
# `ecs-sim` (the local ECS stand-in used by docker-compose.yml; never for production).

FROM rust:1-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them (aws-sdk-ecs is a long build).
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin && echo 'fn main() {}' > src/main.rs && echo 'fn main() {}' > src/bin/ecs-sim.rs \
    && touch src/lib.rs && cargo build --release --locked && rm -rf src
COPY src ./src
RUN touch src/main.rs src/lib.rs src/bin/ecs-sim.rs && cargo build --release --locked \
    && strip target/release/ecs-state-relay target/release/ecs-sim

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin relay
COPY --from=build /src/target/release/ecs-state-relay /src/target/release/ecs-sim /usr/local/bin/
USER 10001:10001
ENV RELAY_METRICS_ADDR=0.0.0.0:9464 RELAY_LOG_FORMAT=json
EXPOSE 9464
ENTRYPOINT ["ecs-state-relay"]
CMD ["worker"]
