//! A provider that starts nothing: the owner runs the agent themselves with the config
//! returned once at create time. Used for bring-your-own machines and for the fleet
//! benchmark, where thousands of agents run in one process.

use super::Target;
use super::{
    Created, Instance, InstanceSpec, Observed, Provider, ProviderError, render_agent_config,
};
use async_trait::async_trait;

#[derive(Debug, Default)]
pub struct ManualProvider;

#[async_trait]
impl Provider for ManualProvider {
    fn name(&self) -> &'static str {
        "manual"
    }

    async fn create(&self, spec: &InstanceSpec) -> Result<Created, ProviderError> {
        Ok(Created {
            agent_config: Some(render_agent_config(&spec.bootstrap)?),
        })
    }

    async fn start(&self, _: &Target) -> Result<(), ProviderError> {
        Ok(())
    }

    async fn stop(&self, _: &Target) -> Result<(), ProviderError> {
        Ok(())
    }

    async fn delete(&self, _: &Target) -> Result<(), ProviderError> {
        Ok(())
    }

    async fn observe(&self, _: &Target) -> Result<Observed, ProviderError> {
        Ok(Observed::Unknown)
    }

    async fn list(&self) -> Result<Vec<Instance>, ProviderError> {
        Ok(Vec::new())
    }
}
