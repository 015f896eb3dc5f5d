"""Push/pull round trips with the real, unmodified huggingface_hub client over HTTP.

Pushes go to hf_sae.testing.hub_server.PushServer (the Hub's write protocol, committing into git repos); pulls go to
olah (a third-party Hub implementation) serving the same git repos. Both run on 127.0.0.1 for this module. olah is
found via $HF_SAE_OLAH_CLI, <repo>/.venv-olah/bin/olah-cli or PATH; without one, the session fixture ``olah_cli``
(tests/conftest.py) creates its venv from PyPI on first use and caches it (hf_sae.testing.tool_venvs): nothing skips.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, snapshot_download
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel
from transformers.utils import hub as transformers_hub

from hf_sae import (
    BatchTopKSAE,
    BatchTopKSAEConfig,
    HierarchicalSAE,
    KronSAE,
    KronSAEConfig,
    MatryoshkaSAE,
    MatryoshkaSAEConfig,
    SAELoadError,
)
from hf_sae import hub as hf_hub
from hf_sae.cli import main as cli_main
from hf_sae.configuration_jumprelu_sae import JumpReLUSAEConfig
from hf_sae.convert import from_sae_lens
from hf_sae.modeling_jumprelu_sae import JumpReLUSAE
from hf_sae.registry import resolve_architecture
from hf_sae.testing.hub_server import LocalHub, hub_client
from hf_sae.testing.tiny_models import tiny_sae

AutoConfig.register("jumprelu_sae", JumpReLUSAEConfig, exist_ok=True)
AutoModel.register(JumpReLUSAEConfig, JumpReLUSAE, exist_ok=True)

PEER = Path(__file__).parent / "data" / "peer_formats"


@pytest.fixture(scope="module")
def hub(tmp_path_factory, olah_cli):
    with LocalHub(tmp_path_factory.mktemp("hub"), olah_cli=olah_cli) as local_hub:
        yield local_hub


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "hf-cache"


def _sae(seed=0, **overrides) -> HierarchicalSAE:
    """A small SAE that says it reads layer 12 of Gemma-2 2B, with non-zero biases (so a lost bias shows)."""
    where = {"layer": overrides.pop("hook_layer", 12), "site": overrides.pop("hook_site", "resid")}
    sae = tiny_sae(
        **where, d_in=16, d_sae=64, k=8, seed=seed, b_dec_std=1.0, base_model="google/gemma-2-2b", **overrides
    )
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    return sae


def _assert_same(a, b) -> None:
    assert type(a) is type(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), f"{name} differs"
    x = torch.randn(5, a.config.d_in, dtype=sa[next(iter(sa))].dtype)
    with torch.no_grad():
        la, lb = a.encode(x), b.encode(x)
        assert torch.equal(la.values, lb.values) and torch.equal(la.indices, lb.indices)
        assert torch.equal(a.decode(la), b.decode(lb))
        assert torch.equal(a(x).reconstruction, b(x).reconstruction)


def _tree_digest(folder: Path) -> dict[str, tuple[str, int]]:
    """Every path under ``folder`` with its content hash (files) and modification time."""
    return {
        p.relative_to(folder).as_posix(): (
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
            p.stat().st_mtime_ns,
        )
        for p in sorted(folder.rglob("*"))
    } | {".": ("dir", folder.stat().st_mtime_ns)}


# ------------------------------------------------------------------------------------------- round trips
def test_push_then_load_by_repo_id_gives_bit_identical_weights_and_outputs(hub, cache):
    sae = _sae(dataset="org/text")
    with hub_client(hub.push_url, cache):
        commit = sae.push_to_hub(
            "me/gemma-2-2b-res-l12-hier", metrics={"budgets": {"8": {"fvu": 0.2, "l0": 8}}}, tags=["gemma-2"]
        )
    with hub_client(hub.pull_url, cache):
        loaded = AutoModel.from_pretrained("me/gemma-2-2b-res-l12-hier")  # hf-sae installed: no trust_remote_code
        files = HfApi().list_repo_files("me/gemma-2-2b-res-l12-hier")
        card = ModelCard.load("me/gemma-2-2b-res-l12-hier")
    _assert_same(sae, loaded)
    assert {"config.json", "model.safetensors", "README.md", "metrics.json"} <= set(files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl"))]
    assert card.data.library_name == "hf-sae" and {"hierarchical-topk", "gemma-2"} <= set(card.data.tags)
    assert 'AutoModel.from_pretrained("me/gemma-2-2b-res-l12-hier")' in card.text
    assert len(commit.oid) == 40


def _variable_l0_saes() -> dict[str, torch.nn.Module]:
    """A BatchTopK, a Matryoshka and a trainable (log-threshold) JumpReLU SAE after one training forward (so θ is
    estimated / the warm-up counter moved), in eval mode."""
    architecture, preset = resolve_architecture("jumprelu")
    saes = {
        "batchtopk": BatchTopKSAE(BatchTopKSAEConfig(d_in=16, d_sae=64, k=4)),
        "matryoshka": MatryoshkaSAE(MatryoshkaSAEConfig(d_in=16, d_sae=64, k=4, group_sizes=[8, 24, 32])),
        "jumprelu-trained": architecture.model_class(architecture.build_config(preset, d_in=16, d_sae=64)),
    }
    for sae in saes.values():
        sae.train()
        sae(torch.randn(64, 16))
        sae.eval()
    return saes


def test_batchtopk_matryoshka_and_trained_jumprelu_push_then_load_identically(hub, cache):
    saes = _variable_l0_saes()
    with hub_client(hub.push_url, cache):
        for name, sae in saes.items():
            sae.push_to_hub(f"me/{name}")
    with hub_client(hub.pull_url, cache):
        for name, sae in saes.items():
            _assert_same(sae, AutoModel.from_pretrained(f"me/{name}"))


def test_second_push_is_a_new_revision_and_old_revisions_stay_loadable(hub, cache):
    first, second = _sae(seed=1), _sae(seed=2)
    with hub_client(hub.push_url, cache):
        c1 = hf_hub.push_sae(first, "me/revisions", tag="v1")
        c2 = hf_hub.push_sae(second, "me/revisions")
        refs = HfApi().list_repo_refs("me/revisions")
    assert c1.oid != c2.oid
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": c1.oid}
    with hub_client(hub.pull_url, cache):
        _assert_same(second, AutoModel.from_pretrained("me/revisions"))
        _assert_same(first, AutoModel.from_pretrained("me/revisions", revision="v1"))
        _assert_same(first, HierarchicalSAE.from_pretrained("me/revisions", revision=c1.oid))


def test_push_collection_is_one_commit_loadable_by_subfolder_and_revision(hub, cache):
    sae12 = _sae(seed=3)
    sae12m = _sae(seed=4, hook_site="mlp")
    kron = KronSAE(KronSAEConfig(d_in=16, d_sae=64, k=8, num_heads=8, base_dim=2, ext_dim=4, hook_layer=13))
    before = len(hub.push.commits)
    with hub_client(hub.push_url, cache):
        commit = hf_hub.push_collection(
            {"layer_12/resid": sae12, "layer_12/mlp": sae12m, "layer_13/resid": kron},
            "me/gemma-2-2b-saes",
            metrics={"layer_12/resid": {"ce_loss_recovered": 0.9}},
            tag="v1",
        )
    assert len(hub.push.commits) == before + 1 and hub.push.commits[-1] == ("me/gemma-2-2b-saes", "main", commit.oid)
    # the repo's history: the repo's creation, then ONE commit holding every SAE
    assert hub.push.store.git("me/gemma-2-2b-saes", "rev-list", "--count", "main").strip() == "2"
    with hub_client(hub.pull_url, cache):
        loaded = HierarchicalSAE.from_pretrained("me/gemma-2-2b-saes", subfolder="layer_12/resid", revision="v1")
        _assert_same(sae12, loaded)
        _assert_same(sae12m, AutoModel.from_pretrained("me/gemma-2-2b-saes", subfolder="layer_12/mlp"))
        _assert_same(kron, AutoModel.from_pretrained("me/gemma-2-2b-saes", subfolder="layer_13/resid"))
        root = Path(snapshot_download("me/gemma-2-2b-saes", revision="v1"))
    manifest = json.loads((root / "collection.json").read_text())["saes"]
    assert manifest["layer_13/resid"]["model_type"] == "kron_sae" and manifest["layer_12/mlp"]["hook_site"] == "mlp"
    readme = (root / "README.md").read_text()
    assert "[`layer_12/mlp`](layer_12/mlp)" in readme and "library_name: hf-sae" in readme
    for sub in ("layer_12/resid", "layer_12/mlp", "layer_13/resid"):
        assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in (root / sub).iterdir()}


def _make_run(run_dir: Path) -> dict[int, HierarchicalSAE]:
    """A finished single-SAE run in training/'s layout: the SAE at the run folder, metrics.json as
    {"run": ..., "saes": {name: ...}}, budget_curves.png, and checkpoints/step-XXXXXXXX/sae_0/ (+ optimizer state)."""
    final = _sae(seed=99, tokens_trained=123_456)
    final.save_pretrained(run_dir)  # first: save_pretrained into an existing folder drops its subfolders
    saes = {step: _sae(seed=10 + step) for step in (10, 20)}
    for step, sae in saes.items():
        checkpoint = run_dir / "checkpoints" / f"step-{step:08d}"
        sae.save_pretrained(checkpoint / "sae_0")
        (checkpoint / "optimizer.pt").write_bytes(b"pickled optimizer state: never read")
    entry = {
        "path": str(run_dir),
        "layer": 12,
        "site": "resid",
        "budgets": {"4": {"fvu": 0.3}, "8": {"fvu": 0.2, "l0": 8.0, "explained_variance": 0.8}},
        "dead_fraction_eval": 0.05,
        "eval_tokens": 2048,
        "lm_loss": {"ce_loss_recovered": 0.88, "clean_loss": 2.0, "spliced_loss": 2.3, "ablated_loss": 4.5},
    }
    run = {
        "model": "google/gemma-2-2b",
        "dataset": "embedded",
        "tokens": 123_456,
        "command": "python -m training.train --k 8 --push-to-hub me/run",
    }
    (run_dir / "metrics.json").write_text(json.dumps({"run": run, "saes": {"L12_resid_hierarchical_k8_d64": entry}}))
    (run_dir / "budget_curves.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    saes[0] = final
    return saes


def test_push_run_pushes_checkpoints_as_revisions_then_the_final_sae_with_its_card(hub, cache, tmp_path):
    run_dir = tmp_path / "run"
    saes = _make_run(run_dir)
    before = _tree_digest(run_dir)
    with hub_client(hub.push_url, cache):
        commits = hf_hub.push_run(run_dir, "me/run", push_checkpoints=True, tag="final")
        tags = {t.name: t.target_commit for t in HfApi().list_repo_refs("me/run").tags}
    assert _tree_digest(run_dir) == before, "push_run must not write into the run folder"
    assert tags == {"step-10": commits[0].oid, "step-20": commits[1].oid, "final": commits[2].oid}
    with hub_client(hub.pull_url, cache):
        _assert_same(saes[0], AutoModel.from_pretrained("me/run"))
        _assert_same(saes[10], AutoModel.from_pretrained("me/run", revision="step-10"))
        root = Path(snapshot_download("me/run"))
    card = (root / "README.md").read_text()
    assert "![EV and L0 against the budget k'](budget_curves.png)" in card and (root / "budget_curves.png").is_file()
    assert "python -m training.train --k 8 --push-to-hub me/run" in card and "123,456" in card
    assert "**0.8800**" in card and "2,048 held-out tokens of embedded" in card
    assert json.loads((root / "metrics.json").read_text())["lm_loss"]["ce_loss_recovered"] == 0.88
    with hub_client(hub.pull_url, cache):
        step_card = (Path(snapshot_download("me/run", revision="step-10")) / "README.md").read_text()
    assert "0.8800" not in step_card, "a checkpoint's card must not report the final run's metrics"


def test_push_run_of_a_multi_sae_run_is_one_collection_commit(hub, cache, tmp_path):
    run_dir = tmp_path / "multi"
    saes = {
        "L6_resid_hierarchical_k8_d64": _sae(seed=30, hook_layer=6),
        "L6_mlp_hierarchical_k8_d64": _sae(seed=31, hook_layer=6, hook_site="mlp"),
    }
    entries = {}
    for name, sae in saes.items():
        sae.save_pretrained(run_dir / name)
        entries[name] = {"path": str(run_dir / name), "budgets": {"8": {"fvu": 0.1 if "resid" in name else 0.3}}}
    (run_dir / "metrics.json").write_text(json.dumps({"run": {"tokens": 1000}, "saes": entries}))
    (run_dir / "budget_curves.png").write_bytes(b"\x89PNG fake")
    with hub_client(hub.push_url, cache):
        (commit,) = hf_hub.push_run(run_dir, "me/multi")
    with hub_client(hub.pull_url, cache):
        _assert_same(saes["L6_mlp_hierarchical_k8_d64"], AutoModel.from_pretrained("me/multi", subfolder="layer_6/mlp"))
        root = Path(snapshot_download("me/multi"))
    assert "| 8 | 0.9000 | 0.1000 |" in (root / "layer_6" / "resid" / "README.md").read_text()
    assert "| 8 | 0.7000 | 0.3000 |" in (root / "layer_6" / "mlp" / "README.md").read_text()
    assert (root / "layer_6" / "mlp" / "budget_curves.png").is_file()
    assert hub.push.store.git("me/multi", "rev-list", "--count", "main").strip() == "2"


def test_cli_push_prints_the_revision(hub, cache, tmp_path, capsys):
    _sae(seed=5).save_pretrained(tmp_path / "sae")
    with hub_client(hub.push_url, cache):
        assert cli_main(["push", str(tmp_path / "sae"), "me/cli-push", "--tag", "v1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pushed me/cli-push@") and "tagged me/cli-push@" in out and " as v1" in out


def test_cli_push_to_a_bare_name_prints_the_full_repo_id(hub, cache, tmp_path, capsys):
    _sae(seed=17).save_pretrained(tmp_path / "sae")
    with hub_client(hub.push_url, cache):
        assert cli_main(["push", str(tmp_path / "sae"), "cli-bare"]) == 0
    assert capsys.readouterr().out.startswith("pushed me/cli-bare@")


def test_failed_push_leaves_the_local_folder_untouched(hub, cache, tmp_path):
    run_dir = tmp_path / "run"
    _make_run(run_dir)
    before = _tree_digest(run_dir)
    hub.push.fail_commits = 403  # e.g. a token without write access
    try:
        with hub_client(hub.push_url, cache), pytest.raises(hf_hub.SAEPushError) as info:
            hf_hub.push_run(run_dir, "me/fails")
    finally:
        hub.push.fail_commits = None
    assert "me/fails" in str(info.value) and "Nothing local was changed" in str(info.value)
    assert _tree_digest(run_dir) == before
    with hub_client(hub.push_url, cache), pytest.raises(hf_hub.SAEPushError, match="tag 'v1' already exists"):
        hf_hub.push_sae(_sae(), "me/revisions", tag="v1")  # refused before uploading anything


def test_existing_tag_is_refused_before_any_commit(hub, cache):
    with hub_client(hub.push_url, cache):
        hf_hub.push_sae(_sae(seed=6), "me/tagged", tag="v1")
        commits = len(hub.push.commits)
        with pytest.raises(hf_hub.SAEPushError, match="tag 'v1' already exists"):
            hf_hub.push_sae(_sae(seed=7), "me/tagged", tag="v1")
    assert len(hub.push.commits) == commits


# ------------------------------------------------------------------------------------- transformers' idioms
def test_push_to_hub_with_a_bare_name_goes_to_the_tokens_namespace(hub, cache):
    sae = _sae(seed=15)
    with hub_client(hub.push_url, cache):
        commit = sae.push_to_hub("bare-name", safe_serialization=True)  # whoami says "me"
    assert hub.push.commits[-1] == ("me/bare-name", "main", commit.oid)
    with hub_client(hub.pull_url, cache):
        _assert_same(sae, AutoModel.from_pretrained("me/bare-name"))
        card = ModelCard.load("me/bare-name")
    assert 'AutoModel.from_pretrained("me/bare-name")' in card.text


def test_save_pretrained_with_push_to_hub_saves_then_pushes_the_folder(hub, cache, tmp_path):
    sae = _sae(seed=16)
    folder = tmp_path / "my-local-sae"
    folder.mkdir()
    (folder / "command.txt").write_text("python -m training.train --k 8 --layer 12\n")
    with hub_client(hub.push_url, cache):
        sae.save_pretrained(folder, push_to_hub=True)  # repo: the folder's name, in the token's namespace
        sae.save_pretrained(folder, push_to_hub=True, repo_id="me/named", commit_message="first", private=True)
    assert {"config.json", "model.safetensors"} <= {p.name for p in folder.iterdir()}
    assert [c[0] for c in hub.push.commits[-2:]] == ["me/my-local-sae", "me/named"]
    with hub_client(hub.pull_url, cache):
        _assert_same(sae, AutoModel.from_pretrained("me/my-local-sae"))
        root = Path(snapshot_download("me/named"))
        log = hub.push.store.git("me/named", "log", "-1", "--format=%s", "main").strip()
    assert "python -m training.train --k 8 --layer 12" in (root / "README.md").read_text()
    assert log == "first"


def test_unsafe_serialization_and_a_bare_name_without_a_token_are_refused_before_uploading(hub, cache, monkeypatch):
    with hub_client(hub.push_url, cache):
        commits = len(hub.push.commits)
        with pytest.raises(hf_hub.SAEPushError, match=r"safe_serialization=False: hf-sae pushes safetensors only"):
            _sae().push_to_hub("me/unsafe", safe_serialization=False)
        monkeypatch.setattr(HfApi, "whoami", lambda self, *a, **k: (_ for _ in ()).throw(OSError("no token")))
        with pytest.raises(hf_hub.SAEPushError, match=r"'bare' has no namespace.*pass 'namespace/bare'"):
            _sae().push_to_hub("bare")
    assert len(hub.push.commits) == commits


def test_push_to_an_unreachable_endpoint_names_it_and_the_fix(cache, tmp_path, monkeypatch, capsys):
    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http, "time", types.SimpleNamespace(**{**vars(time), "sleep": lambda seconds: None}))
    with hub_client("http://127.0.0.1:9", cache), pytest.raises(hf_hub.SAEPushError) as info:
        hf_hub.push_sae(_sae(), "me/nowhere")
    message = str(info.value)
    assert "the Hub at http://127.0.0.1:9 did not answer" in message and "HF_ENDPOINT" in message
    assert "Nothing local was changed" in message and isinstance(info.value, OSError)
    _sae().save_pretrained(tmp_path / "sae")
    capsys.readouterr()
    with hub_client("http://127.0.0.1:9", cache):
        assert cli_main(["push", str(tmp_path / "sae"), "me/nowhere"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-sae: error: pushing to me/nowhere: the Hub at http://127.0.0.1:9 did not answer")
    assert err.count("\n") == 1 and "Traceback" not in err


def test_pushed_cards_carry_the_training_command(hub, cache, tmp_path):
    run = tmp_path / "run"
    for layer in (1, 2):
        _sae(seed=20 + layer, hook_layer=layer).save_pretrained(run / f"L{layer}_resid")
    (run / "command.txt").write_text("python -m training.train --sae layer=1 --sae layer=2\n")
    single = tmp_path / "single"
    _sae(seed=23).save_pretrained(single)
    (single / "command.txt").write_text("python -m training.train --layer 12\n")
    with hub_client(hub.push_url, cache):
        hf_hub.push_sae(hf_hub.load_sae(single), "me/cmd-loaded")  # the folder it was loaded from
        hf_hub.push_collection({"layer_1/resid": run / "L1_resid", "layer_2/resid": run / "L2_resid"}, "me/cmd-coll")
    with hub_client(hub.pull_url, cache):
        loaded = Path(snapshot_download("me/cmd-loaded"))
        coll = Path(snapshot_download("me/cmd-coll"))
    assert "python -m training.train --layer 12" in (loaded / "README.md").read_text()
    for card in (
        coll / "README.md",
        coll / "layer_1" / "resid" / "README.md",
        coll / "layer_2" / "resid" / "README.md",
    ):
        assert "python -m training.train --sae layer=1 --sae layer=2" in card.read_text(), card


# ---------------------------------------------------------------------------------------- remote code
REMOTE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys
    class HideHfSae(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_sae" or name.startswith("hf_sae."):
                raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)")
    sys.meta_path.insert(0, HideHfSae())
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel
    inputs, outputs = load_file(sys.argv[1]), {}
    for repo in sys.argv[3:]:
        name, _, subfolder = repo.partition(":")
        sae = AutoModel.from_pretrained(name, subfolder=subfolder, trust_remote_code=True)
        assert type(sae).__module__.startswith("transformers_modules"), type(sae).__module__
        x = inputs[repo]
        with torch.no_grad():
            latents = sae.encode(x)
            outputs[repo + ":values"], outputs[repo + ":indices"] = latents.values, latents.indices
            outputs[repo + ":decoded"] = sae.decode(latents)
            outputs[repo + ":forward"] = sae(x).reconstruction
    assert not [m for m in sys.modules if m == "hf_sae" or m.startswith("hf_sae.")]
    save_file(outputs, sys.argv[2])
    """
)


