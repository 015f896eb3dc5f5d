"""Training-step throughput of BatchTopK, Matryoshka BatchTopK and JumpReLU against TopK, interleaved in one run.

Every variant is one full :func:`hf_sae.training_step` (forward, loss, backward, decoder-gradient projection,
clipping, fused Adam, renormalisation), as ``python -m training.train`` runs it, with AuxK off everywhere (the
BatchTopK family's AuxK is TopK's; benchmarks/bench_sae_step.py times it). Each round times one step of every
variant in turn (TopK, BatchTopK, ..., TopK, BatchTopK, ...), so load drift on a shared machine hits all alike; the
table reports medians over rounds and each variant's throughput as a ratio to TopK's (higher is faster).

    python benchmarks/bench_architectures.py             # the Gemma 3 270M shape (640 / 4096 / k 32 / 4096 tokens)
    python benchmarks/bench_architectures.py --large     # also Gemma 2 2B's (2304 / 16384 / k 64 / 2048 tokens)
    python benchmarks/bench_architectures.py --threads 1 --rounds 5

What the ratios mean: BatchTopK selects the batch's N·k largest from each row's 4k largest (TopK's fused
selection kernel, then one top-(N·k) of the candidates), its rows are padded to the batch's largest L0 (wider than k),
and its backward is TopK's sparse one; Matryoshka lays each token's latents out group by group (slots as wide as
the largest group count) for the fused prefix-MSE kernel, so its width is larger again; JumpReLU at its init (most
latents above θ = 0.001) takes the dense step (the decoder and the encoder backward as dense matmuls, about three
more than TopK), once its L0 is small the sparse one (only the latents with pre > θ − ε/2, as TopK's sparse backward).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from hf_sae import training_step

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sae_step import SHAPES, _sae, interleaved_times, table  # noqa: E402  (the same builder, loop, table)

VARIANTS = {
    "TopK": ("topk", {}),
    "BatchTopK": ("batchtopk", {}),
    "BatchTopK (hierarchical)": ("batchtopk", {"hierarchical": True}),
    "Matryoshka": ("matryoshka", {}),
    "JumpReLU (θ = 0.001: the init, dense step)": ("jumprelu", {"l0_coefficient": 1e-3, "l0_warmup_steps": 1}),
    # θ = 2.4 on these N(0, 1) inputs (unit encoder rows): ~k active per token, as after training (sparse step)
    "JumpReLU (θ = 2.4: L0 ≈ k, sparse step)": (
        "jumprelu",
        {"l0_coefficient": 1e-3, "l0_warmup_steps": 1, "initial_threshold": 2.4},
    ),
}


def steps_of(shape: dict, x: torch.Tensor) -> dict[str, Callable[[], None]]:
    """name -> one training step of that architecture on ``x``."""
    steps = {}
    for name, (arch, fields) in VARIANTS.items():
        torch.manual_seed(0)
        kwargs = {"auxk": False} if arch != "jumprelu" else {}
        sae = _sae(arch, {**shape, "k": shape["k"] if arch != "jumprelu" else shape["d_sae"]}, **kwargs, **fields)
        optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)
        steps[name] = lambda sae=sae, optimizer=optimizer: training_step(sae, optimizer, x, max_grad_norm=1.0)
    return steps


def measure(shape: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds of one step of every variant, interleaved over ``rounds`` rounds."""
    x = torch.randn(shape["batch"], shape["d_in"], generator=torch.Generator().manual_seed(1))
    return interleaved_times(steps_of(shape, x), rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", action="store_true", help="also the Gemma 2 2B shape")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds, medians")
    for shape_name in ["small", "large"] if args.large else ["small"]:
        shape = SHAPES[shape_name]
        times = measure(shape, args.rounds)
        topk = statistics.median(times["TopK"])
        rows = []
        for name, values in times.items():
            median = statistics.median(values)
            # per-round ratios (TopK's step / this step in the same round), their median: robust to drift
            per_round = statistics.median(t / v for t, v in zip(times["TopK"], values))
            rows.append([name, median * 1e3, shape["batch"] / median, topk / median, per_round])
        table(
            f"training step, d_in {shape['d_in']} / d_sae {shape['d_sae']} / k {shape['k']} / batch {shape['batch']}",
            ["architecture", "step ms", "tokens/s", "throughput / TopK (medians)", "median per-round ratio"],
            rows,
        )


if __name__ == "__main__":
    main()
