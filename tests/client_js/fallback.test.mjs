// The browser client (src/http/client/client.js) run by Node against the real tidewire whose
// URL tests/client_js.rs passes in TIDEWIRE_URL, through a small proxy of this file's own that
// can play an unreachable upstream (502), a proxy that holds event streams back (headers
// pass, bodies never do), one that cuts every connection, and one that loses the answer to a
// publish the server did store. Node has fetch and streams, so the `sse` and `poll`
// transports run here unchanged; the WebSocket is covered in Chromium (tests/client_browser.rs).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';

import { Tidewire } from '../../src/http/client/client.js';

const UPSTREAM = process.env.TIDEWIRE_URL;

function upstream() {
  assert.ok(UPSTREAM, 'TIDEWIRE_URL must name a running tidewire (tests/client_js.rs sets it)');
  return UPSTREAM;
}

/** A proxy in front of tidewire whose behaviour the test switches with `proxy.mode`. */
async function startProxy() {
  const target = new URL(upstream());
  const sockets = new Set();
  const proxy = { mode: 'pass', lostAnswers: 0 };
  const server = http.createServer((req, res) => {
    if (proxy.mode === 'down') {
      res.writeHead(502, { 'content-type': 'text/html' });
      res.end('<h1>502 Bad Gateway</h1>');
      return;
    }
    const path = new URL(req.url, target).pathname;
    const up = http.request(
      { host: target.hostname, port: target.port, method: req.method, path: req.url, headers: { ...req.headers, host: target.host }, agent: false },
      (ur) => {
        if (proxy.mode === 'buffering' && path === '/v1/sse') {
          res.writeHead(ur.statusCode, ur.headers);
          res.flushHeaders();
          ur.resume(); // read and dropped: nothing reaches the client
          return;
        }
        if (req.method === 'POST' && proxy.lostAnswers > 0) {
          // The server stored it; its answer is lost on the way back.
          proxy.lostAnswers -= 1;
          ur.resume();
          res.writeHead(502, { 'content-type': 'text/html' });
          res.end('<h1>502 Bad Gateway</h1>');
          return;
        }
        res.writeHead(ur.statusCode, ur.headers);
        ur.pipe(res);
      },
    );
    up.on('error', () => res.destroy());
    // The client went away (or was cut): so does the upstream request, held streams included.
    res.on('close', () => up.destroy());
    req.pipe(up);
  });
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  proxy.url = `http://127.0.0.1:${server.address().port}`;
  proxy.cut = () => sockets.forEach((s) => s.destroy());
  proxy.close = () => {
    proxy.cut();
    return new Promise((r) => server.close(r));
  };
  return proxy;
}

async function publish(topic, n) {
  const r = await fetch(`${upstream()}/v1/topics/${topic}/events`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ data: { n } }),
  });
  assert.equal(r.status, 201);
  return (await r.json()).first_id;
}

