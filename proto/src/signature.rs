//! Device signatures: every device event is signed with the device's Ed25519 key, over
//! `subject + "\n" + payload`, and the orchestrator verifies it against the key the device
//! enrolled with. The orchestrator signs its own events the same way, with its own key
//! ([`OrchestratorSigningKey`]).
//!
//! Ed25519 signatures are deterministic, so an event re-sent (same subject, same bytes) carries
//! the same signature. Signing the subject too binds the event to the subject it was published
//! on, so a signed event cannot be moved to another kind's or another device's subject.
//! Keys and signatures travel as standard base64 (the public key 32 bytes, a signature 64).
//!
//! Verification follows [ZIP 215](https://zips.z.cash/zip-0215): the cofactored equation, `s`
//! canonical, `R` and the key any encoding of a curve point. Under those rules a batch and a
//! one-by-one check accept exactly the same signatures, so the orchestrator may check a fetch's
//! signatures together ([`verify_batch`]) and a replay, which batches differently, still judges
//! every event the same. Every RFC 8032 signer's signatures verify; small-order (weak) keys are
//! refused when a key is parsed.

use std::collections::HashMap;
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::{IsIdentity as _, VartimeMultiscalarMul as _};
use ed25519_dalek::Signer as _;
use rand_core::{RngCore as _, SeedableRng as _};
use secrecy::SecretString;
use sha2::{Digest as _, Sha512};

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
pub struct DevicePublicKey {
    /// The key, for one-by-one checks.
    key: ed25519_zebra::VerificationKey,
    /// Its point, decoded once for the batch checks of [`verify_batch`].
    point: EdwardsPoint,
}

/// One signed event to check with [`verify_batch`].
#[derive(Debug, Clone, Copy)]
pub struct SignedEvent<'a> {
    /// The key it must be signed with.
    pub key: &'a DevicePublicKey,
    /// The subject it was published on.
    pub subject: &'a str,
    /// Its payload.
    pub payload: &'a [u8],
    /// Its signature, base64.
    pub signature: &'a str,
}

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
        DevicePublicKey::from_point(self.0.verifying_key())
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
        Ok(Self::from_point(key))
    }

    /// The verification key of a point already decoded.
    fn from_point(key: ed25519_dalek::VerifyingKey) -> Self {
        Self {
            key: ed25519_zebra::VerificationKey::try_from(key.to_bytes()).expect("a decoded point decodes again"),
            point: key.to_edwards(),
        }
    }

    /// Checks `signature` (base64) over an event published on `subject` with `payload`, by
    /// ZIP 215's rules (the module's documentation).
    pub fn verify(&self, subject: &str, payload: &[u8], signature: &str) -> Result<(), SignatureError> {
        let signature = decode_signature(signature)?;
        self.key
            .verify(&signature, &signed_bytes(subject, payload))
            .map_err(|_| SignatureError::Mismatch)
    }
}

/// The signature of standard base64 of 64 bytes.
fn decode_signature(text: &str) -> Result<ed25519_zebra::Signature, SignatureError> {
    let bytes = STANDARD
        .decode(text.trim())
        .map_err(|_| SignatureError::MalformedSignature)?;
    let bytes: [u8; 64] = bytes.try_into().map_err(|_| SignatureError::MalformedSignature)?;
    Ok(ed25519_zebra::Signature::from_bytes(&bytes))
}

/// How many signatures [`verify_batch`] checks in one equation at most. From about 190 points
/// curve25519-dalek's multiscalar multiplication switches to Pippenger's method, much cheaper
/// per point: groups of 64 or 128 (Straus) measured alike, 256 far cheaper when a fetch holds
/// several events of each device.
const BATCH: usize = 256;
/// Below this many, a group whose equation fails is checked one by one rather than split.
const ONE_BY_ONE_BELOW: usize = 8;

