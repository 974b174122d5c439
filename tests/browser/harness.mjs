// What the browser tests share: the real service binary started in sandbox mode (no
// LEDGER_APPS: built-in simulator, app `wxsandbox`) on a free port with a fresh SQLite
// file in a temp dir, Debian's chromium driven through playwright-core, and the
// teardown of both. Each test file keeps its own page listeners and assertions.
//
//   LEDGER_BIN     service binary (default: <repo>/target/debug/formid-ledger)
//   CHROMIUM_BIN   browser (default: /usr/bin/chromium)
//
// State is per process: `node --test` runs each test file in a process of its own, and
// a file starts at most one service and one browser.

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtemp, mkdir, rm } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '..', '..');
const LEDGER_BIN = process.env.LEDGER_BIN || path.join(REPO, 'target', 'debug', 'formid-ledger');
const CHROMIUM_BIN = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
export const SCREENSHOTS = path.join(HERE, 'screenshots');

let tmp;
let service;
let serviceLog = '';
let browser;

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

async function waitForHealth(base, deadlineMs) {
  const until = Date.now() + deadlineMs;
  for (;;) {
    if (service.exitCode !== null) {
      throw new Error(`the service exited with ${service.exitCode}:\n${serviceLog}`);
    }
    try {
      const res = await fetch(base + '/healthz');
      if (res.ok) return;
    } catch (_) { /* not listening yet */ }
    if (Date.now() > until) throw new Error(`no /healthz within ${deadlineMs} ms:\n${serviceLog}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/**
 * Starts the service in sandbox mode on a free port with a fresh SQLite file in a new
 * temp dir named `tmpPrefix…`, `env` added to its environment, and waits until it
 * answers /healthz. Returns its base URL (`http://127.0.0.1:<port>`).
 */
export async function startService({ tmpPrefix = 'ledger-browser-', env: extra = {} } = {}) {
  assert.ok(existsSync(LEDGER_BIN), `no service binary at ${LEDGER_BIN}: run cargo build or set LEDGER_BIN`);
  tmp = await mkdtemp(path.join(os.tmpdir(), tmpPrefix));
  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  const env = { ...process.env };
  delete env.LEDGER_APPS; // sandbox mode
  delete env.LEDGER_CONFIG;
  Object.assign(env, {
    LEDGER_BIND: `127.0.0.1:${port}`,
    LEDGER_DATABASE_URL: `sqlite://${path.join(tmp, 'ledger.db')}`,
    RUST_LOG: process.env.RUST_LOG || 'info',
  }, extra);
  service = spawn(LEDGER_BIN, [], { env, cwd: tmp, stdio: ['ignore', 'pipe', 'pipe'] });
  service.stdout.on('data', (d) => { serviceLog += d; });
  service.stderr.on('data', (d) => { serviceLog += d; });
  await waitForHealth(base, 30000);
  return base;
}

/**
 * Launches headless chromium and returns a new page in a 1280×900 context; makes sure
 * the screenshots folder exists. Listeners on the page are the caller's to add.
 */
export async function launchBrowser() {
  assert.ok(existsSync(CHROMIUM_BIN), `no browser at ${CHROMIUM_BIN}: apt-get install -y chromium`);
  browser = await chromium.launch({
    executablePath: CHROMIUM_BIN,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  await mkdir(SCREENSHOTS, { recursive: true });
  return page;
}

/** Closes the browser, stops the service (SIGTERM, SIGKILL after 5 s), removes the temp dir. */
export async function stopAll() {
  if (browser) await browser.close();
  if (service && service.exitCode === null) {
    const exited = new Promise((r) => service.once('exit', r));
    service.kill('SIGTERM');
    const timer = setTimeout(() => service.kill('SIGKILL'), 5000);
    await exited;
    clearTimeout(timer);
  }
  if (tmp) await rm(tmp, { recursive: true, force: true });
}
