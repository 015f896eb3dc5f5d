"""hf-sae -> SAELens (hf_sae.convert.to_sae_lens, hf-sae export sae-lens): the folder SAELens reads gives hf-sae's
encode/decode — checked with SAELens' formulas re-typed in numpy and our own reader (fast), and with the real sae_lens
package in its own venv (slow)."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_sae
from hf_sae import HierarchicalSAE, JumpReLUSAE, KronSAE, KronSAEConfig
from hf_sae import convert as hf_convert
from hf_sae.cli import main as cli_main
from hf_sae.configuration_jumprelu_sae import JumpReLUSAEConfig
from hf_sae.export_sae_lens import SAEExportError
from hf_sae.testing.tiny_models import tiny_sae

D_IN, D_SAE = 16, 64


def _topk(hierarchical: bool = False) -> HierarchicalSAE:
    sae = tiny_sae(layer=3, d_in=D_IN, d_sae=D_SAE, k=8, seed=1, b_dec_std=0.5, hierarchical=hierarchical)
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    sae.config.base_model, sae.config.context_length = "google/gemma-3-270m", 128
    return sae


def _jumprelu(apply_b_dec_to_input: bool) -> JumpReLUSAE:
    config = JumpReLUSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=D_SAE, hook_layer=2, hook_site="mlp", apply_b_dec_to_input=apply_b_dec_to_input
    )
    sae = JumpReLUSAE(config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(sae, name).copy_(torch.randn(getattr(sae, name).shape, generator=g) * 0.4)
        sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.3)
    return sae.eval()


def _batchtopk(family: str = "BatchTopK"):
    model, config = getattr(hf_sae, f"{family}SAE"), getattr(hf_sae, f"{family}SAEConfig")
    sae = model(config(d_in=D_IN, d_sae=D_SAE, k=8, hook_layer=1))
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(4))
        sae.threshold.fill_(0.15)
        sae.threshold_batches.fill_(10)
    return sae.eval()


def _saes() -> dict[str, tuple]:
    """name -> (SAE, k of the export, the budget hf-sae encodes at)."""
    saes = {
        "topk": (_topk(), None, None),
        "hierarchical_at_k5": (_topk(hierarchical=True), 5, 5),
        "jumprelu": (_jumprelu(True), None, None),
        "jumprelu_no_b_dec_input": (_jumprelu(False), None, None),
    }
    for family in ("BatchTopK", "Matryoshka"):  # issue 15's classes, where they exist
        if hasattr(hf_sae, f"{family}SAE"):
            saes[family.lower()] = (_batchtopk(family), None, None)
    return saes


def _sae_lens_in_numpy(folder: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SAELens 6.x inference of a topk / jumprelu folder, re-typed in numpy (float64)."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = {name: t.double().numpy() for name, t in load_file(str(folder / "sae_weights.safetensors")).items()}
    sae_in = x - w["b_dec"] if cfg["apply_b_dec_to_input"] else x
    pre = sae_in @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "topk":
        acts = np.zeros_like(pre)
        top = np.argsort(-pre, axis=-1)[:, : cfg["k"]]
        rows = np.arange(len(pre))[:, None]
        acts[rows, top] = np.maximum(pre[rows, top], 0)
    else:
        acts = np.maximum(pre, 0) * (pre > w["threshold"])
    return acts, acts @ w["W_dec"] + w["b_dec"]


def _ours(sae, x: torch.Tensor, k: int | None) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        latents = sae.encode(x, k=k) if k is not None else sae.encode(x)
        return latents.to_dense(D_SAE).double().numpy(), sae.decode(latents).double().numpy()


def test_every_exportable_architecture_gives_sae_lens_the_same_encode_and_decode(tmp_path):
    x = torch.randn(48, D_IN, generator=torch.Generator().manual_seed(5))
    for name, (sae, k, budget) in _saes().items():
        folder = hf_convert.to_sae_lens(sae, tmp_path / name, k=k)
        acts, recon = _sae_lens_in_numpy(folder, x.double().numpy())
        ours_acts, ours_recon = _ours(sae, x, budget)
        assert (acts > 0).any(), name
        np.testing.assert_allclose(ours_acts, acts, atol=1e-5, rtol=0, err_msg=name)
        np.testing.assert_allclose(ours_recon, recon, atol=1e-5, rtol=0, err_msg=name)
        # and hf-sae's SAELens reader (checked against SAELens' own files in test_convert) reads it back exactly
        back = hf_convert.from_sae_lens(folder)
        back_acts, back_recon = _ours(back, x, None)
        np.testing.assert_allclose(back_acts, ours_acts, atol=1e-5, rtol=0, err_msg=name)
        np.testing.assert_allclose(back_recon, ours_recon, atol=1e-5, rtol=0, err_msg=name)
        assert (back.config.hook_layer, back.config.hook_site) == (sae.config.hook_layer, sae.config.hook_site)


def test_the_sae_lens_config_records_the_site_model_and_budget(tmp_path):
    cfg = json.loads((hf_convert.to_sae_lens(_topk(hierarchical=True), tmp_path, k=5) / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["k"], cfg["d_in"], cfg["d_sae"], cfg["apply_b_dec_to_input"]) == (
        "topk",
        5,
        D_IN,
        D_SAE,
        True,
    )
    meta = cfg["metadata"]
    assert (meta["hook_name"], meta["hf_hook_name"], meta["model_name"], meta["context_size"]) == (
        "blocks.3.hook_resid_post",
        "model.layers.3",
        "google/gemma-3-270m",
        128,
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]  # no temporaries


def test_what_sae_lens_cannot_compute_is_refused_with_the_reason(tmp_path):
    kron = KronSAE(KronSAEConfig(d_in=D_IN, d_sae=D_SAE, k=8, num_heads=8, base_dim=2, ext_dim=4))
    with pytest.raises(SAEExportError, match="not linear"):
        hf_convert.to_sae_lens(kron, tmp_path / "kron")
    with pytest.raises(SAEExportError, match="1..8"):
        hf_convert.to_sae_lens(_topk(), tmp_path / "k9", k=9)
    capped = _jumprelu(True)
    capped.config.k = 8
    with pytest.warns(UserWarning, match="caps encode"):
        hf_convert.to_sae_lens(capped, tmp_path / "capped")
    assert not (tmp_path / "kron").exists() and not (tmp_path / "k9").exists()


def test_hf_sae_export_sae_lens_writes_one_folder_per_sae_of_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    _topk().save_pretrained(run / "layer3-resid")
    _jumprelu(True).save_pretrained(run / "layer2-mlp")
    assert cli_main(["export", "sae-lens", str(run), str(tmp_path / "out")]) == 0
    assert {p.parent.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("cfg.json")} == {
        "layer_3/resid",
        "layer_2/mlp",
    }
    assert cli_main(["export", "sae-lens", str(run / "layer3-resid"), str(tmp_path / "one"), "--k", "4"]) == 0
    assert json.loads((tmp_path / "one" / "cfg.json").read_text())["k"] == 4
    capsys.readouterr()
    assert cli_main(["export", "sae-lens", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("hf-sae: error: ")


@pytest.mark.slow
def test_real_sae_lens_loads_the_exports_and_gives_identical_encode_and_decode(tmp_path, sae_lens_python):
    x = torch.randn(48, D_IN, generator=torch.Generator().manual_seed(6))
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    saes = _saes()
    for name, (sae, k, _) in saes.items():
        hf_convert.to_sae_lens(sae, tmp_path / name, k=k)
    script = textwrap.dedent(
        """
        import sys, torch
        from pathlib import Path
        from safetensors.torch import load_file, save_file
        from sae_lens import SAE
        root = Path(sys.argv[1]); x = load_file(str(root / "x.safetensors"))["x"]
        for name in sys.argv[2:]:
            sae = SAE.load_from_disk(str(root / name), device="cpu")
            with torch.no_grad():
                acts = sae.encode(x)
                save_file({"acts": acts.contiguous(), "recon": sae.decode(acts).contiguous()},
                          str(root / name / "sae_lens_out.safetensors"))
        """
    )
    subprocess.run([sae_lens_python, "-c", script, str(tmp_path), *saes], check=True, capture_output=True, timeout=600)
    for name, (sae, _, budget) in saes.items():
        out = load_file(str(tmp_path / name / "sae_lens_out.safetensors"))
        acts, recon = _ours(sae, x, budget)
        np.testing.assert_allclose(out["acts"].double().numpy(), acts, atol=1e-5, rtol=0, err_msg=name)
        np.testing.assert_allclose(out["recon"].double().numpy(), recon, atol=1e-5, rtol=0, err_msg=name)
