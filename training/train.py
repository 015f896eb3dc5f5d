"""Train sparse autoencoders on a language model's activations, on one CPU, one GPU or many (accelerate).

    python -m training.train                                        # embedded default: CPU, a few minutes
    python -m training.train --model google/gemma-2-2b --layer 12 --site resid --arch hierarchical \\
        --d-sae 65536 --k 64 --dataset HuggingFaceFW/fineweb --tokens 1e9 --out runs/l12
    accelerate launch --num_processes 8 -m training.train --config runs.yaml
    python -m training.train --resume runs/l12                      # after a crash or a kill

The whole recipe is :func:`train`, read top to bottom:

1. config and the :class:`accelerate.Accelerator` (which decides CPU / GPU / DDP; there are no branches of ours);
2. the frozen language model, the hook sites, the packed token stream of this process, the shuffle buffer;
3. the SAEs: activation scale and b_dec estimated from the first buffer round (or all state from a checkpoint);
4. AdamW with warm-up + cosine decay; each step: SAE forward on a shuffled batch -> backward (DDP all-reduces) ->
   drop the gradient parallel to the decoder rows -> clip -> step -> renormalise the decoder rows;
5. checkpoints every N steps and at the end; then fold the scale, save, evaluate, plot, model card, summary.

Helpers live beside the loop: config.py (options), data.py (tokenise + pack), harvest.py (hooks + buffer),
checkpoint.py, evaluate.py, plots.py.
"""

from __future__ import annotations

import logging
import math
import shlex
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import get_scheduler
from transformers.utils import logging as transformers_logging

import hf_sae
from hf_sae import HierarchicalSAE, HierarchicalSAEConfig, KronSAE, KronSAEConfig
from hf_sae import metrics as sae_metrics
from hf_sae.errors import ModelLoadError, NonFiniteLossError, ResumeError
from hf_sae.modeling_sae import scaled_learning_rate
from hf_sae.sites import num_layers, resolve_site

from . import checkpoint as ckpt
from .config import (
    EMBEDDED,
    SAESpec,
    TrainConfig,
    TrainConfigError,
    config_differences,
    make_config,
    parse_args,
    save_yaml,
)
from .data import TokenWindows, dataset_factories, excluded_token_ids
from .evaluate import collect_eval_data, lm_loss_metrics, reconstruction_metrics
from .harvest import ActivationBuffer, ActivationHarvester

logger = logging.getLogger("training")


class SAEStack(nn.Module):
    """All SAEs of a run as one module, so one DDP wrapper all-reduces every SAE's gradients."""

    def __init__(self, saes: list[nn.Module]):
        super().__init__()
        self.saes = nn.ModuleList(saes)

    def forward(self, inputs: list[Tensor]) -> tuple[Tensor, list[Any]]:
        outputs = [sae(x) for sae, x in zip(self.saes, inputs)]
        return sum(output.loss for output in outputs), outputs


