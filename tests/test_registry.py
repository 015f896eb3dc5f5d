"""The architecture registry: what registering checks, names and presets, and what the built-ins register."""

from __future__ import annotations

from typing import ClassVar

import pytest
from transformers import AutoConfig, AutoModel

import hf_sae
from hf_sae import HierarchicalSAE, HierarchicalSAEConfig, KronSAE, SAEConfig, SAEPreTrainedModel
from hf_sae.errors import ArchitectureError
from hf_sae.registry import architecture_of, architectures, register_architecture, resolve_architecture, training_names


def test_the_builtin_architectures_are_registered_with_the_auto_classes():
    names = {architecture.name for architecture in architectures()}
    assert {"hierarchical_sae", "kron_sae", "jumprelu_sae"} <= names
    for architecture in [a for a in architectures() if a.model_class.__module__.startswith("hf_sae.")]:
        assert type(AutoConfig.for_model(architecture.name)) is architecture.config_class
        assert AutoModel._model_mapping[architecture.config_class] is architecture.model_class
        assert getattr(hf_sae, architecture.model_class.__name__) is architecture.model_class  # exported by name
    assert {"hierarchical", "topk", "kron", "jumprelu"} <= set(training_names())


def test_presets_fix_fields_and_refuse_a_contradiction():
    architecture, preset = resolve_architecture("topk")
    assert architecture.model_class is HierarchicalSAE and preset == "topk"
    assert architecture.build_config(preset, d_sae=64, k=4).hierarchical is False
    with pytest.raises(ArchitectureError, match=r"arch='topk' fixes hierarchical=False, but hierarchical=True"):
        architecture.build_config(preset, d_sae=64, k=4, hierarchical=True)
    assert architecture_of(KronSAE).name == "kron_sae" and architecture_of("kron").model_class is KronSAE


def test_an_unknown_architecture_names_the_known_ones():
    with pytest.raises(ArchitectureError, match=r"'nosuch' is not registered. Known: .*hierarchical_sae.*topk"):
        resolve_architecture("nosuch")


class _OtherConfig(SAEConfig):
    model_type: ClassVar[str] = "hierarchical_sae"  # taken by the built-in


class _Model(SAEPreTrainedModel):
    config_class = _OtherConfig


class _NoTypeConfig(SAEConfig):
    pass


def test_registering_checks_the_classes_and_the_names():
    with pytest.raises(ArchitectureError, match="is not a subclass of hf_sae.SAEConfig"):
        register_architecture(dict, HierarchicalSAE)
    with pytest.raises(ArchitectureError, match="is not a subclass of hf_sae.SAEPreTrainedModel"):
        register_architecture(HierarchicalSAEConfig, dict)
    with pytest.raises(ArchitectureError, match="model_type='sae' must be a new identifier"):
        register_architecture(_NoTypeConfig, _Model)
    with pytest.raises(ArchitectureError, match="_Model.config_class is _OtherConfig, not HierarchicalSAEConfig"):
        register_architecture(HierarchicalSAEConfig, _Model)
    with pytest.raises(ArchitectureError, match="'hierarchical_sae' is already registered by"):
        register_architecture(_OtherConfig, _Model)
    with pytest.raises(ArchitectureError, match="preset 'x' of hierarchical_sae sets unknown field"):
        register_architecture(HierarchicalSAEConfig, HierarchicalSAE, presets={"x": {"colour": 1}})
    # the same pair again (a module imported twice) is fine and changes nothing
    assert register_architecture(HierarchicalSAEConfig, HierarchicalSAE, presets={"hierarchical": {}}).name


def test_presets_of_two_architectures_cannot_share_a_name():
    class _KronLike(SAEConfig):
        model_type: ClassVar[str] = "registry_test_sae"

    class _KronLikeModel(SAEPreTrainedModel):
        config_class = _KronLike

    with pytest.raises(ArchitectureError, match="'kron' is already used by kron_sae"):
        register_architecture(_KronLike, _KronLikeModel, presets={"kron": {}})
