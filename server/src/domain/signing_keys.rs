//! Custodied signing keys (the AIMME model): key pairs generated inside
//! VaultGuard whose private halves are sealed under the master key (bound to
//! the table, tenant and key id) and never leave it; agents get signatures.
//!
//! `Sign` is policy-checked with action `sign:<key name>`, judged with the
//! caller's tenant on both sides. A STEP_UP opens a PENDING delegation that
//! stands for exactly this signature request (the signature row records it);
//! once a human approves, the same `Sign` call signs. The row is unique per
//! `(key, agent, idempotency key)` and stores the request's fingerprint, so a
//! retry returns the stored signature bytes and a different payload under the
//! same key is refused; signing a pending row is a conditional UPDATE, so one
//! approval yields one signature even under concurrent retries.

use std::collections::HashMap;
use std::sync::Arc;

use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use serde_json::json;
use vaultguard_proto::v1::{self as pb, ErrorReason, KeyAlgorithm, SigningKeyState, SigningScheme};
use zeroize::Zeroizing;

use crate::audit::{self, AuditCtx, NewEvent, Outcome as AuditOutcome};
use crate::auth::CallContext;
use crate::clock::Millis;
use crate::crypto::{SealContext, random_bytes, sha256_hex};
use crate::custody::{self, Algorithm, CustodyError, Payload, Scheme};
use crate::directory;
use crate::domain::budgets;
use crate::domain::delegations::{self, Input, NewDelegation};
use crate::domain::policy_engine::{self as engine, Attr, Decision, Outcome};
use crate::domain::step_ups;
use crate::domain::{actor_json, frozen, insert_audited, page, to_json};
use crate::error::{Error, Result, Violations, is_unique_violation};
use crate::ethereum;
use crate::ids::{IdKind, check_id, new_id};
use crate::state::AppState;
use crate::store::entities::{custody_key, delegation, signature, step_up};
use crate::store::lifecycle::Transitions;
use crate::validate;

/// The largest message `Sign` takes.
const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// How long an approved signing step-up stays usable.
const SIGN_APPROVAL_TTL_SECONDS: u32 = 600;
const TABLE: &str = "custody_keys";

/// The proto algorithm of a stored one.
pub fn algorithm_proto(stored: &str) -> KeyAlgorithm {
    match Algorithm::parse(stored) {
        Some(Algorithm::Ed25519) => KeyAlgorithm::Ed25519,
        Some(Algorithm::Secp256k1) => KeyAlgorithm::Secp256k1,
        Some(Algorithm::P256) => KeyAlgorithm::P256,
        None => KeyAlgorithm::Unspecified,
    }
}

impl From<custody_key::Status> for SigningKeyState {
    fn from(status: custody_key::Status) -> Self {
        match status {
            custody_key::Status::Enabled => Self::Enabled,
            custody_key::Status::Disabled => Self::Disabled,
        }
    }
}

/// The stored status a ListSigningKeys filter names (none: any).
fn stored_status(state: SigningKeyState) -> Option<custody_key::Status> {
    match state {
        SigningKeyState::Enabled => Some(custody_key::Status::Enabled),
        SigningKeyState::Disabled => Some(custody_key::Status::Disabled),
        SigningKeyState::Unspecified => None,
    }
}

fn seal_context<'a>(tenant_id: &'a str, key_id: &'a str) -> SealContext<'a> {
    SealContext {
        table: TABLE,
        tenant_id,
        record_id: key_id,
    }
}

fn custody_error(err: CustodyError) -> Error {
    Error::internal(format!("custody: {err}"))
}

/// The public forms of a key that are computed rather than stored: its PEM
/// and its JWK (with `kid` = the key id).
pub fn public_forms(row: &custody_key::Model) -> Result<(String, String)> {
    let algorithm =
        Algorithm::parse(&row.algorithm).ok_or_else(|| Error::internal("unknown key algorithm"))?;
    let pem = custody::public_pem(algorithm, &row.public_key).map_err(custody_error)?;
    let jwk = custody::public_jwk(algorithm, &row.public_key, &row.id).map_err(custody_error)?;
    Ok((pem, jwk))
}

/// The tenant's key `id` as the directory holds it (shared, not copied:
/// Sign reads it on every call); another tenant's or an unknown one is
/// NOT_FOUND.
async fn find_own(state: &AppState, tenant_id: &str, id: &str) -> Result<Arc<custody_key::Model>> {
    check_id("key_id", id, IdKind::SigningKey)?;
    state
        .directory
        .signing_key(&state.db, id)
        .await?
        .filter(|row| row.tenant_id == tenant_id)
        .ok_or(Error::NotFound("signing key"))
}

