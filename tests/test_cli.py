"""The ``hf-sae`` command: --version, examples in every --help, and one error line (exit 2) for every user mistake.

The Hub paths of ``hf-sae push`` (a refused push, an unreachable endpoint) are in tests/test_hub.py, beside the
local Hub they need.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from huggingface_hub import constants

from hf_sae import __version__
from hf_sae.cli import EXAMPLES, SUBCOMMANDS, error_line, main
from hf_sae.testing.tiny_models import tiny_sae

PEER = Path(__file__).parent / "data" / "peer_formats"


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"hf-sae {__version__}"


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_every_subcommand_help_ends_with_runnable_looking_examples(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0 and "examples:" in out
    assert 2 <= len(EXAMPLES[command]) <= 3
    for what, example in EXAMPLES[command]:
        assert f"# {what}" in out and example in out and example.startswith(f"hf-sae {command} ")


def test_top_level_help_shows_one_example_per_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(EXAMPLES[command][0][1] in out for command in SUBCOMMANDS) and "--version" in out


@pytest.fixture
def saved(tmp_path) -> Path:
    tiny_sae(layer=1, site="resid", d_in=16, d_sae=64, k=8).save_pretrained(tmp_path / "sae")
    (tmp_path / "a-file").write_text("not a folder")
    return tmp_path


MISTAKES = {
    "push-no-sae": (["push", "{tmp}/missing", "me/x"], "no hf-sae SAE found"),
    "push-bad-repo-id": (["push", "{tmp}/sae", "not a repo!"], "is not a Hub repo id"),
    "push-offline": (["push", "{tmp}/sae", "me/x"], "offline mode is on (HF_HUB_OFFLINE=1), and a push needs"),
    "card-no-sae": (["card", "{tmp}/missing"], "no hf-sae SAE"),
    "convert-missing-source": (["convert", "sae-lens", "{tmp}/missing", "{tmp}/out"], "no such local folder"),
    "convert-out-is-a-file": (["convert", "sae-lens", f"{PEER}/sae_lens/jumprelu", "{tmp}/a-file"], "is a file"),
    "convert-k-for-sparsify": (["convert", "sparsify", f"{PEER}/sparsify/layers.3", "{tmp}/o", "--k", "3"], "--k"),
    "convert-wrong-format": (["convert", "sparsify", f"{PEER}/sae_lens/jumprelu", "{tmp}/o"], "sae.safetensors"),
    "convert-offline-repo": (["convert", "gemma-scope", "me/not-cached", "{tmp}/o"], "offline mode is on"),
    "flow-no-collection": (["flow", "table", "{tmp}/missing"], "no such folder"),
}


@pytest.mark.parametrize("name", list(MISTAKES))
def test_a_user_mistake_is_one_error_line_and_exit_status_2(name, saved, capsys, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what tests/conftest.py sets for the whole run
    argv, expected = MISTAKES[name]
    capsys.readouterr()
    assert main([arg.replace("{tmp}", str(saved)) for arg in argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("hf-sae: error: ") and captured.err.count("\n") == 1, captured.err
    assert expected in captured.err and "Traceback" not in captured.err + captured.out


def test_a_multi_line_server_answer_is_folded_into_one_line():
    assert error_line(ValueError("push refused:\n  403 Forbidden\n\nno write access")) == (
        "hf-sae: error: push refused: 403 Forbidden no write access"
    )


def test_card_of_a_multi_sae_run_shows_each_saes_metrics(tmp_path, capsys):
    run = tmp_path / "run"
    metrics = {"run": {"tokens": 1000}, "saes": {}}
    for layer in (1, 2):
        name = f"L{layer}_resid_hierarchical_k8_d256"
        tiny_sae(layer, base_model="org/tiny").save_pretrained(run / name)
        budgets = {"8": {"explained_variance": 0.5 + layer / 10, "fvu": 0.5 - layer / 10, "l0": 8.0}}
        metrics["saes"][name] = {"path": str(run / name), "budgets": budgets}
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert main(["card", str(run)]) == 0
    out = capsys.readouterr().out
    assert "| 0.6000 |" in out and "| 0.7000 |" in out  # EV @ k of each SAE, not "–"


def test_import_lets_the_cli_see_an_architecture_of_ones_own(tmp_path, capsys):
    user_file = Path(__file__).resolve().parent / "data" / "external_architecture" / "gain_topk_sae.py"
    spec = importlib.util.spec_from_file_location(user_file.stem, user_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[user_file.stem] = module
    spec.loader.exec_module(module)
    module.GainTopKSAE(module.GainTopKSAEConfig(d_in=16, d_sae=64, k=8)).save_pretrained(tmp_path / "sae")
    assert main(["--import", str(user_file), "card", str(tmp_path / "sae")]) == 0
    assert "Gain-TopK" in capsys.readouterr().out
    assert main(["--import", str(tmp_path / "missing.py"), "card", str(tmp_path / "sae")]) == 2
    assert capsys.readouterr().err.strip() == f"hf-sae: error: --import {tmp_path / 'missing.py'}: no such file."


# --------------------------------------------------------------------------------------------------- harvest
@pytest.fixture
def harvest_module(monkeypatch):
    """``hf-sae harvest`` runs ``python -m training.harvest``, which forwards to ``training.activation_cache.main``."""
    import hf_sae.cli as cli

    return cli


def test_harvest_forwards_every_argument_to_the_training_harvest(harvest_module, saved_lm, tmp_path, capfd):
    model_dir, docs = saved_lm
    out = tmp_path / "acts"
    args = ["--model", str(model_dir), "--dataset", str(docs), "--eval-holdout-documents", "5", "--layer", "1", "2"]
    args += ["--context-length", "16", "--tokens", "300", "--shard-tokens", "150", "--out", str(out)]
    assert main(["harvest", *args]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [(s["layer"], s["site"]) for s in manifest["sites"]] == [(1, "resid"), (2, "resid")]
    assert manifest["tokens"] == 20 * 15 and len(manifest["shards"]) == 2
    assert "train from it: python -m training.train --activations" in capfd.readouterr().out

    assert main(["harvest", *args]) == 2  # the folder holds a cache: the harvest's one error line, its status
    err = capfd.readouterr().err
    assert err.startswith("hf-sae: error: --out") and err.count("\n") == 1 and "--overwrite" in err, err


def test_harvest_help_is_the_harvests_own_with_examples(harvest_module, capfd):
    with pytest.raises(SystemExit) as info:
        main(["harvest", "--help"])
    out = capfd.readouterr().out
    assert info.value.code == 0 and "--shard-tokens" in out and "--lm-batch-size" in out and "examples:" in out
