"""The end of a run (main process): fold the activation scale, save every SAE, evaluate on held-out windows, and
write metrics.json, the plot and each SAE's model card.

A run is finished once; resuming a finished run (to redo a plot or a card a kill interrupted) keeps its metrics.json
and command.txt (written by the first session) as they are. A run resumed midway reports its whole training time and
tokens/s (all sessions) and, beside them, this session's own tokens/s and where it began.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from hf_sae._io import write_bytes_atomic, write_text_atomic
from hf_sae.cards import generate_model_card
from hf_sae.latent_stats import DENSITY_PLOT, STATS_FILE, FeatureStats
from hf_sae.run_files import METRICS_FILE, RunInfo, RunMetrics, SAEMetrics, read_command, write_run_metrics

from .config import EMBEDDED
from .data import TokenWindows, data_files
from .evaluate import collect_eval_data, held_out_feature_stats, lm_loss_metrics, reconstruction_metrics
from .plots import plot_budget_curves
from .report import summary_table
from .run import Run
from .run_folder import training_command
from .small_gemma import QUANTIZED_FROM


def finished_metrics(run_dir: Path) -> dict[str, Any] | None:
    """metrics.json of an earlier finish of this run (kept), or None."""
    path = Path(run_dir) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def finish_run(run: Run) -> RunMetrics:
    """Fold, save, evaluate, write metrics/plot/cards, print the summary; returns the metrics."""
    cfg, started = run.cfg, time.perf_counter()
    tokens = run.total_steps * run.tokens_per_step
    kept = finished_metrics(run.run_dir)
    # dead after dead_tokens tokens, by the training counters (read before the config gets the global threshold)
    dead_fractions = [float(sae.dead_mask().float().mean()) for sae in run.saes]
    folders = {}
    for spec, sae, dead_tokens in zip(run.specs, run.saes, run.dead_tokens):
        sae.eval()
        sae.check_finite = True
        sae.config.dead_tokens = dead_tokens
        sae.config.tokens_trained = tokens
        sae.fold_activation_scale()
        folders[spec.name] = run.run_dir if len(run.specs) == 1 else run.run_dir / spec.name
        if kept is None:  # (a finished run's SAEs were saved before its metrics)
            sae.save_pretrained(folders[spec.name])  # keeps the folder's other files (checkpoints, metrics)
        elif (Path(folders[spec.name]) / STATS_FILE).is_file():
            sae.feature_stats = FeatureStats.load(folders[spec.name])
    metrics = kept if kept is not None else _evaluate(run, folders, dead_fractions, started)
    if kept is None:
        write_run_metrics(run.run_dir, metrics)
    results = metrics["saes"]
    if cfg.plot:
        plot = plot_budget_curves(
            results, run.run_dir / "budget_curves.png", title=f"{metrics['run']['model']} — {tokens:,} tokens"
        )
        for folder in folders.values():  # each SAE folder of a multi-SAE run gets the figure for its card
            if folder != run.run_dir:
                write_bytes_atomic(Path(folder) / plot.name, plot.read_bytes())
    if cfg.model_card:
        for spec, sae in zip(run.specs, run.saes):
            card_metrics = {"run": metrics["run"], **results[spec.name]}
            density = DENSITY_PLOT if (Path(folders[spec.name]) / DENSITY_PLOT).is_file() else None
            card = generate_model_card(sae, metrics=card_metrics, run_dir=folders[spec.name], density_plot=density)
            write_text_atomic(Path(folders[spec.name]) / "README.md", str(card))
    print(summary_table(metrics, run.run_dir, kept=kept is not None), flush=True)
    return metrics


def _evaluate(run: Run, folders: dict[str, Path], dead_fractions: list[float], started: float) -> RunMetrics:
    """The run's metrics: what was trained on what and how fast, and each SAE's held-out evaluation."""
    cfg, tokens = run.cfg, run.total_steps * run.tokens_per_step
    eval_windows = TokenWindows(
        run.eval_data,
        run.tokenizer,
        cfg.context_length,
        cfg.text_column,
        loop=False,
        name=f"{cfg.dataset} (held out)",
        files=data_files(cfg.dataset),
    )
    activations, lm_batches = collect_eval_data(
        run.harvester, eval_windows, cfg.eval_tokens, cfg.eval_lm_windows, cfg.lm_batch_size, progress=True
    )
    info: RunInfo = {
        "model": run.model_name,
        "dataset": run.data_name,
        "tokens": tokens,
        "steps": run.total_steps,
        "batch_size": cfg.batch_size,
        "processes": run.world,
        "device": str(run.accelerator.device),
        "setup_seconds": round(run.setup_seconds, 1),
        "train_seconds": round(run.trainer_state["seconds"], 1),
        "tokens_per_second": round(tokens / run.trainer_state["seconds"], 1) if run.trainer_state["seconds"] else None,
        "skipped_steps": run.trainer_state["skipped_steps"],
        "dead_tokens": run.dead_tokens[0] if len(set(run.dead_tokens)) == 1 else run.dead_tokens,
        "context_length": cfg.context_length,
        "excluded_token_ids": run.excluded,
        "eval_lm_windows": cfg.eval_lm_windows,
        "command": read_command(run.run_dir) or training_command(),  # the first session's
    }
    if cfg.model == EMBEDDED:
        info["quantized_from"] = QUANTIZED_FROM
    if run.start_step:  # a resumed session: its own speed, beside the whole run's
        info["resumed_at_step"] = run.start_step
        info["session_tokens_per_second"] = round(run.session_tokens / max(run.session_seconds, 1e-9), 1)
    results: dict[str, SAEMetrics] = {}
    clean_loss = None  # the same held-out windows and excluded ids for every SAE: one clean LM loss for all
    for spec, site, sae, dead in zip(run.specs, run.sites, run.saes, dead_fractions):
        result: SAEMetrics = {
            "path": str(folders[spec.name]),
            "layer": spec.layer,
            "site": spec.site,
            "arch": spec.arch,
            "d_sae": sae.config.d_sae,
            "k": sae.config.k,
            "activation_scale": sae.config.activation_scale,
            "dead_fraction": dead,
        }
        stats = held_out_feature_stats(sae, f"{activations[site.key].shape[0]:,} held-out tokens of {run.data_name}")
        result.update(reconstruction_metrics(sae, activations[site.key], progress=True, stats=stats))
        sae.feature_stats = stats.result()  # beside the weights, for steering units and the card's histogram
        sae.feature_stats.save(folders[spec.name])
        sae.feature_stats.plot_density(Path(folders[spec.name]) / DENSITY_PLOT)
        lm_loss = lm_loss_metrics(run.model, sae, lm_batches, run.excluded, clean_loss=clean_loss, progress=True)
        clean_loss = lm_loss["clean_loss"] if lm_loss is not None else None
        result["lm_loss"] = lm_loss
        results[spec.name] = result
    info["evaluation_seconds"] = round(time.perf_counter() - started, 1)
    return {"run": info, "saes": results}
