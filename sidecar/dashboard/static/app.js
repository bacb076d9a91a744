// The sidecar dashboard: plain JavaScript, no build, no other origin. It reads the admin JSON
// API (docs/dashboard.md) with the bearer token kept in sessionStorage, and polls the open tab.
"use strict";

const TOKEN_KEY = "sidecar.admin.token";
const POLL_MS = 1500;
const $ = (id) => document.getElementById(id);
const state = { tab: "routes", scope: "admin", timer: null, jobStatus: "any", series: null, busy: false };

class AuthError extends Error {}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  const given = token();
  if (given) headers.Authorization = "Bearer " + given;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body) });
  let data = {};
  const text = await response.text();
  if (text) { try { data = JSON.parse(text); } catch (_) { data = { detail: text }; } }
  if (response.status === 401) throw new AuthError(data.detail || "unauthorized");
  if (!response.ok) {
    const why = data.detail || data.error || response.statusText;
    throw new Error(`${method} ${path}: ${response.status} ${why}`);
  }
  return data;
}

// -- DOM helpers: elements built from data, never HTML strings ---------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") el.className = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function table(el, head, rows) {
  el.replaceChildren(
    h("thead", {}, h("tr", {}, head.map((c) => h("th", { class: c.num ? "num" : "" }, c.label || c)))),
    h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: head.length, class: "hint" }, "none"))));
}

function td(value, cls) { return h("td", { class: cls }, value); }
function num(value, cls) { return h("td", { class: cls ? `num ${cls}` : "num" }, value); }

const fmt = {
  n(x) { return x === null || x === undefined ? "–" : (Math.round(x * 10) / 10).toLocaleString(); },
  ms(s) { return s === null || s === undefined ? "–" : s < 1 ? `${(s * 1000).toFixed(s < 0.01 ? 1 : 0)} ms` : `${s.toFixed(2)} s`; },
  pct(x) { return x === null || x === undefined ? "–" : `${(x * 100).toFixed(x < 0.1 ? 1 : 0)}%`; },
  bytes(b) {
    if (b === null || b === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (b >= 1024 && i < units.length - 1) { b /= 1024; i++; }
    return `${i ? b.toFixed(1) : b} ${units[i]}`;
  },
  time(t) { return t ? new Date(t * (t > 1e11 ? 1 : 1000)).toLocaleTimeString() : "–"; },
};

function actionButton(label, attrs, run) {
  const button = h("button", { type: "button", class: "needs-admin", ...attrs }, label);
  button.disabled = state.scope !== "admin";
  if (button.disabled) button.title = "a read token cannot act";
  button.addEventListener("click", async () => {
    button.disabled = true;
    try { await run(); showError(null); } catch (e) { handle(e, true); }
    finally { button.disabled = state.scope !== "admin"; refresh(); }
  });
  return button;
}

// -- sparklines: an inline SVG polyline, with the target as a dashed line ------------------------

function spark(values, target) {
  const svgNS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNS, "svg");
  const width = 120, height = 32;
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("class", "spark");
  const known = values.filter((v) => v !== null && v !== undefined);
  const top = Math.max(...known, target || 0, 1e-9) * 1.15;
  const y = (v) => (height - 1 - (v / top) * (height - 2)).toFixed(1);
  const step = values.length > 1 ? width / (values.length - 1) : width;
  if (known.length) {
    const line = document.createElementNS(svgNS, "polyline");
    // A second without a figure (no request: no ratio) is skipped, not drawn as zero.
    line.setAttribute("points", values.map((v, i) => (v === null || v === undefined ? null : `${(i * step).toFixed(1)},${y(v)}`))
      .filter((p) => p !== null).join(" "));
    svg.append(line);
  }
  if (target) {
    const mark = document.createElementNS(svgNS, "line");
    mark.setAttribute("x1", "0"); mark.setAttribute("x2", String(width));
    mark.setAttribute("y1", y(target)); mark.setAttribute("y2", y(target));
    svg.append(mark);
  }
  return svg;
}

function figure(label, value, series, target, over) {
  return h("div", { class: "figure" + (over ? " over" : "") },
    h("div", { class: "label" }, label), h("div", { class: "value" }, value), spark(series, target));
}

function mean(values) {
  const known = values.filter((v) => v !== null && v !== undefined);
  return known.length ? known.reduce((a, b) => a + b, 0) / known.length : null;
}

