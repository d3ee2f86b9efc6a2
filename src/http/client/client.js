// tidewire browser client: `import { Tidewire } from 'http://HOST:7700/v1/client.js'`.
// One ES module, no dependencies, served by the tidewire binary itself (types: /v1/client.d.ts).
//
// Transport choice (tried in the order given, default websocket → sse → poll):
// - A transport "works" once it has proved itself: the WebSocket opened, the event stream
//   delivered its first bytes (the server's `retry:` line comes first), a poll answered 200.
// - A transport that has not worked yet is left for the next one when it cannot work here:
//   the WebSocket handshake fails or does not open within `wsOpenTimeout` (8 s); the event
//   stream answers with a status a proxy gives (404, 405, 426, 501, …) or opens but delivers
//   nothing, not even the `retry:` line, within `streamOpenTimeout` (4 s: a buffering proxy).
//   Before leaving it the client probes the server with a plain long-poll (`timeout=0`): when
//   that fails too the server is away, not the transport blocked, so the client stays and
//   retries; when it answers 401 the token is refreshed and the same transport tried again.
// - A transport that has worked is kept across transient errors (server restarts, proxy
//   restarts, 5xx, 429): it reconnects with exponential backoff and jitter, 0.5 s doubling to
//   at most 5 s, each delay drawn uniformly from [d/2, d]; the backoff resets once a
//   connection works again. Only `demoteAfter` (3) blocked failures in a row, each confirmed
//   by the probe, make it give way to the next. The client never moves back up a list:
//   no flapping.
// - The cursor (last id delivered) is carried across every reconnect and fallback: each
//   connection resumes from it (`since` / `last_event_id`), and an id not above it is never
//   delivered again. A subscription without `since` first asks the server for its head with
//   a `timeout=0` poll, so even "live only" resumes without a gap.
// - Liveness: a stream that stays silent for `idleTimeout` (45 s, three heartbeats) is
//   reconnected; on the WebSocket a `ping` op goes out every 20 s and a `pong` must come back
//   within 10 s.
// Tokens: a string, or a function returning (a promise of) one. The function is called again
// when the current token is within a third of its lifetime (at most 30 s) of its `exp` (read
// from the JWT payload), and at once after a 401 or a token-expired close. fetch() (poll,
// event stream, publish) sends it as `Authorization: Bearer`; the WebSocket, which cannot set
// headers, sends it as `access_token` and renews it in place with the `auth` op.

/** Default timings (milliseconds unless said otherwise); every one can be overridden. */
export const DEFAULTS = Object.freeze({
  transports: ['websocket', 'sse', 'poll'],
  wsOpenTimeout: 8000,
  streamOpenTimeout: 4000,
  probeTimeout: 5000,
  idleTimeout: 45000,
  pingInterval: 20000,
  pongTimeout: 10000,
  pollWait: 25, // seconds the server may hold a long-poll
  backoffBase: 500,
  backoffMax: 5000,
  demoteAfter: 3,
  publishAttempts: 6,
  encoding: 'json',
});

const TRANSPORTS = ['websocket', 'sse', 'poll'];

/** Why a connection attempt ended. */
export const Outcome = Object.freeze({
  /** Worked for a while, then ended (server restart, proxy restart, network): reconnect. */
  ENDED: 'ended',
  /** Could not work here (proxy refusal, buffering): confirmed by a probe before moving on. */
  BLOCKED: 'blocked',
  /** Failed before working, for no known reason: probe to tell blocked from unreachable. */
  FAILED: 'failed',
  /** The server is away or sick (network error, 5xx, 429): stay, back off, retry. */
  TRANSIENT: 'transient',
  /** The token was refused or expired: renew it, retry the same transport. */
  AUTH: 'auth',
  /** The request itself is wrong (400, 403, 422): retrying cannot help. */
  FATAL: 'fatal',
  /** Closed by the application. */
  CLOSED: 'closed',
});

/**
 * The transport state machine: which transport to use now, and when to move on. Pure, so
 * its rules are unit-tested on their own (tests/client_js/).
 */
