"""Find a feature with a clear meaning in an SAE of the real Gemma 3 270M, sweep its steering strength, and compare it
with a contrastive (difference-of-means) steering vector: the README's demonstration.

    python examples/steering_demo.py --sae runs/gemma-3-270m-L8-resid-hierarchical-d4096-k32

1. Feature statistics: the SAE's own (training writes them), else measured with ``hf_sae.feature_stats``.
2. A meaning: one pass over held-out windows keeps each feature's 20 strongest tokens; a feature "means" a word when
   one content word (letters only, 4 or more) holds most of them. The clearest such feature is chosen (or --feature).
3. A sweep over strengths in multiples of the feature's peak activation ("0.5x" ... "3x") on neutral prompts, with
   that word as the target: KL from the unsteered model, log p(target), the unsteered model's loss on the steered
   text (fluency), how often the word appears.
4. The baseline: a contrastive vector, the mean layer-L residual at the word in the feature's top contexts minus the
   mean at the same position of held-out contexts where the feature is silent, swept in multiples of itself.
5. The best generation of each (``SweepResult.pick``: highest log p(target) within 1 nat of the unsteered fluency)
   next to the unsteered one; tables as printed; the sweep plot written to --plot.

Greedy decoding throughout, so the output is reproducible for a given SAE.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoModel

import hf_sae
from hf_sae.sites import capture_activations, resolve_sae_site
from training.corpus import corpus_paths
from training.small_gemma import load_small_gemma

PROMPTS = [
    "My favourite place to spend a weekend is",
    "Yesterday afternoon I went to the",
    "The best thing about this town is",
    "She opened the box and found",
]


def held_out_windows(tokenizer, n_windows: int, length: int) -> list[list[int]]:
    """Windows of ``length`` tokens (BOS first) from the embedded corpus's held-out split."""
    windows = []
    with open(corpus_paths()["validation"], encoding="utf-8") as handle:
        for line in handle:
            ids = tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
            for start in range(0, len(ids) - length, length):
                windows.append([tokenizer.bos_token_id, *ids[start : start + length - 1]])
                if len(windows) == n_windows:
                    return windows
    return windows


@torch.no_grad()
def strongest_tokens(model, sae, windows: list[list[int]], per_feature: int = 20, batch: int = 16):
    """For every feature, its ``per_feature`` strongest (activation, window, position) over ``windows`` (BOS out)."""
    site = resolve_sae_site(model, sae)
    values, features, where = [], [], []
    for first in range(0, len(windows), batch):
        ids = torch.tensor(windows[first : first + batch])
        activation = capture_activations(model, [site], input_ids=ids)[site.key][:, 1:]  # BOS left out
        latents = sae.encode(activation.float())
        b, t, k = latents.values.shape
        values.append(latents.values.reshape(-1))
        features.append(latents.indices.reshape(-1))
        rows = torch.arange(b).repeat_interleave(t * k) + first
        cols = torch.arange(t).repeat_interleave(k).repeat(b) + 1
        where.append(torch.stack([rows, cols], 1))
    values, features, where = torch.cat(values), torch.cat(features), torch.cat(where)
    order = values.argsort(descending=True)
    order = order[features[order].argsort(stable=True)]  # grouped by feature, strongest first within a group
    grouped = features[order]
    starts = torch.searchsorted(grouped, grouped, right=False)
    keep = order[(torch.arange(len(order)) - starts) < per_feature]
    top: dict[int, list[tuple[float, int, int]]] = {}
    for value, feature, (row, col) in zip(values[keep].tolist(), features[keep].tolist(), where[keep].tolist()):
        if value > 0:
            top.setdefault(feature, []).append((value, row, col))
    return top


def word_of(tokenizer, token_id: int) -> str:
    return tokenizer.convert_ids_to_tokens(token_id).replace("▁", " ").strip().lower()


def clearest_feature(tokenizer, sae, windows, top, min_share: float = 0.5):
    """The feature whose strongest tokens are most often one content word: (feature, word, share)."""
    best = None
    for feature, hits in top.items():
        if len(hits) < 10:
            continue
        words = Counter(word_of(tokenizer, windows[row][col]) for _, row, col in hits)
        word, count = words.most_common(1)[0]
        share = count / len(hits)
        if not (word.isalpha() and len(word) >= 4) or share < min_share:
            continue
        density = float(sae.feature_stats.density[feature])
        score = (share, density)
        if best is None or score > best[0]:
            best = (score, feature, word, share)
    if best is None:
        raise SystemExit("no feature of this SAE has a clear one-word meaning in its top tokens; pass --feature.")
    return best[1], best[2], best[3]


