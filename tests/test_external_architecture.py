"""An architecture defined outside hf-sae (tests/data/external_architecture/gain_topk_sae.py, public names only)
gets AutoModel round trips, a generated card, training and remote code with no edit to hf-sae."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

from hf_sae import SAEConfigError
from hf_sae.cards import generate_model_card
from hf_sae.registry import architecture_of, resolve_architecture
from hf_sae.remote_code import generate_remote_code
from training.cli import parse_args
from training.train import train

REPO = Path(__file__).resolve().parents[1]
FILE = REPO / "tests" / "data" / "external_architecture" / "gain_topk_sae.py"


@pytest.fixture(scope="module")
def user_module():
    """The user's file, imported the way ``--import`` does (module name = file stem)."""
    spec = importlib.util.spec_from_file_location(FILE.stem, FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[FILE.stem] = module
    spec.loader.exec_module(module)
    return module


def _sae(module, **fields):
    torch.manual_seed(3)
    return module.GainTopKSAE(module.GainTopKSAEConfig(d_in=16, d_sae=64, k=8, gain_init=0.5, **fields))


def test_the_user_architecture_round_trips_through_the_auto_classes(user_module, tmp_path):
    sae = _sae(user_module, hook_layer=2, base_model="org/tiny")
    sae.save_pretrained(tmp_path / "sae")
    assert json.loads((tmp_path / "sae" / "config.json").read_text())["model_type"] == "gain_topk_sae"
    assert type(AutoConfig.from_pretrained(tmp_path / "sae")) is user_module.GainTopKSAEConfig
    loaded = AutoModel.from_pretrained(tmp_path / "sae")
    assert type(loaded) is user_module.GainTopKSAE and loaded.config.gain_init == 0.5
    x = torch.randn(5, 16)
    with torch.no_grad():
        a, b = sae.encode(x), loaded.encode(x)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
        assert torch.equal(sae.decode(a), loaded.decode(b))
    assert architecture_of(loaded).presets.keys() == {"gain_topk"}
    assert resolve_architecture("gain_topk")[0].model_class is user_module.GainTopKSAE
    with pytest.raises(SAEConfigError, match="gain_init must be a number > 0"):
        user_module.GainTopKSAEConfig(gain_init=0)


def test_the_user_architecture_gets_a_generated_card(user_module):
    card = generate_model_card(_sae(user_module), {"budgets": {"8": {"explained_variance": 0.7, "l0": 8.0}}})
    assert {"gain-topk", "hierarchical-topk"} <= set(card.data.tags)
    assert "# Gain-TopK (HierarchicalTopK) SAE" in card.content
    assert "Gain-TopK encoder: a = exp(log_gain)" in card.content  # the architecture's own training paragraph
    assert "| initial gain | 0.5 |" in card.content


def test_the_user_architecture_trains_from_the_cli_with_import(user_module, tiny_args, tmp_path):
    out = tmp_path / "run"
    cfg, explicit = parse_args([*tiny_args(out, arch="gain_topk", gain_init=0.5), "--import", str(FILE)])
    assert cfg.saes[0].config == {"d_sae": 128, "k": 8, "gain_init": 0.5}
    metrics = train(cfg, explicit)
    sae = AutoModel.from_pretrained(out)
    assert type(sae).__name__ == "GainTopKSAE" and sae.config.tokens_trained == 128 * 30
    assert not torch.allclose(sae.log_gain, torch.full_like(sae.log_gain, torch.tensor(0.5).log().item()))  # trained
    assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(128), atol=1e-5)  # the one step's decoder maintenance
    result = metrics["saes"]["L2_resid_gain_topk_k8_d128"]
    assert result["budgets"]["8"]["explained_variance"] > 0.2
    card = (out / "README.md").read_text()
    assert "Gain-TopK (HierarchicalTopK) SAE" in card and "python -m training.train" in card
    # a fresh process resumes it without --import: the run's saved imports register the architecture first
    resumed = subprocess.run(
        [sys.executable, "-m", "training.train", "--resume", str(out)], capture_output=True, text=True, cwd=REPO
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]


REMOTE = textwrap.dedent(
    """
    import importlib.util, sys
    class HideHfSae:
        def find_spec(self, name, path=None, target=None):
            if name == "hf_sae" or name.startswith("hf_sae."):
                raise ModuleNotFoundError(name)
    sys.meta_path.insert(0, HideHfSae())
    import torch
    from safetensors.torch import load_file, save_file
    spec = importlib.util.spec_from_file_location("modeling_hf_sae", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    sys.modules["modeling_hf_sae"] = module
    spec.loader.exec_module(module)
    sae = module.GainTopKSAE.from_pretrained(sys.argv[2])
    x = load_file(sys.argv[3])["x"]
    with torch.no_grad():
        latents = sae.encode(x)
        save_file({"values": latents.values, "indices": latents.indices, "decoded": sae.decode(latents)}, sys.argv[4])
    """
)


def test_the_user_architecture_exports_remote_code_that_runs_without_hf_sae(user_module, tmp_path):
    sae = _sae(user_module)
    sae.save_pretrained(tmp_path / "sae")
    code = generate_remote_code([architecture_of(sae)])
    assert "class GainTopKSAE(SAEPreTrainedModel)" in code and "register_architecture(" not in code
    (tmp_path / "modeling_hf_sae.py").write_text(code)
    x = torch.randn(6, 16)
    save_file({"x": x}, tmp_path / "x.safetensors")
    paths = [tmp_path / "modeling_hf_sae.py", tmp_path / "sae", tmp_path / "x.safetensors", tmp_path / "out.st"]
    proc = subprocess.run([sys.executable, "-c", REMOTE, *map(str, paths)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = load_file(tmp_path / "out.st")
    with torch.no_grad():
        latents = sae.encode(x)
        assert torch.equal(remote["indices"], latents.indices) and torch.equal(remote["values"], latents.values)
        assert torch.equal(remote["decoded"], sae.decode(latents))
