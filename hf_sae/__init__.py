"""hf-sae: sparse autoencoders as first-class Hugging Face models.

``import hf_sae`` imports every architecture of the package — each ``modeling_<name>.py`` next to this file
registers its config and model with :func:`register_architecture` (and so with ``AutoConfig`` / ``AutoModel``) —
and exports their classes by name (``hf_sae.HierarchicalSAE``). A new architecture is two files and no edit here.
"""

from __future__ import annotations

import importlib
import pkgutil

from . import convert, hub
from ._version import __version__
from .configuration_sae import SAEConfig
from .contrastive import contrastive_vector
from .errors import HfSaeError, SAEConfigError, SAEHubError, SAEInputError, SAELoadError, SAEPushError
from .evaluation import (
    EvaluationError,
    FeatureExample,
    LMLossResult,
    TopFeatures,
    ce_loss_recovered,
    feature_stats,
    lm_loss_with_sae,
    max_activating_examples,
    top_features,
)
from .latent_stats import FeatureStats
from .loading import load_sae
from .modeling_sae import SAEOutput, SAEPreTrainedModel
from .push import push_collection, push_run, push_sae
from .registry import Architecture, architectures, register_architecture
from .sites import SITES, Site, SiteError, decoder_layers, num_layers, resolve_site
from .sparse import SparseLatents
from .steering import SAEHook, SteeringError, SteeringHandle, SteeringVector, attach, steer
from .steering_sweep import SweepResult, steering_sweep
from .train_step import TrainingStepOutput, training_step

_ARCHITECTURE_MODULES = sorted(
    info.name
    for info in pkgutil.iter_modules(__path__)
    if info.name.startswith("modeling_") and info.name != "modeling_sae"
)
for _name in _ARCHITECTURE_MODULES:
    importlib.import_module(f".{_name}", __name__)

# The package's architectures, exported by class name: HierarchicalSAE, HierarchicalSAEConfig, KronSAE, ...
_ARCHITECTURE_CLASSES = {
    cls.__name__: cls
    for architecture in architectures()
    if architecture.model_class.__module__.startswith(__name__ + ".")
    for cls in (architecture.config_class, architecture.model_class)
}
globals().update(_ARCHITECTURE_CLASSES)


# The model's convenience methods call layers above the models (steering, the Hub); they are bound here, where every
# layer is loaded, so that modeling_sae imports nothing above itself.
def _steer_method(self, model, features, **kwargs):
    """Steer ``model`` with this SAE's features ({id: strength}); mode/positions: see :func:`hf_sae.steer`."""
    return steer(model, self, features, **kwargs)


def _attach_method(self, model, **kwargs):
    """Attach this SAE at its site of ``model`` to record latents or splice (see :func:`hf_sae.attach`)."""
    return attach(model, self, **kwargs)


def _push_to_hub_method(self, repo_id: str, **kwargs):
    """Push weights, config and a freshly generated model card as one commit (see :func:`hf_sae.push_sae`)."""
    return push_sae(self, repo_id, **kwargs)


_steer_method.__name__, _attach_method.__name__, _push_to_hub_method.__name__ = "steer", "attach", "push_to_hub"
SAEPreTrainedModel.steer = _steer_method
SAEPreTrainedModel.attach = _attach_method
SAEPreTrainedModel.push_to_hub = _push_to_hub_method

__all__ = [
    "Architecture",
    "EvaluationError",
    "FeatureExample",
    "FeatureStats",
    "HfSaeError",
    "LMLossResult",
    "SAEConfig",
    "SAEConfigError",
    "SAEHook",
    "SAEHubError",
    "SAEInputError",
    "SAELoadError",
    "SAEOutput",
    "SAEPreTrainedModel",
    "SAEPushError",
    "SITES",
    "Site",
    "SiteError",
    "SparseLatents",
    "SteeringError",
    "SteeringHandle",
    "SteeringVector",
    "SweepResult",
    "TopFeatures",
    "TrainingStepOutput",
    "__version__",
    "architectures",
    "attach",
    "ce_loss_recovered",
    "contrastive_vector",
    "convert",
    "decoder_layers",
    "feature_stats",
    "hub",
    "lm_loss_with_sae",
    "load_sae",
    "max_activating_examples",
    "num_layers",
    "push_collection",
    "push_run",
    "push_sae",
    "register_architecture",
    "resolve_site",
    "steer",
    "steering_sweep",
    "top_features",
    "training_step",
    *sorted(_ARCHITECTURE_CLASSES),
]
