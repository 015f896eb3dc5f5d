"""Converters (hf_sae.convert) give the source library's outputs, and JumpReLUSAE behaves like the other SAEs.

SAELens and sparsify sources are the files in tests/data/peer_formats/, written *by the peer libraries themselves*
(sae-lens 6.54, eai-sparsify 1.3; see make_peer_fixtures.py) together with the peer's encode/decode outputs on fixed
inputs. The slow ``live`` tests rebuild them in tmp_path with the real peer first, in the peer's own venv
($HF_SAE_SAELENS_PYTHON / $HF_SAE_SPARSIFY_PYTHON, else one created on first use and cached: tests/conftest.py).
Gemma Scope has no installable library: its params.npz is built from the release's documented layout and checked
against the release tutorial's JumpReLU code (re-typed below in numpy).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModel

from hf_sae import HierarchicalSAE, HierarchicalSAEConfig, SAEConfigError
from hf_sae import convert as hf_convert
from hf_sae.cards import generate_model_card
from hf_sae.cli import main as cli_main
from hf_sae.configuration_jumprelu_sae import JumpReLUSAEConfig
from hf_sae.convert import SAEConversionError
from hf_sae.modeling_jumprelu_sae import JumpReLUSAE

# Registered by hf_sae/__init__.py once JumpReLUSAE is exported there; harmless (exist_ok) until then and after.
AutoConfig.register("jumprelu_sae", JumpReLUSAEConfig, exist_ok=True)
AutoModel.register(JumpReLUSAEConfig, JumpReLUSAE, exist_ok=True)

PEER = Path(__file__).parent / "data" / "peer_formats"
SAE_LENS_VARIANTS = ["standard", "jumprelu", "topk", "topk_rescaled", "topk_no_b_dec_input"]


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> float:
    """Max abs difference, relative to the magnitude of the values (floored at 1): must be <= tol."""
    error = float((actual.double() - expected.double()).abs().max())
    scale = max(1.0, float(expected.double().abs().max()))
    assert error <= tol * scale, f"max |diff| {error:.3g} > {tol} * {scale:.3g}"
    return error


def _check_sae_lens_folder(folder: Path) -> None:
    sae = hf_convert.from_sae_lens(folder)
    ref = load_file(str(folder / "reference.safetensors"))
    with torch.no_grad():
        latents = sae.encode(ref["x"])
        _close(latents.to_dense(sae.config.d_sae), ref["encoded"])
        _close(sae.decode(latents), ref["decoded"])
        _close(sae(ref["x"]).reconstruction, ref["decoded"])
    assert torch.all(latents.values[..., :-1] >= latents.values[..., 1:]), "latents must be sorted descending"


@pytest.mark.parametrize("variant", SAE_LENS_VARIANTS)
def test_sae_lens_conversion_matches_sae_lens_outputs(variant):
    _check_sae_lens_folder(PEER / "sae_lens" / variant)


def test_sae_lens_architectures_map_to_hf_sae_classes():
    types = {v: type(hf_convert.from_sae_lens(PEER / "sae_lens" / v)) for v in SAE_LENS_VARIANTS}
    assert types["jumprelu"] is JumpReLUSAE and types["standard"] is JumpReLUSAE
    assert types["topk"] is HierarchicalSAE
    topk = hf_convert.from_sae_lens(PEER / "sae_lens" / "topk_rescaled")
    assert topk.config.k == 8 and topk.config.hierarchical is False
    # rescale_acts_by_decoder_norm is folded into unit-norm decoder rows
    torch.testing.assert_close(topk.W_dec.norm(dim=-1), torch.ones(64), atol=1e-6, rtol=0)
    meta = hf_convert.from_sae_lens(PEER / "sae_lens" / "jumprelu").config
    # SAELens records TransformerLens' model name; the config gets the Hub id
    assert (meta.base_model, meta.hook_layer, meta.hook_site, meta.context_length) == (
        "google/gemma-2-2b",
        3,
        "resid",
        128,
    )
    assert meta.source_format == "sae-lens" and meta.apply_b_dec_to_input is False


@pytest.mark.parametrize("hookpoint", ["layers.3", "layers.5"])
def test_sparsify_conversion_matches_sparsify_outputs(hookpoint):
    sae = hf_convert.from_sparsify(PEER / "sparsify", hookpoint)
    ref = load_file(str(PEER / "sparsify" / hookpoint / "reference.safetensors"))
    expected_dense = torch.zeros(ref["x"].shape[0], 64).scatter_(-1, ref["top_indices"].long(), ref["top_acts"])
    with torch.no_grad():
        latents = sae.encode(ref["x"])
        _close(latents.to_dense(64), expected_dense)
        _close(sae.decode(latents), ref["decoded"])
    assert isinstance(sae, HierarchicalSAE) and sae.config.k == 8
    assert (sae.config.hook_layer, sae.config.hook_site) == (int(hookpoint.split(".")[1]), "resid")
    # the hookpoint folder itself works too
    direct = hf_convert.from_sparsify(PEER / "sparsify" / hookpoint)
    assert torch.equal(direct.W_dec, sae.W_dec)


@pytest.mark.slow
@pytest.mark.parametrize("peer,fixture", [("sae-lens", "sae_lens_python"), ("sparsify", "sparsify_python")])
def test_live_peer_library_build_then_convert(tmp_path, request, peer, fixture):
    python = request.getfixturevalue(fixture)  # the peer's own venv, created on first use (tests/conftest.py)
    subprocess.run(
        [python, str(PEER / "make_peer_fixtures.py"), peer, str(tmp_path)], check=True, capture_output=True, timeout=300
    )
    if peer == "sae-lens":
        for variant in SAE_LENS_VARIANTS:
            _check_sae_lens_folder(tmp_path / "sae_lens" / variant)
    else:
        sae = hf_convert.from_sparsify(tmp_path / "sparsify", "layers.3")
        ref = load_file(str(tmp_path / "sparsify" / "layers.3" / "reference.safetensors"))
        with torch.no_grad():
            _close(sae.decode(sae.encode(ref["x"])), ref["decoded"])


# --------------------------------------------------------------------------------------------- Gemma Scope
def _gemma_scope_reference(params: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Gemma Scope tutorial's JumpReLUSAE.encode/decode, in numpy."""
    pre_acts = x @ params["W_enc"] + params["b_enc"]
    mask = pre_acts > params["threshold"]
    acts = mask * np.maximum(pre_acts, 0)
    return acts, acts @ params["W_dec"] + params["b_dec"]


