//! The API client behind `lapsctl`: reads `deviceLocalCredentials` as Graph clients do.
//!
//! Errors keep the server's OData code and message, so a 403 reads as the server wrote it
//! ("… requires the DeviceLocalCredential.Read.All scope"). The token is held as a
//! [`SecretString`] and sent only to the configured server's origin: a next link that points
//! elsewhere is refused rather than followed with the token.
//!
//! For an `https` API the client trusts either the built-in web roots or, given a CA file, only
//! the certificates in that file; a handshake that fails because the server's certificate is not
//! trusted says so and how to fix it.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use fleetlaps_proto::api::{
    AuditEntry, BreachInfo, BreachRequest, COMMAND_ID_HEADER, CreatedEnrollmentToken, CreatedToken,
    DeviceLocalCredentialInfo, EnrollmentTokenInfo, EnrollmentTokenRequest, ExposureReport, ODataCollection,
    ODataError, QuarantineCollection, QuarantineEntry, REASON_HEADER, TimelineEntry, TokenInfo, TokenRequest,
};
use fleetlaps_proto::ids::DeviceId;
use reqwest::header::{HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;

/// Graph's optional header naming the calling tool.
const CLIENT_NAME_HEADER: &str = "ocp-client-name";
/// Graph's optional header giving the calling tool's version.
const CLIENT_VERSION_HEADER: &str = "ocp-client-version";
/// The name sent in [`CLIENT_NAME_HEADER`].
const CLIENT_NAME: &str = "lapsctl";
/// The collection's path, relative to the base URL.
const COLLECTION_PATH: &str = "v1.0/directory/deviceLocalCredentials";
/// The quarantine's path, relative to the base URL.
const QUARANTINE_PATH: &str = "v1.0/fleetlaps/quarantine";
/// The audit history's path, relative to the base URL.
const AUDIT_PATH: &str = "v1.0/fleetlaps/auditEvents";
/// Where one device's investigations are, relative to the base URL: `<id>/timeline`,
/// `<id>/exposure`.
const DEVICES_PATH: &str = "v1.0/fleetlaps/devices";
/// The page size asked for a timeline: the largest the server serves, so few requests.
const TIMELINE_PAGE: &str = "1000";
/// How long one request may take, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A bound on next links followed for one listing, against a server that never stops paging.
const MAX_PAGES: usize = 1000;

/// How long a request is sent again while the orchestrator answers 503 with Retry-After (it is
/// catching up with its history after a start).
const CATCHING_UP_PATIENCE: Duration = Duration::from_secs(60);

/// Which audit entries to list; every field narrows it.
#[derive(Debug, Default, Clone, Copy)]
pub struct AuditFilter<'a> {
    /// Only this device's.
    pub device_id: Option<&'a DeviceId>,
    /// Only this kind (`password_read`, …).
    pub kind: Option<&'a str>,
    /// Only what this principal did.
    pub principal: Option<&'a str>,
    /// Only from this time on.
    pub since: Option<chrono::DateTime<chrono::Utc>>,
}

/// The breaches' path, relative to the base URL.
const BREACHES_PATH: &str = "v1.0/fleetlaps/breaches";

/// One kind of hashed token as the API serves it: the same create, list and revoke on its own
/// collection, with its own request and answer shapes.
pub trait TokenResource {
    /// The collection's path, relative to the base URL.
    const PATH: &'static str;
    /// What creating one asks for.
    type Request: serde::Serialize;
    /// The answer to a creation: the token, shown this once, and its info.
    type Created: DeserializeOwned;
    /// One token as listed.
    type Info: DeserializeOwned;
}

/// API tokens (`/v1.0/fleetlaps/tokens`).
pub enum ApiTokens {}

impl TokenResource for ApiTokens {
    const PATH: &'static str = "v1.0/fleetlaps/tokens";
    type Request = TokenRequest;
    type Created = CreatedToken;
    type Info = TokenInfo;
}

/// Enrollment tokens (`/v1.0/fleetlaps/enrollmentTokens`).
pub enum EnrollmentTokens {}

impl TokenResource for EnrollmentTokens {
    const PATH: &'static str = "v1.0/fleetlaps/enrollmentTokens";
    type Request = EnrollmentTokenRequest;
    type Created = CreatedEnrollmentToken;
    type Info = EnrollmentTokenInfo;
}

