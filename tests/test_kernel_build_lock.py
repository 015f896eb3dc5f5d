"""A kernel build killed mid-way leaves torch's lock file behind; the next first use must not wait on it forever."""

import os
import time

from hf_sae.kernels import clear_stale_build_lock


def test_a_stale_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "hf_sae_example" / "lock"
    lock.parent.mkdir()
    lock.touch()  # a build in progress right now: torch waits for it
    assert not clear_stale_build_lock("hf_sae_example", max_age=300) and lock.exists()
    old = time.time() - 301
    os.utime(lock, (old, old))  # the lock of a build killed five minutes ago
    assert clear_stale_build_lock("hf_sae_example", max_age=300) and not lock.exists()
    assert not clear_stale_build_lock("hf_sae_example")  # no lock: nothing to do
