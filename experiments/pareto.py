"""HierarchicalTopK Pareto experiment (issue 18, item 2) on the real Gemma 3 270M, resid of layer 6.

One activation cache (harvested once, bf16, outside git), multi-SAE training runs from it (every SAE of a run sees
the same tokens, several epochs), d_sae 4096, AuxK on (the package default recipe), 5,242,880 training tokens each,
a checkpoint every 128 steps (524,288 tokens) kept for the training curve:

- seed 0: separate TopK SAEs at k in {4, 8, 16, 32, 64} and one HierarchicalSAE with K = 64; the TopK k = 64 SAE
  doubles as the "just truncate a TopK SAE" baseline (its first k' sorted latents);
- seeds 1 and 2: TopK k in {4, 8} and HierarchicalSAE K = 64;
- seed 0 again: BatchTopK k = 16 and Matryoshka BatchTopK k = 16 (the two baselines at the L0 of TopK 16; both
  evaluated with their inference threshold, so their L0 is measured). On this CPU their steps cost several times a
  TopK step: a run of these two with TopK 4, TopK 8 and the hierarchical SAE took ~12 s per step on one core, the
  three alone ~1.1 s, so this run did not fit the session that ran the others.

Seeds 1 and 2 repeat the comparisons where the gap "hierarchical - separate" is largest (small k) with their own
initialisation and data order (the CPU time of this 2-core machine allowed no more); the report pairs the seeds and
says which gaps exceed the seed spread.

Per run, held out: EV / L0 / dead latents on 65,536 tokens of the training split *after* the cache's windows (no SAE
saw them; the validation split holds only ~55k tokens), at every budget, for every saved checkpoint and the final
SAEs (the training curve, and the gap "hierarchical - separate" at each k against tokens); CE loss recovered (the
reconstruction spliced into the model, zero-ablation as the 0% point) on 66 windows of the validation split (8,316
predicted tokens), for the newest SAEs at every budget. Per-run numbers: experiments/results/pareto_seed<seed>*.json.
The report over all runs: docs/pareto.png (EV vs L0), docs/pareto_ce.png (CE recovered vs L0),
docs/pareto_curves.png (EV and the gap vs tokens) and the section of docs/results.md.

Commands (each re-runs or resumes every stage: an unfinished harvest continues with --resume, a stopped training run
from its newest checkpoint; ``--max-train-minutes`` stops training cleanly after that long, SIGTERM: a checkpoint at
the next step, and evaluates what is saved):

    nice -n 5 python experiments/pareto.py --all            # the three runs one after the other, then the report
    nice -n 5 python experiments/pareto.py --train --seed 1 --saes topk4,topk8,hier64
    python experiments/pareto.py --report                   # only the report, from the per-run numbers

Without ``--train`` a run is only evaluated, on what its folder holds (the final SAEs if training finished, else its
checkpoints; the report then says the numbers are interim).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import (  # noqa: E402
    DOCS,
    ROOT,
    command_text,
    harvest,
    lm_losses,
    load_model,
    markdown_table,
    mean_std,
    paired_stats,
    pm,
    recovered,
    run_stage,
    same_index_rates,
    seed_everything,
    train_from_cache,
    training_command,
    update_results,
    windows,
    write_json,
)
from hf_sae import load_sae  # noqa: E402
from hf_sae._io import atomic_path  # noqa: E402
from hf_sae.metrics import dead_fraction, fvu, l0, shrinkage  # noqa: E402
from training.checkpoint import checkpoint_dirs  # noqa: E402

matplotlib.use("Agg")

TOPK = [4, 8, 16, 32, 64]
BUDGETS = [1, 2, 4, 8, 16, 32, 48, 64]
MAIN = [f"topk{k}" for k in TOPK] + ["hier64"]
PLAN = [
    (0, MAIN),
    (1, ["topk4", "topk8", "hier64"]),
    (2, ["topk4", "topk8", "hier64"]),
    (0, ["batchtopk16", "matryoshka16"]),
]
CACHE = Path.home() / ".cache" / "hf_sae" / "acts" / "gemma3-270m-L6-resid"
RESULTS_DIR = ROOT / "experiments" / "results"
# label prefix -> (the training CLI's arch name, the saved model_type, trained with the hierarchical loss)
KINDS = {
    "topk": ("topk", "hierarchical_sae", False),
    "hier": ("hierarchical", "hierarchical_sae", True),
    "batchtopk": ("batchtopk", "batchtopk_sae", False),
    "matryoshka": ("matryoshka", "matryoshka_sae", False),
}
VARIABLE_L0 = {"batchtopk", "matryoshka"}  # evaluated at their inference threshold: budget key "thr"


def parse_label(label: str) -> tuple[str, int]:
    """``topk16`` -> ("topk", 16); the kinds are those of KINDS."""
    kind = label.rstrip("0123456789")
    if kind not in KINDS or kind == label:
        raise SystemExit(
            f"--saes: {label!r} is not a Pareto SAE label; use {'/'.join(KINDS)} followed by k, e.g. topk16,hier64."
        )
    return kind, int(label[len(kind) :])


def describe(label: str) -> str:
    kind, k = parse_label(label)
    return {
        "topk": f"TopK k={k} (separate)",
        "hier": f"HierarchicalTopK K={k}",
        "batchtopk": f"BatchTopK k={k} (threshold)",
        "matryoshka": f"Matryoshka BatchTopK k={k} (threshold)",
    }[kind]


def run_folder(seed: int, labels: list[str]) -> Path:
    name = "pareto-cache" if seed == 0 and labels == MAIN else f"pareto-seed{seed}-{'-'.join(labels)}"
    return ROOT / "runs" / name


def record_path(seed: int, labels: list[str]) -> Path:
    suffix = "" if labels == MAIN else "_" + "-".join(labels)
    return RESULTS_DIR / f"pareto_seed{seed}{suffix}.json"


def sae_entries(args) -> dict[str, str]:
    """label -> the training CLI's --sae entry, in the run's order (checkpoint folder sae_<i> is entry i)."""
    entries = {}
    for label in args.saes:
        kind, k = parse_label(label)
        entries[label] = f"arch={KINDS[kind][0]},k={k}"
    return entries


def saved_name(label: str, args) -> str:
    kind, k = parse_label(label)
    return f"L{args.layer}_resid_{KINDS[kind][0]}_k{k}_d{args.d_sae}"


def harvest_command(args) -> list[str]:
    if (args.cache / "harvest_state.json").exists():
        return [sys.executable, "-m", "training.harvest", "--resume", str(args.cache)]
    command = [sys.executable, "-m", "training.harvest", "--layer", str(args.layer), "--site", "resid"]
    return command + ["--tokens", str(args.harvest_tokens), "--dtype", "bfloat16", "--out", str(args.cache)]


def train_command(args) -> list[str]:
    return training_command(
        ["--layer", str(args.layer), "--site", "resid"],
        list(sae_entries(args).values()),
        d_sae=args.d_sae,
        tokens=args.tokens,
        seed=args.seed,
        eval_tokens=32768,
        run=args.run,
        auxk=True,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=1000,
        activations=args.cache,
    )


def train(args) -> None:
    """Harvest the cache (or finish it), then train (or resume) until done or ``--max-train-minutes``."""
    limit = None if args.max_train_minutes is None else args.max_train_minutes * 60
    train_from_cache(args.cache, harvest_command(args), args.run, train_command(args), limit)


def sources(args) -> list[dict]:
    """What to evaluate, oldest first: every checkpoint (tokens, its SAE folders, the training dead fraction from
    its counters), then the final SAEs if the run finished (replacing the checkpoint of the same step)."""
    labels, found = args.saes, []
    for folder in checkpoint_dirs(args.run) if args.run.exists() else []:
        state = json.loads((folder / "trainer_state.json").read_text())
        counters = load_file(str(folder / "sae_state.safetensors"))
        found.append(
            {
                "where": folder.name,
                "tokens": int(state.get("tokens", state["step"] * 4096)),
                "folders": {label: folder / f"sae_{i}" for i, label in enumerate(labels)},
                "counters": {label: counters[f"sae_{i}.tokens_since_fired"] for i, label in enumerate(labels)},
            }
        )
    if (args.run / "metrics.json").exists():
        metrics = json.loads((args.run / "metrics.json").read_text())
        names = {label: saved_name(label, args) for label in labels}
        final = {
            "where": "final",
            "tokens": int(metrics["run"]["tokens"]),
            "folders": {label: args.run / names[label] for label in labels},
            "dead_train": {label: metrics["saes"][names[label]]["dead_fraction"] for label in labels},
        }
        found = [s for s in found if s["tokens"] != final["tokens"]] + [final]
    if not found:
        raise SystemExit(f"{args.run} holds no checkpoint and no final SAEs: train first (--train).")
    return found


def training_seconds(args, newest: dict) -> float | None:
    """Seconds of training behind the newest SAEs (the checkpoint's trainer state, or the finished run's metrics)."""
    if newest["where"] == "final":
        return json.loads((args.run / "metrics.json").read_text())["run"].get("train_seconds")
    return json.loads((args.run / "checkpoints" / newest["where"] / "trainer_state.json").read_text()).get("seconds")


def load_folded(folder: Path, label: str):
    """An SAE from a checkpoint or final folder, taking raw activations (a checkpoint's scale is not folded yet)."""
    sae = load_sae(folder).eval()
    kind, k = parse_label(label)
    expected = (KINDS[kind][1], k, KINDS[kind][2])
    found = (sae.config.model_type, sae.config.k, bool(sae.config.hierarchical))
    if found != expected:
        raise SystemExit(f"{folder}: expected (model_type, k, hierarchical) {expected}, found {found}")
    sae.fold_activation_scale()
    return sae


def evaluate_run(args) -> dict:
    """Evaluate one run (EV curve over its checkpoints, CE for its newest SAEs) and write its record."""
    labels = args.saes
    found = sources(args)
    finished = found[-1]["where"] == "final"
    manifest = json.loads((args.cache / "manifest.json").read_text())
    started = time.perf_counter()
    model, tokenizer = load_model("bfloat16")
    x = held_out_activations(args, model, tokenizer, manifest["windows"])
    print(f"held-out activations {tuple(x.shape)} ({time.perf_counter() - started:.0f} s)", flush=True)

    # EV / L0 / dead at every budget, for every checkpoint (the curve) and the newest SAEs; points already
    # evaluated on the same held-out tokens are read back from the run folder
    done_path = args.run / f"pareto_curve_{args.eval_tokens}.json"
    done = json.loads(done_path.read_text()) if done_path.exists() else {}
    curve = []
    for source in found:
        key = f"{source['where']}@{source['tokens']}"
        if key not in done:
            point = {"where": source["where"], "tokens": source["tokens"], "saes": {}}
            for label, folder in source["folders"].items():
                sae = load_folded(folder, label)
                point["saes"][label] = evaluate(sae, x, budgets_of(label))
                if "counters" in source:
                    dead = source["counters"][label] >= sae.config.dead_tokens
                    point["saes"][label]["dead_train"] = float(dead.float().mean())
                else:
                    point["saes"][label]["dead_train"] = source["dead_train"][label]
            done[key] = point
            write_json(done_path, done)
        curve.append(done[key])
        print(f"EV at {source['where']} ({source['tokens']:,} tokens) ({time.perf_counter() - started:.0f} s)")
    newest = found[-1]
    ev = curve[-1]["saes"]

    # CE loss recovered for the newest SAEs (clean and zero-ablation once, one spliced pass per SAE x budget),
    # cached in the run folder by checkpoint
    saes = {label: load_folded(folder, label) for label, folder in newest["folders"].items()}
    splices = ce_splices(saes)
    ce_path = args.run / f"pareto_ce_{args.lm_windows}.json"
    ce_done = json.loads(ce_path.read_text()) if ce_path.exists() else {}
    key = f"{newest['where']}@{newest['tokens']}"
    if key not in ce_done:
        ce_done[key] = earlier_losses(args, newest, splices)
    if ce_done[key] is None:
        input_ids, attention_mask = windows(tokenizer, "validation", args.lm_windows)
        ce_done[key] = lm_losses(model, input_ids, attention_mask, splices, ablate_sae=next(iter(saes.values())))
        write_json(ce_path, ce_done)
    losses = ce_done[key]
    print(f"CE done ({time.perf_counter() - started:.0f} s): {losses}", flush=True)

    results = []
    for name in splices:
        label, budget = name.split("@")
        sae_label = "topk64" if label == "trunc64" else label
        m = ev[sae_label][budget]
        results.append(
            {
                "sae": f"TopK K=64 truncated to k'={budget}" if label == "trunc64" else describe(label),
                "label": name,
                "budget": budget,
                "ev": m["explained_variance"],
                "l0": m["l0"],
                "ce_recovered": recovered(losses, name),
                "spliced_loss": losses[name],
                "dead_train": ev[sae_label]["dead_train"],
                "dead_eval": ev[sae_label]["dead_eval"],
            }
        )
    record = {
        "same_index": same_index_rates(saes),
        "seed": args.seed,
        "labels": labels,
        "run": str(args.run.relative_to(ROOT)),
        "finished": finished,
        "newest": newest["where"],
        "tokens": newest["tokens"],
        "planned_tokens": args.tokens,
        "training_seconds": training_seconds(args, newest),
        "cache": {"tokens": manifest["tokens"], "windows": manifest["windows"], "path": str(args.cache)},
        "held_out_tokens": int(x.shape[0]),
        "lm_windows": args.lm_windows,
        "curve": curve,
        "losses": losses,
        "rows": results,
        "commands": {"harvest": command_text(harvest_command(args)), "train": command_text(train_command(args))},
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    write_json(record_path(args.seed, labels), record)
    return record


def ce_splices(saes: dict) -> dict[str, tuple]:
    """name -> (SAE, budget) for the CE passes: each separate SAE at its k, the hierarchical SAE at every TopK k up
    to K, the TopK-64 SAE truncated below 64 (if the run has it), BatchTopK / Matryoshka at their threshold."""
    splices = {}
    for label, sae in saes.items():
        kind, k = parse_label(label)
        if kind in VARIABLE_L0:
            splices[f"{label}@thr"] = (sae, None)
        elif kind == "topk":
            splices[f"{label}@{k}"] = (sae, k)
        else:
            splices.update({f"{label}@{b}": (sae, b) for b in TOPK if b <= k})
    if "topk64" in saes:
        splices.update({f"trunc64@{b}": (saes["topk64"], b) for b in TOPK if b < 64})
    return splices


def earlier_losses(args, newest: dict, splices: dict) -> dict | None:
    """The CE losses of an earlier record of this run, if it measured the same SAEs on the same windows (so an
    evaluation re-run does not repeat ~10 minutes of LM passes); else None."""
    path = record_path(args.seed, args.saes)
    if not path.exists():
        return None
    old = json.loads(path.read_text())
    same = (old.get("newest"), old.get("tokens"), int(old.get("args", {}).get("lm_windows", -1)))
    if same != (newest["where"], newest["tokens"], args.lm_windows) or not set(splices) <= set(old["losses"]):
        return None
    return old["losses"]


def held_out_activations(args, model, tokenizer, cache_windows: int) -> torch.Tensor:
    """``--eval-tokens`` layer-``--layer`` resid activations (float32, (N, d_in)) of the training split after the
    cache's ``cache_windows`` windows: text no SAE was trained on. Saved in the run folder for re-runs."""
    path = args.run / f"held_out_L{args.layer}_{args.eval_tokens}_after_{cache_windows}.pt"
    shared = run_folder(0, MAIN) / path.name  # the same tokens for every run: harvest them once
    for candidate in (path, shared):
        if candidate.exists():
            return torch.load(candidate)
    key = (args.layer, "resid")
    x = harvest(model, tokenizer, [key], "train", args.eval_tokens, skip_windows=cache_windows)[key].float()
    with atomic_path(path) as tmp:
        torch.save(x, tmp)
    return x


@torch.no_grad()
def evaluate(sae, x: torch.Tensor, budgets: list[int] | None) -> dict:
    """EV, FVU, L0, shrinkage of ``sae`` on x at each budget (the first k' of one sorted encode, as
    ``hf_sae.metrics.budget_metrics``), or with ``budgets=None`` as ``encode(x)`` gives it (BatchTopK / Matryoshka:
    the inference threshold; key "thr"); and ``dead_eval``: the fraction of latents that never fire on x."""
    latents = sae.encode(x)
    parts = {"thr": latents} if budgets is None else {str(b): latents.truncate(b) for b in budgets}
    result = {}
    for budget, part in parts.items():
        reconstruction = sae.decode(part)
        error = fvu(x, reconstruction)
        result[budget] = {
            "fvu": error,
            "explained_variance": 1.0 - error,
            "l0": l0(part.values),
            "shrinkage": shrinkage(x, reconstruction),
        }
    result["dead_eval"] = dead_fraction(latents.indices, latents.values, sae.config.d_sae)
    return result


def budgets_of(label: str) -> list[int] | None:
    """The budgets a Pareto SAE is evaluated at: every BUDGETS entry up to its k; None (its threshold) for
    BatchTopK / Matryoshka."""
    kind, k = parse_label(label)
    return None if kind in VARIABLE_L0 else [b for b in BUDGETS if b <= k]


# ------------------------------------------------------------------------------------------------ the report
def load_records() -> list[dict]:
    """Every run's record (seed 0's main run first), the older single-run format read as seed 0 with MAIN."""
    records = []
    for path in sorted(RESULTS_DIR.glob("pareto_seed*.json")):
        record = json.loads(path.read_text())
        record.setdefault("seed", 0)
        record.setdefault("labels", MAIN)
        records.append(record)
    return sorted(records, key=lambda r: (r["seed"], r["labels"] != MAIN))


def paired(records: list[dict], a: str, b: str, metric: str) -> dict | None:
    """metric(a) − metric(b) over the seeds that measured both rows: per-seed values, mean, std, the paired t
    statistic and whether it exceeds the two-sided 95% critical value (the difference is larger than the seed
    spread)."""
    deltas = {}
    for r in records:
        rows = {row["label"]: row for row in r["rows"]}
        if a in rows and b in rows:
            deltas[r["seed"]] = rows[a][metric] - rows[b][metric]
    return paired_stats(deltas) if deltas else None


def report() -> None:
    """The results.md section and the three plots, from every run's record."""
    records = load_records()
    if not records:
        raise SystemExit(f"no Pareto record in {RESULTS_DIR}: run a seed first (--train --seed 0).")
    by_name: dict[str, list[dict]] = {}
    for r in records:
        for row in r["rows"]:
            by_name.setdefault(row["label"], []).append(row | {"seed": r["seed"]})
    order = [f"{p}@{k}" for k in TOPK for p in (f"topk{k}", "hier64", "trunc64")] + sorted(
        n for n in by_name if n.endswith("@thr")
    )
    rows = []
    for name in (n for n in order if n in by_name):
        found = by_name[name]
        rows.append(
            [
                found[0]["sae"],
                found[0]["budget"] if found[0]["budget"] != "thr" else "threshold",
                ", ".join(str(f["seed"]) for f in found),
                pm([f["l0"] for f in found], 2),
                pm([f["ev"] for f in found]),
                pm([f["ce_recovered"] for f in found]),
                f"{100 * sum(f['dead_train'] for f in found) / len(found):.1f}%",
                f"{100 * sum(f['dead_eval'] for f in found) / len(found):.1f}%",
            ]
        )
    table = markdown_table(
        ["SAE", "k'", "seeds", "L0", "EV (held-out)", "CE loss recovered", "dead (train)", "dead (held-out)"], rows
    )
    gaps = {
        k: {m: paired(records, f"hier64@{k}", f"topk{k}@{k}", m) for m in ("ev", "ce_recovered")}
        for k in TOPK
        if f"topk{k}@{k}" in by_name
    }
    seeds_of = sorted({r["seed"] for r in records})
    curves = {r["seed"]: gap_curve(r["curve"]) for r in records if "hier64" in r["labels"]}
    plot_ev(records, DOCS / "pareto.png", by_name)
    plot_ce(by_name, DOCS / "pareto_ce.png")
    plot_curves(records[0]["curve"], curves, DOCS / "pareto_curves.png")
    write_json(RESULTS_DIR / "pareto_summary.json", {"gaps": gaps, "curves": curves, "seeds": seeds_of})
    update_results("pareto", section(records, table, gaps, curves, by_name))
    print(f"report: {len(records)} runs, seeds {seeds_of}; docs/pareto*.png and docs/results.md written")


def gap_curve(curve: list[dict]) -> list[dict]:
    """For every evaluated point of one run: tokens and EV(hierarchical at k) − EV(separate TopK k) at each k the
    run trained separately."""
    return [
        {
            "tokens": point["tokens"],
            "where": point["where"],
            **{
                str(k): point["saes"]["hier64"][str(k)]["explained_variance"]
                - point["saes"][f"topk{k}"][str(k)]["explained_variance"]
                for k in TOPK
                if f"topk{k}" in point["saes"]
            },
        }
        for point in curve
    ]


def section(records: list[dict], table: str, gaps: dict, curves: dict, by_name: dict) -> str:
    main = records[0]
    cache, losses = main["cache"], main["losses"]
    runs = []
    for r in records:
        hours = f"{r['training_seconds'] / 3600:.2f} h" if r["training_seconds"] else "?"
        step = f"{r['training_seconds'] / (r['tokens'] / 4096):.2f} s" if r["training_seconds"] else "?"
        state = (
            "finished"
            if r["finished"]
            else f"**interim: stopped at {r['newest']}** (planned {r['planned_tokens']:,}; resume with the command)"
        )
        runs.append(
            f"- seed {r['seed']}: {', '.join(r['labels'])}; {r['tokens']:,} tokens per SAE, {state}; {hours} of "
            f"training, {step} per step of its {len(r['labels'])} SAEs. `{r['commands']['train']}`"
        )
    gap_rows = []
    for k, g in gaps.items():
        ev, ce = g["ev"], g["ce_recovered"]
        if ev is None:
            continue
        gap_rows.append(
            [
                k,
                ev["n"],
                ", ".join(f"{v:+.4f}" for v in ev["per_seed"].values()),
                f"{ev['mean']:+.4f} ± {ev['std']:.4f}" if ev["n"] > 1 else f"{ev['mean']:+.4f}",
                f"{ev['t']:+.1f}" if ev["n"] > 1 else "–",
                "yes" if ev["significant"] else ("no" if ev["n"] > 1 else "one seed"),
                f"{ce['mean']:+.4f} ± {ce['std']:.4f}" if ce["n"] > 1 else f"{ce['mean']:+.4f}",
                "yes" if ce["significant"] else ("no" if ce["n"] > 1 else "one seed"),
            ]
        )
    gap_table = markdown_table(
        [
            "k",
            "seeds",
            "ΔEV per seed",
            "ΔEV mean ± std",
            "paired t",
            "beyond seed spread (95%)",
            "ΔCE recovered mean ± std",
            "beyond seed spread (95%)",
        ],
        gap_rows,
    )
    curve_rows = [
        [f"{g['tokens']:,}", g["where"], *[f"{g[str(k)]:+.4f}" if str(k) in g else "" for k in TOPK]]
        for g in curves.get(0, [])
    ]
    curve_table = markdown_table(["training tokens", "point (seed 0)", *[f"k={k}" for k in TOPK]], curve_rows)
    finished_all = all(r["finished"] for r in records)
    baselines = any(n.endswith("@thr") for n in by_name)
    title = "HierarchicalTopK vs separate TopK vs truncated TopK" + (", BatchTopK, Matryoshka" if baselines else "")
    threshold_note = (
        "BatchTopK and Matryoshka are evaluated as they are used, with the inference threshold learnt in training, so "
        "their L0 is measured, not set."
        if baselines
        else "The BatchTopK and Matryoshka baselines have not run at this scale (see the last section)."
    )
    return f"""## 1. {title} (Pareto)

Gemma 3 270M (embedded, bf16), resid of layer 6, d_sae 4096, all SAEs trained from one activation cache of
{cache["tokens"]:,} tokens of the training split (bf16, {cache["windows"]:,} windows of 128), several epochs; batch
4096, AuxK on (the package default recipe), AdamW at the architecture's default learning rate. Every SAE of a run
starts from its own random draw: {same_index_text(records)}
{"All runs finished." if finished_all else "**Not every run has finished: the interim runs below are marked.**"}

{chr(10).join(runs)}

Held out: EV / L0 / dead on {main["held_out_tokens"]:,} tokens of the training split *after* the cache's windows (no
SAE saw them; the validation split holds only ~55k tokens); CE loss on {losses["tokens"]:,} predicted tokens of the
validation split ({main["lm_windows"] if "lm_windows" in main else main["args"]["lm_windows"]} windows of 128); clean
loss {losses["clean"]:.4f}, zero-ablated {losses["ablated"]:.4f}. Dead (train): no top-k firing for the run's
`dead_tokens`; dead (held-out): never fires on the held-out tokens. {threshold_note} Mean ± sample std over the
seeds that trained each SAE.

Command (all runs, then this report; each run resumes from its newest checkpoint):
`nice -n 5 python experiments/pareto.py --all`. Numbers: `experiments/results/pareto_seed*.json`,
`experiments/results/pareto_summary.json`. The cache: `{main["commands"]["harvest"]}`.

![EV against L0](pareto.png)
![CE loss recovered against L0](pareto_ce.png)

{table}

**The gap hierarchical − separate, paired by seed** (EV and CE recovered of the HierarchicalTopK K=64 SAE at k' = k
minus the separate TopK k SAE of the same seed; "beyond seed spread": the paired t-test rejects a zero gap at 95%,
two-sided, n − 1 degrees of freedom):

{gap_table}

The training curve (held-out EV against tokens, every checkpoint) and the gap against tokens, which the paper's
1B-token result implies should close (or turn positive) with scale (thin lines: seeds 1 and 2):

![held-out EV and the hierarchical − separate gap against training tokens](pareto_curves.png)

{curve_table}

{claims(records, gaps, curves, by_name)}
"""


def same_index_text(records: list[dict]) -> str:
    """The same-index check of every run, in one sentence."""
    rates = [rate for r in records for rate in r.get("same_index", {}).values()]
    if not rates:
        return "(the same-index check has not run on these records)."
    return (
        f"over the {len(rates)} pairs of SAEs of one run, the share of latents whose most similar decoder row in the "
        f"other SAE has the same index is {100 * min(rates):.3f}–{100 * max(rates):.3f}% (mean "
        f"{100 * sum(rates) / len(rates):.3f}%), against {100 / 4096:.3f}% by chance (1/d_sae): no SAE reused "
        "another's initialisation."
        if max(rates) < 10 / 4096
        else f"**same-index matches up to {100 * max(rates):.2f}% (chance {100 / 4096:.3f}%): a shared "
        "initialisation?**"
    )


def claims(records: list[dict], gaps: dict, curves: dict, by_name: dict) -> str:
    """Each paper claim beside what was measured, with the verdict derived from the numbers."""
    lines = ["**The papers' claims beside what we measured.**", ""]
    below = [k for k, g in gaps.items() if g["ev"] and g["ev"]["significant"] and g["ev"]["mean"] < 0]
    above = [k for k, g in gaps.items() if g["ev"] and g["ev"]["significant"] and g["ev"]["mean"] > 0]
    tied = [k for k in gaps if k not in below + above]
    parts = ", ".join(
        f"k'={k} {g['ev']['mean']:+.4f} ({g['ev']['n']} seed{'s' if g['ev']['n'] > 1 else ''})"
        for k, g in gaps.items()
        if g["ev"]
    )
    seeds = max((g["ev"]["n"] for g in gaps.values() if g["ev"]), default=0)
    if seeds < 2:
        verdict = "is **inconclusive** (one seed: no seed spread to judge a gap by)"
    elif not below:
        verdict = "**holds** (no budget significantly below)"
    else:
        verdict = f"**does not hold** at k' ∈ {{{', '.join(map(str, below))}}}"
    every = [
        k
        for k in tied
        if gaps[k]["ev"] and gaps[k]["ev"]["n"] > 1 and all(v < 0 for v in gaps[k]["ev"]["per_seed"].values())
    ]
    if every:
        verdict += (
            f"; at k' ∈ {{{', '.join(map(str, every))}}} every seed is below, but the spread of so few seeds does "
            "not make it significant"
        )
    lines.append(
        "- Balagansky et al. 2025 (arXiv 2505.24473): one HierarchicalTopK SAE (Gemma-2 2B, layer 12, 65,536 "
        "latents, ~1B tokens) is on or above the EV-vs-L0 frontier of separately trained TopK SAEs at every budget "
        f"up to its K. Measured gap in EV: {parts}. Significantly below at k' ∈ {{{', '.join(map(str, below)) or '–'}"
        f"}}, significantly above at {{{', '.join(map(str, above)) or '–'}}}, not distinguishable from the seed "
        f"spread at {{{', '.join(map(str, tied)) or '–'}}}: the claim {verdict} here (5.2M tokens, 4,096 latents, "
        "Gemma 3 270M)."
    )
    if all(f"trunc64@{k}" in by_name for k in TOPK if k < 64):
        trunc = [(k, by_name[f"hier64@{k}"][0]["ev"], by_name[f"trunc64@{k}"][0]["ev"]) for k in TOPK if k < 64]
        lines.append(
            "- Same paper: far above truncating a TopK SAE trained at K. Seed 0: "
            + ", ".join(f"k'={k} {h:.3f} vs {t:.3f}" for k, h, t in trunc)
            + f": **{'holds' if all(h > t for _, h, t in trunc) else 'does not hold'}**."
        )
    trend = []
    for k in TOPK:
        series = [c for c in curves.get(0, []) if str(k) in c]
        if len(series) >= 2:
            first, last = series[0][str(k)], series[-1][str(k)]
            trend.append(
                f"k={k} {first:+.3f} → {last:+.3f} ({'narrowed' if abs(last) < abs(first) else 'not narrowed'})"
            )
    c0 = curves.get(0, [])
    if c0:
        lines.append(
            f"- The gap against training tokens (seed 0, {c0[0]['tokens']:,} → {c0[-1]['tokens']:,} tokens): "
            + ", ".join(trend)
            + ". Whether it reaches zero at ~10^9 tokens, as the paper's result implies, cannot be measured on this "
            "CPU; the curve shows the direction."
        )
    base = [n for n in by_name if n.endswith("@thr")]
    if base:
        ref = {k: by_name.get(f"topk{k}@{k}") for k in TOPK}
        parts = []
        for name in base:
            row = by_name[name][0]
            near = min((k for k in ref if ref[k]), key=lambda k: abs(math.log(k / max(row["l0"], 1e-9))))
            sep = [r for r in ref[near] if r["seed"] == row["seed"]] or ref[near]
            hier = [r for r in by_name.get(f"hier64@{near}", []) if r["seed"] == row["seed"]]
            text = f"{row['sae']}: L0 {row['l0']:.1f}, EV {row['ev']:.4f}, CE {row['ce_recovered']:.4f}"
            text += f" vs TopK k={near} EV {sep[0]['ev']:.4f}, CE {sep[0]['ce_recovered']:.4f}"
            if hier:
                text += f" and hierarchical at k'={near} EV {hier[0]['ev']:.4f}"
            parts.append(text + f" (seed {row['seed']})")
        lines.append(
            "- BatchTopK (Bussmann et al. 2024, arXiv 2412.06410) claims a better EV than TopK at the same mean L0; "
            "Matryoshka (Bussmann et al. 2025, arXiv 2503.17547) claims a slightly worse reconstruction than "
            "BatchTopK, traded for nested features. Measured at the L0 its threshold gives: " + "; ".join(parts) + "."
        )
        lines += baseline_verdicts(by_name)
    return "\n".join(lines)


def baseline_verdicts(by_name: dict) -> list[str]:
    """The two baseline claims as verdicts, from the seed-0 rows of BatchTopK k=16, Matryoshka k=16 and TopK k=16.

    Rules: BatchTopK's claim holds if its EV is above the TopK k=16 SAE's at an L0 no larger than 16 x 1.05;
    Matryoshka's if its EV is below BatchTopK's by at most 0.01 ("slightly worse"). One seed: the largest std of EV
    over seeds among the SAEs trained with several seeds is the yardstick for "beyond noise"."""
    rows = {name: by_name.get(name, [None])[0] for name in ("batchtopk16@thr", "matryoshka16@thr", "topk16@16")}
    btk, mat, topk = rows["batchtopk16@thr"], rows["matryoshka16@thr"], rows["topk16@16"]
    spreads = [mean_std([r["ev"] for r in found])[1] for found in by_name.values() if len(found) > 1]
    spread = max(spreads, default=float("nan"))
    lines = []
    if btk and topk:
        gap = btk["ev"] - topk["ev"]
        holds = gap > 0 and btk["l0"] <= 16 * 1.05
        lines.append(
            f"  - **BatchTopK better than TopK at the same L0: {'holds' if holds else 'does not hold'}** here (one "
            f"seed): EV {btk['ev']:.4f} at L0 {btk['l0']:.2f} vs TopK k=16 {topk['ev']:.4f} (Δ {gap:+.4f}, "
            f"CE recovered Δ {btk['ce_recovered'] - topk['ce_recovered']:+.4f}); the largest seed std of EV here is "
            f"{spread:.4f}, so the gap is larger than noise."
            if abs(gap) > spread  # a nan spread (no repeated seeds) compares False: inconclusive
            else f"  - **BatchTopK better than TopK at the same L0: inconclusive** (one seed, Δ EV {gap:+.4f}, not "
            f"beyond the largest seed std of EV, {spread:.4f})."
        )
    if btk and mat:
        gap = mat["ev"] - btk["ev"]
        holds = -0.01 <= gap < 0
        lines.append(
            f"  - **Matryoshka slightly worse than BatchTopK in reconstruction: {'holds' if holds else 'does not hold'}"
            f"** here (one seed): EV {mat['ev']:.4f} vs {btk['ev']:.4f} (Δ {gap:+.4f}), CE recovered "
            f"{mat['ce_recovered']:.4f} vs {btk['ce_recovered']:.4f}; dead (held-out) {100 * mat['dead_eval']:.1f}% vs "
            f"{100 * btk['dead_eval']:.1f}%."
        )
    return lines


def _l0_figure():
    """The Pareto plots' frame: the whole range on the left, a zoom on L0 ≈ 16 (where the BatchTopK / Matryoshka
    points sit among the TopK and hierarchical ones) on the right."""
    return plt.subplots(1, 2, figsize=(11.5, 5), gridspec_kw={"width_ratios": [2.2, 1]})


def _finish_l0_axes(fig, axes, ylabel: str, title: str, path: Path, metric: str, by_name: dict) -> None:
    """Log2 L0 axes, labels, grid, legend; the zoom panel's limits from the points near L0 16; then save."""
    ax, zoom = axes
    for a in axes:
        a.set_xscale("log", base=2)
        a.set_xlabel("L0 (active latents per token)")
        a.grid(alpha=0.3)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=9)
    near = [  # the truncated TopK is far below: left out of the zoom's range
        row[metric]
        for name, rows in by_name.items()
        if not name.startswith("trunc")
        for row in rows
        if 12 <= row["l0"] <= 22
    ]
    if near:
        low, high = min(near), max(near)
        pad = max(high - low, 1e-3) * 0.25
        zoom.set_ylim(low - pad, high + pad)
    zoom.set_xlim(12, 22)
    zoom.set_xticks([12, 14, 16, 18, 20, 22], labels=["12", "14", "16", "18", "20", "22"])
    zoom.minorticks_off()
    zoom.set_title("zoom on L0 12–22", fontsize=10)
    fig.tight_layout()
    save(fig, path)


def _series(by_name: dict, names: list[str], metric: str) -> tuple[list, list, list]:
    """(mean L0, mean metric, std metric over seeds) of the rows ``names`` that were measured."""
    found = [by_name[n] for n in names if n in by_name]
    l0s = [mean_std([f["l0"] for f in rows])[0] for rows in found]
    stats = [mean_std([f[metric] for f in rows]) for rows in found]
    return l0s, [s[0] for s in stats], [0.0 if math.isnan(s[1]) else s[1] for s in stats]


def _draw(ax, by_name: dict, metric: str, hier_curve: tuple | None = None) -> None:
    """Separate TopK (mean ± std over seeds), the hierarchical SAE, TopK-64 truncated, and the BatchTopK /
    Matryoshka points, on one axes."""
    x, y, e = _series(by_name, [f"topk{k}@{k}" for k in TOPK], metric)
    ax.errorbar(x, y, yerr=e, fmt="o-", color="black", lw=2, capsize=3, label="separate TopK SAEs (k = 4…64)")
    for k, xi, yi in zip(TOPK, x, y):
        ax.annotate(f"k={k}", (xi, yi), textcoords="offset points", xytext=(5, -13), fontsize=9)
    if hier_curve is None:
        hier_curve = _series(by_name, [f"hier64@{k}" for k in TOPK], metric)
    ax.errorbar(
        *hier_curve[:2],
        yerr=hier_curve[2],
        fmt="s-",
        color="tab:red",
        capsize=3,
        label="one HierarchicalTopK SAE (K = 64) at k'",
    )
    x, y, e = _series(by_name, [f"trunc64@{k}" for k in TOPK if k < 64] + ["topk64@64"], metric)
    ax.plot(x, y, "^--", color="tab:blue", label="TopK K = 64 truncated to k' (seed 0)")
    for name, marker, color in (("batchtopk16@thr", "D", "tab:green"), ("matryoshka16@thr", "P", "tab:purple")):
        if name in by_name:
            row = by_name[name][0]
            ax.plot([row["l0"]], [row[metric]], marker, color=color, ms=9, label=f"{row['sae']} (seed {row['seed']})")


def plot_ev(records: list[dict], path: Path, by_name: dict) -> None:
    """EV against L0; the hierarchical curve at every budget 1..64 (mean over the seeds that trained it)."""
    fig, axes = _l0_figure()
    per_budget: dict[str, list[dict]] = {}
    for r in records:
        if "hier64" in r["labels"]:
            for budget, m in r["curve"][-1]["saes"]["hier64"].items():
                if budget.isdigit():
                    per_budget.setdefault(budget, []).append(m)
    budgets = sorted(per_budget, key=int)
    stats = [mean_std([m["explained_variance"] for m in per_budget[b]]) for b in budgets]
    hier = (
        [mean_std([m["l0"] for m in per_budget[b]])[0] for b in budgets],
        [s[0] for s in stats],
        [0.0 if math.isnan(s[1]) else s[1] for s in stats],
    )
    for ax in axes:
        _draw(ax, by_name, "ev", hier)
    seeds = sorted({r["seed"] for r in records})
    title = f"Gemma 3 270M, resid L6, d_sae 4096, 5.2M tokens per SAE; mean ± std over seeds {seeds}"
    _finish_l0_axes(fig, axes, "explained variance (held-out)", title, path, "ev", by_name)


def plot_ce(by_name: dict, path: Path) -> None:
    fig, axes = _l0_figure()
    for ax in axes:
        _draw(ax, by_name, "ce_recovered")
    title = "Gemma 3 270M, resid L6, d_sae 4096"
    _finish_l0_axes(fig, axes, "CE loss recovered (validation)", title, path, "ce_recovered", by_name)


def plot_curves(curve: list[dict], gaps: dict[int, list[dict]], path: Path) -> None:
    """Left: seed 0's training curves; right: the gap against tokens, seed 0 bold, other seeds thin."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.8))
    tokens = [p["tokens"] / 1e6 for p in curve]
    colors = dict(zip(TOPK, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]))
    for k in TOPK:
        sep = [p["saes"][f"topk{k}"][str(k)]["explained_variance"] for p in curve]
        left.plot(tokens, sep, "o-", color=colors[k], label=f"TopK k={k}")
        hier = [p["saes"]["hier64"][str(k)]["explained_variance"] for p in curve]
        left.plot(tokens, hier, "s--", color=colors[k], label=f"Hierarchical K=64 at k'={k}")
        for seed, series in gaps.items():
            points = [g for g in series if str(k) in g]
            if points:
                right.plot(
                    [g["tokens"] / 1e6 for g in points],
                    [g[str(k)] for g in points],
                    "o-" if seed == 0 else ":",
                    color=colors[k],
                    lw=2 if seed == 0 else 1,
                    ms=4 if seed == 0 else 0,
                    label=f"k={k}" if seed == 0 else None,
                )
    left.set_xlabel("training tokens per SAE (millions)")
    left.set_ylabel("explained variance (held-out)")
    left.set_title("training curve (seed 0): solid separate TopK, dashed one hierarchical SAE", fontsize=10)
    left.grid(alpha=0.3)
    handles, names = left.get_legend_handles_labels()  # column-major with 2 rows: one column per k
    fig.legend(handles, names, loc="lower center", ncol=5, fontsize=9)
    right.axhline(0.0, color="grey", lw=1)
    right.set_yscale("symlog", linthresh=0.01)  # linear within ±0.01, where the large-k gaps live
    right.set_xlabel("training tokens per SAE (millions)")
    right.set_ylabel("EV(hierarchical at k) − EV(separate TopK k), symlog")
    right.margins(y=0.08)
    right.set_title("EV gap, hierarchical − separate (> 0: hierarchical better; dotted: seeds 1, 2)", fontsize=10)
    right.grid(alpha=0.3)
    right.legend(fontsize=9, loc="best")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    save(fig, path, tight=False)


def save(fig, path: Path, tight: bool = True) -> None:
    if tight:
        fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="train and evaluate every run of PLAN, then report")
    parser.add_argument("--report", action="store_true", help="only the report, from the runs' records")
    parser.add_argument("--saes", default=None, help="comma-separated labels (default: seed 0's six SAEs)")
    parser.add_argument("--run", type=Path, default=None, help="the run folder (default: from the seed and SAEs)")
    parser.add_argument("--cache", type=Path, default=CACHE, help="the activation cache (harvested if missing)")
    parser.add_argument("--train", action="store_true", help="harvest / train / resume first, as needed")
    parser.add_argument("--max-train-minutes", type=float, default=None, help="stop training cleanly after this")
    parser.add_argument("--layer", type=int, default=6)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--harvest-tokens", type=int, default=524288, help="activations in the cache")
    parser.add_argument("--tokens", type=int, default=5_242_880, help="training tokens per SAE (epochs of the cache)")
    parser.add_argument("--checkpoint-every", type=int, default=128, help="steps of 4096 tokens between checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-tokens", type=int, default=65536, help="held-out tokens for EV / L0 / dead")
    parser.add_argument("--lm-windows", type=int, default=66, help="validation windows of 128 tokens for CE")
    args = parser.parse_args()
    if args.report:
        return report()
    if args.all:
        for seed, labels in PLAN:
            run_stage([sys.executable, __file__, "--train", "--seed", str(seed), "--saes", ",".join(labels)])
        return report()
    args.saes = args.saes.split(",") if args.saes else list(MAIN)
    for label in args.saes:
        parse_label(label)
    args.run = args.run or run_folder(args.seed, args.saes)
    seed_everything(args.seed)
    if args.train:
        train(args)
        # evaluate in a fresh interpreter: what this file says now (it may have been fixed while training ran)
        os.execv(sys.executable, [sys.executable, __file__, *[a for a in sys.argv[1:] if a != "--train"]])
    evaluate_run(args)
    report()


if __name__ == "__main__":
    main()
