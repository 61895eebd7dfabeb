"""The CPU worker pool that computes the experts a Schedule places on the CPU.

`workers` threads, each running torch with `threads` intra-op threads; a layer's expert tasks are
queued longest first (most tokens first, ties by expert id) and each idle worker takes the next
one: the same longest-first rule the simulator uses (tidesim.sim.lpt). torch releases the GIL in
its kernels, so the workers run while the calling thread drives the GPU.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tidesim_runtime.engine.cpu_kernels import cpu_swiglu_into


@dataclass
class ExpertTask:
    """One CPU expert: rows [a, b) of the layer's host activation buffer, results into the same
    rows of the host output buffer."""

    expert: int
    start: int
    stop: int


class LayerJob:
    """The CPU side of one layer-forward; wait() returns when every task has run."""

    def __init__(self, tasks: list[ExpertTask], run: Callable[[ExpertTask], object],
                 before: Callable[[], None] | None) -> None:
        self.remaining = len(tasks)
        self.run = run
        self.before = before
        self.ready = threading.Event()
        self.started = threading.Lock()
        self.before_done = False
        self.done = threading.Event()
        self.errors: list[BaseException] = []
        self.busy_s = 0.0
        self.lock = threading.Lock()
        if not tasks:
            self.done.set()

    def wait(self) -> None:
        self.done.wait()
        if self.errors:
            raise self.errors[0]


class CPUPool:
    """Persistent worker threads; submit() queues one layer's tasks."""

    def __init__(self, workers: int, threads: int) -> None:
        self.workers = max(1, workers)
        self.threads = max(1, threads)
        self._tasks: queue.Queue[tuple[LayerJob, ExpertTask] | None] = queue.Queue()
        self._threads = [threading.Thread(target=self._serve, name=f"tidesim-cpu-worker-{i}", daemon=True)
                         for i in range(self.workers)]
        self.busy_s = 0.0
        self._busy_lock = threading.Lock()
        for t in self._threads:
            t.start()

    def _serve(self) -> None:
        torch.set_num_threads(self.threads)
        with torch.inference_mode():  # thread-local; tasks may touch inference tensors
            self._loop()

    def _loop(self) -> None:
        while True:
            item = self._tasks.get()
            if item is None:
                return
            job, task = item
            try:
                with job.started:  # the first worker to start a job waits for its activations
                    if not job.before_done and job.before is not None:
                        job.before()
                    job.before_done = True
                t0 = time.perf_counter()
                job.run(task)
                dt = time.perf_counter() - t0
            except BaseException as exc:
                job.errors.append(exc)
                dt = 0.0
            with job.lock:
                job.busy_s += dt
                job.remaining -= 1
                finished = job.remaining == 0
            with self._busy_lock:
                self.busy_s += dt
            if finished:
                job.done.set()

    def submit(self, tasks: list[ExpertTask], run: Callable[[ExpertTask], object],
               before: Callable[[], None] | None = None) -> LayerJob:
        """Queue tasks longest first; `before` (waiting for the activations) runs once, first."""
        order = sorted(tasks, key=lambda t: (-(t.stop - t.start), t.expert))
        job = LayerJob(order, run, before)
        for task in order:
            self._tasks.put((job, task))
        return job

    def close(self) -> None:
        for _ in self._threads:
            self._tasks.put(None)
        for t in self._threads:
            t.join(timeout=10)


def expert_task_runner(x_host: torch.Tensor, out_host: torch.Tensor, w13: torch.Tensor,
                       w2: torch.Tensor) -> Callable[[ExpertTask], object]:
    """A task body: SwiGLU of one expert from host weights on host activations, with the process's
    CPU expert kernel (engine/cpu_kernels.py), written straight into the expert's output rows."""
    def run(task: ExpertTask) -> None:
        a, b = task.start, task.stop
        cpu_swiglu_into(x_host[a:b], w13[task.expert], w2[task.expert], out_host[a:b], fixed=True)
    return run
