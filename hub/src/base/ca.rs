//! The hub's own certificate authority.
//!
//! `workspace-hub dev` creates it with rcgen on first start and keeps it in the state folder
//! (`ca.key`, mode 0600; `ca.pem`); `serve` takes it from the configured identity
//! ([`crate::base::identity`]). It issues the hub's QUIC server certificate on every start and a client
//! certificate for each agent at enrollment. The certificate's subject CN is the workspace
//! id, which is how a reconnecting agent is recognised.

use crate::base::fsutil::{write_private, write_public};
use anyhow::{Context, Result, bail, ensure};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateSigningRequestDer;
use sha2::{Digest, Sha256};
use std::path::Path;
use time::{Duration, OffsetDateTime};

/// How long an agent certificate is valid.
const AGENT_CERT_VALIDITY: Duration = Duration::days(365);

/// The loaded CA.
pub struct HubCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    cert_der: Vec<u8>,
}

impl std::fmt::Debug for HubCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubCa").finish_non_exhaustive()
    }
}

/// A freshly issued certificate (server or replica) and its key.
pub struct ServerIdentity {
    pub cert_der: Vec<u8>,
    pub key_pkcs8: Vec<u8>,
}

/// Why a CSR could not be signed.
#[derive(Debug, thiserror::Error)]
#[error("bad certificate signing request: {0}")]
pub struct CsrError(String);

impl HubCa {
    /// Loads the CA from `dir`, creating it on first start (`workspace-hub dev`).
    pub fn load_or_create(dir: &Path) -> Result<Self> {
        let key_path = dir.join("ca.key");
        let cert_path = dir.join("ca.pem");
        match (key_path.exists(), cert_path.exists()) {
            (true, true) => {
                let key_pem = std::fs::read_to_string(&key_path).context("read ca.key")?;
                let cert_pem = std::fs::read_to_string(&cert_path).context("read ca.pem")?;
                Self::from_pem(&cert_pem, &key_pem)
            }
            (false, false) => {
                let (ca, key_pem) = Self::generate()?;
                write_private(&key_path, key_pem.as_bytes())?;
                write_public(&cert_path, ca.cert_pem.as_bytes())?;
                Ok(ca)
            }
            _ => bail!(
                "state folder {} holds only half of the CA (ca.key and ca.pem go together)",
                dir.display()
            ),
        }
    }

