"""The Triton kernels (HierarchicalTopK / TopK loss, sparse decode) against the pure-torch reference, on CPU.

Triton's interpreter runs ``@triton.jit`` kernels on CPU tensors when ``TRITON_INTERPRET=1`` is set at the moment a
kernel is *decorated* (triton 3.x reads the variable in ``triton.jit``, not at ``import triton``; torch may have
imported triton long before). So :func:`_interpreted_kernel_modules` imports fresh copies of the kernel modules with
the variable set and then puts ``sys.modules`` and the environment back as they were: nothing else in the pytest
process (torch.compile, the GPU path of other tests) sees interpreted kernels or the variable.

The interpreter is slow (~1 ms per block operation), so large shapes use large tiles (few programs); small shapes
use tiny tiles so that both the row and the column masks of partial tiles are exercised.
"""

from __future__ import annotations

import importlib
import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import hf_sae.kernels
from hf_sae import losses, sparse
from hf_sae.kernels.triton_support import triton_kernel_for
from hf_sae.losses import _torch_hierarchical_loss, budget_weights

KERNEL_MODULES = ["hf_sae.kernels.triton_decode", "hf_sae.kernels.triton_hierarchical"]


def _interpreted_kernel_modules():
    """(triton_decode, triton_hierarchical) module objects whose kernels run in triton's interpreter."""
    try:
        import triton  # noqa: F401
    except Exception as err:  # not installed, or an install that cannot initialise on this machine
        pytest.skip(
            f"triton cannot be imported ({err!r}); the Triton kernels are untested here", allow_module_level=True
        )
    saved_modules = {name: sys.modules.pop(name, None) for name in KERNEL_MODULES}
    saved_attributes = {name: hf_sae.kernels.__dict__.get(name.rsplit(".", 1)[1]) for name in KERNEL_MODULES}
    saved_env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        return tuple(importlib.import_module(name) for name in KERNEL_MODULES)
    finally:
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env
        for name in KERNEL_MODULES:
            short = name.rsplit(".", 1)[1]
            sys.modules.pop(name, None)
            if saved_modules[name] is not None:
                sys.modules[name] = saved_modules[name]
            if saved_attributes[name] is not None:
                setattr(hf_sae.kernels, short, saved_attributes[name])
            else:
                hf_sae.kernels.__dict__.pop(short, None)


triton_decode, triton_hierarchical = _interpreted_kernel_modules()


