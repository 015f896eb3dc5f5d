"""The process memory settings of CPU training, in the TopK step: glibc's and torch's defaults; freed memory kept
for reuse (``hf_sae.hardware.retain_freed_memory``); that plus large tensors on transparent huge pages
(``hf_sae.hardware.use_huge_pages``), which is what ``python -m training.train`` does on CPU.

The settings are process-wide and cannot be undone cleanly, so each measurement is a fresh subprocess: it builds the
TopK SAE of a benchmark shape (``bench_sae_step.py``'s), runs warm-up steps, then times ``--steps`` steps of
:func:`hf_sae.training_step` and prints their median. Subprocesses alternate (defaults, retained, retained + huge,
defaults, ...) for ``--rounds`` rounds; the table gives medians over rounds and the medians of the per-round ratios.

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
from hf_sae.hardware import retain_freed_memory, use_huge_pages
shape, retain, huge, steps = SHAPES[{shape!r}], {retain!r}, {huge!r}, {steps!r}
if huge:
    assert use_huge_pages(), "use_huge_pages is a no-op here (transparent huge pages off, or not Linux)"
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


SETTINGS = {"defaults": (False, False), "retained": (True, False), "retained + huge pages": (True, True)}


def step_seconds(shape: str, retain: bool, huge: bool, steps: int) -> float:
    """Median seconds of one TopK step in a fresh interpreter (after 3 warm-up steps)."""
    bench = str(Path(__file__).resolve().parent)
    code = CHILD.format(bench=bench, shape=shape, retain=retain, huge=huge, steps=steps)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["small", "large"], choices=["small", "large"])
    parser.add_argument("--rounds", type=int, default=3, help="alternating triples of subprocesses per shape")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per subprocess")
    args = parser.parse_args()
    print(f"TopK training step under each memory setting; {args.rounds} alternating rounds of fresh subprocesses,")
    print(f"{args.steps} timed steps each (medians). Floor of each ratio: the setting named after the slash.\n")
    print("| shape | defaults ms | retained ms | + huge pages ms | retained / defaults | + huge / retained | "
          "+ huge / defaults |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|")
    for shape in args.shapes:
        times: dict[str, list[float]] = {name: [] for name in SETTINGS}
        for _ in range(args.rounds):
            for name, (retain, huge) in SETTINGS.items():
                times[name].append(step_seconds(shape, retain, huge, args.steps))

        def ratio(a: str, b: str, times: dict[str, list[float]] = times) -> float:
            return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))

        ms = [f"{1000 * statistics.median(times[name]):.0f}" for name in SETTINGS]
        huge = "retained + huge pages"
        print(
            f"| {shape} | {' | '.join(ms)} | {ratio('retained', 'defaults'):.3f} | {ratio(huge, 'retained'):.3f} | "
            f"{ratio(huge, 'defaults'):.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
