import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import collections  # noqa: E402
import json  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from pydoc_data.topics import topics  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from datasets import IterableDataset, load_dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

from hf_sae.testing.hub_server import find_olah  # noqa: E402
from hf_sae.testing.tiny_models import TINY_MODELS, tiny_gemma2, tiny_sae  # noqa: E402
from hf_sae.testing.tool_venvs import olah_cli as cached_olah_cli  # noqa: E402
from hf_sae.testing.tool_venvs import peer_python  # noqa: E402
from training.cache import cache_root  # noqa: E402
from training.data import TokenWindows  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run ~10x faster on one thread than on two busy cores (thread hand-off dominates).

    Opt in per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ tools in venvs of their own, made on first use
@pytest.fixture(scope="session")
def olah_cli() -> str:
    """``olah-cli`` (the read-only Hub server of the hub tests): $HF_SAE_OLAH_CLI, <repo>/.venv-olah or PATH, else
    its own venv, created from PyPI on the first session that needs it (~30 s) and cached
    (:mod:`hf_sae.testing.tool_venvs`)."""
    return find_olah() or str(cached_olah_cli())


@pytest.fixture(scope="session")
def sae_lens_python() -> str:
    """A Python with the real sae-lens installed: $HF_SAE_SAELENS_PYTHON, else its cached venv (made on first use)."""
    return os.environ.get("HF_SAE_SAELENS_PYTHON") or str(peer_python("saelens"))


@pytest.fixture(scope="session")
def sparsify_python() -> str:
    """A Python with the real eai-sparsify: $HF_SAE_SPARSIFY_PYTHON, else its cached venv (made on first use)."""
    return os.environ.get("HF_SAE_SPARSIFY_PYTHON") or str(peer_python("sparsify"))


@pytest.fixture(scope="session")
def tiny_lm():
    """Factory of tiny random-weight LMs (:mod:`hf_sae.testing.tiny_models`): ``tiny_lm("gemma2", seed=0,
    **config_overrides)``, family one of ``"gemma2"``, ``"gemma3"``, ``"llama"``. Every call builds a fresh model, so
    a test may change it; same seed, same weights. For one model per module::

        @pytest.fixture(scope="module", params=["gemma2", "gemma3"])
        def model(request, tiny_lm):
            return tiny_lm(request.param)
    """

    def build(family: str = "gemma2", seed: int = 0, **overrides):
        return TINY_MODELS[family](seed, **overrides)

    return build


@pytest.fixture(scope="session")
def make_sae():
    """Factory of small seeded HierarchicalSAEs that read a tiny model (:func:`hf_sae.testing.tiny_models.tiny_sae`):
    ``make_sae(layer=1, site="resid", d_in=64, d_sae=256, k=8, seed=1, b_dec_std=0.0, **config)``; a fresh SAE per
    call."""
    return tiny_sae


# ------------------------------------------------------------------------- a tiny LM saved like a real one, for runs
# A tiny random-weight Gemma-2 saved with a real word-level tokenizer (ids 0..3 are <pad>, <eos>, <bos>, <unk>, as in
# Gemma); the text is real English (the embedded corpus's held-out split when it is built, else CPython's
# documentation topics, which are always on disk).
BOS, EOS, PAD = 2, 1, 0


def _english_documents() -> list[str]:
    validation = cache_root() / "corpus" / "validation.jsonl"
    if (cache_root() / "corpus" / "manifest.json").exists():
        return [json.loads(line)["text"] for line in validation.read_text().splitlines()][:60]
    return [topics[name] for name in sorted(topics)][:60]


@pytest.fixture(scope="session")
def saved_lm(tmp_path_factory) -> tuple[Path, Path]:
    """(model folder, docs.jsonl): a tiny Gemma-2 + word-level tokenizer saved together, and 60 English documents."""
    root = tmp_path_factory.mktemp("saved_lm")
    documents = _english_documents()
    counts = collections.Counter(word for text in documents for word in text.split())
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"])}
    for word, _ in counts.most_common(1000 - len(vocab)):
        vocab[word] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    model = tiny_gemma2(seed=0, vocab_size=1000, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
    model.save_pretrained(root / "model")
    fast.save_pretrained(root / "model")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    return root / "model", docs


@pytest.fixture(scope="session")
def tiny_args(saved_lm) -> Callable[..., list[str]]:
    """``tiny_args(out, **overrides)``: CLI arguments of a small, fast run on the tiny model (~30 SAE steps)."""
    model_dir, docs = saved_lm

    def arguments(out, **overrides) -> list[str]:
        options = {
            "model": model_dir,
            "dataset": docs,
            "eval_holdout_documents": 5,
            "layer": 2,
            "d_sae": 128,
            "k": 8,
            "context_length": 32,
            "lm_batch_size": 8,
            "batch_size": 128,
            "buffer_size": 1024,
            "tokens": 128 * 30,
            "checkpoint_every": 10,
            "eval_tokens": 1000,
            "eval_lm_windows": 4,
            "log_every": 5,
            "out": out,
            **overrides,
        }
        args = []
        for name, value in options.items():
            flag = "--" + name.replace("_", "-")
            if value is True:
                args.append(flag)
            elif value is not False:
                args += [flag, str(value)]
        return args

    return arguments


@pytest.fixture(scope="session")
def load_saved_lm(saved_lm) -> Callable[[], tuple]:
    """``load_saved_lm()``: a fresh (model, tokenizer) of the saved tiny LM, read back as a run reads it."""
    return lambda: (
        AutoModelForCausalLM.from_pretrained(saved_lm[0]).eval(),
        AutoTokenizer.from_pretrained(saved_lm[0]),
    )


@pytest.fixture(scope="session")
def windows_of(saved_lm) -> Callable[..., TokenWindows]:
    """``windows_of(tokenizer, texts=None, context_length=32, loop=False, **kwargs)``: TokenWindows over the saved
    documents (or over ``texts``)."""

    def windows(tokenizer, texts=None, context_length=32, loop=False, **kwargs) -> TokenWindows:
        if texts is None:
            source = lambda: load_dataset("json", data_files=str(saved_lm[1]), split="train", streaming=True)  # noqa: E731
        else:
            source = lambda: IterableDataset.from_generator(lambda: ({"text": t} for t in texts))  # noqa: E731
        return TokenWindows(source, tokenizer, context_length, loop=loop, **kwargs)

    return windows


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
