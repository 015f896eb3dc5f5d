"""The training script (training/train.py): end-to-end runs, resume after SIGKILL, DDP, NaN handling, bad input.

Real components throughout: a tiny random-weight Gemma-2 saved with a real word-level tokenizer (ids 0..3 are
<pad>, <eos>, <bos>, <unk>, as in Gemma) and real English text (the embedded corpus's held-out split when it is
built, else CPython's documentation topics, which are always on disk).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_sae  # noqa: F401  (registers the SAE classes with AutoModel)
from hf_sae import HierarchicalSAE
from hf_sae.sites import SiteError, resolve_site
from training import checkpoint as ckpt
from training import train as train_module
from training.cli import parse_args
from training.config import TrainConfigError
from training.data import DataError
from training.harvest import ActivationHarvester, BufferMemoryError, NonFiniteActivationsError

REPO = Path(__file__).resolve().parents[2]
BOS, EOS, PAD = 2, 1, 0


def run(args: list[str]):
    cfg, explicit = parse_args(args)
    return train_module.train(cfg, explicit)


@pytest.fixture(scope="module")
def finished_run(tiny_args, saved_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    metrics = run(tiny_args(out))
    return out, metrics


# --------------------------------------------------------------------------------------------------- end to end
def test_tiny_run_saves_a_loadable_model_metrics_plot_and_card(finished_run, capsys):
    from transformers import AutoModel

    out, metrics = finished_run
    for name in ("config.json", "model.safetensors", "metrics.json", "budget_curves.png", "train_config.yaml"):
        assert (out / name).is_file(), name
    assert (out / "budget_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ckpt.latest_checkpoint(out).name == "step-00000030"
    assert len(ckpt.checkpoint_dirs(out)) == 2  # keep_checkpoints=2 pruned step 10
    sae = AutoModel.from_pretrained(out)
    assert isinstance(sae, HierarchicalSAE)
    assert sae.config.activation_scale_folded and sae.config.activation_scale != 1.0
    assert (sae.config.hook_layer, sae.config.hook_site, sae.config.d_sae, sae.config.k) == (2, "resid", 128, 8)
    assert sae.config.tokens_trained == 128 * 30 and sae.config.context_length == 32
    assert sae.config.excluded_token_ids == [PAD, BOS]
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    result = on_disk["saes"]["L2_resid_hierarchical_k8_d128"]
    assert list(result["budgets"]) == ["1", "2", "4", "8"]
    evs = [result["budgets"][b]["explained_variance"] for b in ("1", "2", "4", "8")]
    assert evs == sorted(evs) and 0 < evs[-1] < 1  # nested budgets: more latents, more variance explained
    assert all(result["budgets"][b]["l0"] <= int(b) for b in result["budgets"])
    assert result["eval_tokens"] == 1000 and 0 <= result["dead_fraction"] <= 1
    try:
        import hf_sae.cards  # noqa: F401
    except ImportError:
        pass
    else:
        assert "HierarchicalTopK" in (out / "README.md").read_text()
    if result["lm_loss"] is not None:
        assert {"clean_loss", "spliced_loss", "ablated_loss", "ce_loss_recovered"} <= set(result["lm_loss"])
        assert {"mean_ablated_loss", "ce_loss_recovered_mean"} <= set(result["lm_loss"])
    # the held-out feature statistics travel with the SAE: file, loaded attribute, histogram, card section
    assert (out / "feature_stats.safetensors").is_file() and (out / "feature_density.png").is_file()
    assert sae.feature_stats is not None and sae.feature_stats.n_tokens == 1000
    assert sae.feature_stats.dead_fraction() == pytest.approx(result["dead_fraction_eval"])
    assert "## Feature statistics" in (out / "README.md").read_text()


def test_activation_scale_is_estimated_then_folded_into_the_biases(load_saved_lm, windows_of, finished_run, saved_lm):
    """The saved (folded) SAE on raw activations = the unfolded checkpoint SAE (which scales its input itself)."""
    out, _ = finished_run
    folded = HierarchicalSAE.from_pretrained(out)
    unfolded = HierarchicalSAE.from_pretrained(ckpt.latest_checkpoint(out) / "sae_0")
    s = unfolded.config.activation_scale
    assert not unfolded.config.activation_scale_folded and folded.config.activation_scale == pytest.approx(s)
    assert torch.equal(folded.W_dec, unfolded.W_dec) and torch.equal(folded.encoder.weight, unfolded.encoder.weight)
    torch.testing.assert_close(folded.b_dec * s, unfolded.b_dec)
    torch.testing.assert_close(folded.encoder.bias * s, unfolded.encoder.bias)

    model, tokenizer = load_saved_lm()
    harvester = ActivationHarvester(model, [resolve_site(model, 2, "resid")], [PAD, BOS])
    x = harvester(*windows_of(tokenizer).next_batch(8))[(2, "resid")]
    # the estimate: E||s x||^2 = d_in (on other windows than the estimate used, so only roughly)
    assert (s * x).pow(2).sum(-1).mean().item() == pytest.approx(x.shape[-1], rel=0.5)
    raw, ref = folded.encode(x), unfolded.encode(x)
    # the same latents, up to near ties (the two compute the scores in different units, so a tie may flip): at
    # every rank, the latent each one chose has the same reference score
    scores = unfolded.pre_acts(x)
    same = (raw.indices == ref.indices).float().mean()
    assert same > 0.99
    torch.testing.assert_close(scores.gather(-1, raw.indices), scores.gather(-1, ref.indices), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(raw.values * s, ref.values, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(folded(x).reconstruction, unfolded(x).reconstruction, rtol=1e-4, atol=1e-5)


def test_resume_after_sigkill_ends_with_the_weights_of_an_uninterrupted_run(tiny_args, saved_lm, tmp_path):
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    run(tiny_args(uninterrupted))
    # The same run in a fresh process that SIGKILLs itself after step 15: checkpoint 10 is the last one on disk.
    script = (
        "import os, signal, sys\n"
        "import training.train as t\n"
        "step = t.training_step\n"
        "count = [0]\n"
        "def killing_step(*args, **kwargs):\n"
        "    out = step(*args, **kwargs)\n"
        "    count[0] += 1\n"
        "    if count[0] == 15:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return out\n"
        "t.training_step = killing_step\n"
        "t.main(sys.argv[1:])\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script, *tiny_args(killed)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert ckpt.latest_checkpoint(killed).name == "step-00000010"
    assert not (killed / "model.safetensors").exists()

    run(["--resume", str(killed)])
    a, b = load_file(uninterrupted / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    state_a = json.loads((ckpt.latest_checkpoint(uninterrupted) / "trainer_state.json").read_text())
    state_b = json.loads((ckpt.latest_checkpoint(killed) / "trainer_state.json").read_text())
    assert state_a["step"] == state_b["step"] == 30 and state_a["tokens"] == state_b["tokens"]


def torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node N -m training.train ARGS`` (gloo ranks on CPU)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    return subprocess.run(
        [*command, "-m", "training.train", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=400
    )


@pytest.mark.slow
def test_two_processes_train_with_ddp_on_uneven_data(tiny_args, saved_lm, tmp_path):
    """torchrun, 2 ranks over gloo: each rank harvests its own shard (an odd number of documents of different
    lengths, so the ranks' buffer rounds differ), gradients are all-reduced, only rank 0 writes, nothing hangs."""
    docs = tmp_path / "odd.jsonl"
    docs.write_text("".join(saved_lm[1].read_text().splitlines(keepends=True)[:25]))
    out = tmp_path / "ddp"
    proc = torchrun(*tiny_args(out, dataset=docs, tokens=128 * 2 * 12, checkpoint_every=5, eval_lm_windows=0))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["processes"] == 2 and metrics["run"]["tokens"] == 128 * 2 * 12
    state = torch.load(ckpt.latest_checkpoint(out) / "process_states.pt", weights_only=True)
    assert len(state) == 2 and state[0]["buffer"] != state[1]["buffer"]  # each rank had its own data position
    assert HierarchicalSAE.from_pretrained(out).config.tokens_trained == 128 * 2 * 12
    assert proc.stdout.count("hf-sae training summary") == 1  # only the main process reports
    assert "on 2 process(es)" in proc.stdout

    # and it resumes with the same number of processes
    (ckpt.latest_checkpoint(out)).rename(out / "checkpoints" / "step-99999999-removed")
    proc = torchrun("--resume", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_nan_activations_are_skipped_counted_and_stop_the_run_when_they_persist(
    tiny_args, saved_lm, tmp_path, monkeypatch
):
    original = train_module.load_language_model
    poisoned = {"batches": 0, "from": None}

    def load_with_nans(cfg, device):
        model, tokenizer = original(cfg, device)

        def hook(module, args, output):
            poisoned["batches"] += 1
            if poisoned["batches"] == 3 or (poisoned["from"] and poisoned["batches"] >= poisoned["from"]):
                return output * float("nan")
            return None

        model.model.layers[1].register_forward_hook(hook)
        return model, tokenizer

    monkeypatch.setattr(train_module, "load_language_model", load_with_nans)
    out = tmp_path / "nan"
    run(tiny_args(out, tokens=128 * 10, eval_lm_windows=0))
    state = json.loads((ckpt.latest_checkpoint(out) / "trainer_state.json").read_text())
    assert state["nonfinite_lm_batches"] == 1 and (out / "model.safetensors").exists()

    poisoned.update(batches=0, **{"from": 30})  # from the 30th LM batch on, everything is NaN
    out = tmp_path / "nan-persistent"
    with pytest.raises(NonFiniteActivationsError, match="NaN/inf activations at layer 2 resid"):
        run(tiny_args(out, tokens=128 * 200, checkpoint_every=5, max_nonfinite_batches=3))
    good = ckpt.latest_checkpoint(out)
    assert good is not None and HierarchicalSAE.from_pretrained(good / "sae_0").config.d_sae == 128


# ------------------------------------------------------------------------------------------------- bad input
def test_an_unknown_model_is_a_clear_error(tiny_args, saved_lm, tmp_path):
    with pytest.raises(hf_sae.errors.ModelLoadError, match="--model .*nonexistent.*cannot load it"):
        run(tiny_args(tmp_path / "x", model=tmp_path / "nonexistent"))


def test_an_unknown_dataset_is_a_clear_error(tiny_args, saved_lm, tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        run(tiny_args(tmp_path / "x", dataset=tmp_path / "missing" / "data.jsonl"))


def test_a_layer_out_of_range_is_a_clear_error(tiny_args, saved_lm, tmp_path):
    with pytest.raises(TrainConfigError, match=r"--layer 9 is out of range: .* has 4 decoder layers \(0..3\)"):
        run(tiny_args(tmp_path / "x", layer=9))


def test_a_site_the_model_lacks_is_a_clear_error(load_saved_lm, tiny_args, saved_lm, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=1000)).save_pretrained(gpt2)
    load_saved_lm()[1].save_pretrained(gpt2)
    with pytest.raises(SiteError, match="cannot find the decoder layers of GPT2LMHeadModel"):
        run(tiny_args(tmp_path / "x", model=gpt2, layer=1))


def test_an_empty_dataset_or_a_missing_text_column_is_a_clear_error(tiny_args, saved_lm, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n' * 20)
    with pytest.raises(DataError, match="yields no text in column 'text'"):
        run(tiny_args(tmp_path / "x", dataset=empty))
    other = tmp_path / "other.jsonl"
    other.write_text('{"content": "hello world"}\n' * 20)
    with pytest.raises(DataError, match=r"no column 'text'; its columns are \['content'\]. Pass --text-column"):
        run(tiny_args(tmp_path / "y", dataset=other))


def test_a_buffer_too_big_for_memory_is_a_clear_error(tiny_args, saved_lm, tmp_path):
    with pytest.raises(BufferMemoryError, match="Lower --buffer-size"):
        run(tiny_args(tmp_path / "x", buffer_size=10**12))


def test_resuming_with_a_different_config_or_without_a_checkpoint_is_refused(
    tiny_args, finished_run, saved_lm, tmp_path
):
    out, _ = finished_run
    with pytest.raises(hf_sae.errors.ResumeError, match="k: run has 8, you passed 16"):
        run(["--resume", str(out), "--k", "16"])
    with pytest.raises(hf_sae.errors.ResumeError, match="no train_config.yaml"):
        run(["--resume", str(tmp_path)])
    with pytest.raises(TrainConfigError, match="already exists"):  # and a new run never overwrites an old one
        run(tiny_args(out))


def test_latent_parallel_run_trains_the_same_sae_and_resumes_on_another_process_count(tiny_args, saved_lm, tmp_path):
    """--shard-latents on 2 gloo processes: every process reads the one data stream, holds half of the SAE, and the
    saved SAE equals a one-process run's (up to float sums). The checkpoints hold whole SAEs: a resume from one
    of them on 3 processes finishes with the same SAE again."""
    options = {"tokens": 128 * 12, "checkpoint_every": 5, "eval_lm_windows": 0, "eval_tokens": 256}
    reference = tmp_path / "whole"
    run(tiny_args(reference, **options))
    expected = load_file(reference / "model.safetensors")

    out = tmp_path / "sharded"
    proc = torchrun(*tiny_args(out, shard_latents=True, **options))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "each SAE split by latent over the 2 process(es)" in proc.stdout
    checkpoint = HierarchicalSAE.from_pretrained(ckpt.latest_checkpoint(out) / "sae_0")
    assert checkpoint.config.d_sae == 128  # an ordinary, whole SAE
    for name, value in load_file(out / "model.safetensors").items():
        assert (value - expected[name]).abs().max() <= 1e-5, name
    assert json.loads((out / "metrics.json").read_text())["run"]["tokens"] == 128 * 12

    ckpt.latest_checkpoint(out).rename(out / "checkpoints" / "step-99999999-removed")  # resume from step 10
    proc = torchrun("--resume", str(out), processes=3)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    for name, value in load_file(out / "model.safetensors").items():
        assert (value - expected[name]).abs().max() <= 1e-5, name


def test_shard_latents_refuses_an_sae_it_cannot_split_before_writing_anything(tiny_args, saved_lm, tmp_path):
    out = tmp_path / "kron"
    with pytest.raises(TrainConfigError, match=r"--shard-latents: SAE .*KronSAE.* cannot be split by latent"):
        run(tiny_args(out, shard_latents=True, sae="arch=kron,base_dim=2,ext_dim=4"))
    assert not out.exists()