/// CreateSigningKey: generates the key pair here; only the sealed private
/// key is stored.
pub async fn create(
    state: &AppState,
    ctx: &CallContext,
    req: &pb::CreateSigningKeyRequest,
) -> Result<custody_key::Model> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let mut v = Violations::new();
    v.check(validate::name("name", &req.name));
    let algorithm = v
        .take(validate::enum_value::<KeyAlgorithm>(
            "algorithm",
            req.algorithm,
            false,
        ))
        .flatten();
    v.check(validate::optional_text(
        "description",
        &req.description,
        512,
    ));
    v.finish()?;
    let algorithm = match algorithm {
        Some(KeyAlgorithm::Ed25519) => Algorithm::Ed25519,
        Some(KeyAlgorithm::Secp256k1) => Algorithm::Secp256k1,
        Some(KeyAlgorithm::P256) => Algorithm::P256,
        _ => return Err(Error::invalid("algorithm", "is required")),
    };
    // A random 32-byte scalar is out of range with probability ~2^-128; draw
    // again rather than bias it.
    let mut generated = None;
    for _ in 0..4 {
        let private = Zeroizing::new(random_bytes(custody::PRIVATE_KEY_LEN)?);
        match custody::public_key(algorithm, &private) {
            Ok(public) => {
                generated = Some((private, public));
                break;
            }
            Err(CustodyError::InvalidPrivateKey) => {}
            Err(err) => return Err(custody_error(err)),
        }
    }
    let (private, public) =
        generated.ok_or_else(|| Error::internal("could not generate a private key"))?;
    let now = state.clock.now_millis();
    let id = new_id(IdKind::SigningKey);
    let row = custody_key::Model {
        private_key_ciphertext: state.master.seal(seal_context(&tenant_id, &id), &private)?,
        id,
        tenant_id: tenant_id.clone(),
        name: req.name.clone(),
        algorithm: algorithm.as_str().to_owned(),
        status: custody_key::Status::Enabled,
        public_key: public.raw.clone(),
        ethereum_address: public.ethereum_address.clone(),
        created_at: now,
        updated_at: now,
        description: req.description.clone(),
        created_by: actor_json(&ctx.principal.actor())?,
        disabled_at: None,
        disabled_by: None,
        disable_reason: String::new(),
        disable_digest_signing: req.disable_digest_signing,
    };
    let event = ctx.audit().event(
        &tenant_id,
        "key.created",
        vec![row.id.clone()],
        AuditOutcome::Success,
        json!({
            "key_id": row.id,
            "name": row.name,
            "algorithm": row.algorithm,
            "public_key": hex::encode(&row.public_key),
            "ethereum_address": row.ethereum_address,
            "disable_digest_signing": row.disable_digest_signing,
        }),
    );
    let active: custody_key::ActiveModel = row.clone().into();
    insert_audited(
        state,
        active,
        || format!("a signing key named {} exists", req.name),
        event,
    )
    .await?;
    Ok(row)
}

/// GetSigningKey.
pub async fn get(state: &AppState, ctx: &CallContext, id: &str) -> Result<custody_key::Model> {
    find_own(state, ctx.principal.tenant_id()?, id)
        .await
        .map(Arc::unwrap_or_clone)
}

/// ListSigningKeys, by name.
pub async fn list(
    state: &AppState,
    ctx: &CallContext,
    req: &pb::ListSigningKeysRequest,
) -> Result<(Vec<custody_key::Model>, String)> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let mut v = Violations::new();
    let filter = v
        .take(validate::enum_value::<SigningKeyState>(
            "state", req.state, true,
        ))
        .flatten();
    let (size, token) = page::parts(req.page.as_ref());
    let size = v.take(validate::page_size("page.page_size", size));
    v.finish()?;
    let size = size.unwrap_or(50);
    let scope = format!("signing_keys|{tenant_id}|{filter:?}");
    let after = page::decode("page.page_token", &scope, token)?;
    let mut query = custody_key::Entity::find()
        .filter(custody_key::Column::TenantId.eq(tenant_id))
        .order_by_asc(custody_key::Column::Name)
        .limit(size + 1);
    if let Some(stored) = filter.and_then(stored_status) {
        query = query.filter(custody_key::Column::Status.eq(stored));
    }
    if let Some(after) = after {
        query = query.filter(custody_key::Column::Name.gt(after));
    }
    let rows = query.all(&state.db).await?;
    Ok(page::finish(rows, size, &scope, |row| row.name.clone()))
}

fn key_disabled(row: &custody_key::Model) -> Error {
    Error::FailedPrecondition {
        reason: ErrorReason::KeyDisabled,
        message: "the signing key is disabled".to_owned(),
        metadata: HashMap::from([("key_id".to_owned(), row.id.clone())]),
    }
}

/// UpdateSigningKey: changes the settings the request sets (today
/// `disable_digest_signing`) on an enabled key, audited with the values
/// before and after, and forgotten by every replica's directory at once.
pub async fn update(
    state: &AppState,
    ctx: &CallContext,
    req: &pb::UpdateSigningKeyRequest,
) -> Result<custody_key::Model> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let mut v = Violations::new();
    v.check(check_id("key_id", &req.key_id, IdKind::SigningKey));
    v.check(validate::optional_text("reason", &req.reason, 512));
    if req.disable_digest_signing.is_none() {
        v.add(
            "disable_digest_signing",
            "is required: name at least one setting to change",
        );
    }
    v.finish()?;
    let Some(disable_digest_signing) = req.disable_digest_signing else {
        return Err(Error::internal("validated update input missing"));
    };
    let row = find_own(state, &tenant_id, &req.key_id).await?;
    let now = state.clock.now_millis();
    let txn = crate::store::begin(&state.db).await?;
    // Read under the transaction for the audited "before"; the UPDATE is
    // conditional on the key still being enabled.
    let before = custody_key::Entity::find_by_id(row.id.clone())
        .one(&txn)
        .await?
        .ok_or(Error::NotFound("signing key"))?;
    let updated = custody_key::Entity::update_many()
        .col_expr(
            custody_key::Column::DisableDigestSigning,
            Expr::value(disable_digest_signing),
        )
        .col_expr(custody_key::Column::UpdatedAt, Expr::value(now))
        .filter(custody_key::Column::Id.eq(row.id.clone()))
        .filter(custody_key::Column::Status.eq(custody_key::Status::Enabled))
        .exec(&txn)
        .await?;
    if updated.rows_affected == 0 {
        txn.rollback().await?;
        return Err(key_disabled(&row));
    }
    audit::append(
        &txn,
        state.clock.as_ref(),
        ctx.audit().event(
            &tenant_id,
            "key.updated",
            vec![row.id.clone()],
            AuditOutcome::Success,
            json!({
                "key_id": row.id,
                "name": row.name,
                "reason": req.reason,
                "before": {"disable_digest_signing": before.disable_digest_signing},
                "after": {"disable_digest_signing": disable_digest_signing},
            }),
        ),
    )
    .await?;
    // Every replica's Sign must see the new setting at once.
    let changed = directory::Entry::SigningKey(row.id.clone());
    directory::announce(&txn, &changed).await?;
    txn.commit().await?;
    state.directory_changed(&[changed]);
    state.audit_committed();
    find_own(state, &tenant_id, &row.id)
        .await
        .map(Arc::unwrap_or_clone)
}