/// Checks each event's signature, as [`DevicePublicKey::verify`] would, but many at once: each
/// verdict is the one [`DevicePublicKey::verify`] gives it alone (ZIP 215 makes the two agree).
/// The events are checked in groups of up to 256 in one equation each (ZIP 215's batch
/// equation, as `ed25519_zebra::batch`, over the keys' points decoded when they were parsed); a
/// group whose equation fails is split in halves, each checked the same way, down to a few
/// checked one by one, so one bad signature costs a few smaller equations rather than a whole
/// group's one-by-one checks.
pub fn verify_batch(events: &[SignedEvent<'_>]) -> Vec<Result<(), SignatureError>> {
    // The equations' random coefficients must be unknown to whoever made the signatures: drawn
    // from a generator seeded by the OS once per call, rather than a system call for each.
    let mut rng = rand_chacha::ChaCha20Rng::from_entropy();
    let mut verdicts = Vec::with_capacity(events.len());
    for group in events.chunks(BATCH) {
        let items: Vec<Result<BatchItem<'_>, SignatureError>> = group.iter().map(BatchItem::new).collect();
        verify_items(&items, &mut rng, &mut verdicts);
    }
    verdicts
}

/// One event of a batch, read: its signature's `R` decoded, `s` canonical, and its challenge.
#[derive(Clone)]
struct BatchItem<'a> {
    /// The event.
    event: &'a SignedEvent<'a>,
    /// Its signature's `R`.
    r: EdwardsPoint,
    /// Its signature's `s`.
    s: Scalar,
    /// `H(R || A || M)`, reduced.
    k: Scalar,
}

impl<'a> BatchItem<'a> {
    /// Reads `event`, or why its signature is refused before any equation: not 64 bytes of
    /// base64, an `R` that is no point, an `s` not below the group's order (ZIP 215's rules).
    fn new(event: &'a SignedEvent<'a>) -> Result<Self, SignatureError> {
        let signature = decode_signature(event.signature)?;
        let r = CompressedEdwardsY(*signature.r_bytes())
            .decompress()
            .ok_or(SignatureError::Mismatch)?;
        let s = Option::<Scalar>::from(Scalar::from_canonical_bytes(*signature.s_bytes()))
            .ok_or(SignatureError::Mismatch)?;
        let mut hash = Sha512::new();
        hash.update(signature.r_bytes());
        hash.update(event.key.key.as_ref());
        hash.update(signed_bytes(event.subject, event.payload));
        let k = Scalar::from_bytes_mod_order_wide(&hash.finalize().into());
        Ok(Self { event, r, s, k })
    }
}

/// Appends the verdicts of `items` (already refused where they could not be read) to `verdicts`.
fn verify_items(
    items: &[Result<BatchItem<'_>, SignatureError>],
    rng: &mut rand_chacha::ChaCha20Rng,
    verdicts: &mut Vec<Result<(), SignatureError>>,
) {
    if batch_holds(items.iter().flatten(), rng) {
        verdicts.extend(items.iter().map(|item| item.as_ref().map(drop).map_err(Clone::clone)));
    } else if items.len() < ONE_BY_ONE_BELOW {
        verdicts.extend(items.iter().map(|item| {
            let event = item.as_ref().map_err(Clone::clone)?.event;
            event.key.verify(event.subject, event.payload, event.signature)
        }));
    } else {
        let (first, second) = items.split_at(items.len() / 2);
        verify_items(first, rng, verdicts);
        verify_items(second, rng, verdicts);
    }
}

/// ZIP 215's batch equation over `items`, with a random 128-bit `z` for each:
/// `[8]([-Σ z·s]B + Σ [z]R + Σ [z·k]A) = 0`, each key's terms gathered into one.
fn batch_holds<'a>(items: impl Iterator<Item = &'a BatchItem<'a>>, rng: &mut rand_chacha::ChaCha20Rng) -> bool {
    let mut b_coefficient = Scalar::ZERO;
    let mut r_coefficients = Vec::new();
    let mut r_points = Vec::new();
    let mut keys: HashMap<&[u8], (Scalar, EdwardsPoint)> = HashMap::new();
    for item in items {
        let mut z = [0u8; 16];
        rng.fill_bytes(&mut z);
        let z = Scalar::from(u128::from_le_bytes(z));
        b_coefficient -= z * item.s;
        r_coefficients.push(z);
        r_points.push(item.r);
        let key = item.event.key;
        keys.entry(key.key.as_ref()).or_insert((Scalar::ZERO, key.point)).0 += z * item.k;
    }
    let (a_coefficients, a_points): (Vec<Scalar>, Vec<EdwardsPoint>) = keys.into_values().unzip();
    EdwardsPoint::vartime_multiscalar_mul(
        std::iter::once(&b_coefficient)
            .chain(&a_coefficients)
            .chain(&r_coefficients),
        std::iter::once(&ED25519_BASEPOINT_POINT)
            .chain(&a_points)
            .chain(&r_points),
    )
    .mul_by_cofactor()
    .is_identity()
}

impl fmt::Display for DevicePublicKey {
    /// Standard base64 of the 32 bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&STANDARD.encode(self.key.as_ref()))
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

