//! ecs-state-relay: the ECS agent's task event handler as a fleet-wide service.
//!
//! RabbitMQ shard queues → validation ([`wire`]) → one atomic Redis script per delivery batch
//! ([`store`], scripts in `src/lua/`) → per-task senders ([`sender`]) under a fleet-wide Redis
//! semaphore ([`semaphore`]) → ECS ([`ecs`]). See docs/architecture.md.

pub mod amqp;
pub mod bench;
pub mod config;
pub mod demo;
pub mod dlq;
pub mod ecs;
pub mod metrics;
pub mod publish;
pub mod redis_link;
pub mod semaphore;
pub mod sender;
pub mod shard;
pub mod sim;
pub mod status;
pub mod store;
pub mod wire;
pub mod worker;
