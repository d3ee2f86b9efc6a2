"""A webhook receiver that checks every call with an independent Standard Webhooks implementation.

Driven by tests/webhooks.rs. It verifies each POST with the PyPI `standardwebhooks` package
(`Webhook(secret).verify(body, headers)`), which shares no code with the server's signer, records
what arrived and what it answered, and answers as the test tells it to. Loopback only.

    python webhook_receiver.py [--port P] [--secret whsec_...] [--record FILE] [--control JSON]

It binds 127.0.0.1:P (P = 0: any free port) and prints one line, `{"port": N}`, once it listens.

Routes:
    POST <any other path>  a webhook call: verified, recorded, answered per the behaviour.
    GET  <any other path>  recorded too (method GET, unverified), answered 404: a followed
                           redirect would show here.
    GET  /calls?after=S    `{"calls": [call, ...], "pending": [...]}`: the calls with seq > S
                           (all by default), in arrival order; a call is recorded once it has
                           been answered. `pending`: {seq, path, webhook_id, event_ids} of the
                           calls that arrived and are not answered yet (sleeping, say).
    POST /control          sets the behaviour (JSON, below); answers `{"ok": true}`.
    GET  /health           200, for readiness.

A call as recorded:
    {"seq": n (arrival order, 1-based, continued across restarts with --record),
     "method": "POST"|"GET", "path": "/hook", "received_at_ms": float (Unix ms, on arrival),
     "webhook_id": str|null, "timestamp": str|null, "verified": bool, "verify_error": str|null,
     "event_ids": [..], "topics": [..], "times": [..], "gap": obj|null, "events": n,
     "body_sha256": hex, "content_type", "user_agent", "authorization": header values or null,
     "answered": status (int) or null when the answer could not be written (the caller gone),
     "slept": seconds slept before answering}

The behaviour (POST /control; every member optional; `path` scopes it to one request path,
otherwise it is the default for every path without its own):
    {"path": "/hook",
     "secret": "whsec_...",            the secret this path's calls are verified with
     "status": 200,                    the answer when nothing below applies
     "retry_after": "1",               a Retry-After header on that answer
     "location": "/elsewhere",         a Location header on that answer (for 3xx)
     "sleep": 0.0,                     seconds to wait before every answer (longer than the
                                       webhook's timeout: the server gives up first)
     "p500": 0.0, "p_slow": 0.0, "p429": 0.0, "seed": 1,
                                       per call, seeded: with probability p500 answer 500; with
                                       p_slow sleep `slow_secs` then answer 200; with p429 answer
                                       429 with Retry-After `retry_after_429`
     "slow_secs": 2.0, "retry_after_429": "1",
     "script": [behaviour, ...]}       answers for the next calls, one each, before the above
An unverified call is still answered per the behaviour (the test asserts on `verified`).
"""

import argparse
import hashlib
import json
import os
import random
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from standardwebhooks.webhooks import Webhook

DEFAULT_BEHAVIOUR = {
    "status": 200,
    "retry_after": None,
    "location": None,
    "sleep": 0.0,
    "p500": 0.0,
    "p_slow": 0.0,
    "p429": 0.0,
    "slow_secs": 2.0,
    "retry_after_429": "1",
}


