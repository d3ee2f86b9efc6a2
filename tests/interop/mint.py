"""Mints JWTs with PyJWT, an implementation independent of the server's `jsonwebtoken` crate.

Driven by tests/auth_interop.rs. Reads JSON on stdin: one token spec (prints one token) or an
array of specs (prints one token per line, in order). No network, no files written.

A spec:
    {"claims": {...}, "alg": "HS256"|"HS384"|"HS512"|"RS256"|"ES256", "key": KEY, "how": HOW}
KEY is one of
    {"secret": "text"}       an HMAC secret
    {"file": "path.pem"}     a private key PEM (for RS256/ES256)
    {"generate": "rsa"}      a fresh 2048-bit RSA key, thrown away after signing ("wrong key")
    {"generate": "ec"}       a fresh P-256 key, thrown away after signing
HOW (default "pyjwt") is one of
    "pyjwt"          jwt.encode(claims, key, algorithm=alg): the ordinary, valid way.
    "tamper"         signs `claims` with PyJWT, then swaps the payload segment for `tampered`
                     (another claims object), keeping the original header and signature.
    "truncate"       a PyJWT token with its signature segment removed (two segments).
    "garbage-header" a PyJWT token whose header segment is replaced by base64url("not json").
    "none"           BY HAND: header {"alg":"none","typ":"JWT"}, the claims, an empty signature.
                     (Built by hand so the bytes are exactly the classic `alg: none` attack, not
                     whatever a library's "none" support emits.)
    "hmac-file"      BY HAND: HMAC (alg HS256/384/512) keyed with the raw bytes of key["file"],
                     i.e. a public key PEM used as the HMAC secret: the RS/HS key-confusion attack.
                     PyJWT refuses to sign it (it rejects PEM-looking HMAC keys, InvalidKeyError),
                     so this is base64url(header) "." base64url(payload) "." base64url(HMAC(...)).
"""

import base64
import hashlib
import hmac
import json
import sys

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def compact(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def signing_key(key: dict):
    if "secret" in key:
        return key["secret"]
    if "file" in key:
        with open(key["file"], "rb") as f:
            return f.read()
    if key.get("generate") == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key.get("generate") == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"unknown key spec: {key}")


def by_hand(header: dict, claims: dict, signature: bytes) -> str:
    signing_input = b64url(compact(header)) + "." + b64url(compact(claims))
    return signing_input + "." + b64url(signature)


HMAC_HASHES = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}


def mint(spec: dict) -> str:
    how = spec.get("how", "pyjwt")
    claims = spec["claims"]
    alg = spec.get("alg")
    if how == "none":
        return by_hand({"alg": "none", "typ": "JWT"}, claims, b"")
    if how == "hmac-file":
        with open(spec["key"]["file"], "rb") as f:
            secret = f.read()
        header = {"alg": alg, "typ": "JWT"}
        signing_input = b64url(compact(header)) + "." + b64url(compact(claims))
        mac = hmac.new(secret, signing_input.encode("ascii"), HMAC_HASHES[alg]).digest()
        return signing_input + "." + b64url(mac)
    token = jwt.encode(claims, signing_key(spec["key"]), algorithm=alg)
    header, payload, signature = token.split(".")
    if how == "pyjwt":
        return token
    if how == "tamper":
        return header + "." + b64url(compact(spec["tampered"])) + "." + signature
    if how == "truncate":
        return header + "." + payload
    if how == "garbage-header":
        return b64url(b"not json") + "." + payload + "." + signature
    raise ValueError(f"unknown how: {how}")


def main() -> None:
    spec = json.load(sys.stdin)
    if isinstance(spec, list):
        for one in spec:
            print(mint(one))
    else:
        print(mint(spec))


if __name__ == "__main__":
    main()
