"""Every `python -m training.train ...` command in the README and docs/results.md still parses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from training.cli import parse_args

REPO = Path(__file__).resolve().parents[2]


def _documented_commands() -> list[str]:
    commands = []
    for name in ("README.md", "docs/results.md"):
        text = (REPO / name).read_text().replace("\\\n", " ")
        for match in re.finditer(r"-m training\.train((?: [^`#\n|]*)?)", text):
            arguments = match.group(1).strip()
            if not re.search(r"--(config|resume|help)\b", arguments):  # need a file or a run, or exit
                commands.append(arguments)
    return commands


COMMANDS = _documented_commands()


def test_the_docs_name_training_commands():
    assert len(COMMANDS) >= 4 and any("--sae" in c for c in COMMANDS)


@pytest.mark.parametrize("arguments", COMMANDS)
def test_a_documented_training_command_parses(arguments, monkeypatch):
    if "--activations" in arguments:  # the flags must parse; the cache the docs name is not here to read
        import training.activation_cache as cache

        monkeypatch.setattr(cache, "cache_defaults", lambda values: values)
        monkeypatch.setattr(cache, "check_config_against_cache", lambda *args, **kwargs: None)
    cfg, _ = parse_args(shlex.split(arguments))
    assert cfg.saes
