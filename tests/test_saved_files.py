"""SAE folders written before the architecture registry (tests/data/saved_before_registry, by make_saved.py at
commit f2b1c13) load unchanged: the same class, the same latents and the same reconstruction."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

import hf_sae

SAVED = Path(__file__).resolve().parent / "data" / "saved_before_registry"
EXPECTED = {
    "hierarchical_sae": "HierarchicalSAE",
    "topk_unfolded": "HierarchicalSAE",
    "kron_sae_mand": "KronSAE",
    "kron_sae_relu_product": "KronSAE",
    "jumprelu_sae": "JumpReLUSAE",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_an_sae_saved_before_the_registry_loads_with_identical_outputs(name):
    folder = SAVED / name
    sae = AutoModel.from_pretrained(folder)
    assert type(sae) is getattr(hf_sae, EXPECTED[name])
    reference = load_file(folder / "reference.safetensors")
    with torch.no_grad():
        latents = sae.encode(reference["x"])
        assert torch.equal(latents.indices, reference["indices"])
        torch.testing.assert_close(latents.values, reference["values"], rtol=0, atol=1e-6)
        torch.testing.assert_close(sae.decode(latents), reference["reconstruction"], rtol=0, atol=1e-6)
