"""The shared base of hf-sae SAE models: everything but the encoder.

An architecture subclass (``modeling_hierarchical_sae.py``, ``modeling_kron_sae.py``) provides the encoder
parameters and ``_encode_topk`` / ``pre_acts``; this base provides decode, the training objective
(HierarchicalTopK or TopK, plus AuxK), dead-latent counters, unit-norm decoder maintenance, activation-scale
folding, input validation, atomic saving and strict loading.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput, cached_file

from ._io import staged_files
from .configuration_sae import SAEConfig
from .errors import SAEConfigError, SAEInputError, SAELoadError
from .kernels import cpu_kernels
from .latent_stats import STATS_FILE, FeatureStats
from .loading import describe_location, explain_load_failure
from .losses import auxk_loss, hierarchical_topk_loss
from .sparse import SparseLatents, sparse_decode


@dataclass
class SAEOutput(ModelOutput):
    """Output of an SAE forward pass.

    Attributes:
        loss: scalar training objective of the config (HierarchicalTopK or TopK; AuxK added while training).
        reconstruction: (..., d_in) reconstruction at the full budget k.
        latents: :class:`SparseLatents` with (..., k) values (sorted descending) and indices.
        losses: named loss terms, e.g. ``{"reconstruction": ..., "auxk": ...}``.
    """

    loss: Tensor | None = None
    reconstruction: Tensor | None = None
    latents: SparseLatents | None = None
    losses: dict[str, Tensor] | None = None


# save_pretrained(..., push_to_hub=True, **these) hands these to push_to_hub (hf_sae.push_sae) instead of saving them.
_PUSH_OPTIONS = (
    "repo_id",
    "commit_message",
    "commit_description",
    "private",
    "token",
    "create_pr",
    "revision",
    "tag",
    "tags",
    "endpoint",
    "license",
    "include_code",
    "metrics",
    "command",
    "safe_serialization",
)


class SAEPreTrainedModel(PreTrainedModel):
    """Base class of hf-sae SAEs. Holds the decoder ``W_dec`` (d_sae, d_in) with unit-norm rows and ``b_dec``."""

    config_class = SAEConfig
    # Training defaults of the architecture (read by training/ through the registry): how b_dec starts before the
    # first step ("geometric_median", "mean" or "zeros"); the learning rate comes from default_learning_rate().
    b_dec_init: ClassVar[str] = "geometric_median"
    # Whether hf_sae.latent_parallel can split the SAE by latent across processes (--shard-latents).
    supports_latent_parallel: ClassVar[bool] = False
    base_model_prefix = "sae"
    main_input_name = "x"
    supports_gradient_checkpointing = False
    _no_split_modules: list[str] = []

    def __init__(self, config: SAEConfig):
        super().__init__(config)
        self.W_dec = nn.Parameter(torch.empty(config.d_sae, config.d_in))
        self.b_dec = nn.Parameter(torch.zeros(config.d_in))
        # Tokens since each latent was last among some token's top-k (AuxK's dead-latent test). On the device;
        # read it (a sync) only when logging.
        self.register_buffer("tokens_since_fired", torch.zeros(config.d_sae, dtype=torch.long), persistent=False)
        self.check_finite = True
        # Held-out statistics of the latents (hf_sae.latent_stats): saved beside the weights, read by steering units.
        self.feature_stats: FeatureStats | None = None

    # ----------------------------------------------------------------------------------------------- weights
    def _init_weights(self, module: nn.Module) -> None:
        # transformers calls this after building the model and, in from_pretrained, after loading; parameters read
        # from a checkpoint carry ``_is_hf_initialized`` and must not be re-drawn.
        if module is not self:
            return
        with torch.no_grad():
            if not any(getattr(p, "_is_hf_initialized", False) for p in self.parameters()):
                self.reset_parameters()
            if self.tokens_since_fired.device.type != "meta":
                self.tokens_since_fired.zero_()

    def reset_parameters(self) -> None:  # pragma: no cover - overridden by every architecture
        raise TypeError(f"{type(self).__name__} must implement reset_parameters()")

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Renormalise every decoder row to unit norm (after each optimiser step)."""
        eps = torch.finfo(self.W_dec.dtype).eps
        kernels = _row_kernels(self.W_dec)
        if kernels is not None:  # one pass over W_dec instead of a norm and a division
            kernels.normalize_rows(self.W_dec, eps)
            return
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(eps))

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Scale the gradients so their total norm is at most ``max_norm``; returns the norm before (the training
        step's per-SAE clipping; a latent-parallel SAE takes the norm over every process's shard).

        The same arithmetic as ``torch.nn.utils.clip_grad_norm_`` (coefficient max_norm / (norm + 1e-6), clamped at
        1), except that on CPU a coefficient of 1 skips the multiplication, a read and write of every gradient
        that changes nothing (50 ms a step at Gemma 2 2B widths); on accelerators it always multiplies, so reading
        the norm never forces a device sync here."""
        if not hasattr(torch.nn.utils, "get_total_norm"):  # torch < 2.6: its clip_grad_norm_ as it is
            return torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm)
        params = [p for p in self.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.W_dec.device)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if norm.device.type == "cpu" and bool(max_norm / (norm + 1e-6) >= 1.0):
            return norm
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out of W_dec.grad the component parallel to each (unit) row (before each optimiser step).

        With rows kept at unit norm, this part of the gradient only changes the norm, which the renormalisation
        undoes; removing it keeps Adam's moment estimates for useful directions (Gao et al. 2024, Sec. A).
        """
        if self.W_dec.grad is None:
            return
        grad, weight = self.W_dec.grad, self.W_dec
        kernels = _row_kernels(weight, grad)
        if kernels is not None:  # compiled CPU kernel: each row read twice while in L1, one pass over memory
            kernels.remove_parallel_rows(grad, weight)
            return
        # row-wise dot products and an in-place update: no (d_sae, d_in) temporary (at Gemma 2 2B widths each one
        # is 150 MB of freshly faulted pages, which cost more than the arithmetic)
        parallel = torch.einsum("fd,fd->f", grad, weight)
        grad.addcmul_(parallel.unsqueeze(-1), weight, value=-1.0)

    @torch.no_grad()
    def initialize_b_dec(self, sample: Tensor, method: str = "geometric_median", iterations: int = 100) -> None:
        """Set b_dec to the geometric median (Weiszfeld iterations) or the mean of a sample (N, d_in)."""
        sample = sample.reshape(-1, self.config.d_in).to(device=self.b_dec.device, dtype=torch.float32)
        if method == "mean":
            center = sample.mean(0)
        elif method == "geometric_median":
            center = sample.mean(0)
            for _ in range(iterations):
                weights = 1.0 / (sample - center).norm(dim=-1).clamp_min(1e-8)
                new_center = (weights[:, None] * sample).sum(0) / weights.sum()
                if (new_center - center).norm() <= 1e-6 * center.norm().clamp_min(1e-12):
                    center = new_center
                    break
                center = new_center
        else:
            raise ValueError(f"method={method!r} is unknown; use 'geometric_median' or 'mean'.")
        self.b_dec.copy_(center.to(self.b_dec.dtype))

    def encoder_biases(self) -> list[nn.Parameter]:  # pragma: no cover - overridden
        raise TypeError(f"{type(self).__name__} must implement encoder_biases()")

    @torch.no_grad()
    def fold_activation_scale(self, scale: float | None = None) -> None:
        """Fold the input scaling s into the biases so the SAE takes raw activations.

        Trained on s·x, an SAE with encoder biases b_enc and decoder bias b_dec gives the same ranking on raw x
        with b_enc/s and b_dec/s; its latent values and reconstruction are then in raw units (divided by s).
        Weights are unchanged, so decoder rows stay unit-norm.
        """
        if self.config.activation_scale_folded and scale is None:
            return
        scale = float(self.config.activation_scale if scale is None else scale)
        for bias in self.encoder_biases():
            bias.div_(scale)
        self.b_dec.div_(scale)
        self.config.activation_scale = scale
        self.config.activation_scale_folded = True

    # ------------------------------------------------------------------------------------------ validation
    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise SAEInputError(f"expected a torch.Tensor of shape (..., {self.config.d_in}), got {type(x).__name__}.")
        if x.ndim == 0 or x.shape[-1] != self.config.d_in:
            raise SAEInputError(
                f"input has shape {tuple(x.shape)} but this SAE reads d_in={self.config.d_in} features "
                f"(last dimension). Pass activations of shape (..., {self.config.d_in}) from the site "
                f"{self.config.hook_site!r} of layer {self.config.hook_layer} of {self.config.base_model}."
            )
        if not x.is_floating_point():
            raise SAEInputError(f"input dtype {x.dtype} is not floating point; convert with x.float().")
        if x.device != self.W_dec.device:
            raise SAEInputError(
                f"input is on {x.device} but the SAE is on {self.W_dec.device}; call sae.to({str(x.device)!r}) or "
                f"x.to({str(self.W_dec.device)!r})."
            )
        if x.dtype != self.W_dec.dtype:
            raise SAEInputError(
                f"input dtype {x.dtype} differs from the SAE's {self.W_dec.dtype}; call sae.to({x.dtype}) or "
                f"x.to({self.W_dec.dtype})."
            )
        if self.check_finite and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise SAEInputError(
                f"input has {bad} NaN/inf value(s); an SAE would turn them into garbage latents. Drop or fix those "
                "rows first (set sae.check_finite = False to skip this check on trusted inputs)."
            )

    def _check_k(self, k: int | None) -> int:
        if k is None:
            return self.config.k
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.config.k:
            raise SAEInputError(
                f"k={k!r} is outside 1..{self.config.k}: this SAE was trained for budgets up to k={self.config.k}. "
                f"Pass k <= {self.config.k}."
            )
        return k

    def _scale_in(self, x: Tensor) -> Tensor:
        if self.config.activation_scale_folded:
            return x
        return x * self.config.activation_scale

    def _scale_out(self, x_hat: Tensor) -> Tensor:
        if self.config.activation_scale_folded:
            return x_hat
        return x_hat / self.config.activation_scale

    # -------------------------------------------------------------------------------------------- encoding
    def _encode_topk(
        self, x: Tensor, k: int, dead_mask: Tensor | None = None, k_aux: int = 0
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # pragma: no cover - overridden
        """x: (N, d_in) already scaled -> values, indices (N, k) sorted descending; aux values/indices (N, k_aux)."""
        raise TypeError(f"{type(self).__name__} must implement _encode_topk()")

    def _pre_acts_flat(self, x: Tensor) -> Tensor:  # pragma: no cover - overridden
        raise TypeError(f"{type(self).__name__} must implement _pre_acts_flat()")

    def pre_acts(self, x: Tensor) -> Tensor:
        """(..., d_in) -> (..., d_sae): the non-negative scores TopK selects from (dense; for analysis)."""
        self._check_input(x)
        flat = self._scale_in(x.reshape(-1, self.config.d_in))
        return self._pre_acts_flat(flat).reshape(*x.shape[:-1], self.config.d_sae)

    def encode(self, x: Tensor, k: int | None = None) -> SparseLatents:
        """(..., d_in) -> SparseLatents with (..., k) values sorted descending: the first k of the K-ranking."""
        self._check_input(x)
        k = self._check_k(k)
        flat = self._scale_in(x.reshape(-1, self.config.d_in))
        values, indices, _, _ = self._encode_topk(flat, k)
        shape = (*x.shape[:-1], k)
        return SparseLatents(values.reshape(shape), indices.reshape(shape))

    def encode_dense(self, x: Tensor, k: int | None = None) -> Tensor:
        """(..., d_in) -> (..., d_sae) dense activations at budget k (zeros elsewhere). For analysis only."""
        return self.encode(x, k).to_dense(self.config.d_sae)

    def decode(self, latents: SparseLatents | tuple[Tensor, Tensor]) -> Tensor:
        """SparseLatents (..., k) -> (..., d_in) = b_dec + Σ_t v_t W_dec[i_t], decoded sparsely."""
        values, indices = latents
        if values.shape != indices.shape:
            raise SAEInputError(f"latent values {tuple(values.shape)} and indices {tuple(indices.shape)} differ.")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.config.d_sae):
            raise SAEInputError(
                f"latent indices must be in 0..{self.config.d_sae - 1}, got range "
                f"[{int(indices.min())}, {int(indices.max())}]."
            )
        k = values.shape[-1]
        flat_v = values.reshape(-1, k).to(self.W_dec.dtype)
        flat_i = indices.reshape(-1, k).to(device=self.W_dec.device, dtype=torch.long)
        x_hat = self.b_dec + sparse_decode(flat_v, flat_i, self.W_dec)
        return self._scale_out(x_hat).reshape(*values.shape[:-1], self.config.d_in)

    # -------------------------------------------------------------------------------------------- training
    def dead_mask(self) -> Tensor:
        """(d_sae,) bool: latents not among any token's top-k for ``config.dead_tokens`` tokens."""
        return self.tokens_since_fired >= self.config.dead_tokens

    @torch.no_grad()
    def _update_dead_counters(self, indices: Tensor, values: Tensor) -> None:
        self.tokens_since_fired += indices.shape[0]
        fired = indices[values > 0]
        self.tokens_since_fired[fired] = 0

    def forward(self, x: Tensor, return_dict: bool | None = None) -> SAEOutput:
        """(..., d_in) -> SAEOutput: reconstruction at k, latents, and the training objective.

        The reconstruction loss is the HierarchicalTopK loss (mean over budgets J of the MSE) when
        ``config.hierarchical`` is set, else the TopK MSE at k. In training mode, with ``config.auxk``, AuxK on the
        dead latents is added (coefficient ``auxk_coefficient`` · min(1, n_dead / k_aux)) and the dead-latent
        counters are updated. The loss is computed in the (scaled) training space of an unfolded SAE.
        """
        self._check_input(x)
        cfg = self.config
        flat = self._scale_in(x.reshape(-1, cfg.d_in))
        dead, n_dead, k_aux = self._auxk_dead_latents()
        values, indices, aux_values, aux_indices = self._encode_topk(flat, cfg.k, dead, k_aux)
        budgets = cfg.budgets if cfg.hierarchical else [cfg.k]
        reconstruction_loss, x_hat = hierarchical_topk_loss(flat, values, indices, self.W_dec, self.b_dec, budgets)
        losses = {"reconstruction": reconstruction_loss}
        if k_aux > 0:
            losses["auxk"] = self._auxk_term(flat, x_hat, aux_values, aux_indices, n_dead)
        return self._sae_output(x, values, indices, x_hat, sum(losses.values()), losses)

    def _auxk_dead_latents(self) -> tuple[Tensor | None, int, int]:
        """(dead mask or None, n_dead, k_aux) for this step: AuxK runs in training mode with autograd on and
        ``config.auxk``, on the min(auxk_k, n_dead) best dead latents of each token (n_dead: one device sync)."""
        cfg = self.config
        if not (self.training and cfg.auxk and torch.is_grad_enabled()):
            return None, 0, 0
        dead = self.dead_mask()
        n_dead = int(dead.sum())
        k_aux = min(cfg.auxk_k_effective, n_dead)
        return (dead if k_aux > 0 else None), n_dead, k_aux

    def _auxk_term(self, x: Tensor, x_hat: Tensor, aux_values: Tensor, aux_indices: Tensor, n_dead: int) -> Tensor:
        """AuxK of the residual x − x̂, weighted auxk_coefficient · min(1, n_dead / k_aux) (Gao et al. 2024)."""
        cfg = self.config
        aux = auxk_loss((x - x_hat).detach(), aux_values, aux_indices, self.W_dec, self.dead_mask())
        return aux * cfg.auxk_coefficient * min(1.0, n_dead / cfg.auxk_k_effective)

    def _sae_output(
        self, x: Tensor, values: Tensor, indices: Tensor, x_hat: Tensor, loss: Tensor, losses: dict[str, Tensor]
    ) -> SAEOutput:
        """The SAEOutput of a forward of x (..., d_in): latents (N, width) and x̂ (N, d_in) reshaped to x's leading
        shape, x̂ back in input units; in training mode the dead-latent counters are updated from the latents."""
        if self.training:
            self._update_dead_counters(indices, values)
        shape = (*x.shape[:-1], values.shape[-1])
        latents = SparseLatents(values.reshape(shape), indices.reshape(shape))
        reconstruction = self._scale_out(x_hat).reshape(x.shape)
        return SAEOutput(loss=loss, reconstruction=reconstruction, latents=latents, losses=losses)

    # --------------------------------------------------------------------------------------- saving/loading
    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """Safetensors only, each file written to a temporary folder inside the target and renamed into place.

        Files the SAE does not write (model cards, metrics, plots, checkpoint subfolders) are kept; config.json is
        renamed last, so a reader never sees a new config beside old weights. ``self.feature_stats`` (when set) is
        written as ``feature_stats.safetensors``; without statistics an old file of that name is removed.

        ``push_to_hub=True`` (transformers' idiom) then pushes the SAE with ``push_to_hub`` to ``repo_id`` (default:
        the folder's name in the token's namespace), its card reading the folder's metrics, plot and command; the
        push options (``commit_message``, ``private``, ``token``, ``tag``, ...) go to the push, the rest to the save.
        """
        if kwargs.pop("push_to_hub", False):
            push = {key: kwargs.pop(key) for key in _PUSH_OPTIONS if key in kwargs}
            repo_id = push.pop("repo_id", None) or Path(save_directory).name  # a bare name: the token's namespace
            if "max_shard_size" in kwargs:
                push["max_shard_size"] = kwargs["max_shard_size"]
            self.save_pretrained(save_directory, *args, **kwargs)
            return self.push_to_hub(repo_id, run_dir=save_directory, **push)
        kwargs["safe_serialization"] = True
        with staged_files(save_directory, last=("config.json",)) as tmp:
            result = super().save_pretrained(tmp, *args, **kwargs)
            if self.feature_stats is not None:
                self.feature_stats.save(tmp)
            else:  # statistics of an earlier SAE saved here must not be read as this one's
                (Path(save_directory) / STATS_FILE).unlink(missing_ok=True)
            return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, check_finite_weights: bool = True, **kwargs):
        """Strict load: missing, unexpected or mis-shaped tensors, truncated files and NaN/inf weights raise
        SAELoadError; a location that holds no SAE (a missing subfolder, a collection root, a folder without
        config.json, another library's layout) raises the SAEHubError of :func:`hf_sae.loading.explain_load_failure`.

        ``check_finite_weights=False`` skips the NaN/inf check (one pass over the weights) for trusted files.
        """
        want_info = kwargs.pop("output_loading_info", False)
        kwargs.setdefault("use_safetensors", True)  # never unpickle
        name = pretrained_model_name_or_path
        subfolder, revision = kwargs.get("subfolder") or None, kwargs.get("revision")
        try:
            model, info = super().from_pretrained(name, *model_args, output_loading_info=True, **kwargs)
        except SAEConfigError as err:
            better = explain_load_failure(name, err, subfolder=subfolder, revision=revision)
            if better is not None:  # no config.json there at all: say what is there instead
                raise better from err
            if str(err).startswith("config.json:"):
                where = Path(str(name), subfolder or "", "config.json")
                raise SAEConfigError(f"{where}{str(err)[len('config.json') :]}") from None
            raise
        except Exception as err:
            text = str(err)
            if "size mismatch" in text or "ignore_mismatched_sizes" in text:
                raise SAELoadError(
                    f"{name}: tensor shapes in model.safetensors disagree with config.json "
                    f"({text.strip().splitlines()[0]}). The config and weights come from different SAEs."
                ) from err
            if "deserializ" in text or "header" in text.lower() or "incomplete" in text.lower():
                raise SAELoadError(
                    f"{name}: model.safetensors cannot be read ({text.strip()}); the file "
                    "is probably truncated or corrupt. Download or save it again."
                ) from err
            if isinstance(err, (OSError, ValueError)) and not isinstance(err, SAELoadError):
                better = explain_load_failure(name, err, subfolder=subfolder, revision=revision)
                if better is not None:
                    raise better from err
            raise
        # Parameters loaded from safetensors may alias the file buffer at unaligned offsets, where the CPU matmul
        # library picks other kernels (different rounding); fresh, aligned copies keep results bit-reproducible.
        with torch.no_grad():
            for param in model.parameters():
                param.data = param.data.clone()
        problems = {
            name: info.get(name) for name in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(name)
        }
        if problems:
            raise SAELoadError(
                f"{pretrained_model_name_or_path}: weights do not match {cls.__name__}: "
                f"{json.dumps({k: sorted(map(str, v)) for k, v in problems.items()})}. "
                "The weights file belongs to another architecture or config."
            )
        if check_finite_weights:
            _check_finite_weights(model, name, subfolder, revision)
        model.feature_stats = _load_feature_stats(model, name, kwargs)
        return (model, info) if want_info else model

    # ----------------------------------------------------------------------------------------------- views
    @property
    def d_in(self) -> int:
        return self.config.d_in

    @property
    def d_sae(self) -> int:
        return self.config.d_sae

    @torch.no_grad()
    def unit_activations(self) -> Tensor | None:
        """(d_sae,) the activation of each latent that counts as "one unit" of it, when the architecture defines one
        (a JumpReLU SAE: its threshold); None when it must be measured on data (TopK: the mean non-zero activation).
        Feature flow steers in these units. An architecture that defines them also defines
        ``fold_unit_activations()`` (rescale latents in place so that the units become 1, outputs unchanged)."""
        return None

    # -------------------------------------------------------------------------------------- training defaults
    @classmethod
    def run_defaults(cls, total_steps: int) -> dict:
        """Config fields whose training default depends on the length of the run (``total_steps`` optimiser steps);
        training fills them where the run does not set them. None by default."""
        return {}

    @classmethod
    def default_learning_rate(cls, config: SAEConfig) -> float:
        """The peak learning rate training uses when none is given: :func:`scaled_learning_rate` of ``d_sae``."""
        return scaled_learning_rate(config.d_sae)


