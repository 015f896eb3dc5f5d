"""Steering a language model with SAE features, and attaching an SAE to record or splice.

Three steering modes act on the activation h (B, T, d_in) at the SAE's site (``config.hook_layer`` /
``config.hook_site``, resolved by :mod:`hf_sae.sites`), for every steered feature f with strength s:

* ``add``:    h <- h + s * W_dec[f] / ||W_dec[f]||           (the unit decoder direction times s)
* ``clamp``:  h <- h + decode(z') - decode(z)                  z = encode(h), z' = z with latent f set to s
              = h + sum_f (s_f - z_f) * W_dec[f]  (/ activation_scale for an unfolded SAE); b_dec and every latent
              that is not steered cancel, so the SAE's reconstruction error h - decode(z) is kept.
* ``ablate``: clamp to 0.

Steering acts on every position the model processes, at prefill and at every KV-cached decode step, with no special
case for either; greedy ``generate`` therefore gives the same tokens with ``use_cache=True`` and ``False``.
``positions`` picks ``"all"``, ``"prompt"`` or ``"generated"`` positions; padded positions (``attention_mask == 0``)
are never touched, and neither are BOS and the SAE's ``excluded_token_ids`` (the tokens it was not trained on;
``exclude_token_ids`` overrides the set, ``[]`` steers every token). To know which positions a forward holds, a
forward pre-hook on the decoder stack (shared by every hook on that model, see :class:`_PositionTracker`) reads
``input_ids``, ``attention_mask`` and the cache length; without a cache, beam search's reordered beams are followed.

Strengths are in the model's units by default; ``units="max" | "mean" | "residual_norm"`` and strings such as
``"2x"`` scale them by the SAE's feature statistics (:func:`strengths_in_latent_units`). Besides SAE features, a
:class:`SteeringVector` (e.g. :func:`hf_sae.contrastive_vector`) or an edit function ``fn`` can be steered through the
same hooks.

The SAE computes in its own dtype: the activation is cast to the SAE's dtype, the edit computed, and the result cast
back to the model's dtype. The SAE is moved to the device of the hooked layer.

Every hook is removed on exit of the ``with`` block, also when the body raises; handles nest and compose (two
handles on one site apply in the order they were made), ``handle.remove()`` is the form for long-lived use, and a
removed handle installs its hooks again when it is used again.
"""

from __future__ import annotations

import math
import re
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .errors import SteeringError
from .lm_inputs import excluded_token_ids
from .sites import Site, decoder_stack, resolve_sae_site, resolve_site
from .sparse import SparseLatents

Mode = Literal["add", "clamp", "ablate"]
Positions = Literal["all", "prompt", "generated"]
Units = Literal["absolute", "max", "mean", "residual_norm"]
MODES = ("add", "clamp", "ablate")
POSITIONS = ("all", "prompt", "generated")
UNITS = ("absolute", "max", "mean", "residual_norm")

FeatureStrengths = Mapping[int, float | str] | Iterable[int]


# ------------------------------------------------------------------------------------------------ position tracking
@dataclass
class _ForwardState:
    """What the current forward of the decoder stack holds.

    Attributes:
        batch, length: B and T of this forward.
        start: absolute position of the first of the T tokens (the number of cached tokens before them).
        prompt_length: number of prompt tokens of the sequence being processed (padding included).
        real: (B, T) bool, False at padded positions; None when every position is real.
        input_ids: (B, T) token ids, or None when the forward got ``inputs_embeds``.
    """

    batch: int
    length: int
    start: int
    prompt_length: int
    real: Tensor | None
    input_ids: Tensor | None

    def mask(self, positions: str, exclude_token_ids: Tensor | None = None) -> Tensor | None:
        """(B, T) bool of the positions to edit, or None for "every position"."""
        mask = self.real
        if positions != "all":
            absolute = torch.arange(self.start, self.start + self.length, device=self._device())
            chosen = absolute < self.prompt_length if positions == "prompt" else absolute >= self.prompt_length
            chosen = chosen.expand(self.batch, self.length)
            mask = chosen if mask is None else mask & chosen
        if exclude_token_ids is not None and self.input_ids is not None:
            kept = ~torch.isin(self.input_ids, exclude_token_ids.to(self.input_ids.device))
            mask = kept if mask is None else mask & kept
        return mask

    def _device(self) -> torch.device:
        for tensor in (self.real, self.input_ids):
            if tensor is not None:
                return tensor.device
        return torch.device("cpu")


