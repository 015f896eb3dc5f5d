"""Harvest benchmark on the real small model (Gemma 3 270M, 18 layers), CPU; every table is measured in one run,
interleaved (A, B, A, B, ...) so the load of a shared machine drifts out of the ratios, which are medians of the
per-round ratios.

1. **Harvester vs bare forward** (target >= 0.85): tokens/s of ``ActivationBuffer`` filling from the real token stream
   (``training/data.py`` windows -> ``ActivationHarvester`` -> the shuffle buffer, exactly as ``training/train.py``
   runs it) against a bare forward of the decoder stack truncated after the same layer (``model.model`` with
   ``layers[:L + 1]``), same dtype, same batch, on windows of the same stream.
2. **bf16 vs fp32 LM** on this CPU: the bare truncated forward in both dtypes.
3. **FLOP/s against the physical ceiling**: the forward's matmul FLOPs (attention projections, attention scores and
   values over the causal pairs, MLP) per second, against the FLOP/s of bare matmuls of the same shapes (one layer's
   seven projections with the model's weights, and the two attention batched matmuls), in bf16 and fp32.
4. **LM batch x context sweep**: tokens/s and FLOP/s fraction of the bare truncated forward for each
   ``--lm-batch-size`` x ``--context-length``, and which is best.

    python benchmarks/bench_harvest.py                          # defaults of python -m training.train; ~4 min
    python benchmarks/bench_harvest.py --rounds 3 --batches 8 16 --contexts 128 --no-fp32
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # training/ is not installed: use this checkout

from hf_sae.sites import decoder_stack, resolve_site  # noqa: E402
from training.config import make_config  # noqa: E402
from training.data import TokenWindows, dataset_factories, excluded_token_ids  # noqa: E402
from training.harvest import ActivationBuffer, ActivationHarvester  # noqa: E402
from training.language_model import lm_dtype, resolve_layers  # noqa: E402
from training.small_gemma import load_small_gemma  # noqa: E402


# --------------------------------------------------------------------------------------------------- the model
def truncated_stack(model: nn.Module, layer: int) -> nn.Module:
    """The decoder stack of ``model`` running only ``layers[: layer + 1]`` (a shallow copy: weights shared), without
    its final norm: the least a harvest at ``layer`` must compute."""
    stack = copy.copy(decoder_stack(model))
    stack._modules = dict(stack._modules)
    stack.layers = nn.ModuleList(list(stack.layers)[: layer + 1])
    stack.norm = nn.Identity()
    return stack


def bare_forward(stack: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> int:
    """Run ``stack`` on each (input_ids, attention_mask) batch; the tokens it read."""
    with torch.inference_mode():
        for input_ids, attention_mask in batches:
            stack(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return sum(ids.numel() for ids, _ in batches)


def forward_flops(config, layers: int, batch: int, context: int) -> float:
    """Matmul FLOPs of ``layers`` decoder layers on ``batch`` x ``context`` tokens (2 per multiply-add).

    Projections: q, k, v, o and the gated MLP's gate, up, down. Attention: Q K^T and weights @ V for every
    (query, key) pair a causal (or sliding-window) mask keeps. Norms, rotary embeddings and activations are not counted.
    """
    d, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    per_token = (
        2 * d * head_dim * (heads + 2 * kv_heads) + 2 * heads * head_dim * d + 3 * 2 * d * config.intermediate_size
    )
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None) or context
    total = 0.0
    for i in range(layers):
        span = window if types[i] == "sliding_attention" else context
        pairs = sum(min(t + 1, span) for t in range(context))
        total += batch * (context * per_token + 2 * 2 * heads * head_dim * pairs)
    return total


def matmul_ceiling(model: nn.Module, dtype: torch.dtype, batch: int, context: int) -> tuple[Callable[[], None], float]:
    """(a call running bare matmuls of one layer's shapes, its FLOPs): the seven projections with the model's weights
    of layer 0 (cast to ``dtype``) on (batch * context, d) inputs, and the two attention batched matmuls over the full
    (context x context) square."""
    block = decoder_stack(model).layers[0]
    attention, mlp = block.self_attn, block.mlp
    weights = [
        module.weight.detach().to(dtype)
        for module in (attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj, mlp.up_proj)
    ]
    down = mlp.down_proj.weight.detach().to(dtype)
    o_proj = attention.o_proj.weight.detach().to(dtype)
    rows, d = batch * context, weights[0].shape[1]
    heads, head_dim = model.config.num_attention_heads, o_proj.shape[1] // model.config.num_attention_heads
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d, generator=generator).to(dtype)
    z = torch.randn(rows, heads * head_dim, generator=generator).to(dtype)
    h = torch.randn(rows, down.shape[1], generator=generator).to(dtype)
    q = torch.randn(batch * heads, context, head_dim, generator=generator).to(dtype)
    k = torch.randn(batch * heads, head_dim, context, generator=generator).to(dtype)
    scores = torch.randn(batch * heads, context, context, generator=generator).to(dtype)

    def run() -> None:
        with torch.inference_mode():
            for weight in weights:
                F.linear(x, weight)
            F.linear(z, o_proj)
            F.linear(h, down)
            torch.bmm(q, k)
            torch.bmm(scores, q)

    flops = 2 * rows * sum(w.numel() for w in [*weights, o_proj, down]) + 2 * 2 * batch * heads * head_dim * context**2
    return run, float(flops)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each call, ``rounds`` times, the calls alternating within a round (one warm-up round first)."""
    for fn in fns.values():
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            seconds[name].append(timed(fn))
    return seconds


def median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def random_batches(n: int, batch: int, context: int, bos: int, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 50_000, (batch, context), generator=generator)
        ids[:, 0] = bos
        out.append((ids, torch.ones_like(ids)))
    return out


# ----------------------------------------------------------------------------------------------------- sections
def bench_harvester(model, tokenizer, layer: int, batch: int, context: int, lm_batches: int, rounds: int) -> None:
    """Section 1: the harvest into the shuffle buffer vs the bare truncated forward."""
    cfg = make_config()
    site = resolve_site(model, layer, "resid")
    train_data, _ = dataset_factories(cfg, 0, 1)
    windows = TokenWindows(train_data, tokenizer, context)
    harvester = ActivationHarvester(model, [site], excluded_token_ids(cfg, tokenizer))
    reference = [windows.next_batch(batch) for _ in range(lm_batches)]  # real windows for the bare forward
    stack = truncated_stack(model, layer)
    rows_per_batch = batch * (context - 1)  # BOS is excluded: every full window gives context - 1 rows

    def harvest() -> int:
        buffer = ActivationBuffer(
            windows, harvester, lm_batches * rows_per_batch, 4096, batch, model.dtype, torch.device("cpu")
        )
        before = windows.windows
        buffer.peek(1)  # fills one round: lm_batches LM batches
        return (windows.windows - before) * context

    tokens = lm_batches * batch * context
    seconds = interleaved({"harvest": harvest, "bare": lambda: bare_forward(stack, reference)}, rounds)
    harvest_tps = tokens / statistics.median(seconds["harvest"])
    bare_tps = tokens / statistics.median(seconds["bare"])
    ratio = median_ratio(seconds["bare"], seconds["harvest"])
    print(
        f"\n## 1. Harvester into the shuffle buffer vs bare truncated forward — layer {layer} resid, {model.dtype}, "
        f"{batch}x{context} tokens per LM batch, {lm_batches} LM batches per fill, {torch.get_num_threads()} threads, "
        f"{rounds} interleaved rounds"
    )
    print("| path | tokens/s (median) | ratio to bare (median of rounds) | target |")
    print("|---|---:|---:|---:|")
    print(f"| bare forward, layers 0..{layer}, no LM head | {bare_tps:,.0f} | 1.00 | |")
    ok = "ok" if ratio >= 0.85 else "BELOW"
    print(f"| ActivationBuffer fill (windows + harvester + buffer) | {harvest_tps:,.0f} | {ratio:.3f} | >= 0.85 {ok} |")
    print("per-round ratios:", " ".join(f"{b / h:.3f}" for b, h in zip(seconds["bare"], seconds["harvest"])))


def bench_dtypes(models: dict[str, nn.Module], layer: int, batch: int, context: int, rounds: int) -> None:
    """Section 2: bf16 vs fp32 bare truncated forward."""
    bos = 2
    batches = random_batches(2, batch, context, bos)
    stacks = {name: truncated_stack(model, layer) for name, model in models.items()}
    seconds = interleaved({name: lambda s=s: bare_forward(s, batches) for name, s in stacks.items()}, rounds)
    tokens = 2 * batch * context
    print(f"\n## 2. LM dtype on this CPU — bare forward, layers 0..{layer}, {batch}x{context}, {rounds} rounds")
    print("| dtype | tokens/s (median) | time ratio to float32 (median of rounds) |")
    print("|---|---:|---:|")
    for name in stacks:
        ratio = median_ratio(seconds[name], seconds["float32"])
        print(f"| {name} | {tokens / statistics.median(seconds[name]):,.0f} | {ratio:.3f} |")


def bench_sweep(
    model: nn.Module, fp32_model: nn.Module | None, layer: int, batches: list[int], contexts: list[int], rounds: int
) -> None:
    """Sections 3 and 4: achieved FLOP/s vs the matmul ceiling for each LM batch x context."""
    stack = truncated_stack(model, layer)
    config = model.config
    calls: dict[str, Callable[[], object]] = {}
    flops: dict[tuple[int, int], float] = {}
    ceiling_flops: dict[tuple[int, int, str], float] = {}
    for batch in batches:
        for context in contexts:
            data = random_batches(1, batch, context, bos=2)
            calls[f"forward {batch}x{context}"] = lambda data=data: bare_forward(stack, data)
            flops[batch, context] = forward_flops(config, layer + 1, batch, context)
            for name, dtype_model in (("bf16", model), ("fp32", fp32_model)):
                if dtype_model is None:
                    continue
                dtype = torch.bfloat16 if name == "bf16" else torch.float32
                run, n = matmul_ceiling(dtype_model, dtype, batch, context)
                calls[f"{name} matmuls {batch}x{context}"] = run
                ceiling_flops[batch, context, name] = n
    seconds = interleaved(calls, rounds)
    print(
        f"\n## 3-4. Achieved matmul FLOP/s of the bare forward (layers 0..{layer}, {model.dtype}) vs bare matmuls of "
        f"the model's shapes — {rounds} interleaved rounds, median"
    )
    header = "| LM batch x context | tokens/s | forward GFLOP/s | bf16 matmul GFLOP/s | fraction of bf16 ceiling |"
    header += " fp32 matmul GFLOP/s |" if fp32_model is not None else ""
    print(header)
    print("|---|---:|---:|---:|---:|" + ("---:|" if fp32_model is not None else ""))
    best: tuple[float, str] | None = None
    for batch in batches:
        for context in contexts:
            forward = seconds[f"forward {batch}x{context}"]
            bf16 = seconds[f"bf16 matmuls {batch}x{context}"]
            achieved = flops[batch, context] / statistics.median(forward)
            ceiling = ceiling_flops[batch, context, "bf16"] / statistics.median(bf16)
            fraction = statistics.median(
                (flops[batch, context] / f) / (ceiling_flops[batch, context, "bf16"] / c)
                for f, c in zip(forward, bf16, strict=True)
            )
            tps = batch * context / statistics.median(forward)
            row = f"| {batch}x{context} | {tps:,.0f} | {achieved / 1e9:.0f} | {ceiling / 1e9:.0f} | {fraction:.2f} |"
            if fp32_model is not None:
                fp32 = ceiling_flops[batch, context, "fp32"] / statistics.median(
                    seconds[f"fp32 matmuls {batch}x{context}"]
                )
                row += f" {fp32 / 1e9:.0f} |"
            print(row)
            if best is None or tps > best[0]:
                best = (tps, f"{batch}x{context}")
    assert best is not None
    print(f"best tokens/s: LM batch x context {best[1]} ({best[0]:,.0f} tokens/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = make_config()
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: the run's --lm-dtype")
    parser.add_argument("--layer", type=int, default=None, help="default: the run's default layer (the middle one)")
    parser.add_argument("--lm-batch-size", type=int, default=defaults.lm_batch_size)
    parser.add_argument("--context-length", type=int, default=defaults.context_length)
    parser.add_argument("--lm-batches", type=int, default=4, help="LM batches per timed buffer fill")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="*", default=[8, 16, 32], help="sweep: LM batch sizes")
    parser.add_argument("--contexts", type=int, nargs="*", default=[128, 256], help="sweep: context lengths")
    parser.add_argument("--no-fp32", action="store_true", help="skip everything that needs a float32 copy of the LM")
    args = parser.parse_args()

    dtype = getattr(torch, args.dtype) if args.dtype else lm_dtype(defaults, torch.device("cpu"))
    model, tokenizer = load_small_gemma(dtype=dtype)
    (spec,) = resolve_layers(defaults, model)
    layer = spec.layer if args.layer is None else args.layer
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; run defaults: --lm-dtype {defaults.lm_dtype} "
        f"-> {dtype}, layer {spec.layer}, --lm-batch-size {defaults.lm_batch_size}, "
        f"--context-length {defaults.context_length}"
    )
    bench_harvester(model, tokenizer, layer, args.lm_batch_size, args.context_length, args.lm_batches, args.rounds)
    fp32_model = None
    if not args.no_fp32:
        fp32_model = model if dtype == torch.float32 else load_small_gemma(dtype=torch.float32)[0]
        bf16_model = model if dtype == torch.bfloat16 else load_small_gemma(dtype=torch.bfloat16)[0]
        models = {"float32": fp32_model, "bfloat16": bf16_model}
        bench_dtypes(models, layer, args.lm_batch_size, args.context_length, args.rounds)
    if args.batches and args.contexts:
        bench_sweep(model, fp32_model, layer, args.batches, args.contexts, max(3, args.rounds // 2))


if __name__ == "__main__":
    main()
