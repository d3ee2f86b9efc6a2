// Unit tests of the browser client's decision logic (src/http/client/client.js) under Node's
// built-in test runner: transport choice and fallback, backoff, the cursor, the event-stream
// parser, token renewal and MessagePack. Run by tests/client_js.rs (`cargo test`), or by hand:
// `node --test tests/client_js/`.
import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  TransportChooser,
  backoffDelay,
  Cursor,
  SseParser,
  tokenExp,
  TokenSource,
  msgpackDecode,
  msgpackEncode,
  classifyStatus,
  Outcome,
  DEFAULTS,
  toEvent,
} from '../../src/http/client/client.js';

test('transports are tried in the given order and the default is websocket, sse, poll', () => {
  assert.deepEqual(DEFAULTS.transports, ['websocket', 'sse', 'poll']);
  const c = new TransportChooser(['websocket', 'sse', 'poll']);
  assert.equal(c.current, 'websocket');
  assert.equal(c.blocked(), true);
  assert.equal(c.current, 'sse');
  assert.equal(c.blocked(), true);
  assert.equal(c.current, 'poll');
});

test('the last transport is kept whatever happens to it', () => {
  const c = new TransportChooser(['sse', 'poll']);
  c.blocked();
  for (let i = 0; i < 10; i++) assert.equal(c.blocked(), false);
  assert.equal(c.current, 'poll');
});

test('a transport that has worked survives transient errors and needs demoteAfter blocked failures in a row to give way', () => {
  const c = new TransportChooser(['websocket', 'sse', 'poll'], 3);
  c.worked();
  for (let i = 0; i < 20; i++) c.transient();
  assert.equal(c.current, 'websocket');
  assert.equal(c.blocked(), false);
  assert.equal(c.blocked(), false);
  c.transient(); // a transient error in between resets the streak
  assert.equal(c.blocked(), false);
  assert.equal(c.blocked(), false);
  assert.equal(c.current, 'websocket');
  assert.equal(c.blocked(), true);
  assert.equal(c.current, 'sse');
  // The next transport starts unproven: one confirmed block moves on.
  assert.equal(c.blocked(), true);
  assert.equal(c.current, 'poll');
});

test('the chooser never moves back up the list (no flapping)', () => {
  const c = new TransportChooser(['websocket', 'sse', 'poll']);
  const seen = [c.current];
  for (const step of ['blocked', 'worked', 'transient', 'blocked', 'blocked', 'blocked', 'worked', 'transient', 'blocked']) {
    c[step]();
    if (seen.at(-1) !== c.current) seen.push(c.current);
  }
  assert.deepEqual(seen, ['websocket', 'sse', 'poll']);
});

test('unknown, empty or repeated transport lists are refused or cleaned', () => {
  assert.throws(() => new TransportChooser([]), TypeError);
  assert.throws(() => new TransportChooser(['carrier-pigeon']), TypeError);
  assert.deepEqual(new TransportChooser(['poll', 'poll']).list, ['poll']);
});

test('backoff doubles from the base to the cap, each delay jittered within [d/2, d]', () => {
  assert.equal(backoffDelay(0, 500, 5000, () => 0), 250);
  assert.equal(backoffDelay(0, 500, 5000, () => 1), 500);
  assert.equal(backoffDelay(1, 500, 5000, () => 1), 1000);
  assert.equal(backoffDelay(3, 500, 5000, () => 1), 4000);
  assert.equal(backoffDelay(4, 500, 5000, () => 1), 5000);
  assert.equal(backoffDelay(1000, 500, 5000, () => 1), 5000);
  assert.equal(backoffDelay(1000, 500, 5000, () => 0), 2500);
  for (let i = 0; i < 200; i++) {
    const d = backoffDelay(2);
    assert.ok(d >= 1000 && d <= 2000, `${d}`);
  }
});

test('the cursor accepts each id once and only above itself', () => {
  const c = new Cursor(0);
  assert.equal(c.accept(1), true);
  assert.equal(c.accept(1), false);
  assert.equal(c.accept(3), true);
  assert.equal(c.accept(2), false, 'an older id (a replay overlap) is dropped');
  assert.equal(c.value, 3);
  c.advance(2);
  assert.equal(c.value, 3, 'advance never moves back');
  c.advance(9);
  assert.equal(c.value, 9);
  assert.equal(c.accept(9), false);
  assert.equal(c.accept(10), true);
});

test('a live-only cursor starts empty and takes the first id it is given', () => {
  const c = new Cursor();
  assert.equal(c.value, null);
  c.advance(41);
  assert.equal(c.accept(41), false);
  assert.equal(c.accept(42), true);
  assert.throws(() => new Cursor(-1), TypeError);
  assert.equal(new Cursor('7').value, 7);
});

test('the event-stream parser sees the retry line, heartbeats, typed events, gaps and split chunks', () => {
  const p = new SseParser();
  assert.deepEqual(p.push('retry: 2000\n\n'), [{ kind: 'retry', ms: 2000 }]);
  assert.deepEqual(p.push(':\n\n'), [{ kind: 'comment', text: '' }]);
  const env = '{"id":5,"topic":"a","time":1,"data":{"t":1}}';
  const frame = `id: 5\nevent: reading\ndata: ${env}\n\n`;
  const out = [];
  for (const ch of frame) out.push(...p.push(ch)); // one character at a time
  assert.deepEqual(out, [{ kind: 'event', id: '5', event: 'reading', data: env }]);
  assert.deepEqual(p.push('id: 8\r\nevent: gap\r\ndata: {"requested":2,"oldest":9}\r'), []);
  assert.deepEqual(p.push('\n\r\n'), [{ kind: 'event', id: '8', event: 'gap', data: '{"requested":2,"oldest":9}' }]);
  assert.deepEqual(p.push('data: a\ndata: b\n\n'), [{ kind: 'event', id: '8', event: 'message', data: 'a\nb' }]);
  assert.deepEqual(p.push(': token expired\n\n'), [{ kind: 'comment', text: 'token expired' }]);
});

