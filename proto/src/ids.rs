//! Validated identifiers.
//!
//! Every identifier that crosses the wire is a newtype with a private field, built only through
//! `parse` (or `new` for fresh random ids), so that code holding one knows it is well formed:
//! a `DeviceId` is always a valid NATS subject token, an `AccountName` always a valid Linux user
//! name.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use uuid::Uuid;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {value:?}: {allowed}")]
pub struct IdError {
    /// Which kind of identifier was being parsed.
    pub what: &'static str,
    /// The refused input, cut to 80 characters.
    pub value: String,
    /// What would have been accepted.
    pub allowed: &'static str,
}

impl IdError {
    fn new(what: &'static str, value: &str, allowed: &'static str) -> Self {
        Self {
            what,
            value: value.chars().take(80).collect(),
            allowed,
        }
    }
}

/// A device's identity: the token that names it in NATS subjects and the `id` of Graph's
/// `deviceLocalCredentialInfo`.
///
/// Invariant: 1 to 64 characters of `A-Z a-z 0-9 - _`, so it is always one NATS subject token.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(String);

impl DeviceId {
    const ALLOWED: &'static str = "1 to 64 characters of A-Z, a-z, 0-9, '-' and '_'";

    /// A fresh random device id (a UUID, hyphenated).
    pub fn new_random() -> Self {
        Self(Uuid::new_v4().to_string())
    }

