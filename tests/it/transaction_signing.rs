//! Transaction-aware signing (issue 26): `Sign` takes an unsigned EIP-1559
//! transaction or EIP-712 typed data, decodes it, lets the policy judge what
//! it really does (`vg_tx_*`, `vg_erc20_*`, `vg_eip712_*`), and answers the
//! signed raw transaction. Every signature is checked with Python
//! eth-account (tests/py/verify_eth.py), independent of the server's Rust
//! crates: the raw transaction decodes with the fields that were sent, and
//! the sender it recovers is the address derived here from the key's public
//! key. The attack: a transaction the policy refuses is signed anyway by
//! sending its keccak256 as a digest — until the key disables digest
//! signing (UpdateSigningKey, or CreateSigningKey's flag).

use std::io::Write as _;
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use tiny_keccak::{Hasher, Keccak};
use tonic::Code;
use vaultguard_client::pb;
use vaultguard_tests::calls::{disable_key, get_key, set_digest_signing_disabled};
use vaultguard_tests::fixtures::{add_rule, cond, inbound, num, text, when, with_counterpart};
use vaultguard_tests::{Rpc, TestServer, expect_code, expect_invalid, expect_reason};

use crate::vault_signing::{Party, approve, outcome_of, sign_now, signed, step_up_of, stepped_up};

use pb::ErrorReason as Reason;
use pb::KeyAlgorithm as Alg;
use pb::sign_request::Payload;

type Op = pb::ConditionOperator;

/// One ether in wei.
const ETHER: u128 = 1_000_000_000_000_000_000;

/// The vendor the treasury pays, and someone else.
const VENDOR: [u8; 20] = [0x11; 20];
const STRANGER: [u8; 20] = [0x66; 20];

/// An ERC-20 token contract (the address is arbitrary).
const TOKEN: [u8; 20] = [0x70; 20];

fn hex0x(bytes: &[u8]) -> String {
    format!("0x{}", hex::encode(bytes))
}

fn keccak(bytes: &[u8]) -> [u8; 32] {
    let mut hasher = Keccak::v256();
    hasher.update(bytes);
    let mut out = [0u8; 32];
    hasher.finalize(&mut out);
    out
}

/// The key's Ethereum address, derived here from its public key:
/// lowercase `0x` + the last 20 bytes of keccak256(X ‖ Y).
fn address_of(key: &pb::SigningKey) -> String {
    assert_eq!(key.public_key.len(), 65);
    hex0x(&keccak(&key.public_key[1..])[12..])
}

// ---------------------------------------------------------------------------
// A minimal RLP encoder of the test's own, so the transactions sent are not
// built by the crates the server decodes them with.

fn rlp_header(offset: u8, len: usize) -> Vec<u8> {
    if len < 56 {
        return vec![offset + u8::try_from(len).unwrap()];
    }
    let be: Vec<u8> = len
        .to_be_bytes()
        .into_iter()
        .skip_while(|&b| b == 0)
        .collect();
    let mut out = vec![offset + 55 + u8::try_from(be.len()).unwrap()];
    out.extend(be);
    out
}

fn rlp_bytes(bytes: &[u8]) -> Vec<u8> {
    if bytes.len() == 1 && bytes[0] < 0x80 {
        return bytes.to_vec();
    }
    let mut out = rlp_header(0x80, bytes.len());
    out.extend_from_slice(bytes);
    out
}

fn rlp_uint(value: u128) -> Vec<u8> {
    let be: Vec<u8> = value
        .to_be_bytes()
        .into_iter()
        .skip_while(|&b| b == 0)
        .collect();
    rlp_bytes(&be)
}

fn rlp_list(items: &[Vec<u8>]) -> Vec<u8> {
    let payload = items.concat();
    let mut out = rlp_header(0xc0, payload.len());
    out.extend(payload);
    out
}

