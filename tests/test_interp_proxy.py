"""The interpretability proxy's scores (experiments/interp_proxy.py) on hand-counted cases."""

import pytest
import torch

from experiments.interp_proxy import TOP, chance_purity, token_scores


def test_token_scores_hand_counted():
    """Latent 0 fires on 25 tokens: its 20 strongest are 15 × word 1 and 5 × word 2 (purity 0.75); over all 25
    firings word 1 is the mode with 18 of them (precision 18/25), and word 1 occurs 30 times in the text (recall
    18/30). Latent 1 fires 10 times (< 20: not scored); latents 2, 3 never fire. Coverage 1/4."""
    n = 40
    words = torch.zeros(n, dtype=torch.long)
    indices = torch.full((n, 2), 3, dtype=torch.long)
    values = torch.zeros(n, 2)
    # tokens 0..24: latent 0 fires, strength decreasing with position
    words[:15] = 1  # its 15 strongest: word 1
    words[15:20] = 2  # the next 5: word 2
    words[20:23] = 1  # the weakest 5: 3 × word 1, 2 × word 0
    indices[:25, 0] = 0
    values[:25, 0] = torch.linspace(2.0, 1.0, 25)
    # word 1 also occurs at 12 tokens where latent 0 does not fire: 15 + 3 + 12 = 30 occurrences
    words[25:37] = 1
    indices[25:35, 1] = 1
    values[25:35, 1] = 0.5
    scores = token_scores(indices, values, words, d_sae=4)
    assert TOP == 20
    assert scores["scored_latents"] == 1
    assert scores["coverage"] == pytest.approx(0.25)
    assert scores["purity"] == pytest.approx(15 / 20)
    precision, recall = 18 / 25, 18 / 30
    assert scores["token_f1"] == pytest.approx(2 * precision * recall / (precision + recall))


def test_chance_purity_bounds():
    """One word everywhere: every random draw is pure (1.0); 20 distinct words each drawn uniformly: far below."""
    assert chance_purity(torch.zeros(100, dtype=torch.long)) == pytest.approx(1.0)
    spread = chance_purity(torch.arange(1000) % 1000)
    assert 0.05 <= spread < 0.15
