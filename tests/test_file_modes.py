"""Files hf-sae writes get the mode a plain open() would give under the process's umask (not mkstemp's private 0600):
the atomic writers, save_pretrained, flow pictures and exports, the sweep plot."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from hf_sae._io import atomic_dir, current_umask, write_text_atomic
from hf_sae.flow import FeatureFlow
from hf_sae.latent_stats import FeatureStats
from hf_sae.steering_sweep import SweepResult, SweepRow
from hf_sae.testing.tiny_models import planted_sae, tiny_sae


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_current_umask_reads_without_changing_it(umask):
    assert current_umask() == umask
    assert current_umask() == umask


def test_every_writer_respects_the_umask(umask, tmp_path):
    expected_file, expected_dir = 0o666 & ~umask, 0o777 & ~umask
    written = [write_text_atomic(tmp_path / "a.txt", "x")]
    sae = tiny_sae(d_sae=8, d_in=4, k=2)
    sae.feature_stats = FeatureStats(
        torch.full((8,), 0.5), torch.ones(8), torch.ones(8), torch.zeros(4), 1.0, 10, source="test"
    )
    sae.save_pretrained(tmp_path / "sae")
    written += [tmp_path / "sae" / name for name in ("config.json", "model.safetensors", "feature_stats.safetensors")]
    written.append(sae.feature_stats.plot_density(tmp_path / "density.png"))
    rows = torch.nn.functional.normalize(torch.randn(32, 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    flow = FeatureFlow(
        {(0, "resid"): planted_sae(rows, 0, "resid"), (1, "resid"): planted_sae(rows, 1, "resid")}, cache_dir=False
    )
    graph = flow.trace(layer=1, feature=3)
    flow.plot(graph, tmp_path / "graph.png")
    flow.to_html(graph, tmp_path / "graph.html")
    flow.to_json(graph, tmp_path / "graph.json")
    flow.to_graphml(graph, tmp_path / "graph.graphml")
    written += [tmp_path / f"graph.{ext}" for ext in ("png", "html", "json", "graphml")]
    row = SweepRow(0.0, 0.0, -1.0, 2.0, 0.0, 3, ["a"])
    written.append(
        SweepResult([row, SweepRow(1.0, 0.1, -0.5, 2.1, 0.1, 3, ["b"])], ["p"], "x", "absolute", []).plot(
            tmp_path / "s.png"
        )
    )
    for path in written:
        assert _mode(path) == expected_file, (path, oct(_mode(path)))
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "inner.txt").write_text("x")
    assert _mode(tmp_path / "folder") == expected_dir
    assert _mode(tmp_path / "sae") == expected_dir
