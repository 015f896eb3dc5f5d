"""The training CLI and YAML files: the parser generated from the config dataclasses and the registered SAE config
classes (``transformers.HfArgumentParser``), ``--config`` YAML, ``--import`` of a user's architecture, and the saved
``train_config.yaml`` of a run.

    python -m training.train --help                         # every option, its default and what it does
    python -m training.train --config runs.yaml --k 32      # YAML first, flags win
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from hf_sae._io import write_text_atomic
from hf_sae.errors import TrainConfigError
from hf_sae.registry import import_architectures, resolve_architecture, training_names

from .config import RunOptions, SAEPlacement, TrainConfig, flag, make_config
from .sae_options import Count, inner_type, sae_fields


class _Parser(HfArgumentParser):
    """argparse, but a bad command line is a :class:`TrainConfigError` (one line, exit 2), not usage + exit."""

    def error(self, message: str):
        message = message.replace("invalid Count value", "not a count (write e.g. 64, 4096, 1e9 or 10M)")
        raise TrainConfigError(f"{message}. Run `python -m training.train --help` for the options.")


def _sae_options_dataclass() -> type:
    """A dataclass of every SAE config field (default None: not given), made from the registered config classes;
    integer fields read counts like --tokens (65536, 64k, 1e6)."""
    fields_ = []
    for name, (annotation, default, text) in sae_fields().items():
        kind = inner_type(annotation)
        kind = Count if kind is int else kind
        metadata = {"help": f"{text} (default: {default!r})"}
        if kind is bool:
            metadata.update(nargs="?", const=True)
        fields_.append((name, kind | None, dataclasses.field(default=None, metadata=metadata)))
    return dataclasses.make_dataclass("SAEOptions", fields_)


def trainable_names() -> list[str]:
    """The ``--sae arch=NAME`` names of the architectures hf-sae can train (JumpReLU SAEs are loaded, not trained)."""
    return [name for name in training_names() if resolve_architecture(name)[0].trainable]


def build_parser() -> HfArgumentParser:
    """The CLI, generated from :class:`RunOptions`, :class:`SAEPlacement` and the SAE config classes."""
    sae_options = _sae_options_dataclass()
    sae_options._argument_group_name = (
        "every SAE: its config's fields (defaults of each --sae entry; [..] = only these architectures). "
        f"Architectures: {', '.join(trainable_names())}"
    )
    parser = _Parser(
        [RunOptions, SAEPlacement, sae_options],
        prog="python -m training.train",
        description="Train sparse autoencoders on a language model's activations. With no arguments: the embedded "
        "CPU run (real Gemma 3 270M and bundled English text, a few minutes). Precedence: defaults < --config YAML < "
        "flags. The same script runs under `accelerate launch` on N processes.",
    )
    for name, (annotation, _, _) in sae_fields().items():
        if inner_type(annotation) is bool:
            parser.add_argument(
                flag("no_" + name), dest=name, action="store_false", help=f"the same as {flag(name)} false"
            )
    parser.add_argument(
        "--sae",
        dest="saes",
        action="append",
        metavar="KEY=VALUE,...",
        help="one SAE of the run (repeat for several, one harvest): its placement and config fields, e.g. "
        "layer=6,site=mlp,arch=kron,base_dim=2,k=64 (list values joined by '+': budgets=8+16+32); keys it leaves "
        "out take the flags above",
    )
    parser.add_argument("--config", metavar="YAML", help="YAML file of option: value (keys as the flags, - or _)")
    for action in parser._actions:
        documented = action.help and "(default: " in action.help
        if action.dest != "help" and not documented and not action.option_strings[0].startswith("--no"):
            action.help = f"{action.help or ''} (default: {action.default!r})".strip()
        if action.dest != "help":  # only what the user gave reaches the namespace (YAML < flags)
            action.default = argparse.SUPPRESS
    return parser


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file of options -> {name: value} (keys with - or _)."""
    path = Path(path)
    if not path.is_file():
        raise TrainConfigError(f"--config {path}: no such file. Pass the path of a YAML file of option: value lines.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise TrainConfigError(f"--config {path}: not valid YAML ({error}).") from None
    if not isinstance(data, dict):
        raise TrainConfigError(f"{path}: expected a mapping of option: value, got {type(data).__name__}.")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def save_yaml(config: TrainConfig, path: Path) -> str:
    """The YAML text of a config (and write it to ``path`` atomically)."""
    text = yaml.safe_dump(config.to_dict(), sort_keys=False)
    write_text_atomic(path, text)
    return text


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, dict[str, Any]]:
    """CLI (+ YAML) -> (validated TrainConfig, the options the user set explicitly)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--imports", "--import", nargs="+", default=[])
    early.add_argument("--config")
    known, _ = early.parse_known_args(argv)
    explicit: dict[str, Any] = load_yaml(known.config) if known.config else {}
    for target in [*explicit.get("imports", []), *known.imports]:
        import_architectures(target)
    args = vars(build_parser().parse_args(argv))
    args.pop("config", None)
    explicit.update(args)
    return make_config(explicit), explicit
