use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode, header};
use chrono::{TimeZone, Utc};
use fleetlaps_proto::api::{
    DeviceLocalCredentialInfo, ODataCollection, PasswordBase64, SCOPE_READ_BASIC, SCOPE_READ_PASSWORDS,
};
use fleetlaps_proto::event::{Envelope, Event, PasswordBackedUp, RotationReason, sealing_context};
use fleetlaps_proto::ids::{AccountName, DeviceId, DeviceName, RotationId};
use fleetlaps_proto::seal::{EscrowSecretKey, seal};
use fleetlaps_proto::subject;
use serde_json::{Value, json};
use tower::ServiceExt as _;

use super::*;
use crate::bus::BusError;
use crate::config::TokenConfig;
use crate::projection::{Outcome, StreamMessage};
use fleetlaps_proto::audit::{
    AuditEnvelope, AuditEvent, DeviceEnrolled, EnrollmentTokenCreated, OrchestratorKeyCreated, TokenId,
};
use fleetlaps_proto::command::Command;
use fleetlaps_proto::signature::{DeviceSigningKey, OrchestratorSigningKey};

/// A token with `DeviceLocalCredential.ReadBasic.All`.
pub(crate) const READ_BASIC_TOKEN: &str = "helpdesk-token";
/// A token with `DeviceLocalCredential.Read.All`.
pub(crate) const READ_ALL_TOKEN: &str = "admin-token";

/// The fixture's token holding only `scope`.
fn scope_token(scope: crate::auth::Scope) -> String {
    format!("token-for-{scope}")
}
const ITEM: &str = "/v1.0/directory/deviceLocalCredentials";

/// An [`AppState`] over projections in a tempdir, and helpers to fill them; also used by the
/// client's tests.
pub(crate) struct Fixture {
    _dir: tempfile::TempDir,
    pub(crate) state: AppState,
    journal: Arc<FoldingJournal>,
    device_events: Arc<RecordedDeviceEvents>,
    /// The signing keys of the devices the fixture enrolled.
    device_keys: std::collections::HashMap<DeviceId, DeviceSigningKey>,
}

/// The enrollment token the fixture enrolls its devices with.
const FIXTURE_ENROLLMENT_TOKEN: &str = "fle_fixture";
/// A config token with `Admin` and `Token.Grant`: it may create tokens with any scope.
const GRANTER_TOKEN: &str = "granter-token";

/// The journal of these in-process tests: folds each event straight into the fixture's
/// projections, as the consumer would after JetStream stored it, and keeps the commands. It can
/// be made unavailable, as JetStream is when NATS is down. (The integration tests use the real
/// journal on a real nats-server.)
pub(crate) struct FoldingJournal {
    projections: Projections,
    next_sequence: std::sync::atomic::AtomicU64,
    available: std::sync::atomic::AtomicBool,
    commands: std::sync::Mutex<Vec<Command>>,
    /// While `Some`, appended events are acknowledged but not folded (a projection lagging
    /// behind the stream): they wait here, in order.
    held: std::sync::Mutex<Option<Vec<(u64, AuditEnvelope)>>>,
    /// Signs every orchestrator event, as the real journal does with the orchestrator key.
    signing_key: OrchestratorSigningKey,
}

impl FoldingJournal {
    fn next_sequence(&self) -> u64 {
        self.next_sequence.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    }

    /// From now on, events are acknowledged but not folded until [`Self::fold_held`].
    fn hold_folding(&self) {
        *self.held.lock().unwrap() = Some(Vec::new());
    }

    /// Folds the held events, in order, and folds at once again from then on.
    fn fold_held(&self) {
        let held = self.held.lock().unwrap().take().unwrap_or_default();
        for (sequence, envelope) in held {
            self.fold(sequence, &envelope);
        }
    }

    fn fold(&self, sequence: u64, envelope: &AuditEnvelope) {
        let subject = subject::audit_event(envelope.event.kind());
        let payload = envelope.to_json();
        let signature = self.signing_key.sign(&subject, &payload);
        let applied = self
            .projections
            .apply(
                StreamMessage {
                    sequence,
                    subject: &subject,
                    published: envelope.time,
                    payload: &payload,
                    signature: Some(&signature),
                },
                // Orchestrator events hold no sealed password.
                &NO_BACKUP_OPENS,
            )
            .unwrap();
        assert!(matches!(applied.outcome, Outcome::Recorded(_)), "{applied:?}");
    }
}

/// The journal folds only orchestrator events, which hold no sealed password.
struct NoBackupOpens;

impl crate::projection::SealCheck for NoBackupOpens {
    fn holds(&self, _public_key: &fleetlaps_proto::seal::EscrowPublicKey) -> bool {
        false
    }

    fn opens(&self, _sealed: &fleetlaps_proto::seal::SealedBox, _context: &[u8]) -> bool {
        false
    }
}

const NO_BACKUP_OPENS: NoBackupOpens = NoBackupOpens;

impl Journal for FoldingJournal {
    fn append(&self, event: AuditEvent) -> futures::future::BoxFuture<'_, Result<u64, BusError>> {
        Box::pin(async move {
            if !self.available.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(BusError::Journal {
                    source: "JetStream is unavailable".into(),
                });
            }
            // JetStream answers later: let other requests run meanwhile, as they would.
            tokio::task::yield_now().await;
            let envelope = AuditEnvelope::new(Utc::now(), event);
            let sequence = self.next_sequence();
            if let Some(held) = self.held.lock().unwrap().as_mut() {
                held.push((sequence, envelope));
                return Ok(sequence);
            }
            self.fold(sequence, &envelope);
            Ok(sequence)
        })
    }

    fn command(&self, command: Command) -> futures::future::BoxFuture<'_, Result<(), BusError>> {
        Box::pin(async move {
            if !self.available.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(BusError::Journal {
                    source: "JetStream is unavailable".into(),
                });
            }
            self.commands.lock().unwrap().push(command);
            Ok(())
        })
    }
}

/// The device events the fixture folded, as the history holds them: what a device's timeline
/// reads in these tests.
#[derive(Default)]
pub(crate) struct RecordedDeviceEvents {
    messages: std::sync::Mutex<Vec<crate::bus::HistoryMessage>>,
}

