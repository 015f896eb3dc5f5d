"""Gemma Scope 2 -> hf-sae (hf_sae.convert.from_gemma_scope_2): files built in the published layout (config.json +
params.safetensors with lowercase w_enc / w_dec), outputs of the published JumpReLU formula re-typed in numpy, the
hook point mapped to (layer, site), transcoders refused, and (slow) a converted SAE on the real Gemma 3 270M."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from hf_sae import JumpReLUSAE, resolve_site, steer
from hf_sae import convert as hf_convert
from hf_sae.cli import main as cli_main
from hf_sae.convert import SAEConversionError
from hf_sae.sites import capture_activations
from hf_sae.testing.hub_server import LocalHub, hub_client
from hf_sae.testing.tiny_models import tiny_gemma3

HOOKS = {
    "resid_post": ("model.layers.{layer}.output", "resid"),
    "mlp_out": ("model.layers.{layer}.post_feedforward_layernorm.output", "mlp"),
    "attn_out": ("model.layers.{layer}.self_attn.o_proj.input", "attn_z"),
}


def write_gemma_scope_2(
    repo: Path, kind: str, layer: int, d_in: int = 64, d_sae: int = 512, seed: int = 0, config: bool = True, **cfg
) -> tuple[str, dict[str, np.ndarray]]:
    """``{kind}/layer_{L}_width_{W}_l0_small/`` in a repo folder: params.safetensors (w_enc (d_in, d_sae), w_dec
    (d_sae, d_in), b_enc, b_dec, threshold; float32) and config.json with the published keys; (sae_id, params)."""
    rng = np.random.default_rng(seed)
    params = {
        "w_enc": rng.normal(0, 0.3, (d_in, d_sae)).astype(np.float32),
        "w_dec": rng.normal(0, 0.1, (d_sae, d_in)).astype(np.float32),
        "b_enc": rng.normal(0, 0.2, d_sae).astype(np.float32),
        "b_dec": rng.normal(0, 0.5, d_in).astype(np.float32),
        "threshold": np.abs(rng.normal(0.5, 0.3, d_sae)).astype(np.float32),
    }
    sae_id = f"{kind}/layer_{layer}_width_{d_sae}_l0_small"
    folder = repo / sae_id
    folder.mkdir(parents=True)
    save_file(params, str(folder / "params.safetensors"))
    if config:
        hook = HOOKS[kind.removesuffix("_all")][0].format(layer=layer) if kind.removesuffix("_all") in HOOKS else ""
        published = {
            "hf_hook_point_in": hook,
            "hf_hook_point_out": hook,
            "width": d_sae,
            "model_name": "gemma-v3-270m-pt",
            "architecture": "jump_relu",
            "l0": 20,
            "affine_connection": False,
            "type": "sae",
            **cfg,
        }
        (folder / "config.json").write_text(json.dumps(published))
    return sae_id, params


def gemma_scope_2_reference(params: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The published JumpReLU SAE: pre = x W_enc + b_enc, acts = ReLU(pre) 1[pre > threshold], x_hat = acts W_dec +
    b_dec (float64)."""
    pre = x.astype(np.float64) @ params["w_enc"].astype(np.float64) + params["b_enc"]
    acts = np.where(pre > params["threshold"], np.maximum(pre, 0), 0.0)
    return acts, acts @ params["w_dec"].astype(np.float64) + params["b_dec"]