    /// Signs `message` by hand so that its `R` is `[r]B` plus a point of small order: what a
    /// key holder can do, and what strict (cofactorless) verification refuses but ZIP 215
    /// accepts. `tamper` breaks `s`. Returns the public key and the signature, base64.
    fn signature_with_small_order_r(subject: &str, payload: &[u8], tamper: bool) -> (DevicePublicKey, String) {
        use curve25519_dalek::constants::{ED25519_BASEPOINT_TABLE, EIGHT_TORSION};
        use curve25519_dalek::scalar::Scalar;
        use rand_core::RngCore as _;
        use sha2::Digest as _;
        let random_scalar = || {
            let mut wide = [0u8; 64];
            rand_core::OsRng.fill_bytes(&mut wide);
            Scalar::from_bytes_mod_order_wide(&wide)
        };
        let (secret, nonce) = (random_scalar(), random_scalar());
        let public = (&secret * ED25519_BASEPOINT_TABLE).compress();
        let r = (&nonce * ED25519_BASEPOINT_TABLE + EIGHT_TORSION[1]).compress();
        let hash: [u8; 64] = sha2::Sha512::new()
            .chain_update(r.as_bytes())
            .chain_update(public.as_bytes())
            .chain_update(signed_bytes(subject, payload))
            .finalize()
            .into();
        let mut s = nonce + Scalar::from_bytes_mod_order_wide(&hash) * secret;
        if tamper {
            s += Scalar::ONE;
        }
        let mut signature = [0u8; 64];
        signature[..32].copy_from_slice(r.as_bytes());
        signature[32..].copy_from_slice(s.as_bytes());
        let key = DevicePublicKey::parse(&STANDARD.encode(public.as_bytes())).expect("a random key is not weak");
        (key, STANDARD.encode(signature))
    }

    #[test]
    fn the_batch_equation_holds_for_good_signatures_and_fails_with_one_bad() {
        // A batch whose equation never held would still give every verdict (each failing group
        // is checked one by one): this checks the equation itself. Several events per key (their
        // terms gathered), and one whose R has a small-order part, which ZIP 215 accepts.
        let subject = "laps.events.d.authentication_reported";
        let keys: Vec<DeviceSigningKey> = (0..5).map(|_| DeviceSigningKey::generate()).collect();
        let publics: Vec<DevicePublicKey> = keys.iter().map(DeviceSigningKey::public_key).collect();
        let payloads: Vec<Vec<u8>> = (0..200).map(|n| format!("{{\"n\":{n}}}").into_bytes()).collect();
        let mut signatures: Vec<String> = (0..200).map(|n| keys[n % 5].sign(subject, &payloads[n])).collect();
        let (crafted_key, crafted_signature) = signature_with_small_order_r(subject, b"{}", false);
        let holds = |signatures: &[String], crafted_signature: &str| {
            let mut events: Vec<SignedEvent<'_>> = (0..200)
                .map(|n| SignedEvent {
                    key: &publics[n % 5],
                    subject,
                    payload: &payloads[n],
                    signature: &signatures[n],
                })
                .collect();
            events.push(SignedEvent {
                key: &crafted_key,
                subject,
                payload: b"{}",
                signature: crafted_signature,
            });
            let items: Vec<BatchItem<'_>> = events
                .iter()
                .map(|event| BatchItem::new(event).expect("reads"))
                .collect();
            let mut rng = rand_chacha::ChaCha20Rng::from_entropy();
            // Fresh coefficients each time: a cofactorless equation would fail seven times in eight.
            (0..8)
                .map(|_| batch_holds(items.iter(), &mut rng))
                .collect::<Vec<bool>>()
        };
        assert_eq!(holds(&signatures, &crafted_signature), [true; 8]);
        signatures[123] = keys[0].sign(subject, &payloads[123]);
        assert_eq!(holds(&signatures, &crafted_signature), [false; 8]);
    }