def contexts(windows, top, feature: int, tokenizer, word: str, n: int) -> tuple[list[list[int]], list[list[int]]]:
    """Positive prompts: prefixes ending at the feature's strongest tokens (the word); negative: prefixes of the
    same lengths from windows where the feature never fires."""
    positive = [windows[row][: col + 1] for _, row, col in top[feature][:n]]
    used = {row for _, row, _ in top[feature]}
    quiet = [w for i, w in enumerate(windows) if i not in used and word not in tokenizer.decode(w).lower()]
    quiet = quiet or [w for i, w in enumerate(windows) if i not in used]
    if not quiet:
        raise SystemExit(f"every held-out window has feature {feature} firing: no negative contexts; use --windows.")
    negative = [quiet[i % len(quiet)][: len(p)] for i, p in enumerate(positive)]
    return positive, negative


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sae", default="runs/gemma-3-270m-L8-resid-hierarchical-d4096-k32")
    parser.add_argument("--feature", type=int, default=None, help="a feature id (default: the clearest one)")
    parser.add_argument("--windows", type=int, default=400, help="held-out windows searched for meanings")
    parser.add_argument("--strengths", default="0.5x,1x,1.5x,2x,3x", help="the sweep, multiples of the peak")
    parser.add_argument("--vector-strengths", default="0.25,0.5,1,2,4", help="multiples of the contrastive vector")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--plot", default="docs/steering_sweep.png")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_small_gemma()
    sae = AutoModel.from_pretrained(args.sae)
    windows = held_out_windows(tokenizer, args.windows, 64)
    if sae.feature_stats is None:
        hf_sae.feature_stats(model, sae, windows, tokenizer=tokenizer, progress=True, source="held-out windows")
    print(f"feature statistics: {sae.feature_stats.summary()}")
    top = strongest_tokens(model, sae, windows)
    if args.feature is None:
        feature, word, share = clearest_feature(tokenizer, sae, windows, top)
    else:
        feature = args.feature
        if feature not in top:
            raise SystemExit(f"feature {feature} never fires on the {len(windows)} held-out windows; pick another.")
        words = Counter(word_of(tokenizer, windows[row][col]) for _, row, col in top.get(feature, []))
        word, count = words.most_common(1)[0] if words else ("", 0)
        share = count / max(1, sum(words.values()))
    stats = sae.feature_stats
    print(
        f"feature {feature}: {100 * share:.0f}% of its 20 strongest tokens are {word!r}; density "
        f"{float(stats.density[feature]):.2e}, peak {float(stats.max_activation[feature]):.1f}, mean "
        f"{float(stats.mean_activation[feature]):.1f}"
    )
    for value, row, col in top[feature][:5]:
        text = tokenizer.decode(windows[row][max(1, col - 8) : col]) + f"[[{tokenizer.decode([windows[row][col]])}]]"
        print(f"  {value:8.1f}  ...{text}")

    strengths = args.strengths.split(",")
    result = hf_sae.steering_sweep(
        model,
        sae,
        [feature],
        strengths,
        PROMPTS,
        targets=[word],
        tokenizer=tokenizer,
        max_new_tokens=args.max_new_tokens,
    )
    print()
    print(result.table())
    positive, negative = contexts(windows, top, feature, tokenizer, word, 20)
    layer, site = sae.config.hook_layer, sae.config.hook_site
    vector = hf_sae.contrastive_vector(model, layer, site, positive, negative, tokenizer=tokenizer)
    print(f"\ncontrastive vector: {vector!r}")
    baseline = hf_sae.steering_sweep(
        model,
        vector,
        None,
        [float(s) for s in args.vector_strengths.split(",")],
        PROMPTS,
        targets=[word],
        tokenizer=tokenizer,
        max_new_tokens=args.max_new_tokens,
    )
    print(baseline.table())
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    result.plot(args.plot)
    print(f"\nsweep plot: {args.plot}")

    best, best_vector = result.pick(), baseline.pick()
    print(f"\nprompt: {PROMPTS[0]!r}")
    print(f"  unsteered:                          {result.baseline.texts[0]!r}")
    print(f"  feature {feature} at {best.strength} (best):      {best.texts[0]!r}")
    print(f"  contrastive x{best_vector.strength:g} (best):       {best_vector.texts[0]!r}")
    for i, prompt in enumerate(PROMPTS[1:], 1):
        print(f"prompt: {prompt!r}\n  unsteered: {result.baseline.texts[i]!r}\n  feature:   {best.texts[i]!r}")
        print(f"  vector:    {best_vector.texts[i]!r}")


if __name__ == "__main__":
    main()