@pytest.mark.parametrize("kind", ["resid_post", "mlp_out", "attn_out", "resid_post_all"])
def test_gemma_scope_2_conversion_matches_the_published_jumprelu_formula(tmp_path, kind):
    repo = tmp_path / "gemma-scope-2-270m-pt"
    sae_id, params = write_gemma_scope_2(repo, kind, layer=3)
    sae = hf_convert.from_gemma_scope_2(repo, sae_id)
    c = sae.config
    assert isinstance(sae, JumpReLUSAE) and (c.d_in, c.d_sae, c.k) == (64, 512, 512)
    assert (c.hook_layer, c.hook_site) == (3, HOOKS[kind.removesuffix("_all")][1])
    assert (c.base_model, c.source_format, c.apply_b_dec_to_input) == ("google/gemma-3-270m", "gemma-scope-2", False)
    x = np.random.default_rng(1).normal(0, 1.0, (40, 64)).astype(np.float32)
    acts, recon = gemma_scope_2_reference(params, x)
    assert 0 < (acts > 0).mean() < 0.9  # the thresholds bite: some latents fire, most do not
    with torch.no_grad():
        latents = sae.encode(torch.from_numpy(x))
        np.testing.assert_allclose(latents.to_dense(512).double().numpy(), acts, atol=2e-5, rtol=0)
        np.testing.assert_allclose(sae.decode(latents).double().numpy(), recon, atol=2e-5, rtol=0)
        np.testing.assert_allclose(sae(torch.from_numpy(x)).reconstruction.double().numpy(), recon, atol=2e-5)
    # the SAE's own folder works as the source too
    assert torch.equal(hf_convert.from_gemma_scope_2(repo / sae_id).W_dec, sae.W_dec)


def test_a_folder_without_config_json_gets_the_site_its_kind_implies(tmp_path):
    repo = tmp_path / "gemma-scope-2-1b-it"
    sae_id, _ = write_gemma_scope_2(repo, "mlp_out", layer=7, config=False)
    c = hf_convert.from_gemma_scope_2(repo, sae_id).config
    assert (c.hook_layer, c.hook_site, c.base_model) == (7, "mlp", "google/gemma-3-1b-it")


def test_converted_gemma_scope_2_saes_read_their_sites_on_a_gemma_3(tmp_path):
    model = tiny_gemma3(seed=0)
    repo = tmp_path / "gemma-scope-2-270m-pt"
    inputs = {"input_ids": torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(0))}
    for kind in HOOKS:
        sae_id, params = write_gemma_scope_2(repo, kind, layer=2)
        sae = hf_convert.from_gemma_scope_2(repo, sae_id, base_model="")
        site = resolve_site(model, 2, sae.config.hook_site)
        activation = capture_activations(model, [site], **inputs)[site.key]
        with torch.no_grad(), sae.attach(model) as hook:
            model(**inputs)
        acts, _ = gemma_scope_2_reference(params, activation.reshape(-1, site.width).numpy())
        dense = hook.latents.to_dense(512).reshape(-1, 512).double().numpy()
        np.testing.assert_allclose(dense, acts, atol=2e-5, rtol=0)


@pytest.mark.parametrize(
    "kind,cfg",
    [
        ("transcoder", {"hf_hook_point_in": "model.layers.3.pre_feedforward_layernorm.output"}),
        ("transcoder_all", {"affine_connection": True}),
        ("clt", {}),
        ("resid_post", {"hf_hook_point_out": "model.layers.4.output"}),  # reads one site, writes another
    ],
)
def test_transcoders_are_refused_clearly(tmp_path, kind, cfg):
    repo = tmp_path / "gemma-scope-2-270m-pt"
    sae_id, _ = write_gemma_scope_2(repo, kind, layer=3, **cfg)
    with pytest.raises(SAEConversionError, match="transcoder"):
        hf_convert.from_gemma_scope_2(repo, sae_id)


def test_gemma_scope_2_bad_inputs_raise_one_clear_error(tmp_path):
    repo = tmp_path / "gemma-scope-2-270m-pt"
    hook = "model.layers.3.mlp.down_proj.input"
    sae_id, _ = write_gemma_scope_2(repo, "resid_post", layer=3, hf_hook_point_in=hook, hf_hook_point_out=hook)
    with pytest.raises(SAEConversionError, match="not a site hf-sae hooks"):
        hf_convert.from_gemma_scope_2(repo, sae_id)
    assert hf_convert.from_gemma_scope_2(repo, sae_id, hook_layer=3, hook_site="resid").config.hook_layer == 3
    with pytest.raises(SAEConversionError, match="architecture"):
        hf_convert.from_gemma_scope_2(repo, write_gemma_scope_2(repo, "mlp_out", 1, architecture="topk")[0])
    with pytest.raises(SAEConversionError, match="no such folder"):
        hf_convert.from_gemma_scope_2(repo, "resid_post/layer_9_width_16k_l0_small")
    odd = tmp_path / "odd" / "layer_2"
    odd.mkdir(parents=True)
    with pytest.raises(SAEConversionError, match="no config.json"):
        hf_convert.from_gemma_scope_2(odd)


