//! The Compute Engine provider (`google-cloud-compute-v1`, instances and zone operations).
//!
//! A workspace is one instance named after it, labelled `workspace-hub=<hub label>`,
//! `workspace-id=<uuid>` and `owner=<owner, sanitised>` so the reconciler can match
//! instances to records. The agent's config travels as cloud-init user-data in the
//! instance metadata. Stop suspends (memory kept), start resumes (or boots an instance that
//! was stopped outside the hub). Every mutating call waits for its zone operation, bounded by
//! `operation_timeout`; rate limits (429) are retried with backoff by the client; quota,
//! permission and not-found errors become the matching [`ProviderError`].

use super::{
    Created, Instance, InstanceSpec, Observed, Provider, ProviderError, Target, render_agent_config,
};
use async_trait::async_trait;
use google_cloud_compute_v1::client::{Instances, ZoneOperations};
use google_cloud_compute_v1::model::{
    AccessConfig, AttachedDisk, AttachedDiskInitializeParams, Instance as GceInstance, Metadata,
    NetworkInterface, Operation, access_config, instance, metadata::Items, operation,
};
use google_cloud_gax::exponential_backoff::ExponentialBackoffBuilder;
use google_cloud_gax::retry_policy::{Aip194Strict, RetryPolicyExt};
use serde::Deserialize;
use std::time::Duration;
use uuid::Uuid;

/// One call on one instance (`get`, `suspend`, `resume`, `start`, `delete`): its operation, or
/// the mapped error.
macro_rules! act {
    ($gce:ident, $call:ident, $zone:expr, $name:expr, $what:literal) => {
        $gce.instances
            .$call()
            .set_project(&$gce.config.project)
            .set_zone($zone)
            .set_instance($name)
            .send()
            .await
            .map_err(|e| call_error($what, e))
    };
}

/// `[gce]` in the hub config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GceConfig {
    pub project: String,
    /// Zones the reconciler lists instances in (creates use the workspace's zone).
    pub zones: Vec<String>,
    /// Boot image; `{tag}` is replaced by the workspace's image tag.
    pub image: String,
    pub network: String,
    pub disk_size_gb: i64,
    /// The `workspace-hub` label value that marks this hub's instances.
    pub label: String,
    /// How long to wait for one zone operation.
    #[serde(with = "humantime_serde")]
    pub operation_timeout: Duration,
    /// The Compute API endpoint; a local server in tests.
    pub endpoint: Option<String>,
    /// Send no credentials (for a local endpoint); otherwise Application Default Credentials.
    pub anonymous: bool,
    /// First delay between retries of a rate-limited call (doubles up to 32x).
    #[serde(with = "humantime_serde")]
    pub retry_delay: Duration,
}

impl Default for GceConfig {
    fn default() -> Self {
        Self {
            project: String::new(),
            zones: vec!["us-central1-a".into()],
            image: "projects/workspace-hub/global/images/family/workspace-{tag}".into(),
            network: "global/networks/default".into(),
            disk_size_gb: 50,
            label: "default".into(),
            operation_timeout: Duration::from_secs(300),
            endpoint: None,
            anonymous: false,
            retry_delay: Duration::from_millis(500),
        }
    }
}

pub struct GceProvider {
    config: GceConfig,
    instances: Instances,
    operations: ZoneOperations,
}

impl std::fmt::Debug for GceProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GceProvider")
            .field("project", &self.config.project)
            .finish_non_exhaustive()
    }
}

fn failed(what: &str, e: impl std::fmt::Display) -> ProviderError {
    ProviderError::Failed(format!("{what}: {e}"))
}

/// Maps a failed call to the provider's error.
fn call_error(what: &str, e: google_cloud_compute_v1::Error) -> ProviderError {
    let message = e
        .status()
        .map(|s| s.message.clone())
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| e.to_string());
    match e.http_status_code() {
        Some(404) => ProviderError::NotFound,
        Some(403) if message.to_ascii_lowercase().contains("quota") => {
            ProviderError::QuotaExceeded(message)
        }
        Some(403) => ProviderError::PermissionDenied(message),
        Some(429) => failed(what, format!("rate limited by Compute Engine: {message}")),
        _ => failed(what, message),
    }
}

