"""hf-sae installed like a library (slow: builds and installs the package into a fresh venv).

The model card's install line, run as written in a folder that holds a copy of the repository as ./hf-sae, installs a
package whose `hf-sae train` trains, with no top-level `training` package (the folder ships as hf_sae.training).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hf_sae.cards import install_instructions

REPO = Path(__file__).resolve().parents[1]


def _copy_checkout(target: Path) -> None:
    """The working tree as a fresh clone would have it plus uncommitted files (git's tracked and unignored files)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (item.decode() for item in listed)):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


@pytest.mark.slow
def test_the_card_install_line_installs_a_library_whose_hf_sae_train_trains(tmp_path, tiny_args):
    line = install_instructions().splitlines()[-1]
    if not line.startswith("pip install ./hf-sae"):
        pytest.fail(f"the card's install line changed ({line!r}); update this test to run it")
    _copy_checkout(tmp_path / "hf-sae")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ""}
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "torch==2.13.0"], check=True, env=env, cwd=tmp_path, timeout=900)  # the CPU build on disk
    done = subprocess.run([*pip, *line.split()[2:]], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr

    elsewhere = tmp_path / "elsewhere"  # not the repository: only what the wheel installed can be imported
    elsewhere.mkdir()
    probe = (
        "import importlib.util, hf_sae, hf_sae.training.train, hf_sae.training.harvest; "
        "print(importlib.util.find_spec('training'), hf_sae.__file__)"
    )
    done = subprocess.run([str(python), "-c", probe], env=env, cwd=elsewhere, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    found, location = done.stdout.split()
    assert found == "None" and str(venv) in location  # no top-level `training`; hf_sae from the venv
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert not (site / "training").exists() and (site / "hf_sae" / "training" / "train.py").is_file()

    out = tmp_path / "run"
    done = subprocess.run(
        [str(venv / "bin" / "hf-sae"), "train", *tiny_args(out)],
        env=env,
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
