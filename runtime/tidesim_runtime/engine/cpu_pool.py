"""The CPU worker pool that computes the experts a Schedule places on the CPU.

`workers` threads, each running torch with `threads` intra-op threads; a layer's expert tasks are
queued longest first (most tokens first, ties by expert id) and each idle worker takes the next
one: the same longest-first rule the simulator uses (tidesim.sim.lpt). torch releases the GIL in
its kernels, so the workers run while the calling thread drives the GPU.
"""

from __future__ import annotations

import functools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from tidesim_runtime.engine import stream_backend
from tidesim_runtime.engine.cpu_kernels import cpu_swiglu_into, for_weights

Unit = Callable[[], object]


@dataclass
class ExpertTask:
    """One CPU expert: rows [a, b) of the layer's host activation buffer, results into the same
    rows of the host output buffer."""

    expert: int
    start: int
    stop: int


class LayerJob:
    """The CPU side of one layer-forward: its units of work (one expert each, or one worker's
    share of a list of experts run by one foreign call); wait() returns when every unit has run."""

    def __init__(self, units: list[Unit], before: Callable[[], None] | None) -> None:
        self.remaining = len(units)
        self.before = before
        self.ready = threading.Event()
        self.started = threading.Lock()
        self.before_done = False
        self.done = threading.Event()
        self.errors: list[BaseException] = []
        self.busy_s = 0.0
        self.lock = threading.Lock()
        if not units:
            self.done.set()

    def wait(self) -> None:
        """Block until every unit has run."""
        self.done.wait()
        if self.errors:
            raise self.errors[0]


class CPUPool:
    """Persistent worker threads; submit() queues one layer's tasks."""

    def __init__(self, workers: int, threads: int) -> None:
        self.workers = max(1, workers)
        self.threads = max(1, threads)
        self._tasks: queue.Queue[tuple[LayerJob, Unit] | None] = queue.Queue()
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
            job, unit = item
            try:
                with job.started:  # the first worker to start a job waits for its activations
                    if not job.before_done and job.before is not None:
                        job.before()
                    job.before_done = True
                t0 = time.perf_counter()
                unit()
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
        """Queue tasks longest first; `before` (waiting for the activations) runs once, first. An
        ExpertTaskRunner may turn the list into fewer units (ExpertTaskRunner.units): the order
        in which the workers take the experts stays longest first."""
        order = sorted(tasks, key=lambda t: (-(t.stop - t.start), t.expert))
        if isinstance(run, ExpertTaskRunner):
            units = run.units(order, self.workers)
        else:
            units = [functools.partial(run, t) for t in order]
        job = LayerJob(units, before)
        for unit in units:
            self._tasks.put((job, unit))
        return job

    def close(self) -> None:
        for _ in self._threads:
            self._tasks.put(None)
        for t in self._threads:
            t.join(timeout=10)


class ExpertTaskRunner:
    """A task body: SwiGLU of one expert from host weights on host activations, with the process's
    CPU expert kernel (engine/cpu_kernels.py), written straight into the expert's output rows.

    With avx2-stream, the pool runs a layer's experts through one foreign call per worker
    (units): the experts go into one stream_backend.ExpertBatch, longest first, and every worker
    runs it, taking the next expert from the list's shared counter as it frees up (the same
    longest-first list scheduling as one queue entry per expert, without the Python wrapper's
    cost per expert). Calls that run `linear` instead (float32 above stream_backend.MAX_TOKENS)
    stay units of their own, queued first (they are the longest). The bits are the per-expert
    call's either way (tests/test_runtime_stream_batch.py)."""

    def __init__(self, x_host: torch.Tensor, out_host: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> None:
        self.x_host, self.out_host, self.w13, self.w2 = x_host, out_host, w13, w2

    def __call__(self, task: ExpertTask) -> None:
        a, b = task.start, task.stop
        cpu_swiglu_into(self.x_host[a:b], self.w13[task.expert], self.w2[task.expert], self.out_host[a:b],
                        fixed=True)

    def batched(self) -> bool:
        """Whether this runner's experts run as one foreign call per worker (avx2-stream)."""
        return for_weights(self.x_host.dtype, fixed=True).name == "avx2-stream"

    def units(self, order: list[ExpertTask], workers: int) -> list[Unit]:
        """The units a pool of `workers` runs for `order` (longest first): with the list, one
        per worker (at most one per listed expert) sharing it, plus one per task the list does
        not take; else one per task."""
        if not order or not self.batched():
            return [functools.partial(self, t) for t in order]
        dtype = self.x_host.dtype
        alone = [t for t in order if not stream_backend.runs_kernel(dtype, t.stop - t.start)]
        listed = [t for t in order if stream_backend.runs_kernel(dtype, t.stop - t.start)]
        units: list[Unit] = [functools.partial(self, t) for t in alone]
        if listed:
            batch = stream_backend.expert_batch_or_none(self.x_host, self.out_host, self.w13, self.w2,
                                                        [t.expert for t in listed], [t.start for t in listed],
                                                        [t.stop for t in listed])
            if batch is None:
                return [functools.partial(self, t) for t in order]
            units += [batch.run] * min(workers, len(listed))
        return units


def expert_task_runner(x_host: torch.Tensor, out_host: torch.Tensor, w13: torch.Tensor,
                       w2: torch.Tensor) -> ExpertTaskRunner:
    """The pool's task body for these buffers and banks (ExpertTaskRunner)."""
    return ExpertTaskRunner(x_host, out_host, w13, w2)
