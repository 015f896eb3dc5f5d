"""SAE training-step throughput and peak memory: hf-sae vs EleutherAI sparsify vs SAELens, in one run.

Every library trains a TopK SAE of the same shape on the same random activations (same d_in, d_sae, k, batch),
with its own recommended step: forward, loss, backward, its optimiser (sparsify: torch Adam + decoder-gradient
projection + renormalisation; SAELens: torch Adam + grad-norm clipping; hf-sae: fused AdamW-style torch Adam +
projection + renormalisation). Each measurement runs in a fresh interpreter — the peers in their own virtual
environments — so peak memory (ru_maxrss minus the RSS before the timed steps) is per measurement.

    python benchmarks/bench_peers.py --setup     # once: venvs for the peers (pip, CPU torch 2.13.0 first)
    python benchmarks/bench_peers.py             # both shapes of the issue
    python benchmarks/bench_peers.py --quick     # the Gemma 3 270M shape only

The peers are installed into ``--venv-dir`` (default ~/.cache/hf_sae/peer-venvs): ``eai-sparsify`` 1.3.3 and
``sae-lens`` 6.54; a peer whose venv is missing is reported as such, not silently dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch  # in every interpreter this file runs in: ours and the peers' venvs

PEERS = {"sparsify": "eai-sparsify==1.3.3", "saelens": "sae-lens==6.54.12"}
OURS = {
    "hf_sae_topk": ("topk", {}),
    "hf_sae_hier": ("hierarchical", {}),
    "hf_sae_kron": ("kron", {"base_dim": 2, "ext_dim": 4, "hierarchical": False}),
}
"""hf-sae's entries: an architecture name of hf_sae.registry and the extra fields of its config."""


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(spec: dict) -> dict:
    """Build one library's SAE and step, time ``steps`` steps after ``warmup``.

    Each library is imported here, in the interpreter that measures it: the peers' venvs have neither hf_sae nor
    the other peer, and this environment has neither peer."""
    torch.manual_seed(0)
    d_in, d_sae, k, batch = spec["d_in"], spec["d_sae"], spec["k"], spec["batch"]
    data = torch.randn(4, batch, d_in)
    lib = spec["lib"]
    if lib in OURS:
        from hf_sae import training_step
        from hf_sae.registry import resolve_architecture

        name, fields = OURS[lib]
        architecture, preset = resolve_architecture(name)
        sae = architecture.model_class(architecture.build_config(preset, d_in=d_in, d_sae=d_sae, k=k, **fields))
        sae.train()
        optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4, fused=True)

        def step(x):
            training_step(sae, optimizer, x)

    elif lib == "sparsify":
        from sparsify import SparseCoder, SparseCoderConfig

        sae = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k))
        optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4)

        def step(x):
            out = sae(x, dead_mask=torch.zeros(d_sae, dtype=torch.bool))
            (out.fvu + out.auxk_loss).backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            optimizer.step()
            optimizer.zero_grad()
            sae.set_decoder_norm_to_unit_norm()

    elif lib == "saelens":
        from sae_lens.saes.sae import TrainStepInput
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
        optimizer = torch.optim.Adam(sae.parameters(), lr=2e-4)
        no_dead = torch.zeros(d_sae, dtype=torch.bool)

        def step(x):
            out = sae.training_forward_pass(TrainStepInput(x, sae.get_coefficients(), no_dead, 0, False))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()

    else:
        raise ValueError(f"unknown library {lib!r}")

    for i in range(spec["warmup"]):
        step(data[i % 4])
    base = _rss_bytes()
    times = []
    for i in range(spec["steps"]):
        start = time.perf_counter()
        step(data[i % 4])
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[len(times) // 2]  # median step: robust to a busy machine
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tokens_per_s": batch / seconds, "step_s": seconds, "peak_extra_bytes": max(0, peak - base)}


def python_for(lib: str, venv_dir: Path) -> Path | None:
    if lib in OURS:
        return Path(sys.executable)
    exe = venv_dir / lib / "bin" / "python"
    return exe if exe.exists() else None


def setup(venv_dir: Path) -> None:
    for lib, requirement in PEERS.items():
        target = venv_dir / lib
        if (target / "bin" / "python").exists():
            print(f"{lib}: {target} exists")
            continue
        subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
        pip = [str(target / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, "torch==2.13.0"], check=True)  # the CPU build on disk; never the CUDA wheels
        subprocess.run([*pip, requirement], check=True)
        print(f"{lib}: installed {requirement} into {target}")


def run(lib: str, venv_dir: Path, **spec) -> dict | str:
    exe = python_for(lib, venv_dir)
    if exe is None:
        return f"not installed (run with --setup; venv {venv_dir / lib})"
    out = subprocess.run(
        [str(exe), __file__, "--child", json.dumps({"lib": lib, **spec})],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])} if lib in OURS else None,
    )
    if out.returncode != 0:
        return "failed: " + (out.stderr.strip().splitlines() or ["?"])[-1][:200]
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--setup", action="store_true", help="create the peers' virtual environments and exit")
    parser.add_argument("--venv-dir", type=Path, default=Path.home() / ".cache" / "hf_sae" / "peer-venvs")
    parser.add_argument("--quick", action="store_true", help="only d_in 640 / 4096 latents / k 32")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.setup:
        setup(args.venv_dir)
        return

    shapes = [(640, 4096, 32, 4096)] + ([] if args.quick else [(2304, 16384, 64, 2048)])
    libs = [*OURS, *PEERS]
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; median of {args.steps} timed steps after 2 warm-up")
    for d_in, d_sae, k, batch in shapes:
        steps = args.steps if d_in < 1000 else max(2, args.steps // 3)
        results = {lib: run(lib, args.venv_dir, d_in=d_in, d_sae=d_sae, k=k, batch=batch, steps=steps, warmup=2)
                   for lib in libs}  # fmt: skip
        print(f"\n### TopK SAE step, d_in={d_in}, d_sae={d_sae}, k={k}, batch={batch}\n")
        print("| library | tokens/s | step ms | peak extra MiB | ours (TopK) / this |")
        print("|---|---|---|---|---|")
        ours = results["hf_sae_topk"]
        for lib, r in results.items():
            if isinstance(r, str):
                print(f"| {lib} | {r} | | | |")
                continue
            ratio = ours["tokens_per_s"] / r["tokens_per_s"] if isinstance(ours, dict) else float("nan")
            print(f"| {lib} | {r['tokens_per_s']:.0f} | {r['step_s'] * 1e3:.0f} | "
                  f"{r['peak_extra_bytes'] / 2**20:.0f} | {ratio:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