fn digest_signing_disabled(row: &custody_key::Model) -> Error {
    Error::FailedPrecondition {
        reason: ErrorReason::DigestSigningDisabled,
        message:
            "this signing key does not sign digests: sign the transaction or typed data itself"
                .to_owned(),
        metadata: HashMap::from([("key_id".to_owned(), row.id.clone())]),
    }
}

/// DisableSigningKey: once and for good.
pub async fn disable(
    state: &AppState,
    ctx: &CallContext,
    req: &pb::DisableSigningKeyRequest,
) -> Result<custody_key::Model> {
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    let mut v = Violations::new();
    v.check(check_id("key_id", &req.key_id, IdKind::SigningKey));
    v.check(validate::optional_text("reason", &req.reason, 512));
    v.finish()?;
    let row = find_own(state, &tenant_id, &req.key_id).await?;
    let now = state.clock.now_millis();
    let txn = crate::store::begin(&state.db).await?;
    let updated = custody_key::Entity::update_many()
        .into_state(custody_key::Status::Disabled)
        .col_expr(custody_key::Column::DisabledAt, Expr::value(Some(now)))
        .col_expr(
            custody_key::Column::DisabledBy,
            Expr::value(Some(actor_json(&ctx.principal.actor())?)),
        )
        .col_expr(
            custody_key::Column::DisableReason,
            Expr::value(req.reason.clone()),
        )
        .col_expr(custody_key::Column::UpdatedAt, Expr::value(now))
        .filter(custody_key::Column::Id.eq(row.id.clone()))
        .exec(&txn)
        .await?;
    if updated.rows_affected == 0 {
        txn.rollback().await?;
        return Err(key_disabled(&row));
    }
    audit::append(
        &txn,
        state.clock.as_ref(),
        ctx.audit().event(
            &tenant_id,
            "key.disabled",
            vec![row.id.clone()],
            AuditOutcome::Success,
            json!({"key_id": row.id, "name": row.name, "reason": req.reason}),
        ),
    )
    .await?;
    // Every replica's Sign must refuse the key at once.
    let disabled = directory::Entry::SigningKey(row.id.clone());
    directory::announce(&txn, &disabled).await?;
    txn.commit().await?;
    state.directory_changed(&[disabled]);
    state.audit_committed();
    find_own(state, &tenant_id, &row.id)
        .await
        .map(Arc::unwrap_or_clone)
}

// ---------------------------------------------------------------- Sign

/// What Sign answers.
#[derive(Debug)]
pub enum Signed {
    Signed {
        row: Box<signature::Model>,
        decision: Decision,
        /// For an Ethereum transaction: the signed raw transaction.
        transaction: Option<SignedTransaction>,
    },
    StepUp {
        auth_req_id: String,
        expires_in: u32,
        interval: u32,
        delegation_id: String,
        decision: Decision,
    },
}

/// A signed Ethereum transaction, as `eth_sendRawTransaction` takes it.
#[derive(Debug, Clone)]
pub struct SignedTransaction {
    /// `0x02 ‖ rlp([..fields, y_parity, r, s])`.
    pub raw: Vec<u8>,
    /// keccak256 of `raw`.
    pub hash: [u8; 32],
}

/// A validated Sign request.
struct SignInput {
    payload: OwnedPayload,
    context: std::collections::BTreeMap<String, Attr>,
    authorization_details: Vec<crate::domain::authorization_details::Detail>,
}

enum OwnedPayload {
    Digest(Vec<u8>),
    Message {
        scheme: Scheme,
        data: Vec<u8>,
    },
    /// A decoded EIP-1559 transaction and its signing hash.
    Transaction {
        transaction: Box<ethereum::Transaction>,
        hash: [u8; 32],
    },
    /// Checked EIP-712 typed data and its signing hash.
    TypedData {
        typed: Box<ethereum::TypedData>,
        hash: [u8; 32],
    },
}

/// The stored scheme names of the Ethereum payloads.
const SCHEME_EIP1559_TRANSACTION: &str = "eip1559_transaction";
const SCHEME_EIP712_TYPED_DATA: &str = "eip712_typed_data";

