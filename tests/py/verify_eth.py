#!/usr/bin/env python3
"""Checks VaultGuard's Ethereum signatures with eth-account, an Ethereum
library independent of the server's (Rust alloy and RustCrypto k256): the
signed raw transaction decodes, its hash is keccak256 of it, its signature
is low-S with y-parity 0 or 1, and the sender it recovers is printed; EIP-712
typed data is hashed and its signer recovered the way wallets do.

Input (stdin): one JSON object, either
  {"kind": "transaction", "raw": "<hex of SignedPayload.signed_transaction>"}
or
  {"kind": "typed_data", "typed_data": {...}, "signature": "<hex r||s||v>"}.
Output (stdout): a JSON object of what eth-account read; exit 1 with the
reason on stderr when a check fails.
"""

import json
import sys

from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_account.typed_transactions import TypedTransaction
from eth_utils import keccak
from hexbytes import HexBytes

SECP256K1_HALF_ORDER = (
    0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141 // 2
)


def fail(reason: str) -> None:
    print(reason, file=sys.stderr)
    sys.exit(1)


def transaction(raw_hex: str) -> dict:
    raw = bytes.fromhex(raw_hex)
    if raw[:1] != b"\x02":
        fail(f"not an EIP-1559 transaction: type byte {raw[:1].hex()}")
    typed = TypedTransaction.from_bytes(HexBytes(raw))
    fields = typed.as_dict()
    v, r, s = typed.vrs()
    if v not in (0, 1):
        fail(f"y_parity is {v}, not 0 or 1")
    if s > SECP256K1_HALF_ORDER:
        fail("s is not low-S")
    to = fields.get("to") or b""
    return {
        "sender": Account.recover_transaction(raw),
        "hash": keccak(raw).hex(),
        "chain_id": fields["chainId"],
        "nonce": fields["nonce"],
        "gas": fields["gas"],
        "max_fee_per_gas": str(fields["maxFeePerGas"]),
        "max_priority_fee_per_gas": str(fields["maxPriorityFeePerGas"]),
        "to": "0x" + bytes(to).hex() if to else "",
        "value": str(fields["value"]),
        "data": bytes(fields["data"]).hex(),
        "y_parity": v,
    }


def typed_data(document: dict, signature_hex: str) -> dict:
    message = encode_typed_data(full_message=document)
    signature = bytes.fromhex(signature_hex)
    return {
        "signer": Account.recover_message(message, signature=signature),
        "hash": keccak(b"\x19" + message.version + message.header + message.body).hex(),
    }


def main() -> None:
    request = json.load(sys.stdin)
    try:
        if request["kind"] == "transaction":
            result = transaction(request["raw"])
        elif request["kind"] == "typed_data":
            result = typed_data(request["typed_data"], request["signature"])
        else:
            fail(f"unknown kind {request['kind']}")
            return
    except Exception as err:  # noqa: BLE001 - any refusal is the answer
        fail(f"{type(err).__name__}: {err}")
        return
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