class _PositionTracker:
    """A forward pre-hook on a model's decoder stack that records which positions each forward holds.

    A forward continues the previous sequence when the cache already holds tokens (a KV-cached decode step), or, with
    no cache, when its ``input_ids`` are the previous call's plus one token (``generate(use_cache=False)``); any other
    forward starts a new sequence whose prompt is all of its tokens. One tracker serves every hook on the model and
    is removed with the last of them.
    """

    _trackers: weakref.WeakKeyDictionary[nn.Module, _PositionTracker] = weakref.WeakKeyDictionary()

    def __init__(self, stack: nn.Module):
        self.stack = stack
        self.users = 0
        self.state: _ForwardState | None = None
        self._previous_ids: Tensor | None = None
        self._handle = stack.register_forward_pre_hook(self._before_forward, with_kwargs=True, prepend=True)

    @classmethod
    def acquire(cls, model: nn.Module) -> _PositionTracker:
        stack = decoder_stack(model)
        tracker = cls._trackers.get(stack)
        if tracker is None:
            tracker = cls._trackers[stack] = cls(stack)
        tracker.users += 1
        return tracker

    def release(self) -> None:
        self.users -= 1
        if self.users <= 0:
            self._handle.remove()
            self._trackers.pop(self.stack, None)

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        reference = input_ids if input_ids is not None else embeds
        if reference is None:
            self.state = None
            return
        batch, length = reference.shape[:2]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        start = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        mask = kwargs.get("attention_mask")
        real = None
        if isinstance(mask, Tensor) and mask.ndim == 2 and mask.shape[0] == batch and mask.shape[1] >= length:
            real = mask[:, -length:].bool()
            if bool(real.all()):
                real = None
        previous = self.state
        if start > 0:
            prompt_length = previous.prompt_length if previous is not None else start
        elif self._continues_without_cache(input_ids):
            prompt_length = previous.prompt_length
        else:
            prompt_length = length
        self._previous_ids = input_ids if start == 0 else None
        self.state = _ForwardState(batch, length, start, prompt_length, real, input_ids)

    def _continues_without_cache(self, input_ids: Tensor | None) -> bool:
        """Whether ``input_ids`` extend the previous forward's sequences by one token each, in any row order: beam
        search without a cache reorders (and duplicates) its beams between steps, so each row's prefix must equal
        *some* row of the previous forward, not the row at the same index."""
        previous = self._previous_ids
        if input_ids is None or previous is None or self.state is None:
            return False
        if input_ids.shape[0] != previous.shape[0] or input_ids.shape[1] != previous.shape[1] + 1:
            return False
        prefix = input_ids[:, :-1]
        if torch.equal(prefix, previous):
            return True
        same = (prefix.unsqueeze(1) == previous.unsqueeze(0)).all(-1)  # (B, B): row i extends previous row j
        return bool(same.any(1).all())


