"""The dashboard's static site: one ``index.html`` (inline CSS and JavaScript) and its data as local script files.

Layout of the folder::

    index.html                 the feature index (sorted by firing density, with a search box) and, at
                               ``index.html#f/123``, the page of feature 123; no file is fetched from anywhere else
    data/index.js              the SAE's description and one row per feature (id, density, max, mean, label)
    data/tokens.js             the held-out tokens (ids, and the text of every id used) the contexts point into
    data/features/NNNNN.js     the pages of features NNNNN .. NNNNN + CHUNK - 1 (contexts, histogram, logits, flow)

Data files are ``<script src>`` files that call ``HFSAE.add(...)``, not JSON fetched by the page: browsers refuse
``fetch`` of ``file://`` URLs, while local scripts load, so the site works opened straight from disk. The page's
Content-Security-Policy forbids every connection (``connect-src 'none'``), images other than inline ones and any
script from elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ._io import write_text_atomic

CHUNK = 256
"""Features per data file of feature pages."""


def _script(call: str, payload: Any) -> str:
    return f"HFSAE.add({json.dumps(call)}, {json.dumps(payload, separators=(',', ':'), allow_nan=False)});\n"


def write_site(
    folder: Path, index: dict, tokens: dict, pages: dict[int, dict], title: str, chunk: int = CHUNK
) -> list[Path]:
    """Write the site into ``folder`` (which should be empty): ``index`` (``meta`` and ``features`` rows),
    ``tokens`` (``ids``, ``text``), ``pages`` {feature: page}. Returns the files written."""
    folder = Path(folder)
    written = [
        write_text_atomic(folder / "index.html", PAGE.replace("__TITLE__", _html_escape(title))),
        write_text_atomic(folder / "data" / "index.js", _script("index", {**index, "chunk": chunk})),
        write_text_atomic(folder / "data" / "tokens.js", _script("tokens", tokens)),
    ]
    groups: dict[int, dict[str, dict]] = {}
    for feature, page in pages.items():
        groups.setdefault(feature // chunk * chunk, {})[str(feature)] = page
    for first, group in sorted(groups.items()):
        written.append(write_text_atomic(folder / "data" / "features" / f"{first:05d}.js", _script("pages", group)))
    return written


def _html_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'self' 'unsafe-inline' file:;
      style-src 'unsafe-inline'; img-src data:; connect-src 'none'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
  :root { --ink: #1d2330; --muted: #5d6675; --line: #d9dee7; --bg: #f7f8fb; --accent: #2f6fdf; --hot: 255, 112, 40; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
         background: var(--bg); }
  header { background: #fff; border-bottom: 1px solid var(--line); padding: 14px 24px; display: flex; gap: 24px;
           align-items: center; flex-wrap: wrap; }
  header h1 { font-size: 18px; margin: 0; }
  header h1 a { color: inherit; text-decoration: none; }
  #meta { color: var(--muted); font-size: 13px; }
  main { padding: 18px 24px; max-width: 1180px; }
  a { color: var(--accent); }
  input[type=search] { font: inherit; padding: 7px 10px; width: 360px; border: 1px solid var(--line);
                       border-radius: 6px; }
  table { border-collapse: collapse; background: #fff; width: 100%; }
  th, td { text-align: left; padding: 5px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
  th { font-weight: 600; color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .03em; }
  td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
  .card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px 16px; margin: 0 0 16px; }
  .card h2 { font-size: 14px; margin: 0 0 10px; color: var(--muted); text-transform: uppercase; letter-spacing: .04em; }
  .row { display: flex; gap: 16px; flex-wrap: wrap; align-items: stretch; }
  .row > .card { flex: 1 1 320px; }
  .stat { display: inline-block; margin-right: 28px; }
  .stat b { display: block; font-size: 20px; }
  .stat span { color: var(--muted); font-size: 12px; }
  .ctx { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; font-size: 13px;
         white-space: pre-wrap; word-break: break-word; padding: 6px 0; border-bottom: 1px dashed var(--line); }
  .ctx:last-child { border-bottom: 0; }
  .ctx .val { display: inline-block; width: 64px; color: var(--muted); text-align: right; margin-right: 10px; }
  .tok { border-radius: 3px; }
  .tok.peak { outline: 2px solid rgb(var(--hot)); }
  .muted { color: var(--muted); }
  .tokens td:first-child { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre; }
  .pos { color: #177245; } .neg { color: #b3261e; }
  #more { margin: 10px 0; }
  button { font: inherit; padding: 5px 12px; border: 1px solid var(--line); background: #fff; border-radius: 6px;
           cursor: pointer; }
  nav.pager { margin-bottom: 12px; display: flex; gap: 14px; align-items: center; }
  svg text { font: 11px system-ui, sans-serif; fill: var(--muted); }
</style>
</head>
<body>
<header>
  <h1><a href="#">__TITLE__</a></h1>
  <input type="search" id="search" placeholder="Search features: id or token text" autocomplete="off">
  <span id="meta"></span>
</header>
<main id="main"><p class="muted">Loading…</p></main>
<script>
"use strict";
const HFSAE = { data: {}, pages: {}, loaded: {} };
HFSAE.add = function (kind, payload) {
  if (kind === "pages") Object.assign(HFSAE.pages, payload);
  else HFSAE.data[kind] = payload;
};
function load(src, then) {
  const s = document.createElement("script");
  s.src = src; s.onload = then; s.onerror = () => show(el("p", "muted", "Missing data file " + src));
  document.head.appendChild(s);
}
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}
function stat(value, label) {
  const s = el("div", "stat"); s.append(el("b", null, value), el("span", null, label)); return s;
}
function show(...nodes) { const m = document.getElementById("main"); m.replaceChildren(...nodes); }
function fmt(x, digits) {
  if (x === null || x === undefined) return "–";
  if (x === 0) return "0";
  const a = Math.abs(x);
  if (a >= 1e6 || a < 1e-3) return x.toExponential(digits === undefined ? 2 : digits);
  if (a >= 1000) return Math.round(x).toLocaleString("en");
  const s = x.toPrecision(digits === undefined ? 4 : digits);
  return s.includes(".") ? s.replace(/\.?0+$/, "") : s;  // 4.500 -> 4.5, never 630 -> 63
}
function pct(x) { return x === 0 ? "0" : (100 * x < 0.01 ? (100 * x).toExponential(1) : fmt(100 * x, 3)) + "%"; }
function visible(text) { return text.replace(/\n/g, "⏎").replace(/\t/g, "⇥"); }

// --------------------------------------------------------------------------------------------------- the index
const PAGE_ROWS = 200;
let shownRows = PAGE_ROWS;
function matches(query) {
  const rows = HFSAE.data.index.features;
  const q = query.trim().toLowerCase();
  if (!q) return rows;
  if (/^#?\d+$/.test(q)) { const id = parseInt(q.replace("#", ""), 10); return rows.filter(r => r[0] === id); }
  return rows.filter(r => r[4].toLowerCase().includes(q));
}
function densityHistogram(rows) {
  const bins = 24, low = -7, counts = new Array(bins).fill(0);
  let dead = 0;
  rows.forEach(r => {
    if (r[1] <= 0) { dead++; return; }
    const b = Math.min(bins - 1, Math.max(0, Math.floor((Math.log10(r[1]) - low) / -low * bins)));
    counts[b]++;
  });
  const labels = [];
  for (let d = low; d <= 0; d += 1) labels.push([(d - low) / -low, "1e" + d]);
  return barChart(counts, labels, "log10 firing density (" + dead + " never fired)");
}
function barChart(counts, ticks, caption) {
  const W = 520, H = 150, pad = 26, top = Math.max(1, ...counts);
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H + 30}`); svg.setAttribute("width", W); svg.setAttribute("height", H + 30);
  const bw = (W - 2 * pad) / counts.length;
  counts.forEach((c, i) => {
    const r = document.createElementNS(ns, "rect"), h = (H - 10) * c / top;
    r.setAttribute("x", pad + i * bw + 0.5); r.setAttribute("width", Math.max(1, bw - 1));
    r.setAttribute("y", H - h); r.setAttribute("height", h); r.setAttribute("fill", "#4c72b0");
    const t = document.createElementNS(ns, "title"); t.textContent = String(c); r.appendChild(t);
    svg.appendChild(r);
  });
  const axis = document.createElementNS(ns, "line");
  axis.setAttribute("x1", pad); axis.setAttribute("x2", W - pad);
  axis.setAttribute("y1", H); axis.setAttribute("y2", H);
  axis.setAttribute("stroke", "#999"); svg.appendChild(axis);
  ticks.forEach(([f, label]) => {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", pad + f * (W - 2 * pad)); t.setAttribute("y", H + 14); t.setAttribute("text-anchor", "middle");
    t.textContent = label; svg.appendChild(t);
  });
  const c = document.createElementNS(ns, "text");
  c.setAttribute("x", W / 2); c.setAttribute("y", H + 28); c.setAttribute("text-anchor", "middle");
  c.textContent = caption; svg.appendChild(c);
  const y = document.createElementNS(ns, "text");
  y.setAttribute("x", pad); y.setAttribute("y", 10); y.textContent = "max " + top; svg.appendChild(y);
  return svg;
}
function renderIndex() {
  const idx = HFSAE.data.index, query = document.getElementById("search").value;
  const rows = matches(query);
  const summary = el("div", "card");
  summary.appendChild(el("h2", null, "SAE"));
  idx.meta.lines.forEach(line => summary.appendChild(el("div", null, line)));
  const hist = el("div", "card");
  hist.appendChild(el("h2", null, "Firing density of the features"));
  hist.appendChild(densityHistogram(idx.features));
  const top = el("div", "row"); top.append(summary, hist);
  const card = el("div", "card");
  card.appendChild(el("h2", null, (query.trim() ? rows.length + " matching features" : rows.length + " features") +
                                  ", sorted by firing density"));
  const table = el("table"); table.id = "index";
  const head = el("tr");
  [["feature", "num"], ["density", "num"], ["max act.", "num"], ["mean act.", "num"], ["top tokens", ""]]
    .forEach(([t, c]) => head.appendChild(el("th", c, t)));
  table.appendChild(head);
  rows.slice(0, shownRows).forEach(r => {
    const tr = el("tr"); tr.dataset.feature = r[0];
    const a = el("a", null, "#" + r[0]); a.href = "#f/" + r[0];
    const id = el("td", "num"); id.appendChild(a); tr.appendChild(id);
    tr.appendChild(el("td", "num", pct(r[1])));
    tr.appendChild(el("td", "num", fmt(r[2])));
    tr.appendChild(el("td", "num", fmt(r[3])));
    tr.appendChild(el("td", null, visible(r[4])));
    table.appendChild(tr);
  });
  card.appendChild(table);
  if (rows.length > shownRows) {
    const more = el("button", null, "Show " + Math.min(PAGE_ROWS, rows.length - shownRows) + " more");
    more.id = "more"; more.onclick = () => { shownRows += PAGE_ROWS; renderIndex(); };
    card.appendChild(more);
  }
  show(top, card);
}

// ---------------------------------------------------------------------------------------------- a feature page
function renderFeature(id) {
  const idx = HFSAE.data.index, chunk = Math.floor(id / idx.chunk) * idx.chunk;
  const row = idx.features.find(r => r[0] === id);
  if (!row) { show(el("p", null, "There is no feature " + id + " (ids 0.." + (idx.meta.d_sae - 1) + ").")); return; }
  const page = HFSAE.pages[String(id)];
  if (page === undefined && row[1] > 0 && !HFSAE.loaded[chunk]) {
    HFSAE.loaded[chunk] = true;
    load("data/features/" + String(chunk).padStart(5, "0") + ".js", route);
    show(el("p", "muted", "Loading feature " + id + "…"));
    return;
  }
  if (page !== undefined && !HFSAE.data.tokens) { load("data/tokens.js", route); return; }
  const nav = el("nav", "pager");
  const back = el("a", null, "← all features"); back.href = "#"; nav.appendChild(back);
  if (id > 0) { const p = el("a", null, "← #" + (id - 1)); p.href = "#f/" + (id - 1); nav.appendChild(p); }
  if (id + 1 < idx.meta.d_sae) {
    const n = el("a", null, "#" + (id + 1) + " →"); n.href = "#f/" + (id + 1); nav.appendChild(n);
  }
  const title = el("h2", null, "Feature " + id); title.id = "feature-title";
  title.style.cssText = "font-size:22px;margin:4px 0 14px;color:var(--ink);text-transform:none";
  const stats = el("div", "card");
  [[pct(row[1]), "firing density"], [fmt(row[2]), "max activation"], [fmt(row[3]), "mean activation (where it fires)"]]
    .forEach(([v, label]) => stats.appendChild(stat(v, label)));
  if (page && page.cls) stats.appendChild(stat(page.cls, "flow class"));
  if (page === undefined) {
    show(nav, title, stats, el("p", "muted", row[1] > 0 ? "This feature has no page in this dashboard." :
      "This feature never fired on the " + idx.meta.n_tokens.toLocaleString() + " tokens of the dashboard."));
    return;
  }
  const histCard = el("div", "card"); histCard.appendChild(el("h2", null, "Activation histogram (where it fires)"));
  const ticks = [[0, "0"], [0.5, fmt(page.hist_top / 2)], [1, fmt(page.hist_top)]];
  histCard.appendChild(barChart(page.hist, ticks, "activation"));
  const logits = el("div", "card"); logits.appendChild(el("h2", null, "Output tokens (W_U · norm gain · W_dec)"));
  const lt = el("div", "row");
  [["promoted", page.promoted, "pos"], ["suppressed", page.suppressed, "neg"]].forEach(([name, list, cls]) => {
    const t = el("table", "tokens"); t.id = name;
    const h = el("tr"); h.append(el("th", null, name), el("th", "num", "logit")); t.appendChild(h);
    list.forEach(([tok, v]) => {
      const tr = el("tr"); tr.append(el("td", null, visible(HFSAE.text(tok))), el("td", "num " + cls, fmt(v, 3)));
      t.appendChild(tr);
    });
    const holder = el("div"); holder.style.flex = "1 1 200px"; holder.appendChild(t); lt.appendChild(holder);
  });
  logits.appendChild(lt);
  const upper = el("div", "row"); upper.append(histCard, logits);
  const ctx = el("div", "card"); ctx.id = "contexts";
  ctx.appendChild(el("h2", null, "Top activating contexts (held-out text; one per window)"));
  const tokens = HFSAE.data.tokens.ids, peakMax = page.contexts.length ? page.contexts[0][2] : 1;
  page.contexts.forEach(([start, peakAt, peak, values]) => {
    const line = el("div", "ctx");
    line.appendChild(el("span", "val", fmt(peak, 3)));
    values.forEach((v, i) => {
      const span = el("span", "tok" + (start + i === peakAt ? " peak" : ""), visible(HFSAE.text(tokens[start + i])));
      if (v > 0) {
        span.style.background = `rgba(var(--hot), ${(0.12 + 0.78 * v / peakMax).toFixed(3)})`;
        span.title = "activation " + fmt(v);
      }
      line.appendChild(span);
    });
    ctx.appendChild(line);
  });
  const parts = [nav, title, stats, upper, ctx];
  if (page.flow) {
    const flow = el("div", "card"); flow.id = "flow"; flow.appendChild(el("h2", null, "Feature-flow neighbours"));
    if (!page.flow.length) flow.appendChild(el("p", "muted", "No neighbour passes the flow's thresholds."));
    else {
      const t = el("table"); const h = el("tr");
      ["relation", "node", "cosine"].forEach(x => h.appendChild(el("th", x === "cosine" ? "num" : null, x)));
      t.appendChild(h);
      page.flow.forEach(n => {
        const tr = el("tr");
        tr.append(el("td", null, n.relation), el("td", null, n.node), el("td", "num", fmt(n.cosine, 3)));
        t.appendChild(tr);
      });
      flow.appendChild(t);
    }
    parts.push(flow);
  }
  show(...parts);
}

// ------------------------------------------------------------------------------------------------------ routing
HFSAE.text = id => { const t = HFSAE.data.tokens.text[String(id)]; return t === undefined ? "⟨" + id + "⟩" : t; };
function route() {
  const m = location.hash.match(/^#f\/(\d+)$/);
  if (m) { document.getElementById("search").value = ""; renderFeature(parseInt(m[1], 10)); }
  else renderIndex();
  window.scrollTo(0, 0);
}
window.addEventListener("hashchange", route);
document.getElementById("search").addEventListener("input", () => {
  shownRows = PAGE_ROWS;
  if (location.hash.startsWith("#f/")) history.replaceState(null, "", "#");
  renderIndex();
});
load("data/index.js", () => {
  document.getElementById("meta").textContent = HFSAE.data.index.meta.short;
  route();
  document.body.dataset.ready = "1";
});
</script>
</body>
</html>
"""
