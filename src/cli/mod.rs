//! Operator commands beside the service: they use [`crate::relay`], never the other way round.

pub mod bench;
pub mod demo;
pub mod dlq;
pub mod inspect;
pub mod publish;
pub mod status;

/// `a x, b y`: pairs (a worker and its rules, a worker and what it sent) on one line.
fn pairs<A: std::fmt::Display, B: std::fmt::Display>(
    items: impl IntoIterator<Item = (A, B)>,
) -> String {
    items
        .into_iter()
        .map(|(a, b)| format!("{a} {b}"))
        .collect::<Vec<_>>()
        .join(", ")
}
