use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use chrono::{TimeZone, Utc};
use fleetlaps_proto::api::{
    DeviceLocalCredentialInfo, ODataCollection, PasswordBase64, SCOPE_READ_BASIC, SCOPE_READ_PASSWORDS,
};
use fleetlaps_proto::event::{Envelope, Event, PasswordBackedUp, RotationReason, sealing_context};
use fleetlaps_proto::ids::{AccountName, DeviceId, DeviceName, RotationId};
use fleetlaps_proto::seal::{EscrowPublicKey, EscrowSecretKey, seal};
use fleetlaps_proto::subject;
use serde_json::Value;
use tower::ServiceExt as _;

use super::*;
use crate::config::TokenConfig;
use crate::projection::{Outcome, StreamMessage};

/// A token with `DeviceLocalCredential.ReadBasic.All`.
pub(crate) const READ_BASIC_TOKEN: &str = "helpdesk-token";
/// A token with `DeviceLocalCredential.Read.All`.
pub(crate) const READ_ALL_TOKEN: &str = "admin-token";
const ITEM: &str = "/v1.0/directory/deviceLocalCredentials";

/// An [`AppState`] over projections in a tempdir, and helpers to fill them; also used by the
/// client's tests.
pub(crate) struct Fixture {
    _dir: tempfile::TempDir,
    pub(crate) state: AppState,
    next_sequence: u64,
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Fixture {
    pub(crate) fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let projections = Projections::open(&dir.path().join("db")).unwrap();
        let token = |name: &str, token: &str, scope: &str| TokenConfig {
            name: name.to_owned(),
            token: token.to_owned().into(),
            scopes: vec![scope.to_owned()],
        };
        let tokens = TokenStore::from_config(&[
            token("helpdesk", READ_BASIC_TOKEN, SCOPE_READ_BASIC),
            token("admin", READ_ALL_TOKEN, SCOPE_READ_PASSWORDS),
        ]);
        let state = AppState {
            projections,
            escrow: Arc::new(EscrowSecretKey::generate()),
            tokens: Arc::new(tokens),
            metrics: Metrics::new(),
        };
        Self {
            _dir: dir,
            state,
            next_sequence: 1,
        }
    }

    /// Backs up `password` for the device, sealed to the fixture's escrow key.
    pub(crate) fn back_up(&mut self, device_id: &str, device_name: &str, password: &str) {
        self.back_up_sealed_to(&self.state.escrow.public_key(), device_id, device_name, password);
    }

    fn back_up_sealed_to(&mut self, recipient: &EscrowPublicKey, device_id: &str, device_name: &str, password: &str) {
        let sequence = self.next_sequence;
        self.next_sequence += 1;
        let device_id = DeviceId::parse(device_id).unwrap();
        let rotation_id = RotationId::new();
        let time = Utc
            .timestamp_opt(1_700_000_000 + i64::try_from(sequence).unwrap(), 0)
            .unwrap();
        let envelope = Envelope::new(
            device_id.clone(),
            sequence,
            time,
            Event::PasswordBackedUp(PasswordBackedUp {
                rotation_id,
                device_name: DeviceName::parse(device_name).unwrap(),
                account_name: AccountName::parse("lapsadmin").unwrap(),
                account_uid: Some(1001),
                sealed_password: seal(
                    recipient,
                    password.as_bytes(),
                    &sealing_context(&device_id, &rotation_id),
                ),
                expires_at: time + chrono::Duration::days(30),
                reason: RotationReason::Initial,
            }),
        );
        let subject = subject::device_event(&device_id, envelope.event.kind());
        let payload = envelope.to_json();
        let outcome = self
            .state
            .projections
            .apply(StreamMessage {
                sequence,
                subject: &subject,
                published: time,
                payload: &payload,
            })
            .unwrap()
            .outcome;
        assert!(matches!(outcome, Outcome::Applied(_)), "{outcome:?}");
    }

    async fn get(&self, uri: &str, token: Option<&str>) -> Answer {
        let mut request = Request::builder().uri(uri);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        self.send(request.body(Body::empty()).unwrap()).await
    }

    async fn send(&self, request: Request<Body>) -> Answer {
        let response = router(self.state.clone()).oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Answer { status, headers, body }
    }
}

