//! The sealed box that carries a password from a device to the orchestrator's escrow key.
//!
//! A device seals each new password to the escrow public key before it sets it, so the password
//! crosses NATS and rests in the event stream only as ciphertext that the orchestrator alone can
//! open. Construction (version 1): a fresh ephemeral X25519 key pair per box; the Diffie–Hellman
//! shared secret goes through HKDF-SHA256 (salt = ephemeral public key ‖ recipient public key,
//! info = `fleetlaps sealed box v1`) to a 32-byte key; XChaCha20-Poly1305 encrypts with a random
//! 24-byte nonce and authenticates a caller-given context as associated data. The context binds a
//! box to what it is for (for passwords, [`crate::event::sealing_context`]: device and rotation),
//! so a box replayed elsewhere does not open. Low-order public keys, which would make the shared
//! secret all zeros, are refused on both sides.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};
use hkdf::Hkdf;
use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::Sha256;
use x25519_dalek::{EphemeralSecret, PublicKey, SharedSecret, StaticSecret};
use zeroize::{Zeroize, Zeroizing};

/// The orchestrator's escrow secret key; its secret half never leaves the orchestrator.
///
/// Its `Debug` shows only the public key. The key bytes are zeroed when it is dropped. The public
/// half is worked out once, when the key is made: opening a box needs it, and it costs a scalar
/// multiplication.
pub struct EscrowSecretKey {
    secret: StaticSecret,
    public: EscrowPublicKey,
}

/// The escrow public key that devices seal passwords to.
///
/// Written as 43 characters of unpadded base64url (32 bytes), in config files and on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct EscrowPublicKey([u8; 32]);

/// A public key string that is not a usable escrow public key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("escrow public key: {reason}")]
pub struct EscrowPublicKeyError {
    reason: String,
}

/// A sealed box as it travels on the wire.
///
/// Byte fields are unpadded base64url strings. It holds only ciphertext and public values, so its
/// `Debug` is safe to show.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Debug)]
pub struct SealedBox {
    /// The format version; [`SEALED_BOX_VERSION`] is the only one so far.
    pub version: u8,
    /// The sender's one-time X25519 public key (32 bytes).
    pub ephemeral_public_key: String,
    /// The XChaCha20-Poly1305 nonce (24 bytes).
    pub nonce: String,
    /// The ciphertext followed by the 16-byte Poly1305 tag.
    pub ciphertext: String,
}

/// Why a sealed box could not be made or opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    /// A field is not base64url or has the wrong length.
    #[error("sealed box field {field} is malformed: {reason}")]
    MalformedField {
        /// The field's name in [`SealedBox`].
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The box was made by a version of fleetlaps this one does not know.
    #[error("sealed box version {0} is not supported (only version {SEALED_BOX_VERSION} is)")]
    UnsupportedVersion(u8),
    /// A public key is a low-order point, which would make the shared secret all zeros.
    #[error("{0} is a low-order point, which would give an all-zero shared secret")]
    LowOrderKey(&'static str),
    /// Authentication failed: the wrong escrow key, a tampered box, or the wrong context.
    #[error("sealed box did not open: wrong escrow key, tampered box or wrong context")]
    AuthenticationFailed,
}

/// The version of the sealed box format that [`seal`] writes.
pub const SEALED_BOX_VERSION: u8 = 1;

const HKDF_INFO: &[u8] = b"fleetlaps sealed box v1";
const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// Unpadded base64 of 32 bytes.
const PUBLIC_KEY_TEXT_LEN: usize = 43;

impl EscrowSecretKey {
    /// Makes a new key with the operating system's CSPRNG.
    pub fn generate() -> Self {
        Self::with_public(StaticSecret::random_from_rng(OsRng))
    }

    fn with_public(secret: StaticSecret) -> Self {
        let public = EscrowPublicKey(PublicKey::from(&secret).to_bytes());
        Self { secret, public }
    }

    /// The key with these bytes, as [`EscrowSecretKey::to_bytes`] gave them.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        let mut bytes = bytes;
        let secret = StaticSecret::from(bytes);
        bytes.zeroize();
        Self::with_public(secret)
    }

    /// The secret key bytes, zeroed when dropped; for storing the key.
    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.secret.to_bytes())
    }

    /// The public half, which devices seal to.
    pub fn public_key(&self) -> EscrowPublicKey {
        self.public
    }

    /// Opens a box sealed to this key with the same `context`.
    pub fn open(&self, sealed: &SealedBox, context: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
        if sealed.version != SEALED_BOX_VERSION {
            return Err(SealError::UnsupportedVersion(sealed.version));
        }
        let ephemeral_public = decode_field::<KEY_LEN>("ephemeral_public_key", &sealed.ephemeral_public_key)?;
        let nonce = decode_field::<NONCE_LEN>("nonce", &sealed.nonce)?;
        let ciphertext = URL_SAFE_NO_PAD
            .decode(&sealed.ciphertext)
            .map_err(|err| malformed("ciphertext", format!("not base64url: {err}")))?;
        if ciphertext.len() < TAG_LEN {
            return Err(malformed(
                "ciphertext",
                format!("{} bytes, shorter than the {TAG_LEN}-byte tag", ciphertext.len()),
            ));
        }
        let shared = self.secret.diffie_hellman(&PublicKey::from(ephemeral_public));
        if !shared.was_contributory() {
            return Err(SealError::LowOrderKey("ephemeral public key"));
        }
        let recipient_public = self.public_key();
        let key = derive_key(&shared, &ephemeral_public, recipient_public.as_bytes());
        let cipher = XChaCha20Poly1305::new(Key::from_slice(key.as_slice()));
        cipher
            .decrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &ciphertext,
                    aad: context,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| SealError::AuthenticationFailed)
    }
}

