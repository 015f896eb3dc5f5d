"""hf_sae.hardware.use_huge_pages: after it, a large tensor lies on transparent huge pages; with the variable set to
0 by the user, or once torch has read the setting, nothing changes and it says so.

Each case runs in a fresh interpreter: torch reads the setting once per process, at its first large allocation."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from hf_sae.hardware import _anon_huge_kib, use_huge_pages

    if sys.argv[1] == "late":
        torch.ones(64 * 2**20, dtype=torch.uint8)  # torch reads the setting here, before use_huge_pages
    on = use_huge_pages()
    before = _anon_huge_kib()
    x = torch.ones(16 * 2**20)  # 64 MiB, every page touched
    print(on, use_huge_pages() == on, _anon_huge_kib() - before >= 32 * 1024)
    """
)

SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _run(case: str, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | env
    done = subprocess.run([sys.executable, "-c", SCRIPT, case], capture_output=True, text=True, env=environment)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or not SETTING.exists() or "[never]" in SETTING.read_text(),
    reason="transparent huge pages are off (or not Linux) here",
)
def test_large_tensors_land_on_huge_pages_only_when_it_could_take_effect():
    assert _run("early") == "True True True"  # on, the answer kept, and a 64 MiB tensor is mostly huge pages
    assert _run("early", THP_MEM_ALLOC_ENABLE="0") == "False True False"  # the user's 0 is kept
    assert _run("late") == "False True False"  # torch had read the setting already: reported, nothing changed
