"""Checkpoint folders (training/checkpoint.py): verified by their manifest; ones written before manifests existed
(complete by construction: the folder is renamed into place whole) are still accepted when their files are there."""

from __future__ import annotations

import torch

from hf_sae.testing.tiny_models import tiny_sae
from training import checkpoint as ckpt


def _checkpoint(tmp_path):
    sae = tiny_sae(d_in=8, d_sae=16, k=2)
    optimizer = torch.optim.AdamW(sae.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return ckpt.save_checkpoint(tmp_path, 10, [sae], optimizer, scheduler, {"step": 10}, [{}], "tokens: 10\n")


def test_a_checkpoint_without_a_manifest_is_a_legacy_one_and_still_resumes(tmp_path):
    path = _checkpoint(tmp_path)
    assert ckpt.checkpoint_problem(path) is None
    (path / ckpt.MANIFEST).unlink()  # what a checkpoint of the code before manifests looks like
    assert ckpt.checkpoint_problem(path) is None
    assert ckpt.newest_intact_checkpoint(tmp_path)[0] == path
    (path / "optimizer.pt").write_bytes(b"")
    assert ckpt.checkpoint_problem(path) == f"no {ckpt.MANIFEST}, and optimizer.pt missing or empty"