# ----------------------------------------------------------------------------------------------------- site hooks
class SiteHook:
    """A hook on one site that edits the activation at the chosen positions; the base of steering, attach,
    activation patches, steering vectors and feature-flow steering.

    A subclass overrides ``_edit(activation, mask)`` (activation (B, T, d), mask (B, T) bool of the positions to edit
    or None for all of them) and returns the new activation, usually through :meth:`add_constant` or
    :meth:`add_to_rows`; :meth:`remove` takes the hook (and its share of the position tracker) off the model and
    :meth:`install` puts it back.

    Args:
        model: the language model.
        sae: the SAE whose site (``config.hook_layer`` / ``hook_site``) is hooked; None with ``site``.
        positions: ``"all"``, ``"prompt"`` or ``"generated"``.
        exclude_token_ids: token ids never edited (BOS, padding ids, ...).
        site: the :class:`~hf_sae.sites.Site` to hook when there is no SAE (a steering vector, a custom function).
        default_exclusion: ``exclude_token_ids`` is a default (BOS and the SAE's excluded ids) rather than the
            caller's choice: a forward whose token ids are unknown (``inputs_embeds``) then edits every position
            with a warning instead of raising.
    """

    def __init__(
        self,
        model: nn.Module,
        sae: nn.Module | None,
        positions: str = "all",
        exclude_token_ids: Sequence[int] | None = None,
        *,
        site: Site | None = None,
        default_exclusion: bool = False,
    ):
        if positions not in POSITIONS:
            raise SteeringError(f"positions={positions!r} is unknown. Use one of {list(POSITIONS)}.")
        self.model = model
        self.sae = sae
        self.positions = positions
        self.site: Site = resolve_sae_site(model, sae) if site is None else site
        device = _module_device(self.site.module)
        if sae is not None and device is not None and sae.W_dec.device != device:
            sae.to(device)
        # the dtype edits are computed in: the SAE's, or float32 for a hook without an SAE
        self.compute_dtype = sae.W_dec.dtype if sae is not None else torch.float32
        self.exclude_token_ids = (
            torch.tensor(sorted(set(exclude_token_ids)), dtype=torch.long) if exclude_token_ids else None
        )
        self.default_exclusion = default_exclusion
        self._warned = False
        self._cast: dict[torch.dtype, Tensor] = {}
        self._tracker: _PositionTracker | None = None
        self._handle: RemovableHandle | None = None
        self.install()

    @property
    def active(self) -> bool:
        return self._handle is not None

    def install(self) -> None:
        """Put the hook (back) on its site; a hook already installed stays as it is."""
        if self._handle is None:
            self._tracker = _PositionTracker.acquire(self.model)
            self._handle = self.site.register(self._hook)

    def add_constant(self, activation: Tensor, mask: Tensor | None, vector: Tensor) -> Tensor:
        """activation + vector at the steered positions; ``vector`` (d,) is cast once per activation dtype."""
        cast = self._cast.get(activation.dtype)
        if cast is None:
            cast = self._cast[activation.dtype] = vector.to(activation.dtype)
        if mask is None:
            return activation + cast
        return activation + mask.unsqueeze(-1).to(activation.dtype) * cast

    def add_to_rows(self, activation: Tensor, mask: Tensor | None, delta: Callable[[Tensor], Tensor]) -> Tensor:
        """activation + delta(x) at the steered positions, x (N, d) those rows of the activation in
        :attr:`compute_dtype` (the SAE's).

        The delta is computed without gradients and cast back to the activation's dtype: gradients still flow
        through the activation (the edit counts as a constant), so steering works inside training or attribution
        code too.
        """
        rows = activation.reshape(-1, activation.shape[-1]) if mask is None else activation[mask]
        with torch.no_grad():
            change = delta(rows.detach().to(self.compute_dtype)).to(activation.dtype)
        edited = rows + change
        if mask is None:
            return edited.reshape(activation.shape)
        out = activation.clone()
        out[mask] = edited
        return out

    def remove(self) -> None:
        """Remove exactly this hook (idempotent)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._tracker is not None:
            self._tracker.release()
            self._tracker = None

    def _warn_once(self, why: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"steering at site {self.site.key}: {why}, so BOS and the excluded token ids "
                f"{self.exclude_token_ids.tolist()} cannot be recognised and every position is edited. Call the "
                "model with input_ids (generate does), or pass exclude_token_ids=[] to silence this.",
                stacklevel=4,
            )

    def _mask(self, activation: Tensor) -> Tensor | None:
        """(B, T) bool of positions to edit in this forward, or None for all of them."""
        state = self._tracker.state if self._tracker is not None else None
        excluding = self.exclude_token_ids is not None
        if state is None or tuple(activation.shape[:2]) != (state.batch, state.length):
            if self.positions != "all" or (excluding and not self.default_exclusion):
                raise SteeringError(
                    f"the activation at site {self.site.key} has shape {tuple(activation.shape)}, which does not "
                    "match the tokens the model was called with, so positions/exclude_token_ids cannot be applied. "
                    "Call the model (or its base model) with input_ids, or use positions='all'."
                )
            if excluding:
                self._warn_once("the forward's tokens are unknown")
            return None
        if excluding and state.input_ids is None:
            if not self.default_exclusion:
                raise SteeringError(
                    f"exclude_token_ids={self.exclude_token_ids.tolist()} needs token ids, but the model was called "
                    "with inputs_embeds. Call it with input_ids, or pass exclude_token_ids=[]."
                )
            self._warn_once("the model was called with inputs_embeds")
        mask = state.mask(self.positions, self.exclude_token_ids)
        if mask is not None and bool(mask.all()):
            return None
        return mask.to(activation.device) if mask is not None else None

    def _hook(self, activation: Tensor) -> Tensor | None:
        mask = self._mask(activation)
        if mask is not None and not bool(mask.any()):
            return None
        return self._edit(activation, mask)

    def _edit(self, activation: Tensor, mask: Tensor | None) -> Tensor | None:  # pragma: no cover - overridden
        raise TypeError(f"{type(self).__name__} must implement _edit()")


def steering_exclusion(model: nn.Module, configs: Iterable[Any], exclude_token_ids: Sequence[int] | None) -> dict:
    """The :class:`SiteHook` keywords of a steering hook: ``exclude_token_ids`` as given, or by default BOS and the
    ``excluded_token_ids`` of the SAE ``configs`` (then ``default_exclusion``: unknown token ids warn, not raise)."""
    return {
        "exclude_token_ids": excluded_token_ids(model, configs, exclude_token_ids),
        "default_exclusion": exclude_token_ids is None,
    }


def _module_device(module: nn.Module) -> torch.device | None:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return None


# -------------------------------------------------------------------------------------------------------- steering
_TIMES = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*[xX×]\s*$")


class _SteeringHook(SiteHook):
    """Edits the activation by one of the modes of the module docstring, for a set of (feature, strength) pairs;
    strengths are converted from ``units`` to the SAE's latent units (:func:`strengths_in_latent_units`)."""

    def __init__(
        self,
        model: nn.Module,
        sae: nn.Module,
        features: FeatureStrengths,
        mode: str = "add",
        positions: str = "all",
        strength: float | str | None = None,
        units: str = "absolute",
        exclude_token_ids: Sequence[int] | None = None,
    ):
        if mode not in MODES:
            raise SteeringError(f"mode={mode!r} is unknown. Use one of {list(MODES)}.")
        feature_ids, strengths = _feature_strengths(features, sae.config.d_sae, mode, strength)
        super().__init__(model, sae, positions, **steering_exclusion(model, [sae.config], exclude_token_ids))
        self.mode = mode
        self.units = units
        device = sae.W_dec.device
        self.feature_ids = torch.tensor(feature_ids, dtype=torch.long, device=device)
        values = strengths_in_latent_units(sae, feature_ids, strengths, units, mode)
        self.strengths = values.to(device=device, dtype=sae.W_dec.dtype)  # latent values z'_f (add: lengths)
        with torch.no_grad():
            directions = sae.W_dec[self.feature_ids]  # (m, d_in)
            if mode == "add":
                unit = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                self.add_vector = self.strengths @ unit  # (d_in,) = sum_f s_f W_dec[f] / ||W_dec[f]||
            else:
                self.directions = directions / _activation_scale(sae)  # decode(z') - decode(z) = (s - z_f) d_f

    def _edit(self, activation: Tensor, mask: Tensor | None) -> Tensor:
        if self.mode == "add":
            return self.add_constant(activation, mask, self.add_vector)
        return self.add_to_rows(
            activation, mask, lambda x: clamp_delta(self.sae, x, self.feature_ids, self.strengths, self.directions)
        )


