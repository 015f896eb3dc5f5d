"""SAE training-step cost against its floor, all variants interleaved in one run; prints tables of ratios.

The floor of a TopK step is what no implementation can skip: one fp32 encoder ``torch.addmm`` of the batch
(batch, d_in) x (d_in, d_sae) plus ``torch.topk`` of its rows. Every variant below is one full
:func:`hf_sae.training_step` (forward, loss, backward, decoder-gradient projection, clipping, fused Adam,
renormalisation), exactly what ``python -m training.train`` runs (input checks off and freed memory kept for
reuse by :func:`hf_sae.hardware.retain_freed_memory`, as there).

Variants, per shape: the floor; the bare encoder ``torch.mm`` (the multiply-add rate behind the AuxK table's lower
bound); TopK; HierarchicalTopK; KronSAE at (m, n) = (2, 4) and (4, 8); TopK with half the latents dead and AuxK
on (and the same with the dead block's dense matmuls instead of the CPU's L2 tiles); TopK and HierarchicalTopK on
the bf16 path (``autocast_dtype=torch.bfloat16``).
Each round times one step of every variant in turn (A, B, C, ..., A, B, C, ...), so load drift on a shared
machine hits all of them alike; tables report medians over rounds.

    python benchmarks/bench_sae_step.py                 # both shapes of the issue (~10 min on 2 cores)
    python benchmarks/bench_sae_step.py --quick         # the small shape only, fewer rounds
    python benchmarks/bench_sae_step.py --threads 1     # one thread (steadier on a busy machine)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import hf_sae.aux_tiles as aux_tiles
from hf_sae import training_step
from hf_sae.hardware import has_native_bf16, retain_freed_memory, use_huge_pages
from hf_sae.registry import resolve_architecture

SHAPES = {
    "small": {"d_in": 640, "d_sae": 4096, "k": 32, "batch": 4096},  # Gemma 3 270M
    "large": {"d_in": 2304, "d_sae": 16384, "k": 64, "batch": 2048},  # Gemma 2 2B
}
KRON_FACTORS = [(2, 4), (4, 8)]


def _sae(name: str, shape: dict, **fields):
    architecture, preset = resolve_architecture(name)
    config = architecture.build_config(preset, d_in=shape["d_in"], d_sae=shape["d_sae"], k=shape["k"], **fields)
    sae = architecture.model_class(config)
    sae.train()
    sae.check_finite = False  # as in training: the harvester already drops non-finite batches
    return sae


def variants(shape: dict, x: torch.Tensor) -> dict[str, Callable[[], None]]:
    """name -> a callable doing one step of that variant on ``x``."""
    torch.manual_seed(0)
    W = torch.randn(shape["d_sae"], shape["d_in"])
    b = torch.zeros(shape["d_sae"])
    k = shape["k"]
    steps: dict[str, Callable[[], None]] = {"floor": lambda: torch.addmm(b, x, W.t()).topk(k, dim=-1)}
    steps["matmul"] = lambda: torch.mm(x, W.t())  # the encoder product alone: the machine's multiply-add rate

    def stepper(sae, autocast=None, before=None):
        optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)

        def step():
            if before is not None:
                before()
            training_step(sae, optimizer, x, max_grad_norm=1.0, autocast_dtype=autocast)

        return step

    steps["topk"] = stepper(_sae("topk", shape, auxk=False))
    steps["hier"] = stepper(_sae("hierarchical", shape, auxk=False))
    for m, n in KRON_FACTORS:
        steps[f"kron{m}x{n}"] = stepper(_sae("kron", shape, base_dim=m, ext_dim=n, hierarchical=False, auxk=False))
    dead_sae = _sae("topk", shape, auxk=True, dead_tokens=1)
    half = torch.arange(0, shape["d_sae"], 2)

    def keep_half_dead():  # every other latent counts as dead at each step
        dead_sae.tokens_since_fired.zero_()
        dead_sae.tokens_since_fired[half] = 10

    steps["topk_auxk_half_dead"] = stepper(dead_sae, before=keep_half_dead)
    half_dead_step = steps["topk_auxk_half_dead"]

    def dense_block_step():  # the same step with the CPU's tiled dead block off: four (N, n_dead) matmuls instead
        tiled_max = aux_tiles.TILED_MAX_DENSITY
        aux_tiles.TILED_MAX_DENSITY = 0.0
        try:
            half_dead_step()
        finally:
            aux_tiles.TILED_MAX_DENSITY = tiled_max

    steps["topk_auxk_half_dead_dense_block"] = dense_block_step
    steps["topk_bf16"] = stepper(_sae("topk", shape, auxk=False), autocast=torch.bfloat16)
    steps["hier_bf16"] = stepper(_sae("hierarchical", shape, auxk=False), autocast=torch.bfloat16)
    return steps


def measure(shape: dict, rounds: int) -> dict[str, float]:
    """Median seconds of one step of every variant, interleaved over ``rounds`` rounds."""
    x = torch.randn(shape["batch"], shape["d_in"], generator=torch.Generator().manual_seed(1))
    times = interleaved_times(variants(shape, x), rounds)
    return {name: statistics.median(values) for name, values in times.items()}


def auxk_lower_bound(shape: dict, matmul_seconds: float, topk_seconds: float) -> float:
    """The least (half dead + AuxK) / TopK step ratio at this shape: AuxK decodes k_aux = d_in / 2 dead latents per
    row (the config default) and back-propagates them, four products of N·k_aux·d multiply-adds (the decode, its
    gradient into the values, the decoder-row gradient, the encoder-column gradient) that no kernel runs faster
    than the dense encoder matmul (N·d·d_sae multiply-adds in ``matmul_seconds``). At d_in 640 / d_sae 4096 that
    is 4 · 320 / 4096 = 0.31 of the matmul's time, so the target 1.15 lies below it wherever the matmul is more
    than half the TopK step."""
    k_aux = min(shape["d_in"] // 2, shape["d_sae"] // 2)
    return 1 + 4 * k_aux / shape["d_sae"] * matmul_seconds / topk_seconds


def interleaved_times(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each step in each of ``rounds`` rounds, every round running every step once in turn (after two
    warm-up calls each: kernel compilation, the allocator)."""
    for step in steps.values():
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return times


