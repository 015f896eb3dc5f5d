"""Build small SAELens and sparsify SAE folders *with the peer library itself*, plus its outputs on fixed inputs.

The converter tests (tests/test_convert.py) read the committed result of this script, so they need neither peer
installed; when a peer's Python is given (env ``HF_SAE_SAELENS_PYTHON`` / ``HF_SAE_SPARSIFY_PYTHON``) they run it
again into a temporary folder. Each peer lives in its own venv (it pins other versions than hf-sae)::

    python -m venv /tmp/venv-saelens && /tmp/venv-saelens/bin/pip install torch==2.13.0 && \
        /tmp/venv-saelens/bin/pip install sae-lens                 # 6.54.x
    python -m venv /tmp/venv-sparsify && /tmp/venv-sparsify/bin/pip install torch==2.13.0 && \
        /tmp/venv-sparsify/bin/pip install eai-sparsify            # 1.3.x
    /tmp/venv-saelens/bin/python tests/data/peer_formats/make_peer_fixtures.py sae-lens tests/data/peer_formats
    /tmp/venv-sparsify/bin/python tests/data/peer_formats/make_peer_fixtures.py sparsify tests/data/peer_formats

Per SAE folder it writes the peer's own files (``cfg.json`` + ``sae_weights.safetensors`` for SAELens, ``cfg.json`` +
``sae.safetensors`` for sparsify, via the peer's save function) and ``reference.safetensors`` with the inputs ``x``
and the peer's ``encoded`` (dense (N, d_sae), SAELens; or ``top_acts`` / ``top_indices``, sparsify) and ``decoded``.
This script imports only the peer, torch and safetensors (never hf_sae).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

D_IN, D_SAE, K, N = 16, 64, 8, 32


def _random_weights(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Non-trivial weights: decoder rows of varied (non-unit) norm, non-zero biases."""
    W_dec = torch.randn(D_SAE, D_IN, generator=generator) * (0.5 + torch.rand(D_SAE, 1, generator=generator))
    return {
        "W_enc": torch.randn(D_IN, D_SAE, generator=generator) / D_IN**0.5,
        "W_dec": W_dec,
        "b_enc": 0.1 * torch.randn(D_SAE, generator=generator),
        "b_dec": 0.2 * torch.randn(D_IN, generator=generator),
    }


def make_sae_lens(out: Path) -> None:
    import sae_lens
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    metadata = {
        "model_name": "gemma-2-2b",
        "hook_name": "blocks.3.hook_resid_post",
        "context_size": 128,
        "prepend_bos": True,
        "dataset_path": "monology/pile-uncopyrighted",
    }
    variants = {
        "standard": (StandardSAE, StandardSAEConfig, {"apply_b_dec_to_input": True}),
        "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig, {"apply_b_dec_to_input": False}),
        "topk": (TopKSAE, TopKSAEConfig, {"k": K, "apply_b_dec_to_input": True}),
        "topk_rescaled": (
            TopKSAE,
            TopKSAEConfig,
            {"k": K, "apply_b_dec_to_input": True, "rescale_acts_by_decoder_norm": True},
        ),
        "topk_no_b_dec_input": (TopKSAE, TopKSAEConfig, {"k": K, "apply_b_dec_to_input": False}),
    }
    generator = torch.Generator().manual_seed(1234)
    for name, (sae_class, cfg_class, extra) in variants.items():
        cfg = cfg_class(d_in=D_IN, d_sae=D_SAE, **extra)
        for key, value in metadata.items():
            cfg.metadata[key] = value
        sae = sae_class(cfg)
        weights = _random_weights(generator)
        if name == "jumprelu":
            weights["threshold"] = 0.05 + 0.3 * torch.rand(D_SAE, generator=generator)
        with torch.no_grad():
            for key, value in weights.items():
                getattr(sae, key).copy_(value)
        folder = out / "sae_lens" / name
        sae.save_model(folder)
        x = 1.5 * torch.randn(N, D_IN, generator=generator)
        with torch.no_grad():
            encoded = sae.encode(x)
            decoded = sae.decode(encoded)
        save_file(
            {"x": x, "encoded": encoded.contiguous(), "decoded": decoded.contiguous()},
            str(folder / "reference.safetensors"),
        )
    (out / "sae_lens" / "VERSION").write_text(f"sae-lens {sae_lens.__version__}\n")


def make_sparsify(out: Path) -> None:
    from importlib.metadata import version

    from sparsify import SparseCoder, SparseCoderConfig

    generator = torch.Generator().manual_seed(4321)
    root = out / "sparsify"
    for hookpoint in ("layers.3", "layers.5"):
        sae = SparseCoder(D_IN, SparseCoderConfig(num_latents=D_SAE, k=K))
        weights = _random_weights(generator)
        with torch.no_grad():
            sae.encoder.weight.copy_(weights["W_enc"].t())
            sae.encoder.bias.copy_(weights["b_enc"])
            sae.W_dec.copy_(weights["W_dec"])
            sae.set_decoder_norm_to_unit_norm()
            sae.b_dec.copy_(weights["b_dec"])
        folder = root / hookpoint
        sae.save_to_disk(folder)
        x = 1.5 * torch.randn(N, D_IN, generator=generator)
        with torch.no_grad():
            top_acts, top_indices, _ = sae.encode(x)
            decoded = sae.decode(top_acts, top_indices)
        save_file(
            {
                "x": x,
                "top_acts": top_acts.contiguous(),
                "top_indices": top_indices.contiguous(),
                "decoded": decoded.contiguous(),
            },
            str(folder / "reference.safetensors"),
        )
    # A sparsify run root also holds the training config (no model_type): hf-sae must say "use the converter".
    (root / "config.json").write_text(json.dumps({"sae": {"k": K, "num_latents": D_SAE}, "hookpoints": ["layers.3"]}))
    (root / "VERSION").write_text(f"eai-sparsify {version('eai-sparsify')}\n")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("sae-lens", "sparsify"):
        raise SystemExit("usage: make_peer_fixtures.py {sae-lens,sparsify} OUT_DIR")
    target = Path(sys.argv[2])
    (make_sae_lens if sys.argv[1] == "sae-lens" else make_sparsify)(target)
