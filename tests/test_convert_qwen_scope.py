"""Qwen-Scope -> hf-sae (hf_sae.convert.from_qwen_scope): files in the published layout, outputs of the published
formula re-typed in numpy, the SAE on a tiny random Qwen3, and pickle refused."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_sae import HierarchicalSAE, resolve_site
from hf_sae import convert as hf_convert
from hf_sae.cli import main as cli_main
from hf_sae.convert import SAEConversionError
from hf_sae.sites import capture_activations
from hf_sae.testing.tiny_models import tiny_qwen3

D_IN, D_SAE = 64, 1024  # the tiny Qwen3's hidden size; width 1K


def _write_qwen_scope(root: Path, k: int, layer: int = 2, seed: int = 0) -> tuple[Path, dict[str, np.ndarray]]:
    """A repo folder named like the release (``SAE-Res-{model}-W{N}K-L0_{K}``) with ``layer{L}.sae.pt``: a plain dict
    of W_enc (d_sae, d_in), W_dec (d_in, d_sae), b_enc, b_dec, as the model card documents."""
    rng = np.random.default_rng(seed)
    params = {
        "W_enc": rng.normal(0, 0.3, (D_SAE, D_IN)).astype(np.float32),
        "W_dec": rng.normal(0, 0.1, (D_IN, D_SAE)).astype(np.float32),
        "b_enc": rng.normal(0, 0.2, D_SAE).astype(np.float32),
        "b_dec": rng.normal(0, 0.5, D_IN).astype(np.float32),
    }
    repo = root / f"SAE-Res-Qwen3-1.7B-Base-W1K-L0_{k}"
    repo.mkdir(parents=True)
    torch.save({name: torch.from_numpy(a) for name, a in params.items()}, repo / f"layer{layer}.sae.pt")
    return repo, params


def _qwen_scope_reference(params: dict[str, np.ndarray], x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The published encoder/decoder: z = TopK(ReLU(W_enc x + b_enc)), x_hat = W_dec z + b_dec (float64)."""
    pre = x.astype(np.float64) @ params["W_enc"].T.astype(np.float64) + params["b_enc"]
    acts = np.zeros_like(pre)
    top = np.argsort(-pre, axis=-1)[:, :k]
    rows = np.arange(pre.shape[0])[:, None]
    acts[rows, top] = np.maximum(pre[rows, top], 0)
    return acts, acts @ params["W_dec"].T.astype(np.float64) + params["b_dec"]


@pytest.mark.parametrize("k", [50, 100])
def test_qwen_scope_conversion_matches_the_published_topk_formula(tmp_path, k):
    repo, params = _write_qwen_scope(tmp_path, k)
    sae = hf_convert.from_qwen_scope(repo, "layer2")
    assert isinstance(sae, HierarchicalSAE) and sae.config.hierarchical is False
    c = sae.config
    assert (c.d_in, c.d_sae, c.k, c.hook_layer, c.hook_site) == (D_IN, D_SAE, k, 2, "resid")
    assert (c.base_model, c.source_format) == ("Qwen/Qwen3-1.7B-Base", "qwen-scope")
    torch.testing.assert_close(sae.W_enc, torch.from_numpy(params["W_enc"]).T)  # W_enc (d_in, d_sae) view
    x = np.random.default_rng(1).normal(0, 1.0, (32, D_IN)).astype(np.float32)
    acts, recon = _qwen_scope_reference(params, x, k)
    with torch.no_grad():
        latents = sae.encode(torch.from_numpy(x))
        np.testing.assert_allclose(latents.to_dense(D_SAE).double().numpy(), acts, atol=2e-5, rtol=0)
        np.testing.assert_allclose(sae.decode(latents).double().numpy(), recon, atol=2e-5, rtol=0)
    # the same SAE from the file itself and from an integer layer
    same = hf_convert.from_qwen_scope(repo / "layer2.sae.pt")
    assert torch.equal(same.W_dec, sae.W_dec) and hf_convert.from_qwen_scope(repo, 2).config.hook_layer == 2


