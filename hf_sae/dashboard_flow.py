"""A feature's neighbours in its feature-flow graph, for every feature of one SAE at once.

For a ``resid`` SAE of layer L in a :class:`~hf_sae.flow.FeatureFlow`, the neighbours are the nodes
:meth:`FeatureFlow.trace` links to the feature by one edge (``trace(L, f, max_steps=1)``): its top-1 match in resid
L−1 when the cosine is ≥ t_R, its top-1 mlp / attn predecessors of layer L scoring ≥ t_module, and its top-1 match in
resid L+1 when ≥ t_R, plus its predecessor class. They come from the flow's whole-SAE match tables (one blockwise
matching per neighbouring SAE, cached by the flow), not from one trace per feature.

For an ``mlp`` / ``attn`` SAE of layer L the neighbours are the resid-L features that attach it as their module
predecessor (score ≥ t_module), best first.
"""

from __future__ import annotations

from torch import nn

from .errors import FlowError
from .flow import class_label, node_id

MAX_MODULE_SUCCESSORS = 8
"""At most this many resid features are listed as the successors of one mlp / attn feature."""


def flow_neighbours(flow, sae: nn.Module) -> tuple[list[list[dict]], list[str]]:
    """(neighbours, classes): for each feature of ``sae``, the list of its flow-graph neighbours (dicts with
    ``node`` ("layer/site/index"), ``layer``, ``site``, ``index``, ``cosine``, ``relation`` ("resid before", "mlp",
    "attn", "resid after", "feeds"), in that order), and its predecessor class ("" where none applies)."""
    key = (sae.config.hook_layer, sae.config.hook_site)
    flow.require(key, "show the flow neighbours of this SAE's features")
    if flow.config(key).d_sae != sae.config.d_sae:
        raise FlowError(
            f"the flow's SAE at {key} has d_sae={flow.config(key).d_sae}, the dashboard's has {sae.config.d_sae}: "
            "pass the flow the SAE belongs to."
        )
    layer, site = key
    d_sae = sae.config.d_sae
    neighbours: list[list[dict]] = [[] for _ in range(d_sae)]
    classes = [""] * d_sae
    t_resid, t_module = flow.thresholds["resid"], flow.t_module

    def entry(where: tuple[int, str], index: int, score: float, relation: str) -> dict:
        node = node_id(where[0], where[1], index)
        return {
            "node": node,
            "layer": where[0],
            "site": where[1],
            "index": index,
            "cosine": score,
            "relation": relation,
        }

    if site == "resid":
        steps = (
            ((layer - 1, "resid"), t_resid, "resid before"),
            ((layer, "mlp"), t_module, "mlp"),
            ((layer, "attn"), t_module, "attn"),
            ((layer + 1, "resid"), t_resid, "resid after"),
        )
        for other, threshold, relation in steps:
            if other in flow:
                match = flow.match(key, other)
                scores, ids = match.scores[:, 0], match.indices[:, 0]
                keep = scores >= threshold
                for feature, index, score in zip(
                    keep.nonzero(as_tuple=True)[0].tolist(), ids[keep].tolist(), scores[keep].tolist()
                ):
                    neighbours[feature].append(entry(other, index, score, relation))
        if any((layer - 1 if s == "resid" else layer, s) in flow for s in ("resid", "mlp", "attn")):
            table = flow.predecessors(layer, allow_missing=True, chance_samples=0)
            labels = {}
            for feature, (category, via) in enumerate(zip(table.category.tolist(), table.via.tolist())):
                labels.setdefault((category, via), class_label(category, via))
                classes[feature] = labels[(category, via)]
        else:
            classes = ["unknown"] * d_sae
    elif (layer, "resid") in flow:
        match = flow.match((layer, "resid"), key)
        scores, ids = match.scores[:, 0], match.indices[:, 0]
        order = scores.argsort(descending=True, stable=True)
        keep = scores[order] >= t_module
        resid, module, cosine = order[keep], ids[order][keep], scores[order][keep]
        for feature, index, score in zip(module.tolist(), resid.tolist(), cosine.tolist()):
            if len(neighbours[feature]) < MAX_MODULE_SUCCESSORS:
                neighbours[feature].append(entry((layer, "resid"), index, score, "feeds"))
    return neighbours, classes
