"""Fixtures shared by the feature-flow tests: the tiny Gemma-2 they run on and planted SAE collections."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import torch

from hf_sae.testing.tiny_models import planted_sae


@pytest.fixture(scope="module")
def model(tiny_lm):
    """A tiny random Gemma-2 (d_model 64, 4 layers, BOS id 2), one per test module."""
    model = tiny_lm("gemma2")
    assert model.config.bos_token_id == 2
    return model


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="session")
def flow_saes():
    """Factory of planted collections ``{(layer, site): sae}`` with attn, mlp and resid SAEs at every layer::

        flow_saes(layers=3, d=64, features=96, k=6, noise=0.3, encoder_bias_std=None, seed=0, **config)

    Decoders are random unit rows, except that resid L is resid L−1 plus ``noise`` times Gaussian noise, renormed
    (so resid chains run through the layers); encoder rows equal decoder rows (:func:`planted_sae`).
    ``encoder_bias_std`` draws encoder biases too; ``layers`` is a count (0..n−1) or the layers themselves;
    ``config`` goes to every SAE's config (e.g. ``base_model``). Same seed, same collection.
    """

    def build(
        layers: int | Iterable[int] = 3,
        d: int = 64,
        features: int = 96,
        k: int = 6,
        noise: float = 0.3,
        encoder_bias_std: float | None = None,
        seed: int = 0,
        **config,
    ) -> dict[tuple[int, str], torch.nn.Module]:
        g = torch.Generator().manual_seed(seed)
        saes, previous = {}, None
        for layer in range(layers) if isinstance(layers, int) else layers:
            for site in ("attn", "mlp", "resid"):
                decoder = _unit(torch.randn(features, d, generator=g))
                if site == "resid" and previous is not None:
                    decoder = _unit(previous + noise * torch.randn(features, d, generator=g))
                sae = planted_sae(decoder, layer, site, k=k, **config)
                if encoder_bias_std is not None:
                    with torch.no_grad():
                        sae.encoder.bias.normal_(std=encoder_bias_std, generator=g)
                saes[(layer, site)] = sae
                if site == "resid":
                    previous = decoder
        return saes

    return build