    #[test]
    fn a_batch_gives_each_event_the_verdict_it_gets_alone() {
        let keys: Vec<DeviceSigningKey> = (0..5).map(|_| DeviceSigningKey::generate()).collect();
        let subjects: Vec<String> = (0..150)
            .map(|n| format!("laps.events.d{}.authentication_reported", n % 5))
            .collect();
        let payloads: Vec<Vec<u8>> = (0..150).map(|n| format!("{{\"n\":{n}}}").into_bytes()).collect();
        let mut signatures: Vec<String> = (0..150).map(|n| keys[n % 5].sign(&subjects[n], &payloads[n])).collect();
        let publics: Vec<DevicePublicKey> = keys.iter().map(DeviceSigningKey::public_key).collect();
        // In the second group of 64: one signed by another key, one over other bytes, one not a
        // signature at all.
        signatures[70] = keys[1].sign(&subjects[70], &payloads[70]);
        signatures[71] = keys[1].sign(&subjects[71], b"{}");
        signatures[100] = "bm90IGEgc2lnbmF0dXJl".to_owned();
        // The verdicts on the 150 events, each with its device's key and `signatures[n]`: in
        // batches, and each alone, which must agree.
        let verdicts_with = |signatures: &[String]| -> Vec<Result<(), SignatureError>> {
            let events: Vec<SignedEvent<'_>> = (0..150)
                .map(|n| SignedEvent {
                    key: &publics[n % 5],
                    subject: &subjects[n],
                    payload: &payloads[n],
                    signature: &signatures[n],
                })
                .collect();
            let verdicts = verify_batch(&events);
            let alone: Vec<_> = events
                .iter()
                .map(|event| event.key.verify(event.subject, event.payload, event.signature))
                .collect();
            assert_eq!(verdicts, alone);
            verdicts
        };
        let verdicts = verdicts_with(&signatures);
        let refused: Vec<usize> = (0..150).filter(|&n| verdicts[n].is_err()).collect();
        assert_eq!(refused, [70, 71, 100]);
        assert_eq!(verdicts[100], Err(SignatureError::MalformedSignature));
        assert_eq!(verdicts[70], Err(SignatureError::Mismatch));

        // Many bad ones: every third, then all of a group.
        let mut many_bad = signatures.clone();
        for n in (0..150).step_by(3) {
            many_bad[n] = keys[(n + 1) % 5].sign(&subjects[n], &payloads[n]);
        }
        let verdicts = verdicts_with(&many_bad);
        for (n, verdict) in verdicts.iter().enumerate() {
            let bad = n % 3 == 0 || [70, 71, 100].contains(&n);
            assert_eq!(verdict.is_err(), bad, "event {n}");
        }
        let all_bad: Vec<String> = (0..150)
            .map(|n| keys[(n + 1) % 5].sign(&subjects[n], &payloads[n]))
            .collect();
        assert!(
            verdicts_with(&all_bad)
                .iter()
                .all(|verdict| *verdict == Err(SignatureError::Mismatch))
        );
    }

    #[test]
    fn a_signature_whose_r_has_a_small_order_part_is_judged_the_same_alone_and_in_any_batch() {
        let subject = "laps.events.crafted.authentication_reported";
        let honest = DeviceSigningKey::generate();
        let honest_payloads: Vec<[u8; 1]> = (0..63).map(|n| [n]).collect();
        let honest_signatures: Vec<String> = honest_payloads
            .iter()
            .map(|payload| honest.sign(subject, payload))
            .collect();
        let honest_public = honest.public_key();
        for tamper in [false, true] {
            let (key, signature) = signature_with_small_order_r(subject, b"{}", tamper);
            let alone = key.verify(subject, b"{}", &signature);
            assert_eq!(alone.is_ok(), !tamper, "ZIP 215 accepts it alone unless its s is wrong");
            let strict = ed25519_dalek::VerifyingKey::from_bytes(&<[u8; 32]>::from(key.key))
                .expect("a point")
                .verify_strict(
                    &signed_bytes(subject, b"{}"),
                    &ed25519_dalek::Signature::from_slice(&STANDARD.decode(&signature).expect("base64"))
                        .expect("64 bytes"),
                );
            assert!(strict.is_err(), "strict verification refuses it: its R is not [r]B");
            // Batches draw fresh random coefficients: a cofactorless batch equation would pass
            // such a signature in about one batch of eight.
            for position in 0..16 {
                let mut events: Vec<SignedEvent<'_>> = (0..63)
                    .map(|n| SignedEvent {
                        key: &honest_public,
                        subject,
                        payload: &honest_payloads[n],
                        signature: &honest_signatures[n],
                    })
                    .collect();
                events.insert(
                    position * 4,
                    SignedEvent {
                        key: &key,
                        subject,
                        payload: b"{}",
                        signature: &signature,
                    },
                );
                let verdicts = verify_batch(&events);
                assert_eq!(verdicts[position * 4], alone, "at {position}, tampered: {tamper}");
                assert_eq!(
                    verdicts.iter().filter(|verdict| verdict.is_err()).count(),
                    usize::from(tamper)
                );
            }
        }
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
