//! Graph's `deviceLocalCredentials`: the devices' backup metadata, and on request their passwords.
//!
//! - `GET /v1.0/directory/deviceLocalCredentials`: the list, metadata only
//!   (`DeviceLocalCredential.ReadBasic.All`), with `$filter`, `$top`, `$skiptoken`.
//! - `GET /v1.0/directory/deviceLocalCredentials/{deviceId}`: one device; with
//!   `$select=credentials` also its newest passwords (`DeviceLocalCredential.Read.All`), each
//!   such read recorded in the history before the answer leaves.
//!
//! Context URLs are relative to the server (`$metadata#…`), not absolute as Graph's; next links
//! are absolute over TLS, on the origin the client addressed (see `odata`).

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use fleetlaps_proto::api::{DeviceLocalCredential, DeviceLocalCredentialInfo, ODataCollection, PasswordBase64};
use fleetlaps_proto::audit::{AuditEvent, PasswordRead};
use fleetlaps_proto::event::sealing_context;
use fleetlaps_proto::ids::{DeviceId, DeviceName};
use serde_json::Value;

use super::AppState;
use super::auth::{Authenticated, RequestContext};
use super::error::ApiError;
use super::odata::{self, Filter, Property, QueryOptions};
use crate::auth::Scope;
use crate::projection::{CredentialRecord, DeviceRecord};

/// The collection's route.
pub(super) const LIST_PATH: &str = "/v1.0/directory/deviceLocalCredentials";
/// One device's route.
pub(super) const ITEM_PATH: &str = "/v1.0/directory/deviceLocalCredentials/{deviceId}";

/// `@odata.context` of the collection.
const COLLECTION_CONTEXT: &str = "$metadata#directory/deviceLocalCredentials";
/// `@odata.context` of one device.
const ENTITY_CONTEXT: &str = "$metadata#directory/deviceLocalCredentials/$entity";
/// How many credentials one device answers with, newest first: three, as Entra keeps.
const CREDENTIALS_RETURNED: usize = 3;

/// Lists devices' metadata, ordered by id, one page at a time.
#[tracing::instrument(skip_all, fields(principal = %principal.0.name))]
pub(super) async fn list(
    State(state): State<AppState>,
    principal: Authenticated,
    options: QueryOptions,
) -> Result<Json<ODataCollection<DeviceLocalCredentialInfo>>, ApiError> {
    principal.require(Scope::ReadBasic)?;
    let filter = options.parsed_filter()?;
    let page_size = options.page_size()?;
    let after = options.skip_token_as(DeviceId::parse)?;
    if options.selected()?.contains(&Property::Credentials) {
        return Err(ApiError::UnsupportedQuery(format!(
            "$select=credentials is not supported on the collection; read one device with \
             GET {ITEM_PATH}?$select=credentials"
        )));
    }

    let devices = match &filter {
        // One read of the name index, however large the fleet; names compare in any case, as
        // host names do.
        Some(Filter::DeviceName(name)) => match DeviceName::parse(name) {
            Ok(name) => state.projections.devices_named(&name)?,
            // No device has a name that is not a device name.
            Err(_) => Vec::new(),
        },
        Some(Filter::Id(id)) => match DeviceId::parse(id) {
            Ok(device_id) => state.projections.device(&device_id)?.into_iter().collect(),
            Err(_) => Vec::new(),
        },
        // The page and one more, to know whether another page follows.
        None => state
            .projections
            .devices_after(after.as_ref())
            .take(page_size.saturating_add(1))
            .collect::<Result<_, _>>()?,
    };
    let devices = devices
        .into_iter()
        .filter(|device| after.as_ref().is_none_or(|after| device.device_id > *after));
    let (page, next_link) = odata::page(devices, page_size, |last: &DeviceRecord| {
        odata::next_link(LIST_PATH, &options, &[], page_size, last.device_id.as_str())
    });
    Ok(Json(ODataCollection {
        context: COLLECTION_CONTEXT.to_owned(),
        value: page.iter().map(metadata).collect(),
        next_link,
    }))
}

