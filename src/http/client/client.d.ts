// Types of the tidewire browser client served at /v1/client.js.

export type TransportName = 'websocket' | 'sse' | 'poll';

/** A string, or a function giving (a promise of) a fresh one; called again before `exp` and on 401. */
export type TokenOption = string | (() => string | Promise<string>);

export interface TidewireOptions {
  /** Bearer token (JWT). Omit on an open server. */
  token?: TokenOption;
  /** Transports to try, in order. Default `['websocket', 'sse', 'poll']`. */
  transports?: TransportName[];
  /** WebSocket subprotocol: `tidewire.v1.json` (default) or `tidewire.v1.msgpack`. */
  encoding?: 'json' | 'msgpack';
  /** fetch() credentials mode (e.g. `'include'` to send the `tidewire_token` cookie cross-origin). */
  credentials?: RequestCredentials;
  /** WebSocket handshake / event-stream response deadline, ms (8000). */
  wsOpenTimeout?: number;
  /** Deadline for an open event stream's first bytes (the `retry:` line), ms (4000). */
  streamOpenTimeout?: number;
  /** Deadline of the reachability probe (a `timeout=0` poll), ms (5000). */
  probeTimeout?: number;
  /** An event stream silent this long is reconnected, ms (45000). */
  idleTimeout?: number;
  /** WebSocket `ping` op interval, ms (20000). */
  pingInterval?: number;
  /** Extra wait for any answer after a ping, ms (10000). */
  pongTimeout?: number;
  /** Seconds a long-poll may be held by the server (25). */
  pollWait?: number;
  /** First reconnect delay, ms (500); doubles per failure, jittered within [d/2, d]. */
  backoffBase?: number;
  /** Largest reconnect delay, ms (5000). */
  backoffMax?: number;
  /** Blocked failures in a row after which a transport that has worked gives way (3). */
  demoteAfter?: number;
  /** Tries of one publish on network errors, 5xx and 429 (6). */
  publishAttempts?: number;
}

/** A delivered event. `data` is a Uint8Array when the event carries bytes. */
export interface TidewireEvent<T = unknown> {
  id: number;
  topic: string;
  type: string | null;
  /** Server receive time, Unix milliseconds. */
  time: number;
  data: T;
}

/** Retention removed events after `requested` that were never delivered: complete again from `oldest`. */
export interface Gap {
  requested: number;
  oldest: number;
}

export interface SubscribeOptions<T = unknown> {
  /** Cursor: deliver every event with a larger id (0 = from the oldest retained). Omitted: live only. */
  since?: number;
  /** Each event once, in id order, across reconnects and transport changes. */
  onEvent?(e: TidewireEvent<T>): void;
  onGap?(g: Gap): void;
  /** Called with the transport in use, each time it changes. */
  onTransport?(name: TransportName): void;
  /** Called before each reconnect. */
  onReconnect?(info: { transport: TransportName; attempt: number; cursor: number | null }): void;
  /** Refusals (the subscription ends on 400/403/422) and token-function failures. */
  onError?(e: Error): void;
}

export interface Subscription {
  /** The transport in use (null before the first connection). */
  readonly transport: TransportName | null;
  /**
   * Where the next connection resumes: the id of the last event delivered, or further when
   * the server said nothing matched up to there (a long-poll's `next`, a gap's `oldest - 1`).
   */
  readonly cursor: number | null;
  /** Connections made after the first. */
  readonly reconnects: number;
  /** Gaps reported. */
  readonly gaps: number;
  close(): void;
}

export interface PublishOptions {
  type?: string;
  /** Producer id for deduplication; a random one is used (and kept across retries) when omitted. */
  msgId?: string;
  attempts?: number;
}

export class TidewireError extends Error {
  readonly status: number;
  readonly code: string;
}

export class Tidewire {
  constructor(url?: string, options?: TidewireOptions);
  subscribe<T = unknown>(patterns: string | string[], options?: SubscribeOptions<T>): Subscription;
  /** Resolves once the event is durable. */
  publish(topic: string, data: unknown, options?: PublishOptions): Promise<{ id: number; duplicate: boolean }>;
  /** GET a JSON resource of the API (e.g. `/v1/topics`, `/v1/stats`) with the token. */
  get<T = unknown>(path: string): Promise<T>;
}

export const DEFAULTS: Readonly<Required<Omit<TidewireOptions, 'token' | 'credentials'>>>;