impl fmt::Debug for EscrowSecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EscrowSecretKey")
            .field("public_key", &self.public_key().to_string())
            .finish_non_exhaustive()
    }
}

impl EscrowPublicKey {
    /// The public key with these bytes.
    ///
    /// Unlike parsing, this does not check the key: pass only bytes from a trusted source, such as
    /// [`EscrowSecretKey::public_key`]. [`seal`] panics on a low-order key.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The key's 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for EscrowPublicKey {
    /// Unpadded base64url, 43 characters.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl FromStr for EscrowPublicKey {
    type Err = EscrowPublicKeyError;

    /// Parses 43 characters of unpadded base64url, ignoring surrounding whitespace, and refuses a
    /// low-order point.
    fn from_str(text: &str) -> Result<Self, EscrowPublicKeyError> {
        let text = text.trim();
        let expected = format!("expected {PUBLIC_KEY_TEXT_LEN} characters of base64url ({KEY_LEN} bytes)");
        if text.len() != PUBLIC_KEY_TEXT_LEN {
            return Err(EscrowPublicKeyError {
                reason: format!("{expected}, got {} characters", text.chars().count()),
            });
        }
        let bytes = URL_SAFE_NO_PAD.decode(text).map_err(|err| EscrowPublicKeyError {
            reason: format!("{expected}, got {err}"),
        })?;
        let bytes: [u8; KEY_LEN] = bytes.try_into().map_err(|bytes: Vec<u8>| EscrowPublicKeyError {
            reason: format!("{expected}, got {} bytes", bytes.len()),
        })?;
        if is_low_order(&bytes) {
            return Err(EscrowPublicKeyError {
                reason: "a low-order point, which would give an all-zero shared secret".to_owned(),
            });
        }
        Ok(Self(bytes))
    }
}

impl Serialize for EscrowPublicKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for EscrowPublicKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Seals `plaintext` to `recipient`, authenticating `context`, with the operating system's CSPRNG.
///
/// # Panics
///
/// If `recipient` is a low-order point. A key parsed from text is never one (parsing refuses
/// them), nor is one taken from an [`EscrowSecretKey`]; use [`try_seal`] for a key made with
/// [`EscrowPublicKey::from_bytes`] from untrusted bytes.
pub fn seal(recipient: &EscrowPublicKey, plaintext: &[u8], context: &[u8]) -> SealedBox {
    try_seal(recipient, plaintext, context).expect("invariant: an escrow public key in use is not a low-order point")
}

