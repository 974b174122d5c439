// formid-ledger admin page.
//
// Every value shown comes from outside (openids, template ids, error messages), so the
// DOM is built with createElement/textContent only; nothing is ever parsed as HTML.
// The admin key lives in sessionStorage (this tab only) and is sent
// as `Authorization: Bearer <key>`.
'use strict';

(function () {
  const KEY_STORE = 'formid-ledger.admin-key';
  const APP_STORE = 'formid-ledger.app-id';
  const KINDS = ['form_id', 'prepay_id', 'subscription'];
  const KIND_LABEL = { form_id: 'form_id', prepay_id: 'prepay_id', subscription: 'subscription' };
  const STATUSES = ['queued', 'sending', 'sent', 'no_quota', 'failed'];
  const USERS_PAGE = 50;
  const CAMPAIGNS_PAGE = 50;
  const CAMPAIGNS_MAX_PAGE = 500; // the API's largest limit
  const CAMPAIGN_REFRESH_MS = 3000;
  // The parts of a campaign's recipients that are final, in the bar's order.
  const CAMPAIGN_PARTS = ['sent', 'no_quota', 'failed', 'skipped', 'cancelled'];
  const CAMPAIGN_STATUSES = ['scheduled', 'running', 'paused', 'done', 'cancelled'];
  const CAMPAIGN_ACTIVE = ['scheduled', 'running', 'paused'];
  // Which action makes sense in which status (the API answers 409 for the others).
  const CAMPAIGN_ACTIONS = {
    pause: ['scheduled', 'running'],
    resume: ['paused'],
    cancel: ['scheduled', 'running', 'paused'],
  };

  const state = {
    key: null,
    // The app every call is about; null means "the only one" (app_id left out).
    appId: null,
    apps: null, // [{app_id, token_expires_at, token_last_error}] or null if unknown
    usersCursors: [null], // cursor of each page seen, for Previous
    lookupSeq: 0,
    currentOpenid: null,
    campaigns: [], // every campaign loaded (all apps the key sees), newest first
    campaignsCursor: null, // next_cursor of the last page loaded
    campaignsSeq: 0,
    campaignsTimer: null,
    campaignBusy: new Set(), // ids with an action in flight
  };

  // ---------- small DOM helpers ----------

  const $ = (id) => document.getElementById(id);

  /** An element; `attrs` may hold className, dataset-free attributes, and text. */
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }

  const SVG_NS = 'http://www.w3.org/2000/svg';
  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    setAttrs(el, attrs);
    append(el, children);
    return el;
  }

  function setAttrs(el, attrs) {
    if (!attrs) return;
    for (const [name, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (name === 'text') el.textContent = String(value);
      else if (name === 'class') el.setAttribute('class', value);
      else if (name.startsWith('on')) throw new Error('no event attributes: use addEventListener');
      else el.setAttribute(name, String(value));
    }
  }

  function append(el, children) {
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
    }
  }

  function replace(el, ...children) {
    el.replaceChildren();
    append(el, children);
  }

  function show(el, visible) {
    el.hidden = !visible;
  }

  /** A status line: `kind` is 'error', 'info' or null (hide). */
  function notice(el, kind, text) {
    if (!kind) {
      el.hidden = true;
      el.textContent = '';
      return;
    }
    el.className = 'notice ' + kind;
    el.textContent = text;
    el.hidden = false;
  }

  // ---------- formatting ----------

  const nf = new Intl.NumberFormat('en-US');
  function num(n) {
    return typeof n === 'number' && Number.isFinite(n) ? nf.format(n) : '–';
  }

  function pad(n) {
    return String(n).padStart(2, '0');
  }

  function plural(n, word) {
    return `${num(n)} ${word}${n === 1 ? '' : 's'}`;
  }

  /** "2026-11-27 08:00 UTC", or '–' for none. */
  function utc(iso) {
    if (!iso) return '–';
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    return `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} ` +
      `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())} UTC`;
  }

  /** "in 6 d 23 h" / "3 h ago". */
  function relative(iso) {
    if (!iso) return '';
    const t = new Date(iso).getTime();
    if (Number.isNaN(t)) return '';
    let diff = Math.round((t - Date.now()) / 60000); // minutes
    const future = diff >= 0;
    diff = Math.abs(diff);
    let text;
    if (diff < 1) text = 'less than a minute';
    else if (diff < 60) text = `${diff} min`;
    else if (diff < 48 * 60) text = `${Math.floor(diff / 60)} h ${diff % 60} min`;
    else text = `${Math.floor(diff / 1440)} d ${Math.floor((diff % 1440) / 60)} h`;
    return future ? `in ${text}` : `${text} ago`;
  }

  /** A time cell: UTC time, relative time beneath, the raw value as a tooltip. */
  function timeCell(iso, { warnWithinHours } = {}) {
    if (!iso) return h('span', { class: 'muted', text: '–' });
    const soon = warnWithinHours !== undefined &&
      new Date(iso).getTime() - Date.now() < warnWithinHours * 3600 * 1000;
    return h('span', { class: 'time' + (soon ? ' warn' : ''), title: iso },
      h('span', { text: utc(iso) }),
      h('span', { class: 'muted small', text: relative(iso) }));
  }

  function table(headers, rows, { className, numeric = [] } = {}) {
    const thead = h('thead', null, h('tr', null, headers.map((label, i) =>
      h('th', { class: numeric.includes(i) ? 'num' : null, scope: 'col', text: label }))));
    const tbody = h('tbody', null, rows.map((cells) => h('tr', null, cells.map((cell, i) =>
      h('td', { class: numeric.includes(i) ? 'num' : null }, cell)))));
    return h('div', { class: 'table-wrap' }, h('table', { class: className || null }, thead, tbody));
  }

  function tile(label, value, sub, extra) {
    return h('div', { class: 'tile' + (extra ? ' ' + extra : '') },
      h('div', { class: 'tile-label', text: label }),
      h('div', { class: 'tile-value', text: value }),
      sub ? h('div', { class: 'tile-sub', text: sub }) : null);
  }

  function empty(text) {
    return h('p', { class: 'empty', text });
  }

  // ---------- the API ----------

  class ApiFailure extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
    /** The endpoint is not served by this version of the service. */
    get missingEndpoint() {
      return this.status === 404 && this.code === 'not_found';
    }
    describe() {
      if (this.status === 0) return this.message;
      if (this.status === 401) return 'The admin key was not accepted (401 unauthorized). Check the key and sign in again.';
      if (this.status === 403) return 'This key lacks the admin role (403 forbidden). Use a key with the admin role.';
      return `${this.message} (${this.status} ${this.code})`;
    }
  }

  /** Encodes one path segment. */
  function seg(value) {
    return encodeURIComponent(value);
  }

  async function api(path, params = {}, key = state.key, method = 'GET') {
    const url = new URL(path, window.location.origin);
    for (const [name, value] of Object.entries(params)) {
      if (value !== null && value !== undefined && value !== '') url.searchParams.set(name, value);
    }
    let res;
    try {
      res = await fetch(url, {
        method,
        headers: { Authorization: 'Bearer ' + key, Accept: 'application/json' },
        cache: 'no-store',
        credentials: 'omit',
        redirect: 'error',
      });
    } catch (err) {
      throw new ApiFailure(0, 'network', 'The service could not be reached. Is it running? (' + err.message + ')');
    }
    let body = null;
    try {
      body = await res.json();
    } catch (_) {
      body = null;
    }
    if (!res.ok) {
      const err = body && typeof body.error === 'object' && body.error ? body.error : {};
      throw new ApiFailure(res.status, String(err.code || 'http_' + res.status),
        String(err.message || res.statusText || 'request failed'));
    }
    if (body === null || typeof body !== 'object') {
      throw new ApiFailure(res.status, 'bad_response', 'The service answered something that is not JSON');
    }
    return body;
  }

  /** Calls the API about the current app; a 401 on any call signs out. */
  async function call(path, params = {}) {
    try {
      return await api(path, Object.assign({ app_id: state.appId }, params));
    } catch (err) {
      if (err instanceof ApiFailure && err.status === 401) {
        signOut('Your admin key is no longer accepted (401). Sign in again.');
      }
      throw err;
    }
  }

  /** POSTs to `path` (no body, no app_id: the path names the resource); a 401 signs out. */
  async function post(path) {
    try {
      return await api(path, {}, state.key, 'POST');
    } catch (err) {
      if (err instanceof ApiFailure && err.status === 401) {
        signOut('Your admin key is no longer accepted (401). Sign in again.');
      }
      throw err;
    }
  }

  function describe(err) {
    return err instanceof ApiFailure ? err.describe() : 'Unexpected error: ' + (err && err.message);
  }

  // ---------- sign in / out ----------

  /**
   * Checks `key` and learns the apps. `/v1/admin/apps` lists them; a service that does
   * not serve it yet is asked for its stats instead, which also judges the key.
   */
  async function verifyKey(key) {
    try {
      const body = await api('/v1/admin/apps', {}, key);
      return { apps: Array.isArray(body.apps) ? body.apps : [] };
    } catch (err) {
      if (!(err instanceof ApiFailure) || !err.missingEndpoint) throw err;
    }
    try {
      const body = await api('/v1/admin/stats', {}, key);
      return { apps: null, implicitApp: body.app_id || null };
    } catch (err) {
      if (err instanceof ApiFailure && err.code === 'app_id_required') return { apps: null, needApp: true };
      throw err;
    }
  }

  async function signIn(key, { remembered = false } = {}) {
    const submit = $('signin-submit');
    submit.disabled = true;
    notice($('signin-error'), remembered ? 'info' : null, 'Checking the saved key…');
    try {
      const found = await verifyKey(key);
      state.key = key;
      sessionStorage.setItem(KEY_STORE, key);
      setupApps(found);
      show($('signin'), false);
      show($('app'), true);
      show($('session-tools'), true);
      $('signin-key').value = '';
      if (state.appId !== null || !found.needApp) loadAll();
    } catch (err) {
      if (remembered) sessionStorage.removeItem(KEY_STORE);
      showSignIn(describe(err));
    } finally {
      submit.disabled = false;
    }
  }

  function showSignIn(message) {
    show($('app'), false);
    show($('session-tools'), false);
    show($('signin'), true);
    notice($('signin-error'), message ? 'error' : null, message || '');
    $('signin-key').focus();
  }

  function signOut(message) {
    state.key = null;
    state.appId = null;
    state.apps = null;
    state.currentOpenid = null;
    stopCampaignRefresh();
    state.campaignsSeq++;
    state.campaigns = [];
    state.campaignsCursor = null;
    state.campaignBusy.clear();
    sessionStorage.removeItem(KEY_STORE);
    sessionStorage.removeItem(APP_STORE);
    for (const id of ['overview-live', 'messages-24h', 'messages-chart', 'top-errcodes', 'apps-list',
      'quota-tiles', 'quota-kinds', 'quota-subs', 'user-messages', 'users-list', 'campaigns-list']) {
      $(id).replaceChildren();
    }
    show($('lookup-result'), false);
    $('lookup-openid').value = '';
    $('campaigns-count').textContent = '';
    $('campaigns-updated').textContent = '';
    show($('campaigns-more'), false);
    notice($('campaigns-status'), null);
    notice($('campaigns-action-status'), null);
    showSignIn(message);
  }

  // ---------- apps ----------

  function setupApps({ apps, implicitApp, needApp }) {
    state.apps = apps;
    const picker = $('app-picker');
    const select = $('app-select');
    const fixed = $('app-fixed');
    const form = $('app-form');
    show(picker, false);
    show(fixed, false);
    show(form, false);
    const saved = sessionStorage.getItem(APP_STORE);
    if (apps && apps.length > 1) {
      select.replaceChildren(...apps.map((a) => h('option', { value: a.app_id, text: a.app_id })));
      const ids = apps.map((a) => a.app_id);
      state.appId = ids.includes(saved) ? saved : ids[0];
      select.value = state.appId;
      show(picker, true);
    } else if (needApp) {
      // Several apps, but this service cannot list them: ask for the id.
      state.appId = saved || null;
      $('app-input').value = saved || '';
      show(form, true);
      if (!state.appId) {
        notice($('overview-status'), 'info', 'Several apps are configured: enter an app id above to begin.');
      }
    } else {
      state.appId = null; // the only app: leave app_id out
      const only = apps && apps[0] ? apps[0].app_id : implicitApp;
      if (only) {
        fixed.textContent = only;
        fixed.title = 'the only app configured';
        show(fixed, true);
      }
    }
  }

  function chooseApp(appId) {
    state.appId = appId || null;
    if (state.appId) sessionStorage.setItem(APP_STORE, state.appId);
    else sessionStorage.removeItem(APP_STORE);
    loadAll();
  }

  // ---------- overview ----------

  async function loadOverview() {
    const status = $('overview-status');
    notice(status, 'info', 'Loading…');
    const [stats, apps] = await Promise.allSettled([
      call('/v1/admin/stats'),
      call('/v1/admin/apps', { app_id: null }),
    ]);
    if (!state.key) return;
    if (stats.status === 'fulfilled') {
      notice(status, null);
      renderStats(stats.value);
    } else {
      notice(status, 'error', 'Could not load the totals: ' + describe(stats.reason));
      for (const id of ['overview-live', 'messages-24h', 'messages-chart', 'top-errcodes']) $(id).replaceChildren();
    }
    if (apps.status === 'fulfilled' && Array.isArray(apps.value.apps)) {
      state.apps = apps.value.apps;
      renderApps(apps.value.apps);
    } else {
      const err = apps.reason;
      replace($('apps-list'), err instanceof ApiFailure && err.missingEndpoint
        ? empty('Not available: this version of the service does not list apps.')
        : h('p', { class: 'notice error', text: 'Could not load the apps: ' + describe(err) }));
    }
    const now = new Date();
    $('overview-updated').textContent =
      `updated ${pad(now.getUTCHours())}:${pad(now.getUTCMinutes())}:${pad(now.getUTCSeconds())} UTC`;
  }

  function renderStats(stats) {
    const live = stats.live && typeof stats.live === 'object' ? stats.live : {};
    const tiles = KINDS.map((kind) => {
      const k = live[kind] || {};
      return h('div', { class: 'tile', 'data-kind': kind },
        h('div', { class: 'tile-label', text: `Live ${KIND_LABEL[kind]}` }),
        h('div', { class: 'tile-value' }, h('span', { class: 'credentials', text: num(k.credentials) })),
        h('div', { class: 'tile-sub' }, h('span', { class: 'uses-left', text: num(k.uses_left) }),
          k.uses_left === 1 ? ' use left' : ' uses left'));
    });
    tiles.push(tile('Expiring within 24 h', num(stats.expiring_within_24h), 'live credentials',
      stats.expiring_within_24h > 0 ? 'tile-warn' : null));
    replace($('overview-live'), tiles);

    const m = stats.messages_24h;
    if (m && typeof m === 'object') {
      replace($('messages-24h'), h('div', { class: 'status-row' }, STATUSES.map((st) =>
        h('div', { class: 'status-count', 'data-status': st },
          h('span', { class: 'dot ' + st }),
          h('span', { class: 'status-name', text: st }),
          h('span', { class: 'status-n', text: num(m[st] || 0) })))));
    } else {
      replace($('messages-24h'), empty('Not available: this version of the service does not count messages yet.'));
    }

    const perHour = Array.isArray(stats.messages_per_hour) ? stats.messages_per_hour : null;
    replace($('messages-chart'), perHour && perHour.length ? chart(perHour) : null);

    const top = Array.isArray(stats.top_errcodes) ? stats.top_errcodes : null;
    if (!top) {
      replace($('top-errcodes'), empty('Not available: this version of the service does not report error codes yet.'));
    } else if (!top.length) {
      replace($('top-errcodes'), empty('No WeChat errors in the last 24 h.'));
    } else {
      replace($('top-errcodes'), table(['errcode', 'meaning', 'count'], top.map((e) => [
        h('span', { class: 'mono', text: String(e.errcode) }),
        h('span', { class: 'muted', text: ERRCODES[e.errcode] || '' }),
        num(e.count),
      ]), { numeric: [2] }));
    }
  }

  // What WeChat's most common send errors mean, for the operator.
  const ERRCODES = {
    '-1': 'WeChat busy',
    40001: 'access token invalid',
    40003: 'openid invalid',
    40037: 'template id invalid',
    41028: 'form_id invalid or expired',
    41029: 'form_id already used',
    41030: 'page invalid',
    42001: 'access token expired',
    43101: 'user refused / not subscribed',
    45009: 'daily API limit reached',
    47003: 'template data invalid',
  };

  function renderApps(apps) {
    if (!apps.length) {
      replace($('apps-list'), empty('No apps configured.'));
      return;
    }
    replace($('apps-list'), table(['app', 'access token expires', 'last token error'], apps.map((a) => [
      h('span', { class: 'mono', text: a.app_id }),
      timeCell(a.token_expires_at, { warnWithinHours: 0.25 }),
      a.token_last_error ? h('span', { class: 'error-text', text: a.token_last_error }) : h('span', { class: 'muted', text: 'none' }),
    ])));
  }

  /** Stacked bars of sent / no_quota / failed per hour, drawn as inline SVG. */
  function chart(rows) {
    const series = ['sent', 'no_quota', 'failed'];
    const W = 640;
    const H = 170;
    const left = 34;
    const bottom = 20;
    const top = 8;
    const plotW = W - left - 4;
    const plotH = H - top - bottom;
    const totals = rows.map((r) => series.reduce((acc, k) => acc + (Number(r[k]) || 0), 0));
    const max = Math.max(1, ...totals);
    const step = plotW / rows.length;
    const barW = Math.max(1, step * 0.72);
    const svg = s('svg', {
      viewBox: `0 0 ${W} ${H}`, class: 'chart', role: 'img',
      'aria-label': 'Messages per hour: sent, no_quota and failed',
    });
    // Grid lines and y labels at 0, max/2, max.
    for (const frac of [0, 0.5, 1]) {
      const y = top + plotH - frac * plotH;
      svg.appendChild(s('line', { x1: left, x2: W - 4, y1: y, y2: y, class: 'grid' }));
      svg.appendChild(s('text', { x: left - 5, y: y + 3, class: 'axis', 'text-anchor': 'end',
        text: frac === 0.5 && max < 2 ? '' : num(Math.round(max * frac)) }));
    }
    rows.forEach((r, i) => {
      const x = left + i * step + (step - barW) / 2;
      let y = top + plotH;
      const group = s('g', { class: 'bar' });
      const hour = new Date(r.hour);
      const label = Number.isNaN(hour.getTime()) ? String(r.hour) : utc(r.hour);
      group.appendChild(s('title', {
        text: `${label}: ${series.map((k) => `${k} ${num(Number(r[k]) || 0)}`).join(', ')}`,
      }));
      for (const k of series) {
        const v = Number(r[k]) || 0;
        if (!v) continue;
        const bh = (v / max) * plotH;
        y -= bh;
        group.appendChild(s('rect', { x, y, width: barW, height: bh, class: 'seg ' + k }));
      }
      // An invisible full-height rect so the tooltip works on empty hours too.
      group.appendChild(s('rect', { x: left + i * step, y: top, width: step, height: plotH, class: 'hit' }));
      svg.appendChild(group);
      const every = Math.max(1, Math.ceil(rows.length / 8));
      if (i % every === 0 && !Number.isNaN(hour.getTime())) {
        svg.appendChild(s('text', { x: x + barW / 2, y: H - 5, class: 'axis', 'text-anchor': 'middle',
          text: `${pad(hour.getUTCHours())}:00` }));
      }
    });
    const legend = h('div', { class: 'legend' }, series.map((k) =>
      h('span', null, h('span', { class: 'dot ' + k }), k)), h('span', { class: 'muted', text: 'per hour, UTC' }));
    return h('figure', { class: 'chart-wrap' }, svg, legend);
  }

  // ---------- user lookup ----------

  async function lookup(openid) {
    openid = openid.trim();
    const status = $('lookup-status');
    if (!openid) return;
    $('lookup-openid').value = openid;
    if (openid === '.' || openid === '..') {
      notice(status, 'error', 'An openid of "." or ".." cannot be looked up through a URL path.');
      return;
    }
    const seq = ++state.lookupSeq;
    state.currentOpenid = openid;
    notice(status, 'info', 'Looking up…');
    const path = '/v1/admin/users/' + seg(openid);
    const [quota, messages] = await Promise.allSettled([
      call(path + '/quota'),
      call(path + '/messages', { limit: 20 }),
    ]);
    if (seq !== state.lookupSeq || !state.key) return; // a newer lookup, or signed out
    if (quota.status === 'rejected') {
      show($('lookup-result'), false);
      notice(status, 'error', 'Could not look up this user: ' + describe(quota.reason));
      return;
    }
    notice(status, null);
    renderQuota(quota.value, openid);
    const mstatus = $('messages-status');
    if (messages.status === 'fulfilled' && Array.isArray(messages.value.messages)) {
      notice(mstatus, null);
      renderMessages(messages.value.messages);
    } else {
      $('user-messages').replaceChildren();
      const err = messages.reason;
      if (err instanceof ApiFailure && err.missingEndpoint) {
        notice(mstatus, 'info', 'Not available: this version of the service does not list messages yet.');
      } else {
        notice(mstatus, 'error', 'Could not load the messages: ' + (err ? describe(err) : 'unexpected answer'));
      }
    }
    show($('lookup-result'), true);
  }

  function renderQuota(q, openid) {
    $('quota-openid').textContent = q.openid || openid;
    const byKind = q.by_kind && typeof q.by_kind === 'object' ? q.by_kind : {};
    const subs = q.subscriptions && typeof q.subscriptions === 'object' ? q.subscriptions : {};
    const subUses = Object.values(subs).reduce((a, n) => a + (Number(n) || 0), 0);
    replace($('quota-tiles'),
      h('div', { class: 'tile tile-main' + (q.sendable ? '' : ' tile-zero') },
        h('div', { class: 'tile-label', text: 'Sendable' }),
        h('div', { class: 'tile-value', id: 'quota-sendable', text: num(q.sendable) }),
        h('div', { class: 'tile-sub', text: 'form_id + prepay_id uses' })),
      tile('Subscription sends', num(subUses), plural(Object.keys(subs).length, 'template')),
      tile('Expiring within 24 h', num(q.expiring_within_24h), 'credentials',
        q.expiring_within_24h > 0 ? 'tile-warn' : null));

    const kinds = Object.keys(byKind).sort((a, b) => KINDS.indexOf(a) - KINDS.indexOf(b));
    if (!kinds.length) {
      replace($('quota-kinds'), empty('No credentials.'));
    } else {
      const rows = kinds.map((kind) => {
        const k = byKind[kind] || {};
        return [
          h('span', { class: 'mono', text: kind }),
          h('span', { class: 'credentials', text: num(k.credentials) }),
          h('span', { class: 'uses-left', text: num(k.uses_left) }),
          timeCell(k.next_expiry, { warnWithinHours: 24 }),
        ];
      });
      const t = table(['kind', 'credentials', 'uses left', 'next expiry'], rows, { numeric: [1, 2] });
      t.querySelectorAll('tbody tr').forEach((tr, i) => tr.setAttribute('data-kind', kinds[i]));
      replace($('quota-kinds'), t);
    }

    // Sends left per template, and what the user answered requestSubscribeMessage
    // for it: a user who keeps rejecting is worth knowing about.
    const results = q.subscription_results && typeof q.subscription_results === 'object'
      ? q.subscription_results : {};
    const count = (t, r) => num((results[t] && results[t][r]) || 0);
    // Of the grants left, how many WeChat itself pushed (message push); the rest
    // only the mini-program reported (or "always keep this choice": no popup).
    const confirmed = q.subscriptions_confirmed && typeof q.subscriptions_confirmed === 'object'
      ? q.subscriptions_confirmed : {};
    const templates = Array.from(new Set(Object.keys(subs).concat(Object.keys(results)))).sort();
    if (!templates.length) {
      replace($('quota-subs'), empty('No subscriptions.'));
    } else {
      const t = table(['template', 'sends left', 'confirmed by WeChat', 'accept', 'reject', 'ban', 'filter'],
        templates.map((tpl) => [h('span', { class: 'mono', text: tpl }),
          h('span', { class: 'sends-left', text: num(subs[tpl] || 0) }),
          h('span', { class: 'confirmed', text: num(confirmed[tpl] || 0) }),
          count(tpl, 'accept'), count(tpl, 'reject'), count(tpl, 'ban'), count(tpl, 'filter')]),
        { numeric: [1, 2, 3, 4, 5, 6] });
      t.querySelectorAll('tbody tr').forEach((tr, i) => tr.setAttribute('data-template', templates[i]));
      replace($('quota-subs'), t);
    }
  }

  function renderMessages(messages) {
    if (!messages.length) {
      replace($('user-messages'), empty('No messages to this user.'));
      return;
    }
    replace($('user-messages'), table(['created', 'status', 'template', 'errcode', 'credential', 'delivery', 'id'],
      messages.map((m) => {
        const err = m.error && typeof m.error === 'object' ? m.error : null;
        const errcode = err && err.wechat_errcode !== undefined && err.wechat_errcode !== null
          ? err.wechat_errcode
          : lastAttemptErrcode(m.attempts);
        return [
          timeCell(m.created_at),
          h('span', { class: 'badge ' + (STATUSES.includes(m.status) ? m.status : 'unknown'), text: m.status || '?',
            title: err ? `${err.code || ''}${err.message ? ': ' + err.message : ''}` : null }),
          h('span', { class: 'mono', text: m.template_id || '' }),
          errcode !== null && errcode !== undefined
            ? h('span', { class: 'mono', title: ERRCODES[errcode] || null, text: String(errcode) })
            : h('span', { class: 'muted', text: err ? err.code || '' : '' }),
          m.credential && typeof m.credential === 'object'
            ? h('span', { class: 'mono small', text: `${m.credential.kind} #${m.credential.id}` })
            : h('span', { class: 'muted', text: '–' }),
          deliveryCell(m.delivery),
          h('span', { class: 'mono small muted', text: String(m.id) }),
        ];
      }), { className: 'messages' }));
  }

  /** What WeChat's sent event said of a subscribe message (message push). */
  function deliveryCell(d) {
    if (!d || typeof d !== 'object') return h('span', { class: 'muted delivery', text: '–' });
    const known = ['delivered', 'refused', 'failed'].includes(d.status);
    return h('span', { class: 'badge delivery ' + (d.status === 'delivered' ? 'sent' : known ? 'failed' : 'unknown'),
      text: known ? d.status : '?', title: d.error_status ? String(d.error_status) : null });
  }

  function lastAttemptErrcode(attempts) {
    if (!Array.isArray(attempts)) return null;
    for (let i = attempts.length - 1; i >= 0; i--) {
      const a = attempts[i];
      if (a && a.wechat_errcode !== undefined && a.wechat_errcode !== null && a.wechat_errcode !== 0) {
        return a.wechat_errcode;
      }
    }
    return null;
  }

  // ---------- users list ----------

  async function loadUsers() {
    const status = $('users-status');
    const cursor = state.usersCursors[state.usersCursors.length - 1];
    notice(status, 'info', 'Loading…');
    $('users-prev').disabled = true;
    $('users-next').disabled = true;
    let page;
    try {
      page = await call('/v1/admin/users', { limit: USERS_PAGE, cursor });
    } catch (err) {
      if (!state.key) return;
      notice(status, 'error', 'Could not load the users: ' + describe(err));
      $('users-prev').disabled = state.usersCursors.length < 2;
      return;
    }
    if (!state.key) return;
    notice(status, null);
    const users = Array.isArray(page.users) ? page.users : [];
    if (!users.length) {
      replace($('users-list'), empty(state.usersCursors.length > 1 ? 'No more users.' : 'No user holds a live credential.'));
    } else {
      replace($('users-list'), table(['openid', 'credentials', 'uses left', 'next expiry'], users.map((u) => {
        const link = h('button', { type: 'button', class: 'linklike mono openid', text: u.openid,
          title: 'Look up this user' });
        link.addEventListener('click', () => {
          lookup(String(u.openid));
          $('lookup').scrollIntoView({ behavior: 'smooth', block: 'start' });
        });
        return [link, num(u.credentials), num(u.uses_left), timeCell(u.next_expiry, { warnWithinHours: 24 })];
      }), { className: 'users', numeric: [1, 2] }));
    }
    const pageNo = state.usersCursors.length;
    $('users-page').textContent = `page ${pageNo}` + (users.length ? ` · ${plural(users.length, 'user')}` : '');
    $('users-prev').disabled = pageNo < 2;
    $('users-next').disabled = !page.next_cursor;
    $('users-next').dataset.cursor = page.next_cursor || '';
  }

  // ---------- campaigns ----------

  /**
   * The loaded campaigns of the app the page is about. `GET /v1/campaigns` has no app
   * filter (it lists every app the key sees), so the page filters by `app_id` here.
   */
  function appCampaigns() {
    return state.appId === null ? state.campaigns : state.campaigns.filter((c) => c.app_id === state.appId);
  }

  /** Still changing: worth asking again in a few seconds. */
  function campaignLive(c) {
    return CAMPAIGN_ACTIVE.includes(c.status) || (c.status === 'cancelled' && !c.finished_at);
  }

  function stopCampaignRefresh() {
    if (state.campaignsTimer !== null) {
      clearTimeout(state.campaignsTimer);
      state.campaignsTimer = null;
    }
  }

  /** Refreshes the list in a few seconds while a shown campaign may still change. */
  function scheduleCampaignRefresh() {
    stopCampaignRefresh();
    if (!state.key || !appCampaigns().some(campaignLive)) return;
    state.campaignsTimer = setTimeout(() => {
      state.campaignsTimer = null;
      loadCampaigns();
    }, CAMPAIGN_REFRESH_MS);
  }

  /**
   * `fresh`: start over at the first page; `more`: append the next page; neither: ask
   * again for the first page, large enough to hold every campaign loaded so far
   * (newest first, so new ones join at the top and the rest are brought up to date).
   */
  async function loadCampaigns({ fresh = false, more = false } = {}) {
    const status = $('campaigns-status');
    if (more && !state.campaignsCursor) return;
    const seq = ++state.campaignsSeq;
    stopCampaignRefresh();
    if (fresh) {
      state.campaigns = [];
      state.campaignsCursor = null;
      notice($('campaigns-action-status'), null);
      notice(status, 'info', 'Loading…');
    }
    const limit = more || fresh ? CAMPAIGNS_PAGE
      : Math.min(CAMPAIGNS_MAX_PAGE, Math.max(CAMPAIGNS_PAGE, state.campaigns.length));
    $('campaigns-more').disabled = true;
    let page;
    try {
      page = await call('/v1/campaigns', {
        app_id: null, // not a filter of this endpoint: the key's apps are listed
        status: $('campaigns-filter').value || null,
        limit,
        cursor: more ? state.campaignsCursor : null,
      });
    } catch (err) {
      if (seq !== state.campaignsSeq || !state.key) return;
      if (err instanceof ApiFailure && err.missingEndpoint) {
        notice(status, 'info', 'Not available: this version of the service does not run campaigns.');
      } else {
        notice(status, 'error', 'Could not load the campaigns: ' + describe(err));
        scheduleCampaignRefresh();
      }
      $('campaigns-more').disabled = !state.campaignsCursor;
      return;
    }
    if (seq !== state.campaignsSeq || !state.key) return; // a newer load, or signed out
    notice(status, null);
    const got = Array.isArray(page.campaigns) ? page.campaigns.filter((c) => c && typeof c === 'object') : [];
    state.campaigns = more ? state.campaigns.concat(got) : got;
    state.campaignsCursor = page.next_cursor || null;
    const now = new Date();
    $('campaigns-updated').textContent =
      `updated ${pad(now.getUTCHours())}:${pad(now.getUTCMinutes())}:${pad(now.getUTCSeconds())} UTC`;
    renderCampaigns();
    scheduleCampaignRefresh();
  }

  function renderCampaigns() {
    const list = appCampaigns();
    const filter = $('campaigns-filter').value;
    const others = state.campaigns.length - list.length;
    if (!list.length) {
      let text = filter ? `No ${filter} campaigns` : 'No campaigns';
      if (state.appId !== null) text += ` of ${state.appId}`;
      text += state.campaignsCursor ? ' among those loaded; "More" loads older ones.' : '.';
      replace($('campaigns-list'), empty(text));
    } else {
      const t = table(['campaign', 'status', 'progress', 'rate', 'schedule', 'actions'],
        list.map((c) => [
          campaignCell(c),
          campaignStatusCell(c),
          progressCell(c),
          h('span', { class: 'rate', text: c.rate_per_s === null || c.rate_per_s === undefined
            ? 'unlimited' : `${num(c.rate_per_s)} /s` }),
          scheduleCell(c),
          actionButtons(c),
        ]), { className: 'campaigns' });
      t.querySelectorAll('tbody tr').forEach((tr, i) => {
        tr.setAttribute('data-campaign', String(list[i].id));
        tr.setAttribute('data-status', String(list[i].status));
      });
      replace($('campaigns-list'), t);
    }
    let count = list.length ? plural(list.length, 'campaign') : '';
    if (others > 0) count += `${count ? ' · ' : ''}${num(others)} of other apps hidden`;
    $('campaigns-count').textContent = count;
    show($('campaigns-more'), Boolean(state.campaignsCursor));
    $('campaigns-more').disabled = !state.campaignsCursor;
  }

  function campaignCell(c) {
    return h('div', null,
      h('span', { class: 'mono campaign-id', text: String(c.id) }),
      h('span', { class: 'campaign-sub' }, 'template ', h('span', { class: 'mono template', text: c.template_id || '' })),
      h('span', { class: 'campaign-sub muted',
        text: [c.channel, c.audience === 'holding' ? 'everyone holding a credential' : c.audience,
          state.appId === null ? c.app_id : null].filter(Boolean).join(' · ') }));
  }

  function campaignStatusCell(c) {
    const known = CAMPAIGN_STATUSES.includes(c.status);
    return h('div', null,
      h('span', { class: 'badge campaign-status ' + (known ? c.status : 'unknown'), text: c.status || '?' }),
      c.paused_until
        ? h('span', { class: 'held', title: c.paused_until,
          text: `held by WeChat's daily limit until ${utc(c.paused_until)}` })
        : null);
  }

  /** The recipients that are final over those targeted, one stacked segment per outcome. */
  function progressCell(c) {
    const counts = c.counts && typeof c.counts === 'object' ? c.counts : {};
    const n = (k) => Math.max(0, Number(counts[k]) || 0);
    const targeted = n('targeted');
    const final = CAMPAIGN_PARTS.reduce((acc, k) => acc + n(k), 0);
    const pct = targeted ? Math.floor((100 * final) / targeted) : 0;
    const label = `${num(final)} of ${num(targeted)} recipients final`;
    const svg = s('svg', { viewBox: '0 0 100 10', preserveAspectRatio: 'none', class: 'bar-svg', 'aria-hidden': 'true' });
    let x = 0;
    for (const k of CAMPAIGN_PARTS) {
      if (!n(k) || !targeted) continue;
      const w = (100 * n(k)) / targeted;
      svg.appendChild(s('rect', { x, y: 0, width: w, height: 10, class: 'seg ' + k, 'data-part': k },
        s('title', { text: `${k} ${num(n(k))}` })));
      x += w;
    }
    return h('div', { class: 'progress', role: 'progressbar', 'aria-label': label,
      'aria-valuemin': 0, 'aria-valuemax': targeted, 'aria-valuenow': final },
    h('div', { class: 'progress-head' },
      h('span', { class: 'progress-final', text: `${num(final)} / ${num(targeted)}` }),
      h('span', { class: 'muted progress-pct', text: `${pct}%` })),
    svg,
    h('div', { class: 'parts' }, CAMPAIGN_PARTS.concat(['queued']).map((k) =>
      h('span', { 'data-part': k }, h('span', { class: 'dot ' + k }), k,
        h('span', { class: 'part-n', text: num(n(k)) })))));
  }

  function scheduleCell(c) {
    const row = (label, iso, fallback) => [
      h('dt', { text: label }),
      h('dd', { title: iso || null, text: iso ? utc(iso) : fallback }),
    ];
    return h('dl', { class: 'schedule' },
      row('send at', c.send_at, 'at once'),
      row('started', c.started_at, '–'),
      row('finished', c.finished_at, '–'));
  }

  function actionButtons(c) {
    const busy = state.campaignBusy.has(c.id);
    const labels = { pause: 'Pause', resume: 'Resume', cancel: 'Cancel' };
    return h('div', { class: 'actions' }, Object.keys(CAMPAIGN_ACTIONS).map((action) => {
      const allowed = CAMPAIGN_ACTIONS[action].includes(c.status);
      const b = h('button', {
        type: 'button', class: 'secondary small-btn' + (action === 'cancel' ? ' danger' : ''),
        'data-action': action, text: labels[action], disabled: busy || !allowed ? 'disabled' : null,
        title: allowed ? null : `a ${c.status} campaign cannot ${action}`,
      });
      b.addEventListener('click', () => campaignAction(c, action));
      return b;
    }));
  }

  async function campaignAction(c, action) {
    const status = $('campaigns-action-status');
    if (action === 'cancel' && !window.confirm(
      `Cancel campaign ${c.id} (${c.template_id})?\n\nEvery recipient not yet being sent ends ` +
      'cancelled. This cannot be undone.')) {
      return;
    }
    state.campaignBusy.add(c.id);
    renderCampaigns();
    try {
      const view = await post(`/v1/campaigns/${seg(c.id)}/${action}`);
      if (!state.key) return;
      notice(status, null);
      const i = state.campaigns.findIndex((x) => x.id === c.id);
      if (i >= 0 && view && typeof view === 'object' && view.id === c.id) state.campaigns[i] = view;
    } catch (err) {
      if (!state.key) return;
      notice(status, 'error', `Could not ${action} campaign ${c.id}: ${describe(err)}`);
    } finally {
      state.campaignBusy.delete(c.id);
    }
    if (!state.key) return;
    renderCampaigns();
    loadCampaigns(); // bring every count up to date, and refresh while it runs
  }

  // ---------- wiring ----------

  function loadAll() {
    state.usersCursors = [null];
    loadOverview();
    loadCampaigns({ fresh: true });
    loadUsers();
    if (state.currentOpenid) lookup(state.currentOpenid);
  }

  function init() {
    $('signin-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      const key = $('signin-key').value.trim();
      if (!key) {
        showSignIn('Enter an admin API key.');
        return;
      }
      signIn(key);
    });
    $('signout').addEventListener('click', () => signOut());
    $('app-select').addEventListener('change', (ev) => chooseApp(ev.target.value));
    $('app-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      notice($('overview-status'), null);
      chooseApp($('app-input').value.trim());
    });
    $('overview-refresh').addEventListener('click', () => loadOverview());
    $('users-refresh').addEventListener('click', () => loadUsers());
    $('users-next').addEventListener('click', (ev) => {
      const cursor = ev.currentTarget.dataset.cursor;
      if (!cursor) return;
      state.usersCursors.push(cursor);
      loadUsers();
    });
    $('users-prev').addEventListener('click', () => {
      if (state.usersCursors.length > 1) state.usersCursors.pop();
      loadUsers();
    });
    $('campaigns-refresh').addEventListener('click', () => loadCampaigns());
    $('campaigns-filter').addEventListener('change', () => loadCampaigns({ fresh: true }));
    $('campaigns-more').addEventListener('click', () => loadCampaigns({ more: true }));
    $('lookup-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      lookup($('lookup-openid').value);
    });

    const saved = sessionStorage.getItem(KEY_STORE);
    if (saved) {
      show($('signin'), true);
      signIn(saved, { remembered: true });
    } else {
      showSignIn();
    }
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', init);
  else init();
})();
