"""Pictures of flow graphs: a layered PNG (matplotlib) and a self-contained interactive HTML page.

Layout (both): layers left to right, one row per site (attn above, resid in the middle, mlp below), so the residual
chain reads as a horizontal line and each module predecessor as a vertical arrow into its resid node. Node colour =
class, edge width = cosine, the target has a thick outline. The HTML page needs no network at view time: the SVG,
the style and a few lines of JavaScript are inline; hovering a node shows all its attributes, including its top
activating tokens when :func:`hf_sae.flow.evaluation.annotate_top_tokens` has added them.
"""

from __future__ import annotations

import html
import json
import math
import os
import textwrap
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch

from .._io import atomic_path, write_text_atomic

SITE_ROWS = {"attn": 1.0, "resid": 0.0, "mlp": -1.0}
COLORS = {
    "translated": "#4C72B0",
    "processed": "#8172B3",
    "newborn": "#55A868",
    "unexplained": "#8C8C8C",
    "undetermined": "#FFFFFF",
    "unknown": "#D0D0D0",
    "mlp": "#DD8452",
    "attn": "#C44E52",
}
LEGEND = {
    "translated": "translated (from resid L-1)",
    "processed": "processed (resid L-1 + module)",
    "newborn": "newborn (from a module)",
    "unexplained": "unexplained",
    "undetermined": "undetermined (a predecessor SAE is missing)",
    "unknown": "unknown (no predecessor SAEs)",
    "mlp": "mlp feature",
    "attn": "attn feature",
}


def _color_key(attrs: dict) -> str:
    if attrs.get("site") in ("mlp", "attn"):
        return attrs["site"]
    return str(attrs.get("class", "unexplained")).split(" ")[0]


def _layout(graph) -> dict[str, tuple[float, float]]:
    """node -> (x = layer, y = site row ± a spread when several nodes share a (layer, site) cell)."""
    cells: dict[tuple[int, str], list[str]] = {}
    for node, attrs in graph.nodes(data=True):
        cells.setdefault((int(attrs["layer"]), attrs["site"]), []).append(node)
    positions = {}
    for (layer, site), nodes in cells.items():
        nodes.sort(key=lambda n: graph.nodes[n]["index"])
        for i, node in enumerate(nodes):
            offset = 0.0 if len(nodes) == 1 else (i - (len(nodes) - 1) / 2) * min(0.3, 0.8 / len(nodes))
            positions[node] = (float(layer), SITE_ROWS.get(site, 0.0) + offset)
    return positions


def _short_class(attrs: dict) -> str:
    if attrs.get("site") in ("mlp", "attn"):
        return ""
    text = str(attrs.get("class", ""))
    if attrs.get("missing"):
        text = f"{'undet.' if text == 'undetermined' else text} (no {attrs['missing'].replace(',', '/')})"
    return text.replace("processed by ", "proc. ").replace("newborn from ", "new ")


def graph_caveats(graph, separator: str) -> str:
    """What a reader of a graph picture must know: the chance rate of each threshold (random directions passing it)
    and the SAEs the trace lacked; empty when there is nothing to say."""
    parts = []
    chance = [
        (site, graph.graph[f"chance_{site}"]) for site in ("resid", "mlp", "attn") if f"chance_{site}" in graph.graph
    ]
    if chance:
        parts.append("chance of passing by random direction: " + ", ".join(f"{s} {100 * r:.1f}%" for s, r in chance))
    if graph.graph.get("missing"):
        parts.append(f"missing SAEs: {graph.graph['missing']}")
    return "".join(separator + part for part in parts)


