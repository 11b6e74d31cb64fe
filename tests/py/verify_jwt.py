#!/usr/bin/env python3
"""Verifies a VaultGuard delegation token offline with PyJWT, a JWT library
independent of the server's, the way a resource server would: only the token,
the published JWKS, the expected issuer and the expected audience.

Input (stdin): one JSON object {"token", "jwks", "issuer", "audience"}, where
"jwks" is the document served at /.well-known/jwks.json.
Output: on success, {"header": ..., "claims": ...} on stdout and exit 0; on
any failed check, the reason on stderr and exit 1.
"""

import json
import sys

import jwt

ALGORITHMS = ("RS256", "ES256", "EdDSA")
REQUIRED_CLAIMS = ["iss", "sub", "aud", "exp", "nbf", "iat", "jti"]


def fail(reason: str) -> None:
    print(reason, file=sys.stderr)
    sys.exit(1)


def main() -> None:
    request = json.load(sys.stdin)
    token = request["token"]
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as err:
        fail(f"malformed token: {err}")
    if header.get("typ") != "at+jwt":
        fail(f"typ is {header.get('typ')!r}, not 'at+jwt'")
    algorithm = header.get("alg")
    if algorithm not in ALGORITHMS:
        fail(f"unexpected alg {algorithm!r}")
    kid = header.get("kid")
    keys = [key for key in jwt.PyJWKSet.from_dict(request["jwks"]).keys if key.key_id == kid]
    if len(keys) != 1:
        fail(f"kid {kid!r} is not in the JWKS exactly once")
    key = keys[0]
    if key.algorithm_name != algorithm:
        fail(f"key {kid} is for {key.algorithm_name}, token says {algorithm}")
    try:
        claims = jwt.decode(
            token,
            key=key.key,
            algorithms=[algorithm],
            audience=request["audience"],
            issuer=request["issuer"],
            options={"require": REQUIRED_CLAIMS},
        )
    except jwt.PyJWTError as err:
        fail(f"rejected: {type(err).__name__}: {err}")
    print(json.dumps({"header": header, "claims": claims}))


if __name__ == "__main__":
    main()
