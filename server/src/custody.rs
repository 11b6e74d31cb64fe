//! Cryptography of custodied signing keys.
//!
//! A custodied key is generated inside the server and its private part never
//! leaves it: callers receive the public forms ([`public_key`],
//! [`public_jwk`]) and ask the server to [`sign`] on their behalf. This module
//! is the pure core of that: it turns 32 private bytes into public keys and
//! signatures, and nothing else. It does no I/O, draws no randomness and logs
//! nothing; the server draws the private bytes from its RNG, seals them at
//! rest and hands them here only for the duration of one call.
//!
//! # Keys
//!
//! Every [`Algorithm`] takes [`PRIVATE_KEY_LEN`] (32) private bytes:
//!
//! - **Ed25519**: the RFC 8032 seed.
//! - **secp256k1** and **P-256**: the secret scalar, big-endian; a scalar of
//!   0 or at least the group order is rejected, never reduced.
//!
//! # What is signed
//!
//! A [`Payload`] is either a caller-computed 32-byte digest or a message with
//! a [`Scheme`] that says how the message becomes what the key signs:
//!
//! | scheme                 | keys                | the key signs                                         |
//! |------------------------|---------------------|-------------------------------------------------------|
//! | `digest`               | secp256k1, P-256    | the 32 bytes as given (ECDSA over a prehash)          |
//! | `raw_sha256`           | secp256k1, P-256    | SHA-256 of the message (ECDSA over the prehash)       |
//! | `eip191_personal_sign` | secp256k1           | keccak256 of `"\x19Ethereum Signed Message:\n" ‖ len ‖ message` |
//! | `ed25519_pure`         | Ed25519             | the message itself (PureEdDSA)                        |
//!
//! Each payload also has a 32-byte [`payload_hash`] that identifies it for
//! audit records; for ECDSA it is exactly the prehash that was signed.
//!
//! ECDSA nonces are deterministic (RFC 6979), so signing is a function of key
//! and payload: the same input always yields the same bytes. secp256k1
//! signatures are normalized to low-S and carry an Ethereum-style recovery
//! byte `v = 27 + recovery_id`.
//!
//! # Secrets
//!
//! Private bytes are borrowed, never copied into long-lived buffers; the
//! signing keys built from them are wiped when dropped (the RustCrypto key
//! types zeroize themselves). No error message and no `Debug` output contains
//! key material.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::Signer as _;
use ed25519_dalek::pkcs8::EncodePublicKey as _;
use k256::elliptic_curve::sec1::ToEncodedPoint as _;
use p256::ecdsa::signature::hazmat::PrehashSigner as _;
use sha2::{Digest as _, Sha256};
use sha3::Keccak256;

/// The private key material length for every algorithm: 32 bytes.
pub const PRIVATE_KEY_LEN: usize = 32;

/// Length of the payload hash and of an ECDSA prehash.
const HASH_LEN: usize = 32;

/// Line ending of the emitted PEM.
const PEM_LINE_ENDING: k256::pkcs8::LineEnding = k256::pkcs8::LineEnding::LF;

/// The EIP-191 version 0x45 ("personal_sign") prefix, before the length.
const EIP191_PREFIX: &[u8] = b"\x19Ethereum Signed Message:\n";

/// Offset of v: Ethereum's legacy recovery byte is 27 + recovery id.
const ETHEREUM_V_OFFSET: u8 = 27;

/// Algorithm of a custodied key. Stored as its `as_str()` in the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// Ed25519 (RFC 8032), PureEdDSA.
    Ed25519,
    /// ECDSA on secp256k1 (Bitcoin, Ethereum).
    Secp256k1,
    /// ECDSA on NIST P-256 (secp256r1, prime256v1).
    P256,
}

impl Algorithm {
    /// The stable name: `"ed25519"`, `"secp256k1"` or `"p256"`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ed25519 => "ed25519",
            Self::Secp256k1 => "secp256k1",
            Self::P256 => "p256",
        }
    }

    /// The algorithm named `s` (exactly as [`Algorithm::as_str`] spells it).
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Ed25519, Self::Secp256k1, Self::P256]
            .into_iter()
            .find(|a| a.as_str() == s)
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a message is turned into what the key signs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// The caller supplies the 32-byte prehash itself.
    Digest,
    /// ECDSA over SHA-256 of the message.
    RawSha256,
    /// Ethereum `personal_sign` (EIP-191 version 0x45): ECDSA over
    /// keccak256 of the prefixed message.
    Eip191PersonalSign,
    /// PureEdDSA over the message itself.
    Ed25519Pure,
}

impl Scheme {
    /// The stable name: `"digest"`, `"raw_sha256"`,
    /// `"eip191_personal_sign"` or `"ed25519_pure"`.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Digest => "digest",
            Self::RawSha256 => "raw_sha256",
            Self::Eip191PersonalSign => "eip191_personal_sign",
            Self::Ed25519Pure => "ed25519_pure",
        }
    }

    /// The scheme named `s` (exactly as [`Scheme::as_str`] spells it).
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Digest,
            Self::RawSha256,
            Self::Eip191PersonalSign,
            Self::Ed25519Pure,
        ]
        .into_iter()
        .find(|scheme| scheme.as_str() == s)
    }

    /// Whether a key of `algorithm` may use this scheme: `Digest` and
    /// `RawSha256` suit secp256k1 and P-256, `Eip191PersonalSign` suits
    /// secp256k1 only, `Ed25519Pure` suits Ed25519 only.
    #[must_use]
    pub fn suits(self, algorithm: Algorithm) -> bool {
        match self {
            Self::Digest | Self::RawSha256 => {
                matches!(algorithm, Algorithm::Secp256k1 | Algorithm::P256)
            }
            Self::Eip191PersonalSign => algorithm == Algorithm::Secp256k1,
            Self::Ed25519Pure => algorithm == Algorithm::Ed25519,
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a custody operation failed. No variant carries key material.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CustodyError {
    /// The private bytes are not 32 bytes, or not a valid scalar/seed.
    #[error("the private key bytes are not a valid key for this algorithm")]
    InvalidPrivateKey,
    /// The scheme cannot be used with the key's algorithm.
    #[error("scheme {scheme} does not suit a {algorithm} key")]
    Unsuited {
        /// [`Scheme::as_str`] of the requested scheme.
        scheme: &'static str,
        /// [`Algorithm::as_str`] of the key.
        algorithm: &'static str,
    },
    /// A digest payload was not 32 bytes.
    #[error("a digest must be exactly 32 bytes")]
    DigestLength,
    /// The signature primitive failed (practically unreachable).
    #[error("signing failed")]
    SigningFailed,
    /// A public key could not be decoded or encoded (e.g. bytes that are not
    /// a point of the curve).
    #[error("encoding failed")]
    Encoding,
}

/// Public forms of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// Ed25519: the 32-byte key. secp256k1 / P-256: the 65-byte uncompressed
    /// SEC1 point 0x04||X||Y.
    pub raw: Vec<u8>,
    /// PEM "PUBLIC KEY" (SubjectPublicKeyInfo), with trailing newline as the
    /// crates emit it.
    pub pem: String,
    /// EIP-55 checksummed Ethereum address "0x…40 hex" for secp256k1; None
    /// otherwise.
    pub ethereum_address: Option<String>,
}

/// What to sign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload<'a> {
    /// A 32-byte prehash computed by the caller (scheme `digest`).
    Digest(&'a [u8]),
    /// A message and the scheme that turns it into what the key signs. A
    /// message under [`Scheme::Digest`] is the same as [`Payload::Digest`].
    Message {
        /// How the message is signed.
        scheme: Scheme,
        /// The message bytes.
        data: &'a [u8],
    },
}

impl Payload<'_> {
    /// The scheme the payload is signed under.
    const fn scheme(&self) -> Scheme {
        match self {
            Self::Digest(_) => Scheme::Digest,
            Self::Message { scheme, .. } => *scheme,
        }
    }

    /// The payload's bytes: the digest or the message.
    const fn data(&self) -> &[u8] {
        match self {
            Self::Digest(data) | Self::Message { data, .. } => data,
        }
    }
}

