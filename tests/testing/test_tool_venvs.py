"""Tool venvs (hf_sae.testing.tool_venvs): made once, reused while stamped, rebuilt when half made or unusable."""

from __future__ import annotations

import json

import pytest

from hf_sae.testing.tool_venvs import READY, tool_python


@pytest.mark.slow
def test_a_tool_venv_is_made_once_reused_and_rebuilt_when_half_made(tmp_path):
    python = tool_python("empty", [], root=tmp_path)
    assert python.exists() and json.loads((python.parents[1] / READY).read_text()) == {"requirements": []}
    sentinel = python.parents[1] / "sentinel"
    sentinel.write_text("kept")
    assert tool_python("empty", [], root=tmp_path) == python and sentinel.exists()  # reused, not rebuilt

    (python.parents[1] / READY).unlink()  # as if a creation had been killed before its stamp
    assert tool_python("empty", [], root=tmp_path, probe="raise SystemExit(1)") == python
    assert not sentinel.exists() and (python.parents[1] / READY).is_file()

    (python.parents[1] / READY).unlink()  # a venv made by hand that works is adopted as it is
    sentinel.write_text("kept")
    tool_python("empty", [], root=tmp_path, probe="import sys")
    assert sentinel.exists()


@pytest.mark.slow
def test_a_failing_install_names_the_command_and_leaves_no_ready_venv(tmp_path):
    missing = str(tmp_path / "no-such-package-1.0-py3-none-any.whl")
    with pytest.raises(RuntimeError, match="no-such-package"):
        tool_python("broken", [[missing]], root=tmp_path)
    assert not (tmp_path / "broken" / READY).exists()
