//! `fleetlaps-agent enroll`: makes the device's Ed25519 key pair, enrolls it with the
//! orchestrator over HTTPS with an enrollment token, and saves the [`Identity`] it gets back.
//!
//! The token is sent as `Authorization: Bearer` to `POST /fleetlaps/v1/enroll` with the public key
//! and the host name; the orchestrator answers with the device id, the escrow public key and its
//! policy. With a CA file, only the certificates in it are trusted (a self-signed orchestrator's
//! certificate, or its CA), not the built-in web roots.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use fleetlaps_proto::api::{EnrollmentRequest, EnrollmentResponse, ODataError};
use fleetlaps_proto::ids::DeviceName;
use fleetlaps_proto::signature::DeviceSigningKey;
use secrecy::{ExposeSecret as _, SecretString};

use crate::identity::Identity;

/// The enrollment endpoint, relative to the orchestrator's base URL.
const ENROLL_PATH: &str = "fleetlaps/v1/enroll";
/// How long the request may take, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What enrollment needs.
pub struct EnrollOptions<'a> {
    /// The orchestrator's API, `https://host:port`.
    pub orchestrator_url: &'a str,
    /// The enrollment token an admin created.
    pub token: &'a SecretString,
    /// A PEM file of the certificates to trust instead of the web roots.
    pub ca_file: Option<&'a Path>,
    /// The host name to enroll under.
    pub device_name: DeviceName,
    /// Tags for the device (a site, a group), which breaches can be scoped by.
    pub tags: Vec<fleetlaps_proto::ids::DeviceTag>,
    /// Where the identity is saved.
    pub state_dir: &'a Path,
    /// Whether an `http://` URL is allowed (`--insecure-http`): the token then crosses the
    /// network in clear, so only for a TLS-terminating proxy on the same host.
    pub insecure_http: bool,
}

/// Enrolls this device and saves its identity (0600) in the state directory. Refuses when the
/// device already has an identity.
pub async fn enroll(options: EnrollOptions<'_>) -> anyhow::Result<Identity> {
    let identity_path = Identity::path(options.state_dir);
    if let Some(existing) = Identity::load(options.state_dir)? {
        anyhow::bail!(
            "already enrolled as device {} ({}); to enroll again, stop the agent and move its state directory away",
            existing.device_id,
            identity_path.display()
        );
    }
    let mut base = reqwest::Url::parse(options.orchestrator_url)
        .map_err(|err| anyhow::anyhow!("invalid orchestrator URL {:?}: {err}", options.orchestrator_url))?;
    if !matches!(base.scheme(), "http" | "https") || base.host_str().is_none() {
        anyhow::bail!(
            "invalid orchestrator URL {base}: allowed: https:// (or http:// with --insecure-http) with a host"
        );
    }
    if base.scheme() == "http" && !options.insecure_http {
        anyhow::bail!(
            "refusing to send the enrollment token over plain HTTP to {base}: use the orchestrator's https:// URL \
             (with --ca for a self-signed certificate), or pass --insecure-http if a TLS-terminating proxy on this host serves it"
        );
    }
    if !base.path().ends_with('/') {
        let path = format!("{}/", base.path());
        base.set_path(&path);
    }
    let url = base.join(ENROLL_PATH).context("building the enrollment URL")?;

    let mut builder = reqwest::Client::builder()
        .user_agent(concat!("fleetlaps-agent/", env!("CARGO_PKG_VERSION")))
        .timeout(REQUEST_TIMEOUT);
    if let Some(ca_file) = options.ca_file {
        let pem = std::fs::read(ca_file).with_context(|| format!("reading the CA file {}", ca_file.display()))?;
        let certificates = reqwest::Certificate::from_pem_bundle(&pem)
            .with_context(|| format!("{} does not hold PEM certificates", ca_file.display()))?;
        if certificates.is_empty() {
            anyhow::bail!("{} holds no PEM certificate", ca_file.display());
        }
        for certificate in certificates {
            builder = builder.add_root_certificate(certificate);
        }
        builder = builder.tls_built_in_root_certs(false);
    }
    let http = builder.build().context("building the HTTP client")?;

    let signing_key = DeviceSigningKey::generate();
    let request = EnrollmentRequest {
        public_key: signing_key.public_key().to_string(),
        device_name: options.device_name.clone(),
        tags: options.tags.clone(),
    };
    let response = http
        .post(url.clone())
        .bearer_auth(options.token.expose_secret())
        .json(&request)
        .send()
        .await
        .with_context(|| format!("enrolling with the orchestrator at {url}"))?;
    let status = response.status();
    let body = response.bytes().await.context("reading the orchestrator's answer")?;
    if !status.is_success() {
        let reason = serde_json::from_slice::<ODataError>(&body)
            .map(|error| format!("{} ({})", error.error.message, error.error.code))
            .unwrap_or_else(|_| "no error message".to_owned());
        anyhow::bail!("the orchestrator refused the enrollment: HTTP {status}: {reason}");
    }
    let answer: EnrollmentResponse = serde_json::from_slice(&body)
        .map_err(|err| anyhow::anyhow!("the orchestrator's enrollment answer does not decode: {err}"))?;
    let identity = Identity {
        device_id: answer.device_id,
        signing_key,
        escrow_public_key: answer.escrow_public_key,
        escrow_recovery_public_key: answer.escrow_recovery_public_key,
        policy: answer.policy,
    };
    identity.save(options.state_dir)?;
    tracing::info!(device_id = %identity.device_id, path = %identity_path.display(), "enrolled");
    Ok(identity)
}