    /// Parses a device id, refusing anything that is not a single subject token.
    pub fn parse(value: &str) -> Result<Self, IdError> {
        let valid = !value.is_empty()
            && value.len() <= 64
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if valid {
            Ok(Self(value.to_owned()))
        } else {
            Err(IdError::new("device id", value, Self::ALLOWED))
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A device's host name, as shown in `deviceName`.
///
/// Invariant: 1 to 253 characters of letters, digits, `-`, `_` and `.`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceName(String);

impl DeviceName {
    const ALLOWED: &'static str = "1 to 253 characters of letters, digits, '-', '_' and '.'";

    /// Parses a host name.
    pub fn parse(value: &str) -> Result<Self, IdError> {
        let valid = !value.is_empty()
            && value.len() <= 253
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if valid {
            Ok(Self(value.to_owned()))
        } else {
            Err(IdError::new("device name", value, Self::ALLOWED))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A label an admin gives devices (a site, a group, a role), which breaches can be scoped by.
///
/// Invariant: 1 to 64 characters of lower-case letters, digits, `-`, `_`, `.` and `:`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceTag(String);

impl DeviceTag {
    const ALLOWED: &'static str = "1 to 64 characters of lower-case letters, digits, '-', '_', '.' and ':'";
    /// The most tags one device has.
    pub const MAX_PER_DEVICE: usize = 32;

    /// Parses a tag.
    pub fn parse(value: &str) -> Result<Self, IdError> {
        let valid = !value.is_empty()
            && value.len() <= 64
            && value
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.' | b':'));
        if valid {
            Ok(Self(value.to_owned()))
        } else {
            Err(IdError::new("device tag", value, Self::ALLOWED))
        }
    }

    /// The tag as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The name of a local account on a device.
///
/// Invariant: a portable Linux user name: 1 to 32 characters, starting with a lower-case letter
/// or `_`, then lower-case letters, digits, `_` or `-`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AccountName(String);

impl AccountName {
    const ALLOWED: &'static str = "1 to 32 characters, starting with a-z or '_', then a-z, 0-9, '_' or '-'";

    /// Parses an account name.
    pub fn parse(value: &str) -> Result<Self, IdError> {
        let mut bytes = value.bytes();
        let valid = value.len() <= 32
            && bytes.next().is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
            && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if valid {
            Ok(Self(value.to_owned()))
        } else {
            Err(IdError::new("account name", value, Self::ALLOWED))
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The unique id of one event; sent as `Nats-Msg-Id` so that a retried publish is deduplicated.
///
/// Invariant: a UUID. New ids are version 7, so they sort by creation time.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId(Uuid);

impl EventId {
    /// A fresh, time-ordered event id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// Parses an event id.
    pub fn parse(value: &str) -> Result<Self, IdError> {
        Uuid::parse_str(value)
            .map(Self)
            .map_err(|_| IdError::new("event id", value, "a UUID"))
    }

    /// The id's 16 bytes, for compact storage keys.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl Default for EventId {
    fn default() -> Self {
        Self::new()
    }
}

/// The id of one password rotation: ties a backup to the commit that applies it.
///
/// Invariant: a UUID; new ids are version 7, so they sort by creation time.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RotationId(Uuid);

impl RotationId {
    /// A fresh, time-ordered rotation id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// Parses a rotation id.
    pub fn parse(value: &str) -> Result<Self, IdError> {
        Uuid::parse_str(value)
            .map(Self)
            .map_err(|_| IdError::new("rotation id", value, "a UUID"))
    }
}

impl Default for RotationId {
    fn default() -> Self {
        Self::new()
    }
}

/// The id of one running copy of an agent: made afresh each time an agent opens its state, and
/// stamped on every event it emits, so the centre can tell two copies of one device apart (a
/// cloned image) from one copy restarted.
///
/// Invariant: a UUID.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceId(Uuid);

impl InstanceId {
    /// A fresh instance id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// Parses an instance id.
    pub fn parse(value: &str) -> Result<Self, IdError> {
        Uuid::parse_str(value)
            .map(Self)
            .map_err(|_| IdError::new("instance id", value, "a UUID"))
    }

    /// The id as `Display` writes it (hyphenated, lower case), written into `buffer` without
    /// the formatting machinery: for storage keys built once per event.
    pub fn encode<'b>(&self, buffer: &'b mut [u8; 36]) -> &'b str {
        self.0.hyphenated().encode_lower(buffer)
    }
}

impl Default for InstanceId {
    fn default() -> Self {
        Self::new()
    }
}

/// Implements `Display`, `Debug`, `FromStr` and string serde for an identifier with `parse`.
macro_rules! text_id {
    ($($name:ident),*) => {$(
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(value: &str) -> Result<Self, IdError> {
                Self::parse(value)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                Self::parse(&text).map_err(serde::de::Error::custom)
            }
        }
    )*};
}

text_id!(
    DeviceId,
    DeviceName,
    DeviceTag,
    AccountName,
    EventId,
    RotationId,
    InstanceId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_id_is_a_single_subject_token() {
        assert!(DeviceId::parse("0b5c-DEV_1").is_ok());
        for bad in ["", "a.b", "a b", "a*", "a>", &"x".repeat(65)] {
            let err = DeviceId::parse(bad).expect_err(bad);
            assert!(err.to_string().contains("1 to 64 characters"), "{err}");
        }
    }

    #[test]
    fn account_names_follow_linux_rules() {
        for good in ["root", "lapsadmin", "_svc", "admin-2"] {
            assert!(AccountName::parse(good).is_ok(), "{good}");
        }
        for bad in ["", "Admin", "1admin", "a:b", "a b", &"a".repeat(33)] {
            assert!(AccountName::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_round_trip_through_json() {
        let device_id = DeviceId::new_random();
        let json = serde_json::to_string(&device_id).expect("serialises");
        assert_eq!(serde_json::from_str::<DeviceId>(&json).expect("parses"), device_id);
        let event_id = EventId::new();
        let json = serde_json::to_string(&event_id).expect("serialises");
        assert_eq!(serde_json::from_str::<EventId>(&json).expect("parses"), event_id);
        assert!(serde_json::from_str::<DeviceName>("\"bad name\"").is_err());
    }

    #[test]
    fn new_event_ids_sort_by_time() {
        let first = EventId::new();
        let second = EventId::new();
        assert!(first < second);
    }
}
