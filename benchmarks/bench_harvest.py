"""Harvest benchmark on the real small model (Gemma 3 270M, 18 layers), CPU; prints ratio tables from one run.

1. Early-stopped forward (training/harvest.py via hf_sae.sites.capture_activations: stops after layer L, no LM head)
   against the full forward at layer L: the whole layer stack without the head (``model.model``), and the usual
   ``model(...)`` with its 262k-vocabulary LM head. Target: speed-up >= 0.8 x n_layers / (L + 1).
2. End-to-end tokens/s of the default run (``python -m training.train`` with fewer tokens), with its two halves
   measured alone on the same data: harvesting into the shuffle buffer, and SAE steps on buffered activations.

    python benchmarks/bench_harvest.py                   # layers 2, 5, 8, 11; fp32; ~3 min on 2 cores
    python benchmarks/bench_harvest.py --layers 5 --dtype bfloat16 --repeats 5 --e2e-tokens 65536
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hf_sae import training_step
from hf_sae.registry import resolve_architecture
from hf_sae.sites import capture_activations, num_layers, resolve_site
from training.cli import parse_args
from training.config import make_config
from training.data import TokenWindows, dataset_factories, excluded_token_ids
from training.harvest import ActivationBuffer, ActivationHarvester
from training.language_model import load_language_model, resolve_layers
from training.saes import learning_rate
from training.small_gemma import load_small_gemma
from training.train import train


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def bench_early_stop(layers: list[int], dtype: torch.dtype, batch: int, context: int, repeats: int) -> None:
    model, tokenizer = load_small_gemma(dtype=dtype)
    n = num_layers(model)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 50_000, (batch, context), generator=generator)
    input_ids[:, 0] = tokenizer.bos_token_id
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "use_cache": False}
    full_stack = median_time(lambda: model.model(**inputs), repeats)
    full_head = median_time(lambda: model(**inputs), repeats)
    tokens = batch * context
    print(
        f"\n## Early-stopped harvest vs full forward — Gemma 3 270M ({n} layers), {dtype}, {batch}x{context} tokens, "
        f"{torch.get_num_threads()} threads, median of {repeats}"
    )
    print(f"full layer stack (no LM head): {1000 * full_stack:8.1f} ms  ({tokens / full_stack:,.0f} tok/s)")
    print(f"full forward with LM head    : {1000 * full_head:8.1f} ms  ({tokens / full_head:,.0f} tok/s)")
    print("| layer L | early stop ms | tok/s | speed-up vs stack | vs stack+head | target 0.8·n/(L+1) | ok |")
    print("|---:|---:|---:|---:|---:|---:|:--:|")
    for layer in layers:
        site = resolve_site(model, layer, "resid")
        early = median_time(lambda site=site: capture_activations(model, [site], **inputs), repeats)
        target = 0.8 * n / (layer + 1)
        ratio = full_stack / early
        print(
            f"| {layer} | {1000 * early:.1f} | {tokens / early:,.0f} | {ratio:.2f}x | {full_head / early:.2f}x | "
            f"{target:.2f}x | {'yes' if ratio >= target else 'NO'} |"
        )


def bench_end_to_end(tokens: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cfg, explicit = parse_args(
            [
                "--tokens",
                str(tokens),
                "--out",
                str(out),
                "--eval-tokens",
                "4096",
                "--eval-lm-windows",
                "0",
                "--no-plot",
                "--no-model-card",
                "--checkpoint-every",
                "0",
            ]
        )
        start = time.perf_counter()
        metrics = train(cfg, explicit)
        wall = time.perf_counter() - start
    run = metrics["run"]

    # The two halves alone, on the same model, data and sizes: the default run's one SAE (at the middle layer).
    defaults = make_config()
    model, tokenizer = load_language_model(defaults, torch.device("cpu"))
    (spec,) = resolve_layers(defaults, model)
    site = resolve_site(model, spec.layer, spec.site)
    train_data, _ = dataset_factories(defaults, 0, 1)
    windows = TokenWindows(train_data, tokenizer, defaults.context_length)
    harvester = ActivationHarvester(model, [site], excluded_token_ids(defaults, tokenizer))
    buffer = ActivationBuffer(
        windows,
        harvester,
        defaults.buffer_size,
        defaults.batch_size,
        defaults.lm_batch_size,
        torch.float32,
        torch.device("cpu"),
    )
    start = time.perf_counter()
    buffer.peek(1)
    harvest_tps = buffer.rows / (time.perf_counter() - start)
    architecture, _ = resolve_architecture(spec.arch)
    sae = architecture.model_class(spec.build_config(d_in=site.width, dead_tokens=10**9))
    optimizer = torch.optim.AdamW(sae.parameters(), lr=learning_rate(spec, sae))
    batches = [buffer.next_batch()[site.key] for _ in range(4)]
    training_step(sae, optimizer, batches[0])
    start = time.perf_counter()
    for x in batches:
        training_step(sae, optimizer, x, max_grad_norm=1.0)
    sae_tps = len(batches) * defaults.batch_size / (time.perf_counter() - start)
    both = 1 / (1 / harvest_tps + 1 / sae_tps)
    print(
        f"\n## End to end: the default run (layer {spec.layer} {spec.site}, d_sae {sae.config.d_sae}, "
        f"k {sae.config.k}, batch {defaults.batch_size}), {run['tokens']:,} tokens"
    )
    print("| part | tokens/s | ratio to end-to-end |")
    print("|---|---:|---:|")
    e2e = run["tokens_per_second"]
    print(f"| end-to-end training loop (python -m training.train) | {e2e:,.0f} | 1.00 |")
    print(f"| harvest into the shuffle buffer alone | {harvest_tps:,.0f} | {harvest_tps / e2e:.2f} |")
    print(f"| SAE steps on buffered activations alone | {sae_tps:,.0f} | {sae_tps / e2e:.2f} |")
    print(f"| the two in series (1 / (1/h + 1/s)) | {both:,.0f} | {both / e2e:.2f} |")
    print(f"whole command incl. model load, evaluation and saving: {wall:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="*", default=[2, 5, 8, 11])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--e2e-tokens", type=int, default=2 * 65536, help="0 skips the end-to-end part")
    args = parser.parse_args()
    bench_early_stop(args.layers, getattr(torch, args.dtype), args.batch, args.context, args.repeats)
    if args.e2e_tokens:
        bench_end_to_end(args.e2e_tokens)


if __name__ == "__main__":
    main()