impl OwnedPayload {
    /// What the key signs: the Ethereum payloads as the 32-byte hash
    /// VaultGuard computed from them.
    fn borrow(&self) -> Payload<'_> {
        match self {
            Self::Digest(digest) => Payload::Digest(digest),
            Self::Message { scheme, data } => Payload::Message {
                scheme: *scheme,
                data,
            },
            Self::Transaction { hash, .. } | Self::TypedData { hash, .. } => Payload::Digest(hash),
        }
    }

    /// The custody scheme the payload is signed under.
    fn scheme(&self) -> Scheme {
        match self {
            Self::Digest(_) | Self::Transaction { .. } | Self::TypedData { .. } => Scheme::Digest,
            Self::Message { scheme, .. } => *scheme,
        }
    }

    /// The scheme's stored name (`signatures.scheme`, `vg_sign_scheme`).
    fn scheme_name(&self) -> &'static str {
        match self {
            Self::Transaction { .. } => SCHEME_EIP1559_TRANSACTION,
            Self::TypedData { .. } => SCHEME_EIP712_TYPED_DATA,
            _ => self.scheme().as_str(),
        }
    }

    /// The attributes VaultGuard decoded from the payload.
    fn decoded_attributes(&self) -> ethereum::Attributes {
        match self {
            Self::Transaction { transaction, .. } => transaction.attributes(),
            Self::TypedData { typed, .. } => typed.attributes(),
            Self::Digest(_) | Self::Message { .. } => ethereum::Attributes::new(),
        }
    }
}

fn attr_of(attribute: ethereum::Attribute) -> Attr {
    match attribute {
        ethereum::Attribute::String(text) => Attr::String(text),
        ethereum::Attribute::Number(number) => Attr::Number(number),
    }
}

fn check_sign(req: &pb::SignRequest) -> Result<SignInput> {
    use pb::sign_request::Payload as P;
    let mut v = Violations::new();
    v.check(check_id("key_id", &req.key_id, IdKind::SigningKey));
    v.check(delegations::check_idempotency_key(&req.idempotency_key));
    if req.binding_message.chars().count() > 256 {
        v.add("binding_message", "must be at most 256 characters");
    } else if req.binding_message.chars().any(char::is_control) {
        v.add("binding_message", "must not contain control characters");
    }
    let payload = match &req.payload {
        None => {
            v.add(
                "payload",
                "is required: a digest, a message, an ethereum_transaction or typed_data",
            );
            None
        }
        Some(P::EthereumTransaction(raw)) => match ethereum::Transaction::decode(raw) {
            Ok(transaction) => Some(OwnedPayload::Transaction {
                hash: transaction.signing_hash(),
                transaction: Box::new(transaction),
            }),
            Err(err) => {
                v.add(err.field, err.message);
                None
            }
        },
        Some(P::TypedData(json)) => match ethereum::TypedData::decode(json) {
            Ok(typed) => Some(OwnedPayload::TypedData {
                hash: typed.signing_hash(),
                typed: Box::new(typed),
            }),
            Err(err) => {
                v.add(err.field, err.message);
                None
            }
        },
        Some(P::Digest(digest)) => {
            if digest.len() == 32 {
                Some(OwnedPayload::Digest(digest.clone()))
            } else {
                v.add(
                    "digest",
                    format!("must be exactly 32 bytes, got {}", digest.len()),
                );
                None
            }
        }
        Some(P::Message(message)) => {
            if message.data.is_empty() || message.data.len() > MAX_MESSAGE_BYTES {
                v.add("message.data", "must be 1 byte to 64 KiB");
            }
            let scheme = match v
                .take(validate::enum_value::<SigningScheme>(
                    "message.scheme",
                    message.scheme,
                    false,
                ))
                .flatten()
            {
                Some(SigningScheme::RawSha256) => Some(Scheme::RawSha256),
                Some(SigningScheme::Eip191PersonalSign) => Some(Scheme::Eip191PersonalSign),
                Some(SigningScheme::Ed25519Pure) => Some(Scheme::Ed25519Pure),
                _ => None,
            };
            scheme.map(|scheme| OwnedPayload::Message {
                scheme,
                data: message.data.clone(),
            })
        }
    };
    let context = match engine::check_context(&req.context) {
        Ok(context) => Some(context),
        Err(errors) => {
            errors.into_iter().for_each(|e| v.check(Err(e)));
            None
        }
    };
    let details = match crate::domain::authorization_details::check(&req.authorization_details) {
        Ok(details) => Some(details),
        Err(errors) => {
            errors.into_iter().for_each(|e| v.check(Err(e)));
            None
        }
    };
    v.finish()?;
    match (payload, context, details) {
        (Some(payload), Some(context), Some(authorization_details)) => Ok(SignInput {
            payload,
            context,
            authorization_details,
        }),
        _ => Err(Error::internal("validated sign input missing")),
    }
}

/// The field that names an unsuitable payload for `algorithm`.
fn check_suits(algorithm: Algorithm, payload: &OwnedPayload) -> Result<()> {
    let ethereum_field = match payload {
        OwnedPayload::Transaction { .. } => Some(ethereum::TRANSACTION_FIELD),
        OwnedPayload::TypedData { .. } => Some(ethereum::TYPED_DATA_FIELD),
        OwnedPayload::Digest(_) | OwnedPayload::Message { .. } => None,
    };
    if let Some(field) = ethereum_field {
        if algorithm == Algorithm::Secp256k1 {
            return Ok(());
        }
        return Err(Error::invalid(
            field,
            format!(
                "only a secp256k1 key signs Ethereum payloads, not a {} key",
                algorithm.as_str()
            ),
        ));
    }
    let scheme = payload.scheme();
    if scheme.suits(algorithm) {
        return Ok(());
    }
    Err(match scheme {
        Scheme::Digest => Error::invalid(
            "digest",
            format!("a {} key signs messages, not digests", algorithm.as_str()),
        ),
        _ => Error::invalid(
            "message.scheme",
            format!(
                "{} does not suit a {} key",
                scheme.as_str(),
                algorithm.as_str()
            ),
        ),
    })
}

