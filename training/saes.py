"""The SAEs of a run before their first step: each architecture's config built from the run's entry, a check that they
fit in memory, the activation scale, b_dec, the learning rate (the architecture's default unless given), the
optimiser and its schedule."""

from __future__ import annotations

import logging
import math

import torch
from accelerate import Accelerator
from torch import Tensor
from transformers import get_scheduler

from hf_sae.configuration_sae import SAEConfig
from hf_sae.errors import SAEMemoryError, TrainConfigError
from hf_sae.hardware import has_native_bf16
from hf_sae.modeling_sae import SAEPreTrainedModel
from hf_sae.registry import resolve_architecture
from hf_sae.sites import Site

from .config import SAESpec, TrainConfig
from .harvest import available_memory

logger = logging.getLogger("training")


def default_dead_tokens(tokens: int, tokens_per_step: int) -> int:
    """Tokens without firing after which a latent counts as dead, when the SAE's config does not say:
    min(10M, tokens // 10) of a run of ``tokens``, at least one step's tokens."""
    return max(tokens_per_step, min(10_000_000, tokens // 10))


def dead_tokens_of(cfg: TrainConfig, spec: SAESpec, world: int) -> int:
    """The dead-latent threshold of one SAE: its config's ``dead_tokens`` if the run sets it, else the default."""
    return int(spec.config.get("dead_tokens") or default_dead_tokens(cfg.tokens, cfg.batch_size * world))


def step_autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """The SAE step's autocast dtype: bfloat16 with ``--bf16-autocast``, except on a CPU without bf16 matrix units,
    where the bf16 encoder matmul is emulated and several times slower than the fp32 step it is meant to halve: there
    the step runs in fp32 (None) and a warning says so."""
    if not cfg.bf16_autocast:
        return None
    if device.type != "cpu" or has_native_bf16(device):
        return torch.bfloat16
    logger.warning(
        "--bf16-autocast: this CPU has no bf16 matrix units (AVX512-BF16 / AMX), so a bf16 matmul would be emulated "
        "and slower than fp32; the SAE step runs in fp32 instead (the results only gain precision)."
    )
    return None


def activation_scale(x: Tensor, accelerator: Accelerator | None = None) -> float:
    """The scalar s with E||s x||² = d_in over the sample x: (N, d_in), averaged over every process's sample when an
    ``accelerator`` is given."""
    mean_sq_norm = x.pow(2).sum(-1).mean()
    if accelerator is not None:
        mean_sq_norm = accelerator.reduce(mean_sq_norm.to(accelerator.device), reduction="mean")
    return math.sqrt(x.shape[-1] / float(mean_sq_norm))


def sae_config(spec: SAESpec, site: Site, **filled) -> SAEConfig:
    """The architecture's config of one entry, with where it reads and what else training knows (``filled``)."""
    return spec.build_config(d_in=site.width, hook_layer=spec.layer, hook_site=spec.site, **filled)


def check_sae_memory(
    cfg: TrainConfig, specs: list[SAESpec], sites: list[Site], device: torch.device, shards: int = 1
) -> None:
    """Refuse SAEs that cannot be built or would not fit in ``device``'s free memory: float32 weights, gradients and
    two AdamW moments, plus a batch's dense pre-activations and their gradient, each divided over ``shards``
    processes under latent parallelism. The SAEs are built on the meta device to count (nothing is allocated, no
    random number drawn)."""
    need, sizes = 0, []
    for i, (spec, site) in enumerate(zip(specs, sites)):
        config = sae_config(spec, site)
        try:
            with torch.random.fork_rng(devices=[]), torch.device("meta"):
                sae = resolve_architecture(spec.arch)[0].model_class(config)
        except (RuntimeError, TypeError, OverflowError, MemoryError):  # shapes beyond 64-bit sizes
            raise SAEMemoryError(
                f"SAE #{i} ({spec.name}): d_sae={config.d_sae} is too large to build (its weights would have "
                f"{config.d_sae:,} x {config.d_in} entries). Use a smaller --d-sae, e.g. 65536."
            ) from None
        weights = sum(p.numel() for p in sae.parameters())
        counters = sum(b.numel() * b.element_size() for b in sae.buffers())
        need += (16 * weights + counters + 2 * 4 * cfg.batch_size * config.d_sae) // shards
        sizes.append(f"{spec.name}: {weights:,} parameters")
    free = available_memory(device)
    if need > free:
        raise SAEMemoryError(
            f"training these SAEs needs about {need / 2**30:,.1f} GiB on {device} ({'; '.join(sizes)}, each float32 "
            f"with its gradient and AdamW moments, and a batch of {cfg.batch_size} pre-activations), but only "
            f"{free / 2**30:,.1f} GiB is free per process. Use a smaller --d-sae or --batch-size, or fewer SAEs."
        )


def check_shardable(specs: list[SAESpec], sites: list[Site], world: int) -> None:
    """--shard-latents: refuse, before anything is written, SAEs latent parallelism cannot split (not the TopK
    family) or that leave some process fewer than k latents."""
    for spec, site in zip(specs, sites):
        model_class = resolve_architecture(spec.arch)[0].model_class
        if not model_class.supports_latent_parallel:
            raise TrainConfigError(
                f"--shard-latents: SAE {spec.name} ({model_class.__name__}) cannot be split by latent; latent "
                "parallelism needs the TopK family (arch=hierarchical or topk). Drop --shard-latents or that SAE."
            )
        config = sae_config(spec, site)
        if config.d_sae // world < config.k:
            raise TrainConfigError(
                f"--shard-latents: SAE {spec.name} has d_sae={config.d_sae}, which leaves {config.d_sae // world} "
                f"latents per process on {world} processes, fewer than k={config.k}. Use fewer processes."
            )


def build_sae(
    cfg: TrainConfig,
    spec: SAESpec,
    site: Site,
    scale: float,
    dead_tokens: int,
    provenance: dict,
    sample: Tensor,
    device: torch.device,
    total_steps: int | None = None,
) -> SAEPreTrainedModel:
    """A freshly initialised SAE that scales its own input by ``scale`` (unfolded until the end of training).

    The config is the architecture's own, from the run's entry plus what training knows (d_in, where it reads, the
    scale, ``provenance``: base_model, context_length, excluded_token_ids, dataset). Init: the architecture's, then
    b_dec per ``--b-dec-init`` (auto: the architecture's ``b_dec_init``) from ``sample`` (raw activations, scaled).
    Fields whose default depends on the run's length (the architecture's ``run_defaults(total_steps)``, e.g. the
    JumpReLU λ warm-up) are filled where the entry does not set them.
    """
    architecture, _ = resolve_architecture(spec.arch)
    steps = total_steps if total_steps is not None else math.ceil(cfg.tokens / cfg.batch_size)
    run_defaults = {
        name: value for name, value in architecture.model_class.run_defaults(steps).items() if name not in spec.config
    }
    config = sae_config(
        spec,
        site,
        activation_scale=scale,
        activation_scale_folded=False,
        dead_tokens=dead_tokens,
        **provenance,
        **run_defaults,
    )
    sae = architecture.model_class(config).to(device)
    method = cfg.b_dec_init if cfg.b_dec_init != "auto" else architecture.model_class.b_dec_init
    if method != "zeros":
        sae.initialize_b_dec(sample[:4096] * scale, method=method)
    return sae


def learning_rate(spec: SAESpec, sae: SAEPreTrainedModel) -> float:
    """The entry's ``lr``, else the architecture's default for its config (8e-4 / sqrt(d_sae / 2^14))."""
    return spec.lr or sae.default_learning_rate(sae.config)


def build_optimizer(
    cfg: TrainConfig, saes: list[SAEPreTrainedModel], specs: list[SAESpec], total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with one parameter group per SAE (its own learning rate), warm-up then cosine decay to ``lr_min``."""
    return adamw_with_schedule(
        [{"params": sae.parameters(), "lr": learning_rate(spec, sae)} for sae, spec in zip(saes, specs)],
        total_steps,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
        warmup_fraction=cfg.lr_warmup_fraction,
        lr_min=cfg.lr_min,
    )


def adamw_with_schedule(
    param_groups: list[dict],
    total_steps: int,
    *,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    warmup_fraction: float = 0.1,
    lr_min: float = 1e-6,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The recipe's optimiser: AdamW over ``param_groups`` (each with its ``lr``), linear warm-up over
    ``warmup_fraction`` of the steps, then cosine decay. ``lr`` is AdamW's default learning rate, which transformers'
    ``cosine_with_min_lr`` divides ``lr_min`` by: each group decays to its own lr x lr_min / ``lr``."""
    param_groups = [{**group, "params": list(group["params"])} for group in param_groups]  # generators: read once
    params = [param for group in param_groups for param in group["params"]]
    # The fused kernel updates every tensor in one pass (CPU and CUDA): on CPU the per-parameter loop costs ~8x as
    # much, 15-20% of a whole SAE step (benchmarks/bench_peers.py). Same maths.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params) or None
    optimizer = torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused)
    scheduler = get_scheduler(
        "cosine_with_min_lr",
        optimizer,
        num_warmup_steps=int(warmup_fraction * total_steps),
        num_training_steps=total_steps,
        scheduler_specific_kwargs={"min_lr": lr_min},
    )
    return optimizer, scheduler


def model_classes(specs: list[SAESpec]) -> list[type[SAEPreTrainedModel]]:
    """The model class of each entry (to read its checkpoint back)."""
    return [resolve_architecture(spec.arch)[0].model_class for spec in specs]
