"""Run the repository's benchmarks (issue 7.4) one after the other on this machine and put their printed tables
into docs/results.md (section 4), each under its exact command. The benchmark scripts themselves are in
benchmarks/ and are not changed here; each prints its own table of ratios measured side by side in one run.

Command (what docs/results.md reports):

    python experiments/benchmarks.py

``--only peers sae_step`` runs a subset (the others keep their earlier output from runs/bench/).
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from experiments.common import ROOT, update_results  # noqa: E402
from hf_sae._io import write_text_atomic  # noqa: E402
from hf_sae.hardware import has_native_bf16  # noqa: E402

# Without bf16 matrix units a bf16 step is emulated (SAELens's ran at 55 tokens/s here): its rows say nothing about
# the libraries, so the peers run in fp32 only there.
PEER_PRECISIONS = [] if has_native_bf16("cpu") else ["--precisions", "fp32"]
BENCHMARKS = {
    "peers": ["benchmarks/bench_peers.py", "--quick", *PEER_PRECISIONS],
    "sae_step": ["benchmarks/bench_sae_step.py", "--rounds", "5"],
    "steering": ["benchmarks/bench_steering.py", "--real"],
    "flow": ["benchmarks/bench_flow.py", "--d-sae", "16384"],
}
TITLES = {
    "peers": "SAE training step: hf-sae (TopK, HierarchicalTopK, KronSAE) vs EleutherAI sparsify vs SAELens",
    "sae_step": "The SAE step against its floor: TopK, HierarchicalTopK, KronSAE, AuxK, bf16 (both shapes)",
    "steering": "Steering overhead in generate (real Gemma 3 270M)",
    "flow": "Feature-flow matching time vs the bare matmul",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=list(BENCHMARKS))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per benchmark")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, command in BENCHMARKS.items():
        if args.only and name not in args.only:
            continue
        started, load = time.perf_counter(), os.getloadavg()[0]
        print("+ python", " ".join(command), flush=True)
        process = subprocess.Popen(
            [sys.executable, *command],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(timeout=args.timeout)
            output = stdout + (f"\n[stderr tail]\n{stderr[-1500:]}" if process.returncode else "")
            status = f"exit {process.returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)  # the benchmark and its per-measurement subprocesses
            stdout, _ = process.communicate()
            output = stdout
            status = f"timed out after {args.timeout} s (partial output)"
        seconds = time.perf_counter() - started
        header = f"{status}; {seconds:.0f} s; load average {load:.2f} at the start"
        write_text_atomic(args.out / f"{name}.txt", f"{header}\n{output}")
        print(output, flush=True)
        write_section(args.out, args.timeout)


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), or the platform's machine type where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_section(out: Path, timeout: int) -> None:
    units = "with" if has_native_bf16("cpu") else "without"
    parts = [
        f"""## 4. Benchmarks on this machine

All run one after the other by `python experiments/benchmarks.py --timeout {timeout}` (a benchmark still running at
its timeout is stopped and its partial output kept) on {cpu_name()}, {os.cpu_count()} cores, {units} bf16 matrix
units, no GPU, torch {torch.__version__}. The machine is a shared virtual machine whose speed drifts within minutes
(±10% on the Intel VMs, up to 1.5x on the AMD one), so absolute numbers move between runs and ratios by several
percent; the ratios come from measurements interleaved in one run. Each block
below is the benchmark's own printed output, headed by its exit status, wall time and the load average at its start."""
    ]
    for name, command in BENCHMARKS.items():
        path = out / f"{name}.txt"
        if not path.exists():
            parts.append(f"### {TITLES[name]}\n\n`python {' '.join(command)}` — not run.")
            continue
        status, _, output = path.read_text().partition("\n")
        parts.append(f"### {TITLES[name]}\n\n`python {' '.join(command)}` ({status})\n\n```\n{output.strip()}\n```")
    update_results("bench", "\n\n".join(parts))


if __name__ == "__main__":
    main()