def _activation_scale(sae: nn.Module) -> float:
    """The factor between the SAE's decode and the model's units (1 once folded)."""
    return sae.config.activation_scale if not sae.config.activation_scale_folded else 1.0


def strengths_in_latent_units(
    sae: nn.Module,
    feature_ids: Sequence[int],
    strengths: Sequence[float | str],
    units: str = "absolute",
    mode: str = "add",
) -> Tensor:
    """(m,) float64: each strength in the units the hooks apply (``add``: the norm of the added vector, in model
    units; ``clamp``: the latent value z'_f), from ``units``.

    With d_f = W_dec[f] / activation_scale the feature's decoded direction in model units (‖d_f‖ = 1 for a folded
    unit-norm SAE) and the SAE's :class:`~hf_sae.latent_stats.FeatureStats` (max_f, mean_f: the feature's peak and
    mean activation where it fires; ρ: the mean activation norm at the site):

    ================= ============================== ==============================
    units             add (norm of the added vector)  clamp (latent value z'_f)
    ================= ============================== ==============================
    ``absolute``      s                              s
    ``max``           s · max_f · ‖d_f‖              s · max_f
    ``mean``          s · mean_f · ‖d_f‖             s · mean_f
    ``residual_norm`` s · ρ                          s · ρ / ‖d_f‖
    ================= ============================== ==============================

    A strength given as a string ``"2x"`` is 2 × the feature's peak, whatever ``units`` says (the ``max`` row).
    ``absolute`` is the default and keeps the meaning strengths always had.
    """
    if units not in UNITS:
        raise SteeringError(f"units={units!r} is unknown. Use one of {list(UNITS)}.")
    ids = torch.as_tensor(list(feature_ids), dtype=torch.long)
    numbers = torch.tensor([strength_number(v) for v in strengths], dtype=float)
    row_units = [("max" if isinstance(v, str) else units) for v in strengths]
    if all(u == "absolute" for u in row_units) or mode == "ablate":
        return numbers
    stats = getattr(sae, "feature_stats", None)
    if stats is None:
        raise SteeringError(
            f"strengths in units={units!r} (or 'Nx') need the SAE's feature statistics, and this SAE has none. "
            "Measure them once with hf_sae.feature_stats(model, sae, texts) (then save_pretrained keeps them), "
            "or give strengths in absolute units."
        )
    with torch.no_grad():
        decoded_norm = (sae.W_dec[ids.to(sae.W_dec.device)].double().norm(dim=-1) / _activation_scale(sae)).cpu()
    reference = {
        "max": stats.max_activation[ids].double(),
        "mean": stats.mean_activation[ids].double(),
    }
    out = numbers.clone()
    for row, unit in enumerate(row_units):
        if unit == "absolute":
            continue
        if unit == "residual_norm":
            length = numbers[row] * stats.activation_norm
            out[row] = length if mode == "add" else length / decoded_norm[row].clamp_min(1e-12)
            continue
        value = reference[unit][row]
        if value == 0:
            raise SteeringError(
                f"feature {int(ids[row])} never fired on the {stats.n_tokens:,} tokens of its statistics, so it has "
                f"no {unit} activation to scale by. Give its strength in absolute units."
            )
        latent = numbers[row] * value
        out[row] = latent * decoded_norm[row] if mode == "add" else latent
    return out


