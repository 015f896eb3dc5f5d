"""KronSAE vs TopK at equal training FLOPs, mAND vs ReLU·ReLU at equal tokens, and the hierarchical KronSAE
(issue 7.2) on the real Gemma 3 270M, resid of layer 6.

The training CLI trains KronSAEs only with the hierarchical loss, one (m, n) per run and mAND only (no
``kron_activation`` option), so this script harvests the activations once (training/harvest.py, the CLI's harvester)
and trains every variant itself with the CLI's recipe (experiments/common.train_sae: activation scale, b_dec init,
AdamW at the architecture's default learning rate, warm-up + cosine, clipping, decoder maintenance via
hf_sae.training_step, AuxK off, scale folded at the end). Every SAE is built by architecture name through
hf_sae.registry (``topk``, ``hierarchical``, ``kron``), as the training CLI builds them.

Iso-FLOPs (the KronSAE paper's protocol): the encoder dominates the training cost, d_in·F multiply-adds per token
for TopK vs d_in·h·(m+n) for KronSAE (F = h·m·n), forward and backward alike. So a KronSAE gets
F / (h·(m+n)) = m·n / (m+n) times the TopK SAE's tokens: 8/6 = 1.33x for (2, 4), 32/12 = 2.67x for (4, 8).
The decoder side (sparse, k·d_in) and the TopK selection are the same for both and left out of the count.

Command (what docs/results.md reports):

    python experiments/kron_isoflops.py --tokens 131072 --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import (  # noqa: E402
    ROOT,
    HeldOut,
    harvest,
    load_model,
    markdown_table,
    recovered,
    seed_everything,
    train_sae,
    update_results,
    write_json,
)
from hf_sae._io import atomic_path  # noqa: E402
from hf_sae.registry import resolve_architecture  # noqa: E402
from training.small_gemma import SMALL_GEMMA_ID  # noqa: E402


def variants(tokens: int) -> list[dict]:
    """name, architecture name (``arch``, for hf_sae.registry) and its config fields (``config``), (m, n),
    activation, hierarchical, training tokens (iso-FLOPs for KronSAE vs TopK), in the order they are trained (the
    most important first: each result is written as soon as it exists)."""

    def iso(m, n):
        return int(round(tokens * m * n / (m + n) / 4096)) * 4096

    def kron(m, n, act, hier=False):
        return dict(
            name=f"kron_m{m}n{n}_{'mand' if act == 'mand' else 'relu'}{'_hier' if hier else ''}",
            arch="kron",
            config=dict(base_dim=m, ext_dim=n, kron_activation=act, hierarchical=hier),
            mn=(m, n),
            act=act,
            hier=hier,
            tokens=iso(m, n),
        )

    return [
        dict(name="topk", arch="topk", config={}, mn=None, act=None, hier=False, tokens=tokens),
        kron(2, 4, "mand"),
        kron(4, 8, "mand"),
        kron(2, 4, "relu_product"),
        kron(2, 4, "mand", hier=True),
        dict(name="topk_hier", arch="hierarchical", config={}, mn=None, act=None, hier=True, tokens=tokens),
        kron(4, 8, "relu_product"),
    ]


DEFAULT_VARIANTS = ["topk", "kron_m2n4_mand", "kron_m4n8_mand", "kron_m2n4_relu", "kron_m2n4_mand_hier"]


def build(v: dict, d_in: int, d_sae: int, k: int):
    """The variant's SAE, by architecture name through the registry (AuxK off, reading resid 6 of Gemma 3 270M)."""
    architecture, preset = resolve_architecture(v["arch"])
    config = architecture.build_config(
        preset,
        d_in=d_in,
        d_sae=d_sae,
        k=k,
        auxk=False,
        hook_layer=6,
        hook_site="resid",
        base_model=SMALL_GEMMA_ID,
        **v["config"],
    )
    return architecture.model_class(config)