/// Sign for the calling agent.
pub async fn sign(state: &AppState, ctx: &CallContext, req: &pb::SignRequest) -> Result<Signed> {
    let agent_id = ctx
        .principal
        .agent_id()
        .ok_or_else(|| Error::denied(ErrorReason::RoleRequired, "only agents sign"))?
        .to_owned();
    let tenant_id = ctx.principal.tenant_id()?.to_owned();
    frozen::check_requester(state, &tenant_id, &agent_id).await?;
    let input = check_sign(req)?;
    let signed = sign_checked(state, ctx, req, &input, agent_id, tenant_id).await?;
    with_transaction(&input, signed)
}

/// For a signed Ethereum transaction, the raw transaction built from the
/// stored signature (so a replay rebuilds the same bytes).
fn with_transaction(input: &SignInput, signed: Signed) -> Result<Signed> {
    let OwnedPayload::Transaction { transaction, .. } = &input.payload else {
        return Ok(signed);
    };
    let Signed::Signed { row, decision, .. } = signed else {
        return Ok(signed);
    };
    let bytes = row
        .signature
        .as_deref()
        .ok_or_else(|| Error::internal("signed row without signature"))?;
    let (Some(r), Some(s)) = (
        bytes.get(..32).and_then(|r| <&[u8; 32]>::try_from(r).ok()),
        bytes
            .get(32..64)
            .and_then(|s| <&[u8; 32]>::try_from(s).ok()),
    ) else {
        return Err(Error::internal(
            "stored secp256k1 signature is not r || s || v",
        ));
    };
    let raw = transaction.signed(row.recovery_id == Some(1), r, s);
    Ok(Signed::Signed {
        transaction: Some(SignedTransaction {
            hash: ethereum::transaction_hash(&raw),
            raw,
        }),
        row,
        decision,
    })
}