export class TransportChooser {
  constructor(transports = DEFAULTS.transports, demoteAfter = DEFAULTS.demoteAfter) {
    const list = [...new Set(transports)];
    if (list.length === 0 || list.some((t) => !TRANSPORTS.includes(t))) {
      throw new TypeError(`transports must be a non-empty list of ${TRANSPORTS.join(', ')}`);
    }
    this.list = list;
    this.index = 0;
    this.proven = false;
    this.blockedStreak = 0;
    this.demoteAfter = Math.max(1, demoteAfter);
  }
  /** The transport to use now. */
  get current() {
    return this.list[this.index];
  }
  /** The current transport has worked: it is kept across transient errors from now on. */
  worked() {
    this.proven = true;
    this.blockedStreak = 0;
  }
  /** A transient failure: nothing changes (reconnect on the same transport). */
  transient() {
    this.blockedStreak = 0;
  }
  /**
   * The current transport cannot work here (confirmed: the server answered a probe). Moves
   * to the next one unless it is the last, or it has worked and this is not yet the
   * `demoteAfter`-th blocked failure in a row. Returns whether it moved.
   */
  blocked() {
    if (this.index >= this.list.length - 1) return false;
    if (this.proven && ++this.blockedStreak < this.demoteAfter) return false;
    this.index += 1;
    this.proven = false;
    this.blockedStreak = 0;
    return true;
  }
}

/** Reconnect delay for the `attempt`-th failure in a row (0-based): full backoff with jitter. */
export function backoffDelay(attempt, base = DEFAULTS.backoffBase, max = DEFAULTS.backoffMax, random = Math.random) {
  const ceiling = Math.min(max, base * 2 ** Math.min(attempt, 30));
  return Math.round(ceiling / 2 + (random() * ceiling) / 2);
}

/**
 * The cursor of one subscription: the last id delivered. `accept(id)` is true exactly once
 * for each id above it, so a replayed or overlapping event is never delivered twice.
 */
export class Cursor {
  constructor(value = null) {
    this.value = value === null || value === undefined ? null : toId(value);
  }
  /** Whether the event `id` is new (and, if so, move past it). */
  accept(id) {
    if (this.value !== null && id <= this.value) return false;
    this.value = id;
    return true;
  }
  /** Move to `next` (a poll's `next`, a gap's `oldest - 1`) if it is ahead. */
  advance(next) {
    if (next !== null && next !== undefined && (this.value === null || next > this.value)) this.value = next;
  }
}

function toId(v) {
  const n = typeof v === 'string' ? Number(v) : v;
  if (!Number.isSafeInteger(n) || n < 0) throw new TypeError(`not an event id: ${v}`);
  return n;
}

/**
 * An incremental `text/event-stream` parser (the WHATWG algorithm): feed it text as it
 * arrives; it returns what completed: `{kind:'event', id, event, data}`, `{kind:'retry', ms}`
 * and `{kind:'comment', text}`.
 */
export class SseParser {
  constructor() {
    this.buf = '';
    this.data = [];
    this.event = '';
    this.id = null;
  }
  push(text) {
    const out = [];
    this.buf += text;
    for (;;) {
      const m = /\r\n|\r|\n/.exec(this.buf);
      if (!m) break;
      // A lone `\r` at the end may be half of `\r\n`: wait for more.
      if (m[0] === '\r' && m.index === this.buf.length - 1) break;
      const line = this.buf.slice(0, m.index);
      this.buf = this.buf.slice(m.index + m[0].length);
      this.line(line, out);
    }
    return out;
  }
  line(line, out) {
    if (line === '') {
      if (this.data.length > 0) {
        out.push({ kind: 'event', id: this.id, event: this.event || 'message', data: this.data.join('\n') });
      }
      this.data = [];
      this.event = '';
      return;
    }
    if (line[0] === ':') {
      out.push({ kind: 'comment', text: line.slice(1).trim() });
      return;
    }
    const c = line.indexOf(':');
    const field = c < 0 ? line : line.slice(0, c);
    let value = c < 0 ? '' : line.slice(c + 1);
    if (value[0] === ' ') value = value.slice(1);
    if (field === 'data') this.data.push(value);
    else if (field === 'event') this.event = value;
    else if (field === 'id' && !value.includes('\0')) this.id = value;
    else if (field === 'retry' && /^\d+$/.test(value)) out.push({ kind: 'retry', ms: Number(value) });
  }
}

