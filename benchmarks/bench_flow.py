"""Feature-flow benchmark: blockwise top-1 matching vs the bare matmul of the same shape, and whole-model tables.

    python benchmarks/bench_flow.py                          # 65,536 x 65,536 latents, d_in 2304 (~20 TFLOP per run)
    python benchmarks/bench_flow.py --d-sae 16384            # a size that takes ~1 min on 2 CPU cores
    python benchmarks/bench_flow.py --collection PATH_OR_REPO  # + predecessor tables of every layer of a collection
    python benchmarks/bench_flow.py --random-collection --skip-matching   # the same timing on random stand-in SAEs

Part 1 matches two SAEs with random unit decoders (F = --d-sae latents each, width --d-in) and compares it with the
bare matmul E_A E_Bᵀ. That product is F x F floats (16 GiB at F = 65,536), so the reference is computed blockwise too:
the same block pairs and the same FLOPs, timing only the ``torch.mm`` calls (the sum of the block matmul times), with
no normalisation and no top-k. Each measurement runs in a fresh subprocess; on CPU its peak memory is
``ru_maxrss`` after the timed part minus the resident size just before it (decoders already built in place), on CUDA
``torch.cuda.max_memory_allocated`` minus the memory allocated before. Targets: time <= 1.3x the bare matmul, peak
<= 1 GiB at the default block size (4096).

Part 2 (only with --collection, which needs trained SAEs: a folder or Hub repo with layer_{L}/{site} subfolders)
times ``FeatureFlow.summary()`` over every resid layer, cold (no match cache) and warm (from the disk cache), and
prints the per-layer class table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

from hf_sae import HierarchicalSAE, HierarchicalSAEConfig
from hf_sae.flow import FLOW_SITES, FeatureFlow
from hf_sae.flow.matching import match_decoders


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(0)

    def unit_decoder() -> torch.Tensor:  # built in place: no temporary as large as the decoder
        weight = torch.empty(args.d_sae, args.d_in, device=device)
        weight.normal_(generator=generator)
        return weight.div_(weight.norm(dim=1, keepdim=True))

    a, b = unit_decoder(), unit_decoder()
    block = args.block_size
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _current_rss_bytes()
    if args.worker == "match":
        start = time.perf_counter()
        scores, indices = match_decoders(a, b, 1, block_size=block, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        extra = {"mean_top1": float(scores.mean())}
    else:
        buffer = torch.empty(min(block, args.d_sae), min(block, args.d_sae), device=device)
        seconds = 0.0
        for b0 in range(0, args.d_sae, block):
            for a0 in range(0, args.d_sae, block):
                lhs, rhs = a[a0 : a0 + block], b[b0 : b0 + block]
                out = buffer[: lhs.shape[0], : rhs.shape[0]]
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                torch.mm(lhs, rhs.t(), out=out)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds += time.perf_counter() - start
        extra = {}
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    print(json.dumps({"seconds": seconds, "peak_bytes": peak, "threads": torch.get_num_threads(), **extra}))


def _run_worker(kind: str, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--d-sae",
        str(args.d_sae),
        "--d-in",
        str(args.d_in),
        "--block-size",
        str(args.block_size),
        "--device",
        args.device,
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _matching_table(args: argparse.Namespace) -> None:
    flops = 2 * args.d_sae * args.d_sae * args.d_in
    print(
        f"Matching two SAEs of {args.d_sae:,} random unit decoder rows, d_in = {args.d_in}, "
        f"block = {args.block_size}, device = {args.device} ({flops / 1e12:.2f} TFLOP each way)"
    )
    runs = {"matmul": [], "match": []}
    for _ in range(args.repeats):  # alternate, so a busy neighbour slows both alike; keep each one's fastest run
        for kind in runs:
            runs[kind].append(_run_worker(kind, args))
    reference = min(runs["matmul"], key=lambda row: row["seconds"])
    match = min(runs["match"], key=lambda row: row["seconds"])
    for row, kind in ((reference, "matmul"), (match, "match")):
        row["peak_bytes"] = max(r["peak_bytes"] for r in runs[kind])
    gib = 2**30
    rows = [
        ("bare matmul E_A E_B^T (blockwise*)", reference),
        ("match_decoders, top-1 (blocked)", match),
    ]
    print(f"best of {args.repeats} alternating runs each (fresh subprocesses); peak = the largest of the runs")
    print(f"{'':36} {'seconds':>9} {'TFLOP/s':>8} {'peak GiB':>9} {'vs matmul':>10}")
    for name, row in rows:
        ratio = row["seconds"] / reference["seconds"]
        print(
            f"{name:36} {row['seconds']:>9.2f} {flops / row['seconds'] / 1e12:>8.3f} "
            f"{row['peak_bytes'] / gib:>9.3f} {ratio:>9.2f}x"
        )
    print(
        f"* the full {args.d_sae:,}^2 product is {args.d_sae**2 * 4 / gib:.1f} GiB of float32, so the reference runs "
        "the same block pairs and sums the torch.mm times only (same FLOPs, no normalisation or top-k)."
    )
    print(
        f"threads: {match['threads']}; targets: <= 1.3x the matmul, <= 1 GiB peak. Time grows as d_sae^2: at "
        f"65,536 latents expect about {match['seconds'] * (65536 / args.d_sae) ** 2:.0f} s on this machine "
        f"(extrapolated from this run)."
        if args.d_sae != 65536
        else f"threads: {match['threads']}"
    )


def _random_collection(folder: str, args: argparse.Namespace) -> str:
    """A stand-in collection with the real small model's shape (Gemma 3 270M: 18 layers, d_model 640) and random
    unit decoders: the timing of the whole-model tables does not depend on training; the classes mean nothing."""
    generator = torch.Generator().manual_seed(0)
    for layer in range(18):
        for site in FLOW_SITES:
            cfg = HierarchicalSAEConfig(
                d_in=640,
                d_sae=args.collection_d_sae,
                k=32,
                hook_layer=layer,
                hook_site=site,
                base_model="google/gemma-3-270m",
            )
            sae = HierarchicalSAE(cfg)
            with torch.no_grad():
                sae.W_dec.normal_(generator=generator)
                sae.set_decoder_norm_to_unit_norm()
            sae.save_pretrained(os.path.join(folder, f"layer_{layer}", site))
    return folder


def _collection_table(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="hf-sae-flow-bench-") as cache:
        start = time.perf_counter()
        flow = FeatureFlow.from_pretrained(
            args.collection, cache_dir=cache, device=args.device, block_size=args.block_size
        )
        loaded = time.perf_counter() - start
        start = time.perf_counter()
        summary = flow.summary()
        cold = time.perf_counter() - start
        start = time.perf_counter()
        FeatureFlow.from_pretrained(args.collection, cache_dir=cache, device=args.device).summary()
        warm = time.perf_counter() - start
    print(f"\nWhole-model flow tables of {args.collection}: {flow}")
    print(
        f"configs read in {loaded:.1f} s; predecessor tables of {len(summary.layers)} layers: {cold:.1f} s cold, "
        f"{warm:.1f} s warm (disk cache)"
    )
    print(summary)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-sae", type=int, default=65536, help="latents of each SAE (default 65536)")
    parser.add_argument("--d-in", type=int, default=2304, help="decoder width (default 2304, Gemma-2 2B)")
    parser.add_argument("--block-size", type=int, default=4096, help="matching block size (default 4096)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each measurement (default 2)")
    parser.add_argument("--collection", help="collection folder / Hub repo for the whole-model tables (optional)")
    parser.add_argument(
        "--random-collection",
        action="store_true",
        help="time the whole-model tables on random SAEs shaped like the real small model's",
    )
    parser.add_argument("--collection-d-sae", type=int, default=4096, help="latents of the --random-collection SAEs")
    parser.add_argument("--skip-matching", action="store_true", help="only the collection tables")
    parser.add_argument("--worker", choices=("match", "matmul"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return
    if not args.skip_matching:
        _matching_table(args)
    if args.collection:
        _collection_table(args)
    elif args.random_collection:
        with tempfile.TemporaryDirectory(prefix="hf-sae-flow-collection-") as folder:
            args.collection = _random_collection(folder, args)
            print(
                f"\n(stand-in collection: random unit decoders, 18 layers x resid/mlp/attn, d_in 640, "
                f"d_sae {args.collection_d_sae}: timing only, the classes mean nothing)"
            )
            _collection_table(args)
    else:
        print(
            "\nwhole-model flow tables: skipped (needs trained SAEs; pass --collection PATH_OR_REPO with one "
            "layer_{L}/{site} subfolder per SAE)"
        )


if __name__ == "__main__":
    main()
