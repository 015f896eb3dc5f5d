"""Sparse latents and the sparse encode/decode primitives every SAE shares.

TopK latents are kept as (values, indices) pairs end to end (as in EleutherAI sparsify): decoding is an
``F.embedding_bag`` over the decoder rows, and the encoder backward touches only the selected latents, so neither
direction builds a dense (batch, d_sae) gradient.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .aux_tiles import aux_tiles
from .errors import SAEInputError
from .kernels import cpu_kernels
from .kernels.triton_support import triton_kernel_for


@dataclass
class SparseLatents:
    """TopK latents of a batch of activations.

    Attributes:
        values: (..., k) activations, sorted descending along the last dimension.
        indices: (..., k) int64 latent ids, aligned with ``values``.
    """

    values: Tensor
    indices: Tensor

    def __post_init__(self):
        if self.values.shape != self.indices.shape:
            raise SAEInputError(
                f"SparseLatents values {tuple(self.values.shape)} and indices {tuple(self.indices.shape)} must have "
                "the same shape (..., k)."
            )

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    def __iter__(self):
        yield self.values
        yield self.indices

    def truncate(self, k: int) -> SparseLatents:
        """The first ``k`` latents of every row: the SAE's encoding at budget ``k`` (budgets are nested)."""
        if not 1 <= k <= self.k:
            raise SAEInputError(f"cannot truncate {self.k} latents to k={k}; use 1 <= k <= {self.k}.")
        return SparseLatents(self.values[..., :k], self.indices[..., :k])

    def to_dense(self, d_sae: int) -> Tensor:
        """(..., d_sae) dense activations (for analysis; not for hot paths)."""
        dense = self.values.new_zeros(*self.values.shape[:-1], d_sae)
        return dense.scatter_(-1, self.indices, self.values)

    def to(self, *args, **kwargs) -> SparseLatents:
        device = kwargs.get("device", self.indices.device)
        return SparseLatents(self.values.to(*args, **kwargs), self.indices.to(device))


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor) -> Tensor:
    """Σ_t values[..., t] · W_dec[indices[..., t]] without a dense (…, d_sae) tensor.

    values, indices: (N, k); W_dec: (d_sae, d_in) -> (N, d_in), in W_dec's dtype. On CUDA the Triton kernels of
    :mod:`hf_sae.kernels.triton_decode` (fp32 accumulation, no (N, k, d_in) temporary) when triton is installed.
    """
    triton_kernels = triton_kernel_for("triton_decode", values, W_dec) if values.dim() == 2 else None
    if triton_kernels is not None:
        return triton_kernels.sparse_decode(values, indices, W_dec)
    if values.dtype != W_dec.dtype:
        values = values.to(W_dec.dtype)
    return F.embedding_bag(indices, W_dec, per_sample_weights=values, mode="sum")


DENSE_AUX_DENSITY = 1 / 8  # AuxK's (N, k_aux) choice among n_dead latents goes dense from k_aux / n_dead >= this