def test_hf_sae_convert_gemma_scope_2_writes_a_loadable_folder_with_the_release_license(tmp_path, capsys):
    repo = tmp_path / "gemma-scope-2-270m-pt"
    sae_id, _ = write_gemma_scope_2(repo, "attn_out", layer=5)
    out = tmp_path / "out"
    assert cli_main(["convert", "gemma-scope-2", str(repo), str(out), "--sae-id", sae_id]) == 0
    assert "JumpReLUSAE" in capsys.readouterr().out
    loaded = JumpReLUSAE.from_pretrained(out)
    assert (loaded.config.hook_layer, loaded.config.hook_site) == (5, "attn_z")
    assert "license: cc-by-4.0" in (out / "README.md").read_text()
    assert cli_main(["convert", "gemma-scope-2", str(repo), str(out), "--sae-id", "transcoder/layer_1_x"]) == 2
    assert "transcoder" in capsys.readouterr().err.splitlines()[-1]


def test_gemma_scope_2_from_a_hub_repo_downloads_only_that_sae(tmp_path, olah_cli):
    """Through the local Hub (olah serving a git repo in the release's layout): repo id + SAE id."""
    staged = tmp_path / "staged"
    sae_id, params = write_gemma_scope_2(staged, "resid_post", layer=4)
    other, _ = write_gemma_scope_2(staged, "mlp_out", layer=4, seed=1)
    files = {p.relative_to(staged).as_posix(): p.read_bytes() for p in staged.rglob("*") if p.is_file()}
    with LocalHub(tmp_path / "hub", olah_cli=olah_cli) as hub:
        hub.push.store.create("google/gemma-scope-2-270m-pt")
        hub.push.store.commit("google/gemma-scope-2-270m-pt", "main", files, [], "the release's layout")
        with hub_client(hub.pull_url, tmp_path / "cache"):
            sae = hf_convert.from_gemma_scope_2("google/gemma-scope-2-270m-pt", sae_id)
    assert (sae.config.hook_layer, sae.config.hook_site, sae.config.base_model) == (4, "resid", "google/gemma-3-270m")
    assert torch.equal(sae.W_enc, torch.from_numpy(params["w_enc"]))
    downloaded = {p.name for p in (tmp_path / "cache").rglob("*") if p.is_file() and "snapshots" in p.parts}
    assert downloaded == {"config.json", "params.safetensors"} and other not in str(
        list((tmp_path / "cache").rglob("*"))
    )


@pytest.mark.slow
def test_a_converted_gemma_scope_2_sae_attaches_to_the_real_gemma_3_270m_and_steers(tmp_path):
    from training.small_gemma import load_small_gemma

    model, tokenizer = load_small_gemma()
    repo = tmp_path / "gemma-scope-2-270m-pt"
    sae_id, params = write_gemma_scope_2(repo, "resid_post", layer=6, d_in=model.config.hidden_size, d_sae=1024)
    sae = hf_convert.from_gemma_scope_2(repo, sae_id)
    assert sae.config.base_model == "google/gemma-3-270m"
    inputs = tokenizer(["The capital of France is"], return_tensors="pt")
    site = resolve_site(model, 6, "resid")
    activation = capture_activations(model, [site], **inputs)[site.key]
    with torch.no_grad(), sae.attach(model) as hook:
        model(**inputs)
    acts, _ = gemma_scope_2_reference(params, activation.reshape(-1, site.width).numpy())
    dense = hook.latents.to_dense(1024).reshape(-1, 1024).double().numpy()
    np.testing.assert_allclose(dense, acts, atol=1e-4 * max(1.0, np.abs(acts).max()), rtol=0)
    greedy = dict(max_new_tokens=8, do_sample=False)
    clean = model.generate(**inputs, **greedy)
    feature = int(np.argmax(np.linalg.norm(params["w_dec"], axis=1)))
    steered = steer(model, [(sae, {feature: 200.0})]).generate(**inputs, **greedy)
    assert not torch.equal(steered, clean)
    assert torch.equal(model.generate(**inputs, **greedy), clean)  # hooks gone afterwards
