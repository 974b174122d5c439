// Headless-browser test of the API reference (GET /docs) against the real service.
//
// Starts the service binary in sandbox mode on a free port with a fresh SQLite file,
// opens /docs in Debian's chromium through playwright-core (see harness.mjs), and checks
// that the embedded viewer renders every operation of /openapi.json under the page's
// CSP, with no console error and no request leaving the service's origin.
//
//   LEDGER_BIN     service binary (default: <repo>/target/debug/formid-ledger)
//   CHROMIUM_BIN   browser (default: /usr/bin/chromium)
//
// Run with tests/browser/run.sh, or `node --test docs.test.mjs` in this folder.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import path from 'node:path';
import { SCREENSHOTS, startService, launchBrowser, stopAll } from './harness.mjs';

const ASSETS = ['docs.js', 'swagger-ui-bundle.js', 'swagger-ui.css'];

let base;
let page;
const problems = []; // console errors and warnings, uncaught exceptions, failed loads
const requested = []; // every URL the page asked for

/** `METHOD /path` of every operation of the service's /openapi.json. */
async function documentedOperations() {
  const doc = await (await fetch(base + '/openapi.json')).json();
  const methods = ['get', 'put', 'post', 'delete', 'options', 'head', 'patch', 'trace'];
  return Object.entries(doc.paths)
    .flatMap(([p, item]) => Object.keys(item).filter((m) => methods.includes(m)).map((m) => `${m.toUpperCase()} ${p}`))
    .sort();
}

before(async () => {
  base = await startService({ tmpPrefix: 'ledger-docs-' });
  page = await launchBrowser();
  page.on('pageerror', (err) => problems.push('uncaught: ' + err.message));
  // A CSP violation is reported here too ("Refused to …").
  page.on('console', (msg) => {
    if (msg.type() === 'error' || msg.type() === 'warning') problems.push(`console ${msg.type()}: ${msg.text()}`);
  });
  page.on('request', (req) => requested.push(req.url()));
  page.on('requestfailed', (req) => problems.push(`failed: ${req.url()} ${req.failure()?.errorText}`));
});

after(stopAll);

test('the page and its assets are served with strict headers', async () => {
  const res = await fetch(base + '/docs');
  assert.equal(res.status, 200);
  assert.match(res.headers.get('content-type'), /^text\/html/);
  assert.equal(res.headers.get('cache-control'), 'no-store');
  const csp = res.headers.get('content-security-policy') || '';
  assert.match(csp, /default-src 'none'/);
  assert.match(csp, /script-src 'self'(;|$)/);
  assert.match(csp, /style-src 'self'(;|$)/);
  assert.doesNotMatch(csp, /unsafe-inline|unsafe-eval|https?:|\*/);
  assert.equal(res.headers.get('x-content-type-options'), 'nosniff');
  const html = await res.text();
  assert.doesNotMatch(html, /<script(?![^>]*\bsrc=)[^>]*>/, 'no inline script');
  assert.doesNotMatch(html, /https?:\/\//, 'nothing fetched from elsewhere');

  for (const file of ASSETS) {
    const r = await fetch(`${base}/docs/assets/${file}`, { headers: { 'Accept-Encoding': 'gzip' } });
    assert.equal(r.status, 200, file);
    assert.match(r.headers.get('content-type'), file.endsWith('.css') ? /^text\/css/ : /^text\/javascript/, file);
    assert.equal(r.headers.get('cache-control'), 'no-cache', file);
    assert.equal(r.headers.get('content-encoding'), 'gzip', file);
    const etag = r.headers.get('etag');
    assert.match(etag || '', /^W\/"[0-9a-f]+"$/, file);
    await r.arrayBuffer();
    const again = await fetch(`${base}/docs/assets/${file}`, { headers: { 'If-None-Match': etag } });
    assert.equal(again.status, 304, `${file} with its ETag`);
  }
  const missing = await fetch(`${base}/docs/assets/nope.js`);
  assert.equal(missing.status, 404);
  assert.equal((await missing.json()).error.code, 'not_found');
});

test('the viewer renders every operation of /openapi.json', async () => {
  const documented = await documentedOperations();
  assert.ok(documented.includes('POST /v1/messages'), documented.join(', '));
  await page.goto(base + '/docs');
  const messages = page.locator('.opblock-post .opblock-summary-path[data-path="/v1/messages"]');
  await messages.waitFor({ state: 'visible', timeout: 20000 });
  const rendered = await page.$$eval('.opblock', (blocks) => blocks
    .map((b) => `${b.querySelector('.opblock-summary-method')?.textContent.trim()} ${b.querySelector('.opblock-summary-path')?.dataset.path}`)
    .sort());
  assert.deepEqual(rendered, documented);
  await page.screenshot({ path: path.join(SCREENSHOTS, 'docs.png') });
});

test('an operation opens with its schema, and "Try it out" calls the service', async () => {
  await page.locator('.opblock-post .opblock-summary-path[data-path="/v1/messages"]').click();
  const create = page.locator('.opblock.is-open', { has: page.locator('[data-path="/v1/messages"]') });
  await create.getByText('Idempotency-Key', { exact: true }).waitFor({ state: 'visible' });
  await create.getByText('idempotency_mismatch').first().waitFor({ state: 'visible' });

  await page.locator('.opblock-get .opblock-summary-path[data-path="/healthz"]').click();
  const health = page.locator('.opblock.is-open', { has: page.locator('[data-path="/healthz"]') });
  await health.getByRole('button', { name: 'Try it out' }).click();
  await health.getByRole('button', { name: 'Execute' }).click();
  const status = health.locator('.live-responses-table tr.response .response-col_status').first();
  await status.waitFor({ state: 'visible', timeout: 10000 });
  assert.equal((await status.textContent()).trim(), '200');
  assert.match(await health.locator('.live-responses-table .microlight').first().textContent(), /"status": "ok"/);
  await page.screenshot({ path: path.join(SCREENSHOTS, 'docs-try-it-out.png'), fullPage: true });
});

test('no console error, and no request leaves the origin', () => {
  assert.deepEqual(problems, []);
  const elsewhere = requested.filter((u) => !u.startsWith(base + '/') && !u.startsWith('data:'));
  assert.deepEqual(elsewhere, []);
  for (const file of ASSETS) {
    assert.ok(requested.includes(`${base}/docs/assets/${file}`), `${file} was loaded`);
  }
  assert.ok(requested.includes(`${base}/openapi.json`), '/openapi.json was loaded');
});
