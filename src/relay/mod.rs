//! The service: what runs in production as `ecs-state-relay worker`.
//!
//! [`worker`] owns shards by Redis lease; each [`shard`] consumes its queue ([`amqp`]),
//! validates ([`wire`], ARNs by [`arn`]) and stores ([`store`]) deliveries, keeps rejected ones for the
//! [`dead_letter`] queue, and runs the [`sender`]s, which call
//! ECS ([`ecs`]) under the fleet-wide [`semaphore`], which admits by the [`adaptive`] limit. [`redis_link`] is the way to Redis,
//! [`config`] the settings and [`metrics`] every exported figure.

pub mod adaptive;
pub mod amqp;
pub mod arn;
pub mod config;
pub mod dead_letter;
pub mod ecs;
pub mod events;
pub mod logging;
pub mod metrics;
pub mod producers;
pub mod redis_link;
pub mod schedule;
pub mod semaphore;
pub mod sender;
pub mod shard;
pub mod store;
pub mod wire;
pub mod worker;
