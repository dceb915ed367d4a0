// hookrelay operator console. Plain ES2020, no dependencies, CSP-safe.
// Every string from the API is untrusted: DOM is built only with
// createElement/textContent (see el()). The admin token lives only in memory
// and is sent only as an `Authorization: Bearer` header.
'use strict';

(() => {
  const $ = (id) => document.getElementById(id);
  const VIEWS = ['events', 'dead', 'destinations', 'routing'];
  const PAGE_SIZE = 50;
  const DEAD_SHOWN = 500;
  const INDENTED_MAX = 256 * 1024;
  // Indenting stops past this output (then the body is shown as received), and past this depth
  // a line is indented no further: a small, deeply nested body cannot grow a hundredfold.
  const INDENTED_OUT_MAX = 2 * 1024 * 1024;
  const INDENT_DEPTH_MAX = 16;
  const app = { token: '', authed: false, needsToken: false, started: false, loginTried: false, authGen: 0,
    view: 'events', next: null, filter: null, eventId: null, eventPick: null, shownEvent: null, dead: null, pollTimer: null, destTimer: null };

  // ---- DOM helpers -------------------------------------------------------
  const SAFE_ATTR = /^(class|id|type|value|title|disabled|aria-label|data-[a-z0-9-]+)$/;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (!SAFE_ATTR.test(name)) throw new Error('refusing attribute ' + name);
      node.setAttribute(name, v === true ? '' : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined) continue;
      node.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }
  const clear = (node) => { node.replaceChildren(); return node; };
  const show = (node, visible) => node.classList.toggle('hidden', !visible);
  const text = (v) => (v === null || v === undefined || v === '' ? '—' : String(v));
  const stateClass = (s) => 'state-' + (/^[a-z_]+$/.test(String(s)) ? s : 'unknown');
  // `name`, when given, is what a screen reader says (the label alone says not of what).
  const button = (cls, label, name) => el('button', { type: 'button', class: cls, 'aria-label': name }, label);
  const pad = (n) => String(n).padStart(2, '0');
  const clock = (d) => `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  const reportReplay = (res) => {
    const n = Number(res && res.replayed) || 0;
    setStatus(`Replayed ${n} ${n === 1 ? 'delivery' : 'deliveries'}.`, 'info');
  };

  function humanSeconds(v) {
    if (v === null || v === undefined || !Number.isFinite(Number(v))) return '—';
    let s = Math.max(0, Math.floor(Number(v)));
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    s %= 60;
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${m}m`;
    return m ? `${m}m ${s}s` : `${s}s`;
  }

  // Patch an existing row in place (keeps element identity across refreshes).
  function patchNode(old, fresh) {
    if (old.className !== fresh.className) old.className = fresh.className;
    // What a screen reader says of a button follows its text (Pause → Resume).
    for (const name of ['aria-label', 'title']) {
      const v = fresh.getAttribute(name);
      if (v === null) old.removeAttribute(name);
      else if (old.getAttribute(name) !== v) old.setAttribute(name, v);
    }
    const a = old.children, b = fresh.children;
    if (a.length === 0 && b.length === 0) {
      if (old.textContent !== fresh.textContent) old.textContent = fresh.textContent;
    } else if (a.length === 1 && b.length === 1 && a[0].tagName === b[0].tagName
               && old.childNodes.length === 1 && fresh.childNodes.length === 1) {
      patchNode(a[0], b[0]);
    } else {
      old.replaceChildren(...fresh.childNodes);
    }
  }

  function patchRow(prev, fresh) {
    if (prev.cells.length !== fresh.cells.length) return false;
    for (let i = 0; i < fresh.cells.length; i++) patchNode(prev.cells[i], fresh.cells[i]);
    return true;
  }

  // Render items into tbody, reusing rows with the same key.
  function syncRows(tbody, items, keyOf, build) {
    const old = new Map(Array.from(tbody.rows, (tr) => [tr.dataset.key, tr]));
    const placed = new Set();
    for (const item of items) {
      const key = keyOf(item);
      // One row per key: a second item with it (a list that changed between its pages)
      // would leave a row no later render removes.
      if (placed.has(key)) continue;
      placed.add(key);
      const fresh = build(item);
      fresh.dataset.key = key;
      const prev = old.get(key);
      old.delete(key);
      tbody.appendChild(prev && patchRow(prev, fresh) ? prev : fresh);
    }
    for (const tr of old.values()) tr.remove();
  }

  // Discard responses that were overtaken by a newer request of the same kind.
  const seqs = {};
  function ticket(kind) {
    const n = (seqs[kind] || 0) + 1;
    seqs[kind] = n;
    return () => seqs[kind] === n;
  }

  // ---- API -----------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, kind, message, body, gen) {
      super(message);
      Object.assign(this, { status, kind, body, gen });
    }
  }

  function query(params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params)) if (v !== '' && v !== null && v !== undefined) q.set(k, String(v));
    const s = q.toString();
    return s ? '?' + s : '';
  }

  async function api(method, path) {
    const gen = app.authGen;
    const headers = { Accept: 'application/json' };
    if (app.token) headers.Authorization = 'Bearer ' + app.token;
    let res;
    try {
      res = await fetch(path, { method, headers, credentials: 'omit', cache: 'no-store', redirect: 'error' });
    } catch (e) {
      throw new ApiError(0, 'network', 'network error: ' + e.message, null, gen);
    }
    let body = null;
    try { body = JSON.parse(await res.text()); } catch (_) { body = null; }
    if (res.ok) return body;
    const kind = body && typeof body.error === 'string' ? body.error : 'http';
    const msg = body && typeof body.message === 'string' ? body.message : res.statusText || 'request failed';
    throw new ApiError(res.status, kind, msg, body, gen);
  }

  // ---- status line and error handling ------------------------------------------
  function setStatus(msg, kind, origin) {
    const s = $('status');
    s.textContent = msg || '';
    s.className = 'status' + (msg ? ' ' + (kind || 'error') : '');
    s.dataset.origin = origin || '';
  }

  function fail(err, origin) {
    if (err instanceof ApiError && err.status === 401) {
      if (err.gen === app.authGen) requireLogin('Token rejected or expired: ' + err.message);
      return;
    }
    const prefix = err instanceof ApiError && err.status ? `HTTP ${err.status}: ` : '';
    setStatus(prefix + (err && err.message ? err.message : String(err)), 'error', origin);
  }

  // Wrap an async handler so failures land in the status line.
  const guard = (fn) => (...args) => Promise.resolve().then(() => fn(...args)).catch((e) => fail(e));

  // ---- authentication ------------------------------------------------------
  async function tryToken(token) {
    const gen = ++app.authGen;
    app.token = token;
    try {
      await api('GET', '/api/destinations');
      if (gen !== app.authGen) return;
      app.needsToken = token !== '';
      enterApp();
    } catch (err) {
      if (gen !== app.authGen) return;
      app.token = '';
      if (err.status === 401) {
        requireLogin(token ? 'Token rejected: ' + err.message : (app.loginTried ? 'A token is required.' : ''));
      } else {
        requireLogin('Could not check the token: ' + err.message);
        fail(err);
      }
    }
  }

  function requireLogin(message) {
    app.authed = false;
    app.token = '';
    stopPoll();
    stopDestTimer();
    forgetShown();
    show($('login'), true);
    for (const id of ['app', 'nav', 'logout']) show($(id), false);
    $('login-message').textContent = message || '';
    $('token').focus();
  }

  // What the signed-out page must not keep: event bodies, lists, URLs, the routing table.
  function forgetShown() {
    // A list still on its way is not shown when it comes.
    for (const kind of Object.keys(seqs)) seqs[kind] += 1;
    for (const id of ['events', 'dead', 'destinations', 'deliveries']) clear($(id).tBodies[0]);
    for (const id of ['event-body', 'event-body-decoded', 'routing-table', 'event-id', 'event-source',
      'event-seq', 'event-received', 'event-content-type', 'event-choices', 'reload-result', 'reload-problems']) {
      $(id).textContent = '';
    }
    show($('event-view'), false);
    show($('more'), false);
    show($('dead-more'), false);
    app.dead = null;
    app.eventId = null;
    app.eventPick = null;
    app.shownEvent = null;
    app.next = null;
    app.filter = null;
  }

  function enterApp() {
    app.authed = true;
    $('token').value = '';
    $('login-message').textContent = '';
    show($('login'), false);
    for (const id of ['app', 'nav']) show($(id), true);
    show($('logout'), app.needsToken);
    setStatus('');
    guard(loadConfig)();
    showView(app.started ? app.view : 'events');
    app.started = true;
  }

  function onLogin(e) {
    e.preventDefault();
    app.loginTried = true;
    const token = $('token').value.trim();
    if (/[^\x20-\x7e]/.test(token)) {
      $('login-message').textContent = 'The token contains characters that cannot be sent in a header.';
      return;
    }
    $('login-message').textContent = 'Checking…';
    tryToken(token);
  }

  // ---- views ---------------------------------------------------------------
  function showView(name) {
    app.view = name;
    for (const v of VIEWS) {
      show($(v + '-view'), v === name);
      $('tab-' + v).classList.toggle('active', v === name);
      $('tab-' + v).setAttribute('aria-current', v === name ? 'page' : 'false');
    }
    stopDestTimer();
    setStatus('');
    const loaders = { events: () => loadEvents(false), dead: loadDead, destinations: refreshDestinations, routing: loadConfig };
    guard(loaders[name])();
  }

  function fillSelect(select, names) {
    const keep = select.value;
    const list = Array.isArray(names) ? names.map(String) : [];
    clear(select).append(el('option', { value: '' }, 'any'), ...list.map((n) => el('option', { value: n }, n)));
    select.value = list.includes(keep) ? keep : '';
  }

  async function loadConfig() {
    const cfg = await api('GET', '/api/config');
    fillSelect($('filter-source'), cfg.sources);
    fillSelect($('filter-destination'), cfg.destinations);
    fillSelect($('dead-destination'), cfg.destinations);
    updateReplayAll();
    $('routing-table').textContent = typeof cfg.routing_table === 'string' ? cfg.routing_table : '';
  }

  // ---- events list ---------------------------------------------------------
  async function loadEvents(append) {
    if (append && !app.next) return;
    const current = ticket('events');
    // "Load more" goes on with the filter the list was loaded with, not the boxes' values
    // now: its cursor belongs to that filter.
    if (!append || !app.filter) {
      app.filter = { source: $('filter-source').value, destination: $('filter-destination').value,
        state: $('filter-state').value };
    }
    const params = { ...app.filter, limit: PAGE_SIZE, before: append ? app.next : '' };
    // A new list's "Load more" waits for it: the old cursor belongs to the old filter.
    if (!append) { app.next = null; show($('more'), false); }
    const data = await api('GET', '/api/events' + query(params));
    if (!current()) return;
    const tbody = $('events').tBodies[0];
    if (!append) clear(tbody);
    for (const ev of (data && Array.isArray(data.events)) ? data.events : []) tbody.appendChild(eventRow(ev));
    app.next = data && data.next ? String(data.next) : null;
    show($('more'), app.next !== null);
    // A page may hold no match while older events remain to look through.
    show($('events-empty'), tbody.rows.length === 0 && app.next === null);
  }

  const badge = (d) => el('span', { class: 'badge ' + stateClass(d.state) }, `${d.destination}: ${d.state}`);

  function eventRow(ev) {
    return el('tr', { 'data-event-id': ev.id, 'data-source': ev.source, 'data-seq': ev.seq },
      el('td', { class: 'received mono' }, text(ev.received)),
      el('td', { class: 'source' }, text(ev.source)),
      el('td', { class: 'id mono' }, button('open link', text(ev.id))),
      el('td', { class: 'deliveries' }, (ev.deliveries || []).map(badge)));
  }

  function onEventsClick(e) {
    const tr = e.target.closest('tr[data-event-id]');
    if (tr) guard(openEvent)(tr.dataset.eventId, pickOf(tr));
  }

  // Which of the events with one id a row or button names: its sequence, else its source.
  const pickOf = (node) => ({ source: node.dataset.source, seq: node.dataset.seq });

  function onSearch() {
    const id = $('search-id').value.trim();
    if (id) guard(openEvent)(id, null);
  }

  // ---- event detail --------------------------------------------------------
  async function openEvent(id, pick) {
    stopPoll();
    setStatus('');
    if (await fetchEvent(id, pick)) {
      $('event-view').scrollIntoView({ block: 'start' });
      $('event-view').focus({ preventScroll: true });
    }
  }

  async function fetchEvent(id, pick) {
    const current = ticket('event');
    const data = await api('GET', '/api/events/' + encodeURIComponent(id));
    if (!current()) return null;
    const list = data && Array.isArray(data.events) ? data.events : [data];
    const want = pick || {};
    const ev = list.find((x) => x && want.seq !== undefined && String(x.seq) === String(want.seq)) ||
      list.find((x) => x && want.source !== undefined && x.source === want.source) || list[0];
    if (!ev) throw new Error(`no event with id ${id}`);
    app.eventId = id;
    app.eventPick = { source: ev.source, seq: ev.seq };
    renderEvent(ev, list);
    return ev;
  }

  // Indents JSON text without reading it into values: only whitespace outside strings
  // changes, so every number, key and key order stays as received.
  function indentJson(src) {
    let out = '';
    let depth = 0;
    let inString = false;
    let escaped = false;
    const line = () => '\n' + '  '.repeat(Math.min(depth, INDENT_DEPTH_MAX));
    for (let i = 0; i < src.length; i++) {
      if (out.length > INDENTED_OUT_MAX) return src;
      const ch = src[i];
      if (inString) {
        out += ch;
        if (escaped) escaped = false;
        else if (ch === '\\') escaped = true;
        else if (ch === '"') inString = false;
        continue;
      }
      if (ch === ' ' || ch === '\t' || ch === '\n' || ch === '\r') continue;
      if (ch === '"') { inString = true; out += ch; continue; }
      if (ch === '{' || ch === '[') {
        const close = ch === '{' ? '}' : ']';
        let j = i + 1;
        while (j < src.length && ' \t\n\r'.includes(src[j])) j++;
        if (src[j] === close) { out += ch + close; i = j; continue; }
        depth++;
        out += ch + line();
        continue;
      }
      if (ch === '}' || ch === ']') { depth = Math.max(0, depth - 1); out += line() + ch; continue; }
      if (ch === ',') { out += ',' + line(); continue; }
      if (ch === ':') { out += ': '; continue; }
      out += ch;
    }
    return out;
  }

  function decodeBase64Body(body) {
    if (!body || typeof body !== 'object' || typeof body.base64 !== 'string' || Object.keys(body).length !== 1) return null;
    try {
      const bytes = Uint8Array.from(atob(body.base64), (c) => c.charCodeAt(0));
      return new TextDecoder('utf-8', { fatal: true }).decode(bytes);
    } catch (_) {
      return null;
    }
  }

  function renderEvent(ev, list) {
    // The same event again (a poll after a replay): only its deliveries change, and the
    // body keeps the operator's scroll position and selection.
    const shown = `${ev.source}\u0000${ev.seq}\u0000${list.length}`;
    if (app.shownEvent === shown && !$('event-view').classList.contains('hidden')) {
      syncRows($('deliveries').tBodies[0], ev.deliveries || [], (d) => String(d.destination), deliveryRow);
      return;
    }
    app.shownEvent = shown;
    $('event-id').textContent = text(ev.id);
    $('event-source').textContent = text(ev.source);
    $('event-seq').textContent = text(ev.seq);
    $('event-received').textContent = text(ev.received);
    $('event-content-type').textContent = text(ev.content_type);
    // Indented up to 256 KiB; a larger body is shown as received (indenting a deeply
    // nested one could make it a hundred times larger).
    const raw = typeof ev.body_text === 'string' ? ev.body_text : null;
    $('event-body').textContent = raw !== null ? (raw.length <= INDENTED_MAX ? indentJson(raw) : raw)
      : ev.body === undefined ? '' : JSON.stringify(ev.body, null, 2);
    // Only a body that was not JSON is kept as base64 (a JSON body shaped like one is not).
    const decoded = raw === null ? decodeBase64Body(ev.body) : null;
    $('event-body-decoded').textContent = decoded || '';
    show($('event-body-decoded'), decoded !== null);
    show($('event-decoded-title'), decoded !== null);
    renderChoices(list, ev);
    syncRows($('deliveries').tBodies[0], ev.deliveries || [], (d) => String(d.destination), deliveryRow);
    show($('event-view'), true);
  }

  function renderChoices(list, ev) {
    const box = clear($('event-choices'));
    show(box, list.length > 1);
    if (list.length < 2) return;
    box.append(`${list.length} events have this id: `, ...list.map((x) =>
      el('button', { type: 'button', class: 'choice' + (x === ev ? ' active' : ''), 'data-source': x.source, 'data-seq': x.seq },
        `${text(x.source)}, ${text(x.received)}`)));
  }

  function deliveryRow(d) {
    return el('tr', { 'data-destination': d.destination },
      el('td', { class: 'destination' }, text(d.destination)),
      el('td', { class: 'state ' + stateClass(d.state) }, text(d.state)),
      el('td', { class: 'attempts num' }, text(d.attempts)),
      el('td', { class: 'last-status num' }, text(d.last_status)),
      el('td', { class: 'last-error' }, text(d.last_error)),
      el('td', { class: 'next-attempt mono' }, d.state !== 'pending' ? '—'
        : d.waiting ? 'after an earlier event with its order key' : text(d.next_attempt_at)),
      el('td', { class: 'actions' }, d.state === 'dead' ? button('replay', 'Replay', `Replay to ${d.destination}`) : null));
  }

  const hasPending = (ev) => (ev.deliveries || []).some((d) => d.state === 'pending');

  const stopPoll = () => { clearTimeout(app.pollTimer); app.pollTimer = null; };

  // Re-fetch the open event every second while `busy(ev)` holds (max until deadline).
  async function pollEvent(deadline, busy = hasPending) {
    stopPoll();
    const ev = await fetchEvent(app.eventId, app.eventPick);
    if (ev && app.authed && busy(ev) && Date.now() < deadline) {
      app.pollTimer = setTimeout(() => guard(pollEvent)(deadline, busy), 1000);
    }
  }

  // After a replay: wait until the replay shows (pending or no longer dead), then until nothing is pending.
  function replaySettled() {
    let moved = false;
    return (ev) => {
      if (hasPending(ev) || !(ev.deliveries || []).some((d) => d.state === 'dead')) moved = true;
      return hasPending(ev) || !moved;
    };
  }

  async function replayOpenEvent(btn) {
    btn.disabled = true;
    let res;
    try {
      // This row's delivery only: the event's other dead deliveries stay as they are.
      const tr = btn.closest('tr[data-destination]');
      const seq = app.eventPick ? app.eventPick.seq : '';
      res = await api('POST', '/api/dead/replay' + query({ id: app.eventId, destination: tr ? tr.dataset.destination : '', seq: tr ? seq : '' }));
      reportReplay(res);
    } finally {
      btn.disabled = false;
    }
    await pollEvent(Date.now() + 15000, Number(res && res.replayed) > 0 ? replaySettled() : hasPending);
  }

  function onEventViewClick(e) {
    const replay = e.target.closest('#deliveries button.replay');
    if (replay) guard(replayOpenEvent)(replay);
    const choice = e.target.closest('#event-choices button.choice');
    if (choice) guard(fetchEvent)(app.eventId, pickOf(choice));
  }

  function closeEvent() {
    stopPoll();
    ticket('event');
    show($('event-view'), false);
  }

  // ---- dead letters ----------------------------------------------------------
  // The dead letters shown: the filter they were loaded with, the list (oldest first, a
  // page at a time), and whether a next page may follow.
  async function loadDead() {
    updateReplayAll();
    const current = ticket('dead');
    const filter = $('dead-destination').value;
    const rows = await api('GET', '/api/dead' + query({ destination: filter, limit: DEAD_SHOWN }));
    if (!current()) return;
    const list = Array.isArray(rows) ? rows : [];
    app.dead = { filter, list, full: list.length >= DEAD_SHOWN, loading: false };
    renderDead();
  }

  // The next page, after the last one shown, with the filter the list was loaded with. A
  // new list loaded meanwhile wins: this page belongs to the old one.
  async function moreDead() {
    const shown = app.dead;
    if (!shown || shown.loading || shown.list.length === 0) return;
    shown.loading = true;
    try {
      const last = shown.list[shown.list.length - 1];
      const rows = await api('GET', '/api/dead' + query({ destination: shown.filter, limit: DEAD_SHOWN, after: last.cursor }));
      if (app.dead !== shown) return;
      const page = Array.isArray(rows) ? rows : [];
      // One that died again since the first page (a new place in the list) is shown once.
      const have = new Set(shown.list.map(deadKey));
      shown.list = shown.list.concat(page.filter((d) => !have.has(deadKey(d))));
      shown.full = page.length >= DEAD_SHOWN;
      renderDead();
    } finally {
      shown.loading = false;
    }
  }

  // Keyed by the event's sequence too: one id may name several events (sources, reuse).
  const deadKey = (d) => JSON.stringify([d.source, d.event_id, d.destination, d.seq]);

  function renderDead() {
    const tbody = $('dead').tBodies[0];
    syncRows(tbody, app.dead.list, deadKey, deadRow);
    show($('dead-empty'), tbody.rows.length === 0);
    show($('dead-more'), app.dead.full);
  }

  function deadRow(d) {
    return el('tr', { 'data-event-id': d.event_id, 'data-destination': d.destination, 'data-source': d.source, 'data-seq': d.seq },
      el('td', { class: 'event-id mono' }, button('open link', text(d.event_id))),
      el('td', { class: 'source' }, text(d.source)),
      el('td', { class: 'destination' }, text(d.destination)),
      el('td', { class: 'attempts num' }, text(d.attempts)),
      el('td', { class: 'last-status num' }, text(d.last_status)),
      el('td', { class: 'last-error' }, text(d.last_error)),
      el('td', { class: 'updated mono' }, text(d.updated_at)),
      el('td', { class: 'actions' }, button('replay', 'Replay', `Replay ${d.event_id} to ${d.destination}`)));
  }

  const updateReplayAll = () => { $('replay-all').disabled = $('dead-destination').value === ''; };

  async function replayDead(params, btn) {
    btn.disabled = true;
    try {
      reportReplay(await api('POST', '/api/dead/replay' + query(params)));
    } finally {
      btn.disabled = false;
      updateReplayAll();
    }
    await loadDead();
    // An open event shows its deliveries' states: replayed ones are pending again.
    if (app.eventId && !$('event-view').classList.contains('hidden')) await fetchEvent(app.eventId, app.eventPick);
  }

  function onDeadClick(e) {
    const tr = e.target.closest('tr[data-event-id]');
    if (!tr) return;
    if (e.target.closest('button.replay')) guard(replayDead)({ id: tr.dataset.eventId, destination: tr.dataset.destination, seq: tr.dataset.seq }, e.target.closest('button'));
    else if (e.target.closest('button.open')) guard(openEvent)(tr.dataset.eventId, pickOf(tr));
  }

  // ---- destinations ----------------------------------------------------------
  const stopDestTimer = () => { clearTimeout(app.destTimer); app.destTimer = null; };

  async function refreshDestinations() {
    stopDestTimer();
    const current = ticket('destinations');
    try {
      const list = await api('GET', '/api/destinations');
      if (!current()) return;
      syncRows($('destinations').tBodies[0], Array.isArray(list) ? list : [], (d) => String(d.name), destinationRow);
      $('destinations-updated').textContent = 'last refreshed ' + clock(new Date());
      if ($('status').dataset.origin === 'destinations') setStatus('');
    } catch (err) {
      if (current()) fail(err, 'destinations');
    } finally {
      if (current() && app.authed && app.view === 'destinations') app.destTimer = setTimeout(refreshDestinations, 3000);
    }
  }

  function destinationRow(d) {
    const paused = d.state === 'paused';
    return el('tr', { 'data-destination': d.name },
      el('td', { class: 'name' }, text(d.name)),
      el('td', { class: 'url mono' }, text(d.url)),
      el('td', { class: 'state ' + stateClass(d.state) }, text(d.state)),
      el('td', { class: 'queue-depth num' }, text(d.queue_depth)),
      el('td', { class: 'in-flight num' }, text(d.in_flight)),
      el('td', { class: 'oldest-pending num' }, humanSeconds(d.oldest_pending_age_seconds)),
      el('td', { class: 'failures num' }, text(d.consecutive_failures)),
      el('td', { class: 'last-error' }, text(d.last_error)),
      el('td', { class: 'actions' }, paused ? button('resume', 'Resume', `Resume ${d.name}`) : button('pause', 'Pause', `Pause ${d.name}`)));
  }

  // Render the answer straight away, then refetch the whole table.
  async function setPaused(name, action, btn) {
    btn.disabled = true;
    try {
      const updated = await api('POST', `/api/destinations/${encodeURIComponent(name)}/${action}`);
      const row = Array.from($('destinations').tBodies[0].rows).find((tr) => tr.dataset.key === name);
      if (updated && row) patchRow(row, destinationRow(updated));
    } finally {
      btn.disabled = false;
    }
    await refreshDestinations();
  }

  function onDestinationsClick(e) {
    const btn = e.target.closest('button.pause, button.resume');
    const tr = btn && btn.closest('tr[data-destination]');
    if (tr) guard(setPaused)(tr.dataset.destination, btn.classList.contains('pause') ? 'pause' : 'resume', btn);
  }

  // ---- routing ---------------------------------------------------------------
  async function reloadConfig() {
    const btn = $('reload'), result = $('reload-result'), problems = clear($('reload-problems'));
    btn.disabled = true;
    result.className = 'muted';
    result.textContent = 'reloading…';
    try {
      const res = await api('POST', '/api/reload');
      result.className = 'ok';
      result.textContent = 'reloaded';
      if (res && typeof res.routing_table === 'string') $('routing-table').textContent = res.routing_table;
      guard(loadConfig)();
    } catch (err) {
      if (err instanceof ApiError && err.status === 400 && err.body) {
        result.className = 'error';
        result.textContent = err.message;
        const list = Array.isArray(err.body.problems) ? err.body.problems : [];
        problems.append(...list.map((p) => el('li', { class: 'mono' }, String(p))));
      } else {
        result.className = '';
        result.textContent = '';
        fail(err);
      }
    } finally {
      btn.disabled = false;
    }
  }

  // ---- wiring ----------------------------------------------------------------
  function init() {
    $('login').addEventListener('submit', onLogin);
    $('logout').addEventListener('click', () => { app.authGen++; requireLogin('Signed out.'); });
    for (const v of VIEWS) $('tab-' + v).addEventListener('click', () => showView(v));
    $('apply-filters').addEventListener('click', () => { setStatus(''); guard(loadEvents)(false); });
    $('more').addEventListener('click', () => guard(loadEvents)(true));
    $('events').tBodies[0].addEventListener('click', onEventsClick);
    $('search-button').addEventListener('click', onSearch);
    $('search-id').addEventListener('keydown', (e) => { if (e.key === 'Enter') onSearch(); });
    $('event-view').addEventListener('click', onEventViewClick);
    $('close-event').addEventListener('click', closeEvent);
    $('refresh-event').addEventListener('click', () => { setStatus(''); guard(pollEvent)(Date.now() + 15000); });
    $('dead-destination').addEventListener('change', guard(loadDead));
    $('refresh-dead').addEventListener('click', guard(loadDead));
    $('dead-more').addEventListener('click', guard(moreDead));
    $('replay-all').addEventListener('click', (e) => {
      const dest = $('dead-destination').value;
      if (dest) guard(replayDead)({ destination: dest }, e.currentTarget);
    });
    $('dead').tBodies[0].addEventListener('click', onDeadClick);
    $('destinations').tBodies[0].addEventListener('click', onDestinationsClick);
    $('reload').addEventListener('click', guard(reloadConfig));
    tryToken('');
  }

  init();
})();