// -- the tabs ------------------------------------------------------------------------------------

async function loadSeries() {
  state.series = await api("GET", "/admin/series?seconds=120");
  return state.series;
}

async function showRoutes() {
  const data = await loadSeries();
  $("span").textContent = data.seconds;
  $("routes").replaceChildren(...data.routes.map((route) => {
    const s = route.series;
    const rps = mean(s.rps.slice(-5)) || 0;
    const p95 = s.p95.slice(-1)[0];
    const errors = route.window.error_ratio;
    return h("article", { class: "card", "data-route": route.name, "data-rps": rps.toFixed(2),
                          "data-requests": route.window.requests },
      h("h3", {}, route.name),
      h("div", { class: "meta" }, `→ ${route.upstream}`, route.policies.length ? ` · ${route.policies.join(", ")}` : ""),
      h("div", { class: "figures" },
        figure("requests/s (5 s)", h("span", { class: "rps" }, fmt.n(rps)), s.rps),
        figure(`p95 (SLA ${fmt.ms(route.sla.latency_p95)})`,
               `${fmt.ms(p95)} · p50 ${fmt.ms(s.p50.slice(-1)[0])} · p99 ${fmt.ms(s.p99.slice(-1)[0])}`,
               s.p95, route.sla.latency_p95, p95 > route.sla.latency_p95),
        figure(`errors (SLA ${fmt.pct(route.sla.error_ratio)})`, fmt.pct(errors), s.errors,
               route.sla.error_ratio, errors > route.sla.error_ratio),
        figure("cache hits", fmt.pct(route.window.hit_ratio), s.hit_ratio)));
  }));
}

async function showUpstreams() {
  const [breakers, stats] = await Promise.all([api("GET", "/admin/breakers"), api("GET", "/admin/stats")]);
  table($("breakers"), ["breaker", "state", "scope", "failures in a row", "transitions", { label: "half-open in", num: true }, ""],
    breakers.breakers.map((b) => h("tr", { "data-breaker": b.name, "data-state": b.state },
      td(b.name), td(b.state.replace("_", "-"), "state-" + b.state), td(b.scope),
      num(`${b.consecutive_failures} / ${b.failures_to_open}`), num(b.transitions),
      num(b.state === "open" ? `${b.retry_after_s.toFixed(1)} s` : "–"),
      h("td", {}, actionButton("Reset", { "data-reset": b.name },
        () => api("POST", `/admin/breakers/${encodeURIComponent(b.name)}/reset`))))));
  const calls = {};
  for (const row of stats.requests.upstreams) {
    const entry = calls[row.upstream] || (calls[row.upstream] = { total: 0, failed: 0 });
    entry.total += row.count;
    if (row.status === "error" || String(row.status).startsWith("5")) entry.failed += row.count;
  }
  const rows = [];
  for (const [name, pool] of Object.entries(stats.upstreams)) {
    const c = calls[name] || { total: 0, failed: 0 };
    const conns = (p) => `${p.open ?? "–"} / ${p.idle ?? "–"} / ${p.waiting ?? "–"}`;
    rows.push(h("tr", { "data-upstream": name }, td(name), td(pool.servers ? `${pool.servers.length} servers (${pool.balance})` : "one server"),
      td("–"), num(conns(pool)), num("–"), num(c.total), num(c.failed, c.failed ? "bad" : "")));
    for (const server of pool.servers || []) {
      rows.push(h("tr", {}, td(""), td(server.url), td(server.healthy ? "healthy" : "out", server.healthy ? "state-closed" : "state-open"),
        num(conns(server)), num(server.ejections), num(""), num("")));
    }
  }
  table($("pools"), ["upstream", "servers", "health", { label: "open / idle / waiting", num: true },
    { label: "ejections", num: true }, { label: "calls", num: true }, { label: "failed", num: true }], rows);
}

function flatten(prefix, value, out) {
  if (value && typeof value === "object" && !Array.isArray(value)) {
    for (const [k, v] of Object.entries(value)) flatten(prefix ? `${prefix}.${k}` : k, v, out);
  } else {
    out.push([prefix, value]);
  }
  return out;
}

