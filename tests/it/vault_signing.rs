//! Custodied signing keys (VaultService): keys created in three algorithms
//! with their public parts in every encoding; signatures checked by an
//! independent verifier stack (aws-lc for Ed25519 and P-256, libsecp256k1
//! and tiny-keccak for secp256k1 recovery, EIP-191 and Ethereum addresses),
//! never by the RustCrypto crates the server signs with; idempotent retries
//! and concurrent duplicates that sign once; the `sign:<key name>` policy
//! with ALLOW, STEP_UP (approved, denied, awaited by the SDK) and BLOCK; bad
//! input that changes nothing; disabled keys; tenant isolation and roles;
//! and a private-key ciphertext moved to another tenant's key row that does
//! not decrypt there.

use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::digest;
use aws_lc_rs::signature::{self as lc, UnparsedPublicKey, VerificationAlgorithm};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use sea_orm::ConnectionTrait;
use secp256k1::ecdsa::{RecoverableSignature, RecoveryId, Signature as Secp256k1Signature};
use secp256k1::{Message, SECP256K1};
use serde_json::Value;
use tiny_keccak::{Hasher, Keccak};
use tokio::sync::Barrier;
use tonic::Code;
use vaultguard_client::{ClientError, VaultGuardClient, pb};
use vaultguard_tests::{
    TestServer, approve_step_up, expect_code, expect_invalid, expect_reason, get_step_up,
};

use crate::policies::{add_rule, assert_id, cond, context, inbound, num, when, with_counterpart};

use pb::ErrorReason as Reason;
use pb::KeyAlgorithm as Alg;
use pb::SigningKeyState as KeyState;
use pb::SigningScheme as Scheme;
use pb::sign_request::Payload;
use pb::sign_response::Outcome;
use vaultguard_tests::Rpc;
use vaultguard_tests::calls::{disable_key, get_key};

type Op = pb::ConditionOperator;

/// Half the order of secp256k1, big-endian: a low-S signature has s <= this.
const SECP256K1_HALF_ORDER: &str =
    "7fffffffffffffffffffffffffffffff5d576e7357a4501ddfe92f46681b20a0";

/// The SubjectPublicKeyInfo DER of each algorithm up to the raw public key.
const SPKI_PREFIX_ED25519: &str = "302a300506032b6570032100";
const SPKI_PREFIX_SECP256K1: &str = "3056301006072a8648ce3d020106052b8104000a034200";
const SPKI_PREFIX_P256: &str = "3059301306072a8648ce3d020106082a8648ce3d030107034200";

// ---------------------------------------------------------------------------
// A tenant with its admin, approver and agent.

pub(crate) struct Party {
    pub(crate) tenant: pb::Tenant,
    /// `alice`, ROLE_ADMIN.
    pub(crate) admin: VaultGuardClient,
    /// `carol`, ROLE_APPROVER.
    pub(crate) approver: VaultGuardClient,
    /// The agent `bot` and a client authenticated as it.
    pub(crate) bot: pb::Agent,
    pub(crate) agent: VaultGuardClient,
}

impl Party {
    pub(crate) async fn new(server: &TestServer, slug: &str) -> Self {
        let tenant = server.create_tenant(slug).await;
        let (bot, _, agent) = server.create_agent(&tenant.id, "bot").await;
        agent.bearer().await.expect("agent token");
        let admin = server.admin(&tenant.id, "alice").await;
        let approver = server.approver(&tenant.id, "carol").await;
        Self {
            tenant,
            admin,
            approver,
            bot,
            agent,
        }
    }

    /// Creates the key `name`, which must succeed.
    pub(crate) async fn key(&self, name: &str, algorithm: Alg) -> pb::SigningKey {
        create_key(&self.admin, name, algorithm, "")
            .await
            .expect("create signing key")
    }

    /// An inbound rule of the tenant about itself (counterpart = its own id)
    /// for `sign:<key name>` with `effect` when all `conditions` hold.
    pub(crate) async fn rule(
        &self,
        key: &pb::SigningKey,
        effect: pb::Effect,
        conditions: Vec<pb::Condition>,
    ) -> pb::Rule {
        let action = format!("sign:{}", key.name);
        let rule = with_counterpart(&self.tenant.id, inbound(&action, effect));
        add_rule(&self.admin, when(conditions, rule)).await
    }

    /// The tenant lets its agents sign with `key` without a human.
    pub(crate) async fn allows(&self, key: &pb::SigningKey) -> pb::Rule {
        self.rule(key, pb::Effect::Allow, Vec::new()).await
    }

    /// `amount <= 1000` signs at once, `amount > 1000` needs an approver
    /// (the STEP_UP rule also ranks first by priority).
    async fn treasury_policy(&self, key: &pb::SigningKey) {
        let step_up = pb::Rule {
            priority: 10,
            ..when(
                vec![cond("amount", Op::Gt, num(1000.0))],
                with_counterpart(
                    &self.tenant.id,
                    inbound(&format!("sign:{}", key.name), pb::Effect::StepUp),
                ),
            )
        };
        add_rule(&self.admin, step_up).await;
        self.rule(
            key,
            pb::Effect::Allow,
            vec![cond("amount", Op::Lte, num(1000.0))],
        )
        .await;
    }

    /// The key `name`, which the tenant lets its agents sign with.
    async fn allowed_key(&self, name: &str, algorithm: Alg) -> pb::SigningKey {
        let key = self.key(name, algorithm).await;
        self.allows(&key).await;
        key
    }

    /// The key `name` under the [`Self::treasury_policy`].
    async fn treasury_key(&self, name: &str, algorithm: Alg) -> pb::SigningKey {
        let key = self.key(name, algorithm).await;
        self.treasury_policy(&key).await;
        key
    }

    /// Signs `request` as the agent, which must sign at once.
    async fn sign_now(&self, request: pb::SignRequest) -> pb::SignedPayload {
        sign_now(&self.agent, request).await
    }

    /// What the admin expects as `create_actor` and `disable_actor`.
    fn alice(&self) -> pb::Actor {
        pb::Actor {
            kind: pb::PrincipalKind::Human as i32,
            subject: "alice".to_owned(),
            tenant_id: self.tenant.id.clone(),
        }
    }
}

/// A server with the tenant `acme`.
async fn acme() -> (TestServer, Party) {
    let server = TestServer::start().await;
    let acme = Party::new(&server, "acme").await;
    (server, acme)
}

// ---------------------------------------------------------------------------
// VaultService calls.

pub(crate) async fn create_key(
    admin: &VaultGuardClient,
    name: &str,
    algorithm: Alg,
    description: &str,
) -> Result<pb::SigningKey, ClientError> {
    admin
        .create_signing_key(pb::CreateSigningKeyRequest {
            name: name.to_owned(),
            algorithm: algorithm as i32,
            description: description.to_owned(),
            disable_digest_signing: false,
        })
        .await?
        .key
        .ok_or(ClientError::MalformedResponse(
            "CreateSigningKey without key",
        ))
}

async fn list_keys(
    client: &VaultGuardClient,
    state: KeyState,
) -> Result<Vec<pb::SigningKey>, ClientError> {
    Ok(client
        .list_signing_keys(pb::ListSigningKeysRequest {
            state: state as i32,
            page: None,
        })
        .await?
        .keys)
}

