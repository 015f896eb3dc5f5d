"""Flow graphs: a residual feature's ancestors and descendants through the layers (Laptev et al. 2025, Sec. 3.3,
App. B.2), as a ``networkx.DiGraph``.

Starting from a target feature of the ``resid`` SAE of layer L, :func:`trace` composes consecutive top-1 matches:

* backward: the top-1 match of the node in resid L−1 (s(R)), then of that node in resid L−2, ...; the chain stops
  where s(R) < t_R or where the flow has no SAE;
* forward: the top-1 match of the node in resid L+1, ...; the chain stops where that cosine is < t_R;
* at every resid node of layer l, its top-1 ``mlp`` and ``attn`` predecessors of layer l are attached when their
  score is ≥ t_module.

Node id ``"{layer}/{site}/{index}"`` (the paper writes ``24/res/14548``). Node attributes: ``layer``, ``site``,
``index``, ``score`` (the cosine of the edge that brought the node in; 1.0 for the target), ``class`` (the
predecessor class of a resid node, e.g. ``"processed by mlp"``; ``"undetermined"`` when a missing predecessor SAE
could change it, ``"unknown"`` when the flow has none of them; ``"module"`` for mlp/attn nodes), ``missing`` (the
predecessor sites without an SAE, e.g. ``"mlp,attn"``), ``role``
(``target`` | ``backward`` | ``forward`` | ``module``), and for resid nodes ``s_resid`` / ``s_mlp`` / ``s_attn`` where
known. Edges point the way information flows (earlier → later) with attribute ``cosine``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import networkx as nx
import torch

from .._io import atomic_path, write_text_atomic
from ..errors import FlowError
from .predecessors import PREDECESSOR_SITES, class_label, classify, predecessor_keys

DIRECTIONS = ("both", "backward", "forward")


def node_id(layer: int, site: str, index: int) -> str:
    """``"12/resid/1234"``."""
    return f"{layer}/{site}/{index}"


def parse_node_id(node: str) -> tuple[int, str, int]:
    """``"12/resid/1234"`` -> ``(12, "resid", 1234)``."""
    try:
        layer, site, index = str(node).split("/")
        return int(layer), site, int(index)
    except ValueError as err:
        raise FlowError(f"node id {node!r} is not of the form 'layer/site/index', e.g. '12/resid/1234'.") from err


def _predecessor_scores(flow, layer: int, index: int) -> dict[str, tuple[float, int]]:
    """{site: (score, id)} of the top-1 predecessors of resid feature (layer, index) that the flow can compute."""
    out = {}
    for site, key in predecessor_keys(layer):
        if key in flow:
            result = flow.match_rows((layer, "resid"), [index], key)
            out[site] = (float(result.scores[0, 0]), int(result.indices[0, 0]))
    return out


def _add_resid_node(graph: nx.DiGraph, flow, layer: int, index: int, score: float, role: str) -> dict:
    preds = _predecessor_scores(flow, layer, index)
    scores = [torch.tensor([preds[s][0] if s in preds else math.nan]) for s in PREDECESSOR_SITES]
    t = flow.thresholds
    category, via = classify(*scores, t["resid"], t["mlp"], t["attn"])
    label = class_label(int(category[0]), int(via[0])) if preds else "unknown"
    attrs = {"layer": layer, "site": "resid", "index": index, "score": float(score), "class": label, "role": role}
    missing = [site for site in PREDECESSOR_SITES if site not in preds]
    if missing and layer > 0:  # which predecessor SAEs the class could not see (layer 0 has no resid before it)
        attrs["missing"] = ",".join(missing)
    for site, (value, best) in preds.items():
        attrs[f"s_{site}"] = value
        attrs[f"id_{site}"] = best
    graph.add_node(node_id(layer, "resid", index), **attrs)
    return preds


def _attach_modules(graph: nx.DiGraph, flow, layer: int, index: int, preds: dict) -> None:
    target = node_id(layer, "resid", index)
    for site in ("mlp", "attn"):
        if site not in preds:
            if (layer, site) not in flow:
                graph.graph.setdefault("missing_list", []).append(f"{layer}/{site}")
            continue
        score, best = preds[site]
        if score >= flow.t_module:
            module = node_id(layer, site, best)
            if module not in graph:
                graph.add_node(
                    module, layer=layer, site=site, index=best, score=score, role="module", **{"class": "module"}
                )
            graph.add_edge(module, target, cosine=score)


def trace(flow, layer: int, feature: int, *, direction: str = "both", max_steps: int | None = None) -> nx.DiGraph:
    """The flow graph of resid feature ``feature`` of ``layer`` (see the module docstring).

    Args:
        flow: a :class:`~hf_sae.flow.FeatureFlow` (its thresholds t_R, t_M, t_A, t_module are used).
        direction: ``"both"``, ``"backward"`` or ``"forward"``.
        max_steps: at most this many resid steps in each direction (default: until a cut or the last SAE).

    Graph attributes: ``target`` (node id), ``target_layer``, ``t_resid``, ``t_module``, ``missing`` (the
    "layer/site" SAEs the trace would have used but the flow lacks, comma-separated), ``chance_resid`` /
    ``chance_mlp`` / ``chance_attn`` (the fraction of random directions passing each threshold at the target layer,
    :meth:`~hf_sae.flow.FeatureFlow.chance`).
    """
    if direction not in DIRECTIONS:
        raise FlowError(f"direction={direction!r} is unknown; use one of {list(DIRECTIONS)}.")
    key = flow.require((layer, "resid"), f"trace feature {feature} of layer {layer}")
    d_sae = flow.config(key).d_sae
    if isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < d_sae:
        raise FlowError(f"feature {feature!r} is out of range: the resid SAE of layer {layer} has ids 0..{d_sae - 1}.")
    t_resid = flow.thresholds["resid"]
    graph = nx.DiGraph(
        target=node_id(layer, "resid", feature), target_layer=layer, t_resid=t_resid, t_module=flow.t_module
    )
    for site, rate in flow.chance(layer).items():  # how often a random direction passes each threshold
        graph.graph[f"chance_{site}"] = rate
    preds = _add_resid_node(graph, flow, layer, feature, 1.0, "target")
    _attach_modules(graph, flow, layer, feature, preds)
    limit = math.inf if max_steps is None else max_steps

    if direction in ("both", "backward"):
        current, current_preds, steps = (layer, feature), preds, 0
        while steps < limit and "resid" in current_preds:
            score, best = current_preds["resid"]
            if not score >= t_resid:
                break
            previous = (current[0] - 1, best)
            current_preds = _add_resid_node(graph, flow, previous[0], best, score, "backward")
            graph.add_edge(node_id(previous[0], "resid", best), node_id(current[0], "resid", current[1]), cosine=score)
            _attach_modules(graph, flow, previous[0], best, current_preds)
            current, steps = previous, steps + 1
        if steps < limit and "resid" not in current_preds and current[0] - 1 >= 0:
            graph.graph.setdefault("missing_list", []).append(f"{current[0] - 1}/resid")

    if direction in ("both", "forward"):
        current, steps = (layer, feature), 0
        while steps < limit:
            following = (current[0] + 1, "resid")
            if following not in flow:
                break
            result = flow.match_rows((current[0], "resid"), [current[1]], following)
            score, best = float(result.scores[0, 0]), int(result.indices[0, 0])
            if not score >= t_resid:
                break
            following_node = node_id(following[0], "resid", best)
            if following_node not in graph:
                node_preds = _add_resid_node(graph, flow, following[0], best, score, "forward")
                _attach_modules(graph, flow, following[0], best, node_preds)
            graph.add_edge(node_id(current[0], "resid", current[1]), following_node, cosine=score)
            current, steps = (following[0], best), steps + 1

    graph.graph["missing"] = ",".join(sorted(set(graph.graph.pop("missing_list", [])), key=_layer_site_order))
    return graph


def _layer_site_order(text: str) -> tuple[int, str]:
    layer, site = text.split("/")
    return int(layer), site


# ---------------------------------------------------------------------------------------------------- export
def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(graph: nx.DiGraph, path: str | os.PathLike | None = None) -> str:
    """The graph as node-link JSON (``{"nodes": [...], "edges": [...], "graph": {...}}``); written to ``path`` if
    given. Read it back with :func:`from_json`. Non-finite numbers become ``null``."""
    data = nx.node_link_data(graph, edges="edges")
    for item in (*data["nodes"], *data["edges"]):
        for name in list(item):
            item[name] = _json_safe(item[name])
    data["graph"] = {name: _json_safe(value) for name, value in data["graph"].items()}
    text = json.dumps(data, indent=2, sort_keys=True)
    if path is not None:
        write_text_atomic(path, text + "\n")
    return text


def from_json(text_or_path: str | os.PathLike) -> nx.DiGraph:
    """The inverse of :func:`to_json` (a JSON string or a file path)."""
    text = str(text_or_path)
    if not text.lstrip().startswith("{"):
        text = Path(text_or_path).read_text(encoding="utf-8")
    return nx.node_link_graph(json.loads(text), directed=True, multigraph=False, edges="edges")


def to_graphml(graph: nx.DiGraph, path: str | os.PathLike) -> Path:
    """Write the graph as GraphML (for Gephi, Cytoscape, yEd); attributes that are not str/int/float/bool are
    written as JSON strings."""
    clean = nx.DiGraph()
    clean.graph.update({k: _graphml_value(v) for k, v in graph.graph.items()})
    for node, attrs in graph.nodes(data=True):
        clean.add_node(node, **{k: _graphml_value(v) for k, v in attrs.items()})
    for a, b, attrs in graph.edges(data=True):
        clean.add_edge(a, b, **{k: _graphml_value(v) for k, v in attrs.items()})
    with atomic_path(path) as tmp:
        nx.write_graphml(clean, str(tmp))
    return Path(path)


def _graphml_value(value):
    if isinstance(value, (bool, int, float, str)):
        return value
    if value is None:
        return ""
    return json.dumps(value)