/** The `exp` claim (Unix seconds) of a JWT, or null when it has none or is not a JWT. */
export function tokenExp(token) {
  try {
    const part = String(token).split('.')[1];
    if (!part) return null;
    const b64 = part.replace(/-/g, '+').replace(/_/g, '/');
    const json = atob(b64 + '='.repeat((4 - (b64.length % 4)) % 4));
    const exp = JSON.parse(json).exp;
    return typeof exp === 'number' ? exp : null;
  } catch {
    return null;
  }
}

/**
 * Holds the current token and renews it through the token function: when it is within a
 * third of its lifetime (at most 30 s) of `exp`, and whenever `get(true)` is asked after a
 * 401. Concurrent callers share one call of the function.
 */
export class TokenSource {
  constructor(token, now = () => Date.now()) {
    this.source = token;
    this.now = now;
    this.value = typeof token === 'string' ? token : null;
    this.renewAt = Infinity;
    this.expiresAt = Infinity;
    this.pending = null;
    this.calls = 0;
    if (this.value) this.schedule();
  }
  get enabled() {
    return this.source !== undefined && this.source !== null && this.source !== '';
  }
  schedule() {
    const exp = tokenExp(this.value);
    if (exp === null) {
      this.renewAt = Infinity;
      this.expiresAt = Infinity;
      return;
    }
    const now = this.now();
    this.expiresAt = exp * 1000;
    const margin = Math.min(30000, Math.max(0, this.expiresAt - now) / 3);
    // A token that comes back already expired is asked for again at most once a second.
    this.renewAt = Math.max(this.expiresAt - margin, now + 1000);
  }
  /** The token to send now (null on an open server). `force` renews it first. */
  async get(force = false) {
    if (!this.enabled) return null;
    if (typeof this.source !== 'function') return this.source;
    if (!force && this.value && this.now() < this.renewAt) return this.value;
    if (!this.pending) {
      this.pending = (async () => {
        try {
          this.calls += 1;
          const t = await this.source();
          if (typeof t !== 'string' || t === '') throw new TypeError('the token function returned no token');
          this.value = t;
          this.schedule();
          return t;
        } finally {
          this.pending = null;
        }
      })();
    }
    return this.pending;
  }
}

// --------------------------------------------------------------------------------------------
// MessagePack: just what the WebSocket needs (decode any value; encode maps of strings,
// numbers, booleans, null, arrays and maps for client ops).

export function msgpackDecode(bytes) {
  const u8 = bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes);
  const dv = new DataView(u8.buffer, u8.byteOffset, u8.byteLength);
  let p = 0;
  const text = new TextDecoder();
  const str = (n) => {
    const s = text.decode(u8.subarray(p, p + n));
    p += n;
    return s;
  };
  const bin = (n) => {
    const b = u8.slice(p, p + n);
    p += n;
    return b;
  };
  const arr = (n) => {
    const a = new Array(n);
    for (let i = 0; i < n; i++) a[i] = val();
    return a;
  };
  const map = (n) => {
    const o = {};
    for (let i = 0; i < n; i++) {
      const k = val();
      o[k] = val();
    }
    return o;
  };
  const big = (v) => (v <= BigInt(Number.MAX_SAFE_INTEGER) && v >= -BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : v);
  function val() {
    if (p >= u8.length) throw new RangeError('truncated MessagePack');
    const b = u8[p++];
    let v;
    if (b <= 0x7f) return b;
    if (b >= 0xe0) return b - 0x100;
    if ((b & 0xf0) === 0x80) return map(b & 0x0f);
    if ((b & 0xf0) === 0x90) return arr(b & 0x0f);
    if ((b & 0xe0) === 0xa0) return str(b & 0x1f);
    switch (b) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xc4: v = u8[p]; p += 1; return bin(v);
      case 0xc5: v = dv.getUint16(p); p += 2; return bin(v);
      case 0xc6: v = dv.getUint32(p); p += 4; return bin(v);
      case 0xca: v = dv.getFloat32(p); p += 4; return v;
      case 0xcb: v = dv.getFloat64(p); p += 8; return v;
      case 0xcc: v = u8[p]; p += 1; return v;
      case 0xcd: v = dv.getUint16(p); p += 2; return v;
      case 0xce: v = dv.getUint32(p); p += 4; return v;
      case 0xcf: v = big(dv.getBigUint64(p)); p += 8; return v;
      case 0xd0: v = dv.getInt8(p); p += 1; return v;
      case 0xd1: v = dv.getInt16(p); p += 2; return v;
      case 0xd2: v = dv.getInt32(p); p += 4; return v;
      case 0xd3: v = big(dv.getBigInt64(p)); p += 8; return v;
      case 0xd9: v = u8[p]; p += 1; return str(v);
      case 0xda: v = dv.getUint16(p); p += 2; return str(v);
      case 0xdb: v = dv.getUint32(p); p += 4; return str(v);
      case 0xdc: v = dv.getUint16(p); p += 2; return arr(v);
      case 0xdd: v = dv.getUint32(p); p += 4; return arr(v);
      case 0xde: v = dv.getUint16(p); p += 2; return map(v);
      case 0xdf: v = dv.getUint32(p); p += 4; return map(v);
      default: throw new RangeError(`unsupported MessagePack byte 0x${b.toString(16)}`);
    }
  }
  const out = val();
  if (p !== u8.length) throw new RangeError('trailing bytes after MessagePack value');
  return out;
}

