"""The CPU worker pool: longest first, waits for its activations, reports errors, and its
threads inherit the runtime's CPU set (physical cores of one NUMA node)."""

from __future__ import annotations

import os
import threading
import time

import pytest

torch = pytest.importorskip("torch")

from tidesim_runtime.engine.cpu_pool import CPUPool, ExpertTask, expert_task_runner  # noqa: E402
from tidesim_runtime.engine.device import PinnedThreads  # noqa: E402


def test_cpu_pool_runs_longest_first_and_waits_for_activations() -> None:
    pool = CPUPool(workers=1, threads=1)
    try:
        seen: list[int] = []
        ready = threading.Event()
        tasks = [ExpertTask(3, 0, 1), ExpertTask(1, 1, 5), ExpertTask(2, 5, 7), ExpertTask(0, 7, 11)]
        job = pool.submit(tasks, lambda t: seen.append(t.expert), before=ready.wait)
        time.sleep(0.05)
        assert seen == []  # nothing ran before the activations arrived
        ready.set()
        job.wait()
        assert seen == [0, 1, 2, 3]  # 4 tokens (id 0), 4 tokens (id 1), 2 tokens, 1 token
    finally:
        pool.close()



def test_cpu_pool_surfaces_a_task_error_and_keeps_serving() -> None:
    pool = CPUPool(workers=2, threads=1)
    try:
        def boom(task: ExpertTask) -> None:
            if task.expert == 1:
                raise ValueError("bad expert")

        job = pool.submit([ExpertTask(0, 0, 1), ExpertTask(1, 1, 2)], boom)
        with pytest.raises(ValueError, match="bad expert"):
            job.wait()
        seen: list[int] = []
        pool.submit([ExpertTask(5, 0, 1)], lambda t: seen.append(t.expert)).wait()
        assert seen == [5]
    finally:
        pool.close()


def test_expert_task_runner_computes_its_rows() -> None:
    gen = torch.Generator().manual_seed(0)
    w13, w2 = torch.randn(3, 8, 6, generator=gen), torch.randn(3, 6, 4, generator=gen)
    x = torch.randn(5, 6, generator=gen)
    out = torch.zeros(5, 6)
    pool = CPUPool(workers=2, threads=1)
    try:
        pool.submit([ExpertTask(2, 0, 2), ExpertTask(0, 2, 5)], expert_task_runner(x, out, w13, w2)).wait()
    finally:
        pool.close()
    from tidesim_runtime.engine.kernels import swiglu

    assert torch.equal(out[:2], swiglu(x[:2], w13[2], w2[2]))
    assert torch.equal(out[2:], swiglu(x[2:], w13[0], w2[0]))


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_pool_threads_run_on_the_runtimes_cpu_set() -> None:
    one = (min(os.sched_getaffinity(0)),)
    pin = PinnedThreads(one)
    try:
        pool = CPUPool(workers=2, threads=1)
        seen: list[set[int]] = []
        lock = threading.Lock()

        def record(task: ExpertTask) -> None:
            with lock:
                seen.append(os.sched_getaffinity(0))

        pool.submit([ExpertTask(e, 0, 1) for e in range(4)], record).wait()
        pool.close()
    finally:
        pin.restore()
    assert seen and all(s == set(one) for s in seen)
