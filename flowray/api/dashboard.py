"""The merchant dashboard: one self-contained page, no build step, no CDN.

It calls the same public API as any client, so it needs nothing the API does not give.
The page's own address carries the view, so it can be bookmarked or shared and loads at
once when a site is given: the query holds the range
(``/?site=&start=&end=&interval=&tz=``), the fragment the filters and the breakdown
switch (``#filter=path:is:/pricing&filter=source:is:google.com&tech=browser``). Every
row of a top-10 table is a plain link to the fragment that adds its filter, every
filter chip a link to the fragment without it; the page reloads when the fragment
changes. Times in the form are wall-clock times in the chosen zone, which is how the
API reads a time without an offset; a time in the address with an offset (or epoch
milliseconds) is shown as the same instant on that zone's wall clock.

The page reads the insight routes (``timeseries``, ``totals`` with the previous period,
``breakdown``); where the app serves none (404 or 501), it falls back to the traffic
series, drawn as page views, and says that visitors and tables are not available.

When the API answers 401 or 403 the page asks for a token and keeps it in this
browser's localStorage, sending it as ``Authorization: Bearer``. After each drawing the
chart carries ``data-points``, ``data-total`` (page views), ``data-provisional`` and
``data-series``, a table under it the chart's numbers, and each table row its
``data-value``; tests and scripts read them.
"""

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