def _write_gemma_scope(root: Path, sae_id: str, d_in: int = 16, d_sae: int = 1024, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    params = {
        "W_enc": (rng.standard_normal((d_in, d_sae)) / np.sqrt(d_in)).astype(np.float32),
        "W_dec": (rng.standard_normal((d_sae, d_in)) * rng.uniform(0.3, 2.0, (d_sae, 1))).astype(np.float32),
        "b_enc": (0.1 * rng.standard_normal(d_sae)).astype(np.float32),
        "b_dec": (0.5 * rng.standard_normal(d_in)).astype(np.float32),
        "threshold": rng.uniform(0.05, 0.6, d_sae).astype(np.float32),
    }
    folder = root / sae_id
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **params)
    return params


def test_gemma_scope_conversion_matches_reference_jumprelu(tmp_path):
    repo = tmp_path / "gemma-scope-2b-pt-res"
    params = _write_gemma_scope(repo, "layer_3/width_1k/average_l0_5")
    sae = hf_convert.from_gemma_scope(repo, "layer_3/width_1k/average_l0_5")
    x = (2.0 * np.random.default_rng(1).standard_normal((64, 16))).astype(np.float32)
    acts, decoded = _gemma_scope_reference(params, x)
    with torch.no_grad():
        latents = sae.encode(torch.from_numpy(x))
        _close(latents.to_dense(1024), torch.from_numpy(acts))
        _close(sae.decode(latents), torch.from_numpy(decoded))
    cfg = sae.config
    assert isinstance(sae, JumpReLUSAE) and cfg.k == cfg.d_sae == 1024 and cfg.d_in == 16
    assert (cfg.base_model, cfg.hook_layer, cfg.hook_site) == ("google/gemma-2-2b", 3, "resid")
    assert cfg.apply_b_dec_to_input is False and cfg.source_format == "gemma-scope"
    assert (acts > 0).sum(-1).max() < 1024, "the test must have inactive latents"