/// A produced signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// Ed25519: 64 bytes R||S. P-256: 64 bytes r||s (IEEE P1363).
    /// secp256k1: 65 bytes r||s||v with v = 27 + recovery_id.
    pub bytes: Vec<u8>,
    /// ECDSA r, 32 bytes, big-endian; empty for Ed25519.
    pub r: Vec<u8>,
    /// ECDSA s, 32 bytes, big-endian; empty for Ed25519.
    pub s: Vec<u8>,
    /// secp256k1: 27 + recovery_id; 0 otherwise.
    pub v: u32,
    /// secp256k1: 0 or 1; 0 otherwise.
    pub recovery_id: u32,
    /// payload_hash(payload).
    pub payload_hash: [u8; 32],
}

/// A private key parsed for one algorithm, ready to sign any number of
/// payloads (parsing derives the public key: for secp256k1 a scalar
/// multiplication as costly as the signature). The wrapped key types wipe
/// themselves on drop; `Debug` names the algorithm only.
pub enum SecretKey {
    Ed25519(ed25519_dalek::SigningKey),
    Secp256k1(k256::ecdsa::SigningKey),
    P256(p256::ecdsa::SigningKey),
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey({}, ..)", self.algorithm())
    }
}

impl SecretKey {
    /// Parses 32 private bytes as a key of `algorithm`.
    ///
    /// # Errors
    ///
    /// [`CustodyError::InvalidPrivateKey`] as in [`public_key`].
    pub fn parse(algorithm: Algorithm, private: &[u8]) -> Result<Self, CustodyError> {
        let bytes: &[u8; PRIVATE_KEY_LEN] = private
            .try_into()
            .map_err(|_| CustodyError::InvalidPrivateKey)?;
        match algorithm {
            Algorithm::Ed25519 => Ok(Self::Ed25519(ed25519_dalek::SigningKey::from_bytes(bytes))),
            Algorithm::Secp256k1 => k256::ecdsa::SigningKey::from_bytes(bytes.into())
                .map(Self::Secp256k1)
                .map_err(|_| CustodyError::InvalidPrivateKey),
            Algorithm::P256 => p256::ecdsa::SigningKey::from_bytes(bytes.into())
                .map(Self::P256)
                .map_err(|_| CustodyError::InvalidPrivateKey),
        }
    }

    /// The algorithm the key was parsed for.
    pub const fn algorithm(&self) -> Algorithm {
        match self {
            Self::Ed25519(_) => Algorithm::Ed25519,
            Self::Secp256k1(_) => Algorithm::Secp256k1,
            Self::P256(_) => Algorithm::P256,
        }
    }

    /// Signs `payload` as [`sign`] does, with this parsed key.
    ///
    /// # Errors
    ///
    /// As [`sign`], less [`CustodyError::InvalidPrivateKey`].
    pub fn sign(&self, payload: &Payload<'_>) -> Result<Signature, CustodyError> {
        let hash = suited_hash(self.algorithm(), payload)?;
        self.sign_hashed(payload, hash)
    }

    fn sign_hashed(
        &self,
        payload: &Payload<'_>,
        hash: [u8; HASH_LEN],
    ) -> Result<Signature, CustodyError> {
        match self {
            Self::Ed25519(key) => sign_ed25519(key, payload.data(), hash),
            Self::Secp256k1(key) => sign_secp256k1(key, hash),
            Self::P256(key) => sign_p256(key, hash),
        }
    }
}

/// Derives the public forms from the 32 private bytes.
///
/// For secp256k1 and P-256 the bytes are the scalar, big-endian; for Ed25519
/// they are the seed.
///
/// # Errors
///
/// [`CustodyError::InvalidPrivateKey`] if `private` is not 32 bytes, or is an
/// out-of-range scalar (0 or >= the group order n) for secp256k1 / P-256.
/// [`CustodyError::Encoding`] if the PEM cannot be produced.
pub fn public_key(algorithm: Algorithm, private: &[u8]) -> Result<PublicKey, CustodyError> {
    match SecretKey::parse(algorithm, private)? {
        SecretKey::Ed25519(key) => {
            let verifying = key.verifying_key();
            Ok(PublicKey {
                raw: verifying.to_bytes().to_vec(),
                pem: verifying
                    .to_public_key_pem(PEM_LINE_ENDING)
                    .map_err(|_| CustodyError::Encoding)?,
                ethereum_address: None,
            })
        }
        SecretKey::Secp256k1(key) => {
            let verifying = key.verifying_key();
            let raw = verifying.to_encoded_point(false).as_bytes().to_vec();
            Ok(PublicKey {
                pem: verifying
                    .to_public_key_pem(PEM_LINE_ENDING)
                    .map_err(|_| CustodyError::Encoding)?,
                ethereum_address: Some(ethereum_address(&raw)?),
                raw,
            })
        }
        SecretKey::P256(key) => {
            let verifying = key.verifying_key();
            Ok(PublicKey {
                raw: verifying.to_encoded_point(false).as_bytes().to_vec(),
                pem: verifying
                    .to_public_key_pem(PEM_LINE_ENDING)
                    .map_err(|_| CustodyError::Encoding)?,
                ethereum_address: None,
            })
        }
    }
}

