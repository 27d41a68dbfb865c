// meshlet dashboard: four views (services, topology, policies, traces),
// each a client of the control plane's JSON API. The page refetches the
// current view on every `update` server-sent event, or every 2 s when the
// event stream is down. Plain DOM and SVG; no build step, no library.
'use strict';

const API = {
  services: '/api/v1/dashboard/services',
  series: '/api/v1/dashboard/series',
  topology: '/api/v1/dashboard/topology',
  policies: '/api/v1/dashboard/policies',
  events: '/api/v1/dashboard/events',
  traces: '/api/traces',
};
const POLL_MS = 2000;
const SVG_NS = 'http://www.w3.org/2000/svg';

const state = {
  view: 'services',
  sort: { key: 'name', desc: false },
  selectedTrace: null,
  refreshing: false,
  again: false,
  pollTimer: null,
};

// ---------------------------------------------------------------- helpers

// el('td', {class: 'num', 'data-field': 'rps'}, 'text', node, ...)
function build(make, tag, attrs, children) {
  const node = make(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null) continue;
    if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
    else if (name.startsWith('data-')) node.setAttribute(name, String(value));
    else if (value !== false) node.setAttribute(name, value === true ? '' : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}
const el = (tag, attrs, ...children) => build((t) => document.createElement(t), tag, attrs, children);
const svg = (tag, attrs, ...children) => build((t) => document.createElementNS(SVG_NS, t), tag, attrs, children);

async function getJson(path) {
  const response = await fetch(path, { headers: { accept: 'application/json' } });
  if (!response.ok) {
    let reason = response.statusText;
    try { reason = (await response.json()).error || reason; } catch (_) { /* not JSON */ }
    throw new Error(`${path}: ${response.status} ${reason}`);
  }
  return response.json();
}

const fmt = {
  rate: (v) => (v === null || v === undefined ? '–' : v >= 100 ? v.toFixed(0) : v.toFixed(2)),
  percent: (v) => (v === null || v === undefined ? '–' : `${(v * 100).toFixed(v >= 0.9995 || v === 0 ? 0 : 1)}%`),
  ms: (v) => (v === null || v === undefined ? '–' : v >= 100 ? `${v.toFixed(0)} ms` : `${v.toFixed(1)} ms`),
  micros: (us) => (us >= 1e6 ? `${(us / 1e6).toFixed(2)} s` : us >= 1000 ? `${(us / 1000).toFixed(2)} ms` : `${Math.round(us)} µs`),
  ago(ms) {
    if (!ms) return '–';
    const s = Math.max(0, (Date.now() - ms) / 1000);
    return s < 60 ? `${s.toFixed(1)}s ago` : s < 3600 ? `${Math.floor(s / 60)}m ago` : `${Math.floor(s / 3600)}h ago`;
  },
  time: (ms) => new Date(ms).toLocaleTimeString(),
};

// A table from column definitions: {title, num, sort, cell(row) → node|text}.
function table(columns, rows, rowAttrs, sort) {
  const head = el('tr', {}, columns.map((c) => {
    const sorted = sort && c.sort === sort.key;
    return el('th', {
      class: [c.num ? 'num' : '', sorted ? 'sorted' : '', sorted && sort.desc ? 'desc' : ''].join(' ').trim() || null,
      'data-sort': c.sort,
      onclick: c.sort && sort ? () => sort.by(c.sort) : null,
    }, c.title);
  }));
  const body = rows.map((row) => el('tr', rowAttrs(row), columns.map((c) => el('td', { class: c.num ? 'num' : null }, c.cell(row)))));
  return el('table', {}, el('thead', {}, head), el('tbody', {}, body));
}

const empty = (text) => el('p', { class: 'empty' }, text);

// Adds `value` to the list under `key` of a Map of lists.
function append(map, key, value) {
  if (!map.has(key)) map.set(key, []);
  map.get(key).push(value);
}

// ---------------------------------------------------------------- services

const SERVICE_COLUMNS = [
  { title: 'Service', sort: 'name', cell: (s) => el('strong', {}, s.namespace === 'default' ? s.name : `${s.name}.${s.namespace}`) },
  { title: 'Instances', sort: 'instances', cell: (s) => s.instances.map(instanceLine) },
  { title: 'Identity', cell: (s) => identityCell(s) },
  { title: 'RPS', sort: 'rps', num: true, cell: (s) => el('span', { 'data-field': 'rps', 'data-value': s.rps }, fmt.rate(s.rps)) },
  { title: 'Success', sort: 'successRate', num: true, cell: (s) => el('span', { 'data-field': 'successRate' }, fmt.percent(s.successRate)) },
  { title: 'p50', sort: 'p50Ms', num: true, cell: (s) => fmt.ms(s.p50Ms) },
  { title: 'p95', sort: 'p95Ms', num: true, cell: (s) => fmt.ms(s.p95Ms) },
  { title: 'p99', sort: 'p99Ms', num: true, cell: (s) => fmt.ms(s.p99Ms) },
  { title: 'Requests (5 min)', sort: 'requests', num: true, cell: (s) => el('span', { 'data-field': 'requests' }, s.requests ?? 0) },
  { title: 'RPS trend', cell: (s) => el('span', { 'data-spark': `${s.namespace}/${s.name}` }) },
];

// The SPIFFE ids of a service's instances (one per service account), or a
// dash: no registered instance, or no mesh CA.
function identityCell(s) {
  const ids = [...new Set(s.instances.map((i) => i.identity).filter(Boolean))];
  if (!ids.length) return el('span', { class: 'muted', 'data-field': 'identity' }, '—');
  return el('span', { class: 'identity', 'data-field': 'identity', title: 'workload identity (mTLS certificate URI)' }, ids.join(' '));
}

function instanceLine(i) {
  const version = i.labels && i.labels.version;
  return el('span', { class: 'instance', 'data-instance': i.id, 'data-healthy': i.healthy, 'data-identity': i.identity || '' },
    el('span', { class: i.healthy ? 'dot' : 'dot down', title: i.healthy ? 'healthy' : 'unhealthy' }),
    i.address, version ? el('span', { class: 'tag' }, version) : null,
    el('span', { class: 'muted' }, ` heartbeat ${fmt.ago(i.lastHeartbeatMs)}`));
}

function sortValue(service, key) {
  if (key === 'name') return `${service.namespace}/${service.name}`;
  if (key === 'instances') return service.instances.length;
  return service[key];
}

function compare(a, b, desc) {
  if (a === b) return 0;
  if (a === null || a === undefined) return 1; // no data sorts last either way
  if (b === null || b === undefined) return -1;
  const order = a < b ? -1 : 1;
  return desc ? -order : order;
}

function failing(service) {
  return !service.healthy || (service.successRate !== null && service.successRate !== undefined && service.successRate < 0.95);
}

async function loadServices(root) {
  const services = await getJson(API.services);
  const series = await Promise.all(services.map((s) =>
    getJson(`${API.series}?service=${encodeURIComponent(`${s.namespace}/${s.name}`)}`).catch(() => null)));
  const trend = new Map(services.map((s, i) => [`${s.namespace}/${s.name}`, series[i]]));
  const { key, desc } = state.sort;
  const rows = services.slice().sort((a, b) => compare(sortValue(a, key), sortValue(b, key), desc));
  const sort = {
    key, desc,
    by(column) {
      state.sort = { key: column, desc: state.sort.key === column ? !state.sort.desc : column !== 'name' };
      refresh();
    },
  };
  const content = rows.length
    ? table(SERVICE_COLUMNS, rows, (s) => ({
      'data-service': s.name, 'data-namespace': s.namespace, 'data-healthy': s.healthy,
      class: failing(s) ? 'bad' : null,
    }), sort)
    : empty('No services registered yet.');
  for (const holder of content.querySelectorAll('[data-spark]')) {
    const points = trend.get(holder.dataset.spark);
    if (points) holder.append(sparkline(points.points.map((p) => p.rps)));
  }
  root.replaceChildren(el('h2', {}, 'Services'), content);
  fillServiceFilter(services);
}

function sparkline(values, width = 120, height = 24) {
  if (values.length < 2) return el('span', { class: 'muted' }, '–');
  const max = Math.max(...values, 1e-9);
  const step = width / (values.length - 1);
  const points = values.map((v, i) => `${(i * step).toFixed(1)},${(height - 2 - (v / max) * (height - 4)).toFixed(1)}`);
  return svg('svg', { class: 'spark', width, height, viewBox: `0 0 ${width} ${height}` }, svg('polyline', { points: points.join(' ') }));
}

// ---------------------------------------------------------------- topology

const NODE = { w: 150, h: 46, gapX: 140, gapY: 40, pad: 30 };

// Columns by longest path from a node nobody calls (cycles cut at the first revisit).
// A gateway (role "gateway") is the mesh's entry: always the first column, and
// when there is one every other node starts in the next.
function layers(nodes, edges) {
  const entry = new Set(nodes.filter((n) => n.role === 'gateway').map((n) => n.id));
  const start = entry.size ? 1 : 0;
  const depth = new Map(nodes.map((n) => [n.id, entry.has(n.id) ? 0 : start]));
  for (let round = 0; round < nodes.length; round++) {
    let changed = false;
    for (const e of edges) {
      if (e.from === e.to || !depth.has(e.from) || !depth.has(e.to) || entry.has(e.to)) continue;
      const want = depth.get(e.from) + 1;
      if (want > depth.get(e.to) && want < nodes.length + start) { depth.set(e.to, want); changed = true; }
    }
    if (!changed) break;
  }
  return depth;
}

function layout(nodes, edges) {
  const depth = layers(nodes, edges);
  const columns = [];
  for (const n of nodes.slice().sort((a, b) => a.id.localeCompare(b.id))) {
    const d = depth.get(n.id);
    (columns[d] = columns[d] || []).push(n);
  }
  const tallest = Math.max(1, ...columns.map((c) => (c ? c.length : 0)));
  const height = NODE.pad * 2 + tallest * NODE.h + (tallest - 1) * NODE.gapY;
  const at = new Map();
  columns.forEach((column, d) => {
    const used = column.length * NODE.h + (column.length - 1) * NODE.gapY;
    column.forEach((n, i) => at.set(n.id, {
      x: NODE.pad + d * (NODE.w + NODE.gapX),
      y: (height - used) / 2 + i * (NODE.h + NODE.gapY),
    }));
  });
  const width = NODE.pad * 2 + columns.length * NODE.w + (columns.length - 1) * NODE.gapX;
  return { at, width, height };
}

function edgePath(a, b) {
  const forward = b.x > a.x;
  const x1 = forward ? a.x + NODE.w : a.x + NODE.w / 2;
  const y1 = forward ? a.y + NODE.h / 2 : a.y + NODE.h;
  const x2 = forward ? b.x : b.x + NODE.w / 2;
  const y2 = forward ? b.y + NODE.h / 2 : b.y + NODE.h;
  const bend = forward ? (x2 - x1) / 2 : 0;
  const dip = forward ? 0 : NODE.gapY + 10;
  return {
    d: `M${x1},${y1} C${x1 + bend},${y1 + dip} ${x2 - bend},${y2 + dip} ${x2},${y2}`,
    mid: { x: (x1 + x2) / 2, y: (y1 + y2) / 2 + dip * 0.75 - 8 },
  };
}

// A 10×13 padlock drawn in SVG (no emoji font needed), its top left at x, y.
function padlock(x, y) {
  return svg('g', { class: 'padlock', transform: `translate(${x},${y})` },
    svg('path', { d: 'M2.5,6 V4 a2.5,2.5 0 0 1 5,0 V6' }),
    svg('rect', { x: 0, y: 6, width: 10, height: 7, rx: 1.5 }),
    svg('title', {}, 'mutual TLS'));
}

async function loadTopology(root) {
  const { nodes, edges } = await getJson(API.topology);
  if (!nodes.length) {
    root.replaceChildren(el('h2', {}, 'Topology'), empty('No services yet.'));
    return;
  }
  const { at, width, height } = layout(nodes, edges);
  // Room below the nodes for edges that go back (drawn as a dip).
  const below = edges.some((e) => at.has(e.from) && at.has(e.to) && at.get(e.to).x <= at.get(e.from).x) ? NODE.gapY : 0;
  const marker = (id) => svg('marker', { id, viewBox: '0 0 10 10', refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: 'auto-start-reverse' },
    svg('path', { d: 'M0,0 L10,5 L0,10 z' }));
  const drawnEdges = edges.filter((e) => at.has(e.from) && at.has(e.to)).map((e) => {
    const bad = e.errorRate > 0.05;
    const { d, mid } = edgePath(at.get(e.from), at.get(e.to));
    const classes = ['edge', bad ? 'bad' : null, e.mtls ? 'mtls' : null].filter(Boolean).join(' ');
    return svg('g', { class: classes, 'data-edge': `${e.from}->${e.to}`, 'data-rps': e.rps, 'data-error-rate': e.errorRate, 'data-mtls': !!e.mtls },
      svg('path', { d, 'marker-end': `url(#${bad ? 'arrow-bad' : 'arrow'})` }),
      svg('text', { x: mid.x, y: mid.y }, `${fmt.rate(e.rps)} rps · ${fmt.percent(e.errorRate)} err`),
      e.mtls ? padlock(mid.x - 5, mid.y + 14) : null,
      svg('title', {}, `${e.from} → ${e.to}: ${e.requests} requests, p99 ${fmt.ms(e.p99Ms)}${e.mtls ? ', mutual TLS' : ', plaintext'}`));
  });
  const drawnNodes = nodes.map((n) => {
    const { x, y } = at.get(n.id);
    const gateway = n.role === 'gateway';
    const classes = ['node', n.healthy ? null : 'bad', gateway ? 'entry' : null].filter(Boolean).join(' ');
    return svg('g', { class: classes, 'data-node': n.id, 'data-role': n.role || 'sidecar', transform: `translate(${x},${y})` },
      svg('rect', { width: NODE.w, height: NODE.h, rx: 8 }),
      svg('text', { x: NODE.w / 2, y: NODE.h / 2 - 6 }, gateway ? `⇥ ${n.name}` : n.name),
      svg('text', { class: 'ns', x: NODE.w / 2, y: NODE.h / 2 + 11 }, gateway ? `${n.namespace} · gateway (entry)` : n.namespace),
      gateway ? svg('title', {}, `${n.name}: the ingress gateway, where external clients enter the mesh`) : null);
  });
  const graph = svg('svg', { id: 'topology-graph', viewBox: `0 0 ${width} ${height + below}`, height: height + below },
    svg('defs', {}, marker('arrow'), marker('arrow-bad')), drawnEdges, drawnNodes);
  root.replaceChildren(el('h2', {}, 'Topology'),
    el('p', { class: 'muted' }, 'Who calls whom, as the callers\' sidecars saw it over the last 30 s; the ingress gateway (⇥, leftmost) is where external clients enter; red: more than 5% errors; a padlock under an arrow: mutual TLS (both services\' sidecars hold workload certificates).'), graph);
}

// ---------------------------------------------------------------- policies

const BREAKER_RANK = { open: 0, 'half-open': 1, closed: 2 };

// Open breakers first, then by caller, destination and endpoint.
function byBreakerState(a, b) {
  const key = (x) => [BREAKER_RANK[x.state] ?? 3, x.service, x.instance, x.destination, x.address].join('\u0000');
  return key(a).localeCompare(key(b));
}

async function loadPolicies(root) {
  const p = await getJson(API.policies);
  const byKind = new Map();
  for (const r of p.resources) append(byKind, r.kind, r);
  const resources = [...byKind.entries()].sort(([a], [b]) => a.localeCompare(b)).map(([kind, list]) => [
    el('h3', {}, kind),
    table([
      { title: 'Name', cell: (r) => r.name },
      { title: 'Namespace', cell: (r) => r.namespace },
      { title: 'Target', cell: (r) => r.target || '–' },
      { title: 'Summary', cell: (r) => r.summary || '' },
      { title: 'Revision', num: true, cell: (r) => r.revision ?? '–' },
      { title: 'Changed', cell: (r) => (r.atMs ? fmt.ago(r.atMs) : '–') },
    ], list, (r) => ({ 'data-resource': `${r.kind}/${r.namespace}/${r.name}` })),
  ]);
  root.replaceChildren(
    el('h2', {}, 'Policies ', el('span', { class: 'muted', 'data-revision': p.revision }, `revision ${p.revision}`)),
    el('h3', {}, 'Circuit breakers'),
    p.breakers.length ? table([
      { title: 'Caller', cell: (b) => b.service },
      { title: 'Caller instance', cell: (b) => el('span', { class: 'muted' }, b.instance) },
      { title: 'Destination', cell: (b) => b.destination },
      { title: 'Endpoint', cell: (b) => b.address },
      { title: 'Policy', cell: (b) => b.policy },
      { title: 'State', cell: (b) => el('span', { class: 'badge', 'data-breaker-state': b.state }, b.state) },
      { title: 'Since', cell: (b) => (b.sinceMs ? fmt.ago(b.sinceMs) : '–') },
    ], p.breakers.slice().sort(byBreakerState), (b) => ({
      'data-breaker': `${b.service}/${b.instance}->${b.destination}@${b.address}`,
      class: b.state === 'closed' ? null : 'bad',
    })) : empty('No circuit breakers in use.'),
    el('h3', {}, 'Rate limits'),
    p.rateLimits.length ? table([
      { title: 'Service', cell: (r) => (r.namespace === 'default' ? r.service : `${r.service}.${r.namespace}`) },
      { title: 'Policy', cell: (r) => r.policy },
      { title: 'Refused/s', num: true, cell: (r) => fmt.rate(r.refusedPerSecond) },
      { title: 'Refused (5 min)', num: true, cell: (r) => r.refused },
    ], p.rateLimits, (r) => ({ 'data-rate-limit': r.policy, class: r.refusedPerSecond > 0 ? 'bad' : null }))
      : empty('No rate limits in use.'),
    el('h3', {}, 'Resources'),
    resources.length ? el('div', {}, resources) : empty('No resources applied.'),
    el('h3', {}, 'History'),
    p.history.length ? table([
      { title: 'Revision', num: true, cell: (h) => h.revision },
      { title: 'When', cell: (h) => fmt.ago(h.atMs) },
      { title: 'Who', cell: (h) => h.actor },
      { title: 'What changed', cell: (h) => (h.changes || []).join(', ') },
    ], p.history, (h) => ({ 'data-history': h.revision })) : empty('No changes yet.'),
  );
}

// ---------------------------------------------------------------- traces

function fillServiceFilter(services) {
  const select = document.getElementById('trace-service');
  const known = new Set([...select.options].map((o) => o.value));
  for (const s of services) if (!known.has(s.name)) select.append(el('option', { value: s.name }, s.name));
}

async function loadTraces() {
  const service = document.getElementById('trace-service').value;
  const minDuration = document.getElementById('trace-min').value.trim();
  const query = new URLSearchParams({ limit: '50' });
  if (service) query.set('service', service);
  if (minDuration) query.set('minDuration', minDuration);
  const [traces, services] = await Promise.all([
    getJson(`${API.traces}?${query}`),
    document.getElementById('trace-service').options.length > 1 ? null : getJson(API.services).catch(() => []),
  ]);
  if (services) fillServiceFilter(services);
  const list = document.getElementById('trace-list');
  list.replaceChildren(el('p', { class: 'muted' }, 'Newest first; click a trace for its waterfall.'), traces.length ? table([
    { title: 'Trace', cell: (t) => el('code', {}, t.traceId.slice(0, 12)) },
    { title: 'Root', cell: (t) => `${t.rootService}: ${t.rootName}` },
    { title: 'Started', cell: (t) => fmt.time(t.startUnixNano / 1e6) },
    { title: 'Duration', num: true, cell: (t) => fmt.micros(t.durationMicros) },
    { title: 'Spans', num: true, cell: (t) => t.spanCount },
    { title: 'Services', cell: (t) => t.services.join(', ') },
  ], traces, (t) => ({
    'data-trace-id': t.traceId, 'data-services': t.services.join(' '),
    class: ['clickable', t.error ? 'bad' : '', t.traceId === state.selectedTrace ? 'selected' : ''].join(' ').trim(),
    onclick: () => { location.hash = `#traces/${t.traceId}`; },
  })) : empty('No traces match.'));
  if (state.selectedTrace) await loadWaterfall(state.selectedTrace);
}

// A stable colour per service name: FNV-1a of the name picks one of 64
// hues spaced by the golden angle, so that a few names rarely look alike.
function serviceColor(name) {
  let hash = 2166136261;
  for (const c of name) hash = Math.imul(hash ^ c.codePointAt(0), 16777619) >>> 0;
  return `hsl(${Math.round((hash % 64) * 137.508) % 360} 55% 45%)`;
}

// Spans in tree order (children by start time), each with its depth.
function treeOrder(spans) {
  const ids = new Set(spans.map((s) => s.spanId));
  const children = new Map();
  const roots = [];
  for (const s of spans) {
    if (s.parentSpanId && ids.has(s.parentSpanId)) {
      append(children, s.parentSpanId, s);
    } else roots.push(s);
  }
  const byStart = (a, b) => a.startUnixNano - b.startUnixNano;
  const out = [];
  const visit = (span, depth) => {
    out.push({ span, depth });
    for (const child of (children.get(span.spanId) || []).sort(byStart)) visit(child, depth + 1);
  };
  roots.sort(byStart).forEach((r) => visit(r, 0));
  return out;
}

async function loadWaterfall(traceId) {
  const holder = document.getElementById('waterfall');
  let trace;
  try {
    trace = await getJson(`${API.traces}/${traceId}`);
  } catch (err) {
    holder.replaceChildren(empty(`Trace ${traceId} is gone (${err.message}).`));
    return;
  }
  const start = Math.min(...trace.spans.map((s) => s.startUnixNano));
  const end = Math.max(...trace.spans.map((s) => s.endUnixNano));
  const total = Math.max(end - start, 1);
  const rows = treeOrder(trace.spans).map(({ span, depth }) => {
    const bar = el('div', { class: 'bar', title: `${span.name} ${fmt.micros(span.durationMicros)}` });
    bar.style.left = `${((span.startUnixNano - start) / total) * 100}%`;
    bar.style.width = `${((span.endUnixNano - span.startUnixNano) / total) * 100}%`;
    if (span.status.code !== 'error') bar.style.background = serviceColor(span.service);
    const label = el('div', { class: 'label' }, el('span', { class: 'service' }, span.service), `${span.name} `, el('span', { class: 'muted' }, span.kind));
    label.style.paddingLeft = `${depth * 16}px`;
    const code = span.attributes && span.attributes['http.response.status_code'];
    const failed = span.status.code === 'error';
    return el('div', {
      class: failed ? 'span-row error' : 'span-row', 'data-span-id': span.spanId,
      'data-span-service': span.service, 'data-depth': depth,
    }, label, el('div', { class: 'track' }, bar), el('div', { class: 'num' }, fmt.micros(span.durationMicros)),
    el('div', { class: 'status' }, code ?? span.status.code));
  });
  holder.replaceChildren(
    el('h3', { 'data-trace-id': traceId }, `Trace ${traceId} · ${trace.spans.length} spans · ${fmt.micros(total / 1000)}`),
    el('div', { class: 'span-row muted' }, el('div', {}, 'span'), el('div', {}, 'timeline'), el('div', { class: 'num' }, 'duration'), el('div', {}, 'status')),
    ...rows);
}

// ---------------------------------------------------------------- refresh and live updates

const VIEWS = {
  services: loadServices,
  topology: loadTopology,
  policies: loadPolicies,
  traces: loadTraces,
};

// Loads the current view; a refresh asked for meanwhile runs right after.
async function refresh() {
  if (state.refreshing) { state.again = true; return; }
  state.refreshing = true;
  const error = document.getElementById('error');
  try {
    do {
      state.again = false;
      const view = state.view;
      await VIEWS[view](document.getElementById(`view-${view}`));
      document.body.dataset.loaded = view;
    } while (state.again);
    error.hidden = true;
    document.getElementById('updated').textContent = `updated ${fmt.time(Date.now())}`;
  } catch (err) {
    error.textContent = `Cannot load the ${state.view} view: ${err.message}`;
    error.hidden = false;
  } finally {
    state.refreshing = false;
  }
}

// `#VIEW`, or `#traces/TRACE_ID` for one trace's waterfall.
function showView() {
  const [wanted, traceId] = location.hash.slice(1).split('/');
  state.view = Object.hasOwn(VIEWS, wanted) ? wanted : 'services';
  state.selectedTrace = state.view === 'traces' && traceId ? traceId : null;
  if (!state.selectedTrace) document.getElementById('waterfall').replaceChildren();
  for (const section of document.querySelectorAll('section[data-view]')) section.hidden = section.dataset.view !== state.view;
  for (const tab of document.querySelectorAll('[data-view-tab]')) tab.classList.toggle('active', tab.dataset.viewTab === state.view);
  delete document.body.dataset.loaded;
  refresh();
}

function setLive(mode, text) {
  const live = document.getElementById('live');
  live.dataset.live = mode;
  live.textContent = text;
}

function startPolling() {
  if (state.pollTimer) return;
  setLive('polling', `polling every ${POLL_MS / 1000} s`);
  state.pollTimer = setInterval(refresh, POLL_MS);
}

function stopPolling() {
  clearInterval(state.pollTimer);
  state.pollTimer = null;
}

// Server-sent events; EventSource reconnects by itself, and the page polls
// while it is disconnected.
function subscribe() {
  if (!window.EventSource) { startPolling(); return; }
  const events = new EventSource(API.events);
  events.addEventListener('open', () => { stopPolling(); setLive('sse', 'live'); });
  events.addEventListener('update', () => refresh());
  events.addEventListener('error', () => startPolling());
}

document.getElementById('trace-filter').addEventListener('submit', (event) => {
  event.preventDefault();
  if (location.hash === '#traces') refresh();
  else location.hash = '#traces'; // closes the open trace
});
document.getElementById('trace-service').addEventListener('change', () => {
  document.getElementById('trace-filter').requestSubmit();
});
window.addEventListener('hashchange', showView);
showView();
subscribe();
