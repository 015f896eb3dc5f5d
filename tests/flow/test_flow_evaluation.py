"""hf_sae.flow.evaluation on a tiny random Gemma-2, each result checked against a naive loop or a manual forward."""

from __future__ import annotations

import copy
import html
import math

import pytest
import torch
import torch.nn.functional as F

from hf_sae.flow import GROUPS, FeatureFlow, FlowError, graph_to_html
from hf_sae.flow.evaluation import ValidationResult, annotate_top_tokens, mean_nonzero_activations, transcode
from hf_sae.sites import capture_activations, resolve_site

BOS = 2


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def flow(flow_saes):
    return FeatureFlow(flow_saes(), cache_dir=False)


def _texts():
    g = torch.Generator().manual_seed(3)
    return [[BOS] + torch.randint(3, 1000, (n,), generator=g).tolist() for n in (7, 4, 9)]


def _activations(model, flow, ids):
    keys = flow.keys()
    acts = capture_activations(model, [resolve_site(model, *k) for k in keys], input_ids=torch.tensor([ids]))
    return {k: acts[k][0] for k in keys}


def test_validate_groups_equal_a_naive_loop(model, flow):
    result = flow.validate(model, _texts(), batch_size=2)
    assert result.layers == [0, 1, 2] and result.missing == {0: ["resid"]}
    expected = {layer: [0] * 8 for layer in result.layers}
    sums = {layer: torch.zeros(8, 3, dtype=torch.float64) for layer in result.layers}
    n_tokens = 0
    for ids in _texts():
        acts = _activations(model, flow, ids)
        dense = {k: flow[k].encode(a).to_dense(96) for k, a in acts.items()}
        for t in range(1, len(ids)):  # BOS (position 0) excluded
            n_tokens += 1
            for layer in result.layers:
                table = flow.predecessors(layer, allow_missing=True)
                for j in dense[(layer, "resid")][t].nonzero().flatten().tolist():
                    group = 0
                    for bit, (site, key) in enumerate(
                        [("resid", (layer - 1, "resid")), ("mlp", (layer, "mlp")), ("attn", (layer, "attn"))]
                    ):
                        if key in dense and dense[key][t, int(table.ids(site)[j])] > 0:
                            group |= 1 << bit
                    expected[layer][group] += 1
                    sums[layer][group] += torch.tensor(
                        [float(table.scores(s)[j]) for s in ("resid", "mlp", "attn")], dtype=torch.float64
                    )
    assert result.n_tokens == n_tokens == sum(len(ids) - 1 for ids in _texts())
    for row, layer in enumerate(result.layers):
        assert result.counts[row].tolist() == expected[layer]
        groups = result.groups(layer)
        for g, name in enumerate(GROUPS):
            if expected[layer][g]:
                mean = sums[layer][g] / expected[layer][g]
                assert groups[name]["s_mlp"] == pytest.approx(float(mean[1]), rel=1e-5)
    assert math.isnan(result.groups(0)["nowhere"]["s_resid"])  # layer 0 has no resid predecessor
    pooled = result.groups()
    assert sum(v["count"] for v in pooled.values()) == result.counts.sum()
    assert sum(v["fraction"] for v in pooled.values()) == pytest.approx(1.0)
    auc = result.auc()
    assert set(auc) == {"resid", "mlp", "attn"} and all(math.isnan(v) or 0 <= v <= 1 for v in auc.values())
    assert "RES&MLP&ATT" in str(result)


def test_auc_from_histograms_matches_the_pairwise_definition():
    bins = 10
    hist = torch.zeros(1, 3, 2, bins, dtype=torch.long)
    negatives, positives = [1, 2, 2, 5], [2, 6, 7]  # bin indices
    for b in negatives:
        hist[0, 1, 0, b] += 1
    for b in positives:
        hist[0, 1, 1, b] += 1
    pairs = [(p > n) + 0.5 * (p == n) for p in positives for n in negatives]
    result = ValidationResult([1], torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, 3), hist, 0)
    assert result.auc()["mlp"] == pytest.approx(sum(pairs) / len(pairs))
    assert math.isnan(result.auc()["resid"])


def test_deactivation_equals_a_manual_removal(model, flow):
    texts = _texts()
    result = flow.deactivation(model, texts, layer=2, n_features=2, sites=("resid", "mlp"))
    assert {r["site"] for r in result.rows} == {"resid", "mlp"} and len(result.rows) == 4
    row = next(r for r in result.rows if r["site"] == "resid" and r["n_tokens"] > 0)
    j, i = row["feature"], row["predecessor"]
    source, target = flow[(1, "resid")], flow[(2, "resid")]
    changes = []
    for ids in texts:
        clean = _activations(model, flow, ids)
        z_old = target.encode(clean[(2, "resid")]).to_dense(96)[:, j]
        pred_on = source.encode(clean[(1, "resid")]).to_dense(96)[:, i] > 0

        def remove(a, sae=source):
            z = sae.encode(a).to_dense(96)[..., i : i + 1]
            edited = a - z * sae.W_dec.detach()[i]
            edited[:, 0] = a[:, 0]  # BOS is never edited
            return edited

        handle = resolve_site(model, 1, "resid").register(remove)
        try:
            new = capture_activations(model, [resolve_site(model, 2, "resid")], input_ids=torch.tensor([ids]))
        finally:
            handle.remove()
        z_new = target.encode(new[(2, "resid")][0]).to_dense(96)[:, j]
        for t in range(1, len(ids)):
            if z_old[t] > 0 and pred_on[t]:
                changes.append(float(1 - z_new[t] / z_old[t]))
    assert row["n_tokens"] == len(changes)
    assert row["change"] == pytest.approx(sum(changes) / len(changes), rel=1e-4, abs=1e-6)
    assert row["score"] == pytest.approx(float(flow.predecessors(2).s_resid[j]))
    assert set(result.mean_change()) == {"resid", "mlp", "attn"} and "deactivation" in str(result)


