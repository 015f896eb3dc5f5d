"""What a run survives (training/): signals, kills at any moment, a full disk, a mount point as --out, two sessions
on one folder, damaged checkpoints, failed starts; and what it keeps (the first command, the finished metrics).

Kill and signal tests run the CLI in a subprocess (``python -c`` around ``training.train.main`` with the SAE step
wrapped so the kill comes at a known step). File-system tests mount a small tmpfs when they run as root and skip
(saying why) otherwise. Every resumed run is compared with an uninterrupted one, tensor by tensor.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_sae  # noqa: F401  (registers the SAE classes with AutoModel)
from hf_sae.errors import HfSaeError, NonFiniteActivationsError, ResumeError, TrainConfigError
from training import checkpoint as ckpt
from training import train as train_module
from training.cli import parse_args

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run(args: list[str]):
    cfg, explicit = parse_args(args)
    return train_module.train(cfg, explicit)


def cli(args: list[str], *, wrap_step: str = "", timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m training.train ARGS`` in a fresh process; ``wrap_step`` is code run after each SAE step, with
    ``count`` (steps of this session) and ``rank`` in scope."""
    script = (
        "import os, signal, sys\n"
        "import training.train as t\n"
        "step = t.training_step\n"
        "count = 0\n"
        "rank = int(os.environ.get('RANK', '0'))\n"
        "def wrapped_step(*args, **kwargs):\n"
        "    global count\n"
        "    out = step(*args, **kwargs)\n"
        "    count += 1\n" + "".join(f"    {line}\n" for line in wrap_step.splitlines()) + "    return out\n"
        "t.training_step = wrapped_step\n"
        "t.main(sys.argv[1:])\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


def last_line(proc: subprocess.CompletedProcess) -> str:
    return proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def uninterrupted(tiny_args, saved_lm, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reliability") / "uninterrupted"
    run(tiny_args(out))
    return out


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(path, size="64m")`` mounts a tmpfs at ``path`` (created); ``tmpfs.read_only(path)`` remounts it
    read-only. Everything is unmounted afterwards. Skips unless root can mount."""
    if os.geteuid() != 0:
        pytest.skip(f"mounting a tmpfs needs root; the tests run as uid {os.geteuid()}")
    mounted: list[Path] = []

    def mount(path: Path, size: str = "64m") -> Path:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(path)
        return path

    def read_only(path: Path) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)

    mount.read_only = read_only
    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# ------------------------------------------------------------------------------------ 1. the run folder's file system
def test_a_mount_point_under_a_read_only_parent_as_out_trains_resumes_and_overwrites(
    tiny_args, uninterrupted, tmpfs, tmp_path
):
    parent = tmpfs(tmp_path / "parent")
    out = parent / "run"
    out.mkdir()
    tmpfs(out)
    tmpfs.read_only(parent)  # nothing may be staged beside --out: Errno 18 (cross-device) / 30 (read-only) before
    run(tiny_args(out))
    assert_same_weights(uninterrupted, out)
    run(["--resume", str(out)])  # a finished run resumes (and finishes again) in place
    run(tiny_args(out, overwrite=True))  # and is replaced in place: a mount point cannot be deleted
    assert_same_weights(uninterrupted, out)
    assert sorted(os.listdir(parent)) == ["run"]


# --------------------------------------------------------------------------------------------------- 2. signals
@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_a_checkpoint_exits_with_one_line_and_the_run_resumes_bit_identically(
    tiny_args, uninterrupted, tmp_path, signum, status
):
    out = tmp_path / "stopped"
    proc = cli(tiny_args(out), wrap_step=f"if count == 15:\n    os.kill(os.getpid(), {int(signum)})")
    assert proc.returncode == status, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = last_line(proc)
    assert line.startswith(f"hf-sae: stopped by {signum.name} at step 15 of 30"), line
    assert f"python -m training.train --resume {out}" in line
    assert ckpt.latest_checkpoint(out).name == "step-00000015"  # the steps since checkpoint 10 are kept
    assert not (out / "model.safetensors").exists()

    run(["--resume", str(out)])
    assert_same_weights(uninterrupted, out)
    command = (out / "command.txt").read_text()  # the first session's command, for the card's "reproduce"
    assert command.startswith("python -m training.train --model") and "--resume" not in command
    info = json.loads((out / "metrics.json").read_text())["run"]
    assert info["command"] == command.strip() and info["tokens_per_second"] > 0
    assert info["resumed_at_step"] == 15 and info["session_tokens_per_second"] > 0


@pytest.mark.slow
def test_ctrl_c_from_outside_stops_a_long_run_at_the_next_step(tiny_args, tmp_path):
    out = tmp_path / "long"
    args = tiny_args(out, tokens=128 * 100_000, checkpoint_every=10)
    command = [sys.executable, "-m", "training.train", *map(str, args)]
    proc = subprocess.Popen(command, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 200
        while ckpt.latest_checkpoint(out) is None and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "stopped by SIGINT at step" in stderr.strip().splitlines()[-1]
    assert ckpt.latest_checkpoint(out) is not None


def test_a_signal_during_setup_is_one_line_and_leaves_no_folder(tiny_args, tmp_path, monkeypatch, capsys):
    original = train_module.load_language_model

    def interrupted_load(cfg, device):
        model = original(cfg, device)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the model loads
        return model

    monkeypatch.setattr(train_module, "load_language_model", interrupted_load)
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:
        train_module.main(tiny_args(out))
    assert exit_info.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hf-sae: stopped by SIGINT") and "nothing to resume" in err[-1]
    assert not out.exists()


@pytest.mark.slow
def test_ddp_ranks_agree_to_stop_when_only_one_of_them_gets_sigterm(tiny_args, saved_lm, tmp_path):
    """torchrun, 2 gloo ranks: rank 1 alone is signalled after step 7; both stop at the next agreed step (9, with
    --log-every 3), the main process writes the checkpoint, nothing hangs, and the run resumes on 2 ranks."""
    from tests.training.test_train import torchrun

    script = tmp_path / "signalled.py"
    script.write_text(
        "import os, signal, sys\n"
        "import training.train as t\n"
        "step = t.training_step\n"
        "count = 0\n"
        "def wrapped_step(*args, **kwargs):\n"
        "    global count\n"
        "    out = step(*args, **kwargs)\n"
        "    count += 1\n"
        "    if count == 7 and os.environ['RANK'] == '1':\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return out\n"
        "t.training_step = wrapped_step\n"
        "t.main(sys.argv[1:])\n"
    )
    out = tmp_path / "ddp"
    args = tiny_args(out, tokens=128 * 2 * 12, checkpoint_every=100, log_every=3, eval_lm_windows=0)
    env = {**ENV, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), *map(str, args)]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode != 0
    assert "hf-sae: stopped by SIGTERM at step 9 of 12" in proc.stderr, proc.stderr[-4000:]
    assert ckpt.latest_checkpoint(out).name == "step-00000009"
    proc = torchrun("--resume", str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert json.loads((out / "metrics.json").read_text())["run"]["resumed_at_step"] == 9


# ------------------------------------------------------------------------------------------- 3. failed starts
def test_overwrite_with_a_bad_dataset_leaves_the_finished_run_untouched(tiny_args, uninterrupted, tmp_path):
    before = {p.relative_to(uninterrupted): p.read_bytes() for p in uninterrupted.rglob("*") if p.is_file()}
    with pytest.raises(HfSaeError, match="no such file or folder"):
        run(tiny_args(uninterrupted, overwrite=True, dataset=tmp_path / "typo.jsonl"))
    with pytest.raises(HfSaeError, match="Lower --buffer-size"):  # fails after the data is opened
        run(tiny_args(uninterrupted, overwrite=True, buffer_size=10**12))
    after = {p.relative_to(uninterrupted): p.read_bytes() for p in uninterrupted.rglob("*") if p.is_file()}
    assert after == before


def test_a_failed_start_leaves_no_folder_and_a_folder_without_a_checkpoint_is_no_run(
    tiny_args, uninterrupted, tmp_path
):
    out = tmp_path / "new" / "run"
    with pytest.raises(HfSaeError, match="Lower --buffer-size"):
        run(tiny_args(out, buffer_size=10**12))
    assert not (tmp_path / "new").exists()

    leftover = tmp_path / "leftover"  # what a start killed before its first checkpoint leaves
    leftover.mkdir()
    (leftover / "train_config.yaml").write_text((uninterrupted / "train_config.yaml").read_text())
    with pytest.raises(ResumeError, match="no checkpoint") as error:
        run(["--resume", str(leftover)])
    assert "--overwrite" not in str(error.value) and "train_config.yaml" in str(error.value)
    run(tiny_args(leftover))  # the same command again: no --overwrite needed
    assert_same_weights(uninterrupted, leftover)


# ------------------------------------------------------------------------------------- 4. checkpoint verification
def test_resume_falls_back_to_the_newest_intact_checkpoint_and_says_so(tiny_args, uninterrupted, tmp_path, caplog):
    out = tmp_path / "damaged"
    proc = cli(tiny_args(out), wrap_step="if count == 25:\n    os.kill(os.getpid(), signal.SIGKILL)")
    assert proc.returncode == -signal.SIGKILL
    assert [p.name for p in ckpt.checkpoint_dirs(out)] == ["step-00000010", "step-00000020"]
    (out / "checkpoints" / "step-00000020" / "optimizer.pt").write_bytes(b"")  # zero length: a bare EOFError before
    with caplog.at_level("WARNING"):
        run(["--resume", str(out)])
    assert "step-00000020" in caplog.text and "optimizer.pt" in caplog.text and "step-00000010" in caplog.text
    assert_same_weights(uninterrupted, out)


def test_a_flipped_byte_is_caught_and_no_intact_checkpoint_is_a_clear_error(tiny_args, tmp_path):
    out = tmp_path / "flipped"
    proc = cli(tiny_args(out), wrap_step="if count == 15:\n    os.kill(os.getpid(), signal.SIGKILL)")
    assert proc.returncode == -signal.SIGKILL
    weights = out / "checkpoints" / "step-00000010" / "sae_0" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other content
    weights.write_bytes(bytes(data))
    with pytest.raises(ResumeError, match=r"no intact checkpoint.*step-00000010.*sae_0/model.safetensors"):
        run(["--resume", str(out)])


# --------------------------------------------------------------------------------------------------- 5. pruning
def test_a_kill_while_old_checkpoints_are_pruned_leaves_no_partial_checkpoint(tiny_args, uninterrupted, tmp_path):
    out = tmp_path / "pruned"
    # shutil.rmtree of a checkpoint deletes one file, then the process is killed
    proc = cli(
        tiny_args(out),
        wrap_step=(
            "if count == 1:\n"
            "    import shutil\n"
            "    from pathlib import Path\n"
            "    rmtree = shutil.rmtree\n"
            "    def dying_rmtree(path, *args, **kwargs):\n"
            "        path = Path(path)\n"
            "        if path.parent.name == 'checkpoints' and 'step-' in path.name:\n"
            "            next(p for p in path.rglob('*') if p.is_file()).unlink()\n"
            "            os.kill(os.getpid(), signal.SIGKILL)\n"
            "        return rmtree(path, *args, **kwargs)\n"
            "    shutil.rmtree = dying_rmtree\n"
        ),
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    for folder in ckpt.checkpoint_dirs(out):  # every checkpoint under a valid name is whole
        assert ckpt.checkpoint_problem(folder) is None, folder
    run(["--resume", str(out)])
    assert_same_weights(uninterrupted, out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000020", "step-00000030"]


# ------------------------------------------------------------------------------------------------- 6. history
def test_resuming_a_finished_run_keeps_its_metrics_command_and_card(tiny_args, uninterrupted, tmp_path):
    kept = {name: (uninterrupted / name).read_bytes() for name in ("metrics.json", "command.txt", "README.md")}
    assert json.loads(kept["metrics.json"])["run"]["tokens_per_second"] > 0
    run(["--resume", str(uninterrupted)])
    for name, data in kept.items():
        assert (uninterrupted / name).read_bytes() == data, name
    assert "--resume" not in kept["README.md"].decode()


# ---------------------------------------------------------------------------------------------------- 8. locks
def test_a_second_session_on_a_run_folder_is_refused_naming_the_holder(uninterrupted):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from training.run_folder import lock_run_dir\n"
            "with lock_run_dir(sys.argv[1]):\n"
            "    print('locked', flush=True)\n"
            "    time.sleep(120)\n",
            str(uninterrupted),
        ],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(HfSaeError, match=rf"in use by another hf-sae process \(pid {holder.pid}"):
            run(["--resume", str(uninterrupted)])
    finally:
        holder.kill()
        holder.wait()
    run(["--resume", str(uninterrupted)])  # the holder is gone (even by SIGKILL): the lock is free


def test_resume_refuses_another_out_and_a_checkpoint_folder(uninterrupted, tmp_path):
    with pytest.raises(ResumeError, match=r"--out .*other differs from the run folder"):
        run(["--resume", str(uninterrupted), "--out", str(tmp_path / "other")])
    step = ckpt.latest_checkpoint(uninterrupted)
    with pytest.raises(ResumeError, match=rf"pass the run folder: --resume {re.escape(str(uninterrupted))}$"):
        run(["--resume", str(step)])
    run(["--resume", str(uninterrupted), "--out", str(uninterrupted)])  # the same folder is fine


def test_a_failure_says_which_checkpoint_is_intact_or_that_there_is_none(tiny_args, tmp_path, monkeypatch):
    original = train_module.load_language_model
    poisoned = {"from": 10**9, "batches": 0}

    def load_with_nans(cfg, device):
        model, tokenizer = original(cfg, device)

        def hook(module, args, output):
            poisoned["batches"] += 1
            return output * float("nan") if poisoned["batches"] >= poisoned["from"] else None

        model.model.layers[1].register_forward_hook(hook)
        return model, tokenizer

    monkeypatch.setattr(train_module, "load_language_model", load_with_nans)
    out = tmp_path / "nan"
    poisoned.update(batches=0, **{"from": 30})  # NaN from the 30th LM batch on: after a few checkpoints
    intact = rf"step-\d{{8}} \(step \d+\) is intact.*--resume {re.escape(str(out))}$"
    with pytest.raises(NonFiniteActivationsError, match=intact):
        run(tiny_args(out, tokens=128 * 200, checkpoint_every=5, max_nonfinite_batches=3))
    poisoned.update(batches=0)
    with pytest.raises(NonFiniteActivationsError, match="No checkpoint was written yet") as error:
        run(tiny_args(tmp_path / "nan-early", tokens=128 * 200, checkpoint_every=190, max_nonfinite_batches=3))
    assert "intact" not in str(error.value)


# ------------------------------------------------------------------------------------------------ 9. a full disk
def test_a_full_disk_is_one_line_naming_the_file_and_the_intact_checkpoint(
    tiny_args, uninterrupted, tmpfs, tmp_path, monkeypatch, capsys
):
    out = tmpfs(tmp_path / "small", size="16m")
    ballast = out / "ballast"
    step = train_module.training_step
    count = [0]

    def filling_step(*args, **kwargs):  # after step 15 the disk fills up, all but 100 KiB
        result = step(*args, **kwargs)
        count[0] += 1
        if count[0] == 15:
            with open(ballast, "wb") as handle:
                try:
                    while True:
                        handle.write(b"\0" * 65536)
                        handle.flush()
                except OSError:
                    pass
            os.truncate(ballast, max(0, ballast.stat().st_size - 100 * 1024))
        return result

    monkeypatch.setattr(train_module, "training_step", filling_step)
    with pytest.raises(SystemExit) as exit_info:
        train_module.main(tiny_args(out))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("hf-sae: error: cannot write ") and "step-00000020" in err and "disk is full" in err, err
    assert "step-00000010 (step 10) is intact" in err and f"--resume {out}" in err
    assert [p.name for p in ckpt.checkpoint_dirs(out)] == ["step-00000010"]

    ballast.unlink()
    monkeypatch.setattr(train_module, "training_step", step)
    run(["--resume", str(out)])
    assert_same_weights(uninterrupted, out)


def test_trackers_and_counts_are_checked_before_anything_runs(tiny_args, tmp_path, capsys):
    with pytest.raises(TrainConfigError, match=r"--trackers bogus: accelerate has no such tracker.*tensorboard"):
        parse_args(tiny_args(tmp_path / "x", trackers="bogus"))
    cfg, _ = parse_args(["--d-sae", "1e4", "--k", "16"])  # counts read like --tokens
    assert cfg.saes[0].config["d_sae"] == 10_000
    with pytest.raises(HfSaeError, match=r"d_sae=100000000000000000000 is too large"):
        run(tiny_args(tmp_path / "huge", d_sae="1e20"))
    with pytest.raises(HfSaeError, match=r"needs .* GiB .* free"):
        run(tiny_args(tmp_path / "big", d_sae="1e12"))
    assert not (tmp_path / "huge").exists() and not (tmp_path / "big").exists()
    with pytest.raises(SystemExit) as exit_info:
        train_module.main(["--k", "abc"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hf-sae: error: argument --k: ") and "\n" not in err
