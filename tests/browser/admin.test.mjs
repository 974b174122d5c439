// Headless-browser test of the admin page (GET /admin) against the real service.
//
// Starts the service binary in sandbox mode (no LEDGER_APPS: built-in simulator, app
// `wxsandbox`) on a free port with a fresh SQLite file, seeds users through the API,
// and drives Debian's chromium through playwright-core (see harness.mjs).
//
//   LEDGER_BIN     service binary (default: <repo>/target/debug/formid-ledger)
//   CHROMIUM_BIN   browser (default: /usr/bin/chromium)
//
// Run with tests/browser/run.sh, or `node --test` in this folder.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { SCREENSHOTS, startService, launchBrowser, stopAll } from './harness.mjs';

const ADMIN_KEY = 'admin-key-0123456789';
const SEND_KEY = 'send-key-0123456789';
const USER = 'o-browser-test';
// Printable ASCII without white space, as openids must be, that would become
// elements (and, without the CSP, run code) if the page used innerHTML.
const HTMLISH = 'o<i>x</i>&amp;';
const IMGISH = '"><img/src/onerror=window.__xss=1>';

let base;
let page;
const pageProblems = [];

async function apiPost(pathname, body, key) {
  const res = await fetch(base + pathname, {
    method: 'POST',
    headers: { Authorization: 'Bearer ' + key, 'Content-Type': 'application/json' },
    body: JSON.stringify(body),
  });
  const json = await res.json();
  assert.equal(res.status, 200, `POST ${pathname}: ${JSON.stringify(json)}`);
  return json;
}

/** Calls the API with `key` and expects `status`; returns the JSON answer. */
async function apiCall(method, pathname, body, key, status) {
  const res = await fetch(base + pathname, {
    method,
    headers: { Authorization: 'Bearer ' + key, 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const json = await res.json();
  assert.equal(res.status, status, `${method} ${pathname}: ${JSON.stringify(json)}`);
  return json;
}

/** Mints one form_id per openid in the sandbox's simulator (so WeChat accepts it) and registers it. */
async function holdFormIds(openids) {
  const credentials = [];
  for (const openid of openids) {
    const res = await fetch(base + '/sim/form-ids', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ appid: 'wxsandbox', openid, count: 1 }),
    });
    const json = await res.json();
    assert.equal(res.status, 200, `POST /sim/form-ids: ${JSON.stringify(json)}`);
    for (const value of json.form_ids) credentials.push({ openid, kind: 'form_id', value });
  }
  const seeded = await apiPost('/v1/credentials', { credentials }, SEND_KEY);
  assert.equal(seeded.accepted, credentials.length, JSON.stringify(seeded));
}

/** Waits until `selector`'s text is `expected`; fails with what it was instead. */
async function expectText(selector, expected, timeout = 10000) {
  try {
    await page.waitForFunction(([sel, exp]) => {
      const el = document.querySelector(sel);
      return el !== null && el.textContent.trim() === exp;
    }, [selector, expected], { timeout });
  } catch (_) {
    const actual = await page.evaluate((sel) => {
      const el = document.querySelector(sel);
      return el === null ? '(no such element)' : el.textContent.trim();
    }, selector);
    assert.fail(`${selector}: expected ${JSON.stringify(expected)}, found ${JSON.stringify(actual)}`);
  }
}

async function visibleText(selector) {
  const loc = page.locator(selector);
  await loc.waitFor({ state: 'visible', timeout: 10000 });
  return (await loc.textContent()).trim();
}

async function signIn(key) {
  await page.locator('#signin-form').waitFor({ state: 'visible' });
  await page.fill('#signin-key', key);
  await page.click('#signin-submit');
}

async function lookUp(openid) {
  await page.fill('#lookup-openid', openid);
  await page.click('#lookup-form button[type=submit]');
  await expectText('#quota-openid', openid);
}

