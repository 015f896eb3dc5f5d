"""Writes the SAE folders in this directory. Run once, at commit f2b1c13 (before the architecture registry):

    python tests/data/saved_before_registry/make_saved.py

Each folder is what ``save_pretrained`` wrote then (config.json + model.safetensors); ``reference.safetensors``
holds a fixed input ``x`` and the ``values`` / ``indices`` / ``reconstruction`` that SAE gave for it. The test
``tests/test_saved_files.py`` loads every folder with today's code and checks the outputs are unchanged.
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

from hf_sae import (
    HierarchicalSAE,
    HierarchicalSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    KronSAE,
    KronSAEConfig,
)

HERE = Path(__file__).resolve().parent
COMMON = dict(d_in=16, base_model="org/tiny", hook_layer=2, hook_site="resid", context_length=32)


def _jumprelu() -> JumpReLUSAE:
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_sae=48, k=12, apply_b_dec_to_input=True, source_format="sae-lens", **COMMON))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.threshold.uniform_(0.0, 0.3)
        sae.W_dec.mul_(1.7)
    return sae


def main() -> None:
    torch.manual_seed(0)
    saes = {
        "hierarchical_sae": HierarchicalSAE(HierarchicalSAEConfig(d_sae=64, k=8, budgets=[2, 4, 8], **COMMON)),
        "topk_unfolded": HierarchicalSAE(
            HierarchicalSAEConfig(
                d_sae=64, k=6, hierarchical=False, activation_scale=2.5, activation_scale_folded=False, **COMMON
            )
        ),
        "kron_sae_mand": KronSAE(KronSAEConfig(d_sae=64, k=8, base_dim=2, ext_dim=4, **COMMON)),
        "kron_sae_relu_product": KronSAE(
            KronSAEConfig(
                d_sae=96, k=8, base_dim=2, ext_dim=3, kron_activation="relu_product", hierarchical=False, **COMMON
            )
        ),
        "jumprelu_sae": _jumprelu(),
    }
    x = torch.randn(5, 16)
    for name, sae in saes.items():
        with torch.no_grad():
            sae.b_dec.normal_(0, 0.05)
            latents = sae.encode(x)
            reconstruction = sae.decode(latents)
        sae.save_pretrained(HERE / name)
        save_file(
            {"x": x, "values": latents.values, "indices": latents.indices, "reconstruction": reconstruction},
            str(HERE / name / "reference.safetensors"),
        )


if __name__ == "__main__":
    main()