/// An unsigned EIP-1559 transaction's nine fields.
#[derive(Debug, Clone)]
struct Tx {
    chain_id: u128,
    nonce: u128,
    to: Vec<u8>,
    value: u128,
    data: Vec<u8>,
}

impl Tx {
    /// `value` wei to `to` on chain 1.
    fn pay(to: [u8; 20], value: u128) -> Self {
        Self {
            chain_id: 1,
            nonce: 4,
            to: to.to_vec(),
            value,
            data: Vec::new(),
        }
    }

    /// An ERC-20 `transfer(recipient, amount)` call to [`TOKEN`].
    fn erc20(recipient: [u8; 20], amount: u128) -> Self {
        let mut data = vec![0xa9, 0x05, 0x9c, 0xbb];
        data.extend_from_slice(&[0u8; 12]);
        data.extend_from_slice(&recipient);
        data.extend_from_slice(&[0u8; 16]);
        data.extend_from_slice(&amount.to_be_bytes());
        Self {
            data,
            ..Self::pay(TOKEN, 0)
        }
    }

    fn fields(&self) -> Vec<Vec<u8>> {
        vec![
            rlp_uint(self.chain_id),
            rlp_uint(self.nonce),
            rlp_uint(1_500_000_000),
            rlp_uint(40_000_000_000),
            rlp_uint(90_000),
            rlp_bytes(&self.to),
            rlp_uint(self.value),
            rlp_bytes(&self.data),
            rlp_list(&[]),
        ]
    }

    /// `0x02 ‖ rlp([...nine fields])`.
    fn unsigned(&self) -> Vec<u8> {
        let mut out = vec![0x02];
        out.extend(rlp_list(&self.fields()));
        out
    }

    /// The same with a signature (y_parity, r, s) appended, as a wallet
    /// would assemble a signature it got for the transaction's hash.
    fn signed_with(&self, y_parity: u32, r: &[u8], s: &[u8]) -> Vec<u8> {
        let strip =
            |bytes: &[u8]| -> Vec<u8> { bytes.iter().copied().skip_while(|&b| b == 0).collect() };
        let mut fields = self.fields();
        fields.push(rlp_uint(u128::from(y_parity)));
        fields.push(rlp_bytes(&strip(r)));
        fields.push(rlp_bytes(&strip(s)));
        let mut out = vec![0x02];
        out.extend(rlp_list(&fields));
        out
    }
}

fn sign_tx(key_id: &str, raw: Vec<u8>, idempotency_key: &str) -> pb::SignRequest {
    pb::SignRequest {
        key_id: key_id.to_owned(),
        payload: Some(Payload::EthereumTransaction(raw)),
        idempotency_key: idempotency_key.to_owned(),
        ..Default::default()
    }
}

fn sign_typed(key_id: &str, json: &str, idempotency_key: &str) -> pb::SignRequest {
    pb::SignRequest {
        key_id: key_id.to_owned(),
        payload: Some(Payload::TypedData(json.to_owned())),
        idempotency_key: idempotency_key.to_owned(),
        ..Default::default()
    }
}

fn sign_digest(key_id: &str, digest: [u8; 32], idempotency_key: &str) -> pb::SignRequest {
    pb::SignRequest {
        key_id: key_id.to_owned(),
        payload: Some(Payload::Digest(digest.to_vec())),
        idempotency_key: idempotency_key.to_owned(),
        ..Default::default()
    }
}

/// What eth-account reads from `input` (tests/py/verify_eth.py).
fn eth_account(input: &Value) -> Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/py/verify_eth.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 with eth-account (pip install -r examples/python-agent/requirements.txt)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.to_string().as_bytes())
        .expect("write to python");
    let output = child.wait_with_output().expect("python output");
    assert!(
        output.status.success(),
        "eth-account refused: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("python json")
}