def sae_step(
    stack: nn.Module, saes: list, optimizer, scheduler, inputs: list[Tensor], accelerator: Accelerator, cfg: TrainConfig
) -> tuple[bool, list[Any]]:
    """One optimisation step of every SAE (Gao et al. 2024 recipe). Returns (stepped?, the SAE outputs).

    A step whose gradient norm is NaN/inf is skipped (no optimiser or schedule step)."""
    autocast = torch.autocast(accelerator.device.type, dtype=torch.bfloat16) if cfg.bf16_autocast else nullcontext()
    with autocast:
        loss, outputs = stack(inputs)
    accelerator.backward(loss)
    for sae in saes:
        sae.remove_gradient_parallel_to_decoder_directions()
    grad_norm = accelerator.clip_grad_norm_(stack.parameters(), cfg.max_grad_norm or float("inf"))
    # Gradients are all-reduced, so every process takes the same decision here (no extra communication).
    if not bool(torch.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return False, outputs
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    for sae in saes:
        sae.set_decoder_norm_to_unit_norm()
    return True, outputs


def train(cfg: TrainConfig, explicit: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) training as configured; returns the metrics written to metrics.json (main process)."""
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        return _train(cfg, explicit or {})
    finally:
        torch.use_deterministic_algorithms(deterministic_before)


def _train(cfg: TrainConfig, explicit: dict[str, Any]) -> dict[str, Any]:
    setup_started = time.perf_counter()
    cfg, checkpoint_dir = resolve_resume(cfg, explicit)
    if cfg.out and checkpoint_dir is None:
        check_run_dir_is_free(Path(cfg.out), cfg.overwrite)  # before the (slow) model load

    # ---- 1. accelerator -------------------------------------------------------------------------------------
    use_cpu = cfg.cpu if cfg.cpu is not None else not torch.cuda.is_available()
    accelerator = Accelerator(cpu=use_cpu, log_with=cfg.trackers or None)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if not accelerator.is_main_process:
        logging.getLogger("training").setLevel(logging.WARNING)  # one voice: the main process reports
    deterministic = cfg.deterministic if cfg.deterministic is not None else device.type == "cpu"
    torch.use_deterministic_algorithms(deterministic)
    set_seed(cfg.seed)
    say = accelerator.print

    # ---- 2. language model, sites, data, buffer -----------------------------------------------------------------
    model, tokenizer = load_language_model(cfg, device)
    specs = resolve_specs(cfg, model)
    sites = [resolve_site(model, spec.layer, spec.site) for spec in specs]
    run_dir = prepare_run_dir(cfg, specs, model, accelerator, resuming=checkpoint_dir is not None)
    config_yaml = save_yaml(cfg, run_dir / "train_config.yaml") if accelerator.is_main_process else None
    excluded = excluded_token_ids(cfg, tokenizer)
    train_data, eval_data = dataset_factories(cfg, rank, world)
    windows = TokenWindows(train_data, tokenizer, cfg.context_length, cfg.text_column, loop=True, name=cfg.dataset)
    harvester = ActivationHarvester(model, sites, excluded)
    on_device = cfg.buffer_device == "device"
    buffer = ActivationBuffer(
        windows,
        harvester,
        cfg.buffer_size,
        cfg.batch_size,
        cfg.lm_batch_size,
        dtype=model.dtype,
        storage_device=device if on_device else torch.device("cpu"),
        seed=cfg.seed,
        rank=rank,
        pin_memory=device.type == "cuda" and not on_device,
        max_nonfinite_batches=cfg.max_nonfinite_batches,
    )
    total_steps = math.ceil(cfg.tokens / (cfg.batch_size * world))
    dead_tokens = cfg.dead_tokens or max(cfg.batch_size * world, min(10_000_000, cfg.tokens // 10))

    # ---- 3. SAEs: fresh (scale + b_dec from the first buffer round) or from the checkpoint ---------------------
    started = time.perf_counter()  # training time includes harvesting the first buffer round
    setup_seconds = started - setup_started  # imports excluded: model, tokenizer, data set
    start_step, trainer_state = 0, {"skipped_steps": 0, "seconds": 0.0}
    if checkpoint_dir is None:
        first_round = buffer.peek(min(cfg.buffer_size, 16384))
        saes = []
        for spec, site in zip(specs, sites):
            x = first_round[site.key].float()
            mean_sq_norm = accelerator.reduce(x.pow(2).sum(-1).mean().to(device), reduction="mean")
            scale = math.sqrt(site.width / float(mean_sq_norm))  # E||s x||^2 = d_in
            saes.append(build_sae(cfg, spec, site.width, scale, dead_tokens, model, excluded, x, device))
    else:
        state = ckpt.load_checkpoint(checkpoint_dir, [sae_class(s.arch) for s in specs], device)
        saes, trainer_state = state["saes"], state["trainer_state"]
        if trainer_state["processes"] != world:
            raise ResumeError(
                f"--resume {cfg.resume}: the checkpoint was written by {trainer_state['processes']} process(es), this "
                f"launch has {world}. Launch with --num_processes {trainer_state['processes']} to continue it."
            )
        start_step = trainer_state["step"]
        mine = state["process_states"][rank]
        buffer.load_state(mine["buffer"])
        ckpt.set_rng_state(mine["rng"])
        say(f"resuming {run_dir} from {checkpoint_dir.name} (step {start_step} of {total_steps})")
    for sae in saes:
        sae.train()
        sae.check_finite = False  # the harvester already drops NaN/inf batches; skip a sync per step
        sae.config.dead_tokens = max(1, math.ceil(dead_tokens / world))  # each process counts its own tokens

    # ---- 4. optimiser, schedule, the loop ------------------------------------------------------------------------
    optimizer = torch.optim.AdamW(
        [
            {"params": sae.parameters(), "lr": spec.lr or scaled_learning_rate(spec.d_sae)}
            for sae, spec in zip(saes, specs)
        ],
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
    )
    scheduler = get_scheduler(
        "cosine_with_min_lr",
        optimizer,
        num_warmup_steps=int(cfg.lr_warmup_fraction * total_steps),
        num_training_steps=total_steps,
        scheduler_specific_kwargs={"min_lr": cfg.lr_min},
    )
    if checkpoint_dir is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    stack = SAEStack([torch.compile(sae) for sae in saes] if cfg.compile else saes)
    stack, optimizer = accelerator.prepare(stack, optimizer)  # DDP when several processes; not the scheduler
    if cfg.trackers:
        accelerator.project_configuration.set_directories(str(run_dir))  # e.g. tensorboard logs in <run>/<project>/
        accelerator.init_trackers(cfg.project, config=flat_config(cfg))
    say(describe_run(cfg, specs, saes, run_dir, total_steps, dead_tokens, world, device, excluded))

    keys = [site.key for site in sites]
    progress = tqdm(
        total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not accelerator.is_main_process
    )
    tokens_at_start = start_step * cfg.batch_size * world
    previous_seconds = trainer_state["seconds"]  # training time of earlier sessions (resume)
    consecutive_skips = 0
    for step in range(start_step, total_steps):
        batch = buffer.next_batch(device)
        inputs = [batch[key].float() for key in keys]
        stepped, outputs = sae_step(stack, saes, optimizer, scheduler, inputs, accelerator, cfg)
        if not stepped:
            trainer_state["skipped_steps"] += 1
            consecutive_skips += 1
            if consecutive_skips > cfg.max_nonfinite_batches:
                raise NonFiniteLossError(
                    f"{consecutive_skips} consecutive SAE steps had NaN/inf gradients (step {step}); the last "
                    f"checkpoint in {run_dir / ckpt.CHECKPOINTS} is intact. Lower --lr, keep --max-grad-norm on, "
                    "or check the activations (--lm-dtype float32)."
                )
        else:
            consecutive_skips = 0
        done = step + 1
        if done % cfg.log_every == 0 or done == total_steps:
            seconds = time.perf_counter() - started
            tokens_per_second = (done * cfg.batch_size * world - tokens_at_start) / max(seconds, 1e-9)
            logs = step_metrics(saes, specs, inputs, outputs, tokens_per_second, scheduler)
            first = logs[specs[0].name]
            progress.set_postfix_str(
                f"tok/s {tokens_per_second:,.0f} loss {first['loss']:.4f} fvu {first['fvu']:.3f} "
                f"l0 {first['l0']:.1f} dead {100 * first['dead_fraction']:.1f}%"
            )
            accelerator.log({f"{name}/{key}": value for name, m in logs.items() for key, value in m.items()}, step=done)
        progress.update(1)
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == total_steps:
            trainer_state["seconds"] = previous_seconds + time.perf_counter() - started
            save_training_checkpoint(
                run_dir, done, saes, optimizer, scheduler, buffer, trainer_state, world, accelerator, config_yaml, cfg
            )
    progress.close()
    seconds = time.perf_counter() - started
    trainer_state["seconds"] = previous_seconds + seconds

    # ---- 5. fold, save, evaluate, plot, card, summary (main process) --------------------------------------------
    accelerator.wait_for_everyone()
    result: dict[str, Any] = {}
    if accelerator.is_main_process:
        result = finish_run(
            cfg,
            specs,
            sites,
            saes,
            model,
            tokenizer,
            harvester,
            eval_data,
            run_dir,
            excluded,
            dead_tokens,
            total_steps,
            world,
            device,
            trainer_state,
            session_tokens=total_steps * cfg.batch_size * world - tokens_at_start,
            session_seconds=seconds,
            setup_seconds=setup_seconds,
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


# ------------------------------------------------------------------------------------------------------- helpers
def resolve_resume(cfg: TrainConfig, explicit: dict[str, Any]) -> tuple[TrainConfig, Path | None]:
    """With --resume: the saved config (refusing options that would change training) and the newest checkpoint."""
    if not cfg.resume:
        return cfg, None
    run_dir = Path(cfg.resume)
    saved_path = run_dir / "train_config.yaml"
    if not saved_path.is_file():
        raise ResumeError(
            f"--resume {run_dir}: no train_config.yaml there, so it is not a training run folder (or its first "
            "checkpoint was never written). Pass the --out folder of an earlier run, or start a new run."
        )
    from .config import load_yaml

    saved = make_config(load_yaml(saved_path))
    differences = config_differences(saved, explicit)
    if differences:
        listed = "; ".join(f"{name}: run has {old!r}, you passed {new!r}" for name, (old, new) in differences.items())
        raise ResumeError(
            f"--resume {run_dir}: the run was trained with a different config ({listed}). Drop those options to "
            "continue it, or start a new run with another --out."
        )
    allowed = {name: value for name, value in explicit.items() if name not in differences}
    cfg = make_config({**allowed, "resume": str(run_dir), "out": str(run_dir)}, base=saved)
    checkpoint_dir = ckpt.latest_checkpoint(run_dir)
    if checkpoint_dir is None:
        raise ResumeError(
            f"--resume {run_dir}: no complete checkpoint in {run_dir / ckpt.CHECKPOINTS} (the run stopped before "
            "its first one). Start it again without --resume (add --overwrite to reuse the folder)."
        )
    return cfg, checkpoint_dir


def lm_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    """``--lm-dtype``; auto: bfloat16 on GPU and on CPUs with native bfloat16 (AVX512-BF16 / AMX), else float32."""
    if cfg.lm_dtype != "auto":
        return getattr(torch, cfg.lm_dtype)
    if device.type == "cuda":
        return torch.bfloat16
    cpu = torch.cpu
    native_bf16 = any(
        getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return torch.bfloat16 if device.type == "cpu" and native_bf16 else torch.float32


def load_language_model(cfg: TrainConfig, device: torch.device):
    """The frozen language model (eval, no grad, in ``--lm-dtype``) on ``device``, and its tokenizer."""
    dtype = lm_dtype(cfg, device)
    if cfg.model == EMBEDDED:
        from .embedded import load_small_gemma

        model, tokenizer = load_small_gemma(dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(cfg.model)
            model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype)
        except (OSError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ModelLoadError(
                f"--model {cfg.model}: cannot load it as a causal language model ({first_line}). Check the Hub id or "
                "local folder (it needs config.json, weights and a tokenizer), log in for gated models "
                "(`hf auth login`), or use --model embedded for the bundled Gemma 3 270M."
            ) from None
    model.requires_grad_(False)
    return model.eval().to(device), tokenizer


def resolve_specs(cfg: TrainConfig, model: nn.Module) -> list[SAESpec]:
    """Fill in the default layer (the middle one, (n - 1) // 2) and check every layer against the model."""
    n = num_layers(model)
    specs = []
    for spec in cfg.sae_specs():
        if spec.layer is None:
            spec.layer = (n - 1) // 2
        if spec.layer >= n:
            raise TrainConfigError(
                f"--layer {spec.layer} is out of range: {cfg.model} has {n} decoder layers (0..{n - 1}). Pass a "
                f"layer in 0..{n - 1}, e.g. --layer {(n - 1) // 2} (the middle)."
            )
        specs.append(spec)
    return specs


def sae_class(arch: str) -> type:
    return KronSAE if arch == "kron" else HierarchicalSAE


def build_sae(
    cfg: TrainConfig,
    spec: SAESpec,
    d_in: int,
    scale: float,
    dead_tokens: int,
    model: nn.Module,
    excluded: list[int],
    sample: Tensor,
    device: torch.device,
):
    """A freshly initialised SAE that scales its own input by ``scale`` (unfolded until the end of training).

    Init (sae-models.md): the architecture's own (TopK: random unit decoder rows, W_enc = W_dec^T; KronSAE: the
    paper's), then b_dec = geometric median (or mean) of ``sample`` (raw activations), in the scaled space.
    """
    common = dict(
        d_in=d_in,
        d_sae=spec.d_sae,
        k=spec.k,
        budgets=cfg.budgets,
        auxk=cfg.auxk,
        auxk_k=cfg.auxk_k,
        auxk_coefficient=cfg.auxk_coefficient,
        dead_tokens=dead_tokens,
        base_model=model_id(cfg, model),
        hook_layer=spec.layer,
        hook_site=spec.site,
        activation_scale=scale,
        activation_scale_folded=False,
        context_length=cfg.context_length,
        excluded_token_ids=list(excluded),
        dataset=dataset_id(cfg),
    )
    if spec.arch == "kron":
        config = KronSAEConfig(
            **common,
            base_dim=cfg.kron_base_dim,
            ext_dim=cfg.kron_ext_dim,
            kron_activation=cfg.kron_activation,
            hierarchical=cfg.kron_hierarchical,
        )
    else:
        config = HierarchicalSAEConfig(**common, hierarchical=spec.arch == "hierarchical")
    sae = sae_class(spec.arch)(config).to(device)
    method = cfg.b_dec_init if cfg.b_dec_init != "auto" else ("zeros" if spec.arch == "kron" else "geometric_median")
    if method != "zeros":
        sae.initialize_b_dec(sample[:4096] * scale, method=method)
    return sae


def model_id(cfg: TrainConfig, model: nn.Module) -> str:
    return str(getattr(model, "name_or_path", "") or cfg.model)


def dataset_id(cfg: TrainConfig) -> str:
    return "hf-sae embedded English corpus (training/embedded.py)" if cfg.dataset == EMBEDDED else cfg.dataset


def prepare_run_dir(
    cfg: TrainConfig, specs: list[SAESpec], model: nn.Module, accelerator: Accelerator, resuming: bool
) -> Path:
    """runs/<name> (or --out), checked so that a new run never overwrites an old one unless --overwrite."""
    if cfg.out:
        run_dir = Path(cfg.out)
    else:
        short = model_id(cfg, model).rstrip("/").split("/")[-1]
        spec = specs[0]
        name = cfg.name or (
            f"{short}-L{spec.layer}-{spec.site}-{spec.arch}-d{spec.d_sae}-k{spec.k}"
            if len(specs) == 1
            else f"{short}-{len(specs)}saes"
        )
        run_dir = Path("runs") / name
    if accelerator.is_main_process and not resuming and run_dir.exists() and any(run_dir.iterdir()):
        check_run_dir_is_free(run_dir, cfg.overwrite)
        shutil.rmtree(run_dir)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if resuming:
            ckpt.remove_stale_temporaries(run_dir)  # folders of checkpoint writes that were killed midway
    accelerator.wait_for_everyone()
    return run_dir


def check_run_dir_is_free(run_dir: Path, overwrite: bool) -> None:
    if not overwrite and run_dir.exists() and any(run_dir.iterdir()):
        raise TrainConfigError(
            f"{run_dir} already exists and is not empty. Continue that run with --resume {run_dir}, pick "
            "another --out / --name, or pass --overwrite to replace it."
        )


def step_metrics(saes, specs, inputs, outputs, tokens_per_second, scheduler) -> dict[str, dict[str, float]]:
    """Per-SAE training metrics of the current batch (one host sync, only on logging steps)."""
    logs = {}
    for i, (sae, spec, x, out) in enumerate(zip(saes, specs, inputs, outputs)):
        with torch.no_grad():
            logs[spec.name] = {
                "loss": float(out.loss),
                "reconstruction_loss": float(out.losses["reconstruction"]),
                "auxk_loss": float(out.losses["auxk"]) if "auxk" in out.losses else 0.0,
                "fvu": sae_metrics.fvu(x, out.reconstruction.float()),
                "l0": sae_metrics.l0(out.latents.values),
                "dead_fraction": float(sae.dead_mask().float().mean()),
                "lr": scheduler.get_last_lr()[i],
                "tokens_per_second": tokens_per_second,
            }
    return logs


def save_training_checkpoint(
    run_dir, step, saes, optimizer, scheduler, buffer, trainer_state, world, accelerator, config_yaml, cfg
) -> None:
    """Gather every process's data position and RNG state, then the main process writes the checkpoint."""
    process_states = gather_object([{"buffer": buffer.state(), "rng": ckpt.rng_state()}])
    if accelerator.is_main_process:
        state = {
            **trainer_state,
            "step": step,
            "tokens": step * cfg.batch_size * world,
            "processes": world,
            "nonfinite_lm_batches": sum(s["buffer"]["nonfinite_batches"] for s in process_states),
        }
        ckpt.save_checkpoint(
            run_dir, step, saes, optimizer, scheduler, state, process_states, config_yaml, keep=cfg.keep_checkpoints
        )
    accelerator.wait_for_everyone()


def finish_run(
    cfg,
    specs,
    sites,
    saes,
    model,
    tokenizer,
    harvester,
    eval_data,
    run_dir,
    excluded,
    dead_tokens,
    total_steps,
    world,
    device,
    trainer_state,
    session_tokens,
    session_seconds,
    setup_seconds,
) -> dict[str, Any]:
    """Fold the activation scale, save every SAE, evaluate on held-out windows, write metrics/plot/card/summary."""
    finish_started = time.perf_counter()
    tokens = total_steps * cfg.batch_size * world
    # dead after dead_tokens tokens, by the training counters (read before the config gets the global threshold)
    dead_fractions = [float(sae.dead_mask().float().mean()) for sae in saes]
    outputs = {}
    for spec, sae in zip(specs, saes):
        sae.eval()
        sae.check_finite = True
        sae.config.dead_tokens = dead_tokens
        sae.config.tokens_trained = tokens
        sae.fold_activation_scale()
        outputs[spec.name] = run_dir if len(specs) == 1 else run_dir / spec.name
        save_sae(sae, outputs[spec.name])

    eval_windows = TokenWindows(
        eval_data, tokenizer, cfg.context_length, cfg.text_column, loop=False, name=f"{cfg.dataset} (held out)"
    )
    activations, lm_batches = collect_eval_data(
        harvester, eval_windows, cfg.eval_tokens, cfg.eval_lm_windows, cfg.lm_batch_size
    )
    run_info = {
        "model": model_id(cfg, model),
        "dataset": dataset_id(cfg),
        "tokens": tokens,
        "steps": total_steps,
        "batch_size": cfg.batch_size,
        "processes": world,
        "device": str(device),
        "setup_seconds": round(setup_seconds, 1),
        "train_seconds": round(trainer_state["seconds"], 1),
        "tokens_per_second": round(session_tokens / max(session_seconds, 1e-9), 1) if session_tokens else None,
        "skipped_steps": trainer_state["skipped_steps"],
        "dead_tokens": dead_tokens,
        "context_length": cfg.context_length,
        "excluded_token_ids": excluded,
        "eval_lm_windows": cfg.eval_lm_windows,
    }
    sae_results = {}
    for spec, site, sae, dead in zip(specs, sites, saes, dead_fractions):
        result = {
            "path": str(outputs[spec.name]),
            "layer": spec.layer,
            "site": spec.site,
            "arch": spec.arch,
            "d_sae": spec.d_sae,
            "k": spec.k,
            "activation_scale": sae.config.activation_scale,
            "dead_fraction": dead,
        }
        result.update(reconstruction_metrics(sae, activations[site.key]))
        result["lm_loss"] = lm_loss_metrics(model, sae, lm_batches, excluded)
        sae_results[spec.name] = result
    run_info["evaluation_seconds"] = round(time.perf_counter() - finish_started, 1)
    metrics = {"run": run_info, "saes": sae_results}
    ckpt.write_json_atomic(run_dir / "metrics.json", metrics)
    if cfg.plot:
        from .plots import plot_budget_curves

        plot = plot_budget_curves(
            sae_results, run_dir / "budget_curves.png", title=f"{run_info['model']} — {tokens:,} tokens"
        )
        for directory in outputs.values():  # each SAE folder of a multi-SAE run gets the figure for its card
            if directory != run_dir:
                shutil.copy2(plot, directory / plot.name)
    if cfg.model_card:
        for spec, sae in zip(specs, saes):
            write_model_card(sae, {"run": run_info, **sae_results[spec.name]}, outputs[spec.name])
    print(summary_table(metrics, run_dir), flush=True)
    return metrics


def save_sae(sae, directory: Path) -> None:
    """save_pretrained into ``directory`` without touching its other contents (checkpoints/, metrics, plot).

    ``SAEPreTrainedModel.save_pretrained`` swaps the whole target folder atomically, which would drop the run's
    sub-folders; so the SAE is saved beside it and its files are renamed in one by one (each rename is atomic).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.sae-tmp"
    shutil.rmtree(staging, ignore_errors=True)
    sae.save_pretrained(staging)
    for item in sorted(staging.iterdir(), key=lambda p: p.name == "config.json"):  # config last
        item.chmod(0o644)
        item.replace(directory / item.name)
    shutil.rmtree(staging, ignore_errors=True)


def write_model_card(sae, metrics: dict[str, Any], directory: Path) -> Path | None:
    """README.md from ``hf_sae.cards.generate_model_card`` (imported lazily: the card module is optional here)."""
    try:
        from hf_sae.cards import generate_model_card
    except ImportError:
        logger.warning("hf_sae.cards is not available in this hf-sae: no model card written to %s", directory)
        return None
    command = ("python -m training.train " + shlex.join(sys.argv[1:])).strip()
    card = generate_model_card(sae, metrics=metrics, run_dir=directory, command=command)
    path = Path(directory) / "README.md"
    ckpt.write_text_atomic(path, str(card))
    return path


def flat_config(cfg: TrainConfig) -> dict[str, Any]:
    """Tracker-friendly config (scalars only)."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.to_dict().items()}


def describe_run(cfg, specs, saes, run_dir, total_steps, dead_tokens, world, device, excluded) -> str:
    lines = [
        f"hf-sae {hf_sae.__version__}: training {len(saes)} SAE(s) into {run_dir} on {world} process(es), "
        f"{device}; {cfg.tokens:,} tokens = {total_steps} steps x {cfg.batch_size} x {world}"
    ]
    for spec, sae in zip(specs, saes):
        lines.append(
            f"  {spec.name}: {type(sae).__name__} d_in={sae.config.d_in} activation_scale="
            f"{sae.config.activation_scale:.4g} lr={spec.lr or scaled_learning_rate(spec.d_sae):.3g}"
        )
    lines.append(
        f"  data {dataset_id(cfg)}; windows of {cfg.context_length} tokens; excluded ids {excluded}; "
        f"dead after {dead_tokens:,} tokens; shuffle buffer {cfg.buffer_size:,} activations"
    )
    return "\n".join(lines)


def summary_table(metrics: dict[str, Any], run_dir: Path) -> str:
    run = metrics["run"]
    speed = f"{run['tokens_per_second']:,.0f} tokens/s this session" if run["tokens_per_second"] else "resumed at end"
    lines = [
        "",
        f"== hf-sae training summary: {run_dir} ==",
        f"{run['model']} | {run['tokens']:,} tokens, {run['steps']} steps, {run['processes']} process(es) on "
        f"{run['device']} | {run['train_seconds']:.0f} s training ({speed}), {run['setup_seconds']:.0f} s "
        f"setup (model, tokenizer, data), {run['evaluation_seconds']:.0f} s saving + evaluation",
    ]
    for name, result in metrics["saes"].items():
        lines += [
            "",
            f"{name}  (held-out tokens: {result['eval_tokens']:,}; saved to {result['path']})",
            f"{'k′':>6} {'EV':>8} {'FVU':>8} {'L0':>7} {'shrink':>7}",
        ]
        for budget, m in result["budgets"].items():
            lines.append(
                f"{budget:>6} {m['explained_variance']:>8.4f} {m['fvu']:>8.4f} {m['l0']:>7.2f} {m['shrinkage']:>7.3f}"
            )
        lines.append(
            f"dead latents: {100 * result['dead_fraction']:.1f}% (training counters), "
            f"{100 * result['dead_fraction_eval']:.1f}% never fire on held-out tokens"
        )
        lm = result.get("lm_loss")
        if lm:
            lines.append("LM loss: " + ", ".join(f"{k} {v:.4f}" for k, v in lm.items() if isinstance(v, float)))
        elif run["eval_lm_windows"]:
            lines.append("LM loss with the SAE spliced in: not evaluated (needs hf_sae.evaluation.lm_loss_with_sae)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    transformers_logging.disable_progress_bar()  # weight-loading / shard-writing bars; ours is the only one
    for noisy in ("httpx", "datasets", "filelock", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg, explicit = parse_args(argv)
    train(cfg, explicit)


if __name__ == "__main__":
    main()