/// Maps an operation that finished with an error.
fn operation_error(what: &str, op: &Operation) -> Option<ProviderError> {
    let errors = &op.error.as_ref()?.errors;
    let first = errors.first()?;
    let code = first.code.clone().unwrap_or_default();
    let message = first.message.clone().unwrap_or_else(|| code.clone());
    Some(
        if code.contains("QUOTA") || code == "ZONE_RESOURCE_POOL_EXHAUSTED" {
            ProviderError::QuotaExceeded(message)
        } else if op.http_error_status_code == Some(404) || code == "RESOURCE_NOT_FOUND" {
            ProviderError::NotFound
        } else if op.http_error_status_code == Some(403) {
            ProviderError::PermissionDenied(message)
        } else {
            failed(what, format!("{code}: {message}"))
        },
    )
}

/// A label value: lower case letters, digits, `-` and `_`, at most 63 characters.
pub fn label_value(s: &str) -> String {
    s.chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '-' | '_') => c,
            _ => '-',
        })
        .take(63)
        .collect()
}

impl GceProvider {
    pub async fn new(config: GceConfig) -> Result<Self, ProviderError> {
        if config.project.is_empty() {
            return Err(failed("gce", "project is not set"));
        }
        // Rate limits (429) and unavailability are retried, five attempts in all.
        let backoff = || {
            ExponentialBackoffBuilder::new()
                .with_initial_delay(config.retry_delay)
                .with_maximum_delay(config.retry_delay * 32)
                .build()
                .map_err(|e| failed("gce retry backoff", e))
        };
        let retry = || {
            Aip194Strict
                .continue_on_too_many_requests()
                .with_attempt_limit(5)
        };
        macro_rules! build {
            ($client:ty) => {{
                let mut b = <$client>::builder()
                    .with_retry_policy(retry())
                    .with_backoff_policy(backoff()?);
                if let Some(endpoint) = &config.endpoint {
                    b = b.with_endpoint(endpoint.clone());
                }
                if config.anonymous {
                    b = b.with_credentials(
                        google_cloud_auth::credentials::anonymous::Builder::new().build(),
                    );
                }
                b.build().await.map_err(|e| failed("gce client", e))?
            }};
        }
        Ok(Self {
            instances: build!(Instances),
            operations: build!(ZoneOperations),
            config,
        })
    }

    /// Waits for a zone operation to finish, within the operation timeout.
    async fn wait(&self, what: &str, zone: &str, mut op: Operation) -> Result<(), ProviderError> {
        let deadline = tokio::time::Instant::now() + self.config.operation_timeout;
        loop {
            if op.status == Some(operation::Status::Done) {
                return operation_error(what, &op).map_or(Ok(()), Err);
            }
            let name = op
                .name
                .clone()
                .ok_or_else(|| failed(what, "operation without a name"))?;
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                return Err(failed(
                    what,
                    format!(
                        "operation {name} still running after {:?}",
                        self.config.operation_timeout
                    ),
                ));
            }
            // `wait` returns when the operation is done or after a while (at most 2 min).
            let call = self
                .operations
                .wait()
                .set_project(&self.config.project)
                .set_zone(zone)
                .set_operation(&name)
                .send();
            op = match tokio::time::timeout(remaining, call).await {
                Ok(result) => result.map_err(|e| call_error(what, e))?,
                Err(_) => continue,
            };
        }
    }

    fn instance_body(&self, spec: &InstanceSpec) -> Result<GceInstance, ProviderError> {
        let config = render_agent_config(&spec.bootstrap)?;
        Ok(GceInstance::new()
            .set_name(&spec.instance_name)
            .set_machine_type(format!(
                "zones/{}/machineTypes/{}",
                spec.zone, spec.machine_type
            ))
            .set_labels([
                ("workspace-hub".to_owned(), label_value(&self.config.label)),
                ("workspace-id".to_owned(), spec.workspace_id.to_string()),
                ("owner".to_owned(), label_value(&spec.owner_id)),
            ])
            .set_metadata(
                Metadata::new().set_items([Items::new().set_key("user-data").set_value(
                    crate::provider::cloudinit::render(&config)
                        .map_err(|e| failed("render user-data", e))?,
                )]),
            )
            .set_disks([AttachedDisk::new()
                .set_boot(true)
                .set_auto_delete(true)
                .set_initialize_params(
                    AttachedDiskInitializeParams::new()
                        .set_source_image(self.config.image.replace("{tag}", &spec.image_tag))
                        .set_disk_size_gb(self.config.disk_size_gb),
                )])
            .set_network_interfaces([NetworkInterface::new()
                .set_network(&self.config.network)
                .set_access_configs([AccessConfig::new()
                    .set_name("External NAT")
                    .set_type(access_config::Type::OneToOneNat)])]))
    }

    async fn status(&self, target: &Target) -> Result<Option<instance::Status>, ProviderError> {
        let inst = act!(
            self,
            get,
            &target.zone,
            &target.instance_name,
            "get instance"
        )?;
        Ok(inst.status)
    }
}