async function until(what, cond, ms = 30000) {
  const deadline = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function collect(tw, pattern, since) {
  const seen = { ids: [], transports: [], gaps: [], errors: [] };
  seen.sub = tw.subscribe([pattern], {
    since,
    onEvent: (e) => seen.ids.push(e.id),
    onTransport: (t) => seen.transports.push(t),
    onGap: (g) => seen.gaps.push(g),
    onError: (e) => seen.errors.push(String(e)),
  });
  return seen;
}

const fast = { backoffBase: 100, backoffMax: 400, streamOpenTimeout: 600, probeTimeout: 2000, pollWait: 2 };

test('no fallback while the server is away; a buffered event stream then gives way to poll, which resumes from the cursor', async () => {
  const proxy = await startProxy();
  proxy.mode = 'down';
  const tw = new Tidewire(proxy.url, { ...fast, transports: ['sse', 'poll'] });
  const seen = collect(tw, 'nf1/**', 0);
  try {
    await new Promise((r) => setTimeout(r, 2000));
    assert.deepEqual(seen.transports, ['sse'], 'a 502 from the probe means away, not blocked');
    const want = [];
    for (let n = 0; n < 5; n++) want.push(await publish('nf1/a', n));
    proxy.mode = 'buffering';
    await until('5 events', () => seen.ids.length >= 5);
    assert.deepEqual(seen.transports, ['sse', 'poll']);
    for (let n = 5; n < 10; n++) want.push(await publish('nf1/b', n));
    await until('10 events', () => seen.ids.length >= 10);
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(seen.ids, want);
    assert.equal(seen.sub.transport, 'poll');
    assert.equal(seen.sub.cursor, want.at(-1));
    assert.deepEqual(seen.errors, []);
  } finally {
    seen.sub.close();
    await proxy.close();
  }
});

test('an event stream that worked reconnects on cuts with its cursor, and gives way only after demoteAfter confirmed blocks', async () => {
  const proxy = await startProxy();
  const tw = new Tidewire(proxy.url, { ...fast, transports: ['sse', 'poll'], demoteAfter: 2 });
  const want = [];
  const seen = collect(tw, 'nf2/**', 0);
  try {
    for (let n = 0; n < 3; n++) want.push(await publish('nf2/a', n));
    await until('3 events', () => seen.ids.length >= 3);
    for (let round = 0; round < 3; round++) {
      proxy.cut();
      for (let n = 0; n < 3; n++) want.push(await publish('nf2/a', 10 * round + n));
      await until(`events after cut ${round}`, () => seen.ids.length >= want.length);
    }
    assert.deepEqual(seen.transports, ['sse'], 'cuts are transient: the stream is kept');
    assert.ok(seen.sub.reconnects >= 3, `reconnects: ${seen.sub.reconnects}`);
    proxy.mode = 'buffering';
    proxy.cut();
    for (let n = 0; n < 3; n++) want.push(await publish('nf2/b', n));
    await until('events after the proxy starts buffering', () => seen.ids.length >= want.length);
    await new Promise((r) => setTimeout(r, 300));
    assert.deepEqual(seen.ids, want);
    assert.deepEqual(seen.transports, ['sse', 'poll']);
    assert.ok(seen.sub.reconnects >= 5, `two blocked attempts before the fallback: ${seen.sub.reconnects}`);
  } finally {
    seen.sub.close();
    await proxy.close();
  }
});

test('a live-only subscription starts at the head and misses nothing published while it reconnects', async () => {
  const proxy = await startProxy();
  await publish('nf3/old', 0);
  const tw = new Tidewire(proxy.url, { ...fast, transports: ['poll'] });
  const seen = collect(tw, 'nf3/**', undefined);
  try {
    await until('the head', () => seen.sub.cursor !== null);
    proxy.mode = 'down';
    const want = [await publish('nf3/a', 1), await publish('nf3/a', 2)];
    proxy.mode = 'pass';
    await until('2 events', () => seen.ids.length >= 2);
    assert.deepEqual(seen.ids, want, 'nothing from before the subscription, nothing missed');
  } finally {
    seen.sub.close();
    await proxy.close();
  }
});

test('a publish whose answer is lost is retried with the same msgId and stored once', async () => {
  const proxy = await startProxy();
  const tw = new Tidewire(proxy.url, fast);
  try {
    proxy.lostAnswers = 2;
    const r = await tw.publish('nf4/a', { t: 1 }, { type: 'reading', msgId: 'dev-1-42' });
    assert.equal(proxy.lostAnswers, 0);
    assert.equal(r.duplicate, true, 'the retry found the first, stored copy');
    const again = await tw.publish('nf4/a', { t: 1 }, { type: 'reading', msgId: 'dev-1-42' });
    assert.deepEqual(again, { id: r.id, duplicate: true });
    // Without a msgId the client makes one up, so its retries are safe too.
    proxy.lostAnswers = 1;
    const fresh = await tw.publish('nf4/a', { t: 2 });
    assert.equal(fresh.duplicate, true);
    const body = await (await fetch(`${upstream()}/v1/poll?topic=nf4/**&since=0&timeout=0`)).json();
    assert.deepEqual(body.events.map((e) => e.id), [r.id, fresh.id]);
    assert.equal(body.events[0].type, 'reading');
    // A refusal is not retried: it rejects with the contract's code.
    await assert.rejects(tw.publish('bad topic', 1), (e) => e.status === 422 && e.code === 'invalid_topic');
  } finally {
    await proxy.close();
  }
});

for (const transport of ['sse', 'poll']) {
  test(`over ${transport}, a cursor older than retention is told the gap once, then resumes from the oldest retained id`, async () => {
    // tests/client_js.rs stored ids 1..=5 on gap/a and removed 1..=3.
    const tw = new Tidewire(upstream(), { ...fast, transports: [transport] });
    const seen = collect(tw, 'gap/**', 1);
    try {
      await until('the retained events', () => seen.ids.length >= 2);
      await new Promise((r) => setTimeout(r, 300));
      assert.deepEqual(seen.gaps, [{ requested: 1, oldest: 4 }]);
      assert.deepEqual(seen.ids, [4, 5]);
      // At least the last id delivered; a long-poll's `next` may carry it further (past
      // events of other topics), which is as good a place to resume from.
      assert.ok(seen.sub.cursor >= 5, `cursor ${seen.sub.cursor}`);
      assert.equal(seen.sub.gaps, 1);
    } finally {
      seen.sub.close();
    }
  });
}
