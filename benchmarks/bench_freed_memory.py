"""Keeping freed memory for reuse (``hf_sae.hardware.retain_freed_memory``) vs glibc's defaults, in the TopK step.

The setting is process-wide and cannot be undone cleanly, so each measurement is a fresh subprocess: it builds the
TopK SAE of a benchmark shape (``bench_sae_step.py``'s), runs warm-up steps, then times ``--steps`` steps of
:func:`hf_sae.training_step` and prints their median. Subprocesses alternate (defaults, retained, defaults, ...)
for ``--rounds`` rounds; the table gives medians over rounds and the median of the per-round ratios.

    python benchmarks/bench_freed_memory.py               # both shapes, 3 rounds (~3 min on 2 cores)
    python benchmarks/bench_freed_memory.py --shapes small
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

CHILD = """
import statistics, sys, time
import torch
sys.path.insert(0, {bench!r})
from bench_sae_step import SHAPES, _sae
from hf_sae import training_step
from hf_sae.hardware import retain_freed_memory
shape, retain, steps = SHAPES[{shape!r}], {retain!r}, {steps!r}
if retain:
    assert retain_freed_memory(), "retain_freed_memory is a no-op here (not Linux/glibc)"
x = torch.randn(shape["batch"], shape["d_in"], generator=torch.Generator().manual_seed(1))
sae = _sae("topk", shape, auxk=False)
optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
times = []
for i in range(steps + 3):
    start = time.perf_counter()
    training_step(sae, optimizer, x, max_grad_norm=1.0)
    times.append(time.perf_counter() - start)
print(statistics.median(times[3:]))
"""


def step_seconds(shape: str, retain: bool, steps: int) -> float:
    """Median seconds of one TopK step in a fresh interpreter (after 3 warm-up steps)."""
    code = CHILD.format(bench=str(Path(__file__).resolve().parent), shape=shape, retain=retain, steps=steps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["small", "large"], choices=["small", "large"])
    parser.add_argument("--rounds", type=int, default=3, help="alternating pairs of subprocesses per shape")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per subprocess")
    args = parser.parse_args()
    print(f"TopK training step, glibc defaults vs retain_freed_memory; {args.rounds} alternating rounds of fresh")
    print(f"subprocesses, {args.steps} timed steps each (medians)\n")
    print("| shape | defaults ms | retained ms | retained / defaults (median of rounds) | per-round ratios |")
    print("|---|---:|---:|---:|---|")
    for shape in args.shapes:
        default, retained = [], []
        for _ in range(args.rounds):
            default.append(step_seconds(shape, False, args.steps))
            retained.append(step_seconds(shape, True, args.steps))
        ratios = [r / d for r, d in zip(retained, default, strict=True)]
        print(
            f"| {shape} | {1000 * statistics.median(default):.0f} | {1000 * statistics.median(retained):.0f} | "
            f"{statistics.median(ratios):.3f} (floor: defaults) | {' '.join(f'{r:.3f}' for r in ratios)} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