/// eth-account decodes `signed.signed_transaction`: its fields are `tx`'s,
/// its hash is `signed.transaction_hash`, and it was signed by `key`.
#[track_caller]
fn assert_signed_by(key: &pb::SigningKey, tx: &Tx, signed: &pb::SignedPayload) {
    assert_eq!(signed.payload_hash, keccak(&tx.unsigned()));
    assert_eq!(signed.transaction_hash, keccak(&signed.signed_transaction));
    let read = eth_account(&json!({
        "kind": "transaction",
        "raw": hex::encode(&signed.signed_transaction),
    }));
    assert_eq!(
        read["sender"].as_str().unwrap().to_lowercase(),
        address_of(key)
    );
    assert_eq!(
        read["sender"].as_str().unwrap(),
        key.ethereum_address,
        "EIP-55"
    );
    assert_eq!(read["hash"], hex::encode(&signed.transaction_hash));
    assert_eq!(read["chain_id"], json!(u64::try_from(tx.chain_id).unwrap()));
    assert_eq!(read["nonce"], json!(u64::try_from(tx.nonce).unwrap()));
    assert_eq!(read["to"], hex0x(&tx.to));
    assert_eq!(read["value"], tx.value.to_string());
    assert_eq!(read["data"], hex::encode(&tx.data));
    assert_eq!(read["gas"], json!(90_000));
    assert_eq!(read["max_fee_per_gas"], "40000000000");
    assert_eq!(read["max_priority_fee_per_gas"], "1500000000");
    assert_eq!(read["y_parity"], json!(signed.recovery_id));
}

/// The Ether Mail example of EIP-712.
fn mail(chain_id: u64) -> String {
    json!({
        "types": {
            "EIP712Domain": [
                {"name": "name", "type": "string"},
                {"name": "version", "type": "string"},
                {"name": "chainId", "type": "uint256"},
                {"name": "verifyingContract", "type": "address"}
            ],
            "Person": [
                {"name": "name", "type": "string"},
                {"name": "wallet", "type": "address"}
            ],
            "Mail": [
                {"name": "from", "type": "Person"},
                {"name": "to", "type": "Person"},
                {"name": "contents", "type": "string"}
            ]
        },
        "primaryType": "Mail",
        "domain": {
            "name": "Ether Mail",
            "version": "1",
            "chainId": chain_id,
            "verifyingContract": "0xCcCCccccCCCCcCCCCCCcCcCccCcCCCcCcccccccC"
        },
        "message": {
            "from": {"name": "Cow", "wallet": "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826"},
            "to": {"name": "Bob", "wallet": "0xbBbBBBBbbBBBbbbBbbBbbbbBBbBbbbbBbBbbBBbB"},
            "contents": "Hello, Bob!"
        }
    })
    .to_string()
}

/// A server with the tenant `acme` and its secp256k1 key `treasury`.
async fn treasury() -> (TestServer, Party, pb::SigningKey) {
    let server = TestServer::start().await;
    let acme = Party::new(&server, "acme").await;
    let key = acme.key("treasury", Alg::Secp256k1).await;
    (server, acme, key)
}

/// Signature rows and `key.signed` events: what a refusal must not add.
async fn ledger(server: &TestServer, tenant_id: &str) -> (i64, i64, usize) {
    (
        server.count("signatures").await,
        server.count("delegations").await,
        server.audit_events(tenant_id, "key.signed").await.len(),
    )
}

// ---------------------------------------------------------------------------
// Signing what the policy judged.

