//! Ethereum payloads that `Sign` decodes before the policy judges them.
//!
//! An agent that asks for a signature over an opaque digest describes what it
//! signs in context attributes it asserts itself. For the two Ethereum
//! payloads below VaultGuard reads the payload instead, so a rule can test
//! what will really happen on chain:
//!
//! - [`Transaction`]: an unsigned EIP-1559 transaction, `0x02 ‖
//!   rlp([chain_id, nonce, max_priority_fee_per_gas, max_fee_per_gas,
//!   gas_limit, to, value, data, access_list])`, decoded strictly (canonical
//!   RLP only: the bytes must be exactly what re-encoding the decoded fields
//!   gives, so what the policy saw is what the network will execute). Its
//!   signing hash is keccak256 of those bytes; [`Transaction::signed`] appends
//!   `y_parity, r, s` to produce the raw transaction for
//!   `eth_sendRawTransaction`.
//! - [`TypedData`]: EIP-712 typed data as `eth_signTypedData_v4` takes it
//!   (`{types, primaryType, domain, message}`), hashed by alloy's EIP-712
//!   implementation after stricter checks of the domain.
//!
//! Both expose what they say as [`Attribute`]s named `vg_tx_*`,
//! `vg_erc20_*` and `vg_eip712_*`. Unsigned 256-bit amounts become numbers
//! rounded *up* to the next `f64` ([`ceil_f64`]), so a value over a limit can
//! never compare as within it (`LTE`/`LT`); the exact amount is also given as
//! a decimal string.
//!
//! This module is pure: no I/O, no keys, no panics on any input (property
//! tested). Every refusal is a [`DecodeError`] naming the request field and
//! the part of the payload that is wrong.

use std::collections::BTreeMap;

use alloy_primitives::{Address, B256, U256, keccak256};
use alloy_rlp::{Decodable, Encodable, Header};

/// The largest transaction or typed-data document `Sign` takes: 128 KiB.
pub const MAX_PAYLOAD_BYTES: usize = 128 * 1024;

/// The EIP-2718 type byte of an EIP-1559 transaction.
const EIP1559_TYPE: u8 = 0x02;

/// The first byte of an RLP list: a legacy (untyped) transaction starts here.
const RLP_LIST_START: u8 = 0xc0;

/// `transfer(address,uint256)`, the ERC-20 transfer selector.
const ERC20_TRANSFER: [u8; 4] = [0xa9, 0x05, 0x9c, 0xbb];

/// An ERC-20 transfer's calldata: the selector and two 32-byte words.
const ERC20_TRANSFER_LEN: usize = 4 + 32 + 32;

/// The request field of an EIP-1559 transaction.
pub const TRANSACTION_FIELD: &str = "ethereum_transaction";

/// The request field of EIP-712 typed data.
pub const TYPED_DATA_FIELD: &str = "typed_data";

/// The most types a typed-data document may declare (bounds the depth of
/// the type graph alloy walks recursively).
const MAX_TYPES: usize = 64;

/// The most fields one declared type may have.
const MAX_TYPE_FIELDS: usize = 256;

/// The longest type or field name in a typed-data document.
const MAX_TYPE_NAME: usize = 256;

/// The most array dimensions of one field type (`uint256[][]` has two).
const MAX_ARRAY_DIMENSIONS: usize = 8;

/// The EIP-712 domain fields in the order EIP-712 encodes them, with their
/// types.
const DOMAIN_FIELDS: [(&str, &str); 5] = [
    ("name", "string"),
    ("version", "string"),
    ("chainId", "uint256"),
    ("verifyingContract", "address"),
    ("salt", "bytes32"),
];

/// Why a payload was refused: `field` is the request field
/// (`ethereum_transaction` or `typed_data`), `message` names the part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct DecodeError {
    /// The request field the payload came in.
    pub field: &'static str,
    /// What is wrong, starting with the part (`chain_id: must not be 0`).
    pub message: String,
}

fn tx_error(message: impl Into<String>) -> DecodeError {
    DecodeError {
        field: TRANSACTION_FIELD,
        message: message.into(),
    }
}

fn typed_error(message: impl Into<String>) -> DecodeError {
    DecodeError {
        field: TYPED_DATA_FIELD,
        message: message.into(),
    }
}

/// A policy attribute a payload exposes (the domain turns it into its own
/// attribute type).
#[derive(Debug, Clone, PartialEq)]
pub enum Attribute {
    /// A string: addresses are lowercase `0x` hex.
    String(String),
    /// A number; 256-bit amounts are rounded up ([`ceil_f64`]).
    Number(f64),
}

/// The attributes a payload exposes, by name.
pub type Attributes = BTreeMap<&'static str, Attribute>;

/// The smallest `f64` that is at least `value`: exact up to 2^53, rounded
/// up beyond (never down), so `ceil_f64(v) <= limit` implies `v <= limit`.
#[must_use]
pub fn ceil_f64(value: U256) -> f64 {
    const MANTISSA_BITS: usize = 53;
    let bits = value.bit_len();
    if bits <= MANTISSA_BITS {
        return value.saturating_to::<u64>() as f64;
    }
    let shift = bits - MANTISSA_BITS;
    let top = value >> shift;
    let exact = (top << shift) == value;
    // At most 2^53, which an f64 holds exactly; scaling by a power of two is
    // exact too (2^256 is far below f64::MAX).
    let mantissa = top.saturating_to::<u64>() + u64::from(!exact);
    let exponent = i32::try_from(shift).unwrap_or(i32::MAX);
    mantissa as f64 * 2f64.powi(exponent)
}

/// `0x` + lowercase hex of an address.
fn address_hex(address: &Address) -> String {
    format!("0x{}", hex::encode(address.as_slice()))
}

// ------------------------------------------------------------ transactions

/// An unsigned EIP-1559 transaction, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// EIP-155 chain id; never 0.
    pub chain_id: u64,
    /// The sender's nonce.
    pub nonce: u64,
    /// `max_priority_fee_per_gas`, wei.
    pub max_priority_fee_per_gas: U256,
    /// `max_fee_per_gas`, wei.
    pub max_fee_per_gas: U256,
    /// The gas limit.
    pub gas_limit: u64,
    /// The recipient; `None` creates a contract.
    pub to: Option<Address>,
    /// Wei sent.
    pub value: U256,
    /// Calldata (or init code for a creation).
    pub data: Vec<u8>,
    /// The access list: addresses with their storage keys.
    pub access_list: Vec<(Address, Vec<B256>)>,
    /// The RLP list payload as received (the nine fields, encoded), which
    /// the signature fields are appended to.
    fields: Vec<u8>,
    /// keccak256 of the whole unsigned transaction.
    signing_hash: [u8; 32],
}