/// The public key as a JWK JSON string (RFC 7517, RFC 8037).
///
/// - Ed25519: `{"kty":"OKP","crv":"Ed25519","x":…}`
/// - secp256k1: `{"kty":"EC","crv":"secp256k1","x":…,"y":…}`
/// - P-256: `{"kty":"EC","crv":"P-256","x":…,"y":…}`
///
/// plus `"kid": kid`, `"use": "sig"` and `"alg"`: `"EdDSA"`, `"ES256K"` or
/// `"ES256"`. Coordinates are base64url without padding.
///
/// `raw_public` is [`PublicKey::raw`]: the 32-byte Ed25519 key, or a SEC1
/// point (uncompressed or compressed) for the ECDSA curves.
///
/// # Errors
///
/// [`CustodyError::Encoding`] if `raw_public` is not a valid public key of
/// `algorithm`.
pub fn public_jwk(
    algorithm: Algorithm,
    raw_public: &[u8],
    kid: &str,
) -> Result<String, CustodyError> {
    let (mut jwk, alg) = match algorithm {
        Algorithm::Ed25519 => (ed25519_jwk(raw_public)?, "EdDSA"),
        Algorithm::Secp256k1 => (
            ec_jwk(
                &k256::PublicKey::from_sec1_bytes(raw_public)
                    .map_err(|_| CustodyError::Encoding)?
                    .to_jwk(),
            )?,
            "ES256K",
        ),
        Algorithm::P256 => (
            ec_jwk(
                &p256::PublicKey::from_sec1_bytes(raw_public)
                    .map_err(|_| CustodyError::Encoding)?
                    .to_jwk(),
            )?,
            "ES256",
        ),
    };
    jwk.insert("kid".to_owned(), kid.into());
    jwk.insert("use".to_owned(), "sig".into());
    jwk.insert("alg".to_owned(), alg.into());
    serde_json::to_string(&jwk).map_err(|_| CustodyError::Encoding)
}

/// The OKP members of an Ed25519 JWK (RFC 8037 §2).
fn ed25519_jwk(
    raw_public: &[u8],
) -> Result<serde_json::Map<String, serde_json::Value>, CustodyError> {
    let bytes: &[u8; ed25519_dalek::PUBLIC_KEY_LENGTH] =
        raw_public.try_into().map_err(|_| CustodyError::Encoding)?;
    let key = ed25519_dalek::VerifyingKey::from_bytes(bytes).map_err(|_| CustodyError::Encoding)?;
    let mut jwk = serde_json::Map::new();
    jwk.insert("kty".to_owned(), "OKP".into());
    jwk.insert("crv".to_owned(), "Ed25519".into());
    jwk.insert(
        "x".to_owned(),
        URL_SAFE_NO_PAD.encode(key.as_bytes()).into(),
    );
    Ok(jwk)
}

/// The EC members (kty, crv, x, y) of a JWK as the curve crate encodes them.
/// (`JwkEcKey` is `elliptic_curve`'s type, shared by k256 and p256.)
fn ec_jwk(
    key: &k256::elliptic_curve::JwkEcKey,
) -> Result<serde_json::Map<String, serde_json::Value>, CustodyError> {
    match serde_json::to_value(key) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        _ => Err(CustodyError::Encoding),
    }
}

/// The 32-byte hash that identifies a payload, computed without any key.
///
/// - `Digest(d)` (or a message under [`Scheme::Digest`]): `d` itself.
/// - `RawSha256`: SHA-256(data).
/// - `Eip191PersonalSign`: keccak256(`"\x19Ethereum Signed Message:\n"` ‖
///   decimal `len(data)` ‖ data).
/// - `Ed25519Pure`: SHA-256(data), for reference only: Ed25519 signs the
///   message itself.
///
/// # Errors
///
/// [`CustodyError::DigestLength`] if a digest is not exactly 32 bytes.
pub fn payload_hash(payload: &Payload<'_>) -> Result<[u8; 32], CustodyError> {
    let data = payload.data();
    match payload.scheme() {
        Scheme::Digest => data.try_into().map_err(|_| CustodyError::DigestLength),
        Scheme::RawSha256 | Scheme::Ed25519Pure => Ok(Sha256::digest(data).into()),
        Scheme::Eip191PersonalSign => Ok(eip191_hash(data)),
    }
}

/// keccak256("\x19Ethereum Signed Message:\n" ‖ decimal len(message) ‖ message).
fn eip191_hash(message: &[u8]) -> [u8; HASH_LEN] {
    Keccak256::new()
        .chain_update(EIP191_PREFIX)
        .chain_update(message.len().to_string().as_bytes())
        .chain_update(message)
        .finalize()
        .into()
}

/// Signs `payload` with the key of `algorithm` held in `private`.
///
/// - secp256k1: ECDSA over the 32-byte prehash (the digest, SHA-256(data) or
///   the EIP-191 keccak hash), RFC 6979 deterministic nonce, normalized to
///   low-S, recoverable: the recovery id matches the normalized signature.
/// - P-256: ECDSA over the prehash (the digest or SHA-256(data)), RFC 6979
///   deterministic nonce; s is not normalized.
/// - Ed25519: PureEdDSA over the message (RFC 8032).
///
/// # Errors
///
/// Checked in this order:
/// [`CustodyError::Unsuited`] if the payload's scheme does not suit
/// `algorithm` (a [`Payload::Digest`] counts as scheme `"digest"`, which
/// needs secp256k1 or P-256); [`CustodyError::DigestLength`] if a digest is
/// not 32 bytes; [`CustodyError::InvalidPrivateKey`] as in [`public_key`];
/// [`CustodyError::SigningFailed`] if the primitive fails (for secp256k1
/// also when the signature's R has an x-reduced recovery id, which happens
/// with probability about 2^-128 and has no Ethereum encoding).
pub fn sign(
    algorithm: Algorithm,
    private: &[u8],
    payload: &Payload<'_>,
) -> Result<Signature, CustodyError> {
    let hash = suited_hash(algorithm, payload)?;
    SecretKey::parse(algorithm, private)?.sign_hashed(payload, hash)
}

