"""Training from an activation cache vs the bare SAE step: is the cache reader free?

The bare step trains on float32 batches already in RAM (the floor of a training step: nothing but the SAE); the
cache step draws its batch from :class:`training.activation_cache.CachedActivations` over a cache on disk
(memory-mapped Arrow shards, bfloat16), converts it to float32 as ``train.py`` does, then takes the same step. Both
train the same SAE with the same optimiser, alternating step by step (so load drift on a shared machine cancels); a
round is ``buffer / batch`` steps of each, so each round holds one of the reader's refills (a window of
``--buffer-size`` rows gathered from the shards). The target (issue 12): cache tokens/s >= 0.90 x bare tokens/s.

    python benchmarks/bench_activation_cache.py                   # TopK and HierarchicalTopK, d_in 640, d_sae 4096
    python benchmarks/bench_activation_cache.py --quick           # TopK only, fewer rounds
    python benchmarks/bench_activation_cache.py --d-in 2304 --d-sae 16384 --k 64 --batch 2048

The cache is written once into a temporary folder (``--rows`` rows; it is in the page cache afterwards, as a cache
being trained on for several epochs is). The last column is the reader alone (next_batch + float()), without a step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # training/ is not installed: use this checkout

from hf_sae import training_step  # noqa: E402
from hf_sae.hardware import retain_freed_memory, use_huge_pages  # noqa: E402
from hf_sae.registry import resolve_architecture  # noqa: E402
from training.activation_cache import ActivationCache, CachedActivations, write_synthetic_cache  # noqa: E402

KEY = (6, "resid")


def make_cache(folder: Path, rows: int, d_in: int) -> Path:
    """A bf16 cache of ``rows`` random activations with a mean offset (like a residual stream), 4 shards."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d_in, generator=generator) + 0.5 * torch.randn(d_in, generator=generator)
    return write_synthetic_cache(folder, {KEY: x.to(torch.bfloat16)}, "bfloat16", rows_per_shard=-(-rows // 4))


def bench(arch: str, cache: Path, args) -> dict[str, float]:
    torch.manual_seed(0)
    architecture, preset = resolve_architecture(arch)
    sae = architecture.model_class(architecture.build_config(preset, d_in=args.d_in, d_sae=args.d_sae, k=args.k))
    sae.train()
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4)
    reader = CachedActivations(
        ActivationCache(cache), [KEY], buffer_size=args.buffer, batch_size=args.batch, prefetch=args.prefetch
    )
    pool = [reader.peek(args.batch * 4)[KEY][i * args.batch : (i + 1) * args.batch].float() for i in range(4)]

    def bare_step(i: int) -> None:
        training_step(sae, optimizer, pool[i % len(pool)])

    def cache_step(i: int) -> None:
        training_step(sae, optimizer, reader.next_batch()[KEY].float())

    for i in range(2):  # warm-up (kernels, allocator, the first window)
        bare_step(i)
        cache_step(i)
    steps = args.buffer // args.batch  # a round: one window of the reader, so each round has one refill
    bare, cached = [], []
    for _ in range(args.rounds):
        times = {bare_step: 0.0, cache_step: 0.0}
        for i in range(steps):  # step by step, alternating (and which goes first alternates too)
            for fn in (bare_step, cache_step) if i % 2 == 0 else (cache_step, bare_step):
                start = time.perf_counter()
                fn(i)
                times[fn] += time.perf_counter() - start
        bare.append(times[bare_step] / steps)
        cached.append(times[cache_step] / steps)
    # the reader alone (the same refill cadence, no SAE step)
    start, n = time.perf_counter(), 4 * args.buffer // args.batch
    for _ in range(n):
        reader.next_batch()[KEY].float()
    reader_alone = (time.perf_counter() - start) / n
    reader.close()
    ratios = [b / c for b, c in zip(bare, cached)]
    return {
        "bare": args.batch / statistics.median(bare),
        "cache": args.batch / statistics.median(cached),
        "median_ratio": statistics.median(ratios),
        "overall_ratio": sum(bare) / sum(cached),
        "reader": args.batch / reader_alone,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="TopK only, 2 rounds")
    parser.add_argument("--arch", nargs="+", default=["topk", "hierarchical"])
    parser.add_argument("--d-in", type=int, default=640)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--buffer", type=int, default=65536, help="rows per reader window (--buffer-size)")
    parser.add_argument("--rows", type=int, default=2**18, help="rows in the cache (4 shards)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of buffer / batch steps of each kind")
    parser.add_argument("--prefetch", action="store_true", help="gather the next window in a background thread")
    args = parser.parse_args()
    use_huge_pages()  # as python -m training.train does on CPU
    retain_freed_memory()
    if args.quick:
        args.arch, args.rounds = ["topk"], 2
    with tempfile.TemporaryDirectory(prefix="bench-activation-cache-") as tmp:
        started = time.perf_counter()
        cache = make_cache(Path(tmp) / "cache", args.rows, args.d_in)
        size = sum(p.stat().st_size for p in cache.glob("*.arrow")) / 2**20
        print(
            f"cache: {args.rows:,} rows x {args.d_in} bf16 ({size:.0f} MiB, written in "
            f"{time.perf_counter() - started:.1f} s); d_sae {args.d_sae}, k {args.k}, batch {args.batch}, fp32 "
            f"step, window {args.buffer:,} rows, prefetch {'on' if args.prefetch else 'off'}, "
            f"{torch.get_num_threads()} threads; {args.rounds} rounds x {args.buffer // args.batch} steps of each, "
            "alternating step by step"
        )
        print(
            "\n| arch | bare step tok/s | step from cache tok/s | cache / bare (median) | (overall) "
            "| reader alone tok/s |"
        )
        print("|---|---|---|---|---|---|")
        for arch in args.arch:
            r = bench(arch, cache, args)
            print(
                f"| {arch} | {r['bare']:,.0f} | {r['cache']:,.0f} | {r['median_ratio']:.3f} | "
                f"{r['overall_ratio']:.3f} | {r['reader']:,.0f} |"
            )
        print("\ntarget: cache / bare >= 0.90")


if __name__ == "__main__":
    main()
