"""HierarchicalTopK Pareto experiment (issue 7.1) on the real Gemma 3 270M, resid of layer 6.

One multi-SAE training run (one harvest, the same tokens for every SAE): separate TopK SAEs at k in
{4, 8, 16, 32, 64}, and one HierarchicalSAE with K = 64. The TopK k = 64 SAE doubles as the "just truncate a TopK
SAE" baseline: evaluated at k' < 64 by keeping the first k' of its sorted latents. Then, on held-out text
(the corpus' validation split): EV and L0 at every budget, CE loss recovered (reconstruction spliced into the model,
zero-ablation as the 0% point), dead fraction; the EV-vs-L0 plot docs/pareto.png; the table into docs/results.md.

Command (what docs/results.md reports; ~15 min of CPU on 2 busy cores; AuxK is off: on this CPU its k_aux = 320 dead
latents per token made every step ~4x slower once latents died):

    python experiments/pareto.py --train --tokens 262144 --seed 0

``--train`` runs ``python -m training.train ...`` (printed) unless runs/pareto/metrics.json exists;
without it only the evaluation runs on the existing run folder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import (  # noqa: E402
    DOCS,
    ROOT,
    HeldOut,
    command_text,
    load_model,
    markdown_table,
    recovered,
    seed_everything,
    train_once,
    training_command,
    update_results,
    write_json,
)
from hf_sae import load_sae  # noqa: E402
from hf_sae._io import atomic_path  # noqa: E402

matplotlib.use("Agg")

TOPK = [4, 8, 16, 32, 64]


def train_command(args) -> list[str]:
    saes = [f"arch=topk,k={k}" for k in TOPK] + [f"arch=hierarchical,k={args.K}"]
    placement = ["--layer", str(args.layer), "--site", "resid"]
    return training_command(
        placement, saes, d_sae=args.d_sae, tokens=args.tokens, seed=args.seed, eval_tokens=32768, run=args.run
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "pareto")
    parser.add_argument("--train", action="store_true", help="train first (unless the run folder has metrics.json)")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--K", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=262144)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-tokens", type=int, default=32768, help="held-out tokens for EV / L0 / dead")
    parser.add_argument("--lm-windows", type=int, default=8, help="held-out windows of 128 tokens for CE")
    args = parser.parse_args()
    seed_everything(args.seed)

    train_metrics = train_once(train_command(args), args.run, args.train)
    names = {f"topk{k}": f"L{args.layer}_resid_topk_k{k}_d{args.d_sae}" for k in TOPK}
    names["hier64"] = f"L{args.layer}_resid_hierarchical_k{args.K}_d{args.d_sae}"
    saes = {label: load_sae(args.run / name).eval() for label, name in names.items()}

    started = time.perf_counter()
    model, tokenizer = load_model("bfloat16")
    # EV / L0 / dead on held-out activations, CE on held-out windows (both from the validation split)
    held_out = HeldOut(model, tokenizer, args.layer, args.eval_tokens, args.lm_windows)
    budgets_all = [1, 2, 4, 8, 16, 32, 48, 64]
    ev = {}
    for label, sae in saes.items():
        metrics, dead = held_out.budgets(sae, [b for b in budgets_all if b <= sae.config.k])
        ev[label] = {**metrics, "dead_eval": dead}
    print(f"EV done ({time.perf_counter() - started:.0f} s)", flush=True)

    # CE loss recovered (clean and zero-ablation once, one spliced pass per SAE x budget)
    splices = {f"topk{k}@{k}": (saes[f"topk{k}"], k) for k in TOPK}
    for k in TOPK[:-1]:
        splices[f"hier64@{k}"] = (saes["hier64"], k)
        splices[f"trunc64@{k}"] = (saes["topk64"], k)
    splices["hier64@64"] = (saes["hier64"], 64)
    losses = held_out.losses(splices, ablate_sae=saes["topk64"])
    print(f"CE done ({time.perf_counter() - started:.0f} s): {losses}", flush=True)

    rows, results = [], []
    for k in TOPK:
        for label, sae_label, desc in (
            (f"topk{k}@{k}", f"topk{k}", f"TopK k={k} (separate)"),
            (f"hier64@{k}", "hier64", f"HierarchicalTopK K=64 at k'={k}"),
            (f"trunc64@{k}", "topk64", f"TopK K=64 truncated to k'={k}"),
        ):
            if label not in losses or (label.startswith("trunc") and k == 64):
                continue
            m = ev[sae_label][str(k)]
            dead_train = train_metrics["saes"][names[sae_label]]["dead_fraction"]
            result = {
                "sae": desc,
                "budget": k,
                "ev": m["explained_variance"],
                "l0": m["l0"],
                "ce_recovered": recovered(losses, label),
                "spliced_loss": losses[label],
                "dead_train": dead_train,
                "dead_eval": ev[sae_label]["dead_eval"],
            }
            results.append(result)
            rows.append(
                [
                    desc,
                    k,
                    result["l0"],
                    result["ev"],
                    result["ce_recovered"],
                    result["spliced_loss"],
                    f"{100 * dead_train:.1f}%",
                    f"{100 * result['dead_eval']:.1f}%",
                ]
            )
    write_json(
        args.run / "pareto_results.json",
        {"ev": ev, "losses": losses, "rows": results, "args": {k: str(v) for k, v in vars(args).items()}},
    )
    plot(ev, DOCS / "pareto.png", train_metrics["run"]["tokens"])
    table = markdown_table(
        ["SAE", "k'", "L0", "EV", "CE loss recovered", "spliced loss", "dead (train)", "dead (held-out)"], rows
    )
    verdict = compare(results)
    text = f"""## 1. HierarchicalTopK vs separate TopK vs truncated TopK (Pareto)

