'use strict';
/**
 * formid-ledger mini-program client.
 *
 * Collects message credentials (form_id, prepay_id, subscribe-message results) in the
 * mini-program, keeps them in wx storage so an app restart does not lose them, and
 * uploads them in batches to `POST /v1/client/credentials` of a formid-ledger service.
 *
 * Zero dependencies. Written in ES2017 (no `?.` / `??`) so it runs on older base
 * libraries without the "enhanced compile" option.
 */

const MOCK_FORM_ID = 'the formId is a mock one'; // what the devtools hand out
const MAX_ITEMS_PER_REQUEST = 50; // the contract's limit for one request
const VALUE_RE = /^[\x21-\x7e]{1,128}$/; // 1..128 printable ASCII, no white space
const DAY_MS = 24 * 3600 * 1000;

const DEFAULTS = {
  batchSize: 20,
  flushDelayMs: 2000,
  maxQueue: 500,
  storageKey: 'formid-ledger-queue',
  // Re-login this long before the session's expires_at, so a request never races it.
  sessionMarginMs: 5 * 60 * 1000,
  backoffBaseMs: 1000,
  backoffMaxMs: 60 * 1000,
  // form_id/prepay_id live 7 days from issue, but the server can only count from the
  // moment we report them: never upload one that is (nearly) dead already.
  maxAgeMs: 7 * DAY_MS - 3600 * 1000,
};

function createClient(options) {
  return new LedgerClient(options);
}

class LedgerClient {
  constructor(options) {
    const o = Object.assign({}, DEFAULTS);
    for (const k of Object.keys(options || {})) if (options[k] !== undefined) o[k] = options[k];
    if (!o.baseUrl) throw new TypeError('formid-ledger: baseUrl is required');
    /* global wx */
    this.wx = o.wx || (typeof wx !== 'undefined' ? wx : null);
    if (!this.wx) throw new TypeError('formid-ledger: wx is required');

    this.baseUrl = String(o.baseUrl).replace(/\/+$/, '');
    this.appId = o.appId;
    this.batchSize = Math.max(1, Math.min(MAX_ITEMS_PER_REQUEST, o.batchSize | 0 || DEFAULTS.batchSize));
    this.flushDelayMs = o.flushDelayMs;
    this.maxQueue = Math.max(1, o.maxQueue | 0);
    this.storageKey = o.storageKey;
    this.sessionKey = o.storageKey + ':session';
    this.opts = o;
    this.log = o.logger || console;
    this._now = o.now || Date.now;
    this._random = o.random || Math.random;
    this._setTimeout = o.setTimeout || setTimeout;
    this._clearTimeout = o.clearTimeout || clearTimeout;

    this._timer = null; // the one pending timer: debounce or backoff
    this._running = null; // promise of the upload loop, while it runs
    this._loggingIn = null; // promise of a login, shared by concurrent callers
    this._failures = 0; // consecutive failed uploads, drives the backoff

    this._queue = this._load(this.storageKey, []);
    if (!Array.isArray(this._queue)) this._queue = [];
    this._session = this._load(this.sessionKey, null) || null;
    this._trim();
    // Items left over from a previous launch: upload them soon.
    this._schedule(this.flushDelayMs);
  }

  // ---------------------------------------------------------------- collecting

  /** From a `<form report-submit="true">` submit: `e.detail.formId`. Returns true if queued. */
  collectFormId(formId) {
    return this._add({ kind: 'form_id', value: formId });
  }

  /** Optional: the backend usually registers prepay_ids itself (POST /v1/credentials). */
  collectPrepayId(prepayId) {
    return this._add({ kind: 'prepay_id', value: prepayId });
  }

  /**
   * The success result of wx.requestSubscribeMessage, e.g.
   * `{TPL_A: 'accept', TPL_B: 'reject', errMsg: 'requestSubscribeMessage:ok'}`.
   * Every template's result is reported (the server counts non-accepts, grants only
   * `accept`). With `templateIds`, only those keys are read. Returns how many were queued.
   */
  collectSubscriptionResult(res, templateIds) {
    if (!res || typeof res !== 'object') return 0;
    const ids = Array.isArray(templateIds) && templateIds.length
      ? templateIds
      : Object.keys(res).filter((k) => k !== 'errMsg');
    let queued = 0;
    for (const id of ids) {
      if (typeof res[id] !== 'string') continue;
      if (this._add({ kind: 'subscription', value: id, result: res[id] })) queued++;
    }
    return queued;
  }

  /** Wraps a page's form submit handler: collects the formId, then calls `fn` as usual. */
  formSubmitHandler(fn) {
    const client = this;
    return function (e) {
      client.collectFormId(e && e.detail ? e.detail.formId : undefined);
      return typeof fn === 'function' ? fn.apply(this, arguments) : undefined;
    };
  }