#[tokio::test]
async fn an_ether_payment_to_the_vendor_is_signed_and_eth_account_recovers_the_key() {
    let (server, acme, key) = treasury().await;
    acme.rule(
        &key,
        pb::Effect::Allow,
        vec![
            cond("vg_tx_to", Op::Eq, text(&hex0x(&VENDOR))),
            cond("vg_tx_value", Op::Lte, num(2e18)),
            cond("vg_tx_chain_id", Op::Eq, num(1.0)),
        ],
    )
    .await;

    let tx = Tx::pay(VENDOR, ETHER);
    let first = sign_now(&acme.agent, sign_tx(&key.id, tx.unsigned(), "pay-1")).await;
    assert_signed_by(&key, &tx, &first);
    assert_eq!(first.signature.len(), 65);
    assert_eq!(first.v, 27 + first.recovery_id);

    // A retry answers the same signed transaction, signed once.
    let again = sign_now(&acme.agent, sign_tx(&key.id, tx.unsigned(), "pay-1")).await;
    assert_eq!(again.signed_transaction, first.signed_transaction);
    assert_eq!(again.signature_id, first.signature_id);
    assert_eq!(
        server
            .audit_events(&acme.tenant.id, "key.signed")
            .await
            .len(),
        1
    );
    let event = &server.audit_events(&acme.tenant.id, "key.signed").await[0];
    let details: Value = serde_json::from_str(&event.details).unwrap();
    assert_eq!(details["scheme"], "eip1559_transaction");
    assert_eq!(details["payload_hash"], hex::encode(keccak(&tx.unsigned())));

    // More than the rule allows, or to someone else: no rule matches.
    for (tx, idempotency_key) in [
        (Tx::pay(VENDOR, 3 * ETHER), "pay-2"),
        (Tx::pay(STRANGER, ETHER), "pay-3"),
        (
            Tx {
                chain_id: 5,
                ..Tx::pay(VENDOR, ETHER)
            },
            "pay-4",
        ),
    ] {
        expect_reason(
            acme.agent
                .sign(sign_tx(&key.id, tx.unsigned(), idempotency_key))
                .await,
            Code::PermissionDenied,
            Reason::NoMatchingRule,
        );
    }
    server.stop().await;
}

#[tokio::test]
async fn an_erc20_transfer_is_judged_on_its_decoded_recipient_and_amount() {
    let (server, acme, key) = treasury().await;
    acme.rule(
        &key,
        pb::Effect::Allow,
        vec![
            cond("vg_tx_selector", Op::Eq, text("0xa9059cbb")),
            cond("vg_erc20_token", Op::Eq, text(&hex0x(&TOKEN))),
            cond("vg_erc20_recipient", Op::Eq, text(&hex0x(&VENDOR))),
            cond("vg_erc20_amount", Op::Lte, num(1_000_000.0)),
        ],
    )
    .await;

    let tx = Tx::erc20(VENDOR, 1_000_000);
    let signed = sign_now(&acme.agent, sign_tx(&key.id, tx.unsigned(), "usdc-1")).await;
    assert_signed_by(&key, &tx, &signed);

    // One base unit over the limit, or to a stranger: refused, nothing signed.
    let before = ledger(&server, &acme.tenant.id).await;
    for (tx, idempotency_key) in [
        (Tx::erc20(VENDOR, 1_000_001), "usdc-2"),
        (Tx::erc20(STRANGER, 10), "usdc-3"),
    ] {
        expect_reason(
            acme.agent
                .sign(sign_tx(&key.id, tx.unsigned(), idempotency_key))
                .await,
            Code::PermissionDenied,
            Reason::NoMatchingRule,
        );
    }
    assert_eq!(ledger(&server, &acme.tenant.id).await, before);
    server.stop().await;
}

#[tokio::test]
async fn amounts_past_a_double_s_precision_never_round_under_a_limit() {
    let (server, acme, key) = treasury().await;
    // 2^60 is a double; 2^60 + 1 is not, and must not compare as 2^60.
    let limit = 2f64.powi(60);
    acme.rule(
        &key,
        pb::Effect::Allow,
        vec![cond("vg_tx_value", Op::Lte, num(limit))],
    )
    .await;
    let at_limit = Tx::pay(VENDOR, 1 << 60);
    let signed = sign_now(&acme.agent, sign_tx(&key.id, at_limit.unsigned(), "edge-1")).await;
    assert_signed_by(&key, &at_limit, &signed);
    expect_reason(
        acme.agent
            .sign(sign_tx(
                &key.id,
                Tx::pay(VENDOR, (1 << 60) + 1).unsigned(),
                "edge-2",
            ))
            .await,
        Code::PermissionDenied,
        Reason::NoMatchingRule,
    );
    server.stop().await;
}