def table(title: str, header: list[str], rows: list[list], emit: Callable[[str], None] = print) -> None:
    """A markdown table, each line through ``emit`` (bench_gpu.py also writes them to its --out file)."""
    emit(f"\n### {title}\n")
    emit("| " + " | ".join(header) + " |")
    emit("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        emit("| " + " | ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the small shape only, 5 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 9, --quick 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    huge = use_huge_pages()  # as python -m training.train does on CPU, before any large tensor
    retained = retain_freed_memory()
    rounds = args.rounds or (5 if args.quick else 9)
    shapes = ["small"] if args.quick else list(SHAPES)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} interleaved rounds, medians")
    units = (
        "yes"
        if has_native_bf16("cpu")
        else "no: bf16 is emulated; the training script then steps in fp32 under --bf16-autocast"
    )
    print(f"CPU bf16 matrix units (AVX512-BF16 / AMX): {units}")
    print(f"freed memory kept for reuse (hf_sae.hardware.retain_freed_memory, as in training): {retained}")
    print(f"large tensors on transparent huge pages (hf_sae.hardware.use_huge_pages, as in training): {huge}")
    results = {}
    for name in shapes:
        results[name] = measure(SHAPES[name], rounds)

    def label(name):
        s = SHAPES[name]
        return f"{s['d_in']}/{s['d_sae']}/k{s['k']}/b{s['batch']}"

    rows = []
    for name, r in results.items():
        rows.append([label(name), r["floor"] * 1e3, r["topk"] * 1e3, r["topk"] / r["floor"], r["hier"] * 1e3,
                     r["hier"] / r["topk"], SHAPES[name]["batch"] / r["topk"]])  # fmt: skip
    table(
        "fp32 step vs floor (addmm + topk): targets TopK/floor <= 1.25, Hier/TopK <= 1.05",
        ["d_in/d_sae/k/batch", "floor ms", "TopK ms", "TopK/floor", "Hier ms", "Hier/TopK", "TopK tokens/s"],
        rows,
    )
    rows = []
    for name, r in results.items():
        for m, n in KRON_FACTORS:
            flop_ratio = (m + n) / (m * n)  # h (m + n) / F with h = F / (m n)
            ratio = r[f"kron{m}x{n}"] / r["topk"]
            rows.append([label(name), f"({m}, {n})", flop_ratio, r[f"kron{m}x{n}"] * 1e3, ratio, ratio - flop_ratio])
    table(
        "KronSAE step / TopK step vs encoder FLOP ratio h(m+n)/F: target |difference| <= 0.15",
        ["d_in/d_sae/k/batch", "(m, n)", "FLOP ratio", "KronSAE ms", "Kron/TopK", "difference"],
        rows,
    )
    rows = [[label(n), r["topk"] * 1e3, r["topk_auxk_half_dead"] * 1e3, r["topk_auxk_half_dead"] / r["topk"],
             auxk_lower_bound(SHAPES[n], r["matmul"], r["topk"]), r["topk_auxk_half_dead_dense_block"] / r["topk"],
             r["topk_auxk_half_dead"] / r["topk_auxk_half_dead_dense_block"]] for n, r in results.items()]  # fmt: skip
    table(
        "AuxK: half the latents dead vs none dead: target <= 1.15 (lower bound: AuxK's four N·k_aux·d products "
        "at the encoder matmul's multiply-add rate; on CPU the dead block runs by L2 tiles, the dense-block "
        "matmuls for comparison)",
        ["d_in/d_sae/k/batch", "TopK ms", "TopK, half dead + AuxK ms", "ratio", "lower bound",
         "ratio, dense block", "tiled / dense block"],
        rows,
    )  # fmt: skip
    rows = [[label(n), r["topk"] * 1e3, r["topk_bf16"] * 1e3, r["topk_bf16"] / r["topk"], r["hier_bf16"] * 1e3,
             r["hier_bf16"] / r["hier"], r["topk_bf16"] / r["floor"]] for n, r in results.items()]  # fmt: skip
    table(
        "bf16 path (bf16 encoder matmul, fp32 weights and losses) vs fp32: target <= 0.6",
        ["d_in/d_sae/k/batch", "TopK fp32 ms", "TopK bf16 ms", "bf16/fp32", "Hier bf16 ms", "bf16/fp32 (Hier)",
         "TopK bf16/floor"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