def clamp_delta(
    sae: nn.Module,
    x: Tensor,
    feature_ids: Tensor,
    strengths: Tensor,
    directions: Tensor | None = None,
) -> Tensor:
    """decode(z') - decode(z) for x: (N, d_in), z = sae.encode(x), z' = z with latents ``feature_ids`` set to
    ``strengths``: (N, d_in) = sum_f (s_f - z_f) W_dec[f] (divided by activation_scale for an unfolded SAE).

    ``directions`` (m, d_in), the scaled decoder rows, can be passed precomputed.
    """
    current = latent_values(sae.encode(x), feature_ids, sae.config.d_sae)  # (N, m): z_f, 0 outside the top k
    if directions is None:
        directions = sae.W_dec[feature_ids] / _activation_scale(sae)
    return (strengths - current) @ directions


def latent_values(latents: SparseLatents, feature_ids: Tensor, d_sae: int) -> Tensor:
    """(N, m) the values of latents ``feature_ids`` (m,) in (N, k) sparse latents (0 where a feature is not among a
    row's k), by the cheaper of an (N, k, m) comparison and a dense (N, d_sae) gather."""
    if latents.k * feature_ids.numel() <= d_sae:
        match = latents.indices.unsqueeze(-1) == feature_ids  # (N, k, m)
        return (latents.values.unsqueeze(-1) * match).sum(dim=1)
    return latents.to_dense(d_sae)[:, feature_ids]


def strength_number(value: float | str) -> float:
    """The number of a strength: N for a string "Nx" (validated by the steering entry points), else the value."""
    return float(_TIMES.match(value).group(1)) if isinstance(value, str) else float(value)


def _strength_value(value: Any, feature: int) -> float | str:
    """A finite number, or a string "Nx" (N times the feature's peak activation)."""
    if isinstance(value, str):
        match = _TIMES.match(value)
        if match is None or not math.isfinite(float(match.group(1))):
            raise SteeringError(
                f"strength {value!r} of feature {feature} is not understood: give a number (8.0) or a multiple of "
                "the feature's peak activation as a string such as '2x'."
            )
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SteeringError(f"strength {value!r} of feature {feature} must be a finite number, e.g. 8.0, or '2x'.")
    return float(value)


def _feature_strengths(
    features: FeatureStrengths, d_sae: int, mode: str, strength: float | str | None
) -> tuple[list[int], list[float | str]]:
    """Validate features: a {feature: strength} dict, or feature ids with one ``strength`` (ablate: 0)."""
    if isinstance(features, Mapping):
        pairs = list(features.items())
    elif isinstance(features, int) or isinstance(features, Iterable) and not isinstance(features, (str, bytes)):
        ids = [features] if isinstance(features, int) else list(features)
        if strength is None and mode != "ablate":
            raise SteeringError(
                f"features {ids} were given without strengths. Pass a dict such as {{{ids[0] if ids else 0}: 8.0}} "
                "or strength=8.0 for all of them."
            )
        pairs = [(f, 0.0 if mode == "ablate" else strength) for f in ids]
    else:
        raise SteeringError(
            f"features must be a dict {{feature_id: strength}} or a list of feature ids, got {type(features).__name__}."
        )
    if not pairs:
        raise SteeringError("no features to steer: pass at least one, e.g. {1234: 8.0}.")
    ids, values = [], []
    for feature, value in pairs:
        if isinstance(feature, bool) or not isinstance(feature, (int, torch.Tensor)) or not 0 <= int(feature) < d_sae:
            raise SteeringError(
                f"feature {feature!r} is out of range: this SAE has d_sae={d_sae} latents, ids 0..{d_sae - 1}. "
                "Pick a feature id below d_sae (e.g. from hf_sae.top_features)."
            )
        ids.append(int(feature))
        values.append(0.0 if mode == "ablate" else _strength_value(value, int(feature)))
    return ids, values


class _FunctionHook(SiteHook):
    """Replaces the activation rows h (N, d) at the steered positions by ``fn(h)`` (same shape), computed in the
    SAE's dtype (float32 without an SAE) and cast back; gradients flow through h as for every steering edit."""

    def __init__(self, model: nn.Module, sae: nn.Module | None, fn: Callable[[Tensor], Tensor], **options: Any):
        if not callable(fn):
            raise SteeringError(f"fn must be a function h (N, d) -> h' (N, d), got {type(fn).__name__}.")
        super().__init__(model, sae, **options)
        self.fn = fn

    def _edit(self, activation: Tensor, mask: Tensor | None) -> Tensor:
        return self.add_to_rows(activation, mask, self._delta)

    def _delta(self, rows: Tensor) -> Tensor:
        edited = self.fn(rows)
        if not isinstance(edited, Tensor) or edited.shape != rows.shape:
            shape = tuple(edited.shape) if isinstance(edited, Tensor) else type(edited).__name__
            raise SteeringError(
                f"the edit function at site {self.site.key} returned {shape} for rows of shape {tuple(rows.shape)}; "
                "it must return a tensor of the same shape (the edited activation rows)."
            )
        return edited.to(rows.dtype) - rows