/// The payload's hash, once its scheme is known to suit `algorithm`.
fn suited_hash(algorithm: Algorithm, payload: &Payload<'_>) -> Result<[u8; 32], CustodyError> {
    let scheme = payload.scheme();
    if !scheme.suits(algorithm) {
        return Err(CustodyError::Unsuited {
            scheme: scheme.as_str(),
            algorithm: algorithm.as_str(),
        });
    }
    payload_hash(payload)
}

/// PureEdDSA over the message.
fn sign_ed25519(
    key: &ed25519_dalek::SigningKey,
    message: &[u8],
    payload_hash: [u8; HASH_LEN],
) -> Result<Signature, CustodyError> {
    let signature = key
        .try_sign(message)
        .map_err(|_| CustodyError::SigningFailed)?;
    Ok(Signature {
        bytes: signature.to_bytes().to_vec(),
        r: Vec::new(),
        s: Vec::new(),
        v: 0,
        recovery_id: 0,
        payload_hash,
    })
}

/// Recoverable low-S ECDSA over the prehash, with Ethereum's `v`.
fn sign_secp256k1(
    key: &k256::ecdsa::SigningKey,
    prehash: [u8; HASH_LEN],
) -> Result<Signature, CustodyError> {
    let (signature, recovery_id) = key
        .sign_prehash_recoverable(&prehash)
        .map_err(|_| CustodyError::SigningFailed)?;
    // An x-reduced R (probability ~2^-128) has no Ethereum encoding.
    if recovery_id.is_x_reduced() {
        return Err(CustodyError::SigningFailed);
    }
    let recovery_byte = recovery_id.to_byte();
    let v = ETHEREUM_V_OFFSET + recovery_byte;
    let (r, s) = signature.split_bytes();
    let mut bytes = signature.to_bytes().to_vec();
    bytes.push(v);
    Ok(Signature {
        bytes,
        r: r.to_vec(),
        s: s.to_vec(),
        v: u32::from(v),
        recovery_id: u32::from(recovery_byte),
        payload_hash: prehash,
    })
}

/// ECDSA over the prehash, IEEE P1363 r||s.
fn sign_p256(
    key: &p256::ecdsa::SigningKey,
    prehash: [u8; HASH_LEN],
) -> Result<Signature, CustodyError> {
    let signature: p256::ecdsa::Signature = key
        .sign_prehash(&prehash)
        .map_err(|_| CustodyError::SigningFailed)?;
    let (r, s) = signature.split_bytes();
    Ok(Signature {
        bytes: signature.to_bytes().to_vec(),
        r: r.to_vec(),
        s: s.to_vec(),
        v: 0,
        recovery_id: 0,
        payload_hash: prehash,
    })
}

/// EIP-55 checksummed address of a secp256k1 public key.
///
/// `"0x"` + checksummed hex of the last 20 bytes of keccak256(X‖Y), where
/// `uncompressed_point` is the SEC1 point `0x04‖X‖Y` (a compressed point is
/// accepted too and decompressed first).
///
/// # Errors
///
/// [`CustodyError::Encoding`] if the bytes are not a point of secp256k1.
pub fn ethereum_address(uncompressed_point: &[u8]) -> Result<String, CustodyError> {
    let point = k256::PublicKey::from_sec1_bytes(uncompressed_point)
        .map_err(|_| CustodyError::Encoding)?
        .to_encoded_point(false);
    let xy = point.as_bytes().get(1..).ok_or(CustodyError::Encoding)?;
    let hash = Keccak256::digest(xy);
    let address = hash.get(12..).ok_or(CustodyError::Encoding)?;
    Ok(eip55_checksum(address))
}

/// "0x" + the EIP-55 mixed-case hex of a 20-byte address: a letter is upper
/// case where the matching nibble of keccak256(lowercase hex) is >= 8.
fn eip55_checksum(address: &[u8]) -> String {
    let lower = hex::encode(address);
    let hash = Keccak256::digest(lower.as_bytes());
    let mut out = String::with_capacity(2 + lower.len());
    out.push_str("0x");
    for (pair, hash_byte) in lower.as_bytes().chunks(2).zip(hash.iter()) {
        for (digit, nibble) in pair.iter().zip([hash_byte >> 4, hash_byte & 0x0f]) {
            let digit = char::from(*digit);
            out.push(if nibble >= 8 {
                digit.to_ascii_uppercase()
            } else {
                digit
            });
        }
    }
    out
}