def encoder_flops(sae) -> int:
    """Encoder multiply-adds x 2 (fwd) x 3 (fwd + bwd) per token: d_in x the encoder's output columns (d_sae for
    TopK, h·(m+n) = d_sae·(m+n)/(m·n) for KronSAE)."""
    return 6 * sae.encoder.weight.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "kron")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=131072, help="TopK's training tokens (KronSAEs get more)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--lm-windows", type=int, default=8)
    parser.add_argument("--report-only", action="store_true", help="rewrite the docs section from kron_results.json")
    parser.add_argument(
        "--only",
        nargs="*",
        default=DEFAULT_VARIANTS,
        help="train only these variant names (default: all but topk_hier and kron_m4n8_relu)",
    )
    args = parser.parse_args()
    seed_everything(args.seed)
    if args.report_only:
        write_section(json.loads((args.out / "kron_results.json").read_text())["results"], args)
        return
    key = (args.layer, "resid")
    todo = [v for v in variants(args.tokens) if not args.only or v["name"] in args.only]
    need = max(v["tokens"] for v in todo)

    model, tokenizer = load_model("bfloat16")
    cache = args.out / f"acts_train_L{args.layer}_{need}.pt"
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if cache.exists():
        data = torch.load(cache)
    else:
        data = harvest(model, tokenizer, [key], "train", need)[key]
        with atomic_path(cache) as tmp:
            torch.save(data, tmp)
    print(f"train activations {tuple(data.shape)} ({time.perf_counter() - started:.0f} s)", flush=True)
    held_out = HeldOut(model, tokenizer, args.layer, args.eval_tokens, args.lm_windows)

    results = {}
    results_path = args.out / "kron_results.json"
    if results_path.exists():
        results = json.loads(results_path.read_text())["results"]
    d_in = data.shape[1]
    for v in todo:
        torch.manual_seed(args.seed)
        sae = build(v, d_in, args.d_sae, args.k)
        timing = train_sae(sae, data, v["tokens"], seed=args.seed, name=v["name"], b_dec_init="geometric_median")
        sae.save_pretrained(args.out / v["name"])
        ev, dead = held_out.budgets(sae, [8, 16, args.k])
        losses = held_out.losses({"spliced": (sae, args.k)}, ablate_sae=sae)
        results[v["name"]] = {
            **{key_: (list(val) if isinstance(val, tuple) else val) for key_, val in v.items()},
            **timing,
            "ev": ev,
            "dead_eval": dead,
            "encoder_flops_per_token": encoder_flops(sae),
            "ce_recovered": recovered(losses, "spliced"),
            "losses": losses,
        }
        write_json(results_path, {"results": results, "args": {k: str(val) for k, val in vars(args).items()}})
        write_section(results, args)


def write_section(results: dict, args) -> None:
    rows = []
    base = results.get("topk")
    for name, r in results.items():
        flops = r["encoder_flops_per_token"] * r["tokens"]
        rel_flops = flops / (base["encoder_flops_per_token"] * base["tokens"]) if base else float("nan")
        rows.append(
            [
                name,
                "-" if r["mn"] is None else f"({r['mn'][0]}, {r['mn'][1]})",
                r["act"] or "-",
                "yes" if r["hier"] else "no",
                f"{r['tokens']:,}",
                f"{rel_flops:.2f}",
                r["ev"]["8"]["explained_variance"],
                r["ev"]["16"]["explained_variance"],
                r["ev"][str(args.k)]["explained_variance"],
                r["ce_recovered"],
                f"{100 * r['dead_fraction_train']:.1f}%",
                f"{100 * r['dead_eval']:.1f}%",
                f"{r['seconds_per_million_tokens']:.1f}",
            ]
        )
    table = markdown_table(
        [
            "SAE",
            "(m, n)",
            "activation",
            "hier. loss",
            "train tokens",
            "encoder FLOPs vs TopK",
            "EV k'=8",
            "EV k'=16",
            f"EV k={args.k}",
            "CE rec. k=32",
            "dead (train)",
            "dead (held-out)",
            "s / 1M tokens (SAE steps)",
        ],
        rows,
    )
    notes = comparison(results, args)
    text = f"""## 2. KronSAE vs TopK at equal training FLOPs; mAND vs ReLU·ReLU; hierarchical KronSAE

Gemma 3 270M (bf16), resid of layer 6, d_sae {args.d_sae}, k {args.k}, batch 4096,
AuxK off (as in experiments 1 and 3, for CPU time),
seed {args.seed}.
Activations harvested once from the training split and trained on by `experiments/common.train_sae` (the CLI's
recipe on activations held in memory, so that every variant sees the same rows; the CLI now takes each variant's
`kron_activation`, `hierarchical`, `base_dim` and `ext_dim` per `--sae` entry, but it harvests afresh per run).
Iso-FLOPs: a KronSAE gets m·n/(m+n) times TopK's
{args.tokens:,} tokens (its encoder is that much cheaper); "encoder FLOPs vs TopK" is the resulting total encoder
cost (1.00 = iso-FLOPs). b_dec starts at the geometric median for every SAE, KronSAEs included (the paper and
the CLI start KronSAE's at zero: with ~10^2 steps a zero b_dec never learns the residual stream's large mean — a
first attempt had FVU > 1 and 92% dead latents).
ReLU·ReLU runs get the same tokens as the mAND run of the same (m, n). Evaluation on the
held-out validation split ({args.eval_tokens:,} tokens; CE on {args.lm_windows} windows of 128). Wall-clock: SAE
optimiser steps only (activations in memory), this 2-core CPU, shared with other jobs — compare ratios, not values.

Command: `python experiments/kron_isoflops.py --tokens {args.tokens} --seed {args.seed}`

{table}

{notes}
"""
    update_results("kron", text)
    print(text, flush=True)


