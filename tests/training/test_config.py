"""The training config (training/config.py): the CLI generated from the dataclasses and the registered config
classes, YAML, SAE entries as their architecture's config, and the messages of bad options."""

from __future__ import annotations

from pathlib import Path

import pytest

import hf_sae  # noqa: F401  (registers the SAE classes with AutoModel)
from training.cli import build_parser, load_yaml, parse_args
from training.config import TrainConfigError, config_differences, make_config
from training.sae_options import parse_count
from training.train import main as train_main

REPO = Path(__file__).resolve().parents[2]
BOS, EOS, PAD = 2, 1, 0


# ------------------------------------------------------------------------------------------------------ config
def test_help_documents_every_field_with_its_default(capsys):
    import dataclasses

    from training.config import RunOptions, SAEPlacement
    from training.sae_options import sae_fields

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in (*dataclasses.fields(RunOptions), *dataclasses.fields(SAEPlacement)):
        assert "--" + f.name.replace("_", "-") in text, f.name
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert f"(default: {default!r})" in text, f.name
    for name, (_, default, _) in sae_fields().items():  # generated from the architectures' config classes
        assert f"--{name.replace('_', '-')}" in text and f"(default: {default!r})" in text, name
    assert "--base-dim" in text and "[kron_sae]" in text and "--sae KEY=VALUE" in text


def test_yaml_then_flags_fill_the_config_and_several_saes_share_one_harvest(tmp_path):
    path = tmp_path / "runs.yaml"
    path.write_text(
        "model: google/gemma-2-2b\ntokens: 1e9\nd-sae: 65536\nk: 64\n"
        "saes:\n  - {layer: 6}\n  - {layer: 12, arch: kron, k: 32, base_dim: 4, ext_dim: 8}\n"
    )
    cfg, explicit = parse_args(["--config", str(path), "--k", "128", "--no-auxk", "--trackers", "tensorboard"])
    assert cfg.model == "google/gemma-2-2b" and cfg.tokens == 10**9 and explicit["k"] == 128
    assert cfg.trackers == ["tensorboard"]
    assert [(s.layer, s.arch, s.config) for s in cfg.saes] == [
        (6, "hierarchical", {"d_sae": 65536, "k": 128, "auxk": False}),
        (12, "kron", {"d_sae": 65536, "k": 32, "auxk": False, "base_dim": 4, "ext_dim": 8}),
    ]
    assert cfg.saes[1].build_config().num_heads == 65536 // 32  # the config class's own derivation
    cfg, _ = parse_args(["--sae", "layer=3,site=mlp", "--sae", "layer=4,k=16,d_sae=8192,budgets=4+8+16"])
    assert [(s.layer, s.site, s.config) for s in cfg.saes] == [
        (3, "mlp", {"d_sae": 4096, "k": 32}),
        (4, "resid", {"d_sae": 8192, "k": 16, "budgets": [4, 8, 16]}),
    ]
    assert parse_count("10M") == 10_000_000 and parse_count("2_000") == 2000


def test_an_sae_field_of_another_architecture_is_refused():
    with pytest.raises(TrainConfigError, match="'base_dim' is not a field of hierarchical_sae"):
        parse_args(["--sae", "layer=3,base_dim=2"])
    with pytest.raises(TrainConfigError, match="--base-dim is not a field of hierarchical: no SAE of this run has it"):
        parse_args(["--base-dim", "2"])
    with pytest.raises(TrainConfigError, match="arch 'kron': d_sae=100 is not a multiple of base_dim\\*ext_dim=8"):
        parse_args(["--arch", "kron", "--d-sae", "100"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"site": "mlp_out"}, "site 'mlp_out' is unknown"),
        ({"arch": "nosuch"}, "arch 'nosuch' is unknown"),
        ({"arch": "matryoshka", "d_sae": 64, "group_sizes": "16 16"}, "group_sizes .* sum to 32, not d_sae=64"),
        ({"k": 64, "d_sae": 32}, "k=64 is larger than d_sae=32"),
        ({"buffer_size": 100, "batch_size": 4096}, "--buffer-size 100 is smaller than --batch-size 4096"),
        ({"tokens": 0}, "--tokens must be a positive integer"),
    ],
)
def test_bad_options_name_the_problem_and_the_fix(options, message):
    with pytest.raises(TrainConfigError, match=message):
        make_config(options)


