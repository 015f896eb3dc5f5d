import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from hf_sae.testing.tiny_models import TINY_MODELS, tiny_sae  # noqa: E402


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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