/// Sign once the request is validated: the key, the refusals that need no
/// policy, the judgement, and the signature, step-up or replay.
async fn sign_checked(
    state: &AppState,
    ctx: &CallContext,
    req: &pb::SignRequest,
    input: &SignInput,
    agent_id: String,
    tenant_id: String,
) -> Result<Signed> {
    let key = find_own(state, &tenant_id, &req.key_id).await?;
    let algorithm =
        Algorithm::parse(&key.algorithm).ok_or_else(|| Error::internal("unknown key algorithm"))?;
    check_suits(algorithm, &input.payload)?;
    let payload_hash = custody::payload_hash(&input.payload.borrow()).map_err(custody_error)?;
    let payload_hex = hex::encode(payload_hash);
    let mut hashed = json!({
        "key_id": key.id,
        "scheme": input.payload.scheme_name(),
        "payload_hash": payload_hex,
        "context": input.context,
        "binding_message": req.binding_message,
    });
    if !input.authorization_details.is_empty() {
        hashed["authorization_details"] =
            serde_json::to_value(&input.authorization_details).map_err(Error::internal)?;
    }
    let request_hash = sha256_hex(to_json(&hashed)?.as_bytes());

    // The idempotency key is looked up only on the paths that refuse; a
    // first request that is stored loses to an earlier row of its key at
    // the unique index and answers from that row.
    // A key that refuses digests refuses every one, retries of earlier ones
    // included: it signs only what VaultGuard hashed itself.
    if key.disable_digest_signing && matches!(input.payload, OwnedPayload::Digest(_)) {
        refuse(
            state,
            ctx,
            &key,
            &agent_id,
            &payload_hex,
            "digest signing disabled",
        )
        .await?;
        return Err(digest_signing_disabled(&key));
    }
    if key.status != custody_key::Status::Enabled {
        if let Some(existing) = find_by_key(state, &key.id, &agent_id, &req.idempotency_key).await?
        {
            return replay(state, ctx, &key, input, existing, &request_hash).await;
        }
        refuse(state, ctx, &key, &agent_id, &payload_hex, "key disabled").await?;
        return Err(key_disabled(&key));
    }
    let own = state
        .directory
        .tenant(&state.db, &tenant_id)
        .await?
        .ok_or(Error::NotFound("tenant"))?;
    let mut context = input.context.clone();
    context.insert(
        "vg_payload_hash".to_owned(),
        Attr::String(payload_hex.clone()),
    );
    context.insert(
        "vg_key_algorithm".to_owned(),
        Attr::String(key.algorithm.clone()),
    );
    context.insert(
        "vg_sign_scheme".to_owned(),
        Attr::String(input.payload.scheme_name().to_owned()),
    );
    for (name, attribute) in input.payload.decoded_attributes() {
        context.insert(name.to_owned(), attr_of(attribute));
    }
    let policy_input = Input {
        receiving_tenant_id: tenant_id.clone(),
        action: format!("sign:{}", key.name),
        scopes: Vec::new(),
        resource: format!("key:{}", key.id),
        requested_ttl_seconds: SIGN_APPROVAL_TTL_SECONDS.min(state.config.max_token_ttl_seconds),
        binding_message: req.binding_message.clone(),
        context,
        authorization_details: input.authorization_details.clone(),
        vault_made: true,
    };
    let decision = delegations::judge_between(state, &own, &agent_id, &own, &policy_input).await?;
    let now = state.clock.now_millis();
    // The tenant's budgets on this key (or on its agents' signing): checked
    // and charged in the transaction that stores the signature.
    let applicable = if decision.outcome == Outcome::Block {
        Vec::new()
    } else {
        budgets::applicable(
            state,
            &own,
            &own,
            &budgets::Subject {
                requesting_tenant_id: &tenant_id,
                requesting_agent_id: &agent_id,
                receiving_tenant_id: &tenant_id,
                action: &policy_input.action,
                context: &policy_input.context,
                details: &policy_input.authorization_details,
                signing_key_id: Some(&key.id),
                connection_id: None,
                vault_made: true,
            },
        )
        .await?
    };
    let (decision, mut charged) = if applicable.is_empty() {
        (decision, None)
    } else {
        let txn = crate::store::begin(&state.db).await?;
        let checked = budgets::check_in(&txn, &applicable, now).await?;
        (budgets::apply(decision, &checked), Some((txn, checked)))
    };
    if decision.outcome == Outcome::Block
        && let Some((txn, _)) = charged.take()
    {
        // Nothing is charged for a refusal; the refusal below writes
        // through the pool.
        txn.rollback().await?;
    }
    let row = signature::Model {
        id: new_id(IdKind::Signature),
        tenant_id: tenant_id.clone(),
        key_id: key.id.clone(),
        requester_subject: agent_id.clone(),
        idempotency_key: req.idempotency_key.clone(),
        payload_hash: payload_hex.clone(),
        status: signature::Status::Pending,
        signature: None,
        delegation_id: None,
        created_at: now,
        updated_at: now,
        request_hash: request_hash.clone(),
        scheme: input.payload.scheme_name().to_owned(),
        decision: to_json(&decision)?,
        recovery_id: None,
        signed_at: None,
    };
    match decision.outcome {
        Outcome::Block => {
            if let Some(existing) =
                find_by_key(state, &key.id, &agent_id, &req.idempotency_key).await?
            {
                return replay(state, ctx, &key, input, existing, &request_hash).await;
            }
            refuse(
                state,
                ctx,
                &key,
                &agent_id,
                &payload_hex,
                "blocked by policy",
            )
            .await?;
            Err(delegations::blocked_error_for(
                &tenant_id,
                &decision,
                &[("key_id", key.id.clone())],
            ))
        }
        Outcome::Allow => {
            let produced = produce(state, &key, algorithm, &input.payload)?;
            let mut row = row;
            row.status = signature::Status::Signed;
            row.signature = Some(produced.bytes.clone());
            row.recovery_id = recovery_id_of(algorithm, &produced);
            row.signed_at = Some(now);
            let event = signed_event(&ctx.audit(), &key, &row, &agent_id, &input.context);
            let written = match charged {
                // The signature row, its event and its charges in the
                // transaction that holds the budgets' locks.
                Some((txn, checked)) => {
                    if insert_signature(&txn, &row).await? {
                        // A freeze committed since the request was judged
                        // refuses it here, as the group insert does.
                        frozen::check_not_frozen_in(&txn, &tenant_id, &agent_id).await?;
                        budgets::record_in(&txn, &checked, &row.id, None, now).await?;
                        audit::append_all(&txn, state.clock.as_ref(), vec![event]).await?;
                        txn.commit().await?;
                        audit::Written::Inserted
                    } else {
                        txn.rollback().await?;
                        audit::Written::Conflict
                    }
                }
                // The signature row (the idempotency record) and its event
                // in one statement, shared with whatever else is being
                // written.
                None => {
                    let active: signature::ActiveModel = row.clone().into();
                    state
                        .recorder
                        .insert_with_events(active, vec![event])
                        .await?
                }
            };
            if written == audit::Written::Conflict {
                return replay_winner(state, ctx, &key, input, &agent_id, req, &request_hash).await;
            }
            state.audit_committed();
            metrics::counter!("vaultguard_signatures_total", "algorithm" => algorithm.as_str())
                .increment(1);
            Ok(Signed::Signed {
                row: Box::new(row),
                decision,
                transaction: None,
            })
        }
        Outcome::StepUp => {
            let delegation_row = delegations::new_row(
                state,
                &NewDelegation {
                    tenant_id: &tenant_id,
                    agent_id: &agent_id,
                    receiving: &own,
                    input: &policy_input,
                    scopes_json: "[]".to_owned(),
                    // '/' is outside the alphabet of client idempotency
                    // keys, so this never meets RequestDelegation's.
                    idempotency_key: &format!("vg/sign/{}", row.id),
                    request_hash: &request_hash,
                },
                &decision,
                now,
            )?;
            let mut row = row;
            row.delegation_id = Some(delegation_row.id.clone());
            let (txn, checked) = match charged {
                Some((txn, checked)) => (txn, Some(checked)),
                None => (crate::store::begin(&state.db).await?, None),
            };
            if !insert_signature(&txn, &row).await? {
                txn.rollback().await?;
                return replay_winner(state, ctx, &key, input, &agent_id, req, &request_hash).await;
            }
            let active: delegation::ActiveModel = delegation_row.clone().into();
            delegation::Entity::insert(active).exec(&txn).await?;
            let (auth_req_id, change) =
                delegations::insert_step_up(state, &txn, &delegation_row).await?;
            if let Some(checked) = &checked {
                // Held by the step-up's delegation until it is decided.
                budgets::record_in(
                    &txn,
                    checked,
                    &delegation_row.id,
                    delegation_row.expires_at,
                    now,
                )
                .await?;
            }
            let events = delegations::party_events(
                &ctx.audit(),
                &delegation_row,
                "delegation.decided",
                AuditOutcome::Success,
                &json!({
                    "outcome": "step_up",
                    "requesting_agent_id": agent_id,
                    "for": "sign",
                    "key_id": key.id,
                    "signature_id": row.id,
                    "payload_hash": payload_hex,
                }),
                Some(&decision),
            );
            audit::append_all(&txn, state.clock.as_ref(), events).await?;
            txn.commit().await?;
            state.audit_committed();
            state.hub.committed(vec![change]);
            Ok(Signed::StepUp {
                auth_req_id,
                expires_in: state.config.step_up_expires_in_seconds,
                interval: state.config.step_up_interval_seconds,
                delegation_id: delegation_row.id,
                decision,
            })
        }
    }
}

