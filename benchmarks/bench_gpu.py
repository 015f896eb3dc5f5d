"""GPU benchmark of the Triton kernels and the training pipeline, each against a floor measured in the same run.

Sections (every table: medians over interleaved rounds A, B, A, B, ..., ratios within the run):

a. Decoder + loss, forward and backward, at flexsae's shape (F 65,536, D 2,304, K 32 / 64 / 128, fp32, batch
   ``--batch``): HierarchicalTopK vs TopK on our kernels (goals: Hier ≤ 1.15× TopK time, ≤ 1.05× TopK peak memory,
   printed as met / missed), the pure-torch reference, and flexsae's kernels when they load (``kernels`` hub package
   or ``--flexsae-path``; never a dependency). Floor: one ``F.embedding_bag`` gather plus the zero-filled (F, D)
   fp32 decoder gradient, which every implementation pays. Each kernel is also checked against the torch reference.
b. The full :func:`hf_sae.training_step` in bf16 (``autocast_dtype=torch.bfloat16``) of a HierarchicalSAE and a
   TopK SAE of that shape, with the loss on the kernels and on the torch path (``HF_SAE_NO_TRITON=1``). Floor: the
   bf16 encoder product (batch, D) x (D, F) plus ``torch.topk`` of its rows.
c. Harvest from a Gemma-2-2B-shaped model with random weights built from its config (no download) at layer 12,
   through :func:`hf_sae.sites.capture_activations` (the forward stops after the hooked layer, as in training).
   Floor: the decoder stack cut to layers 0..12; also the whole 26-layer stack.
d. The pipeline: harvest one LM batch, then one bf16 HierarchicalSAE step on its activations; tokens/s against
   harvest alone (the floor) and against the serial sum of the two measured apart.
e. (not with ``--quick``) tile shapes of the HierarchicalTopK kernels at K = 64, against the default.

    python benchmarks/bench_gpu.py --out gpu.md            # the whole run (~5 min on an H200)
    python benchmarks/bench_gpu.py --quick --out gpu.md    # K = 64 only, fewer rounds (~2 min)
    python benchmarks/bench_gpu.py --cpu-smoke             # tiny shapes on CPU, Triton's interpreter: runs end to end

Run from the repository root (``PYTHONPATH=.`` when hf_sae is not installed). A section that fails prints its
traceback and the run goes on with the next one.
"""

from __future__ import annotations

import os
import sys

if "--cpu-smoke" in sys.argv:  # must precede the first @triton.jit decoration (triton reads it there)
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from contextlib import contextmanager  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from hf_sae import training_step  # noqa: E402
from hf_sae.kernels.triton_support import load_triton_module, triton_kernel_for  # noqa: E402
from hf_sae.losses import budget_weights, hierarchical_topk_loss  # noqa: E402
from hf_sae.registry import resolve_architecture  # noqa: E402
from hf_sae.sites import capture_activations, decoder_stack, resolve_site  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling benchmarks, when run as a script
import bench_sae_step  # noqa: E402

GEMMA2_2B = dict(  # google/gemma-2-2b's config.json sizes
    hidden_size=2304,
    num_hidden_layers=26,
    intermediate_size=9216,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    vocab_size=256000,
)
GEMMA2_TINY = dict(
    hidden_size=64,
    num_hidden_layers=4,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=1000,
)
FULL = dict(d_sae=65536, d_in=2304, ks=[32, 64, 128], batch=8192, step_batch=8192, step_k=64,
            layer=12, lm_batch=8, context=1024, model=GEMMA2_2B, rounds=7)  # fmt: skip
QUICK = dict(FULL, ks=[64], rounds=5)
SMOKE = dict(d_sae=512, d_in=64, ks=[4, 8], batch=48, step_batch=64, step_k=8,  # flexsae: powers of two, B % 16
             layer=2, lm_batch=2, context=16, model=GEMMA2_TINY, rounds=2)  # fmt: skip
TILES = [
    (4, 512, 4),
    (2, 1024, 4),
    (8, 256, 4),
    (16, 128, 4),
    (16, 32, 8),
    (1, 64, 2),
    (8, 512, 8),
    (1, 1024, 4),
]  # (rows, columns, warps); none spills registers on sm_90
GIB = 2**30