  /** Number of items waiting for upload. */
  pending() {
    return this._queue.length;
  }

  // ------------------------------------------------------------------- session

  /**
   * Makes sure a session exists: reuses the stored one until shortly before its
   * expires_at, else wx.login() → POST /v1/client/session. `{force: true}` always logs
   * in. Resolves to `{session, openid, expires_at}`; rejects if login fails.
   */
  login(opts) {
    const force = !!(opts && opts.force);
    if (!force && this._sessionValid()) return Promise.resolve(this._session);
    if (!this._loggingIn) {
      this._loggingIn = this._doLogin().then(
        (s) => { this._loggingIn = null; return s; },
        (err) => { this._loggingIn = null; throw err; }
      );
    }
    return this._loggingIn;
  }

  async _doLogin() {
    const code = await new Promise((resolve, reject) => {
      this.wx.login({
        success: (r) => (r && r.code ? resolve(r.code) : reject(new Error('wx.login: no code'))),
        fail: (err) => reject(new Error('wx.login failed: ' + errText(err))),
      });
    });
    const body = { code };
    if (this.appId) body.app_id = this.appId;
    const res = await this._request('/v1/client/session', body, null);
    const data = res.data || {};
    if (res.statusCode !== 200 || !data.session) {
      const err = new Error('formid-ledger login: HTTP ' + res.statusCode + ' ' + errCode(data));
      err.statusCode = res.statusCode;
      throw err;
    }
    this._session = { session: data.session, openid: data.openid, expires_at: data.expires_at };
    this._save(this.sessionKey, this._session);
    return this._session;
  }

  _sessionValid() {
    const s = this._session;
    if (!s || !s.session) return false;
    const exp = Date.parse(s.expires_at);
    // An unparsable expires_at is trusted until the server answers 401.
    return !(exp - this.opts.sessionMarginMs <= this._now());
  }

  _dropSession() {
    this._session = null;
    try { this.wx.removeStorageSync(this.sessionKey); } catch (e) { /* best effort */ }
  }

  // -------------------------------------------------------------------- upload

  /**
   * Uploads everything now (cancels a pending debounce/backoff timer). Only one upload
   * loop runs at a time: a call while it runs joins it. Never rejects; resolves to
   * `{ok, uploaded, pending}`. After a failure a retry is scheduled with backoff.
   */
  flush() {
    this._cancelTimer();
    if (!this._running) {
      this._running = this._drain().then((result) => {
        this._running = null;
        if (!result.ok) this._schedule(this._backoffDelay());
        else if (this._queue.length) this._schedule(this.flushDelayMs); // raced in late
        return result;
      });
    }
    return this._running;
  }

  async _drain() {
    let uploaded = 0;
    try {
      while (this._queue.length) {
        this._dropStale();
        const batch = this._queue.slice(0, this.batchSize);
        if (!batch.length) break;
        const outcome = await this._upload(batch);
        if (outcome === 'retry') {
          this._failures++;
          return { ok: false, uploaded, pending: this._queue.length };
        }
        this._failures = 0;
        this._remove(batch); // uploaded, or dropped for good
        if (outcome === 'ok') uploaded += batch.length;
      }
    } catch (err) {
      // A bug or a broken wx API must not lose items: keep them and retry later.
      this.log.warn('[formid-ledger] upload error', err);
      this._failures++;
      return { ok: false, uploaded, pending: this._queue.length };
    }
    return { ok: true, uploaded, pending: 0 };
  }

  /** One batch. Resolves to 'ok' | 'dropped' | 'retry'. */
  async _upload(batch) {
    const body = toBody(batch);
    // Two rounds: a 401 means the session is gone (revoked, secret rotated): log in once more.
    for (let round = 0; round < 2; round++) {
      let session, res;
      try {
        session = await this.login({ force: round > 0 });
      } catch (err) {
        this.log.warn('[formid-ledger] login failed, will retry', err.message);
        return 'retry';
      }
      try {
        res = await this._request('/v1/client/credentials', body, session.session);
      } catch (err) {
        return 'retry'; // network failure: the items stay queued
      }
      const status = res.statusCode;
      if (status >= 200 && status < 300) {
        const rejected = res.data && res.data.rejected;
        // The server judged them; resending would not change its mind.
        if (rejected && rejected.length) this.log.warn('[formid-ledger] rejected by server', rejected);
        return 'ok';
      }
      if (status === 401) {
        this._dropSession();
        continue;
      }
      if (status === 408 || status === 429 || status >= 500 || status < 400) return 'retry';
      // 400 invalid_request, 413 payload_too_large, other 4xx: this batch will never be
      // accepted as it is; keeping it would block everything behind it.
      this.log.warn('[formid-ledger] batch dropped: HTTP ' + status + ' ' + errCode(res.data), body);
      return 'dropped';
    }
    return 'retry'; // still 401 with a fresh session: try again later
  }

