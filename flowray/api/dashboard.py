"""The merchant dashboard: one self-contained page, no build step, no CDN.

It calls the same public API as any client, so it needs nothing the API does not give.
The page's own address carries the query (``/?site=&start=&end=&interval=&tz=``), so a
view can be bookmarked or shared, and it loads at once when a site is given. Times in
the form are wall-clock times in the chosen zone, which is how the API reads a time
without an offset; a time in the address with an offset (or epoch milliseconds) is
shown as the same instant on that zone's wall clock.

When the API answers 401 or 403 the page asks for a token and keeps it in this
browser's localStorage, sending it as ``Authorization: Bearer``. After each drawing the
chart carries ``data-points`` and ``data-total``, which tests and scripts read.
"""

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

DASHBOARD_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>flowray</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:1.5rem 2rem;color:#222}
[hidden]{display:none !important}
h1{font-size:1.4rem;margin:0 0 1rem}
form{display:flex;flex-wrap:wrap;gap:.6rem 1rem;align-items:end}
label{display:flex;flex-direction:column;font-size:.8rem;color:#555}
input,select,button{font:inherit;padding:.25rem .4rem;margin-top:.15rem}
button{cursor:pointer}
#msg{color:#a00;margin-top:.6rem;min-height:1.2em}
#auth{margin-top:.6rem;padding:.6rem;border:1px solid #e0b000;background:#fff8e0}
#summary{display:flex;flex-wrap:wrap;gap:1.5rem;margin-top:.8rem}
#summary div{font-size:.8rem;color:#555}
#summary b{display:block;font-size:1.4rem;color:#222}
#chart{display:block;width:100%;max-width:1100px;height:360px;margin-top:.8rem}
#legend{font-size:.8rem;color:#555;margin-top:.3rem}
.swatch{display:inline-block;width:.8rem;height:.8rem;margin:0 .3rem 0 1rem;
vertical-align:middle}
</style></head><body>
<h1>flowray traffic</h1>
<form id="f">
<label>Site<input id="site" value="" required placeholder="example.com"></label>
<label>Start<input id="start" type="datetime-local" step="1"></label>
<label>End<input id="end" type="datetime-local" step="1"></label>
<label>Interval<select id="interval"><option>minute</option><option>hour</option>
<option>day</option></select></label>
<label>Zone<input id="tz" value="UTC" size="18"></label>
<button id="show">Show</button></form>
<form id="auth" hidden>
<span id="auth-why">This data needs an access token.</span>
<label>Token<input id="token" type="password" autocomplete="off" size="40"></label>
<button>Use token</button>
<small>Kept in this browser only (localStorage).</small>
</form>
<div id="msg" role="alert"></div>
<div id="summary">
<div>Page views<b id="total-views">&ndash;</b></div>
<div>Peak per bucket<b id="peak">&ndash;</b></div>
<div>Buckets<b id="buckets">&ndash;</b></div>
<div>Provisional<b id="provisional">&ndash;</b></div>
</div>
<canvas id="chart" width="1100" height="360" aria-label="traffic chart"></canvas>
<div id="legend"><span class="swatch" style="background:#36a"></span>processed
<span class="swatch" style="background:#9bc"></span>provisional: not processed yet,
may still change <span id="watermark"></span></div>
<div id="total"></div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "flowray.token";
const REFRESH_MS = 5000;  // live counts make the newest minutes visible within seconds
const fmt = (n) => n.toLocaleString("en-US");
let busy = false;

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
  if (/^\\d{4}-\\d{2}-\\d{2}$/.test(t)) return t + "T00:00";
  if (/^\\d{4}-\\d{2}-\\d{2}[T ]\\d{2}:\\d{2}(:\\d{2}(\\.\\d+)?)?$/i.test(t)) {
    return t.replace(/[ t]/, "T");
  }
  const instant = /^\\d+$/.test(t) ? new Date(Number(t)) : new Date(t);
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
  if (["minute", "hour", "day"].includes(interval)) $("interval").value = interval;
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
  history.replaceState(null, "", `${location.pathname}?${q}`);
}

function askToken(why) {
  $("auth-why").textContent = why;
  $("auth").hidden = false;
  $("token").focus();
}

