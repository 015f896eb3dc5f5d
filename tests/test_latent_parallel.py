"""Latent-parallel SAEs (hf_sae/latent_parallel.py): the same training as one process, on 2 and 3 gloo processes.

Each case launches ``python -m hf_sae.testing.latent_parallel_run`` (N CPU processes over gloo, started by the
test) and compares the gathered SAE with the same SAE trained whole in one process on the same batches: the latents
chosen at every step must be identical (the exact global top-k) and the weights equal up to the order of float sums.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hf_sae import HierarchicalSAE, HierarchicalSAEConfig, training_step
from hf_sae.errors import HfSaeError
from hf_sae.latent_parallel import LatentParallelSAE, gather_sae, shard_bounds, shard_sae

TOLERANCE = 1e-6  # float32, a few steps: measured differences are ~1e-7 (sums in another order)


def launch(tmp_path, name: str, *args: str) -> tuple[dict, dict]:
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "hf_sae.testing.latent_parallel_run", *args, "--out", str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), load_file(str(out.with_suffix(".safetensors")))


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """The whole SAE trained in one process: HierarchicalTopK and plain TopK, and the untrained SAE."""
    tmp = tmp_path_factory.mktemp("whole")
    return {
        "hierarchical": launch(tmp, "hier", "--world", "1", "--whole"),
        "topk": launch(tmp, "topk", "--world", "1", "--whole", "--topk"),
        "init": launch(tmp, "init", "--world", "1", "--whole", "--steps", "0"),
    }


def assert_same_training(run: tuple[dict, dict], reference: tuple[dict, dict]) -> None:
    (report, weights), (ref_report, ref_weights) = run, reference
    assert report["selected"] == ref_report["selected"]  # the exact global top-k at every step
    assert weights.keys() == ref_weights.keys()
    for name in ref_weights:
        difference = (weights[name].double() - ref_weights[name].double()).abs().max()
        assert difference <= TOLERANCE, (name, float(difference))


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("objective", ["hierarchical", "topk"])
def test_sharded_training_equals_one_process_training_the_whole_sae(tmp_path, references, world, objective):
    args = ["--world", str(world)] + (["--topk"] if objective == "topk" else [])
    assert_same_training(launch(tmp_path, "sharded", *args), references[objective])
    report = references[objective][0]
    assert report["auxk_steps"] >= 6  # AuxK ran on dead latents (dead after 64 tokens = 1 step)


def test_training_moved_the_weights(references):
    # the comparison above is meaningful: 8 steps change every parameter by far more than the tolerance
    trained, init = references["hierarchical"][1], references["init"][1]
    for name in ("W_dec", "encoder.weight", "encoder.bias", "b_dec"):
        assert (trained[name] - init[name]).abs().max() > 1000 * TOLERANCE, name


def test_gathering_and_resharding_mid_run_changes_nothing(tmp_path, references):
    """What a checkpoint + resume does: weights and AdamW moments gathered to whole tensors, split again."""
    run = launch(tmp_path, "resumed", "--world", "3", "--resume-at", "3")
    assert_same_training(run, references["hierarchical"])


def test_a_hierarchical_step_in_row_chunks_is_the_same(tmp_path, references):
    """A bound of 500 gathered floats: chunks of 3 rows (3 x 6 latents x 24), each gathered again in the backward."""
    run = launch(tmp_path, "chunked", "--world", "2", "--chunk-elements", "500")
    assert_same_training(run, references["hierarchical"])


def test_shard_bounds_cover_every_latent_once():
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_bounds(96, 2) == [(0, 48), (48, 96)]


def test_one_process_wrapper_trains_like_the_sae_and_gathers_back():
    torch.manual_seed(0)
    config = HierarchicalSAEConfig(d_in=12, d_sae=40, k=4, dead_tokens=64, auxk_k=6)
    sae = HierarchicalSAE(config).train()
    x = torch.randn(32, 12) + 1.0
    model = shard_sae(sae)
    assert isinstance(model, LatentParallelSAE) and (model.lo, model.hi) == (0, 40)
    whole_optimizer = torch.optim.AdamW(sae.parameters(), lr=1e-2)
    shard_optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(4):
        a = training_step(sae, whole_optimizer, x, max_grad_norm=1.0)
        b = training_step(model, shard_optimizer, x, max_grad_norm=1.0)
        assert torch.equal(a.output.latents.indices, b.output.latents.indices)
        torch.testing.assert_close(a.loss, b.loss, rtol=1e-6, atol=1e-7)
    back = gather_sae(model)
    for name, value in sae.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], value, rtol=0, atol=TOLERANCE)
    assert torch.equal(back.tokens_since_fired, sae.tokens_since_fired)


def test_an_sae_that_cannot_be_split_is_a_clear_error():
    from hf_sae import BatchTopKSAE, BatchTopKSAEConfig

    with pytest.raises(HfSaeError, match="cannot be split by latent"):
        shard_sae(BatchTopKSAE(BatchTopKSAEConfig(d_in=8, d_sae=32, k=4)))