# The page is data: its script and style are long, but each function in it is short.
DASHBOARD_HTML = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>flowray</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:1.5rem 2rem;color:#222;max-width:1140px}
[hidden]{display:none !important}
h1{font-size:1.4rem;margin:0 0 1rem}
h2{font-size:1rem;margin:0 0 .4rem}
form{display:flex;flex-wrap:wrap;gap:.6rem 1rem;align-items:end}
label{display:flex;flex-direction:column;font-size:.8rem;color:#555}
input,select,button{font:inherit;padding:.25rem .4rem;margin-top:.15rem}
button{cursor:pointer}
a{color:#1f4f9c}
a:focus-visible,button:focus-visible{outline:2px solid #e8743b;outline-offset:1px}
#msg{color:#a00;margin-top:.6rem;min-height:1.2em}
#auth{margin-top:.6rem;padding:.6rem;border:1px solid #e0b000;background:#fff8e0}
#filters{display:flex;flex-wrap:wrap;gap:.4rem;align-items:center;min-height:1.7rem;
font-size:.85rem;color:#555}
.chip{display:inline-flex;align-items:center;gap:.2rem;background:#eef1f6;color:#222;
border:1px solid #c9d2e0;border-radius:1rem;padding:.05rem .2rem .05rem .65rem}
.chip a{text-decoration:none;font-weight:bold;padding:0 .35rem;border-radius:1rem}
.chip a:hover{background:#dbe2ee}
#totals{display:flex;flex-wrap:wrap;gap:1rem 2.5rem;margin-top:.6rem}
.metric{font-size:.8rem;color:#555}
.metric b{display:block;font-size:1.6rem;color:#222}
.change{font-size:.8rem;color:#666}
.change.up{color:#17692b}
.change.down{color:#a3261b}
#chart{display:block;width:100%;height:360px;margin-top:.8rem}
#legend,#facts{font-size:.8rem;color:#555;margin-top:.3rem}
#facts{display:flex;flex-wrap:wrap;gap:.3rem 1.5rem}
#facts b{color:#222}
.swatch{display:inline-block;width:.8rem;height:.8rem;margin:0 .3rem 0 1rem;
vertical-align:middle}
details{font-size:.8rem;margin-top:.4rem}
#tables{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));
gap:1.2rem 2rem;margin-top:1.2rem}
table.top{width:100%;border-collapse:collapse;font-size:.85rem}
.top th,.top td{padding:.25rem .4rem;text-align:right;font-weight:normal}
.top thead th{color:#555;border-bottom:1px solid #ccc;font-weight:600}
.top th:first-child{text-align:left}
.top tbody th{max-width:16rem;overflow:hidden;text-overflow:ellipsis;white-space:nowrap;
background-repeat:no-repeat;background-image:linear-gradient(#e6ecf5,#e6ecf5)}
.top tbody th a{color:inherit;text-decoration:none;display:block}
.top tbody tr{cursor:pointer}
.top tbody tr:hover,.top tbody tr:focus-within{background:#f4f6fa}
.top tbody tr:hover a,.top tbody tr:focus-within a{text-decoration:underline}
.top .empty td{text-align:left;color:#777;font-style:italic;cursor:default}
.switch{font-size:.8rem;margin:0 0 .3rem}
.switch a{margin-right:.6rem}
.switch a[aria-current]{color:#222;font-weight:bold;text-decoration:none}
.more{font-size:.75rem;color:#777}
</style></head><body>
<h1>flowray traffic</h1>
<form id="f">
<label>Site<input id="site" value="" required placeholder="example.com"></label>
<label>Start<input id="start" type="datetime-local" step="1"></label>
<label>End<input id="end" type="datetime-local" step="1"></label>
<label>Interval<select id="interval"><option>minute</option><option>hour</option>
<option>day</option><option>week</option><option>month</option></select></label>
<label>Zone<input id="tz" value="UTC" size="18"></label>
<button id="show">Show</button></form>
<form id="auth" hidden>
<span id="auth-why">This data needs an access token.</span>
<label>Token<input id="token" type="password" autocomplete="off" size="40"></label>
<button>Use token</button>
<small>Kept in this browser only (localStorage).</small>
</form>
<div id="msg" role="alert"></div>
<div id="filters" role="group" aria-label="Active filters"><span id="no-filters">No
filters: click a row of a table to see only its traffic.</span></div>
<section id="totals" aria-label="Totals over the range">
<div class="metric">Visitors<b id="total-visitors">&ndash;</b>
<span class="change" id="change-visitors"></span></div>
<div class="metric">Pageviews<b id="total-pageviews">&ndash;</b>
<span class="change" id="change-pageviews"></span></div>
<div class="metric">Events<b id="total-events">&ndash;</b>
<span class="change" id="change-events"></span></div>
</section>
<canvas id="chart" width="1100" height="360" role="img"
aria-label="Visitors and pageviews over time; the numbers are in the table below"></canvas>
<div id="legend"><span class="swatch" style="background:#36a"></span>pageviews
<span id="legend-visitors"><span class="swatch" style="background:#e8743b"></span>visitors</span>
<span class="swatch" style="background:#9bc"></span><span class="swatch"
style="background:#f5c6a5;margin-left:0"></span>provisional: not processed yet,
may still change <span id="watermark"></span></div>
<div id="facts"><span>Peak pageviews per bucket <b id="peak">&ndash;</b></span>
<span>Buckets <b id="buckets">&ndash;</b></span>
<span>Provisional buckets <b id="provisional">&ndash;</b></span></div>
<details><summary>The chart's numbers</summary>
<table class="top" id="chart-data"><thead><tr><th scope="col">Bucket</th>
<th scope="col">Visitors</th><th scope="col">Pageviews</th></tr></thead><tbody></tbody>
</table></details>
<p id="no-insights" hidden>This cluster does not serve visitors, filters or top pages
yet: the chart shows every event as a page view.</p>
<div id="tables">
<section><h2 id="h-path">Top pages</h2>
<table class="top" id="by-path" data-by="path" aria-labelledby="h-path"><thead><tr>
<th scope="col">Page</th><th scope="col">Visitors</th><th scope="col">Pageviews</th>
</tr></thead><tbody></tbody></table><div class="more" id="more-path"></div></section>
<section><h2 id="h-source">Top sources</h2>
<table class="top" id="by-source" data-by="source" aria-labelledby="h-source"><thead><tr>
<th scope="col">Source</th><th scope="col">Visitors</th><th scope="col">Pageviews</th>
</tr></thead><tbody></tbody></table><div class="more" id="more-source"></div></section>
<section><h2 id="h-tech">Devices</h2>
<nav class="switch" id="tech-switch" aria-label="Break down by">
<a data-tech="device" href="#">Device</a><a data-tech="browser" href="#">Browser</a><a
data-tech="os" href="#">OS</a></nav>
<table class="top" id="by-tech" data-by="device" aria-labelledby="h-tech"><thead><tr>
<th scope="col">Device</th><th scope="col">Visitors</th><th scope="col">Pageviews</th>
</tr></thead><tbody></tbody></table><div class="more" id="more-tech"></div></section>
</div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "flowray.token";
const REFRESH_MS = 5000;  // live counts make the newest minutes visible within seconds
const METRICS = ["visitors", "pageviews", "events"];
const TECH = ["device", "browser", "os"];
const INTERVALS = ["minute", "hour", "day", "week", "month"];
const TOP = 10;
// Each series' colours: processed, provisional.
const COLOURS = {pageviews: ["#36a", "#9bc"], visitors: ["#e8743b", "#f5c6a5"]};
const LABELS = {path: "Page", source: "Source", device: "Device", browser: "Browser",
  os: "OS"};
const TITLES = {device: "Devices", browser: "Browsers", os: "Operating systems"};
const fmt = (n) => n.toLocaleString("en-US");
let busy = false, again = false;

// An answer that needs a (better) token; `why` is what the token form says.
class NeedsToken extends Error {
  constructor(message, why) { super(message); this.why = why; }
}
// The app serves no such route (it was built without insights).
class NotServed extends Error {}

// The wall-clock time of a Date in an IANA zone, as a datetime-local value.
function wallTime(date, tz) {
  const parts = {};
  new Intl.DateTimeFormat("en-CA", {timeZone: tz, hourCycle: "h23", year: "numeric",
    month: "2-digit", day: "2-digit", hour: "2-digit", minute: "2-digit",
    second: "2-digit"}).formatToParts(date).forEach((p) => { parts[p.type] = p.value; });
  return `${parts.year}-${parts.month}-${parts.day}T${parts.hour}:${parts.minute}:` +
    parts.second;
}
function zoneOr(tz, fallback) {
  try { new Intl.DateTimeFormat("en-CA", {timeZone: tz}); return tz; }
  catch (e) { return fallback; }
}

// A time from the address as a datetime-local value read in zone tz: a date or a wall
// time is kept as it is; an instant (offset, Z or epoch ms) becomes tz's wall time.
function formTime(text, tz) {
  const t = (text || "").trim();
  if (/^\d{4}-\d{2}-\d{2}$/.test(t)) return t + "T00:00";
  if (/^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?$/i.test(t)) {
    return t.replace(/[ t]/, "T");
  }
  const instant = /^\d+$/.test(t) ? new Date(Number(t)) : new Date(t);
  return isNaN(instant) ? "" : wallTime(instant, tz);
}

function fillForm() {
  const q = new URLSearchParams(location.search);
  const tz = zoneOr(q.get("tz") || Intl.DateTimeFormat().resolvedOptions().timeZone ||
    "UTC", "UTC");
  const now = new Date();
  $("tz").value = q.get("tz") || tz;
  $("site").value = q.get("site") || "";
  const interval = q.get("interval");
  if (INTERVALS.includes(interval)) $("interval").value = interval;
  // An input refuses a value it cannot hold (it becomes ""): the default applies then.
  $("start").value = formTime(q.get("start"), tz);
  $("end").value = formTime(q.get("end"), tz);
  if (!$("start").value) $("start").value = wallTime(new Date(now - 864e5), tz);
  if (!$("end").value) $("end").value = wallTime(now, tz);
}

function query() {
  return new URLSearchParams({start: $("start").value, end: $("end").value,
    interval: $("interval").value, tz: $("tz").value.trim()});
}

function shareable() {
  const q = query(); q.set("site", $("site").value.trim());
  history.replaceState(null, "", `${location.pathname}?${q}${location.hash}`);
}

// The view in the address's fragment: the filters (DIM:OP:VALUES) and the switch.
function view() {
  const h = new URLSearchParams(location.hash.slice(1));
  const tech = h.get("tech");
  return {filters: h.getAll("filter").filter((f) => /^[a-z_]+:(is|is_not|contains):/.test(f)),
    tech: TECH.includes(tech) ? tech : "device"};
}
function fragment(v) {
  const h = new URLSearchParams();
  v.filters.forEach((f) => h.append("filter", f));
  if (v.tech !== "device") h.set("tech", v.tech);
  return "#" + h;
}
// The view with "dim is value" added; it replaces an "is" filter on the same dimension.
function filtered(v, dim, value) {
  const kept = v.filters.filter((f) => !f.startsWith(`${dim}:is:`));
  return {...v, filters: [...kept, `${dim}:is:${value}`]};
}
function shown(dim, value) {
  if (value !== "") return value;
  return dim === "source" ? "(direct or none)" : "(none)";
}

function askToken(why) {
  $("auth-why").textContent = why;
  $("auth").hidden = false;
  $("token").focus();
}

// One GET of the API with the saved token; the JSON body, or an error to show.
async function api(site, route, params) {
  const token = localStorage.getItem(TOKEN_KEY);
  const r = await fetch(`/v1/sites/${encodeURIComponent(site)}/${route}?${params}`, {
    headers: token ? {Authorization: "Bearer " + token} : {}});
  let body = {};
  try { body = await r.json(); } catch (e) { body = {}; }
  if (r.status === 401 || r.status === 403) {
    if (r.status === 401 && token) localStorage.removeItem(TOKEN_KEY);
    throw new NeedsToken(body.error || r.statusText, r.status === 401
      ? (token ? "The saved token was not accepted. Enter another token."
               : "This data needs an access token.")
      : `This token may not read ${site}. Enter a token that covers it.`);
  }
  if (r.status === 404 || r.status === 501) throw new NotServed(route);
  if (!r.ok) {
    const retry = r.headers.get("Retry-After");
    throw new Error((body.error || `${r.status} ${r.statusText}`) +
      (retry ? ` (retrying in ${retry} s)` : ""));
  }
  return body;
}

function insightQuery(v, extra) {
  const q = new URLSearchParams({start: $("start").value, end: $("end").value,
    tz: $("tz").value.trim(), ...extra});
  v.filters.forEach((f) => q.append("filter", f));
  return q;
}

// The chart's series, the totals and the three tables, in parallel; the traffic
// series alone (as page views) where the app serves no insights.
async function fetchView(site, v) {
  const interval = $("interval").value;
  const top = (by) => api(site, "breakdown",
    insightQuery(v, {by, metrics: "visitors,pageviews", limit: String(TOP), page: "1"}));
  try {
    const [series, totals, ...tables] = await Promise.all([
      api(site, "timeseries", insightQuery(v, {interval, metrics: METRICS.join(",")})),
      api(site, "totals", insightQuery(v, {metrics: METRICS.join(","),
        compare: "previous_period"})),
      top("path"), top("source"), top(v.tech)]);
    return {series, totals, tables};
  } catch (e) {
    if (!(e instanceof NotServed)) throw e;
  }
  const traffic = await api(site, "traffic", query());
  const points = (traffic.points || []).map((p) => ({t: p.t, pageviews: p.count,
    visitors: null, provisional: p.provisional}));
  return {series: {...traffic, points},
    totals: {metrics: {pageviews: traffic.total}, previous: null, change: null},
    tables: null};
}

async function load() {
  const site = $("site").value.trim();
  if (!site) return;
  if (busy) { again = true; return; }
  busy = true;
  const v = view();
  try {
    const answers = await fetchView(site, v);
    $("msg").textContent = "";
    $("auth").hidden = true;
    render(answers, v);
  } catch (e) {
    $("msg").textContent = e instanceof TypeError
      ? "Could not reach the API: " + e.message : e.message;
    if (e instanceof NeedsToken) askToken(e.why);
  } finally {
    busy = false;
    if (again) { again = false; load(); }
  }
}

function render(answers, v) {
  renderFilters(v);
  renderTotals(answers.totals);
  drawChart(answers.series);
  renderChartData(answers.series.points || []);
  const tables = answers.tables;
  $("no-insights").hidden = tables !== null;
  $("tables").hidden = tables === null;
  $("filters").hidden = tables === null;  // the traffic series takes no filters
  $("legend-visitors").hidden = tables === null;
  if (tables === null) return;
  renderTable("path", "path", tables[0], v);
  renderTable("source", "source", tables[1], v);
  renderTable("tech", v.tech, tables[2], v);
  $("h-tech").textContent = TITLES[v.tech];
  document.querySelectorAll("#tech-switch a").forEach((a) => {
    a.href = fragment({...v, tech: a.dataset.tech});
    if (a.dataset.tech === v.tech) a.setAttribute("aria-current", "true");
    else a.removeAttribute("aria-current");
  });
}

// Each refresh replaces the links of the chips and tables; the one that had keyboard
// focus gets it back, so a keyboard user is not thrown out every few seconds.
function keepFocus(container, replace) {
  const had = container.contains(document.activeElement)
    ? document.activeElement.getAttribute("href") : null;
  replace();
  if (had === null) return;
  const same = [...container.querySelectorAll("a")].find((a) => a.getAttribute("href") === had);
  if (same) same.focus();
}

// A chip per filter; its link goes to the view without it.
function renderFilters(v) {
  const chips = v.filters.map((f) => {
    const [dim, op, ...rest] = f.split(":");
    const text = `${LABELS[dim] || dim} ${op.replace("_", " ")} ` +
      rest.join(":").split("|").map((x) => shown(dim, x)).join(" or ");
    const chip = document.createElement("span");
    chip.className = "chip";
    chip.dataset.filter = f;
    const remove = document.createElement("a");
    remove.href = fragment({...v, filters: v.filters.filter((x) => x !== f)});
    remove.textContent = "\u00d7";
    remove.setAttribute("aria-label", `Remove the filter ${text}`);
    chip.append(text, remove);
    return chip;
  });
  $("no-filters").hidden = chips.length > 0;
  keepFocus($("filters"), () => {
    $("filters").querySelectorAll(".chip").forEach((c) => c.remove());
    $("filters").append(...chips);
  });
}

function renderTotals(totals) {
  const now = totals.metrics || {}, before = totals.previous, change = totals.change;
  for (const m of METRICS) {
    const value = now[m], pct = change ? change[m] : null;
    $(`total-${m}`).textContent = value == null ? "\u2013" : fmt(value);
    const el = $(`change-${m}`);
    el.className = "change" + (pct > 0 ? " up" : pct < 0 ? " down" : "");
    el.dataset.change = pct == null ? "" : String(pct);
    if (pct != null) {
      const sign = pct > 0 ? "+" : pct < 0 ? "\u2212" : "\u00b1";
      el.textContent = `${sign}${Math.abs(pct).toFixed(1)}% vs previous period`;
    } else {
      el.textContent = before && before[m] === 0 && value > 0
        ? "none in previous period" : "";
    }
    if (before && before[m] != null) el.title = `previous period: ${fmt(before[m])}`;
  }
}

// A round step (1, 2 or 5 times a power of ten) giving about `ticks` steps up to max.
function niceStep(max, ticks) {
  const raw = max / ticks, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const norm = raw / mag;
  return (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 5 ? 5 : 10) * mag;
}

// Labels from the API's ISO-8601 bucket starts, which carry the zone's offset.
function tickLabel(t, interval, prev) {
  const date = t.slice(5, 10), time = t.slice(11, 16);
  if (["day", "week"].includes(interval)) return date;
  if (interval === "month") return t.slice(0, 7);
  return !prev || prev.slice(0, 10) !== t.slice(0, 10) ? `${date} ${time}` : time;
}

// The canvas sized to its box and a plot area with its value scale.
function plot(peak) {
  const c = $("chart"), g = c.getContext("2d");
  const ratio = window.devicePixelRatio || 1;
  const cssW = c.clientWidth || 960, cssH = c.clientHeight || 360;
  c.width = Math.round(cssW * ratio); c.height = Math.round(cssH * ratio);
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, cssW, cssH);
  const pad = {left: 56, right: 12, top: 12, bottom: 42};
  const w = cssW - pad.left - pad.right, h = cssH - pad.top - pad.bottom;
  const step = niceStep(Math.max(1, peak), 4);
  const top = Math.max(step, Math.ceil(Math.max(1, peak) / step) * step);
  const y = (n) => pad.top + h - (n / top) * h;
  return {c, g, cssW, cssH, pad, w, h, step, top, y};
}

function drawGrid(p) {
  const g = p.g;
  g.font = "12px system-ui, sans-serif"; g.lineWidth = 1;
  g.textAlign = "right"; g.textBaseline = "middle";
  for (let v = 0; v <= p.top + p.step / 2; v += p.step) {
    g.strokeStyle = v === 0 ? "#888" : "#e4e4e4";
    g.beginPath(); g.moveTo(p.pad.left, Math.round(p.y(v)) + .5);
    g.lineTo(p.pad.left + p.w, Math.round(p.y(v)) + .5); g.stroke();
    g.fillStyle = "#555"; g.fillText(fmt(v), p.pad.left - 6, p.y(v));
  }
}

// One bar over [x0, x1) on whole pixels; a provisional one lighter, with a dashed rim.
function bar(p, x0, x1, value, provisional, metric) {
  if (!value) return;
  const [solid, light] = COLOURS[metric], g = p.g;
  const left = Math.round(x0), width = Math.max(1, Math.round(x1) - left);
  const top = p.y(value), h = p.y(0) - top;
  g.fillStyle = provisional ? light : solid;
  g.fillRect(left, top, width, h);
  if (provisional && width >= 4 && h > 0) {
    g.strokeStyle = solid; g.setLineDash([3, 2]);
    g.strokeRect(left + .5, top + .5, width - 1, h - .5); g.setLineDash([]);
  }
}

function drawTicks(p, points, interval, w) {
  const g = p.g;
  g.textAlign = "center"; g.textBaseline = "top"; g.fillStyle = "#555";
  const every = Math.max(1, Math.ceil(points.length / Math.max(1, Math.floor(p.w / 80))));
  let prev = null;
  for (let i = 0; i < points.length; i += every) {
    const x = p.pad.left + i * w + w / 2;
    g.strokeStyle = "#888"; g.beginPath(); g.moveTo(x, p.y(0)); g.lineTo(x, p.y(0) + 4);
    g.stroke();
    g.fillText(tickLabel(points[i].t, interval, prev), x, p.y(0) + 6);
    prev = points[i].t;
  }
}

// Pageviews and visitors side by side in each bucket; where a bucket is too narrow for
// two bars, visitors are a line over the pageview bars.
function drawChart(body) {
  const points = body.points || [];
  const withVisitors = points.some((q) => q.visitors != null);
  const peak = points.reduce((m, q) => Math.max(m, q.pageviews || 0, q.visitors || 0), 0);
  const p = plot(peak), g = p.g;
  drawGrid(p);
  const w = p.w / Math.max(1, points.length);
  const grouped = withVisitors && w >= 6, gap = w > 3 ? Math.max(1, w * 0.12) : 0;
  points.forEach((q, i) => {
    const x = p.pad.left + i * w, mid = grouped ? x + w / 2 : x + w - gap;
    bar(p, x + gap, mid, q.pageviews, q.provisional, "pageviews");
    if (grouped) bar(p, mid, x + w - gap, q.visitors, q.provisional, "visitors");
  });
  if (withVisitors && !grouped) {
    g.strokeStyle = COLOURS.visitors[0]; g.lineWidth = 2; g.beginPath();
    points.forEach((q, i) => g.lineTo(p.pad.left + (i + .5) * w, p.y(q.visitors || 0)));
    g.stroke(); g.lineWidth = 1;
  }
  drawTicks(p, points, body.interval, w);
  g.fillText(`${body.interval || ""} buckets, ${body.tz || ""}`, p.pad.left + p.w / 2,
    p.cssH - 16);
  g.save(); g.translate(14, p.pad.top + p.h / 2); g.rotate(-Math.PI / 2);
  g.textBaseline = "middle"; g.fillText(withVisitors ? "visitors, pageviews" : "page views",
    0, 0); g.restore();

  const total = points.reduce((n, q) => n + (q.pageviews || 0), 0);
  const provisional = points.filter((q) => q.provisional).length;
  $("peak").textContent = fmt(points.reduce((m, q) => Math.max(m, q.pageviews || 0), 0));
  $("buckets").textContent = fmt(points.length);
  $("provisional").textContent = fmt(provisional);
  $("watermark").textContent = body.watermark ? `(processed up to ${body.watermark})` : "";
  Object.assign(p.c.dataset, {points: points.length, total, provisional,
    series: withVisitors ? "pageviews,visitors" : "pageviews",
    mode: grouped ? "grouped" : withVisitors ? "line" : "bars"});
}

function cell(text, tag) {
  const td = document.createElement(tag || "td");
  td.textContent = text;
  return td;
}

function renderChartData(points) {
  $("chart-data").tBodies[0].replaceChildren(...points.map((q) => {
    const tr = document.createElement("tr");
    tr.dataset.t = q.t;
    tr.append(cell(q.t, "th"), cell(q.visitors == null ? "\u2013" : fmt(q.visitors)),
      cell(fmt(q.pageviews || 0)));
    return tr;
  }));
}

// A row is a link to the view filtered by its value, so it can be focused, opened in a
// new tab and shared; a click anywhere on the row follows it.
function tableRow(dim, row, most, v) {
  const tr = document.createElement("tr"), th = cell("", "th");
  const link = document.createElement("a");
  th.scope = "row";
  link.href = fragment(filtered(v, dim, row.value));
  link.textContent = shown(dim, row.value);
  link.title = `Show only ${LABELS[dim].toLowerCase()} ${link.textContent}`;
  th.append(link);
  th.style.backgroundSize = `${most ? Math.round(100 * row.visitors / most) : 0}% 100%`;
  Object.assign(tr.dataset, {value: row.value, visitors: row.visitors,
    pageviews: row.pageviews});
  tr.append(th, cell(fmt(row.visitors)), cell(fmt(row.pageviews)));
  tr.addEventListener("click", (e) => { if (!e.target.closest("a")) link.click(); });
  return tr;
}

function renderTable(slot, dim, body, v) {
  const table = $(`by-${slot}`), rows = body.results || [];
  table.dataset.by = dim;
  table.tHead.rows[0].cells[0].textContent = LABELS[dim];
  const most = rows.reduce((m, r) => Math.max(m, r.visitors), 0);
  const trs = rows.map((r) => tableRow(dim, r, most, v));
  if (!trs.length) {
    const empty = document.createElement("tr"), td = cell("Nothing in this range");
    empty.className = "empty"; td.colSpan = 3; empty.append(td); trs.push(empty);
  }
  keepFocus(table, () => table.tBodies[0].replaceChildren(...trs));
  $(`more-${slot}`).textContent = body.has_more ? `Top ${TOP} shown; there are more.` : "";
}

$("f").addEventListener("submit", (e) => { e.preventDefault(); shareable(); load(); });
$("auth").addEventListener("submit", (e) => {
  e.preventDefault();
  const token = $("token").value.trim();
  if (!token) return;
  localStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  $("auth").hidden = true;
  load();
});
window.addEventListener("hashchange", load);
fillForm();
renderFilters(view());
load();
setInterval(() => { if (!document.hidden && !busy) load(); }, REFRESH_MS);
</script></body></html>
"""


def router() -> APIRouter:
    """GET / serves the page."""
    api = APIRouter(tags=["dashboard"])

    @api.get("/", summary="Dashboard", response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(DASHBOARD_HTML)

    return api