async function load() {
  const site = $("site").value.trim();
  if (!site || busy) return;
  busy = true;
  try {
    const token = localStorage.getItem(TOKEN_KEY);
    const r = await fetch(`/v1/sites/${encodeURIComponent(site)}/traffic?${query()}`, {
      headers: token ? {Authorization: "Bearer " + token} : {}});
    let body = {};
    try { body = await r.json(); } catch (e) { body = {}; }
    if (r.status === 401 || r.status === 403) {
      const why = r.status === 401
        ? (token ? "The saved token was not accepted. Enter another token."
                 : "This data needs an access token.")
        : `This token may not read ${site}. Enter a token that covers it.`;
      if (r.status === 401 && token) localStorage.removeItem(TOKEN_KEY);
      $("msg").textContent = body.error || r.statusText;
      askToken(why);
      return;
    }
    if (!r.ok) {
      const retry = r.headers.get("Retry-After");
      $("msg").textContent = (body.error || `${r.status} ${r.statusText}`) +
        (retry ? ` (retrying in ${retry} s)` : "");
      return;
    }
    $("msg").textContent = "";
    $("auth").hidden = true;
    draw(body);
  } catch (e) {
    $("msg").textContent = "Could not reach the API: " + e.message;
  } finally {
    busy = false;
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
  if (interval === "day") return date;
  return !prev || prev.slice(0, 10) !== t.slice(0, 10) ? `${date} ${time}` : time;
}

function draw(body) {
  const points = body.points || [];
  const c = $("chart"), g = c.getContext("2d");
  const ratio = window.devicePixelRatio || 1;
  const cssW = c.clientWidth || 960, cssH = c.clientHeight || 360;
  c.width = Math.round(cssW * ratio); c.height = Math.round(cssH * ratio);
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, cssW, cssH);
  const pad = {left: 56, right: 12, top: 12, bottom: 42};
  const plotW = cssW - pad.left - pad.right, plotH = cssH - pad.top - pad.bottom;
  const counts = points.map((p) => p.count);
  const total = counts.reduce((a, n) => a + n, 0);
  const peak = counts.length ? Math.max(...counts) : 0;
  const step = niceStep(Math.max(1, peak), 4);
  const top = Math.max(step, Math.ceil(Math.max(1, peak) / step) * step);
  const y = (n) => pad.top + plotH - (n / top) * plotH;

  g.font = "12px system-ui, sans-serif"; g.lineWidth = 1;
  g.textAlign = "right"; g.textBaseline = "middle";
  for (let v = 0; v <= top + step / 2; v += step) {
    g.strokeStyle = v === 0 ? "#888" : "#e4e4e4";
    g.beginPath(); g.moveTo(pad.left, Math.round(y(v)) + .5);
    g.lineTo(pad.left + plotW, Math.round(y(v)) + .5); g.stroke();
    g.fillStyle = "#555"; g.fillText(fmt(v), pad.left - 6, y(v));
  }

  const w = plotW / Math.max(1, points.length);
  points.forEach((p, i) => {
    const h = y(0) - y(p.count), x = pad.left + i * w;
    g.fillStyle = p.provisional ? "#9bc" : "#36a";
    g.fillRect(x + (w > 3 ? 0.5 : 0), y(p.count), Math.max(1, w - (w > 3 ? 1 : 0)), h);
    if (p.provisional && w >= 4 && h > 0) {
      g.strokeStyle = "#36a"; g.setLineDash([3, 2]);
      g.strokeRect(x + 1, y(p.count) + .5, Math.max(1, w - 2), h - .5); g.setLineDash([]);
    }
  });

  g.textAlign = "center"; g.textBaseline = "top"; g.fillStyle = "#555";
  const every = Math.max(1, Math.ceil(points.length / Math.max(1, Math.floor(plotW / 80))));
  let prev = null;
  for (let i = 0; i < points.length; i += every) {
    const x = pad.left + i * w + w / 2;
    g.strokeStyle = "#888"; g.beginPath(); g.moveTo(x, y(0)); g.lineTo(x, y(0) + 4);
    g.stroke();
    g.fillText(tickLabel(points[i].t, body.interval, prev), x, y(0) + 6);
    prev = points[i].t;
  }
  g.fillText(`${body.interval || ""} buckets, ${body.tz || ""}`, pad.left + plotW / 2,
    cssH - 16);
  g.save(); g.translate(14, pad.top + plotH / 2); g.rotate(-Math.PI / 2);
  g.textBaseline = "middle"; g.fillText("page views", 0, 0); g.restore();

  const provisional = points.filter((p) => p.provisional).length;
  $("total-views").textContent = fmt(total);
  $("peak").textContent = fmt(peak);
  $("buckets").textContent = fmt(points.length);
  $("provisional").textContent = fmt(provisional);
  $("watermark").textContent = body.watermark ? `(processed up to ${body.watermark})` : "";
  $("total").textContent =
    `${points.length} buckets, ${total} page views, peak ${peak}, ${provisional} provisional`;
  c.dataset.points = points.length; c.dataset.total = total;
  c.dataset.provisional = provisional;
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
fillForm();
load();
setInterval(() => { if (!document.hidden) load(); }, REFRESH_MS);
</script></body></html>
"""


def router() -> APIRouter:
    """GET / serves the page."""
    api = APIRouter(tags=["dashboard"])

    @api.get("/", summary="Dashboard", response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(DASHBOARD_HTML)

    return api
