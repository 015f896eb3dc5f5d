"""Training losses of hf-sae SAEs, as pure functions on tensors.

* :func:`hierarchical_topk_loss` — the HierarchicalTopK objective (Balagansky et al. 2025):
  L = Σ_{j∈J} w_j · mean_{batch, d_in} (x − x̂_j)², x̂_j = b_dec + Σ_{t≤j} v_t W_dec[i_t], w_j = 1/|J|.
  With J = {K} it is the plain TopK loss mean((x − x̂_K)²) of Gao et al. (2024).
  Memory is O(batch·d_in): the (batch, K, d_in) prefix reconstructions are never stored (fused CPU kernel, fused
  Triton kernels on CUDA, or a checkpointed chunked torch path elsewhere).
* :func:`auxk_loss` — the AuxK term of Gao et al. (2024) on dead latents.
* :func:`matryoshka_loss` — the Matryoshka objective (Bussmann et al. 2025, arXiv 2503.17547): the sum over nested
  dictionary prefixes m_1 < … < m_G of the MSE of the reconstruction from the latents of that prefix only.
* :func:`flat_mse_loss` and :func:`flat_matryoshka_loss` — the plain MSE and the Matryoshka objective of flat
  (ragged) latents (row, column, value), for selections whose rows keep very different numbers of latents
  (BatchTopK): cost O(nnz · d_in) however long the longest row.
* :func:`jumprelu` and :func:`step` — JumpReLU and the Heaviside step with the straight-through estimators of
  Rajamanoharan et al. (2024, arXiv 2407.14435, Eq. 11-12): rectangle kernel of bandwidth ε for the threshold.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .kernels import cpu_kernels
from .kernels.triton_support import triton_kernel_for
from .sparse import aux_block_and_tiles, csr_order, dense_rows, flat_decode, sparse_decode


def budget_weights(k: int, budgets: list[int] | None, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(k,) weights w with w[j-1] = 1/|J| for every budget j in J (all of 1..k when ``budgets`` is None)."""
    weights = torch.zeros(k, dtype=dtype, device=device)
    if budgets is None:
        weights.fill_(1.0 / k)
    else:
        weights[torch.as_tensor(budgets, device=device) - 1] = 1.0 / len(budgets)
    return weights


