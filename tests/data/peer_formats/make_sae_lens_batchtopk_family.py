"""Build SAELens BatchTopK, Matryoshka BatchTopK and JumpReLU training folders *with sae-lens itself*, and its outputs.

The converter tests of these architectures (tests/test_batchtopk_family_convert.py) read the committed result, and
(slow) run this script again in the cached sae-lens venv (the ``sae_lens_python`` fixture, as make_peer_fixtures.py
is run for the other SAELens variants)::

    ~/.cache/hf_sae/peer-venvs/saelens/bin/python tests/data/peer_formats/make_sae_lens_batchtopk_family.py \\
        tests/data/peer_formats

It writes under ``OUT/sae_lens_training/``, per variant, the training SAE's own folder (``save_model``: cfg.json with
``architecture`` batchtopk / matryoshka_batchtopk / jumprelu and the training fields) and, for BatchTopK and
Matryoshka, the inference folder SAELens publishes (``<variant>_inference``: ``save_inference_model``, a jumprelu
cfg whose metadata names the training architecture). ``reference.safetensors`` beside each holds the inputs ``x``,
the inference encoding and decoding (``encoded``, ``decoded``: the JumpReLU form SAELens loads), and per variant:
``encoded_batch`` (the BatchTopK selection of the training SAE over the batch ``x``), ``prefix_decoded`` (G, N, d_in:
Matryoshka's nested reconstructions of that selection) and, for JumpReLU, ``threshold_grad_l0`` / ``threshold_grad_mse``
(the straight-through gradients SAELens' training step gives the threshold). Imports only sae-lens, torch, safetensors.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

D_IN, D_SAE, K, N = 16, 64, 4, 32
METADATA = {
    "model_name": "gemma-2-2b",
    "hook_name": "blocks.3.hook_resid_post",
    "context_size": 128,
    "dataset_path": "monology/pile-uncopyrighted",
}


def _weights(sae, generator: torch.Generator) -> None:
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D_IN, D_SAE, generator=generator) / D_IN**0.5)
        sae.W_dec.copy_(
            torch.randn(D_SAE, D_IN, generator=generator) * (0.5 + torch.rand(D_SAE, 1, generator=generator))
        )
        sae.b_enc.copy_(0.1 * torch.randn(D_SAE, generator=generator))
        sae.b_dec.copy_(0.2 * torch.randn(D_IN, generator=generator))


def _with_metadata(cfg):
    for key, value in METADATA.items():
        setattr(cfg.metadata, key, value)
    return cfg


def _inference_outputs(folder: Path, x: torch.Tensor) -> dict[str, torch.Tensor]:
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(folder))
    with torch.no_grad():
        encoded = sae.encode(x)
        return {"encoded": encoded.contiguous(), "decoded": sae.decode(encoded).contiguous()}


def make(out: Path) -> None:
    import sae_lens
    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        MatryoshkaBatchTopKTrainingSAE,
        MatryoshkaBatchTopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import TrainStepInput

    root = out / "sae_lens_training"
    generator = torch.Generator().manual_seed(2412)
    variants = {
        "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, {"k": K}),
        "batchtopk_no_b_dec_input": (
            BatchTopKTrainingSAE,
            BatchTopKTrainingSAEConfig,
            {"k": K, "apply_b_dec_to_input": False, "rescale_acts_by_decoder_norm": False},
        ),
        "matryoshka_batchtopk": (
            MatryoshkaBatchTopKTrainingSAE,
            MatryoshkaBatchTopKTrainingSAEConfig,
            {"k": K, "matryoshka_widths": [8, 24, D_SAE]},
        ),
    }
    for name, (sae_class, cfg_class, extra) in variants.items():
        sae = sae_class(_with_metadata(cfg_class(d_in=D_IN, d_sae=D_SAE, **extra)))
        _weights(sae, generator)
        sae.topk_threshold = torch.tensor(0.35, dtype=torch.double)
        x = 1.5 * torch.randn(N, D_IN, generator=generator)
        with torch.no_grad():
            encoded_batch = sae.encode(x)
            reference = {"x": x, "encoded_batch": encoded_batch.contiguous()}
            if "matryoshka" in name:
                prefixes = [out for _, out in sae._iterable_decode(encoded_batch, include_outer_loss=True)]
                reference["prefix_decoded"] = torch.stack(prefixes).contiguous()
        sae.save_model(root / name)
        sae.save_inference_model(root / f"{name}_inference")
        reference.update(_inference_outputs(root / f"{name}_inference", x))
        save_file(reference, str(root / name / "reference.safetensors"))
        save_file(reference, str(root / f"{name}_inference" / "reference.safetensors"))

    cfg = JumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, jumprelu_bandwidth=0.2, apply_b_dec_to_input=False)
    sae = JumpReLUTrainingSAE(_with_metadata(cfg))
    _weights(sae, generator)
    with torch.no_grad():
        sae.threshold.copy_(0.05 + 0.3 * torch.rand(D_SAE, generator=generator))
    x = 1.5 * torch.randn(N, D_IN, generator=generator)
    step = TrainStepInput(
        sae_in=x, coefficients={"l0": 1.0}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False
    )
    output = sae.training_forward_pass(step)
    grads = {}
    for key, loss in (("l0", output.losses["l0_loss"]), ("mse", output.losses["mse_loss"])):
        (grad,) = torch.autograd.grad(loss, [sae.threshold], retain_graph=True)
        grads[f"threshold_grad_{key}"] = grad.contiguous()
    sae.save_model(root / "jumprelu_training")
    reference = {"x": x, **grads, **_inference_outputs(root / "jumprelu_training", x)}
    save_file(reference, str(root / "jumprelu_training" / "reference.safetensors"))
    (root / "VERSION").write_text(f"sae-lens {sae_lens.__version__}\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: make_sae_lens_batchtopk_family.py OUT_DIR")
    make(Path(sys.argv[1]))
