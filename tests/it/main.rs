//! Every integration test in one binary (one link of the AWS SDK instead of one per file),
//! a module per area. They talk to the real RabbitMQ and Redis (addresses from
//! `RELAY_TEST_AMQP_ADDR` / `RELAY_TEST_REDIS_ADDR`, default 127.0.0.1:5672 / :6379) and to an
//! in-process ecs-sim; `scripts/test.sh` makes sure the services are up.

#[macro_use]
mod common;

mod adaptive;
mod cli;
mod decoder_props;
mod deploy;
mod dlq;
mod edges;
mod fairness;
mod faults;
mod fencing;
mod ha_fixture;
mod identity_props;
mod inspect;
mod layers;
mod model;
mod nemesis;
mod nemesis_plan;
mod observability;
mod producers;
mod rabbit_cluster_fixture;
mod rabbit_ha;
mod rabbit_order;
mod recovery;
mod redis_ha;
mod rejects;
mod scaling;
mod schema;
mod security;
mod sentinel_auth;
mod store_loss;
mod tls;
mod upstream;
mod workers;
