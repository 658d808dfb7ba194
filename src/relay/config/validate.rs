//! [`WorkerConfig::validate`]: the combinations of settings that would break a guarantee,
//! every one reported at once, and the [`Validated`] configuration a worker runs on.

use std::time::Duration;

use super::{AuthMode, WorkerConfig, CALL_MARGIN};

/// How much longer than the call timeout a permit lease must be at least.
const PERMIT_SLACK_MS: u64 = 1_000;

/// A configuration that passed [`WorkerConfig::validate`]: the only kind a worker runs on.
#[derive(Clone)]
pub struct Validated(WorkerConfig);

impl Validated {
    /// Puts the password files' secrets into the URLs (read once, at start): they change no
    /// other setting, so the configuration stays valid.
    pub fn with_secrets(mut self) -> anyhow::Result<Validated> {
        self.0.conn.resolve_secrets()?;
        Ok(self)
    }

    pub fn into_inner(self) -> WorkerConfig {
        self.0
    }
}

impl std::ops::Deref for Validated {
    type Target = WorkerConfig;
    fn deref(&self) -> &WorkerConfig {
        &self.0
    }
}

/// Every problem of a configuration, one per line of the message.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  {}", .0.join("\n  "))]
pub struct ConfigErrors(pub Vec<String>);

impl WorkerConfig {
    /// Checks the combinations that would break a guarantee and reports every one at once,
    /// each naming its settings; the [`Validated`] configuration is what a worker runs on.
    pub fn validate(self) -> Result<Validated, ConfigErrors> {
        let problems = self.problems();
        if problems.is_empty() {
            Ok(Validated(self))
        } else {
            Err(ConfigErrors(problems))
        }
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.drain_min_ms == 0 || self.drain_min_ms > self.drain_max_ms {
            problems.push("RELAY_DRAIN_MIN_MS must be > 0 and <= RELAY_DRAIN_MAX_MS".into());
        }
        if self.concurrency_min > self.concurrency_limit {
            problems.push("RELAY_CONCURRENCY_MIN must be <= RELAY_CONCURRENCY_LIMIT".into());
        }
        // Shorter than a call, one overload would be halved many times over; the upper bound
        // keeps the hash's expiry (60 windows) in range.
        if !(50..=600_000).contains(&self.adaptive_window_ms) {
            problems.push("RELAY_ADAPTIVE_WINDOW_MS must be between 50 and 600000".into());
        }
        if self.backoff_min_ms == 0 || self.backoff_min_ms > self.backoff_max_ms {
            problems.push("RELAY_BACKOFF_MIN_MS must be > 0 and <= RELAY_BACKOFF_MAX_MS".into());
        }
        if self.call_timeout_ms == 0 {
            problems.push("RELAY_CALL_TIMEOUT_MS must be > 0".into());
        }
        // A call that outlived its permit could run beside a call that took the expired permit;
        // the extra second lets a permit be handed to the next call of the same worker.
        let permit_min = self.call_timeout_ms.saturating_add(PERMIT_SLACK_MS);
        if self.permit_lease_ms < permit_min {
            problems.push(format!(
                "RELAY_PERMIT_LEASE_MS ({}) must be at least RELAY_CALL_TIMEOUT_MS + {PERMIT_SLACK_MS} ({permit_min})",
                self.permit_lease_ms
            ));
        }
        if self.lease_ms < 300 {
            problems.push("RELAY_LEASE_MS must be at least 300".into());
        }
        // A call starts only while the shard lease surely covers it, and the lease is renewed
        // every third of its time: a whole call must fit in what is left just before a renewal.
        let call_max = self.call_window().as_millis() as u64;
        if self.call_timeout_ms > call_max {
            problems.push(format!(
                "RELAY_CALL_TIMEOUT_MS ({}) must fit in the shard lease: at most 7/15 of RELAY_LEASE_MS less {} ms ({call_max} with RELAY_LEASE_MS={})",
                self.call_timeout_ms,
                CALL_MARGIN.as_millis(),
                self.lease_ms
            ));
        }
        // The largest message with its held header must fit, or a hold would refuse it always.
        if self.dead_letter_hold_bytes < 2 * crate::relay::wire::MAX_MESSAGE_BYTES as u64 {
            problems.push(format!(
                "RELAY_DEAD_LETTER_HOLD_BYTES must be at least {} (two of the largest messages)",
                2 * crate::relay::wire::MAX_MESSAGE_BYTES
            ));
        }
        if self.task_retention_s == 0 {
            problems.push("RELAY_TASK_RETENTION_S must be > 0".into());
        }
        // A failing task is marked active at each retry; its longest sleep must not look idle.
        if self.task_retention_s.saturating_mul(1000) < self.backoff_max_ms.saturating_mul(2) {
            problems.push(format!(
                "RELAY_TASK_RETENTION_S ({} s) must be at least twice RELAY_BACKOFF_MAX_MS ({} ms)",
                self.task_retention_s, self.backoff_max_ms
            ));
        }
        if self.producer_auth != AuthMode::Off && self.producer_acl.is_none() {
            problems.push(format!(
                "RELAY_PRODUCER_AUTH={} needs RELAY_PRODUCER_ACL: a JSON file of broker users to the \
                 clusters they may publish for (docs/security.md); RELAY_PRODUCER_AUTH=off turns the \
                 check off",
                self.producer_auth.as_str()
            ));
        }
        if let Some(bad) = self
            .ecs_accounts()
            .into_iter()
            .find(|a| a.len() != 12 || !a.bytes().all(|b| b.is_ascii_digit()))
        {
            problems.push(format!(
                "RELAY_ECS_ACCOUNTS: {bad:?} is not a 12-digit AWS account id"
            ));
        }
        problems
    }

