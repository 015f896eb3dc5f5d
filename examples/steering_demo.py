"""Find a feature with ``top_features`` and steer the real Gemma 3 270M with it (the README's demonstration).

    python examples/steering_demo.py --sae runs/default --text "The old bridge crossed the river" --strength 40

Greedy decoding, so the output is reproducible for a given SAE.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModel

import hf_sae
from training.small_gemma import load_small_gemma


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sae", default="runs/default", help="folder or Hub id of an hf-sae SAE for this model")
    parser.add_argument("--text", default="The old stone bridge crossed the river near the village church.")
    parser.add_argument("--prompt", default="My favourite place to spend a weekend is")
    parser.add_argument("--strength", type=float, default=None, help="default: 2x the feature's peak on --text")
    parser.add_argument("--feature", type=int, default=None, help="feature id (default: the top feature of --text)")
    parser.add_argument("--max-new-tokens", type=int, default=30)
    args = parser.parse_args()

    torch.manual_seed(0)
    model, tokenizer = load_small_gemma()
    sae = AutoModel.from_pretrained(args.sae)
    found = hf_sae.top_features(model, sae, args.text, tokenizer=tokenizer, n=5)
    print(f"text: {args.text!r}")
    for fid, peak, acts in zip(found.feature_ids.tolist(), found.max_activations.tolist(), found.activations):
        where = found.tokens[1 + int(acts[1:].argmax())]  # position 0 is BOS, which top_features does not count
        print(f"  feature {fid:5d}  peak {peak:7.2f}  strongest on {where!r}")
    feature = args.feature if args.feature is not None else int(found.feature_ids[0])
    if args.strength is None:
        peaks = dict(zip(found.feature_ids.tolist(), found.max_activations.tolist()))
        args.strength = round(2 * peaks.get(feature, float(found.max_activations[0])), 1)
    examples = hf_sae.max_activating_examples(model, sae, feature, [args.text], tokenizer=tokenizer, n=1)
    print(f"feature {feature} fires most on: {examples[0] if examples else '-'}")

    inputs = tokenizer(args.prompt, return_tensors="pt")
    plain = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    steered = sae.steer(model, {feature: args.strength}).generate(
        **inputs, max_new_tokens=args.max_new_tokens, do_sample=False
    )
    print(f"\nprompt: {args.prompt!r}")
    print("without steering:", tokenizer.decode(plain[0, inputs.input_ids.shape[1] :], skip_special_tokens=True))
    print(f"steered (+{args.strength:g} on feature {feature}):",
          tokenizer.decode(steered[0, inputs.input_ids.shape[1] :], skip_special_tokens=True))  # fmt: skip


if __name__ == "__main__":
    main()
