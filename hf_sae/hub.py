"""The Hub, in one import: pushing (:mod:`hf_sae.push`), loading with explained failures (:mod:`hf_sae.loading`)
and a run folder's files (:mod:`hf_sae.run_files`). This module only hands their names on.

    push_sae(sae, "me/gemma-2-2b-res-l12-hier")                        # = sae.push_to_hub(...)
    push_collection({"layer_12/resid": sae12, "layer_12/mlp": sae12m}, "me/gemma-2-2b-saes", tag="v1")
    push_run("runs/my-run", "me/my-sae", push_checkpoints=True)
    load_sae("me/gemma-2-2b-saes", subfolder="layer_12/resid", revision="v1")
"""

from .errors import HubError, SAEHubError, SAEPushError
from .loading import describe_cache, detect_layout, explain_load_failure, load_sae
from .push import (
    COLLECTION_MANIFEST,
    collection_subfolder,
    push_checkpoint,
    push_collection,
    push_run,
    push_sae,
    stage_sae,
)
from .remote_code import REMOTE_CODE_NAME, add_remote_code
from .run_files import find_checkpoints, read_run_metrics, sae_folders

__all__ = [
    "COLLECTION_MANIFEST",
    "REMOTE_CODE_NAME",
    "HubError",
    "SAEHubError",
    "SAEPushError",
    "add_remote_code",
    "collection_subfolder",
    "describe_cache",
    "detect_layout",
    "explain_load_failure",
    "find_checkpoints",
    "load_sae",
    "push_checkpoint",
    "push_collection",
    "push_run",
    "push_sae",
    "read_run_metrics",
    "sae_folders",
    "stage_sae",
]