def test_include_code_loads_with_trust_remote_code_without_hf_sae(hub, cache, tmp_path):
    jumprelu = from_sae_lens(PEER / "sae_lens" / "jumprelu")
    saes = {
        "me/remote-topk": _sae(seed=8, hierarchical=False),
        "me/remote-kron": KronSAE(KronSAEConfig(d_in=16, d_sae=64, k=8, num_heads=8, base_dim=2, ext_dim=4)),
        "me/remote-jumprelu": jumprelu,
        "me/remote-collection:layer_3/mlp": _sae(seed=13, hook_layer=3, hook_site="mlp"),
        **{f"me/remote-{name}": sae for name, sae in _variable_l0_saes().items()},
    }
    with hub_client(hub.push_url, cache):
        for repo, sae in saes.items():
            if ":" not in repo:
                hf_hub.push_sae(sae, repo, include_code=True)
        hf_hub.push_collection(
            {"layer_3/mlp": saes["me/remote-collection:layer_3/mlp"]}, "me/remote-collection", include_code=True
        )
    inputs = {repo: torch.randn(6, 16) for repo in saes}
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.pull_url,
        "HF_TOKEN": "hf_dummy",
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_CACHE": str(tmp_path / "fresh-cache"),
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "PYTHONPATH": "",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            REMOTE_SCRIPT,
            str(tmp_path / "inputs.safetensors"),
            str(tmp_path / "out.safetensors"),
            *saes,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = load_file(str(tmp_path / "out.safetensors"))
    for repo, sae in saes.items():  # another process: the same latents, values equal up to float rounding
        with torch.no_grad():
            latents = sae.encode(inputs[repo])
            assert torch.equal(outputs[repo + ":indices"], latents.indices), repo
            torch.testing.assert_close(outputs[repo + ":values"], latents.values, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(outputs[repo + ":decoded"], sae.decode(latents), rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(
                outputs[repo + ":forward"], sae(inputs[repo]).reconstruction, rtol=1e-6, atol=1e-6
            )
    # with hf-sae installed and no trust_remote_code, the same repo loads hf-sae's own class
    with hub_client(hub.pull_url, cache):
        assert type(AutoModel.from_pretrained("me/remote-kron")) is KronSAE


# --------------------------------------------------------------------------------------------- errors
def test_missing_repo_names_the_repo_endpoint_and_cache(hub, cache):
    with hub_client(hub.pull_url, cache), pytest.raises(hf_hub.SAEHubError) as info:
        hf_hub.load_sae("me/does-not-exist")
    message = str(info.value)
    assert "me/does-not-exist" in message and hub.pull_url in message and "has no copy of me/does-not-exist" in message
    assert isinstance(info.value, OSError) and isinstance(info.value, SAELoadError)


def test_offline_mode_names_the_repo_and_the_cache_state(hub, cache):
    with hub_client(hub.push_url, cache):
        hf_hub.push_sae(_sae(seed=9), "me/cached")
    with hub_client(hub.pull_url, cache):
        AutoModel.from_pretrained("me/cached")  # now in the cache
    with hub_client(hub.pull_url, cache, offline=True):
        AutoModel.from_pretrained("me/cached")  # offline works from the cache
        with pytest.raises(hf_hub.SAEHubError) as info:
            hf_hub.load_sae("me/cached", revision="v9")
    message = str(info.value)
    assert "HF_HUB_OFFLINE=1" in message and "me/cached" in message and "revision 'v9'" in message
    assert "holds 1 snapshot(s) of me/cached" in message and "main->" in message


def test_unreachable_endpoint_names_the_endpoint_and_the_cache(cache, monkeypatch):
    from huggingface_hub.utils import _http

    # huggingface_hub retries a refused connection 5 times with 1..8 s sleeps; skip the sleeping.
    monkeypatch.setattr(_http, "time", types.SimpleNamespace(**{**vars(time), "sleep": lambda seconds: None}))
    with hub_client("http://127.0.0.1:9", cache), pytest.raises(hf_hub.SAEHubError) as info:
        hf_hub.load_sae("me/anything")
    message = str(info.value)
    assert "http://127.0.0.1:9 did not answer" in message and "me/anything" in message and "no copy" in message


def test_subfolder_and_collection_root_errors_list_the_saes(hub, cache):
    with hub_client(hub.push_url, cache):
        hf_hub.push_collection({"layer_1/resid": _sae(hook_layer=1), "layer_2/resid": _sae(hook_layer=2)}, "me/coll")
    # the README's calls give load_sae's message, not "config is missing required key(s)"
    for load in (hf_hub.load_sae, HierarchicalSAE.from_pretrained, AutoModel.from_pretrained):
        with hub_client(hub.pull_url, cache):
            with pytest.raises(
                hf_hub.SAEHubError, match=r"collection, not a single SAE: pass subfolder=.*layer_1/resid"
            ):
                load("me/coll")
            with pytest.raises(hf_hub.SAEHubError, match=r"subfolder does not exist; SAEs in this repo: layer_1/resid"):
                load("me/coll", subfolder="layer_9/resid")
            with pytest.raises(hf_hub.SAEHubError, match=r"at revision 'v9': the repo exists .* \(branches and tags"):
                load("me/coll", subfolder="layer_1/resid", revision="v9")


def test_auto_model_errors_name_the_endpoint_in_use(hub, cache):
    with hub_client(hub.pull_url, cache), pytest.raises(hf_hub.SAEHubError) as info:
        AutoModel.from_pretrained("me/never-pushed")
    assert f"no such repo on {hub.pull_url}" in str(info.value) and "huggingface.co" not in str(info.value)


def test_errors_show_a_resolved_revision_by_name_and_short_sha(hub, cache, tmp_path, monkeypatch):
    # transformers keeps one HfApi whose endpoint is the one in use when it was made (hub_client does not reset it):
    # a fresh one here, so that transformers resolves the revision on this hub (as it does under HF_ENDPOINT).
    monkeypatch.setattr(transformers_hub, "_hf_api", None)
    sae = _sae(seed=14)
    sae.save_pretrained(tmp_path / "config-only")
    (tmp_path / "config-only" / "model.safetensors").unlink()
    with hub_client(hub.push_url, cache):
        HfApi().create_repo("me/config-only", exist_ok=True)
        commit = HfApi().upload_folder(folder_path=tmp_path / "config-only", repo_id="me/config-only")
    for load in (AutoModel.from_pretrained, hf_hub.load_sae):  # transformers resolves the revision first
        with hub_client(hub.pull_url, cache), pytest.raises(hf_hub.SAEHubError) as info:
            load("me/config-only", revision="main")
        assert f"at revision 'main' (commit {commit.oid[:8]})" in str(info.value), str(info.value)
        assert "ResolvedRevision(" not in str(info.value) and "found .gitattributes, config.json" in str(info.value)


def test_offline_load_of_a_cached_collection_root_says_it_is_a_collection(hub, cache):
    with hub_client(hub.push_url, cache):
        hf_hub.push_collection({"layer_4/resid": _sae(hook_layer=4)}, "me/cached-coll")
    with hub_client(hub.pull_url, cache):
        hf_hub.load_sae("me/cached-coll", subfolder="layer_4/resid")  # now in the cache
    with hub_client(hub.pull_url, cache, offline=True):
        with pytest.raises(hf_hub.SAEHubError, match=r"collection, not a single SAE: pass subfolder=.*layer_4/resid"):
            HierarchicalSAE.from_pretrained("me/cached-coll")
        with pytest.raises(hf_hub.SAEHubError, match=r"offline mode is on .* holds 1 snapshot"):
            HierarchicalSAE.from_pretrained("me/cached-coll", subfolder="layer_5/resid")  # maybe on the Hub


def test_peer_layout_on_the_hub_names_the_converter_which_then_works(hub, cache):
    with hub_client(hub.push_url, cache):
        api = HfApi()
        api.create_repo("me/saelens-saes", exist_ok=True)
        api.upload_folder(
            folder_path=PEER / "sae_lens" / "topk", path_in_repo="blocks.3.hook_resid_post", repo_id="me/saelens-saes"
        )
    with hub_client(hub.pull_url, cache):
        with pytest.raises(hf_hub.SAEHubError) as info:
            hf_hub.load_sae("me/saelens-saes")
        assert "sae-lens layout" in str(info.value)
        assert "hf_sae.convert.from_sae_lens('me/saelens-saes', subfolder='blocks.3.hook_resid_post')" in str(
            info.value
        )
        sae = from_sae_lens("me/saelens-saes", subfolder="blocks.3.hook_resid_post")
    ref = load_file(str(PEER / "sae_lens" / "topk" / "reference.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(sae.decode(sae.encode(ref["x"])), ref["decoded"], rtol=1e-5, atol=1e-5)


def test_bad_config_and_truncated_weights_pulled_from_the_hub_name_the_file(hub, cache, tmp_path):
    sae = _sae(seed=11)
    sae.save_pretrained(tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / "config.json").read_text())
    (tmp_path / "bad" / "config.json").write_text(json.dumps({**config, "colour": "blue"}))
    with hub_client(hub.push_url, cache):
        HfApi().create_repo("me/bad-config", exist_ok=True)
        HfApi().upload_folder(folder_path=tmp_path / "bad", repo_id="me/bad-config")
    with hub_client(hub.pull_url, cache), pytest.raises(ValueError, match=r"unknown key\(s\) \['colour'\]") as info:
        hf_hub.load_sae("me/bad-config")
    assert "config" in str(info.value)


def test_missing_revision_lists_the_repos_branches_and_tags(hub, cache):
    with hub_client(hub.push_url, cache):
        hf_hub.push_sae(_sae(seed=12), "me/refs", tag="v1")
    with hub_client(hub.pull_url, cache), pytest.raises(hf_hub.SAEHubError) as info:
        hf_hub.load_sae("me/refs", revision="v9")
    assert "revision 'v9' does not (branches and tags: main, v1)" in str(info.value)


def test_gemma_scope_converts_straight_from_a_hub_repo(hub, cache, tmp_path):
    import numpy as np

    from hf_sae.convert import from_gemma_scope

    rng = np.random.default_rng(0)
    params = {
        "W_enc": rng.standard_normal((16, 1024)),
        "W_dec": rng.standard_normal((1024, 16)),
        "b_enc": rng.standard_normal(1024) * 0.1,
        "b_dec": rng.standard_normal(16),
        "threshold": rng.uniform(0.1, 0.5, 1024),
    }
    folder = tmp_path / "repo" / "layer_20" / "width_1k" / "average_l0_71"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", **{k: v.astype(np.float32) for k, v in params.items()})
    with hub_client(hub.push_url, cache):
        HfApi().create_repo("google/gemma-scope-2b-pt-res", exist_ok=True)
        HfApi().upload_folder(folder_path=tmp_path / "repo", repo_id="google/gemma-scope-2b-pt-res")
    with hub_client(hub.pull_url, cache):
        sae = from_gemma_scope("google/gemma-scope-2b-pt-res", "layer_20/width_1k/average_l0_71")
    assert (sae.config.base_model, sae.config.hook_layer, sae.config.hook_site) == ("google/gemma-2-2b", 20, "resid")
    x = torch.randn(8, 16)
    pre = x.double() @ torch.from_numpy(params["W_enc"]).float().double() + torch.from_numpy(params["b_enc"]).float()
    expected = torch.where(pre > torch.from_numpy(params["threshold"]).float(), pre.clamp_min(0), 0.0)
    with torch.no_grad():
        torch.testing.assert_close(sae.encode_dense(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_feature_statistics_are_pushed_pulled_and_shown_in_the_card(hub, cache):
    from hf_sae.latent_stats import FeatureStatsAccumulator

    sae = _sae(seed=3)
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    latents = sae.encode(x)
    accumulator = FeatureStatsAccumulator(64, 16, 8, "200 random rows")
    accumulator.update(x, latents.values, latents.indices)
    sae.feature_stats = accumulator.result()
    with hub_client(hub.push_url, cache):
        sae.push_to_hub("me/with-stats")
    with hub_client(hub.pull_url, cache):
        loaded = AutoModel.from_pretrained("me/with-stats")
        files = HfApi().list_repo_files("me/with-stats")
        card = ModelCard.load("me/with-stats")
    assert {"feature_stats.safetensors", "feature_density.png"} <= set(files)
    assert torch.equal(loaded.feature_stats.max_activation, sae.feature_stats.max_activation)
    assert "## Feature statistics" in card.text and "feature_density.png" in card.text
