//! The hub's identity: what every replica shares and no instance may invent.
//!
//! - the CA (certificate and key): issues the QUIC server certificate at start and agent
//!   certificates at enrollment; agents and CLIs pin it;
//! - the ticket key: signs session tickets and derives CSRF tokens (HMAC-SHA256);
//! - the stateless-reset key: a restarted or another replica recognises the connection ids
//!   handed out before and resets them, so clients reconnect at once.
//!
//! `workspace-hub dev` generates all of it in its state folder on first start. With an
//! `[identity]` section (and always under `serve`, which refuses to start without one) every
//! piece comes from a [`SecretSource`]: a file, an environment variable, or a Secret Manager
//! secret version, so replaced instances and every replica present the same hub.
//!
//! CA rotation: `previous_ca_cert` and `previous_ca_key` name the CA being retired. While
//! they are set, the server certificate is still issued by the previous CA (agents enrolled
//! under it pin only it), agent certificates of either CA are accepted, and new enrollments
//! are signed by the new CA and pin both (the trust bundle), so they keep working once the
//! previous CA is removed. README, "Rotating the hub CA", has the procedure.

use crate::base::ca::HubCa;
use anyhow::{Context, Result, bail, ensure};
use base64::Engine;
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// Where one secret comes from, written `file:PATH`, `env:NAME` or
/// `gcp:projects/P/secrets/S/versions/V` (Secret Manager).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
    SecretManager(String),
}

impl TryFrom<String> for SecretSource {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let bad = || {
            format!(
                "secret source {s:?}: expected file:/absolute/path, env:NAME or \
                 gcp:projects/PROJECT/secrets/SECRET/versions/VERSION"
            )
        };
        let (kind, rest) = s.split_once(':').ok_or_else(bad)?;
        match kind {
            "file" if Path::new(rest).is_absolute() => Ok(Self::File(rest.into())),
            "env"
                if !rest.is_empty()
                    && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
            {
                Ok(Self::Env(rest.into()))
            }
            "gcp" if valid_secret_version(rest) => Ok(Self::SecretManager(rest.into())),
            _ => Err(bad()),
        }
    }
}

/// `projects/P/secrets/S/versions/V`, each part a plain name.
fn valid_secret_version(name: &str) -> bool {
    let parts: Vec<&str> = name.split('/').collect();
    parts.len() == 6
        && parts[0] == "projects"
        && parts[2] == "secrets"
        && parts[4] == "versions"
        && [parts[1], parts[3], parts[5]].iter().all(|p| {
            !p.is_empty()
                && p.len() <= 255
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

impl std::fmt::Display for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(p) => write!(f, "file:{}", p.display()),
            Self::Env(n) => write!(f, "env:{n}"),
            Self::SecretManager(n) => write!(f, "gcp:{n}"),
        }
    }
}

/// `[identity]` in the hub config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The CA certificate (PEM).
    pub ca_cert: SecretSource,
    /// The CA's private key (PEM, PKCS#8).
    pub ca_key: SecretSource,
    /// At least 32 random bytes, base64 (`openssl rand -base64 32`).
    pub ticket_key: SecretSource,
    /// At least 32 random bytes, base64.
    pub reset_key: SecretSource,
    /// During a CA rotation: the CA being retired (certificate and key, both or neither).
    #[serde(default)]
    pub previous_ca_cert: Option<SecretSource>,
    #[serde(default)]
    pub previous_ca_key: Option<SecretSource>,
    /// The Secret Manager endpoint; Google's by default (a local server in tests).
    #[serde(default)]
    pub secret_manager_endpoint: Option<String>,
    /// Send no credentials to Secret Manager (a local endpoint); otherwise Application
    /// Default Credentials (the hub's service account on GCP).
    #[serde(default)]
    pub secret_manager_anonymous: bool,
}

impl IdentityConfig {
    /// Checks what can be checked without reading a secret.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.previous_ca_cert.is_some() == self.previous_ca_key.is_some(),
            "identity.previous_ca_cert and identity.previous_ca_key go together"
        );
        if let Some(endpoint) = &self.secret_manager_endpoint {
            let url = url::Url::parse(endpoint)
                .with_context(|| format!("identity.secret_manager_endpoint {endpoint:?}"))?;
            ensure!(
                matches!(url.scheme(), "http" | "https"),
                "identity.secret_manager_endpoint must be an http(s) URL"
            );
        }
        Ok(())
    }
}

