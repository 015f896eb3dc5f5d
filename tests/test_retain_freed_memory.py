"""hf_sae.hardware.retain_freed_memory: a large tensor freed and allocated again reuses its pages.

Run in a fresh interpreter: the setting is process-wide, and the page-fault counts must not depend on what the
test session allocated before."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import resource, sys
    import torch
    from hf_sae.hardware import retain_freed_memory

    def faults_of_a_fresh_64mb_tensor():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        x = torch.empty(16 * 2**20)  # 64 MiB of float32: over glibc's largest mmap threshold (32 MiB)
        x.fill_(1.0)  # touch every page
        del x
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_of_a_fresh_64mb_tensor()
    default = faults_of_a_fresh_64mb_tensor()  # glibc's defaults: munmap on free, every page faulted again
    retained = retain_freed_memory()
    for _ in range(3):  # the first blocks from the heap fault their pages in (the heap grows to its steady size)
        faults_of_a_fresh_64mb_tensor()
    reused = faults_of_a_fresh_64mb_tensor()
    print(default, reused, retained, retain_freed_memory())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's (Linux)")
def test_a_freed_large_tensor_reuses_its_pages():
    # torch's own huge-page allocations off (hf_sae.hardware.use_huge_pages, called in-process by the training
    # script, sets the variable for later children): this counts 4 KiB page faults
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    command = [sys.executable, "-c", SCRIPT]
    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120, env=env)
    default, reused, retained, again = out.stdout.split()
    if retained != "True":
        pytest.skip("not glibc: retain_freed_memory is a no-op here")
    pages = 64 * 2**20 // 4096
    assert int(default) > pages // 2  # THP may fault 2 MiB at a time; otherwise one fault per 4 KiB page
    assert int(reused) < pages // 20
    assert again == "True"  # idempotent