impl Answer {
    #[track_caller]
    fn assert_error(&self, status: StatusCode, code: &str) {
        assert_eq!(self.status, status, "{}", self.body);
        assert_eq!(self.body["error"]["code"], code, "{}", self.body);
        assert!(
            self.body["error"]["message"]
                .as_str()
                .is_some_and(|message| !message.is_empty()),
            "{}",
            self.body
        );
    }

    fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or_default()
    }

    fn collection(&self) -> ODataCollection<DeviceLocalCredentialInfo> {
        assert_eq!(self.status, StatusCode::OK, "{}", self.body);
        serde_json::from_value(self.body.clone()).unwrap()
    }
}

fn ids(collection: &ODataCollection<DeviceLocalCredentialInfo>) -> Vec<&str> {
    collection.value.iter().map(|device| device.id.as_str()).collect()
}

#[tokio::test]
async fn health_and_the_escrow_public_key_need_no_token() {
    let fixture = Fixture::new();
    let health = fixture.get("/healthz", None).await;
    assert_eq!(health.status, StatusCode::OK);
    assert_eq!(health.body, serde_json::json!({"status": "ok"}));
    let key = fixture.get("/fleetlaps/v1/escrow-public-key", None).await;
    assert_eq!(key.status, StatusCode::OK);
    assert_eq!(
        key.body["escrowPublicKey"],
        fixture.state.escrow.public_key().to_string()
    );
}

