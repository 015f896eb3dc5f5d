"""Loading errors name the file (or repo) and the problem: hf_sae.hub.load_sae on local folders (no server needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hf_sae import HierarchicalSAE, HierarchicalSAEConfig, SAEConfigError, SAELoadError
from hf_sae.hub import SAEHubError, detect_layout, explain_load_failure, load_sae

PEER = Path(__file__).parent / "data" / "peer_formats"


@pytest.fixture
def saved(tmp_path) -> Path:
    sae = HierarchicalSAE(HierarchicalSAEConfig(d_in=8, d_sae=16, k=2, hook_layer=1))
    sae.save_pretrained(tmp_path / "sae")
    return tmp_path / "sae"


def _edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(edit(config)))


@pytest.mark.parametrize(
    "edit,pattern",
    [
        (lambda c: {k: v for k, v in c.items() if k != "d_sae"}, r"missing required key\(s\) \['d_sae'\]"),
        (lambda c: {**c, "colour": "blue"}, r"unknown key\(s\) \['colour'\]"),
        (lambda c: {**c, "model_type": "kron_sae"}, r"KronSAEConfig"),
    ],
    ids=["missing-key", "unknown-key", "wrong-model-type"],
)
def test_bad_config_names_the_folder_and_the_key(saved, edit, pattern):
    _edit_config(saved, edit)
    with pytest.raises(SAEConfigError, match=pattern) as info:
        load_sae(saved)
    assert str(saved) in str(info.value)


def test_wrong_model_type_for_the_class_is_named(saved):
    _edit_config(saved, lambda c: {**c, "model_type": "kron_sae"})
    with pytest.raises(SAEConfigError, match="model_type='kron_sae' but HierarchicalSAEConfig expects"):
        HierarchicalSAE.from_pretrained(saved)


def test_shapes_that_disagree_with_the_config_are_named(saved):
    _edit_config(saved, lambda c: {**c, "d_sae": 32})
    with pytest.raises(SAELoadError, match=r"model\.safetensors disagree with config\.json") as info:
        load_sae(saved)
    assert str(saved) in str(info.value)


def test_truncated_safetensors_is_named(saved):
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(SAELoadError, match=r"model\.safetensors cannot be read .*truncated") as info:
        load_sae(saved)
    assert str(saved) in str(info.value)


def test_pickled_weights_are_never_loaded(saved):
    state = HierarchicalSAE.from_pretrained(saved).state_dict()
    (saved / "model.safetensors").unlink()
    torch.save(state, saved / "pytorch_model.bin")
    with pytest.raises(SAEHubError, match=r"pickled PyTorch weights \(pytorch_model\.bin\), which hf-sae never loads"):
        load_sae(saved)


@pytest.mark.parametrize(
    "source,kind,converter",
    [
        (PEER / "sae_lens" / "jumprelu", "sae-lens", "from_sae_lens"),
        (PEER / "sparsify", "sparsify", "from_sparsify"),
    ],
)
def test_peer_layouts_name_the_converter(tmp_path, source, kind, converter):
    folder = shutil.copytree(source, tmp_path / "peer")
    with pytest.raises(SAEHubError, match=f"is a {kind} layout .* hf_sae.convert.{converter}") as info:
        load_sae(folder)
    assert f"hf-sae convert {kind}" in str(info.value)


def test_gemma_scope_layout_names_its_converter(tmp_path):
    folder = tmp_path / "gemma-scope-2b-pt-res" / "layer_3" / "width_16k" / "average_l0_50"
    folder.mkdir(parents=True)
    (folder / "params.npz").write_bytes(b"")
    with pytest.raises(SAEHubError, match=r"gemma-scope layout .*from_gemma_scope\(.*layer_3/width_16k/average_l0_50"):
        load_sae(tmp_path / "gemma-scope-2b-pt-res")


def test_collection_folder_without_subfolder_lists_the_saes(tmp_path):
    for layer in (1, 2):
        HierarchicalSAE(HierarchicalSAEConfig(d_in=8, d_sae=16, k=2, hook_layer=layer)).save_pretrained(
            tmp_path / "coll" / f"layer_{layer}" / "resid"
        )
    with pytest.raises(SAEHubError, match=r"collection, not a single SAE: pass subfolder=.*'layer_1/resid'"):
        load_sae(tmp_path / "coll")
    assert isinstance(load_sae(tmp_path / "coll", subfolder="layer_2/resid"), HierarchicalSAE)
    with pytest.raises(SAEHubError, match=r"no subfolder 'layer_3/resid'; SAEs found in: layer_1/resid, layer_2/resid"):
        load_sae(tmp_path / "coll", subfolder="layer_3/resid")


def test_not_a_path_nor_a_repo_id(tmp_path):
    with pytest.raises(SAEHubError, match="no such local folder, and not a Hub repo id"):
        load_sae(tmp_path / "missing" / "deeper")
    assert explain_load_failure(tmp_path) is not None  # an empty folder: "not an hf-sae SAE"


def test_detect_layout_reads_file_lists():
    assert detect_layout(["config.json", "model.safetensors", "README.md"]) == ("hf-sae", [""])
    assert detect_layout(["a/cfg.json", "a/sae_weights.safetensors"]) == ("sae-lens", ["a"])
    assert detect_layout(["layers.1/cfg.json", "layers.1/sae.safetensors", "config.json"]) == ("sparsify", ["layers.1"])
    assert detect_layout(["x/y/params.npz"]) == ("gemma-scope", ["x/y"])
    assert detect_layout(["l/r/config.json", "l/r/model.safetensors"]) == ("hf-sae-collection", ["l/r"])
    assert detect_layout(["l/r/config.json", "l/r/model.safetensors"], subfolder="l/r") == ("hf-sae", [""])
    assert detect_layout(["README.md"]) == ("unknown", [])
