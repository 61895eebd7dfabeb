"""Streams and copy engines: the host copy engine's order, the background feeder's rule (one
copy queued behind the one running; shared by the CUDA backend), queued copy timing; CUDA-only
checks skip without a GPU."""

from __future__ import annotations

import threading
import time

import pytest

torch = pytest.importorskip("torch")

from tidesim_runtime.engine.streams import D2H, H2D, BackgroundFeeder, HostBackend, Marker, make_backend  # noqa: E402


class FakeLink:
    """Plays one device stream for BackgroundFeeder: copies run in issue order, copy k starts
    when copy k-1 has finished, and a copy finishes when the test releases it. Records how many
    copies the device held at once (issued and not finished)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done: set[int] = set()
        self.most = 0
        self.issued: list[int] = []
        self.release: dict[int, threading.Event] = {}

    def event(self, job: int) -> threading.Event:
        with self.lock:
            return self.release.setdefault(job, threading.Event())

    def issue(self, job: int) -> int:
        with self.lock:
            self.issued.append(job)
            self.most = max(self.most, len(self.issued) - len(self.done))
        return job

    def started(self, job: int) -> None:
        k = self.issued.index(job)
        if k:
            self.finished(self.issued[k - 1])

    def finished(self, job: int) -> None:
        assert self.event(job).wait(5)
        with self.lock:
            self.done.add(job)


def wait_until(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.001)


def test_feeder_queues_one_background_copy_behind_the_running_one() -> None:
    link = FakeLink()
    feeder = BackgroundFeeder(link.issue, link.started, link.finished)
    try:
        for job in range(4):
            feeder.submit(job)
        wait_until(lambda: link.issued == [0, 1])   # the next is queued while the first runs
        time.sleep(0.02)
        assert link.issued == [0, 1], "a third copy was handed to the device before the first finished"
        for job in range(4):
            link.event(job).set()
            wait_until(lambda job=job: len(link.issued) >= min(job + 3, 4))
        feeder.drain()
        assert link.issued == [0, 1, 2, 3] and link.most == 2
        assert link.done == {0, 1, 2, 3}     # drain waited for the last one to finish
    finally:
        feeder.close()


def test_feeder_drain_reports_a_failed_copy() -> None:
    def issue(job: int) -> int:
        raise RuntimeError("copy failed")

    feeder = BackgroundFeeder(issue, lambda h: None, lambda h: None)
    try:
        feeder.submit(1)
        with pytest.raises(RuntimeError, match="copy failed"):
            feeder.drain()
    finally:
        feeder.close()


def test_host_copy_engine_serves_a_demand_copy_after_the_copy_in_progress() -> None:
    """A background copy in progress (held), three more queued, then a demand copy, all into one
    buffer: the demand copy runs before the queued background ones, so theirs is the value left
    (first-in-first-out would leave the demand copy's 2)."""
    be = HostBackend()
    try:
        gate = threading.Event()
        dst = torch.zeros(4)
        held = be.copy(dst, torch.zeros(4), H2D, background=True, after=[Marker(flag=gate)])
        bgs = [be.copy(dst, torch.full((4,), 1.0), H2D, background=True) for _ in range(3)]
        demand = be.copy(dst, torch.full((4,), 2.0), H2D)
        gate.set()
        for m in [held, demand, *bgs]:
            be.host_wait(m)
        assert torch.equal(dst, torch.full((4,), 1.0))
    finally:
        be.close()


def test_host_copy_engine_serves_demand_before_background() -> None:
    """While the engine is held, a background copy then a demand copy into the same buffer are
    queued; demand goes first, so the background value is the one left (FIFO would leave 2)."""
    be = HostBackend()
    try:
        gate = threading.Event()
        held = be.copy(torch.empty(1), torch.empty(1), H2D, after=[Marker(flag=gate)])
        dst = torch.zeros(4)
        bg = be.copy(dst, torch.full((4,), 1.0), H2D, background=True)
        demand = be.copy(dst, torch.full((4,), 2.0), D2H)
        time.sleep(0.02)
        assert not bg.done() and not demand.done()
        gate.set()
        for m in (held, demand, bg):
            be.host_wait(m)
        assert torch.equal(dst, torch.full((4,), 1.0))
        busy = be.copy_busy_s()
        assert busy[H2D] > 0 and busy[D2H] > 0
    finally:
        be.close()


def test_host_copy_queue_time_is_per_copy() -> None:
    be = HostBackend()
    try:
        src = torch.ones(1 << 16)
        dst = torch.zeros(1 << 16)
        per = be.copy_queue_s([(dst, src)] * 8, D2H)
        assert per > 0
        assert torch.equal(dst, src)
        busy = be.copy_busy_s()
        assert busy[D2H] > 0 and busy[H2D] == 0
    finally:
        be.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_background_copies_land_in_order_and_are_waited_for() -> None:
    dev = torch.device("cuda", torch.cuda.current_device())
    be = make_backend(dev)
    try:
        host = torch.arange(4 * 1024, dtype=torch.float32).view(4, 1024).pin_memory()
        slots = torch.zeros(4, 1024, device=dev)
        with torch.inference_mode():
            marks = [be.copy(slots[i], host[i], H2D, background=True) for i in range(4)]
            be.compute_wait(marks)
            total = slots.sum()
        be.synchronize()
        assert float(total) == float(host.sum())
        assert all(m.done() for m in marks)
        a = be.timepoint()
        b = be.timepoint()
        be.synchronize()
        assert be.elapsed(a, b) >= 0
        assert be.copy_queue_s([(slots[i], host[i]) for i in range(4)], H2D) > 0
        assert torch.equal(slots.cpu(), host)
    finally:
        be.close()
