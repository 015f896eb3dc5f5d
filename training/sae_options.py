"""The SAE config fields a training run may set, read from the registered architectures, and how their values
are read from text (a ``--sae k=v`` entry, a YAML value): no SAE field is declared in training.

:func:`sae_fields` lists, over every trainable architecture, the fields of its config class that are
hyperparameters (not provenance such as ``d_in`` or ``hook_layer``, which training fills in), with their type,
training's default and the help text of the config class's docstring. :func:`coerce` reads a value as a field type.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from typing import Any

from hf_sae.configuration_sae import SAEConfig
from hf_sae.errors import TrainConfigError
from hf_sae.registry import architectures

# Training's defaults for SAE fields whose config-class default is for published SAEs (16384 latents, k=64):
# the embedded CPU run trains a smaller SAE.
SAE_DEFAULTS = {"d_sae": 4096, "k": 32}
# Fields whose training default depends on the run (training/saes.py), shown as such in --help.
DERIVED_DEFAULTS = {
    "dead_tokens": "min(10M, tokens // 10), at least one step's tokens",
    "l0_warmup_steps": "min(10k, steps // 10)",
}


def parse_count(text: Any) -> int:
    """'1e9', '10M', '2_000_000', 4096 -> int. Used for --tokens and other large counts."""
    if isinstance(text, bool):
        raise TrainConfigError(f"expected a count such as 1e9 or 10M, got {text!r}.")
    if isinstance(text, int):
        return int(text)
    if isinstance(text, float):
        if not text.is_integer():
            raise TrainConfigError(f"expected a whole count, got {text!r}.")
        return int(text)
    match = re.fullmatch(r"\s*([0-9_.eE+]+)\s*([kKmMbBgG]?)\s*", str(text))
    if not match:
        raise TrainConfigError(f"cannot read {text!r} as a count; write e.g. 1e9, 10M, 500k or 2_000_000.")
    number = (
        float(match.group(1).replace("_", "")) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}[match.group(2).lower()]
    )
    if not number.is_integer():
        raise TrainConfigError(f"{text!r} is not a whole count.")
    return int(number)


class Count(int):
    """An int field that also reads '1e9', '10M', '2_000_000' (argparse and YAML call it on the raw text)."""

    def __new__(cls, value: Any) -> Count:
        return super().__new__(cls, parse_count(value))


def _trainable_config_classes() -> list[type[SAEConfig]]:
    return [a.config_class for a in architectures() if a.trainable]


def _field_docs(cls: type) -> dict[str, str]:
    """``name (`type`, ...): text`` entries of a transformers-style docstring's Args section, over the MRO."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        text = klass.__doc__ or ""
        for match in re.finditer(r"^\s{8}(\w+) \(`[^)]*\)?[^:]*:\s*(.*(?:\n\s{12,}.*)*)", text, re.M):
            docs[match.group(1)] = " ".join(match.group(2).split())
    return docs


def sae_annotations(cls: type[SAEConfig]) -> dict[str, Any]:
    """The evaluated annotations of the fields SAEConfig and its subclasses declare (not transformers' own)."""
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        if not (isinstance(klass, type) and issubclass(klass, SAEConfig)):
            continue
        namespace = vars(sys.modules[klass.__module__])
        for name, annotation in vars(klass).get("__annotations__", {}).items():
            value = eval(annotation, namespace) if isinstance(annotation, str) else annotation
            if typing.get_origin(value) is not typing.ClassVar:
                hints[name] = value
    return hints


def sae_fields() -> dict[str, tuple[Any, Any, str]]:
    """The SAE config fields a user may set: name -> (annotation, training's default, help), over every trainable
    architecture (provenance fields such as d_in or hook_layer are filled by training)."""
    found: dict[str, tuple[Any, Any, str]] = {}
    owners: dict[str, list[str]] = {}
    for cls in _trainable_config_classes():
        hints = sae_annotations(cls)
        docs = _field_docs(cls)
        for f in dataclasses.fields(cls):
            if f.name not in hints or f.name in SAEConfig.provenance_fields or not f.init:
                continue
            owners.setdefault(f.name, []).append(cls.model_type)
            if f.name not in found:
                default = SAE_DEFAULTS.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
                default = DERIVED_DEFAULTS.get(f.name, default)
                found[f.name] = (hints[f.name], default, docs.get(f.name, f.name.replace("_", " ")))
    every = {cls.model_type for cls in _trainable_config_classes()}
    return {
        name: (annotation, default, text + ("" if set(owners[name]) == every else f" [{', '.join(owners[name])}]"))
        for name, (annotation, default, text) in found.items()
    }


def inner_type(annotation: Any) -> Any:
    """``X | None`` -> X."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def coerce(annotation: Any, value: Any, where: str) -> Any:
    """A YAML or ``--sae k=v`` value as the field type ``annotation`` (text is read as argparse would read it)."""
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
        return None
    kind = inner_type(annotation)
    try:
        if typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            items = value if isinstance(value, list) else str(value).replace("+", " ").split()
            return [coerce(item, v, where) for v in items]
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
                return str(value).lower() in ("true", "1", "yes", "on")
            raise ValueError(value)
        if kind in (int, Count):
            if isinstance(value, float) and not value.is_integer() or isinstance(value, bool):
                raise ValueError(value)
            return parse_count(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if kind is str:
            return str(value)
    except TrainConfigError as error:
        raise TrainConfigError(f"{where}: {error}") from None
    except (TypeError, ValueError):
        name = getattr(kind, "__name__", str(kind))
        raise TrainConfigError(f"{where}: cannot read {value!r} as {name}.") from None
    return value
