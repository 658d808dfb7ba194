//! ecs-state-relay: the ECS agent's task event handler as a fleet-wide service.
//!
//! Three roles, with dependencies pointing one way (`cli` → `relay`; `sim` stands alone):
//! - [`relay`]: the service that runs in production (the `worker` command): RabbitMQ shard
//!   queues → validation → one atomic Redis script per delivery batch → per-task senders under
//!   a fleet-wide Redis semaphore → ECS.
//! - [`cli`]: the operator commands beside it: `publish`, `status`, `dlq`, `demo`, `bench`.
//! - [`sim`]: `ecs-sim`, a local stand-in for the ECS endpoint (tests, demo, benchmark).
//!
//! See docs/architecture.md for the map of folders and the path of one event.

pub mod cli;
pub mod relay;
pub mod sim;