@pytest.mark.parametrize(
    "repo_name,site,base",
    [
        ("gemma-scope-2b-pt-mlp", "mlp", "google/gemma-2-2b"),
        ("gemma-scope-9b-it-att", "attn_z", "google/gemma-2-9b-it"),
    ],
)
def test_gemma_scope_site_and_model_come_from_repo_name(tmp_path, repo_name, site, base):
    _write_gemma_scope(tmp_path / repo_name, "layer_7/width_1k/average_l0_9", d_sae=1024)
    cfg = hf_convert.from_gemma_scope(tmp_path / repo_name, "layer_7/width_1k/average_l0_9").config
    assert (cfg.hook_site, cfg.base_model, cfg.hook_layer) == (site, base, 7)


# --------------------------------------------------------------------------------------------- JumpReLUSAE
def _jumprelu(k=None, apply_b_dec=False, d_in=12, d_sae=40) -> JumpReLUSAE:
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, k=k, apply_b_dec_to_input=apply_b_dec))
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.W_dec.normal_().mul_(1.7)
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_()
        sae.threshold.uniform_(0.2, 1.0)
    return sae


def _naive_jumprelu(sae: JumpReLUSAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    inp = x - sae.b_dec if sae.config.apply_b_dec_to_input else x
    pre = inp @ sae.W_enc + sae.b_enc
    acts = torch.where(pre > sae.threshold, pre.clamp_min(0), torch.zeros_like(pre))
    return acts, acts @ sae.W_dec + sae.b_dec


@pytest.mark.parametrize("apply_b_dec", [False, True])
def test_jumprelu_encode_decode_match_naive_formula(apply_b_dec):
    sae = _jumprelu(apply_b_dec=apply_b_dec)
    x = torch.randn(7, 3, 12)
    with torch.no_grad():
        acts, decoded = _naive_jumprelu(sae, x)
        latents = sae.encode(x)
        assert latents.values.shape == (7, 3, 40)  # k defaults to d_sae: every latent, active ones first
        assert torch.all(latents.values[..., :-1] >= latents.values[..., 1:])
        torch.testing.assert_close(latents.to_dense(40), acts)
        torch.testing.assert_close(sae.decode(latents), decoded, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.encode_dense(x), acts)
        out = sae(x)
        torch.testing.assert_close(out.reconstruction, decoded, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.loss, (decoded - x).pow(2).mean(), rtol=1e-5, atol=1e-6)
        assert set(out.losses) == {"reconstruction"}


def test_jumprelu_k_caps_active_latents_and_prefix_budgets_are_nested():
    sae = _jumprelu(k=5)
    x = torch.randn(20, 12)
    with torch.no_grad():
        acts, _ = _naive_jumprelu(sae, x)
        latents = sae.encode(x)
        assert latents.values.shape == (20, 5)
        torch.testing.assert_close(latents.values, acts.topk(5, dim=-1).values)
        three = sae.encode(x, k=3)
        assert torch.equal(three.values, latents.values[:, :3]) and torch.equal(three.indices, latents.indices[:, :3])
    with pytest.raises(ValueError, match="k=6"):
        sae.encode(x, k=6)


def test_jumprelu_save_load_round_trip_and_scale_folding(tmp_path):
    sae = _jumprelu()
    sae.save_pretrained(tmp_path / "j")
    loaded = AutoModel.from_pretrained(tmp_path / "j")
    assert isinstance(loaded, JumpReLUSAE)
    for name, tensor in sae.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    assert json.loads((tmp_path / "j" / "config.json").read_text())["model_type"] == "jumprelu_sae"
    # A scale s folded into b_enc and threshold (and b_dec) gives, on raw x, the latents of s·x divided by s.
    x = torch.randn(9, 12)
    scaled = _jumprelu()
    scaled.load_state_dict(sae.state_dict())
    with torch.no_grad():
        reference = sae.encode_dense(2.5 * x) / 2.5
        scaled.fold_activation_scale(2.5)
        torch.testing.assert_close(scaled.encode_dense(x), reference, rtol=1e-5, atol=1e-6)


def test_jumprelu_config_refuses_training_objectives():
    with pytest.raises(SAEConfigError, match="hierarchical=True"):
        JumpReLUSAEConfig(d_in=4, d_sae=8, hierarchical=True)
    with pytest.raises(SAEConfigError, match="auxk=True"):
        JumpReLUSAEConfig(d_in=4, d_sae=8, auxk=True)
    assert JumpReLUSAEConfig(d_in=4, d_sae=8).k == 8


# ---------------------------------------------------------------------------------------------- errors
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_safetensors_names_the_file(tmp_path):
    folder = _copy(PEER / "sae_lens" / "topk", tmp_path / "topk")
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(SAEConversionError, match=r"sae_weights\.safetensors.*truncated"):
        hf_convert.from_sae_lens(folder)


def test_unsupported_sae_lens_variants_are_refused_with_the_reason(tmp_path):
    folder = _copy(PEER / "sae_lens" / "standard", tmp_path / "s")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(SAEConversionError, match="'gated' is not supported"):
        hf_convert.from_sae_lens(folder)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(SAEConversionError, match="layer_norm"):
        hf_convert.from_sae_lens(folder)
    (folder / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 65}))
    with pytest.raises(SAEConversionError, match=r"shape \(16, 64\), expected \(16, 65\)"):
        hf_convert.from_sae_lens(folder)


