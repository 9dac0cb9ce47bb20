//! Several hub replicas sharing one store (the Firestore emulator, or one SQLite file) and
//! one identity, made with the hub's own `identity init`; optionally behind a load balancer
//! ([`crate::nginx`]).

use crate::firestore::FirestoreEmulator;
use crate::nginx::LoadBalancer;
use crate::{HubOptions, TestHub, binary};
use anyhow::{Context, Result, bail};
use std::path::Path;

/// The store replicas share.
pub enum SharedStore {
    /// The Firestore emulator, in a project of its own.
    Firestore {
        emulator: FirestoreEmulator,
        project: String,
    },
    /// One SQLite file that several hub processes on this machine open.
    Sqlite(tempfile::TempDir),
}

impl SharedStore {
    /// A new Firestore emulator and a project named after `prefix`.
    pub fn firestore(prefix: &str) -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos();
        Ok(Self::Firestore {
            emulator: FirestoreEmulator::start()?,
            project: format!("{prefix}-{}-{nanos}", std::process::id()),
        })
    }

    /// A SQLite file in a new temporary folder.
    pub fn sqlite() -> Result<Self> {
        Ok(Self::Sqlite(
            tempfile::Builder::new().prefix("wsh-store-").tempdir()?,
        ))
    }

    /// The `[store]` table of a replica's config.
    pub fn config(&self) -> String {
        match self {
            Self::Firestore { emulator, project } => format!(
                "[store]\nkind = \"firestore\"\nproject = \"{project}\"\n\
                 emulator_host = \"{}\"\n",
                emulator.host
            ),
            Self::Sqlite(dir) => format!(
                "[store]\nkind = \"sqlite\"\npath = \"{}\"\n",
                dir.path().join("hub.sqlite3").display()
            ),
        }
    }
}

/// Config lines for a replica: the shared store and identity, a short leader lease and a
/// fast reconciler.
pub fn replica_config(store: &SharedStore, identity: &Path, id: &str) -> String {
    format!(
        "replica_id = \"{id}\"\nleader_lease = \"2s\"\nreconcile_interval = \"200ms\"\n\
         {}[identity]\nca_cert = \"file:{d}/ca.pem\"\nca_key = \"file:{d}/ca.key\"\n\
         ticket_key = \"file:{d}/ticket.key\"\nreset_key = \"file:{d}/reset.key\"\n",
        store.config(),
        d = identity.display()
    )
}

/// A new hub identity (CA, ticket and reset keys) in `dir`, by `workspace-hub identity init`.
pub fn generate_identity(dir: &Path) -> Result<()> {
    let out = std::process::Command::new(binary("workspace-hub")?)
        .args(["identity", "init", "--out"])
        .arg(dir)
        .output()
        .context("run workspace-hub identity init")?;
    if !out.status.success() {
        bail!("identity init: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Replicas behind one load balancer: HTTP round robin, QUIC pinned per client address and
/// port; agents are told to dial the load balancer. Every replica's [`TestHub::url`] and
/// `wsh` go through it.
pub struct Cluster {
    pub replicas: Vec<TestHub>,
    pub lb: LoadBalancer,
    pub identity: tempfile::TempDir,
    /// The workspace folders every replica's process provider shares.
    pub workspaces: tempfile::TempDir,
    pub store: SharedStore,
}

impl Cluster {
    pub async fn start(count: usize) -> Result<Self> {
        Self::start_with(count, "", HubOptions::default()).await
    }

    /// `count` replicas started with `options`; `top` holds more top-level lines of their
    /// config (a `reconcile_interval` there replaces the tests' quick one), `options.config`
    /// more tables (it goes last).
    pub async fn start_with(count: usize, top: &str, options: HubOptions) -> Result<Self> {
        Self::start_on(SharedStore::firestore("cluster")?, count, top, options).await
    }

    /// The same on a given `store`.
    pub async fn start_on(
        store: SharedStore,
        count: usize,
        top: &str,
        options: HubOptions,
    ) -> Result<Self> {
        LoadBalancer::nginx()?;
        let identity = tempfile::Builder::new().prefix("wsh-identity-").tempdir()?;
        generate_identity(identity.path())?;
        let workspaces = tempfile::Builder::new()
            .prefix("wsh-workspaces-")
            .tempdir()?;
        let port = crate::nginx::free_shared_port()?;
        let mut replicas = Vec::new();
        for i in 0..count {
            let mut own = replica_config(&store, identity.path(), &format!("replica-{i}"));
            if top.contains("reconcile_interval") {
                own = own.replace("reconcile_interval = \"200ms\"\n", "");
            }
            let config = format!(
                "peer_addr = \"127.0.0.1:0\"\nagent_hub_addr = \"127.0.0.1:{port}\"\n\
                 workspaces_dir = \"{}\"\n{top}\n{own}{}",
                workspaces.path().display(),
                options.config,
            );
            let mut replica = TestHub::start_with(HubOptions {
                config,
                ..options.clone()
            })
            .await?;
            replica.workspaces = workspaces.path().to_owned();
            replicas.push(replica);
        }
        let http: Vec<_> = replicas.iter().map(|r| r.listening.http).collect();
        let quic: Vec<_> = replicas.iter().map(|r| r.listening.quic).collect();
        let lb = LoadBalancer::start(port, &http, &quic)?;
        for r in &mut replicas {
            r.front = Some(lb.addr);
        }
        Ok(Self {
            replicas,
            lb,
            identity,
            workspaces,
            store,
        })
    }

    /// Any replica, as a client sees the cluster (every call goes through the balancer).
    pub fn any(&self) -> &TestHub {
        &self.replicas[0]
    }

    /// The replica whose log says it holds workspace `id`'s agent now.
    pub fn holder(&self, id: &str) -> Option<usize> {
        self.replicas.iter().position(|r| {
            if !r.is_running() {
                return false;
            }
            let log = r.log();
            let last = log
                .lines()
                .rfind(|l| l.contains(id) && l.contains("agent ") && l.contains("connected"));
            last.is_some_and(|l| l.contains("agent connected"))
        })
    }
}