/// The smallest ticket or reset key accepted.
pub const MIN_KEY_BYTES: usize = 32;

/// The loaded identity.
pub struct Identity {
    /// Signs new agent certificates (and the server certificate unless a rotation runs).
    pub ca: HubCa,
    /// The CA being retired, during a rotation.
    pub previous_ca: Option<HubCa>,
    pub ticket_key: Vec<u8>,
    pub reset_key: Vec<u8>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("rotating", &self.previous_ca.is_some())
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// The configured identity, or (`None`) the one in `state_dir`, generated on first use.
    pub async fn load(config: Option<&IdentityConfig>, state_dir: &Path) -> Result<Self> {
        match config {
            Some(config) => Self::from_sources(config).await,
            None => Self::load_or_generate(state_dir),
        }
    }

    /// `workspace-hub dev`: `ca.pem`, `ca.key`, `ticket.key` and `reset.key` in the state
    /// folder, created (keys 0600) on first start.
    pub fn load_or_generate(state_dir: &Path) -> Result<Self> {
        let ca = HubCa::load_or_create(state_dir).context("CA")?;
        Ok(Self {
            ca,
            previous_ca: None,
            ticket_key: raw_key(&state_dir.join("ticket.key"))?,
            reset_key: raw_key(&state_dir.join("reset.key"))?,
        })
    }