/// An ERC-20 `transfer(address,uint256)` call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erc20Transfer {
    /// The token contract (the transaction's `to`).
    pub token: Address,
    /// Who receives the tokens.
    pub recipient: Address,
    /// How many of the token's base units.
    pub amount: U256,
}

/// Decodes one RLP scalar field of the transaction.
fn scalar<T: Decodable>(cursor: &mut &[u8], part: &str) -> Result<T, DecodeError> {
    if cursor.is_empty() {
        return Err(tx_error(format!(
            "{part}: missing (an unsigned EIP-1559 transaction has 9 fields)"
        )));
    }
    T::decode(cursor).map_err(|err| rlp_error(part, err))
}

/// Decodes one RLP byte string of the transaction.
fn byte_string<'a>(cursor: &mut &'a [u8], part: &str) -> Result<&'a [u8], DecodeError> {
    if cursor.is_empty() {
        return Err(tx_error(format!(
            "{part}: missing (an unsigned EIP-1559 transaction has 9 fields)"
        )));
    }
    Header::decode_bytes(cursor, false).map_err(|err| rlp_error(part, err))
}

fn rlp_error(part: &str, err: alloy_rlp::Error) -> DecodeError {
    use alloy_rlp::Error as E;
    let what = match err {
        E::Overflow => "is too large".to_owned(),
        E::LeadingZero => "is not canonical (leading zero)".to_owned(),
        E::InputTooShort => "is truncated".to_owned(),
        E::NonCanonicalSingleByte => "is not canonical (single byte as a string)".to_owned(),
        E::NonCanonicalSize => "is not canonical (length encoding)".to_owned(),
        E::UnexpectedLength => "has the wrong length".to_owned(),
        E::UnexpectedString => "must be an RLP list".to_owned(),
        E::UnexpectedList => "must be an RLP string, not a list".to_owned(),
        E::ListLengthMismatch { expected, got } => {
            format!("has {got} items where {expected} are expected")
        }
        E::Custom(message) => message.to_owned(),
    };
    tx_error(format!("{part}: invalid RLP: {what}"))
}

fn address_of(bytes: &[u8], part: &str) -> Result<Address, DecodeError> {
    Address::try_from(bytes).map_err(|_| tx_error(format!("{part}: must be a 20-byte address")))
}

fn decode_access_list(cursor: &mut &[u8]) -> Result<Vec<(Address, Vec<B256>)>, DecodeError> {
    const PART: &str = "access_list";
    if cursor.is_empty() {
        return Err(tx_error(format!(
            "{PART}: missing (an unsigned EIP-1559 transaction has 9 fields)"
        )));
    }
    let mut items = Header::decode_bytes(cursor, true).map_err(|err| rlp_error(PART, err))?;
    let mut list = Vec::new();
    while !items.is_empty() {
        let index = list.len();
        let part = format!("{PART}[{index}]");
        let mut item =
            Header::decode_bytes(&mut items, true).map_err(|err| rlp_error(&part, err))?;
        let address_part = format!("{part}.address");
        let address = Header::decode_bytes(&mut item, false)
            .map_err(|err| rlp_error(&address_part, err))
            .and_then(|bytes| address_of(bytes, &address_part))?;
        let keys_part = format!("{part}.storage_keys");
        if item.is_empty() {
            return Err(tx_error(format!("{keys_part}: missing")));
        }
        let mut keys_payload =
            Header::decode_bytes(&mut item, true).map_err(|err| rlp_error(&keys_part, err))?;
        let mut keys = Vec::new();
        while !keys_payload.is_empty() {
            let key_part = format!("{keys_part}[{}]", keys.len());
            let key = Header::decode_bytes(&mut keys_payload, false)
                .map_err(|err| rlp_error(&key_part, err))?;
            let key = B256::try_from(key)
                .map_err(|_| tx_error(format!("{key_part}: must be 32 bytes")))?;
            keys.push(key);
        }
        if !item.is_empty() {
            return Err(tx_error(format!(
                "{part}: must be [address, storage_keys] (it has more items)"
            )));
        }
        list.push((address, keys));
    }
    Ok(list)
}

/// How many RLP items `cursor` holds (for the error about extra fields);
/// `None` if they do not decode.
fn count_items(mut cursor: &[u8]) -> Option<usize> {
    let mut count = 0;
    while !cursor.is_empty() {
        let header = Header::decode(&mut cursor).ok()?;
        cursor = cursor.get(header.payload_length..)?;
        count += 1;
    }
    Some(count)
}

impl Transaction {
    /// Decodes an unsigned EIP-1559 transaction.
    ///
    /// # Errors
    ///
    /// [`DecodeError`] (field `ethereum_transaction`) for empty input or over
    /// [`MAX_PAYLOAD_BYTES`], another type byte (a legacy or EIP-2930/4844
    /// transaction), invalid or non-canonical RLP, a missing or extra field (a
    /// signed transaction has three more), trailing bytes, a `to` that is not
    /// 20 bytes or empty, integers over their width (chain id, nonce and gas
    /// limit 64 bits, the rest 256), chain id 0, or an ERC-20 `transfer`
    /// whose calldata does not hold a clean address and an amount.
    pub fn decode(raw: &[u8]) -> Result<Self, DecodeError> {
        if raw.is_empty() {
            return Err(tx_error("is empty"));
        }
        if raw.len() > MAX_PAYLOAD_BYTES {
            return Err(tx_error(format!(
                "is {} bytes, over the limit of {MAX_PAYLOAD_BYTES} (128 KiB)",
                raw.len()
            )));
        }
        let (&type_byte, rest) = raw.split_first().ok_or_else(|| tx_error("is empty"))?;
        if type_byte != EIP1559_TYPE {
            return Err(tx_error(if type_byte >= RLP_LIST_START {
                "type: a legacy transaction; only EIP-1559 (type 0x02) transactions are signed"
                    .to_owned()
            } else {
                format!(
                    "type: 0x{type_byte:02x}; only EIP-1559 (type 0x02) transactions are signed"
                )
            }));
        }
        let mut envelope = rest;
        let fields =
            Header::decode_bytes(&mut envelope, true).map_err(|err| rlp_error("envelope", err))?;
        if !envelope.is_empty() {
            return Err(tx_error(format!(
                "envelope: {} trailing bytes after the transaction",
                envelope.len()
            )));
        }
        let mut cursor = fields;
        let chain_id: u64 = scalar(&mut cursor, "chain_id")?;
        let nonce: u64 = scalar(&mut cursor, "nonce")?;
        let max_priority_fee_per_gas: U256 = scalar(&mut cursor, "max_priority_fee_per_gas")?;
        let max_fee_per_gas: U256 = scalar(&mut cursor, "max_fee_per_gas")?;
        let gas_limit: u64 = scalar(&mut cursor, "gas_limit")?;
        let to = match byte_string(&mut cursor, "to")? {
            [] => None,
            bytes => Some(address_of(bytes, "to")?),
        };
        let value: U256 = scalar(&mut cursor, "value")?;
        let data = byte_string(&mut cursor, "data")?.to_vec();
        let access_list = decode_access_list(&mut cursor)?;
        if !cursor.is_empty() {
            return Err(tx_error(match count_items(cursor) {
                Some(3) => {
                    "is signed (it carries y_parity, r and s): send the unsigned transaction"
                        .to_owned()
                }
                _ => "envelope: more than the 9 fields of an unsigned EIP-1559 transaction"
                    .to_owned(),
            }));
        }
        if chain_id == 0 {
            return Err(tx_error("chain_id: must not be 0"));
        }
        let transaction = Self {
            chain_id,
            nonce,
            max_priority_fee_per_gas,
            max_fee_per_gas,
            gas_limit,
            to,
            value,
            data,
            access_list,
            fields: fields.to_vec(),
            signing_hash: keccak256(raw).0,
        };
        // Defence in depth: every field decoder above refuses non-canonical
        // forms; re-encoding proves the signed bytes are exactly the fields
        // the policy judged.
        if transaction.encode_unsigned() != raw {
            return Err(tx_error("envelope: not canonically encoded"));
        }
        transaction.erc20_transfer()?;
        Ok(transaction)
    }

