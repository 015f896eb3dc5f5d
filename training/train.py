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
4. AdamW with warm-up + cosine decay; each step is :func:`hf_sae.training_step` over every SAE (DDP all-reduces in
   backward; each SAE's gradient is clipped on its own);
5. checkpoints every N steps and at the end; then fold the scale, save, evaluate, plot, model card, summary.

Nothing is written into the run folder before the model, the sites, the data and the memory have been checked (a
failed start leaves an old run as it was); one session at a time holds the folder's lock; SIGINT / SIGTERM stop at
the next step boundary after a checkpoint (exit 130 / 143, one line saying how to resume). See docs/reliability.md.

Helpers live beside the loop: config.py (options), language_model.py, run_folder.py (where, lock, resume), data.py
(tokenise + pack), harvest.py (hooks + buffer), saes.py (building the SAEs and the optimiser), run.py (the run's
state), checkpoint.py, stopping.py (signals), report.py (what it prints), finish.py (evaluate, metrics, card),
evaluate.py, plots.py.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.utils import logging as transformers_logging

from hf_sae import training_step
from hf_sae.errors import HfSaeError, NonFiniteLossError, ResumeError, TrainConfigError
from hf_sae.hardware import retain_freed_memory, use_huge_pages
from hf_sae.latent_parallel import gather_sae, shard_optimizer_state, shard_sae
from hf_sae.modeling_sae import SAEOutput
from hf_sae.sites import resolve_site

from . import checkpoint as ckpt
from .activation_cache import CachedActivations
from .cli import parse_args
from .config import TrainConfig, check_trackers_installed
from .data import check_data_unchanged, data_file_state, dataset_factories, excluded_token_ids, training_windows
from .finish import finish_run
from .harvest import ActivationBuffer, ActivationHarvester
from .language_model import dataset_id, load_language_model, model_id, resolve_layers
from .report import describe_run, flat_config, progress_text, step_metrics
from .run import Run
from .run_folder import RunFolder, check_run_dir_is_free, resolve_resume, run_dir_of
from .saes import (
    activation_scale,
    build_optimizer,
    build_sae,
    check_sae_memory,
    check_shardable,
    dead_tokens_of,
    model_classes,
    step_autocast_dtype,
)
from .stopping import StopSignals

logger = logging.getLogger("training")


class SAEStack(nn.Module):
    """All SAEs of a run as one module, so one DDP wrapper all-reduces every SAE's gradients."""

    def __init__(self, saes: list[nn.Module]):
        super().__init__()
        self.saes = nn.ModuleList(saes)

    def forward(self, inputs: list[Tensor]) -> list[SAEOutput]:
        return [sae(x) for sae, x in zip(self.saes, inputs)]


def train(cfg: TrainConfig, explicit: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) training as configured; returns the metrics written to metrics.json (main process).

    Raises :class:`hf_sae.errors.RunInterrupted` (a ``KeyboardInterrupt``) when SIGINT / SIGTERM stopped it.
    """
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        with ExitStack() as resources:  # the signal handlers and the run folder's lock, released however it ends
            return _train(cfg, explicit or {}, resources)
    finally:
        torch.use_deterministic_algorithms(deterministic_before)


def _train(cfg: TrainConfig, explicit: dict[str, Any], resources: ExitStack) -> dict[str, Any]:
    setup_started = time.perf_counter()
    cfg = resolve_resume(cfg, explicit)
    stop = resources.enter_context(StopSignals(cfg.resume))  # SIGINT / SIGTERM: now in setup, at a step boundary later
    if cfg.out and not cfg.resume:
        check_run_dir_is_free(Path(cfg.out), cfg.overwrite)  # before the (slow) model load
    check_trackers_installed(cfg.trackers)

    # ---- 1. accelerator -------------------------------------------------------------------------------------
    use_cpu = cfg.cpu if cfg.cpu is not None else not torch.cuda.is_available()
    accelerator = Accelerator(cpu=use_cpu, log_with=cfg.trackers or None, project_dir=cfg.out or "runs")
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    shard = cfg.shard_latents  # latent parallelism: one data stream, every process holds 1/world of each SAE
    data_rank, data_world = (0, 1) if shard else (rank, world)
    if shard and cfg.compile:
        raise TrainConfigError("--compile does not work with --shard-latents yet; drop one of them.")
    if not accelerator.is_main_process:
        logging.getLogger("training").setLevel(logging.WARNING)  # one voice: the main process reports
    torch.use_deterministic_algorithms(cfg.deterministic if cfg.deterministic is not None else device.type == "cpu")
    if device.type == "cpu":  # each step reuses the last one's pages instead of faulting in fresh ones, huge ones
        use_huge_pages()
        retain_freed_memory()
    set_seed(cfg.seed)

    # ---- 2. language model, sites, run folder, data, buffer: all checked before anything is written -------------
    model, tokenizer = load_language_model(cfg, device)
    specs = resolve_layers(cfg, model)
    sites = [resolve_site(model, spec.layer, spec.site) for spec in specs]
    if shard:
        check_shardable(specs, sites, world)
    check_sae_memory(cfg, specs, sites, device, shards=world if shard else 1)
    folder = resources.enter_context(RunFolder(run_dir_of(cfg, specs, model_id(cfg, model)), cfg, accelerator))
    run_dir, checkpoint_dir = folder.path, folder.checkpoint()  # locked; the newest intact checkpoint if resuming
    stop.watch(run_dir, accelerator)
    excluded = excluded_token_ids(cfg, tokenizer)
    train_data, eval_data = dataset_factories(cfg, data_rank, data_world)
    total_steps = math.ceil(cfg.tokens / (cfg.batch_size * data_world))
    harvester = ActivationHarvester(model, sites, excluded)
    on_device = cfg.buffer_device == "device"
    if cfg.activations:  # a harvested cache (training/activation_cache.py) instead of the LM on the fly
        buffer = CachedActivations.for_run(cfg, model_id(cfg, model), model, sites, data_rank, data_world, device)
    else:
        windows = training_windows(cfg, tokenizer, train_data, data_rank, activations=total_steps * cfg.batch_size)
        buffer = ActivationBuffer(
            windows,
            harvester,
            cfg.buffer_size,
            cfg.batch_size,
            cfg.lm_batch_size,
            dtype=model.dtype,
            storage_device=device if on_device else torch.device("cpu"),
            seed=cfg.seed,
            rank=data_rank,
            pin_memory=device.type == "cuda" and not on_device,
            max_nonfinite_batches=cfg.max_nonfinite_batches,
        )
    run = Run(
        cfg=cfg,
        accelerator=accelerator,
        model=model,
        tokenizer=tokenizer,
        sites=sites,
        run_dir=run_dir,
        model_name=model_id(cfg, model),
        data_name=dataset_id(cfg),
        excluded=excluded,
        harvester=harvester,
        buffer=buffer,
        eval_data=eval_data,
        total_steps=total_steps,
        dead_tokens=[dead_tokens_of(cfg, spec, data_world) for spec in specs],
    )

    # ---- 3. SAEs: fresh (scale + b_dec from the first buffer round) or from the checkpoint ---------------------
    started = time.perf_counter()  # training time includes harvesting the first buffer round
    run.setup_seconds = started - setup_started  # imports excluded: model, tokenizer, data set
    build_device = torch.device("cpu") if shard else device  # shards go to the device, never the whole SAE
    if checkpoint_dir is None:
        first_round = buffer.peek(min(cfg.buffer_size, 16384))
        provenance = {
            "base_model": run.model_name,
            "context_length": cfg.context_length,
            "excluded_token_ids": list(excluded),
            "dataset": run.data_name,
        }
        for spec, site, dead_tokens in zip(specs, sites, run.dead_tokens):
            x = first_round[site.key].float()
            scale = activation_scale(x, accelerator)
            run.saes.append(build_sae(cfg, spec, site, scale, dead_tokens, provenance, x, build_device, total_steps))
        run.trainer_state["data_files"] = data_file_state(cfg.dataset)  # a resume checks them
    else:
        state = ckpt.load_checkpoint(checkpoint_dir, model_classes(specs), build_device)
        run.saes, run.trainer_state = state["saes"], state["trainer_state"]
        if run.trainer_state["processes"] != world and not shard:  # sharded checkpoints hold whole SAEs
            raise ResumeError(
                f"--resume {cfg.resume}: the checkpoint was written by {run.trainer_state['processes']} process(es), "
                f"this launch has {world}. Launch with --num_processes {run.trainer_state['processes']} to continue it."
            )
        run.trainer_state["data_files"] = check_data_unchanged(run.trainer_state.get("data_files"), cfg)
        mine = state["process_states"][data_rank]
        buffer.load_state(mine["buffer"])
        ckpt.set_rng_state(mine["rng"])
        accelerator.print(f"resuming {run_dir} from {checkpoint_dir.name} (step {run.trainer_state['step']})")
    run.config_yaml = folder.prepare(cfg)  # checked: now --overwrite clears the old run, the config is written
    if shard:
        run.saes = [shard_sae(sae, device=device) for sae in run.saes]
    for sae, dead_tokens in zip(run.saes, run.dead_tokens):
        sae.train()
        sae.check_finite = False  # the harvester already drops NaN/inf batches; skip a sync per step
        sae.config.dead_tokens = max(1, math.ceil(dead_tokens / data_world))  # each process counts its own tokens

    # ---- 4. optimiser, schedule, the loop ------------------------------------------------------------------------
    optimizer, scheduler = build_optimizer(cfg, run.saes, specs, run.total_steps)
    if checkpoint_dir is not None:
        optimizer.load_state_dict(
            shard_optimizer_state(state["optimizer"], optimizer, run.saes) if shard else state["optimizer"]
        )
        scheduler.load_state_dict(state["scheduler"])
    stack = SAEStack([torch.compile(sae) for sae in run.saes] if cfg.compile else run.saes)
    if shard:  # no DDP: each process's gradients are its own shard's (b_dec's are summed inside the forward)
        optimizer = accelerator.prepare(optimizer)
    else:
        stack, optimizer = accelerator.prepare(stack, optimizer)  # DDP when several processes; not the scheduler
    if cfg.trackers:
        accelerator.project_configuration.set_directories(str(run_dir))  # e.g. tensorboard logs in <run>/<project>/
        accelerator.init_trackers(cfg.project, config=flat_config(cfg))
    accelerator.print(describe_run(cfg, run_dir, run.saes, run.total_steps, world, device, run.data_name, shard))

    run.start_step, keys = run.trainer_state.get("step", 0), [site.key for site in sites]
    progress = resources.enter_context(  # closed however the loop ends, so a last message starts a line of its own
        tqdm(
            total=run.total_steps,
            initial=run.start_step,
            unit="step",
            dynamic_ncols=True,
            disable=not accelerator.is_main_process,
        )
    )
    tokens_at_start, previous_seconds = run.start_step * run.tokens_per_step, run.trainer_state["seconds"]
    consecutive_skips, step_dtype = 0, step_autocast_dtype(cfg, device)
    stop.deferred = True  # from here on a signal stops the loop at the next step boundary, after a checkpoint
    for step in range(run.start_step, run.total_steps):
        batch = buffer.next_batch(device)
        inputs = [batch[key].float() for key in keys]
        result = training_step(
            run.saes,
            optimizer,
            inputs,
            scheduler=scheduler,
            max_grad_norm=cfg.max_grad_norm,
            autocast_dtype=step_dtype,
            forward=stack,
            backward=accelerator.backward,
        )
        consecutive_skips = 0 if result.stepped else consecutive_skips + 1
        if not result.stepped:
            run.trainer_state["skipped_steps"] += 1
            if consecutive_skips > cfg.max_nonfinite_batches:
                raise NonFiniteLossError(
                    f"{consecutive_skips} consecutive SAE steps had NaN/inf gradients (step {step}). Lower --lr, keep "
                    "--max-grad-norm on, or check the activations (--lm-dtype float32)."
                )
        done = step + 1
        log_step = done % cfg.log_every == 0 or done == run.total_steps
        if log_step:
            seconds = time.perf_counter() - started
            tokens_per_second = (done * run.tokens_per_step - tokens_at_start) / max(seconds, 1e-9)
            lrs = scheduler.get_last_lr()
            logs = step_metrics(run.saes, specs, inputs, result.outputs, tokens_per_second, lrs)
            progress.set_postfix_str(progress_text(logs))
            accelerator.log({f"{name}/{key}": value for name, m in logs.items() for key, value in m.items()}, step=done)
        progress.update(1)
        checkpoint_due = (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == run.total_steps
        stopping = stop.agreed(accelerator, boundary=log_step or checkpoint_due)  # all processes: the same step
        if checkpoint_due or stopping:
            run.trainer_state["seconds"] = previous_seconds + time.perf_counter() - started
            run.save_checkpoint(done, optimizer, scheduler)
        if stopping:
            raise stop.interrupted(stop.received, f" at step {done} of {run.total_steps}")
    progress.close()
    stop.finishing()  # the final checkpoint is saved: a signal from here on stops at once
    run.session_seconds = time.perf_counter() - started
    run.session_tokens = run.total_steps * run.tokens_per_step - tokens_at_start
    run.trainer_state["seconds"] = previous_seconds + run.session_seconds

    # ---- 5. fold, save, evaluate, plot, card, summary (main process) --------------------------------------------
    if shard:  # the whole SAEs on the main process (None elsewhere), for the ordinary save and evaluation
        run.saes = [gather_sae(sae) for sae in run.saes]
        run.saes = [sae.to(device) for sae in run.saes] if accelerator.is_main_process else []
    accelerator.wait_for_everyone()
    metrics: dict[str, Any] = finish_run(run) if accelerator.is_main_process else {}
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    transformers_logging.disable_progress_bar()  # weight-loading / shard-writing bars; ours is the only one
    for noisy in ("httpx", "datasets", "filelock", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg, explicit = parse_args(argv)
        train(cfg, explicit)
    except HfSaeError as error:  # bad input: one line, no traceback (anything else is a bug and keeps it)
        print(f"hf-sae: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as stop:  # SIGINT / SIGTERM (RunInterrupted says what was saved), or Ctrl-C at start
        if getattr(stop, "announce", True):
            print(f"hf-sae: {stop or 'interrupted before training started; nothing was written'}", file=sys.stderr)
        sys.exit(getattr(stop, "exit_status", 130))


if __name__ == "__main__":
    main()