impl crate::bus::DeviceEvents for RecordedDeviceEvents {
    fn device_events<'a>(
        &'a self,
        device_id: &'a DeviceId,
        after: u64,
        until: u64,
        limit: usize,
    ) -> futures::future::BoxFuture<'a, Result<Vec<crate::bus::HistoryMessage>, BusError>> {
        let prefix = format!("laps.events.{device_id}.");
        let found = self
            .messages
            .lock()
            .unwrap()
            .iter()
            .filter(|message| message.subject.starts_with(&prefix) && (after + 1..=until).contains(&message.sequence))
            .take(limit)
            .cloned()
            .collect();
        Box::pin(async move { Ok(found) })
    }
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
            token_sha256: crate::auth::token_sha256(token),
            scopes: vec![scope.to_owned()],
            expires_at: None,
        };
        let mut tokens: Vec<TokenConfig> = vec![
            token("helpdesk", READ_BASIC_TOKEN, SCOPE_READ_BASIC),
            token("admin", READ_ALL_TOKEN, SCOPE_READ_PASSWORDS),
        ];
        tokens.extend(crate::auth::Scope::ALL.map(|scope| token(scope.as_str(), &scope_token(scope), scope.as_str())));
        tokens.push(TokenConfig {
            scopes: vec![
                fleetlaps_proto::api::SCOPE_ADMIN.to_owned(),
                fleetlaps_proto::api::SCOPE_TOKEN_GRANT.to_owned(),
            ],
            ..token("granter", GRANTER_TOKEN, fleetlaps_proto::api::SCOPE_ADMIN)
        });
        let tokens = TokenStore::new(&tokens, None, projections.clone());
        let journal = Arc::new(FoldingJournal {
            projections: projections.clone(),
            next_sequence: 1.into(),
            available: true.into(),
            commands: std::sync::Mutex::default(),
            held: std::sync::Mutex::default(),
            signing_key: OrchestratorSigningKey::generate(),
        });
        let device_events = Arc::new(RecordedDeviceEvents::default());
        let metrics = Metrics::new();
        // A fresh stream: the projections hold authority from the start.
        let health = Arc::new(crate::health::Health::new(0, projections.clone(), metrics.clone()));
        let liveness = crate::liveness::Liveness::new(std::time::Duration::from_secs(3 * 3600));
        let state = AppState {
            projections,
            escrow: Arc::new(crate::escrow::EscrowKeyring::generate()),
            escrow_recovery_public_key: None,
            tokens: Arc::new(tokens),
            metrics,
            journal: journal.clone(),
            device_events: device_events.clone(),
            rotate_min_interval: std::time::Duration::from_secs(300),
            rotate_requests: Arc::default(),
            policy: None,
            enrollments_in_flight: Arc::default(),
            nats: crate::bus::NatsStatus::detached(),
            health,
            token_issuance: Arc::default(),
            campaign_wake: Arc::default(),
            request_timeout: std::time::Duration::from_secs(30),
            liveness,
        };
        let mut fixture = Self {
            _dir: dir,
            state,
            journal,
            device_events,
            device_keys: std::collections::HashMap::new(),
        };
        // The orchestrator key first: the fold refuses orchestrator events before it.
        let public_key = fixture.journal.signing_key.public_key().to_string();
        fixture.fold_audit(AuditEvent::OrchestratorKeyCreated(OrchestratorKeyCreated {
            public_key,
        }));
        fixture.fold_audit(AuditEvent::EnrollmentTokenCreated(EnrollmentTokenCreated {
            token_id: TokenId::new(),
            name: "fixture".to_owned(),
            max_uses: 10_000,
            expires_at: Utc::now() + chrono::Duration::days(1),
            token_sha256: crate::auth::token_sha256(FIXTURE_ENROLLMENT_TOKEN),
            created_by: "fixture".to_owned(),
            created_by_token_id: None,
        }));
        fixture
    }

    /// Folds one orchestrator event into the projections, as the consumer would.
    fn fold_audit(&mut self, event: AuditEvent) {
        let sequence = self.journal.next_sequence();
        let envelope = AuditEnvelope::new(Utc.timestamp_opt(1_700_000_000, 0).unwrap(), event);
        let subject = subject::audit_event(envelope.event.kind());
        let payload = envelope.to_json();
        let signature = self.journal.signing_key.sign(&subject, &payload);
        let outcome = self
            .state
            .projections
            .apply(
                StreamMessage {
                    sequence,
                    subject: &subject,
                    published: envelope.time,
                    payload: &payload,
                    signature: Some(&signature),
                },
                self.state.escrow.as_ref(),
            )
            .unwrap()
            .outcome;
        assert!(matches!(outcome, Outcome::Recorded(_)), "{outcome:?}");
    }

    /// Enrolls the device, unless the fixture already did, and returns its signing key.
    fn enrolled(&mut self, device_id: &DeviceId, device_name: &str) -> DeviceSigningKey {
        if let Some(key) = self.device_keys.get(device_id) {
            return key.clone();
        }
        let key = DeviceSigningKey::generate();
        let token = self
            .state
            .projections
            .token_by_digest(&crate::auth::token_sha256(FIXTURE_ENROLLMENT_TOKEN))
            .unwrap()
            .expect("the fixture's enrollment token");
        self.fold_audit(AuditEvent::DeviceEnrolled(DeviceEnrolled {
            device_id: device_id.clone(),
            device_name: DeviceName::parse(device_name).unwrap(),
            public_key: key.public_key().to_string(),
            enrollment_token_id: token.token_id,
            tags: Vec::new(),
        }));
        self.device_keys.insert(device_id.clone(), key.clone());
        key
    }

    /// Backs up `password` for the device, sealed to the fixture's escrow key.
    pub(crate) fn back_up(&mut self, device_id: &str, device_name: &str, password: &str) {
        let escrow = Arc::clone(&self.state.escrow);
        self.back_up_sealed_to(&escrow.public_key(), escrow.as_ref(), device_id, device_name, password);
    }

    /// Backs up `password` for the device sealed to `escrow`, folded by projections that open
    /// backups with `escrow` (another orchestrator's key, for tests of a key that was lost).
    fn back_up_sealed_to(
        &mut self,
        recipient: &fleetlaps_proto::seal::EscrowPublicKey,
        escrow: &dyn crate::projection::SealCheck,
        device_id: &str,
        device_name: &str,
        password: &str,
    ) {
        let device_id = DeviceId::parse(device_id).unwrap();
        let key = self.enrolled(&device_id, device_name);
        let sequence = self.journal.next_sequence();
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
                escrow_public_key: Some(*recipient),
                recovery_sealed_password: None,
                expires_at: time + chrono::Duration::days(30),
                reason: RotationReason::Initial,
            }),
        );
        let subject = subject::device_event(&device_id, envelope.event.kind());
        let payload = envelope.to_json();
        let signature = key.sign(&subject, &payload);
        let outcome = self
            .state
            .projections
            .apply(
                StreamMessage {
                    sequence,
                    subject: &subject,
                    published: time,
                    payload: &payload,
                    signature: Some(&signature),
                },
                escrow,
            )
            .unwrap()
            .outcome;
        assert!(matches!(outcome, Outcome::Applied(_)), "{outcome:?}");
        self.device_events
            .messages
            .lock()
            .unwrap()
            .push(crate::bus::HistoryMessage {
                sequence,
                subject,
                published: time,
                payload,
                signature: Some(signature.as_str().to_owned()),
            });
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
    assert_eq!(health.body["status"], "ok");
    // No server behind the fixture: the version is unknown, and so is the durability.
    assert_eq!(health.body["nats"]["serverVersion"], "unknown");
    assert_eq!(health.body["nats"]["authenticated"], true);
    assert!(health.body["nats"].get("warning").is_none());
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
    assert_eq!(metadata.body["lastBackupDateTime"], "2023-11-14T22:13:24Z");
    assert_eq!(metadata.body["refreshDateTime"], "2023-12-14T22:13:24Z");
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
    fixture.back_up_sealed_to(&other_key.public_key(), &other_key, "dev-1", "host-1", "pw");
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