def test_sparsify_transcoders_and_missing_files_are_refused(tmp_path):
    folder = _copy(PEER / "sparsify" / "layers.3", tmp_path / "layers.3")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "transcode": True}))
    with pytest.raises(SAEConversionError, match="transcode"):
        hf_convert.from_sparsify(folder)
    (folder / "cfg.json").unlink()
    with pytest.raises(SAEConversionError, match=r"cfg\.json: missing"):
        hf_convert.from_sparsify(folder)


def test_gemma_scope_without_params_names_the_path(tmp_path):
    (tmp_path / "layer_1").mkdir()
    with pytest.raises(SAEConversionError, match=r"params\.npz: missing"):
        hf_convert.from_gemma_scope(tmp_path, "layer_1")


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_convert_writes_a_loadable_hf_sae_folder(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(["convert", "sparsify", str(PEER / "sparsify"), str(out), "--hookpoint", "layers.5"]) == 0
    assert "HierarchicalSAE: d_in=16, d_sae=64, k=8, layer=5, site=resid" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "README.md"}
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    loaded = HierarchicalSAE.from_pretrained(out)
    ref = load_file(str(PEER / "sparsify" / "layers.5" / "reference.safetensors"))
    with torch.no_grad():
        _close(loaded.decode(loaded.encode(ref["x"])), ref["decoded"])
    assert "library_name: hf-sae" in (out / "README.md").read_text()


