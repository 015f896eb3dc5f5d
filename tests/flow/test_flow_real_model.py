"""Feature flow on the real small Gemma (Gemma 3 270M, hidden 640) with random-direction SAEs: steering along a flow
with and without the KV cache, the data-based checks and the skip-layer transcoder on real text. Slow (-m slow)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from hf_sae.flow import FeatureFlow
from training.small_gemma import load_small_gemma

pytestmark = pytest.mark.slow

TEXTS = [
    "The cat sat on the mat and looked out of the window at the birds in the garden.",
    "In 1969, astronauts landed on the Moon and walked on its dusty surface for the first time.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
]
SAES = dict(layers=(5, 6, 7), d=640, features=512, k=16, noise=0.02, base_model="google/gemma-3-270m")


@pytest.fixture(scope="module")
def gemma():
    return load_small_gemma()


def test_flow_on_the_real_small_gemma(gemma, flow_saes):
    model, tokenizer = gemma
    flow = FeatureFlow(flow_saes(**SAES), cache_dir=False)
    graph = flow.trace(layer=6, feature=3)
    assert {"5/resid/3", "6/resid/3", "7/resid/3"} <= set(graph)
    inputs = tokenizer(["The weather today is"], return_tensors="pt")
    greedy = dict(max_new_tokens=8, do_sample=False)
    plain = model.generate(**inputs, **greedy)
    with flow.steer(model, graph, 60.0, schedule="exponential", cumulative=True, layer=7):
        cached = model.generate(**inputs, use_cache=True, **greedy)
        uncached = model.generate(**inputs, use_cache=False, **greedy)
    torch.testing.assert_close(cached, uncached)
    assert not torch.equal(cached, plain)

    result = flow.validate(model, TEXTS, tokenizer=tokenizer, layers=[6, 7])
    n_tokens = sum(len(tokenizer(t)["input_ids"]) - 1 for t in TEXTS)  # BOS excluded
    assert result.n_tokens == n_tokens and int(result.counts.sum()) > 0

    saes = flow_saes(**SAES)
    twin = copy.deepcopy(saes[(6, "resid")])
    twin.config.hook_layer = 7
    saes[(7, "resid")] = twin
    skip = FeatureFlow(saes, cache_dir=False).skip_layer_eval(model, 6, TEXTS, tokenizer=tokenizer)
    assert all(math.isfinite(v) for v in skip.as_dict().values())
    assert skip.clean_loss < 6.0  # real language: the clean model predicts these texts well