export function msgpackEncode(value) {
  const out = [];
  const enc = new TextEncoder();
  const u32 = (n) => out.push((n >>> 24) & 0xff, (n >>> 16) & 0xff, (n >>> 8) & 0xff, n & 0xff);
  function w(v) {
    if (v === null || v === undefined) out.push(0xc0);
    else if (v === false) out.push(0xc2);
    else if (v === true) out.push(0xc3);
    else if (typeof v === 'number' && Number.isInteger(v) && v >= 0 && v <= 0xffffffff) {
      if (v < 0x80) out.push(v);
      else out.push(0xce), u32(v);
    } else if (typeof v === 'number') {
      const b = new DataView(new ArrayBuffer(8));
      b.setFloat64(0, v);
      out.push(0xcb, ...new Uint8Array(b.buffer));
    } else if (typeof v === 'string') {
      const b = enc.encode(v);
      out.push(0xdb);
      u32(b.length);
      out.push(...b);
    } else if (v instanceof Uint8Array) {
      out.push(0xc6);
      u32(v.length);
      out.push(...v);
    } else if (Array.isArray(v)) {
      out.push(0xdd);
      u32(v.length);
      v.forEach(w);
    } else {
      const keys = Object.keys(v).filter((k) => v[k] !== undefined);
      out.push(0xdf);
      u32(keys.length);
      for (const k of keys) {
        w(k);
        w(v[k]);
      }
    }
  }
  w(value);
  return new Uint8Array(out);
}

// --------------------------------------------------------------------------------------------

function b64decode(s) {
  const bin = atob(s);
  const u8 = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) u8[i] = bin.charCodeAt(i);
  return u8;
}

/** An envelope as the application sees it: `{id, topic, type, time, data}` (bytes as Uint8Array). */
export function toEvent(env) {
  const data = env.encoding === 'base64' && typeof env.data === 'string' ? b64decode(env.data) : env.data;
  return { id: toId(env.id), topic: env.topic, type: env.type ?? null, time: env.time, data };
}

const sleep = (ms, signal) =>
  new Promise((resolve) => {
    if (signal?.aborted) return resolve();
    const t = setTimeout(resolve, ms);
    signal?.addEventListener('abort', () => {
      clearTimeout(t);
      resolve();
    }, { once: true });
  });

/** An error from the server: its status and the contract's `{error: {code, message}}`. */
export class TidewireError extends Error {
  constructor(status, code, message) {
    super(`${status} ${code}: ${message}`);
    this.name = 'TidewireError';
    this.status = status;
    this.code = code;
  }
}

async function errorOf(resp) {
  let code = 'http_' + resp.status;
  let message = resp.statusText || 'request failed';
  try {
    const body = await resp.json();
    if (body?.error?.code) ({ code, message } = body.error);
  } catch {
    // A proxy's HTML page, or nothing: the status says enough.
  }
  return new TidewireError(resp.status, code, message);
}

/** What a non-2xx status means for a subscription. */
export function classifyStatus(status) {
  if (status === 401) return Outcome.AUTH;
  // 501: a proxy that does not implement what was asked (e.g. streaming) — not transient.
  if (status === 429 || (status >= 500 && status !== 501)) return Outcome.TRANSIENT;
  if (status === 400 || status === 403 || status === 422) return Outcome.FATAL;
  return Outcome.BLOCKED; // 404, 405, 426, …: something in between does not pass this route
}