/// The names ListSigningKeys shows `client` for `state`, in its order.
async fn listed_names(client: &VaultGuardClient, state: KeyState) -> Vec<String> {
    list_keys(client, state)
        .await
        .expect("list signing keys")
        .into_iter()
        .map(|key| key.name)
        .collect()
}

/// The step-up behind a Sign's STEP_UP as `approver` sees it (through the
/// PENDING delegation the answer names).
pub(crate) async fn step_up_of(
    approver: &VaultGuardClient,
    pending: &pb::SignStepUp,
) -> pb::StepUp {
    let delegation = approver
        .raw_get_delegation(pb::GetDelegationRequest {
            delegation_id: pending.delegation_id.clone(),
        })
        .await
        .expect("the approver reads the sign delegation")
        .delegation
        .expect("delegation");
    get_step_up(approver, &delegation.step_up_id)
        .await
        .expect("the approver reads the step-up")
}

/// `approver` approves the step-up behind `pending`.
pub(crate) async fn approve(approver: &VaultGuardClient, pending: &pb::SignStepUp) {
    let step_up = step_up_of(approver, pending).await;
    approve_step_up(approver, &step_up.step_up_id, &step_up.request_hash)
        .await
        .expect("approve the sign step-up");
}

// ---------------------------------------------------------------------------
// Sign requests and answers.

fn sign_digest(key_id: &str, digest: &[u8], idempotency_key: &str) -> pb::SignRequest {
    pb::SignRequest {
        key_id: key_id.to_owned(),
        payload: Some(Payload::Digest(digest.to_vec())),
        idempotency_key: idempotency_key.to_owned(),
        ..Default::default()
    }
}

pub(crate) fn sign_message(
    key_id: &str,
    data: &[u8],
    scheme: Scheme,
    idempotency_key: &str,
) -> pb::SignRequest {
    pb::SignRequest {
        key_id: key_id.to_owned(),
        payload: Some(Payload::Message(pb::SignMessage {
            data: data.to_vec(),
            scheme: scheme as i32,
        })),
        idempotency_key: idempotency_key.to_owned(),
        ..Default::default()
    }
}

/// `request` asserting `amount` to the policy.
fn for_amount(amount: f64, request: pb::SignRequest) -> pb::SignRequest {
    pb::SignRequest {
        context: context(&[("amount", num(amount))]),
        ..request
    }
}

/// The signature of a Sign answer that must have signed.
#[track_caller]
pub(crate) fn signed(response: &pb::SignResponse) -> pb::SignedPayload {
    match &response.outcome {
        Some(Outcome::Signed(payload)) => payload.clone(),
        other => panic!("expected a signature, got {other:?}"),
    }
}

/// The step-up of a Sign answer that must have stepped up.
#[track_caller]
pub(crate) fn stepped_up(response: &pb::SignResponse) -> pb::SignStepUp {
    match &response.outcome {
        Some(Outcome::StepUp(step_up)) => step_up.clone(),
        other => panic!("expected a step-up, got {other:?}"),
    }
}

#[track_caller]
pub(crate) fn outcome_of(response: &pb::SignResponse) -> pb::Decision {
    response.decision.as_ref().expect("decision").outcome()
}

/// The agent signs `request`, which the policy must allow.
pub(crate) async fn sign_now(
    agent: &VaultGuardClient,
    request: pb::SignRequest,
) -> pb::SignedPayload {
    let response = agent.sign(request).await.expect("sign");
    assert_eq!(outcome_of(&response), pb::Decision::Allow);
    signed(&response)
}

// ---------------------------------------------------------------------------
// What a refused call must leave as it was.

/// The signature rows, the rows holding a signature, and the tenant's
/// `key.signed` events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ledger {
    rows: i64,
    signed_rows: i64,
    signed_events: usize,
}

async fn ledger(server: &TestServer, tenant_id: &str) -> Ledger {
    Ledger {
        rows: server.count("signatures").await,
        // `count` appends its argument to `SELECT COUNT(*) ... FROM`.
        signed_rows: server.count("signatures WHERE signature IS NOT NULL").await,
        signed_events: server.audit_events(tenant_id, "key.signed").await.len(),
    }
}

/// Exactly `n` signature rows, each holding a signature, and `n`
/// `key.signed` events in the tenant's log.
async fn assert_signatures(server: &TestServer, tenant_id: &str, n: usize) {
    let rows = i64::try_from(n).unwrap();
    assert_eq!(
        ledger(server, tenant_id).await,
        Ledger {
            rows,
            signed_rows: rows,
            signed_events: n
        }
    );
}

/// Nothing was signed since `before` (a pending step-up may hold a row, but
/// no row holds a signature and no `key.signed` was written).
#[track_caller]
fn assert_nothing_signed(before: Ledger, now: Ledger) {
    assert_eq!(
        (now.signed_rows, now.signed_events),
        (before.signed_rows, before.signed_events),
        "something was signed"
    );
}

