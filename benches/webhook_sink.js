// A fast webhook receiver for benches/webhooks.sh (Node's http module, no dependencies).
//
// It does NOT verify signatures (tests/webhooks.rs does that with standardwebhooks): it only
// parses each call's JSON body, counts events and batches, and records each event's delivery
// latency, then answers 200. Loopback only.
//
//   node benches/webhook_sink.js          prints {"port": N} once it listens on 127.0.0.1:N
//
//   POST <any path but /reset>  a webhook call: counted, answered 200 `{}`.
//   POST /reset                 forgets everything counted so far.
//   GET  /stats                 {"events", "batches", "bytes", "max_id", "first_ms", "last_ms",
//                                "latency_time_ms": {"n", "p50", "p99", "max"},
//                                "latency_ts_ms": {...}}
// Times are Unix milliseconds (fractional) taken when a call's body has been read.
// latency_time_ms = that time − the envelope's `time` (the server's receive time, whole ms,
// so up to 1 ms too high); latency_ts_ms = that time − data.ts / 1000 (the µs stamp
// `tidewire bench fanout` puts in each event when it publishes: includes the publish itself).
"use strict";
const http = require("node:http");
const { performance } = require("node:perf_hooks");

let s;
function reset() {
  s = { events: 0, batches: 0, bytes: 0, maxId: 0, firstMs: null, lastMs: null, byTime: [], byTs: [] };
}
reset();

function nowMs() {
  return performance.timeOrigin + performance.now();
}

function pct(values) {
  if (values.length === 0) return { n: 0, p50: null, p99: null, max: null };
  const v = Float64Array.from(values).sort();
  const at = (q) => v[Math.min(v.length - 1, Math.floor(q * v.length))];
  return { n: v.length, p50: at(0.5), p99: at(0.99), max: v[v.length - 1] };
}

const server = http.createServer((req, res) => {
  const chunks = [];
  req.on("data", (c) => chunks.push(c));
  req.on("end", () => {
    const t = nowMs();
    if (req.method === "GET" && req.url === "/stats") {
      const out = {
        events: s.events, batches: s.batches, bytes: s.bytes, max_id: s.maxId,
        first_ms: s.firstMs, last_ms: s.lastMs,
        latency_time_ms: pct(s.byTime), latency_ts_ms: pct(s.byTs),
      };
      res.writeHead(200, { "content-type": "application/json" });
      res.end(JSON.stringify(out));
      return;
    }
    if (req.method === "POST" && req.url === "/reset") {
      reset();
      res.writeHead(200, { "content-type": "application/json" });
      res.end("{}");
      return;
    }
    const body = Buffer.concat(chunks);
    let events = [];
    try {
      events = JSON.parse(body).events || [];
    } catch (e) {
      res.writeHead(400, { "content-type": "application/json" });
      res.end("{}");
      return;
    }
    s.batches += 1;
    s.bytes += body.length;
    if (s.firstMs === null) s.firstMs = t;
    s.lastMs = t;
    for (const e of events) {
      s.events += 1;
      if (e.id > s.maxId) s.maxId = e.id;
      if (typeof e.time === "number") s.byTime.push(t - e.time);
      if (e.data && typeof e.data.ts === "number") s.byTs.push(t - e.data.ts / 1000);
    }
    res.writeHead(200, { "content-type": "application/json" });
    res.end("{}");
  });
});
server.keepAliveTimeout = 60000;
server.listen(0, "127.0.0.1", () => {
  process.stdout.write(JSON.stringify({ port: server.address().port }) + "\n");
});
