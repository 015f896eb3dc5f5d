"""The architecture registry: the one place the rest of hf-sae learns which SAE architectures exist.

An architecture is a pair of classes — a :class:`~hf_sae.configuration_sae.SAEConfig` subclass in
``configuration_<name>.py`` and a :class:`~hf_sae.modeling_sae.SAEPreTrainedModel` subclass in ``modeling_<name>.py``
— registered once, at the end of its modeling file (or in a user's own file)::

    register_architecture(HierarchicalSAEConfig, HierarchicalSAE, presets={"hierarchical": {}, "topk": {...}})

Registering adds the pair to ``transformers.AutoConfig`` / ``AutoModel`` (keyed by the config's ``model_type``) and
to this registry, which everything else asks: ``from_pretrained`` (through the Auto classes), the model card (the
config's ``display_name`` / ``card_*`` methods), the converters (which architecture to build), training
(``--sae arch=NAME``: the ``model_type`` or a preset name; learning-rate scaling and initialisation come from the
model class) and the remote-code export (which source files hold the pair). Nowhere else is there a branch on
``model_type``.

A *preset* is a training name for a config with some fields fixed: ``topk`` is ``hierarchical_sae`` with
``hierarchical=False``. Preset names and ``model_type``s share one namespace.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, ModuleType
from typing import Any

from transformers import AutoConfig, AutoModel

from .configuration_sae import SAEConfig
from .errors import ArchitectureError
from .modeling_sae import SAEPreTrainedModel


@dataclass(frozen=True)
class Architecture:
    """One registered architecture: its config and model classes and its training presets."""

    name: str  # the model_type written into config.json, e.g. "hierarchical_sae"
    config_class: type[SAEConfig]
    model_class: type[SAEPreTrainedModel]
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    trainable: bool = True  # whether hf-sae's training step can train it (JumpReLU SAEs are loaded, not trained)

    @property
    def modules(self) -> tuple[ModuleType, ...]:
        """The source modules of the pair (config first), e.g. for the remote-code export."""
        found = [inspect.getmodule(self.config_class), inspect.getmodule(self.model_class)]
        return tuple(dict.fromkeys(module for module in found if module is not None))

    def build_config(self, preset: str | None = None, **fields: Any) -> SAEConfig:
        """A validated config: the preset's fixed fields (if any), then ``fields``; validation is the class's own.

        A field that contradicts the preset (``arch=topk`` with ``hierarchical=True``) is an error, not an override.
        """
        fixed = dict(self.presets.get(preset, {})) if preset is not None else {}
        clashes = sorted(key for key in fixed if key in fields and fields[key] != fixed[key])
        if clashes:
            raise ArchitectureError(
                f"arch={preset!r} fixes {', '.join(f'{k}={fixed[k]!r}' for k in clashes)}, but "
                f"{', '.join(f'{k}={fields[k]!r}' for k in clashes)} was given. Drop the field, or use "
                f"arch={self.name!r} and set it yourself."
            )
        return self.config_class(**{**fixed, **fields})


_REGISTRY: dict[str, Architecture] = {}
_NAMES: dict[str, tuple[str, str | None]] = {}  # training name -> (model_type, preset or None)


def register_architecture(
    config_class: type[SAEConfig],
    model_class: type[SAEPreTrainedModel],
    *,
    presets: Mapping[str, Mapping[str, Any]] | None = None,
) -> Architecture:
    """Register an SAE architecture with hf-sae and with ``transformers``' ``AutoConfig`` / ``AutoModel``.

    Args:
        config_class: a subclass of :class:`~hf_sae.SAEConfig` with its own ``model_type`` (a class attribute).
        model_class: a subclass of :class:`~hf_sae.SAEPreTrainedModel` whose ``config_class`` is ``config_class``.
        presets: training names for configs with fixed fields, e.g. ``{"topk": {"hierarchical": False}}``.

    Registering the same pair again is allowed (a module reloaded); another pair under a taken name is an error.
    Returns the :class:`Architecture` record.
    """
    if not (isinstance(config_class, type) and issubclass(config_class, SAEConfig)):
        raise ArchitectureError(
            f"register_architecture: {config_class!r} is not a subclass of hf_sae.SAEConfig; an architecture's "
            "config must derive from it (class MyConfig(hf_sae.SAEConfig): model_type = 'my_sae')."
        )
    if not (isinstance(model_class, type) and issubclass(model_class, SAEPreTrainedModel)):
        raise ArchitectureError(
            f"register_architecture: {model_class!r} is not a subclass of hf_sae.SAEPreTrainedModel; an "
            "architecture's model must derive from it."
        )
    name = config_class.model_type
    if not isinstance(name, str) or not name.isidentifier() or name == SAEConfig.model_type:
        raise ArchitectureError(
            f"register_architecture: {config_class.__name__}.model_type={name!r} must be a new identifier such as "
            "'my_sae' (not the base class's 'sae'); it is the model_type written into config.json."
        )
    if model_class.config_class is not config_class:
        raise ArchitectureError(
            f"register_architecture: {model_class.__name__}.config_class is {model_class.config_class.__name__}, "
            f"not {config_class.__name__}. Set `config_class = {config_class.__name__}` on the model class."
        )
    presets = {str(key): MappingProxyType(dict(value)) for key, value in (presets or {}).items()}
    for preset, fixed in presets.items():
        unknown = sorted(set(fixed) - config_class.field_names())
        if unknown:
            raise ArchitectureError(f"preset {preset!r} of {name} sets unknown field(s) {unknown}.")
    previous = _REGISTRY.get(name)
    if previous is not None and (previous.config_class, previous.model_class) != (config_class, model_class):
        same_source = (previous.config_class.__qualname__, previous.model_class.__qualname__) == (
            config_class.__qualname__,
            model_class.__qualname__,
        ) and previous.config_class.__module__ == config_class.__module__
        if not same_source:
            raise ArchitectureError(
                f"model_type {name!r} is already registered by {previous.config_class.__module__}."
                f"{previous.config_class.__name__}; give {config_class.__name__} another model_type."
            )
    for training_name in (name, *presets):
        owner = _NAMES.get(training_name)
        if owner is not None and owner[0] != name:
            raise ArchitectureError(
                f"architecture name {training_name!r} is already used by {owner[0]}; pick another preset name."
            )
    architecture = Architecture(name, config_class, model_class, MappingProxyType(presets), config_class.trainable)
    AutoConfig.register(name, config_class, exist_ok=True)
    AutoModel.register(config_class, model_class, exist_ok=True)
    _REGISTRY[name] = architecture
    _NAMES[name] = (name, None)
    for preset in presets:
        _NAMES[preset] = (name, preset)
    return architecture


def architectures() -> tuple[Architecture, ...]:
    """Every registered architecture, in registration order."""
    return tuple(_REGISTRY.values())


def model_types() -> tuple[str, ...]:
    """The ``model_type`` of every registered architecture (what an hf-sae config.json may name)."""
    return tuple(_REGISTRY)


def training_names() -> list[str]:
    """Every name ``--sae arch=NAME`` accepts: the ``model_type``s and the presets."""
    return list(_NAMES)


def resolve_architecture(name: str) -> tuple[Architecture, str | None]:
    """A training name (``model_type`` or preset) -> (the architecture, the preset or None)."""
    if name not in _NAMES:
        raise ArchitectureError(
            f"architecture {name!r} is not registered. Known: {', '.join(training_names())}. An architecture of "
            "your own must be registered first: hf_sae.register_architecture(MyConfig, MySAE) in a module you import."
        )
    model_type, preset = _NAMES[name]
    return _REGISTRY[model_type], preset


def architecture_of(obj: Any) -> Architecture:
    """The architecture of an SAE, a config, one of their classes, or a ``model_type`` / preset name."""
    if isinstance(obj, str):
        return resolve_architecture(obj)[0]
    if isinstance(obj, type) and issubclass(obj, SAEPreTrainedModel):
        obj = obj.config_class
    config = getattr(obj, "config", obj)
    model_type = getattr(config, "model_type", None)
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    raise ArchitectureError(
        f"{type(obj).__name__} {model_type!r} is not a registered hf-sae architecture; register it with "
        "hf_sae.register_architecture(ConfigClass, ModelClass)."
    )


def import_architectures(target: str) -> ModuleType:
    """Import a module by name, or a Python file by path, that registers architectures of its own (``--import``).

    A file is imported under its stem as the module name, as ``python file.py``'s neighbours would see it.
    """
    path = Path(target)
    if path.suffix == ".py":
        if not path.is_file():
            raise ArchitectureError(f"--import {target}: no such file.")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(target)
    except ImportError as error:
        raise ArchitectureError(f"--import {target}: cannot import it ({error}).") from None