    /// Reads every configured secret; any missing or malformed one is an error naming it
    /// (never its value).
    pub async fn from_sources(config: &IdentityConfig) -> Result<Self> {
        config.validate()?;
        let reader = Reader::new(config).await?;
        let text = async |what: &str, source: &SecretSource| -> Result<String> {
            let bytes = reader.read(source).await.context(what.to_owned())?;
            String::from_utf8(bytes).with_context(|| format!("{what} ({source}): not UTF-8 text"))
        };
        let key = async |what: &str, source: &SecretSource| -> Result<Vec<u8>> {
            let encoded = text(what, source).await?;
            let key = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|_| anyhow::anyhow!("{what} ({source}): not base64"))?;
            ensure!(
                key.len() >= MIN_KEY_BYTES,
                "{what} ({source}): {} bytes, at least {MIN_KEY_BYTES} needed",
                key.len()
            );
            Ok(key)
        };
        let ca = HubCa::from_pem(
            &text("identity.ca_cert", &config.ca_cert).await?,
            &text("identity.ca_key", &config.ca_key).await?,
        )
        .context("identity.ca_cert / identity.ca_key")?;
        let previous_ca = match (&config.previous_ca_cert, &config.previous_ca_key) {
            (Some(cert), Some(key)) => {
                let previous = HubCa::from_pem(
                    &text("identity.previous_ca_cert", cert).await?,
                    &text("identity.previous_ca_key", key).await?,
                )
                .context("identity.previous_ca_cert / identity.previous_ca_key")?;
                ensure!(
                    previous.cert_der() != ca.cert_der(),
                    "identity.previous_ca_cert is the current CA: a rotation needs a new CA"
                );
                Some(previous)
            }
            _ => None,
        };
        Ok(Self {
            ca,
            previous_ca,
            ticket_key: key("identity.ticket_key", &config.ticket_key).await?,
            reset_key: key("identity.reset_key", &config.reset_key).await?,
        })
    }

    /// The CA that issues the hub's server certificate: the previous one while a rotation
    /// runs (every agent pins it), else the current one.
    pub fn server_ca(&self) -> &HubCa {
        self.previous_ca.as_ref().unwrap_or(&self.ca)
    }

    /// The CAs whose agent certificates are accepted (DER).
    pub fn client_cas(&self) -> Vec<Vec<u8>> {
        self.cas().map(|ca| ca.cert_der().to_vec()).collect()
    }

    /// What agents and CLIs pin (`GET /ca.pem`, agent configs): the current CA and, during a
    /// rotation, the previous one.
    pub fn trust_bundle_pem(&self) -> String {
        self.cas().map(HubCa::cert_pem).collect()
    }

    fn cas(&self) -> impl Iterator<Item = &HubCa> {
        self.previous_ca.iter().chain(std::iter::once(&self.ca))
    }

    /// Writes a new identity into `dir` as `serve` reads it from files: `ca.pem`, `ca.key`,
    /// `ticket.key` and `reset.key` (base64), keys 0600. Refuses to overwrite.
    pub fn generate_files(dir: &Path) -> Result<()> {
        let names = ["ca.pem", "ca.key", "ticket.key", "reset.key"];
        for name in names {
            ensure!(
                !dir.join(name).exists(),
                "{} exists: refusing to overwrite an identity",
                dir.join(name).display()
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let (ca, key_pem) = HubCa::generate()?;
        let b64 = base64::engine::general_purpose::STANDARD;
        crate::base::fsutil::write_public(&dir.join("ca.pem"), ca.cert_pem().as_bytes())?;
        crate::base::fsutil::write_private(&dir.join("ca.key"), key_pem.as_bytes())?;
        for name in ["ticket.key", "reset.key"] {
            let key = b64.encode(crate::base::ca::random_bytes::<MIN_KEY_BYTES>()) + "\n";
            crate::base::fsutil::write_private(&dir.join(name), key.as_bytes())?;
        }
        Ok(())
    }
}

/// A raw key file in the dev state folder, created (0600) on first use.
fn raw_key(path: &Path) -> Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(key) if key.len() == MIN_KEY_BYTES => Ok(key),
        Ok(_) => bail!(
            "{} is not a {MIN_KEY_BYTES}-byte key: remove it to generate a new one",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = crate::base::ca::random_bytes::<MIN_KEY_BYTES>().to_vec();
            crate::base::fsutil::write_private(path, &key)?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

/// Reads secret sources; the Secret Manager client is built only when a source needs it.
struct Reader {
    secret_manager: Option<google_cloud_secretmanager_v1::client::SecretManagerService>,
}

impl Reader {
    async fn new(config: &IdentityConfig) -> Result<Self> {
        let sources = [
            Some(&config.ca_cert),
            Some(&config.ca_key),
            Some(&config.ticket_key),
            Some(&config.reset_key),
            config.previous_ca_cert.as_ref(),
            config.previous_ca_key.as_ref(),
        ];
        let needs_gcp = sources
            .into_iter()
            .flatten()
            .any(|s| matches!(s, SecretSource::SecretManager(_)));
        let secret_manager = if needs_gcp {
            let mut b = google_cloud_secretmanager_v1::client::SecretManagerService::builder();
            if let Some(endpoint) = &config.secret_manager_endpoint {
                b = b.with_endpoint(endpoint.clone());
            }
            if config.secret_manager_anonymous {
                b = b.with_credentials(
                    google_cloud_auth::credentials::anonymous::Builder::new().build(),
                );
            }
            Some(b.build().await.context("Secret Manager client")?)
        } else {
            None
        };
        Ok(Self { secret_manager })
    }

    async fn read(&self, source: &SecretSource) -> Result<Vec<u8>> {
        let bytes = match source {
            SecretSource::File(path) => {
                std::fs::read(path).with_context(|| format!("read {source}"))?
            }
            SecretSource::Env(name) => match std::env::var_os(name) {
                Some(value) => value.into_encoded_bytes(),
                None => bail!("{source}: the environment variable is not set"),
            },
            SecretSource::SecretManager(name) => {
                let client = self
                    .secret_manager
                    .as_ref()
                    .context("Secret Manager client")?;
                let version = client
                    .access_secret_version()
                    .set_name(name)
                    .send()
                    .await
                    .map_err(|e| anyhow::anyhow!("{source}: {e}"))?;
                version
                    .payload
                    .map(|p| p.data.to_vec())
                    .with_context(|| format!("{source}: the version has no payload"))?
            }
        };
        ensure!(!bytes.is_empty(), "{source}: empty");
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_sources_parse_strictly() {
        let ok = |s: &str| SecretSource::try_from(s.to_owned()).unwrap();
        assert_eq!(
            ok("file:/run/secrets/ca.key"),
            SecretSource::File("/run/secrets/ca.key".into())
        );
        assert_eq!(
            ok("env:WSH_TICKET_KEY"),
            SecretSource::Env("WSH_TICKET_KEY".into())
        );
        assert_eq!(
            ok("gcp:projects/p-1/secrets/hub-ca-key/versions/latest"),
            SecretSource::SecretManager("projects/p-1/secrets/hub-ca-key/versions/latest".into())
        );
        for bad in [
            "",
            "ca.key",
            "file:relative/ca.key",
            "env:",
            "env:A-B",
            "gcp:projects/p/secrets/s",
            "gcp:projects/p/secrets/../versions/1",
            "vault:secret/hub",
        ] {
            assert!(
                SecretSource::try_from(bad.to_owned()).is_err(),
                "{bad:?} accepted"
            );
        }
    }

    fn files(dir: &Path) -> IdentityConfig {
        let f = |n: &str| SecretSource::File(dir.join(n));
        IdentityConfig {
            ca_cert: f("ca.pem"),
            ca_key: f("ca.key"),
            ticket_key: f("ticket.key"),
            reset_key: f("reset.key"),
            previous_ca_cert: None,
            previous_ca_key: None,
            secret_manager_endpoint: None,
            secret_manager_anonymous: false,
        }
    }

    #[tokio::test]
    async fn generated_files_load_and_bad_ones_are_named() {
        let dir = tempfile::tempdir().unwrap();
        Identity::generate_files(dir.path()).unwrap();
        assert!(Identity::generate_files(dir.path()).is_err(), "overwrote");
        let id = Identity::from_sources(&files(dir.path())).await.unwrap();
        assert_eq!(
            id.trust_bundle_pem(),
            std::fs::read_to_string(dir.path().join("ca.pem")).unwrap()
        );
        assert_eq!(id.ticket_key.len(), 32);

        // The key of another CA.
        let other = tempfile::tempdir().unwrap();
        Identity::generate_files(other.path()).unwrap();
        let mut mixed = files(dir.path());
        mixed.ca_key = SecretSource::File(other.path().join("ca.key"));
        let err = format!("{:#}", Identity::from_sources(&mixed).await.unwrap_err());
        assert!(err.contains("does not belong"), "{err}");

        // A short key, an unset variable, a missing file: each named, no value shown.
        std::fs::write(dir.path().join("short.key"), "c2hvcnQ=").unwrap();
        let mut short = files(dir.path());
        short.reset_key = SecretSource::File(dir.path().join("short.key"));
        let err = format!("{:#}", Identity::from_sources(&short).await.unwrap_err());
        assert!(
            err.contains("identity.reset_key") && err.contains("at least 32"),
            "{err}"
        );
        assert!(!err.contains("c2hvcnQ"), "{err}");
        let mut unset = files(dir.path());
        unset.ticket_key = SecretSource::Env("WSH_TEST_NO_SUCH_VARIABLE".into());
        let err = format!("{:#}", Identity::from_sources(&unset).await.unwrap_err());
        assert!(
            err.contains("identity.ticket_key") && err.contains("not set"),
            "{err}"
        );
        let mut missing = files(dir.path());
        missing.ca_cert = SecretSource::File(dir.path().join("nope.pem"));
        let err = format!("{:#}", Identity::from_sources(&missing).await.unwrap_err());
        assert!(err.contains("identity.ca_cert"), "{err}");

        // A rotation: both CAs pinned, the previous one serves.
        let mut rotating = files(other.path());
        rotating.previous_ca_cert = Some(SecretSource::File(dir.path().join("ca.pem")));
        rotating.previous_ca_key = Some(SecretSource::File(dir.path().join("ca.key")));
        let id = Identity::from_sources(&rotating).await.unwrap();
        assert_eq!(id.client_cas().len(), 2);
        assert_eq!(
            link::parse_ca_bundle(&id.trust_bundle_pem()).unwrap().len(),
            2
        );
        assert_eq!(
            id.server_ca().cert_pem(),
            std::fs::read_to_string(dir.path().join("ca.pem")).unwrap()
        );
        rotating.previous_ca_key = None;
        assert!(Identity::from_sources(&rotating).await.is_err());
    }
}
