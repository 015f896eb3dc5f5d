"""An automatic interpretability proxy (issue 18, item 6) for the Pareto SAEs of experiments/pareto.py.

No LLM judge runs offline, so this measures how *token-specific* each latent is on the 65,536 held-out tokens of the
Pareto experiment (Gemma 3 270M, resid of layer 6), per SAE and budget:

- **top-20 purity**: for each latent that fires on at least 20 held-out tokens at that budget, the share of its 20
  strongest activations whose token (lower-cased, word-boundary marker and spaces stripped) is the most common one
  among those 20. 1.0: the latent's top examples are one word; the chance level (20 random held-out tokens) is
  printed beside it;
- **token F1**: for the same latents, the F1 of "the latent fires" as a detector of its most frequent token over all
  of its firings (precision: the share of its firings on that token; recall: the share of that token's occurrences
  where it fires);
- **coverage**: the share of the d_sae latents that fire at least 20 times (the others are not scored).

Both scores reward latents that track one token; a latent that tracks a context, a syntactic role or a topic scores
low though a person may find it clear. At layer 6 of 18 many features are contextual, so the absolute values are
not an interpretability rate; the comparison between SAEs on the same tokens is the point: the HierarchicalTopK
paper (arXiv 2505.24473) reports that a TopK SAE trained at a large k loses interpretability while the hierarchical
SAE's latents stay interpretable up to its K. Only the final SAEs of the finished runs are scored (seed 0's six; the
BatchTopK / Matryoshka baselines, a run of their own, when it has finished).

Command (needs the Pareto runs; writes experiments/results/interp_proxy.json, docs/interp_proxy.png and the section
of docs/results.md):

    python experiments/interp_proxy.py            # --report: only the plot and the section, from the JSON
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import matplotlib
import matplotlib.pyplot as plt
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import DOCS, load_model, markdown_table, update_results, windows, write_json  # noqa: E402
from experiments.pareto import (  # noqa: E402
    CACHE,
    MAIN,
    PLAN,
    RESULTS_DIR,
    TOPK,
    describe,
    load_folded,
    run_folder,
    save,
    sources,
)
from hf_sae.sites import resolve_site  # noqa: E402
from training.harvest import ActivationHarvester  # noqa: E402

matplotlib.use("Agg")

TOP = 20  # the examples per latent, as an auto-interpretation pipeline would show a judge


def held_out_tokens(harvester, tokenizer, tokens: int, cache_windows: int) -> torch.Tensor:
    """The token ids (N,) of the Pareto held-out activations, in their order: the training split's windows after the
    cache's, with the rows the harvester keeps (its ``keep_mask``: BOS and padding dropped)."""
    ids, mask = windows(tokenizer, "train", tokens // 100 + 16, skip_windows=cache_windows)
    kept = ids[harvester.keep_mask(ids, mask)]
    if kept.numel() < tokens:
        raise SystemExit(f"only {kept.numel():,} held-out tokens after {cache_windows:,} windows; need {tokens:,}")
    return kept[:tokens]


def word_ids(tokenizer, ids: torch.Tensor) -> torch.Tensor:
    """Each token id mapped to the id of its normalised word (lower case, word-boundary marker and spaces stripped),
    so "▁The" and "the" count as one token class."""
    vocabulary = torch.unique(ids)
    words: dict[str, int] = {}
    table = torch.zeros(int(vocabulary.max()) + 1, dtype=torch.long)
    for token_id, piece in zip(vocabulary.tolist(), tokenizer.convert_ids_to_tokens(vocabulary.tolist())):
        table[token_id] = words.setdefault(piece.replace("▁", " ").strip().lower(), len(words))
    return table[ids]


def token_scores(indices: torch.Tensor, values: torch.Tensor, words: torch.Tensor, d_sae: int) -> dict:
    """Top-20 purity, token F1 and coverage of one SAE at one budget.

    indices, values: (N, k) the selected latents per token (values 0 for padding); words: (N,) word ids.
    Vectorised: the firings are sorted by latent, then by activation descending, so each latent's top 20 are the
    first 20 of its run; (latent, word) pairs are counted with one ``unique``.
    """
    n, k = indices.shape
    fired = values.reshape(-1) > 0
    latent = indices.reshape(-1)[fired]
    value = values.reshape(-1)[fired]
    word = words.repeat_interleave(k)[fired]
    by_value = torch.argsort(value, descending=True, stable=True)
    order = by_value[torch.argsort(latent[by_value], stable=True)]  # grouped by latent, strongest first
    latent, word = latent[order], word[order]
    counts = torch.bincount(latent, minlength=d_sae)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(latent.numel()) - start[latent]
    scored = counts >= TOP
    n_words = int(words.max()) + 1

    def modal(lat: torch.Tensor, wrd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per latent: the count of its most common word, and that word (the smallest id among ties)."""
        pairs, pair_counts = torch.unique(lat * n_words + wrd, return_counts=True)
        lat_of, word_of = pairs // n_words, pairs % n_words
        best = torch.zeros(d_sae, dtype=torch.long).scatter_reduce(0, lat_of, pair_counts, "amax")
        is_best = pair_counts == best[lat_of]
        chosen = torch.full((d_sae,), n_words, dtype=torch.long)
        chosen = chosen.scatter_reduce(0, lat_of[is_best], word_of[is_best], "amin")
        return best, chosen

    top = rank < TOP
    top_best, _ = modal(latent[top], word[top])
    purity = top_best[scored].float() / TOP
    all_best, all_word = modal(latent, word)
    frequency = torch.bincount(words, minlength=n_words + 1)
    precision = all_best[scored].float() / counts[scored].float()
    recall = all_best[scored].float() / frequency[all_word[scored]].float()
    f1 = 2 * precision * recall / (precision + recall)
    return {
        "purity": float(purity.mean()) if scored.any() else float("nan"),
        "token_f1": float(f1.mean()) if scored.any() else float("nan"),
        "coverage": float(scored.float().mean()),
        "scored_latents": int(scored.sum()),
    }


def chance_purity(words: torch.Tensor, draws: int = 4000, seed: int = 0) -> float:
    """The purity of 20 held-out tokens drawn at random: the floor a latent with no token preference reaches."""
    generator = torch.Generator().manual_seed(seed)
    picks = words[torch.randint(0, words.numel(), (draws, TOP), generator=generator)]
    counts = torch.zeros(draws, int(words.max()) + 1, dtype=torch.long)
    counts.scatter_add_(1, picks, torch.ones_like(picks))
    return float(counts.max(1).values.float().mean() / TOP)


def finished_runs() -> list[tuple[int, list[str], dict]]:
    """(seed, labels, the newest source) of the Pareto runs of PLAN whose training finished."""
    runs = []
    for seed, labels in PLAN:
        args = SimpleNamespace(saes=labels, run=run_folder(seed, labels), layer=6, d_sae=4096)
        if (args.run / "metrics.json").exists():
            runs.append((seed, labels, sources(args)[-1]))
    return runs


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-tokens", type=int, default=65536)
    parser.add_argument("--report", action="store_true", help="only the plot and the section, from the results JSON")
    args = parser.parse_args()
    if args.report:
        saved = json.loads((RESULTS_DIR / "interp_proxy.json").read_text())
        plot(saved["rows"], saved["chance_purity"], DOCS / "interp_proxy.png")
        update_results("interp", section(saved["rows"], saved["chance_purity"], saved["tokens"]))
        return
    runs = finished_runs()
    if not runs or runs[0][0] != 0:
        raise SystemExit("the Pareto seed-0 run has not finished: run `python experiments/pareto.py --train` first.")
    cache_windows = json.loads((CACHE / "manifest.json").read_text())["windows"]
    held = run_folder(0, MAIN) / f"held_out_L6_{args.eval_tokens}_after_{cache_windows}.pt"
    x = torch.load(held)
    model, tokenizer = load_model("bfloat16")
    excluded = sorted({tokenizer.bos_token_id, tokenizer.pad_token_id} - {None})
    harvester = ActivationHarvester(model, [resolve_site(model, 6, "resid")], excluded)
    ids = held_out_tokens(harvester, tokenizer, x.shape[0], cache_windows)
    check_alignment(harvester, tokenizer, x, cache_windows)
    words = word_ids(tokenizer, ids)
    chance = chance_purity(words)
    print(f"{x.shape[0]:,} held-out tokens, {int(words.max()) + 1:,} distinct words; chance purity {chance:.4f}")

    results = []
    for seed, labels, source in runs:
        for label in labels:
            if seed != 0 and not label.startswith(("batchtopk", "matryoshka")):
                continue  # the repeated seeds only add the baselines here
            sae = load_folded(source["folders"][label], label)
            latents = sae.encode(x)
            if label.startswith(("batchtopk", "matryoshka")):
                budgets = [("thr", latents)]
            elif label.startswith("hier") or label == "topk64":
                budgets = [(str(b), latents.truncate(b)) for b in TOPK]
            else:
                budgets = [(label[4:], latents)]
            for budget, part in budgets:
                name = describe(label)
                if label == "topk64" and budget != "64":
                    name = f"TopK K=64 truncated to k'={budget}"
                score = token_scores(part.indices, part.values, words, sae.config.d_sae)
                l0 = float((part.values > 0).sum(-1).float().mean())
                results.append({"sae": name, "label": label, "budget": budget, "seed": seed, "l0": l0, **score})
                print(f"{name} @ {budget}: {score}", flush=True)
    write_json(RESULTS_DIR / "interp_proxy.json", {"chance_purity": chance, "tokens": x.shape[0], "rows": results})
    plot(results, chance, DOCS / "interp_proxy.png")
    update_results("interp", section(results, chance, x.shape[0]))


def check_alignment(harvester, tokenizer, x: torch.Tensor, cache_windows: int) -> None:
    """The token ids line up with the saved activations: one LM batch of the same windows gives the same rows."""
    ids, mask = windows(tokenizer, "train", 4, skip_windows=cache_windows)
    rows = next(iter(harvester(ids, mask).values())).float()
    if not torch.allclose(rows, x[: rows.shape[0]], atol=1e-2, rtol=1e-2):
        raise SystemExit("the held-out token ids do not line up with the saved activations (a different harvest?)")


def plot(results: list[dict], chance: float, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    groups = (
        ("TopK k=", "o-", "black", "separate TopK SAEs"),
        ("HierarchicalTopK", "s-", "tab:red", "one HierarchicalTopK SAE (K = 64) at k'"),
        ("TopK K=64 truncated", "^--", "tab:blue", "TopK K = 64 truncated to k'"),
    )
    for ax, metric, ylabel in ((left, "purity", "top-20 token purity"), (right, "token_f1", "token F1")):
        for prefix, style, color, label in groups:
            rows = [r for r in results if r["sae"].startswith(prefix)]
            ax.plot([r["l0"] for r in rows], [r[metric] for r in rows], style, color=color, label=label)
        for r in results:
            if r["budget"] == "thr":
                ax.plot([r["l0"]], [r[metric]], "D" if "Matryoshka" not in r["sae"] else "P", ms=9, label=r["sae"])
        if metric == "purity":
            ax.axhline(chance, color="grey", lw=1, ls=":", label=f"chance ({chance:.3f})")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Token-specificity proxy on 65,536 held-out tokens (Gemma 3 270M resid L6, d_sae 4096)", fontsize=10)
    save(fig, path)


def section(results: list[dict], chance: float, tokens: int) -> str:
    rows = [
        [
            r["sae"],
            r["budget"] if r["budget"] != "thr" else "threshold",
            r["seed"],
            r["l0"],
            r["purity"],
            r["token_f1"],
            f"{100 * r['coverage']:.1f}%",
        ]
        for r in results
    ]
    table = markdown_table(["SAE", "k'", "seed", "L0", "top-20 purity", "token F1", "coverage (≥20 firings)"], rows)
    by = {(r["label"], r["budget"]): r for r in results}
    sep = [by[(f"topk{k}", str(k))]["purity"] for k in TOPK]
    hier = [by[("hier64", str(k))]["purity"] for k in TOPK]
    trend_sep = "falls" if sep[-1] < sep[0] else "does not fall"
    hier_vs = [f"k'={k} {h:.3f} vs {s:.3f}" for k, h, s in zip(TOPK, hier, sep)]
    above = [k for k, h, s in zip(TOPK, hier, sep) if h >= s]
    verdict = (
        "holds on this proxy"
        if len(above) == len(TOPK)
        else "does not hold on this proxy"
        if not above
        else "holds on this proxy only at k' ∈ {" + ", ".join(map(str, above)) + "}"
    )
    return f"""## 6. Interpretability proxy: token specificity of the latents

No LLM judge runs offline. `experiments/interp_proxy.py` scores, on the {tokens:,} held-out tokens of section 1, how
token-specific the latents of each Pareto SAE are at each budget. **Top-20 purity** is the share of a latent's 20
strongest activations whose (normalised) token is the most common token among those 20; chance is {chance:.3f}
(20 random held-out tokens). **Token F1** is the F1 of "the latent fires" as a detector of its most frequent token.
Both are averaged over the latents that fire ≥ 20 times at that budget (**coverage**). Limits: both reward latents
that track one token. A latent that tracks a context, a role or a topic scores low though it may be clear to a
reader, and at layer 6 of 18 many are contextual. Coverage differs between SAEs, so each mean is over a
different set of latents (at a small budget the rarely firing latents are not scored).
So the values are no interpretability rate: only the comparison
between SAEs on the same tokens carries information. The scores use one seed (seed
{", ".join(sorted({str(r["seed"]) for r in results}))}) and have no error bars.

Command: `python experiments/interp_proxy.py` (numbers: `experiments/results/interp_proxy.json`).

![token-specificity proxy against L0](interp_proxy.png)

{table}

**The claim beside the measurement.** The HierarchicalTopK paper (arXiv 2505.24473) reports that a TopK SAE
trained at a larger k has less interpretable latents, while one hierarchical SAE keeps them interpretable up to its
K. On this proxy, the separate TopK SAEs' purity {trend_sep} from k=4 to k=64 ({sep[0]:.3f} → {sep[-1]:.3f}). The
hierarchical SAE at each k' vs the separate SAE: {", ".join(hier_vs)}, so it is at or above the separate SAE at k' ∈
{{{", ".join(map(str, above)) or "–"}}}: the claim **{verdict}** (one seed; the proxy measures token specificity
only, and the hierarchical SAE's latents are scored on more of its latents at small k', see coverage).
{baseline_text(by)}"""


def baseline_text(by: dict) -> str:
    """The BatchTopK / Matryoshka rows beside TopK k=16 and the hierarchical SAE at k'=16 (same L0), if scored."""
    btk, mat = by.get(("batchtopk16", "thr")), by.get(("matryoshka16", "thr"))
    if not (btk and mat):
        return ""
    topk, hier = by[("topk16", "16")], by[("hier64", "16")]
    return (
        f"\nAt L0 ≈ 16 the two BatchTopK-family SAEs have the purest top activations: Matryoshka {mat['purity']:.3f}, "
        f"BatchTopK {btk['purity']:.3f}, against TopK k=16 {topk['purity']:.3f} and the hierarchical SAE at k'=16 "
        f"{hier['purity']:.3f}; their token F1 is lower ({mat['token_f1']:.3f}, {btk['token_f1']:.3f} vs "
        f"{topk['token_f1']:.3f}, {hier['token_f1']:.3f}): their strongest activations are one word, but they fire "
        "on many other tokens too. Matryoshka's claim of more interpretable (more specific) latents than BatchTopK: "
        + {
            2: "**holds on this proxy** (one seed, both scores higher).\n",
            1: "**inconclusive on this proxy** (one seed, the two scores disagree).\n",
            0: "**does not hold on this proxy** (one seed, neither score higher).\n",
        }[(mat["purity"] > btk["purity"]) + (mat["token_f1"] > btk["token_f1"])]
    )


if __name__ == "__main__":
    main()