#[tokio::test]
async fn requests_without_a_valid_token_are_refused_with_a_bearer_challenge() {
    let fixture = Fixture::new();
    let missing = fixture.get(ITEM, None).await;
    let unknown = fixture.get(ITEM, Some("not-a-token")).await;
    let basic = fixture
        .send(
            Request::builder()
                .uri(ITEM)
                .header(header::AUTHORIZATION, "Basic YTpi")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    // Authentication comes before everything else: a malformed id does not tell anything either.
    let malformed_id = fixture.get(&format!("{ITEM}/not.an.id"), None).await;
    for answer in [missing, unknown, basic, malformed_id] {
        answer.assert_error(StatusCode::UNAUTHORIZED, "InvalidAuthenticationToken");
        assert_eq!(answer.headers[header::WWW_AUTHENTICATE], "Bearer");
    }
}

#[tokio::test]
async fn read_basic_reads_metadata_but_not_passwords() {
    let mut fixture = Fixture::new();
    fixture.back_up("dev-1", "host-1", "s3cret-One");

    let metadata = fixture.get(&format!("{ITEM}/dev-1"), Some(READ_BASIC_TOKEN)).await;
    assert_eq!(metadata.status, StatusCode::OK, "{}", metadata.body);
    assert_eq!(
        metadata.body["@odata.context"],
        "$metadata#directory/deviceLocalCredentials/$entity"
    );
    assert_eq!(metadata.body["id"], "dev-1");
    assert_eq!(metadata.body["deviceName"], "host-1");
    assert_eq!(metadata.body["lastBackupDateTime"], "2023-11-14T22:13:21Z");
    assert_eq!(metadata.body["refreshDateTime"], "2023-12-14T22:13:21Z");
    assert!(metadata.body.get("credentials").is_none(), "{}", metadata.body);

    let denied = fixture
        .get(&format!("{ITEM}/dev-1?$select=id,credentials"), Some(READ_BASIC_TOKEN))
        .await;
    denied.assert_error(StatusCode::FORBIDDEN, "Authorization_RequestDenied");
    assert!(denied.message().contains(SCOPE_READ_PASSWORDS), "{}", denied.message());
    assert_eq!(fixture.state.metrics.passwords_disclosed.get(), 0);
}

#[tokio::test]
async fn read_all_reads_the_three_newest_passwords_newest_first() {
    let mut fixture = Fixture::new();
    for password in ["first", "second", "third", "fourth-Pässword"] {
        fixture.back_up("dev-1", "host-1", password);
    }
    let answer = fixture
        .get(&format!("{ITEM}/dev-1?$select=credentials"), Some(READ_ALL_TOKEN))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let info: DeviceLocalCredentialInfo = serde_json::from_value(answer.body).unwrap();
    let credentials = info.credentials.expect("credentials selected");
    let passwords: Vec<String> = credentials
        .iter()
        .map(|credential| credential.password_base64.decode().unwrap().expose().to_owned())
        .collect();
    assert_eq!(passwords, ["fourth-Pässword", "third", "second"]);
    assert_eq!(
        credentials[0].password_base64,
        PasswordBase64::encode("fourth-Pässword")
    );
    assert_eq!(credentials[0].account_name, "lapsadmin");
    assert_eq!(credentials[0].account_sid.as_deref(), Some("1001"));
    assert!(credentials[0].backup_date_time > credentials[1].backup_date_time);
    assert_eq!(fixture.state.metrics.passwords_disclosed.get(), 3);
}

#[tokio::test]
async fn the_list_filters_by_device_name_or_id() {
    let mut fixture = Fixture::new();
    fixture.back_up("dev-a", "host-a", "pw-a");
    fixture.back_up("dev-b", "host-b", "pw-b");
    fixture.back_up("dev-c", "host-c", "pw-c");

    let all = fixture.get(ITEM, Some(READ_BASIC_TOKEN)).await.collection();
    assert_eq!(all.context, "$metadata#directory/deviceLocalCredentials");
    assert_eq!(ids(&all), ["dev-a", "dev-b", "dev-c"]);
    assert!(all.value.iter().all(|device| device.credentials.is_none()));
    assert_eq!(all.next_link, None);

    let by_name = fixture
        .get(
            &format!("{ITEM}?$filter=deviceName%20eq%20%27HOST-B%27"),
            Some(READ_BASIC_TOKEN),
        )
        .await;
    assert!(
        by_name.body["value"][0].get("credentials").is_none(),
        "{}",
        by_name.body
    );
    assert_eq!(ids(&by_name.collection()), ["dev-b"]);
    let by_id = fixture
        .get(
            &format!("{ITEM}?$filter=id+eq+'dev-c'&$select=id,deviceName"),
            Some(READ_ALL_TOKEN),
        )
        .await;
    assert_eq!(ids(&by_id.collection()), ["dev-c"]);
    let nobody = fixture
        .get(
            &format!("{ITEM}?$filter=deviceName%20eq%20%27o''brien%27"),
            Some(READ_BASIC_TOKEN),
        )
        .await;
    assert!(nobody.collection().value.is_empty());
}

#[tokio::test]
async fn paging_with_top_follows_the_next_link_to_the_second_device() {
    let mut fixture = Fixture::new();
    fixture.back_up("dev-b", "host-b", "pw-b");
    fixture.back_up("dev-a", "host-a", "pw-a");

    let first = fixture
        .get(&format!("{ITEM}?$top=1"), Some(READ_BASIC_TOKEN))
        .await
        .collection();
    assert_eq!(ids(&first), ["dev-a"]);
    let next_link = first.next_link.expect("a second page");
    assert_eq!(next_link, format!("{ITEM}?$top=1&$skiptoken=dev-a"));

    let second = fixture.get(&next_link, Some(READ_BASIC_TOKEN)).await.collection();
    assert_eq!(ids(&second), ["dev-b"]);
    assert_eq!(second.next_link, None);
}

#[tokio::test]
async fn the_next_link_keeps_the_filter() {
    let mut fixture = Fixture::new();
    fixture.back_up("dev-a", "web", "pw-a");
    fixture.back_up("dev-b", "db", "pw-b");
    fixture.back_up("dev-c", "web", "pw-c");

    let first = fixture
        .get(
            &format!("{ITEM}?$filter=deviceName+eq+'web'&$top=1"),
            Some(READ_BASIC_TOKEN),
        )
        .await
        .collection();
    assert_eq!(ids(&first), ["dev-a"]);
    let second = fixture
        .get(&first.next_link.expect("more"), Some(READ_BASIC_TOKEN))
        .await
        .collection();
    assert_eq!(ids(&second), ["dev-c"]);
    assert_eq!(second.next_link, None);
}

#[tokio::test]
async fn unsupported_or_invalid_queries_are_400_in_the_odata_shape() {
    let mut fixture = Fixture::new();
    fixture.back_up("dev-1", "host-1", "pw");
    let unsupported = [
        format!("{ITEM}?$filter=startswith(deviceName,%27host%27)"),
        format!("{ITEM}?$orderby=deviceName"),
        format!("{ITEM}?$select=credentials"),
        format!("{ITEM}/dev-1?$top=1"),
    ];
    for uri in &unsupported {
        fixture
            .get(uri, Some(READ_ALL_TOKEN))
            .await
            .assert_error(StatusCode::BAD_REQUEST, "Request_UnsupportedQuery");
    }
    let filter = fixture.get(&unsupported[0], Some(READ_ALL_TOKEN)).await;
    assert!(
        filter.message().contains("deviceName eq '<name>'"),
        "{}",
        filter.message()
    );

    let invalid = [
        format!("{ITEM}?$top=0"),
        format!("{ITEM}?$top=1001"),
        format!("{ITEM}?$top=1&$top=2"),
        format!("{ITEM}?$skiptoken=not.an.id"),
        format!("{ITEM}?$select=password"),
        format!("{ITEM}/dev-1?$select=password"),
        format!("{ITEM}/not.an.id"),
    ];
    for uri in &invalid {
        fixture
            .get(uri, Some(READ_ALL_TOKEN))
            .await
            .assert_error(StatusCode::BAD_REQUEST, "Request_BadRequest");
    }
}

#[tokio::test]
async fn unknown_devices_and_routes_are_404() {
    let fixture = Fixture::new();
    fixture
        .get(&format!("{ITEM}/dev-404"), Some(READ_ALL_TOKEN))
        .await
        .assert_error(StatusCode::NOT_FOUND, "Request_ResourceNotFound");
    fixture
        .get("/v1.0/nothing", Some(READ_ALL_TOKEN))
        .await
        .assert_error(StatusCode::NOT_FOUND, "Request_ResourceNotFound");
    let post = Request::builder()
        .method("POST")
        .uri("/healthz")
        .body(Body::empty())
        .unwrap();
    assert_eq!(fixture.send(post).await.status, StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn a_password_that_does_not_open_is_a_generic_500() {
    let mut fixture = Fixture::new();
    let other_key = EscrowSecretKey::generate();
    fixture.back_up_sealed_to(&other_key.public_key(), "dev-1", "host-1", "pw");
    let answer = fixture
        .get(&format!("{ITEM}/dev-1?$select=credentials"), Some(READ_ALL_TOKEN))
        .await;
    answer.assert_error(StatusCode::INTERNAL_SERVER_ERROR, "InternalServerError");
    assert!(!answer.message().contains("dev-1"), "{}", answer.message());
    assert_eq!(fixture.state.metrics.passwords_disclosed.get(), 0);
}

#[tokio::test]
async fn metrics_count_requests_by_route_pattern_never_by_device() {
    let mut fixture = Fixture::new();
    fixture.back_up("device-9f3e", "host-1", "pw");
    fixture
        .get(&format!("{ITEM}/device-9f3e"), Some(READ_BASIC_TOKEN))
        .await;
    fixture.get(&format!("{ITEM}/device-9f3e"), None).await;
    fixture.get("/no/such/device-9f3e", None).await;

    let response = metrics_router(fixture.state.metrics.clone())
        .oneshot(Request::builder().uri("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_TYPE], "text/plain; version=0.0.4");
    let text = String::from_utf8(
        axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    let requests: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with(crate::metrics::HTTP_REQUESTS_TOTAL))
        .collect();
    let has = |route: &str, status: &str| {
        requests.iter().any(|line| {
            line.contains(&format!("route=\"{route}\""))
                && line.contains(&format!("status=\"{status}\""))
                && line.ends_with(" 1")
        })
    };
    assert!(
        has("/v1.0/directory/deviceLocalCredentials/{deviceId}", "200"),
        "{text}"
    );
    assert!(
        has("/v1.0/directory/deviceLocalCredentials/{deviceId}", "401"),
        "{text}"
    );
    assert!(has("unmatched", "404"), "{text}");
    assert!(text.contains(crate::metrics::HTTP_REQUEST_DURATION_SECONDS), "{text}");
    assert!(!text.contains("device-9f3e"), "{text}");
}
