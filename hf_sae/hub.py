"""The Hub, in one import: pushing (:mod:`hf_sae.push`), loading with explained failures (:mod:`hf_sae.loading`)
and a run folder's files (:mod:`hf_sae.run_files`). This module hands their names on, keeps the names it had before
the split, and fills in the registered architectures where the lower modules take them as an argument.

    push_sae(sae, "me/gemma-2-2b-res-l12-hier")                        # = sae.push_to_hub(...)
    push_collection({"layer_12/resid": sae12, "layer_12/mlp": sae12m}, "me/gemma-2-2b-saes", tag="v1")
    push_run("runs/my-run", "me/my-sae", push_checkpoints=True)
    load_sae("me/gemma-2-2b-saes", subfolder="layer_12/resid", revision="v1")
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from . import run_files
from .cards import generate_collection_card, generate_model_card
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
from .registry import model_types
from .remote_code import REMOTE_CODE_NAME, add_remote_code
from .run_files import read_run_metrics


def sae_folders(folder: str | Path, types: Sequence[str] | None = None) -> list[Path]:
    """The SAE folders of a run or folder (:func:`hf_sae.run_files.sae_folders`), of the registered architectures."""
    return run_files.sae_folders(folder, model_types() if types is None else types)


def find_checkpoints(run_dir: str | Path, types: Sequence[str] | None = None) -> list[tuple[int, Path]]:
    """(step, folder) of a run's checkpoints (:func:`hf_sae.run_files.find_checkpoints`), registered architectures."""
    return run_files.find_checkpoints(run_dir, model_types() if types is None else types)


def __getattr__(name: str):
    if name == "HF_SAE_MODEL_TYPES":  # a constant before the registry; now whatever is registered
        return model_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "generate_collection_card",
    "generate_model_card",
    "load_sae",
    "model_types",
    "push_checkpoint",
    "push_collection",
    "push_run",
    "push_sae",
    "read_run_metrics",
    "sae_folders",
    "stage_sae",
]