/// An endpoint that needs a token: method, path, body, the scopes that open it, and the status it
/// answers with when opened.
type Endpoint = (&'static str, String, Option<Value>, Vec<crate::auth::Scope>, StatusCode);

/// Every endpoint that needs a token.
fn protected_endpoints(token_id: &str, enrollment_token_id: &str) -> Vec<Endpoint> {
    use crate::auth::Scope::*;
    vec![
        (
            "GET",
            ITEM.to_owned(),
            None,
            vec![ReadBasic, ReadPasswords],
            StatusCode::OK,
        ),
        (
            "GET",
            format!("{ITEM}/dev-1"),
            None,
            vec![ReadBasic, ReadPasswords],
            StatusCode::OK,
        ),
        (
            "GET",
            format!("{ITEM}/dev-1?$select=credentials"),
            None,
            vec![ReadPasswords],
            StatusCode::OK,
        ),
        (
            "GET",
            "/v1.0/devices".to_owned(),
            None,
            vec![DeviceRead],
            StatusCode::OK,
        ),
        (
            "GET",
            "/v1.0/devices/dev-1".to_owned(),
            None,
            vec![DeviceRead],
            StatusCode::OK,
        ),
        (
            "POST",
            "/v1.0/deviceManagement/managedDevices/dev-1/rotateLocalAdminPassword".to_owned(),
            None,
            vec![Rotate],
            StatusCode::NO_CONTENT,
        ),
        (
            "GET",
            "/v1.0/fleetlaps/tokens".to_owned(),
            None,
            vec![Admin],
            StatusCode::OK,
        ),
        (
            "POST",
            "/v1.0/fleetlaps/tokens".to_owned(),
            Some(serde_json::json!({"name": "new", "scopes": ["Admin"]})),
            vec![Admin],
            StatusCode::CREATED,
        ),
        (
            "DELETE",
            format!("/v1.0/fleetlaps/tokens/{token_id}"),
            None,
            vec![Admin],
            StatusCode::NO_CONTENT,
        ),
        (
            "GET",
            "/v1.0/fleetlaps/auditEvents".to_owned(),
            None,
            vec![AuditRead],
            StatusCode::OK,
        ),
        (
            "GET",
            "/v1.0/fleetlaps/devices/dev-1/timeline".to_owned(),
            None,
            vec![AuditRead],
            StatusCode::OK,
        ),
        (
            "GET",
            "/v1.0/fleetlaps/devices/dev-1/exposure?at=2026-01-01T00:00:00Z".to_owned(),
            None,
            vec![AuditRead],
            StatusCode::OK,
        ),
        (
            "GET",
            "/v1.0/fleetlaps/enrollmentTokens".to_owned(),
            None,
            vec![Admin],
            StatusCode::OK,
        ),
        (
            "POST",
            "/v1.0/fleetlaps/enrollmentTokens".to_owned(),
            Some(serde_json::json!({"name": "batch"})),
            vec![Admin],
            StatusCode::CREATED,
        ),
        (
            "DELETE",
            format!("/v1.0/fleetlaps/enrollmentTokens/{enrollment_token_id}"),
            None,
            vec![Admin],
            StatusCode::NO_CONTENT,
        ),
        (
            "GET",
            "/v1.0/fleetlaps/quarantine".to_owned(),
            None,
            vec![Admin],
            StatusCode::OK,
        ),
    ]
}

impl Fixture {
    async fn call(&self, method: &str, uri: &str, body: Option<&Value>, token: Option<&str>) -> Answer {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let body = match body {
            Some(body) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Body::from(serde_json::to_vec(body).unwrap())
            }
            None => Body::empty(),
        };
        self.send(request.body(body).unwrap()).await
    }

    /// Creates a token through the API with the fixture's granter token (`Admin` and
    /// `Token.Grant`), named uniquely; returns (token, id).
    async fn create_token(&self, scopes: &[&str], expires: Option<chrono::DateTime<Utc>>) -> (String, String) {
        let name = format!("someone-{}", fleetlaps_proto::audit::TokenId::new());
        let answer = self
            .call(
                "POST",
                "/v1.0/fleetlaps/tokens",
                Some(&serde_json::json!({"name": name, "scopes": scopes, "expiresDateTime": expires})),
                Some(GRANTER_TOKEN),
            )
            .await;
        assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
        (
            answer.body["token"].as_str().unwrap().to_owned(),
            answer.body["id"].as_str().unwrap().to_owned(),
        )
    }

    /// The audit history, without the fixture's own enrollment events.
    /// Creates an enrollment token through the API with the `Admin` fixture token; returns its id.
    async fn create_enrollment_token(&self) -> String {
        let answer = self
            .call(
                "POST",
                "/v1.0/fleetlaps/enrollmentTokens",
                Some(&serde_json::json!({"name": format!("victim-{}", fleetlaps_proto::audit::TokenId::new())})),
                Some(&scope_token(crate::auth::Scope::Admin)),
            )
            .await;
        assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
        answer.body["id"].as_str().unwrap().to_owned()
    }

    /// Creates an enrollment token for two devices through the API; returns the token itself.
    async fn two_device_enrollment_token(&self) -> String {
        let created = self
            .call(
                "POST",
                "/v1.0/fleetlaps/enrollmentTokens",
                Some(&serde_json::json!({"name": "two devices", "maxUses": 2})),
                Some(&scope_token(crate::auth::Scope::Admin)),
            )
            .await;
        assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
        created.body["token"].as_str().unwrap().to_owned()
    }

    /// Enrolls a new device named `name` with the enrollment token `token`.
    async fn enroll_with(&self, token: &str, name: &str) -> Answer {
        let key = fleetlaps_proto::signature::DeviceSigningKey::generate();
        let body = serde_json::json!({"publicKey": key.public_key().to_string(), "deviceName": name});
        self.call("POST", "/fleetlaps/v1/enroll", Some(&body), Some(token))
            .await
    }

    fn audit(&self) -> Vec<(u64, AuditEnvelope)> {
        use fleetlaps_proto::audit::AuditKind;
        let fixture_made = [AuditKind::DeviceEnrolled, AuditKind::OrchestratorKeyCreated];
        self.state
            .projections
            .audit(0, 1000)
            .unwrap()
            .into_iter()
            .filter(|(sequence, envelope)| *sequence > 2 && !fixture_made.contains(&envelope.event.kind()))
            .collect()
    }
}

