//! The ECS client: builds the three Submit* requests from stored changes and classifies errors.
//!
//! The SDK's own retries are off: the sender's backoff is the one retry loop, so a permit is
//! never held across retries, and each call has a timeout shorter than the permit lease.

use std::sync::Arc;
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::BehaviorVersion;
use aws_sdk_ecs::config::http::HttpResponse;
use aws_sdk_ecs::config::interceptors::BeforeTransmitInterceptorContextRef;
use aws_sdk_ecs::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_sdk_ecs::error::{BoxError, ProvideErrorMetadata, SdkError};
use aws_sdk_ecs::types::{
    AttachmentStateChange, ContainerStateChange, ManagedAgentStateChange, NetworkBinding,
    TransportProtocol,
};
use aws_smithy_types::DateTime;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::relay::wire::{
    container_wire_status, task_wire_status, AttachmentChange, BatchItem, Binding, TaskChange,
};

/// Sends a Submit* request under the send-time guard and maps the answer to the relay's error
/// classes: the three calls end alike.
macro_rules! send_guarded {
    ($request:expr, $guard:expr) => {
        $request
            .customize()
            .interceptor($guard)
            .send()
            .await
            .map(|_| ())
            .map_err(classify)
    };
}

/// How a failed call is handled: dropped (InvalidParameterException) or retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// ECS refuses the request itself: retrying cannot help (rule 8).
    InvalidParameter(String),
    /// Anything else: throttling, 5xx, timeouts, connection errors.
    Retry { code: String, message: String },
}

impl CallError {
    /// The outcome label of the call metric.
    pub fn code(&self) -> &str {
        match self {
            CallError::InvalidParameter(_) => "InvalidParameterException",
            CallError::Retry { code, .. } => code,
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::InvalidParameter(m) => write!(f, "InvalidParameterException: {m}"),
            CallError::Retry { code, message } => write!(f, "{code}: {message}"),
        }
    }
}

fn classify<E: ProvideErrorMetadata + std::error::Error + 'static>(
    err: SdkError<E, HttpResponse>,
) -> CallError {
    let (code, message) = match &err {
        SdkError::ServiceError(se) => {
            // A 429 without an error code (a proxy, a gateway) is a throttle all the same.
            let fallback = if se.raw().status().as_u16() == 429 {
                "TooManyRequests"
            } else {
                "UnknownServiceError"
            };
            (
                se.err().code().unwrap_or(fallback).to_string(),
                se.err().message().unwrap_or_default().to_string(),
            )
        }
        SdkError::TimeoutError(_) => ("Timeout".to_string(), "call timed out".to_string()),
        SdkError::DispatchFailure(d) => (
            "DispatchFailure".to_string(),
            format!("{:?}", d.as_connector_error()),
        ),
        SdkError::ResponseError(_) => (
            "ResponseError".to_string(),
            "unreadable response".to_string(),
        ),
        _ => ("SdkError".to_string(), err.to_string()),
    };
    if code == "InvalidParameterException" {
        CallError::InvalidParameter(message)
    } else {
        CallError::Retry { code, message }
    }
}

/// Checked by the SDK right before the request goes on the wire: the last moment a sender can
/// still refrain from calling ECS for a shard whose lease may have lapsed (a paused process).
#[derive(Clone)]
pub struct CallGuard(Arc<dyn Fn() -> bool + Send + Sync>);

impl CallGuard {
    pub fn new(may_call: impl Fn() -> bool + Send + Sync + 'static) -> Self {
        Self(Arc::new(may_call))
    }
}

impl std::fmt::Debug for CallGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallGuard")
    }
}

impl Intercept for CallGuard {
    fn name(&self) -> &'static str {
        "CallGuard"
    }

    fn read_before_transmit(
        &self,
        _context: &BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if (self.0)() {
            Ok(())
        } else {
            Err("shard lease may have lapsed; request not sent".into())
        }
    }
}

#[derive(Clone)]
pub struct Ecs {
    client: aws_sdk_ecs::Client,
}

impl Ecs {
    /// Standard AWS configuration: region, credentials chain, `AWS_ENDPOINT_URL_ECS`.
    /// `app_name` (the worker id) goes into the user agent, so ECS-side logs show the worker.
    pub async fn from_env(call_timeout: Duration, app_name: &str) -> anyhow::Result<Ecs> {
        let conf = base_loader(call_timeout, app_name).load().await;
        if conf.region().is_none() {
            anyhow::bail!("no AWS region configured: set AWS_REGION (or a profile with a region)");
        }
        Ok(Ecs {
            client: aws_sdk_ecs::Client::new(&conf),
        })
    }

    /// The AWS Region the client calls: the only one whose ARNs it can act on.
    pub fn region(&self) -> String {
        self.client
            .config()
            .region()
            .map(|r| r.to_string())
            .unwrap_or_default()
    }