async function showCache() {
  const [stats, data] = await Promise.all([api("GET", "/admin/stats"), loadSeries()]);
  const { requests, ...layers } = stats.cache;
  const rows = flatten("", layers, []).map(([k, v]) =>
    h("tr", {}, td(k), num(/bytes|quota|used_memory/.test(k) && typeof v === "number" ? fmt.bytes(v) : Array.isArray(v) ? v.join(", ") : String(v))));
  table($("layers"), ["figure", { label: "value", num: true }], rows);
  const lookups = Array.isArray(requests) ? requests : [];
  const columns = lookups.length ? Object.keys(lookups[0]) : ["route", "count"];
  table($("cache-lookups"), columns.map((c) => (c === "count" ? { label: c, num: true } : c)),
    lookups.map((row) => h("tr", {}, columns.map((c) => (c === "count" ? num(row[c]) : td(row[c]))))));
  table($("cache-routes"), ["route", { label: "hit ratio", num: true }, { label: "requests", num: true }, "hits"],
    data.routes.filter((r) => r.policies.includes("cache")).map((r) =>
      h("tr", { "data-route": r.name }, td(r.name), num(fmt.pct(r.window.hit_ratio)), num(r.window.requests),
        h("td", {}, spark(r.series.hit_ratio)))));
}

async function showTraffic() {
  const [data, stats] = await Promise.all([loadSeries(), api("GET", "/admin/stats")]);
  $("traffic-span").textContent = data.seconds;
  table($("traffic"), ["route", "policies", { label: "coalesced", num: true }, { label: "rate-limited", num: true }, "refusals/s"],
    data.routes.map((r) => h("tr", { "data-route": r.name }, td(r.name),
      td(r.policies.filter((p) => ["dedup", "rate_limit", "idempotency"].includes(p)).join(", ") || "–"),
      num(r.window.coalesced), num(r.window.limited), h("td", {}, spark(r.series.limited)))));
  table($("dedup"), ["figure", { label: "value", num: true }],
    flatten("", stats.dedup, []).map(([k, v]) => h("tr", {}, td(k), num(String(v)))));
}

async function showJobs() {
  const status = $("job-status").value;
  const [queues, jobs] = await Promise.all([
    api("GET", "/admin/queues").catch((e) => ({ queues: [], error: e.message })),
    api("GET", `/admin/jobs?status=${encodeURIComponent(status)}&limit=50`)]);
  table($("queues"), ["queue", "state", { label: "queued", num: true }, { label: "running", num: true },
    { label: "concurrency", num: true }, "rate", ""],
    queues.queues.map((q) => h("tr", { "data-queue": q.name }, td(q.name), td(q.paused ? "paused" : "active", q.paused ? "state-half_open" : "state-closed"),
      num(q.queued), num(q.running), num(q.concurrency), td(q.rate || "–"),
      h("td", {}, q.paused
        ? actionButton("Resume", {}, () => api("POST", `/admin/queues/${encodeURIComponent(q.name)}/resume`))
        : actionButton("Pause", {}, () => api("POST", `/admin/queues/${encodeURIComponent(q.name)}/pause`))))));
  table($("jobs"), ["job", "status", "progress", { label: "attempts", num: true }, "route", "queued", "error", ""],
    jobs.jobs.map((job) => {
      const pct = Math.round(job.progress || 0);
      const active = job.status === "queued" || job.status === "running";
      return h("tr", { "data-job": job.id, "data-status": job.status, "data-progress": pct },
        h("td", {}, h("a", { class: "job", onclick: () => showJob(job.id) }, job.id)),
        td(job.status, "status-" + job.status),
        h("td", {}, h("progress", { max: 100, value: pct }), ` ${pct}%`),
        num(job.attempts), td(job.route || "–"), td(fmt.time(job.queued_at || job.created)),
        td(job.error_detail || job.error || "", "err"),
        h("td", {}, active
          ? actionButton("Cancel", { "data-cancel": job.id }, () => api("POST", `/admin/jobs/${encodeURIComponent(job.id)}/cancel`))
          : job.status === "failed" || job.status === "cancelled"
            ? actionButton("Retry", { "data-retry": job.id }, () => api("POST", `/admin/jobs/${encodeURIComponent(job.id)}/retry`))
            : null));
    }));
  if (state.jobDetail) await showJob(state.jobDetail);
}

async function showJob(id) {
  state.jobDetail = id;
  const job = await api("GET", `/admin/jobs/${encodeURIComponent(id)}`);
  $("job-detail-id").textContent = id;
  $("job-detail-body").textContent = JSON.stringify(job, null, 2);
  $("job-detail").hidden = false;
}