/// The PEM "PUBLIC KEY" (SubjectPublicKeyInfo) of a raw public key as
/// [`PublicKey::raw`] holds it, for keys whose PEM is not stored.
pub fn public_pem(algorithm: Algorithm, raw_public: &[u8]) -> Result<String, CustodyError> {
    use k256::pkcs8::EncodePublicKey as _;
    use k256::pkcs8::LineEnding;
    match algorithm {
        Algorithm::Ed25519 => {
            let bytes: [u8; 32] = raw_public.try_into().map_err(|_| CustodyError::Encoding)?;
            ed25519_dalek::VerifyingKey::from_bytes(&bytes)
                .map_err(|_| CustodyError::Encoding)?
                .to_public_key_pem(LineEnding::LF)
                .map_err(|_| CustodyError::Encoding)
        }
        Algorithm::Secp256k1 => k256::PublicKey::from_sec1_bytes(raw_public)
            .map_err(|_| CustodyError::Encoding)?
            .to_public_key_pem(LineEnding::LF)
            .map_err(|_| CustodyError::Encoding),
        Algorithm::P256 => p256::PublicKey::from_sec1_bytes(raw_public)
            .map_err(|_| CustodyError::Encoding)?
            .to_public_key_pem(LineEnding::LF)
            .map_err(|_| CustodyError::Encoding),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    use ed25519_dalek::pkcs8::DecodePublicKey as _;
    use p256::ecdsa::signature::hazmat::PrehashVerifier as _;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    /// RFC 8032 §7.1 TEST 1 and TEST 2: (seed, public key, message, signature).
    const RFC8032: [(&str, &str, &str, &str); 2] = [
        (
            "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
            "",
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
        ),
        (
            "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
            "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
            "72",
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00",
        ),
    ];

    /// web3.js docs: the `accounts.sign` / `privateKeyToAccount` example key.
    const WEB3_KEY: &str = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318";

    /// RFC 6979 §A.2.5: the P-256 key.
    const RFC6979_P256_KEY: &str =
        "c9afa9d845ba75166b5c215767b1d6934e50c3db36e89b127b8a622b120f6721";

    /// secp256k1 group order n and n/2.
    const SECP256K1_N: &str = "fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364141";
    const SECP256K1_HALF_N: &str =
        "7fffffffffffffffffffffffffffffff5d576e73574a501ddfe92f46681b20a0";

    fn key_of(seed: u8) -> Vec<u8> {
        Sha256::digest([seed]).to_vec()
    }

    fn message(scheme: Scheme, data: &[u8]) -> Payload<'_> {
        Payload::Message { scheme, data }
    }

    #[test]
    fn names_round_trip() {
        for a in [Algorithm::Ed25519, Algorithm::Secp256k1, Algorithm::P256] {
            assert_eq!(Algorithm::parse(a.as_str()), Some(a));
        }
        for s in [
            Scheme::Digest,
            Scheme::RawSha256,
            Scheme::Eip191PersonalSign,
            Scheme::Ed25519Pure,
        ] {
            assert_eq!(Scheme::parse(s.as_str()), Some(s));
        }
        assert_eq!(Algorithm::parse("P256"), None);
        assert_eq!(Algorithm::parse("secp256r1"), None);
        assert_eq!(Scheme::parse("eip191"), None);
        assert_eq!(Scheme::parse(""), None);
    }

    #[test]
    fn suitability_table() {
        use Algorithm::*;
        let table = [
            (Scheme::Digest, [false, true, true]),
            (Scheme::RawSha256, [false, true, true]),
            (Scheme::Eip191PersonalSign, [false, true, false]),
            (Scheme::Ed25519Pure, [true, false, false]),
        ];
        for (scheme, expected) in table {
            let got = [Ed25519, Secp256k1, P256].map(|a| scheme.suits(a));
            assert_eq!(got, expected, "{scheme}");
        }
    }

    #[test]
    fn rfc8032_vectors() {
        for (seed, public, msg, sig) in RFC8032 {
            let key = public_key(Algorithm::Ed25519, &h(seed)).unwrap();
            assert_eq!(hex::encode(&key.raw), public);
            assert_eq!(key.ethereum_address, None);
            let msg = h(msg);
            let signature = sign(
                Algorithm::Ed25519,
                &h(seed),
                &message(Scheme::Ed25519Pure, &msg),
            )
            .unwrap();
            assert_eq!(hex::encode(&signature.bytes), sig);
            assert!(signature.r.is_empty() && signature.s.is_empty());
            assert_eq!((signature.v, signature.recovery_id), (0, 0));
            assert_eq!(
                signature.payload_hash,
                <[u8; 32]>::from(Sha256::digest(&msg))
            );
        }
    }

    #[test]
    fn rfc8037_ed25519_jwk() {
        // RFC 8037 Appendix A.2: the public JWK of RFC 8032 TEST 1's key.
        let (seed, ..) = RFC8032[0];
        let key = public_key(Algorithm::Ed25519, &h(seed)).unwrap();
        let jwk: serde_json::Value =
            serde_json::from_str(&public_jwk(Algorithm::Ed25519, &key.raw, "k1").unwrap()).unwrap();
        assert_eq!(jwk["kty"], "OKP");
        assert_eq!(jwk["crv"], "Ed25519");
        assert_eq!(jwk["x"], "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo");
        assert_eq!(jwk["kid"], "k1");
        assert_eq!(jwk["use"], "sig");
        assert_eq!(jwk["alg"], "EdDSA");
        assert!(jwk.get("y").is_none() && jwk.get("d").is_none());
    }

    #[test]
    fn eip55_examples() {
        for expected in [
            "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
            "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
            "0xdbF03B407c01E7cD3CBea99509d93f8DDDC8C6FB",
            "0xD1220A0cf47c7B9Be7A2E6BA89F429762e7b9aDb",
        ] {
            let lower = expected.trim_start_matches("0x").to_ascii_lowercase();
            assert_eq!(eip55_checksum(&h(&lower)), expected);
        }
    }

    #[test]
    fn web3_known_key_address() {
        let key = public_key(Algorithm::Secp256k1, &h(WEB3_KEY)).unwrap();
        assert_eq!(
            key.ethereum_address.as_deref(),
            Some("0x2c7536E3605D9C16a7a3D7b1898e529396a65c23")
        );
        assert_eq!(key.raw.len(), 65);
        assert_eq!(key.raw.first(), Some(&0x04));
        assert_eq!(
            ethereum_address(&key.raw).unwrap(),
            "0x2c7536E3605D9C16a7a3D7b1898e529396a65c23"
        );
    }

    #[test]
    fn web3_personal_sign_vector() {
        let payload = message(Scheme::Eip191PersonalSign, b"Some data");
        assert_eq!(
            hex::encode(payload_hash(&payload).unwrap()),
            "1da44b586eb0729ff70a73c326926f6ed5a25f5b056e7f47fbc6e58d86871655"
        );
        let signature = sign(Algorithm::Secp256k1, &h(WEB3_KEY), &payload).unwrap();
        assert_eq!(
            hex::encode(signature.payload_hash),
            "1da44b586eb0729ff70a73c326926f6ed5a25f5b056e7f47fbc6e58d86871655"
        );
        assert_eq!(
            hex::encode(&signature.r),
            "b91467e570a6466aa9e9876cbcd013baba02900b8979d43fe208a4a4f339f5fd"
        );
        assert_eq!(
            hex::encode(&signature.s),
            "6007e74cd82e037b800186422fc2da167c747ef045e5d18a5f5d4300f8e1a029"
        );
        assert_eq!(signature.v, 28);
        assert_eq!(signature.recovery_id, 1);
        assert_eq!(
            hex::encode(&signature.bytes),
            "b91467e570a6466aa9e9876cbcd013baba02900b8979d43fe208a4a4f339f5fd\
             6007e74cd82e037b800186422fc2da167c747ef045e5d18a5f5d4300f8e1a0291c"
        );
    }

    #[test]
    fn eip191_hash_uses_decimal_length() {
        let data = [0xabu8; 12];
        let mut preimage = b"\x19Ethereum Signed Message:\n12".to_vec();
        preimage.extend_from_slice(&data);
        let expected: [u8; 32] = Keccak256::digest(&preimage).into();
        assert_eq!(
            payload_hash(&message(Scheme::Eip191PersonalSign, &data)).unwrap(),
            expected
        );
    }

    #[test]
    fn secp256k1_recovers_and_is_low_s() {
        let half_n = h(SECP256K1_HALF_N);
        for seed in 0..32u8 {
            let private = key_of(seed);
            let public = public_key(Algorithm::Secp256k1, &private).unwrap();
            let data = [seed; 7];
            let digest = Sha256::digest(b"some digest").to_vec();
            for payload in [
                Payload::Digest(&digest),
                message(Scheme::RawSha256, &data),
                message(Scheme::Eip191PersonalSign, &data),
            ] {
                let signature = sign(Algorithm::Secp256k1, &private, &payload).unwrap();
                assert_eq!(signature.bytes.len(), 65);
                assert_eq!(signature.r.len(), 32);
                assert_eq!(signature.s.len(), 32);
                assert!(signature.recovery_id <= 1);
                assert_eq!(signature.v, 27 + signature.recovery_id);
                assert_eq!(signature.bytes.last(), Some(&(signature.v as u8)));
                assert_eq!(&signature.bytes[..32], signature.r.as_slice());
                assert_eq!(&signature.bytes[32..64], signature.s.as_slice());
                // Big-endian, equal length: byte order is numeric order.
                assert!(signature.s <= half_n, "high s");

                let sig = k256::ecdsa::Signature::from_slice(&signature.bytes[..64]).unwrap();
                assert!(sig.normalize_s().is_none());
                let recovery_id =
                    k256::ecdsa::RecoveryId::from_byte(signature.recovery_id as u8).unwrap();
                let recovered = k256::ecdsa::VerifyingKey::recover_from_prehash(
                    &signature.payload_hash,
                    &sig,
                    recovery_id,
                )
                .unwrap();
                assert_eq!(
                    recovered.to_encoded_point(false).as_bytes(),
                    public.raw.as_slice()
                );
                recovered
                    .verify_prehash(&signature.payload_hash, &sig)
                    .unwrap();
            }
        }
    }

    #[test]
    fn rfc6979_p256_vectors() {
        // RFC 6979 §A.2.5, P-256 with SHA-256: messages "sample" and "test".
        let private = h(RFC6979_P256_KEY);
        let public = public_key(Algorithm::P256, &private).unwrap();
        assert_eq!(
            hex::encode(&public.raw),
            "0460fed4ba255a9d31c961eb74c6356d68c049b8923b61fa6ce669622e60f29fb6\
             7903fe1008b8bc99a41ae9e95628bc64f2f1b20c2d7e9f5177a3c294d4462299"
        );
        for (msg, r, s) in [
            (
                &b"sample"[..],
                "efd48b2aacb6a8fd1140dd9cd45e81d69d2c877b56aaf991c34d0ea84eaf3716",
                "f7cb1c942d657c41d436c7a1b6e29f65f3e900dbb9aff4064dc4ab2f843acda8",
            ),
            (
                &b"test"[..],
                "f1abb023518351cd71d881567b1ea663ed3efcf6c5132b354f28d3b0b7d38367",
                "019f4113742a2b14bd25926b49c649155f267e60d3814b4c0cc84250e46f0083",
            ),
        ] {
            let signature =
                sign(Algorithm::P256, &private, &message(Scheme::RawSha256, msg)).unwrap();
            assert_eq!(hex::encode(&signature.r), r);
            assert_eq!(hex::encode(&signature.s), s);
            assert_eq!(hex::encode(&signature.bytes), format!("{r}{s}"));
        }
    }

    #[test]
    fn p256_verifies_and_digest_matches_raw_sha256() {
        for seed in 0..16u8 {
            let private = key_of(seed);
            let public = public_key(Algorithm::P256, &private).unwrap();
            let verifying = p256::ecdsa::VerifyingKey::from_sec1_bytes(&public.raw).unwrap();
            let data = vec![seed; usize::from(seed) * 5];
            let digest = Sha256::digest(&data).to_vec();

            let by_digest = sign(Algorithm::P256, &private, &Payload::Digest(&digest)).unwrap();
            let by_message = sign(
                Algorithm::P256,
                &private,
                &message(Scheme::RawSha256, &data),
            )
            .unwrap();
            assert_eq!(by_digest, by_message);
            assert_eq!(by_digest.bytes.len(), 64);
            assert_eq!((by_digest.v, by_digest.recovery_id), (0, 0));
            assert_eq!(by_digest.payload_hash.as_slice(), digest.as_slice());

            let sig = p256::ecdsa::Signature::from_slice(&by_digest.bytes).unwrap();
            verifying.verify_prehash(&digest, &sig).unwrap();
            assert!(verifying.verify_prehash(&[0u8; 32], &sig).is_err());
        }
    }

    #[test]
    fn message_under_digest_scheme_is_a_digest() {
        let private = key_of(1);
        let digest = [7u8; 32];
        for algorithm in [Algorithm::Secp256k1, Algorithm::P256] {
            assert_eq!(
                sign(algorithm, &private, &message(Scheme::Digest, &digest)).unwrap(),
                sign(algorithm, &private, &Payload::Digest(&digest)).unwrap()
            );
        }
    }

    #[test]
    fn deterministic() {
        let private = key_of(9);
        let data = b"the same input";
        for (algorithm, scheme) in [
            (Algorithm::Ed25519, Scheme::Ed25519Pure),
            (Algorithm::Secp256k1, Scheme::RawSha256),
            (Algorithm::Secp256k1, Scheme::Eip191PersonalSign),
            (Algorithm::P256, Scheme::RawSha256),
        ] {
            let payload = message(scheme, data);
            let first = sign(algorithm, &private, &payload).unwrap();
            let second = sign(algorithm, &private, &payload).unwrap();
            assert_eq!(first, second, "{algorithm} {scheme}");
            let other = sign(algorithm, &private, &message(scheme, b"another")).unwrap();
            assert_ne!(first.bytes, other.bytes);
        }
    }

    #[test]
    fn digest_length_errors() {
        let private = key_of(2);
        for algorithm in [Algorithm::Secp256k1, Algorithm::P256] {
            for len in [0, 31, 33, 64] {
                let digest = vec![1u8; len];
                assert_eq!(
                    sign(algorithm, &private, &Payload::Digest(&digest)),
                    Err(CustodyError::DigestLength)
                );
                assert_eq!(
                    payload_hash(&Payload::Digest(&digest)),
                    Err(CustodyError::DigestLength)
                );
            }
        }
        assert_eq!(payload_hash(&Payload::Digest(&[3u8; 32])), Ok([3u8; 32]));
    }

    #[test]
    fn unsuited_schemes() {
        let private = key_of(3);
        assert_eq!(
            sign(
                Algorithm::P256,
                &private,
                &message(Scheme::Eip191PersonalSign, b"x")
            ),
            Err(CustodyError::Unsuited {
                scheme: "eip191_personal_sign",
                algorithm: "p256"
            })
        );
        assert_eq!(
            sign(
                Algorithm::Secp256k1,
                &private,
                &message(Scheme::Ed25519Pure, b"x")
            ),
            Err(CustodyError::Unsuited {
                scheme: "ed25519_pure",
                algorithm: "secp256k1"
            })
        );
        assert_eq!(
            sign(
                Algorithm::P256,
                &private,
                &message(Scheme::Ed25519Pure, b"x")
            ),
            Err(CustodyError::Unsuited {
                scheme: "ed25519_pure",
                algorithm: "p256"
            })
        );
        for payload in [
            Payload::Digest(&[0u8; 32]),
            Payload::Digest(&[0u8; 31]),
            message(Scheme::Digest, &[0u8; 32]),
            message(Scheme::RawSha256, b"x"),
            message(Scheme::Eip191PersonalSign, b"x"),
        ] {
            let err = sign(Algorithm::Ed25519, &private, &payload).unwrap_err();
            assert!(matches!(
                err,
                CustodyError::Unsuited {
                    algorithm: "ed25519",
                    ..
                }
            ));
        }
        assert_eq!(
            sign(Algorithm::Ed25519, &private, &Payload::Digest(&[0u8; 32])),
            Err(CustodyError::Unsuited {
                scheme: "digest",
                algorithm: "ed25519"
            })
        );
        assert_eq!(
            CustodyError::Unsuited {
                scheme: "digest",
                algorithm: "ed25519"
            }
            .to_string(),
            "scheme digest does not suit a ed25519 key"
        );
    }

    #[test]
    fn invalid_private_keys() {
        let zero = [0u8; 32];
        let order = h(SECP256K1_N);
        let p256_order = h("ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551");
        let payload = message(Scheme::RawSha256, b"x");
        for algorithm in [Algorithm::Secp256k1, Algorithm::P256] {
            assert_eq!(
                public_key(algorithm, &zero),
                Err(CustodyError::InvalidPrivateKey)
            );
            assert_eq!(
                sign(algorithm, &zero, &payload),
                Err(CustodyError::InvalidPrivateKey)
            );
            assert_eq!(
                public_key(algorithm, &[0xff; 32]),
                Err(CustodyError::InvalidPrivateKey)
            );
        }
        assert_eq!(
            public_key(Algorithm::Secp256k1, &order),
            Err(CustodyError::InvalidPrivateKey)
        );
        assert_eq!(
            public_key(Algorithm::P256, &p256_order),
            Err(CustodyError::InvalidPrivateKey)
        );
        // n - 1 is the largest valid scalar.
        let mut below = order.clone();
        *below.last_mut().unwrap() -= 1;
        assert!(public_key(Algorithm::Secp256k1, &below).is_ok());
        // Lengths other than 32 are rejected, never padded.
        for algorithm in [Algorithm::Ed25519, Algorithm::Secp256k1, Algorithm::P256] {
            for len in [0, 24, 31, 33, 64] {
                assert_eq!(
                    public_key(algorithm, &vec![1u8; len]),
                    Err(CustodyError::InvalidPrivateKey),
                    "{algorithm} {len}"
                );
            }
        }
        // Any 32 bytes are an Ed25519 seed, including zeros.
        assert!(public_key(Algorithm::Ed25519, &zero).is_ok());
    }

    #[test]
    fn ec_jwks() {
        for (algorithm, crv, alg) in [
            (Algorithm::Secp256k1, "secp256k1", "ES256K"),
            (Algorithm::P256, "P-256", "ES256"),
        ] {
            let public = public_key(algorithm, &key_of(4)).unwrap();
            let json = public_jwk(algorithm, &public.raw, "key-1").unwrap();
            let jwk: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert_eq!(jwk["kty"], "EC");
            assert_eq!(jwk["crv"], crv);
            assert_eq!(jwk["alg"], alg);
            assert_eq!(jwk["use"], "sig");
            assert_eq!(jwk["kid"], "key-1");
            assert!(jwk.get("d").is_none());
            let x = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
            let y = URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap();
            assert_eq!((x.len(), y.len()), (32, 32));
            assert_eq!([x, y].concat(), public.raw[1..]);
            assert!(!json.contains('='));
        }
    }

    #[test]
    fn jwk_escapes_kid_and_rejects_bad_keys() {
        let public = public_key(Algorithm::P256, &key_of(5)).unwrap();
        let json = public_jwk(Algorithm::P256, &public.raw, "a\"b\\c").unwrap();
        let jwk: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(jwk["kid"], "a\"b\\c");

        let mut off_curve = public.raw.clone();
        *off_curve.last_mut().unwrap() ^= 1;
        assert_eq!(
            public_jwk(Algorithm::P256, &off_curve, "k"),
            Err(CustodyError::Encoding)
        );
        assert_eq!(
            public_jwk(Algorithm::Secp256k1, &public.raw[..64], "k"),
            Err(CustodyError::Encoding)
        );
        assert_eq!(
            public_jwk(Algorithm::Ed25519, &public.raw, "k"),
            Err(CustodyError::Encoding)
        );
        assert_eq!(ethereum_address(&off_curve), Err(CustodyError::Encoding));
        assert_eq!(ethereum_address(&[]), Err(CustodyError::Encoding));
    }

    #[test]
    fn pem_round_trips() {
        let private = key_of(6);
        let ed = public_key(Algorithm::Ed25519, &private).unwrap();
        let k1 = public_key(Algorithm::Secp256k1, &private).unwrap();
        let r1 = public_key(Algorithm::P256, &private).unwrap();
        for key in [&ed, &k1, &r1] {
            assert!(key.pem.starts_with("-----BEGIN PUBLIC KEY-----\n"));
            assert!(key.pem.ends_with("-----END PUBLIC KEY-----\n"));
        }
        let ed_back = ed25519_dalek::VerifyingKey::from_public_key_pem(&ed.pem).unwrap();
        assert_eq!(ed_back.as_bytes().as_slice(), ed.raw.as_slice());
        let k1_back = k256::PublicKey::from_public_key_pem(&k1.pem).unwrap();
        assert_eq!(
            k1_back.to_encoded_point(false).as_bytes(),
            k1.raw.as_slice()
        );
        let r1_back = p256::PublicKey::from_public_key_pem(&r1.pem).unwrap();
        assert_eq!(
            r1_back.to_encoded_point(false).as_bytes(),
            r1.raw.as_slice()
        );
        // A key of one curve is not read as another.
        assert!(p256::PublicKey::from_public_key_pem(&k1.pem).is_err());
    }

    #[test]
    fn compressed_point_gives_same_address() {
        let public = public_key(Algorithm::Secp256k1, &h(WEB3_KEY)).unwrap();
        let compressed = k256::PublicKey::from_sec1_bytes(&public.raw)
            .unwrap()
            .to_encoded_point(true);
        assert_eq!(
            ethereum_address(compressed.as_bytes()).unwrap(),
            public.ethereum_address.unwrap()
        );
    }

    #[test]
    fn debug_shows_no_secret() {
        let private = h(WEB3_KEY);
        let key = SecretKey::parse(Algorithm::Secp256k1, &private).unwrap();
        let shown = format!("{key:?}");
        assert_eq!(shown, "SecretKey(secp256k1, ..)");
        let shown = format!(
            "{:?}",
            SecretKey::parse(Algorithm::Ed25519, &private).unwrap()
        );
        assert!(!shown.contains("4c08") && !shown.to_lowercase().contains("4c, 8"));
    }
}

