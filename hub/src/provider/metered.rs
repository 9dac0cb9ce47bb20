//! A provider that counts and times every call of the one it wraps (`/metrics`).

use super::{Created, Instance, InstanceSpec, Observed, Provider, ProviderError, Target};
use crate::base::metrics::Metrics;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Instant;

pub struct Metered {
    inner: Arc<dyn Provider>,
    metrics: Arc<Metrics>,
}

impl Metered {
    pub fn new(inner: Arc<dyn Provider>, metrics: Arc<Metrics>) -> Self {
        Self { inner, metrics }
    }

    async fn timed<T>(
        &self,
        op: &'static str,
        call: impl std::future::Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, ProviderError> {
        let start = Instant::now();
        let out = call.await;
        // A missing instance is an answer, not a failure of the provider.
        let ok = matches!(&out, Ok(_) | Err(ProviderError::NotFound));
        let took = start.elapsed();
        tracing::debug!(op, ok, ms = took.as_secs_f64() * 1000.0, "provider call");
        let m = &self.metrics;
        Metrics::call(&m.provider_calls, &m.provider_seconds, op, ok, took);
        out
    }
}

#[async_trait]
impl Provider for Metered {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn shares_host(&self) -> bool {
        self.inner.shares_host()
    }
    fn workspace_user(&self) -> Option<&'static str> {
        self.inner.workspace_user()
    }
    async fn create(&self, spec: &InstanceSpec) -> Result<Created, ProviderError> {
        self.timed("create", self.inner.create(spec)).await
    }
    fn creates_slowly(&self) -> bool {
        self.inner.creates_slowly()
    }
    async fn start(&self, target: &Target) -> Result<(), ProviderError> {
        self.timed("start", self.inner.start(target)).await
    }
    async fn stop(&self, target: &Target) -> Result<(), ProviderError> {
        self.timed("stop", self.inner.stop(target)).await
    }
    async fn delete(&self, target: &Target) -> Result<(), ProviderError> {
        self.timed("delete", self.inner.delete(target)).await
    }
    async fn observe(&self, target: &Target) -> Result<Observed, ProviderError> {
        self.timed("observe", self.inner.observe(target)).await
    }
    async fn boot_log(&self, target: &Target) -> Option<String> {
        self.inner.boot_log(target).await
    }
    async fn list(&self) -> Result<Vec<Instance>, ProviderError> {
        self.timed("list", self.inner.list()).await
    }
}