def random_latents(n, k, d, f, seed=0):
    """float64 x (n, d), sorted non-negative values and distinct indices (n, k), unit-row W_dec (f, d), b_dec (d,).
    Two rows share a latent so the decoder-gradient atomics see concurrent rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    W = F.normalize(torch.randn(f, d, generator=g, dtype=torch.float64), dim=1)
    b = 0.1 * torch.randn(d, generator=g, dtype=torch.float64)
    values = torch.rand(n, k, generator=g, dtype=torch.float64).sort(dim=1, descending=True).values
    indices = torch.stack([torch.randperm(f, generator=g)[:k] for _ in range(n)])
    if n > 1:
        indices[1, 0] = indices[0, k - 1]
    return x, values, indices, W, b


def reference_loss(x, values, indices, W, b, budgets):
    """The pure-torch reference (float64) with gradients w.r.t. x, values, W_dec, b_dec."""
    leaves = [t.detach().double().clone().requires_grad_() for t in (x, values, W, b)]
    weights = budget_weights(values.shape[1], budgets, torch.float64, x.device)
    loss, reconstruction = _torch_hierarchical_loss(
        leaves[0], leaves[1], indices, leaves[2], leaves[3], weights, 1 << 22
    )
    loss.backward()
    return loss.detach(), reconstruction, [t.grad for t in leaves]


def triton_loss(x, values, indices, W, b, budgets, tiles=None):
    leaves = [t.detach().clone().requires_grad_() for t in (x, values, W, b)]
    k = values.shape[1]
    weights = budget_weights(k, budgets, torch.float32, x.device)
    loss, reconstruction = triton_hierarchical.hierarchical_topk_loss(
        leaves[0], leaves[1], indices, leaves[2], leaves[3], weights, budgets == [k], tiles
    )
    loss.backward()
    return loss.detach(), reconstruction, [t.grad for t in leaves]


def assert_close_relative(actual, expected, rtol, what):
    """max |actual − expected| ≤ rtol · max |expected| (a scale-aware bound for sums of many terms)."""
    error = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    assert error <= rtol * max(scale, 1e-30), f"{what}: max error {error:.3g} vs scale {scale:.3g} (rtol {rtol})"


LOSS_CASES = [  # (n, k, d, f, budgets, tiles (rows, columns, warps) per program); None: the GPU default
    pytest.param(5, 3, 37, 50, None, (2, 16, 4), id="K3-D37-B5-all-budgets-partial-tiles"),
    pytest.param(5, 17, 37, 50, [1, 4, 17], (2, 16, 4), id="K17-D37-B5-budgets-1-4-17"),
    pytest.param(5, 17, 37, 50, [17], (4, 32, 4), id="K17-D37-B5-plain-topk"),
    pytest.param(1, 1, 37, 50, None, None, id="K1-D37-B1"),
    pytest.param(5, 17, 640, 300, None, None, id="K17-D640-B5-default-tiles"),
    pytest.param(256, 64, 640, 1000, None, (128, 256, 4), id="K64-D640-B256"),
    pytest.param(256, 64, 640, 1000, [64], (128, 256, 4), id="K64-D640-B256-plain-topk"),
    pytest.param(5, 100, 2304, 400, [1, 4, 17, 100], (8, 1024, 4), id="K100-D2304-B5-budgets"),
    pytest.param(256, 100, 2304, 2000, None, (256, 1024, 4), id="K100-D2304-B256", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("n, k, d, f, budgets, tiles", LOSS_CASES)
def test_float32_loss_reconstruction_and_gradients_match_the_reference(n, k, d, f, budgets, tiles):
    x, values, indices, W, b = random_latents(n, k, d, f)
    expected_loss, expected_reconstruction, expected_grads = reference_loss(x, values, indices, W, b, budgets)
    loss, reconstruction, grads = triton_loss(x.float(), values.float(), indices, W.float(), b.float(), budgets, tiles)
    assert loss.dtype == torch.float32 and reconstruction.dtype == torch.float32
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    assert_close_relative(reconstruction, expected_reconstruction, 1e-5, "reconstruction")
    for name, grad, expected in zip(["x", "values", "W_dec", "b_dec"], grads, expected_grads):
        assert grad.dtype == torch.float32
        assert_close_relative(grad, expected, 2e-5, f"dL/d{name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("budgets", [None, [1, 4, 17], [17]], ids=["all", "1-4-17", "topk"])
def test_half_precision_inputs_accumulate_in_float32(dtype, budgets):
    """Half-precision inputs are read as they are and summed in fp32: against the float64 reference on the same
    (rounded) inputs the only error left is the final rounding of each output to its input's dtype."""
    x, values, indices, W, b = (t.to(dtype) if t.is_floating_point() else t for t in random_latents(5, 17, 2304, 200))
    expected_loss, expected_reconstruction, expected_grads = reference_loss(x, values, indices, W, b, budgets)
    loss, reconstruction, grads = triton_loss(x, values, indices, W, b, budgets, (8, 1024, 4))
    eps = torch.finfo(dtype).eps
    assert loss.dtype == torch.float32 and reconstruction.dtype == dtype
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    assert_close_relative(reconstruction, expected_reconstruction, eps, "reconstruction")
    for name, grad, expected in zip(["x", "values", "W_dec", "b_dec"], grads, expected_grads):
        assert grad.dtype == dtype
        assert_close_relative(grad, expected, eps, f"dL/d{name}")