Gemma 3 270M (embedded, bf16), resid of layer 6, d_sae {args.d_sae}, {train_metrics["run"]["tokens"]:,} training
tokens for every SAE from one harvest (`training.train`, batch 4096, AuxK off, seed {args.seed}); evaluation on the
held-out validation split: EV / L0 / dead on {held_out.x.shape[0]:,} tokens, CE loss on {losses["tokens"]:,} predicted
tokens ({args.lm_windows} windows of 128). Clean loss {losses["clean"]:.4f}, zero-ablated {losses["ablated"]:.4f}.
The TopK k=64 SAE is also the truncation baseline (its first k' sorted latents).

Command: `python experiments/pareto.py --train --tokens {args.tokens} --seed {args.seed}`
(training: `{command_text(train_command(args))}`)

![EV against L0](pareto.png)

{table}

{verdict}
"""
    update_results("pareto", text)
    print(text)


def compare(results: list[dict]) -> str:
    by = {(r["sae"].split(" ")[0] + ("T" if "truncated" in r["sae"] else ""), r["budget"]): r for r in results}
    lines = [
        "**What we see vs the paper's claim** (HierarchicalTopK: one SAE on or above the separate-TopK frontier "
        "at every budget, far above truncated TopK):",
        "",
    ]
    for k in TOPK:
        sep, hier = by.get(("TopK", k)), by.get(("HierarchicalTopK", k))
        trunc = by.get(("TopKT", k))
        if not (sep and hier):
            continue
        line = (
            f"- k'={k}: hierarchical EV {hier['ev']:.4f} vs separate {sep['ev']:.4f} "
            f"(Δ {hier['ev'] - sep['ev']:+.4f}); CE recovered {hier['ce_recovered']:.4f} vs "
            f"{sep['ce_recovered']:.4f} (Δ {hier['ce_recovered'] - sep['ce_recovered']:+.4f})"
        )
        if trunc:
            line += (
                f"; truncated TopK-64 EV {trunc['ev']:.4f} (hierarchical − truncated "
                f"{hier['ev'] - trunc['ev']:+.4f}), CE recovered {trunc['ce_recovered']:.4f}"
            )
        lines.append(line)
    return "\n".join(lines)


def plot(ev: dict, path: Path, tokens: int) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.6))
    sep = [(ev[f"topk{k}"][str(k)]["l0"], ev[f"topk{k}"][str(k)]["explained_variance"]) for k in TOPK]
    ax.plot(*zip(*sep), "o-", color="black", lw=2, label="separate TopK SAEs (k = 4…64)")
    for k, (l0, e) in zip(TOPK, sep):
        ax.annotate(f"k={k}", (l0, e), textcoords="offset points", xytext=(4, -12), fontsize=8)

    def curve(label):
        budgets = [b for b in ev[label] if b.isdigit()]
        return [ev[label][b]["l0"] for b in budgets], [ev[label][b]["explained_variance"] for b in budgets]

    ax.plot(*curve("hier64"), "s-", color="tab:red", label="one HierarchicalTopK SAE (K = 64) at k'")
    ax.plot(*curve("topk64"), "^--", color="tab:blue", label="TopK K = 64 truncated to k'")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("L0 (active latents per token)")
    ax.set_ylabel("explained variance (held-out)")
    ax.set_title(f"Gemma 3 270M, resid L6, d_sae 4096, {tokens:,} tokens each")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
