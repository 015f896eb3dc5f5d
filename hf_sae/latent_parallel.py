"""Latent-parallel SAEs: one TopK dictionary split by latent across the processes of a ``torch.distributed`` group.

For dictionaries too wide for one device (sparsify's ``--distribute_latents``). Process r of N holds latents
[lo_r, hi_r): those rows of ``encoder.weight`` (F, d_in), ``encoder.bias`` (F,) and ``W_dec`` (F, d_in), so about
1/N of the weights, gradients and AdamW moments; ``b_dec`` (d_in,) is replicated. Every process reads the same batch
x (N, d_in). One forward:

1. the local sparse encoder on the shard: the k best of its latents per token (sorted, ReLU'd);
2. an all-gather of every process's (N, k) candidates and the exact global top-k of the world·k candidates (sorted
   descending, ties to the lower latent id), the same on every process: the k best of all F latents;
3. the reconstruction. Plain TopK: each process decodes its own selected latents and one all-reduce sums the (N,
   d_in) partial reconstructions. HierarchicalTopK: the prefix losses need every selected latent's decoder row in
   the global order, so the rows of the batch's distinct selected latents (at most F, usually far fewer than N·K)
   are all-reduced, each sent by its owner alone (the sum is exact), and the fused prefix loss runs on them; row
   chunks bound that transient (``chunk_elements`` floats) when the batch selects too many distinct latents;
4. AuxK the same way on the dead latents (each process counts its own latents; the dead count is all-reduced).

Every process computes the same loss. Backward: the gradient of the summed values / reconstruction is the same on
every process and each applies it to its own rows only (an all-reduce whose backward is the identity); the part of
b_dec's gradient that flows through the encoder's centring x − b_dec is summed over processes (the identity whose
backward is an all-reduce), the rest is already the same everywhere. Gradient clipping uses the global norm. So the
weights follow one process training the whole SAE on the same batches, up to the order of float sums.

:func:`shard_sae` splits an SAE, :func:`gather_sae` puts it back together (an ordinary SAE, for checkpoints and the
final save); :func:`gather_optimizer_state` / :func:`shard_optimizer_state` do the same for AdamW's state.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import HfSaeError
from .losses import auxk_of_reconstruction, hierarchical_topk_loss
from .modeling_sae import SAEOutput, SAEPreTrainedModel
from .sparse import SparseLatents, sparse_decode

REPLICATED = frozenset({"b_dec"})  # parameters every process holds whole; the others are split along dim 0


def shard_bounds(d_sae: int, world: int) -> list[tuple[int, int]]:
    """(lo, hi) latent range of each of ``world`` processes: sizes differ by at most one, the larger ones first."""
    base, extra = divmod(d_sae, world)
    bounds, lo = [], 0
    for r in range(world):
        hi = lo + base + (1 if r < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def _rank_world(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def cpu_group(group=None):
    """A process group that moves CPU tensors: ``group`` itself under gloo, else a gloo group over its processes
    (NCCL moves only GPU tensors). Collective: every process calls it, in the same order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_backend(group) == "gloo":
        return group
    return dist.new_group(ranks=dist.get_process_group_ranks(group or dist.group.WORLD), backend="gloo")