export class Tidewire {
  /**
   * @param {string} url the server's base URL, e.g. `http://127.0.0.1:7700` (or '' for this page's origin)
   * @param {object} [options] `token`, `transports`, `encoding`, `credentials` and the timings of DEFAULTS
   */
  constructor(url = '', options = {}) {
    const base = typeof location !== 'undefined' ? location.href : undefined;
    this.url = new URL(url || '/', base).href.replace(/\/+$/, '');
    this.options = { ...DEFAULTS, ...options };
    new TransportChooser(this.options.transports); // validates the list early
    if (!['json', 'msgpack'].includes(this.options.encoding)) throw new TypeError("encoding must be 'json' or 'msgpack'");
    this.tokens = new TokenSource(options.token);
  }

  /** Subscribes to `patterns` (a pattern or a list); see Subscription. */
  subscribe(patterns, handlers = {}) {
    return new Subscription(this, Array.isArray(patterns) ? patterns : [patterns], handlers);
  }

  /**
   * Publishes one event and resolves to `{id, duplicate}` once it is durable. Retries with
   * the same `msgId` (a random one when none is given) on network errors, 5xx and 429, so a
   * retry is never stored twice; a 401 renews the token once.
   */
  async publish(topic, data, opts = {}) {
    const msgId = opts.msgId ?? randomId();
    const body = JSON.stringify({ data, ...(opts.type ? { type: opts.type } : {}), msg_id: msgId });
    const path = `/v1/topics/${String(topic).split('/').map(encodeURIComponent).join('/')}/events`;
    const attempts = opts.attempts ?? this.options.publishAttempts;
    let renewed = false;
    for (let attempt = 0; ; attempt++) {
      let resp;
      try {
        const headers = { 'content-type': 'application/json', ...(await this.authHeader()) };
        resp = await fetch(this.url + path, { method: 'POST', headers, body, credentials: this.options.credentials });
      } catch (e) {
        if (attempt + 1 >= attempts) throw e;
        await sleep(backoffDelay(attempt, this.options.backoffBase, this.options.backoffMax));
        continue;
      }
      if (resp.ok) {
        const r = await resp.json();
        return { id: r.first_id, duplicate: r.duplicates > 0 };
      }
      if (resp.status === 401 && !renewed && typeof this.tokens.source === 'function') {
        renewed = true;
        await this.tokens.get(true);
        continue;
      }
      const retryable = resp.status >= 500 || resp.status === 429;
      if (!retryable || attempt + 1 >= attempts) throw await errorOf(resp);
      const after = Number(resp.headers.get('retry-after'));
      const wait = Number.isFinite(after) && after > 0 ? after * 1000 : backoffDelay(attempt, this.options.backoffBase, this.options.backoffMax);
      await sleep(wait);
    }
  }

  async authHeader(force = false) {
    const t = await this.tokens.get(force);
    return t ? { authorization: `Bearer ${t}` } : {};
  }

  /** `GET` a JSON resource of the API (e.g. `/v1/topics`), with the token. */
  async get(path) {
    const resp = await fetch(this.url + path, { headers: await this.authHeader(), credentials: this.options.credentials, cache: 'no-store' });
    if (resp.status === 401 && typeof this.tokens.source === 'function') {
      const again = await fetch(this.url + path, { headers: await this.authHeader(true), credentials: this.options.credentials, cache: 'no-store' });
      if (!again.ok) throw await errorOf(again);
      return again.json();
    }
    if (!resp.ok) throw await errorOf(resp);
    return resp.json();
  }
}

function randomId() {
  if (globalThis.crypto?.randomUUID) return globalThis.crypto.randomUUID();
  return Date.now().toString(36) + '-' + Math.random().toString(36).slice(2);
}

/**
 * One subscription. `transport` is the transport in use, `cursor` the last id delivered,
 * `reconnects` how many times it has connected again, `close()` ends it.
 */
export class Subscription {
  constructor(client, patterns, handlers) {
    this.client = client;
    this.patterns = patterns.map(String);
    if (this.patterns.length === 0) throw new TypeError('subscribe needs at least one pattern');
    this.handlers = handlers;
    this.chooser = new TransportChooser(client.options.transports, client.options.demoteAfter);
    this.cur = new Cursor(handlers.since);
    this.transport = null;
    this.reconnects = 0;
    this.gaps = 0;
    this.closed = false;
    this.abort = new AbortController();
    this.done = this.run();
  }

