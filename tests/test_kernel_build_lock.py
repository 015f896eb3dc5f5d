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


def test_a_kernel_builds_from_its_source_and_the_shared_headers_beside_it():
    # every header of the kernels folder is part of each build's hash, so editing a shared helper rebuilds both
    # extensions instead of loading a binary built from the old header
    from pathlib import Path

    import hf_sae.kernels as kernels

    folder = Path(kernels.__file__).parent
    source = folder / "kron_cpu.cpp"
    assert kernels._sources(source) == [source, folder / "counting_order.h", folder / "key_search.h"]
    assert '#include "key_search.h"' in source.read_text()
    assert '#include "key_search.h"' in (folder / "hierarchical_cpu.cpp").read_text()
    for user in ("hierarchical_cpu.cpp", "aux_cpu.cpp"):
        assert '#include "counting_order.h"' in (folder / user).read_text()