def _load_feature_stats(model: nn.Module, name, kwargs: dict) -> FeatureStats | None:
    """The ``feature_stats.safetensors`` beside the weights (local folder or Hub repo), or None when there is none."""
    options = {
        key: kwargs[key]
        for key in ("cache_dir", "force_download", "token", "revision", "local_files_only", "subfolder")
        if kwargs.get(key) is not None
    }
    try:
        path = cached_file(
            str(name),
            STATS_FILE,
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
            **options,
        )
    except OSError:
        return None
    if path is None:
        return None
    stats = FeatureStats.load(path)
    stats.check_matches(model.config.d_sae, model.config.d_in, str(path))
    return stats


def _check_finite_weights(model: nn.Module, name, subfolder: str | None, revision: str | None) -> None:
    """Refuse NaN/inf weights: a safetensors file with a valid header and a corrupt payload loads without error."""
    bad = {
        param_name: int((~torch.isfinite(param)).sum())
        for param_name, param in model.named_parameters()
        if param.is_floating_point() and not bool(torch.isfinite(param).all())
    }
    if not bad:
        return
    local = Path(str(name), subfolder or "")
    if local.is_dir():
        file = next(
            (local / f for f in ("model.safetensors", "model.safetensors.index.json") if (local / f).exists()), local
        )
    else:
        file = describe_location(
            f"{name}/{subfolder.strip('/') + '/' if subfolder else ''}model.safetensors", None, revision
        )
    counts = ", ".join(
        f"{param_name} ({count} of {model.get_parameter(param_name).numel()})" for param_name, count in bad.items()
    )
    raise SAELoadError(
        f"{file}: NaN/inf weights in {counts}. The file's header is valid but its data is corrupt (a damaged "
        "download or disk), or the SAE diverged before it was saved. Download or save it again; pass "
        "check_finite_weights=False to from_pretrained to load it anyway."
    )


def scaled_learning_rate(d_sae: int, base_lr: float = 8e-4) -> float:
    """The recipe's learning rate: 8e-4 at 2^14 latents, scaled by 1/sqrt(d_sae / 2^14)."""
    return base_lr / math.sqrt(d_sae / 2**14)


def _row_kernels(*tensors: Tensor):
    """The compiled CPU kernels when every tensor is a contiguous float32/float64 CPU matrix of one dtype, else None
    (then the torch expressions run: accelerators, bf16 weights, strided views, no compiler)."""
    first = tensors[0]
    if first.device.type != "cpu" or first.dtype not in (torch.float32, torch.float64):
        return None
    if not all(
        t.device == first.device and t.dtype == first.dtype and t.is_contiguous() and t.dim() == 2 for t in tensors
    ):
        return None
    return cpu_kernels()
