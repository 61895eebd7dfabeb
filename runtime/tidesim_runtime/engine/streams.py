"""Streams, copy engines and events, for a CUDA GPU or for the CPU playing the GPU.

The executor issues work in one order and waits on markers; the backend decides what that means:

- CudaBackend: the compute stream runs kernels asynchronously; copies go on their own streams
  (H2D demand, H2D background, D2H) and order themselves with CUDA events; the host blocks only
  where it must read something. Phase boundaries are CUDA timing events. Stream priorities order
  kernels, not copies: two H2D streams share the link and the copy engines serve them in no
  promised order. So background copies are not all handed to CUDA at once: a feeder thread
  (BackgroundFeeder) holds them in a host-side queue and issues the next one as soon as the one
  in flight has *started*, so it waits on the device behind it (no host round trip between two
  background copies leaves the link idle) while CUDA never holds more than two background
  copies, the running one and the next. A demand copy is not queued behind the background
  queue; it shares the H2D link with at most those two (docs/runtime.md, "Copy arbitration").
- HostBackend (cpu-as-gpu): "GPU" work runs synchronously in the calling thread; a copy thread
  plays the copy engine, serving demand copies before background ones (a copy in progress is
  never interrupted, as on a DMA engine); markers are threading events; times are host clock.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

H2D, D2H = "h2d", "d2h"


@dataclass
class Marker:
    """A point in some stream's work: done once everything issued before it there is done."""

    event: Any = None                     # torch.cuda.Event (CUDA)
    flag: threading.Event | None = None   # host backend; on CUDA: set once `event` is recorded
    error: list[BaseException] = field(default_factory=list)

    def done(self) -> bool:
        if self.event is not None:
            return (self.flag is None or self.flag.is_set()) and bool(self.event.query())
        return self.flag.is_set() if self.flag is not None else True


class BackgroundFeeder:
    """Serves background copies from a host-side queue, keeping at most one queued behind the one
    in progress (see the module docstring).

    `issue(job)` hands one copy to the device and returns a handle; `started(handle)` blocks until
    that copy has begun (everything before it on its stream is done); `finished(handle)` until it
    has ended. A thread issues the first queued job, waits until it has started, then issues the
    next (which queues behind it on the device, so the copy engine never idles for a host round
    trip between background copies), and so on: at most two background copies are handed to the
    device at any time, the running one and the next.
    """

    def __init__(self, issue: Callable[[Any], Any], started: Callable[[Any], None],
                 finished: Callable[[Any], None], setup: Callable[[], None] | None = None) -> None:
        self._issue, self._started, self._finished, self._setup = issue, started, finished, setup
        self._queue: deque[Any] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._idle = True
        self._last: Any = None
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._serve, name="tidesim-background-copies", daemon=True)
        self._thread.start()

    def submit(self, job: Any) -> None:
        with self._cv:
            self._queue.append(job)
            self._idle = False
            self._cv.notify_all()

    def drain(self) -> None:
        """Block until every submitted job has been issued and has finished."""
        with self._cv:
            while self._queue or not self._idle:
                self._cv.wait()
            last = self._last
        if last is not None:
            self._finished(last)
        if self.errors:
            raise self.errors[0]

    def _serve(self) -> None:
        if self._setup is not None:
            self._setup()
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
            try:
                handle = self._issue(job)
                self._started(handle)
                self._last = handle
            except BaseException as exc:  # surfaced by drain() in the issuing thread
                self.errors.append(exc)
            with self._cv:
                if not self._queue:
                    self._idle = True
                self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=10)


