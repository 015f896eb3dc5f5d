"""KronSAE vs TopK at equal training FLOPs, mAND vs ReLU·ReLU at equal tokens, and the hierarchical KronSAE
(issue 7.2) on the real Gemma 3 270M, resid of layer 6.

The training CLI trains KronSAEs only with the hierarchical loss, one (m, n) per run and mAND only (no
``kron_activation`` option), so this script harvests the activations once (training/harvest.py, the CLI's harvester)
and trains every variant itself with the CLI's recipe (experiments/common.train_sae: activation scale, b_dec init,
AdamW at hf_sae.scaled_learning_rate, warm-up + cosine, clipping, decoder maintenance via
hf_sae.train_step.training_step, AuxK off, scale folded at the end).

Iso-FLOPs (the KronSAE paper's protocol): the encoder dominates the training cost, d_in·F multiply-adds per token
for TopK vs d_in·h·(m+n) for KronSAE (F = h·m·n), forward and backward alike. So a KronSAE gets
F / (h·(m+n)) = m·n / (m+n) times the TopK SAE's tokens: 8/6 = 1.33x for (2, 4), 32/12 = 2.67x for (4, 8).
The decoder side (sparse, k·d_in) and the TopK selection are the same for both and left out of the count.

Command (what docs/results.md reports):

    python experiments/kron_isoflops.py --tokens 131072 --seed 0
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import (  # noqa: E402
    ROOT,
    harvest,
    lm_losses,
    load_model,
    markdown_table,
    recovered,
    seed_everything,
    train_sae,
    update_results,
    windows,
    write_json,
)


def variants(tokens: int) -> list[dict]:
    """name, kind, (m, n), activation, hierarchical, training tokens (iso-FLOPs for KronSAE vs TopK), in the order
    they are trained (the most important first: each result is written as soon as it exists)."""

    def iso(m, n):
        return int(round(tokens * m * n / (m + n) / 4096)) * 4096

    def kron(m, n, act, hier=False):
        return dict(
            name=f"kron_m{m}n{n}_{'mand' if act == 'mand' else 'relu'}{'_hier' if hier else ''}",
            kind="kron",
            mn=(m, n),
            act=act,
            hier=hier,
            tokens=iso(m, n),
        )

    return [
        dict(name="topk", kind="topk", mn=None, act=None, hier=False, tokens=tokens),
        kron(2, 4, "mand"),
        kron(4, 8, "mand"),
        kron(2, 4, "relu_product"),
        kron(2, 4, "mand", hier=True),
        dict(name="topk_hier", kind="topk", mn=None, act=None, hier=True, tokens=tokens),
        kron(4, 8, "relu_product"),
    ]


DEFAULT_VARIANTS = ["topk", "kron_m2n4_mand", "kron_m4n8_mand", "kron_m2n4_relu", "kron_m2n4_mand_hier"]


def build(v: dict, d_in: int, d_sae: int, k: int):
    from hf_sae import HierarchicalSAE, HierarchicalSAEConfig, KronSAE, KronSAEConfig

    common = dict(
        d_in=d_in, d_sae=d_sae, k=k, auxk=False, hook_layer=6, hook_site="resid", base_model="google/gemma-3-270m"
    )
    if v["kind"] == "topk":
        return HierarchicalSAE(HierarchicalSAEConfig(**common, hierarchical=v["hier"]))
    m, n = v["mn"]
    return KronSAE(KronSAEConfig(**common, base_dim=m, ext_dim=n, kron_activation=v["act"], hierarchical=v["hier"]))


def encoder_flops(v: dict, d_in: int, d_sae: int) -> int:
    """Encoder multiply-adds x 2 (fwd) x 3 (fwd + bwd) per token."""
    cols = d_sae if v["kind"] == "topk" else d_sae // (v["mn"][0] * v["mn"][1]) * sum(v["mn"])
    return 6 * d_in * cols


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
        import json

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
        torch.save(data, cache)
    print(f"train activations {tuple(data.shape)} ({time.perf_counter() - started:.0f} s)", flush=True)
    x_eval = harvest(model, tokenizer, [key], "validation", args.eval_tokens)[key].float()
    ids, mask = windows(tokenizer, "validation", args.lm_windows)

    from hf_sae.metrics import budget_metrics, dead_fraction

    results = {}
    results_path = args.out / "kron_results.json"
    if results_path.exists():
        import json

        results = json.loads(results_path.read_text())["results"]
    d_in = data.shape[1]
    for v in todo:
        torch.manual_seed(args.seed)
        sae = build(v, d_in, args.d_sae, args.k)
        timing = train_sae(sae, data, v["tokens"], seed=args.seed, name=v["name"], b_dec_init="geometric_median")
        sae.save_pretrained(args.out / v["name"])
        budgets = [8, 16, args.k]
        ev = {str(b): m for b, m in budget_metrics(sae, x_eval, budgets).items()}
        with torch.no_grad():
            lat = sae.encode(x_eval)
        losses = lm_losses(model, ids, mask, {"spliced": (sae, args.k)}, ablate_sae=sae)
        results[v["name"]] = {
            **{key_: (list(val) if isinstance(val, tuple) else val) for key_, val in v.items()},
            **timing,
            "ev": ev,
            "dead_eval": dead_fraction(lat.indices, lat.values, sae.config.d_sae),
            "encoder_flops_per_token": encoder_flops(v, d_in, args.d_sae),
            "ce_recovered": recovered(losses["clean"], losses["spliced"], losses["ablated"]),
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
recipe; the CLI itself cannot do this: it has no `kron_activation` option, trains KronSAEs only with the
hierarchical loss, and takes one (m, n) per run). Iso-FLOPs: a KronSAE gets m·n/(m+n) times TopK's
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
    if "kron_m2n4_mand_hier" in results and "kron_m2n4_mand" in results:
        h, p = results["kron_m2n4_mand_hier"]["ev"], results["kron_m2n4_mand"]["ev"]
        lines.append(
            "- hierarchical KronSAE (2, 4) vs plain-loss KronSAE (2, 4), EV at k' = 8 / 16 / 32: "
            + " / ".join(
                f"{h[b]['explained_variance']:.4f} vs {p[b]['explained_variance']:.4f}"
                for b in ("8", "16", str(args.k))
            )
        )
    if "topk_hier" in results and "topk" in results:
        h, p = results["topk_hier"]["ev"], results["topk"]["ev"]
        lines.append(
            "- for reference, HierarchicalTopK vs TopK (same tokens), EV at k' = 8 / 16 / 32: "
            + " / ".join(
                f"{h[b]['explained_variance']:.4f} vs {p[b]['explained_variance']:.4f}"
                for b in ("8", "16", str(args.k))
            )
        )
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
    return "\n".join(lines) if math.isfinite(len(lines)) else ""


if __name__ == "__main__":
    main()