/// One device's metadata, and with `$select=credentials` its newest passwords.
///
/// Audit before disclose: the passwords are opened, then a `password_read` event is appended to
/// the history and acknowledged by JetStream, and only then answered. If the history cannot take
/// it, the answer is 503 and holds no password.
#[tracing::instrument(skip_all, fields(principal = %principal.0.name, %device_id))]
pub(super) async fn get(
    State(state): State<AppState>,
    principal: Authenticated,
    DevicePath(device_id): DevicePath,
    options: QueryOptions,
    context: RequestContext,
) -> Result<Json<Value>, ApiError> {
    principal.require(Scope::ReadBasic)?;
    options.allow_only(&["$select"], "a single device")?;
    let include_credentials = options.selected()?.contains(&Property::Credentials);
    if include_credentials {
        principal.require(Scope::ReadPasswords)?;
    }
    let device = state
        .projections
        .device(&device_id)?
        .ok_or_else(|| ApiError::DeviceNotFound(device_id.clone()))?;
    let mut info = metadata(&device);
    if !include_credentials {
        state.metrics.credential_read(Scope::ReadBasic);
    }
    if include_credentials {
        let records = state.projections.credentials(&device_id, CREDENTIALS_RETURNED)?;
        let credentials = records
            .iter()
            .map(|record| open_credential(&state.escrow, &device_id, record))
            .collect::<Result<Vec<_>, _>>()?;
        let read = AuditEvent::PasswordRead(PasswordRead {
            principal: principal.0.name.clone(),
            principal_token_id: Some(principal.0.token_id),
            device_id: device_id.clone(),
            rotation_ids: records.iter().map(|record| record.rotation_id).collect(),
            reason: context.reason,
            client_name: context.client_name,
            client_version: context.client_version,
            source_address: context.source_address,
        });
        let sequence = state.record(read).await?;
        state.metrics.credential_read(Scope::ReadPasswords);
        state.metrics.passwords_disclosed.inc_by(credentials.len() as u64);
        tracing::info!(
            n_credentials = credentials.len(),
            audit_sequence = sequence,
            "passwords disclosed"
        );
        info.credentials = Some(credentials);
    }
    Ok(Json(entity(&info)))
}

/// The `{deviceId}` path parameter, validated: a malformed id is a 400 in the OData shape.
pub(super) struct DevicePath(pub(super) DeviceId);

impl<S: Send + Sync> FromRequestParts<S> for DevicePath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Path(text) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
        DeviceId::parse(&text)
            .map(Self)
            .map_err(|err| ApiError::BadRequest(err.to_string()))
    }
}

/// A device's Graph metadata, without credentials.
fn metadata(device: &DeviceRecord) -> DeviceLocalCredentialInfo {
    DeviceLocalCredentialInfo {
        id: device.device_id.clone(),
        device_name: device.device_name.clone(),
        last_backup_date_time: device.last_backup,
        refresh_date_time: device.refresh,
        credentials: None,
    }
}

/// Opens one sealed password into Graph's `deviceLocalCredential`.
fn open_credential(
    escrow: &crate::escrow::EscrowKeyring,
    device_id: &DeviceId,
    record: &CredentialRecord,
) -> Result<DeviceLocalCredential, ApiError> {
    let opened = escrow
        .open(
            &record.sealed_password,
            &sealing_context(device_id, &record.rotation_id),
        )
        .map_err(|source| ApiError::Unseal {
            device_id: device_id.clone(),
            rotation_id: record.rotation_id,
            source,
        })?;
    let password = std::str::from_utf8(&opened).map_err(|_| ApiError::PasswordNotUtf8 {
        device_id: device_id.clone(),
        rotation_id: record.rotation_id,
    })?;
    Ok(DeviceLocalCredential {
        account_name: record.account_name.to_string(),
        account_sid: record.account_uid.map(|uid| uid.to_string()),
        backup_date_time: record.backup_time,
        password_base64: PasswordBase64::encode(password),
    })
}

/// `info` as an OData entity: its fields and `@odata.context`.
fn entity(info: &DeviceLocalCredentialInfo) -> Value {
    let mut value = serde_json::to_value(info).expect("deviceLocalCredentialInfo serialises: string keys only");
    if let Value::Object(fields) = &mut value {
        fields.insert("@odata.context".to_owned(), Value::from(ENTITY_CONTEXT));
    }
    value
}