#[tokio::test]
async fn the_scope_matrix_every_endpoint_by_no_expired_revoked_and_each_scope_token() {
    let mut fixture = Fixture::new();
    fixture.state.rotate_min_interval = std::time::Duration::ZERO;
    fixture.back_up("dev-1", "host-1", "s3cret-One");
    let (revoked, revoked_id) = fixture
        .create_token(&["Admin", "DeviceLocalCredential.Read.All"], None)
        .await;
    let revoke = fixture
        .call(
            "DELETE",
            &format!("/v1.0/fleetlaps/tokens/{revoked_id}"),
            None,
            Some(&scope_token(crate::auth::Scope::Admin)),
        )
        .await;
    assert_eq!(revoke.status, StatusCode::NO_CONTENT, "{}", revoke.body);
    // An API token whose expiry has passed: recorded directly, as the API refuses past expiries.
    let expired = "an-expired-token";
    fixture
        .journal
        .append(AuditEvent::TokenCreated(fleetlaps_proto::audit::TokenCreated {
            token_id: fleetlaps_proto::audit::TokenId::new(),
            name: "expired".to_owned(),
            scopes: crate::auth::Scope::ALL.map(|scope| scope.as_str().to_owned()).to_vec(),
            expires_at: Some(Utc::now() - chrono::Duration::hours(1)),
            token_sha256: crate::auth::token_sha256(expired),
            created_by: "test".to_owned(),
            created_by_token_id: None,
        }))
        .await
        .unwrap();

    for scope_index in 0..protected_endpoints("x", "y").len() {
        // Fresh tokens to delete for each call that may delete one.
        let (_, victim) = fixture.create_token(&["Device.Read.All"], None).await;
        let enrollment_victim = fixture.create_enrollment_token().await;
        let (method, uri, body, allowed, opened) =
            protected_endpoints(&victim, &enrollment_victim).swap_remove(scope_index);
        let cell = |who: &str| format!("{method} {uri} with {who}");
        for (who, token) in [
            ("no token", None),
            ("an expired token", Some(expired)),
            ("a revoked token", Some(revoked.as_str())),
        ] {
            let answer = fixture.call(method, &uri, body.as_ref(), token).await;
            assert_eq!(
                answer.status,
                StatusCode::UNAUTHORIZED,
                "{}: {}",
                cell(who),
                answer.body
            );
        }
        for scope in crate::auth::Scope::ALL {
            let (_, victim) = fixture.create_token(&["Device.Read.All"], None).await;
            let enrollment_victim = fixture.create_enrollment_token().await;
            let (_, uri, _, _, _) = protected_endpoints(&victim, &enrollment_victim).swap_remove(scope_index);
            let answer = fixture
                .call(method, &uri, body.as_ref(), Some(&scope_token(scope)))
                .await;
            let expected = if allowed.contains(&scope) {
                opened
            } else {
                StatusCode::FORBIDDEN
            };
            assert_eq!(answer.status, expected, "{}: {}", cell(scope.as_str()), answer.body);
        }
    }
}

#[tokio::test]
async fn expired_and_revoked_tokens_are_told_apart_in_the_message() {
    let fixture = Fixture::new();
    let (token, id) = fixture.create_token(&["Device.Read.All"], None).await;
    assert_eq!(fixture.get("/v1.0/devices", Some(&token)).await.status, StatusCode::OK);
    fixture
        .call(
            "DELETE",
            &format!("/v1.0/fleetlaps/tokens/{id}"),
            None,
            Some(&scope_token(crate::auth::Scope::Admin)),
        )
        .await;
    let answer = fixture.get("/v1.0/devices", Some(&token)).await;
    answer.assert_error(StatusCode::UNAUTHORIZED, "InvalidAuthenticationToken");
    assert!(answer.message().contains("revoked"), "{}", answer.body);
}

#[tokio::test]
async fn tokens_are_created_listed_and_revoked_as_events_holding_only_their_hash() {
    let fixture = Fixture::new();
    let admin = scope_token(crate::auth::Scope::Admin);
    let (token, id) = fixture.create_token(&["Audit.Read.All"], None).await;
    assert!(token.starts_with(crate::auth::TOKEN_PREFIX));

    let list = fixture.get("/v1.0/fleetlaps/tokens", Some(&admin)).await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(list.body["value"][0]["id"], id.as_str());
    assert_eq!(list.body["value"][0]["createdBy"], "granter");
    assert!(!list.body.to_string().contains(&token), "the list never shows a token");

    let history: Vec<_> = fixture
        .audit()
        .into_iter()
        .filter(|(_, envelope)| envelope.event.kind() == fleetlaps_proto::audit::AuditKind::TokenCreated)
        .collect();
    assert_eq!(history.len(), 1);
    let text = String::from_utf8(history[0].1.to_json()).unwrap();
    assert!(
        text.contains(&crate::auth::token_sha256(&token)) && !text.contains(&token),
        "{text}"
    );

    fixture
        .call("DELETE", &format!("/v1.0/fleetlaps/tokens/{id}"), None, Some(&admin))
        .await;
    let again = fixture
        .call("DELETE", &format!("/v1.0/fleetlaps/tokens/{id}"), None, Some(&admin))
        .await;
    assert_eq!(again.status, StatusCode::NO_CONTENT, "revoking twice is harmless");
    let kinds: Vec<String> = fixture
        .audit()
        .iter()
        .map(|(_, e)| e.event.kind().to_string())
        .collect();
    assert_eq!(kinds, ["token_created", "token_revoked"]);
    let unknown = fixture
        .call(
            "DELETE",
            "/v1.0/fleetlaps/tokens/0190b5a4-0000-7000-8000-000000000000",
            None,
            Some(&admin),
        )
        .await;
    unknown.assert_error(StatusCode::NOT_FOUND, "Request_ResourceNotFound");
}

#[tokio::test]
async fn bad_token_requests_name_what_is_wrong() {
    let fixture = Fixture::new();
    let admin = scope_token(crate::auth::Scope::Admin);
    for (body, needle) in [
        (
            serde_json::json!({"name": "x", "scopes": ["Everything"]}),
            "unknown scope \"Everything\"",
        ),
        (serde_json::json!({"name": "x", "scopes": []}), "scopes is empty"),
        (serde_json::json!({"name": "", "scopes": ["Admin"]}), "allowed 1 to 64"),
        (
            serde_json::json!({"name": "x", "scopes": ["Admin"], "expiresDateTime": "2001-01-01T00:00:00Z"}),
            "in the past",
        ),
        (serde_json::json!({"name": "x"}), "not a token request"),
    ] {
        let answer = fixture
            .call("POST", "/v1.0/fleetlaps/tokens", Some(&body), Some(&admin))
            .await;
        answer.assert_error(StatusCode::BAD_REQUEST, "Request_BadRequest");
        assert!(answer.message().contains(needle), "{body}: {}", answer.body);
    }
    assert!(fixture.audit().is_empty(), "nothing was recorded");
}