async function showConfig() {
  const data = await api("GET", "/admin/config");
  table($("reloads"), ["file", { label: "ok", num: true }, { label: "rejected", num: true }, "last error"],
    [h("tr", {}, td(data.file), num(data.reloads.ok), num(data.reloads.error), td(data.last_reload_error || "none", data.last_reload_error ? "err" : ""))]);
  const text = JSON.stringify(data.config, null, 2);
  if ($("config").textContent !== text) $("config").textContent = text;
}

const TABS = { routes: showRoutes, upstreams: showUpstreams, cache: showCache, traffic: showTraffic, jobs: showJobs, config: showConfig };

// -- errors, the token, polling -------------------------------------------------------------------

function showError(message, sticky) {
  state.sticky = Boolean(message && sticky);
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function handle(error, sticky) {
  if (error instanceof AuthError) {
    askToken(token() ? `The token was refused (401 Unauthorized): ${error.message}` : null);
  } else {
    showError(error.message || String(error), sticky);
  }
}

function askToken(problem) {
  clearTimeout(state.timer);
  state.timer = null;
  $("main").hidden = true;
  $("tabs").hidden = true;
  $("forget").hidden = !token();
  $("login").hidden = false;
  $("login-error").textContent = problem || "";
  $("token").focus();
}

async function refresh() {
  if (state.busy) { state.again = true; return; }
  clearTimeout(state.timer);
  state.busy = true;
  let refused = false;
  try {
    await TABS[state.tab]();
    if (!state.sticky) showError(null);
  } catch (error) {
    refused = error instanceof AuthError;
    handle(error);
  } finally {
    state.busy = false;
  }
  if (refused) return;
  if (state.again) { state.again = false; refresh(); return; }
  if (!$("main").hidden && !document.hidden) state.timer = setTimeout(refresh, POLL_MS);
}

async function open() {
  try {
    const data = await loadSeries();
    state.scope = data.caller.scope;
  } catch (error) {
    if (error instanceof AuthError) {
      askToken(token() ? `The token was refused (401 Unauthorized): ${error.message}` : null);
    } else {
      showError(error.message);
    }
    return;
  }
  document.body.classList.toggle("read-only", state.scope !== "admin");
  const caller = state.series.caller;
  $("whoami").textContent = caller.name ? `token ${caller.name} (${caller.scope})` : "no token configured";
  $("forget").hidden = !token();
  $("login").hidden = true;
  $("main").hidden = false;
  $("tabs").hidden = false;
  for (const button of document.querySelectorAll(".needs-admin")) button.disabled = state.scope !== "admin";
  refresh();
}

function select(tab) {
  state.tab = tab;
  for (const button of document.querySelectorAll("#tabs button")) {
    button.setAttribute("aria-selected", String(button.dataset.tab === tab));
  }
  for (const panel of document.querySelectorAll("[data-panel]")) panel.hidden = panel.dataset.panel !== tab;
  if (location.hash !== "#" + tab) history.replaceState(null, "", "#" + tab);
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("#tabs button")) {
    button.addEventListener("click", () => select(button.dataset.tab));
  }
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    open();
  });
  $("forget").addEventListener("click", () => { sessionStorage.removeItem(TOKEN_KEY); askToken(null); });
  $("purge").addEventListener("submit", async (event) => {
    event.preventDefault();
    const kind = $("purge-kind").value;
    try {
      const result = await api("POST", "/admin/cache/purge", { [kind]: $("purge-value").value });
      $("purge-result").textContent = `Purged ${kind} ${$("purge-value").value}: ${JSON.stringify(result)}`;
      $("purge-result").className = "done";
    } catch (error) {
      $("purge-result").textContent = error.message;
      $("purge-result").className = "bad";
      handle(error, true);
    }
  });
  $("error").addEventListener("click", () => showError(null));
  $("job-status").addEventListener("change", refresh);
  $("job-detail-close").addEventListener("click", () => { state.jobDetail = null; $("job-detail").hidden = true; });
  document.addEventListener("visibilitychange", () => { if (!document.hidden && !$("main").hidden) refresh(); });
  const wanted = location.hash.slice(1);
  if (TABS[wanted]) {
    state.tab = wanted;
    for (const button of document.querySelectorAll("#tabs button")) button.setAttribute("aria-selected", String(button.dataset.tab === wanted));
    for (const panel of document.querySelectorAll("[data-panel]")) panel.hidden = panel.dataset.panel !== wanted;
  }
  open();
});
