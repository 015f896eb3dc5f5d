"""Feature-dashboard benchmark: the one pass and the site for a 16k-latent SAE over 100k tokens, on random weights.

    python benchmarks/bench_dashboard.py                      # d_sae 16,384, 100k tokens, d_in 640, vocab 262,144
    python benchmarks/bench_dashboard.py --tokens 20000 --d-sae 4096 --vocab 32768 --repeats 2   # a quick look

The language model is left out (its forward costs the same with or without a dashboard; see bench_harvest.py):
synthetic activations x ~ N(0, 1) of width --d-in go, in batches of 8 windows of 128 tokens as
``build_dashboard`` feeds them, through a random HierarchicalSAE (k = --k). Stages, run interleaved (A, B, C, D, A,
B, ...) --repeats times, medians reported:

A. ``sae.encode`` alone over all batches (the floor of the pass);
B. ``sae.encode`` + ``FeatureActivationCollector.update`` (the pass as build_dashboard runs it: running top-10
   contexts, histograms, counts, fired pairs), then ``result()``;
C. ``write_dashboard`` after the pass with float32 logit effects: W_U · (g ⊙ W_dec) for every fired latent against a
   Gemma-3-sized unembedding (a one-layer Gemma 3 with hidden --d-in and --vocab tokens), the pages and the files;
D. the same with bfloat16 ranking and float32 re-scoring of the logit candidates.

The last column is the stage's time over stage A. Print the machine's load with the figures (uptime).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from hf_sae import HierarchicalSAE, HierarchicalSAEConfig
from hf_sae.dashboard import write_dashboard
from hf_sae.dashboard_collect import FeatureActivationCollector
from hf_sae.testing.tiny_models import tiny_gemma3

WINDOW, WINDOWS_PER_BATCH = 128, 8


def batches(args: argparse.Namespace):
    """(x (B·T, d_in), global token ids, window ids) per batch, the same numbers every run (seeded)."""
    generator = torch.Generator().manual_seed(0)
    rows = WINDOW * WINDOWS_PER_BATCH
    for start in range(0, args.tokens, rows):
        n = min(rows, args.tokens - start)
        tokens = torch.arange(start, start + n)
        yield torch.randn(n, args.d_in, generator=generator), tokens, tokens // WINDOW


def encode_only(sae, data) -> None:
    for x, _, _ in data:
        sae.encode(x)


def encode_and_collect(sae, data):
    collector = FeatureActivationCollector(sae.config.d_sae, n_examples=10, bins=32)
    for x, tokens, windows in data:
        latents = sae.encode(x)
        collector.update(latents.values, latents.indices, tokens, windows)
    return collector.result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-sae", type=int, default=16384)
    parser.add_argument("--d-in", type=int, default=640)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--vocab", type=int, default=262_144)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sae = HierarchicalSAE(
        HierarchicalSAEConfig(d_in=args.d_in, d_sae=args.d_sae, k=args.k, hook_layer=0, hook_site="resid")
    ).eval()
    model = tiny_gemma3(
        seed=0, hidden_size=args.d_in, vocab_size=args.vocab, num_hidden_layers=1, intermediate_size=args.d_in
    )
    data = list(batches(args))
    generator = torch.Generator().manual_seed(1)
    windows = [torch.randint(3, args.vocab, (len(w),), generator=generator).tolist() for w in _window_sizes(args)]
    times: dict[str, list[float]] = {name: [] for name in "ABCD"}
    pages = 0
    with torch.no_grad(), tempfile.TemporaryDirectory() as scratch:
        for repeat in range(args.repeats):
            start = time.perf_counter()
            encode_only(sae, data)
            times["A"].append(time.perf_counter() - start)
            start = time.perf_counter()
            result = encode_and_collect(sae, data)
            times["B"].append(time.perf_counter() - start)
            for name, dtype in (("C", torch.float32), ("D", torch.bfloat16)):
                start = time.perf_counter()
                dashboard = write_dashboard(
                    model, sae, result, windows, os.path.join(scratch, f"{name}{repeat}"), logit_dtype=dtype
                )
                times[name].append(time.perf_counter() - start)
                pages = int(dashboard.logits.features.numel())
    labels = {
        "A": "pass: sae.encode only",
        "B": "pass: encode + collector (build_dashboard's)",
        "C": "site: logits fp32 + pages + files",
        "D": "site: logits bf16/fp32 rescoring + pages + files",
    }
    floor = statistics.median(times["A"])
    print(
        f"d_sae {args.d_sae:,}, d_in {args.d_in}, k {args.k}, {args.tokens:,} tokens, vocab {args.vocab:,}, "
        f"{pages:,} feature pages, {torch.get_num_threads()} threads, {args.repeats} interleaved repeats; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"{'stage':<52} {'median s':>9} {'min s':>8} {'tokens/s':>10} {'x A':>6}")
    for name, label in labels.items():
        median = statistics.median(times[name])
        rate = f"{args.tokens / median:,.0f}" if name in "AB" else "-"
        print(f"{name}. {label:<49} {median:>9.2f} {min(times[name]):>8.2f} {rate:>10} {median / floor:>6.2f}")
    total_fp32 = statistics.median(times["B"]) + statistics.median(times["C"])
    total_bf16 = statistics.median(times["B"]) + statistics.median(times["D"])
    print(f"whole dashboard without the LM forward: {total_fp32:.1f} s (fp32 logits), {total_bf16:.1f} s (bf16)")


def _window_sizes(args: argparse.Namespace) -> list[range]:
    return [range(start, min(start + WINDOW, args.tokens)) for start in range(0, args.tokens, WINDOW)]


if __name__ == "__main__":
    main()
