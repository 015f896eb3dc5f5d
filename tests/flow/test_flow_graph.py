"""hf_sae.flow: predecessor classes on planted decoders, flow graphs, exports, pictures, collections and the CLI."""

from __future__ import annotations

import argparse
import json
import math

import networkx as nx
import pytest
import torch

from hf_sae import HierarchicalSAE, HierarchicalSAEConfig
from hf_sae.flow import CLASSES, FeatureFlow, FlowError, classify, from_json, graph_to_html, to_graphml, to_json
from hf_sae.flow.cli import FLOW_SUBCOMMAND, add_flow_subcommand
from hf_sae.hub import push_collection
from hf_sae.testing.hub_server import PushServer, hub_client
from hf_sae.testing.tiny_models import planted_sae

D = 1024  # wide enough that random unit directions have cosines < 0.15 with each other


pytestmark = pytest.mark.usefixtures("one_thread")


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def _sae(decoder, layer, site, base_model="org/tiny"):
    return planted_sae(decoder, layer, site, base_model=base_model)


def _planted_layer():
    """resid 1 (R), mlp 2 (M), attn 2 (A) random; resid 2 built class by class, 10 features per class."""
    g = torch.Generator().manual_seed(0)
    R, M, A = (_unit(torch.randn(80, D, generator=g)) for _ in range(3))
    p = torch.randperm(80, generator=g)[:10]
    q = torch.randperm(80, generator=g)[:10]
    r = torch.randperm(80, generator=g)[:10]
    rows = [
        _unit(R[p] + 0.2 * torch.randn(10, D, generator=g) / math.sqrt(D)),  # translated
        _unit(R[p] + 0.6 * M[q]),  # processed by mlp
        _unit(R[p] + 0.6 * A[r]),  # processed by attn
        _unit(R[p] + 0.5 * M[q] + 0.5 * A[r]),  # processed by both
        M[q],  # newborn from mlp
        A[r],  # newborn from attn
        _unit(M[q] + A[r]),  # newborn from both
        _unit(torch.randn(10, D, generator=g)),  # unexplained
    ]
    resid2 = torch.cat(rows)
    labels = [
        "translated",
        "processed by mlp",
        "processed by attn",
        "processed by both",
        "newborn from mlp",
        "newborn from attn",
        "newborn from both",
        "unexplained",
    ]
    saes = {
        (1, "resid"): _sae(R, 1, "resid"),
        (2, "mlp"): _sae(M, 2, "mlp"),
        (2, "attn"): _sae(A, 2, "attn"),
        (2, "resid"): _sae(resid2, 2, "resid"),
    }
    return saes, [label for label in labels for _ in range(10)], (p, q, r), resid2, (R, M, A)