def test_mixed_dtypes_keep_each_gradient_in_its_input_dtype():
    """bf16 activations with an fp32 SAE (the harvest's dtype, the master weights): no upcast copies needed."""
    x, values, indices, W, b = random_latents(5, 17, 37, 50)
    expected_loss, _, expected_grads = reference_loss(x.bfloat16(), values.float(), indices, W.float(), b.float(), None)
    loss, _, grads = triton_loss(x.bfloat16(), values.float(), indices, W.float(), b.float(), None, (2, 16, 4))
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32, torch.float32]
    for name, grad, expected, rtol in zip(
        ["x", "values", "W_dec", "b_dec"], grads, expected_grads, [8e-3, 2e-5, 2e-5, 2e-5]
    ):
        assert_close_relative(grad, expected, rtol, f"dL/d{name}")


DECODE_CASES = [  # (n, k, d, f, tiles)
    pytest.param(5, 1, 37, 50, (2, 16, 4), id="K1-D37-B5"),
    pytest.param(5, 17, 37, 50, (2, 16, 4), id="K17-D37-B5"),
    pytest.param(1, 3, 640, 100, None, id="K3-D640-B1-default-tiles"),
    pytest.param(256, 64, 640, 1000, (128, 256, 4), id="K64-D640-B256"),
    pytest.param(5, 100, 2304, 400, (8, 1024, 4), id="K100-D2304-B5"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n, k, d, f, tiles", DECODE_CASES)
def test_sparse_decode_forward_and_backward_match_embedding_bag(n, k, d, f, tiles, dtype):
    _, values, indices, W, _ = random_latents(n, k, d, f)
    values, W = values.to(dtype), W.to(dtype)
    grad_out = torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected_leaves = [values.double().requires_grad_(), W.double().requires_grad_()]
    expected = F.embedding_bag(indices, expected_leaves[1], per_sample_weights=expected_leaves[0], mode="sum")
    expected.backward(grad_out)
    leaves = [values.clone().requires_grad_(), W.clone().requires_grad_()]
    out = triton_decode.sparse_decode(leaves[0], indices, leaves[1], tiles)
    out.backward(grad_out.to(dtype))
    rtol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps  # bf16 also rounds grad_out
    assert out.dtype == dtype and [t.grad.dtype for t in leaves] == [dtype, dtype]
    assert_close_relative(out, expected, rtol, "decode")
    assert_close_relative(leaves[0].grad, expected_leaves[0].grad, rtol, "dL/dvalues")
    assert_close_relative(leaves[1].grad, expected_leaves[1].grad, rtol, "dL/dW_dec")


def test_the_public_functions_dispatch_to_triton_and_match_the_cpu_path(monkeypatch):
    """What CUDA tensors get: hierarchical_topk_loss / sparse_decode route to the kernels before any upcast (here
    the interpreted kernels stand in for CUDA through the dispatch hook) and give the CPU path's results; bf16
    activations with an fp32 SAE, as the training step sees them."""
    calls = []

    def interpreted(name, *tensors):
        calls.append(name)
        return {"triton_decode": triton_decode, "triton_hierarchical": triton_hierarchical}[name]

    x, values, indices, W, b = (t.float() if t.is_floating_point() else t for t in random_latents(5, 17, 37, 50))
    x = x.bfloat16()
    expected = [t.clone().requires_grad_() for t in (x, values, W, b)]
    expected_loss, expected_reconstruction = losses.hierarchical_topk_loss(
        *expected[:2], indices, *expected[2:], [1, 4, 17]
    )
    expected_loss.backward()
    expected_decode = sparse.sparse_decode(values, indices, W)
    monkeypatch.setattr(losses, "triton_kernel_for", interpreted)
    monkeypatch.setattr(sparse, "triton_kernel_for", interpreted)
    ours = [t.clone().requires_grad_() for t in (x, values, W, b)]
    loss, reconstruction = losses.hierarchical_topk_loss(*ours[:2], indices, *ours[2:], [1, 4, 17])
    loss.backward()
    decoded = sparse.sparse_decode(values, indices, W)
    assert calls == ["triton_hierarchical", "triton_decode"]
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    assert reconstruction.dtype == expected_reconstruction.dtype == torch.bfloat16
    assert_close_relative(reconstruction, expected_reconstruction, 8e-3, "reconstruction")
    assert_close_relative(decoded, expected_decode, 1e-5, "decode")
    for name, ours_leaf, expected_leaf, rtol in zip(
        ["x", "values", "W_dec", "b_dec"], ours, expected, [8e-3, 2e-5, 2e-5, 2e-5]
    ):
        assert ours_leaf.grad.dtype == expected_leaf.grad.dtype
        assert_close_relative(ours_leaf.grad, expected_leaf.grad, rtol, f"dL/d{name}")
    calls.clear()
    losses.hierarchical_topk_loss(x, values, indices, W, b, use_kernel=False)  # the torch reference stays reachable
    assert "triton_hierarchical" not in calls


def test_cpu_tensors_never_take_the_triton_path():
    x = torch.randn(3, 4)
    assert triton_kernel_for("triton_hierarchical", x, x) is None
    assert triton_kernel_for("triton_decode", x.bfloat16()) is None


def test_hf_sae_imports_and_decodes_without_triton():
    """triton is optional: with it unimportable, hf_sae imports, the kernel loader says None, CPU decode works."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, hf_sae\n"
        "from hf_sae.kernels.triton_support import load_triton_module\n"
        "assert load_triton_module('triton_hierarchical') is None\n"
        "from hf_sae.losses import hierarchical_topk_loss\n"
        "x = torch.randn(3, 4); v = torch.rand(3, 2); i = torch.randint(0, 5, (3, 2)); W = torch.randn(5, 4)\n"
        "print(float(hierarchical_topk_loss(x, v, i, W, torch.zeros(4))[0]))\n"
    )
    env = {**os.environ, "HF_SAE_NO_EXTENSION": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr


def _hopper_specializations(kernel, dtype: str) -> list[tuple[dict, dict]]:
    """(signature, constexprs) of one of our kernels at the default tiles for every setting of its boolean flags,
    from its argument names: decoder and activation pointers in ``dtype``, indices int64, other pointers fp32,
    N/K/D int32, upper-case names constexpr (BLOCK_* the tile, the rest flags)."""
    signature, tiles, flags = {}, {"BLOCK_N": 4, "BLOCK_D": 512}, []
    for name in kernel.arg_names:
        if name.endswith("_ptr"):
            wide = name in ("weight_ptr", "x_ptr")
            signature[name] = "*i64" if name == "indices_ptr" else f"*{dtype}" if wide else "*fp32"
        elif name.isupper() and len(name) > 1:
            signature[name] = "constexpr"
            if name not in tiles:
                flags.append(name)
        else:
            signature[name] = "i32"
    settings = itertools.product([True, False], repeat=len(flags))
    return [(signature, {**tiles, **dict(zip(flags, setting))}) for setting in settings]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kernels_compile_for_hopper_without_a_gpu(dtype, tmp_path, monkeypatch):
    """Every kernel compiles to an sm_90 (H100 / H200) cubin at the default tiles and every flag setting: what the
    interpreter cannot check (types, layouts, register allocation) is checked by triton's real compiler and ptxas,
    with no GPU needed."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, compile
    except ImportError as err:
        pytest.skip(f"this triton has no ahead-of-time compile API ({err})")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # compile for real, not from an earlier run's cache
    import hf_sae.kernels.triton_decode as compiled_decode
    import hf_sae.kernels.triton_hierarchical as compiled_hierarchical

    kernels = [
        compiled_decode.decode_forward_kernel,
        compiled_decode.scatter_backward_kernel,
        compiled_hierarchical.hierarchical_forward_kernel,
        compiled_hierarchical.hierarchical_backward_kernel,
    ]
    for kernel in kernels:
        assert type(kernel).__name__ == "JITFunction"  # the real compiler's kernels, not the interpreter's copies
        for signature, constexprs in _hopper_specializations(kernel, dtype):
            binary = compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32))
            assert binary.asm["cubin"], (kernel.__name__, constexprs)