def test_unknown_yaml_keys_are_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lrate: 0.1\n")
    with pytest.raises(TrainConfigError, match="unknown option 'lrate'"):
        parse_args(["--config", str(path)])


def test_the_cli_prints_bad_input_as_one_line_and_exits_with_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--sae", "layer=1,base_dim=2"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-sae: error: saes[0]: 'base_dim' is not a field of hierarchical_sae") and "\n" not in err
    assert "'k'" in err and "'dtype'" not in err  # the architecture's own fields, not transformers' bookkeeping


def test_an_option_file_of_a_run_before_the_registry_still_reads():
    """tests/data/train_config_before_registry.yaml: what the old training wrote (kron_* run options, nulls)."""
    cfg = make_config(load_yaml(Path(__file__).resolve().parents[1] / "data" / "train_config_before_registry.yaml"))
    assert [(s.arch, s.layer, s.site) for s in cfg.saes] == [("topk", 1, "mlp"), ("kron", 2, "resid")]
    assert cfg.saes[0].config == {"d_sae": 128, "k": 4, "auxk": True, "auxk_coefficient": 0.03125}
    kron = cfg.saes[1].build_config()
    assert (kron.d_sae, kron.k, kron.base_dim, kron.ext_dim, kron.kron_activation, kron.hierarchical) == (
        64,
        8,
        2,
        4,
        "mand",
        True,
    )


def test_resume_compares_every_sae_field_given_with_what_the_saes_were_built_with():
    saved = make_config({"saes": ["layer=1,arch=topk,k=4", "layer=2,arch=kron,d_sae=64,k=8"]})
    assert config_differences(saved, {"auxk": False}) == {"auxk": (True, False)}
    assert config_differences(saved, {"base_dim": 4}) == {"base_dim": (2, 4)}  # only the kron SAE has it
    assert config_differences(saved, {"budgets": [4, 2]})["budgets"] == (None, [4, 2])
    assert config_differences(saved, {"k": 8}) == {"k": (4, 8)}
    assert config_differences(saved, {"auxk": True, "eval_tokens": 5}) == {}  # the same value; a may-change option


def test_same_base_name_gets_distinct_folders_and_resume_keeps_them():
    """Two KronSAEs of one run that differ only in kron_activation (same layer, site, arch, k, d_sae) must not share
    a final folder; the tags come from the differing fields and survive a reload of the saved config."""
    entries = [
        "layer=6,arch=kron,base_dim=2,ext_dim=4,k=32,hierarchical=false",
        "layer=6,arch=kron,base_dim=2,ext_dim=4,k=32,hierarchical=false,kron_activation=relu_product",
        "layer=6,arch=topk,k=4",
    ]
    config = make_config({"saes": entries, "d_sae": 4096})
    names = [spec.name for spec in config.saes]
    assert names == [
        "L6_resid_kron_k32_d4096_kron_activation-mand",
        "L6_resid_kron_k32_d4096_kron_activation-relu_product",
        "L6_resid_topk_k4_d4096",
    ]
    assert [spec.name for spec in make_config(config.to_dict()).saes] == names


def test_same_sae_twice_after_defaults_is_refused():
    """hierarchical=true is KronSAE's default: the two entries are one SAE, refused with one line."""
    entries = ["layer=6,arch=kron,k=32", "layer=6,arch=kron,k=32,hierarchical=true"]
    with pytest.raises(TrainConfigError, match="trains the same SAE twice"):
        make_config({"saes": entries, "d_sae": 4096})