LINES: list[str] = []
OUT_PATH: list[str] = []  # the --out file, rewritten after every section (a run cut short keeps what it measured)


def say(line: str = "") -> None:
    """Print and keep for ``--out``."""
    print(line, flush=True)
    LINES.append(line)


def write_out() -> None:
    for path in OUT_PATH:
        with open(path, "w") as handle:
            handle.write("\n".join(LINES) + "\n")


def table(title: str, header: list[str], rows: list[list]) -> None:
    bench_sae_step.table(title, header, rows, emit=say)


def goal(value: float, limit: float) -> str:
    if value != value:  # nan: not measured here (peak memory off CUDA)
        return f"n/a (goal <= {limit})"
    return f"{value:.3f} ({'met' if value <= limit else 'missed'}, goal <= {limit})"


# ----------------------------------------------------------------------------------------------- measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, device: torch.device) -> dict[str, dict]:
    """{name: {"s": median seconds, "peak": peak GiB allocated during a call (CUDA) or nan}}: two warm-up calls
    each (Triton compilation, the allocator), then ``rounds`` rounds calling every variant once in turn."""
    for fn in fns.values():
        fn()
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, float] = dict.fromkeys(fns, float("nan"))
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            fn()
            sync(device)
            seconds[name].append(time.perf_counter() - start)
            if device.type == "cuda":
                peaks[name] = torch.cuda.max_memory_allocated(device) / GIB
    return {name: {"s": statistics.median(seconds[name]), "peak": peaks[name]} for name in fns}