    /// A new CA, valid for ten years; returns it with its key (PEM) to store.
    pub fn generate() -> Result<(Self, String)> {
        let key = KeyPair::generate().context("generate ca key")?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Workspace Hub");
        dn.push(
            DnType::CommonName,
            format!("Workspace Hub CA {}", &hex(&random_bytes::<6>())),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        let cert = params.self_signed(&key).context("self-sign ca")?;
        let key_pem = key.serialize_pem();
        Ok((
            Self {
                cert_pem: cert.pem(),
                cert_der: cert.der().to_vec(),
                issuer: Issuer::new(params, key),
            },
            key_pem,
        ))
    }

    /// A CA from its certificate and key (PEM), checked: one certificate, a CA, valid now,
    /// and the key is the certificate's.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let key = KeyPair::from_pem(key_pem).context("CA key: not a PEM private key")?;
        let cert_der = pem_to_der(cert_pem)?;
        let (rest, cert) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| anyhow::anyhow!("CA certificate: {e}"))?;
        ensure!(rest.is_empty(), "CA certificate: trailing bytes");
        ensure!(
            cert.is_ca(),
            "CA certificate: not a CA (no basicConstraints cA)"
        );
        ensure!(
            cert.validity().is_valid(),
            "CA certificate: not valid now (valid {} to {})",
            cert.validity().not_before,
            cert.validity().not_after
        );
        ensure!(
            cert.public_key().subject_public_key.data.as_ref()
                == rcgen::PublicKeyData::der_bytes(&key),
            "CA key does not belong to the CA certificate"
        );
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).context("CA certificate")?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.trim().to_owned() + "\n",
            cert_der,
        })
    }

    /// Whether `cert_der`, a certificate the TLS layer already verified against the hub's
    /// CAs, names this CA as its issuer (CA names carry a random suffix, so they differ).
    pub fn issued(&self, cert_der: &[u8]) -> bool {
        let (Ok((_, cert)), Ok((_, ca))) = (
            x509_parser::parse_x509_certificate(cert_der),
            x509_parser::parse_x509_certificate(&self.cert_der),
        ) else {
            return false;
        };
        cert.issuer() == ca.subject()
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// Issues a server certificate for the given DNS names and IP addresses.
    pub fn issue_server(&self, names: &[String]) -> Result<ServerIdentity> {
        let mut sans = Vec::new();
        for name in names {
            sans.push(match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.clone().try_into().context("server name")?),
            });
        }
        self.issue("workspace-hub", sans, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// Issues this replica's client certificate for connections to the other replicas
    /// (subject CN `replica:<id>`, client auth only, as long-lived as the server's).
    pub fn issue_replica(&self, replica_id: &str) -> Result<ServerIdentity> {
        self.issue(
            &format!("{REPLICA_CN_PREFIX}{replica_id}"),
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    /// A new key and a 90-day certificate for it with this subject, names and usage.
    fn issue(
        &self,
        cn: &str,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<ServerIdentity> {
        let key = KeyPair::generate().context("generate key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(90);
        params.serial_number = Some(SerialNumber::from_slice(&random_bytes::<16>()));
        let cert = params
            .signed_by(&key, &self.issuer)
            .context("sign certificate")?;
        Ok(ServerIdentity {
            cert_der: cert.der().to_vec(),
            key_pkcs8: key.serialize_der(),
        })
    }

    /// Signs an agent's CSR. Only the public key is taken from the request; the subject,
    /// usages and validity are the hub's.
    pub fn sign_agent(&self, csr_der: &[u8], workspace_id: &str) -> Result<Vec<u8>, CsrError> {
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(|e| CsrError(e.to_string()))?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, workspace_id);
        // A client towards the hub; a server towards direct clients, under a name they check.
        let name = protocol::direct::agent_server_name(workspace_id);
        params.subject_alt_names = vec![SanType::DnsName(
            name.try_into()
                .map_err(|e: rcgen::Error| CsrError(e.to_string()))?,
        )];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ClientAuth,
            ExtendedKeyUsagePurpose::ServerAuth,
        ];
        self.sign_csr(csr, params, Duration::minutes(5), AGENT_CERT_VALIDITY)
    }

    /// Signs a direct-connection client's CSR: a certificate whose URIs carry
    /// `credential`, client auth only, valid for
    /// [`protocol::direct::CREDENTIAL_VALIDITY_SECS`].
    pub fn sign_direct(
        &self,
        csr_der: &[u8],
        credential: &protocol::direct::Credential,
    ) -> Result<Vec<u8>, CsrError> {
        let csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(|e| CsrError(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("direct:{}", credential.workspace_id),
        );
        params.subject_alt_names = credential
            .to_uris()
            .into_iter()
            .map(|u| u.try_into().map(SanType::URI))
            .collect::<Result<_, _>>()
            .map_err(|e: rcgen::Error| CsrError(e.to_string()))?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let validity = Duration::seconds(protocol::direct::CREDENTIAL_VALIDITY_SECS as i64);
        self.sign_csr(csr, params, Duration::minutes(1), validity)
    }

    /// Signs `params` for the CSR's public key (nothing else of the request is taken):
    /// valid from `before` ago for `validity`, a random serial.
    fn sign_csr(
        &self,
        csr: CertificateSigningRequestParams,
        mut params: CertificateParams,
        before: Duration,
        validity: Duration,
    ) -> Result<Vec<u8>, CsrError> {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - before;
        params.not_after = now + validity;
        params.serial_number = Some(SerialNumber::from_slice(&random_bytes::<16>()));
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| CsrError(e.to_string()))?;
        Ok(cert.der().to_vec())
    }
}

/// The SHA-256 fingerprint of a DER blob, hex.
pub fn fingerprint(der: &[u8]) -> String {
    hex(&Sha256::digest(der))
}

/// The fingerprint of the public key inside a CSR (to make a retried enrollment idempotent).
pub fn csr_key_fingerprint(csr_der: &[u8]) -> Result<String, CsrError> {
    let csr =
        CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
            .map_err(|e| CsrError(e.to_string()))?;
    Ok(fingerprint(rcgen::PublicKeyData::der_bytes(
        &csr.public_key,
    )))
}

/// The subject CN prefix of replica certificates (agent certificates carry a UUID).
pub const REPLICA_CN_PREFIX: &str = "replica:";

/// The replica id of a replica certificate the TLS layer already verified.
pub fn replica_id(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    let id = cn.strip_prefix(REPLICA_CN_PREFIX)?;
    (!id.is_empty()).then(|| id.to_owned())
}

/// The workspace id (subject CN) of an agent certificate the TLS layer already verified.
pub fn agent_workspace_id(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

/// The one certificate of a PEM text.
fn pem_to_der(pem: &str) -> Result<Vec<u8>> {
    let certs = link::parse_ca_bundle(pem).map_err(|e| anyhow::anyhow!("CA certificate: {e}"))?;
    ensure!(
        certs.len() == 1,
        "CA certificate: expected one certificate, found {}",
        certs.len()
    );
    Ok(certs.into_iter().next().unwrap_or_default())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    rand::Rng::fill(&mut rand::rng(), &mut out[..]);
    out
}
