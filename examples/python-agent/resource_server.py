#!/usr/bin/env python3
"""A tiny resource server of the receiving tenant: it accepts a VaultGuard
delegation token only after verifying it OFFLINE, with PyJWT and the JWKS
VaultGuard publishes at `<issuer>/.well-known/jwks.json` (fetched once and
cached; refetched when a token names an unknown `kid`, e.g. after a key
rotation). It never calls VaultGuard's gRPC API.

    GET /actions/<action>   Authorization: Bearer <delegation token>

answers 200 with the verified claims when the token is a valid RFC 9068
access token (`typ: at+jwt`) of the expected issuer, addressed to this tenant
(`aud: urn:vaultguard:tenant:<tenant id>`), not expired, and granting exactly
<action>; 401 (bad or missing token) or 403 (another action) otherwise.

Standalone: python3 resource_server.py --tenant tnt_… --issuer http://127.0.0.1:8080
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import jwt

# The algorithms VaultGuard signs delegation tokens with (per tenant setting).
ALGORITHMS = ["RS256", "ES256", "EdDSA"]
REQUIRED_CLAIMS = ["iss", "sub", "aud", "exp", "nbf", "iat", "jti"]


class TokenVerifier:
    """Offline verification of delegation tokens against a cached JWKS."""

    def __init__(self, issuer: str, tenant_id: str, jwks_url: str | None = None) -> None:
        self.issuer = issuer.rstrip("/")
        self.audience = f"urn:vaultguard:tenant:{tenant_id}"
        self.jwks = jwt.PyJWKClient(jwks_url or f"{self.issuer}/.well-known/jwks.json")

    def verify(self, token: str) -> dict:
        """The verified claims; raises jwt.PyJWTError on any failed check."""
        header = jwt.get_unverified_header(token)
        if header.get("typ") != "at+jwt":
            raise jwt.InvalidTokenError(f"typ is {header.get('typ')!r}, not 'at+jwt'")
        key = self.jwks.get_signing_key_from_jwt(token)
        return jwt.decode(
            token,
            key=key.key,
            algorithms=ALGORITHMS,
            audience=self.audience,
            issuer=self.issuer,
            options={"require": REQUIRED_CLAIMS},
        )


def make_handler(verifier: TokenVerifier) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if not self.path.startswith("/actions/"):
                return self.reply(404, {"error": "not_found"})
            action = unquote(self.path[len("/actions/") :])
            scheme, _, token = self.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token:
                return self.reply(401, {"error": "invalid_token", "detail": "no bearer token"})
            try:
                claims = verifier.verify(token)
            except jwt.PyJWTError as err:
                return self.reply(401, {"error": "invalid_token", "detail": f"{type(err).__name__}: {err}"})
            if claims.get("action") != action:
                return self.reply(403, {"error": "insufficient_scope", "detail": f"token grants {claims.get('action')!r}"})
            self.reply(200, {"ok": True, "action": action, "claims": claims})

        def reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # quiet: the agent prints what matters

    return Handler


def start(verifier: TokenVerifier, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """Starts the server on a daemon thread; its URL is `url(server)`."""
    server = ThreadingHTTPServer((host, port), make_handler(verifier))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def url(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenant", required=True, help="this resource server's tenant id (tnt_…)")
    parser.add_argument("--issuer", default="http://127.0.0.1:8080", help="VaultGuard's issuer (its HTTP base URL)")
    parser.add_argument("--jwks-url", help="default: <issuer>/.well-known/jwks.json")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(TokenVerifier(args.issuer, args.tenant, args.jwks_url)))
    print(f"resource server of {args.tenant} on http://127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