def dense_aux_block(indices: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """AuxK's latents as a dense block when that is cheaper: (columns (C,), positions (N, k_aux)) with
    ``columns[positions] == indices``, C the ``mask`` (dead) latents, or None (keep the sparse path).

    The k_aux best dead latents of every token are a sparse (N, d_sae) matrix only in name once k_aux is a sizeable
    share of the n_dead candidates (all of them when n_dead <= k_aux, common late in training): the sparse passes
    gather N·k_aux rows of 2-9 KB each and are bound by cache bandwidth, while the same products as (N, C) x (C, d)
    matrix multiplies run near the machine's peak. With it the half-dead AuxK row of benchmarks/bench_sae_step.py
    (density 320 / 2,048 at the small shape) went from 3.84x to 2.66x the TopK step on 2 cores; it is used from
    density 1/8 on.
    """
    if mask is None or indices.shape[-1] == 0:
        return None
    columns = mask.nonzero().squeeze(1)
    if indices.shape[-1] < DENSE_AUX_DENSITY * columns.numel():
        return None
    position_of = torch.full((mask.numel(),), -1, dtype=torch.long, device=indices.device)
    position_of[columns] = torch.arange(columns.numel(), device=indices.device)
    positions = position_of[indices]
    if bool((positions < 0).any()):  # a latent outside the mask (cannot happen for AuxK's choice): stay sparse
        return None
    return columns, positions


_LAST_AUX_BLOCK: tuple | None = None  # (indices, its version, a copy of mask, (dtype, d), block, tiles): the latest


def aux_block_and_tiles(indices: Tensor, mask: Tensor | None, dtype: torch.dtype, d: int):
    """(:func:`dense_aux_block`, its :func:`hf_sae.aux_tiles.aux_tiles` plan or None) for AuxK's choice, rows of
    width ``d`` in ``dtype``.

    The encoder's forward and the AuxK loss of one step both need them for the same ``indices`` tensor (the
    encoder's output): the latest result is kept and returned again for the same ``indices`` object, unmodified
    (its version), and a mask of the same values (the loss reads a fresh ``dead_mask()``), which spares ~20 ms a
    step at the small benchmark shape. Holding ``indices`` keeps its id from being reused."""
    global _LAST_AUX_BLOCK
    last = _LAST_AUX_BLOCK
    if (
        last is not None
        and last[0] is indices
        and last[1] == indices._version
        and last[3] == (dtype, d)
        and (mask is None) == (last[2] is None)
        and (mask is None or torch.equal(last[2], mask))
    ):
        return last[4], last[5]
    block = dense_aux_block(indices, mask)
    tiles = aux_tiles(*block, dtype, d) if block is not None else None
    kept_mask = mask.clone() if mask is not None else None
    _LAST_AUX_BLOCK = (indices, indices._version, kept_mask, (dtype, d), block, tiles)
    return block, tiles


def dense_rows(values: Tensor, positions: Tensor, width: int) -> Tensor:
    """(N, t) values at (N, t) distinct positions per row -> the dense (N, width) matrix (zeros elsewhere)."""
    return values.new_zeros(values.shape[0], width).scatter_(1, positions, values)


def flat_decode(values: Tensor, rows: Tensor, columns: Tensor, W_dec: Tensor, num_rows: int) -> Tensor:
    """Σ_e values[e] · W_dec[columns[e]] summed into row rows[e]: the decode of a flat (ragged) list of latents.

    values, rows, columns: (nnz,) with ``rows`` ascending (row-major order, as ``mask.nonzero()`` gives); W_dec:
    (d_sae, d_in) -> (num_rows, d_in) in W_dec's dtype, rows with no entry zero. One ``F.embedding_bag`` with a bag
    per row: autograd gives values and W_dec their gradients, and nothing costs more than nnz · d_in, however
    unequal the rows' lengths (a padded (N, width) decode costs N · width · d_in).
    """
    counts = torch.bincount(rows, minlength=num_rows)
    offsets = counts.cumsum(0) - counts
    return F.embedding_bag(columns, W_dec, offsets, mode="sum", per_sample_weights=values.to(W_dec.dtype))


def csr_order(indices: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """The (N, k) latent ids grouped by latent: (crow (num_rows + 1,), perm (N·k,)), pairs of latent f being
    ``perm[crow[f]:crow[f + 1]]`` (flat pair ids n·k + t) in increasing order. A counting sort on CPU (O(N·k)),
    a stable argsort elsewhere."""
    flat = indices.reshape(-1)
    kernels = cpu_kernels() if flat.device.type == "cpu" else None
    if kernels is not None:
        return tuple(kernels.csr_order(flat.contiguous(), num_rows))
    crow = torch.zeros(num_rows + 1, dtype=torch.long, device=indices.device)
    crow[1:] = torch.bincount(flat, minlength=num_rows).cumsum(0)
    return crow, flat.argsort(stable=True)


TILE_BYTES = 384 << 10
"""Bytes of output rows per column tile of the narrow-layer scatter kernel (one tile stays in L2)."""


def _scatter_rows_matmul(
    indices: Tensor, coefficients: Tensor, rows: Tensor, num_rows: int, tile_bytes: int = TILE_BYTES
) -> tuple[Tensor, Tensor]:
    """out[f] = Σ_{(n,t): indices[n,t] = f} coefficients[n,t] · rows[n] -> (num_rows, d), and the column sums
    Σ coefficients per f -> (num_rows,).

    The transposed sparse product Sᵀ·rows with S the (N, num_rows) matrix of TopK coefficients, with no (N, k, d)
    temporary. On CPU, compiled kernels, both summing each output row's pairs in pair order (deterministic, and the
    same bits either way): latent by latent (CSR order), or, when a row has several pairs in each column tile of
    ``tile_bytes`` (narrow layers read at many columns: KronSAE's fused encoder, 2k of h·(m+n) columns per row),
    tile by tile in row order, so each row is read once per tile instead of once per pair (0.72x / 0.86x the CSR
    kernel's time for the (4, 8) / (2, 4) KronSAE at d_in 640, two threads). Elsewhere a CSR sparse-dense matmul.
    """
    n, k = indices.shape
    kernels = cpu_kernels() if rows.device.type == "cpu" and rows.dtype in (torch.float32, torch.float64) else None
    if kernels is not None:
        coef = coefficients.to(rows.dtype).contiguous()
        tile = max(1, tile_bytes // max(1, rows.shape[1] * rows.element_size()))
        if k * tile >= 3 * num_rows:  # >= 3 pairs per (row, tile) on average
            return tuple(kernels.tile_scatter_rows(indices.contiguous(), coef, rows.contiguous(), num_rows, tile))
        crow, order = csr_order(indices, num_rows)
        return tuple(kernels.csr_scatter_rows(crow, order, k, coef.reshape(-1), rows.contiguous()))
    crow, order = csr_order(indices, num_rows)
    compute_dtype = torch.float32 if rows.dtype in (torch.bfloat16, torch.float16) else rows.dtype
    coef = coefficients.reshape(-1)[order].to(compute_dtype)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        sparse = torch.sparse_csr_tensor(crow, order // k, coef, (num_rows, n))
        out = (sparse @ rows.to(compute_dtype)).to(rows.dtype)
    sums = coefficients.new_zeros(num_rows, dtype=compute_dtype).index_add_(
        0, indices.reshape(-1), coefficients.reshape(-1).to(compute_dtype)
    )
    return out, sums.to(rows.dtype)


def _half_matmul_dtype(x: Tensor) -> torch.dtype | None:
    """bfloat16 / float16 when autocast to it is on for x's device (the bf16 path), else None."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        if dtype in (torch.bfloat16, torch.float16):
            return dtype
    return None


def select_topk(
    scores: Tensor, k: int, dead_mask: Tensor | None = None, k_aux: int = 0, bias: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scores (N, F) (+ bias (F,) when given) -> the k largest per row, sorted descending (values, indices), and
    the ``k_aux`` largest among ``dead_mask`` columns (unsorted; empty when k_aux is 0).

    One pass of the compiled CPU kernel for float32 / bfloat16 scores on CPU (values float32; ties: lower index
    first; the bias is added on the fly, so an encoder need not broadcast it into its (N, F) product); torch.topk
    elsewhere and when the values must carry autograd's gradient (the dense backward of small SAEs)."""
    use_aux = dead_mask is not None and k_aux > 0
    kernel_ok = scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.bfloat16)
    kernels = cpu_kernels() if kernel_ok and not (scores.requires_grad and torch.is_grad_enabled()) else None
    if kernels is not None:
        mask = dead_mask.contiguous() if use_aux else torch.zeros(0, dtype=torch.bool)
        bias_f32 = bias.detach().float().contiguous() if bias is not None else torch.zeros(0)
        return tuple(kernels.topk_scores(scores.contiguous(), bias_f32, k, mask, k_aux if use_aux else 0))
    if bias is not None:
        scores = scores + bias
    values, indices = scores.topk(k, dim=-1, sorted=True)
    if use_aux:
        aux_values, aux_indices = scores.masked_fill(~dead_mask, -torch.inf).topk(k_aux, dim=-1, sorted=False)
    else:
        aux_values, aux_indices = values.new_zeros(values.shape[0], 0), indices.new_zeros(indices.shape[0], 0)
    return values, indices, aux_values, aux_indices


def linear_at(x: Tensor, weight: Tensor, bias: Tensor, columns: Tensor, chunk_elements: int = 1 << 24) -> Tensor:
    """(x Wᵀ + b) at the given columns only: x (N, d), weight (F, d), bias (F,), columns (N, t) -> (N, t), in x's
    dtype, without the (N, F) product (compiled CPU kernel, or chunks of gathered rows elsewhere)."""
    kernels = cpu_kernels() if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) else None
    if kernels is not None:
        return kernels.row_dots(x.contiguous(), weight.contiguous(), bias.contiguous(), columns.contiguous())
    rows = max(1, chunk_elements // max(1, columns.shape[1] * x.shape[1]))
    parts = [
        torch.einsum("ntd,nd->nt", weight[columns[i : i + rows]], x[i : i + rows]) + bias[columns[i : i + rows]]
        for i in range(0, x.shape[0], rows)
    ]
    return torch.cat(parts) if parts else x.new_zeros(columns.shape)


class TopKEncode(torch.autograd.Function):
    """ReLU-TopK of a linear encoder of centred input with a sparse backward.

    Forward: scores = (x − c) Wᵀ + b (N, F), c the decoder bias the encoder subtracts (or none); the k largest,
    sorted, through ReLU (ReLU commutes with TopK, so the (N, F) scores are never rectified). Optionally also the
    ``k_aux`` largest scores among ``dead_mask`` latents (for AuxK), from the same matmul and the same pass.
    Under bf16/fp16 autocast (the bf16 path) the (N, F) matmul runs in half precision (the CPU's bf16 units,
    tensor cores) but only to choose the latents: their values are recomputed exactly in x's precision, so
    everything after the choice (values, losses, gradients, the fp32 master weights) is full precision.
    Backward: only the selected latents receive gradient: dW = Sᵀ(x − c) and db = Sᵀ1 (one latent-major pass),
    dc = −dbᵀW (the centring's gradient, a matrix-vector product: Σ_n of the input gradient is all it needs),
    dx = embedding_bag(W, g) only when x itself needs a gradient. Cost O(N·k·d) instead of the dense O(N·F·d).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, center: Tensor | None, k: int, dead_mask, k_aux: int):
        centred = x - center if center is not None else x
        half = _half_matmul_dtype(x)
        if half is None:
            scores = centred @ weight.t()
        else:  # the bf16 path: select with a half-precision matmul, then take the exact values of the chosen ones
            with torch.autocast(x.device.type, enabled=False):
                scores = centred.to(half) @ weight.to(half).t()
        values, indices, aux_values, aux_indices = select_topk(scores, k, dead_mask, k_aux, bias=bias)
        if half is not None:
            values = linear_at(centred, weight, bias, indices)
            values, order = values.sort(dim=-1, descending=True)
            indices = indices.gather(1, order)
            aux_values = aux_values.to(x.dtype)
        values = values.to(x.dtype).clamp_min_(0.0)
        aux_values = aux_values.to(x.dtype).clamp_min_(0.0)
        ctx.has_center = center is not None
        ctx.aux_block, ctx.aux_tiles = None, None
        if k_aux > 0:
            ctx.aux_block, ctx.aux_tiles = aux_block_and_tiles(aux_indices, dead_mask, centred.dtype, centred.shape[1])
        ctx.save_for_backward(centred, weight, values, indices, aux_values, aux_indices)
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices, grad_aux_values, _grad_aux_indices):
        centred, weight, values, indices, aux_values, aux_indices = ctx.saved_tensors
        grad = grad_values * (values > 0)
        needs = ctx.needs_input_grad
        dense_aux = None  # AuxK's share as a dense (N, C) block over the dead latents' columns (see dense_aux_block)
        tiled_aux = None  # or its (N, k_aux) gradients, scattered by the tiled kernels (see hf_sae.aux_tiles)
        if aux_indices.shape[-1] > 0 and grad_aux_values is not None:
            grad_aux = grad_aux_values * (aux_values > 0)
            if ctx.aux_tiles is not None and not needs[0]:
                tiled_aux = grad_aux
            elif ctx.aux_block is not None:
                columns, positions = ctx.aux_block
                dense_aux = (columns, dense_rows(grad_aux.to(centred.dtype), positions, columns.numel()))
            else:
                grad = torch.cat([grad, grad_aux], dim=-1)
                indices = torch.cat([indices, aux_indices], dim=-1)
        grad_x = sparse_decode(grad, indices, weight) if needs[0] else None
        if grad_x is not None and dense_aux is not None:
            grad_x = grad_x + dense_aux[1] @ weight[dense_aux[0]]
        grad_weight = grad_bias = grad_center = None
        if needs[1] or needs[2] or (ctx.has_center and needs[3]):
            grad_weight, grad_bias = _scatter_rows_matmul(indices, grad, centred, weight.shape[0])
            if dense_aux is not None:
                columns, block = dense_aux
                grad_weight.index_add_(0, columns, block.t() @ centred)
                grad_bias.index_add_(0, columns, block.sum(0))
            if tiled_aux is not None:
                block, sums = ctx.aux_tiles.scatter(tiled_aux, centred)
                grad_weight.index_add_(0, ctx.aux_tiles.columns, block)
                grad_bias.index_add_(0, ctx.aux_tiles.columns, sums)
            if ctx.has_center and needs[3]:
                grad_center = -(grad_bias @ weight)
        return grad_x, grad_weight, grad_bias, grad_center, None, None, None


def _sparse_linear_backward(needs_input_grad, x: Tensor, weight: Tensor, columns: Tensor, grad: Tensor):
    """Gradients of pre[n, columns[n, t]] (pre = x Wᵀ + b) given grad (N, t): dx, dW, db, all sparse in the columns."""
    grad_x = grad_weight = grad_bias = None
    if needs_input_grad[0]:
        grad_x = sparse_decode(grad, columns, weight)
    if needs_input_grad[1] or needs_input_grad[2]:
        grad_weight, grad_bias = _scatter_rows_matmul(columns, grad, x, weight.shape[0])
    return grad_x, grad_weight, grad_bias


class SparseLinearGather(torch.autograd.Function):
    """pre.gather(1, columns) for pre = x Wᵀ + b computed without gradient, with a backward that touches only the
    gathered columns (used by KronSAE, whose selected latents read 2 of the h·(m+n) encoder columns each).

    x: (N, d_in), weight: (C, d_in), bias: (C,), columns: (N, t), pre: (N, C) -> (N, t). With ``add_bias`` pre is
    x Wᵀ alone and the bias is added to the gathered entries only (no (N, C) broadcast of it).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, columns: Tensor, pre: Tensor, add_bias: bool):
        ctx.save_for_backward(x, weight, columns)
        gathered = pre.gather(1, columns)
        return gathered.add_(bias[columns]) if add_bias else gathered

    @staticmethod
    def backward(ctx, grad):
        x, weight, columns = ctx.saved_tensors
        return (*_sparse_linear_backward(ctx.needs_input_grad, x, weight, columns, grad.contiguous()), None, None, None)


class SelectedLinear(torch.autograd.Function):
    """The values (N, t) of pre = x Wᵀ + b at ``columns`` (N, t), already computed without gradient (by a selection
    kernel), given the sparse backward of :class:`SparseLinearGather`: only the selected columns get gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, columns: Tensor, values: Tensor):
        ctx.save_for_backward(x, weight, columns)
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad):
        x, weight, columns = ctx.saved_tensors
        return (*_sparse_linear_backward(ctx.needs_input_grad, x, weight, columns, grad.contiguous()), None, None)


def _flat_scatter_rows_matmul(
    columns: Tensor, rows: Tensor, coefficients: Tensor, x: Tensor, num_columns: int
) -> tuple[Tensor, Tensor]:
    """out[f] = Σ_{e: columns[e] = f} coefficients[e] · x[rows[e]] -> (num_columns, d), and Σ coefficients per f.

    The flat counterpart of :func:`_scatter_rows_matmul`: entries grouped by column (CSR order), then one CSR
    sparse-dense product, with no (nnz, d) temporary."""
    compute_dtype = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
    crow, order = csr_order(columns, num_columns)
    coef = coefficients.reshape(-1).to(compute_dtype)
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        sparse = torch.sparse_csr_tensor(crow, rows[order], coef[order], (num_columns, x.shape[0]))
        out = (sparse @ x.to(compute_dtype)).to(x.dtype)
    sums = coef.new_zeros(num_columns).index_add_(0, columns, coef)
    return out, sums.to(x.dtype)


class FlatSelectedLinear(torch.autograd.Function):
    """The values (nnz,) of pre = x Wᵀ + b at the flat entries (rows[e], columns[e]), already computed without
    gradient (by the selection), with a backward that touches only those entries: dW[f] = Σ g x[row], db[f] = Σ g,
    dx = the flat decode of g by W (only when x needs it). The ragged counterpart of :class:`SelectedLinear` for
    selections whose rows keep very different numbers of latents (BatchTopK): cost O(nnz · d_in).

    x: (N, d_in), weight: (C, d_in), bias: (C,), rows, columns: (nnz,) int64 (rows ascending), values: (nnz,).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, rows: Tensor, columns: Tensor, values: Tensor):
        ctx.save_for_backward(x, weight, rows, columns)
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rows, columns = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grad_x = flat_decode(grad, rows, columns, weight, x.shape[0]) if needs[0] else None
        grad_weight = grad_bias = None
        if needs[1] or needs[2]:
            grad_weight, grad_bias = _flat_scatter_rows_matmul(columns, rows, grad, x, weight.shape[0])
        return grad_x, grad_weight, grad_bias, None, None, None


class CentringGradient(torch.autograd.Function):
    """Identity on the encoder bias b whose backward also gives b_dec its gradient through the centring.

    pre = W(x − b_dec) + b, so ∂L/∂b_dec = −Wᵀ ∂L/∂b: one (C, d_in) matrix-vector product replaces the (N, t, d_in)
    gather that back-propagating through x − b_dec would cost. bias: (C,), weight: (C, d_in), b_dec: (d_in,).
    """

    @staticmethod
    def forward(ctx, bias: Tensor, weight: Tensor, b_dec: Tensor) -> Tensor:
        ctx.save_for_backward(weight)
        return bias.view_as(bias)

    @staticmethod
    def backward(ctx, grad_bias: Tensor):
        (weight,) = ctx.saved_tensors
        return grad_bias, None, -(grad_bias @ weight)


def topk_encode(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    k: int,
    dead_mask: Tensor | None = None,
    k_aux: int = 0,
    center: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ReLU-TopK of (x − center) Wᵀ + b. x: (N, d_in), weight: (F, d_in), bias: (F,), center: (d_in,) or None
    -> values, indices (N, k) sorted descending, and aux values, indices (N, k_aux) among ``dead_mask`` latents.

    Uses the sparse backward when it is cheaper than the dense one: k much smaller than F, and F large enough
    that the sparse bookkeeping pays off (see benchmarks/bench_sae_step.py).
    """
    sparse_pays = 16 * k <= weight.shape[0] and weight.shape[0] >= 2048
    params_need_grad = weight.requires_grad or (center is not None and center.requires_grad)
    if torch.is_grad_enabled() and (x.requires_grad or params_need_grad) and sparse_pays:
        return TopKEncode.apply(x, weight, bias, center, k, dead_mask, k_aux)
    scores = F.relu(F.linear(x - center if center is not None else x, weight, bias))
    values, indices, aux_values, aux_indices = select_topk(scores, k, dead_mask, k_aux)
    return values.to(scores.dtype), indices, aux_values.to(scores.dtype).clamp_min(0.0), aux_indices


def compact_latents(acts: Tensor) -> tuple[Tensor, Tensor]:
    """Dense non-negative activations (N, F) -> the active (> 0) latents of each row, sorted descending, as
    (values, indices) of width w = the batch's largest L0 (at least 1); shorter rows are padded with value 0 (index
    of an inactive latent), which decodes to nothing. For variable-L0 encoders (a threshold, BatchTopK)."""
    width = max(1, int((acts > 0).sum(-1).max())) if acts.numel() else 1
    values, indices = acts.topk(min(width, acts.shape[-1]), dim=-1, sorted=True)
    return values, indices


def _flat_topk_mask(values: Tensor, count: int) -> Tensor:
    """A bool mask of values' shape marking its ``count`` largest entries over all dimensions (which of the entries
    tied at the count-th largest value is marked is torch.topk's choice)."""
    flat = values.reshape(-1)
    _, chosen = flat.topk(min(count, flat.numel()), sorted=False)
    return (
        torch.zeros(flat.numel(), dtype=torch.bool, device=values.device).index_fill_(0, chosen, True).view_as(values)
    )


def _sorted_kept(values: Tensor, indices: Tensor, kept: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Rows (r, c) of candidates -> their first min(width, c) after sorting the kept ones first, descending
    (``values`` zero where not kept), as (values, indices) (r, min(width, c)).

    The stable sort keeps the candidates' order among equal values (lower latent first for :func:`select_topk`'s
    candidates and for whole rows)."""
    sorted_values, order = (values * kept).sort(dim=-1, descending=True, stable=True)
    width = min(width, values.shape[1])
    return sorted_values[:, :width], indices.gather(1, order[:, :width])


def _place_rows(out_values: Tensor, out_indices: Tensor, rows: Tensor | None, part: tuple[Tensor, Tensor]) -> None:
    """Write sorted rows (r, c) into ``rows`` of the (N, width) output (all rows when None). Past the c candidates
    (width > c, only when another row keeps more than c) a row is padded with zeros at its last sorted index, an
    inactive latent of this row, so padding never repeats a kept latent (``to_dense`` stays exact) although it may
    repeat an inactive one."""
    values, indices = part
    c = values.shape[1]
    if rows is None:
        out_values[:, :c], out_indices[:, :c] = values, indices
        out_indices[:, c:] = indices[:, -1:]
    else:
        out_values[rows, :c], out_indices[rows, :c] = values, indices
        out_indices[rows, c:] = indices[:, -1:]


def _rectified_rows(scores: Tensor, rows: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """ReLU(scores[rows] + bias) -> (len(rows), F) in ``dtype``: the same sum :func:`select_topk` forms (the bias
    promoted with the scores, as its kernel adds the float32 bias to the scores read as float32)."""
    full = scores[rows]
    if bias is not None:
        full = full + bias.detach()
    return full.to(dtype).clamp_min_(0)


def batch_topk_select(
    scores: Tensor, k: int, bias: Tensor | None = None, dead_mask: Tensor | None = None, k_aux: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """BatchTopK selection (Bussmann et al. 2024, arXiv 2412.06410): the N·k largest of the (N, F) activations
    ReLU(scores + bias) of the whole batch, so a row keeps any number of latents and the batch's mean L0 is k.

    Returns (values, indices) as :func:`compact_latents` (rows sorted descending, padded with zeros at inactive
    latents, width = the largest number kept in one row), and the ``k_aux`` largest of ``dead_mask``'s latents per
    row (AuxK; empty when k_aux is 0), as :func:`select_topk`.

    Never a top-(N·k) over all N·F scores, and never a full sort of the batch: each row's c = 4k largest (one pass
    of :func:`select_topk`, the bias added on the fly) are its candidates, and t₁ = the N·k-th largest candidate.
    Rows that keep all c of their candidates ("overflow" rows, the few outlier tokens) may keep more than c; those
    rows alone are then taken whole (their F activations) and t = the N·k-th largest of the union of the other
    rows' candidates and the overflow rows' full rows is the answer. Exact: the union holds every candidate and is
    part of the batch, so t₁ <= t* (the batch's N·k-th largest). A non-overflow row keeps fewer than c candidates
    and keeps every candidate above t₁, so all its entries above t₁ — hence all above t* — are candidates: a larger
    threshold never makes a non-overflow row overflow. So the union holds every entry above t*, and at least N·k
    entries >= t* (if t* = t₁, the candidates alone have them), and its N·k largest values are the batch's.
    Ties at the threshold: which of the tied entries are kept is torch.topk's choice (as with the earlier doubling
    of c, :func:`batch_topk_select_by_doubling`); within a row the kept entries are sorted stably (equal values:
    lower latent first). Cost: one top-c pass, a top-(N·k) of N·c + r·F values and a sort of the r overflow rows.
    """
    n, num_latents = scores.shape
    cap = min(num_latents, 4 * k)
    values, indices, aux_values, aux_indices = select_topk(scores, cap, dead_mask, k_aux, bias=bias)
    values = values.clamp_min(0)
    kept = _flat_topk_mask(values, n * k)
    overflow = kept.all(dim=-1) if cap < num_latents and n else kept.new_zeros(n)
    rows = overflow.nonzero().squeeze(1)
    if rows.numel() == 0:
        width = max(1, int(kept.sum(-1).max())) if n else 1
        return (*_sorted_kept(values, indices, kept, width), aux_values, aux_indices)  # width <= c
    rest = (~overflow).nonzero().squeeze(1)
    full = _rectified_rows(scores, rows, bias, values.dtype)  # (r, F)
    rest_values, rest_indices = values[rest], indices[rest]
    union = _flat_topk_mask(torch.cat([rest_values.reshape(-1), full.reshape(-1)]), n * k)
    rest_kept = union[: rest_values.numel()].view_as(rest_values)
    full_kept = union[rest_values.numel() :].view_as(full)
    width = max(1, int(full_kept.sum(-1).max()), int(rest_kept.sum(-1).max()) if rest.numel() else 0)
    out_values = values.new_zeros(n, width)
    out_indices = indices.new_zeros(n, width)
    if rest.numel():
        _place_rows(out_values, out_indices, rest, _sorted_kept(rest_values, rest_indices, rest_kept, width))
    all_latents = torch.arange(num_latents, device=indices.device).expand(rows.numel(), -1)
    _place_rows(out_values, out_indices, rows, _sorted_kept(full, all_latents, full_kept, width))
    return out_values, out_indices, aux_values, aux_indices


def batch_topk_select_by_doubling(
    scores: Tensor, k: int, bias: Tensor | None = None, dead_mask: Tensor | None = None, k_aux: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The earlier :func:`batch_topk_select` (same results): the per-row candidate count c doubles from 4k until no
    row keeps all of its c candidates, up to a full sort of the batch (c = F) when one outlier row keeps many.
    Kept as the reference for tests and benchmarks/bench_batchtopk_step.py; not used in training."""
    n, num_latents = scores.shape
    cap = min(num_latents, 4 * k)
    while True:
        values, indices, aux_values, aux_indices = select_topk(scores, cap, dead_mask, k_aux, bias=bias)
        values = values.clamp_min(0)
        kept = _flat_topk_mask(values, n * k)
        width = int(kept.sum(-1).max()) if n else 1
        if cap == num_latents or width < cap:
            break
        cap = min(num_latents, 2 * cap)
    return (*_sorted_kept(values, indices, kept, max(1, width)), aux_values, aux_indices)