def test_cli_convert_reports_errors_without_traceback(tmp_path, capsys):
    assert cli_main(["convert", "sae-lens", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-sae: error:") and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_converted_jumprelu_steers_a_gemma_model(tmp_path, tiny_lm):
    model = tiny_lm("gemma2", num_hidden_layers=2, vocab_size=100)
    repo = tmp_path / "gemma-scope-2b-pt-res"
    _write_gemma_scope(repo, "layer_1/width_1k/average_l0_5", d_in=64, d_sae=1024)
    sae = hf_convert.from_gemma_scope(repo, "layer_1/width_1k/average_l0_5")
    ids = torch.tensor([[2, 5, 9, 14, 3]])
    with torch.no_grad():
        clean = model(ids).logits
        with sae.steer(model, {7: 20.0}):
            added = model(ids).logits
        with sae.steer(model, {7: 20.0}, mode="clamp"):
            clamped = model(ids).logits
        after = model(ids).logits
    assert not torch.allclose(clean, added) and not torch.allclose(clean, clamped)
    assert torch.equal(clean, after)


# --------------------------------------------------------------------------------- provenance and names
@pytest.mark.parametrize(
    "convert,source_format",
    [
        (lambda: hf_convert.from_sae_lens(PEER / "sae_lens" / "topk"), "sae-lens"),
        (lambda: hf_convert.from_sparsify(PEER / "sparsify", "layers.3"), "sparsify"),
    ],
    ids=["sae-lens-topk", "sparsify"],
)
def test_a_converted_topk_card_describes_its_source_not_hf_sae_training(convert, source_format):
    sae = convert()
    assert (sae.config.source_format, sae.config.auxk, sae.config.hierarchical) == (source_format, False, False)
    card = generate_model_card(sae).text
    objective = card.split("## How it was trained", 1)[1].split("<details>", 1)[0]
    assert f"Converted exactly from {source_format}" in objective and "not trained by hf-sae" in objective
    assert "AuxK" not in objective and "kept unit-norm during training" not in objective
    assert f"Converted from {source_format}: `{sae.config.source}`" in card
    trained = generate_model_card(HierarchicalSAE(HierarchicalSAEConfig(d_in=16, d_sae=64, k=8))).text
    assert "kept unit-norm during training" in trained and "Converted" not in trained


def test_configs_saved_before_source_fields_load_and_converted_ones_round_trip(tmp_path):
    sae = hf_convert.from_sparsify(PEER / "sparsify", "layers.3")
    sae.save_pretrained(tmp_path / "converted")
    assert AutoModel.from_pretrained(tmp_path / "converted").config.source_format == "sparsify"
    old = HierarchicalSAE(HierarchicalSAEConfig(d_in=16, d_sae=64, k=8))
    old.save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["source_format"], config["source"]  # a config.json written before the fields existed
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    assert AutoModel.from_pretrained(tmp_path / "old").config.source_format is None


@pytest.mark.parametrize(
    "name,hub_id",
    [
        ("gemma-2-2b", "google/gemma-2-2b"),
        ("gemma-2-9b-it", "google/gemma-2-9b-it"),
        ("gemma-3-270m", "google/gemma-3-270m"),
        ("gemma-2b", "google/gemma-2b"),
        ("Llama-3.1-8B", "meta-llama/Llama-3.1-8B"),
        ("llama-3.2-1b-instruct", "meta-llama/Llama-3.2-1B-Instruct"),
        ("Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B"),
        ("Llama-2-7b", "meta-llama/Llama-2-7b-hf"),
        ("Llama-2-13b-chat", "meta-llama/Llama-2-13b-chat-hf"),
        ("qwen2.5-7b-instruct", "Qwen/Qwen2.5-7B-Instruct"),
        ("qwen2-0.5b", "Qwen/Qwen2-0.5B"),
        ("Qwen3-0.6B-Base", "Qwen/Qwen3-0.6B-Base"),
        ("pythia-70m-deduped", "EleutherAI/pythia-70m-deduped"),
        ("google/gemma-2-2b", "google/gemma-2-2b"),
        ("gpt2-small", "gpt2-small"),
    ],
)
def test_transformer_lens_model_names_map_to_hub_ids(name, hub_id):
    assert hf_convert.hub_model_id(name) == hub_id


@pytest.mark.parametrize(
    "hook,expected",
    [
        ("blocks.6.hook_resid_post", (6, "resid")),
        ("blocks.6.hook_resid_pre", (5, "resid")),
        ("blocks.6.hook_mlp_out", (6, "mlp")),
        ("blocks.6.hook_attn_out", (6, "attn")),
        ("blocks.6.attn.hook_z", (6, "attn_z")),
        ("model.layers.6", (6, "resid")),
        ("blocks.0.hook_resid_pre", "reads the embeddings"),
        ("blocks.6.hook_resid_mid", "between the attention and the MLP of block 6"),
        ("blocks.6.mlp.hook_post", "MLP's hidden activations"),
        ("hook_embed", "is not a TransformerLens hook hf-sae knows"),
    ],
)
def test_transformer_lens_hooks_map_to_sites_or_say_why_not(hook, expected):
    found = hf_convert.hook_site_of(hook)
    if isinstance(expected, tuple):
        assert found == expected
    else:
        assert isinstance(found, str) and expected in found


def _with_metadata(tmp_path: Path, **metadata) -> Path:
    folder = _copy(PEER / "sae_lens" / "topk", tmp_path / "topk")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "metadata": {**cfg["metadata"], **metadata}}))
    return folder


