'use strict';
const nodeTest = require('node:test');
// A broken client could loop or hang: fail fast instead.
const test = (name, fn) => nodeTest(name, { timeout: 5000 }, fn);
const assert = require('node:assert/strict');
const ledger = require('../formid-ledger.js');

const BASE = 'https://ledger.test';

// ------------------------------------------------------------------ fakes

/**
 * A fake formid-ledger server. `credentials(body, call)` may be given per test: it
 * returns `{status, data}`, `{fail: true}` (network failure) or a promise of either.
 * Records what it received so every test can assert on it.
 */
function fakeServer(opts) {
  const o = opts || {};
  const s = {
    sessions: new Set(),
    logins: [], // bodies of POST /v1/client/session
    calls: [], // {auth, body} of every POST /v1/client/credentials
    accepted: [], // bodies answered 200
    inFlight: 0,
    maxInFlight: 0,
    sessionTtlMs: o.sessionTtlMs || 30 * 24 * 3600 * 1000,
    clock: o.clock,
  };
  s.handle = async (req) => {
    if (req.url === BASE + '/v1/client/session') {
      s.logins.push(req.data);
      const token = 'sess-' + req.data.code;
      s.sessions.add(token);
      const now = s.clock ? s.clock.now : Date.now();
      return { status: 200, data: { session: token, openid: 'o-user', expires_at: new Date(now + s.sessionTtlMs).toISOString() } };
    }
    assert.equal(req.url, BASE + '/v1/client/credentials');
    assert.equal(req.method, 'POST');
    const body = JSON.parse(JSON.stringify(req.data)); // as it goes over the wire
    const call = { auth: req.header.Authorization, body };
    if (s.calls.length >= 200) throw new Error('client is looping'); // ends a runaway client
    s.calls.push(call);
    s.inFlight++;
    s.maxInFlight = Math.max(s.maxInFlight, s.inFlight);
    try {
      if (!s.sessions.has(String(call.auth).replace(/^Bearer /, ''))) {
        return { status: 401, data: { error: { code: 'unauthorized', message: 'bad session' } } };
      }
      const n = items(body).length;
      assert.ok(n >= 1 && n <= 50, 'contract: 1..50 items per request, got ' + n);
      const r = o.credentials ? await o.credentials(body, call, s.calls.length) : null;
      if (r) return r;
      s.accepted.push(body);
      return { status: 200, data: { accepted: n, duplicates: 0, rejected: [] } };
    } finally {
      s.inFlight--;
    }
  };
  return s;
}

/** A fake `wx`: storage in a Map (JSON round trip, like the real one), login codes, request. */
function fakeWx(server, storage) {
  let codes = 0;
  const store = storage || new Map();
  return {
    storage: store,
    getStorageSync: (k) => (store.has(k) ? JSON.parse(store.get(k)) : ''),
    setStorageSync: (k, v) => { store.set(k, JSON.stringify(v)); },
    removeStorageSync: (k) => { store.delete(k); },
    login: ({ success }) => { const code = 'c' + ++codes; setImmediate(() => success({ code, errMsg: 'login:ok' })); },
    request: (req) => {
      // Answer in a later macrotask, like the real wx.request (and so a client that
      // loops forever cannot starve the test's timeout).
      new Promise(setImmediate).then(() => server.handle(req)).then((r) => {
        if (r.fail) req.fail({ errMsg: 'request:fail timeout' });
        else req.success({ statusCode: r.status, data: r.data, header: {} });
      }, (err) => req.fail({ errMsg: 'test server threw: ' + err.message }));
    },
  };
}

/** Manual clock and timers: nothing fires unless the test says so. */
function fakeClock() {
  let ids = 0;
  const c = {
    now: 1_800_000_000_000,
    timers: [],
    setTimeout: (fn, ms) => { const t = { id: ++ids, fn, ms, at: c.now + ms }; c.timers.push(t); return t.id; },
    clearTimeout: (id) => { c.timers = c.timers.filter((t) => t.id !== id); },
    /** Fires the next timer, returns what its callback returned (a flush promise). */
    fire: () => {
      c.timers.sort((a, b) => a.at - b.at);
      const t = c.timers.shift();
      assert.ok(t, 'expected a pending timer');
      c.now = Math.max(c.now, t.at);
      return t.fn();
    },
  };
  return c;
}

