"""Steering along a flow graph (Laptev et al. 2025, Sec. 3.5, App. A.2 and B.2).

Two interventions on the activation h_t at token t of a site, for the graph's features V (unit decoder rows) there:

* ``rescale``:  h_t ← h_t + (r − 1)·(a_t · V), a_t the features' SAE activations at that token. r = 0 removes the
  features, r < 0 over-suppresses, r > 1 amplifies. The feature's contribution a_t·W_dec[f] is what gets rescaled,
  which is a_t·V for unit-norm decoders (every hf-sae TopK SAE); for a JumpReLU SAE with raw decoder rows it keeps
  "r = 0 removes the feature" exact.
* ``activate``: h_t ← h_t + s·V at every token (s per feature).

Which features: ``cumulative=False`` (single-layer) steers only the graph's features of layer l; ``cumulative=True``
steers every graph feature at layers ≤ l, each at its own (layer, site). l defaults to the graph's target layer.

Coefficient of a feature at layer l' (s is its strength; the same formulas give r in ``rescale`` mode):
constant s′ = s; exponential s′ = s·e^{α·l′} (default α = −0.05); linear from (l_start, s) to (l_end, s*):
k = (s* − s)/(l_end − l_start), s′ = k·l′ + s − k·l_start (default s* = 1; l_start / l_end default to the first and
last layer of the graph, as in the paper, whichever layers are steered).

The hooks are those of :mod:`hf_sae.steering` (``SiteHook`` and ``SteeringHandle``): they act at prefill and at
every KV-cached decode step, never touch padding, leave BOS and the SAEs' excluded token ids alone (unless
``exclude_token_ids`` says otherwise), honour ``positions``, and are removed on exit of the ``with`` block.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import FlowError
from ..sites import D_MODEL_SITES
from ..steering import POSITIONS, SiteHook, SteeringHandle, install_hooks, latent_values, steering_exclusion
from .graph import parse_node_id
from .matching import feature_scales

MODES = ("activate", "rescale")
SCHEDULES = ("constant", "linear", "exponential")
UNITS = ("unit", "folded")


def schedule_coefficient(
    layer: int,
    strength: float,
    schedule: str = "constant",
    *,
    alpha: float = -0.05,
    end_strength: float = 1.0,
    start_layer: int | None = None,
    end_layer: int | None = None,
) -> float:
    """The coefficient of a feature at ``layer`` under ``schedule`` (see the module docstring for the formulas)."""
    if schedule == "constant":
        return float(strength)
    if schedule == "exponential":
        return float(strength) * math.exp(alpha * layer)
    if schedule == "linear":
        if start_layer is None or end_layer is None:
            raise FlowError("the linear schedule needs start_layer and end_layer (l_start, l_end).")
        if end_layer == start_layer:
            return float(strength)
        slope = (end_strength - strength) / (end_layer - start_layer)
        return slope * layer + strength - slope * start_layer
    raise FlowError(f"schedule={schedule!r} is unknown; use one of {list(SCHEDULES)}.")


@dataclass
class FlowSteeringPlan:
    """What a flow steering does: for each (layer, site), each feature's coefficient (s′ or r′).

    Attributes:
        mode: ``"activate"`` or ``"rescale"``.
        layer: the steering layer l; cumulative: whether layers < l are steered too.
        coefficients: {(layer, site): {feature: coefficient}}.
    """

    mode: str
    schedule: str
    layer: int
    cumulative: bool
    coefficients: dict[tuple[int, str], dict[int, float]] = field(default_factory=dict)

    def __str__(self) -> str:
        which = "cumulative up to" if self.cumulative else "only"
        lines = [f"{self.mode} ({self.schedule}, {which} layer {self.layer})"]
        for (layer, site), features in sorted(self.coefficients.items()):
            parts = ", ".join(f"{f}: {c:.4g}" for f, c in sorted(features.items()))
            lines.append(f"  {layer}/{site}: {parts}")
        return "\n".join(lines)


def plan_flow_steering(
    flow,
    graph,
    strength: float | Mapping[str, float] = 8.0,
    *,
    mode: str = "activate",
    schedule: str = "constant",
    alpha: float = -0.05,
    end_strength: float = 1.0,
    start_layer: int | None = None,
    end_layer: int | None = None,
    cumulative: bool = False,
    layer: int | None = None,
    sites: Iterable[str] = D_MODEL_SITES,
) -> FlowSteeringPlan:
    """Which features of ``graph`` to steer, where, and with which coefficient (no hooks are installed).

    Args:
        strength: s (``activate``) or r (``rescale``): one number for every node, or ``{node_id: value}`` (then only
            those nodes are steered).
        mode: ``"activate"`` (h + s·V at every token) or ``"rescale"`` (h + (r − 1)·a·V).
        schedule: ``"constant"``, ``"linear"`` (to ``end_strength`` s* at ``end_layer``, from ``start_layer``;
            default the graph's first and last layer) or ``"exponential"`` (s·e^{α·l}, ``alpha``).
        cumulative, layer: steer the graph's features at layer ``layer`` only, or at every layer ≤ ``layer``
            (default: the graph's target layer).
        sites: which node sites to steer (default all of resid, mlp, attn).
    """
    if mode not in MODES:
        raise FlowError(f"mode={mode!r} is unknown; use one of {list(MODES)}.")
    if schedule not in SCHEDULES:
        raise FlowError(f"schedule={schedule!r} is unknown; use one of {list(SCHEDULES)}.")
    for name, value in (("alpha", alpha), ("end_strength", end_strength)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FlowError(f"{name}={value!r} must be a finite number.")
    sites = tuple(sites)
    nodes = [(parse_node_id(node), node) for node in graph.nodes]
    if not nodes:
        raise FlowError("the flow graph has no nodes to steer; build one with flow.trace(layer, feature).")
    if layer is None:
        layer = graph.graph.get("target_layer", max(n[0][0] for n in nodes))
    if isinstance(strength, Mapping):
        unknown = sorted(set(strength) - set(graph.nodes))
        if unknown:
            raise FlowError(f"strengths given for node(s) {unknown} that are not in the graph.")
        base = {node: float(value) for node, value in strength.items()}
    else:
        base = {node: float(strength) for _, node in nodes}
    for node, value in base.items():
        if not math.isfinite(value):
            raise FlowError(f"strength {value!r} of node {node} must be a finite number, e.g. 8.0.")
    chosen = [
        (parsed, node)
        for parsed, node in nodes
        if node in base and parsed[1] in sites and (parsed[0] <= layer if cumulative else parsed[0] == layer)
    ]
    if not chosen:
        where = f"at layers <= {layer}" if cumulative else f"at layer {layer}"
        raise FlowError(
            f"the graph has no nodes {where} on sites {list(sites)} to steer (its layers: "
            f"{sorted({n[0][0] for n in nodes})}). Pass layer=... or cumulative=True."
        )
    graph_layers = [parsed[0] for parsed, _ in nodes]  # the span of the graph, not of the steered nodes
    start = min(graph_layers) if start_layer is None else start_layer
    end = max(graph_layers) if end_layer is None else end_layer
    plan = FlowSteeringPlan(mode, schedule, layer, cumulative)
    for (node_layer, site, index), node in chosen:
        flow.require((node_layer, site), f"steer node {node}")
        value = schedule_coefficient(
            node_layer, base[node], schedule, alpha=alpha, end_strength=end_strength, start_layer=start, end_layer=end
        )
        plan.coefficients.setdefault((node_layer, site), {})[index] = value
    return plan


class FlowHook(SiteHook):
    """One site of a flow steering: adds Σ_f c_f·V_f (activate) or Σ_f (r_f − 1)·a_f·W_dec[f] (rescale).

    ``features``: {feature id: coefficient c_f (activate) or r_f (rescale)}; ``scales`` (d_sae,) multiplies each unit
    direction V_f (the folded units of :func:`steer_flow`). ``rescale`` with r = 0 removes the features (what
    :func:`hf_sae.flow.evaluation.deactivation` does to a predecessor).
    """

    def __init__(
        self,
        model: nn.Module,
        sae: nn.Module,
        features: Mapping[int, float],
        mode: str,
        positions: str = "all",
        scales: Tensor | None = None,
        exclude_token_ids=None,
        default_exclusion: bool = False,
    ):
        super().__init__(model, sae, positions, exclude_token_ids, default_exclusion=default_exclusion)
        self.mode = mode
        device = sae.W_dec.device
        self.feature_ids = torch.tensor(list(features), dtype=torch.long, device=device)
        self.coefficients = torch.tensor(list(features.values()), dtype=sae.W_dec.dtype, device=device)
        with torch.no_grad():
            directions = sae.W_dec[self.feature_ids]
            if mode == "activate":
                unit = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                if scales is not None:
                    unit = unit * scales.to(device=device, dtype=unit.dtype)[self.feature_ids, None]
                self.add_vector = self.coefficients @ unit  # (d_in,)
            else:
                scale = sae.config.activation_scale if not sae.config.activation_scale_folded else 1.0
                self.directions = directions / scale  # a_f·W_dec[f] in the model's units
                self.factors = self.coefficients - 1.0

    def _edit(self, activation: Tensor, mask: Tensor | None) -> Tensor:
        if self.mode == "activate":
            return self.add_constant(activation, mask, self.add_vector)
        return self.add_to_rows(activation, mask, self._rescale_delta)

    def _rescale_delta(self, x: Tensor) -> Tensor:
        """Σ_f (r_f − 1)·a_f(x)·W_dec[f] for rows x (N, d_in)."""
        values = latent_values(self.sae.encode(x), self.feature_ids, self.sae.config.d_sae)
        return (self.factors * values) @ self.directions


class FlowSteeringHandle(SteeringHandle):
    """The hooks of one flow steering (a :class:`hf_sae.steering.SteeringHandle`) and its :attr:`plan`."""

    def __init__(self, model: nn.Module, hooks: list[SiteHook], plan: FlowSteeringPlan):
        super().__init__(model, hooks)
        self.plan = plan

    def __repr__(self) -> str:
        return f"FlowSteeringHandle(active={self.active}, {self.plan})"


def steer_flow(
    flow,
    model: nn.Module,
    graph,
    strength: float | Mapping[str, float] = 8.0,
    *,
    units: str = "unit",
    positions: str = "all",
    exclude_token_ids: Sequence[int] | None = None,
    **plan_options: Any,
) -> FlowSteeringHandle:
    """Steer ``model`` along ``graph``: a context manager (``with flow.steer(...): model.generate(...)``), also
    ``handle.generate(...)`` / ``handle.remove()`` like :func:`hf_sae.steer`.

    Args:
        strength: s (``activate``) or r (``rescale``): one number, or ``{node_id: value}`` for chosen nodes.
        units: ``"unit"`` (V = unit decoder rows, the paper's formula) or ``"folded"`` (V scaled by each feature's
            folded scale, :func:`hf_sae.flow.matching.feature_scales`: θ·||W_dec|| for JumpReLU, the mean non-zero
            activation for TopK after ``flow.calibrate``), so s = 1 means "one typical activation".
        positions: ``"all"``, ``"prompt"`` or ``"generated"``; padding is never steered.
        exclude_token_ids: token ids never steered; default BOS and each SAE's ``excluded_token_ids`` (``[]``: none).
        plan_options: which features, where and with which coefficients, as in :func:`plan_flow_steering`:
            ``mode`` (``"activate"``: h + s·V at every token, or ``"rescale"``: h + (r − 1)·a·V), ``schedule``
            (``"constant"``, ``"linear"``, ``"exponential"``), ``alpha``, ``end_strength``, ``start_layer``,
            ``end_layer``, ``cumulative``, ``layer`` and ``sites``.
    """
    if units not in UNITS:
        raise FlowError(f"units={units!r} is unknown; use one of {list(UNITS)}.")
    if positions not in POSITIONS:
        raise FlowError(f"positions={positions!r} is unknown; use one of {list(POSITIONS)}.")
    plan = plan_flow_steering(flow, graph, strength, **plan_options)
    hooks = _flow_hooks(flow, model, plan, units, positions, exclude_token_ids)
    return FlowSteeringHandle(model, install_hooks(hooks), plan)


def _flow_hooks(
    flow, model: nn.Module, plan: FlowSteeringPlan, units: str, positions: str, exclude_token_ids: Sequence[int] | None
):
    for key, features in sorted(plan.coefficients.items()):
        sae = flow[key]
        scales = None
        if units == "folded" and plan.mode == "activate":
            scales = feature_scales(sae, flow.mean_activations.get(key))
        exclusion = steering_exclusion(model, [sae.config], exclude_token_ids)
        yield FlowHook(model, sae, features, plan.mode, positions, scales, **exclusion)
