"""The one folder for hf_sae's offline caches (the corpus of `training.corpus`, the model of `training.small_gemma`).

cache_root()                      $HF_SAE_CACHE, else ~/.cache/hf_sae
cache_root("/data/hf_sae")        a folder of the caller's choosing
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder for all hf_sae caches: `cache_dir` if given, else `$HF_SAE_CACHE`, else `~/.cache/hf_sae`.

    Every `cache_dir` argument of the training package means this root; each resource has its own subfolder in it.
    """
    if cache_dir is None:
        cache_dir = os.environ.get("HF_SAE_CACHE") or Path.home() / ".cache" / "hf_sae"
    return Path(cache_dir).expanduser()
