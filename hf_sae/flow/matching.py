"""Data-free matching of SAE features by their decoder directions (Laptev et al. 2025, Sec. 3.2; Balagansky et al.
2025, "Mechanistic Permutability").

The embedding of feature i is its unit decoder row e_i = W_dec[i] / ||W_dec[i]||, so e_i^A · e_j^B is a cosine.

* :func:`match_decoders`: top-k matches of every row of A into B (k = 1: j*(i) = argmax_j e_i^A · e_j^B), computed in
  blocks with a running top-k. Memory is O(block_size² + (F_A + F_B)·k), never F_A × F_B (65,536² floats are
  16 GiB); the FLOPs are those of the one matmul E_A E_Bᵀ.
* :func:`one_to_one_match`: the permutation P maximising Σ_i e_i^A · e_{P(i)}^B (a linear assignment problem,
  ``scipy.optimize.linear_sum_assignment``) for SAEs of equal width.
* :class:`MatchCache`: results stored as safetensors, keyed by SHA-256 fingerprints of both decoders, so a second
  call (in this process or a later one) costs one file read.
* :func:`fold_jumprelu` (Mechanistic Permutability Eq. 4) and :func:`feature_scales`: the per-feature unit in which a
  steering strength is expressed in the model's activation scale.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .._io import atomic_path
from ..errors import FlowError

MATCHING_VERSION = 1  # bump when the stored result of a match would change
DEFAULT_BLOCK_SIZE = 4096


# ------------------------------------------------------------------------------------------------------ results
@dataclass
class MatchResult:
    """Top-k matches of every feature of a source SAE A into a target SAE B.

    Attributes:
        indices: (F_A, k) int64, the matched B features of each A feature, best first.
        scores: (F_A, k) float32 cosines e_i^A · e_j^B, sorted descending along k.
        source, target: the ``(layer, site)`` keys of A and B when the match came from a :class:`FeatureFlow`.
        one_to_one: the result of a linear assignment (k = 1, a permutation) rather than a free top-k.
    """

    indices: Tensor
    scores: Tensor
    source: tuple[int, str] | None = None
    target: tuple[int, str] | None = None
    one_to_one: bool = False

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def __len__(self) -> int:
        return self.indices.shape[0]

    @property
    def top1(self) -> tuple[Tensor, Tensor]:
        """(F_A,) best match ids and (F_A,) their cosines."""
        return self.indices[:, 0], self.scores[:, 0]

    def transition_matrix(self, d_sae_target: int) -> Tensor:
        """T(A→B) = 1[x > 0] ⊙ topk_row(E_A E_Bᵀ) (Laptev et al. Sec. 3.2) as a sparse COO (F_A, F_B) tensor."""
        rows = torch.arange(len(self)).unsqueeze(1).expand_as(self.indices)
        values = self.scores.clamp_min(0.0)
        keep = values > 0
        index = torch.stack([rows[keep], self.indices[keep].cpu()])
        return torch.sparse_coo_tensor(
            index, values[keep].cpu(), (len(self), d_sae_target), check_invariants=True
        ).coalesce()

    def transport(self, values: Tensor, indices: Tensor, binary: bool = False) -> tuple[Tensor, Tensor]:
        """Map sparse A latents through T: f̂ = Tᵀ f (each active A latent i sends f_i · T_ij to its matches j).

        values, indices: (..., k_A) -> values, indices (..., k_A · k) of B latents (duplicates sum when decoded).
        ``binary=True`` uses 1[T_ij > 0] instead of the cosine (a plain permutation when k = 1).
        """
        table_i = self.indices.to(indices.device)
        table_s = self.scores.to(device=values.device, dtype=values.dtype).clamp_min(0.0)
        weights = (table_s > 0).to(values.dtype) if binary else table_s
        out_i = table_i[indices]  # (..., k_A, k)
        out_v = values.unsqueeze(-1) * weights[indices]
        return out_v.flatten(-2), out_i.flatten(-2)

    def to(self, device) -> MatchResult:
        return MatchResult(self.indices.to(device), self.scores.to(device), self.source, self.target, self.one_to_one)


# ---------------------------------------------------------------------------------------------------- matching
def _as_matrix(decoder: Tensor | torch.nn.Module) -> Tensor:
    """An SAE (its ``W_dec``) or a (F, d) tensor -> the (F, d) decoder rows, detached."""
    weight = decoder.W_dec if isinstance(decoder, torch.nn.Module) else decoder
    if not isinstance(weight, Tensor) or weight.ndim != 2:
        raise FlowError(f"expected an SAE or a (d_sae, d_in) decoder matrix, got {type(decoder).__name__}.")
    return weight.detach()


def unit_rows(decoder: Tensor | torch.nn.Module, dtype: torch.dtype = torch.float32) -> Tensor:
    """e_i = W_dec[i] / ||W_dec[i]|| as a (F, d) ``dtype`` tensor (zero rows stay zero)."""
    weight = _as_matrix(decoder).to(dtype)
    return weight / weight.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)


def _inverse_norms(weight: Tensor, dtype: torch.dtype) -> Tensor:
    norms = torch.linalg.vector_norm(weight, dim=1, dtype=dtype)
    return 1.0 / norms.clamp_min(torch.finfo(dtype).tiny)


def _check_block_size(block_size: int) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise FlowError(
            f"block_size must be a positive integer, got {block_size!r}; the default is {DEFAULT_BLOCK_SIZE}."
        )
    return block_size


@torch.no_grad()
def match_decoders(
    decoder_a: Tensor | torch.nn.Module,
    decoder_b: Tensor | torch.nn.Module,
    k: int = 1,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Top-k cosine matches of every row of A into B, blockwise.

    Args:
        decoder_a, decoder_b: SAEs or decoder matrices (F_A, d) and (F_B, d); rows need not be unit.
        k: matches per A row (at most F_B).
        block_size: rows of A and of B per block; the score block is block_size² ``dtype`` values (64 MiB at the
            default 4096 in float32).
        device: where to compute (default: A's device); both decoders are moved there once, blocks are cast to
            ``dtype`` and B's blocks normalised on the fly, so no normalised copy of a whole decoder is ever made.

    Returns: scores (F_A, k) float32 sorted descending and indices (F_A, k) int64, on the CPU.
    """
    block_size = _check_block_size(block_size)
    a, b = _as_matrix(decoder_a), _as_matrix(decoder_b)
    if a.shape[1] != b.shape[1]:
        raise FlowError(
            f"decoders have different widths: A is {tuple(a.shape)}, B is {tuple(b.shape)}; features can only be "
            "matched between SAEs of the same space (resid/mlp/attn of one model)."
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise FlowError(f"k must be a positive integer (matches per feature), got {k!r}.")
    device = torch.device(device) if device is not None else a.device
    a, b = a.to(device), b.to(device)
    k = min(k, b.shape[0])
    inv_a, inv_b = _inverse_norms(a, dtype), _inverse_norms(b, dtype)
    n_a, n_b = a.shape[0], b.shape[0]
    best_scores = torch.full((n_a, k), -math.inf, dtype=dtype, device=device)
    best_indices = torch.zeros((n_a, k), dtype=torch.long, device=device)
    buffer = torch.empty(min(block_size, n_a), min(block_size, n_b), dtype=dtype, device=device)
    # Rows of A are not normalised: 1/||a_i|| is a positive constant of row i, so it does not change which j
    # score highest, and it is applied to the k kept scores only (at the end). B's 1/||b_j|| is applied to each B
    # block once (n_b x d work) or, when A has fewer rows than d (e.g. tracing one feature), to the scores.
    normalise_b = n_a >= a.shape[1]
    for b0 in range(0, n_b, block_size):
        b1 = min(b0 + block_size, n_b)
        block_b = b[b0:b1].to(dtype)
        if normalise_b:
            block_b = block_b * inv_b[b0:b1, None]
        for a0 in range(0, n_a, block_size):
            a1 = min(a0 + block_size, n_a)
            scores = torch.mm(a[a0:a1].to(dtype), block_b.t(), out=buffer[: a1 - a0, : b1 - b0])
            if not normalise_b:
                scores.mul_(inv_b[b0:b1])
            if k == 1:
                values, indices = scores.max(dim=1, keepdim=True)
                indices += b0
                better = values > best_scores[a0:a1]
                best_scores[a0:a1] = torch.where(better, values, best_scores[a0:a1])
                best_indices[a0:a1] = torch.where(better, indices, best_indices[a0:a1])
            else:
                values, indices = scores.topk(min(k, b1 - b0), dim=1)
                values = torch.cat([best_scores[a0:a1], values], dim=1)
                indices = torch.cat([best_indices[a0:a1], indices + b0], dim=1)
                top, order = values.topk(k, dim=1)
                best_scores[a0:a1] = top
                best_indices[a0:a1] = indices.gather(1, order)
    best_scores *= inv_a[:, None]
    return best_scores.float().cpu(), best_indices.cpu()


@torch.no_grad()
def one_to_one_match(
    decoder_a: Tensor | torch.nn.Module,
    decoder_b: Tensor | torch.nn.Module,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device: str | torch.device | None = None,
    max_width: int = 16384,
) -> tuple[Tensor, Tensor]:
    """The permutation P maximising Σ_i e_i^A · e_{P(i)}^B (Mechanistic Permutability), by linear assignment.

    The assignment needs the whole F × F cosine matrix (filled in blocks, held as float64 for scipy: 2 GiB at
    F = 16,384) and O(F³) time, hence ``max_width``. Returns scores and indices (F, 1) like :func:`match_decoders`.
    """
    a, b = _as_matrix(decoder_a), _as_matrix(decoder_b)
    if a.shape != b.shape:
        raise FlowError(
            f"one-to-one matching needs SAEs of equal width and d_in, got {tuple(a.shape)} and {tuple(b.shape)}. "
            "Use the top-k match (one_to_one=False) for different widths."
        )
    if a.shape[0] > max_width:
        raise FlowError(
            f"one-to-one matching of {a.shape[0]} features needs a dense {a.shape[0]}x{a.shape[0]} cost matrix and "
            f"cubic time; it is limited to max_width={max_width}. Raise max_width if you have the memory, or use "
            "the top-k match."
        )
    block_size = _check_block_size(block_size)
    device = torch.device(device) if device is not None else a.device
    unit_b = unit_rows(b.to(device))
    n = a.shape[0]
    cost = torch.empty(n, n, dtype=torch.float64)
    for a0 in range(0, n, block_size):
        block_a = unit_rows(a[a0 : a0 + block_size].to(device))
        cost[a0 : a0 + block_size] = (block_a @ unit_b.t()).double().cpu()
    rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
    order = torch.as_tensor(rows).argsort()
    indices = torch.as_tensor(cols)[order].long()
    scores = cost[torch.arange(n), indices].float()
    return scores.unsqueeze(1), indices.unsqueeze(1)


# ------------------------------------------------------------------------------------------------------ caching
# id(tensor) -> (weak reference to it, its in-place version counter, fingerprint). Keyed by id, not by the tensor:
# a tensor's == is elementwise, so tensors cannot be dictionary keys by value.
_FINGERPRINTS: dict[int, tuple[weakref.ref, int, str]] = {}


def decoder_fingerprint(decoder: Tensor | torch.nn.Module) -> str:
    """SHA-256 of the decoder's shape, dtype and bytes (memoised per tensor until it is modified in place)."""
    weight = decoder.W_dec if isinstance(decoder, torch.nn.Module) else decoder
    version = weight._version
    memo = _FINGERPRINTS.get(id(weight))
    if memo is not None and memo[0]() is weight and memo[1] == version:
        return memo[2]
    data = weight.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{tuple(data.shape)}|{data.dtype}|".encode())
    digest.update(memoryview(data.view(torch.uint8).reshape(-1).numpy()))
    text = digest.hexdigest()
    key = id(weight)
    _FINGERPRINTS[key] = (weakref.ref(weight, lambda ref, key=key: _forget(key, ref)), version, text)
    return text


def _forget(key: int, ref: weakref.ref) -> None:
    if _FINGERPRINTS.get(key, (None,))[0] is ref:
        del _FINGERPRINTS[key]


def default_cache_dir() -> Path:
    """``$HF_SAE_CACHE/flow``, else ``~/.cache/hf_sae/flow`` (the same root as the project's other caches)."""
    root = os.environ.get("HF_SAE_CACHE") or Path.home() / ".cache" / "hf_sae"
    return Path(root).expanduser() / "flow"


class MatchCache:
    """Matches on disk as safetensors (``indices`` int64, ``scores`` float32), one file per (A, B, k, method).

    The key hashes both decoders' weights, so a retrained or edited SAE never reads a stale match. Files are written
    by :func:`hf_sae._io.atomic_path` (a temporary beside the target, renamed into place), so a crash never leaves a
    half-written file behind.
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_dir()

    @staticmethod
    def key(decoder_a, decoder_b, k: int, one_to_one: bool) -> str:
        method = "assignment" if one_to_one else f"top{k}"
        text = f"v{MATCHING_VERSION}|{decoder_fingerprint(decoder_a)}|{decoder_fingerprint(decoder_b)}|{method}"
        return hashlib.sha256(text.encode()).hexdigest()[:40]

    def path(self, key: str) -> Path:
        return self.directory / f"match-{key}.safetensors"

    def load(self, key: str) -> tuple[Tensor, Tensor] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        tensors = load_file(str(path))
        return tensors["scores"], tensors["indices"]

    def save(self, key: str, scores: Tensor, indices: Tensor) -> Path:
        path = self.path(key)
        with atomic_path(path) as tmp:
            save_file(
                {"scores": scores.contiguous(), "indices": indices.contiguous()},
                str(tmp),
                metadata={"hf_sae_matching_version": str(MATCHING_VERSION)},
            )
        return path


def match_features(
    sae_a: Tensor | torch.nn.Module,
    sae_b: Tensor | torch.nn.Module,
    k: int = 1,
    *,
    one_to_one: bool = False,
    block_size: int = DEFAULT_BLOCK_SIZE,
    device: str | torch.device | None = None,
    cache: MatchCache | str | os.PathLike | bool | None = None,
) -> MatchResult:
    """Match every feature of ``sae_a`` into ``sae_b`` (top-k cosine, or one-to-one), with the disk cache.

    ``cache``: a :class:`MatchCache`, a folder, ``None`` / ``True`` for the default folder, ``False`` for none.
    """
    if one_to_one and k != 1:
        raise FlowError(f"one_to_one=True gives one match per feature; pass k=1, not k={k}.")
    store = None
    if cache is not False:
        store = cache if isinstance(cache, MatchCache) else MatchCache(None if cache in (None, True) else cache)
    key = MatchCache.key(sae_a, sae_b, k, one_to_one) if store is not None else None
    found = store.load(key) if store is not None else None
    if found is None:
        if one_to_one:
            found = one_to_one_match(sae_a, sae_b, block_size=block_size, device=device)
        else:
            found = match_decoders(sae_a, sae_b, k, block_size=block_size, device=device)
        if store is not None:
            store.save(key, *found)
    scores, indices = found
    return MatchResult(indices=indices, scores=scores, one_to_one=one_to_one)


# ------------------------------------------------------------------------------------------------------ folding
@torch.no_grad()
def fold_jumprelu(sae):
    """A copy of a JumpReLU SAE with its thresholds folded in (Mechanistic Permutability Eq. 4; see
    :meth:`hf_sae.JumpReLUSAE.fold_unit_activations`): outputs are unchanged, and a latent value of 1 means "at its
    threshold" for every feature, the scale :func:`feature_scales` uses."""
    if sae.unit_activations() is None:
        raise FlowError(f"fold_jumprelu needs a JumpReLU SAE (with a per-latent threshold), got {type(sae).__name__}.")
    return copy.deepcopy(sae).fold_unit_activations()


@torch.no_grad()
def feature_scales(sae, mean_activations: Tensor | None = None) -> Tensor:
    """(d_sae,) the size, in the model's activation units, of "one unit" of each feature's steering strength.

    * JumpReLU: θ_i·||W_dec[i]|| = the norm of the folded decoder row (:func:`fold_jumprelu`): strength 1 adds the
      contribution of a latent just at its threshold.
    * TopK (our extension; the papers define folding only for JumpReLU): μ_i·||W_dec[i]||, μ_i the latent's mean
      non-zero activation (``mean_activations``, e.g. from :func:`hf_sae.flow.evaluation.mean_nonzero_activations`):
      strength 1 adds a typical activation of the feature. Latents never seen active get μ = 1.
    """
    norms = sae.W_dec.detach().float().norm(dim=1)
    units = sae.unit_activations()
    if units is not None:
        return units.float() * norms
    if mean_activations is None:
        raise FlowError(
            f"{type(sae).__name__} (layer {sae.config.hook_layer}, {sae.config.hook_site}) is a TopK SAE: its folded "
            "scale is each latent's mean non-zero activation, which needs data. Call flow.calibrate(model, texts) "
            "first, or steer with units='unit'."
        )
    mean = mean_activations.detach().float().to(norms.device)
    return torch.where(mean > 0, mean, torch.ones_like(mean)) * norms
