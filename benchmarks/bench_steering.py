"""Generation speed under SAE steering: tokens/s without steering, with ``add`` and with ``clamp``, as ratios.

    python benchmarks/bench_steering.py                 # tiny and medium random Gemma-2 / Gemma-3 (no files needed)
    python benchmarks/bench_steering.py --real          # the real Gemma 3 270M of training.small_gemma (CPU ok, ~1 min)

Each configuration runs greedy ``generate`` (KV cache on, fixed length) under the three conditions interleaved,
``--repeats`` times, and reports the best (timeit-style: the least disturbed by other processes on a shared CPU) and
the median tokens/s. Ratios use the best. Targets: add >= 0.95x, clamp >= 0.80x of no steering.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # training/ is not installed: use this checkout

from hf_sae.steering import steer  # noqa: E402
from hf_sae.testing.tiny_models import tiny_gemma2, tiny_gemma3, tiny_sae  # noqa: E402
from training.small_gemma import load_small_gemma  # noqa: E402

TARGETS = {"add": 0.95, "clamp": 0.80}


def real_gemma(dtype: torch.dtype) -> torch.nn.Module:
    model, _ = load_small_gemma(dtype=dtype)
    return model


def make_sae(model: torch.nn.Module, d_sae: int, k: int, layer: int, dtype: torch.dtype) -> torch.nn.Module:
    return tiny_sae(layer, d_in=model.config.hidden_size, d_sae=d_sae, k=k).to(dtype)


def tokens_per_second(model, run: Callable[[], torch.Tensor], new_tokens: int) -> float:
    start = time.perf_counter()
    out = run()
    elapsed = time.perf_counter() - start
    return out.shape[0] * new_tokens / elapsed


@torch.no_grad()
def bench(name: str, model, sae, batch: int, prompt: int, new_tokens: int, repeats: int) -> dict[str, float]:
    model.eval()
    input_ids = torch.randint(3, model.config.vocab_size, (batch, prompt))
    features = {int(i): 8.0 for i in torch.randperm(sae.config.d_sae)[:4]}
    kwargs = dict(input_ids=input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    conditions = {
        "none": lambda: nullcontext(),
        "add": lambda: steer(model, sae, features, mode="add"),
        "clamp": lambda: steer(model, sae, features, mode="clamp"),
    }
    speeds: dict[str, list[float]] = {key: [] for key in conditions}
    for repeat in range(repeats + 1):  # the first round warms up
        for key, make in conditions.items():
            with make():
                speed = tokens_per_second(model, lambda: model.generate(**kwargs, pad_token_id=0), new_tokens)
            if repeat > 0:
                speeds[key].append(speed)
    best = {key: max(values) for key, values in speeds.items()}
    median = {key: statistics.median(values) for key, values in speeds.items()}
    print(
        f"\n{name}: batch {batch}, prompt {prompt}, {new_tokens} new tokens, SAE d_sae={sae.config.d_sae} "
        f"k={sae.config.k} at layer {sae.config.hook_layer}, {repeats} repeats, {torch.get_num_threads()} threads"
    )
    print(f"{'condition':<10} {'best tok/s':>10} {'median':>8} {'ratio':>7}  target")
    for key in conditions:
        ratio = best[key] / best["none"]
        target = TARGETS.get(key)
        verdict = "" if target is None else f">={target:.2f} " + ("ok" if ratio >= target else "MISS")
        print(f"{key:<10} {best[key]:>10.1f} {median[key]:>8.1f} {ratio:>6.3f}x  {verdict}")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", action="store_true", help="also run the real Gemma 3 270M (training.small_gemma)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="model and SAE dtype")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    common = dict(batch=args.batch, prompt=args.prompt, new_tokens=args.new_tokens, repeats=args.repeats)
    if args.real:
        model = real_gemma(dtype)
        bench("real Gemma 3 270M", model, make_sae(model, 16384, 64, 6, dtype), **common)
        return
    model = tiny_gemma2().to(dtype)
    bench("tiny random Gemma-2 (d 64, 4 layers)", model, make_sae(model, 1024, 32, 1, dtype), **common)
    wider = dict(hidden_size=512, num_attention_heads=8, head_dim=64, intermediate_size=2048, vocab_size=32000)
    model = tiny_gemma3(num_hidden_layers=8, **wider).to(dtype)  # the tiny recipe, 8x wider and twice as deep
    bench("medium random Gemma-3 (d 512, 8 layers)", model, make_sae(model, 8192, 32, 4, dtype), **common)


if __name__ == "__main__":
    main()