function quietLogger() {
  const warnings = [];
  return { warnings, warn: (...a) => warnings.push(a.map(String).join(' ')) };
}

function setup(opts) {
  const o = opts || {};
  const clock = o.clock || fakeClock();
  const server = o.server || fakeServer({ clock, credentials: o.credentials });
  const wx = o.wx || fakeWx(server, o.storage);
  const logger = quietLogger();
  const client = ledger.createClient(Object.assign({
    baseUrl: BASE + '/', wx, logger, now: () => clock.now, random: () => 0.5,
    setTimeout: clock.setTimeout, clearTimeout: clock.clearTimeout,
  }, o.client));
  return { clock, server, wx, client, logger };
}

function items(body) {
  return [].concat(
    (body.form_ids || []).map((v) => 'F:' + v),
    (body.prepay_ids || []).map((v) => 'P:' + v),
    (body.subscriptions || []).map((s) => 'S:' + s.template_id + '=' + s.result));
}

const allItems = (bodies) => bodies.reduce((acc, b) => acc.concat(items(b)), []);

// ------------------------------------------------------------------ tests

test('mock, empty and malformed form_ids are dropped locally, never queued or sent', async () => {
  const { client, server, clock, wx } = setup();
  for (const v of [ledger.MOCK_FORM_ID, '', undefined, null, 'has space', 'x'.repeat(129), 42]) {
    assert.equal(client.collectFormId(v), false, String(v));
  }
  assert.equal(client.pending(), 0);
  assert.equal(clock.timers.length, 0, 'nothing queued: no timer');
  assert.equal(wx.storage.has('formid-ledger-queue'), false);

  client.collectFormId('F1');
  client.collectFormId(ledger.MOCK_FORM_ID);
  const r = await client.flush();
  assert.deepEqual(r, { ok: true, uploaded: 1, pending: 0 });
  assert.deepEqual(server.calls.map((c) => c.body), [{ form_ids: ['F1'] }]);
});

test('login sends app_id and code, bearer session is used for uploads', async () => {
  const { client, server } = setup({ client: { appId: 'wxapp1' } });
  const s = await client.login();
  assert.deepEqual(server.logins, [{ app_id: 'wxapp1', code: 'c1' }]);
  assert.equal(s.session, 'sess-c1');
  assert.equal(s.openid, 'o-user');
  await client.login(); // reused, still valid
  client.collectPrepayId('P1');
  await client.flush();
  assert.equal(server.logins.length, 1);
  assert.deepEqual(server.calls, [{ auth: 'Bearer sess-c1', body: { prepay_ids: ['P1'] } }]);
});

test('batches respect batchSize and the 50-item limit, in order, with all kinds', async () => {
  {
    const { client, server } = setup(); // default batch size 20
    for (let i = 0; i < 45; i++) client.collectFormId('F' + i);
    await client.flush();
    assert.deepEqual(server.calls.map((c) => items(c.body).length), [20, 20, 5]);
    assert.deepEqual(allItems(server.accepted), Array.from({ length: 45 }, (_, i) => 'F:F' + i));
  }
  {
    const { client, server } = setup({ client: { batchSize: 500 } }); // clamped to 50
    for (let i = 0; i < 40; i++) client.collectFormId('F' + i);
    for (let i = 0; i < 40; i++) client.collectPrepayId('P' + i);
    const res = {};
    for (let i = 0; i < 40; i++) res['T' + i] = 'accept';
    assert.equal(client.collectSubscriptionResult(res), 40);
    const r = await client.flush();
    assert.equal(r.uploaded, 120);
    assert.deepEqual(server.calls.map((c) => items(c.body).length), [50, 50, 20]);
    assert.equal(new Set(allItems(server.accepted)).size, 120);
  }
});