class _SumAcross(torch.autograd.Function):
    """All-reduce (sum) forward, identity backward: every process computes the same loss from the sum, so the
    gradient each one gets for the sum is already the gradient of its own part."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        total = x.clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _SumGradientsAcross(torch.autograd.Function):
    """Identity forward, all-reduce (sum) backward: for a replicated tensor whose uses differ by process (b_dec in
    each shard's centring), so its gradient is the sum of every process's part."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        total = grad.contiguous().clone()
        dist.all_reduce(total, group=ctx.group)
        return total, None


def _gather_columns(t: Tensor, group, world: int) -> Tensor:
    """(N, c) on every process -> (N, world·c), process r's columns at [r·c, (r+1)·c)."""
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def _best(values: Tensor, ids: Tensor, k: int) -> Tensor:
    """Positions (N, k) of the k largest ``values`` per row, sorted descending, ties to the lower id."""
    by_id = ids.argsort(dim=1)
    order = values.gather(1, by_id).argsort(dim=1, descending=True, stable=True)[:, :k]
    return by_id.gather(1, order)


def _selected_decoder(W_shard: Tensor, ids: Tensor, lo: int, group) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The decoder rows of the distinct latents in ``ids`` (n, K) (global ids, the same on every process), each
    sent by its owner alone (so the all-reduce is exact): rows (U, d), ids as indices into them (n, K), and which of
    the U are this process's (own (U,) bool) with their local row (U,). U ≤ min(n·K, F): far below n·K once a batch
    selects latents many times, so this moves about a decoder's worth of rows at most, not (n, K, d)."""
    unique, compact = torch.unique(ids, return_inverse=True)
    local = unique - lo
    own = (local >= 0) & (local < W_shard.shape[0])
    rows = W_shard.new_zeros(unique.numel(), W_shard.shape[1])
    rows[own] = W_shard[local[own]]
    dist.all_reduce(rows, group=group)
    return rows, compact.view(ids.shape), own, local


class _ShardedPrefixLoss(torch.autograd.Function):
    """The HierarchicalTopK loss on globally sorted latents whose decoder rows are spread over the processes.

    x (N, d), values (N, K) and ids (N, K) global (the same everywhere), W_shard (F_r, d) this process's rows from
    latent ``lo`` on, b_dec (d,). Each row chunk gathers the rows of its distinct latents (at most ``chunk_elements``
    floats, about) and runs the fused prefix loss on them; with one chunk its graph is kept for the backward, with
    several the backward gathers each chunk again instead of keeping them all. Returns (loss, reconstruction at K)."""

    @staticmethod
    def forward(ctx, x, values, W_shard, b_dec, ids, lo, budgets, group, chunk_elements):
        n, d = x.shape
        # One chunk when the batch's distinct latents fit; else chunks of n_c rows with n_c·K·d <= chunk_elements,
        # which bounds the gathered rows (at most n_c·K distinct) whatever the batch selects.
        fits = int(torch.unique(ids).numel()) * d <= chunk_elements
        chunk_rows = n if fits else max(1, chunk_elements // (values.shape[1] * d))
        chunks = -(-n // chunk_rows)
        ctx.chunk_rows, ctx.lo, ctx.budgets, ctx.group = chunk_rows, lo, budgets, group
        ctx.kept = None
        loss, reconstruction = x.new_zeros((), dtype=torch.float32), torch.empty_like(x)
        for start in range(0, n, ctx.chunk_rows):
            part = slice(start, start + ctx.chunk_rows)
            graph = _chunk_graph(x[part], values[part], W_shard, b_dec, ids[part], ctx, ctx.needs_input_grad[0])
            if chunks == 1:  # keep the graph (the gathered rows are saved in it once)
                ctx.kept = graph
            loss += graph[0].detach().float() * (graph[1].shape[0] / n)
            reconstruction[part] = graph[1].detach()
        ctx.save_for_backward(x, values, W_shard, b_dec, ids)
        ctx.mark_non_differentiable(reconstruction)
        return loss.to(x.dtype), reconstruction

    @staticmethod
    def backward(ctx, grad_loss, _grad_reconstruction):
        x, values, W_shard, b_dec, ids = ctx.saved_tensors
        n = x.shape[0]
        needs_x = ctx.needs_input_grad[0]
        grad_x = torch.zeros_like(x) if needs_x else None
        grad_values, grad_W, grad_b = torch.zeros_like(values), torch.zeros_like(W_shard), torch.zeros_like(b_dec)
        for start in range(0, n, ctx.chunk_rows):
            part = slice(start, start + ctx.chunk_rows)
            graph = ctx.kept or _chunk_graph(x[part], values[part], W_shard, b_dec, ids[part], ctx, needs_x)
            part_loss, _, leaves, own, local = graph
            grads = torch.autograd.grad(part_loss, leaves, grad_outputs=grad_loss * (leaves[0].shape[0] / n))
            grad_values[part] = grads[0]
            grad_W.index_add_(0, local[own], grads[1][own])  # distinct latents: each row added once
            grad_b += grads[2]
            if needs_x:
                grad_x[part] = grads[3]
        ctx.kept = None
        return grad_x, grad_values, grad_W, grad_b, None, None, None, None, None


def _chunk_graph(x, values, W_shard, b_dec, ids, ctx, needs_x: bool):
    """The prefix loss of one row chunk with autograd on its own leaves: (loss, reconstruction, leaves, own, local),
    leaves = [values, gathered rows (U, d), b_dec] (+ x when ``needs_x``); own / local as in _selected_decoder."""
    rows, compact, own, local = _selected_decoder(W_shard.detach(), ids, ctx.lo, ctx.group)
    leaves = [values.detach().requires_grad_(), rows.requires_grad_(), b_dec.detach().requires_grad_()]
    if needs_x:
        leaves.append(x.detach().requires_grad_())
    with torch.enable_grad():
        target = leaves[3] if needs_x else x
        loss, reconstruction = hierarchical_topk_loss(target, leaves[0], compact, rows, leaves[2], ctx.budgets)
    return loss, reconstruction, leaves, own, local


class LatentParallelSAE(nn.Module):
    """This process's part of an SAE split by latent (see the module docstring); used like the SAE in training.

    Attributes:
        config: the whole SAE's config (d_sae is the full width).
        shard: an SAE of the same architecture with this process's ``hi − lo`` latents (its own parameters and
            dead-latent counters) and the replicated b_dec.
        lo, hi: this process's latent range; ``bounds``: every process's.
    """

    def __init__(self, shard: SAEPreTrainedModel, config, group=None, chunk_elements: int = 1 << 24):
        super().__init__()
        self.shard, self.config, self.group = shard, config, group
        self.rank, self.world = _rank_world(group)
        self.bounds = shard_bounds(config.d_sae, self.world)
        self.lo, self.hi = self.bounds[self.rank]
        self.cpu_group = cpu_group(group)
        self.chunk_elements = chunk_elements
        self.check_finite = True
        self.feature_stats = None

    # ------------------------------------------------------------------------------------- the SAE's interface
    @property
    def W_dec(self) -> Tensor:
        """(hi − lo, d_in): this process's decoder rows."""
        return self.shard.W_dec

    @property
    def b_dec(self) -> Tensor:
        return self.shard.b_dec

    @property
    def d_sae(self) -> int:
        return self.config.d_sae

    def default_learning_rate(self, config) -> float:
        return type(self.shard).default_learning_rate(config)

    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        self.shard.remove_gradient_parallel_to_decoder_directions()

    def set_decoder_norm_to_unit_norm(self) -> None:
        self.shard.set_decoder_norm_to_unit_norm()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> Tensor:
        """Clip to ``max_norm`` by the norm of the whole SAE's gradient (every shard's plus b_dec once); returns that
        norm (the same on every process, so all skip or step together)."""
        grads = {name: p.grad for name, p in self.shard.named_parameters() if p.grad is not None}
        split = [g.float().pow(2).sum() for name, g in grads.items() if name not in REPLICATED]
        squares = torch.stack(split).sum() if split else torch.zeros((), device=self.W_dec.device)
        if self.world > 1:
            dist.all_reduce(squares, group=self.group)
        for name in REPLICATED & grads.keys():
            squares = squares + grads[name].float().pow(2).sum()
        norm = squares.sqrt()
        coefficient = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads.values():
            g.mul_(coefficient.to(g.dtype))
        return norm

    @torch.no_grad()
    def dead_mask(self) -> Tensor:
        """(d_sae,) bool over all latents (gathered: a collective; for logging)."""
        local = self.local_dead_mask()
        if self.world == 1:
            return local
        return _gather_padded(local.to(torch.uint8).cpu(), self.bounds, self.cpu_group, everyone=True).bool()

    def local_dead_mask(self) -> Tensor:
        """(hi − lo,) bool: this process's latents that have not fired for ``config.dead_tokens`` tokens."""
        return self.shard.tokens_since_fired >= self.config.dead_tokens

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> SAEOutput:
        """(..., d_in) -> SAEOutput of the whole SAE (latent ids global), the same on every process."""
        SAEPreTrainedModel._check_input(self, x)
        cfg = self.config
        flat = SAEPreTrainedModel._scale_in(self, x.reshape(-1, cfg.d_in))
        dead, n_dead, k_aux, k_aux_local = self._auxk_plan()
        center = _SumGradientsAcross.apply(self.shard.b_dec, self.group) if self.world > 1 else self.shard.b_dec
        values, rows, aux_values, aux_rows = self.shard._encode_topk(flat, cfg.k, dead, k_aux_local, center=center)
        values, ids, own, rows = self._global(values, rows, cfg.k)
        budgets = cfg.budgets if cfg.hierarchical else [cfg.k]
        if budgets is not None and list(budgets) == [cfg.k]:  # plain TopK: all-reduce the partial reconstructions
            x_hat = self.shard.b_dec + self._sum(self._partial_decode(values, rows, own))
            loss = (flat - x_hat).pow(2).mean()
        else:
            args = (flat, values, self.shard.W_dec, self.shard.b_dec, ids, self.lo, budgets, self.group)
            args = (*args, self.chunk_elements)
            loss, x_hat = (
                _ShardedPrefixLoss.apply(*args)
                if self.world > 1
                else hierarchical_topk_loss(flat, values, rows, self.shard.W_dec, self.shard.b_dec, budgets)
            )
        losses = {"reconstruction": loss}
        if k_aux > 0:
            aux_values, _, aux_own, aux_rows = self._global(aux_values, aux_rows, k_aux)
            e_hat = self._sum(self._partial_decode(aux_values, aux_rows, aux_own))
            auxk = auxk_of_reconstruction((flat - x_hat).detach(), e_hat)
            losses["auxk"] = auxk * cfg.auxk_coefficient * min(1.0, n_dead / cfg.auxk_k_effective)
        if self.training:
            self._update_dead_counters(rows, own, values, flat.shape[0])
        shape = (*x.shape[:-1], cfg.k)
        latents = SparseLatents(values.detach().reshape(shape), ids.reshape(shape))
        reconstruction = SAEPreTrainedModel._scale_out(self, x_hat.detach()).reshape(x.shape)
        return SAEOutput(loss=sum(losses.values()), reconstruction=reconstruction, latents=latents, losses=losses)

    def _auxk_plan(self) -> tuple[Tensor | None, int, int, int]:
        """(local dead mask or None, n_dead of the whole SAE, k_aux, this shard's candidate count)."""
        cfg = self.config
        if not (self.training and cfg.auxk and torch.is_grad_enabled()):
            return None, 0, 0, 0
        dead = self.local_dead_mask()
        n_dead_local = dead.sum()
        n_dead = n_dead_local.clone()
        if self.world > 1:
            dist.all_reduce(n_dead, group=self.group)
        n_dead, n_dead_local = int(n_dead), int(n_dead_local)
        k_aux = min(cfg.auxk_k_effective, n_dead)
        k_local = min(k_aux, n_dead_local)
        return (dead if k_local > 0 else None), n_dead, k_aux, k_local

    def _global(self, values: Tensor, rows: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """This shard's candidates (N, c) (values carry autograd, rows local) -> the global best k: values (N, k)
        (the same everywhere, differentiable into the owner's candidates), global ids, own mask, local rows."""
        if self.world == 1:
            return values, rows + self.lo, torch.ones_like(rows, dtype=torch.bool), rows
        n, width = values.shape[0], max(k, values.shape[1])
        if values.shape[1] < width:  # fewer candidates here (dead latents): pad with ones that never win
            pad = width - values.shape[1]
            values = torch.cat([values, values.new_full((n, pad), -torch.inf)], dim=1)
            rows = torch.cat([rows, rows.new_zeros(n, pad)], dim=1)
        ids = torch.where(torch.isinf(values.detach()), -1, rows + self.lo)
        all_ids = _gather_columns(ids, self.group, self.world)
        positions = _best(_gather_columns(values.detach(), self.group, self.world), all_ids, k)
        own = positions // width == self.rank
        slot = torch.where(own, positions % width, 0)
        mine = torch.where(own, values.gather(1, slot), 0.0)
        return _SumAcross.apply(mine, self.group), all_ids.gather(1, positions), own, rows.gather(1, slot)

    def _partial_decode(self, values: Tensor, rows: Tensor, own: Tensor) -> Tensor:
        """Σ over this process's selected latents of v W_dec[row] -> (N, d_in)."""
        return sparse_decode(torch.where(own, values, 0.0), torch.where(own, rows, 0), self.shard.W_dec)

    def _sum(self, partial: Tensor) -> Tensor:
        return _SumAcross.apply(partial, self.group) if self.world > 1 else partial

    @torch.no_grad()
    def _update_dead_counters(self, rows: Tensor, own: Tensor, values: Tensor, tokens: int) -> None:
        self.shard.tokens_since_fired += tokens
        self.shard.tokens_since_fired[rows[own & (values > 0)]] = 0


def _gather_padded(t: Tensor, bounds: list[tuple[int, int]], group, everyone: bool = False, dst: int = 0):
    """Each process's (hi − lo, ...) CPU slice -> the whole (F, ...) tensor on ``dst`` (None elsewhere), or on every
    process with ``everyone``. Slices are padded to the largest so every process sends the same shape."""
    rank, world = _rank_world(group)
    if world == 1:
        return t
    width = max(hi - lo for lo, hi in bounds)
    padded = t.new_zeros(width, *t.shape[1:])
    padded[: t.shape[0]] = t
    if everyone:
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded, group=group)
    else:
        parts = [torch.empty_like(padded) for _ in range(world)] if rank == dst else None
        dist.gather(padded, parts, dst=dist.get_global_rank(group, dst) if group is not None else dst, group=group)
        if rank != dst:
            return None
    return torch.cat([part[: hi - lo] for part, (lo, hi) in zip(parts, bounds)])


def supports_latent_parallel(sae: nn.Module) -> bool:
    return bool(getattr(type(sae), "supports_latent_parallel", False))


@torch.no_grad()
def shard_sae(
    sae: SAEPreTrainedModel,
    group=None,
    device: torch.device | str | None = None,
    chunk_elements: int = 1 << 24,
) -> LatentParallelSAE:
    """This process's part of ``sae`` (the whole SAE, on CPU, on every process; process 0's copy is broadcast so
    all agree). Collective. The shard is moved to ``device`` (default: the SAE's). ``chunk_elements`` bounds the
    decoder rows a HierarchicalTopK step gathers at once (floats)."""
    if not supports_latent_parallel(sae):
        raise HfSaeError(
            f"{type(sae).__name__} cannot be split by latent: latent parallelism needs an SAE whose latents are the "
            "top-k of independent encoder rows (hierarchical, topk). Train it without --shard-latents."
        )
    rank, world = _rank_world(group)
    config = sae.config
    bounds = shard_bounds(config.d_sae, world)
    if min(hi - lo for lo, hi in bounds) < config.k:
        raise HfSaeError(
            f"d_sae={config.d_sae} split over {world} processes leaves {min(hi - lo for lo, hi in bounds)} latents "
            f"on some process, fewer than k={config.k}; use fewer processes or no --shard-latents."
        )
    device = torch.device(device) if device is not None else sae.W_dec.device
    group_cpu = cpu_group(group)
    state = {name: t.detach().cpu().contiguous() for name, t in sae.state_dict().items()}
    counters = sae.tokens_since_fired.detach().cpu().clone()
    if world > 1:
        for t in [*state.values(), counters]:
            dist.broadcast(t, src=dist.get_global_rank(group_cpu, 0) if group_cpu is not None else 0, group=group_cpu)
    lo, hi = bounds[rank]
    shard_config = type(config).from_dict({**config.to_dict(), "d_sae": hi - lo})
    shard = type(sae)(shard_config)
    shard.load_state_dict({name: t if name in REPLICATED else t[lo:hi] for name, t in state.items()})
    shard.tokens_since_fired.copy_(counters[lo:hi])
    shard.train(sae.training)
    model = LatentParallelSAE(shard.to(device), config, group, chunk_elements=chunk_elements)
    model.train(sae.training)
    return model


@torch.no_grad()
def gather_sae(model: LatentParallelSAE, dst: int = 0) -> SAEPreTrainedModel | None:
    """The whole SAE (on CPU, with its dead-latent counters) on process ``dst``; None on the others. Collective."""
    shard = model.shard
    state = {}
    for name, t in shard.state_dict().items():
        t = t.detach().cpu().contiguous()
        state[name] = t if name in REPLICATED else _gather_padded(t, model.bounds, model.cpu_group, dst=dst)
    counters = _gather_padded(shard.tokens_since_fired.cpu(), model.bounds, model.cpu_group, dst=dst)
    if model.rank != dst:
        return None
    sae = type(shard)(type(model.config).from_dict(model.config.to_dict()))
    sae.load_state_dict(state)
    sae.tokens_since_fired.copy_(counters)
    sae.train(model.training)
    return sae


def _parameter_layout(
    optimizer: torch.optim.Optimizer, models: list[nn.Module]
) -> list[tuple[LatentParallelSAE | None, str]]:
    """For each parameter in the optimiser's order: (its latent-parallel SAE, its name), or (None, "")."""
    owner = {}
    for model in models:
        if isinstance(model, LatentParallelSAE):
            for name, p in model.shard.named_parameters():
                owner[id(p)] = (model, name)
    return [owner.get(id(p), (None, "")) for group in optimizer.param_groups for p in group["params"]]


@torch.no_grad()
def gather_optimizer_state(optimizer: torch.optim.Optimizer, models: list[nn.Module], dst: int = 0) -> dict | None:
    """``optimizer.state_dict()`` with every sharded parameter's state tensors (AdamW's moments) gathered to their
    whole shape on process ``dst`` (None elsewhere): the state one process training whole SAEs would have."""
    live = optimizer.state_dict()  # its entries are the optimiser's own dicts: build new ones
    state = {"state": {i: dict(entry) for i, entry in live["state"].items()}, "param_groups": live["param_groups"]}
    rank = 0
    for index, (model, name) in enumerate(_parameter_layout(optimizer, models)):
        if model is None:
            continue
        rank = model.rank
        entry = state["state"].get(index, {})
        for key, value in sorted(entry.items()):
            if name not in REPLICATED and isinstance(value, Tensor) and value.ndim > 0:
                entry[key] = _gather_padded(value.cpu().contiguous(), model.bounds, model.cpu_group, dst=dst)
    return state if rank == dst else None


def shard_optimizer_state(state: dict, optimizer: torch.optim.Optimizer, models: list[nn.Module]) -> dict:
    """The inverse of :func:`gather_optimizer_state`: a whole-SAE optimiser state -> this process's slices."""
    state = {"state": {i: dict(entry) for i, entry in state["state"].items()}, "param_groups": state["param_groups"]}
    for index, (model, name) in enumerate(_parameter_layout(optimizer, models)):
        entry = state["state"].get(index)
        if model is None or entry is None or name in REPLICATED:
            continue
        for key, value in entry.items():
            if isinstance(value, Tensor) and value.ndim > 0:
                entry[key] = value[model.lo : model.hi].clone()
    return state