def plot_graph(graph, path: str | os.PathLike, *, title: str | None = None, dpi: int = 150) -> Path:
    """Write a layered picture of a flow graph (PNG, SVG or PDF by the extension of ``path``)."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    positions = _layout(graph)
    layers = sorted({int(a["layer"]) for _, a in graph.nodes(data=True)}) or [0]
    width = max(6.0, 1.35 * (layers[-1] - layers[0] + 1) + 2.0)
    fig = Figure(figsize=(width, 4.6))
    ax = fig.add_subplot()
    node_size = 1000  # points²
    radius_points = math.sqrt(node_size) / 2 + 2
    for a, b, attrs in graph.edges(data=True):
        cosine = float(attrs.get("cosine", 0.0))
        arrow = FancyArrowPatch(
            positions[a],
            positions[b],
            arrowstyle="-|>",
            mutation_scale=12,
            linewidth=0.5 + 5.0 * max(cosine, 0.0),
            color="#5b6b7f",
            alpha=0.75,
            shrinkA=radius_points,
            shrinkB=radius_points,
            zorder=1,
            connectionstyle="arc3,rad=0.0",
        )
        ax.add_patch(arrow)
        (xa, ya), (xb, yb) = positions[a], positions[b]
        ax.text(
            (xa + xb) / 2,
            (ya + yb) / 2 + (0.07 if ya == yb else 0.0),
            f"{cosine:.2f}",
            fontsize=7,
            ha="center",
            va="center",
            color="#222222",
            zorder=3,
            bbox=dict(boxstyle="round,pad=0.15", fc="white", ec="none", alpha=0.85),
        )
    target = graph.graph.get("target")
    for node, attrs in graph.nodes(data=True):
        x, y = positions[node]
        is_target = node == target
        ax.scatter(
            [x],
            [y],
            s=node_size,
            c=COLORS.get(_color_key(attrs), "#8C8C8C"),
            zorder=2,
            edgecolors="black",
            linewidths=3.0 if is_target else 0.8,
        )
        ax.text(
            x,
            y,
            str(attrs["index"]),
            fontsize=7 if len(str(attrs["index"])) < 5 else 6,
            ha="center",
            va="center",
            color="#222222" if _color_key(attrs) == "unknown" else "white",
            fontweight="bold",
            zorder=4,
        )
        ax.text(x + 0.1, y - 0.17, _short_class(attrs), fontsize=6.5, ha="left", va="top", color="#333333", zorder=4)
    ax.set_xlim(layers[0] - 0.7, layers[-1] + 0.7)
    ax.set_ylim(-1.55, 1.45)
    ax.set_xticks(range(layers[0], layers[-1] + 1))
    ax.set_xticklabels([f"L{layer}" for layer in range(layers[0], layers[-1] + 1)], fontsize=8)
    ax.set_yticks(list(SITE_ROWS.values()))
    ax.set_yticklabels(list(SITE_ROWS), fontsize=9)
    for y in SITE_ROWS.values():
        ax.axhline(y, color="#eeeeee", linewidth=0.8, zorder=0)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel("layer")
    present = {_color_key(a) for _, a in graph.nodes(data=True)}
    handles = [
        Line2D(
            [],
            [],
            marker="o",
            linestyle="",
            markersize=8,
            markerfacecolor=COLORS[k],
            markeredgecolor="black",
            label=LEGEND[k],
        )
        for k in COLORS
        if k in present
    ]
    if handles:
        ax.legend(
            handles=handles,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.16),
            ncol=min(3, len(handles)),
            fontsize=7.5,
            frameon=False,
        )
    subtitle = (
        f"t_R = {graph.graph.get('t_resid', 0.5)}, t_module = {graph.graph.get('t_module', 0.15)}; "
        "edge width and label = cosine" + graph_caveats(graph, "; ")
    )
    lines = textwrap.wrap(subtitle, width=max(40, int(width * 14)))  # ~14 characters of 7.5 pt per inch
    fig.suptitle(title or f"Feature flow of {target or 'graph'}", fontsize=11, y=0.975)
    fig.text(0.5, 0.925, "\n".join(lines), ha="center", va="top", fontsize=7.5, color="#555555")
    fig.subplots_adjust(left=0.08, right=0.98, top=0.87 - 0.03 * len(lines), bottom=0.27)
    return _save_figure(fig, path, fmt, dpi)


def _save_figure(fig: Figure, path: Path, fmt: str, dpi: int) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi)
    return path


def plot_summary(summary, path: str | os.PathLike, *, dpi: int = 150) -> Path:
    """Stacked bars: the share of each class among the resid features of every layer (a FlowSummary)."""
    path = Path(path)
    fractions = summary.fractions()
    names = list(summary.counts[summary.layers[0]]) if summary.layers else []
    shades = {
        "translated": ["#4C72B0"],
        "processed": ["#b3a6dd", "#8172B3", "#54478a"],
        "newborn": ["#9ad1a8", "#55A868", "#2f6b3d"],
        "unexplained": ["#8C8C8C"],
        "undetermined": ["#E8E8E8"],
    }
    used: dict[str, int] = {}
    colors = []
    for name in names:
        base = name.split(" ")[0]
        i = used.get(base, 0)
        used[base] = i + 1
        colors.append(shades[base][min(i, len(shades[base]) - 1)])
    fig = Figure(figsize=(max(6.0, 0.45 * len(summary.layers) + 3), 4.2))
    ax = fig.add_subplot()
    bottom = [0.0] * len(summary.layers)
    for name, color in zip(names, colors):
        heights = [fractions[layer][name] for layer in summary.layers]
        ax.bar(summary.layers, heights, bottom=bottom, color=color, label=name, width=0.8)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(summary.layers)
    ax.set_xlabel("layer")
    ax.set_ylabel("share of resid features")
    ax.set_ylim(0, 1)
    ax.set_title("How residual features arise, per layer (data-free feature flow)", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.subplots_adjust(left=0.1, right=0.72, bottom=0.14)
    return _save_figure(fig, path, path.suffix.lstrip(".").lower() or "png", dpi)


# ------------------------------------------------------------------------------------------------------ HTML
_STYLE = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 18px; color: #222; }
h1 { font-size: 18px; margin: 0 0 4px 0; } .sub { color: #666; font-size: 12px; margin-bottom: 10px; }
svg { border: 1px solid #ddd; background: #fff; }
.node circle { stroke: #000; stroke-width: 1; cursor: pointer; } .node.target circle { stroke-width: 3.5; }
.node text { font-size: 10px; fill: #fff; font-weight: 600; pointer-events: none; }
.label { font-size: 9px; fill: #444; pointer-events: none; }
.edge { stroke: #5b6b7f; opacity: 0.75; } .edge:hover { stroke: #d62728; opacity: 1; }
.elabel { font-size: 9px; fill: #222; pointer-events: none; }
#tip { position: fixed; display: none; background: #fffff4; border: 1px solid #999; padding: 6px 8px;
       font-size: 12px; max-width: 480px; box-shadow: 2px 2px 6px rgba(0,0,0,.2); pointer-events: none; }
#tip table { border-collapse: collapse; } #tip td { padding: 1px 6px 1px 0; vertical-align: top; }
#tip .tok { font-family: ui-monospace, monospace; white-space: pre-wrap; }
table.nodes { border-collapse: collapse; font-size: 12px; margin-top: 14px; }
table.nodes td, table.nodes th { border-bottom: 1px solid #eee; padding: 2px 8px; text-align: left; }
.legend span { display: inline-block; margin-right: 14px; font-size: 12px; }
.legend i { display: inline-block; width: 11px; height: 11px; border-radius: 6px; margin-right: 4px;
            vertical-align: -1px; border: 1px solid #000; }
"""