class State:
    """Everything the handler threads share, behind one lock."""

    def __init__(self, secret, record_path, control):
        self.lock = threading.Lock()
        self.secrets = {None: secret}
        self.behaviours = {None: dict(DEFAULT_BEHAVIOUR)}
        self.scripts = {None: []}
        self.rngs = {None: random.Random(1)}
        self.calls = []
        self.pending = {}
        self.record_path = record_path
        self.next_seq = 1
        if record_path and os.path.exists(record_path):
            with open(record_path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        self.calls.append(json.loads(line))
            self.calls.sort(key=lambda c: c["seq"])
            if self.calls:
                self.next_seq = self.calls[-1]["seq"] + 1
        if control:
            self.control(control)

    def control(self, spec):
        with self.lock:
            path = spec.get("path")
            if "secret" in spec:
                self.secrets[path] = spec["secret"]
            base = dict(self.behaviours.get(path) or self.behaviours[None])
            for key in DEFAULT_BEHAVIOUR:
                if key in spec:
                    base[key] = spec[key]
            self.behaviours[path] = base
            if "script" in spec:
                self.scripts[path] = list(spec["script"])
            if "seed" in spec or path not in self.rngs:
                self.rngs[path] = random.Random(spec.get("seed", 1))

    def arrive(self, path):
        """A sequence number, the secret and the answer for a call that just arrived."""
        with self.lock:
            seq = self.next_seq
            self.next_seq += 1
            key = path if path in self.behaviours else None
            secret = self.secrets.get(path, self.secrets[None])
            behaviour = dict(self.behaviours[key])
            script = self.scripts.setdefault(key, [])
            if script:
                step = script.pop(0)
                answer = dict(DEFAULT_BEHAVIOUR)
                answer.update({k: v for k, v in step.items() if k in DEFAULT_BEHAVIOUR})
                return seq, secret, plan(answer, None)
            return seq, secret, plan(behaviour, self.rngs.setdefault(key, random.Random(1)))

    def begin(self, call):
        """Shows a call that arrived and is not answered yet under `pending`."""
        with self.lock:
            self.pending[call["seq"]] = {k: call.get(k) for k in ("seq", "path", "webhook_id",
                                                                   "event_ids")}

    def record(self, call):
        with self.lock:
            self.pending.pop(call["seq"], None)
            self.calls.append(call)
            self.calls.sort(key=lambda c: c["seq"])
            if self.record_path:
                with open(self.record_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(call) + "\n")
                    f.flush()
                    os.fsync(f.fileno())

    def calls_after(self, after):
        with self.lock:
            return {"calls": [c for c in self.calls if c["seq"] > after],
                    "pending": sorted(self.pending.values(), key=lambda c: c["seq"])}


def plan(b, rng):
    """(status, extra headers, seconds to sleep first) for one call under behaviour `b`."""
    headers = {}
    if rng is not None:
        r = rng.random()
        if r < b["p500"]:
            return 500, headers, b["sleep"]
        r -= b["p500"]
        if r < b["p_slow"]:
            return 200, headers, b["sleep"] + b["slow_secs"]
        r -= b["p_slow"]
        if r < b["p429"]:
            return 429, {"Retry-After": str(b["retry_after_429"])}, b["sleep"]
    if b["retry_after"] is not None:
        headers["Retry-After"] = str(b["retry_after"])
    if b["location"] is not None:
        headers["Location"] = b["location"]
    return b["status"], headers, b["sleep"]


def summarise(body):
    """Event ids, topics, times, gap and count of a call's body (empty when it is not JSON)."""
    try:
        doc = json.loads(body)
        events = doc.get("events") or []
        return {
            "event_ids": [e.get("id") for e in events],
            "topics": [e.get("topic") for e in events],
            "times": [e.get("time") for e in events],
            "gap": doc.get("gap"),
            "events": len(events),
        }
    except (ValueError, AttributeError) as e:
        return {"event_ids": [], "topics": [], "times": [], "gap": None, "events": 0,
                "parse_error": str(e)}


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A caller killed mid-connection (the server under test, with -9) is part of the test;
        # anything else is printed as usual.
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: State = None  # set on the class before serving

    def log_message(self, fmt, *args):  # quiet: the test prints what matters
        pass

    def reply(self, status, doc, headers=None):
        payload = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()

    def read_body(self):
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path == "/calls":
            after = int(parse_qs(url.query).get("after", ["0"])[0])
            self.reply(200, self.state.calls_after(after))
        elif url.path == "/health":
            self.reply(200, {"ok": True})
        else:
            # Nothing but /calls and /health is ever read: a GET elsewhere (a followed
            # redirect, say) is recorded as a call, unverified, and answered 404.
            seq, _, _ = self.state.arrive(url.path)
            call = {"seq": seq, "method": "GET", "path": url.path,
                    "received_at_ms": time.time() * 1000.0, "webhook_id": None,
                    "timestamp": None, "verified": False, "verify_error": "GET",
                    "body_sha256": None, "content_type": None,
                    "user_agent": self.headers.get("user-agent"), "authorization": None,
                    "slept": 0, "answered": 404}
            call.update(summarise(b""))
            self.reply(404, {"error": "not_found"})
            self.state.record(call)

    def do_POST(self):
        received_at_ms = time.time() * 1000.0
        url = urlsplit(self.path)
        body = self.read_body()
        if url.path == "/control":
            self.state.control(json.loads(body))
            self.reply(200, {"ok": True})
            return
        seq, secret, (status, headers, sleep) = self.state.arrive(url.path)
        verified, error = False, None
        try:
            Webhook(secret).verify(body, dict(self.headers.items()), json_parse=False)
            verified = True
        except Exception as e:  # the package's own error, or a malformed header
            error = f"{type(e).__name__}: {e}"
        call = {
            "seq": seq,
            "method": "POST",
            "path": url.path,
            "received_at_ms": received_at_ms,
            "webhook_id": self.headers.get("webhook-id"),
            "timestamp": self.headers.get("webhook-timestamp"),
            "verified": verified,
            "verify_error": error,
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "content_type": self.headers.get("content-type"),
            "user_agent": self.headers.get("user-agent"),
            "authorization": self.headers.get("authorization"),
            "slept": sleep,
        }
        call.update(summarise(body))
        self.state.begin(call)
        if sleep:
            time.sleep(sleep)
        try:
            self.reply(status, {"ok": 200 <= status < 300}, headers)
            call["answered"] = status
        except OSError:
            call["answered"] = None
            self.close_connection = True
        self.state.record(call)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--secret", default=None)
    ap.add_argument("--record", default=None, help="append each call here (JSON lines); "
                    "calls already in it are served too")
    ap.add_argument("--control", default=None, help="initial behaviour (JSON)")
    args = ap.parse_args()
    control = json.loads(args.control) if args.control else None
    Handler.state = State(args.secret, args.record, control)
    server = Server(("127.0.0.1", args.port), Handler)
    print(json.dumps({"port": server.server_address[1]}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
