"""Large host blocks freed by one training step are reused by the next, without new page faults."""

import resource
import subprocess
import sys

import pytest

from helpers import run

# In a fresh process, so that the setting does not carry into the other tests' allocations.
ALLOCATE_REPEATEDLY = """
import resource, sys, torch
from minilm_sts.training.host_memory import reuse_freed_host_memory
applied = reuse_freed_host_memory() if sys.argv[1] == "reuse" else None
faults = []
for step in range(6):  # the word-embedding gradient's size, allocated and freed as at each training step
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.zeros(30522, 384)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, min(faults[2:]))  # the steady state, once glibc's heap has settled
"""


def page_faults_of_a_later_allocation(mode: str) -> tuple[str, int]:
    done = subprocess.run([sys.executable, "-c", ALLOCATE_REPEATEDLY, mode], capture_output=True, text=True, check=True)
    applied, faults = done.stdout.split()
    return applied, int(faults)


@pytest.mark.slow
def test_a_freed_embedding_sized_block_is_reused_without_page_faults():
    pages = 30522 * 384 * 4 // resource.getpagesize()
    _, faults_by_default = page_faults_of_a_later_allocation("default")
    applied, faults_reusing = page_faults_of_a_later_allocation("reuse")
    assert faults_by_default > pages // 2  # glibc unmapped the block: every page faults again
    assert applied == "True" and faults_reusing < pages // 20


def test_fitting_on_the_cpu_asks_for_it(monkeypatch, tiny_model_dir, pair_files, tmp_path):
    from minilm_sts.training import sentence_encoder_training as module

    calls = []
    monkeypatch.setattr(module, "reuse_freed_host_memory", lambda: calls.append("asked"))
    run(tiny_model_dir, pair_files, tmp_path)
    assert calls == ["asked"]