    /// The longest call the shard lease can cover between two renewals: a lease is counted on
    /// for 8/10 of its time (clock drift), renewed every third, and a call needs a margin.
    fn call_window(&self) -> Duration {
        let lease = self.lease();
        (lease.mul_f64(0.8) - lease / 3).saturating_sub(CALL_MARGIN)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    /// The messages of a configuration `validate` refuses.
    fn refused(c: WorkerConfig) -> String {
        match c.validate() {
            Ok(_) => panic!("the configuration was accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_producer_check_needs_an_acl_unless_it_is_off() {
        let err = refused(WorkerConfig::default());
        assert!(
            err.contains("RELAY_PRODUCER_AUTH=acl needs RELAY_PRODUCER_ACL"),
            "{err}"
        );
        let off = WorkerConfig {
            producer_auth: AuthMode::Off,
            ..Default::default()
        };
        assert!(off.validate().is_ok());
        let err = refused(WorkerConfig {
            producer_auth: AuthMode::Off,
            ecs_accounts: "123456789012,12345".into(),
            ..Default::default()
        });
        assert!(err.contains("\"12345\" is not a 12-digit"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = refused(WorkerConfig {
            drain_min_ms: 0,
            concurrency_min: 11,
            task_retention_s: 0,
            ..Default::default()
        });
        for setting in [
            "RELAY_DRAIN_MIN_MS",
            "RELAY_CONCURRENCY_MIN",
            "RELAY_TASK_RETENTION_S",
        ] {
            assert!(err.contains(setting), "{setting} missing: {err}");
        }
    }

    #[test]
    fn timings_that_would_let_a_call_outlive_its_permit_or_lease_are_refused() {
        let with_acl = WorkerConfig {
            producer_acl: Some(PathBuf::from("/etc/relay/acl.json")),
            ..Default::default()
        };
        assert!(with_acl.validate().is_ok());
        let c = WorkerConfig {
            call_timeout_ms: 7_500,
            ..Default::default()
        };
        let err = refused(c);
        assert!(err.contains("RELAY_PERMIT_LEASE_MS (8000)"), "{err}");
        let c = WorkerConfig {
            call_timeout_ms: 6_000,
            permit_lease_ms: 20_000,
            lease_ms: 10_000,
            ..Default::default()
        };
        let err = refused(c);
        assert!(err.contains("must fit in the shard lease"), "{err}");
        let c = WorkerConfig {
            task_retention_s: 30,
            ..Default::default()
        };
        let err = refused(c);
        assert!(err.contains("RELAY_TASK_RETENTION_S"), "{err}");
    }

    #[test]
    fn adaptive_settings_out_of_range_are_refused() {
        for window in [0, 49, 600_001] {
            let c = WorkerConfig {
                adaptive_window_ms: window,
                ..Default::default()
            };
            let err = refused(c);
            assert!(err.contains("RELAY_ADAPTIVE_WINDOW_MS"), "{window}: {err}");
        }
        let c = WorkerConfig {
            concurrency_min: 11,
            ..Default::default()
        };
        let err = refused(c);
        assert!(err.contains("RELAY_CONCURRENCY_MIN"), "{err}");
    }
}