    /// The hash the key signs: keccak256 of the unsigned transaction.
    #[must_use]
    pub const fn signing_hash(&self) -> [u8; 32] {
        self.signing_hash
    }

    /// `0x02 ‖ rlp(fields)` re-encoded from the decoded fields.
    fn encode_unsigned(&self) -> Vec<u8> {
        let mut payload = Vec::with_capacity(self.fields.len());
        self.chain_id.encode(&mut payload);
        self.nonce.encode(&mut payload);
        self.max_priority_fee_per_gas.encode(&mut payload);
        self.max_fee_per_gas.encode(&mut payload);
        self.gas_limit.encode(&mut payload);
        match &self.to {
            Some(address) => address.encode(&mut payload),
            None => payload.push(alloy_rlp::EMPTY_STRING_CODE),
        }
        self.value.encode(&mut payload);
        self.data.as_slice().encode(&mut payload);
        let mut items = Vec::new();
        for (address, keys) in &self.access_list {
            let mut item = Vec::new();
            address.encode(&mut item);
            let mut keys_payload = Vec::new();
            for key in keys {
                key.encode(&mut keys_payload);
            }
            list_into(&mut item, &keys_payload);
            list_into(&mut items, &item);
        }
        list_into(&mut payload, &items);
        let mut out = Vec::with_capacity(payload.len() + 4);
        out.push(EIP1559_TYPE);
        list_into(&mut out, &payload);
        out
    }

    /// The signed raw transaction (`0x02 ‖ rlp([..fields, y_parity, r, s])`),
    /// ready for `eth_sendRawTransaction`. `r` and `s` are 32 bytes
    /// big-endian, `y_parity` the recovery id (0 or 1).
    #[must_use]
    pub fn signed(&self, y_parity: bool, r: &[u8; 32], s: &[u8; 32]) -> Vec<u8> {
        let mut payload = self.fields.clone();
        y_parity.encode(&mut payload);
        U256::from_be_bytes(*r).encode(&mut payload);
        U256::from_be_bytes(*s).encode(&mut payload);
        let mut out = Vec::with_capacity(payload.len() + 4);
        out.push(EIP1559_TYPE);
        list_into(&mut out, &payload);
        out
    }

    /// The ERC-20 transfer this transaction calls, if its calldata starts
    /// with `transfer(address,uint256)`. Solidity ignores calldata past the
    /// two words, so the words are read as a token would read them.
    ///
    /// # Errors
    ///
    /// A transfer whose calldata is shorter than 68 bytes or whose address
    /// word has bits above the 20 address bytes (tokens differ on those).
    pub fn erc20_transfer(&self) -> Result<Option<Erc20Transfer>, DecodeError> {
        let Some(token) = self.to else {
            return Ok(None);
        };
        if self.data.get(..4) != Some(ERC20_TRANSFER.as_slice()) {
            return Ok(None);
        }
        let words = self.data.get(4..ERC20_TRANSFER_LEN).ok_or_else(|| {
            tx_error(
                "data: an ERC-20 transfer(address,uint256) call must carry an address word \
                     and an amount word (68 bytes)",
            )
        })?;
        let (address_word, amount_word) = words.split_at(32);
        let (padding, recipient) = address_word.split_at(12);
        if padding.iter().any(|&b| b != 0) {
            return Err(tx_error(
                "data: the recipient word of an ERC-20 transfer has bits above the address",
            ));
        }
        Ok(Some(Erc20Transfer {
            token,
            recipient: address_of(recipient, "data")?,
            amount: U256::from_be_slice(amount_word),
        }))
    }

    /// The `vg_tx_*` (and for an ERC-20 transfer `vg_erc20_*`) attributes:
    ///
    /// | name | value |
    /// |---|---|
    /// | `vg_tx_type` | `"eip1559"` |
    /// | `vg_tx_chain_id` | number |
    /// | `vg_tx_nonce` | number |
    /// | `vg_tx_to` | lowercase `0x` address; `""` for a contract creation |
    /// | `vg_tx_value` | wei, number rounded up |
    /// | `vg_tx_value_decimal` | wei, exact decimal string |
    /// | `vg_tx_gas_limit` | number |
    /// | `vg_tx_max_fee_per_gas` | wei, number rounded up |
    /// | `vg_tx_max_priority_fee_per_gas` | wei, number rounded up |
    /// | `vg_tx_data_length` | bytes of calldata, number |
    /// | `vg_tx_selector` | `0x` + 8 hex of the first 4 calldata bytes; `""` when shorter or a creation |
    /// | `vg_erc20_token` | the token contract (= `vg_tx_to`) |
    /// | `vg_erc20_recipient` | lowercase `0x` address |
    /// | `vg_erc20_amount` | base units, number rounded up |
    /// | `vg_erc20_amount_decimal` | base units, exact decimal string |
    #[must_use]
    pub fn attributes(&self) -> Attributes {
        let mut out = Attributes::new();
        out.insert("vg_tx_type", Attribute::String("eip1559".to_owned()));
        out.insert(
            "vg_tx_chain_id",
            Attribute::Number(ceil_f64(U256::from(self.chain_id))),
        );
        out.insert(
            "vg_tx_nonce",
            Attribute::Number(ceil_f64(U256::from(self.nonce))),
        );
        out.insert(
            "vg_tx_to",
            Attribute::String(self.to.as_ref().map(address_hex).unwrap_or_default()),
        );
        out.insert("vg_tx_value", Attribute::Number(ceil_f64(self.value)));
        out.insert(
            "vg_tx_value_decimal",
            Attribute::String(self.value.to_string()),
        );
        out.insert(
            "vg_tx_gas_limit",
            Attribute::Number(ceil_f64(U256::from(self.gas_limit))),
        );
        out.insert(
            "vg_tx_max_fee_per_gas",
            Attribute::Number(ceil_f64(self.max_fee_per_gas)),
        );
        out.insert(
            "vg_tx_max_priority_fee_per_gas",
            Attribute::Number(ceil_f64(self.max_priority_fee_per_gas)),
        );
        out.insert(
            "vg_tx_data_length",
            Attribute::Number(ceil_f64(U256::from(self.data.len()))),
        );
        let selector = match (&self.to, self.data.get(..4)) {
            (Some(_), Some(selector)) => format!("0x{}", hex::encode(selector)),
            _ => String::new(),
        };
        out.insert("vg_tx_selector", Attribute::String(selector));
        if let Ok(Some(transfer)) = self.erc20_transfer() {
            out.insert(
                "vg_erc20_token",
                Attribute::String(address_hex(&transfer.token)),
            );
            out.insert(
                "vg_erc20_recipient",
                Attribute::String(address_hex(&transfer.recipient)),
            );
            out.insert(
                "vg_erc20_amount",
                Attribute::Number(ceil_f64(transfer.amount)),
            );
            out.insert(
                "vg_erc20_amount_decimal",
                Attribute::String(transfer.amount.to_string()),
            );
        }
        out
    }
}

