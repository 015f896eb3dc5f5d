"""Steering along a flow graph on a tiny random Gemma-2: schedules, planned deltas at every layer and decode step."""

from __future__ import annotations

import math

import pytest
import torch

from hf_sae.flow import FeatureFlow, FlowError, plan_flow_steering, schedule_coefficient
from hf_sae.sites import resolve_site

GREEDY = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)


pytestmark = pytest.mark.usefixtures("one_thread")


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def flow(flow_saes):
    """resid/mlp/attn SAEs at every layer of the tiny model; resid L is a noisy copy of resid L-1 (long chains)."""
    saes = flow_saes(layers=4, features=128, k=8, noise=0.05, encoder_bias_std=0.1)
    return FeatureFlow(saes, cache_dir=False)


# --------------------------------------------------------------------------------------------------- schedules
def test_schedules_equal_the_formulas():
    assert schedule_coefficient(7, 8.0, "constant") == 8.0
    assert schedule_coefficient(7, 8.0, "exponential") == pytest.approx(8.0 * math.exp(-0.05 * 7))
    assert schedule_coefficient(7, 8.0, "exponential", alpha=0.1) == pytest.approx(8.0 * math.exp(0.7))
    # linear from (l_start, s) to (l_end, s*): k = (s* - s)/(l_end - l_start), s' = k l + s - k l_start
    k = (1.0 - 8.0) / (12 - 4)
    for layer in (4, 7, 12):
        got = schedule_coefficient(layer, 8.0, "linear", start_layer=4, end_layer=12)
        assert got == pytest.approx(k * layer + 8.0 - k * 4)
    assert schedule_coefficient(4, 8.0, "linear", start_layer=4, end_layer=12) == pytest.approx(8.0)
    assert schedule_coefficient(12, 8.0, "linear", end_strength=-2.0, start_layer=4, end_layer=12) == pytest.approx(-2)
    assert schedule_coefficient(5, 8.0, "linear", start_layer=5, end_layer=5) == 8.0
    with pytest.raises(FlowError, match="schedule"):
        schedule_coefficient(1, 1.0, "cosine")


def test_single_layer_and_cumulative_plans_choose_their_nodes(flow):
    graph = flow.trace(layer=2, feature=5)
    single = plan_flow_steering(flow, graph, 8.0)
    assert {key[0] for key in single.coefficients} == {2}
    cumulative = plan_flow_steering(flow, graph, 8.0, cumulative=True, schedule="linear", end_strength=2.0)
    nodes = {(int(a["layer"]), a["site"], int(a["index"])) for _, a in graph.nodes(data=True) if a["layer"] <= 2}
    planned = {(layer, site, f) for (layer, site), fs in cumulative.coefficients.items() for f in fs}
    assert planned == nodes
    # the linear schedule spans the graph's layers (the paper's l_start, l_end), not only the steered ones
    first, last = min(a["layer"] for _, a in graph.nodes(data=True)), max(a["layer"] for _, a in graph.nodes(data=True))
    assert (first, last) == (0, 3)
    slope = (2.0 - 8.0) / (last - first)
    assert cumulative.coefficients[(0, "resid")][5] == pytest.approx(8.0)
    assert cumulative.coefficients[(2, "resid")][5] == pytest.approx(slope * 2 + 8.0)  # 4.0, not s* = 2 at layer 2
    paper = plan_flow_steering(flow, graph, 400.0, cumulative=True, schedule="linear")
    assert paper.coefficients[(2, "resid")][5] == pytest.approx((1.0 - 400.0) / 3 * 2 + 400.0)  # 134.0, not 1
    ends = plan_flow_steering(flow, graph, 8.0, cumulative=True, schedule="linear", end_strength=2.0, end_layer=2)
    assert ends.coefficients[(2, "resid")][5] == pytest.approx(2.0)  # an explicit l_end still wins
    only_resid = plan_flow_steering(flow, graph, {"1/resid/5": 3.0}, cumulative=True, sites=("resid",))
    assert only_resid.coefficients == {(1, "resid"): {5: 3.0}}
    with pytest.raises(FlowError, match="not in the graph"):
        plan_flow_steering(flow, graph, {"9/resid/1": 1.0})
    with pytest.raises(FlowError, match="no nodes at layer 3"):
        plan_flow_steering(flow, flow.trace(layer=1, feature=5, direction="backward"), 1.0, layer=3)


# ------------------------------------------------------------------------------------------------ planned deltas
class _Around:
    """Records a site's activation before and after the hooks registered between construction and close()."""

    def __init__(self, site):
        self.site, self.before, self.after = site, [], []
        self.handles = [site.register(lambda a: self.before.append(a.detach().clone()))]

    def close(self):
        self.handles.append(self.site.register(lambda a: self.after.append(a.detach().clone())))

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _left_padded():
    return torch.tensor([[0, 0, 11, 12, 13], [21, 22, 23, 24, 25]]), torch.tensor([[0, 0, 1, 1, 1], [1] * 5])