def test_planted_features_get_their_class_ids_and_scores():
    saes, labels, (p, q, r), resid2, (R, M, A) = _planted_layer()
    table = FeatureFlow(saes, cache_dir=False).predecessors(layer=2)
    assert table.labels() == labels
    torch.testing.assert_close(table.s_resid, (resid2 @ R.T).max(1).values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(table.s_mlp, (resid2 @ M.T).max(1).values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(table.s_attn, (resid2 @ A.T).max(1).values, rtol=1e-5, atol=1e-6)
    assert table.id_resid[:40].tolist() == p.tolist() * 4  # translated and processed come from R[p]
    assert table.id_mlp[40:50].tolist() == q.tolist()
    assert table.id_attn[50:60].tolist() == r.tolist()
    assert table.counts() == {"translated": 10, "processed": 30, "newborn": 30, "unexplained": 10, "undetermined": 0}
    assert table.counts(detailed=True)["newborn from both"] == 10
    assert table.label(45) == "newborn from mlp" and bool(table.mask("newborn from mlp")[45])
    row = table.row(0)
    assert row["class"] == "translated" and row["id_resid"] == int(p[0])
    assert len(table.to_csv().splitlines()) == 81


def test_thresholds_are_configurable():
    saes, *_ = _planted_layer()
    strict = FeatureFlow(saes, t_resid=0.99, t_mlp=0.9, t_attn=0.9, cache_dir=False).predecessors(2)
    assert strict.labels()[:10] == ["unexplained"] * 10  # s(R) ~0.98 < 0.99 and no module
    assert strict.labels()[40:60] == ["newborn from mlp"] * 10 + ["newborn from attn"] * 10  # exact copies: s = 1
    with pytest.raises(FlowError, match="t_resid"):
        FeatureFlow(saes, t_resid=2.0)


def test_classify_follows_the_table_by_hand():
    nan = math.nan
    s_r = torch.tensor([0.6, 0.6, 0.6, 0.6, 0.4, 0.4, 0.4, 0.4, nan, 0.5])
    s_m = torch.tensor([0.1, 0.2, 0.1, 0.2, 0.2, 0.1, 0.2, 0.1, 0.2, 0.15])
    s_a = torch.tensor([0.1, 0.1, 0.2, 0.2, 0.1, 0.2, 0.2, 0.1, nan, 0.1])
    category, via = classify(s_r, s_m, s_a)
    names = [CLASSES[c] for c in category.tolist()]
    assert names == [
        "translated",
        "processed",
        "processed",
        "processed",
        "newborn",
        "newborn",
        "newborn",
        "unexplained",
        "undetermined",  # no resid L-1 SAE: processed or newborn
        "processed",
    ]  # ties (0.5, 0.15) count as reaching the threshold
    assert via.tolist() == [0, 1, 2, 3, 1, 2, 3, 0, 1, 1]


def test_summary_counts_every_layer():
    saes, *_ = _planted_layer()
    summary = FeatureFlow(saes, cache_dir=False).summary()
    assert summary.layers == [1, 2]
    assert summary.counts[2]["processed by both"] == 10
    assert sum(summary.counts[1].values()) == 80  # layer 1 has no neighbours: all "unexplained"
    assert "layer" in str(summary)


def test_missing_neighbours_and_bad_collections_are_named():
    saes, *_ = _planted_layer()
    partial = {k: v for k, v in saes.items() if k != (2, "mlp")}
    flow = FeatureFlow(partial, cache_dir=False)
    with pytest.raises(FlowError, match=r"layer 2, 'mlp'"):
        flow.predecessors(2)
    table = flow.predecessors(2, allow_missing=True)
    assert bool(table.s_mlp.isnan().all()) and table.label(40) == "undetermined"  # mlp unknown: newborn?
    with pytest.raises(FlowError, match=r"layer 0, 'resid'"):
        flow.match((1, "resid"), (0, "resid"))
    attn_z = HierarchicalSAE(HierarchicalSAEConfig(d_in=D, d_sae=8, k=2, hook_layer=2, hook_site="attn_z"))
    with pytest.raises(FlowError, match="attn_z"):
        FeatureFlow({**saes, (2, "attn_z"): attn_z})
    narrow = _sae(_unit(torch.randn(8, 32)), 3, "resid")
    with pytest.raises(FlowError, match="d_in=32"):
        FeatureFlow({**saes, (3, "resid"): narrow})
    other = _sae(_unit(torch.randn(8, D)), 3, "resid", base_model="org/other")
    with pytest.raises(FlowError, match="different models"):
        FeatureFlow({**saes, (3, "resid"): other})
    with pytest.raises(FlowError, match="says it lives at"):
        FeatureFlow({(5, "resid"): saes[(2, "resid")]})


# ----------------------------------------------------------------------------------------------------- traces
def _chain(layers=6, features=64, seed=0):
    """resid L = noisy copy of resid L-1, except: feature 3 of resid 3 is newborn (= mlp 3 row 11); resid 5 row 3 is
    new (the chain of feature 3 is cut going forward from layer 4); feature 7 of resid 2 is processed by attn 2."""
    g = torch.Generator().manual_seed(seed)
    saes = {}
    previous = _unit(torch.randn(features, D, generator=g))
    saes[(0, "resid")] = _sae(previous, 0, "resid")
    for layer in range(1, layers):
        mlp, attn = _unit(torch.randn(features, D, generator=g)), _unit(torch.randn(features, D, generator=g))
        current = _unit(previous + 0.15 * torch.randn(features, D, generator=g) / math.sqrt(D))
        if layer == 3:
            current[3] = mlp[11]
        if layer == 5:
            current[3] = _unit(torch.randn(D, generator=g))
        if layer == 2:
            current[7] = _unit(previous[7] + 0.7 * attn[20])
        saes[(layer, "resid")] = _sae(current, layer, "resid")
        saes[(layer, "mlp")] = _sae(mlp, layer, "mlp")
        saes[(layer, "attn")] = _sae(attn, layer, "attn")
        previous = current
    return saes


def test_trace_composes_top1_matches_both_ways_and_attaches_modules():
    flow = FeatureFlow(_chain(), cache_dir=False)
    graph = flow.trace(layer=3, feature=7)
    resid = sorted(n for n in graph if "/resid/" in n)
    assert resid == [f"{layer}/resid/7" for layer in range(6)]
    assert graph.has_edge("1/resid/7", "2/resid/7") and graph.has_edge("4/resid/7", "5/resid/7")
    assert graph.has_edge("2/attn/20", "2/resid/7")  # the attn feature processed into resid 2
    assert [n for n in graph if "/mlp/" in n] == []  # no mlp predecessor reaches t_module
    node = graph.nodes["2/resid/7"]
    assert node["class"] == "processed by attn" and node["role"] == "backward"
    assert (node["layer"], node["site"], node["index"]) == (2, "resid", 7)
    assert graph.nodes["3/resid/7"]["role"] == "target" and graph.nodes["3/resid/7"]["score"] == 1.0
    assert graph.nodes["0/resid/7"]["class"] == "unknown"  # no predecessor SAE for layer 0
    w = {k: s.W_dec.detach() for k, s in flow.items()}
    cosine = float(w[(2, "resid")][7] @ w[(3, "resid")][7])
    assert graph.edges["2/resid/7", "3/resid/7"]["cosine"] == pytest.approx(cosine, abs=1e-5)
    assert graph.edges["2/attn/20", "2/resid/7"]["cosine"] == pytest.approx(graph.nodes["2/attn/20"]["score"])
    assert graph.graph["target"] == "3/resid/7" and graph.graph["missing"] == "0/attn,0/mlp"


def test_trace_stops_where_the_residual_score_is_below_t_resid():
    flow = FeatureFlow(_chain(), cache_dir=False)
    graph = flow.trace(layer=4, feature=3)
    assert sorted(graph) == ["3/mlp/11", "3/resid/3", "4/resid/3"]  # newborn at 3 (backward cut), cut before 5
    assert graph.nodes["3/resid/3"]["class"] == "newborn from mlp"
    assert graph.nodes["4/resid/3"]["class"] == "translated"
    assert graph.edges["3/mlp/11", "3/resid/3"]["cosine"] == pytest.approx(1.0, abs=1e-5)
    backward = flow.trace(layer=3, feature=7, direction="backward", max_steps=1)
    assert sorted(n for n in backward if "/resid/" in n) == ["2/resid/7", "3/resid/7"]
    with pytest.raises(FlowError, match="out of range"):
        flow.trace(layer=3, feature=64)
    with pytest.raises(FlowError, match=r"layer 9, 'resid'"):
        flow.trace(layer=9, feature=0)


def test_json_and_graphml_round_trip(tmp_path):
    flow = FeatureFlow(_chain(), cache_dir=False)
    graph = flow.trace(layer=3, feature=7)
    graph.nodes["3/resid/7"]["top_tokens"] = ["the [cat]  (3.2)"]
    text = to_json(graph, tmp_path / "g.json")
    assert json.loads((tmp_path / "g.json").read_text()) == json.loads(text)
    back = from_json(tmp_path / "g.json")
    assert nx.utils.graphs_equal(back, graph)
    to_graphml(graph, tmp_path / "g.graphml")
    read = nx.read_graphml(tmp_path / "g.graphml")
    assert set(read) == set(graph) and set(read.edges) == set(graph.edges)
    assert read.nodes["2/resid/7"]["class"] == "processed by attn"
    edge = ("2/resid/7", "3/resid/7")
    assert read.edges[edge]["cosine"] == pytest.approx(graph.edges[edge]["cosine"])
    assert not list(tmp_path.glob(".*"))  # written through temporaries that were renamed into place


def test_pictures_are_written_and_the_html_is_self_contained(tmp_path):
    flow = FeatureFlow(_chain(), cache_dir=False)
    graph = flow.trace(layer=3, feature=7)
    graph.nodes["3/resid/7"]["top_tokens"] = ["<b>not html</b> [cat]  (3.2)"]
    flow.plot(graph, tmp_path / "flow.png")
    assert (tmp_path / "flow.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    flow.plot(graph, tmp_path / "flow.svg")
    assert (tmp_path / "flow.svg").stat().st_size > 1000
    flow.to_html(graph, tmp_path / "flow.html")
    page = (tmp_path / "flow.html").read_text()
    assert page == graph_to_html(graph)
    assert "http" not in page and "src=" not in page and "href=" not in page  # nothing fetched at view time
    assert all(node in page for node in graph)
    assert "&lt;b&gt;not html&lt;/b&gt;" in page and "<b>not html</b>" not in page.split("flow-data")[0]
    assert "mouseenter" in page
    assert not list(tmp_path.glob(".*"))


# ------------------------------------------------------------------------------------------------ collections
def _save_collection(saes, root):
    for (layer, site), sae in saes.items():
        sae.save_pretrained(root / f"layer_{layer}" / site)


def test_a_collection_on_disk_gives_the_same_flow_lazily(tmp_path):
    saes = _chain(layers=4)
    _save_collection(saes, tmp_path)
    attn_z = HierarchicalSAE(HierarchicalSAEConfig(d_in=32, d_sae=8, k=2, hook_layer=1, hook_site="attn_z"))
    attn_z.save_pretrained(tmp_path / "layer_1" / "attn_z")  # skipped: flow cannot use attn_z
    flow = FeatureFlow.from_pretrained(tmp_path, cache_dir=False)
    assert len(flow) == len(saes) and (1, "attn_z") not in flow
    graph = flow.trace(layer=2, feature=7)
    assert all(slot[0] == "decoder" for slot in flow._loaded)  # matching read decoders only
    reference = FeatureFlow(saes, cache_dir=False).trace(layer=2, feature=7)
    assert nx.utils.graphs_equal(graph, reference)
    assert isinstance(flow[(2, "resid")], HierarchicalSAE)
    only = FeatureFlow.from_pretrained(tmp_path, layers=[2, 3], sites=["resid"], cache_dir=False)
    assert only.keys() == [(2, "resid"), (3, "resid")]
    with pytest.raises(FlowError, match="no SAE subfolders"):
        FeatureFlow.from_pretrained(tmp_path, layers=[42])
    with pytest.raises(FlowError, match=r"layer 1, 'resid'"):
        only.predecessors(2)


def test_a_collection_on_the_hub_loads_like_the_local_one(tmp_path):
    saes = _chain(layers=3)
    with PushServer(tmp_path / "hub") as server, hub_client(server.url, cache_dir=tmp_path / "hf-cache"):
        push_collection({f"layer_{layer}/{site}": sae for (layer, site), sae in saes.items()}, "org/flow-saes")
        flow = FeatureFlow.from_pretrained("org/flow-saes", cache_dir=False)
        graph = flow.trace(layer=2, feature=7)
        mlp = flow[(1, "mlp")]
    assert flow.keys() == sorted(saes)
    assert nx.utils.graphs_equal(graph, FeatureFlow(saes, cache_dir=False).trace(layer=2, feature=7))
    torch.testing.assert_close(mlp.W_dec, saes[(1, "mlp")].W_dec)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="hf-sae")
    sub = parser.add_subparsers(dest="command", required=True)
    add_flow_subcommand(sub)
    return parser.parse_args(argv)


def test_cli_trace_table_and_match(tmp_path, capsys):
    _save_collection(_chain(layers=4), tmp_path / "saes")
    out = tmp_path / "out"
    args = _parse(
        [
            "flow",
            "trace",
            str(tmp_path / "saes"),
            "--layer",
            "2",
            "--feature",
            "7",
            "--cache-dir",
            "none",
            "--out",
            str(out / "flow.png"),
            "--out",
            str(out / "flow.html"),
            "--out",
            str(out / "flow.json"),
        ]
    )
    assert args.run(args) == 0
    assert (out / "flow.png").stat().st_size > 0 and (out / "flow.html").exists()
    assert from_json(out / "flow.json").graph["target"] == "2/resid/7"
    assert "2/resid/7: " in capsys.readouterr().out
    args = _parse(
        [
            "flow",
            "table",
            str(tmp_path / "saes"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--out",
            str(out / "table.csv"),
            "--plot",
            str(out / "summary.png"),
        ]
    )
    assert args.run(args) == 0
    assert len((out / "table.csv").read_text().splitlines()) == 1 + 4 * 64
    assert (out / "summary.png").exists() and list((tmp_path / "cache").glob("match-*.safetensors"))
    args = _parse(
        [
            "flow",
            "match",
            str(tmp_path / "saes"),
            "--source",
            "3/resid",
            "--target",
            "2/resid",
            "--k",
            "2",
            "--cache-dir",
            "none",
            "--out",
            str(out / "match.csv"),
        ]
    )
    assert args.run(args) == 0
    lines = (out / "match.csv").read_text().splitlines()
    assert lines[0] == "feature,match_1,cosine_1,match_2,cosine_2" and lines[8].startswith("7,7,")
    assert "3/resid -> 2/resid" in capsys.readouterr().out
    args = _parse(["flow", "trace", str(tmp_path / "saes"), "--layer", "2", "--feature", "7", "--out", "x.txt"])
    with pytest.raises(ValueError, match="unknown format"):
        args.run(args)
    help_text, add_arguments, run = FLOW_SUBCOMMAND  # the entry for hf_sae.cli.SUBCOMMANDS
    assert callable(add_arguments) and run is args.run and "feature flow" in help_text