before(async () => {
  base = await startService({
    tmpPrefix: 'ledger-browser-',
    env: { LEDGER_API_KEYS: `ops:admin:${ADMIN_KEY},backend:send:${SEND_KEY}` },
  });

  const credentials = [
    ...[1, 2, 3].map((i) => ({ openid: USER, kind: 'form_id', value: `browser-form-${i}` })),
    { openid: USER, kind: 'prepay_id', value: 'wx20261127browserprepay' },
    { openid: HTMLISH, kind: 'form_id', value: 'browser-form-html' },
    { openid: IMGISH, kind: 'form_id', value: 'browser-form-img' },
  ];
  const seeded = await apiPost('/v1/credentials', { credentials }, SEND_KEY);
  assert.equal(seeded.accepted, credentials.length, JSON.stringify(seeded));

  page = await launchBrowser();
  page.on('pageerror', (err) => pageProblems.push('uncaught: ' + err.message));
  page.on('console', (msg) => {
    // 401/403/404 answers are expected and logged by the browser as failed loads.
    if (msg.type() === 'error' && !/Failed to load resource/.test(msg.text())) {
      pageProblems.push('console: ' + msg.text());
    }
  });
});

after(stopAll);

test('the page and its assets are served with strict headers', async () => {
  const res = await fetch(base + '/admin');
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type'), /^text\/html/);
  const csp = res.headers.get('content-security-policy') || '';
  assert.match(csp, /default-src 'self'/);
  assert.match(csp, /script-src 'self'(;|$)/);
  assert.doesNotMatch(csp, /unsafe-inline|unsafe-eval/);
  assert.equal(res.headers.get('x-content-type-options'), 'nosniff');
  assert.equal(res.headers.get('cache-control'), 'no-store');
  const html = await res.text();
  assert.doesNotMatch(html, /<script(?![^>]*\bsrc=)[^>]*>/, 'no inline script');
  assert.doesNotMatch(html, /\sstyle=|<style/, 'no inline style');
  assert.doesNotMatch(html, /https?:\/\//, 'nothing fetched from elsewhere');

  for (const [file, type] of [['admin.css', /^text\/css/], ['admin.js', /^text\/javascript/]]) {
    const r = await fetch(`${base}/admin/assets/${file}`);
    assert.equal(r.status, 200, file);
    assert.match(r.headers.get('content-type'), type, file);
    assert.equal(r.headers.get('x-content-type-options'), 'nosniff', file);
  }
  const js = await (await fetch(`${base}/admin/assets/admin.js`)).text();
  assert.doesNotMatch(js, /innerHTML|outerHTML|insertAdjacentHTML|document\.write/, 'the script never parses HTML');

  const missing = await fetch(`${base}/admin/assets/nope.js`);
  assert.equal(missing.status, 404);
  assert.equal((await missing.json()).error.code, 'not_found');
  const post = await fetch(base + '/admin', { method: 'POST' });
  assert.equal(post.status, 405);
  assert.equal((await post.json()).error.code, 'method_not_allowed');
});

test('a wrong key and a key without the admin role show an error', async () => {
  await page.goto(base + '/admin');
  await signIn('not-the-key-0000');
  const wrong = await visibleText('#signin-error');
  assert.match(wrong, /not accepted|401/i);
  await page.screenshot({ path: path.join(SCREENSHOTS, 'signin-error.png') });
  assert.equal(await page.locator('#app').isVisible(), false, 'no data view after a wrong key');
  assert.equal(await page.evaluate(() => sessionStorage.length), 0, 'a wrong key is not kept');

  await signIn(SEND_KEY);
  await page.waitForFunction(() => /403|admin role/.test(document.querySelector('#signin-error').textContent));
  assert.equal(await page.locator('#app').isVisible(), false);
});

test('signed in: the overview shows live credentials by kind', async () => {
  await signIn(ADMIN_KEY);
  await page.locator('#app').waitFor({ state: 'visible' });
  assert.equal(await page.locator('#signin-error').isVisible(), false);
  await expectText('#overview-live [data-kind=form_id] .credentials', '5');
  await expectText('#overview-live [data-kind=form_id] .uses-left', '5');
  await expectText('#overview-live [data-kind=prepay_id] .credentials', '1');
  await expectText('#overview-live [data-kind=subscription] .credentials', '0');
  // The key is kept in this tab's sessionStorage only.
  assert.equal(await page.evaluate(() => sessionStorage.getItem('formid-ledger.admin-key')), ADMIN_KEY);
  assert.equal(await page.evaluate(() => localStorage.length), 0);
  assert.doesNotMatch(await page.evaluate(() => document.cookie), /admin-key/);
});

test('looking up a user shows sendable uses and the numbers per kind', async () => {
  await lookUp(USER);
  await expectText('#quota-sendable', '4');
  await expectText('#quota-kinds tr[data-kind=form_id] .credentials', '3');
  await expectText('#quota-kinds tr[data-kind=form_id] .uses-left', '3');
  await expectText('#quota-kinds tr[data-kind=prepay_id] .credentials', '1');
  await expectText('#quota-kinds tr[data-kind=prepay_id] .uses-left', '1');
  // The messages panel either lists messages or says it is not available; never blank.
  await page.waitForFunction(() =>
    !document.querySelector('#messages-status').hidden || document.querySelector('#user-messages').children.length > 0);

  // A user never seen answers zeros.
  await lookUp('o-never-seen');
  await expectText('#quota-sendable', '0');
});

test('openids that look like HTML are shown literally, never parsed', async () => {
  for (const openid of [HTMLISH, IMGISH]) {
    await lookUp(openid);
    await expectText('#quota-sendable', '1');
    assert.equal(await page.locator('#quota-openid').textContent(), openid);
  }
  await page.click('#users-refresh');
  await page.waitForFunction((n) => document.querySelectorAll('#users-list tbody tr').length === n, 3);
  const listed = await page.$$eval('#users-list tbody tr td:first-child', (tds) => tds.map((td) => td.textContent));
  assert.deepEqual([...listed].sort(), [HTMLISH, IMGISH, USER].sort());
  const injected = await page.evaluate(() => ({
    i: document.querySelectorAll('i').length,
    img: document.querySelectorAll('img').length,
    xss: window.__xss,
  }));
  assert.deepEqual(injected, { i: 0, img: 0, xss: undefined });
});

test('clicking a user in the list opens its lookup', async () => {
  await page.locator('#users-list button', { hasText: USER }).click();
  await expectText('#quota-openid', USER);
  await expectText('#quota-sendable', '4');
  assert.equal(await page.inputValue('#lookup-openid'), USER);
  await page.screenshot({ path: path.join(SCREENSHOTS, 'admin.png'), fullPage: true });
});

test('failures of a call are shown, not a blank panel', async () => {
  const quotaUrl = (u) => /^\/v1\/admin\/users\/[^/]+\/quota$/.test(u.pathname);
  await page.route(quotaUrl, (route) => route.abort('connectionrefused'));
  await page.fill('#lookup-openid', 'o-network-down');
  await page.click('#lookup-form button[type=submit]');
  assert.match(await visibleText('#lookup-status.error'), /could not be reached/i);
  await page.unroute(quotaUrl);

  const usersUrl = (u) => u.pathname === '/v1/admin/users';
  await page.route(usersUrl, (route) => route.fulfill({
    status: 500, contentType: 'application/json',
    body: JSON.stringify({ error: { code: 'internal', message: 'internal error; see the service log' } }),
  }));
  await page.click('#users-refresh');
  assert.match(await visibleText('#users-status.error'), /internal error.*500 internal/);
  await page.unroute(usersUrl);
  await page.click('#users-refresh');
  await page.waitForFunction(() => document.querySelector('#users-status').hidden);
});

test('the shapes of the newer endpoints render (answers mocked in the browser)', async () => {
  const now = Date.now();
  const hourIso = (h) => new Date(Math.floor(now / 3600e3) * 3600e3 - h * 3600e3).toISOString();
  const perHour = Array.from({ length: 24 }, (_, i) => {
    const h = 23 - i;
    return { hour: hourIso(h), sent: Math.round(8 + 6 * Math.sin(i / 3) + (i % 5)), failed: i % 7 === 3 ? 2 : 0, no_quota: i % 4 === 1 ? 1 : 0 };
  });
  const fulfill = (body) => (route) => route.fulfill({ status: 200, contentType: 'application/json', body: JSON.stringify(body) });
  await page.route((u) => u.pathname === '/v1/admin/apps', fulfill({ apps: [
    { app_id: 'wxsandbox', token_expires_at: new Date(now + 95 * 60e3).toISOString(), token_last_error: null },
    { app_id: 'wx<b>shop</b>', token_expires_at: null, token_last_error: '40013 <invalid appid>' },
  ] }));
  await page.route((u) => u.pathname === '/v1/admin/stats', async (route) => {
    const res = await route.fetch();
    const real = await res.json();
    await route.fulfill({ response: res, json: { ...real,
      messages_24h: { queued: 2, sending: 1, sent: 214, no_quota: 6, failed: 9 },
      top_errcodes: [{ errcode: 43101, count: 5 }, { errcode: 41028, count: 3 }, { errcode: 40037, count: 1 }],
      messages_per_hour: perHour } });
  });
  await page.route((u) => /^\/v1\/admin\/users\/[^/]+\/quota$/.test(u.pathname), async (route) => {
    const res = await route.fetch();
    const real = await res.json();
    await route.fulfill({ response: res, json: { ...real,
      subscriptions: { TPL_SHIPPED: 2 }, subscriptions_confirmed: { TPL_SHIPPED: 1 },
      subscription_results: { TPL_SHIPPED: { accept: 3 } } } });
  });
  await page.route((u) => /^\/v1\/admin\/users\/[^/]+\/messages$/.test(u.pathname), fulfill({ messages: [
    { id: '1043', app_id: 'wxsandbox', openid: USER, template_id: 'TPL_<b>ORDER</b>', status: 'sent',
      credential: { kind: 'form_id', id: 7 }, attempts: [],
      delivery: { status: 'refused', error_status: 'fail:user refuse to accept the msg <b>x</b>', at: new Date(now - 4 * 60e3).toISOString() }, created_at: new Date(now - 5 * 60e3).toISOString(), finished_at: new Date(now - 5 * 60e3).toISOString() },
    { id: '1042', app_id: 'wxsandbox', openid: USER, template_id: 'TPL_SHIPPED', status: 'failed',
      error: { code: 'template_invalid', wechat_errcode: 40037, message: 'template id <invalid>' },
      attempts: [{ at: new Date(now - 65 * 60e3).toISOString(), credential_id: 6, wechat_errcode: 40037, outcome: 'final' }],
      created_at: new Date(now - 65 * 60e3).toISOString(), finished_at: new Date(now - 65 * 60e3).toISOString() },
    { id: '1040', app_id: 'wxsandbox', openid: USER, template_id: 'TPL_SHIPPED', status: 'no_quota',
      error: { code: 'no_quota', message: 'the user has no usable credential' }, attempts: [],
      created_at: new Date(now - 26 * 3600e3).toISOString(), finished_at: new Date(now - 26 * 3600e3).toISOString() },
    { id: '1044', app_id: 'wxsandbox', openid: USER, template_id: 'TPL_ORDER', status: 'queued', attempts: [],
      created_at: new Date(now - 20e3).toISOString() },
  ] }));

  await page.reload(); // still signed in: the key is in sessionStorage
  await page.locator('#app').waitFor({ state: 'visible' });
  await page.locator('#app-picker').waitFor({ state: 'visible' });
  assert.deepEqual(await page.$$eval('#app-select option', (os) => os.map((o) => o.textContent)), ['wxsandbox', 'wx<b>shop</b>']);
  await expectText('#messages-24h [data-status=sent] .status-n', '214');
  await page.locator('#messages-chart svg rect.seg').first().waitFor();
  assert.ok(await page.locator('#messages-chart svg rect.seg.sent').count() >= 20);
  await expectText('#top-errcodes tbody tr:first-child td:first-child', '43101');
  await expectText('#apps-list tbody tr:nth-child(2) td:first-child', 'wx<b>shop</b>');

  await lookUp(USER);
  await expectText('#quota-sendable', '4');
  await page.waitForFunction(() => document.querySelectorAll('#user-messages tbody tr').length === 4);
  assert.equal(await page.locator('#user-messages tbody tr:first-child td:nth-child(2) .badge').textContent(), 'sent');
  assert.equal(await page.locator('#user-messages tbody tr:nth-child(2) td:nth-child(4)').textContent(), '40037');
  // WeChat's word: the delivery of a message, and the grants WeChat confirmed.
  assert.equal(await page.locator('#user-messages tbody tr:first-child .delivery').textContent(), 'refused');
  assert.equal(await page.locator('#user-messages tbody tr:nth-child(2) .delivery').textContent(), '–');
  await expectText('#quota-subs tr[data-template=TPL_SHIPPED] .sends-left', '2');
  await expectText('#quota-subs tr[data-template=TPL_SHIPPED] .confirmed', '1');
  assert.equal(await page.evaluate(() => document.querySelectorAll('b').length), 0);
  await page.screenshot({ path: path.join(SCREENSHOTS, 'admin-full.png'), fullPage: true });

  // A narrow window: one column, nothing wider than the screen.
  await page.setViewportSize({ width: 390, height: 844 });
  await page.waitForFunction(() => document.documentElement.scrollWidth <= document.documentElement.clientWidth + 1);
  await page.screenshot({ path: path.join(SCREENSHOTS, 'admin-narrow.png'), fullPage: true });
  await page.setViewportSize({ width: 1280, height: 900 });
  await page.unrouteAll();
});

test('without the newer endpoints the panels say "not available"', async () => {
  await page.reload();
  await page.locator('#app').waitFor({ state: 'visible' });
  await lookUp(USER);
  // Against this build, the apps and messages endpoints may or may not exist yet.
  await page.waitForFunction(() => document.querySelector('#apps-list').textContent.trim() !== '');
  const apps = await page.locator('#apps-list').textContent();
  assert.ok(/not available/i.test(apps) || /wxsandbox/.test(apps), apps);
});

test('campaigns: progress and counts; pause, resume and cancel from the page', async () => {
  const holders = ['o-camp-1', 'o-camp-2', 'o-camp-3'];
  await holdFormIds([...holders, 'o-quick-1', 'o-quick-2']);
  // Done at once: two recipients holding a form_id each, no pace.
  const quick = await apiCall('POST', '/v1/campaigns',
    { template_id: 'TPL_QUICK', audience: { openids: ['o-quick-1', 'o-quick-2'] } }, SEND_KEY, 202);
  // Paced at one recipient a second: 60 recipients, three holding a form_id, the rest
  // none (they end no_quota), so it runs for about a minute unless paused or cancelled.
  const audience = [...holders, ...Array.from({ length: 57 }, (_, i) => `o-camp-none-${i}`)];
  const slow = await apiCall('POST', '/v1/campaigns',
    { template_id: 'TPL_SLOW', rate_per_s: 1, audience: { openids: audience } }, SEND_KEY, 202);
  // An admin key may act on campaigns but not create them.
  await apiCall('POST', '/v1/campaigns', { template_id: 'TPL_X', audience: { openids: ['o-x'] } }, ADMIN_KEY, 403);

  const posts = [];
  page.on('request', (req) => {
    if (req.method() === 'POST' && new URL(req.url()).pathname.startsWith('/v1/campaigns/')) {
      posts.push(new URL(req.url()).pathname);
    }
  });
  const row = (c) => `#campaigns-list tr[data-campaign="${c.id}"]`;
  const buttonsEnabled = (c) => page.$$eval(`${row(c)} button[data-action]`, (bs) =>
    Object.fromEntries(bs.map((b) => [b.dataset.action, !b.disabled])));
  const apiStatus = async (c) => (await apiCall('GET', `/v1/campaigns/${c.id}`, undefined, ADMIN_KEY, 200)).status;

  await page.click('#campaigns-refresh');
  // The finished campaign: done, a full bar of sent, no action left.
  await expectText(`${row(quick)} .campaign-status`, 'done', 15000);
  await expectText(`${row(quick)} .progress-final`, '2 / 2');
  await expectText(`${row(quick)} [data-part=sent] .part-n`, '2');
  await expectText(`${row(quick)} .rate`, 'unlimited');
  await expectText(`${row(quick)} .template`, 'TPL_QUICK');
  const quickBar = await page.$eval(`${row(quick)} .progress`, (el) => ({
    now: el.getAttribute('aria-valuenow'),
    max: el.getAttribute('aria-valuemax'),
    parts: [...el.querySelectorAll('rect.seg')].map((r) => r.getAttribute('class')),
    width: [...el.querySelectorAll('rect.seg')].reduce((a, r) => a + Number(r.getAttribute('width')), 0),
  }));
  assert.deepEqual(quickBar, { now: '2', max: '2', parts: ['seg sent'], width: 100 });
  assert.deepEqual(await buttonsEnabled(quick), { pause: false, resume: false, cancel: false });

  // The paced one runs, with its pace and its 60 recipients.
  await expectText(`${row(slow)} .campaign-status`, 'running', 15000);
  await expectText(`${row(slow)} .rate`, '1 /s');
  assert.equal(await page.getAttribute(`${row(slow)} .progress`, 'aria-valuemax'), '60');
  assert.deepEqual(await buttonsEnabled(slow), { pause: true, resume: false, cancel: true });

  // The status filter asks the API for one status.
  await page.selectOption('#campaigns-filter', 'done');
  await page.waitForFunction((id) => {
    const rows = [...document.querySelectorAll('#campaigns-list tbody tr')];
    return rows.length === 1 && rows[0].dataset.campaign === id;
  }, quick.id);
  await page.selectOption('#campaigns-filter', '');
  await page.locator(row(slow)).waitFor();

  // A refused action is shown in the card (the answer is mocked: the real campaign can pause).
  const pauseUrl = (u) => u.pathname === `/v1/campaigns/${slow.id}/pause`;
  await page.route(pauseUrl, (route) => route.fulfill({
    status: 409, contentType: 'application/json',
    body: JSON.stringify({ error: { code: 'conflict', message: 'the campaign is done: it cannot change' } }),
  }));
  await page.click(`${row(slow)} button[data-action=pause]`);
  assert.match(await visibleText('#campaigns-action-status.error'), /cannot change \(409 conflict\)/);
  await page.unroute(pauseUrl);

  // Pause: the page and the API say paused; only Resume and Cancel are left.
  await page.click(`${row(slow)} button[data-action=pause]`);
  await expectText(`${row(slow)} .campaign-status`, 'paused');
  assert.equal(await page.locator('#campaigns-action-status').isVisible(), false, 'a success clears the error');
  assert.equal(await apiStatus(slow), 'paused');
  assert.deepEqual(await buttonsEnabled(slow), { pause: false, resume: true, cancel: true });

  // Resume: running again.
  await page.click(`${row(slow)} button[data-action=resume]`);
  await expectText(`${row(slow)} .campaign-status`, 'running');
  assert.equal(await apiStatus(slow), 'running');
  await page.locator('#campaigns').screenshot({ path: path.join(SCREENSHOTS, 'admin-campaigns.png') });

  // Cancel asks first: declined, nothing is sent to the API.
  const declined = new Promise((resolve) => page.once('dialog', (d) => resolve(d.dismiss())));
  await page.click(`${row(slow)} button[data-action=cancel]`);
  await declined;
  assert.equal(await apiStatus(slow), 'running');
  const accepted = new Promise((resolve) => page.once('dialog', (d) => {
    const message = d.message();
    d.accept().then(() => resolve(message));
  }));
  await page.click(`${row(slow)} button[data-action=cancel]`);
  assert.match(await accepted, new RegExp(`Cancel campaign ${slow.id}`));
  await expectText(`${row(slow)} .campaign-status`, 'cancelled');
  assert.equal(await apiStatus(slow), 'cancelled');
  assert.deepEqual(await buttonsEnabled(slow), { pause: false, resume: false, cancel: false });
  assert.deepEqual(posts.filter((p) => p.endsWith('/cancel')), [`/v1/campaigns/${slow.id}/cancel`]);

  // Once every recipient is final the bar is full, and the page's counts are the API's.
  await page.waitForFunction((sel) => {
    const el = document.querySelector(sel);
    return el && el.getAttribute('aria-valuenow') === '60';
  }, `${row(slow)} .progress`, { timeout: 15000 });
  const final = await apiCall('GET', `/v1/campaigns/${slow.id}`, undefined, ADMIN_KEY, 200);
  assert.equal(final.counts.queued, 0);
  assert.ok(final.counts.cancelled > 0, JSON.stringify(final.counts));
  const shown = await page.$$eval(`${row(slow)} .parts [data-part]`, (spans) =>
    Object.fromEntries(spans.map((sp) => [sp.dataset.part, Number(sp.querySelector('.part-n').textContent)])));
  const { targeted, ...parts } = final.counts;
  assert.equal(targeted, 60);
  assert.deepEqual(shown, parts);
  await page.screenshot({ path: path.join(SCREENSHOTS, 'admin-campaigns-full.png'), fullPage: true });
});

test('sign out forgets the key', async () => {
  await page.click('#signout');
  await page.locator('#signin-form').waitFor({ state: 'visible' });
  assert.equal(await page.locator('#app').isVisible(), false);
  assert.equal(await page.evaluate(() => sessionStorage.length), 0);
  assert.equal(await page.locator('#users-list').textContent(), '', 'no data left in the page');
  assert.equal(await page.locator('#campaigns-list').textContent(), '', 'no campaigns left in the page');
  await page.reload();
  await page.locator('#signin-form').waitFor({ state: 'visible' });
  assert.equal(await page.locator('#app').isVisible(), false);
  assert.deepEqual(pageProblems, [], 'no script errors or CSP violations in the page');
});
