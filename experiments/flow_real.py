"""A real feature flow (issue 7.3) on Gemma 3 270M: SAEs at resid, mlp and attn of consecutive layers, trained with
one multi-SAE harvest of the training CLI, then hf_sae.flow on them.

SAEs: resid at layers 4..7 (resid 4 is the R predecessor of layer 5), mlp and attn at 5..7 — ten plain TopK SAEs,
d_sae 4096, k 32, the same tokens. Outputs: the per-layer class counts (translated / processed / newborn /
unexplained) as docs/flow_classes.png; one traced flow graph of an interpretable resid-6 feature, annotated with its
top activating held-out tokens, as docs/flow_graph.png + docs/flow_graph.html; the skip-layer EV (matched
transcoder, Mechanistic Permutability Eq. 5) for each consecutive resid pair; a steering example along the flow
(greedy generation before / after). Feature choice is automatic (printed): among resid-6 features that fire on
enough held-out tokens, the one whose top-20 activating tokens are most often the same word, with a flow graph
of at least 3 nodes.

Command (what docs/results.md reports):

    python experiments/flow_real.py --train --tokens 131072 --seed 0
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.common import (  # noqa: E402
    DOCS,
    ROOT,
    command_text,
    load_model,
    markdown_table,
    seed_everything,
    train_once,
    training_command,
    update_results,
    windows,
    write_json,
)
from hf_sae import load_sae  # noqa: E402
from hf_sae.flow import FeatureFlow  # noqa: E402
from hf_sae.sites import capture_activations, resolve_site  # noqa: E402

LAYERS = [5, 6, 7]


def sae_keys(layers: list[int]) -> list[tuple[int, str]]:
    keys = [(layers[0] - 1, "resid")]
    for layer in layers:
        keys += [(layer, "resid"), (layer, "mlp"), (layer, "attn")]
    return keys


def train_command(args) -> list[str]:
    saes = [f"layer={layer},site={site}" for layer, site in sae_keys(args.layers)]
    placement = ["--arch", "topk", "--k", str(args.k)]
    return training_command(
        placement, saes, d_sae=args.d_sae, tokens=args.tokens, seed=args.seed, eval_tokens=16384, run=args.run
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=ROOT / "runs" / "flow")
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--layers", type=int, nargs="+", default=LAYERS)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=131072)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--windows", type=int, default=48, help="held-out windows (feature choice, annotation)")
    parser.add_argument("--skip-windows", type=int, default=16, help="held-out windows for skip-layer eval")
    parser.add_argument("--feature", type=int, default=None, help="resid feature to trace (default: automatic)")
    parser.add_argument("--strengths", type=float, nargs="+", default=[4.0, 8.0])
    parser.add_argument("--prompt", default="My favourite thing about the weekend is")
    args = parser.parse_args()
    seed_everything(args.seed)
    train_metrics = train_once(train_command(args), args.run, args.train)

    saes = {}
    for layer, site in sae_keys(args.layers):
        saes[(layer, site)] = load_sae(args.run / f"L{layer}_{site}_topk_k{args.k}_d{args.d_sae}").eval()
    flow = FeatureFlow(saes, cache_dir=args.run / "match-cache")
    started = time.perf_counter()
    summary = flow.summary(layers=args.layers)
    print(summary, flush=True)
    summary.plot(DOCS / "flow_classes.png")
    print(f"summary {time.perf_counter() - started:.0f} s", flush=True)

    model, tokenizer = load_model("bfloat16")
    ids, mask = windows(tokenizer, "validation", args.windows)
    texts = {"input_ids": ids, "attention_mask": mask}
    target_layer = args.layers[1] if len(args.layers) > 1 else args.layers[0]
    feature, why = (
        (args.feature, "given")
        if args.feature is not None
        else choose_feature(flow, model, saes[(target_layer, "resid")], ids, mask, tokenizer, target_layer)
    )
    print(f"feature {target_layer}/resid/{feature}: {why}", flush=True)
    graph = flow.trace(target_layer, feature)
    flow.annotate(graph, model, texts, tokenizer=tokenizer, n=5)
    title = f"Gemma 3 270M — flow of resid L{target_layer} feature {feature}"
    flow.plot(graph, DOCS / "flow_graph.png", title=title)
    flow.to_html(graph, DOCS / "flow_graph.html", title=title)
    nodes = [
        [
            n,
            a.get("site"),
            f"{a.get('score', float('nan')):.3f}" if a.get("score") is not None else "-",
            a.get("class", "-"),
            "<br>".join(str(t).replace("|", "\\|").replace("\n", " ") for t in (a.get("top_tokens") or [])[:3]),
        ]
        for n, a in sorted(graph.nodes(data=True), key=lambda item: (item[1]["layer"], item[1]["site"]))
    ]

    skip_rows, skip = [], {}
    skip_ids = {"input_ids": ids[: args.skip_windows], "attention_mask": mask[: args.skip_windows]}
    for layer in [args.layers[0] - 1, *args.layers[:-1]]:
        result = flow.skip_layer_eval(model, layer, skip_ids, tokenizer=tokenizer)
        skip[layer] = result.as_dict()
        print(result, flush=True)
        skip_rows.append(
            [
                f"{layer} → {layer + 1}",
                result.ev,
                result.sae_ev,
                result.identity_ev,
                result.clean_loss,
                result.skip_loss,
                result.identity_loss,
            ]
        )

    flow.calibrate(model, {"input_ids": ids[:16], "attention_mask": mask[:16]}, tokenizer=tokenizer)
    prompt = tokenizer(args.prompt, return_tensors="pt")
    generations = {"no steering": generate(model, tokenizer, prompt)}
    for s in args.strengths:
        with flow.steer(model, graph, strength=s, mode="activate", units="folded", positions="all"):
            generations[f"activate s={s:g} (all graph nodes, folded units)"] = generate(model, tokenizer, prompt)
    with flow.steer(model, graph, strength=0.0, mode="rescale"):
        generations["rescale r=0 (remove the flow)"] = generate(model, tokenizer, prompt)
    for name, text in generations.items():
        print(f"[{name}] {text!r}", flush=True)

    write_json(
        args.run / "flow_results.json",
        {
            "feature": feature,
            "why": why,
            "summary": {str(k): v for k, v in summary.counts.items()},
            "graph": FeatureFlow.to_json(graph),
            "skip": skip,
            "generations": generations,
            "args": {k: str(v) for k, v in vars(args).items()},
        },
    )
    gen_lines = "\n".join(f"- **{name}**: {json.dumps(text, ensure_ascii=False)}" for name, text in generations.items())
    text = f"""## 3. A real feature flow (resid / mlp / attn, layers {args.layers[0] - 1}–{args.layers[-1]})