_SCRIPT = """
(function () {
  var data = JSON.parse(document.getElementById('flow-data').textContent);
  var tip = document.getElementById('tip');
  function esc(s) { return String(s).replace(/[&<>"]/g, function (c) {
    return {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c]; }); }
  function show(ev, html) { tip.innerHTML = html; tip.style.display = 'block'; move(ev); }
  function move(ev) { tip.style.left = (ev.clientX + 14) + 'px'; tip.style.top = (ev.clientY + 14) + 'px'; }
  function hide() { tip.style.display = 'none'; }
  function nodeHtml(id) {
    var a = data.nodes[id], rows = '<b>' + esc(id) + '</b><table>';
    Object.keys(a).sort().forEach(function (k) {
      if (k === 'top_tokens') return;
      var v = a[k]; if (typeof v === 'number' && !Number.isInteger(v)) v = v.toFixed(4);
      rows += '<tr><td>' + esc(k) + '</td><td>' + esc(v) + '</td></tr>';
    });
    rows += '</table>';
    if (a.top_tokens && a.top_tokens.length) {
      rows += '<div><b>top activating tokens</b></div>';
      a.top_tokens.forEach(function (t) { rows += '<div class="tok">' + esc(t) + '</div>'; });
    }
    return rows;
  }
  document.querySelectorAll('.node').forEach(function (el) {
    el.addEventListener('mouseenter', function (ev) { show(ev, nodeHtml(el.getAttribute('data-id'))); });
    el.addEventListener('mousemove', move); el.addEventListener('mouseleave', hide);
  });
  document.querySelectorAll('.edge').forEach(function (el) {
    el.addEventListener('mouseenter', function (ev) {
      show(ev, esc(el.getAttribute('data-from')) + ' &rarr; ' + esc(el.getAttribute('data-to')) +
           '<br>cosine ' + Number(el.getAttribute('data-cosine')).toFixed(4)); });
    el.addEventListener('mousemove', move); el.addEventListener('mouseleave', hide);
  });
})();
"""


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def graph_to_html(graph, path: str | os.PathLike | None = None, *, title: str | None = None) -> str:
    """A self-contained HTML page with the layered graph as inline SVG and hover details; written to ``path``
    when given. Returns the HTML text."""
    positions = _layout(graph)
    layers = sorted({int(a["layer"]) for _, a in graph.nodes(data=True)}) or [0]
    x_step, margin, row_gap = 110, 70, 105
    width = margin * 2 + (layers[-1] - layers[0]) * x_step + 40

    def xy(node):
        x, y = positions[node]
        return margin + 20 + (x - layers[0]) * x_step, 40 + (1.5 - y) * row_gap

    height = int(40 + 3.2 * row_gap)
    target = graph.graph.get("target")
    parts = [
        f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#5b6b7f"/></marker></defs>',
    ]
    for site, row in SITE_ROWS.items():
        y = 40 + (1.5 - row) * row_gap
        parts.append(f'<line x1="40" y1="{y}" x2="{width - 10}" y2="{y}" stroke="#f0f0f0"/>')
        parts.append(f'<text class="label" x="4" y="{y + 3}">{site}</text>')
    for layer in range(layers[0], layers[-1] + 1):
        x = margin + 20 + (layer - layers[0]) * x_step
        parts.append(f'<text class="label" x="{x}" y="{height - 8}" text-anchor="middle">L{layer}</text>')
    radius = 20
    for a, b, attrs in graph.edges(data=True):
        (xa, ya), (xb, yb) = xy(a), xy(b)
        length = math.hypot(xb - xa, yb - ya) or 1.0
        ux, uy = (xb - xa) / length, (yb - ya) / length
        x1, y1, x2, y2 = xa + ux * radius, ya + uy * radius, xb - ux * (radius + 2), yb - uy * (radius + 2)
        cosine = float(attrs.get("cosine", 0.0))
        parts.append(
            f'<line class="edge" x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" '
            f'stroke-width="{0.8 + 6 * max(cosine, 0):.2f}" marker-end="url(#arrow)" '
            f'data-from="{html.escape(a)}" data-to="{html.escape(b)}" data-cosine="{cosine:.6f}"/>'
        )
        parts.append(
            f'<text class="elabel" x="{(xa + xb) / 2 + (0 if ya == yb else 6):.1f}" '
            f'y="{(ya + yb) / 2 - (6 if ya == yb else 0):.1f}" text-anchor="middle">{cosine:.2f}</text>'
        )
    for node, attrs in graph.nodes(data=True):
        x, y = xy(node)
        color = COLORS.get(_color_key(attrs), "#8C8C8C")
        css = "node target" if node == target else "node"
        parts.append(
            f'<g class="{css}" data-id="{html.escape(node)}"><circle cx="{x:.1f}" cy="{y:.1f}" '
            f'r="{radius}" fill="{color}"/><text x="{x:.1f}" y="{y + 3.5:.1f}" text-anchor="middle">'
            f"{attrs['index']}</text></g>"
        )
        parts.append(
            f'<text class="label" x="{x + 8:.1f}" y="{y + radius + 10:.1f}" text-anchor="start">'
            f"{html.escape(_short_class(attrs))}</text>"
        )
    parts.append("</svg>")
    nodes = {node: {k: _finite(v) for k, v in attrs.items()} for node, attrs in graph.nodes(data=True)}
    payload = json.dumps({"nodes": nodes}, sort_keys=True).replace("</", "<\\/")
    present = {_color_key(a) for _, a in graph.nodes(data=True)}
    legend = "".join(
        f'<span><i style="background:{COLORS[k]}"></i>{html.escape(LEGEND[k])}</span>' for k in COLORS if k in present
    )
    rows = []
    for node, attrs in sorted(graph.nodes(data=True), key=lambda item: (item[1]["layer"], item[1]["site"])):
        tokens = "<br>".join(html.escape(t) for t in attrs.get("top_tokens", []) or [])
        rows.append(
            f"<tr><td>{html.escape(node)}</td><td>{html.escape(str(attrs.get('class', '')))}</td>"
            f"<td>{float(attrs.get('score', math.nan)):.3f}</td><td>{tokens}</td></tr>"
        )
    heading = html.escape(title or f"Feature flow of {target or 'graph'}")
    sub = html.escape(
        f"t_R = {graph.graph.get('t_resid', 0.5)}, t_module = {graph.graph.get('t_module', 0.15)}. "
        "Hover a node or an edge for details; edge width = cosine." + graph_caveats(graph, " ")
    )
    text = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{heading}</title><style>{_STYLE}</style></head><body>"
        f'<h1>{heading}</h1><div class="sub">{sub}</div><div class="legend">{legend}</div>'
        + "".join(parts)
        + '<table class="nodes"><tr><th>node</th><th>class</th><th>score</th><th>top activating tokens</th></tr>'
        + "".join(rows)
        + '</table><div id="tip"></div>'
        f'<script type="application/json" id="flow-data">{payload}</script>'
        f"<script>{_SCRIPT}</script></body></html>\n"
    )
    if path is not None:
        write_text_atomic(path, text)
    return text