/// Inserts a first Sign's signature row in `txn`; `false` when a
/// concurrent request with the same idempotency key inserted first (its row
/// answers, see [`replay_winner`]).
async fn insert_signature(
    txn: &sea_orm::DatabaseTransaction,
    row: &signature::Model,
) -> Result<bool> {
    let active: signature::ActiveModel = row.clone().into();
    match signature::Entity::insert(active).exec(txn).await {
        Ok(_) => Ok(true),
        Err(err) if is_unique_violation(&err) => Ok(false),
        Err(err) => Err(err.into()),
    }
}

async fn find_by_key(
    state: &AppState,
    key_id: &str,
    agent_id: &str,
    idempotency_key: &str,
) -> Result<Option<signature::Model>> {
    Ok(signature::Entity::find()
        .filter(signature::Column::KeyId.eq(key_id))
        .filter(signature::Column::RequesterSubject.eq(agent_id))
        .filter(signature::Column::IdempotencyKey.eq(idempotency_key))
        .one(&state.db)
        .await?)
}

/// A concurrent first request with the same key won: answer from its row.
async fn replay_winner(
    state: &AppState,
    ctx: &CallContext,
    key: &custody_key::Model,
    input: &SignInput,
    agent_id: &str,
    req: &pb::SignRequest,
    request_hash: &str,
) -> Result<Signed> {
    let Some(winner) = find_by_key(state, &key.id, agent_id, &req.idempotency_key).await? else {
        // Or the requester was frozen since it was judged: the storing
        // statement refused the row.
        if let Some(frozen) = frozen::frozen_now(&state.db, &key.tenant_id, agent_id).await? {
            return Err(frozen);
        }
        return Err(Error::Conflict("concurrent idempotent sign"));
    };
    replay(state, ctx, key, input, winner, request_hash).await
}

fn produce(
    state: &AppState,
    key: &custody_key::Model,
    algorithm: Algorithm,
    payload: &OwnedPayload,
) -> Result<custody::Signature> {
    let parsed = state.directory.parsed_key(&key.id, || {
        let private = Zeroizing::new(state.master.open(
            seal_context(&key.tenant_id, &key.id),
            &key.private_key_ciphertext,
        )?);
        custody::SecretKey::parse(algorithm, &private).map_err(custody_error)
    })?;
    parsed.sign(&payload.borrow()).map_err(custody_error)
}

fn recovery_id_of(algorithm: Algorithm, produced: &custody::Signature) -> Option<i32> {
    (algorithm == Algorithm::Secp256k1).then(|| i32::try_from(produced.recovery_id).unwrap_or(0))
}

fn signed_event(
    audit_ctx: &AuditCtx,
    key: &custody_key::Model,
    row: &signature::Model,
    agent_id: &str,
    context: &std::collections::BTreeMap<String, Attr>,
) -> NewEvent {
    audit_ctx.event(
        &key.tenant_id,
        "key.signed",
        vec![row.id.clone(), key.id.clone(), agent_id.to_owned()],
        AuditOutcome::Success,
        json!({
            "signature_id": row.id,
            "key_id": key.id,
            "key_name": key.name,
            "algorithm": key.algorithm,
            "scheme": row.scheme,
            "payload_hash": row.payload_hash,
            "agent_id": agent_id,
            "delegation_id": row.delegation_id,
            "context": context,
        }),
    )
}

async fn refuse(
    state: &AppState,
    ctx: &CallContext,
    key: &custody_key::Model,
    agent_id: &str,
    payload_hex: &str,
    reason: &str,
) -> Result<()> {
    state
        .record(vec![ctx.audit().event(
            &key.tenant_id,
            "key.sign_refused",
            vec![key.id.clone(), agent_id.to_owned()],
            AuditOutcome::Denied,
            json!({"key_id": key.id, "payload_hash": payload_hex, "reason": reason}),
        )])
        .await
}

fn stored_decision(row: &signature::Model) -> Result<Decision> {
    serde_json::from_str(&row.decision).map_err(Error::internal)
}