Ten plain TopK SAEs (d_sae {args.d_sae}, k {args.k}) on Gemma 3 270M (bf16): resid {args.layers[0] - 1}–
{args.layers[-1]}, mlp and attn {args.layers[0]}–{args.layers[-1]}, {train_metrics["run"]["tokens"]:,} tokens each from
one multi-SAE harvest (`training.train`, AuxK off, seed {args.seed}); held-out EV at k: {held_out_ev(train_metrics)}.
Thresholds: the defaults (t_R 0.5, t_M = t_A 0.15).

Command: `python experiments/flow_real.py --train --tokens {args.tokens} --seed {args.seed}`
(training: `{command_text(train_command(args))}`)

### Per-layer classes of the resid features

![class fractions per layer](flow_classes.png)

```
{summary}
```

### Flow graph of resid L{target_layer} feature {feature}

Chosen automatically: {why}. Interactive view: [flow_graph.html](flow_graph.html).

![flow graph](flow_graph.png)

{markdown_table(["node", "site", "score", "class", "top activating held-out tokens (… context [token] (act))"], nodes)}

### Skip-layer EV (matched transcoder, top-1 matches, {int(skip_ids["attention_mask"].sum()):,} held-out tokens)

`ev`: EV of decode_(t+1)(T·encode_t(x_t)) against x_(t+1); `sae ev`: the t+1 SAE's own reconstruction (the ceiling);
`identity ev`: x_t used as x_(t+1) (the layer deleted). Losses: LM loss with x_(t+1) replaced.

{markdown_table(["pair", "EV", "SAE EV", "identity EV", "clean loss", "skip loss", "identity loss"], skip_rows)}

### Steering along the flow (greedy, 30 new tokens; prompt {json.dumps(args.prompt)})

{gen_lines}
"""
    update_results("flow", text)
    print(text, flush=True)


def held_out_ev(metrics: dict) -> str:
    parts = []
    for _name, r in metrics["saes"].items():
        budgets = r["budgets"]
        top = budgets[max(budgets, key=int)]
        parts.append(f"{r['site']} {r['layer']} {top['explained_variance']:.3f}")
    return ", ".join(parts)


@torch.no_grad()
def generate(model, tokenizer, prompt, new_tokens: int = 30) -> str:
    out = model.generate(**prompt, max_new_tokens=new_tokens, do_sample=False)
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def choose_feature(flow, model, sae, ids, mask, tokenizer, layer: int):
    """The resid feature whose top-20 held-out activations are most often one word (alphabetic, ≥ 3 letters),
    among features firing on ≥ 20 tokens whose flow graph has ≥ 3 nodes."""
    site = resolve_site(model, layer, "resid")
    values, tokens = [], []
    for start in range(0, ids.shape[0], 8):
        b_ids, b_mask = ids[start : start + 8], mask[start : start + 8]
        act = capture_activations(model, [site], input_ids=b_ids, attention_mask=b_mask, use_cache=False)[site.key]
        keep = b_mask.bool() & (b_ids != tokenizer.bos_token_id)
        dense = torch.zeros(int(keep.sum()), sae.config.d_sae)
        lat = sae.encode(act[keep].float())
        dense.scatter_(1, lat.indices, lat.values.float())
        values.append(dense)
        tokens.append(b_ids[keep])
    values, tokens = torch.cat(values), torch.cat(tokens)
    fired = (values > 0).sum(0)
    top_vals, top_rows = values.topk(20, dim=0)
    scored = []
    for f in torch.nonzero(fired >= 20).flatten().tolist():
        words = [tokenizer.decode([int(tokens[r])]).strip().lower() for r in top_rows[:, f].tolist()]
        word, count = collections.Counter(words).most_common(1)[0]
        if word.isalpha() and len(word) >= 3:
            scored.append((count, float(top_vals[0, f]), f, word))
    scored.sort(reverse=True)
    for count, _, f, word in scored[:40]:
        graph = flow.trace(layer, f)
        if graph.number_of_nodes() >= 3:
            return f, (
                f"{count}/20 of its top held-out activations are the token '{word}' (fires on "
                f"{int(fired[f])} of {values.shape[0]:,} tokens); its graph has {graph.number_of_nodes()} nodes"
            )
    count, _, f, word = scored[0]
    return f, f"{count}/20 top activations are '{word}' (no candidate had a graph of ≥ 3 nodes)"


if __name__ == "__main__":
    main()
