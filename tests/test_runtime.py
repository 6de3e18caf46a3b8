"""Process-wide CPU settings (rolekd.runtime): freed memory stays in the process (no page faults for the
next step's tensors), worker processes start with glibc's huge-page tunable, and ROLEKD_MALLOC=default
turns both off. What a setting does to a process is checked in fresh processes (each is once per process)."""

import json
import os
import platform
import subprocess
import sys

import pytest

from rolekd.runtime import worker_environment

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="glibc's allocator only")

# A step's worth of tensors of several sizes (2-16 MB, as a batch's activations), made, written and freed
# again and again; the minor page faults of the later rounds are counted. One definition, run in a fresh
# process (_probe) and inside a pipeline worker (_worker_probe).
_SIZES = [1 << 19, 1 << 21, 1 << 20, 1 << 22, 3 << 19]  # floats


def _count_round_faults() -> int:
    """Three warm-up rounds, then the minor page faults of 20 counted rounds."""
    import resource

    import torch

    def round_():
        held = [torch.ones(n) for n in _SIZES]
        for t in held:
            t.mul_(2)
        del held
    for _ in range(3):
        round_()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        round_()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


_PROBE = f"""
import json, sys
from rolekd.runtime import keep_freed_memory
tuned = keep_freed_memory()
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from test_runtime import _count_round_faults
print(json.dumps({{"tuned": tuned, "faults": _count_round_faults()}}))
"""


def _probe(**env) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _touched_pages() -> int:
    """The pages the probe's 20 counted rounds write (float32 tensors of its sizes, this machine's page size)."""
    import resource

    return 20 * sum(4 * n for n in _SIZES) // resource.getpagesize()


@glibc
def test_freed_memory_is_kept_so_later_steps_fault_no_pages():
    # The baseline: glibc's allocator untuned, with its mmap threshold fixed at its 128 KiB default
    # (GLIBC_TUNABLES), so that it hands every freed block back. Left dynamic, glibc itself sometimes raises
    # the threshold after the first free and keeps the blocks (seen in the same process setup: 0 faults in
    # one run, 183,680 in the next), which would leave nothing to compare with.
    tuned = _probe()
    default = _probe(ROLEKD_MALLOC="default", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=131072")
    assert tuned["tuned"] is True and default["tuned"] is False
    # 20 rounds of ~38 MB = 184,320 4-KB pages written. The baseline faults the pages in again (seen: 184,420,
    # every page); kept, the rounds reuse the same pages (seen: 0 to 1,536 faults, from the interpreter and
    # torch's own allocations). Both compared with what was measured here, never with an absolute count.
    pages = _touched_pages()
    assert tuned["faults"] * 10 <= default["faults"], (tuned, default)  # at least 10x fewer than the default
    assert tuned["faults"] <= 0.02 * pages, (tuned, pages)  # at most 2% of the pages the rounds write


def _probe_in_worker(malloc: str) -> dict:
    """The probe run inside a pipeline worker process (rolekd.pipeline.graph.ProcessExecutor), as a stage runs."""
    from rolekd.pipeline.graph import ProcessExecutor

    old = os.environ.get("ROLEKD_MALLOC")
    os.environ["ROLEKD_MALLOC"] = malloc
    try:
        ex = ProcessExecutor(1)
        try:
            return ex.pool.submit(_worker_probe).result(timeout=120)
        finally:
            ex.close()
    finally:
        if old is None:
            os.environ.pop("ROLEKD_MALLOC")
        else:
            os.environ["ROLEKD_MALLOC"] = old


def _worker_probe() -> dict:
    """In a worker: run one stage's worth of setup as run_task does it (rolekd.pipeline.graph.run_task calls
    keep_freed_memory before training), then the probe's rounds, counting faults."""
    from rolekd.pipeline import graph

    graph.keep_freed_memory()  # what run_task calls first; a worker that skipped it would fault every round
    return {"faults": _count_round_faults(), "tuned": bool(graph.keep_freed_memory())}


def test_worker_environment_adds_the_huge_page_tunable_and_keeps_the_users(monkeypatch):
    monkeypatch.delenv("ROLEKD_MALLOC", raising=False)
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    assert worker_environment({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
    env = worker_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"})
    assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "X": "1"}
    # the user's own hugetlb choice stands
    assert worker_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})["GLIBC_TUNABLES"] == \
        "glibc.malloc.hugetlb=0"
    monkeypatch.setenv("ROLEKD_MALLOC", "default")
    assert worker_environment({"A": "b"}) == {"A": "b"}
    monkeypatch.delenv("ROLEKD_MALLOC")
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))  # musl, macOS: nothing to tune
    assert "GLIBC_TUNABLES" not in worker_environment({})


@glibc
def test_pipeline_workers_start_with_the_tunable_and_the_parent_gets_its_environment_back(monkeypatch):
    from rolekd.pipeline.graph import ProcessExecutor

    monkeypatch.delenv("ROLEKD_MALLOC", raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=4")
    ex = ProcessExecutor(1)
    try:
        seen = ex.pool.submit(os.getenv, "GLIBC_TUNABLES").result(timeout=120)
    finally:
        ex.close()
    assert seen == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"
    assert os.environ["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=4"
