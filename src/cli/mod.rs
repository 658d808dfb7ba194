//! Operator commands beside the service: they use [`crate::relay`], never the other way round.

pub mod bench;
pub mod demo;
pub mod dlq;
pub mod inspect;
pub mod publish;
pub mod status;