def test_a_converted_qwen_scope_sae_reads_the_residual_stream_of_a_qwen3_decoder_layer(tmp_path):
    model = tiny_qwen3(seed=0)
    for site in ("resid", "mlp", "attn", "attn_z"):  # every hf-sae site resolves on Qwen3's decoder layers
        assert resolve_site(model, 1, site).width == (64 if site != "attn_z" else 4 * 16)
    repo, params = _write_qwen_scope(tmp_path, 50, layer=2)
    sae = hf_convert.from_qwen_scope(repo, "layer2", base_model="")
    inputs = {"input_ids": torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))}
    resid = capture_activations(model, [resolve_site(model, 2, "resid")], **inputs)[(2, "resid")]
    with torch.no_grad(), sae.attach(model) as hook:
        model(**inputs)
    acts, _ = _qwen_scope_reference(params, resid.reshape(-1, D_IN).numpy(), 50)
    np.testing.assert_allclose(hook.latents.to_dense(D_SAE).reshape(-1, D_SAE).double().numpy(), acts, atol=2e-5)


def test_qwen_scope_files_that_need_pickle_are_refused_never_unpickled(tmp_path):
    repo = tmp_path / "SAE-Res-Qwen3-1.7B-Base-W1K-L0_50"
    repo.mkdir()
    torch.save({"W_enc": torch.zeros(4, 2), "cfg": argparse.Namespace(lr=1)}, repo / "layer0.sae.pt")
    with pytest.raises(SAEConversionError, match="needs pickle"):
        hf_convert.from_qwen_scope(repo, "layer0")


def test_qwen_scope_bad_inputs_raise_one_clear_error(tmp_path):
    repo, _ = _write_qwen_scope(tmp_path, 50)
    with pytest.raises(SAEConversionError, match="name the layer"):
        hf_convert.from_qwen_scope(repo)
    with pytest.raises(SAEConversionError, match="missing"):
        hf_convert.from_qwen_scope(repo, "layer7")
    with pytest.raises(SAEConversionError, match="not a Qwen-Scope layer"):
        hf_convert.from_qwen_scope(repo, "blocks.2")
    plain = tmp_path / "plain"
    plain.mkdir()
    torch.save(
        {"W_enc": torch.zeros(8, 4), "W_dec": torch.zeros(4, 8), "b_enc": torch.zeros(8), "b_dec": torch.zeros(4)},
        plain / "layer0.sae.pt",
    )
    with pytest.raises(SAEConversionError, match="pass k="):
        hf_convert.from_qwen_scope(plain, "layer0")  # no L0_{K} in the name
    assert hf_convert.from_qwen_scope(plain, "layer0", k=3).config.k == 3
    torch.save(
        {"W_enc": torch.zeros(8, 4), "W_dec": torch.zeros(8, 4), "b_enc": torch.zeros(8), "b_dec": torch.zeros(4)},
        plain / "layer1.sae.pt",
    )
    with pytest.raises(SAEConversionError, match="W_dec has shape"):
        hf_convert.from_qwen_scope(plain, "layer1", k=3)


def test_hf_sae_convert_qwen_scope_writes_a_loadable_folder(tmp_path, capsys):
    repo, params = _write_qwen_scope(tmp_path, 100, layer=3)
    out = tmp_path / "out"
    assert cli_main(["convert", "qwen-scope", str(repo), str(out), "--sae-id", "layer3"]) == 0
    assert "HierarchicalSAE" in capsys.readouterr().out
    loaded = HierarchicalSAE.from_pretrained(out)
    assert (loaded.config.k, loaded.config.hook_layer) == (100, 3)
    assert "license: other" in (out / "README.md").read_text()  # Qwen-Scope's own license, not the base model's
    assert cli_main(["convert", "qwen-scope", str(repo), str(out), "--sae-id", "layer9"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("hf-sae: error: ")