class Backend:
    """The operations the executor needs; see the module docstring."""

    is_cuda = False

    def mark(self) -> Marker:
        raise NotImplementedError

    def compute_wait(self, markers: list[Marker]) -> None:
        raise NotImplementedError

    def copy(self, dst: torch.Tensor, src: torch.Tensor, direction: str, background: bool = False,
             after: list[Marker] | None = None) -> Marker:
        raise NotImplementedError

    def host_wait(self, marker: Marker) -> None:
        raise NotImplementedError

    def copy_queue_s(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], direction: str) -> float:
        """Seconds per copy of the (dst, src) copies queued back to back on the demand path, timed
        on the device (no host launch-and-sync round trip per copy, which queued copies never pay).
        Distinct buffers per copy let a caller time copies of memory no cache holds, as the
        executor's copies of experts are."""
        raise NotImplementedError

    def timepoint(self) -> Any:
        raise NotImplementedError

    def elapsed(self, a: Any, b: Any) -> float:
        """Seconds between two timepoints (after synchronize())."""
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait for everything issued: compute, every copy, the background queue."""
        raise NotImplementedError

    def compute_synchronize(self) -> None:
        """Wait for the compute stream only: background copies go on (live mode ends a forward
        here, so an asynchronous refresh spans forwards as the simulator lets it)."""
        raise NotImplementedError

    def copy_mark(self) -> int:
        """A mark in the log of copies (for copy_busy_s(since=...))."""
        raise NotImplementedError

    def copy_busy_s(self, since: int = 0, until: int | None = None) -> dict[str, float]:
        """Copy-engine seconds per direction of the copies logged between two marks (waits for
        every copy first)."""
        raise NotImplementedError

    def reset_counters(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class CudaBackend(Backend):
    """CUDA streams and events (see the module docstring)."""

    is_cuda = True

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.compute = torch.cuda.current_stream(device)
        self.h2d = torch.cuda.Stream(device)
        self.h2d_bg = torch.cuda.Stream(device)
        self.d2h = torch.cuda.Stream(device)
        self._copy_events: list[tuple[str, Any, Any]] = []
        self._feeder = BackgroundFeeder(self._issue_background, lambda h: h[0].synchronize(),
                                        lambda h: h[1].synchronize(), self._feeder_setup)

    def _feeder_setup(self) -> None:
        torch.cuda.set_device(self.device)
        torch.autograd.grad_mode.inference_mode(True).__enter__()  # thread-local, as the caller's

    def _issue(self, stream: Any, dst: torch.Tensor, src: torch.Tensor, direction: str,
               after: list[Marker], end: Any) -> Any:
        for m in after:
            if m.event is not None:
                if m.flag is not None:
                    m.flag.wait()  # a background copy not issued yet: its event is not recorded
                stream.wait_event(m.event)
        start = torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            dst.copy_(src, non_blocking=True)
            end.record(stream)
        self._copy_events.append((direction, start, end))
        return start

    def _issue_background(self, job: tuple[torch.Tensor, torch.Tensor, list[Marker], Marker]) -> Any:
        dst, src, after, marker = job
        try:
            start = self._issue(self.h2d_bg, dst, src, H2D, after, marker.event)
        finally:
            assert marker.flag is not None
            marker.flag.set()
        return start, marker.event

    def mark(self) -> Marker:
        ev = torch.cuda.Event()
        ev.record(self.compute)
        return Marker(event=ev)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, direction: str, background: bool = False,
             after: list[Marker] | None = None) -> Marker:
        end = torch.cuda.Event(enable_timing=True)
        if background and direction == H2D:
            marker = Marker(event=end, flag=threading.Event())
            self._feeder.submit((dst, src, list(after or []), marker))
            return marker
        self._issue(self.d2h if direction == D2H else self.h2d, dst, src, direction, list(after or []), end)
        return Marker(event=end)

    def compute_wait(self, markers: list[Marker]) -> None:
        for m in markers:
            if m.event is not None:
                if m.flag is not None:
                    m.flag.wait()
                self.compute.wait_event(m.event)

    def host_wait(self, marker: Marker) -> None:
        if marker.event is not None:
            if marker.flag is not None:
                marker.flag.wait()
            marker.event.synchronize()

    def copy_queue_s(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], direction: str) -> float:
        stream = self.d2h if direction == D2H else self.h2d
        self.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            a.record(stream)
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            b.record(stream)
        b.synchronize()
        return float(a.elapsed_time(b)) / 1e3 / max(len(pairs), 1)

    def timepoint(self) -> Any:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(self.compute)
        return ev

    def elapsed(self, a: Any, b: Any) -> float:
        return float(a.elapsed_time(b)) / 1e3

    def synchronize(self) -> None:
        self._feeder.drain()
        torch.cuda.synchronize(self.device)

    def compute_synchronize(self) -> None:
        self.compute.synchronize()

    def copy_mark(self) -> int:
        return len(self._copy_events)

    def copy_busy_s(self, since: int = 0, until: int | None = None) -> dict[str, float]:
        self.synchronize()
        out = {H2D: 0.0, D2H: 0.0}
        for direction, a, b in self._copy_events[since:until]:
            out[direction] += float(a.elapsed_time(b)) / 1e3
        return out

    def reset_counters(self) -> None:
        self._copy_events.clear()

    def close(self) -> None:
        self._feeder.close()


class HostBackend(Backend):
    """The CPU plays the GPU: synchronous compute, one copy thread as the copy engine."""

    def __init__(self) -> None:
        self._queue: list[tuple[int, int, Callable[[], None]]] = []
        self._cv = threading.Condition()
        self._seq = itertools.count()
        self._log: list[tuple[str, float]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name="tidesim-copy-engine", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        torch.set_num_threads(1)
        with torch.inference_mode():  # thread-local; copies may touch inference tensors
            self._loop()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed and not self._queue:
                    return
                _, _, job = heapq.heappop(self._queue)
            job()

    def mark(self) -> Marker:
        flag = threading.Event()
        flag.set()  # compute is synchronous: everything issued so far is done
        return Marker(flag=flag)

    def compute_wait(self, markers: list[Marker]) -> None:
        for m in markers:
            self.host_wait(m)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, direction: str, background: bool = False,
             after: list[Marker] | None = None) -> Marker:
        def body() -> None:
            t0 = time.perf_counter()
            dst.copy_(src)
            self._log.append((direction, time.perf_counter() - t0))

        return self._submit(body, background, list(after or []))

    def _submit(self, body: Callable[[], None] | None, background: bool, deps: list[Marker]) -> Marker:
        """Queue `body` (None: a fence) after `deps`; demand jobs before background ones."""
        marker = Marker(flag=threading.Event())

        def job() -> None:
            try:
                for m in deps:
                    self.host_wait(m)
                if body is not None:
                    body()
            except BaseException as exc:  # surfaced by host_wait in the issuing thread
                marker.error.append(exc)
            finally:
                assert marker.flag is not None
                marker.flag.set()

        with self._cv:
            heapq.heappush(self._queue, (1 if background else 0, next(self._seq), job))
            self._cv.notify()
        return marker

    def host_wait(self, marker: Marker) -> None:
        if marker.flag is not None:
            marker.flag.wait()
        if marker.error:
            raise marker.error[0]

    def copy_queue_s(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], direction: str) -> float:
        self.synchronize()
        t0 = time.perf_counter()
        marks = [self.copy(dst, src, direction) for dst, src in pairs]
        if marks:
            self.host_wait(marks[-1])
        return (time.perf_counter() - t0) / max(len(pairs), 1)

    def timepoint(self) -> Any:
        return time.perf_counter()

    def elapsed(self, a: Any, b: Any) -> float:
        return float(b - a)

    def synchronize(self) -> None:
        self.host_wait(self._submit(None, background=True, deps=[]))

    def compute_synchronize(self) -> None:
        pass   # compute runs synchronously in the calling thread

    def copy_mark(self) -> int:
        return len(self._log)

    def copy_busy_s(self, since: int = 0, until: int | None = None) -> dict[str, float]:
        self.synchronize()
        out = {H2D: 0.0, D2H: 0.0}
        for direction, seconds in self._log[since:until]:
            out[direction] += seconds
        return out

    def reset_counters(self) -> None:
        self._log = []

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout=10)


def make_backend(device: torch.device) -> Backend:
    return CudaBackend(device) if device.type == "cuda" else HostBackend()