#[tokio::test]
async fn a_large_payment_steps_up_and_the_approver_sees_the_decoded_transaction() {
    let (server, acme, key) = treasury().await;
    acme.rule(
        &key,
        pb::Effect::StepUp,
        vec![cond("vg_tx_value", Op::Gt, num(1e18))],
    )
    .await;
    acme.rule(
        &key,
        pb::Effect::Allow,
        vec![cond("vg_tx_value", Op::Lte, num(1e18))],
    )
    .await;

    let tx = Tx::pay(VENDOR, 5 * ETHER);
    let request = pb::SignRequest {
        binding_message: "pay the vendor 5 ETH".to_owned(),
        ..sign_tx(&key.id, tx.unsigned(), "big-1")
    };
    let response = acme.agent.sign(request.clone()).await.expect("sign");
    assert_eq!(outcome_of(&response), pb::Decision::StepUp);
    let pending = stepped_up(&response);

    let step_up = step_up_of(&acme.approver, &pending).await;
    let shown = &step_up.context;
    assert_eq!(shown.get("vg_tx_to"), Some(&text(&hex0x(&VENDOR))));
    assert_eq!(shown.get("vg_tx_value"), Some(&num(5e18)));
    assert_eq!(
        shown.get("vg_tx_value_decimal"),
        Some(&text("5000000000000000000"))
    );
    assert_eq!(shown.get("vg_tx_chain_id"), Some(&num(1.0)));
    assert_eq!(shown.get("vg_tx_nonce"), Some(&num(4.0)));
    assert_eq!(shown.get("vg_tx_gas_limit"), Some(&num(90_000.0)));
    assert_eq!(shown.get("vg_tx_max_fee_per_gas"), Some(&num(4e10)));
    assert_eq!(
        shown.get("vg_sign_scheme"),
        Some(&text("eip1559_transaction"))
    );
    assert_eq!(
        shown.get("vg_payload_hash"),
        Some(&text(&hex::encode(keccak(&tx.unsigned()))))
    );

    approve(&acme.approver, &pending).await;
    let response = acme.agent.sign(request).await.expect("sign once approved");
    let signed = signed(&response);
    assert_signed_by(&key, &tx, &signed);
    server.stop().await;
}

