"""SAE step cost on this machine: HierarchicalTopK vs TopK, full steps vs the encoder matmul, KronSAE vs TopK.

Prints tables of ratios measured in one run. Each configuration runs in a fresh subprocess so that its peak
resident memory (ru_maxrss, minus the memory held before the timed steps) is its own.

    python benchmarks/bench_sae_step.py                  # the issue's grid (minutes on 2 cores)
    python benchmarks/bench_sae_step.py --quick          # d_sae 16384 only, K in {32, 64}
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from hf_sae import training_step
from hf_sae.losses import hierarchical_topk_loss
from hf_sae.registry import resolve_architecture

STEPS = {"step_topk": "topk", "step_hier": "hierarchical", "step_kron": "kron"}
"""The full-step measurements and the architecture (a name of hf_sae.registry) each one trains."""


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _time(fn, repeats: int) -> float:
    fn()  # warm-up (and kernel compilation)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(kind: str, d_in: int, d_sae: int, k: int, batch: int, repeats: int, config: dict | None = None) -> dict:
    """Run one configuration in this process; returns seconds per step and peak extra memory in bytes.

    ``kind`` is a decoder-only measurement, ``encoder_matmul``, or a full training step of one of ``STEPS``
    (``config``: extra fields of that architecture's config, e.g. KronSAE's base_dim / ext_dim)."""
    torch.manual_seed(0)
    x = torch.randn(batch, d_in)
    if kind in ("decoder_topk_embedding_bag", "decoder_topk_fused", "decoder_hierarchical"):
        W = torch.nn.functional.normalize(torch.randn(d_sae, d_in), dim=-1).requires_grad_()
        b = torch.zeros(d_in, requires_grad=True)
        values = torch.rand(batch, k).sort(dim=1, descending=True).values.requires_grad_()
        indices = torch.randint(0, d_sae, (batch, k))

        def step():
            W.grad = b.grad = values.grad = None
            if kind == "decoder_topk_embedding_bag":
                recon = b + F.embedding_bag(indices, W, per_sample_weights=values, mode="sum")
                loss = (recon - x).pow(2).mean()
            else:
                budgets = [k] if kind == "decoder_topk_fused" else None
                loss, _ = hierarchical_topk_loss(x, values, indices, W, b, budgets)
            loss.backward()

    elif kind == "encoder_matmul":
        W = torch.randn(d_sae, d_in)

        def step():
            torch.addmm(torch.zeros(d_sae), x, W.t())

    else:
        architecture, preset = resolve_architecture(STEPS[kind])
        sae = architecture.model_class(architecture.build_config(preset, d_in=d_in, d_sae=d_sae, k=k, **(config or {})))
        sae.train()
        optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=True)

        def step():
            training_step(sae, optimizer, x)

    step()
    base = _rss_bytes()
    seconds = _time(step, repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": seconds, "peak_extra_bytes": max(0, peak - base)}


def run(kind: str, **kw) -> dict:
    """Measure in a fresh interpreter (clean peak-memory counter)."""
    args = json.dumps({"kind": kind, **kw})
    out = subprocess.run(
        [sys.executable, __file__, "--child", args], capture_output=True, text=True, check=False, env=os.environ
    )
    if out.returncode != 0:
        raise RuntimeError(f"{kind} {kw} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_grid(cells: list[tuple[int, int]], kinds: list[str], **common) -> list[tuple[int, int, list[dict]]]:
    """(d_sae, k, one result per kind) for each (d_sae, k) of ``cells``, every kind measured in its own interpreter."""
    return [(d_sae, k, [run(kind, d_sae=d_sae, k=k, **common) for kind in kinds]) for d_sae, k in cells]


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="d_sae 16384 only and K in {32, 64}")
    parser.add_argument("--d-in", type=int, default=2304)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(measure(**spec)))
        return

    widths = [16384] if args.quick else [16384, 65536]
    ks = [32, 64] if args.quick else [32, 64, 128]
    common = {"d_in": args.d_in, "batch": args.batch, "repeats": args.repeats}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, d_in={args.d_in}, batch={args.batch}")
    gib = 2**30

    rows = []
    decoders = ["decoder_topk_embedding_bag", "decoder_topk_fused", "decoder_hierarchical"]
    for d_sae, k, (bag, fused, hier) in measure_grid([(d, k) for d in widths for k in ks], decoders, **common):
        best_topk = min(bag, fused, key=lambda r: r["seconds"])
        rows.append(
            [d_sae, k, *(r["seconds"] * 1e3 for r in (bag, fused, hier)), hier["seconds"] / best_topk["seconds"],
             hier["peak_extra_bytes"] / gib, hier["peak_extra_bytes"] / max(1, best_topk["peak_extra_bytes"])]
        )  # fmt: skip
    table(
        "Decoder + loss step (forward + backward): HierarchicalTopK vs plain TopK (target <= 1.3x time, <= 1.1x mem)",
        ["d_sae", "K", "TopK emb-bag ms", "TopK fused ms", "Hier ms", "time ratio", "Hier peak GiB", "mem ratio"],
        rows,
    )

    rows = []
    cells = [(d, k) for d in widths for k in (ks if d == 16384 else [64])]
    for d_sae, k, results in measure_grid(cells, ["encoder_matmul", "step_topk", "step_hier"], **common):
        matmul, topk, hier = (r["seconds"] for r in results)
        rows.append([d_sae, k, matmul * 1e3, topk * 1e3, hier * 1e3, hier / topk, topk / matmul, hier / matmul])
    table(
        "Full training step (encoder + decoder + loss + backward + Adam) (target hier/topk <= 1.05x)",
        ["d_sae", "K", "enc matmul ms", "TopK step ms", "Hier step ms", "hier/topk", "topk/matmul", "hier/matmul"],
        rows,
    )

    rows = []
    d_sae, k = 16384, 64
    topk = run("step_topk", d_sae=d_sae, k=k, **common)
    for m, n in [(2, 4), (4, 8)]:
        kron = run("step_kron", d_sae=d_sae, k=k, config={"base_dim": m, "ext_dim": n, "hierarchical": False}, **common)
        flop_ratio = (d_sae // (m * n)) * (m + n) / d_sae
        measured = kron["seconds"] / topk["seconds"]
        rows.append([f"({m}, {n})", flop_ratio, topk["seconds"] * 1e3, kron["seconds"] * 1e3, measured,
                     measured - flop_ratio])  # fmt: skip
    table(
        f"KronSAE vs TopK full step, d_sae={d_sae}, K={k} (target |time ratio - encoder FLOP ratio| <= 0.15)",
        ["(m, n)", "enc FLOP ratio h(m+n)/F", "TopK ms", "KronSAE ms", "time ratio", "difference"],
        rows,
    )


if __name__ == "__main__":
    main()
