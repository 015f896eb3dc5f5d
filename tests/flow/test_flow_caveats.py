"""What a flow graph must not overstate: classes a missing SAE could change are "undetermined" (and the pictures say
which SAEs are missing), each threshold comes with its chance rate, flow steering leaves BOS alone."""

from __future__ import annotations

import pytest
import torch

from hf_sae.flow import CLASSES, FeatureFlow, classify
from hf_sae.flow.predecessors import chance_rate
from hf_sae.sites import resolve_site

BOS = 2
pytestmark = pytest.mark.usefixtures("one_thread")


def test_missing_module_scores_make_a_class_undetermined_unless_the_known_ones_decide():
    nan = float("nan")
    s_r = torch.tensor([0.9, 0.9, 0.1, 0.1, 0.9, nan])
    s_m = torch.tensor([nan, 0.3, nan, 0.3, 0.1, 0.1])
    s_a = torch.tensor([nan, nan, 0.05, nan, nan, 0.1])
    category, via = classify(s_r, s_m, s_a)
    assert [CLASSES[c] for c in category.tolist()] == [
        "undetermined",  # translated or processed: nobody knows what mlp/attn did
        "processed",  # mlp passes: processed whatever attn did
        "undetermined",  # newborn (from mlp?) or unexplained
        "newborn",
        "undetermined",  # attn missing: translated or processed
        "undetermined",  # no resid L-1 SAE
    ]
    assert via.tolist()[1] == 1 and via.tolist()[3] == 1


def test_graph_nodes_say_which_predecessors_are_missing_and_pictures_show_it(flow_saes, tmp_path):
    saes = flow_saes(layers=3, features=64, noise=0.05)
    partial = {k: v for k, v in saes.items() if k[1] == "resid"}  # no mlp / attn SAEs at all
    flow = FeatureFlow(partial, cache_dir=False)
    graph = flow.trace(layer=2, feature=5)
    target = graph.nodes["2/resid/5"]
    assert target["class"] == "undetermined" and target["missing"] == "mlp,attn"
    assert "2/mlp" in graph.graph["missing"] and "2/attn" in graph.graph["missing"]
    flow.to_html(graph, tmp_path / "g.html")
    assert "missing SAEs: " in (tmp_path / "g.html").read_text()
    flow.plot(graph, tmp_path / "g.png")
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_chance_rate_counts_random_directions_passing_the_threshold():
    torch.manual_seed(0)
    dictionary = torch.nn.functional.normalize(torch.randn(4096, 640), dim=-1)
    rate = chance_rate(dictionary, 0.15, n=512, seed=3)
    generator = torch.Generator().manual_seed(0x5EED_F10F + 3)
    directions = torch.nn.functional.normalize(torch.randn(512, 640, generator=generator), dim=-1)
    direct = float(((directions @ dictionary.T).amax(1) >= 0.15).float().mean())
    assert rate == pytest.approx(direct, abs=1 / 512)
    assert 0.01 < rate < 0.6  # at d = 640 a cosine of 0.15 to the best of 4096 atoms is common by chance
    assert chance_rate(dictionary, 0.5, n=512, seed=5) == 0.0  # t_R = 0.5 is never reached by chance


def test_predecessor_tables_and_graphs_carry_the_chance_rates(flow_saes):
    flow = FeatureFlow(flow_saes(layers=3, features=64), cache_dir=False)
    table = flow.predecessors(2)
    assert set(table.chance) == {"resid", "mlp", "attn"} and "chance of passing" in repr(table)
    assert table.chance == flow.chance(2)  # the same rates, cached
    graph = flow.trace(layer=2, feature=5)
    assert graph.graph["chance_mlp"] == table.chance["mlp"]
    assert flow.predecessors(2, chance_samples=0).chance == {}


def test_flow_steering_leaves_bos_alone(model, flow_saes):
    flow = FeatureFlow(flow_saes(layers=4, features=128, k=8, noise=0.05), cache_dir=False)
    graph = flow.trace(layer=2, feature=5)
    site = resolve_site(model, 2, "resid")
    ids = torch.tensor([[BOS, 11, 12, 13]])
    seen = {}
    for name, options in (("default", {}), ("all", {"exclude_token_ids": []})):
        before, after = [], []
        first = site.register(lambda a: before.append(a.detach().clone()))  # noqa: B023
        handle = flow.steer(model, graph, 8.0, **options)
        last = site.register(lambda a: after.append(a.detach().clone()))  # noqa: B023
        with torch.no_grad():
            model(input_ids=ids)
        handle.remove()
        first.remove()
        last.remove()
        seen[name] = after[0] - before[0]
    assert torch.equal(seen["default"][0, 0], torch.zeros(64)) and float(seen["default"][0, 1:].abs().max()) > 0
    assert float(seen["all"][0, 0].abs().max()) > 0
