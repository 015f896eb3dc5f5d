"""hf-sae: sparse autoencoders as first-class Hugging Face models.

``import hf_sae`` registers the SAE configs and models with ``AutoConfig`` / ``AutoModel``.
"""

from transformers import AutoConfig, AutoModel

__version__ = "0.1.0"

from .configuration_hierarchical_sae import HierarchicalSAEConfig  # noqa: E402
from .configuration_jumprelu_sae import JumpReLUSAEConfig  # noqa: E402
from .configuration_kron_sae import KronSAEConfig  # noqa: E402
from .configuration_sae import SAEConfig  # noqa: E402
from .errors import SAEConfigError, SAEInputError, SAELoadError  # noqa: E402
from .evaluation import (  # noqa: E402
    EvaluationError,
    FeatureExample,
    LMLossResult,
    TopFeatures,
    ce_loss_recovered,
    lm_loss_with_sae,
    max_activating_examples,
    top_features,
)
from .modeling_hierarchical_sae import HierarchicalSAE  # noqa: E402
from .modeling_jumprelu_sae import JumpReLUSAE  # noqa: E402
from .modeling_kron_sae import KronSAE  # noqa: E402
from .modeling_sae import SAEOutput, SAEPreTrainedModel  # noqa: E402
from .sites import SITES, Site, SiteError, decoder_layers, num_layers, resolve_site  # noqa: E402
from .sparse import SparseLatents  # noqa: E402
from .steering import SAEHook, SteeringError, SteeringHandle, attach, steer  # noqa: E402

for _config, _model in (
    (HierarchicalSAEConfig, HierarchicalSAE),
    (KronSAEConfig, KronSAE),
    (JumpReLUSAEConfig, JumpReLUSAE),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)

from . import convert, hub  # noqa: E402
from .hub import SAEHubError, SAEPushError, load_sae, push_collection, push_run, push_sae  # noqa: E402

__all__ = [
    "JumpReLUSAE",
    "JumpReLUSAEConfig",
    "SAEHubError",
    "SAEPushError",
    "convert",
    "hub",
    "load_sae",
    "push_collection",
    "push_run",
    "push_sae",
    "SITES",
    "EvaluationError",
    "FeatureExample",
    "LMLossResult",
    "SAEHook",
    "Site",
    "SiteError",
    "SteeringError",
    "SteeringHandle",
    "TopFeatures",
    "attach",
    "ce_loss_recovered",
    "decoder_layers",
    "lm_loss_with_sae",
    "max_activating_examples",
    "num_layers",
    "resolve_site",
    "steer",
    "top_features",
    "HierarchicalSAE",
    "HierarchicalSAEConfig",
    "KronSAE",
    "KronSAEConfig",
    "SAEConfig",
    "SAEConfigError",
    "SAEInputError",
    "SAELoadError",
    "SAEOutput",
    "SAEPreTrainedModel",
    "SparseLatents",
    "__version__",
]