def test_a_sae_lens_hook_with_no_hf_sae_site_is_refused_unless_the_site_is_given(tmp_path):
    folder = _with_metadata(tmp_path, hook_name="blocks.3.hook_resid_mid")
    with pytest.raises(SAEConversionError, match=r"hook 'blocks.3.hook_resid_mid' reads the residual stream between"):
        hf_convert.from_sae_lens(folder)
    sae = hf_convert.from_sae_lens(folder, hook_layer=3, hook_site="resid")  # the caller names the site
    assert (sae.config.hook_layer, sae.config.hook_site) == (3, "resid")
    assert (
        hf_convert.from_sae_lens(
            _with_metadata(tmp_path / "pre", hook_name="blocks.4.hook_resid_pre")
        ).config.hook_layer
        == 3
    )
    with pytest.raises(SAEConversionError, match="embeddings"):
        hf_convert.from_sae_lens(_with_metadata(tmp_path / "zero", hook_name="blocks.0.hook_resid_pre"))
    assert cli_main(["convert", "sae-lens", str(folder), str(tmp_path / "out")]) == 2


def test_a_sae_lens_sae_without_a_hook_name_warns_and_its_card_says_the_layer_is_unknown(tmp_path):
    folder = _with_metadata(tmp_path, hook_name=None)
    with pytest.warns(UserWarning, match="no hook_name"):
        sae = hf_convert.from_sae_lens(folder)
    assert sae.config.hook_layer is None
    assert "The layer this SAE reads is not recorded (hook_layer is None" in generate_model_card(sae).text


def test_an_unmapped_model_name_warns_and_stays_out_of_the_card_yaml(tmp_path):
    with pytest.warns(UserWarning, match="'tiny-stories-1M' is a TransformerLens name hf-sae cannot map"):
        sae = hf_convert.from_sae_lens(_with_metadata(tmp_path, model_name="tiny-stories-1M"))
    assert sae.config.base_model == "tiny-stories-1M" and generate_model_card(sae).data.base_model is None


def test_a_corrupt_payload_in_a_peer_file_is_refused_naming_it(tmp_path):
    folder = _copy(PEER / "sparsify" / "layers.3", tmp_path / "layers.3")
    weights = folder / "sae.safetensors"
    data = bytearray(weights.read_bytes())
    data[-16:] = b"\xff" * 16  # float32 NaNs in the last tensor's data; the header is intact
    weights.write_bytes(bytes(data))
    with pytest.raises(SAEConversionError, match=r"sae\.safetensors: NaN/inf values in \["):
        hf_convert.from_sparsify(folder)
