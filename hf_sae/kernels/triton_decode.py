"""Triton kernels of the TopK sparse decode (CUDA; imported only through :mod:`hf_sae.kernels.triton_support`).

out[n] = Σ_t v[n, t] · W[i[n, t]] for values v, indices i (N, K) and a decoder W (F, D), and its backward given
g = dL/dout (N, D): dL/dv[n, t] = ⟨W[i[n, t]], g[n]⟩ and dL/dW[f] = Σ_{(n,t): i[n,t] = f} v[n, t] · g[n].

Tiling: one program per (block of rows, tile of columns of D; :func:`block_shape`); any N, K, D (the last
blocks are masked). Each program loops over t, gathering its rows' decoder-row segments W[i[n, t], tile]
(contiguous in D, so coalesced). All arithmetic is float32 whatever the input dtypes (float32, bfloat16, float16);
outputs are cast back to the dtypes of the torch reference (:func:`hf_sae.sparse.sparse_decode`).

Determinism: the forward is a fixed-order sum. The gradients are float32 ``atomic_add``s: dL/dW into an (F, D)
float32 buffer (a row chosen by many tokens receives their adds in a varying order), dL/dv into an (N, K) buffer
(one add per D tile). So gradients are not bit-reproducible; under ``torch.use_deterministic_algorithms(True)``
:mod:`hf_sae.kernels.triton_support` sends such calls to the torch path. Memory: O(N·K + N·D) besides dL/dW.

:func:`scatter_backward` is shared with the plain TopK loss of :mod:`hf_sae.kernels.triton_hierarchical`, whose
backward is this one with g = −2·grad·r_K / (N·D).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# The kernels call only triton.language builtins (tl.full, not tl.zeros; row sums as tl.reduce with triton's own
# fp32 add, which is what tl.sum compiles to). tl.zeros and tl.sum are @triton.jit helpers of triton.language,
# compiled (not interpreted) when triton was imported before TRITON_INTERPRET=1 was set, and the interpreter (the
# CPU tests) cannot call a compiled helper; it recognises this combine function and sums with numpy. A triton
# without the private name gets an equivalent one.
sum_combine = getattr(tl.standard, "_sum_combine", None)
if sum_combine is None:

    @triton.jit
    def sum_combine(a, b):
        return a + b


MAX_BLOCK_D = 512  # columns of D per program (a power of two; D is tiled with masks)
BLOCK_ELEMENTS = 2048  # rows × columns per program: ~16 fp32 registers per thread and array at 4 warps


Tiles = tuple[int, int, int]  # (rows, columns of D, warps) per program


def block_shape(n: int, d: int, tiles: Tiles | None = None) -> Tiles:
    """(rows, columns, warps) per program: D tiles of at most MAX_BLOCK_D columns (a power of two), as many rows as
    fill BLOCK_ELEMENTS (no more than the batch needs), 4 warps. ``tiles`` (tests, tuning) is used as given."""
    if tiles is not None:
        return tiles
    block_d = min(MAX_BLOCK_D, triton.next_power_of_2(max(1, d)))
    block_rows = max(1, min(BLOCK_ELEMENTS // block_d, triton.next_power_of_2(max(1, n))))
    return block_rows, block_d, 4


@triton.jit
def decode_forward_kernel(
    out_ptr, values_ptr, indices_ptr, weight_ptr, N, K, D, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr
):
    """out[rows, cols] = Σ_t v[rows, t] · W[i[rows, t], cols], accumulated in float32."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols < D)[None, :]
    rows64 = rows.to(tl.int64)
    acc = tl.full([BLOCK_N, BLOCK_D], 0.0, tl.float32)
    for t in range(0, K):
        v = tl.load(values_ptr + rows64 * K + t, mask=row_ok, other=0.0).to(tl.float32)
        latent = tl.load(indices_ptr + rows64 * K + t, mask=row_ok, other=0).to(tl.int64)
        w = tl.load(weight_ptr + latent[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += v[:, None] * w
    tl.store(out_ptr + rows64[:, None] * D + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def scatter_backward_kernel(
    grad_values_ptr,
    grad_weight_ptr,
    direction_ptr,
    coef_ptr,
    values_ptr,
    indices_ptr,
    weight_ptr,
    N,
    K,
    D,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GRAD_VALUES: tl.constexpr,
    GRAD_WEIGHT: tl.constexpr,
):
    """With s = coef · direction[rows, cols] (one vector per row for every t):
    grad_values[rows, t] += ⟨W[i[rows, t], cols], s⟩ (this D tile's part) and grad_W[i[rows, t], cols] += v·s.
    ``coef`` is read from device memory, so the caller's scale (the loss gradient) needs no host sync."""
    pid_d = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols < D)[None, :]
    rows64 = rows.to(tl.int64)
    coef = tl.load(coef_ptr)
    s = coef * tl.load(direction_ptr + rows64[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    grad_v_ptrs = grad_values_ptr + rows64 * K
    for t in range(0, K):
        latent = tl.load(indices_ptr + rows64 * K + t, mask=row_ok, other=0).to(tl.int64)
        if GRAD_VALUES:
            w = tl.load(weight_ptr + latent[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            tl.atomic_add(grad_v_ptrs + t, tl.reduce(w * s, 1, sum_combine), mask=row_ok, sem="relaxed")
        if GRAD_WEIGHT:
            v = tl.load(values_ptr + rows64 * K + t, mask=row_ok, other=0.0).to(tl.float32)
            tl.atomic_add(
                grad_weight_ptr + latent[:, None] * D + cols[None, :], v[:, None] * s, mask=mask, sem="relaxed"
            )


def _grid(n: int, d: int, block_rows: int, block_d: int) -> tuple[int, int]:
    return triton.cdiv(n, block_rows), triton.cdiv(d, block_d)


def decode_forward(values: Tensor, indices: Tensor, W_dec: Tensor, tiles: Tiles | None = None) -> Tensor:
    """values, indices (N, K), W_dec (F, D) -> (N, D) in W_dec's dtype (as ``F.embedding_bag`` returns)."""
    values, indices, W_dec = values.contiguous(), indices.contiguous(), W_dec.contiguous()
    (n, k), d = values.shape, W_dec.shape[1]
    out = torch.empty(n, d, dtype=W_dec.dtype, device=W_dec.device)
    rows, cols, warps = block_shape(n, d, tiles)
    grid = _grid(n, d, rows, cols)
    decode_forward_kernel[grid](out, values, indices, W_dec, n, k, d, BLOCK_N=rows, BLOCK_D=cols, num_warps=warps)
    return out


def scatter_backward(
    direction: Tensor,
    coef: Tensor,
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    grad_values: bool,
    grad_weight: bool,
    tiles: Tiles | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """(dL/dv (N, K) float32, dL/dW (F, D) float32), each None unless asked, for per-row gradient directions
    ``direction`` (N, D) scaled by the one-element float32 tensor ``coef`` (see :func:`scatter_backward_kernel`)."""
    (n, k), (f, d) = values.shape, W_dec.shape
    rows, cols, warps = block_shape(n, d, tiles)
    grid = _grid(n, d, rows, cols)
    grad_v = torch.zeros(n if grad_values else 0, k, dtype=torch.float32, device=W_dec.device)
    grad_W = torch.zeros(f if grad_weight else 0, d, dtype=torch.float32, device=W_dec.device)
    if grad_values or grad_weight:
        scatter_backward_kernel[grid](
            grad_v,
            grad_W,
            direction.contiguous(),
            coef,
            values.contiguous(),
            indices.contiguous(),
            W_dec.contiguous(),
            n,
            k,
            d,
            BLOCK_N=rows,
            BLOCK_D=cols,
            GRAD_VALUES=grad_values,
            GRAD_WEIGHT=grad_weight,
            num_warps=warps,
        )
    return (grad_v if grad_values else None), (grad_W if grad_weight else None)


class TritonSparseDecode(torch.autograd.Function):
    """:func:`hf_sae.sparse.sparse_decode` on the Triton kernels: forward (N, D) in W_dec's dtype, gradients in
    the dtypes of ``values`` and ``W_dec``."""

    @staticmethod
    def forward(ctx, values: Tensor, indices: Tensor, W_dec: Tensor, tiles: Tiles | None = None) -> Tensor:
        ctx.save_for_backward(values, indices, W_dec)
        ctx.tiles = tiles
        return decode_forward(values, indices, W_dec, tiles)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        values, indices, W_dec = ctx.saved_tensors
        coef = torch.ones(1, dtype=torch.float32, device=W_dec.device)
        needs_v, needs_W = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad_v, grad_W = scatter_backward(grad_out, coef, values, indices, W_dec, needs_v, needs_W, ctx.tiles)
        grad_v = grad_v.to(values.dtype) if grad_v is not None else None
        grad_W = grad_W.to(W_dec.dtype) if grad_W is not None else None
        return grad_v, None, grad_W, None


def sparse_decode(values: Tensor, indices: Tensor, W_dec: Tensor, tiles: Tiles | None = None) -> Tensor:
    """Σ_t values[n, t] · W_dec[indices[n, t]]: values, indices (N, K), W_dec (F, D) -> (N, D), differentiable in
    values and W_dec. ``tiles`` (rows, columns, warps) overrides :func:`block_shape` (tests, tuning)."""
    return TritonSparseDecode.apply(values, indices, W_dec, tiles)
