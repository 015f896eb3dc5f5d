"""Latent parallelism (``--shard-latents``): step time and memory per process against one process, interleaved.

Each variant is one launch of ``python -m hf_sae.testing.latent_parallel_run`` (the runner the exactness tests
use): the whole SAE in one process (the floor), then the same SAE split over 2 (and 3) gloo processes on this CPU,
every process with one thread. A round launches every variant once (A, B, C, A, B, C, ...); the tables report
medians over rounds of the median step time (first step excluded) and, per process, the SAE's training state
(fp32 weights, gradients and AdamW's two moments: an exact count) and the peak RSS the steps add above the resting
process (the kernel's VmHWM after ``clear_refs``; the whole SAE built before sharding is freed first).

On a CPU the processes share the machine's cores and gloo's all-gathers go through loopback TCP, so the step-time
ratio here says what the collectives cost, not what N GPUs gain: there each process has its own device.

    python benchmarks/bench_latent_parallel.py            # d_in 640, d_sae 16384, k 32, batch 1024; 2 processes
    python benchmarks/bench_latent_parallel.py --quick    # a smaller SAE, fewer rounds
    python benchmarks/bench_latent_parallel.py --worlds 2 3
    python benchmarks/bench_latent_parallel.py --d-sae 65536 --rounds 2 --steps 3   # where the state dominates

A step's transients do not shrink with the process count: the gathered decoder rows of the batch's distinct latents
(at most ``chunk_elements`` = 2^24 floats per chunk, plus their gradient and the CPU kernel's private gradient
copies). At small widths they are as large as the SAE's own state, so the peak only falls once the SAE is wide.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def launch(world: int, shape: dict, steps: int, topk: bool, tmp: Path) -> dict:
    out = tmp / f"w{world}.json"
    args = ["--world", str(world)] + (["--whole"] if world == 1 else [])
    args += ["--d-in", str(shape["d_in"]), "--d-sae", str(shape["d_sae"]), "--k", str(shape["k"])]
    args += ["--batch", str(shape["batch"]), "--steps", str(steps), "--dead-tokens", str(10**9)]
    args += ["--topk"] if topk else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "hf_sae.testing.latent_parallel_run", *args, "--out", str(out)]
    subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2])
    parser.add_argument("--topk", action="store_true", help="plain TopK loss (default HierarchicalTopK)")
    parser.add_argument("--d-sae", type=int, default=None, help="the SAE width (default 16384; --quick 4096)")
    parser.add_argument("--steps", type=int, default=None, help="steps per launch (default 5; --quick 4)")
    args = parser.parse_args(argv)
    shape = {"d_in": 640, "d_sae": args.d_sae or (4096 if args.quick else 16384), "k": 32, "batch": 1024}
    rounds, steps = args.rounds or (2 if args.quick else 3), args.steps or (4 if args.quick else 5)
    worlds = [1, *args.worlds]
    results: dict[int, list[dict]] = {w: [] for w in worlds}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for world in worlds:  # interleaved: A, B, A, B, ...
                results[world].append(launch(world, shape, steps, args.topk, Path(tmp)))
    loss = "TopK" if args.topk else "HierarchicalTopK"
    print(
        f"\nlatent-parallel {loss} step, d_in {shape['d_in']}, d_sae {shape['d_sae']}, k {shape['k']}, "
        f"batch {shape['batch']}, 1 thread per process, {rounds} rounds x {steps} steps (medians)\n"
    )
    print(
        "| processes | step ms | step / one process | SAE state MiB per process | ratio | step peak RSS MiB | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    floor = {
        key: statistics.median(r[key] for r in results[1])
        for key in ("step_seconds_median", "sae_state_mib_per_process", "step_peak_rss_mib")
    }
    for world in worlds:
        step = statistics.median(r["step_seconds_median"] for r in results[world])
        state = statistics.median(r["sae_state_mib_per_process"] for r in results[world])
        peak = statistics.median(r["step_peak_rss_mib"] for r in results[world])
        label = "1 (whole SAE)" if world == 1 else str(world)
        print(
            f"| {label} | {step * 1e3:,.0f} | {step / floor['step_seconds_median']:.2f} | {state:,.1f} | "
            f"{state / floor['sae_state_mib_per_process']:.2f} | {peak:,.0f} | "
            f"{peak / max(floor['step_peak_rss_mib'], 1e-9):.2f} |"
        )


if __name__ == "__main__":
    main()
