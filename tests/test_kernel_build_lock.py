"""A kernel build killed mid-way leaves torch's lock file behind; the next first use must not wait on it forever."""

import threading
import time

from hf_sae.kernels import clear_stale_build_lock


def test_a_live_build_is_waited_for_and_a_dead_one_cleared(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "hf_sae_example" / "lock"
    lock.parent.mkdir()
    assert not clear_stale_build_lock("hf_sae_example", max_age=5, poll=0.01)  # no lock: nothing to wait for
    lock.touch()  # a build in progress that finishes after 0.2 s: waited for, not removed by us
    threading.Timer(0.2, lock.unlink).start()
    start = time.monotonic()
    assert not clear_stale_build_lock("hf_sae_example", max_age=5, poll=0.01)
    assert 0.15 < time.monotonic() - start < 4
    lock.touch()  # a build that was killed: its lock goes once it is older than max_age
    assert clear_stale_build_lock("hf_sae_example", max_age=0.3, poll=0.01) and not lock.exists()
