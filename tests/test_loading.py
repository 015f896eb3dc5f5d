"""Loading errors name the file (or repo) and the problem: hf_sae.hub.load_sae on local folders (no server needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ResolvedRevision, constants
from transformers import AutoModel

from hf_sae import HierarchicalSAE, HierarchicalSAEConfig, SAEConfigError, SAELoadError
from hf_sae.hub import SAEHubError, detect_layout, explain_load_failure, load_sae
from hf_sae.loading import describe_location, revision_text

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


# ------------------------------------------------------------ every entry point explains a location the same way
LOADERS = {
    "HierarchicalSAE.from_pretrained": HierarchicalSAE.from_pretrained,
    "AutoModel.from_pretrained": AutoModel.from_pretrained,
    "load_sae": load_sae,
}


@pytest.fixture
def collection(tmp_path) -> Path:
    for layer in (1, 2):
        HierarchicalSAE(HierarchicalSAEConfig(d_in=8, d_sae=16, k=2, hook_layer=layer)).save_pretrained(
            tmp_path / "coll" / f"layer_{layer}" / "resid"
        )
    (tmp_path / "coll" / "notes").mkdir()
    (tmp_path / "coll" / "notes" / "README.md").write_text("no SAE here")
    return tmp_path / "coll"


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize(
    "subfolder,pattern",
    [
        ("layer_3/resid", r"has no subfolder 'layer_3/resid'; SAEs found in: layer_1/resid, layer_2/resid"),
        (None, r"is an hf-sae collection, not a single SAE: pass subfolder=, one of \['layer_1/resid'"),
        ("notes", r"\(subfolder 'notes'\) has no config.json \(found README.md\)"),
    ],
    ids=["missing-subfolder", "collection-root", "no-config"],
)
def test_every_loader_says_what_is_at_the_location_instead_of_a_config_error(collection, loader, subfolder, pattern):
    kwargs = {"subfolder": subfolder} if subfolder else {}
    with pytest.raises(SAEHubError, match=pattern) as info:
        LOADERS[loader](collection, **kwargs)
    assert "missing required key" not in str(info.value) and "model_type" not in str(info.value)
    assert isinstance(info.value, OSError) and isinstance(info.value, ValueError)  # what transformers raised


def test_auto_model_keeps_transformers_errors_for_other_models(tmp_path, tiny_lm):
    tiny_lm("gemma2").save_pretrained(tmp_path / "lm")
    (tmp_path / "lm" / "model.safetensors").unlink()
    with pytest.raises(OSError) as info:
        AutoModel.from_pretrained(tmp_path / "lm")
    assert not isinstance(info.value, SAEHubError)  # a Gemma folder without weights: transformers says so itself


def test_load_sae_refuses_a_model_that_is_not_an_sae(tmp_path, tiny_lm):
    tiny_lm("gemma2").save_pretrained(tmp_path / "gemma")
    with pytest.raises(SAELoadError, match=r"is not an SAE: its config.json says model_type='gemma2'") as info:
        load_sae(tmp_path / "gemma")
    assert "hierarchical_sae" in str(info.value) and "kron_sae" in str(info.value)
    assert "register_architecture" in str(info.value)


def _corrupt_payload(weights: Path) -> None:
    """Overwrite the last 16 bytes (tensor data, not the header) with 0xff: float32 NaNs."""
    data = bytearray(weights.read_bytes())
    data[-16:] = b"\xff" * 16
    weights.write_bytes(bytes(data))


@pytest.mark.parametrize("loader", list(LOADERS))
def test_corrupt_payload_with_a_valid_header_is_refused_naming_the_file(saved, loader):
    _corrupt_payload(saved / "model.safetensors")
    with pytest.raises(SAELoadError, match=r"NaN/inf weights in .* \(4 of \d+\)") as info:
        LOADERS[loader](saved)
    assert str(saved / "model.safetensors") in str(info.value) and "check_finite_weights=False" in str(info.value)
    trusted = LOADERS[loader](saved, check_finite_weights=False)  # the opt-out for files known to be fine
    assert not all(bool(torch.isfinite(p).all()) for p in trusted.parameters())


def test_revisions_show_their_name_and_short_sha_not_a_repr():
    resolved = ResolvedRevision("54fc7e8321f9d9f06ea69ad977463bab5ef6e44a", initial="v1")
    assert revision_text(resolved) == "'v1' (commit 54fc7e83)"
    assert revision_text(ResolvedRevision("54fc7e8321f9d9f06ea69ad977463bab5ef6e44a")) == "'main' (commit 54fc7e83)"
    assert revision_text("v2") == "'v2'"
    where = describe_location("me/saes", "layer_1/resid", resolved)
    assert where == "me/saes (subfolder 'layer_1/resid') at revision 'v1' (commit 54fc7e83)"
    assert "ResolvedRevision(" not in where


def test_auto_model_treats_a_bare_name_as_a_canonical_hub_repo(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(SAEHubError, match=r"gpt2-not-cached cannot be loaded: offline mode is on .* has no copy"):
        AutoModel.from_pretrained("gpt2-not-cached")  # like "gpt2": a repo without a namespace
    with pytest.raises(SAEHubError, match="no such local folder, and not a Hub repo id"):
        load_sae("gpt2-not-cached")  # SAE repos always have one: a bare name is a mistyped folder