/// Seals `plaintext` to `recipient`, authenticating `context`; refuses a low-order `recipient`
/// with [`SealError::LowOrderKey`].
pub fn try_seal(recipient: &EscrowPublicKey, plaintext: &[u8], context: &[u8]) -> Result<SealedBox, SealError> {
    let ephemeral_secret = EphemeralSecret::random_from_rng(OsRng);
    let ephemeral_public = PublicKey::from(&ephemeral_secret);
    let shared = ephemeral_secret.diffie_hellman(&PublicKey::from(recipient.0));
    if !shared.was_contributory() {
        return Err(SealError::LowOrderKey("escrow public key"));
    }
    let key = derive_key(&shared, ephemeral_public.as_bytes(), recipient.as_bytes());
    let mut nonce = [0_u8; NONCE_LEN];
    OsRng.fill_bytes(&mut nonce);
    let cipher = XChaCha20Poly1305::new(Key::from_slice(key.as_slice()));
    let ciphertext = cipher
        .encrypt(
            XNonce::from_slice(&nonce),
            Payload {
                msg: plaintext,
                aad: context,
            },
        )
        .expect("invariant: XChaCha20-Poly1305 encrypts anything shorter than 256 GiB");
    Ok(SealedBox {
        version: SEALED_BOX_VERSION,
        ephemeral_public_key: URL_SAFE_NO_PAD.encode(ephemeral_public.as_bytes()),
        nonce: URL_SAFE_NO_PAD.encode(nonce),
        ciphertext: URL_SAFE_NO_PAD.encode(ciphertext),
    })
}

/// HKDF-SHA256 from the shared secret to the AEAD key, salted with both public keys so the key is
/// bound to this exchange.
///
/// The returned key is zeroed on drop, as the shared secret is. hkdf 0.12 does not zero its own
/// state (the pseudo-random key inside the HMAC) when dropped.
fn derive_key(
    shared: &SharedSecret,
    ephemeral_public: &[u8; KEY_LEN],
    recipient_public: &[u8; KEY_LEN],
) -> Zeroizing<[u8; KEY_LEN]> {
    let mut salt = [0_u8; 2 * KEY_LEN];
    salt[..KEY_LEN].copy_from_slice(ephemeral_public);
    salt[KEY_LEN..].copy_from_slice(recipient_public);
    let hkdf = Hkdf::<Sha256>::new(Some(&salt), shared.as_bytes());
    let mut key = Zeroizing::new([0_u8; KEY_LEN]);
    hkdf.expand(HKDF_INFO, key.as_mut_slice())
        .expect("invariant: 32 bytes is a valid HKDF-SHA256 output length");
    key
}

/// Whether a public key is a low-order point (on the curve or its twist).
///
/// X25519 ignores the top bit and reads the rest modulo p = 2^255 - 19, so the points of order 1,
/// 2, 4 and 8 have exactly seven encodings in 255 bits: the canonical u-coordinates 0, 1, the two
/// of order 8 and p - 1 (Bernstein's list), and p and p + 1 (0 and 1 again). Comparing with them
/// gives what a scalar multiplication by a clamped scalar would (zero exactly for these; see the
/// tests), at the cost of a comparison instead of a scalar multiplication: every event carrying
/// an escrow public key is parsed through here.
fn is_low_order(public: &[u8; KEY_LEN]) -> bool {
    let mut reduced = *public;
    reduced[KEY_LEN - 1] &= 0x7f;
    LOW_ORDER_ENCODINGS.contains(&reduced)
}

/// p - 1, p and p + 1 (p = 2^255 - 19), little-endian: 0xec, 0xed, 0xee, then 0xff and a top 0x7f.
const fn near_p(low: u8) -> [u8; KEY_LEN] {
    let mut bytes = [0xff; KEY_LEN];
    bytes[0] = low;
    bytes[KEY_LEN - 1] = 0x7f;
    bytes
}

/// The little-endian u-coordinates, top bit clear, of every point of order 1, 2, 4 or 8.
const LOW_ORDER_ENCODINGS: [[u8; KEY_LEN]; 7] = [
    [0; KEY_LEN],
    {
        let mut one = [0; KEY_LEN];
        one[0] = 1;
        one
    },
    [
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4, 0x6a, 0xda, 0x09,
        0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49, 0xb8, 0x00,
    ],
    [
        0x5f, 0x9c, 0x95, 0xbc, 0xa3, 0x50, 0x8c, 0x24, 0xb1, 0xd0, 0xb1, 0x55, 0x9c, 0x83, 0xef, 0x5b, 0x04, 0x44,
        0x5c, 0xc4, 0x58, 0x1c, 0x8e, 0x86, 0xd8, 0x22, 0x4e, 0xdd, 0xd0, 0x9f, 0x11, 0x57,
    ],
    near_p(0xec),
    near_p(0xed),
    near_p(0xee),
];