@contextmanager
def torch_loss_path():
    """The pure-torch loss and decode on CUDA (``HF_SAE_NO_TRITON``, read at each call)."""
    before = os.environ.get("HF_SAE_NO_TRITON")
    os.environ["HF_SAE_NO_TRITON"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HF_SAE_NO_TRITON")
        else:
            os.environ["HF_SAE_NO_TRITON"] = before


def run_section(name: str, fn: Callable[[], None]) -> None:
    start = time.perf_counter()
    try:
        fn()
    except Exception:  # one broken section must not cost the others' (GPU) time
        say(f"\n**section {name} failed:**\n```\n{traceback.format_exc()}```")
    say(f"\n(section {name}: {time.perf_counter() - start:.1f} s)")
    write_out()


# ------------------------------------------------------------------------------------ a. decoder + loss
def load_flexsae(path: str | None, device: torch.device):
    """flexsae's kernel module (``triton_topk_sae_loss``, ``triton_hierarchical_sae_loss``), or None with the reason
    printed: from a local copy of its ``torch-ext`` folder, else through the HF kernels hub (``kernels``). On CPU
    only a local copy is tried (the interpreter runs it: a check of the calling convention, not of speed)."""
    if device.type != "cuda" and not path:
        say("flexsae: skipped (no --flexsae-path, and the kernels hub serves CUDA builds only; this run is on CPU)")
        return None
    try:
        if path:
            sys.path.insert(0, path)
            import flex_sae

            return flex_sae
        from kernels import get_kernel

        return get_kernel("t-tech/flex-sae")
    except Exception as err:
        say(f"flexsae: skipped (could not load it: {type(err).__name__}: {err})")
        return None


def decoder_inputs(n: int, k: int, d: int, f: int, device: torch.device, seed: int = 0):
    """x (n, d), values (n, k) sorted descending, indices (n, k), unit-row W_dec (f, d), b_dec (d,), fp32 leaves."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, d, generator=g, device=device)
    W = F.normalize(torch.randn(f, d, generator=g, device=device), dim=1).requires_grad_()
    b = (0.1 * torch.randn(d, generator=g, device=device)).requires_grad_()
    values = torch.rand(n, k, generator=g, device=device).sort(dim=1, descending=True).values.requires_grad_()
    indices = torch.randint(0, f, (n, k), generator=g, device=device)
    return x, values, indices, W, b


def our_loss(x, values, indices, W, b, budgets):
    """What users run: hf_sae's public loss (on CUDA it dispatches to the Triton kernels). On CPU (--cpu-smoke) the
    kernels are called directly, interpreted, since the automatic choice takes them on CUDA only."""
    if x.is_cuda:
        return hierarchical_topk_loss(x, values, indices, W, b, budgets)
    kernels = load_triton_module("triton_hierarchical")
    k = values.shape[1]
    weights = budget_weights(k, budgets, torch.float32, x.device)
    return kernels.hierarchical_topk_loss(x, values, indices, W, b, weights, budgets == [k])


def loss_step(loss_fn: Callable, leaves: tuple) -> Callable[[], None]:
    x, values, indices, W, b = leaves

    def step():
        for t in (values, W, b):
            t.grad = None
        loss = loss_fn(x, values, indices, W, b)
        loss = loss[0] if isinstance(loss, tuple) else loss
        loss.backward()

    return step


def relative_errors(fn_a: Callable, fn_b: Callable, leaves: tuple) -> dict[str, float]:
    """max |a − b| / max |b| of the loss and of the gradients w.r.t. values, W_dec, b_dec, between two losses."""
    x, values, indices, W, b = leaves
    results = []
    for fn in (fn_a, fn_b):
        for t in (values, W, b):
            t.grad = None
        loss = fn(x, values, indices, W, b)
        loss = loss[0] if isinstance(loss, tuple) else loss
        loss.backward()
        results.append([loss.detach().clone(), values.grad.clone(), W.grad.clone(), b.grad.clone()])
    errors = {}
    for name, a, e in zip(["loss", "dv", "dW", "db"], *results):
        errors[name] = float((a.double() - e.double()).abs().max() / e.double().abs().max().clamp_min(1e-30))
    for t in (values, W, b):
        t.grad = None
    return errors


def torch_reference(budgets):
    """The pure-torch loss (and decode: no Triton anywhere in it), the oracle of the kernels."""

    def loss(x, values, indices, W, b):
        with torch_loss_path():
            return hierarchical_topk_loss(x, values, indices, W, b, budgets, use_kernel=False)

    return loss


def bench_decoder_loss(shape: dict, device: torch.device, rounds: int, flex) -> None:
    f, d, n = shape["d_sae"], shape["d_in"], shape["batch"]
    if device.type == "cuda" and triton_kernel_for("triton_hierarchical", torch.zeros(1, device=device)) is None:
        say("WARNING: the Triton kernels are not available here: 'ours' below is the pure-torch path")
    rows, check_rows = [], []
    for k in shape["ks"]:
        leaves = decoder_inputs(n, k, d, f, device)
        fns = {
            "floor": lambda leaves=leaves: (
                torch.zeros_like(leaves[3], dtype=torch.float32),
                F.embedding_bag(leaves[2], leaves[3].detach(), per_sample_weights=leaves[1].detach(), mode="sum"),
            ),
            "topk": loss_step(lambda *a, k=k: our_loss(*a, [k]), leaves),
            "hier": loss_step(lambda *a: our_loss(*a, None), leaves),
        }
        if device.type == "cuda":
            fns["hier_torch"] = loss_step(lambda *a: hierarchical_topk_loss(*a, use_kernel=False), leaves)
        if flex is not None:  # flexsae's argument order: (indices, weight, vals, bias, target)
            fns["flex_topk"] = loss_step(lambda x, v, i, W, b: flex.triton_topk_sae_loss(i, W, v, b, x), leaves)
            fns["flex_hier"] = loss_step(lambda x, v, i, W, b: flex.triton_hierarchical_sae_loss(i, W, v, b, x), leaves)
        r = interleaved(fns, rounds, device)
        ms = {name: v["s"] * 1e3 for name, v in r.items()}
        row = [k, ms["floor"], ms["topk"], ms["hier"], ms["topk"] / ms["floor"], goal(ms["hier"] / ms["topk"], 1.15)]
        row += [f"{r['topk']['peak']:.2f} / {r['hier']['peak']:.2f}", goal(r["hier"]["peak"] / r["topk"]["peak"], 1.05)]
        row += [f"{ms['hier_torch']:.3g} / {r['hier_torch']['peak']:.2f}" if "hier_torch" in ms else "-"]
        if flex is not None:
            row += [f"{ms['flex_topk']:.3g} / {ms['flex_hier']:.3g}", ms["hier"] / ms["flex_hier"]]
        rows.append(row)
        checks = {
            "hier vs torch": relative_errors(lambda *a: our_loss(*a, None), torch_reference(None), leaves),
            "topk vs torch": relative_errors(lambda *a, k=k: our_loss(*a, [k]), torch_reference([k]), leaves),
        }
        if flex is not None:
            checks["flex_topk vs torch"] = relative_errors(
                lambda x, v, i, W, b: flex.triton_topk_sae_loss(i, W, v, b, x), torch_reference([k]), leaves
            )
            checks["flex_hier vs torch"] = relative_errors(
                lambda x, v, i, W, b: flex.triton_hierarchical_sae_loss(i, W, v, b, x), torch_reference(None), leaves
            )
        for name, errors in checks.items():
            worst = max(errors.values())
            check_rows.append([k, name, *(f"{errors[e]:.1e}" for e in errors), "ok" if worst < 1e-4 else "MISMATCH"])
        del leaves, fns
        if device.type == "cuda":
            torch.cuda.empty_cache()
    header = ["K", "floor ms", "TopK ms", "Hier ms", "TopK/floor", "Hier/TopK time", "peak GiB TopK / Hier",
              "Hier/TopK memory", "torch Hier ms / GiB"]  # fmt: skip
    if flex is not None:
        header += ["flexsae TopK / Hier ms", "ours/flexsae Hier"]
    table(
        f"a. decoder + loss fwd+bwd, F {f}, D {d}, batch {n}, fp32 (floor: embedding_bag + (F, D) zero fill)",
        header,
        rows,
    )
    table(
        "a. correctness on this device: max relative error vs the pure-torch reference (fp32)",
        ["K", "kernel", "loss", "dL/dv", "dL/dW_dec", "dL/db_dec", "verdict (< 1e-4)"],
        check_rows,
    )


# --------------------------------------------------------------------------------------- b. training step
def make_sae(name: str, d_in: int, d_sae: int, k: int, device: torch.device):
    architecture, preset = resolve_architecture(name)
    sae = architecture.model_class(architecture.build_config(preset, d_in=d_in, d_sae=d_sae, k=k, auxk=False))
    sae.train()
    sae.check_finite = False  # as in training: the harvester already drops non-finite batches
    return sae.to(device)


def stepper(sae, x: torch.Tensor, autocast, torch_loss: bool = False) -> Callable[[], None]:
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=x.is_cuda or None)

    def step():
        if torch_loss:
            with torch_loss_path():
                training_step(sae, optimizer, x, max_grad_norm=1.0, autocast_dtype=autocast)
        else:
            training_step(sae, optimizer, x, max_grad_norm=1.0, autocast_dtype=autocast)

    return step


def bench_training_step(shape: dict, device: torch.device, rounds: int, quick: bool) -> None:
    d, f, k, n = shape["d_in"], shape["d_sae"], shape["step_k"], shape["step_batch"]
    x = torch.randn(n, d, generator=torch.Generator(device=device).manual_seed(1), device=device)
    W = torch.randn(f, d, device=device, dtype=torch.bfloat16)
    bias = torch.zeros(f, device=device, dtype=torch.bfloat16)
    fns = {
        "floor": lambda: torch.addmm(bias, x.bfloat16(), W.t()).topk(k, dim=-1),
        "topk_bf16": stepper(make_sae("topk", d, f, k, device), x, torch.bfloat16),
        "hier_bf16": stepper(make_sae("hierarchical", d, f, k, device), x, torch.bfloat16),
    }
    if device.type == "cuda" and not quick:
        fns["hier_bf16_torch"] = stepper(make_sae("hierarchical", d, f, k, device), x, torch.bfloat16, torch_loss=True)
    r = interleaved(fns, rounds, device)
    rows = []
    for name, v in r.items():
        ms = v["s"] * 1e3
        rows.append([name, ms, v["s"] / r["floor"]["s"], v["s"] / r["topk_bf16"]["s"], n / v["s"], f"{v['peak']:.2f}"])
    table(
        f"b. training_step, bf16 autocast, F {f}, D {d}, K {k}, batch {n} (floor: bf16 encoder addmm + topk); "
        f"Hier/TopK {goal(r['hier_bf16']['s'] / r['topk_bf16']['s'], 1.15)}",
        ["variant", "ms", "/floor", "/TopK bf16", "tokens/s", "peak GiB"],
        rows,
    )


# ----------------------------------------------------------------------------------------------- c, d. LM
def random_gemma2(sizes: dict, device: torch.device, attn: str):
    """A Gemma-2 causal LM with random weights built from its config, in bf16 on ``device`` (no download)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(**sizes, attn_implementation=attn)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Gemma2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.requires_grad_(False)
    return model.eval()


def cut_stack(model: nn.Module, layer: int) -> nn.Module:
    """The decoder stack running only ``layers[: layer + 1]`` (a shallow copy: weights shared), no final norm: the
    least any harvest at ``layer`` computes."""
    stack = copy.copy(decoder_stack(model))
    stack._modules = dict(stack._modules)
    stack.layers = nn.ModuleList(list(stack.layers)[: layer + 1])
    stack.norm = nn.Identity()
    return stack


def token_batch(shape: dict, device: torch.device, bos: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(2)
    vocab = shape["model"]["vocab_size"]
    ids = torch.randint(3, vocab, (shape["lm_batch"], shape["context"]), generator=g, device=device)
    ids[:, 0] = bos
    return ids, torch.ones_like(ids)


def harvest(model, site, ids, mask, bos: int = 2) -> torch.Tensor:
    """The training harvest (training/harvest.py's ActivationHarvester): the early-stopped forward through
    :func:`capture_activations`, then the activations of the kept (non-BOS) tokens, (n, d_in)."""
    captured = capture_activations(model, [site], input_ids=ids, attention_mask=mask, use_cache=False)
    keep = mask.bool() & (ids != bos)
    return captured[site.key][keep]


def bench_harvest(model, shape: dict, device: torch.device, rounds: int) -> None:
    layer = shape["layer"]
    site = resolve_site(model, layer, "resid")
    ids, mask = token_batch(shape, device)
    stack, whole = cut_stack(model, layer), decoder_stack(model)
    fns = {
        "floor": lambda: stack(input_ids=ids, attention_mask=mask, use_cache=False),
        "harvest": lambda: harvest(model, site, ids, mask),
        "whole_stack": lambda: whole(input_ids=ids, attention_mask=mask, use_cache=False),
    }
    with torch.inference_mode():
        r = interleaved(fns, rounds, device)
    tokens = ids.numel()
    rows = [[name, v["s"] * 1e3, tokens / v["s"], v["s"] / r["floor"]["s"]] for name, v in r.items()]
    layers = shape["model"]["num_hidden_layers"]
    table(
        f"c. harvest at layer {layer} of a random-weight Gemma-2 ({shape['model']['hidden_size']} hidden, {layers} "
        f"layers, bf16), {shape['lm_batch']} x {shape['context']} tokens (floor: layers 0..{layer} only); "
        f"harvest/floor {goal(r['harvest']['s'] / r['floor']['s'], 1.05)}",
        ["variant", "ms", "tokens/s", "/floor"],
        rows,
    )


def bench_pipeline(model, shape: dict, device: torch.device, rounds: int) -> None:
    site = resolve_site(model, shape["layer"], "resid")
    ids, mask = token_batch(shape, device)
    d_in = shape["model"]["hidden_size"]
    sae = make_sae("hierarchical", d_in, shape["d_sae"], shape["step_k"], device)
    with torch.no_grad():
        fixed = harvest(model, site, ids, mask).float()
    step = stepper(sae, fixed, torch.bfloat16)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-4, fused=device.type == "cuda" or None)

    def pipeline():
        with torch.no_grad():
            x = harvest(model, site, ids, mask).float()
        training_step(sae, optimizer, x, max_grad_norm=1.0, autocast_dtype=torch.bfloat16)

    def harvest_only():
        with torch.no_grad():
            harvest(model, site, ids, mask)

    r = interleaved({"harvest": harvest_only, "step": step, "pipeline": pipeline}, rounds, device)
    tokens = ids.numel()
    serial = r["harvest"]["s"] + r["step"]["s"]
    rows = [[name, v["s"] * 1e3, tokens / v["s"], v["s"] / r["harvest"]["s"]] for name, v in r.items()]
    rows.append(["harvest + step, measured apart", serial * 1e3, tokens / serial, serial / r["harvest"]["s"]])
    table(
        f"d. pipeline: harvest ({shape['lm_batch']} x {shape['context']} tokens, layer {shape['layer']}) + one bf16 "
        f"HierarchicalSAE step (F {shape['d_sae']}, K {shape['step_k']}) (floor: harvest alone); "
        f"pipeline / (harvest + step) {goal(r['pipeline']['s'] / serial, 1.05)}",
        ["variant", "ms", "tokens/s", "/floor"],
        rows,
    )


# ------------------------------------------------------------------------------------------ e. tile shapes
def bench_tiles(shape: dict, device: torch.device, rounds: int) -> None:
    kernels = load_triton_module("triton_hierarchical")
    if kernels is None:
        say("e. tile shapes: skipped (no Triton)")
        return
    k = 64 if 64 in shape["ks"] else shape["ks"][-1]
    leaves = decoder_inputs(shape["batch"], k, shape["d_in"], shape["d_sae"], device)
    weights = budget_weights(k, None, torch.float32, device)
    tiles = TILES if device.type == "cuda" else [(8, 16, 4), (64, 64, 4)]
    fns = {"default": loss_step(lambda *a: kernels.hierarchical_topk_loss(*a, weights), leaves)}
    for tile in tiles:
        fns["x".join(map(str, tile))] = loss_step(
            lambda *a, tile=tile: kernels.hierarchical_topk_loss(*a, weights, False, tile), leaves
        )
    r = interleaved(fns, rounds, device)
    default = "x".join(map(str, kernels.block_shape(shape["batch"], shape["d_in"])))
    rows = [[name, v["s"] * 1e3, v["s"] / r["default"]["s"]] for name, v in r.items()]
    table(
        f"e. HierarchicalTopK kernel tiles (rows x columns x warps per program), K {k}: default is {default}",
        ["tiles", "ms fwd+bwd", "/default"],
        rows,
    )


# ------------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="K = 64 only, 5 rounds, no tile sweep")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7, --quick 5)")
    parser.add_argument("--batch", type=int, default=None, help="rows of section a (default 8192)")
    parser.add_argument("--sections", default="abcde", help="which sections to run (default: all)")
    parser.add_argument("--flexsae-path", default=None, help="a folder holding flexsae's flex_sae package")
    parser.add_argument("--attn", default="eager", help="attn_implementation of the Gemma-2 model (default eager)")
    parser.add_argument("--out", default=None, help="also write the tables to this file (markdown)")
    args = parser.parse_args()
    if args.out:
        OUT_PATH.append(args.out)
    shape = dict(SMOKE if args.cpu_smoke else QUICK if args.quick else FULL)
    if args.batch:
        shape["batch"] = args.batch
    rounds = args.rounds or shape["rounds"]
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        parser.error("no CUDA device: run with --cpu-smoke on a CPU machine")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in every variant
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    try:
        import triton

        triton_version = triton.__version__
    except Exception as err:
        triton_version = f"unavailable ({type(err).__name__})"
    say(
        f"# bench_gpu: {name}, torch {torch.__version__}, triton {triton_version}, {rounds} interleaved rounds, medians"
    )
    started = time.perf_counter()
    if "a" in args.sections:
        flex = load_flexsae(args.flexsae_path, device)
        run_section("a", lambda: bench_decoder_loss(shape, device, rounds, flex))
    if "b" in args.sections:
        run_section("b", lambda: bench_training_step(shape, device, rounds, args.quick))
    if "c" in args.sections or "d" in args.sections:
        models = []
        run_section("model", lambda: models.append(random_gemma2(shape["model"], device, args.attn)))
        if models and "c" in args.sections:
            run_section("c", lambda: bench_harvest(models[0], shape, device, rounds))
        if models and "d" in args.sections:
            run_section("d", lambda: bench_pipeline(models[0], shape, device, rounds))
        models.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "e" in args.sections and not args.quick:
        run_section("e", lambda: bench_tiles(shape, device, rounds))
    say(f"\ntotal {time.perf_counter() - started:.0f} s")
    write_out()


if __name__ == "__main__":
    main()
