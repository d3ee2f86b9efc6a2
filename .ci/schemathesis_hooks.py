"""Schemathesis hooks for `.ci/run`: how a client that follows schemas/openapi.yaml puts tidewire's
request bodies and topic paths on the wire, where OpenAPI 3.1 has no words for it.

- `{topic}` path parameters hold slashes written literally (the document says so); OpenAPI tools
  percent-encode every `/` of a path parameter, so the URL's `%2F` are turned back into `/`.
- `Content-Encoding: gzip` means the body is gzip'd: every serializer below compresses the body
  when the generated request carries that header (so gzip is exercised for every format).
- `application/x-ndjson` bodies are arrays in the document, written one item per line;
  `application/msgpack` bodies and answers are MessagePack (Schemathesis knows neither).
- A one-topic publish whose envelope names a topic must name the path's topic: a cross-field rule
  JSON Schema cannot state, applied to schema-valid (positive) cases only.
- A webhook's `url` must resolve to an address `webhook_allow` lists (loopback by default) and
  a webhook's first PUT must name `url`, `topics` and `secret`: rules about the network and
  about what was put before, which JSON Schema cannot state. A schema-valid (positive) PUT of
  `/v1/webhooks/{name}` gets a loopback url (on the discard port, where nothing listens: calls
  fail and are retried, harmlessly), when it lacks them topics and a secret, and in `name`
  (meant for configuration tables) the path's name.
- `start=latest` and `start_time` are two starts, and both at once is a 400 (`invalid_start`):
  a rule between two query parameters OpenAPI cannot state. A schema-valid (positive) case
  that carries both keeps `start` only.

No failure is filtered: the deviations Schemathesis first found (array-form envelopes accepted,
`type`/`msg_id` query parameters checked only for bare bodies) are fixed in the server.
"""

import gzip
import json
from urllib.parse import unquote, urlsplit, urlunsplit

import msgpack
import schemathesis
from schemathesis.transport.prepare import prepare_url
from schemathesis.transport.serialization import Binary, serialize_binary


def _gzipped(ctx) -> bool:
    headers = ctx.case.headers or {}
    enc = next((v for k, v in headers.items() if k.lower() == "content-encoding"), None)
    return isinstance(enc, str) and enc.strip().lower() in ("gzip", "x-gzip")


def _wire(ctx, raw: bytes) -> bytes:
    return gzip.compress(raw) if _gzipped(ctx) else raw


def _align_topics(ctx, value):
    case = ctx.case
    if not case.meta or not case.meta.generation.mode.is_positive:
        return value
    topic = (case.path_parameters or {}).get("topic")
    if topic is None:
        return value
    # Some phases hold the parameter already percent-encoded.
    topic = unquote(str(topic))

    def fix(env):
        if isinstance(env, dict) and isinstance(env.get("topic"), str):
            return {**env, "topic": topic}
        return env

    if isinstance(value, list):
        return [fix(e) for e in value]
    return fix(value)


def _plain(value):
    """The generated value with Schemathesis' binary wrapper turned into bytes."""
    if isinstance(value, Binary):
        return value.data
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _json_bytes(value) -> bytes:
    if isinstance(value, bytes):
        return value
    return json.dumps(_plain(value), default=str).encode()


def _webhook_creatable(ctx, value):
    case = ctx.case
    if not case.meta or not case.meta.generation.mode.is_positive:
        return value
    if case.method.upper() != "PUT" or case.path != "/v1/webhooks/{name}":
        return value
    if not isinstance(value, dict):
        return value
    fixed = dict(value)
    # The body's `name` (for configuration tables) must be the path's.
    if "name" in fixed:
        fixed["name"] = str((case.path_parameters or {}).get("name", fixed["name"]))
    fixed["url"] = "http://127.0.0.1:9/schemathesis"
    if not fixed.get("topics"):
        fixed["topics"] = ["schemathesis/**"]
    if not isinstance(fixed.get("secret"), str):
        fixed["secret"] = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    return fixed


@schemathesis.serializer("application/json")
def json_body(ctx, value):
    return _wire(ctx, _json_bytes(_webhook_creatable(ctx, _align_topics(ctx, value))))


@schemathesis.serializer("application/x-ndjson")
def ndjson_body(ctx, value):
    value = _align_topics(ctx, value)
    if isinstance(value, list):
        raw = b"".join(_json_bytes(item) + b"\n" for item in value)
    else:
        raw = _json_bytes(value)
    return _wire(ctx, raw)


def _msgpack_able(value):
    """What MessagePack can carry of a generated value: lone surrogates in strings (valid in
    JSON text, not in UTF-8) become `?`, integers beyond 64 bits become floats."""
    if isinstance(value, str):
        return value.encode("utf-8", errors="replace").decode("utf-8")
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, dict):
            return {_msgpack_able(k): _msgpack_able(v) for k, v in value.items()}
        if isinstance(value, list):
            return [_msgpack_able(v) for v in value]
        return value
    if -(2**63) <= value < 2**64:
        return value
    return float(value) if abs(value) < 10**300 else 0.0


@schemathesis.serializer("application/msgpack")
def msgpack_body(ctx, value):
    value = _msgpack_able(_plain(_align_topics(ctx, value)))
    return _wire(ctx, msgpack.packb(value, use_bin_type=True))


@schemathesis.serializer("text/plain")
def text_body(ctx, value):
    if isinstance(value, bytes):
        raw = value
    elif isinstance(value, str):
        raw = value.encode("utf-8", errors="surrogatepass")
    else:
        raw = _json_bytes(value)
    return _wire(ctx, raw)


@schemathesis.serializer("application/octet-stream")
def bytes_body(ctx, value):
    return _wire(ctx, serialize_binary(value))


@schemathesis.deserializer("application/msgpack")
def msgpack_answer(ctx, response):
    return msgpack.unpackb(response.content, raw=False, strict_map_key=False)


@schemathesis.hook
def before_call(ctx, case, kwargs):
    query = case.query or {}
    if (
        "start" in query
        and "start_time" in query
        and case.meta
        and case.meta.generation.mode.is_positive
    ):
        query.pop("start_time")
        kwargs.get("params", {}).pop("start_time", None)
    if "{topic}" not in case.path:
        return
    parts = urlsplit(prepare_url(case, kwargs.get("base_url")))
    kwargs["url"] = urlunsplit(parts._replace(path=parts.path.replace("%2F", "/")))