@dataclass
class SteeringVector:
    """A direction to add at one site of a model (e.g. :func:`hf_sae.contrastive_vector`'s difference of means).

    ``h <- h + strength * vector`` at the steered positions, through the same hooks, positions and BOS handling as
    SAE steering: ``hf_sae.steer(model, vector, strength=4.0)`` or ``vector.steer(model, strength=4.0)``.

    Attributes:
        vector: (d,) in model units (strength 1 adds it as it is).
        layer, site: where it acts (``hf_sae.resolve_site``).
        description: how it was made (shown in reprs and the sweep table).
    """

    vector: Tensor
    layer: int
    site: str
    description: str = ""

    @property
    def norm(self) -> float:
        return float(self.vector.norm())

    def steer(self, model: nn.Module, strength: float = 1.0, **options: Any) -> SteeringHandle:
        """``hf_sae.steer(model, self, strength=strength, **options)``."""
        return steer(model, self, strength=strength, **options)

    def __repr__(self) -> str:
        what = f", {self.description}" if self.description else ""
        return f"SteeringVector(layer={self.layer}, site={self.site!r}, norm={self.norm:.4g}{what})"


class _VectorHook(SiteHook):
    """Adds ``strength * vector.vector`` at the steered positions of the vector's site."""

    def __init__(self, model: nn.Module, vector: SteeringVector, strength: float, **options: Any):
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise SteeringError(f"strength {strength!r} of the steering vector must be a finite number, e.g. 4.0.")
        site = resolve_site(model, vector.layer, vector.site)
        if vector.vector.shape != (site.width,):
            raise SteeringError(
                f"the steering vector has shape {tuple(vector.vector.shape)} but site {site.key} of this model has "
                f"width {site.width}: it was made for another model or site."
            )
        super().__init__(model, None, site=site, **options)
        self.strength = float(strength)
        device = _module_device(site.module) or vector.vector.device
        self.add_vector = (self.strength * vector.vector.double()).to(device=device, dtype=torch.float32)

    def _edit(self, activation: Tensor, mask: Tensor | None) -> Tensor:
        return self.add_constant(activation, mask, self.add_vector)


def install_hooks(hooks: Iterable[SiteHook]) -> list[SiteHook]:
    """Run ``hooks`` (typically a generator that validates its entries and installs one hook per step) to the end;
    when a step raises, the hooks already installed are removed again, so a failed call leaves the model clean."""
    installed: list[SiteHook] = []
    try:
        for hook in hooks:
            installed.append(hook)
    except BaseException:
        for hook in installed:
            hook.remove()
        raise
    return installed