/// Property tests: scheme and algorithm names, and every entry point fed
/// arbitrary key and payload bytes (errors, never panics).
#[cfg(test)]
mod props {
    use p256::ecdsa::signature::hazmat::PrehashVerifier as _;
    use proptest::prelude::*;

    use super::*;
    use crate::props::{CRYPTO_CASES, PURE_CASES, config};

    const ALGORITHMS: [Algorithm; 3] = [Algorithm::Ed25519, Algorithm::Secp256k1, Algorithm::P256];
    const SCHEMES: [Scheme; 4] = [
        Scheme::Digest,
        Scheme::RawSha256,
        Scheme::Eip191PersonalSign,
        Scheme::Ed25519Pure,
    ];

    fn key_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            4 => prop::collection::vec(any::<u8>(), 32),
            1 => Just(vec![0u8; 32]),
            1 => Just(vec![0xffu8; 32]),
            1 => prop::collection::vec(any::<u8>(), 0..70),
        ]
    }

    fn point_bytes() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..70),
            prop::collection::vec(any::<u8>(), 64).prop_map(|xy| [vec![4u8], xy].concat()),
            prop::collection::vec(any::<u8>(), 32).prop_map(|x| [vec![2u8], x].concat()),
        ]
    }

    proptest! {
        #![proptest_config(config(PURE_CASES))]

        #[test]
        fn names_parse_exactly(s in prop_oneof![
            "(digest|raw_sha256|eip191_personal_sign|ed25519_pure|ed25519|secp256k1|p256)".prop_map(String::from),
            "[A-Za-z0-9_ ]{0,22}".prop_map(String::from),
            any::<String>(),
        ]) {
            if let Some(scheme) = Scheme::parse(&s) {
                prop_assert_eq!(scheme.as_str(), s.as_str());
            }
            if let Some(algorithm) = Algorithm::parse(&s) {
                prop_assert_eq!(algorithm.as_str(), s.as_str());
            }
            for scheme in SCHEMES {
                prop_assert_eq!(Scheme::parse(scheme.as_str()), Some(scheme));
            }
            for algorithm in ALGORITHMS {
                prop_assert_eq!(Algorithm::parse(algorithm.as_str()), Some(algorithm));
            }
        }

        #[test]
        fn payload_hashes_never_panic(
            scheme in prop::sample::select(SCHEMES.to_vec()),
            data in prop::collection::vec(any::<u8>(), 0..80),
        ) {
            let hash = payload_hash(&Payload::Message { scheme, data: &data });
            prop_assert_eq!(hash.is_err(), scheme == Scheme::Digest && data.len() != 32);
        }
    }

    proptest! {
        #![proptest_config(config(CRYPTO_CASES))]

        #[test]
        fn signing_with_arbitrary_bytes_errs_or_verifies(
            algorithm in prop::sample::select(ALGORITHMS.to_vec()),
            scheme in prop::sample::select(SCHEMES.to_vec()),
            private in key_bytes(),
            data in prop::collection::vec(any::<u8>(), 0..64),
        ) {
            let payload = Payload::Message { scheme, data: &data };
            match sign(algorithm, &private, &payload) {
                Ok(signature) => {
                    prop_assert!(scheme.suits(algorithm));
                    let public = public_key(algorithm, &private).unwrap();
                    if algorithm == Algorithm::P256 {
                        let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&public.raw).unwrap();
                        let sig = p256::ecdsa::Signature::from_slice(&signature.bytes).unwrap();
                        prop_assert!(key.verify_prehash(&signature.payload_hash, &sig).is_ok());
                    }
                }
                Err(CustodyError::Unsuited { .. }) => prop_assert!(!scheme.suits(algorithm)),
                Err(_) => {}
            }
        }

        #[test]
        fn public_forms_of_arbitrary_bytes_never_panic(
            algorithm in prop::sample::select(ALGORITHMS.to_vec()),
            private in key_bytes(),
            point in point_bytes(),
            kid in any::<String>(),
        ) {
            if let Ok(public) = public_key(algorithm, &private) {
                prop_assert!(public_jwk(algorithm, &public.raw, &kid).is_ok());
                prop_assert_eq!(public_pem(algorithm, &public.raw).ok(), Some(public.pem));
            }
            let _ = public_jwk(algorithm, &point, &kid);
            let _ = public_pem(algorithm, &point);
            let _ = ethereum_address(&point);
        }
    }
}