  _request(path, data, session) {
    const header = { 'content-type': 'application/json' };
    if (session) header.Authorization = 'Bearer ' + session;
    return new Promise((resolve, reject) => {
      this.wx.request({
        url: this.baseUrl + path,
        method: 'POST',
        header,
        data,
        success: resolve, // any HTTP status lands here
        fail: (err) => reject(new Error('wx.request failed: ' + errText(err))),
      });
    });
  }

  _backoffDelay() {
    const n = Math.max(1, this._failures);
    const full = Math.min(this.opts.backoffMaxMs, this.opts.backoffBaseMs * Math.pow(2, n - 1));
    // "Equal jitter": between half and all of the step, so many phones that failed
    // together (a server restart) do not come back together.
    return Math.round(full / 2 + (this._random() * full) / 2);
  }

  // --------------------------------------------------------------------- queue

  _add(item) {
    const v = item.value;
    if (v === undefined || v === null || v === '' || v === MOCK_FORM_ID) return false;
    if (typeof v !== 'string' || !VALUE_RE.test(v) || (item.result !== undefined && !item.result)) {
      this.log.warn('[formid-ledger] ignored invalid ' + item.kind, v);
      return false;
    }
    // A form_id/prepay_id is one credential; a second report is a duplicate. A
    // subscription is not: each 'accept' of the same template grants one more message.
    if (item.kind !== 'subscription' &&
        this._queue.some((q) => q.kind === item.kind && q.value === v)) return false;
    item.at = this._now();
    this._queue.push(item);
    this._trim();
    this._persist();
    if (!this._running) this._schedule(this.flushDelayMs);
    return true;
  }

  /** Caps the queue: oldest form_ids go first (they expire first), then prepay_ids. */
  _trim() {
    let dropped = 0;
    while (this._queue.length > this.maxQueue) {
      let i = this._queue.findIndex((q) => q.kind === 'form_id');
      if (i < 0) i = this._queue.findIndex((q) => q.kind === 'prepay_id');
      this._queue.splice(Math.max(i, 0), 1);
      dropped++;
    }
    if (dropped) this.log.warn('[formid-ledger] queue full, dropped ' + dropped + ' oldest item(s)');
  }

  _dropStale() {
    const cutoff = this._now() - this.opts.maxAgeMs;
    const before = this._queue.length;
    this._queue = this._queue.filter((q) => q.kind === 'subscription' || !(q.at < cutoff));
    if (this._queue.length !== before) this._persist();
  }

  _remove(batch) {
    const done = new Set(batch); // by identity: items collected meanwhile stay
    this._queue = this._queue.filter((q) => !done.has(q));
    this._persist();
  }

  _persist() {
    this._save(this.storageKey, this._queue);
  }

  _load(key, fallback) {
    try {
      const v = this.wx.getStorageSync(key);
      return v === '' || v === undefined ? fallback : v; // '' means "not set" in wx
    } catch (e) {
      return fallback;
    }
  }

  _save(key, value) {
    try {
      this.wx.setStorageSync(key, value);
    } catch (e) {
      this.log.warn('[formid-ledger] storage write failed', e); // keep working in memory
    }
  }

  // -------------------------------------------------------------------- timers

  /** At most one timer exists, and only while items wait. */
  _schedule(delayMs) {
    if (this._timer !== null || this._running || !this._queue.length) return;
    this._timer = this._setTimeout(() => {
      this._timer = null;
      return this.flush();
    }, delayMs);
  }

  _cancelTimer() {
    if (this._timer !== null) this._clearTimeout(this._timer);
    this._timer = null;
  }
}

function toBody(batch) {
  const body = {};
  const forms = batch.filter((q) => q.kind === 'form_id').map((q) => q.value);
  const prepays = batch.filter((q) => q.kind === 'prepay_id').map((q) => q.value);
  const subs = batch.filter((q) => q.kind === 'subscription')
    .map((q) => ({ template_id: q.value, result: q.result }));
  if (forms.length) body.form_ids = forms;
  if (prepays.length) body.prepay_ids = prepays;
  if (subs.length) body.subscriptions = subs;
  return body;
}

function errCode(data) {
  return data && data.error && data.error.code ? data.error.code : '';
}

function errText(err) {
  return err && err.errMsg ? err.errMsg : String(err);
}

/** Same as `client.formSubmitHandler(fn)`, for code that keeps the client elsewhere. */
function formSubmitHandler(client, fn) {
  return client.formSubmitHandler(fn);
}

module.exports = { createClient, formSubmitHandler, MOCK_FORM_ID };
