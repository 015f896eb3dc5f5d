"""End to end: the default run's training tokens/s against what its two halves allow, each measured alone.

Three numbers, on this machine, in one run:

1. **harvest alone**: tokens/s of the default run's harvest into its shuffle buffer (the real Gemma 3 270M, the
   real corpus, the run's layer / dtype / LM batch / context / buffer size), no SAE;
2. **SAE step alone**: tokens/s of the default SAE's :func:`hf_sae.training_step` (with the run's optimiser and
   clipping) on activations already in memory;
3. **the run**: ``python -m training.train`` with its defaults (``--tokens`` to shorten it), its training
   tokens/s from ``metrics.json`` (training time includes harvesting), and the whole command's wall time.

The halves run one after the other in the run, so together they allow 1 / (1/harvest + 1/step) tokens/s; the
target is run / allowed >= 0.70, and, for the default ``--tokens``, the whole command within 10 minutes. The
halves are measured before and after the run and the medians used, so load drift on a shared machine is shared.

    python benchmarks/bench_end_to_end.py                 # the default run itself (~10 min)
    python benchmarks/bench_end_to_end.py --tokens 262144 # a shorter run with the same settings
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # training/ is not installed: use this checkout

from hf_sae import training_step  # noqa: E402
from hf_sae.hardware import retain_freed_memory, use_huge_pages  # noqa: E402
from hf_sae.sites import resolve_site  # noqa: E402
from training.config import make_config  # noqa: E402
from training.data import dataset_factories, excluded_token_ids, training_windows  # noqa: E402
from training.harvest import ActivationBuffer, ActivationHarvester  # noqa: E402
from training.language_model import load_language_model, resolve_layers  # noqa: E402
from training.saes import activation_scale, build_optimizer, build_sae, default_dead_tokens  # noqa: E402


def harvest_alone(cfg, model, tokenizer, site, rounds: int) -> tuple[float, torch.Tensor]:
    """Tokens/s of filling the run's buffer (``rounds`` fills of ``buffer_size`` activations), and a batch pool."""
    train_data, _ = dataset_factories(cfg, 0, 1)
    windows = training_windows(cfg, tokenizer, train_data, 0, activations=rounds * cfg.buffer_size)
    harvester = ActivationHarvester(model, [site], excluded_token_ids(cfg, tokenizer))
    buffer = ActivationBuffer(
        windows, harvester, cfg.buffer_size, cfg.batch_size, cfg.lm_batch_size, model.dtype, torch.device("cpu")
    )
    start, tokens = time.perf_counter(), 0
    batches = []
    for _ in range(rounds):
        before = windows.windows
        for _ in range(cfg.buffer_size // cfg.batch_size):
            batches.append(buffer.next_batch(torch.device("cpu"))[site.key].float())
        tokens += (windows.windows - before) * cfg.context_length
    return tokens / (time.perf_counter() - start), torch.stack(batches[: max(2, len(batches) // rounds)])


def step_alone(cfg, model, site, pool: torch.Tensor, steps: int) -> float:
    """Tokens/s (activations/s) of the default SAE's training step on in-memory activations."""
    (spec,) = resolve_layers(cfg, model)
    x = pool[0]
    scale = activation_scale(x, None)
    provenance = {"base_model": "bench", "context_length": cfg.context_length, "excluded_token_ids": [], "dataset": ""}
    dead = default_dead_tokens(cfg.tokens, cfg.batch_size)
    sae = build_sae(cfg, spec, site, scale, dead, provenance, x, torch.device("cpu"))
    sae.train()
    sae.check_finite = False
    optimizer, scheduler = build_optimizer(cfg, [sae], [spec], steps + 2)
    inputs = list(pool)  # raw activations: the SAE scales its input itself while training, as in the run
    for i in range(2):
        training_step(sae, optimizer, inputs[i % len(inputs)], scheduler=scheduler, max_grad_norm=cfg.max_grad_norm)
    start = time.perf_counter()
    for i in range(steps):
        training_step(sae, optimizer, inputs[i % len(inputs)], scheduler=scheduler, max_grad_norm=cfg.max_grad_norm)
    return steps * cfg.batch_size / (time.perf_counter() - start)


def the_run(tokens: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [sys.executable, "-m", "training.train", "--out", str(out)]
        if tokens:
            command += ["--tokens", str(tokens)]
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        metrics = json.loads((out / "metrics.json").read_text())
    return {"wall": wall, **metrics["run"]}  # hf_sae.run_files.RunInfo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=None, help="training tokens of the run (default: the default's)")
    parser.add_argument("--harvest-rounds", type=int, default=2, help="buffer fills per harvest measurement")
    parser.add_argument("--steps", type=int, default=10, help="SAE steps per step measurement")
    args = parser.parse_args()
    use_huge_pages()
    retain_freed_memory()  # both halves in the process state of the run, which sets it before loading the LM
    cfg = make_config({"tokens": args.tokens} if args.tokens else {})
    model, tokenizer = load_language_model(cfg, torch.device("cpu"))
    (spec,) = resolve_layers(cfg, model)
    site = resolve_site(model, spec.layer, spec.site)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; default run: {cfg.tokens:,} tokens, "
          f"layer {spec.layer} {spec.site}, LM {model.dtype}, lm batch {cfg.lm_batch_size} x {cfg.context_length}, "
          f"SAE batch {cfg.batch_size}, buffer {cfg.buffer_size:,}")  # fmt: skip

    harvest, step = [], []
    h, pool = harvest_alone(cfg, model, tokenizer, site, args.harvest_rounds)
    harvest.append(h)
    step.append(step_alone(cfg, model, site, pool, args.steps))
    print(f"before the run: harvest {harvest[-1]:,.0f} tokens/s, step {step[-1]:,.0f} tokens/s", flush=True)
    run = the_run(args.tokens)
    h, pool = harvest_alone(cfg, model, tokenizer, site, args.harvest_rounds)
    harvest.append(h)
    step.append(step_alone(cfg, model, site, pool, args.steps))

    h, s = statistics.median(harvest), statistics.median(step)
    allowed = 1.0 / (1.0 / h + 1.0 / s)
    achieved = run["tokens_per_second"]
    print("\n| measurement | tokens/s | ratio |")
    print("|---|---:|---:|")
    print(f"| harvest alone (median of {len(harvest)}) | {h:,.0f} | |")
    print(f"| SAE step alone (median of {len(step)}) | {s:,.0f} | |")
    print(f"| allowed: 1 / (1/harvest + 1/step) | {allowed:,.0f} | 1.00 (floor) |")
    print(f"| the run's training | {achieved:,.0f} | {achieved / allowed:.3f} (target >= 0.70) |")
    tokens = run.get("tokens", cfg.tokens)
    print(
        f"\nrun: {tokens:,} tokens; whole command {run['wall']:.0f} s (target <= 600 s at >= 1.5M tokens): "
        f"setup {run.get('setup_seconds')} s, training {run.get('train_seconds')} s, "
        f"evaluation {run.get('evaluation_seconds')} s"
    )


if __name__ == "__main__":
    main()