def _deterministic_chunks(W_dec: Tensor, chunks: int = 4, memory_bytes: int = 1 << 30) -> int:
    """Row chunks of the deterministic HierarchicalTopK backward, each beyond the first holding a private
    (d_sae, d_in) gradient: ``chunks``, fewer if they would not fit in ``memory_bytes``. A function of the shape
    only, never of the thread count, so gradients are the same bits with any number of threads (a run resumed
    with other thread settings repeats them exactly); up to ``chunks`` threads share the work."""
    per_chunk = W_dec.numel() * W_dec.element_size()
    return max(1, min(chunks, 1 + memory_bytes // max(1, per_chunk)))


def _fused_forward(ctx, x, values, indices, W_dec, b_dec, weights) -> tuple[Tensor, Tensor]:
    """The CPU kernel's decode + weighted squared error, one pass over the rows: (loss, reconstruction at K).
    Saves (values, indices, W_dec, weights, residual r_K) and the normaliser N·d for the backward."""
    row_loss, residual, reconstruction = cpu_kernels().hierarchical_forward(x, values, indices, W_dec, b_dec, weights)
    n, d = x.shape
    ctx.save_for_backward(values, indices, W_dec, weights, residual)
    ctx.norm = n * d
    ctx.mark_non_differentiable(reconstruction)
    ctx.set_materialize_grads(False)  # no (N, d) zero gradient for the non-differentiable reconstruction
    return row_loss.sum() / (n * d), reconstruction


class _FusedHierarchicalLoss(torch.autograd.Function):
    """CPU kernel: forward/backward of the weighted prefix-MSE. Returns (loss, reconstruction at K).

    When grad mode is on and any input needs a gradient (``with_gradients``: grad mode as the caller saw it;
    inside ``forward`` it is always off), the forward also runs the backward for a loss gradient of 1, row by row right
    after each row's forward (``hierarchical_forward_backward``): the row's K decoder rows are then re-read from L2
    instead of memory, and no (N, d) residual is stored (0.84x the separate passes' time at d_in 640, 0.89x at
    2304, one thread). The backward only scales those gradients by the loss's incoming gradient (nothing to do for
    the usual 1)."""

    @staticmethod
    def forward(ctx, x, values, indices, W_dec, b_dec, weights, with_gradients):
        if not (with_gradients and any(ctx.needs_input_grad)):  # evaluation: the loss alone
            return _fused_forward(ctx, x, values, indices, W_dec, b_dec, weights)
        n, d = x.shape
        row_loss, reconstruction, grad_values, grad_W, suffix = cpu_kernels().hierarchical_forward_backward(
            x,
            values.contiguous(),
            indices,
            W_dec,
            b_dec,
            weights,
            2.0 / (n * d),
            torch.are_deterministic_algorithms_enabled(),
            _deterministic_chunks(W_dec),
        )
        # For a loss gradient of 1, suffix without the scale. Saved tensors, not ctx attributes: autograd releases
        # them before it accumulates (unless retain_graph), so it takes grad_W (d_sae, d_in) as W_dec.grad instead of
        # copying a gradient that ctx still holds (3 ms a step at d_in 640).
        ctx.save_for_backward(grad_values, grad_W, suffix)
        ctx.norm = n * d
        ctx.mark_non_differentiable(reconstruction)
        ctx.set_materialize_grads(False)
        return row_loss.sum() / (n * d), reconstruction

    @staticmethod
    def backward(ctx, grad_loss, _grad_reconstruction):
        if grad_loss is None:  # grads are not materialised: only the (non-differentiable) reconstruction was used
            return None, None, None, None, None, None, None
        grad_values, grad_W, suffix = ctx.saved_tensors
        factor = float(grad_loss)
        if factor != 1.0:  # the gradients were computed for a loss gradient of 1
            grad_values, grad_W = grad_values * factor, grad_W * factor
        scale = 2.0 * factor / ctx.norm
        grad_x = suffix * scale if ctx.needs_input_grad[0] else None
        grad_b_dec = -grad_x.sum(0) if grad_x is not None else -scale * suffix.sum(0)
        return grad_x, grad_values, None, grad_W, grad_b_dec, None, None


class _TopKMSE(torch.autograd.Function):
    """CPU kernel path of the plain TopK loss mean((x − x̂_K)²), x̂_K = b_dec + Σ_t v_t W_dec[i_t].

    Forward: the fused decode + squared error of :class:`_FusedHierarchicalLoss` with the one budget K (one pass
    over the rows). Backward walks the decoder latent by latent (CSR order), reading each decoder row once:
    dL/dv_t = −c <W_dec[i_t], r>, dL/dW_dec[f] = −c Σ v r, dL/db_dec = −c Σ_n r, c = 2 g / (N d).
    Returns (loss, reconstruction)."""

    @staticmethod
    def forward(ctx, x, values, indices, W_dec, b_dec):
        k = values.shape[1]
        return _fused_forward(ctx, x, values, indices, W_dec, b_dec, budget_weights(k, [k], x.dtype, x.device))

    @staticmethod
    def backward(ctx, grad_loss, _grad_reconstruction):
        if grad_loss is None:  # see _FusedHierarchicalLoss.backward
            return None, None, None, None, None
        values, indices, W_dec, _weights, residual = ctx.saved_tensors
        scale = 2.0 * float(grad_loss) / ctx.norm
        crow, perm = csr_order(indices, W_dec.shape[0])
        grad_values, grad_W = cpu_kernels().topk_decoder_backward(crow, perm, values, W_dec, residual, scale)
        grad_x = residual * scale if ctx.needs_input_grad[0] else None
        grad_b_dec = residual.sum(0).mul_(-scale) if ctx.needs_input_grad[4] else None
        return grad_x, grad_values, None, grad_W, grad_b_dec


def _chunk_loss(x: Tensor, values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor, weights: Tensor) -> Tensor:
    """Σ over this chunk of Σ_j w_j ||x − x̂_j||² with a (chunk, K, d) cumulative sum (recomputed in backward)."""
    contributions = values.unsqueeze(-1).to(W_dec.dtype) * W_dec[indices]  # (n, K, d)
    residuals = (x - b_dec).unsqueeze(1) - contributions.cumsum(dim=1)  # r_j for j = 1..K
    return (residuals.pow(2).sum(-1) * weights).sum()


def _torch_hierarchical_loss(x, values, indices, W_dec, b_dec, weights, chunk_rows: int) -> tuple[Tensor, Tensor]:
    n, d = x.shape
    total = x.new_zeros(())
    for start in range(0, n, chunk_rows):
        part = slice(start, start + chunk_rows)
        args = (x[part], values[part], indices[part], W_dec, b_dec, weights)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, *args, use_reentrant=False)
        else:
            total = total + _chunk_loss(*args)
    with torch.no_grad():
        reconstruction = b_dec + sparse_decode(values.detach(), indices, W_dec.detach())
    return total / (n * d), reconstruction


def hierarchical_topk_loss(
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    budgets: list[int] | None = None,
    chunk_elements: int = 1 << 24,
    use_kernel: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """HierarchicalTopK loss and the reconstruction at the full budget K.

    Args:
        x: (N, d_in) target activations.
        values, indices: (N, K) TopK latents sorted descending (``values`` carries the encoder's gradient).
        W_dec: (d_sae, d_in) decoder; b_dec: (d_in,).
        budgets: the budgets J averaged over (default 1..K). ``budgets=[K]`` gives the plain TopK loss.
        chunk_elements: bound on the (rows, K, d_in) temporary of the pure-torch path.
        use_kernel: force (True) or forbid (False) the compiled kernels (CPU C++ on CPU, Triton on CUDA; False
            gives the pure-torch reference); default: use them when available.

    Returns:
        (loss scalar, reconstruction (N, d_in) at budget K, detached); for half-precision inputs the loss is
        accumulated in fp32 and the reconstruction has the dtype of ``x``.
    """
    n, K = values.shape
    triton_kernels = (
        triton_kernel_for("triton_hierarchical", x, values, W_dec, b_dec) if use_kernel is not False else None
    )
    if triton_kernels is not None:  # CUDA: fused Triton kernels, each input read in its own dtype, fp32 arithmetic
        weights = budget_weights(K, budgets, torch.float32, x.device)
        single_budget = budgets is not None and list(budgets) == [K]
        return triton_kernels.hierarchical_topk_loss(x, values, indices, W_dec, b_dec, weights, single_budget)
    if any(t.dtype in (torch.bfloat16, torch.float16) for t in (x, values, W_dec, b_dec)):
        # half-precision inputs (autocast, a bf16 SAE): the loss and its gradients accumulate in fp32
        loss, reconstruction = hierarchical_topk_loss(
            x.float(), values.float(), indices, W_dec.float(), b_dec.float(), budgets, chunk_elements, use_kernel
        )
        return loss, reconstruction.to(x.dtype)
    single_budget = budgets is not None and list(budgets) == [K]  # the plain TopK loss
    kernel_ok = (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and values.dtype == x.dtype
        and W_dec.dtype == x.dtype
        and b_dec.dtype == x.dtype
    )
    if use_kernel is None:
        use_kernel = kernel_ok and cpu_kernels() is not None
    if use_kernel and (not kernel_ok or cpu_kernels() is None):
        raise RuntimeError("the CPU HierarchicalTopK kernel needs float32/float64 CPU tensors and a compiler.")
    args = (x.contiguous(), values.contiguous(), indices.contiguous(), W_dec.contiguous(), b_dec)
    if single_budget:
        if use_kernel:
            return _TopKMSE.apply(*args)
        reconstruction = b_dec + sparse_decode(values, indices, W_dec)
        return (x - reconstruction).pow(2).mean(), reconstruction.detach()
    weights = budget_weights(K, budgets, x.dtype, x.device)
    if use_kernel:
        return _FusedHierarchicalLoss.apply(*args, weights, torch.is_grad_enabled())
    chunk_rows = max(1, chunk_elements // max(1, K * x.shape[1]))
    return _torch_hierarchical_loss(x, values, indices, W_dec, b_dec, weights, chunk_rows)


def auxk_loss(
    residual: Tensor, aux_values: Tensor, aux_indices: Tensor, W_dec: Tensor, dead_mask: Tensor | None = None
) -> Tensor:
    """AuxK (Gao et al. 2024): how well the dead latents' top scores reconstruct the residual.

    residual e: (N, d_in) = x − x̂_K (detached); aux_values, aux_indices: (N, k_aux) top scores among dead latents.
    Returns ||e − ê||² / ||e − mean(e)||² summed over the batch, ê = Σ aux_v W_dec[aux_i] (no bias). With the
    (d_sae,) ``dead_mask``, once the choice fills 1/8 of the (N, n_dead) block or more (see
    :func:`hf_sae.sparse.dense_aux_block`), it runs on that block: by L2 tiles on CPU below 1/4 of it
    (:mod:`hf_sae.aux_tiles`), as dense matrix multiplies otherwise; the sparse kernel or ``embedding_bag`` below 1/8.
    """
    denominator = (residual - residual.mean(0)).pow(2).sum().clamp_min(torch.finfo(residual.dtype).tiny)
    block, tiles = None, None
    if residual.dtype == W_dec.dtype:
        block, tiles = aux_block_and_tiles(aux_indices, dead_mask, W_dec.dtype, W_dec.shape[1])
    if block is not None:
        columns, positions = block
        if tiles is not None:
            return _TiledAuxK.apply(residual.detach(), aux_values.to(W_dec.dtype), W_dec, denominator, tiles)
        return _DenseAuxK.apply(residual.detach(), aux_values, positions, columns, W_dec, denominator)
    kernel_ok = (
        residual.device.type == "cpu"
        and residual.dtype in (torch.float32, torch.float64)
        and aux_values.dtype == residual.dtype == W_dec.dtype
        and cpu_kernels() is not None
    )
    if kernel_ok:  # the TopK MSE of the dead latents' decode against e, with no bias, renormalised
        n, d = residual.shape
        args = (residual.detach().contiguous(), aux_values.contiguous(), aux_indices.contiguous(), W_dec.contiguous())
        mse, _ = _TopKMSE.apply(*args, residual.new_zeros(d))
        return mse * (n * d) / denominator
    return auxk_of_reconstruction(residual, sparse_decode(aux_values, aux_indices, W_dec), denominator)


class _DenseAuxK(torch.autograd.Function):
    """AuxK through a dense block: A (N, C) holds the aux values at their dead-latent positions, W_c = W_dec[columns]
    (C, d), ê = A W_c; loss = ||e − ê||² / D. Backward: R = −2 g (e − ê) / D, dA = R W_cᵀ read at the positions,
    dW_dec[columns] = Aᵀ R (other rows zero). Three (N, C, d) matrix multiplies in all."""

    @staticmethod
    def forward(ctx, residual, aux_values, positions, columns, W_dec, denominator):
        block = dense_rows(aux_values.to(W_dec.dtype), positions, columns.numel())
        rows = W_dec[columns]
        with torch.autocast(residual.device.type, enabled=False):  # a loss: full precision under the bf16 path
            difference = residual - block @ rows
        ctx.save_for_backward(block, rows, difference, positions, columns, denominator)
        ctx.shape = W_dec.shape
        return difference.pow(2).sum() / denominator

    @staticmethod
    def backward(ctx, grad_loss):
        block, rows, difference, positions, columns, denominator = ctx.saved_tensors
        upstream = difference * (-2.0 * grad_loss / denominator)  # dL/dê (N, d)
        grad_values = (upstream @ rows.t()).gather(1, positions) if ctx.needs_input_grad[1] else None
        grad_W = None
        if ctx.needs_input_grad[4]:
            grad_W = upstream.new_zeros(ctx.shape).index_copy_(0, columns, block.t() @ upstream)
        return None, grad_values, None, None, grad_W, None


class _TiledAuxK(torch.autograd.Function):
    """AuxK through the tiled dead-block kernels (:mod:`hf_sae.aux_tiles`, CPU): W_c = W_dec[columns] (C, d),
    ê = Σ_t a_t W_c[positions_t], loss = ||e − ê||² / D. Backward: R = −2 g (e − ê) / D, da = <R, W_c[positions]>,
    dW_dec[columns] = Sᵀ R (other rows zero), S the (N, C) choice matrix. The products of :class:`_DenseAuxK`, at a
    cost that follows the N·k_aux pairs instead of N·C."""

    @staticmethod
    def forward(ctx, residual, aux_values, W_dec, denominator, tiles):
        rows = W_dec[tiles.columns]
        difference = residual - tiles.decode(aux_values, rows)
        ctx.save_for_backward(aux_values, rows, difference, denominator)
        ctx.tiles, ctx.shape = tiles, W_dec.shape
        return difference.pow(2).sum() / denominator

    @staticmethod
    def backward(ctx, grad_loss):
        aux_values, rows, difference, denominator = ctx.saved_tensors
        upstream = difference * (-2.0 * grad_loss / denominator)  # dL/dê (N, d)
        grad_values = ctx.tiles.dots(upstream, rows) if ctx.needs_input_grad[1] else None
        grad_W = None
        if ctx.needs_input_grad[2]:
            block, _ = ctx.tiles.scatter(aux_values, upstream)
            grad_W = upstream.new_zeros(ctx.shape).index_copy_(0, ctx.tiles.columns, block)
        return None, grad_values, grad_W, None, None


def auxk_of_reconstruction(residual: Tensor, e_hat: Tensor, denominator: Tensor | None = None) -> Tensor:
    """AuxK from the dead latents' reconstruction ê (N, d_in) of the residual e (N, d_in): ||e − ê||² / ||e −
    mean(e)||² (the denominator computed here unless given). For callers that build ê themselves (latent
    parallelism sums each process's part)."""
    if denominator is None:
        denominator = (residual - residual.mean(0)).pow(2).sum().clamp_min(torch.finfo(residual.dtype).tiny)
    return (residual - e_hat).pow(2).sum() / denominator


def mse(x: Tensor, reconstruction: Tensor) -> Tensor:
    """Mean squared error over batch and d_in."""
    return F.mse_loss(reconstruction, x)


def matryoshka_loss(
    x: Tensor,
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    prefix_widths: list[int],
    use_kernel: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Matryoshka objective: L = Σ_g mean_{batch, d_in} (x − x̂_g)², x̂_g = b_dec + Σ_{t: i_t < m_g} v_t W_dec[i_t].

    Args:
        x: (N, d_in) targets; values, indices: (N, t) latents (any order; zero values decode to nothing).
        W_dec: (d_sae, d_in); b_dec: (d_in,); prefix_widths: m_1 < … < m_G = d_sae.
        use_kernel: force (True) or forbid (False) the fused CPU kernel path; default: use it when available.

    Returns (loss, reconstruction (N, d_in) of the whole dictionary, detached). Memory O(N·d_in) on the kernel
    path: each row's latents are laid out group by group in slots of the same width for every row (the largest
    count of that group in a row; zeros elsewhere), so every prefix ends at the same position in all rows and the
    prefix MSEs are the HierarchicalTopK kernel's weighted prefix sums with weight 1 at the G group ends. Elsewhere
    (GPU, no compiler) one ``embedding_bag`` with a bag per (group, row) decodes every group at once (O(N·G·d_in)).
    Half-precision inputs accumulate in fp32.
    """
    if any(t.dtype in (torch.bfloat16, torch.float16) for t in (x, values, W_dec, b_dec)):
        loss, reconstruction = matryoshka_loss(
            x.float(), values.float(), indices, W_dec.float(), b_dec.float(), prefix_widths, use_kernel
        )
        return loss, reconstruction.to(x.dtype)
    n, d = x.shape
    groups = len(prefix_widths)
    group = torch.searchsorted(torch.as_tensor(prefix_widths, device=indices.device), indices, right=True)
    group = group.clamp_max_(groups - 1)  # (N, t): the group of each latent
    kernel_ok = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and values.dtype == x.dtype
    if use_kernel is None:
        use_kernel = kernel_ok and W_dec.dtype == x.dtype and b_dec.dtype == x.dtype and cpu_kernels() is not None
    if use_kernel:
        return _matryoshka_kernel_loss(x, values, indices, W_dec, b_dec, group, groups)
    bag = (group * n + torch.arange(n, device=indices.device)[:, None]).reshape(-1)  # bag of (group, row)
    crow, order = csr_order(bag, groups * n)  # a counting sort: the pairs of each bag, bags in order
    per_group = F.embedding_bag(
        indices.reshape(-1)[order],
        W_dec,
        crow[:-1],
        mode="sum",
        per_sample_weights=values.reshape(-1)[order].to(W_dec.dtype),
    ).view(groups, n, d)
    residual, loss = x - b_dec, x.new_zeros(())
    for g in range(groups):  # x − x̂_g, one (N, d_in) pass per prefix
        residual = residual - per_group[g]
        loss = loss + residual.pow(2).mean()
    return loss, (x - residual).detach()


def _matryoshka_kernel_loss(x, values, indices, W_dec, b_dec, group, groups) -> tuple[Tensor, Tensor]:
    """:func:`matryoshka_loss` on the fused prefix-MSE kernel: latents re-laid out in per-group slots."""
    n, t = values.shape
    counts = torch.zeros(n, groups, dtype=torch.long, device=x.device).scatter_add_(1, group, torch.ones_like(group))
    slot_width = counts.amax(0)  # (G,) slots of group g in every row
    slot_start = slot_width.cumsum(0) - slot_width
    group_sorted, order = group.sort(dim=-1, stable=True)  # each row's latents group by group
    first_of_group = (counts.cumsum(1) - counts).gather(1, group_sorted)  # where its group starts in the row
    rank = torch.arange(t, device=x.device) - first_of_group
    position = slot_start[group_sorted] + rank  # (N, t) into (N, width)
    width = max(1, int(slot_width.sum()))
    laid_values = values.new_zeros(n, width).scatter(1, position, values.gather(1, order))
    laid_indices = torch.zeros(n, width, dtype=indices.dtype, device=x.device).scatter(
        1, position, indices.gather(1, order)
    )
    ends = (slot_start + slot_width).tolist()  # each prefix ends after its group's slots
    weights = torch.zeros(width, dtype=x.dtype, device=x.device)
    empty = 0  # prefixes with no slot at all (their groups and every earlier one empty): x̂ = b_dec
    for end in ends:
        if end == 0:
            empty += 1
        else:
            weights[end - 1] += 1.0
    args = (x.contiguous(), laid_values.contiguous(), laid_indices.contiguous(), W_dec.contiguous(), b_dec)
    loss, reconstruction = _FusedHierarchicalLoss.apply(*args, weights, torch.is_grad_enabled())
    if empty:
        loss = loss + empty * (x - b_dec).pow(2).mean()
    return loss, reconstruction


def _full_precision(*tensors: Tensor) -> list[Tensor]:
    """The tensors in float32 when any is half precision (the losses accumulate in fp32), else unchanged."""
    if any(t.dtype in (torch.bfloat16, torch.float16) for t in tensors):
        return [t.float() for t in tensors]
    return list(tensors)


def flat_mse_loss(
    x: Tensor, values: Tensor, rows: Tensor, columns: Tensor, W_dec: Tensor, b_dec: Tensor
) -> tuple[Tensor, Tensor]:
    """The plain TopK/BatchTopK loss mean_{batch, d_in} (x − x̂)² of flat (ragged) latents: x̂ = b_dec +
    Σ_e v_e W_dec[i_e], entry e decoded into row rows[e] (:func:`hf_sae.sparse.flat_decode`).

    x: (N, d_in); values, rows, columns: (nnz,) (rows ascending; ``values`` carries the encoder's gradient); W_dec:
    (d_sae, d_in); b_dec: (d_in,). The same value as :func:`hierarchical_topk_loss` with ``budgets=[K]`` on the same
    latents padded to (N, K), at cost O(nnz · d_in) instead of O(N · K · d_in). Returns (loss, reconstruction
    (N, d_in), detached, in x's dtype); half-precision inputs accumulate in fp32.
    """
    target, values32, W32, b32 = _full_precision(x, values, W_dec, b_dec)
    with torch.autocast(x.device.type, enabled=False):
        reconstruction = b32 + flat_decode(values32, rows, columns, W32, x.shape[0])
        loss = (target - reconstruction).pow(2).mean()
    return loss, reconstruction.detach().to(x.dtype)


def flat_matryoshka_loss(
    x: Tensor,
    values: Tensor,
    rows: Tensor,
    columns: Tensor,
    W_dec: Tensor,
    b_dec: Tensor,
    prefix_widths: list[int],
) -> tuple[Tensor, Tensor]:
    """:func:`matryoshka_loss` of flat (ragged) latents: L = Σ_g mean_{batch, d_in} (x − x̂_g)², x̂_g = b_dec +
    Σ_{e: i_e < m_g} v_e W_dec[i_e] decoded into row rows[e].

    x: (N, d_in); values, rows, columns: (nnz,) (``values`` carries the encoder's gradient); W_dec: (d_sae, d_in);
    b_dec: (d_in,); prefix_widths: m_1 < … < m_G = d_sae. One ``embedding_bag`` with a bag per (group, row)
    decodes each group's part (G, N, d_in), whose running sums over g are the prefix reconstructions: cost
    O(nnz · d_in + G · N · d_in). Returns (loss, reconstruction (N, d_in) of the whole dictionary, detached, in
    x's dtype); half-precision inputs accumulate in fp32.
    """
    target, values32, W32, b32 = _full_precision(x, values, W_dec, b_dec)
    n, d = x.shape
    groups = len(prefix_widths)
    group = torch.searchsorted(torch.as_tensor(prefix_widths, device=columns.device), columns, right=True)
    bag = group.clamp_max_(groups - 1) * n + rows  # (nnz,): the bag of (group, row) of each entry
    crow, order = csr_order(bag, groups * n)
    with torch.autocast(x.device.type, enabled=False):
        per_group = F.embedding_bag(
            columns[order], W32, crow[:-1], mode="sum", per_sample_weights=values32[order].to(W32.dtype)
        ).view(groups, n, d)
        residual, loss = target - b32, target.new_zeros(())
        for part in per_group.unbind(0):  # x − x̂_g, one (N, d_in) pass per prefix (unbind: one backward stack)
            residual = residual - part
            loss = loss + residual.pow(2).mean()
    return loss, (target - residual).detach().to(x.dtype)


def _rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel K(u) = 1[−1/2 < u < 1/2] (Rajamanoharan et al. 2024, Eq. 10)."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """z·H(z − θ) (ReLU(z) where θ < 0) with the paper's pseudo-derivative for θ (Eq. 11):
    ∂/∂θ = −(θ/ε) K((z − θ)/ε); ∂/∂z = H(z − θ)·H(z) (no straight-through gradient into z)."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre.clamp_min(0) * (pre > threshold)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * ((pre > threshold) & (pre > 0)) if ctx.needs_input_grad[0] else None
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            pseudo = -(threshold / eps) * _rectangle((pre - threshold) / eps) * grad
            grad_threshold = pseudo.sum_to_size(threshold.shape)
        return grad_pre, grad_threshold, None


class _Step(torch.autograd.Function):
    """H(z − θ) with the paper's pseudo-derivative for θ (Eq. 12): ∂/∂θ = −(1/ε) K((z − θ)/ε); ∂/∂z = 0."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = None
        if ctx.needs_input_grad[1]:
            grad_threshold = (-(1.0 / eps) * _rectangle((pre - threshold) / eps) * grad).sum_to_size(threshold.shape)
        return None, grad_threshold, None


def jumprelu(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """JumpReLU_θ(z) = z·H(z − θ) elementwise: pre (..., F), threshold (F,) (or pre's shape: gathered thresholds);
    θ's gradient by the STE of Eq. 11, summed to θ's shape."""
    return _JumpReLU.apply(pre, threshold, bandwidth)


def step(pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """H(z − θ) elementwise (the L0 of JumpReLU is its sum over latents); θ's gradient by the STE of Eq. 12."""
    return _Step.apply(pre, threshold, bandwidth)