  /**
   * Where the next connection resumes: the last id delivered, or further when the server said
   * nothing matched up to there (a long-poll's `next`, a gap). Null only until a live-only
   * subscription has learnt the head.
   */
  get cursor() {
    return this.cur.value;
  }

  close() {
    this.closed = true;
    this.abort.abort();
  }

  emit(name, arg) {
    const f = this.handlers[name];
    if (typeof f !== 'function') return;
    try {
      f.call(this.handlers, arg);
    } catch (e) {
      // A throwing handler must not break delivery: report it and go on.
      setTimeout(() => {
        throw e;
      });
    }
  }

  deliver(env) {
    const e = toEvent(env);
    if (this.cur.accept(e.id)) this.emit('onEvent', e);
  }

  gap(g) {
    this.gaps += 1;
    this.cur.advance(toId(g.oldest) - 1);
    this.emit('onGap', { requested: g.requested, oldest: g.oldest });
  }

  topicQuery() {
    return this.patterns.map((p) => 'topic=' + encodeURIComponent(p)).join('&');
  }

  async run() {
    const o = this.client.options;
    let attempt = 0;
    let refusals = 0; // 401s in a row: the first renews at once, the next ones back off
    let connected = false;
    while (!this.closed) {
      // Live only: start from the head the server has now, so later reconnects have a cursor.
      if (this.cur.value === null) {
        const r = await this.probe();
        if (this.closed) break;
        if (r.outcome === Outcome.FATAL) return this.fail(r.error);
        if (r.outcome === 'ok') {
          this.cur.advance(r.next);
        } else {
          if (r.outcome === Outcome.AUTH) await this.renew();
          await sleep(backoffDelay(attempt++, o.backoffBase, o.backoffMax), this.abort.signal);
          continue;
        }
      }
      const name = this.chooser.current;
      if (name !== this.transport) {
        this.transport = name;
        this.emit('onTransport', name);
      }
      if (connected) {
        this.reconnects += 1;
        this.emit('onReconnect', { transport: name, attempt: this.reconnects, cursor: this.cursor });
      }
      connected = true;
      let r;
      try {
        r = await CONNECT[name](this);
      } catch (e) {
        // Not the network (each transport handles that): the token function failed, or the
        // WebSocket refused its URL. Say so, and retry after a backoff.
        this.emit('onError', e);
        r = { outcome: Outcome.TRANSIENT, error: e };
      }
      if (this.closed) break;
      if (r.worked) {
        this.chooser.worked();
        attempt = 0;
        refusals = 0;
      }
      let outcome = r.outcome;
      if (outcome === Outcome.FAILED || outcome === Outcome.BLOCKED) {
        // Blocked, or is the server simply away? Ask it with a plain poll.
        const p = await this.probe();
        if (this.closed) break;
        outcome = p.outcome === 'ok' ? Outcome.BLOCKED : p.outcome;
        if (p.error) r.error = p.error; // e.g. the 403 that says why the socket was refused
      }
      if (outcome === Outcome.FATAL) return this.fail(r.error);
      if (outcome === Outcome.AUTH) {
        if (refusals > 0) {
          // A fresh token was refused too: say so, and do not hammer the server.
          this.emit('onError', r.error ?? new TidewireError(401, 'unauthorized', 'the token was refused'));
          await sleep(backoffDelay(refusals - 1, o.backoffBase, o.backoffMax), this.abort.signal);
        }
        refusals += 1;
        await this.renew();
        continue;
      }
      if (outcome === Outcome.BLOCKED) {
        if (this.chooser.blocked()) continue; // the next transport, at once
      } else {
        this.chooser.transient();
      }
      if (outcome === Outcome.ENDED && r.worked) {
        await sleep(backoffDelay(0, o.backoffBase, o.backoffMax), this.abort.signal);
      } else {
        await sleep(backoffDelay(attempt++, o.backoffBase, o.backoffMax), this.abort.signal);
      }
    }
  }

  async renew() {
    try {
      await this.client.tokens.get(true);
    } catch (e) {
      this.emit('onError', e);
      await sleep(backoffDelay(3, this.client.options.backoffBase, this.client.options.backoffMax), this.abort.signal);
    }
  }