#[tokio::test]
async fn a_password_read_is_recorded_before_the_answer_and_refused_when_it_cannot_be() {
    let mut fixture = Fixture::new();
    fixture.back_up("dev-1", "host-1", "s3cret-One");
    let request = || {
        Request::builder()
            .uri(format!("{ITEM}/dev-1?$select=credentials"))
            .header(header::AUTHORIZATION, format!("Bearer {READ_ALL_TOKEN}"))
            .header("ocp-client-name", "Get-LapsAADPassword")
            .header("ocp-client-version", "1.0")
            .header("x-fleetlaps-reason", "ticket 42")
            .body(Body::empty())
            .unwrap()
    };

    let answer = fixture.send(request()).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let history = fixture.audit();
    let [(_, read)] = history.as_slice() else {
        panic!("one read recorded: {history:?}")
    };
    let AuditEvent::PasswordRead(read) = &read.event else {
        panic!("{read:?}")
    };
    assert_eq!(read.principal, "admin");
    assert_eq!(read.device_id.as_str(), "dev-1");
    assert_eq!(read.rotation_ids.len(), 1);
    assert_eq!(read.client_name.as_deref(), Some("Get-LapsAADPassword"));
    assert_eq!(read.client_version.as_deref(), Some("1.0"));
    assert_eq!(read.reason.as_deref(), Some("ticket 42"));

    fixture
        .journal
        .available
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let refused = fixture.send(request()).await;
    refused.assert_error(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable");
    assert!(!refused.body.to_string().contains("passwordBase64"), "{}", refused.body);
    assert!(
        !refused
            .body
            .to_string()
            .contains(&PasswordBase64::encode("s3cret-One").expose().to_owned())
    );
    // Metadata needs no audit, so it is still served.
    assert_eq!(
        fixture.get(&format!("{ITEM}/dev-1"), Some(READ_ALL_TOKEN)).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn rotate_requests_are_recorded_sent_and_throttled_with_retry_after() {
    let mut fixture = Fixture::new();
    fixture.back_up("dev-1", "host-1", "s3cret-One");
    let rotate = "/v1.0/deviceManagement/managedDevices/dev-1/rotateLocalAdminPassword";
    let token = scope_token(crate::auth::Scope::Rotate);

    let first = fixture.call("POST", rotate, None, Some(&token)).await;
    assert_eq!(first.status, StatusCode::NO_CONTENT, "{}", first.body);
    let command_id = first.headers["x-fleetlaps-command-id"].to_str().unwrap().to_owned();
    let commands = fixture.journal.commands.lock().unwrap().clone();
    assert_eq!(commands.len(), 1);
    assert_eq!(commands[0].id.to_string(), command_id);
    let history = fixture.audit();
    let AuditEvent::RotationRequested(requested) = &history[0].1.event else {
        panic!("{history:?}")
    };
    assert_eq!(
        (requested.principal.as_str(), requested.command_id),
        ("DeviceLocalCredential.Rotate", commands[0].id)
    );

    let second = fixture.call("POST", rotate, None, Some(&token)).await;
    second.assert_error(StatusCode::TOO_MANY_REQUESTS, "TooManyRequests");
    let retry_after: u64 = second.headers[header::RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!((1..=300).contains(&retry_after), "{retry_after}");
    assert_eq!(fixture.journal.commands.lock().unwrap().len(), 1, "no second command");

    // The history remembers the request: a restarted orchestrator (no memory) throttles too.
    fixture.state.rotate_requests = Arc::default();
    let after_restart = fixture.call("POST", rotate, None, Some(&token)).await;
    assert_eq!(after_restart.status, StatusCode::TOO_MANY_REQUESTS);

    let unknown = fixture
        .call(
            "POST",
            "/v1.0/deviceManagement/managedDevices/dev-404/rotateLocalAdminPassword",
            None,
            Some(&token),
        )
        .await;
    unknown.assert_error(StatusCode::NOT_FOUND, "Request_ResourceNotFound");
}

#[tokio::test]
async fn the_audit_history_lists_reads_filtered_by_device_and_kind_in_pages() {
    let mut fixture = Fixture::new();
    fixture.back_up("dev-1", "host-1", "one");
    fixture.back_up("dev-2", "host-2", "two");
    for device in ["dev-1", "dev-2", "dev-1"] {
        let answer = fixture
            .get(&format!("{ITEM}/{device}?$select=credentials"), Some(READ_ALL_TOKEN))
            .await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    let auditor = scope_token(crate::auth::Scope::AuditRead);
    let dev_1 = fixture
        .get(
            "/v1.0/fleetlaps/auditEvents?deviceId=dev-1&kind=password_read",
            Some(&auditor),
        )
        .await;
    assert_eq!(dev_1.status, StatusCode::OK, "{}", dev_1.body);
    assert_eq!(dev_1.body["value"].as_array().unwrap().len(), 2);
    assert_eq!(dev_1.body["value"][0]["body"]["principal"], "admin");
    let page = fixture
        .get("/v1.0/fleetlaps/auditEvents?kind=password_read&$top=2", Some(&auditor))
        .await;
    assert_eq!(page.body["value"].as_array().unwrap().len(), 2);
    let next = page.body["@odata.nextLink"].as_str().expect("a next page").to_owned();
    let rest = fixture.get(&next, Some(&auditor)).await;
    assert_eq!(rest.body["value"].as_array().unwrap().len(), 1);
    assert_eq!(rest.body["value"][0]["body"]["device_id"], "dev-1");
    let bad = fixture
        .get("/v1.0/fleetlaps/auditEvents?kind=everything", Some(&auditor))
        .await;
    bad.assert_error(StatusCode::BAD_REQUEST, "Request_BadRequest");
    assert!(bad.message().contains("password_read"), "{}", bad.body);
}

#[tokio::test]
async fn a_device_s_timeline_merges_its_events_and_the_reads_in_pages_without_copies_or_passwords() {
    let mut fixture = Fixture::new();
    fixture.back_up("dev-1", "host-1", "s3cret-One");
    fixture.back_up("dev-2", "host-2", "s3cret-Two");
    let read = fixture
        .get(&format!("{ITEM}/dev-1?$select=credentials"), Some(READ_ALL_TOKEN))
        .await;
    assert_eq!(read.status, StatusCode::OK);
    fixture.back_up("dev-1", "host-1", "s3cret-Three");
    // A copy of the device's first backup stored again later (a re-sent event): the fold took it
    // as a duplicate, so the timeline leaves it out.
    let copy = {
        let mut messages = fixture.device_events.messages.lock().unwrap();
        let mut copy = messages[0].clone();
        copy.sequence = 1_000;
        messages.push(copy.clone());
        copy
    };
    fixture
        .state
        .projections
        .apply(copy.as_stream_message(), fixture.state.escrow.as_ref())
        .unwrap();
    let auditor = scope_token(crate::auth::Scope::AuditRead);

    let first = fixture
        .get("/v1.0/fleetlaps/devices/dev-1/timeline?$top=2", Some(&auditor))
        .await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.body);
    let next = first.body["@odata.nextLink"].as_str().expect("a next page").to_owned();
    let rest = fixture.get(&next, Some(&auditor)).await;
    assert_eq!(rest.status, StatusCode::OK, "{}", rest.body);
    assert!(rest.body.get("@odata.nextLink").is_none(), "{}", rest.body);

    let entries: Vec<&Value> = first.body["value"]
        .as_array()
        .unwrap()
        .iter()
        .chain(rest.body["value"].as_array().unwrap())
        .collect();
    let kinds: Vec<(&str, &str)> = entries
        .iter()
        .map(|entry| (entry["kind"].as_str().unwrap(), entry["actor"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            ("device_enrolled", "device"),
            ("password_backed_up", "device"),
            ("password_read", "admin"),
            ("password_backed_up", "device"),
        ]
    );
    let sequences: Vec<u64> = entries
        .iter()
        .map(|entry| entry["sequence"].as_u64().unwrap())
        .collect();
    assert!(sequences.windows(2).all(|pair| pair[0] < pair[1]), "{sequences:?}");
    assert_eq!(
        entries[2]["fields"]["rotation_ids"],
        json!([entries[1]["fields"]["rotation_id"]])
    );
    let text = serde_json::to_string(&entries).unwrap();
    assert!(!text.contains("sealed_password") && !text.contains("s3cret"), "{text}");

    // Nothing was applied on the device: no version was valid, the newest backup pending.
    let exposure = fixture
        .get(
            "/v1.0/fleetlaps/devices/dev-1/exposure?at=2030-01-01T00:00:00Z",
            Some(&auditor),
        )
        .await;
    assert_eq!(exposure.status, StatusCode::OK, "{}", exposure.body);
    assert_eq!(exposure.body["version"], Value::Null);
    assert_eq!(
        exposure.body["pending"]["rotationId"],
        entries[3]["fields"]["rotation_id"]
    );

    let unknown = fixture
        .get("/v1.0/fleetlaps/devices/dev-9/timeline", Some(&auditor))
        .await;
    unknown.assert_error(StatusCode::NOT_FOUND, "Request_ResourceNotFound");
    assert_eq!(unknown.message(), "device dev-9 was not found");
    let bad_at = fixture
        .get("/v1.0/fleetlaps/devices/dev-1/exposure?at=yesterday", Some(&auditor))
        .await;
    bad_at.assert_error(StatusCode::BAD_REQUEST, "Request_BadRequest");
    assert!(bad_at.message().contains("RFC 3339"), "{}", bad_at.body);
    let no_at = fixture
        .get("/v1.0/fleetlaps/devices/dev-1/exposure", Some(&auditor))
        .await;
    no_at.assert_error(StatusCode::BAD_REQUEST, "Request_BadRequest");
    let unknown_parameter = fixture
        .get("/v1.0/fleetlaps/devices/dev-1/timeline?kind=x", Some(&auditor))
        .await;
    unknown_parameter.assert_error(StatusCode::BAD_REQUEST, "Request_BadRequest");
}

#[tokio::test]
async fn concurrent_enrollments_never_exceed_the_tokens_max_uses() {
    let fixture = Fixture::new();
    let token = fixture.two_device_enrollment_token().await;

    let names: Vec<String> = (0..6).map(|index| format!("host-{index}")).collect();
    let attempts = names.iter().map(|name| fixture.enroll_with(&token, name));
    let answers = futures::future::join_all(attempts).await;

    let enrolled = answers.iter().filter(|answer| answer.status.is_success()).count();
    assert_eq!(
        enrolled,
        2,
        "{:?}",
        answers.iter().map(|answer| answer.status).collect::<Vec<_>>()
    );
    for refused in answers.iter().filter(|answer| !answer.status.is_success()) {
        refused.assert_error(StatusCode::UNAUTHORIZED, "InvalidAuthenticationToken");
    }
}

#[tokio::test(start_paused = true)]
async fn an_enrollment_the_projections_show_late_keeps_its_use_reserved_until_then_and_no_longer() {
    // Arrange: a token for two devices; the projections lag behind the stream.
    let fixture = Fixture::new();
    let token = fixture.two_device_enrollment_token().await;
    let enroll = |name: &'static str| fixture.enroll_with(&token, name);
    fixture.journal.hold_folding();

    // Act: the first enrollment is recorded, but not seen in time; then the projections catch up.
    let late = enroll("host-late").await;
    assert_eq!(late.status, StatusCode::CREATED, "{}", late.body);
    fixture.journal.fold_held();
    tokio::task::yield_now().await;

    // Assert: its use is counted once, by the projections: one more device may enroll, not two.
    let second = enroll("host-2").await;
    assert_eq!(second.status, StatusCode::CREATED, "{}", second.body);
    let third = enroll("host-3").await;
    third.assert_error(StatusCode::UNAUTHORIZED, "InvalidAuthenticationToken");
    assert!(third.message().contains("used up"), "{}", third.body);
}

#[tokio::test(start_paused = true)]
async fn an_enrollment_the_projections_just_counted_is_not_counted_again_by_its_reservation() {
    // Arrange: a token for two devices; the first enrollment is recorded while the projections
    // lag, so its use stays reserved until they count it.
    let fixture = Fixture::new();
    let token = fixture.two_device_enrollment_token().await;
    let enroll = |name: &'static str| fixture.enroll_with(&token, name);
    fixture.journal.hold_folding();
    let first = enroll("host-1").await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);

    // Act: the projections count it, and the next enrollment comes before its reservation is
    // given back (nothing else has run in between).
    fixture.journal.fold_held();
    let second = enroll("host-2").await;

    // Assert: one use was left, and it is taken; then the token is used up.
    assert_eq!(second.status, StatusCode::CREATED, "{}", second.body);
    let third = enroll("host-3").await;
    third.assert_error(StatusCode::UNAUTHORIZED, "InvalidAuthenticationToken");
    assert!(third.message().contains("used up"), "{}", third.body);
}

#[tokio::test]
async fn no_token_is_trusted_until_the_projections_reach_the_streams_last_sequence_at_start() {
    let mut fixture = Fixture::new();
    let applied = fixture.state.projections.applied_sequence();
    // As after a restart on a stream two messages ahead of the projections.
    fixture.state.health = Arc::new(crate::health::Health::new(
        applied + 2,
        fixture.state.projections.clone(),
        fixture.state.metrics.clone(),
    ));
    let refused = fixture
        .get(super::device_local_credentials::LIST_PATH, Some(READ_ALL_TOKEN))
        .await;
    refused.assert_error(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable");
    assert!(refused.message().contains("catching up"), "{}", refused.body);
    assert_eq!(
        refused.headers[header::RETRY_AFTER],
        super::error::CATCHING_UP_RETRY_AFTER_SECS.to_string()
    );
    let enrollment = fixture.send(enroll_request("late-host", &serde_json::json!([]))).await;
    enrollment.assert_error(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable");
    let health = fixture.get("/healthz", None).await;
    assert_eq!(health.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(health.body["status"], "catching_up");
    assert_eq!(health.body["projections"]["startSequence"], applied + 2);

    // The fold reaches the horizon: from then on the same token is trusted.
    fixture.fold_audit(AuditEvent::EnrollmentTokenCreated(EnrollmentTokenCreated {
        token_id: TokenId::new(),
        name: "filler-1".to_owned(),
        max_uses: 1,
        expires_at: Utc::now() + chrono::Duration::days(1),
        token_sha256: crate::auth::token_sha256("fle_filler_1"),
        created_by: "fixture".to_owned(),
        created_by_token_id: None,
    }));
    fixture
        .get(super::device_local_credentials::LIST_PATH, Some(READ_ALL_TOKEN))
        .await
        .assert_error(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable");
    fixture.fold_audit(AuditEvent::EnrollmentTokenCreated(EnrollmentTokenCreated {
        token_id: TokenId::new(),
        name: "filler-2".to_owned(),
        max_uses: 1,
        expires_at: Utc::now() + chrono::Duration::days(1),
        token_sha256: crate::auth::token_sha256("fle_filler_2"),
        created_by: "fixture".to_owned(),
        created_by_token_id: None,
    }));
    let trusted = fixture
        .get(super::device_local_credentials::LIST_PATH, Some(READ_ALL_TOKEN))
        .await;
    assert_eq!(trusted.status, StatusCode::OK, "{}", trusted.body);
    assert_eq!(fixture.get("/healthz", None).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_failing_consumer_leaves_the_api_up_and_healthz_unhealthy_until_it_folds_again() {
    let fixture = Fixture::new();
    let failure = std::io::Error::other("No space left on device (os error 28)");
    fixture.state.health.consumer_failed(&failure);
    let health = fixture.get("/healthz", None).await;
    assert_eq!(health.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(health.body["status"], "unhealthy");
    assert!(
        health.body["projections"]["consumerError"]
            .as_str()
            .is_some_and(|error| error.contains("No space left")),
        "{}",
        health.body
    );
    assert_eq!(fixture.state.metrics.consumer_healthy.get(), 0);
    // The API still answers from what the projections hold.
    let read = fixture
        .get(super::device_local_credentials::LIST_PATH, Some(READ_ALL_TOKEN))
        .await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.body);
    fixture.state.health.consumer_succeeded();
    let health = fixture.get("/healthz", None).await;
    assert_eq!(health.status, StatusCode::OK);
    assert!(health.body["projections"].get("consumerError").is_none());
}

#[tokio::test]
async fn a_principal_with_admin_but_without_read_all_cannot_create_a_token_holding_it() {
    let fixture = Fixture::new();
    let admin = scope_token(crate::auth::Scope::Admin);
    let refused = fixture
        .call(
            "POST",
            "/v1.0/fleetlaps/tokens",
            Some(&serde_json::json!({"name": "escalation", "scopes": [SCOPE_READ_PASSWORDS]})),
            Some(&admin),
        )
        .await;
    refused.assert_error(StatusCode::FORBIDDEN, "Authorization_RequestDenied");
    assert!(
        refused.message().contains(SCOPE_READ_PASSWORDS) && refused.message().contains("Token.Grant"),
        "{}",
        refused.body
    );
    // Nothing was recorded, and a scope it holds can be given.
    assert!(
        !fixture
            .audit()
            .iter()
            .any(|(_, envelope)| envelope.event.kind() == fleetlaps_proto::audit::AuditKind::TokenCreated)
    );
    let own = fixture
        .call(
            "POST",
            "/v1.0/fleetlaps/tokens",
            Some(&serde_json::json!({"name": "deputy", "scopes": ["Admin"]})),
            Some(&admin),
        )
        .await;
    assert_eq!(own.status, StatusCode::CREATED, "{}", own.body);
}

#[tokio::test]
async fn token_names_are_unique_among_usable_tokens_of_a_kind() {
    let fixture = Fixture::new();
    let body = serde_json::json!({"name": "auditor", "scopes": ["Audit.Read.All"]});
    let first = fixture
        .call("POST", "/v1.0/fleetlaps/tokens", Some(&body), Some(GRANTER_TOKEN))
        .await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    let taken = fixture
        .call("POST", "/v1.0/fleetlaps/tokens", Some(&body), Some(GRANTER_TOKEN))
        .await;
    taken.assert_error(StatusCode::CONFLICT, "Request_MultipleObjectsWithSameKeyValue");
    assert!(taken.message().contains("\"auditor\""), "{}", taken.body);
    // A config token's name is taken too.
    let configured = fixture
        .call(
            "POST",
            "/v1.0/fleetlaps/tokens",
            Some(&serde_json::json!({"name": "helpdesk", "scopes": ["Audit.Read.All"]})),
            Some(GRANTER_TOKEN),
        )
        .await;
    configured.assert_error(StatusCode::CONFLICT, "Request_MultipleObjectsWithSameKeyValue");
    // Enrollment tokens have names of their own.
    let enrollment = fixture
        .call(
            "POST",
            "/v1.0/fleetlaps/enrollmentTokens",
            Some(&serde_json::json!({"name": "auditor"})),
            Some(GRANTER_TOKEN),
        )
        .await;
    assert_eq!(enrollment.status, StatusCode::CREATED, "{}", enrollment.body);
    // Once the first is revoked, the name is free again.
    let id = first.body["id"].as_str().unwrap();
    let revoked = fixture
        .call(
            "DELETE",
            &format!("/v1.0/fleetlaps/tokens/{id}"),
            None,
            Some(GRANTER_TOKEN),
        )
        .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    let again = fixture
        .call("POST", "/v1.0/fleetlaps/tokens", Some(&body), Some(GRANTER_TOKEN))
        .await;
    assert_eq!(again.status, StatusCode::CREATED, "{}", again.body);
}

#[tokio::test]
async fn audit_records_name_the_token_id_as_well_as_its_name() {
    let mut fixture = Fixture::new();
    fixture.back_up("dev-1", "host-1", "s3cret-One");
    let (reader, reader_id) = fixture.create_token(&[SCOPE_READ_PASSWORDS], None).await;
    let read = fixture
        .get(&format!("{ITEM}/dev-1?$select=credentials"), Some(&reader))
        .await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.body);
    let revoked = fixture
        .call(
            "DELETE",
            &format!("/v1.0/fleetlaps/tokens/{reader_id}"),
            None,
            Some(GRANTER_TOKEN),
        )
        .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    let granter_id = crate::auth::static_token_id(
        &crate::auth::token_sha256(GRANTER_TOKEN)
            .as_bytes()
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect::<Vec<u8>>()
            .try_into()
            .unwrap(),
    );
    let mut seen = 0;
    for (_, envelope) in fixture.audit() {
        match envelope.event {
            AuditEvent::PasswordRead(read) => {
                assert_eq!(
                    read.principal_token_id.map(|id| id.to_string()),
                    Some(reader_id.clone())
                );
                seen += 1;
            }
            AuditEvent::TokenCreated(created) => {
                assert_eq!(
                    (created.created_by.as_str(), created.created_by_token_id),
                    ("granter", Some(granter_id))
                );
                seen += 1;
            }
            AuditEvent::TokenRevoked(revoked) => {
                assert_eq!(revoked.revoked_by_token_id, Some(granter_id));
                seen += 1;
            }
            _ => {}
        }
    }
    assert_eq!(seen, 3);
}

#[tokio::test]
async fn token_and_enrollment_token_lists_page_with_top_and_skiptoken() {
    let fixture = Fixture::new();
    for _ in 0..3 {
        fixture.create_token(&["Audit.Read.All"], None).await;
        fixture.create_enrollment_token().await;
    }
    // The fixture made one enrollment token itself: four of those, three API tokens.
    for (path, total) in [("/v1.0/fleetlaps/tokens", 3), ("/v1.0/fleetlaps/enrollmentTokens", 4)] {
        let mut ids = Vec::new();
        let mut next = Some(format!("{path}?$top=2"));
        while let Some(link) = next {
            let page = fixture.get(&link, Some(GRANTER_TOKEN)).await;
            assert_eq!(page.status, StatusCode::OK, "{link}: {}", page.body);
            let values = page.body["value"].as_array().unwrap();
            assert!(values.len() <= 2, "{}", page.body);
            ids.extend(values.iter().map(|token| token["id"].as_str().unwrap().to_owned()));
            next = page.body["@odata.nextLink"].as_str().map(str::to_owned);
        }
        let mut sorted = ids.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(
            (ids.len(), sorted),
            (total, ids.clone()),
            "{path}: every token once, oldest first"
        );
    }
    let bad = fixture
        .get("/v1.0/fleetlaps/tokens?$skiptoken=nope", Some(GRANTER_TOKEN))
        .await;
    bad.assert_error(StatusCode::BAD_REQUEST, "Request_BadRequest");
}

#[tokio::test]
async fn an_enrollment_whose_client_hangs_up_gives_its_reserved_use_back_once_the_projections_count_it() {
    let fixture = Fixture::new();
    fixture.journal.hold_folding();
    let request = enroll_request("hung-up", &serde_json::json!([]));
    let in_flight = || fixture.state.enrollments_in_flight.lock().unwrap().reserved();
    // The request is recorded, then waits for the projections; the client hangs up meanwhile.
    let answer = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        router(fixture.state.clone()).oneshot(request),
    )
    .await;
    assert!(answer.is_err(), "the request waits for the held fold");
    assert_eq!(in_flight(), 1, "the use stays reserved until the projections count it");
    fixture.journal.fold_held();
    wait_for(|| in_flight() == 0).await;
}

/// Polls `condition` until it holds; a safety net of ten seconds.
async fn wait_for(condition: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "the condition never held");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn one_device_of_the_directory_is_its_list_entry_and_an_unknown_or_malformed_id_is_refused() {
    let mut fixture = Fixture::new();
    let beating = DeviceId::parse("dev-beating").unwrap();
    fixture.enrolled(&beating, "host-1");
    fixture.enrolled(&DeviceId::parse("dev-other").unwrap(), "host-2");
    fixture.state.liveness.record(beating.clone(), Utc::now());
    let token = scope_token(crate::auth::Scope::DeviceRead);

    let listed = fixture.get("/v1.0/devices", Some(&token)).await;
    let entry = listed.body["value"]
        .as_array()
        .unwrap()
        .iter()
        .find(|device| device["id"] == beating.as_str())
        .cloned()
        .unwrap();
    let one = fixture.get("/v1.0/devices/dev-beating", Some(&token)).await;
    assert_eq!(one.status, StatusCode::OK, "{}", one.body);
    assert_eq!(one.body["@odata.context"], "$metadata#devices/$entity");
    let mut fields = one.body.clone();
    fields.as_object_mut().unwrap().remove("@odata.context");
    assert_eq!(fields, entry);
    assert_eq!(one.body["displayName"], "host-1");
    assert_eq!(one.body["isSilent"], false);

    fixture
        .get("/v1.0/devices/dev-never", Some(&token))
        .await
        .assert_error(StatusCode::NOT_FOUND, "Request_ResourceNotFound");
    fixture
        .get("/v1.0/devices/not%20an%20id", Some(&token))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "Request_BadRequest");
    fixture
        .get("/v1.0/devices/dev-beating?$top=1", Some(&token))
        .await
        .assert_error(StatusCode::BAD_REQUEST, "Request_UnsupportedQuery");
}

#[tokio::test]
async fn a_device_enrolls_with_tags_and_a_bad_tag_is_refused_naming_what_is_allowed() {
    let fixture = Fixture::new();
    let enroll = |tags: Value| enroll_request("tagged-host", &tags);
    let enrolled = fixture.send(enroll(serde_json::json!(["site:paris", "role:db"]))).await;
    assert_eq!(enrolled.status, StatusCode::CREATED, "{}", enrolled.body);
    let device_id = DeviceId::parse(enrolled.body["deviceId"].as_str().unwrap()).unwrap();
    let device = fixture.state.projections.device(&device_id).unwrap().expect("enrolled");
    let tags: Vec<&str> = device.tags.iter().map(|tag| tag.as_str()).collect();
    assert_eq!(tags, ["site:paris", "role:db"]);
    let refused = fixture.send(enroll(serde_json::json!(["Site Paris"]))).await;
    refused.assert_error(StatusCode::BAD_REQUEST, "Request_BadRequest");
    assert!(refused.message().contains("lower-case letters"), "{}", refused.body);
}

/// A device's enrollment request with the fixture's enrollment token, a fresh key, and `tags`.
fn enroll_request(device_name: &str, tags: &Value) -> Request<Body> {
    Request::builder()
        .method("POST")
        .uri(super::enrollment::ENROLL_PATH)
        .header(header::AUTHORIZATION, format!("Bearer {FIXTURE_ENROLLMENT_TOKEN}"))
        .body(Body::from(
            serde_json::json!({
                "publicKey": DeviceSigningKey::generate().public_key().to_string(),
                "deviceName": device_name,
                "tags": tags
            })
            .to_string(),
        ))
        .unwrap()
}

#[tokio::test]
async fn the_directory_shows_each_devices_last_heartbeat_and_whether_it_is_silent() {
    // Two devices enrolled long ago (the fixture's events are dated 2023); one beat just now.
    let mut fixture = Fixture::new();
    let beating = DeviceId::parse("dev-beating").unwrap();
    let quiet = DeviceId::parse("dev-quiet").unwrap();
    fixture.enrolled(&beating, "host-1");
    fixture.enrolled(&quiet, "host-2");
    let beat_at = Utc::now();
    fixture.state.liveness.record(beating.clone(), beat_at);

    let answer = fixture
        .get("/v1.0/devices", Some(&scope_token(crate::auth::Scope::DeviceRead)))
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    let device = |id: &DeviceId| {
        answer.body["value"]
            .as_array()
            .unwrap()
            .iter()
            .find(|device| device["id"] == id.as_str())
            .cloned()
            .unwrap()
    };
    let shown: chrono::DateTime<Utc> =
        serde_json::from_value(device(&beating)["lastHeartbeatDateTime"].clone()).unwrap();
    assert_eq!(shown, beat_at);
    assert_eq!(device(&beating)["isSilent"], false);
    assert_eq!(device(&quiet)["lastHeartbeatDateTime"], Value::Null);
    assert_eq!(
        device(&quiet)["isSilent"],
        true,
        "never beat since its enrollment long ago"
    );
    // Three hours on, the beating device is silent too.
    let later = beat_at + chrono::Duration::hours(3) + chrono::Duration::seconds(1);
    let record = fixture.state.projections.device(&beating).unwrap().unwrap();
    assert_eq!(
        fixture
            .state
            .liveness
            .state(&fixture.state.projections, &record.standing(), later)
            .unwrap(),
        crate::projection::DeviceState::Silent
    );
}