fn decode_field<const LEN: usize>(field: &'static str, text: &str) -> Result<[u8; LEN], SealError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|err| malformed(field, format!("not base64url: {err}")))?;
    bytes
        .try_into()
        .map_err(|bytes: Vec<u8>| malformed(field, format!("expected {LEN} bytes, got {}", bytes.len())))
}

fn malformed(field: &'static str, reason: String) -> SealError {
    SealError::MalformedField { field, reason }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONTEXT: &[u8] = b"fleetlaps password v1\0dev-1\0rotation-1";

    fn flip_first_bit(text: &str) -> String {
        let mut bytes = URL_SAFE_NO_PAD.decode(text).expect("base64url");
        bytes[0] ^= 1;
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The X25519 encodings of points of order 1, 2, 4 and 8 (Bernstein's list).
    fn low_order_points() -> Vec<[u8; 32]> {
        let mut points = vec![[0; 32], {
            let mut one = [0; 32];
            one[0] = 1;
            one
        }];
        for hex in [
            "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
            "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
            "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        ] {
            let mut point = [0; 32];
            for (index, byte) in point.iter_mut().enumerate() {
                *byte = u8::from_str_radix(&hex[2 * index..2 * index + 2], 16).expect("hex");
            }
            points.push(point);
        }
        points
    }

    #[test]
    fn sealed_box_opens_with_the_key_and_context() {
        let escrow = EscrowSecretKey::generate();
        let sealed = seal(&escrow.public_key(), b"Correct-Horse-1", CONTEXT);
        assert_eq!(sealed.version, 1);
        let opened = escrow.open(&sealed, CONTEXT).expect("opens");
        assert_eq!(opened.as_slice(), b"Correct-Horse-1");
        assert!(!sealed.ciphertext.contains("Correct"));

        let empty = seal(&escrow.public_key(), b"", CONTEXT);
        assert_eq!(escrow.open(&empty, CONTEXT).expect("opens").as_slice(), b"");
    }

    #[test]
    fn sealed_box_survives_json() {
        let escrow = EscrowSecretKey::generate();
        let sealed = seal(&escrow.public_key(), b"pw", CONTEXT);
        let json = serde_json::to_value(&sealed).expect("serialises");
        assert_eq!(json["version"], 1);
        assert_eq!(json["ephemeral_public_key"].as_str().expect("a string").len(), 43);
        assert_eq!(json["nonce"].as_str().expect("a string").len(), 32);
        let back: SealedBox = serde_json::from_value(json).expect("parses");
        assert_eq!(escrow.open(&back, CONTEXT).expect("opens").as_slice(), b"pw");
    }

    #[test]
    fn the_wrong_key_fails_authentication() {
        let sealed = seal(&EscrowSecretKey::generate().public_key(), b"pw", CONTEXT);
        let other = EscrowSecretKey::generate();
        assert_eq!(other.open(&sealed, CONTEXT), Err(SealError::AuthenticationFailed));
    }

    #[test]
    fn the_wrong_context_fails_authentication() {
        let escrow = EscrowSecretKey::generate();
        let sealed = seal(&escrow.public_key(), b"pw", CONTEXT);
        assert_eq!(
            escrow.open(&sealed, b"fleetlaps password v1\0dev-2\0rotation-1"),
            Err(SealError::AuthenticationFailed)
        );
        assert_eq!(escrow.open(&sealed, b""), Err(SealError::AuthenticationFailed));
    }

    #[test]
    fn tampering_fails_authentication() {
        let escrow = EscrowSecretKey::generate();
        let sealed = seal(&escrow.public_key(), b"password", CONTEXT);
        let tampered = [
            SealedBox {
                ciphertext: flip_first_bit(&sealed.ciphertext),
                ..sealed.clone()
            },
            SealedBox {
                nonce: flip_first_bit(&sealed.nonce),
                ..sealed.clone()
            },
            SealedBox {
                ephemeral_public_key: flip_first_bit(&sealed.ephemeral_public_key),
                ..sealed.clone()
            },
            SealedBox {
                ciphertext: URL_SAFE_NO_PAD.encode(&URL_SAFE_NO_PAD.decode(&sealed.ciphertext).expect("b64")[1..]),
                ..sealed.clone()
            },
        ];
        for tampered in tampered {
            assert_eq!(
                escrow.open(&tampered, CONTEXT),
                Err(SealError::AuthenticationFailed),
                "{tampered:?}"
            );
        }
    }

    #[test]
    fn malformed_fields_are_named() {
        let escrow = EscrowSecretKey::generate();
        let sealed = seal(&escrow.public_key(), b"pw", CONTEXT);
        let cases = [
            (
                SealedBox {
                    ephemeral_public_key: "not base64!".to_owned(),
                    ..sealed.clone()
                },
                "ephemeral_public_key",
            ),
            (
                SealedBox {
                    ephemeral_public_key: URL_SAFE_NO_PAD.encode([1; 31]),
                    ..sealed.clone()
                },
                "ephemeral_public_key",
            ),
            (
                SealedBox {
                    nonce: "%%%".to_owned(),
                    ..sealed.clone()
                },
                "nonce",
            ),
            (
                SealedBox {
                    nonce: URL_SAFE_NO_PAD.encode([1; 12]),
                    ..sealed.clone()
                },
                "nonce",
            ),
            (
                SealedBox {
                    ciphertext: "a=b".to_owned(),
                    ..sealed.clone()
                },
                "ciphertext",
            ),
            (
                SealedBox {
                    ciphertext: URL_SAFE_NO_PAD.encode([1; 15]),
                    ..sealed.clone()
                },
                "ciphertext",
            ),
            // Standard base64 with padding is not accepted either.
            (
                SealedBox {
                    nonce: base64::engine::general_purpose::STANDARD.encode([0xfb; 24]),
                    ..sealed.clone()
                },
                "nonce",
            ),
        ];
        for (malformed, expected_field) in cases {
            let err = escrow.open(&malformed, CONTEXT).expect_err(expected_field);
            assert!(
                matches!(err, SealError::MalformedField { field, .. } if field == expected_field),
                "{expected_field}: {err:?}"
            );
            assert!(
                err.to_string()
                    .starts_with(&format!("sealed box field {expected_field} is malformed: "))
            );
        }
        let short_nonce = SealedBox {
            nonce: URL_SAFE_NO_PAD.encode([1; 12]),
            ..sealed
        };
        assert_eq!(
            escrow.open(&short_nonce, CONTEXT).expect_err("short").to_string(),
            "sealed box field nonce is malformed: expected 24 bytes, got 12"
        );
    }

    #[test]
    fn unknown_versions_are_refused() {
        let escrow = EscrowSecretKey::generate();
        let sealed = SealedBox {
            version: 2,
            ..seal(&escrow.public_key(), b"pw", CONTEXT)
        };
        let err = escrow.open(&sealed, CONTEXT).expect_err("version 2");
        assert_eq!(err, SealError::UnsupportedVersion(2));
        assert_eq!(
            err.to_string(),
            "sealed box version 2 is not supported (only version 1 is)"
        );
    }

    /// What a low-order point is, by definition: a clamped scalar times it is zero.
    fn multiplies_to_zero(public: &[u8; 32]) -> bool {
        x25519_dalek::x25519([0x42; 32], *public) == [0; 32]
    }

    #[test]
    fn the_low_order_check_agrees_with_a_scalar_multiplication() {
        let mut encodings = Vec::new();
        for point in LOW_ORDER_ENCODINGS {
            let mut high = point;
            high[31] |= 0x80;
            encodings.extend([point, high]);
        }
        for encoding in &encodings {
            assert!(multiplies_to_zero(encoding), "{encoding:02x?}");
            assert!(is_low_order(encoding), "{encoding:02x?}");
        }
        // Every u-coordinate of the curve's eight-torsion is among them (the twist's p - 1, and
        // the non-canonical p and p + 1, complete the list), and Bernstein's list as well.
        for point in curve25519_dalek::constants::EIGHT_TORSION {
            assert!(LOW_ORDER_ENCODINGS.contains(&point.to_montgomery().to_bytes()));
        }
        for point in low_order_points() {
            assert!(LOW_ORDER_ENCODINGS.contains(&point));
        }
        // Neighbours and random keys: none is low order, by either account.
        for point in LOW_ORDER_ENCODINGS {
            for delta in [1_u8, 2, 0x40] {
                let mut near = point;
                near[1] ^= delta;
                assert_eq!(is_low_order(&near), multiplies_to_zero(&near), "{near:02x?}");
            }
        }
        for _ in 0..2_000 {
            let mut random = [0_u8; 32];
            OsRng.fill_bytes(&mut random);
            assert!(!is_low_order(&random) && !multiplies_to_zero(&random));
        }
    }

    #[test]
    fn low_order_keys_are_refused_on_both_sides() {
        let escrow = EscrowSecretKey::generate();
        let sealed = seal(&escrow.public_key(), b"pw", CONTEXT);
        for point in low_order_points() {
            assert!(is_low_order(&point));
            let forged = SealedBox {
                ephemeral_public_key: URL_SAFE_NO_PAD.encode(point),
                ..sealed.clone()
            };
            assert_eq!(
                escrow.open(&forged, CONTEXT),
                Err(SealError::LowOrderKey("ephemeral public key"))
            );
            let recipient = EscrowPublicKey::from_bytes(point);
            assert_eq!(
                try_seal(&recipient, b"pw", CONTEXT),
                Err(SealError::LowOrderKey("escrow public key"))
            );
            let err = recipient.to_string().parse::<EscrowPublicKey>().expect_err("low order");
            assert!(err.to_string().contains("low-order"), "{err}");
        }
        assert!(!is_low_order(escrow.public_key().as_bytes()));
    }

    #[test]
    fn two_seals_of_the_same_plaintext_differ() {
        let escrow = EscrowSecretKey::generate();
        let first = seal(&escrow.public_key(), b"pw", CONTEXT);
        let second = seal(&escrow.public_key(), b"pw", CONTEXT);
        assert_ne!(first.ephemeral_public_key, second.ephemeral_public_key);
        assert_ne!(first.nonce, second.nonce);
        assert_ne!(first.ciphertext, second.ciphertext);
    }

    #[test]
    fn secret_key_bytes_round_trip() {
        let escrow = EscrowSecretKey::generate();
        let restored = EscrowSecretKey::from_bytes(*escrow.to_bytes());
        assert_eq!(restored.public_key(), escrow.public_key());
        let sealed = seal(&escrow.public_key(), b"pw", CONTEXT);
        assert_eq!(restored.open(&sealed, CONTEXT).expect("opens").as_slice(), b"pw");
    }

    #[test]
    fn public_key_text_round_trips() {
        let public = EscrowSecretKey::generate().public_key();
        let text = public.to_string();
        assert_eq!(text.len(), 43);
        assert!(
            text.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(text.parse::<EscrowPublicKey>(), Ok(public));
        assert_eq!(format!(" {text}\n").parse::<EscrowPublicKey>(), Ok(public));
        assert_eq!(EscrowPublicKey::from_bytes(*public.as_bytes()), public);

        let json = serde_json::to_string(&public).expect("serialises");
        assert_eq!(json, format!("\"{text}\""));
        assert_eq!(serde_json::from_str::<EscrowPublicKey>(&json).expect("parses"), public);
    }

    #[test]
    fn bad_public_key_text_says_what_is_wrong() {
        let expected = "escrow public key: expected 43 characters of base64url (32 bytes)";
        let err = "abc".parse::<EscrowPublicKey>().expect_err("short");
        assert_eq!(err.to_string(), format!("{expected}, got 3 characters"));
        let err = format!("{}=", "A".repeat(42))
            .parse::<EscrowPublicKey>()
            .expect_err("padding");
        assert!(
            err.to_string().starts_with(&format!("{expected}, got Invalid")),
            "{err}"
        );
        let err = "+"
            .repeat(43)
            .parse::<EscrowPublicKey>()
            .expect_err("standard alphabet");
        assert!(err.to_string().starts_with(expected), "{err}");
        let err = serde_json::from_str::<EscrowPublicKey>("\"abc\"").expect_err("short");
        assert!(err.to_string().starts_with(expected), "{err}");
    }

    #[test]
    fn debug_of_the_secret_key_shows_only_the_public_key() {
        let escrow = EscrowSecretKey::from_bytes([0xAB; 32]);
        let debug = format!("{escrow:?}");
        assert!(debug.contains(&escrow.public_key().to_string()), "{debug}");
        let secret_bytes = escrow.to_bytes();
        for encoded in [
            URL_SAFE_NO_PAD.encode(*secret_bytes),
            base64::engine::general_purpose::STANDARD.encode(*secret_bytes),
            format!("{:?}", *secret_bytes),
            "171, 171".to_owned(),
            "abab".to_owned(),
        ] {
            assert!(!debug.contains(&encoded), "{debug} contains {encoded}");
        }
    }
}