fn observed(status: Option<&instance::Status>) -> Observed {
    use instance::Status as S;
    match status {
        Some(S::Suspended | S::Suspending) => Observed::Suspended,
        Some(S::Stopped | S::Stopping | S::Terminated | S::PendingStop) => Observed::Stopped,
        Some(_) | None => Observed::Running,
    }
}

#[async_trait]
impl Provider for GceProvider {
    fn name(&self) -> &'static str {
        "gce"
    }

    fn creates_slowly(&self) -> bool {
        true
    }

    fn workspace_user(&self) -> Option<&'static str> {
        Some("dev")
    }

    async fn create(&self, spec: &InstanceSpec) -> Result<Created, ProviderError> {
        let body = self.instance_body(spec)?;
        let op = self
            .instances
            .insert()
            .set_project(&self.config.project)
            .set_zone(&spec.zone)
            .set_body(body)
            // The same request id makes a retried insert a no-op on GCE's side.
            .set_request_id(spec.workspace_id.to_string())
            .send()
            .await
            .map_err(|e| call_error("insert instance", e))?;
        self.wait("insert instance", &spec.zone, op).await?;
        Ok(Created::default())
    }

    async fn start(&self, target: &Target) -> Result<(), ProviderError> {
        let (zone, name) = (&target.zone, &target.instance_name);
        let op = match observed(self.status(target).await?.as_ref()) {
            Observed::Suspended => act!(self, resume, zone, name, "resume instance")?,
            Observed::Stopped => act!(self, start, zone, name, "start instance")?,
            _ => return Ok(()),
        };
        self.wait("start instance", zone, op).await
    }

    async fn stop(&self, target: &Target) -> Result<(), ProviderError> {
        let op = act!(
            self,
            suspend,
            &target.zone,
            &target.instance_name,
            "suspend instance"
        )?;
        self.wait("suspend instance", &target.zone, op).await
    }

    async fn delete(&self, target: &Target) -> Result<(), ProviderError> {
        let op = act!(
            self,
            delete,
            &target.zone,
            &target.instance_name,
            "delete instance"
        )?;
        self.wait("delete instance", &target.zone, op).await
    }

    async fn observe(&self, target: &Target) -> Result<Observed, ProviderError> {
        match self.status(target).await {
            Ok(status) => Ok(observed(status.as_ref())),
            Err(ProviderError::NotFound) => Ok(Observed::Missing),
            Err(e) => Err(e),
        }
    }

    async fn list(&self) -> Result<Vec<Instance>, ProviderError> {
        let mut out = Vec::new();
        let filter = format!(
            "labels.workspace-hub = \"{}\"",
            label_value(&self.config.label)
        );
        for zone in &self.config.zones {
            let mut token = String::new();
            loop {
                let page = self
                    .instances
                    .list()
                    .set_project(&self.config.project)
                    .set_zone(zone)
                    .set_filter(&filter)
                    .set_page_token(&token)
                    .send()
                    .await
                    .map_err(|e| call_error("list instances", e))?;
                for inst in page.items {
                    let Some(id) = inst
                        .labels
                        .get("workspace-id")
                        .and_then(|v| Uuid::parse_str(v).ok())
                    else {
                        continue;
                    };
                    out.push(Instance {
                        target: Target {
                            workspace_id: id,
                            instance_name: inst.name.clone().unwrap_or_default(),
                            zone: zone.clone(),
                        },
                        observed: observed(inst.status.as_ref()),
                    });
                }
                match page.next_page_token {
                    Some(next) if !next.is_empty() => token = next,
                    _ => break,
                }
            }
        }
        Ok(out)
    }
}