def comparison(results: dict, args) -> str:
    lines = [
        "**Against the KronSAE paper** (Table 6: KronSAE ≥ TopK at equal FLOPs, EV .814 vs .809 at L0 32; "
        "Table 1: mAND 0.8445 vs ReLU·ReLU 0.8328 EV, a +0.0117 gap):",
        "",
    ]
    ev = {name: r["ev"][str(args.k)]["explained_variance"] for name, r in results.items()}
    if "topk" in ev:
        for mn in ("m2n4", "m4n8"):
            if f"kron_{mn}_mand" in ev:
                lines.append(
                    f"- iso-FLOPs, {mn}: KronSAE EV {ev[f'kron_{mn}_mand']:.4f} vs TopK {ev['topk']:.4f} "
                    f"(Δ {ev[f'kron_{mn}_mand'] - ev['topk']:+.4f}; paper at L0 32: +0.005)"
                )
    for mn in ("m2n4", "m4n8"):
        if f"kron_{mn}_mand" in ev and f"kron_{mn}_relu" in ev:
            lines.append(
                f"- equal tokens, {mn}: mAND {ev[f'kron_{mn}_mand']:.4f} vs ReLU·ReLU "
                f"{ev[f'kron_{mn}_relu']:.4f} (Δ {ev[f'kron_{mn}_mand'] - ev[f'kron_{mn}_relu']:+.4f}; "
                "paper +0.0117)"
            )
    budgets = ("8", "16", str(args.k))
    for hierarchical, plain, label in (
        ("kron_m2n4_mand_hier", "kron_m2n4_mand", "hierarchical KronSAE (2, 4) vs plain-loss KronSAE (2, 4)"),
        ("topk_hier", "topk", "for reference, HierarchicalTopK vs TopK (same tokens)"),
    ):
        if hierarchical in results and plain in results:
            h, p = results[hierarchical]["ev"], results[plain]["ev"]
            pairs = " / ".join(f"{h[b]['explained_variance']:.4f} vs {p[b]['explained_variance']:.4f}" for b in budgets)
            lines.append(f"- {label}, EV at k' = 8 / 16 / 32: {pairs}")
    lines.append(
        "- dead latents: every KronSAE here ends with ~90% of its latents dead (TopK: 3%), AuxK off, ~40-85 "
        "steps; the paper reports the opposite tendency (fewer dead latents for KronSAE) at 125M tokens. At "
        "this scale the KronSAEs reach their EV with ~400 live latents."
    )
    lines.append(
        "- wall-clock: the shared CPU's load changed during this run (the last two SAEs ran ~4x faster per "
        "token, which their architecture does not explain: the hierarchical one does strictly more work than "
        "the plain (2, 4) one), so the seconds-per-token column is NOT comparable across rows; see section 4 "
        "(bench_sae_step.py) for KronSAE vs TopK step cost measured side by side. Ratios as measured:"
    )
    if "topk" in results:
        t = results["topk"]["seconds_per_million_tokens"]
        for name, r in results.items():
            if name != "topk":
                lines.append(f"- wall-clock per token, {name} / topk: {r['seconds_per_million_tokens'] / t:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