#[tokio::test]
async fn typed_data_is_signed_over_its_eip712_hash_and_eth_account_recovers_the_key() {
    let (server, acme, key) = treasury().await;
    acme.rule(
        &key,
        pb::Effect::Allow,
        vec![
            cond("vg_eip712_primary_type", Op::Eq, text("Mail")),
            cond("vg_eip712_domain_name", Op::Eq, text("Ether Mail")),
            cond("vg_eip712_chain_id", Op::Eq, num(1.0)),
            cond(
                "vg_eip712_verifying_contract",
                Op::Eq,
                text("0xcccccccccccccccccccccccccccccccccccccccc"),
            ),
        ],
    )
    .await;
    let document = mail(1);
    let signed = sign_now(&acme.agent, sign_typed(&key.id, &document, "mail-1")).await;
    assert!(signed.signed_transaction.is_empty() && signed.transaction_hash.is_empty());
    // The EIP's own hash of this example.
    assert_eq!(
        hex::encode(&signed.payload_hash),
        "be609aee343fb3c4b28e1df9e632fca64fcfaede20f02e86244efddf30957bd2"
    );
    let read = eth_account(&json!({
        "kind": "typed_data",
        "typed_data": serde_json::from_str::<Value>(&document).unwrap(),
        "signature": hex::encode(&signed.signature),
    }));
    assert_eq!(
        read["signer"].as_str().unwrap().to_lowercase(),
        address_of(&key)
    );
    assert_eq!(read["hash"], hex::encode(&signed.payload_hash));

    // The same mail for another chain is not what the rule allows.
    expect_reason(
        acme.agent
            .sign(sign_typed(&key.id, &mail(5), "mail-2"))
            .await,
        Code::PermissionDenied,
        Reason::NoMatchingRule,
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------
// The attack: signing a refused transaction's hash as a digest.

#[tokio::test]
async fn a_refused_transaction_cannot_be_signed_as_its_digest_once_the_key_disables_digests() {
    let (server, acme, key) = treasury().await;
    // The treasury blocks payments over 1 ETH and allows the rest (other
    // uses of the key included, such as digests).
    let block = pb::Rule {
        priority: 10,
        ..when(
            vec![cond("vg_tx_value", Op::Gt, num(1e18))],
            with_counterpart(
                &acme.tenant.id,
                inbound(&format!("sign:{}", key.name), pb::Effect::Block),
            ),
        )
    };
    add_rule(&acme.admin, block).await;
    acme.allows(&key).await;

    let tx = Tx::pay(STRANGER, 50 * ETHER);
    expect_reason(
        acme.agent
            .sign(sign_tx(&key.id, tx.unsigned(), "steal-1"))
            .await,
        Code::PermissionDenied,
        Reason::PolicyBlocked,
    );

    // The exploit: the transaction's keccak256 as a digest carries no
    // `vg_tx_value`, so the BLOCK rule does not match, and the signature it
    // yields makes the refused transaction valid on chain.
    let digest = keccak(&tx.unsigned());
    let stolen = sign_now(&acme.agent, sign_digest(&key.id, digest, "steal-2")).await;
    let assembled = tx.signed_with(stolen.recovery_id, &stolen.r, &stolen.s);
    let read = eth_account(&json!({"kind": "transaction", "raw": hex::encode(&assembled)}));
    assert_eq!(
        read["sender"].as_str().unwrap().to_lowercase(),
        address_of(&key)
    );
    assert_eq!(read["value"], (50 * ETHER).to_string());

    // The fix: the admin disables digest signing on the key.
    let updated = set_digest_signing_disabled(&acme.admin, &key.id, true)
        .await
        .expect("update signing key");
    assert!(updated.disable_digest_signing);
    assert!(
        get_key(&acme.agent, &key.id)
            .await
            .unwrap()
            .disable_digest_signing
    );
    let updates = server.audit_events(&acme.tenant.id, "key.updated").await;
    assert_eq!(updates.len(), 1);
    let details: Value = serde_json::from_str(&updates[0].details).unwrap();
    assert_eq!(details["before"]["disable_digest_signing"], false);
    assert_eq!(details["after"]["disable_digest_signing"], true);
    assert_eq!(details["reason"], "transactions only");

    let before = ledger(&server, &acme.tenant.id).await;
    for idempotency_key in ["steal-3", "steal-2"] {
        let metadata = expect_reason(
            acme.agent
                .sign(sign_digest(&key.id, digest, idempotency_key))
                .await,
            Code::FailedPrecondition,
            Reason::DigestSigningDisabled,
        );
        assert_eq!(metadata.get("key_id"), Some(&key.id));
    }
    assert_eq!(ledger(&server, &acme.tenant.id).await, before);
    let refusals = server
        .audit_events(&acme.tenant.id, "key.sign_refused")
        .await;
    assert!(
        refusals
            .iter()
            .any(|event| event.details.contains("digest signing disabled"))
    );

    // The transaction itself is still judged, and still refused; a payment
    // within the policy still signs, and so does a message scheme.
    expect_reason(
        acme.agent
            .sign(sign_tx(&key.id, tx.unsigned(), "steal-4"))
            .await,
        Code::PermissionDenied,
        Reason::PolicyBlocked,
    );
    let small = Tx::pay(VENDOR, ETHER / 2);
    let signed = sign_now(&acme.agent, sign_tx(&key.id, small.unsigned(), "ok-1")).await;
    assert_signed_by(&key, &small, &signed);
    sign_now(
        &acme.agent,
        crate::vault_signing::sign_message(
            &key.id,
            b"hello",
            pb::SigningScheme::Eip191PersonalSign,
            "ok-2",
        ),
    )
    .await;

    // Turning it back on lets digests sign again.
    let updated = set_digest_signing_disabled(&acme.admin, &key.id, false)
        .await
        .unwrap();
    assert!(!updated.disable_digest_signing);
    sign_now(&acme.agent, sign_digest(&key.id, [7u8; 32], "digest-again")).await;
    server.stop().await;
}

#[tokio::test]
async fn a_key_created_without_digest_signing_refuses_digests_from_the_start() {
    let server = TestServer::start().await;
    let acme = Party::new(&server, "acme").await;
    let key = acme
        .admin
        .create_signing_key(pb::CreateSigningKeyRequest {
            name: "payments".to_owned(),
            algorithm: Alg::Secp256k1 as i32,
            description: String::new(),
            disable_digest_signing: true,
        })
        .await
        .unwrap()
        .key
        .unwrap();
    assert!(key.disable_digest_signing);
    acme.allows(&key).await;
    let created = server.audit_events(&acme.tenant.id, "key.created").await;
    assert!(
        created[0]
            .details
            .contains("\"disable_digest_signing\":true")
    );
    expect_reason(
        acme.agent
            .sign(sign_digest(&key.id, [1u8; 32], "d-1"))
            .await,
        Code::FailedPrecondition,
        Reason::DigestSigningDisabled,
    );
    let tx = Tx::erc20(VENDOR, 5);
    let signed = sign_now(&acme.agent, sign_tx(&key.id, tx.unsigned(), "t-1")).await;
    assert_signed_by(&key, &tx, &signed);
    server.stop().await;
}

// ---------------------------------------------------------------------------
// Bad input.

#[tokio::test]
async fn malformed_ethereum_payloads_are_invalid_arguments_that_write_nothing() {
    let (server, acme, key) = treasury().await;
    acme.allows(&key).await;
    let good = Tx::pay(VENDOR, ETHER).unsigned();
    let with = |index: usize, item: Vec<u8>| {
        let mut fields = Tx::pay(VENDOR, ETHER).fields();
        fields[index] = item;
        let mut out = vec![0x02];
        out.extend(rlp_list(&fields));
        out
    };
    let mut legacy = good.clone();
    legacy.remove(0);
    let mut eip2930 = good.clone();
    eip2930[0] = 0x01;
    let mut trailing = good.clone();
    trailing.push(0x80);
    let mut oversize = vec![0x02];
    oversize.extend(rlp_list(&[rlp_bytes(&vec![0u8; 128 * 1024])]));
    let signed = Tx::pay(VENDOR, ETHER).signed_with(1, &[1u8; 32], &[2u8; 32]);
    let transactions: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", Vec::new(), "is empty"),
        ("legacy", legacy, "type"),
        ("eip-2930", eip2930, "type"),
        ("trailing bytes", trailing, "trailing"),
        ("truncated", good[..good.len() - 2].to_vec(), "envelope"),
        ("oversize", oversize, "128 KiB"),
        ("non-canonical nonce", with(1, vec![0x81, 0x04]), "nonce"),
        (
            "leading zero",
            with(6, vec![0x83, 0x00, 0x01, 0x02]),
            "value",
        ),
        ("chain id 0", with(0, rlp_uint(0)), "chain_id"),
        ("short to", with(5, rlp_bytes(&[0x11; 19])), "to"),
        ("signed", signed, "is signed"),
        (
            "too few fields",
            {
                let mut out = vec![0x02];
                out.extend(rlp_list(&Tx::pay(VENDOR, 1).fields()[..8]));
                out
            },
            "access_list",
        ),
    ];
    let before = ledger(&server, &acme.tenant.id).await;
    for (label, raw, part) in transactions {
        let result = acme
            .agent
            .sign(sign_tx(&key.id, raw, label.replace(' ', "-").as_str()))
            .await;
        let err = expect_code(result, Code::InvalidArgument);
        let vaultguard_client::ClientError::Status {
            field_violations, ..
        } = &err
        else {
            panic!("{label}: not a status: {err:?}");
        };
        assert!(
            field_violations
                .iter()
                .any(|(field, description)| field == "ethereum_transaction"
                    && description.contains(part)),
            "{label}: {field_violations:?}"
        );
    }

    let mut unknown_type: Value = serde_json::from_str(&mail(1)).unwrap();
    unknown_type["types"]["Mail"][2]["type"] = json!("Letter");
    let mut extra_domain: Value = serde_json::from_str(&mail(1)).unwrap();
    extra_domain["domain"]["chain"] = json!(1);
    for (label, document) in [
        ("not json", "{\"types\":".to_owned()),
        ("not an object", "[1, 2]".to_owned()),
        ("unknown type", unknown_type.to_string()),
        ("domain chain id 0", mail(0)),
        ("unknown domain field", extra_domain.to_string()),
    ] {
        expect_invalid(
            acme.agent
                .sign(sign_typed(&key.id, &document, &label.replace(' ', "-")))
                .await,
            "typed_data",
        );
    }

    // Ethereum payloads need a secp256k1 key.
    for algorithm in [Alg::P256, Alg::Ed25519] {
        let other = acme
            .key(&format!("k-{}", algorithm as i32), algorithm)
            .await;
        acme.allows(&other).await;
        expect_invalid(
            acme.agent
                .sign(sign_tx(&other.id, good.clone(), "alg-tx"))
                .await,
            "ethereum_transaction",
        );
        expect_invalid(
            acme.agent
                .sign(sign_typed(&other.id, &mail(1), "alg-typed"))
                .await,
            "typed_data",
        );
    }
    assert_eq!(ledger(&server, &acme.tenant.id).await, before);
    server.stop().await;
}

// ---------------------------------------------------------------------------
// UpdateSigningKey: roles, tenants, bad input.

#[tokio::test]
async fn update_signing_key_is_for_the_key_s_own_admins_only() {
    let (server, acme, key) = treasury().await;
    let globex = Party::new(&server, "globex").await;

    // Another tenant's admin: NOT_FOUND, nothing changed, nothing audited
    // in acme's log.
    expect_code(
        set_digest_signing_disabled(&globex.admin, &key.id, true).await,
        Code::NotFound,
    );
    // An agent, an approver: not their role.
    expect_reason(
        set_digest_signing_disabled(&acme.agent, &key.id, true).await,
        Code::PermissionDenied,
        Reason::RoleRequired,
    );
    expect_reason(
        set_digest_signing_disabled(&acme.approver, &key.id, true).await,
        Code::PermissionDenied,
        Reason::RoleRequired,
    );
    assert!(
        !get_key(&acme.admin, &key.id)
            .await
            .unwrap()
            .disable_digest_signing
    );
    assert!(
        server
            .audit_events(&acme.tenant.id, "key.updated")
            .await
            .is_empty()
    );

    // No setting named; a bad id.
    expect_invalid(
        acme.admin
            .update_signing_key(pb::UpdateSigningKeyRequest {
                key_id: key.id.clone(),
                disable_digest_signing: None,
                reason: String::new(),
            })
            .await,
        "disable_digest_signing",
    );
    expect_invalid(
        set_digest_signing_disabled(&acme.admin, "key_nope", true).await,
        "key_id",
    );

    // A disabled key keeps its settings.
    disable_key(&acme.admin, &key.id).await.unwrap();
    expect_reason(
        set_digest_signing_disabled(&acme.admin, &key.id, true).await,
        Code::FailedPrecondition,
        Reason::KeyDisabled,
    );
    assert!(
        server
            .audit_events(&acme.tenant.id, "key.updated")
            .await
            .is_empty()
    );
    server.stop().await;
}