test('debounced upload after collect; no timer left when the queue is empty', async () => {
  const { client, server, clock } = setup({ client: { flushDelayMs: 2000 } });
  client.collectFormId('F1');
  client.collectFormId('F2');
  client.collectPrepayId('F1'); // another kind, same value: not a duplicate
  client.collectFormId('F1'); // duplicate: not queued twice
  assert.equal(clock.timers.length, 1, 'one timer for all collects');
  assert.equal(clock.timers[0].ms, 2000);
  await new Promise(setImmediate);
  assert.equal(server.calls.length, 0, 'nothing sent before the delay');
  await clock.fire();
  assert.deepEqual(server.calls.map((c) => c.body), [{ form_ids: ['F1', 'F2'], prepay_ids: ['F1'] }]);
  assert.equal(clock.timers.length, 0);
  assert.equal(client.pending(), 0);
});

test('queue survives a restart: a new client with the same storage uploads it, reusing the session', async () => {
  const storage = new Map();
  const clock = fakeClock();
  const server = fakeServer({ clock });
  const a = setup({ clock, server, storage }).client;
  await a.login();
  a.collectFormId('F1');
  a.collectPrepayId('P1');
  a.collectSubscriptionResult({ T1: 'accept', errMsg: 'requestSubscribeMessage:ok' });
  assert.equal(server.calls.length, 0);

  clock.timers = []; // the app was killed: its timers are gone
  const { client: b } = setup({ clock, server, storage });
  assert.equal(b.pending(), 3);
  assert.equal(clock.timers.length, 1, 'left-overs are scheduled for upload');
  await clock.fire();
  assert.deepEqual(server.calls.map((c) => c.body), [
    { form_ids: ['F1'], prepay_ids: ['P1'], subscriptions: [{ template_id: 'T1', result: 'accept' }] },
  ]);
  assert.equal(server.logins.length, 1, 'stored session reused');
  assert.equal(server.calls[0].auth, 'Bearer sess-c1');
  assert.equal(setup({ clock, server, storage }).client.pending(), 0, 'uploaded items are gone from storage');
});

test('401 → logs in again once and retries the same batch', async () => {
  const { client, server } = setup();
  await client.login();
  server.sessions.clear(); // server-side revocation
  client.collectFormId('F1');
  client.collectFormId('F2');
  const r = await client.flush();
  assert.equal(r.ok, true);
  assert.equal(server.logins.length, 2);
  assert.deepEqual(server.calls.map((c) => c.auth), ['Bearer sess-c1', 'Bearer sess-c2']);
  assert.deepEqual(server.accepted, [{ form_ids: ['F1', 'F2'] }]);
});

test('401 even after re-login: items kept, retried later', async () => {
  const { client, server, clock } = setup();
  server.sessions.add = () => {}; // the server never recognises any session
  client.collectFormId('F1');
  const r = await client.flush();
  assert.equal(r.ok, false);
  assert.equal(server.logins.length, 2, 'exactly one re-login per attempt');
  assert.equal(server.calls.length, 2);
  assert.equal(client.pending(), 1);
  assert.equal(clock.timers.length, 1, 'a retry is scheduled');
});

test('5xx, 429 and network failures: kept, retried with exponential backoff, no loss, no duplicates', async () => {
  const failures = [{ status: 503, data: {} }, { fail: true }, { status: 429, data: { error: { code: 'rate_limited' } } }, { status: 500, data: {} }];
  const { client, server, clock } = setup({ credentials: () => failures.shift() });
  client.collectFormId('F1');
  client.collectPrepayId('P1');

  let r = await client.flush();
  assert.deepEqual(r, { ok: false, uploaded: 0, pending: 2 });
  const delays = [];
  for (let i = 0; i < 4; i++) {
    assert.equal(clock.timers.length, 1, 'exactly one retry timer');
    delays.push(clock.timers[0].ms);
    if (i === 1) client.collectFormId('F2'); // collected while backing off: joins, no extra timer
    assert.equal(clock.timers.length, 1);
    r = await clock.fire();
  }
  // random() = 0.5 → 75% of 1 s, 2 s, 4 s, 8 s
  assert.deepEqual(delays, [750, 1500, 3000, 6000]);
  assert.deepEqual(r, { ok: true, uploaded: 3, pending: 0 });
  assert.equal(server.calls.length, 5);
  assert.deepEqual(server.accepted, [{ form_ids: ['F1', 'F2'], prepay_ids: ['P1'] }]);
  assert.equal(clock.timers.length, 0, 'no timer once the queue is empty');
  assert.equal(server.logins.length, 1);
});