def test_skip_layer_eval_with_a_copied_sae_is_its_reconstruction(model, flow_saes):
    saes = flow_saes()
    twin = copy.deepcopy(saes[(1, "resid")])
    twin.config.hook_layer = 2
    saes[(2, "resid")] = twin  # T(1 -> 2) is the identity with cosine 1
    flow = FeatureFlow(saes, cache_dir=False)
    match = flow.match((1, "resid"), (2, "resid"))
    assert match.indices[:, 0].tolist() == list(range(96))
    texts = _texts()
    result = flow.skip_layer_eval(model, 1, texts, batch_size=2)
    xs, hats, loss_clean, loss_skip, n = [], [], 0.0, 0.0, 0
    for ids in texts:
        acts = _activations(model, flow, ids)
        x_t, x_next = acts[(1, "resid")], acts[(2, "resid")]
        recon = twin.decode(saes[(1, "resid")].encode(x_t))
        torch.testing.assert_close(transcode(flow, 1, x_t), recon)
        xs.append(x_next[1:])
        hats.append(recon[1:])
        input_ids = torch.tensor([ids])
        logits = model(input_ids=input_ids).logits
        loss_clean += float(F.cross_entropy(logits[0, 1:-1], input_ids[0, 2:], reduction="sum"))

        def patch(a, recon=recon):
            out = a.clone()
            out[0, 1:] = recon[1:]
            return out

        handle = resolve_site(model, 2, "resid").register(patch)
        try:
            logits = model(input_ids=input_ids).logits
        finally:
            handle.remove()
        loss_skip += float(F.cross_entropy(logits[0, 1:-1], input_ids[0, 2:], reduction="sum"))
        n += len(ids) - 2
    x, x_hat = torch.cat(xs).double(), torch.cat(hats).double()
    ev = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert result.n_tokens == n
    assert result.ev == pytest.approx(float(ev), rel=1e-4)
    assert result.sae_ev != result.ev  # the t+1 SAE reconstructs x_{t+1}, not x_t
    assert result.clean_loss == pytest.approx(loss_clean / n, rel=1e-4)
    assert result.skip_loss == pytest.approx(loss_skip / n, rel=1e-4)
    assert result.delta_loss == pytest.approx(result.skip_loss - result.clean_loss)
    assert math.isfinite(result.identity_loss) and "skip layer 1->2" in str(result)
    with pytest.raises(FlowError, match=r"layer 3, 'resid'"):
        flow.skip_layer_eval(model, 2, texts)


def test_mean_nonzero_activations_and_top_tokens(model, flow):
    texts = _texts()
    means = mean_nonzero_activations(flow, model, texts, keys=[(1, "mlp")])
    sae = flow[(1, "mlp")]
    dense = torch.cat([sae.encode(_activations(model, flow, ids)[(1, "mlp")][1:]).to_dense(96) for ids in texts])
    active = dense > 0
    expected = torch.where(active.any(0), dense.sum(0) / active.sum(0).clamp_min(1), torch.zeros(96))
    torch.testing.assert_close(means[(1, "mlp")], expected, rtol=1e-5, atol=1e-6)
    assert set(flow.calibrate(model, texts)) == set(flow.keys())
    flow.mean_activations.clear()

    resid = flow[(2, "resid")]
    totals = sum(resid.encode(_activations(model, flow, ids)[(2, "resid")][1:]).to_dense(96).sum(0) for ids in texts)
    graph = flow.trace(layer=2, feature=int(totals.argmax()))
    annotate_top_tokens(flow, graph, model, texts, n=2, context=2)
    node = graph.graph["target"]
    layer, _, index = node.split("/")
    target = flow[(int(layer), "resid")]
    best = max(
        (float(target.encode(_activations(model, flow, ids)[(2, "resid")]).to_dense(96)[t, int(index)]), ids[t])
        for ids in texts
        for t in range(1, len(ids))
    )
    tokens = graph.nodes[node]["top_tokens"]
    assert best[0] > 0 and tokens[0].endswith(f"[{best[1]}]  ({best[0]:.3g})")
    assert all(isinstance(t, str) for n in graph for t in graph.nodes[n]["top_tokens"])
    assert html.escape(tokens[0]) in graph_to_html(graph)