test('statuses map to what the subscription does next', () => {
  assert.equal(classifyStatus(401), Outcome.AUTH);
  for (const s of [429, 500, 502, 503, 504]) assert.equal(classifyStatus(s), Outcome.TRANSIENT, `${s}`);
  for (const s of [400, 403, 422]) assert.equal(classifyStatus(s), Outcome.FATAL, `${s}`);
  for (const s of [404, 405, 426, 501]) assert.equal(classifyStatus(s), Outcome.BLOCKED, `${s}`);
});

const b64u = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
const jwt = (claims) => `${b64u({ alg: 'HS256' })}.${b64u(claims)}.sig`;

test('exp is read from the JWT payload', () => {
  assert.equal(tokenExp(jwt({ exp: 1763800000, tidewire: {} })), 1763800000);
  assert.equal(tokenExp(jwt({ tidewire: {} })), null);
  assert.equal(tokenExp('not a jwt'), null);
  assert.equal(tokenExp('a.!!!.c'), null);
});

test('the token function is called again within a third of the lifetime (at most 30 s) of exp, and on demand', async () => {
  let now = 1_000_000_000_000;
  let calls = 0;
  const src = new TokenSource(async () => {
    calls++;
    return jwt({ exp: Math.floor(now / 1000) + 90 });
  }, () => now);
  const first = await src.get();
  assert.equal(calls, 1);
  now += 59_000;
  assert.equal(await src.get(), first, 'still 31 s left: kept');
  now += 2_000;
  await src.get();
  assert.equal(calls, 2, '29 s left: renewed');
  await src.get(true);
  assert.equal(calls, 3, 'forced (after a 401)');
  // Short-lived tokens renew at two thirds of their life.
  const short = new TokenSource(async () => jwt({ exp: Math.floor(now / 1000) + 3 }), () => now);
  await short.get();
  assert.ok(short.renewAt - now <= 2000 && short.renewAt - now >= 1000, `${short.renewAt - now}`);
});

test('concurrent callers share one call of the token function; a string token is used as is', async () => {
  let calls = 0;
  const src = new TokenSource(async () => {
    calls++;
    await new Promise((r) => setTimeout(r, 20));
    return jwt({ exp: Math.floor(Date.now() / 1000) + 600 });
  });
  const [a, b, c] = await Promise.all([src.get(), src.get(), src.get(true)]);
  assert.equal(calls, 1);
  assert.equal(a, b);
  assert.equal(b, c);
  assert.equal(await new TokenSource('static').get(true), 'static');
  assert.equal(await new TokenSource(undefined).get(), null);
  await assert.rejects(new TokenSource(async () => '').get(), TypeError);
});

test('MessagePack: what the server sends decodes (bytes stay bytes), and client ops round-trip', () => {
  // {"id":300,"topic":"a","data":bin[1,2]} as rmp-serde writes it.
  const bytes = Uint8Array.from([0x83, 0xa2, 0x69, 0x64, 0xcd, 0x01, 0x2c, 0xa5, 0x74, 0x6f, 0x70, 0x69, 0x63, 0xa1, 0x61, 0xa4, 0x64, 0x61, 0x74, 0x61, 0xc4, 0x02, 0x01, 0x02]);
  const v = msgpackDecode(bytes);
  assert.equal(v.id, 300);
  assert.equal(v.topic, 'a');
  assert.deepEqual([...v.data], [1, 2]);
  const op = { op: 'auth', token: 'x'.repeat(300), ref: 'renew', n: 2 ** 32 + 1, f: 1.5, neg: -3, ok: true, none: null, list: [1, 'b'] };
  assert.deepEqual(msgpackDecode(msgpackEncode(op)), op);
  assert.equal(msgpackDecode(Uint8Array.from([0xcf, 0, 0, 0, 1, 0, 0, 0, 0])), 2 ** 32);
  assert.throws(() => msgpackDecode(Uint8Array.from([0x92, 0x01])), RangeError);
  assert.throws(() => msgpackDecode(Uint8Array.from([0x01, 0x02])), RangeError);
});

test('envelopes become events; base64 bytes are decoded; a missing type is null', () => {
  assert.deepEqual(toEvent({ id: 1, topic: 't', time: 5, data: { a: 1 } }), { id: 1, topic: 't', type: null, time: 5, data: { a: 1 } });
  const e = toEvent({ id: 2, topic: 't', type: 'r', time: 5, data: 'AQID', encoding: 'base64' });
  assert.deepEqual([...e.data], [1, 2, 3]);
  assert.equal(e.type, 'r');
});

test('a token function that hands back an expired token is not called again for a second', async () => {
  let now = 1_000_000_000_000;
  let calls = 0;
  const src = new TokenSource(async () => {
    calls++;
    return jwt({ exp: Math.floor(now / 1000) - 10 });
  }, () => now);
  await src.get();
  await src.get();
  assert.equal(calls, 1);
  now += 1_001;
  await src.get();
  assert.equal(calls, 2);
});