test('backoff is capped at 60 s and jittered', async () => {
  let random = 0;
  const { client, clock } = setup({ credentials: () => ({ status: 502, data: {} }), client: { random: () => random } });
  client.collectFormId('F1');
  await client.flush(); // failure 1, random 0
  const seen = [clock.timers[0].ms];
  for (let n = 2; n <= 9; n++) {
    random = n % 2 ? 0 : 0.999; // the delay after failure n is drawn with this
    await clock.fire();
    assert.equal(clock.timers.length, 1);
    seen.push(clock.timers[0].ms);
  }
  // step 1 s, 2 s, 4 s, … capped at 60 s; each delay between half and all of the step
  assert.deepEqual(seen, [500, 1999, 2000, 7996, 8000, 31984, 30000, 59970, 30000]);
  assert.equal(client.pending(), 1);
});

test('400 and 413 drop that batch (with a warning) and go on with the next', async () => {
  const answers = { 1: { status: 400, data: { error: { code: 'invalid_request' } } }, 2: { status: 413, data: { error: { code: 'payload_too_large' } } } };
  const { client, server, logger, clock } = setup({ credentials: (body, call, n) => answers[n], client: { batchSize: 2 } });
  for (const v of ['F1', 'F2', 'F3', 'F4', 'F5']) client.collectFormId(v);
  const r = await client.flush();
  assert.deepEqual(r, { ok: true, uploaded: 1, pending: 0 });
  assert.deepEqual(server.calls.map((c) => c.body.form_ids), [['F1', 'F2'], ['F3', 'F4'], ['F5']]);
  assert.deepEqual(server.accepted, [{ form_ids: ['F5'] }]);
  assert.equal(logger.warnings.filter((w) => w.includes('batch dropped')).length, 2);
  assert.equal(clock.timers.length, 0);
});

test('200 with rejected items: removed from the queue and warned about', async () => {
  const { client, server, logger } = setup({
    credentials: () => ({ status: 200, data: { accepted: 1, duplicates: 0, rejected: [{ value: 'F2', reason: 'user_cap' }] } }),
  });
  client.collectFormId('F1');
  client.collectFormId('F2');
  await client.flush();
  assert.equal(server.calls.length, 1);
  assert.equal(client.pending(), 0);
  assert.ok(logger.warnings.some((w) => w.includes('rejected')));
  await client.flush();
  assert.equal(server.calls.length, 1, 'not sent again');
});

test('subscription results map to {template_id, result} for every template, errMsg ignored', async () => {
  const { client, server } = setup();
  const res = { T_A: 'accept', T_B: 'reject', T_C: 'ban', T_D: 'filter', errMsg: 'requestSubscribeMessage:ok' };
  assert.equal(client.collectSubscriptionResult(res), 4);
  assert.equal(client.collectSubscriptionResult({ T_A: 'accept', T_X: 'reject', errMsg: 'ok' }, ['T_A']), 1);
  assert.equal(client.collectSubscriptionResult(null), 0);
  await client.flush();
  assert.deepEqual(server.calls.map((c) => c.body), [{
    subscriptions: [
      { template_id: 'T_A', result: 'accept' },
      { template_id: 'T_B', result: 'reject' },
      { template_id: 'T_C', result: 'ban' },
      { template_id: 'T_D', result: 'filter' },
      { template_id: 'T_A', result: 'accept' }, // a second accept is a second message
    ],
  }]);
});

