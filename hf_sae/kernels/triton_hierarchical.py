"""Triton kernels of the weighted-budget HierarchicalTopK loss (CUDA; imported only through
:mod:`hf_sae.kernels.triton_support`).

L = Σ_j w_j · Σ_{n,d} r_j[n, d]² / (N·D), r_j = x − b_dec − Σ_{t≤j} v_t W_dec[i_t] (Balagansky et al. 2025; the
budget weights w come from :func:`hf_sae.losses.budget_weights`; w = e_K is the plain TopK loss).

Forward: one program per (block of rows, tile of D columns) runs the prefix sum r ← r − v_t·W[i_t] for t = 1..K
and accumulates w_t·r_t² elementwise; it writes the row sums of its D tile and the float32 residual r_K (N, D).
Backward, from t = K down to 1, elementwise in d (the same tiling): s ← s + w_t·r_t (the suffix sum
s_t = Σ_{j≥t} w_j r_j), dL/dv_t = c·⟨W[i_t], s_t⟩ (each D tile adds its part), dL/dW[i_t] += c·v_t·s_t (both float32
``atomic_add``), then r_{t−1} = r_t + v_t·W[i_t]; c = −2·grad/(N·D), dL/dx = −c·s_1, dL/db_dec = c·Σ_n s_1.
So memory is O(N·D) (never the (N, K, D) prefix reconstructions) and each decoder row is read once per pass.
The plain TopK case skips the recurrence (s = r_K for every t) and shares the sparse decode's backward kernel.

Any N, K, D (masked tiles); float32 / bfloat16 / float16 inputs, each in its own dtype, float32 arithmetic; the
loss is float32, the reconstruction has x's dtype and each gradient its input's dtype (as the torch reference).
Determinism: the loss is a fixed-order sum (per-tile row sums, summed afterwards); the gradients use atomics (see
:mod:`hf_sae.kernels.triton_decode`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_decode import Tiles, block_shape, scatter_backward, sum_combine


@triton.jit
def hierarchical_forward_kernel(
    row_loss_ptr,
    residual_ptr,
    x_ptr,
    bias_ptr,
    values_ptr,
    indices_ptr,
    weight_ptr,
    budget_weights_ptr,
    N,
    K,
    D,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SINGLE_BUDGET: tl.constexpr,
):
    """row_loss[tile, rows] = Σ_t w_t Σ_{cols} r_t² (only r_K when SINGLE_BUDGET); residual[rows, cols] = r_K."""
    pid_d = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)
    tile = rows64[:, None] * D + cols[None, :]
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    r = tl.load(x_ptr + tile, mask=mask, other=0.0).to(tl.float32) - bias[None, :]
    r = tl.where(mask, r, 0.0)
    squares = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)  # Σ_t w_t r_t², summed over the tile's columns at the end
    for t in range(0, K):
        v = tl.load(values_ptr + rows64 * K + t, mask=row_ok, other=0.0).to(tl.float32)
        latent = tl.load(indices_ptr + rows64 * K + t, mask=row_ok, other=0).to(tl.int64)
        w = tl.load(weight_ptr + latent[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        r -= v[:, None] * w
        if not SINGLE_BUDGET:
            squares += tl.load(budget_weights_ptr + t) * (r * r)
    if SINGLE_BUDGET:
        squares = r * r
    loss = tl.reduce(squares, 1, sum_combine)
    tl.store(row_loss_ptr + pid_d.to(tl.int64) * N + rows64, loss, mask=row_ok)
    tl.store(residual_ptr + tile, r, mask=mask)


@triton.jit
def hierarchical_backward_kernel(
    grad_values_ptr,
    grad_weight_ptr,
    suffix_ptr,
    residual_ptr,
    coef_ptr,
    values_ptr,
    indices_ptr,
    weight_ptr,
    budget_weights_ptr,
    N,
    K,
    D,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GRAD_VALUES: tl.constexpr,
    GRAD_WEIGHT: tl.constexpr,
):
    """The suffix recurrence from t = K to 1 (module docstring); adds this tile's part of ⟨W[i_t], c·s_t⟩ to grad_v,
    adds c·v_t·s_t into grad_W rows, and stores s_1 (unscaled) for dL/dx and dL/db_dec."""
    pid_d = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols < D)[None, :]
    rows64 = rows.to(tl.int64)
    tile = rows64[:, None] * D + cols[None, :]
    coef = tl.load(coef_ptr)
    r = tl.load(residual_ptr + tile, mask=mask, other=0.0)
    s = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    grad_v_ptrs = grad_values_ptr + rows64 * K
    for step in range(0, K):
        t = K - 1 - step
        s += tl.load(budget_weights_ptr + t) * r
        v = tl.load(values_ptr + rows64 * K + t, mask=row_ok, other=0.0).to(tl.float32)
        latent = tl.load(indices_ptr + rows64 * K + t, mask=row_ok, other=0).to(tl.int64)
        w_ptrs = weight_ptr + latent[:, None] * D + cols[None, :]
        w = tl.load(w_ptrs, mask=mask, other=0.0).to(tl.float32)
        if GRAD_VALUES:
            tl.atomic_add(grad_v_ptrs + t, coef * tl.reduce(w * s, 1, sum_combine), mask=row_ok, sem="relaxed")
        if GRAD_WEIGHT:
            tl.atomic_add(
                grad_weight_ptr + latent[:, None] * D + cols[None, :], (coef * v)[:, None] * s, mask=mask, sem="relaxed"
            )
        r += v[:, None] * w
    tl.store(suffix_ptr + tile, s, mask=mask)


class TritonHierarchicalLoss(torch.autograd.Function):
    """(loss, reconstruction at K) of the weighted prefix MSE on the Triton kernels; differentiable in x, values,
    W_dec and b_dec. ``single_budget``: the weights are e_K (the plain TopK loss; no recurrence)."""

    @staticmethod
    def forward(ctx, x, values, indices, W_dec, b_dec, weights, single_budget, tiles):
        x, values, indices, W_dec = x.contiguous(), values.contiguous(), indices.contiguous(), W_dec.contiguous()
        weights = weights.to(device=x.device, dtype=torch.float32).contiguous()
        (n, k), d = values.shape, x.shape[1]
        rows, cols, warps = block_shape(n, d, tiles)
        grid = (triton.cdiv(n, rows), triton.cdiv(d, cols))
        row_loss = torch.empty(grid[1], n, dtype=torch.float32, device=x.device)
        residual = torch.empty(n, d, dtype=torch.float32, device=x.device)
        hierarchical_forward_kernel[grid](
            row_loss,
            residual,
            x,
            b_dec.contiguous(),
            values,
            indices,
            W_dec,
            weights,
            n,
            k,
            d,
            BLOCK_N=rows,
            BLOCK_D=cols,
            SINGLE_BUDGET=single_budget,
            num_warps=warps,
        )
        ctx.save_for_backward(values, indices, W_dec, weights, residual)
        ctx.meta = (n, d, single_budget, tiles, x.dtype, b_dec.dtype)
        reconstruction = (x.float() - residual).to(x.dtype)
        ctx.mark_non_differentiable(reconstruction)
        return row_loss.sum() / (n * d), reconstruction

    @staticmethod
    def backward(ctx, grad_loss, _grad_reconstruction):
        values, indices, W_dec, weights, residual = ctx.saved_tensors
        n, d, single_budget, tiles, x_dtype, b_dtype = ctx.meta
        needs_x, needs_v, _, needs_W, needs_b = ctx.needs_input_grad[:5]
        coef = (grad_loss.detach().float() * (-2.0 / (n * d))).reshape(1)  # c = −2·grad/(N·D), left on the device
        if single_budget:  # s_t = r_K for every t: the sparse decode's backward with direction r_K
            suffix = residual
            grad_v, grad_W = scatter_backward(residual, coef, values, indices, W_dec, needs_v, needs_W, tiles)
        else:
            suffix = torch.empty_like(residual)
            rows, cols, warps = block_shape(n, d, tiles)
            grid = (triton.cdiv(n, rows), triton.cdiv(d, cols))
            grad_v = torch.zeros(n if needs_v else 0, values.shape[1], dtype=torch.float32, device=W_dec.device)
            grad_W = torch.zeros(W_dec.shape if needs_W else (0, d), dtype=torch.float32, device=W_dec.device)
            hierarchical_backward_kernel[grid](
                grad_v,
                grad_W,
                suffix,
                residual,
                coef,
                values,
                indices,
                W_dec,
                weights,
                n,
                values.shape[1],
                d,
                BLOCK_N=rows,
                BLOCK_D=cols,
                GRAD_VALUES=needs_v,
                GRAD_WEIGHT=needs_W,
                num_warps=warps,
            )
            grad_v = grad_v if needs_v else None
            grad_W = grad_W if needs_W else None
        grad_x = (suffix * -coef).to(x_dtype) if needs_x else None
        grad_b = (suffix.sum(0) * coef).to(b_dtype) if needs_b else None
        grad_v = grad_v.to(values.dtype) if grad_v is not None else None
        grad_W = grad_W.to(W_dec.dtype) if grad_W is not None else None
        return grad_x, grad_v, None, grad_W, grad_b, None, None, None


def hierarchical_topk_loss(
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    weights: Tensor,
    single_budget: bool = False,
    tiles: Tiles | None = None,
) -> tuple[Tensor, Tensor]:
    """The weighted prefix MSE and the reconstruction at K on the Triton kernels.

    Args:
        x: (N, D) targets; values, indices: (N, K) TopK latents sorted descending; W_dec: (F, D); b_dec: (D,).
        weights: (K,) budget weights (:func:`hf_sae.losses.budget_weights`); ``single_budget`` when they are e_K.
        tiles: (rows, columns, warps) per program, overriding :func:`block_shape` (tests, tuning).

    Returns (loss, float32 scalar; reconstruction (N, D) in x's dtype, detached).
    """
    return TritonHierarchicalLoss.apply(x, values, indices, W_dec, b_dec, weights, single_budget, tiles)
