"""BatchTopK / Matryoshka training-step cost with outlier tokens: the old padded path vs the flat path, against TopK.

A BatchTopK batch keeps its N·k largest activations, so a few outlier tokens (large norms; real Gemma activations
have a max norm ~9x the median) keep hundreds of latents each while the mean L0 stays k. The old step doubled its
per-row candidate count up to a full sort of the batch (:func:`hf_sae.sparse.batch_topk_select_by_doubling`) and
ran every later stage on the (N, width) padded selection (``flat_width_factor = inf``); the new one selects
exactly from 4k candidates plus the overflow rows (:func:`hf_sae.sparse.batch_topk_select`) and runs the encoder
values, decode and loss on the ≈ N·k kept entries. The floor is a TopK SAE's step at the same k.

Each variant is one forward + backward (``sae(x).loss.backward()``, AuxK off, gradients cleared in between) on the
same batch: Gaussian rows scaled to E||x||² = d_in, ``--outliers`` of them ×8, b_dec at the batch median (as the
training init). Each round runs every variant once in turn (A, B, C, ..., A, B, C, ...), so load drift on a shared
machine hits all of them alike; the table reports medians over rounds and ratios to the TopK floor.

    python benchmarks/bench_batchtopk_step.py                # d_in 640, d_sae 4096, k 16, batch 4096, 5 rounds
    python benchmarks/bench_batchtopk_step.py --threads 1    # one thread (steadier on a busy machine)
    python benchmarks/bench_batchtopk_step.py --real         # real Gemma 3 270M layer-6 activations, if cached
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from collections.abc import Callable
from unittest import mock

import torch

from hf_sae import modeling_batchtopk_sae
from hf_sae.registry import resolve_architecture
from hf_sae.sparse import batch_topk_select_by_doubling

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling benchmarks, when run as a script
from bench_sae_step import interleaved_times, table  # noqa: E402

REAL_ACTS = "/root/.cache/hf_sae/acts/gemma3-270m-L6-resid"


def synthetic_batch(batch: int, d_in: int, outliers: int) -> torch.Tensor:
    """(batch, d_in) Gaussian rows, ``outliers`` of them scaled ×8, all scaled so that E||x||² = d_in."""
    x = torch.randn(batch, d_in, generator=torch.Generator().manual_seed(1))
    x[:outliers] *= 8.0
    return x * math.sqrt(d_in / x.pow(2).sum(-1).mean())


def real_batch(batch: int, d_in: int) -> torch.Tensor:
    """The first ``batch`` cached activations (uint16 bit patterns of bfloat16), scaled so that E||x||² = d_in."""
    import datasets
    import numpy as np

    column = datasets.load_from_disk(REAL_ACTS).with_format("numpy")[:batch]["layer_6.resid"]
    x = torch.from_numpy(np.asarray(column).astype(np.int16)).view(torch.bfloat16).float().reshape(-1, d_in)
    return x * math.sqrt(d_in / x.pow(2).sum(-1).mean())


def _sae(name: str, x: torch.Tensor, d_sae: int, k: int):
    architecture, preset = resolve_architecture(name)
    config = architecture.build_config(preset, d_in=x.shape[1], d_sae=d_sae, k=k, auxk=False)
    torch.manual_seed(0)
    sae = architecture.model_class(config)
    sae.train()
    sae.check_finite = False
    with torch.no_grad():
        sae.b_dec.copy_(x.median(0).values)
    return sae


def variants(x: torch.Tensor, d_sae: int, k: int) -> dict[str, Callable[[], None]]:
    """name -> one forward + backward of that variant on ``x``."""

    def stepper(sae, old: bool = False):
        def step():
            sae.zero_grad(set_to_none=True)
            if old:  # the previous implementation: doubling selection, padded values / decode / loss
                with mock.patch.object(modeling_batchtopk_sae, "batch_topk_select", batch_topk_select_by_doubling):
                    sae.flat_width_factor = math.inf
                    sae(x).loss.backward()
            else:
                sae(x).loss.backward()

        return step

    steps = {"topk": stepper(_sae("topk", x, d_sae, k))}
    for name in ("batchtopk", "matryoshka"):
        steps[f"{name}_old"] = stepper(_sae(name, x, d_sae, k), old=True)
        steps[f"{name}_new"] = stepper(_sae(name, x, d_sae, k))
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-in", type=int, default=640)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--outliers", type=int, default=3, help="rows scaled ×8 (synthetic batch)")
    parser.add_argument("--real", action="store_true", help=f"the cached real activations ({REAL_ACTS})")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (at least 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = max(5, args.rounds)
    if args.real:
        x, source = real_batch(args.batch, args.d_in), "real activations"
    else:
        x, source = synthetic_batch(args.batch, args.d_in, args.outliers), f"Gaussian, {args.outliers} rows ×8"
    norms = x.norm(dim=-1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} interleaved rounds, medians")
    print(f"batch: {source}; token norms median {norms.median():.3g}, max {norms.max():.3g}")
    times = interleaved_times(variants(x, args.d_sae, args.k), rounds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    floor = medians["topk"]
    rows = [[name, medians[name] * 1e3, medians[name] / floor] for name in medians]
    shape = f"{args.d_in}/{args.d_sae}/k{args.k}/b{args.batch}"
    table(
        f"forward + backward at {shape} vs the TopK step (floor): target new/floor ~ 1",
        ["variant", "ms", "/ TopK"],
        rows,
    )
    speedups = [[name, medians[f"{name}_old"] / medians[f"{name}_new"]] for name in ("batchtopk", "matryoshka")]
    table("old padded path / new flat path", ["architecture", "old / new"], speedups)


if __name__ == "__main__":
    main()