/// The one `key.signed` event of `payload`: it names the signature, records
/// the payload hash in hex, and never the message (`message`, when given).
async fn assert_signed_event(
    server: &TestServer,
    tenant_id: &str,
    payload: &pb::SignedPayload,
    message: Option<&[u8]>,
) {
    assert_eq!(
        server
            .audit_count(tenant_id, "key.signed", &payload.signature_id)
            .await,
        1,
        "one key.signed names {}",
        payload.signature_id
    );
    let event = server
        .audit_events(tenant_id, "key.signed")
        .await
        .into_iter()
        .find(|event| event.subject_ids.contains(&payload.signature_id))
        .expect("the key.signed event");
    let details: Value = serde_json::from_str(&event.details).expect("details JSON");
    assert_eq!(details["signature_id"], payload.signature_id.as_str());
    let logged_hash = details["payload_hash"].as_str().unwrap_or_default();
    assert!(
        logged_hash.eq_ignore_ascii_case(&hex::encode(&payload.payload_hash)),
        "payload_hash {logged_hash:?} in {details}"
    );
    if let Some(message) = message {
        for encoded in [hex::encode(message), STANDARD.encode(message)] {
            assert!(
                !event.details.contains(&encoded),
                "the payload is in the audit details"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// The independent verifier.

fn sha256(data: &[u8]) -> Vec<u8> {
    digest::digest(&digest::SHA256, data).as_ref().to_vec()
}

fn keccak256(data: &[u8]) -> [u8; 32] {
    let mut hasher = Keccak::v256();
    hasher.update(data);
    let mut out = [0; 32];
    hasher.finalize(&mut out);
    out
}

/// keccak256("\x19Ethereum Signed Message:\n" + len(message) + message).
fn eip191_hash(message: &[u8]) -> [u8; 32] {
    let mut data = format!("\x19Ethereum Signed Message:\n{}", message.len()).into_bytes();
    data.extend_from_slice(message);
    keccak256(&data)
}

/// EIP-55: a hex digit is upper case where the keccak256 of the lower-case
/// address has a nibble of 8 or more.
fn eip55(lower_hex: &str) -> String {
    let hash = keccak256(lower_hex.as_bytes());
    let checksummed: String = lower_hex
        .chars()
        .enumerate()
        .map(|(i, c)| {
            let nibble = (hash[i / 2] >> (if i % 2 == 0 { 4 } else { 0 })) & 0x0f;
            if nibble >= 8 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect();
    format!("0x{checksummed}")
}

/// The checksummed Ethereum address of an uncompressed SEC1 point.
fn ethereum_address(point: &[u8]) -> String {
    assert_eq!((point.len(), point.first()), (65, Some(&0x04)));
    eip55(&hex::encode(&keccak256(&point[1..])[12..]))
}

fn verifies(
    algorithm: &'static dyn VerificationAlgorithm,
    public_key: &[u8],
    message: &[u8],
    signature: &[u8],
) -> bool {
    UnparsedPublicKey::new(algorithm, public_key)
        .verify(message, signature)
        .is_ok()
}

/// Checks a secp256k1 signature over `hash`: the r || s || v layout,
/// v = 27 + recovery_id, low S, the public key recovered with libsecp256k1
/// equal to the key's and its address to the advertised one, and a plain
/// ECDSA verification.
#[track_caller]
fn assert_secp256k1(key: &pb::SigningKey, hash: &[u8], payload: &pb::SignedPayload) {
    assert_eq!(payload.signature.len(), 65, "r || s || v");
    assert_eq!(payload.r, payload.signature[..32]);
    assert_eq!(payload.s, payload.signature[32..64]);
    assert!(
        payload.recovery_id <= 1,
        "recovery_id {}",
        payload.recovery_id
    );
    assert_eq!(payload.v, 27 + payload.recovery_id);
    assert_eq!(u32::from(payload.signature[64]), payload.v);
    assert!(
        hex::encode(&payload.s).as_str() <= SECP256K1_HALF_ORDER,
        "s is high: {}",
        hex::encode(&payload.s)
    );
    assert_eq!(payload.payload_hash, hash);

    let message = Message::from_digest(hash.try_into().expect("a 32-byte hash"));
    let recovery_id =
        RecoveryId::try_from(i32::try_from(payload.recovery_id).unwrap()).expect("recovery id");
    let recoverable = RecoverableSignature::from_compact(&payload.signature[..64], recovery_id)
        .expect("compact signature");
    let recovered = SECP256K1
        .recover_ecdsa(&message, &recoverable)
        .expect("recover the public key")
        .serialize_uncompressed();
    assert_eq!(hex::encode(recovered), hex::encode(&key.public_key));
    assert_eq!(ethereum_address(&recovered), key.ethereum_address);

    let standard = Secp256k1Signature::from_compact(&payload.signature[..64]).expect("r || s");
    let public_key = secp256k1::PublicKey::from_slice(&key.public_key).expect("SEC1 point");
    assert_eq!(
        SECP256K1.verify_ecdsa(&message, &standard, &public_key),
        Ok(())
    );
    // The verifier is not vacuous: another hash neither verifies nor
    // recovers this key.
    let other = Message::from_digest(keccak256(b"something else"));
    assert!(
        SECP256K1
            .verify_ecdsa(&other, &standard, &public_key)
            .is_err()
    );
    assert_ne!(
        SECP256K1
            .recover_ecdsa(&other, &recoverable)
            .map(|k| k.serialize_uncompressed().to_vec())
            .unwrap_or_default(),
        key.public_key
    );
}

/// Checks a P-256 signature over SHA-256(`message`) (so also a digest-mode
/// signature of the digest SHA-256(`message`)): r || s, no recovery, and an
/// aws-lc verification against the advertised key.
#[track_caller]
fn assert_p256(key: &pb::SigningKey, message: &[u8], payload: &pb::SignedPayload) {
    assert_eq!(payload.signature.len(), 64, "r || s");
    assert_eq!(payload.r, payload.signature[..32]);
    assert_eq!(payload.s, payload.signature[32..]);
    assert_eq!((payload.v, payload.recovery_id), (0, 0));
    assert_eq!(payload.payload_hash, sha256(message));
    let p256 = &lc::ECDSA_P256_SHA256_FIXED;
    assert!(verifies(p256, &key.public_key, message, &payload.signature));
    assert!(!verifies(
        p256,
        &key.public_key,
        b"another",
        &payload.signature
    ));
}

/// Checks an Ed25519 signature of `message`: 64 bytes, no r/s/v, the
/// payload hash SHA-256(message), and an aws-lc verification.
#[track_caller]
fn assert_ed25519(key: &pb::SigningKey, message: &[u8], payload: &pb::SignedPayload) {
    assert_eq!(payload.signature.len(), 64, "R || S");
    assert!(payload.r.is_empty() && payload.s.is_empty());
    assert_eq!((payload.v, payload.recovery_id), (0, 0));
    assert_eq!(payload.payload_hash, sha256(message));
    let ed25519 = &lc::ED25519;
    assert!(verifies(
        ed25519,
        &key.public_key,
        message,
        &payload.signature
    ));
    assert!(!verifies(
        ed25519,
        &key.public_key,
        b"another",
        &payload.signature
    ));
}

/// A timestamp in milliseconds (0 when unset).
fn millis(time: Option<prost_types::Timestamp>) -> i64 {
    time.map_or(0, |t| t.seconds * 1_000 + i64::from(t.nanos) / 1_000_000)
}

/// The scheme each algorithm signs messages with in these tests.
fn native_scheme(algorithm: Alg) -> Scheme {
    match algorithm {
        Alg::Ed25519 => Scheme::Ed25519Pure,
        Alg::Secp256k1 => Scheme::Eip191PersonalSign,
        _ => Scheme::RawSha256,
    }
}

/// Checks `payload`, a signature of `message` by `key` with its native
/// scheme.
#[track_caller]
fn assert_signs_message(key: &pb::SigningKey, message: &[u8], payload: &pb::SignedPayload) {
    assert_eq!(payload.key_id, key.id);
    assert_id(&payload.signature_id, "sig_");
    assert!(payload.sign_time.is_some(), "sign_time is set");
    match key.algorithm() {
        Alg::Ed25519 => assert_ed25519(key, message, payload),
        Alg::Secp256k1 => assert_secp256k1(key, &eip191_hash(message), payload),
        _ => assert_p256(key, message, payload),
    }
}

/// Checks a key's public encodings against its raw public key: the PEM's
/// SubjectPublicKeyInfo, the JWK (members, `kid`, no private `d`) and the
/// Ethereum address, all derived here.
#[track_caller]
fn assert_public_parts(key: &pb::SigningKey) {
    let algorithm = key.algorithm();
    let (raw_len, spki_prefix, kty, crv) = match algorithm {
        Alg::Ed25519 => (32, SPKI_PREFIX_ED25519, "OKP", "Ed25519"),
        Alg::Secp256k1 => (65, SPKI_PREFIX_SECP256K1, "EC", "secp256k1"),
        Alg::P256 => (65, SPKI_PREFIX_P256, "EC", "P-256"),
        Alg::Unspecified => panic!("a key without algorithm"),
    };
    assert_eq!(key.public_key.len(), raw_len, "raw public key length");
    if raw_len == 65 {
        assert_eq!(key.public_key[0], 0x04, "an uncompressed SEC1 point");
    }

    let pem = key.public_key_pem.trim_end();
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"), "{pem}");
    let body = pem
        .strip_prefix("-----BEGIN PUBLIC KEY-----")
        .and_then(|rest| rest.strip_suffix("-----END PUBLIC KEY-----"))
        .expect("one PUBLIC KEY block");
    let der = STANDARD
        .decode(body.split_whitespace().collect::<String>())
        .expect("PEM base64");
    assert_eq!(
        hex::encode(der),
        format!("{spki_prefix}{}", hex::encode(&key.public_key)),
        "the PEM is the SubjectPublicKeyInfo of the raw key"
    );

    let jwk: Value = serde_json::from_str(&key.public_key_jwk).expect("JWK JSON");
    let member = |name: &str| {
        URL_SAFE_NO_PAD
            .decode(jwk[name].as_str().unwrap_or_else(|| panic!("JWK {name}")))
            .expect("base64url")
    };
    assert_eq!(
        (jwk["kty"].as_str(), jwk["crv"].as_str()),
        (Some(kty), Some(crv))
    );
    assert_eq!(jwk["kid"], key.id.as_str());
    assert!(jwk.get("d").is_none(), "the JWK holds a private key: {jwk}");
    if algorithm == Alg::Ed25519 {
        assert_eq!(member("x"), key.public_key);
        assert!(jwk.get("y").is_none());
    } else {
        let point = [vec![0x04], member("x"), member("y")].concat();
        assert_eq!(point, key.public_key, "JWK x and y are the raw point");
    }

    if algorithm == Alg::Secp256k1 {
        let address = &key.ethereum_address;
        assert!(
            address.len() == 42 && address.starts_with("0x"),
            "address {address}"
        );
        assert_eq!(
            *address,
            eip55(&address[2..].to_ascii_lowercase()),
            "EIP-55 checksum"
        );
        assert_eq!(*address, ethereum_address(&key.public_key));
    } else {
        assert_eq!(key.ethereum_address, "");
    }
}

// ---------------------------------------------------------------------------
// Keys.

#[tokio::test]
async fn created_keys_carry_only_their_public_parts_in_every_encoding() {
    // The verifier's own EIP-55 against the specification's example.
    assert_eq!(
        eip55("5aaeb6053f3e94c9b9a09f33669435e7ef1beaed"),
        "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
    );
    let (server, acme) = acme().await;
    let mut keys = Vec::new();
    for (name, algorithm) in [
        ("ed-key", Alg::Ed25519),
        ("k1-key", Alg::Secp256k1),
        ("p256-key", Alg::P256),
    ] {
        let key = create_key(&acme.admin, name, algorithm, "for the tests")
            .await
            .expect("create signing key");
        assert_id(&key.id, "key_");
        assert_eq!(
            (key.name.as_str(), key.algorithm(), key.state()),
            (name, algorithm, KeyState::Enabled)
        );
        assert_eq!(key.description, "for the tests");
        assert!(key.create_time.is_some());
        assert_eq!(key.create_actor, Some(acme.alice()));
        assert!(key.disable_time.is_none() && key.disable_actor.is_none());
        assert_public_parts(&key);
        assert_eq!(
            server
                .audit_count(&acme.tenant.id, "key.created", &key.id)
                .await,
            1
        );
        keys.push(key);
    }
    assert_ne!(keys[1].public_key, keys[2].public_key);

    // The SDK's public_key, GetSigningKey and ListSigningKeys (admin and
    // agent, by name, with the state filter) all show the same keys.
    for key in &keys {
        assert_eq!(&acme.agent.public_key(&key.id).await.unwrap(), key);
        assert_eq!(&get_key(&acme.admin, &key.id).await.unwrap(), key);
    }
    for client in [&acme.admin, &acme.agent] {
        for state in [KeyState::Unspecified, KeyState::Enabled] {
            assert_eq!(list_keys(client, state).await.unwrap(), keys);
        }
        assert!(
            list_keys(client, KeyState::Disabled)
                .await
                .unwrap()
                .is_empty()
        );
    }

    // The advertised public key is the signing key's: each one verifies a
    // signature it made.
    for key in &keys {
        acme.allows(key).await;
        let message = format!("proof of possession by {}", key.name).into_bytes();
        let scheme = native_scheme(key.algorithm());
        let payload = acme
            .sign_now(sign_message(&key.id, &message, scheme, "pop"))
            .await;
        assert_signs_message(key, &message, &payload);
        assert_signed_event(&server, &acme.tenant.id, &payload, Some(&message)).await;
    }
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Signatures, verified independently.

#[tokio::test]
async fn ed25519_signs_the_message_itself() {
    let (server, acme) = acme().await;
    let key = acme.allowed_key("ed-key", Alg::Ed25519).await;
    let message = b"attest: build 4711 is ours";
    let first = acme
        .sign_now(sign_message(&key.id, message, Scheme::Ed25519Pure, "ed-1"))
        .await;
    assert_signs_message(&key, message, &first);
    assert_signed_event(&server, &acme.tenant.id, &first, Some(message)).await;

    // Ed25519 is deterministic: another request signs the same bytes as a
    // new signature record.
    let second = acme
        .sign_now(sign_message(&key.id, message, Scheme::Ed25519Pure, "ed-2"))
        .await;
    assert_eq!(second.signature, first.signature);
    assert_ne!(second.signature_id, first.signature_id);
    assert_signatures(&server, &acme.tenant.id, 2).await;
    server.stop().await;
}

#[tokio::test]
async fn p256_signs_messages_and_digests_verifiably() {
    let (server, acme) = acme().await;
    let key = acme.allowed_key("p256-key", Alg::P256).await;

    let message = b"POST /v1/payments amount=12.00";
    let of_message = acme
        .sign_now(sign_message(&key.id, message, Scheme::RawSha256, "p-msg"))
        .await;
    assert_signs_message(&key, message, &of_message);
    assert_signed_event(&server, &acme.tenant.id, &of_message, Some(message)).await;

    // A digest is signed as is: ECDSA over the digest SHA-256(m) is
    // ECDSA-SHA256 over m, which aws-lc verifies.
    let preimage = b"a document hashed by the caller";
    let digest = sha256(preimage);
    let of_digest = acme.sign_now(sign_digest(&key.id, &digest, "p-dig")).await;
    assert_p256(&key, preimage, &of_digest);
    assert_eq!(of_digest.payload_hash, digest);
    assert_signed_event(&server, &acme.tenant.id, &of_digest, None).await;

    // RFC 6979: the message whose SHA-256 is that digest signs to the same
    // r || s.
    let same = acme
        .sign_now(sign_message(&key.id, preimage, Scheme::RawSha256, "p-same"))
        .await;
    assert_eq!(same.signature, of_digest.signature);
    assert_eq!(same.payload_hash, of_digest.payload_hash);
    server.stop().await;
}

#[tokio::test]
async fn secp256k1_digest_signatures_recover_to_the_advertised_address() {
    let (server, acme) = acme().await;
    let key = acme.allowed_key("eth-hot", Alg::Secp256k1).await;
    let digest = keccak256(b"an unsigned transaction, RLP-encoded elsewhere");
    let payload = acme.sign_now(sign_digest(&key.id, &digest, "tx-1")).await;
    assert_eq!(payload.key_id, key.id);
    assert_id(&payload.signature_id, "sig_");
    assert_secp256k1(&key, &digest, &payload);
    assert_signed_event(&server, &acme.tenant.id, &payload, None).await;

    // RFC 6979: the same digest under another idempotency key signs the
    // same bytes.
    let again = acme.sign_now(sign_digest(&key.id, &digest, "tx-2")).await;
    assert_eq!(again.signature, payload.signature);
    assert_ne!(again.signature_id, payload.signature_id);
    server.stop().await;
}

#[tokio::test]
async fn secp256k1_personal_sign_follows_eip191() {
    let (server, acme) = acme().await;
    let key = acme.allowed_key("eth-login", Alg::Secp256k1).await;
    let message = b"Sign in to example.org\nNonce: 8f3c2a";
    let payload = acme
        .sign_now(sign_message(
            &key.id,
            message,
            Scheme::Eip191PersonalSign,
            "login-1",
        ))
        .await;
    // The EIP-191 hash computed here is the payload hash, and the signature
    // over it recovers the advertised address.
    let hash = eip191_hash(message);
    assert_eq!(payload.payload_hash, hash);
    assert_secp256k1(&key, &hash, &payload);
    assert_signed_event(&server, &acme.tenant.id, &payload, Some(message)).await;

    // RAW_SHA256 also suits secp256k1: the hash is SHA-256 of the message.
    let raw = acme
        .sign_now(sign_message(
            &key.id,
            message,
            Scheme::RawSha256,
            "login-raw",
        ))
        .await;
    assert_secp256k1(&key, &sha256(message), &raw);
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Idempotency.

#[tokio::test]
async fn a_retry_returns_the_stored_signature_and_another_payload_conflicts() {
    let (server, acme) = acme().await;
    let key = acme.allowed_key("eth-hot", Alg::Secp256k1).await;
    let digest = keccak256(b"transfer 1 ETH");
    let request = pb::SignRequest {
        binding_message: "transfer 1 ETH".to_owned(),
        ..for_amount(1.0, sign_digest(&key.id, &digest, "retry-me"))
    };
    let first = acme.sign_now(request.clone()).await;
    assert_secp256k1(&key, &digest, &first);

    server.clock.advance(5_000);
    let retried = acme.sign_now(request.clone()).await;
    assert_eq!(retried, first, "the stored signature, same id and time");
    assert_signatures(&server, &acme.tenant.id, 1).await;

    // The same key with anything else conflicts and signs nothing.
    let conflicts = [
        sign_digest(&key.id, &keccak256(b"transfer 2 ETH"), "retry-me"),
        pb::SignRequest {
            context: context(&[("amount", num(2.0))]),
            ..request.clone()
        },
        pb::SignRequest {
            binding_message: "something else".to_owned(),
            ..request.clone()
        },
        sign_message(
            &key.id,
            b"transfer 1 ETH",
            Scheme::Eip191PersonalSign,
            "retry-me",
        ),
    ];
    for conflicting in conflicts {
        let metadata = expect_reason(
            acme.agent.sign(conflicting).await,
            Code::AlreadyExists,
            Reason::IdempotencyConflict,
        );
        assert_eq!(
            metadata.get("idempotency_key").map(String::as_str),
            Some("retry-me")
        );
    }
    assert_signatures(&server, &acme.tenant.id, 1).await;

    // The key is scoped to the agent: another agent's same key is its own.
    let (_, _, other_agent) = server.create_agent(&acme.tenant.id, "bot-2").await;
    let other = sign_now(
        &other_agent,
        sign_digest(&key.id, &keccak256(b"transfer 3 ETH"), "retry-me"),
    )
    .await;
    assert_ne!(other.signature_id, first.signature_id);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_duplicates_sign_once() {
    const CALLS: usize = 20;
    let (server, acme) = acme().await;
    let key = acme.allowed_key("p256-key", Alg::P256).await;
    let message = b"one payload, twenty callers";
    let request = sign_message(&key.id, message, Scheme::RawSha256, "together");

    let start = Arc::new(Barrier::new(CALLS));
    let calls: Vec<_> = (0..CALLS)
        .map(|_| {
            let (agent, request, start) = (acme.agent.clone(), request.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                // ABORTED (a concurrent writer, as SQLite reports it) is
                // retryable by contract; anything else is the answer.
                for _ in 0..20 {
                    match agent.sign(request.clone()).await {
                        Err(err) if err.code() == Some(Code::Aborted) => {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        other => return other,
                    }
                }
                agent.sign(request).await
            })
        })
        .collect();
    let mut answers = Vec::new();
    for call in calls {
        let response = call
            .await
            .unwrap()
            .expect("every caller gets the signature");
        answers.push(signed(&response));
    }
    assert_signs_message(&key, message, &answers[0]);
    assert!(
        answers.iter().all(|answer| *answer == answers[0]),
        "20 identical answers"
    );
    assert_signatures(&server, &acme.tenant.id, 1).await;
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Policy.

#[tokio::test]
async fn without_an_inbound_rule_about_itself_nothing_is_signed() {
    let (server, acme) = acme().await;
    let key = acme.key("treasury", Alg::Secp256k1).await;
    // A rule about another tenant is no rule about acme itself.
    let globex = server.create_tenant("globex").await;
    add_rule(
        &acme.admin,
        with_counterpart(&globex.id, inbound("sign:treasury", pb::Effect::Allow)),
    )
    .await;
    let before = ledger(&server, &acme.tenant.id).await;
    let metadata = expect_reason(
        acme.agent
            .sign(sign_digest(&key.id, &keccak256(b"tx"), "no-rule"))
            .await,
        Code::PermissionDenied,
        Reason::NoMatchingRule,
    );
    assert_eq!(
        metadata.get("policy_side").map(String::as_str),
        Some("inbound")
    );
    assert_eq!(metadata.get("rule_id").map(String::as_str), Some(""));
    assert_eq!(ledger(&server, &acme.tenant.id).await, before);
    server.stop().await;
}

#[tokio::test]
async fn a_block_rule_refuses_to_sign() {
    let (server, acme) = acme().await;
    let key = acme.allowed_key("treasury", Alg::P256).await;
    let block = pb::Rule {
        priority: 5,
        ..with_counterpart(&acme.tenant.id, inbound("sign:treasury", pb::Effect::Block))
    };
    let block = add_rule(&acme.admin, block).await;
    let before = ledger(&server, &acme.tenant.id).await;
    let metadata = expect_reason(
        acme.agent
            .sign(sign_message(&key.id, b"pay", Scheme::RawSha256, "blocked"))
            .await,
        Code::PermissionDenied,
        Reason::PolicyBlocked,
    );
    assert_eq!(
        metadata.get("policy_side").map(String::as_str),
        Some("inbound")
    );
    assert_eq!(metadata.get("rule_id"), Some(&block.id));
    assert_eq!(ledger(&server, &acme.tenant.id).await, before);
    server.stop().await;
}

#[tokio::test]
async fn large_amounts_wait_for_an_approver_and_then_sign_once() {
    let (server, acme) = acme().await;
    let key = acme.treasury_key("treasury", Alg::Secp256k1).await;

    // A small amount signs at once.
    let small = acme
        .sign_now(for_amount(
            50.0,
            sign_digest(&key.id, &keccak256(b"pay 50"), "pay-50"),
        ))
        .await;
    assert_secp256k1(&key, &keccak256(b"pay 50"), &small);

    // A large one waits for a human; nothing is signed yet, and asking again
    // while it waits returns the same step-up.
    let message = b"pay 5000 to vendor 17";
    let request = pb::SignRequest {
        binding_message: "pay 5000 to vendor 17".to_owned(),
        ..for_amount(
            5000.0,
            sign_message(&key.id, message, Scheme::Eip191PersonalSign, "pay-5000"),
        )
    };
    let before = ledger(&server, &acme.tenant.id).await;
    let response = acme.agent.sign(request.clone()).await.unwrap();
    assert_eq!(outcome_of(&response), pb::Decision::StepUp);
    let pending = stepped_up(&response);
    assert!(!pending.auth_req_id.is_empty());
    assert_id(&pending.delegation_id, "dlg_");
    assert!(
        pending.expires_in > 0 && pending.interval > 0,
        "{pending:?}"
    );
    assert_nothing_signed(before, ledger(&server, &acme.tenant.id).await);
    let again = stepped_up(&acme.agent.sign(request.clone()).await.unwrap());
    assert_eq!(
        (&again.auth_req_id, &again.delegation_id),
        (&pending.auth_req_id, &pending.delegation_id)
    );
    assert_nothing_signed(before, ledger(&server, &acme.tenant.id).await);

    // The approver sees what it approves.
    let step_up = step_up_of(&acme.approver, &pending).await;
    assert_eq!(step_up.action, "sign:treasury");
    assert_eq!(step_up.requesting_agent_id, acme.bot.id);
    assert_eq!(step_up.binding_message, "pay 5000 to vendor 17");
    assert_eq!(step_up.context.get("amount"), Some(&num(5000.0)));
    approve(&acme.approver, &pending).await;

    // The same Sign now signs, and a retry returns the same bytes.
    let payload = signed(&acme.agent.sign(request.clone()).await.unwrap());
    assert_signs_message(&key, message, &payload);
    assert_signed_event(&server, &acme.tenant.id, &payload, Some(message)).await;
    let retried = signed(&acme.agent.sign(request.clone()).await.unwrap());
    assert_eq!(retried, payload);
    // The small payment and this one.
    assert_signatures(&server, &acme.tenant.id, 2).await;

    // The approval covered exactly that request: a new one waits again.
    let next = stepped_up(
        &acme
            .agent
            .sign(pb::SignRequest {
                idempotency_key: "pay-5000-again".to_owned(),
                ..request
            })
            .await
            .unwrap(),
    );
    assert_ne!(next.auth_req_id, pending.auth_req_id);
    assert_ne!(next.delegation_id, pending.delegation_id);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sign_and_wait_signs_after_the_approval_in_one_call() {
    let (server, acme) = acme().await;
    let key = acme.treasury_key("treasury", Alg::P256).await;
    let message = b"wire 25000 EUR";
    let request = for_amount(
        25_000.0,
        sign_message(&key.id, message, Scheme::RawSha256, "wire-1"),
    );
    let waiting = {
        let (agent, request) = (acme.agent.clone(), request.clone());
        tokio::spawn(async move { agent.sign_and_wait(request, Duration::from_secs(60)).await })
    };

    // The approver finds the step-up in its queue once the SDK asked.
    let mut queued = None;
    for _ in 0..200 {
        let step_ups = acme
            .approver
            .list_pending_step_ups(pb::ListPendingStepUpsRequest {
                action: "sign:treasury".to_owned(),
                ..Default::default()
            })
            .await
            .unwrap()
            .step_ups;
        if let Some(step_up) = step_ups.into_iter().next() {
            queued = Some(step_up);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let step_up = queued.expect("the sign step-up reaches the approvers' queue");
    assert!(
        !waiting.is_finished(),
        "sign_and_wait returned before the approval"
    );
    approve_step_up(&acme.approver, &step_up.step_up_id, &step_up.request_hash)
        .await
        .unwrap();

    let payload = waiting.await.unwrap().expect("sign_and_wait signs");
    assert_signs_message(&key, message, &payload);
    assert_signed_event(&server, &acme.tenant.id, &payload, Some(message)).await;
    assert_eq!(
        signed(&acme.agent.sign(request).await.unwrap()),
        payload,
        "a retry returns the signature sign_and_wait got"
    );
    assert_signatures(&server, &acme.tenant.id, 1).await;
    server.stop().await;
}

#[tokio::test]
async fn a_denied_step_up_signs_nothing() {
    let (server, acme) = acme().await;
    let key = acme.treasury_key("treasury", Alg::Ed25519).await;
    let request = for_amount(
        9000.0,
        sign_message(&key.id, b"release 9000", Scheme::Ed25519Pure, "deny-me"),
    );
    let before = ledger(&server, &acme.tenant.id).await;
    let pending = stepped_up(&acme.agent.sign(request.clone()).await.unwrap());
    let step_up = step_up_of(&acme.approver, &pending).await;
    vaultguard_tests::calls::deny(&acme.approver, &step_up.step_up_id, "not this quarter")
        .await
        .unwrap();

    let mut refusals = Vec::new();
    for _ in 0..2 {
        refusals.push(expect_reason(
            acme.agent.sign(request.clone()).await,
            Code::PermissionDenied,
            Reason::AccessDenied,
        ));
    }
    assert_nothing_signed(before, ledger(&server, &acme.tenant.id).await);
    // ERROR_REASON_ACCESS_DENIED carries the CIBA error (common.proto).
    for metadata in refusals {
        assert_eq!(
            metadata.get("ciba_error").map(String::as_str),
            Some("access_denied")
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn an_expired_step_up_signs_nothing() {
    let (server, acme) = acme().await;
    let key = acme.treasury_key("treasury", Alg::P256).await;
    let request = for_amount(
        4000.0,
        sign_message(&key.id, b"release 4000", Scheme::RawSha256, "too-late"),
    );
    let before = ledger(&server, &acme.tenant.id).await;
    let pending = stepped_up(&acme.agent.sign(request.clone()).await.unwrap());
    server
        .clock
        .advance((i64::from(pending.expires_in) + 1) * 1_000);

    let refused = expect_reason(
        acme.agent.sign(request).await,
        Code::FailedPrecondition,
        Reason::ExpiredToken,
    );
    assert_nothing_signed(before, ledger(&server, &acme.tenant.id).await);
    // ERROR_REASON_EXPIRED_TOKEN carries the CIBA error (common.proto).
    assert_eq!(
        refused.get("ciba_error").map(String::as_str),
        Some("expired_token")
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Bad input.

#[tokio::test]
async fn bad_sign_requests_change_nothing() {
    let (server, acme) = acme().await;
    let ed = acme.key("ed-key", Alg::Ed25519).await;
    let k1 = acme.key("k1-key", Alg::Secp256k1).await;
    let p256 = acme.key("p256-key", Alg::P256).await;
    for key in [&ed, &k1, &p256] {
        acme.allows(key).await;
    }
    let digest = |len: usize| sign_digest(&k1.id, &vec![7; len], "bad");
    let message = |key: &pb::SigningKey, data: &[u8], scheme: Scheme| {
        sign_message(&key.id, data, scheme, "bad")
    };
    let keyed = |idempotency_key: &str| pb::SignRequest {
        idempotency_key: idempotency_key.to_owned(),
        ..digest(32)
    };
    let cases = [
        ("digest", digest(31)),
        ("digest", digest(33)),
        // An empty digest is a payload that is set (proto3 oneof presence).
        ("digest|payload", digest(0)),
        ("digest", sign_digest(&p256.id, &[7; 31], "bad")),
        ("digest|payload", sign_digest(&ed.id, &[7; 32], "bad")),
        (
            "message.data",
            message(&p256, &vec![1; 64 * 1024 + 1], Scheme::RawSha256),
        ),
        ("message.data", message(&p256, b"", Scheme::RawSha256)),
        ("message.scheme", message(&p256, b"hi", Scheme::Unspecified)),
        (
            "message.scheme",
            message(&p256, b"hi", Scheme::Eip191PersonalSign),
        ),
        ("message.scheme", message(&p256, b"hi", Scheme::Ed25519Pure)),
        ("message.scheme", message(&k1, b"hi", Scheme::Ed25519Pure)),
        ("message.scheme", message(&ed, b"hi", Scheme::RawSha256)),
        (
            "message.scheme",
            message(&ed, b"hi", Scheme::Eip191PersonalSign),
        ),
        (
            "payload",
            pb::SignRequest {
                payload: None,
                ..digest(32)
            },
        ),
        ("idempotency_key", keyed("")),
        ("idempotency_key", keyed("has space")),
        ("idempotency_key", keyed("ключ")),
        ("idempotency_key", keyed(&"k".repeat(129))),
        (
            "key_id",
            pb::SignRequest {
                key_id: String::new(),
                ..digest(32)
            },
        ),
        (
            "key_id",
            pb::SignRequest {
                key_id: "not-a-key".to_owned(),
                ..digest(32)
            },
        ),
        (
            "key_id",
            pb::SignRequest {
                key_id: format!("key_{}", "Z".repeat(32)),
                ..digest(32)
            },
        ),
        (
            "binding_message",
            pb::SignRequest {
                binding_message: "x".repeat(257),
                ..digest(32)
            },
        ),
        (
            "context.vg_payload_hash|context",
            pb::SignRequest {
                context: context(&[("vg_payload_hash", num(1.0))]),
                ..digest(32)
            },
        ),
    ];
    let before = ledger(&server, &acme.tenant.id).await;
    for (field, request) in cases {
        expect_invalid(acme.agent.raw_sign(request).await, field);
        assert_eq!(ledger(&server, &acme.tenant.id).await, before, "{field}");
    }

    // A well-formed id of no key.
    let unknown = pb::SignRequest {
        key_id: format!("key_{}", "0".repeat(32)),
        ..digest(32)
    };
    expect_code(acme.agent.raw_sign(unknown).await, Code::NotFound);
    assert_eq!(ledger(&server, &acme.tenant.id).await, before);

    // The limits are inclusive: 64 KiB and a 256-character binding message
    // sign.
    let largest = pb::SignRequest {
        binding_message: "x".repeat(256),
        ..message(&p256, &vec![1; 64 * 1024], Scheme::RawSha256)
    };
    let payload = acme.sign_now(largest).await;
    assert_signs_message(&p256, &vec![1; 64 * 1024], &payload);
    assert_eq!(
        ledger(&server, &acme.tenant.id).await,
        Ledger {
            rows: before.rows + 1,
            signed_rows: before.signed_rows + 1,
            signed_events: before.signed_events + 1
        }
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_key_requests_are_refused_and_names_stay_taken() {
    let (server, acme) = acme().await;
    let (long_name, long_description) = ("a".repeat(65), "d".repeat(513));
    let cases = [
        ("name", "", Alg::P256, ""),
        ("name", "Treasury", Alg::P256, ""),
        ("name", "9lives", Alg::P256, ""),
        ("name", "-dash", Alg::P256, ""),
        ("name", "has space", Alg::P256, ""),
        ("name", "under_score", Alg::P256, ""),
        ("name", long_name.as_str(), Alg::P256, ""),
        ("algorithm", "treasury", Alg::Unspecified, ""),
        (
            "description",
            "treasury",
            Alg::P256,
            long_description.as_str(),
        ),
    ];
    for (field, name, algorithm, description) in cases {
        expect_invalid(
            create_key(&acme.admin, name, algorithm, description).await,
            field,
        );
    }
    let unknown_algorithm = acme
        .admin
        .request(pb::CreateSigningKeyRequest {
            name: "treasury".to_owned(),
            algorithm: 99,
            description: String::new(),
            disable_digest_signing: false,
        })
        .await
        .unwrap();
    expect_invalid(
        acme.admin
            .vault()
            .create_signing_key(unknown_algorithm)
            .await,
        "algorithm",
    );
    assert_eq!(server.count("custody_keys").await, 0);
    assert_eq!(
        server
            .audit_events(&acme.tenant.id, "key.created")
            .await
            .len(),
        0
    );

    // The limits are inclusive.
    let longest = "a".repeat(64);
    create_key(&acme.admin, &longest, Alg::Ed25519, &"d".repeat(512))
        .await
        .expect("64-character name, 512-character description");

    // A name is the tenant's once, also after its key is disabled, whatever
    // the algorithm.
    let key = acme.key("treasury", Alg::Secp256k1).await;
    for algorithm in [Alg::Secp256k1, Alg::Ed25519] {
        expect_code(
            create_key(&acme.admin, "treasury", algorithm, "").await,
            Code::AlreadyExists,
        );
    }
    disable_key(&acme.admin, &key.id).await.unwrap();
    expect_code(
        create_key(&acme.admin, "treasury", Alg::Secp256k1, "").await,
        Code::AlreadyExists,
    );
    assert_eq!(server.count("custody_keys").await, 2);
    assert_eq!(
        server
            .audit_events(&acme.tenant.id, "key.created")
            .await
            .len(),
        2
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Disabling.

#[tokio::test]
async fn a_disabled_key_never_signs_again() {
    let (server, acme) = acme().await;
    let key = acme.key("old-key", Alg::P256).await;
    let kept = acme.key("new-key", Alg::P256).await;
    acme.allows(&key).await;
    let request = sign_message(&key.id, b"before", Scheme::RawSha256, "before");
    let earlier = acme.sign_now(request.clone()).await;

    server.clock.advance(1_000);
    let disabled = disable_key(&acme.admin, &key.id).await.unwrap();
    assert_eq!(disabled.state(), KeyState::Disabled);
    assert!(
        millis(disabled.disable_time) >= millis(disabled.create_time) + 1_000,
        "disabled after the clock moved on"
    );
    assert_eq!(disabled.disable_actor, Some(acme.alice()));
    // Everything public stays as it was.
    assert_eq!(
        pb::SigningKey {
            state: KeyState::Enabled as i32,
            disable_time: None,
            disable_actor: None,
            ..disabled.clone()
        },
        key
    );
    assert_eq!(get_key(&acme.agent, &key.id).await.unwrap(), disabled);
    assert_eq!(
        server
            .audit_count(&acme.tenant.id, "key.disabled", &key.id)
            .await,
        1
    );
    for client in [&acme.admin, &acme.agent] {
        assert_eq!(listed_names(client, KeyState::Disabled).await, ["old-key"]);
        assert_eq!(listed_names(client, KeyState::Enabled).await, ["new-key"]);
        assert_eq!(
            listed_names(client, KeyState::Unspecified).await,
            ["new-key", "old-key"]
        );
    }

    // Disabling again is refused and changes nothing.
    let metadata = expect_reason(
        disable_key(&acme.admin, &key.id).await,
        Code::FailedPrecondition,
        Reason::KeyDisabled,
    );
    assert_eq!(metadata.get("key_id"), Some(&key.id));
    assert_eq!(get_key(&acme.admin, &key.id).await.unwrap(), disabled);
    assert_eq!(
        server
            .audit_count(&acme.tenant.id, "key.disabled", &key.id)
            .await,
        1
    );

    // New requests are refused and sign nothing.
    let before = ledger(&server, &acme.tenant.id).await;
    for request in [
        sign_message(&key.id, b"after", Scheme::RawSha256, "after"),
        sign_digest(&key.id, &sha256(b"after"), "after-digest"),
    ] {
        let metadata = expect_reason(
            acme.agent.sign(request).await,
            Code::FailedPrecondition,
            Reason::KeyDisabled,
        );
        assert_eq!(metadata.get("key_id"), Some(&key.id));
        assert_eq!(ledger(&server, &acme.tenant.id).await, before);
    }
    // A retry of a request signed before the key was disabled never signs
    // anew: it is refused, or it replays the stored signature (the contract
    // reads either way: "KEY_DISABLED from then on" and "the same key ...
    // returns the stored result").
    match acme.agent.sign(request).await {
        Ok(response) => assert_eq!(signed(&response), earlier),
        refused => {
            expect_reason(refused, Code::FailedPrecondition, Reason::KeyDisabled);
        }
    }
    assert_eq!(ledger(&server, &acme.tenant.id).await, before);
    assert_eq!(get_key(&acme.admin, &kept.id).await.unwrap(), kept);
    server.stop().await;
}

#[tokio::test]
async fn an_approved_step_up_for_a_key_disabled_meanwhile_signs_nothing() {
    let (server, acme) = acme().await;
    let key = acme.treasury_key("treasury", Alg::Secp256k1).await;
    let request = for_amount(
        7500.0,
        sign_digest(&key.id, &keccak256(b"drain"), "waiting"),
    );
    let before = ledger(&server, &acme.tenant.id).await;
    let pending = stepped_up(&acme.agent.sign(request.clone()).await.unwrap());
    approve(&acme.approver, &pending).await;
    disable_key(&acme.admin, &key.id).await.unwrap();

    let metadata = expect_reason(
        acme.agent.sign(request).await,
        Code::FailedPrecondition,
        Reason::KeyDisabled,
    );
    assert_eq!(metadata.get("key_id"), Some(&key.id));
    assert_nothing_signed(before, ledger(&server, &acme.tenant.id).await);
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Tenants and roles.

#[tokio::test]
async fn another_tenants_keys_are_not_found() {
    let server = TestServer::start().await;
    let acme = Party::new(&server, "acme").await;
    let globex = Party::new(&server, "globex").await;
    let theirs = acme.key("treasury", Alg::Secp256k1).await;
    acme.allows(&theirs).await;
    // Globex has a key of the same name and lets its agents sign anything.
    let ours = globex.key("treasury", Alg::Secp256k1).await;
    add_rule(
        &globex.admin,
        with_counterpart(&globex.tenant.id, inbound("*", pb::Effect::Allow)),
    )
    .await;
    let acme_before = ledger(&server, &acme.tenant.id).await;
    let globex_before = ledger(&server, &globex.tenant.id).await;

    expect_code(
        globex
            .agent
            .sign(sign_digest(&theirs.id, &keccak256(b"steal"), "steal"))
            .await,
        Code::NotFound,
    );
    for client in [&globex.admin, &globex.agent] {
        expect_code(get_key(client, &theirs.id).await, Code::NotFound);
        assert_eq!(
            list_keys(client, KeyState::Unspecified).await.unwrap(),
            std::slice::from_ref(&ours)
        );
    }
    expect_code(globex.agent.public_key(&theirs.id).await, Code::NotFound);
    expect_code(disable_key(&globex.admin, &theirs.id).await, Code::NotFound);
    assert_eq!(get_key(&acme.admin, &theirs.id).await.unwrap(), theirs);
    assert_eq!(ledger(&server, &acme.tenant.id).await, acme_before);
    assert_eq!(ledger(&server, &globex.tenant.id).await, globex_before);

    // Each tenant signs with its own key only.
    let digest = keccak256(b"mine");
    let signed_by_acme = acme
        .sign_now(sign_digest(&theirs.id, &digest, "mine"))
        .await;
    assert_secp256k1(&theirs, &digest, &signed_by_acme);
    let signed_by_globex = sign_now(&globex.agent, sign_digest(&ours.id, &digest, "mine")).await;
    assert_secp256k1(&ours, &digest, &signed_by_globex);
    assert_ne!(theirs.ethereum_address, ours.ethereum_address);
    server.stop().await;
}

#[tokio::test]
async fn each_role_calls_only_its_own_rpcs() {
    let (server, acme) = acme().await;
    let key = acme.allowed_key("treasury", Alg::Ed25519).await;
    let request = sign_message(&key.id, b"hello", Scheme::Ed25519Pure, "roles");
    let role_required = |result: Result<_, ClientError>| {
        expect_reason(result, Code::PermissionDenied, Reason::RoleRequired);
    };

    // Agents neither create nor disable keys.
    role_required(
        create_key(&acme.agent, "agent-key", Alg::Ed25519, "")
            .await
            .map(|_| ()),
    );
    role_required(disable_key(&acme.agent, &key.id).await.map(|_| ()));
    // Humans never sign, whatever their role.
    let auditor = server
        .human(&acme.tenant.id, "dave", &[pb::Role::Auditor])
        .await;
    for human in [&acme.admin, &acme.approver, &auditor] {
        role_required(human.raw_sign(request.clone()).await.map(|_| ()));
    }
    // Only admins and agents read keys; the operator touches none.
    let operator = server.operator().await;
    for outsider in [&acme.approver, &auditor, &operator] {
        role_required(get_key(outsider, &key.id).await.map(|_| ()));
        role_required(list_keys(outsider, KeyState::Unspecified).await.map(|_| ()));
    }
    role_required(
        create_key(&operator, "op-key", Alg::Ed25519, "")
            .await
            .map(|_| ()),
    );

    assert_eq!(server.count("custody_keys").await, 1);
    assert_eq!(get_key(&acme.admin, &key.id).await.unwrap(), key);
    assert_signatures(&server, &acme.tenant.id, 0).await;
    // The agent does sign.
    let payload = acme.sign_now(request).await;
    assert_signs_message(&key, b"hello", &payload);
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Encryption at rest.

#[tokio::test]
async fn a_private_key_ciphertext_moved_to_another_tenants_key_does_not_decrypt() {
    let server = TestServer::start().await;
    let acme = Party::new(&server, "acme").await;
    let globex = Party::new(&server, "globex").await;
    let theirs = acme.key("treasury", Alg::Secp256k1).await;
    let ours = globex.key("treasury", Alg::Secp256k1).await;
    acme.allows(&theirs).await;
    globex.allows(&ours).await;

    // The row of globex's key now holds acme's encrypted private key.
    let moved = server
        .state
        .db
        .execute_unprepared(&format!(
            "UPDATE custody_keys SET private_key_ciphertext = \
             (SELECT private_key_ciphertext FROM custody_keys WHERE id = '{}') \
             WHERE id = '{}'",
            theirs.id, ours.id
        ))
        .await
        .expect("move the ciphertext");
    assert_eq!(moved.rows_affected(), 1);

    let before = ledger(&server, &globex.tenant.id).await;
    let acme_before = ledger(&server, &acme.tenant.id).await;
    let digest = keccak256(b"sign with the stolen key");
    expect_code(
        globex
            .agent
            .sign(sign_digest(&ours.id, &digest, "moved"))
            .await,
        Code::Internal,
    );
    assert_nothing_signed(before, ledger(&server, &globex.tenant.id).await);
    assert_eq!(ledger(&server, &acme.tenant.id).await, acme_before);

    // Acme's key, whose row is untouched, still signs.
    let payload = acme
        .sign_now(sign_digest(&theirs.id, &digest, "genuine"))
        .await;
    assert_secp256k1(&theirs, &digest, &payload);
    server.stop().await;
}