  fail(error) {
    this.closed = true;
    this.emit('onError', error ?? new Error('subscription refused'));
  }

  /** A `timeout=0` poll without a cursor: 'ok' (with the head) when the server answers. */
  async probe() {
    const o = this.client.options;
    const ctl = new AbortController();
    const t = setTimeout(() => ctl.abort(), o.probeTimeout);
    const stop = () => ctl.abort();
    this.abort.signal.addEventListener('abort', stop, { once: true });
    try {
      const resp = await fetch(`${this.client.url}/v1/poll?${this.topicQuery()}&timeout=0&limit=1`, {
        headers: await this.client.authHeader(),
        credentials: o.credentials,
        cache: 'no-store',
        signal: ctl.signal,
      });
      if (!resp.ok) {
        const c = classifyStatus(resp.status);
        return { outcome: c === Outcome.BLOCKED ? Outcome.TRANSIENT : c, error: await errorOf(resp) };
      }
      const body = await resp.json();
      return { outcome: 'ok', next: body.next };
    } catch (e) {
      return { outcome: Outcome.TRANSIENT, error: e };
    } finally {
      clearTimeout(t);
      this.abort.signal.removeEventListener('abort', stop);
    }
  }
}

// --------------------------------------------------------------------------------------------
// The transports. Each connects once from the subscription's cursor and resolves when that
// connection ends, with `{outcome, worked, error}`.

const CONNECT = {
  websocket: connectWebSocket,
  sse: connectEventStream,
  poll: connectPoll,
};

async function connectWebSocket(sub) {
  const client = sub.client;
  const o = client.options;
  const token = await client.tokens.get();
  const msgpack = o.encoding === 'msgpack';
  const u = new URL(client.url + '/v1/ws?' + sub.topicQuery());
  u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:';
  u.searchParams.set('since', String(sub.cursor));
  if (token) u.searchParams.set('access_token', token);
  const ws = new WebSocket(u.href, msgpack ? 'tidewire.v1.msgpack' : 'tidewire.v1.json');
  ws.binaryType = 'arraybuffer';
  return new Promise((resolve) => {
    let opened = false;
    let finished = false;
    let lastHeard = Date.now();
    let pingSent = 0;
    let refusal = null;
    const timers = [];
    const send = (op) => {
      if (ws.readyState === 1) ws.send(msgpack ? msgpackEncode(op) : JSON.stringify(op));
    };
    const finish = (r) => {
      if (finished) return;
      finished = true;
      timers.forEach((t) => clearTimeout(t) || clearInterval(t));
      sub.abort.signal.removeEventListener('abort', onAbort);
      try {
        ws.close();
      } catch {
        // already closed
      }
      resolve({ worked: opened, ...r });
    };
    const onAbort = () => finish({ outcome: Outcome.CLOSED });
    sub.abort.signal.addEventListener('abort', onAbort, { once: true });
    timers.push(setTimeout(() => opened || finish({ outcome: Outcome.FAILED }), o.wsOpenTimeout));
    ws.onopen = () => {
      opened = true;
      lastHeard = Date.now();
      timers.push(
        setInterval(() => {
          if (pingSent && Date.now() - lastHeard > o.pongTimeout + o.pingInterval) {
            finish({ outcome: Outcome.ENDED });
          } else {
            pingSent = Date.now();
            send({ op: 'ping' });
          }
        }, o.pingInterval),
      );
      scheduleRenewal();
    };
    // Renews the token in place (`auth` op) before it expires, so the socket stays open.
    const scheduleRenewal = () => {
      const ts = client.tokens;
      if (typeof ts.source !== 'function' || ts.renewAt === Infinity) return;
      const wait = Math.max(1000, ts.renewAt - Date.now());
      timers.push(
        setTimeout(async () => {
          try {
            const fresh = await ts.get();
            send({ op: 'auth', token: fresh, ref: 'renew' });
          } catch (e) {
            sub.emit('onError', e);
          }
          scheduleRenewal();
        }, wait),
      );
    };
    ws.onmessage = (m) => {
      lastHeard = Date.now();
      let v;
      try {
        v = typeof m.data === 'string' ? JSON.parse(m.data) : msgpackDecode(new Uint8Array(m.data));
      } catch (e) {
        sub.emit('onError', e);
        return;
      }
      if (v && v.op === undefined) return sub.deliver(v);
      if (v.op === 'gap') return sub.gap(v);
      if (v.op === 'error') {
        refusal = new TidewireError(0, v.code, v.message);
        sub.emit('onError', refusal);
      }
      // pong, auth and ack need nothing more: hearing them is liveness enough.
    };
    ws.onclose = (e) => {
      if (!opened) return finish({ outcome: Outcome.FAILED });
      if (e.code === 4001) return finish({ outcome: Outcome.AUTH });
      finish({ outcome: Outcome.ENDED, error: refusal });
    };
  });
}

