"""The merchant dashboard: one self-contained page, no build step, no CDN.

It calls the same public API as any client, so it needs nothing the API does not give.
"""

DASHBOARD_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>flowray</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:2rem;color:#222}
label{margin-right:1rem}input,select{margin-left:.3rem}
#chart{border:1px solid #ccc;margin-top:1rem}#msg{color:#a00;margin-top:.5rem}
</style></head><body>
<h1>flowray traffic</h1>
<form id="f">
<label>Site<input id="site" value="" required placeholder="example.com"></label>
<label>Start<input id="start" type="datetime-local"></label>
<label>End<input id="end" type="datetime-local"></label>
<label>Interval<select id="interval"><option>minute</option><option>hour</option>
<option>day</option></select></label>
<label>Zone<input id="tz" value="UTC"></label>
<button>Show</button></form>
<div id="msg"></div>
<canvas id="chart" width="960" height="320"></canvas>
<div id="total"></div>
<script>
const $ = (id) => document.getElementById(id);
const now = new Date(); const day = new Date(now - 864e5);
const iso = (d) => d.toISOString().slice(0, 16);
$("start").value = iso(day); $("end").value = iso(now);
$("tz").value = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
async function load() {
  const site = $("site").value.trim(); if (!site) return;
  const q = new URLSearchParams({start: $("start").value, end: $("end").value,
    interval: $("interval").value, tz: $("tz").value});
  const r = await fetch(`/v1/sites/${encodeURIComponent(site)}/traffic?${q}`, {
    headers: localStorage.token ? {Authorization: "Bearer " + localStorage.token} : {}});
  const body = await r.json();
  if (!r.ok) { $("msg").textContent = body.error || r.statusText; return; }
  $("msg").textContent = ""; draw(body.points);
}
function draw(points) {
  const c = $("chart"), g = c.getContext("2d"); g.clearRect(0, 0, c.width, c.height);
  const max = Math.max(1, ...points.map((p) => p.count));
  const w = c.width / Math.max(1, points.length);
  points.forEach((p, i) => {
    const h = (p.count / max) * (c.height - 20);
    g.fillStyle = p.provisional ? "#9bc" : "#36a";
    g.fillRect(i * w, c.height - h, Math.max(1, w - 1), h);
  });
  const total = points.reduce((a, p) => a + p.count, 0);
  $("total").textContent = `${points.length} buckets, ${total} page views, peak ${max}`;
  c.dataset.points = points.length; c.dataset.total = total;
}
$("f").addEventListener("submit", (e) => { e.preventDefault(); load(); });
setInterval(load, 15000);
</script></body></html>
"""