/// A client of one orchestrator's API, with one bearer token.
pub struct ApiClient {
    /// The API root; its path ends in `/`, so relative paths join under it.
    base_url: Url,
    /// Sent as `Authorization: Bearer`; redacted in `Debug`, never logged.
    token: SecretString,
    /// Keeps connections alive across requests; carries the client headers.
    http: reqwest::Client,
    /// Sent as `x-fleetlaps-reason` when set.
    reason: Option<String>,
}

/// The whole quarantine, as [`ApiClient::quarantine`] reads it.
#[derive(Debug, Default)]
pub struct QuarantineListing {
    /// Every entry kept, oldest first.
    pub entries: Vec<QuarantineEntry>,
    /// The most entries the server keeps.
    pub max_entries: u64,
    /// How many older entries the server dropped to keep that bound.
    pub dropped_count: u64,
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an OData error.
    #[error("{message} (HTTP {status}, {code})")]
    Http {
        /// The HTTP status.
        status: StatusCode,
        /// The OData error code, such as `Authorization_RequestDenied`.
        code: String,
        /// The server's message, as it wrote it.
        message: String,
    },
    /// The server could not be reached, or the exchange broke off. The cause is the `source`,
    /// not repeated in the message, so that `{:#}` shows it once.
    #[error("request to the API failed")]
    Transport(#[source] reqwest::Error),
    /// The TLS handshake failed: `problem` says why in words and what to do; the `source` has
    /// rustls's own reason.
    #[error("TLS with the API failed: {problem}")]
    Tls {
        /// What went wrong and how to fix it.
        problem: &'static str,
        /// The failed request.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered something that is not the API's: an error without an OData body, or a
    /// body that does not decode.
    #[error("unexpected response from {url} (HTTP {status}): {detail}")]
    UnexpectedResponse {
        /// The URL requested, without its query.
        url: String,
        /// The HTTP status.
        status: StatusCode,
        /// What was wrong with it; never the body itself, which may hold a password.
        detail: String,
    },
}

impl ApiClient {
    /// A client for the API at `base_url` (such as `https://127.0.0.1:8080`), calling with
    /// `token`, trusting the built-in web roots.
    pub fn new(base_url: &str, token: SecretString) -> anyhow::Result<Self> {
        Self::with_ca(base_url, token, None)
    }

    /// Like [`Self::new`]; with `ca_file`, an `https` server's certificate must be issued by one
    /// of the certificates in that PEM file (or be one of them, for a self-signed server), and
    /// the built-in web roots are not trusted.
    pub fn with_ca(base_url: &str, token: SecretString, ca_file: Option<&Path>) -> anyhow::Result<Self> {
        let mut base_url =
            Url::parse(base_url).map_err(|err| anyhow::anyhow!("invalid API URL {base_url:?}: {err}"))?;
        if !matches!(base_url.scheme(), "http" | "https") || base_url.host_str().is_none() {
            anyhow::bail!("invalid API URL {base_url}: allowed: http:// or https:// with a host");
        }
        if !base_url.path().ends_with('/') {
            let path = format!("{}/", base_url.path());
            base_url.set_path(&path);
        }
        base_url.set_query(None);
        base_url.set_fragment(None);

        let mut headers = HeaderMap::new();
        headers.insert(CLIENT_NAME_HEADER, HeaderValue::from_static(CLIENT_NAME));
        headers.insert(
            CLIENT_VERSION_HEADER,
            HeaderValue::from_static(env!("CARGO_PKG_VERSION")),
        );
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("lapsctl/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers)
            .timeout(REQUEST_TIMEOUT);
        if let Some(ca_file) = ca_file {
            for certificate in read_ca_file(ca_file)? {
                builder = builder.add_root_certificate(certificate);
            }
            builder = builder.tls_built_in_root_certs(false);
        }
        let http = builder.build().context("building the HTTP client")?;
        Ok(Self {
            base_url,
            token,
            http,
            reason: None,
        })
    }

    /// The devices named `device_name` (compared case-insensitively by the server), every page.
    pub async fn find_devices(&self, device_name: &str) -> Result<Vec<DeviceLocalCredentialInfo>, ClientError> {
        let mut url = self.url(COLLECTION_PATH)?;
        url.query_pairs_mut().append_pair(
            "$filter",
            &format!("deviceName eq '{}'", device_name.replace('\'', "''")),
        );
        self.all_pages(url).await
    }

    /// Every item of the collection at `url`, following `@odata.nextLink` to the last page.
    async fn all_pages<T: DeserializeOwned>(&self, url: Url) -> Result<Vec<T>, ClientError> {
        let mut items = Vec::new();
        self.each_page(url, |page: ODataCollection<T>| {
            items.extend(page.value);
            page.next_link
        })
        .await?;
        Ok(items)
    }

    /// GETs the page at `url`, hands it to `take` (which keeps what it wants and gives back the
    /// page's next link), and so on to the last page, at most [`MAX_PAGES`].
    async fn each_page<P: DeserializeOwned>(
        &self,
        mut url: Url,
        mut take: impl FnMut(P) -> Option<String>,
    ) -> Result<(), ClientError> {
        for _ in 0..MAX_PAGES {
            let page: P = self.get_json(url.clone()).await?;
            match take(page) {
                Some(link) => url = self.next_url(&url, &link)?,
                None => return Ok(()),
            }
        }
        Err(ClientError::UnexpectedResponse {
            url: without_query(&url),
            status: StatusCode::OK,
            detail: format!("still paging after {MAX_PAGES} pages"),
        })
    }

    /// One device's metadata; with `include_passwords`, also its newest credentials, which needs
    /// the `DeviceLocalCredential.Read.All` scope.
    pub async fn device(
        &self,
        device_id: &DeviceId,
        include_passwords: bool,
    ) -> Result<DeviceLocalCredentialInfo, ClientError> {
        let mut url = self.url(&format!("{COLLECTION_PATH}/{device_id}"))?;
        if include_passwords {
            url.query_pairs_mut().append_pair("$select", "credentials");
        }
        self.get_json(url).await
    }

    /// The devices `name_or_id` designates, as `Get-LapsAADPassword -DeviceIds` finds them. An
    /// argument shaped like a UUID (the orchestrator's device ids) is tried as an id first: a
    /// device chooses its own name, so it could take another device's id as its name and must
    /// not be returned in that device's place. Otherwise the devices with that name; or, when
    /// none has it and it is a valid device id, the device with that id. Empty when nothing
    /// matches; more than one when several devices share the name.
    pub async fn lookup_device(&self, name_or_id: &str) -> Result<Vec<DeviceLocalCredentialInfo>, ClientError> {
        let uuid_shaped = uuid::Uuid::try_parse(name_or_id).is_ok();
        if uuid_shaped && let Some(device) = self.device_if_exists(name_or_id).await? {
            return Ok(vec![device]);
        }
        let by_name = self.find_devices(name_or_id).await?;
        if !by_name.is_empty() || uuid_shaped {
            return Ok(by_name);
        }
        Ok(self.device_if_exists(name_or_id).await?.into_iter().collect())
    }

    /// The device whose id is `id`, if `id` is a valid id and the device exists.
    async fn device_if_exists(&self, id: &str) -> Result<Option<DeviceLocalCredentialInfo>, ClientError> {
        let Ok(device_id) = DeviceId::parse(id) else {
            return Ok(None);
        };
        match self.device(&device_id, false).await {
            Ok(device) => Ok(Some(device)),
            Err(ClientError::Http {
                status: StatusCode::NOT_FOUND,
                ..
            }) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// `path` under the base URL.
    fn url(&self, path: &str) -> Result<Url, ClientError> {
        self.base_url.join(path).map_err(|err| ClientError::UnexpectedResponse {
            url: self.base_url.to_string(),
            status: StatusCode::OK,
            detail: format!("cannot build a URL for {path}: {err}"),
        })
    }

    /// A next link resolved against the page it came from; refused unless it stays on the
    /// server's origin, since the token goes with it.
    fn next_url(&self, current: &Url, link: &str) -> Result<Url, ClientError> {
        let refused = |detail: String| ClientError::UnexpectedResponse {
            url: without_query(current),
            status: StatusCode::OK,
            detail,
        };
        let next = current
            .join(link)
            .map_err(|err| refused(format!("invalid @odata.nextLink: {err}")))?;
        if next.origin() != self.base_url.origin() {
            return Err(refused(format!(
                "@odata.nextLink leaves the server for {}",
                next.origin().ascii_serialization()
            )));
        }
        Ok(next)
    }

    /// GETs `url` and decodes a successful JSON answer, or turns the failure into a [`ClientError`].
    async fn get_json<T: DeserializeOwned>(&self, url: Url) -> Result<T, ClientError> {
        let (_, body, display_url, status) = self.send(Method::GET, url, None).await?;
        decode(&body, display_url, status)
    }

    /// Sends one request with the token (and the reason, if set), and returns the headers and
    /// body of a successful answer, or the failure as a [`ClientError`].
    async fn send(
        &self,
        method: Method,
        url: Url,
        body: Option<&serde_json::Value>,
    ) -> Result<(reqwest::header::HeaderMap, bytes::Bytes, String, StatusCode), ClientError> {
        let display_url = without_query(&url);
        // A 503 with Retry-After means the orchestrator has just started and is catching up
        // with its history: nothing was done, so the request is sent again, for a while.
        let give_up = std::time::Instant::now() + CATCHING_UP_PATIENCE;
        let (status, headers, body) = loop {
            let mut request = self
                .http
                .request(method.clone(), url.clone())
                .bearer_auth(self.token.expose_secret());
            if let Some(reason) = &self.reason {
                request = request.header(REASON_HEADER, reason);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            let response = request.send().await?;
            let status = response.status();
            let headers = response.headers().clone();
            let retry_after = headers
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
            let body = response.bytes().await?;
            match retry_after {
                Some(seconds) if status == StatusCode::SERVICE_UNAVAILABLE && std::time::Instant::now() < give_up => {
                    tokio::time::sleep(Duration::from_secs(seconds.clamp(1, 5))).await;
                }
                _ => break (status, headers, body),
            }
        };
        if status.is_success() {
            return Ok((headers, body, display_url, status));
        }
        match serde_json::from_slice::<ODataError>(&body) {
            Ok(odata) => Err(ClientError::Http {
                status,
                code: odata.error.code,
                message: odata.error.message,
            }),
            Err(_) => Err(ClientError::UnexpectedResponse {
                url: display_url,
                status,
                detail: "the error has no OData body; is the URL an orchestrator's?".to_owned(),
            }),
        }
    }

    /// Records `reason` with every request from now on (`x-fleetlaps-reason`): the audit keeps it
    /// with each password read and rotation request.
    pub fn set_reason(&mut self, reason: Option<String>) {
        self.reason = reason;
    }

    /// The device directory (`GET /v1.0/devices`, `Device.Read.All`, every page): each device's
    /// id and name.
    pub async fn directory(&self) -> Result<Vec<(DeviceId, String)>, ClientError> {
        let url = self.url("v1.0/devices")?;
        let display_url = without_query(&url);
        let devices: Vec<serde_json::Value> = self.all_pages(url).await?;
        devices
            .iter()
            .map(|device| {
                let id = device["id"].as_str().and_then(|id| DeviceId::parse(id).ok());
                let name = device["displayName"].as_str().map(str::to_owned);
                id.zip(name).ok_or_else(|| ClientError::UnexpectedResponse {
                    url: display_url.clone(),
                    status: StatusCode::OK,
                    detail: "a device without a valid id or displayName".to_owned(),
                })
            })
            .collect()
    }

    /// Asks the device to rotate its password now; returns the id of the command sent to it.
    pub async fn rotate(&self, device_id: &DeviceId) -> Result<String, ClientError> {
        let url = self.url(&format!(
            "v1.0/deviceManagement/managedDevices/{device_id}/rotateLocalAdminPassword"
        ))?;
        let (headers, _, display_url, status) = self.send(Method::POST, url, None).await?;
        headers
            .get(COMMAND_ID_HEADER)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
            .ok_or(ClientError::UnexpectedResponse {
                url: display_url,
                status,
                detail: format!("no {COMMAND_ID_HEADER} header"),
            })
    }

    /// Creates a token of kind `K`; the answer holds the token, which the server never shows
    /// again.
    pub async fn create_token<K: TokenResource>(&self, request: &K::Request) -> Result<K::Created, ClientError> {
        let url = self.url(K::PATH)?;
        let body = serde_json::to_value(request).expect("a token request serialises");
        let (_, body, display_url, status) = self.send(Method::POST, url, Some(&body)).await?;
        decode(&body, display_url, status)
    }

    /// Every token of kind `K` made through the API, without secrets, every page.
    pub async fn tokens<K: TokenResource>(&self) -> Result<Vec<K::Info>, ClientError> {
        self.all_pages(self.url(K::PATH)?).await
    }

    /// Revokes the token of kind `K` with this id.
    pub async fn revoke_token<K: TokenResource>(&self, token_id: &str) -> Result<(), ClientError> {
        let url = self.url(&format!("{}/{token_id}", K::PATH))?;
        self.send(Method::DELETE, url, None).await?;
        Ok(())
    }

    /// Sets a device's tags, replacing the ones it had.
    pub async fn set_device_tags(
        &self,
        device_id: &DeviceId,
        tags: &[fleetlaps_proto::ids::DeviceTag],
    ) -> Result<(), ClientError> {
        let url = self.url(&format!("v1.0/fleetlaps/devices/{device_id}/tags"))?;
        let body = serde_json::json!({ "tags": tags });
        self.send(Method::PUT, url, Some(&body)).await?;
        Ok(())
    }

    /// Declares a breach; the answer is its campaign.
    pub async fn declare_breach(&self, request: &BreachRequest) -> Result<BreachInfo, ClientError> {
        let url = self.url(BREACHES_PATH)?;
        let body = serde_json::to_value(request).expect("a breach request serialises");
        let (_, body, display_url, status) = self.send(Method::POST, url, Some(&body)).await?;
        decode(&body, display_url, status)
    }

    /// Every campaign, oldest first, every page.
    pub async fn breaches(&self) -> Result<Vec<BreachInfo>, ClientError> {
        self.all_pages(self.url(BREACHES_PATH)?).await
    }

    /// One campaign with its progress and stragglers.
    pub async fn breach(&self, breach_id: &str) -> Result<BreachInfo, ClientError> {
        self.get_json(self.url(&format!("{BREACHES_PATH}/{breach_id}"))?).await
    }

    /// Cancels a running campaign.
    pub async fn cancel_breach(&self, breach_id: &str) -> Result<(), ClientError> {
        let url = self.url(&format!("{BREACHES_PATH}/{breach_id}/cancel"))?;
        self.send(Method::POST, url, None).await?;
        Ok(())
    }

    /// The quarantined stream messages, oldest first, every page; and how many older ones the
    /// server dropped to keep its bound.
    pub async fn quarantine(&self) -> Result<QuarantineListing, ClientError> {
        let mut listing = QuarantineListing::default();
        self.each_page(self.url(QUARANTINE_PATH)?, |page: QuarantineCollection| {
            listing.entries.extend(page.value);
            // The counts of the last page are the newest.
            listing.max_entries = page.max_entries;
            listing.dropped_count = page.dropped_count;
            page.next_link
        })
        .await?;
        Ok(listing)
    }

    /// The audit history, oldest first, every page; only one device's or one kind's if asked.
    pub async fn audit(&self, filter: &AuditFilter<'_>) -> Result<Vec<AuditEntry>, ClientError> {
        let mut url = self.url(AUDIT_PATH)?;
        if let Some(device_id) = filter.device_id {
            url.query_pairs_mut().append_pair("deviceId", device_id.as_str());
        }
        if let Some(kind) = filter.kind {
            url.query_pairs_mut().append_pair("kind", kind);
        }
        if let Some(principal) = filter.principal {
            url.query_pairs_mut().append_pair("principal", principal);
        }
        if let Some(since) = filter.since {
            url.query_pairs_mut()
                .append_pair("since", &since.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true));
        }
        self.all_pages(url).await
    }

    /// Every event of one device, oldest first, every page (`Audit.Read.All`).
    pub async fn timeline(&self, device_id: &DeviceId) -> Result<Vec<TimelineEntry>, ClientError> {
        let mut url = self.url(&format!("{DEVICES_PATH}/{device_id}/timeline"))?;
        url.query_pairs_mut().append_pair("$top", TIMELINE_PAGE);
        self.all_pages(url).await
    }

    /// Which password version was valid on the device at `at`, who read it, when it was used
    /// and when it was rotated away (`Audit.Read.All`).
    pub async fn exposure(
        &self,
        device_id: &DeviceId,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Result<ExposureReport, ClientError> {
        let mut url = self.url(&format!("{DEVICES_PATH}/{device_id}/exposure"))?;
        url.query_pairs_mut()
            .append_pair("at", &at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true));
        self.get_json(url).await
    }
}

/// Decodes a successful JSON answer.
fn decode<T: DeserializeOwned>(body: &[u8], url: String, status: StatusCode) -> Result<T, ClientError> {
    serde_json::from_slice(body).map_err(|err| ClientError::UnexpectedResponse {
        url,
        status,
        detail: format!("the body is not the expected JSON ({})", describe_json_error(&err)),
    })
}

/// The certificates in the PEM file at `path`, each checked to be one rustls can trust.
fn read_ca_file(path: &Path) -> anyhow::Result<Vec<reqwest::Certificate>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;

    let pem = std::fs::read(path).with_context(|| format!("reading CA file {}", path.display()))?;
    let certificates = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| anyhow::anyhow!("CA file {}: invalid PEM: {err}", path.display()))?;
    if certificates.is_empty() {
        anyhow::bail!(
            "CA file {}: no certificate; allowed: PEM with -----BEGIN CERTIFICATE-----",
            path.display()
        );
    }
    let mut roots = rustls::RootCertStore::empty();
    certificates
        .iter()
        .enumerate()
        .map(|(index, der)| {
            roots
                .add(der.clone())
                .map_err(|err| anyhow::anyhow!("CA file {}: certificate {}: {err}", path.display(), index + 1))?;
            reqwest::Certificate::from_der(der)
                .with_context(|| format!("CA file {}: certificate {}", path.display(), index + 1))
        })
        .collect()
}

impl From<reqwest::Error> for ClientError {
    /// A failed request, as [`ClientError::Tls`] when rustls ended it.
    fn from(err: reqwest::Error) -> Self {
        match tls_problem(&err) {
            Some(problem) => Self::Tls { problem, source: err },
            None => Self::Transport(err),
        }
    }
}

/// What to tell the user when rustls is somewhere in `err`'s causes.
fn tls_problem(err: &reqwest::Error) -> Option<&'static str> {
    use rustls::CertificateError;

    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(current) = cause {
        // rustls's error travels inside (nested) `io::Error`s, whose `source` skips the error they
        // wrap, so look inside them.
        let mut inner = current;
        while let Some(wrapped) = inner.downcast_ref::<std::io::Error>().and_then(std::io::Error::get_ref) {
            inner = wrapped;
        }
        if let Some(rustls_error) = inner.downcast_ref::<rustls::Error>() {
            return Some(match rustls_error {
                rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
                ) => "the server's certificate is not valid for the host in the URL; use a name the certificate lists",
                rustls::Error::InvalidCertificate(
                    CertificateError::Expired
                    | CertificateError::ExpiredContext { .. }
                    | CertificateError::NotValidYet
                    | CertificateError::NotValidYetContext { .. },
                ) => "the server's certificate has expired or is not valid yet",
                rustls::Error::InvalidCertificate(_) => {
                    "certificate not trusted; pass --ca with the certificate of the CA that issued it \
                     (for a self-signed orchestrator: its data_dir/tls/cert.pem)"
                }
                _ => "the TLS handshake failed; if the server serves plain HTTP, use an http:// URL",
            });
        }
        cause = current.source();
    }
    None
}

/// `url` without its query, for messages.
fn without_query(url: &Url) -> String {
    let mut url = url.clone();
    url.set_query(None);
    url.to_string()
}

/// Where and what kind of JSON error, without serde's message, which can quote a value from the
/// body (such as a password).
fn describe_json_error(err: &serde_json::Error) -> String {
    let category = match err.classify() {
        serde_json::error::Category::Io => "i/o",
        serde_json::error::Category::Syntax => "syntax",
        serde_json::error::Category::Data => "data",
        serde_json::error::Category::Eof => "truncated",
    };
    format!("{category} error at line {} column {}", err.line(), err.column())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_url_gets_a_trailing_slash_so_paths_join_under_it() {
        let client = ApiClient::new("https://laps.example/prefix", SecretString::from("t")).unwrap();
        assert_eq!(
            client.url(COLLECTION_PATH).unwrap().as_str(),
            "https://laps.example/prefix/v1.0/directory/deviceLocalCredentials"
        );
        assert!(ApiClient::new("ftp://x", SecretString::from("t")).is_err());
        assert!(ApiClient::new("not a url", SecretString::from("t")).is_err());
    }

    #[tokio::test]
    async fn the_client_reads_what_the_router_serves() {
        use crate::http::tests::{Fixture, READ_ALL_TOKEN, READ_BASIC_TOKEN};
        let mut fixture = Fixture::new();
        fixture.back_up("dev-a", "web", "pw-a");
        fixture.back_up("dev-b", "web", "pw-b");
        fixture.back_up("dev-c", "db", "pw-c");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let router = crate::http::router(fixture.state.clone());
        let server = tokio::spawn(async move { axum::serve(listener, router).await });
        let admin = ApiClient::new(&base_url, SecretString::from(READ_ALL_TOKEN)).unwrap();

        let web = admin.find_devices("WEB").await.unwrap();
        assert_eq!(
            web.iter().map(|device| device.id.as_str()).collect::<Vec<_>>(),
            ["dev-a", "dev-b"]
        );
        assert!(admin.find_devices("o'brien & co").await.unwrap().is_empty());
        let by_id = admin.lookup_device("dev-c").await.unwrap();
        assert_eq!(by_id[0].device_name.as_str(), "db");
        assert!(admin.lookup_device("nothing").await.unwrap().is_empty());
        assert_eq!(admin.lookup_device("web").await.unwrap().len(), 2);
        // A device that names itself after another's id is not returned for that id.
        let victim = "0193a2c4-5b6d-7e8f-9a0b-1c2d3e4f5a6b";
        fixture.back_up(victim, "victim", "pw-victim");
        fixture.back_up("dev-impostor", victim, "pw-impostor");
        let found = admin.lookup_device(victim).await.unwrap();
        assert_eq!(
            found.iter().map(|device| device.id.as_str()).collect::<Vec<_>>(),
            [victim]
        );
        assert_eq!(found[0].device_name.as_str(), "victim");

        let device_id = DeviceId::parse("dev-c").unwrap();
        let device = admin.device(&device_id, true).await.unwrap();
        let credentials = device.credentials.expect("asked for");
        assert_eq!(credentials[0].password_base64.decode().unwrap().expose(), "pw-c");

        let helpdesk = ApiClient::new(&base_url, SecretString::from(READ_BASIC_TOKEN)).unwrap();
        assert!(helpdesk.device(&device_id, false).await.unwrap().credentials.is_none());
        let denied = helpdesk.device(&device_id, true).await.unwrap_err();
        assert!(
            matches!(
                &denied,
                ClientError::Http {
                    status: StatusCode::FORBIDDEN,
                    ..
                }
            ),
            "{denied}"
        );
        assert!(
            denied.to_string().contains("DeviceLocalCredential.Read.All"),
            "{denied}"
        );
        let stranger = ApiClient::new(&base_url, SecretString::from("wrong")).unwrap();
        let refused = stranger.find_devices("web").await.unwrap_err();
        assert!(
            matches!(
                &refused,
                ClientError::Http {
                    status: StatusCode::UNAUTHORIZED,
                    ..
                }
            ),
            "{refused}"
        );
        server.abort();
    }

    #[test]
    fn next_links_must_stay_on_the_server() {
        let client = ApiClient::new("http://127.0.0.1:8080", SecretString::from("t")).unwrap();
        let current = client.url(COLLECTION_PATH).unwrap();
        let next = client
            .next_url(&current, "/v1.0/directory/deviceLocalCredentials?$top=1&$skiptoken=a")
            .unwrap();
        assert_eq!(
            next.as_str(),
            "http://127.0.0.1:8080/v1.0/directory/deviceLocalCredentials?$top=1&$skiptoken=a"
        );
        assert!(client.next_url(&current, "http://evil.example/steal").is_err());
    }
}