/// Appends an RLP list header for `payload`, then `payload`.
fn list_into(out: &mut Vec<u8>, payload: &[u8]) {
    Header {
        list: true,
        payload_length: payload.len(),
    }
    .encode(out);
    out.extend_from_slice(payload);
}

/// keccak256 of a signed raw transaction: its transaction hash.
#[must_use]
pub fn transaction_hash(signed: &[u8]) -> [u8; 32] {
    keccak256(signed).0
}

// ------------------------------------------------------------- typed data

/// EIP-712 typed data, checked and hashed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypedData {
    /// `primaryType`.
    pub primary_type: String,
    /// `domain.name`, if given.
    pub domain_name: Option<String>,
    /// `domain.version`, if given.
    pub domain_version: Option<String>,
    /// `domain.chainId`, if given; never 0.
    pub chain_id: Option<U256>,
    /// `domain.verifyingContract`, if given.
    pub verifying_contract: Option<Address>,
    /// keccak256("\x19\x01" ‖ domainSeparator ‖ hashStruct(message)).
    signing_hash: [u8; 32],
}

/// The JSON kind of a value, for messages.
const fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Checks the shape alloy does not: the four members, the domain's keys,
/// `types.EIP712Domain` agreeing with the domain given, and the size of the
/// type graph.
fn check_typed_shape(document: &serde_json::Value) -> Result<(), DecodeError> {
    let serde_json::Value::Object(members) = document else {
        return Err(typed_error(format!(
            "must be a JSON object {{types, primaryType, domain, message}}, got {}",
            json_kind(document)
        )));
    };
    for key in members.keys() {
        if !["types", "primaryType", "domain", "message"].contains(&key.as_str()) {
            return Err(typed_error(format!(
                "{}: unknown member (expected types, primaryType, domain, message)",
                key.chars().take(64).collect::<String>()
            )));
        }
    }
    for required in ["types", "primaryType", "domain", "message"] {
        if !members.contains_key(required) {
            return Err(typed_error(format!("{required}: is required")));
        }
    }
    let Some(serde_json::Value::Object(types)) = members.get("types") else {
        return Err(typed_error("types: must be an object of type definitions"));
    };
    let Some(serde_json::Value::Object(domain)) = members.get("domain") else {
        return Err(typed_error("domain: must be an object"));
    };
    if !matches!(
        members.get("primaryType"),
        Some(serde_json::Value::String(_))
    ) {
        return Err(typed_error("primaryType: must be a string"));
    }
    if !matches!(members.get("message"), Some(serde_json::Value::Object(_))) {
        return Err(typed_error("message: must be an object"));
    }
    for key in ["name", "version"] {
        match domain.get(key) {
            None => {}
            Some(serde_json::Value::String(text)) if text.chars().count() <= MAX_TYPE_NAME => {}
            Some(_) => {
                return Err(typed_error(format!(
                    "domain.{key}: must be a string of at most {MAX_TYPE_NAME} characters"
                )));
            }
        }
    }
    for key in domain.keys() {
        if !DOMAIN_FIELDS.iter().any(|(name, _)| name == key) {
            return Err(typed_error(format!(
                "domain.{}: unknown domain field (EIP-712 defines name, version, chainId, \
                 verifyingContract, salt)",
                key.chars().take(64).collect::<String>()
            )));
        }
    }
    if types.len() > MAX_TYPES {
        return Err(typed_error(format!(
            "types: at most {MAX_TYPES} types, got {}",
            types.len()
        )));
    }
    for (name, fields) in types {
        let part = format!("types.{}", name.chars().take(64).collect::<String>());
        if name.len() > MAX_TYPE_NAME {
            return Err(typed_error(format!(
                "{part}: type names are at most {MAX_TYPE_NAME} characters"
            )));
        }
        let serde_json::Value::Array(fields) = fields else {
            return Err(typed_error(format!(
                "{part}: must be an array of {{name, type}}"
            )));
        };
        if fields.len() > MAX_TYPE_FIELDS {
            return Err(typed_error(format!(
                "{part}: at most {MAX_TYPE_FIELDS} fields"
            )));
        }
        for field in fields {
            let (Some(field_name), Some(field_type)) = (
                field.get("name").and_then(serde_json::Value::as_str),
                field.get("type").and_then(serde_json::Value::as_str),
            ) else {
                return Err(typed_error(format!(
                    "{part}: every field must be {{name, type}} strings"
                )));
            };
            if field_name.len() > MAX_TYPE_NAME || field_type.len() > MAX_TYPE_NAME {
                return Err(typed_error(format!(
                    "{part}: field names and types are at most {MAX_TYPE_NAME} characters"
                )));
            }
            if field_type.matches('[').count() > MAX_ARRAY_DIMENSIONS {
                return Err(typed_error(format!(
                    "{part}.{field_name}: at most {MAX_ARRAY_DIMENSIONS} array dimensions"
                )));
            }
        }
    }
    // alloy hashes the domain from the members given; a wallet from
    // `types.EIP712Domain`. When both are there they must agree, or the
    // hash signed would not be the one the verifying contract computes.
    if let Some(declared) = types.get("EIP712Domain") {
        let expected: Vec<(&str, &str)> = DOMAIN_FIELDS
            .iter()
            .copied()
            .filter(|(name, _)| domain.contains_key(*name))
            .collect();
        let declared: Vec<(&str, &str)> = declared
            .as_array()
            .map(|fields| {
                fields
                    .iter()
                    .map(|field| {
                        (
                            field
                                .get("name")
                                .and_then(serde_json::Value::as_str)
                                .unwrap_or(""),
                            field
                                .get("type")
                                .and_then(serde_json::Value::as_str)
                                .unwrap_or(""),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        if declared != expected {
            let spelled: Vec<String> = expected
                .iter()
                .map(|(name, ty)| format!("{ty} {name}"))
                .collect();
            return Err(typed_error(format!(
                "types.EIP712Domain: must declare exactly the domain's fields in EIP-712 order \
                 ({})",
                spelled.join(", ")
            )));
        }
    }
    Ok(())
}

impl TypedData {
    /// Checks and hashes EIP-712 typed data given as JSON text.
    ///
    /// # Errors
    ///
    /// [`DecodeError`] (field `typed_data`) for empty text or over
    /// [`MAX_PAYLOAD_BYTES`], text that is not one JSON object with exactly
    /// `types`, `primaryType`, `domain` and `message`, domain members other
    /// than EIP-712's five, a `types.EIP712Domain` that disagrees with the
    /// domain, more than 64 types, a type or field that does not resolve
    /// (unknown type, bad Solidity type, a message that does not fit its
    /// type), or `domain.chainId` 0.
    pub fn decode(json: &str) -> Result<Self, DecodeError> {
        if json.is_empty() {
            return Err(typed_error("is empty"));
        }
        if json.len() > MAX_PAYLOAD_BYTES {
            return Err(typed_error(format!(
                "is {} bytes, over the limit of {MAX_PAYLOAD_BYTES} (128 KiB)",
                json.len()
            )));
        }
        let document: serde_json::Value = serde_json::from_str(json)
            .map_err(|err| typed_error(format!("is not valid JSON: {err}")))?;
        check_typed_shape(&document)?;
        let typed: alloy_dyn_abi::TypedData = serde_json::from_value(document)
            .map_err(|err| typed_error(format!("does not parse as EIP-712 typed data: {err}")))?;
        if typed.domain.chain_id == Some(U256::ZERO) {
            return Err(typed_error("domain.chainId: must not be 0"));
        }
        let signing_hash = typed
            .eip712_signing_hash()
            .map_err(|err| typed_error(format!("types/message: {err}")))?;
        Ok(Self {
            domain_name: typed.domain.name.as_ref().map(ToString::to_string),
            domain_version: typed.domain.version.as_ref().map(ToString::to_string),
            chain_id: typed.domain.chain_id,
            verifying_contract: typed.domain.verifying_contract,
            primary_type: typed.primary_type,
            signing_hash: signing_hash.0,
        })
    }

    /// The EIP-712 signing hash: what the key signs, and the payload hash.
    #[must_use]
    pub const fn signing_hash(&self) -> [u8; 32] {
        self.signing_hash
    }

    /// The `vg_eip712_*` attributes: `vg_eip712_primary_type` always;
    /// `vg_eip712_domain_name`, `vg_eip712_domain_version`,
    /// `vg_eip712_chain_id` (number) and `vg_eip712_verifying_contract`
    /// (lowercase `0x` address) when the domain has them.
    #[must_use]
    pub fn attributes(&self) -> Attributes {
        let mut out = Attributes::new();
        out.insert(
            "vg_eip712_primary_type",
            Attribute::String(self.primary_type.clone()),
        );
        if let Some(name) = &self.domain_name {
            out.insert("vg_eip712_domain_name", Attribute::String(name.clone()));
        }
        if let Some(version) = &self.domain_version {
            out.insert(
                "vg_eip712_domain_version",
                Attribute::String(version.clone()),
            );
        }
        if let Some(chain_id) = self.chain_id {
            out.insert("vg_eip712_chain_id", Attribute::Number(ceil_f64(chain_id)));
        }
        if let Some(contract) = &self.verifying_contract {
            out.insert(
                "vg_eip712_verifying_contract",
                Attribute::String(address_hex(contract)),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::custody::{self, Algorithm, Payload};

    /// The private key of web3.js's documentation; its address is
    /// 0x2c7536E3605D9C16a7a3D7b1898e529396a65c23.
    const WEB3_KEY: &str = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318";

    // Vectors made with Python eth-account 0.14.0 (an independent
    // implementation): an ERC-20 transfer with an access list on chain 1...
    const TRANSFER_UNSIGNED: &str = "02f8a6010784773594008506fc23ac0082ea6094dac17f958d2ee523a2206206994597c13d831ec780b844a9059cbb000000000000000000000000b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0000000000000000000000000000000000000000000000000000000174876e800f838f794dac17f958d2ee523a2206206994597c13d831ec7e1a00000000000000000000000000000000000000000000000000000000000000001";
    const TRANSFER_SIGNING_HASH: &str =
        "9e32167dd7e7ed0e9e9f32cf7af7b01bcc63a11aec02aaa520d776f58058cda7";
    const TRANSFER_SIGNED: &str = "02f8e9010784773594008506fc23ac0082ea6094dac17f958d2ee523a2206206994597c13d831ec780b844a9059cbb000000000000000000000000b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0000000000000000000000000000000000000000000000000000000174876e800f838f794dac17f958d2ee523a2206206994597c13d831ec7e1a0000000000000000000000000000000000000000000000000000000000000000101a0c1acff5fc16fc829cee734f1b290ac191e605eb876b1b800118f32eac21e6786a07f98126941886921ddab1c928e88c29f966f313402f82e0d9dedf33b0f418235";
    const TRANSFER_HASH: &str = "42ddb95dd13247ff892b453455632e2b043aa42b37eaf832293d4269c2efbfb7";
    // ... and 1 ether to 0x…dEaD on Sepolia.
    const ETHER_UNSIGNED: &str =
        "02ea83aa36a780010282520894000000000000000000000000000000000000dead880de0b6b3a764000080c0";
    const ETHER_SIGNED: &str = "02f86d83aa36a780010282520894000000000000000000000000000000000000dead880de0b6b3a764000080c001a059e18e3fdbc888524aca2dee23533547d831c445e1030c306d8b2f8736ea06cda06a1d4a319b9ce195c651d895da1eed162492d99e6d3b402ce9c2ef805e1c0ff3";
    const ETHER_HASH: &str = "3730af2b12c8b8470cd771e5f8e6814f29e46a50f8d51cc85f61a91b51dbf730";

    /// The example of EIP-712 itself, with its published hash and the
    /// signature by keccak256("cow").
    pub(crate) const MAIL: &str = r#"{
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
            "chainId": 1,
            "verifyingContract": "0xCcCCccccCCCCcCCCCCCcCcCccCcCCCcCcccccccC"
        },
        "message": {
            "from": {"name": "Cow", "wallet": "0xCD2a3d9F938E13CD947Ec05AbC7FE734Df8DD826"},
            "to": {"name": "Bob", "wallet": "0xbBbBBBBbbBBBbbbBbbBbbbbBBbBbbbbBbBbbBBbB"},
            "contents": "Hello, Bob!"
        }
    }"#;
    const MAIL_HASH: &str = "be609aee343fb3c4b28e1df9e632fca64fcfaede20f02e86244efddf30957bd2";

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }

    fn string(attributes: &Attributes, name: &str) -> String {
        match attributes.get(name) {
            Some(Attribute::String(s)) => s.clone(),
            other => panic!("{name}: {other:?}"),
        }
    }

    fn number(attributes: &Attributes, name: &str) -> f64 {
        match attributes.get(name) {
            Some(Attribute::Number(n)) => *n,
            other => panic!("{name}: {other:?}"),
        }
    }

    fn tx_err(raw: &[u8]) -> String {
        let err = Transaction::decode(raw).unwrap_err();
        assert_eq!(err.field, TRANSACTION_FIELD);
        err.message
    }

    /// Signs `hash` with the web3 key through custody, as Sign does.
    fn sign_hash(hash: [u8; 32]) -> (bool, [u8; 32], [u8; 32]) {
        let signature =
            custody::sign(Algorithm::Secp256k1, &h(WEB3_KEY), &Payload::Digest(&hash)).unwrap();
        (
            signature.recovery_id == 1,
            signature.r.try_into().unwrap(),
            signature.s.try_into().unwrap(),
        )
    }

    #[test]
    fn erc20_transfer_decodes_and_signs_as_eth_account_does() {
        let tx = Transaction::decode(&h(TRANSFER_UNSIGNED)).unwrap();
        assert_eq!(tx.signing_hash().to_vec(), h(TRANSFER_SIGNING_HASH));
        assert_eq!((tx.chain_id, tx.nonce, tx.gas_limit), (1, 7, 60_000));
        assert_eq!(tx.max_priority_fee_per_gas, U256::from(2_000_000_000u64));
        assert_eq!(tx.max_fee_per_gas, U256::from(30_000_000_000u64));
        assert_eq!(tx.value, U256::ZERO);
        assert_eq!(tx.access_list.len(), 1);
        assert_eq!(tx.access_list[0].1.len(), 1);

        let attributes = tx.attributes();
        assert_eq!(string(&attributes, "vg_tx_type"), "eip1559");
        assert_eq!(number(&attributes, "vg_tx_chain_id"), 1.0);
        assert_eq!(number(&attributes, "vg_tx_nonce"), 7.0);
        assert_eq!(
            string(&attributes, "vg_tx_to"),
            "0xdac17f958d2ee523a2206206994597c13d831ec7"
        );
        assert_eq!(number(&attributes, "vg_tx_value"), 0.0);
        assert_eq!(string(&attributes, "vg_tx_value_decimal"), "0");
        assert_eq!(number(&attributes, "vg_tx_gas_limit"), 60_000.0);
        assert_eq!(number(&attributes, "vg_tx_max_fee_per_gas"), 30e9);
        assert_eq!(number(&attributes, "vg_tx_max_priority_fee_per_gas"), 2e9);
        assert_eq!(number(&attributes, "vg_tx_data_length"), 68.0);
        assert_eq!(string(&attributes, "vg_tx_selector"), "0xa9059cbb");
        assert_eq!(
            string(&attributes, "vg_erc20_token"),
            "0xdac17f958d2ee523a2206206994597c13d831ec7"
        );
        assert_eq!(
            string(&attributes, "vg_erc20_recipient"),
            "0xb0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0"
        );
        assert_eq!(number(&attributes, "vg_erc20_amount"), 100_000_000_000.0);
        assert_eq!(
            string(&attributes, "vg_erc20_amount_decimal"),
            "100000000000"
        );

        let (parity, r, s) = sign_hash(tx.signing_hash());
        let signed = tx.signed(parity, &r, &s);
        assert_eq!(hex::encode(&signed), TRANSFER_SIGNED);
        assert_eq!(hex::encode(transaction_hash(&signed)), TRANSFER_HASH);
        // The signed form is refused as a payload.
        assert!(tx_err(&signed).contains("is signed"), "{}", tx_err(&signed));
    }

    #[test]
    fn ether_transfer_decodes_and_signs_as_eth_account_does() {
        let tx = Transaction::decode(&h(ETHER_UNSIGNED)).unwrap();
        let attributes = tx.attributes();
        assert_eq!(number(&attributes, "vg_tx_chain_id"), 11_155_111.0);
        assert_eq!(number(&attributes, "vg_tx_value"), 1e18);
        assert_eq!(
            string(&attributes, "vg_tx_value_decimal"),
            "1000000000000000000"
        );
        assert_eq!(
            string(&attributes, "vg_tx_to"),
            "0x000000000000000000000000000000000000dead"
        );
        assert_eq!(string(&attributes, "vg_tx_selector"), "");
        assert!(!attributes.contains_key("vg_erc20_amount"));
        let (parity, r, s) = sign_hash(tx.signing_hash());
        let signed = tx.signed(parity, &r, &s);
        assert_eq!(hex::encode(&signed), ETHER_SIGNED);
        assert_eq!(hex::encode(transaction_hash(&signed)), ETHER_HASH);
    }

    /// `0x02 ‖ rlp(items)` from already-encoded items.
    fn envelope(items: &[Vec<u8>]) -> Vec<u8> {
        let payload = items.concat();
        let mut out = vec![EIP1559_TYPE];
        list_into(&mut out, &payload);
        out
    }

    fn rlp<T: Encodable + ?Sized>(value: &T) -> Vec<u8> {
        let mut out = Vec::new();
        value.encode(&mut out);
        out
    }

    /// The nine encoded fields of a plain transfer on chain `chain_id`.
    fn fields(chain_id: u64) -> Vec<Vec<u8>> {
        vec![
            rlp(&chain_id),
            rlp(&3u64),
            rlp(&U256::from(1u8)),
            rlp(&U256::from(2u8)),
            rlp(&21_000u64),
            rlp(&Address::repeat_byte(0x11)),
            rlp(&U256::from(5u8)),
            rlp(&[0u8; 0][..]),
            vec![0xc0],
        ]
    }

    #[test]
    fn creation_has_no_recipient_or_selector() {
        let mut items = fields(1);
        items[5] = vec![0x80];
        items[7] = rlp(&ERC20_TRANSFER[..]);
        let tx = Transaction::decode(&envelope(&items)).unwrap();
        assert_eq!(tx.to, None);
        let attributes = tx.attributes();
        assert_eq!(string(&attributes, "vg_tx_to"), "");
        assert_eq!(string(&attributes, "vg_tx_selector"), "");
        assert!(!attributes.contains_key("vg_erc20_recipient"));
    }

    #[test]
    fn malformed_transactions_name_the_part() {
        let good = envelope(&fields(1));
        assert!(Transaction::decode(&good).is_ok());
        assert_eq!(tx_err(&[]), "is empty");
        assert!(tx_err(&vec![2u8; MAX_PAYLOAD_BYTES + 1]).contains("over the limit"));
        // A legacy transaction is an RLP list; type 1 is EIP-2930.
        assert!(tx_err(&good[1..]).starts_with("type: a legacy transaction"));
        let mut eip2930 = good.clone();
        eip2930[0] = 0x01;
        assert!(tx_err(&eip2930).starts_with("type: 0x01"));
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(tx_err(&trailing).contains("trailing bytes"));
        assert!(tx_err(&good[..good.len() - 1]).starts_with("envelope: invalid RLP"));
        assert_eq!(tx_err(&envelope(&fields(0))), "chain_id: must not be 0");

        let with = |index: usize, item: Vec<u8>| {
            let mut items = fields(1);
            items[index] = item;
            tx_err(&envelope(&items))
        };
        // 7 encoded as the string [0x07] rather than the byte itself.
        assert!(with(1, vec![0x81, 0x07]).starts_with("nonce: invalid RLP: is not canonical"));
        assert!(
            with(1, vec![0x82, 0x00, 0x07]).starts_with("nonce: invalid RLP: is not canonical")
        );
        assert!(with(0, rlp(&U256::MAX)).starts_with("chain_id: invalid RLP: is too large"));
        assert!(
            with(2, vec![0x82, 0x00, 0x01])
                .starts_with("max_priority_fee_per_gas: invalid RLP: is not canonical")
        );
        assert!(with(5, rlp(&[0x11u8; 19][..])).starts_with("to: must be a 20-byte address"));
        assert!(with(6, vec![0xc0]).starts_with("value: invalid RLP"));
        assert!(with(8, vec![0x80]).starts_with("access_list: invalid RLP"));
        assert!(with(8, vec![0xc1, 0xc0]).starts_with("access_list[0].address"));

        let mut short = fields(1);
        short.pop();
        assert!(tx_err(&envelope(&short)).starts_with("access_list: missing"));
        let mut long = fields(1);
        long.push(rlp(&1u8));
        assert!(tx_err(&envelope(&long)).contains("more than the 9 fields"));

        // A transfer call too short to hold its words, or with a dirty
        // address word.
        let mut transfer = ERC20_TRANSFER.to_vec();
        transfer.extend_from_slice(&[0u8; 63]);
        assert!(with(7, rlp(transfer.as_slice())).contains("ERC-20 transfer"));
        let mut dirty = ERC20_TRANSFER.to_vec();
        dirty.extend_from_slice(&[1u8; 64]);
        assert!(with(7, rlp(dirty.as_slice())).contains("bits above the address"));
    }

    #[test]
    fn transfer_calldata_past_the_two_words_is_ignored_as_solidity_does() {
        let mut data = ERC20_TRANSFER.to_vec();
        data.extend_from_slice(&[0u8; 12]);
        data.extend_from_slice(&[0x22; 20]);
        data.extend_from_slice(&U256::from(9u8).to_be_bytes::<32>());
        data.extend_from_slice(b"extra");
        let mut items = fields(1);
        items[7] = rlp(data.as_slice());
        let attributes = Transaction::decode(&envelope(&items)).unwrap().attributes();
        assert_eq!(number(&attributes, "vg_erc20_amount"), 9.0);
        assert_eq!(
            string(&attributes, "vg_erc20_recipient"),
            format!("0x{}", "22".repeat(20))
        );
    }

    #[test]
    fn amounts_round_up_never_down() {
        let two53 = U256::from(1u64 << 53);
        assert_eq!(ceil_f64(U256::ZERO), 0.0);
        assert_eq!(ceil_f64(two53), 9_007_199_254_740_992.0);
        // 2^53 + 1 has no f64: the next one up is 2^53 + 2.
        assert_eq!(ceil_f64(two53 + U256::from(1u8)), 9_007_199_254_740_994.0);
        let ether = U256::from(10u64).pow(U256::from(18u8));
        assert_eq!(ceil_f64(ether), 1e18);
        assert!(ceil_f64(ether + U256::from(1u8)) > 1e18);
        assert!(ceil_f64(U256::MAX).is_finite());
        assert!(ceil_f64(U256::MAX) >= 1.157_920_892_373_162e77);
    }

    #[test]
    fn eip712_mail_hashes_and_signs_as_the_eip_says() {
        let typed = TypedData::decode(MAIL).unwrap();
        assert_eq!(hex::encode(typed.signing_hash()), MAIL_HASH);
        let attributes = typed.attributes();
        assert_eq!(string(&attributes, "vg_eip712_primary_type"), "Mail");
        assert_eq!(string(&attributes, "vg_eip712_domain_name"), "Ether Mail");
        assert_eq!(string(&attributes, "vg_eip712_domain_version"), "1");
        assert_eq!(number(&attributes, "vg_eip712_chain_id"), 1.0);
        assert_eq!(
            string(&attributes, "vg_eip712_verifying_contract"),
            "0xcccccccccccccccccccccccccccccccccccccccc"
        );
        let cow = keccak256(b"cow");
        let signature = custody::sign(
            Algorithm::Secp256k1,
            cow.as_slice(),
            &Payload::Digest(&typed.signing_hash()),
        )
        .unwrap();
        assert_eq!(
            hex::encode(&signature.r),
            "4355c47d63924e8a72e509b65029052eb6c299d53a04e167c5775fd466751c9d"
        );
        assert_eq!(
            hex::encode(&signature.s),
            "07299936d304c153f6443dfa05f40ff007d72911b6f72307f996231605b91562"
        );
        assert_eq!(signature.v, 28);
    }

    fn typed_err(json: &str) -> String {
        let err = TypedData::decode(json).unwrap_err();
        assert_eq!(err.field, TYPED_DATA_FIELD);
        err.message
    }

    fn mail_with(edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut document: serde_json::Value = serde_json::from_str(MAIL).unwrap();
        edit(&mut document);
        document.to_string()
    }

    #[test]
    fn malformed_typed_data_names_the_part() {
        assert_eq!(typed_err(""), "is empty");
        assert!(typed_err("{").starts_with("is not valid JSON"));
        assert!(typed_err("[]").starts_with("must be a JSON object"));
        assert!(
            typed_err(&format!("\"{}\"", "a".repeat(MAX_PAYLOAD_BYTES))).contains("over the limit")
        );
        assert_eq!(
            typed_err(&mail_with(|d| d["domain"]["chainId"] = 0.into())),
            "domain.chainId: must not be 0"
        );
        assert!(
            typed_err(&mail_with(|d| {
                d["types"]["Mail"][2]["type"] = "Letter".into();
            }))
            .starts_with("types/message:")
        );
        assert!(
            typed_err(&mail_with(|d| d["primaryType"] = "Parcel".into()))
                .starts_with("types/message:")
        );
        assert!(
            typed_err(&mail_with(|d| {
                d["message"].as_object_mut().unwrap().remove("contents");
            }))
            .starts_with("types/message:")
        );
        assert_eq!(
            typed_err(&mail_with(|d| {
                d.as_object_mut().unwrap().remove("domain");
            })),
            "domain: is required"
        );
        assert!(
            typed_err(&mail_with(|d| d["extra"] = 1.into())).starts_with("extra: unknown member")
        );
        assert!(
            typed_err(&mail_with(|d| d["domain"]["chainid"] = 5.into()))
                .starts_with("domain.chainid: unknown domain field")
        );
        // The domain declares a salt the domain does not have.
        assert!(
            typed_err(&mail_with(|d| {
                d["domain"].as_object_mut().unwrap().remove("version");
            }))
            .starts_with("types.EIP712Domain: must declare exactly")
        );
        assert!(
            typed_err(&mail_with(|d| {
                d["types"]["Person"][0]["type"] = format!("string{}", "[]".repeat(9)).into();
            }))
            .contains("array dimensions")
        );
        // A type that contains itself neither hashes nor overflows the stack.
        let recursive = mail_with(|d| {
            d["types"]["Person"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({"name": "friend", "type": "Person"}));
        });
        assert!(TypedData::decode(&recursive).is_err());
    }

    #[test]
    fn typed_data_without_chain_or_contract_exposes_what_it_has() {
        let document = mail_with(|d| {
            d["domain"] = serde_json::json!({"name": "Ether Mail"});
            d["types"]["EIP712Domain"] = serde_json::json!([{"name": "name", "type": "string"}]);
        });
        let attributes = TypedData::decode(&document).unwrap().attributes();
        assert_eq!(string(&attributes, "vg_eip712_domain_name"), "Ether Mail");
        assert!(!attributes.contains_key("vg_eip712_chain_id"));
        assert!(!attributes.contains_key("vg_eip712_verifying_contract"));
    }
}

/// Property tests: no input panics a decoder; what decodes re-encodes to
/// itself; rounding up is exact.
#[cfg(test)]
mod props {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use proptest::prelude::*;

    use super::*;
    use crate::props::{PURE_CASES, config};

    /// The exact integer an `f64` of at least 2^0 holds.
    fn exact(value: f64) -> U256 {
        let bits = value.to_bits();
        let exponent = i32::try_from((bits >> 52) & 0x7ff).unwrap() - 1075;
        let mantissa = U256::from((bits & ((1u64 << 52) - 1)) | (1u64 << 52));
        if exponent >= 0 {
            mantissa << usize::try_from(exponent).unwrap()
        } else {
            mantissa >> usize::try_from(-exponent).unwrap()
        }
    }

    fn valid_transaction() -> impl Strategy<Value = Vec<u8>> {
        (
            1u64..,
            any::<u64>(),
            any::<[u8; 32]>(),
            any::<u64>(),
            proptest::option::of(any::<[u8; 20]>()),
            any::<[u8; 32]>(),
            prop::collection::vec(any::<u8>(), 0..80),
            prop::collection::vec(
                (
                    any::<[u8; 20]>(),
                    prop::collection::vec(any::<[u8; 32]>(), 0..3),
                ),
                0..3,
            ),
        )
            .prop_map(|(chain_id, nonce, fee, gas, to, value, data, access)| {
                let tx = Transaction {
                    chain_id,
                    nonce,
                    max_priority_fee_per_gas: U256::from_be_bytes(fee) >> 8,
                    max_fee_per_gas: U256::from_be_bytes(fee),
                    gas_limit: gas,
                    to: to.map(Address::from),
                    value: U256::from_be_bytes(value),
                    data,
                    access_list: access
                        .into_iter()
                        .map(|(a, keys)| {
                            (Address::from(a), keys.into_iter().map(B256::from).collect())
                        })
                        .collect(),
                    fields: Vec::new(),
                    signing_hash: [0; 32],
                };
                tx.encode_unsigned()
            })
    }

    /// A valid transaction with one byte changed, cut short, or grown.
    fn mutated_transaction() -> impl Strategy<Value = Vec<u8>> {
        (
            valid_transaction(),
            any::<prop::sample::Index>(),
            any::<u8>(),
            0u8..3,
        )
            .prop_map(|(mut raw, index, byte, how)| {
                let at = index.index(raw.len());
                match how {
                    0 => raw[at] = byte,
                    1 => raw.truncate(at),
                    _ => raw.insert(at, byte),
                }
                raw
            })
    }

    proptest! {
        #![proptest_config(config(PURE_CASES))]

        #[test]
        fn random_bytes_never_panic_the_transaction_decoder(
            raw in prop_oneof![
                prop::collection::vec(any::<u8>(), 0..300),
                prop::collection::vec(any::<u8>(), 0..300).prop_map(|rest| [vec![2u8], rest].concat()),
                mutated_transaction(),
            ]
        ) {
            if let Ok(tx) = Transaction::decode(&raw) {
                prop_assert_eq!(tx.encode_unsigned(), raw.clone());
                prop_assert_eq!(tx.signing_hash(), keccak256(&raw).0);
                let _ = tx.attributes();
                let _ = tx.signed(true, &[1; 32], &[2; 32]);
            }
        }

        #[test]
        fn valid_transactions_decode_to_what_they_encode(raw in valid_transaction()) {
            match Transaction::decode(&raw) {
                Ok(tx) => prop_assert_eq!(tx.encode_unsigned(), raw),
                // Calldata that happens to start with the transfer selector.
                Err(err) => prop_assert!(err.message.contains("ERC-20"), "{err}"),
            }
        }

        #[test]
        fn random_text_never_panics_the_typed_data_decoder(
            json in prop_oneof![
                any::<String>(),
                "[{}\\[\\]\":,a-zA-Z0-9 ]{0,200}".prop_map(String::from),
                (any::<prop::sample::Index>(), any::<char>()).prop_map(|(index, c)| {
                    let mut text = tests::MAIL.to_owned();
                    let mut at = index.index(text.len());
                    while !text.is_char_boundary(at) {
                        at -= 1;
                    }
                    text.insert(at, c);
                    text
                }),
            ]
        ) {
            if let Ok(typed) = TypedData::decode(&json) {
                let _ = typed.attributes();
            }
        }

        #[test]
        fn rounding_up_is_the_least_f64_not_below(bytes in any::<[u8; 32]>(), width in 0usize..=256) {
            let value = if width == 0 { U256::ZERO } else { U256::from_be_bytes(bytes) >> (256 - width) };
            let rounded = ceil_f64(value);
            if value.is_zero() {
                prop_assert_eq!(rounded, 0.0);
            } else {
                prop_assert!(exact(rounded) >= value);
                let below = f64::from_bits(rounded.to_bits() - 1);
                prop_assert!(below < 1.0 || exact(below) < value);
            }
        }
    }
}