@pytest.mark.parametrize("mode", ["activate", "rescale"])
def test_flow_steering_adds_exactly_the_planned_deltas_at_every_layer_and_decode_step(model, flow, mode):
    graph = flow.trace(layer=2, feature=5)
    strength = 8.0 if mode == "activate" else -1.5
    kwargs = dict(mode=mode, schedule="exponential", alpha=-0.05, cumulative=True)
    plan = plan_flow_steering(flow, graph, strength, **kwargs)
    assert len(plan.coefficients) >= 3  # several layers and sites
    recorders = {key: _Around(resolve_site(model, *key)) for key in plan.coefficients}
    handle = flow.steer(model, graph, strength, **kwargs)
    for recorder in recorders.values():
        recorder.close()
    input_ids, attention_mask = _left_padded()
    try:
        with handle:
            model.generate(input_ids=input_ids, attention_mask=attention_mask, **GREEDY)
    finally:
        for recorder in recorders.values():
            recorder.remove()
    assert not handle.active
    moved = 0.0
    for key, recorder in recorders.items():
        sae = flow[key]
        ids = torch.tensor(list(plan.coefficients[key]))
        expected_coefficients = torch.tensor([strength * math.exp(-0.05 * key[0])] * len(ids))
        torch.testing.assert_close(torch.tensor(list(plan.coefficients[key].values())), expected_coefficients)
        rows = sae.W_dec.detach()[ids]
        assert len(recorder.before) == len(recorder.after) == 3  # prefill + 2 KV-cached decode steps
        for step, (before, after) in enumerate(zip(recorder.before, recorder.after)):
            assert before.shape[1] == (5 if step == 0 else 1)
            if mode == "activate":  # h + s'·V with V the unit decoder rows
                delta = (expected_coefficients @ _unit(rows)).expand_as(before)
            else:  # h + (r' - 1)·a·V
                a = sae.encode(before).to_dense(sae.config.d_sae)[..., ids]
                delta = ((expected_coefficients - 1) * a) @ rows
            if step == 0:
                delta = delta * attention_mask.unsqueeze(-1)  # padded positions are never touched
            torch.testing.assert_close(after - before, delta, rtol=1e-4, atol=1e-5)
            moved = max(moved, float((after - before).abs().max()))
    assert moved > 0.1


def test_greedy_generation_is_the_same_with_and_without_cache(model, flow):
    graph = flow.trace(layer=3, feature=9)
    ids = torch.randint(3, 1000, (2, 6))
    with flow.steer(model, graph, 6.0, schedule="linear", cumulative=True):
        cached = model.generate(input_ids=ids, use_cache=True, **GREEDY)
        uncached = model.generate(input_ids=ids, use_cache=False, **GREEDY)
    torch.testing.assert_close(cached, uncached)
    plain = model.generate(input_ids=ids, **GREEDY)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    with flow.steer(model, graph, 6.0, cumulative=True) as handle:
        assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) > hooks
        assert "FlowSteeringHandle" in repr(handle)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks
    torch.testing.assert_close(model.generate(input_ids=ids, **GREEDY), plain)


def test_rescale_zero_removes_the_features_and_one_changes_nothing(model, flow):
    graph = flow.trace(layer=1, feature=5, direction="backward", max_steps=0)
    site = resolve_site(model, 1, "resid")
    ids = torch.randint(3, 1000, (1, 6))
    recorder = _Around(site)
    with flow.steer(model, graph, 1.0, mode="rescale", sites=("resid",)):
        recorder.close()
        model(input_ids=ids)
    recorder.remove()
    torch.testing.assert_close(recorder.after[0], recorder.before[0])
    recorder = _Around(site)
    with flow.steer(model, graph, 0.0, mode="rescale", sites=("resid",)):
        recorder.close()
        model(input_ids=ids)
    recorder.remove()
    sae = flow[(1, "resid")]
    a = sae.encode(recorder.before[0]).to_dense(128)[..., 5:6]
    torch.testing.assert_close(recorder.after[0], recorder.before[0] - a * sae.W_dec.detach()[5], rtol=1e-4, atol=1e-5)


def test_folded_units_scale_each_direction_by_the_mean_activation(model, flow):
    graph = flow.trace(layer=1, feature=5, direction="backward", max_steps=0)
    with pytest.raises(FlowError, match="calibrate"):
        flow.steer(model, graph, 2.0, units="folded", sites=("resid",))
    mean = torch.ones(128)
    mean[5] = 3.0
    flow.mean_activations[(1, "resid")] = mean
    try:
        recorder = _Around(resolve_site(model, 1, "resid"))
        with flow.steer(model, graph, 2.0, units="folded", sites=("resid",)):
            recorder.close()
            model(input_ids=torch.randint(3, 1000, (1, 4)))
        recorder.remove()
    finally:
        flow.mean_activations.clear()
    expected = 2.0 * 3.0 * _unit(flow[(1, "resid")].W_dec.detach()[5])
    torch.testing.assert_close(recorder.after[0] - recorder.before[0], expected.expand(1, 4, 64), rtol=1e-4, atol=1e-5)


def _hook_count(model) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._forward_hooks_with_kwargs) for m in model.modules()
    )


def test_a_failing_site_removes_the_hooks_already_installed(model, flow):
    graph = flow.trace(layer=2, feature=5)
    plan = plan_flow_steering(flow, graph, 2.0, cumulative=True)
    first, *rest = sorted(plan.coefficients)
    assert rest  # the first site's hook is installed before the second one fails
    before = _hook_count(model)
    flow.mean_activations[first] = torch.ones(128)  # only the first site is calibrated
    try:
        with pytest.raises(FlowError, match="calibrate"):
            flow.steer(model, graph, 2.0, units="folded", cumulative=True)
    finally:
        flow.mean_activations.clear()
    assert _hook_count(model) == before