/// Answers a repeated idempotency key: the stored signature, the same
/// pending step-up, the signature once the step-up is approved, or the
/// step-up's refusal.
async fn replay(
    state: &AppState,
    ctx: &CallContext,
    key: &custody_key::Model,
    input: &SignInput,
    row: signature::Model,
    request_hash: &str,
) -> Result<Signed> {
    if row.request_hash != request_hash {
        return Err(Error::AlreadyExists {
            reason: Some(ErrorReason::IdempotencyConflict),
            message: "this idempotency key was used with a different signing request".to_owned(),
            metadata: HashMap::from([("idempotency_key".to_owned(), row.idempotency_key.clone())]),
        });
    }
    let decision = stored_decision(&row)?;
    if row.status == signature::Status::Signed {
        return Ok(Signed::Signed {
            row: Box::new(row),
            decision,
            transaction: None,
        });
    }
    let delegation_id = row
        .delegation_id
        .clone()
        .ok_or_else(|| Error::internal("pending signature without delegation"))?;
    let delegation_row = delegation::Entity::find_by_id(delegation_id.clone())
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::internal("signature's delegation missing"))?;
    let step_up_id = delegation_row
        .step_up_id
        .clone()
        .ok_or_else(|| Error::internal("signing delegation without step-up"))?;
    let step = step_up::Entity::find_by_id(step_up_id.clone())
        .one(&state.db)
        .await?
        .ok_or_else(|| Error::internal("signing step-up missing"))?;
    let now = state.clock.now_millis();
    match step_ups::effective_state(&step, &delegation_row, now) {
        step_up::State::Pending => Ok(Signed::StepUp {
            auth_req_id: delegations::auth_req_id(state, &step_up_id),
            expires_in: delegations::seconds_left(Some(step.expires_at), now),
            interval: u32::try_from(step.interval_seconds).unwrap_or(5),
            delegation_id,
            decision,
        }),
        step_up::State::Approved | step_up::State::Redeemed => {
            if key.status != custody_key::Status::Enabled {
                return Err(key_disabled(key));
            }
            if delegations::effective_status(&delegation_row, now) != delegation::Status::Active {
                return Err(approval_ended(&delegation_row, now));
            }
            // The approval answered the STEP_UP; the policy still judges the
            // signature when it is made: a rule edited to BLOCK since, or a
            // time window that closed, wins.
            judge_at_signing(state, ctx, key, &row, &delegation_row).await?;
            sign_approved(state, ctx, key, input, row, decision, now).await
        }
        step_up::State::Denied => Err(step_ups::ciba(
            ErrorReason::AccessDenied,
            "access_denied",
            &[("delegation_id", delegation_id)],
        )),
        step_up::State::Expired => Err(step_ups::ciba(
            ErrorReason::ExpiredToken,
            "expired_token",
            &[("delegation_id", delegation_id)],
        )),
    }
}

/// Judges an approved signature again as it is about to be made; a BLOCK
/// now refuses it (audited) and leaves it pending.
async fn judge_at_signing(
    state: &AppState,
    ctx: &CallContext,
    key: &custody_key::Model,
    row: &signature::Model,
    delegation_row: &delegation::Model,
) -> Result<()> {
    let own = state
        .directory
        .tenant(&state.db, &key.tenant_id)
        .await?
        .ok_or(Error::NotFound("tenant"))?;
    let decision = delegations::judge_between(
        state,
        &own,
        &row.requester_subject,
        &own,
        &delegations::input_of(delegation_row)?,
    )
    .await?;
    if decision.outcome != Outcome::Block {
        return Ok(());
    }
    refuse(
        state,
        ctx,
        key,
        &row.requester_subject,
        &row.payload_hash,
        "blocked by policy at signing time",
    )
    .await?;
    Err(delegations::blocked_error_for(
        &key.tenant_id,
        &decision,
        &[("key_id", key.id.clone())],
    ))
}

fn approval_ended(row: &delegation::Model, now: Millis) -> Error {
    let extra = [("delegation_id", row.id.clone())];
    if delegations::effective_status(row, now) == delegation::Status::Expired {
        step_ups::ciba(ErrorReason::ExpiredToken, "expired_token", &extra)
    } else {
        // Revoked or relinquished after the approval.
        step_ups::ciba(ErrorReason::AccessDenied, "access_denied", &extra)
    }
}

/// Signs an approved pending row, once: the conditional UPDATE from
/// `pending` lets one concurrent retry sign; the others read its result.
async fn sign_approved(
    state: &AppState,
    ctx: &CallContext,
    key: &custody_key::Model,
    input: &SignInput,
    row: signature::Model,
    decision: Decision,
    now: Millis,
) -> Result<Signed> {
    let algorithm =
        Algorithm::parse(&key.algorithm).ok_or_else(|| Error::internal("unknown key algorithm"))?;
    let produced = produce(state, key, algorithm, &input.payload)?;
    let txn = crate::store::begin(&state.db).await?;
    let updated = signature::Entity::update_many()
        .into_state(signature::Status::Signed)
        .col_expr(
            signature::Column::Signature,
            Expr::value(Some(produced.bytes.clone())),
        )
        .col_expr(
            signature::Column::RecoveryId,
            Expr::value(recovery_id_of(algorithm, &produced)),
        )
        .col_expr(signature::Column::SignedAt, Expr::value(Some(now)))
        .col_expr(signature::Column::UpdatedAt, Expr::value(now))
        .filter(signature::Column::Id.eq(row.id.clone()))
        .exec(&txn)
        .await?;
    // The kill switch: the freeze is read again once the row is written
    // (`kill_switch` explains why that closes the race).
    frozen::check_not_frozen_in(&txn, &row.tenant_id, &row.requester_subject).await?;
    if updated.rows_affected == 1 {
        let mut signed = row.clone();
        signed.status = signature::Status::Signed;
        signed.signature = Some(produced.bytes);
        signed.signed_at = Some(now);
        audit::append(
            &txn,
            state.clock.as_ref(),
            signed_event(
                &ctx.audit(),
                key,
                &signed,
                &row.requester_subject,
                &input.context,
            ),
        )
        .await?;
        txn.commit().await?;
        state.audit_committed();
        metrics::counter!("vaultguard_signatures_total", "algorithm" => algorithm.as_str())
            .increment(1);
    } else {
        txn.rollback().await?;
    }
    let stored = signature::Entity::find_by_id(row.id.clone())
        .one(&state.db)
        .await?
        .filter(|r| r.status == signature::Status::Signed)
        .ok_or(Error::Conflict("concurrent signing"))?;
    Ok(Signed::Signed {
        row: Box::new(stored),
        decision,
        transaction: None,
    })
}