test('only one upload in flight at a time; concurrent flushes join it', async () => {
  const gates = [];
  const { client, server } = setup({
    credentials: () => new Promise((resolve) => gates.push(resolve)),
    client: { batchSize: 2 },
  });
  for (const v of ['F1', 'F2', 'F3']) client.collectFormId(v);
  const p1 = client.flush();
  const p2 = client.flush();
  assert.equal(p1, p2, 'the second flush joins the running one');
  while (gates.length === 0) await new Promise(setImmediate);
  client.collectFormId('F4'); // while in flight
  const p3 = client.flush();
  for (let i = 0; i < 5; i++) await new Promise(setImmediate);
  assert.equal(server.calls.length, 1, 'no second request while the first is in flight');
  gates.shift()(null); // answer the first one (default: 200)
  while (gates.length === 0) await new Promise(setImmediate);
  gates.shift()(null);
  const [r1, r3] = await Promise.all([p1, p3]);
  assert.equal(r1, r3);
  assert.equal(server.maxInFlight, 1);
  assert.deepEqual(server.accepted, [{ form_ids: ['F1', 'F2'] }, { form_ids: ['F3', 'F4'] }]);
});

test('maxQueue drops the oldest form_ids first', async () => {
  const { client, server, logger } = setup({ client: { maxQueue: 3 } });
  client.collectFormId('F1');
  client.collectPrepayId('P1');
  client.collectFormId('F2');
  client.collectSubscriptionResult({ T1: 'accept' }); // F1 goes
  client.collectFormId('F3'); // F2 goes
  assert.equal(client.pending(), 3);
  assert.ok(logger.warnings.some((w) => w.includes('queue full')));
  await client.flush();
  assert.deepEqual(server.accepted, [{ form_ids: ['F3'], prepay_ids: ['P1'], subscriptions: [{ template_id: 'T1', result: 'accept' }] }]);
});

test('a session is reused until shortly before expires_at, then renewed', async () => {
  const clock = fakeClock();
  const server = fakeServer({ clock, sessionTtlMs: 3600 * 1000 });
  const { client } = setup({ clock, server, client: { sessionMarginMs: 5 * 60 * 1000 } });
  client.collectFormId('F1');
  await client.flush();
  clock.now += 50 * 60 * 1000; // 10 min left: still fine
  client.collectFormId('F2');
  await client.flush();
  assert.equal(server.logins.length, 1);
  clock.now += 6 * 60 * 1000; // 4 min left: inside the margin
  client.collectFormId('F3');
  await client.flush();
  assert.equal(server.logins.length, 2);
  assert.deepEqual(server.calls.map((c) => c.auth), ['Bearer sess-c1', 'Bearer sess-c1', 'Bearer sess-c2']);
});

test('login failure during upload keeps the items and backs off', async () => {
  const clock = fakeClock();
  const server = fakeServer({ clock });
  const handle = server.handle;
  let down = true;
  server.handle = (req) => (down && req.url.endsWith('/session') ? { status: 502, data: { error: { code: 'wechat_unavailable' } } } : handle(req));
  const { client } = setup({ clock, server });
  await assert.rejects(client.login(), /HTTP 502 wechat_unavailable/);
  client.collectFormId('F1');
  const r = await client.flush();
  assert.equal(r.ok, false);
  assert.equal(server.calls.length, 0);
  down = false;
  await clock.fire();
  assert.deepEqual(server.accepted, [{ form_ids: ['F1'] }]);
});

test('form_ids too old to be useful are not uploaded', async () => {
  const { client, server, clock } = setup();
  client.collectFormId('OLD');
  clock.now += 7 * 24 * 3600 * 1000;
  client.collectFormId('NEW');
  await client.flush();
  assert.deepEqual(server.accepted, [{ form_ids: ['NEW'] }]);
});

test('formSubmitHandler collects e.detail.formId and calls the page handler with its this', async () => {
  const { client, server } = setup();
  const page = {
    seen: null,
    onSubmit: client.formSubmitHandler(function (e) { this.seen = e.detail.value; return 'done'; }),
    onOther: ledger.formSubmitHandler(client, null),
  };
  assert.equal(page.onSubmit({ detail: { formId: 'FORM1', value: { name: 'x' } } }), 'done');
  assert.deepEqual(page.seen, { name: 'x' });
  page.onOther({ detail: { formId: ledger.MOCK_FORM_ID } });
  page.onOther({});
  await client.flush();
  assert.deepEqual(server.accepted, [{ form_ids: ['FORM1'] }]);
});
