"""FeatureFlow: a collection of SAEs of one model at several layers and sites, and what feature flow does with it.

Laptev, Balagansky, Aksenov, Gavrilov, "Analyze Feature Flow to Enhance Interpretation and Steering in Language
Models" (ICML 2025, arXiv 2502.03032); Balagansky, Maksimov, Gavrilov, "Mechanistic Permutability: Match Features
Across Layers" (ICLR 2025, arXiv 2410.07656). The contract is ``shared/design/feature-flow.md``.

    flow = FeatureFlow({(11, "resid"): sae11, (12, "resid"): sae12, (12, "mlp"): m12, (12, "attn"): a12})
    flow = FeatureFlow.from_pretrained("me/gemma-2-2b-saes")   # one subfolder per SAE: layer_{L}/{site}
    flow.match((12, "resid"), (11, "resid"))                   # MatchResult: top-1 ids and cosines per feature
    flow.predecessors(layer=12)                                # PredecessorTable: s(R), s(M), s(A), ids, classes
    g = flow.trace(layer=12, feature=1234)                     # networkx.DiGraph
    flow.plot(g, "flow.png"); flow.to_html(g, "flow.html")
    with flow.steer(model, g, strength=8.0, schedule="exponential", cumulative=True):
        model.generate(**inputs)
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download, snapshot_download
from safetensors import safe_open
from torch import Tensor, nn
from transformers import AutoConfig

from ..errors import FlowError
from ..hub import explain_load_failure, load_sae
from ..sites import D_MODEL_SITES
from .evaluation import annotate_top_tokens, deactivation, mean_nonzero_activations, skip_layer_eval, validate
from .graph import to_graphml, to_json, trace
from .matching import DEFAULT_BLOCK_SIZE, MatchCache, MatchResult, match_decoders, match_features
from .plotting import graph_to_html, plot_graph
from .predecessors import (
    DEFAULT_THRESHOLDS,
    FlowSummary,
    PredecessorTable,
    build_table,
    chance_rate,
    check_threshold,
    predecessor_keys,
)
from .steering import steer_flow

SiteKey = tuple[int, str]
FLOW_SITES = D_MODEL_SITES
"""The sites feature flow compares in (the d_model ones of :mod:`hf_sae.sites`): resid, mlp, attn."""
_SUBFOLDER = re.compile(r"^layer_(\d+)/([A-Za-z_]+)$")


def parse_key(key: Any) -> SiteKey:
    """``(12, "resid")``, ``"12/resid"`` or ``"layer_12/resid"`` -> ``(12, "resid")``."""
    if isinstance(key, str):
        match = re.fullmatch(r"(?:layer_)?(\d+)/([A-Za-z_]+)", key.strip("/"))
        if match is None:
            raise FlowError(
                f"cannot read {key!r} as a (layer, site); use (12, 'resid'), '12/resid' or 'layer_12/resid'."
            )
        key = (int(match.group(1)), match.group(2))
    if (
        not isinstance(key, tuple)
        or len(key) != 2
        or isinstance(key[0], bool)
        or not isinstance(key[0], int)
        or not isinstance(key[1], str)
    ):
        raise FlowError(f"a flow key is a (layer, site) pair such as (12, 'resid'), got {key!r}.")
    return int(key[0]), key[1]


def _check_site(key: SiteKey) -> None:
    if key[1] == "attn_z":
        raise FlowError(
            f"the SAE at {key} reads the attn_z site (concatenated head outputs before o_proj, width "
            "n_heads*head_dim), which is not the residual space that data-free feature flow compares in. Drop it, or "
            "use an SAE trained on the 'attn' site (the output of the post-attention norm)."
        )
    if key[1] not in FLOW_SITES:
        raise FlowError(f"site {key[1]!r} of {key} is unknown to feature flow; use one of {list(FLOW_SITES)}.")


def _model_stem(name: str | None) -> str | None:
    return name.rstrip("/").split("/")[-1] if name else None


class _Entry:
    """One SAE of a flow: its config, and the SAE itself or a way to load it (and its decoder) on demand."""

    def __init__(
        self,
        config,
        sae: nn.Module | None = None,
        load_sae: Callable | None = None,
        load_decoder: Callable | None = None,
    ):
        self.config = config
        self.sae = sae
        self.load_sae = load_sae
        self.load_decoder = load_decoder


class FeatureFlow:
    """SAEs of one model at several (layer, site) points of the residual space, matched by decoder directions.

    Args:
        saes: ``{(layer, site): sae}`` (keys may also be ``"12/resid"`` / ``"layer_12/resid"``) or a list of SAEs
            whose configs say where they live. Sites are ``resid``, ``mlp``, ``attn``; ``attn_z`` is refused.
        t_resid: t_R, the cosine above which a residual feature comes from the previous residual (default 0.5).
        t_mlp, t_attn: t_M, t_A, the cosines above which the mlp / attn SAE explains it (default 0.15).
        t_module: the score above which :meth:`trace` attaches a module predecessor (default 0.15).
        block_size: rows per block of the blockwise matching (memory ~ block_size² floats).
        device: where matching computes (default: where the decoders are).
        cache_dir: folder of the match cache (default ``$HF_SAE_CACHE/flow`` or ``~/.cache/hf_sae/flow``);
            ``False`` keeps matches in memory only.
        max_loaded: for a lazily loaded collection, how many SAEs/decoders stay in memory at once.
    """

    def __init__(
        self,
        saes: Mapping[Any, nn.Module] | Sequence[nn.Module],
        *,
        t_resid: float = DEFAULT_THRESHOLDS["resid"],
        t_mlp: float = DEFAULT_THRESHOLDS["mlp"],
        t_attn: float = DEFAULT_THRESHOLDS["attn"],
        t_module: float = 0.15,
        block_size: int = DEFAULT_BLOCK_SIZE,
        device: str | torch.device | None = None,
        cache_dir: str | os.PathLike | bool | None = None,
        max_loaded: int = 8,
    ):
        if isinstance(saes, Mapping):
            items = [(parse_key(key), sae) for key, sae in saes.items()]
        else:
            items = []
            for sae in saes:
                cfg = getattr(sae, "config", None)
                if cfg is None or cfg.hook_layer is None:
                    raise FlowError("an SAE in the list has no config.hook_layer; pass a {(layer, site): sae} dict.")
                items.append(((cfg.hook_layer, cfg.hook_site), sae))
        entries = {}
        for key, sae in items:
            if not isinstance(sae, nn.Module) or not hasattr(sae, "W_dec"):
                raise FlowError(f"the value for {key} is a {type(sae).__name__}, not an SAE with a W_dec decoder.")
            if key in entries:
                raise FlowError(f"two SAEs for {key}; a flow holds one SAE per (layer, site).")
            entries[key] = _Entry(sae.config, sae=sae)
        self._init(entries, t_resid, t_mlp, t_attn, t_module, block_size, device, cache_dir, max_loaded)

    def _init(self, entries, t_resid, t_mlp, t_attn, t_module, block_size, device, cache_dir, max_loaded):
        if not entries:
            raise FlowError("a FeatureFlow needs at least one SAE, e.g. FeatureFlow({(12, 'resid'): sae}).")
        for key, entry in entries.items():
            _check_site(key)
            cfg = entry.config
            if cfg.hook_layer is not None and (cfg.hook_layer, cfg.hook_site) != key:
                raise FlowError(
                    f"the SAE given for {key} says it lives at ({cfg.hook_layer}, {cfg.hook_site!r}) "
                    "(config.hook_layer / hook_site). Put it under its own key or fix its config."
                )
        widths = {key: entry.config.d_in for key, entry in entries.items()}
        if len(set(widths.values())) > 1:
            first = next(iter(widths.items()))
            other = next((k, w) for k, w in widths.items() if w != first[1])
            raise FlowError(
                f"SAEs read different widths: {first[0]} has d_in={first[1]} but {other[0]} has d_in={other[1]}. "
                "Feature flow compares decoder directions in one residual space; use SAEs of one model's "
                "resid/mlp/attn sites."
            )
        models = {key: entry.config.base_model for key, entry in entries.items() if entry.config.base_model}
        stems = {key: _model_stem(name) for key, name in models.items()}
        if len(set(stems.values())) > 1:
            first = next(iter(models.items()))
            other = next((k, m) for k, m in models.items() if _model_stem(m) != _model_stem(first[1]))
            raise FlowError(
                f"SAEs come from different models: {first[0]} has base_model={first[1]!r} but {other[0]} has "
                f"base_model={other[1]!r}. A flow needs SAEs of one model."
            )
        self._entries: dict[SiteKey, _Entry] = dict(sorted(entries.items()))
        self.thresholds = {
            "resid": check_threshold("t_resid", t_resid),
            "mlp": check_threshold("t_mlp", t_mlp),
            "attn": check_threshold("t_attn", t_attn),
        }
        self.t_module = check_threshold("t_module", t_module)
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
            raise FlowError(f"block_size must be a positive integer, got {block_size!r}.")
        self.block_size = block_size
        self.device = device
        self.cache = False if cache_dir is False else MatchCache(None if cache_dir in (None, True) else cache_dir)
        self.max_loaded = max(1, int(max_loaded))
        self._loaded: OrderedDict[tuple[str, SiteKey], Any] = OrderedDict()
        self._matches: dict[tuple, MatchResult] = {}
        self._chance: dict[tuple, float] = {}
        self.mean_activations: dict[SiteKey, Tensor] = {}
        self.base_model = next(iter(models.values()), None)

    # -------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        sites: Iterable[str] = FLOW_SITES,
        layers: Iterable[int] | None = None,
        lazy: bool = True,
        token: str | bool | None = None,
        **kwargs: Any,
    ) -> FeatureFlow:
        """A flow over a collection on disk or on the Hub: one subfolder per SAE named ``layer_{L}/{site}``.

        Args:
            sites: which sites to take (default resid, mlp, attn; ``attn_z`` subfolders are skipped, since feature
                flow cannot use them).
            layers: which layers to take (default all).
            lazy: read only the configs now; load each SAE (or just its decoder, for matching) on first use, keeping
                at most ``max_loaded`` in memory. ``lazy=False`` loads every SAE at once.
            kwargs: the :class:`FeatureFlow` options (thresholds, block_size, device, cache_dir, max_loaded).
        """
        sites = tuple(sites)
        for site in sites:
            _check_site((0, site))
        wanted_layers = None if layers is None else {int(layer) for layer in layers}
        root, remote = _collection_root(name_or_path, revision, token)
        entries = {}
        for config_path in sorted(root.glob("layer_*/*/config.json")):
            subfolder = config_path.parent.relative_to(root).as_posix()
            match = _SUBFOLDER.match(subfolder)
            if match is None:
                continue
            key = (int(match.group(1)), match.group(2))
            if key[1] not in sites or (wanted_layers is not None and key[0] not in wanted_layers):
                continue
            config = _read_config(config_path)
            entries[key] = _lazy_entry(name_or_path, root, subfolder, config, remote, revision, token)
        if not entries:
            found = sorted(p.parent.relative_to(root).as_posix() for p in root.glob("**/config.json"))
            raise FlowError(
                f"{name_or_path}: no SAE subfolders named layer_{{L}}/{{site}} for sites {list(sites)}"
                f"{'' if wanted_layers is None else f' and layers {sorted(wanted_layers)}'} (found: {found or 'none'})."
                " A collection holds one subfolder per SAE, e.g. layer_12/resid (see hf_sae.hub.push_collection)."
            )
        flow = cls.__new__(cls)
        options = dict(
            t_resid=DEFAULT_THRESHOLDS["resid"],
            t_mlp=DEFAULT_THRESHOLDS["mlp"],
            t_attn=DEFAULT_THRESHOLDS["attn"],
            t_module=0.15,
            block_size=DEFAULT_BLOCK_SIZE,
            device=None,
            cache_dir=None,
            max_loaded=8,
        )
        unknown = sorted(set(kwargs) - set(options))
        if unknown:
            raise FlowError(f"unknown FeatureFlow option(s) {unknown}; known: {sorted(options)}.")
        options.update(kwargs)
        flow._init(entries, **options)
        flow.source = str(name_or_path)
        if not lazy:
            for key in flow.keys():
                entry = flow._entries[key]
                entry.sae, entry.load_sae = flow[key], None
        return flow

    # ----------------------------------------------------------------------------------------------- access
    def keys(self) -> list[SiteKey]:
        """Every (layer, site) of the flow, sorted."""
        return list(self._entries)

    def __contains__(self, key: Any) -> bool:
        try:
            return parse_key(key) in self._entries
        except FlowError:
            return False

    def __len__(self) -> int:
        return len(self._entries)

    def layers(self, site: str = "resid") -> list[int]:
        """The layers that have an SAE at ``site``."""
        return [layer for layer, name in self._entries if name == site]

    def config(self, key: Any):
        return self._entry(parse_key(key), "read its config").config

    def _entry(self, key: SiteKey, why: str, hint: str = "") -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            have = ", ".join(f"{layer}/{site}" for layer, site in self._entries) or "none"
            raise FlowError(
                f"no SAE at (layer {key[0]}, {key[1]!r}) in this flow, needed to {why}. The flow has: {have}. Add "
                f"the SAE for {key} (collection subfolder layer_{key[0]}/{key[1]}){hint}."
            )
        return entry

    def require(self, key: Any, why: str = "continue") -> SiteKey:
        """Raise a :class:`FlowError` naming ``key`` when the flow has no SAE there; return the parsed key."""
        key = parse_key(key)
        self._entry(key, why)
        return key

    def _remember(self, slot: tuple[str, SiteKey], value: Any) -> Any:
        self._loaded[slot] = value
        self._loaded.move_to_end(slot)
        while len(self._loaded) > self.max_loaded:
            self._loaded.popitem(last=False)
        return value

    def __getitem__(self, key: Any) -> nn.Module:
        """The SAE at ``(layer, site)`` (loaded on first use for a lazy collection)."""
        key = parse_key(key)
        entry = self._entry(key, "use it")
        if entry.sae is not None:
            return entry.sae
        slot = ("sae", key)
        if slot in self._loaded:
            self._loaded.move_to_end(slot)
            return self._loaded[slot]
        return self._remember(slot, entry.load_sae())

    def decoder(self, key: Any) -> Tensor:
        """(d_sae, d_in) decoder rows of the SAE at ``key`` (for a lazy collection, read alone from its file)."""
        key = parse_key(key)
        entry = self._entry(key, "match its features")
        if entry.sae is not None:
            return entry.sae.W_dec.detach()
        if ("sae", key) in self._loaded:
            return self._loaded[("sae", key)].W_dec.detach()
        slot = ("decoder", key)
        if slot in self._loaded:
            self._loaded.move_to_end(slot)
            return self._loaded[slot]
        return self._remember(slot, entry.load_decoder())

    def items(self) -> Iterable[tuple[SiteKey, nn.Module]]:
        for key in self._entries:
            yield key, self[key]

    def __repr__(self) -> str:
        sites = {}
        for layer, site in self._entries:
            sites.setdefault(site, []).append(layer)
        text = ", ".join(f"{site}: layers {_ranges(layers)}" for site, layers in sites.items())
        return (
            f"FeatureFlow({len(self)} SAEs; {text}; t_R={self.thresholds['resid']}, t_M={self.thresholds['mlp']}, "
            f"t_A={self.thresholds['attn']})"
        )

    # ---------------------------------------------------------------------------------------------- matching
    def match(self, source: Any, target: Any, k: int = 1, *, one_to_one: bool = False) -> MatchResult:
        """Top-k (default top-1) matches of every feature of the SAE at ``source`` into the SAE at ``target``.

        Returns a :class:`MatchResult` with ``indices`` and ``scores`` (cosines) of shape (F_source, k). Computed
        blockwise (``block_size``), cached in memory and on disk (keyed by both decoders' weights).
        ``one_to_one=True`` solves the linear assignment instead (equal widths only).
        """
        source = self.require(source, f"match it into {target}")
        target = self.require(target, f"match {source} into it")
        memo_key = (source, target, k, one_to_one)
        found = self._matches.get(memo_key)
        if found is None:
            found = match_features(
                self.decoder(source),
                self.decoder(target),
                k,
                one_to_one=one_to_one,
                block_size=self.block_size,
                device=self.device,
                cache=self.cache,
            )
            found.source, found.target = source, target
            self._matches[memo_key] = found
        return found

    def match_rows(self, source: Any, features: Sequence[int] | Tensor, target: Any, k: int = 1) -> MatchResult:
        """Top-k matches of a few features of ``source`` into ``target`` (no full table; used by :meth:`trace`)."""
        source, target = parse_key(source), parse_key(target)
        ids = torch.as_tensor(features, dtype=torch.long).reshape(-1)
        for (a, b, kk, one_to_one), full in self._matches.items():
            if (a, b) == (source, target) and kk >= k and not one_to_one:
                return MatchResult(full.indices[ids, :k], full.scores[ids, :k], source, target)
        decoder = self.decoder(source)
        rows = decoder[ids.to(decoder.device)]
        scores, indices = match_decoders(rows, self.decoder(target), k, block_size=self.block_size, device=self.device)
        return MatchResult(indices, scores, source, target)

    # ------------------------------------------------------------------------------------------ predecessors
    def predecessors(self, layer: int, *, allow_missing: bool = False, chance_samples: int = 1024) -> PredecessorTable:
        """s(R), s(M), s(A), the top-1 predecessor ids and the class of every feature of the resid SAE of ``layer``.

        Needs the SAEs at (layer−1, resid), (layer, mlp) and (layer, attn); a missing one raises a
        :class:`FlowError` naming it, unless ``allow_missing`` (its scores are then NaN and the classes they could
        change ``undetermined``). ``table.chance`` holds each present predecessor's chance rate
        (:meth:`chance`, ``chance_samples`` random directions; 0 skips it).
        """
        target = self.require((layer, "resid"), f"compute predecessors of layer {layer}")
        matches = {}
        for site, key in predecessor_keys(layer):
            if key not in self._entries:
                if allow_missing:
                    matches[site] = None
                    continue
                self._entry(
                    key,
                    f"compute s({site[0].upper()}) for the predecessors of layer {layer}",
                    ", or pass allow_missing=True to score it as absent (NaN)",
                )
            result = self.match(target, key)
            matches[site] = (result.scores[:, 0], result.indices[:, 0])
        table = build_table(layer, matches, self.config(target).d_sae, self.thresholds)
        if chance_samples:
            table.chance = self.chance(layer, n=chance_samples)
        return table

    def chance(self, layer: int, *, n: int = 1024, seed: int = 0) -> dict[str, float]:
        """For each predecessor SAE of resid ``layer`` that the flow has: the fraction of ``n`` random unit
        directions whose top-1 cosine with its dictionary reaches that site's threshold (t_R for resid layer−1,
        t_M / t_A for mlp / attn) — the rate at which such a score arises by chance. Cached per flow."""
        out = {}
        for site, key in predecessor_keys(layer):
            if key not in self._entries:
                continue
            slot = ("chance", (key, n, seed, self.thresholds[site]))
            if slot not in self._chance:
                self._chance[slot] = chance_rate(self.decoder(key), self.thresholds[site], n, seed, self.block_size)
            out[site] = self._chance[slot]
        return out

    def summary(self, layers: Iterable[int] | None = None, *, allow_missing: bool = True) -> FlowSummary:
        """Class counts of every resid layer (the paper's per-layer picture). Missing neighbours count as absent."""
        layers = sorted(self.layers("resid") if layers is None else layers)
        tables = {layer: self.predecessors(layer, allow_missing=allow_missing) for layer in layers}
        counts = {layer: table.counts(detailed=True) for layer, table in tables.items()}
        return FlowSummary(layers, counts, tables)

    # ------------------------------------------------------------------------------------------------- graphs
    def trace(self, layer: int, feature: int, *, direction: str = "both", max_steps: int | None = None):
        """The flow graph of feature ``feature`` of the resid SAE of ``layer`` (a ``networkx.DiGraph``).

        Composes top-1 matches backward (to resid layer−1, layer−2, ...) and forward (layer+1, ...), attaching
        each resid node's top-1 mlp / attn predecessors scoring ≥ ``t_module``; a direction stops where s(R) < t_R
        or where the flow has no SAE. See :func:`hf_sae.flow.graph.trace`.
        """
        return trace(self, layer, feature, direction=direction, max_steps=max_steps)

    def plot(self, graph, path, **kwargs) -> None:
        """Write a layered picture of ``graph`` (PNG, SVG or PDF by the file extension); see plotting.plot_graph."""
        plot_graph(graph, path, **kwargs)

    def to_html(self, graph, path, **kwargs) -> None:
        """Write a self-contained interactive HTML view of ``graph`` (hover shows node attributes)."""
        graph_to_html(graph, path, **kwargs)

    @staticmethod
    def to_json(graph, path=None) -> str:
        return to_json(graph, path)

    @staticmethod
    def to_graphml(graph, path) -> None:
        to_graphml(graph, path)

    # ------------------------------------------------------------------------------------------------ steering
    def steer(self, model: nn.Module, graph, strength: float | Mapping[str, float] = 8.0, **kwargs):
        """Steer ``model`` along a flow graph (rescale or activate its features, one layer or cumulative, with a
        constant / linear / exponential schedule); see :func:`hf_sae.flow.steering.steer_flow`."""
        return steer_flow(self, model, graph, strength, **kwargs)

    # ---------------------------------------------------------------------------------------------- evaluation
    def calibrate(self, model: nn.Module, texts, **kwargs) -> dict[SiteKey, Tensor]:
        """Mean non-zero activation of every latent of every SAE (the TopK analogue of JumpReLU folding)."""
        self.mean_activations.update(mean_nonzero_activations(self, model, texts, **kwargs))
        return self.mean_activations

    def validate(self, model: nn.Module, texts, **kwargs):
        """The paper's data-based check of the predecessor scores; see :func:`hf_sae.flow.evaluation.validate`."""
        return validate(self, model, texts, **kwargs)

    def deactivation(self, model: nn.Module, texts, layer: int, **kwargs):
        """Remove each top-1 predecessor and measure 1 − z_new/z_old of its target; see evaluation.deactivation."""
        return deactivation(self, model, texts, layer, **kwargs)

    def skip_layer_eval(self, model: nn.Module, layer: int, texts, **kwargs):
        """EV and LM-loss change of the matched "transcoder" resid ``layer`` → ``layer + 1`` (Mechanistic
        Permutability Eq. 5); see :func:`hf_sae.flow.evaluation.skip_layer_eval`."""
        return skip_layer_eval(self, model, layer, texts, **kwargs)

    def annotate(self, graph, model: nn.Module, texts, **kwargs):
        """Add each node's top activating tokens (``top_tokens``) for the HTML view; see evaluation.annotate."""
        return annotate_top_tokens(self, graph, model, texts, **kwargs)


# -------------------------------------------------------------------------------------------- collections on disk
def _ranges(layers: list[int]) -> str:
    layers = sorted(layers)
    if not layers:
        return "-"
    parts, start, prev = [], layers[0], layers[0]
    for layer in layers[1:] + [None]:
        if layer is not None and layer == prev + 1:
            prev = layer
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if layer is not None:
            start = prev = layer
    return ",".join(parts)


def _collection_root(name_or_path, revision, token) -> tuple[Path, bool]:
    """The folder holding the collection's ``layer_*/*/config.json`` (a Hub repo: a snapshot of the configs only)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path, False
    if os.path.sep in str(name_or_path) and not re.fullmatch(r"[\w.-]+/[\w.-]+", str(name_or_path)):
        raise FlowError(f"{name_or_path}: no such folder, and it is not a Hub repo id (namespace/name).")
    try:
        root = snapshot_download(
            str(name_or_path),
            revision=revision,
            token=token,
            allow_patterns=["layer_*/*/config.json", "collection.json"],
        )
    except Exception as err:
        better = explain_load_failure(str(name_or_path), err, revision=revision)
        if better is not None:
            raise better from err
        raise
    return Path(root), True


def _read_config(path: Path):
    """The SAE config in ``path``'s folder; AutoConfig knows the hf-sae classes (``import hf_sae`` registered them,
    and it ran before this subpackage could be imported)."""
    try:
        return AutoConfig.from_pretrained(str(path.parent))
    except ValueError as err:
        raise FlowError(f"{path}: not an hf-sae SAE config ({err}).") from err


def _lazy_entry(name_or_path, root: Path, subfolder: str, config, remote: bool, revision, token) -> _Entry:
    def weights_file() -> str:
        if not remote:
            return str(root / subfolder / "model.safetensors")
        return hf_hub_download(str(name_or_path), f"{subfolder}/model.safetensors", revision=revision, token=token)

    def load_whole_sae() -> nn.Module:
        if remote:
            return load_sae(str(name_or_path), subfolder=subfolder, revision=revision).eval()
        return load_sae(root / subfolder).eval()

    def load_decoder() -> Tensor:
        with safe_open(weights_file(), framework="pt") as f:
            if "W_dec" not in f.keys():
                raise FlowError(f"{name_or_path}/{subfolder}/model.safetensors has no W_dec tensor: not an hf-sae SAE.")
            return f.get_tensor("W_dec")

    return _Entry(config, load_sae=load_whole_sae, load_decoder=load_decoder)