class SteeringHandle:
    """The hooks of one :func:`steer` call. Active from creation until ``remove()`` or the end of a ``with`` block.

    ``handle.generate(**inputs)`` (and ``handle(**inputs)``) runs the model with the hooks and, outside a ``with``
    block, removes them afterwards: ``sae.steer(model, {1234: 8.0}).generate(**inputs)`` leaves the model clean. A
    handle can be used again: each ``generate`` outside a ``with`` block, and each ``with`` block, puts the hooks
    back first (re-installed hooks run after hooks made since). ``with`` blocks of one handle nest: the hooks come
    off when the outermost one exits.
    """

    def __init__(self, model: nn.Module, hooks: list[SiteHook]):
        self.model = model
        self.hooks = hooks
        self._depth = 0

    @property
    def active(self) -> bool:
        return any(hook.active for hook in self.hooks)

    def install(self) -> None:
        """Put every hook of this handle (back) on the model."""
        for hook in self.hooks:
            hook.install()

    def remove(self) -> None:
        """Remove every hook of this handle (and nothing else); safe to call twice."""
        for hook in self.hooks:
            hook.remove()

    def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        one_shot = self._depth == 0
        if one_shot:
            self.install()
        try:
            return fn(*args, **kwargs)
        finally:
            if one_shot:
                self.remove()

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """``model.generate(*args, **kwargs)`` under this steering; one-shot outside a ``with`` block."""
        return self._run(self.model.generate, *args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)`` under this steering; one-shot outside a ``with`` block."""
        return self._run(self.model, *args, **kwargs)

    def __enter__(self) -> SteeringHandle:
        if self._depth == 0:
            self.install()
        self._depth += 1
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.remove()

    def __repr__(self) -> str:
        parts = []
        for hook in self.hooks:
            if isinstance(hook, _SteeringHook):
                strengths = dict(zip(hook.feature_ids.tolist(), hook.strengths.tolist(), strict=True))
                parts.append(f"{hook.site.key}:{hook.mode}{strengths}")
            elif isinstance(hook, _VectorHook):
                parts.append(f"{hook.site.key}:vector x{hook.strength:g}")
            elif isinstance(hook, _FunctionHook):
                parts.append(f"{hook.site.key}:fn {getattr(hook.fn, '__name__', type(hook.fn).__name__)}")
        return f"SteeringHandle({', '.join(parts)}, active={self.active})"


def steer(
    model: nn.Module,
    saes_or_sae: nn.Module | SteeringVector | Sequence[tuple] | Mapping[nn.Module, FeatureStrengths] | None = None,
    features: FeatureStrengths | None = None,
    *,
    mode: Mode = "add",
    positions: Positions = "all",
    strength: float | str | None = None,
    units: Units = "absolute",
    exclude_token_ids: Sequence[int] | None = None,
    fn: Callable[[Tensor], Tensor] | None = None,
    layer: int | None = None,
    site: str | None = None,
) -> SteeringHandle:
    """Steer ``model`` with SAE features, a steering vector or an edit function; returns a :class:`SteeringHandle`
    (context manager, ``.generate``).

    Args:
        model: a ``*ForCausalLM`` or base decoder model (Gemma-2/3, Llama-like).
        saes_or_sae: one SAE (then ``features`` is required), a list of ``(sae, features)`` or
            ``(sae, features, mode)`` tuples, or a ``{sae: features}`` dict (several SAEs, layers, sites at once); or
            a :class:`SteeringVector` (with ``strength``, default 1); or None with ``fn`` and ``layer`` / ``site``.
        features: ``{feature_id: strength}``, or a list of ids with ``strength`` (``ablate`` needs no strength). A
            strength may be a string ``"2x"``: twice the feature's peak activation (its feature statistics).
        mode: ``"add"`` (h + s W_dec[f]/||W_dec[f]||), ``"clamp"`` (h + decode(z') - decode(z), z'_f = s) or
            ``"ablate"`` (clamp to 0); see the module docstring.
        positions: ``"all"``, ``"prompt"`` or ``"generated"``; padded positions are never steered.
        strength: the strength of every feature when ``features`` is a list of ids; a steering vector's multiplier.
        units: what a number means (:func:`strengths_in_latent_units`): ``"absolute"`` (the default, model units),
            ``"max"`` / ``"mean"`` (multiples of each feature's peak / mean activation) or ``"residual_norm"``
            (multiples of the site's mean activation norm); the relative units need ``sae.feature_stats``.
        exclude_token_ids: token ids never steered. Default: BOS and the SAE's ``excluded_token_ids`` (the tokens it
            was not trained on, whose activations are outliers); ``[]`` steers every token.
        fn: an edit function ``h (N, d) -> h' (N, d)`` applied to the activation rows at the steered positions, at
            the SAE's site (``steer(model, sae, fn=f)``) or at ``layer`` / ``site`` (``steer(model, fn=f, layer=8,
            site="resid")``).

    Example::

        out = hf_sae.steer(model, sae, {1234: 8.0}).generate(**inputs, max_new_tokens=40)
        with hf_sae.steer(model, sae, {1234: "2x"}, mode="clamp"):   # twice the feature's peak activation
            model.generate(**inputs)
        with hf_sae.steer(model, [(sae_l6, {12: 4.0}), (sae_l9, {7: -3.0})], units="max"):
            model.generate(**inputs)
    """
    options = {"positions": positions}
    if fn is not None:
        return SteeringHandle(
            model,
            install_hooks([_function_hook(model, saes_or_sae, fn, layer, site, options, exclude_token_ids, features)]),
        )
    if isinstance(saes_or_sae, SteeringVector):
        if features is not None:
            raise SteeringError("a steering vector takes strength=..., not features.")
        multiplier = 1.0 if strength is None else strength
        exclusion = steering_exclusion(model, [], exclude_token_ids)
        hook = _VectorHook(model, saes_or_sae, multiplier, **exclusion, **options)
        return SteeringHandle(model, [hook])
    if isinstance(saes_or_sae, nn.Module):
        if features is None:
            raise SteeringError("steer(model, sae, features): features is missing; pass e.g. {1234: 8.0}.")
        entries: list[tuple] = [(saes_or_sae, features)]
    elif isinstance(saes_or_sae, Mapping):
        entries = list(saes_or_sae.items())
    elif saes_or_sae is None:
        raise SteeringError("steer(model, ...): give an SAE and features, a SteeringVector, or fn= with layer/site.")
    else:
        entries = [tuple(entry) for entry in saes_or_sae]
        if features is not None:
            raise SteeringError(
                "features= is only for a single SAE; put each SAE's features in its (sae, features) pair."
            )
    hooks = _steering_hooks(model, entries, mode, positions, strength, units, exclude_token_ids)
    return SteeringHandle(model, install_hooks(hooks))


def _function_hook(
    model: nn.Module,
    sae: Any,
    fn: Callable[[Tensor], Tensor],
    layer: int | None,
    site: str | None,
    options: dict[str, Any],
    exclude_token_ids: Sequence[int] | None,
    features: Any,
) -> _FunctionHook:
    """The hook of ``steer(model, [sae], fn=..., [layer=..., site=...])``, its arguments checked."""
    if features is not None:
        raise SteeringError("steer(model, ..., fn=...) edits with fn alone: drop features (or drop fn).")
    if sae is not None and not isinstance(sae, nn.Module) or isinstance(sae, SteeringVector):
        raise SteeringError("with fn=, give one SAE (its site is used) or layer= and site=, not a list or vector.")
    if sae is None:
        if layer is None or site is None:
            raise SteeringError("steer(model, fn=...) without an SAE needs layer= and site= (e.g. 8, 'resid').")
        configs, where = [], resolve_site(model, layer, site)
    else:
        configs, where = [sae.config], None
    return _FunctionHook(model, sae, fn, site=where, **steering_exclusion(model, configs, exclude_token_ids), **options)


def _steering_hooks(
    model: nn.Module,
    entries: list[tuple],
    mode: str,
    positions: str,
    strength: float | str | None,
    units: str,
    exclude_token_ids: Sequence[int] | None,
):
    for entry in entries:
        if len(entry) not in (2, 3) or not isinstance(entry[0], nn.Module):
            raise SteeringError(f"each steering entry must be (sae, features) or (sae, features, mode), got {entry!r}.")
        entry_mode = entry[2] if len(entry) == 3 else mode
        yield _SteeringHook(model, entry[0], entry[1], entry_mode, positions, strength, units, exclude_token_ids)


# ---------------------------------------------------------------------------------------------------------- attach
class SAEHook(SiteHook):
    """An SAE attached to its site: records the latents of each forward and, with ``splice=True``, replaces the
    activation by the SAE's reconstruction at the chosen positions. Made by :func:`attach`.

    Args:
        splice: replace the activation by ``sae.decode(sae.encode(h, k))`` (cast back to the model's dtype) at the
            chosen positions; padded positions and tokens in ``exclude_token_ids`` (e.g. BOS) keep h.
        k: the TopK budget (any k <= config.k of a hierarchical SAE); defaults to config.k.
        positions: ``"all"``, ``"prompt"`` or ``"generated"`` (where splicing applies).
        keep_history: also keep the latents of every forward in ``hook.history``.

    Attributes:
        latents: :class:`SparseLatents` (B, T, k) of the last forward (every position, padding included).
        history: with ``keep_history=True``, the latents of every forward since attaching (e.g. each decode step).
    """

    def __init__(
        self,
        model: nn.Module,
        sae: nn.Module,
        splice: bool = False,
        k: int | None = None,
        positions: str = "all",
        exclude_token_ids: Sequence[int] | None = None,
        keep_history: bool = False,
    ):
        super().__init__(model, sae, positions, exclude_token_ids)
        self.splice = splice
        self.k = k
        self.keep_history = keep_history
        self.latents: SparseLatents | None = None
        self.history: list[SparseLatents] = []

    def _hook(self, activation: Tensor) -> Tensor | None:
        # No torch.no_grad here: under autograd, gradients flow through the SAE (attribution through latents).
        mask = self._mask(activation) if self.splice else None
        latents = self.sae.encode(activation.to(self.sae.W_dec.dtype), self.k)
        self.latents = latents
        if self.keep_history:
            self.history.append(latents)
        if not self.splice or (mask is not None and not bool(mask.any())):
            return None
        reconstruction = self.sae.decode(latents).to(activation.dtype)
        if mask is None:
            return reconstruction
        return torch.where(mask.unsqueeze(-1), reconstruction, activation)

    def __enter__(self) -> SAEHook:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()


def attach(model: nn.Module, sae: nn.Module, **options: Any) -> SAEHook:
    """Attach ``sae`` at its site of ``model``: record its latents (``hook.latents``), optionally splice.

    ``options`` (keywords) are those of :class:`SAEHook`: ``splice=False`` (replace the activation by the SAE's
    reconstruction), ``k=None`` (the TopK budget; config.k), ``positions="all"`` (``"prompt"``, ``"generated"``:
    where splicing applies), ``exclude_token_ids=None`` (tokens that keep h, e.g. BOS) and ``keep_history=False``
    (also keep every forward's latents in ``hook.history``).

    Use it as a context manager (``with sae.attach(model) as hook: model(**inputs); hook.latents``) or call
    ``hook.remove()``.
    """
    return SAEHook(model, sae, **options)


class ActivationPatch(SiteHook):
    """Replace the activation at an SAE's site by ``fn(h)`` at the chosen positions (used for zero-ablation)."""

    def __init__(self, model: nn.Module, sae: nn.Module, fn, positions: str = "all", exclude_token_ids=None):
        super().__init__(model, sae, positions, exclude_token_ids)
        self.fn = fn

    def _edit(self, activation: Tensor, mask: Tensor | None) -> Tensor:
        replaced = self.fn(activation)
        return replaced if mask is None else torch.where(mask.unsqueeze(-1), replaced, activation)

    def __enter__(self) -> ActivationPatch:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()