async function connectEventStream(sub) {
  const client = sub.client;
  const o = client.options;
  const ctl = new AbortController();
  const onAbort = () => ctl.abort();
  sub.abort.signal.addEventListener('abort', onAbort, { once: true });
  let worked = false;
  let timer = null;
  let why = null;
  const arm = (ms, reason) => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      why = reason;
      ctl.abort();
    }, ms);
  };
  try {
    // The cursor goes in the query (`last_event_id`), the token in the header: no preflight
    // beyond Authorization, and the token never in a URL.
    const url = `${client.url}/v1/sse?${sub.topicQuery()}&last_event_id=${sub.cursor}`;
    arm(o.wsOpenTimeout, Outcome.FAILED);
    const resp = await fetch(url, {
      headers: { accept: 'text/event-stream', ...(await client.authHeader()) },
      credentials: o.credentials,
      cache: 'no-store',
      signal: ctl.signal,
    });
    if (!resp.ok) {
      clearTimeout(timer);
      return { outcome: classifyStatus(resp.status), error: await errorOf(resp), worked };
    }
    if (!(resp.headers.get('content-type') || '').startsWith('text/event-stream') || !resp.body) {
      clearTimeout(timer);
      return { outcome: Outcome.BLOCKED, worked };
    }
    // Open: the `retry:` line must come now, unless something in between holds it back.
    arm(o.streamOpenTimeout, Outcome.BLOCKED);
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    const parser = new SseParser();
    let expired = false;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      if (!worked) worked = true;
      arm(o.idleTimeout, Outcome.ENDED);
      for (const item of parser.push(value)) {
        if (item.kind === 'comment' && item.text === 'token expired') expired = true;
        if (item.kind !== 'event') continue;
        const v = JSON.parse(item.data);
        if (item.event === 'gap') sub.gap(v);
        else sub.deliver(v);
      }
    }
    clearTimeout(timer);
    return { outcome: expired ? Outcome.AUTH : Outcome.ENDED, worked };
  } catch (e) {
    clearTimeout(timer);
    if (sub.closed) return { outcome: Outcome.CLOSED, worked };
    if (why) return { outcome: worked && why !== Outcome.ENDED ? Outcome.ENDED : why, worked };
    return { outcome: worked ? Outcome.ENDED : Outcome.FAILED, error: e, worked };
  } finally {
    sub.abort.signal.removeEventListener('abort', onAbort);
  }
}

async function connectPoll(sub) {
  const client = sub.client;
  const o = client.options;
  let worked = false;
  while (!sub.closed) {
    const ctl = new AbortController();
    const onAbort = () => ctl.abort();
    sub.abort.signal.addEventListener('abort', onAbort, { once: true });
    const t = setTimeout(() => ctl.abort(), (o.pollWait + 10) * 1000);
    try {
      const url = `${client.url}/v1/poll?${sub.topicQuery()}&since=${sub.cursor}&timeout=${o.pollWait}`;
      const resp = await fetch(url, {
        headers: await client.authHeader(),
        credentials: o.credentials,
        cache: 'no-store',
        signal: ctl.signal,
      });
      if (!resp.ok) {
        // A proxy that cut a held poll (502/504) is transient like a restart.
        return { outcome: classifyStatus(resp.status), error: await errorOf(resp), worked };
      }
      const body = await resp.json();
      worked = true;
      if (body.gap) sub.gap(body.gap);
      for (const env of body.events) sub.deliver(env);
      sub.cur.advance(body.next);
    } catch (e) {
      if (sub.closed) break;
      return { outcome: worked ? Outcome.ENDED : Outcome.FAILED, error: e, worked };
    } finally {
      clearTimeout(t);
      sub.abort.signal.removeEventListener('abort', onAbort);
    }
  }
  return { outcome: Outcome.CLOSED, worked };
}
