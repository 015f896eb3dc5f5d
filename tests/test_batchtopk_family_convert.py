"""SAELens BatchTopK, Matryoshka BatchTopK and JumpReLU training folders convert with SAELens' own outputs.

The folders and outputs in tests/data/peer_formats/sae_lens_training/ were written by the real sae-lens
(make_sae_lens_batchtopk_family.py, run in sae-lens' venv); the slow test writes them again with the sae-lens of the
cached venv (the ``sae_lens_python`` fixture) and checks the same.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

from hf_sae import BatchTopKSAE, JumpReLUSAE, MatryoshkaSAE
from hf_sae import convert as hf_convert
from hf_sae.convert import SAEConversionError

PEER = Path(__file__).parent / "data" / "peer_formats"
ROOT = PEER / "sae_lens_training"
BATCHTOPK_VARIANTS = [
    "batchtopk",
    "batchtopk_inference",
    "batchtopk_no_b_dec_input",
    "batchtopk_no_b_dec_input_inference",
    "matryoshka_batchtopk",
    "matryoshka_batchtopk_inference",
]


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    error = float((actual.double() - expected.double()).abs().max())
    scale = max(1.0, float(expected.double().abs().max()))
    assert error <= tol * scale, f"max |diff| {error:.3g} > {tol} * {scale:.3g}"


def _check_batchtopk_folder(folder: Path) -> None:
    sae = hf_convert.from_sae_lens(folder)
    ref = load_file(str(folder / "reference.safetensors"))
    d_sae = sae.config.d_sae
    with torch.no_grad():
        latents = sae.encode(ref["x"])  # inference: the threshold, as SAELens' JumpReLU form
        _close(latents.to_dense(d_sae), ref["encoded"])
        _close(sae.decode(latents), ref["decoded"])
        _close(sae(ref["x"]).reconstruction, ref["decoded"])
        training = copy.deepcopy(sae).train()  # training: the batch's N·k selection, as SAELens' BatchTopK
        batch = training(ref["x"]).latents
        _close(batch.to_dense(d_sae), ref["encoded_batch"])
        if "prefix_decoded" in ref:  # Matryoshka: every nested prefix decodes as SAELens' levels
            for group, expected in enumerate(ref["prefix_decoded"]):
                _close(sae.decode_prefix(batch, group), expected)


@pytest.mark.parametrize("variant", BATCHTOPK_VARIANTS)
def test_sae_lens_batchtopk_family_converts_with_sae_lens_outputs(variant):
    _check_batchtopk_folder(ROOT / variant)


def test_the_converted_classes_and_configs_carry_the_recipe():
    batchtopk = hf_convert.from_sae_lens(ROOT / "batchtopk")
    assert type(batchtopk) is BatchTopKSAE
    assert (batchtopk.config.k, batchtopk.config.threshold_lr) == (4, 0.01)
    assert float(batchtopk.threshold) == pytest.approx(0.35) and int(batchtopk.threshold_batches) == 100
    torch.testing.assert_close(batchtopk.W_dec.norm(dim=-1), torch.ones(64))  # decoder norms folded
    assert (batchtopk.config.hook_layer, batchtopk.config.base_model) == (3, "google/gemma-2-2b")
    matryoshka = hf_convert.from_sae_lens(ROOT / "matryoshka_batchtopk_inference")
    assert type(matryoshka) is MatryoshkaSAE and matryoshka.config.prefix_widths == [8, 24, 64]
    jumprelu = hf_convert.from_sae_lens(ROOT / "jumprelu_training")
    assert type(jumprelu) is JumpReLUSAE
    cfg = jumprelu.config
    assert (cfg.bandwidth, cfg.l0_coefficient, cfg.l0_warmup_steps, cfg.threshold_parametrization) == (
        0.2,
        1.0,
        0,
        "direct",
    )


def test_jumprelu_straight_through_gradients_match_sae_lens_training_step():
    folder = ROOT / "jumprelu_training"
    sae = hf_convert.from_sae_lens(folder).train()
    ref = load_file(str(folder / "reference.safetensors"))
    out = sae(ref["x"])
    (l0_grad,) = torch.autograd.grad(out.losses["l0"], [sae.threshold], retain_graph=True)
    _close(l0_grad, ref["threshold_grad_l0"])  # SAELens: l0_coefficient · mean Σ_i Step(pre_i, θ_i)
    (mse_grad,) = torch.autograd.grad(out.losses["reconstruction"] * sae.config.d_in, [sae.threshold])
    _close(mse_grad, ref["threshold_grad_mse"])  # SAELens' MSE sums over d_in, hf-sae's averages
    assert (ref["threshold_grad_l0"] != 0).any() and (ref["threshold_grad_mse"] != 0).any()


def test_a_converted_batchtopk_round_trips_through_save_pretrained(tmp_path):
    sae = hf_convert.from_sae_lens(ROOT / "matryoshka_batchtopk")
    sae.save_pretrained(tmp_path / "m")
    loaded = AutoModel.from_pretrained(tmp_path / "m")
    assert type(loaded) is MatryoshkaSAE and loaded.config.group_sizes == [8, 16, 40]
    for name, tensor in sae.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name


def test_a_fractional_batchtopk_k_is_refused(tmp_path):
    import json
    import shutil

    folder = tmp_path / "b"
    shutil.copytree(ROOT / "batchtopk", folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "k": 4.5}))
    with pytest.raises(SAEConversionError, match="k=4.5"):
        hf_convert.from_sae_lens(folder)


@pytest.mark.slow
def test_live_sae_lens_builds_the_folders_then_they_convert(tmp_path, sae_lens_python):
    script = PEER / "make_sae_lens_batchtopk_family.py"
    subprocess.run([sae_lens_python, str(script), str(tmp_path)], check=True, capture_output=True, timeout=600)
    for variant in BATCHTOPK_VARIANTS:
        _check_batchtopk_folder(tmp_path / "sae_lens_training" / variant)
    folder = tmp_path / "sae_lens_training" / "jumprelu_training"
    sae = hf_convert.from_sae_lens(folder)
    ref = load_file(str(folder / "reference.safetensors"))
    with torch.no_grad():
        _close(sae.decode(sae.encode(ref["x"])), ref["decoded"])
