//! Device signatures: every device event is signed with the device's Ed25519 key, over
//! `subject + "\n" + payload`, and the orchestrator verifies it against the key the device
//! enrolled with. The orchestrator signs its own events the same way, with its own key
//! ([`OrchestratorSigningKey`]).
//!
//! Ed25519 signatures are deterministic, so an event re-sent (same subject, same bytes) carries
//! the same signature. Signing the subject too binds the event to the subject it was published
//! on, so a signed event cannot be moved to another kind's or another device's subject.
//! Keys and signatures travel as standard base64 (the public key 32 bytes, a signature 64).

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::Signer as _;
use secrecy::SecretString;

/// Why a key or a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The public key is not base64 of 32 bytes, or not a valid Ed25519 point.
    #[error("invalid public key: expected standard base64 of a 32-byte Ed25519 public key")]
    InvalidPublicKey,
    /// The secret key is not base64 of 32 bytes.
    #[error("invalid secret key: expected standard base64 of a 32-byte Ed25519 secret key")]
    InvalidSecretKey,
    /// The signature is not base64 of 64 bytes.
    #[error("malformed signature: expected standard base64 of a 64-byte Ed25519 signature")]
    MalformedSignature,
    /// The signature does not verify with the key.
    #[error("the signature does not match the signer's recorded key")]
    Mismatch,
}

/// The orchestrator's signing key: the same kind of key, signing orchestrator events the way a
/// device signs its own.
pub type OrchestratorSigningKey = DeviceSigningKey;

/// The orchestrator's public key, as recorded on the stream (`orchestrator_key_created`).
pub type OrchestratorPublicKey = DevicePublicKey;

/// A device's signing key. Its `Debug` shows only the public half; it has no `Display`.
#[derive(Clone)]
pub struct DeviceSigningKey(ed25519_dalek::SigningKey);

/// A device's public key, as enrolled.
#[derive(Clone, PartialEq, Eq)]
pub struct DevicePublicKey(ed25519_dalek::VerifyingKey);

/// The bytes a device event's signature covers: its subject, a newline, its payload.
pub fn signed_bytes(subject: &str, payload: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(subject.len() + 1 + payload.len());
    bytes.extend_from_slice(subject.as_bytes());
    bytes.push(b'\n');
    bytes.extend_from_slice(payload);
    bytes
}

impl DeviceSigningKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Self {
        Self(ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng))
    }

    /// The key from its base64 secret, as [`Self::to_base64`] wrote it.
    pub fn from_base64(text: &str) -> Result<Self, SignatureError> {
        let bytes = zeroize::Zeroizing::new(
            STANDARD
                .decode(text.trim())
                .map_err(|_| SignatureError::InvalidSecretKey)?,
        );
        let secret: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| SignatureError::InvalidSecretKey)?;
        Ok(Self(ed25519_dalek::SigningKey::from_bytes(&secret)))
    }

    /// The secret key as base64, to store in an owner-only file.
    pub fn to_base64(&self) -> SecretString {
        let secret = zeroize::Zeroizing::new(self.0.to_bytes());
        STANDARD.encode(secret.as_slice()).into()
    }

    /// The public half.
    pub fn public_key(&self) -> DevicePublicKey {
        DevicePublicKey(self.0.verifying_key())
    }

    /// The base64 signature of an event published on `subject` with `payload`.
    pub fn sign(&self, subject: &str, payload: &[u8]) -> String {
        STANDARD.encode(self.0.sign(&signed_bytes(subject, payload)).to_bytes())
    }
}

impl fmt::Debug for DeviceSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceSigningKey")
            .field("public_key", &self.public_key().to_string())
            .finish_non_exhaustive()
    }
}

impl DevicePublicKey {
    /// Parses standard base64 of a 32-byte Ed25519 public key, refusing invalid points.
    pub fn parse(text: &str) -> Result<Self, SignatureError> {
        let bytes = STANDARD
            .decode(text.trim())
            .map_err(|_| SignatureError::InvalidPublicKey)?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| SignatureError::InvalidPublicKey)?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes).map_err(|_| SignatureError::InvalidPublicKey)?;
        // A weak (small-order) key would accept forged signatures for some messages.
        if key.is_weak() {
            return Err(SignatureError::InvalidPublicKey);
        }
        Ok(Self(key))
    }

    /// Checks `signature` (base64) over an event published on `subject` with `payload`.
    /// Strict verification: no malleable or small-order signatures.
    pub fn verify(&self, subject: &str, payload: &[u8], signature: &str) -> Result<(), SignatureError> {
        let bytes = STANDARD
            .decode(signature.trim())
            .map_err(|_| SignatureError::MalformedSignature)?;
        let signature = ed25519_dalek::Signature::from_slice(&bytes).map_err(|_| SignatureError::MalformedSignature)?;
        self.0
            .verify_strict(&signed_bytes(subject, payload), &signature)
            .map_err(|_| SignatureError::Mismatch)
    }
}

impl fmt::Display for DevicePublicKey {
    /// Standard base64 of the 32 bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.0.as_bytes()))
    }
}

impl fmt::Debug for DevicePublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DevicePublicKey({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    #[test]
    fn a_signature_verifies_only_for_its_key_subject_and_payload() {
        let key = DeviceSigningKey::generate();
        let public = DevicePublicKey::parse(&key.public_key().to_string()).expect("round trips");
        let signature = key.sign("laps.events.a.policy_applied", b"{}");
        assert_eq!(
            signature,
            key.sign("laps.events.a.policy_applied", b"{}"),
            "deterministic"
        );
        assert_eq!(public.verify("laps.events.a.policy_applied", b"{}", &signature), Ok(()));
        assert_eq!(
            public.verify("laps.events.b.policy_applied", b"{}", &signature),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            public.verify("laps.events.a.policy_applied", b"{ }", &signature),
            Err(SignatureError::Mismatch)
        );
        let other = DeviceSigningKey::generate();
        assert_eq!(
            public.verify(
                "laps.events.a.policy_applied",
                b"{}",
                &other.sign("laps.events.a.policy_applied", b"{}")
            ),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            public.verify("laps.events.a.policy_applied", b"{}", "bm90IGEgc2lnbmF0dXJl"),
            Err(SignatureError::MalformedSignature)
        );
    }

    #[test]
    fn secret_keys_round_trip_and_never_show_in_debug() {
        let key = DeviceSigningKey::generate();
        let secret = key.to_base64();
        let back = DeviceSigningKey::from_base64(secret.expose_secret()).expect("round trips");
        assert_eq!(back.public_key(), key.public_key());
        assert!(!format!("{key:?}").contains(secret.expose_secret()));
        assert!(DeviceSigningKey::from_base64("c2hvcnQ=").is_err());
        assert!(DevicePublicKey::parse("not base64!").is_err());
        assert!(
            DevicePublicKey::parse(&STANDARD.encode([0u8; 32])).is_err(),
            "a weak key is refused"
        );
    }
}