    /// A client for a local stand-in endpoint (ecs-sim): fixed region and dummy credentials.
    pub async fn for_endpoint(endpoint: &str, call_timeout: Duration, app_name: &str) -> Ecs {
        let conf = base_loader(call_timeout, app_name)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_ecs::config::Credentials::new(
                "sim", "sim", None, None, "ecs-sim",
            ))
            .endpoint_url(endpoint)
            .load()
            .await;
        Ecs {
            client: aws_sdk_ecs::Client::new(&conf),
        }
    }

    /// SubmitTaskStateChange, status variant, with the batched containers and managed agents.
    pub async fn submit_task(
        &self,
        change: &TaskChange,
        batch: &[BatchItem],
        guard: CallGuard,
    ) -> Result<(), CallError> {
        let mut containers = Vec::new();
        let mut agents = Vec::new();
        for item in batch {
            match item {
                BatchItem::Container(c) => containers.push(
                    ContainerStateChange::builder()
                        .container_name(&c.container_name)
                        .status(container_wire_status(&c.status))
                        .set_runtime_id(c.runtime_id.clone())
                        .set_image_digest(c.image_digest.clone())
                        .set_reason(c.reason.clone())
                        .set_exit_code(c.exit_code)
                        .set_network_bindings(
                            c.network_bindings
                                .as_ref()
                                .map(|b| b.iter().map(binding).collect()),
                        )
                        .build(),
                ),
                BatchItem::Agent(a) => {
                    let agent = ManagedAgentStateChange::builder()
                        .container_name(&a.container_name)
                        .managed_agent_name(a.managed_agent_name.as_str().into())
                        .status(&a.status)
                        .reason(&a.reason)
                        .build()
                        .map_err(|e| CallError::Retry {
                            code: "Build".into(),
                            message: e.to_string(),
                        })?;
                    agents.push(agent);
                }
            }
        }
        send_guarded!(
            self.client
                .submit_task_state_change()
                .cluster(&change.cluster)
                .task(&change.task)
                .status(task_wire_status(&change.status))
                .reason(&change.reason)
                .set_pull_started_at(timestamp(&change.pull_started_at))
                .set_pull_stopped_at(timestamp(&change.pull_stopped_at))
                .set_execution_stopped_at(timestamp(&change.execution_stopped_at))
                .set_containers((!containers.is_empty()).then_some(containers))
                .set_managed_agents((!agents.is_empty()).then_some(agents)),
            guard
        )
    }

    /// SubmitTaskStateChange, attachment variant: only cluster, task and the attachment.
    pub async fn submit_task_attachment(
        &self,
        change: &AttachmentChange,
        guard: CallGuard,
    ) -> Result<(), CallError> {
        send_guarded!(
            self.client
                .submit_task_state_change()
                .cluster(&change.cluster)
                .set_task(change.task.clone())
                .attachments(attachment(change)?),
            guard
        )
    }

    /// SubmitAttachmentStateChanges with exactly one attachment (instance ENI or resource).
    pub async fn submit_attachment(
        &self,
        change: &AttachmentChange,
        guard: CallGuard,
    ) -> Result<(), CallError> {
        send_guarded!(
            self.client
                .submit_attachment_state_changes()
                .cluster(&change.cluster)
                .attachments(attachment(change)?),
            guard
        )
    }
}

fn base_loader(call_timeout: Duration, app_name: &str) -> aws_config::ConfigLoader {
    // App names allow only a few characters; anything else becomes '-'.
    let name: String = app_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let loader = aws_config::defaults(BehaviorVersion::latest());
    let loader = match aws_config::AppName::new(name) {
        Ok(n) => loader.app_name(n),
        Err(_) => loader,
    };
    loader.retry_config(RetryConfig::disabled()).timeout_config(
        TimeoutConfig::builder()
            .operation_timeout(call_timeout)
            .operation_attempt_timeout(call_timeout)
            .connect_timeout(call_timeout.min(Duration::from_secs(5)))
            .build(),
    )
}

fn attachment(change: &AttachmentChange) -> Result<AttachmentStateChange, CallError> {
    AttachmentStateChange::builder()
        .attachment_arn(&change.attachment_arn)
        .status(&change.status)
        .build()
        .map_err(|e| CallError::Retry {
            code: "Build".into(),
            message: e.to_string(),
        })
}

fn binding(b: &Binding) -> NetworkBinding {
    NetworkBinding::builder()
        .set_bind_ip(b.bind_ip.clone())
        .set_container_port(b.container_port)
        .set_host_port(b.host_port)
        .set_container_port_range(b.container_port_range.clone())
        .set_host_port_range(b.host_port_range.clone())
        .set_protocol(b.protocol.as_deref().map(TransportProtocol::from))
        .build()
}

/// RFC 3339 (validated at intake) → epoch seconds with millisecond precision.
fn timestamp(s: &Option<String>) -> Option<DateTime> {
    let t = OffsetDateTime::parse(s.as_deref()?, &Rfc3339).ok()?;
    let ms = (t.unix_timestamp_nanos() / 1_000_000) as i64;
    Some(DateTime::from_millis(ms))
}
