"""What a run says: the description before the first step, the per-step metrics of the progress bar and trackers,
and the summary table at the end (main process)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hf_sae import metrics as sae_metrics
from hf_sae._version import __version__
from hf_sae.modeling_sae import SAEOutput, SAEPreTrainedModel
from hf_sae.run_files import RunMetrics

from .config import SAESpec, TrainConfig
from .saes import learning_rate


def describe_run(
    cfg: TrainConfig,
    run_dir: Path,
    saes: list,
    total_steps: int,
    world: int,
    device,
    data: str,
    sharded: bool = False,
) -> str:
    """The lines printed before the first step: where, how much, each SAE's class, scale and learning rate."""
    streams = 1 if sharded else world  # processes reading different batches
    layout = f"each SAE split by latent over the {world} process(es)" if sharded else f"{world} process(es)"
    lines = [
        f"hf-sae {__version__}: training {len(saes)} SAE(s) into {run_dir} on {layout}, "
        f"{device}; {cfg.tokens:,} tokens = {total_steps} steps x {cfg.batch_size} x {streams}"
    ]
    for spec, sae in zip(cfg.saes, saes):
        name = f"{type(sae.shard).__name__} (latents {sae.lo}..{sae.hi - 1} here)" if sharded else type(sae).__name__
        lines.append(
            f"  {spec.name}: {name} d_in={sae.config.d_in} activation_scale="
            f"{sae.config.activation_scale:.4g} lr={learning_rate(spec, sae):.3g} "
            f"dead after {sae.config.dead_tokens * streams:,} tokens"
        )
    lines.append(
        f"  data {data}; windows of {cfg.context_length} tokens; excluded ids {saes[0].config.excluded_token_ids}; "
        f"shuffle buffer {cfg.buffer_size:,} activations"
    )
    return "\n".join(lines)


@torch.no_grad()
def step_metrics(
    saes: list[SAEPreTrainedModel],
    specs: list[SAESpec],
    inputs: list[Tensor],
    outputs: list[SAEOutput],
    tokens_per_second: float,
    learning_rates: list[float],
) -> dict[str, dict[str, float]]:
    """Per-SAE training metrics of the current batch (one host sync, only on logging steps)."""
    logs = {}
    for sae, spec, x, out, lr in zip(saes, specs, inputs, outputs, learning_rates):
        logs[spec.name] = {
            "loss": float(out.loss),
            "reconstruction_loss": float(out.losses["reconstruction"]),
            "auxk_loss": float(out.losses["auxk"]) if "auxk" in out.losses else 0.0,
            "fvu": sae_metrics.fvu(x, out.reconstruction.float()),
            "l0": sae_metrics.l0(out.latents.values),
            "dead_fraction": float(sae.dead_mask().float().mean()),
            "lr": lr,
            "tokens_per_second": tokens_per_second,
        }
    return logs


def progress_text(logs: dict[str, dict[str, float]]) -> str:
    """The progress bar's postfix: the first SAE's numbers."""
    first = next(iter(logs.values()))
    return (
        f"tok/s {first['tokens_per_second']:,.0f} loss {first['loss']:.4f} fvu {first['fvu']:.3f} "
        f"l0 {first['l0']:.1f} dead {100 * first['dead_fraction']:.1f}%"
    )


def flat_config(cfg: TrainConfig) -> dict[str, Any]:
    """Tracker-friendly config (scalars only)."""
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in cfg.to_dict().items()}


def summary_table(metrics: RunMetrics, run_dir: Path, kept: bool = False) -> str:
    """The table printed at the end: EV / FVU / L0 / shrinkage per budget, dead latents and LM loss per SAE
    (``kept``: the metrics of an earlier finish of this run, not measured again)."""
    run = metrics["run"]
    speed = f"{run['tokens_per_second']:,.0f} tokens/s" if run.get("tokens_per_second") else "speed not measured"
    if run.get("session_tokens_per_second"):
        speed += f"; this session, from step {run['resumed_at_step']}: {run['session_tokens_per_second']:,.0f}"
    note = " (it had finished: its metrics are kept)" if kept else ""
    lines = [
        "",
        f"== hf-sae training summary: {run_dir}{note} ==",
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
    return "\n".join(lines)
