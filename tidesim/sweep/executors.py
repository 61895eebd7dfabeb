"""Where a sweep's tasks run: inline (one worker), a local process pool, or a Dask distributed
cluster. All run the same function on the same items, so results are identical."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

from tidesim.errors import InputError
from tidesim.procs import die_with_parent

EXECUTORS = ("local", "dask")


class InlineExecutor:
    """Runs tasks one after another in this process (one worker; tests; debugging)."""

    def __enter__(self) -> InlineExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def unordered(self, fn: Callable[..., Any], items: Iterable[Any], *args: Any) -> Iterator[Any]:
        for item in items:
            yield fn(item, *args)


class LocalExecutor:
    """A process pool on this machine; results come back as they finish. Its workers end with this
    process, even when it is killed with SIGKILL (tidesim.procs)."""

    def __init__(self, workers: int) -> None:
        self.pool = ProcessPoolExecutor(max_workers=workers, initializer=die_with_parent,
                                        initargs=(os.getpid(),))
        self.workers = workers

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def unordered(self, fn: Callable[..., Any], items: Iterable[Any], *args: Any) -> Iterator[Any]:
        pending: set[Future[Any]] = set()
        queue = iter(items)
        window = 4 * self.workers                            # bounded: a kill loses little work
        for item in queue:
            pending.add(self.pool.submit(fn, item, *args))
            if len(pending) >= window:
                break
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in sorted(done, key=id):
                yield fut.result()
                nxt = next(queue, None)
                if nxt is not None:
                    pending.add(self.pool.submit(fn, nxt, *args))


DASK_CONNECT_TIMEOUT_S = 10.0


def check_scheduler(address: str, timeout_s: float) -> None:
    """InputError unless a Dask scheduler at `address` answers an identity request within timeout_s
    (the Client itself can wait forever on an address that accepts and says nothing)."""
    import asyncio

    from distributed.core import rpc

    async def identity() -> Any:
        async with rpc(address) as remote:
            return await remote.identity()

    try:
        info = asyncio.run(asyncio.wait_for(identity(), timeout_s))
    except Exception:          # refused, timed out, garbage from something that is not a scheduler
        info = None
    if not isinstance(info, dict):
        raise InputError(f"the Dask scheduler {address!r} did not answer within {timeout_s:g} s; check the address "
                         "and that the scheduler runs")


class DaskExecutor:
    """A Dask distributed cluster: an existing scheduler, or a local cluster started here."""

    def __init__(self, scheduler: str | None, workers: int) -> None:
        try:
            from dask.distributed import Client, LocalCluster
        except ImportError:
            raise InputError("the dask executor needs dask[distributed]: pip install 'tidesim[dask]'") from None
        self.cluster = None
        if scheduler:
            check_scheduler(scheduler, DASK_CONNECT_TIMEOUT_S)
        try:
            if scheduler:
                self.client = Client(scheduler, timeout=DASK_CONNECT_TIMEOUT_S)
            else:
                self.cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                            dashboard_address=None)
                self.client = Client(self.cluster)
        except (OSError, TimeoutError) as exc:
            raise InputError(f"cannot reach the Dask scheduler {scheduler!r} ({exc}); check the address") from None

    def __enter__(self) -> DaskExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        if self.cluster is not None:
            self.cluster.close()

    def unordered(self, fn: Callable[..., Any], items: Iterable[Any], *args: Any) -> Iterator[Any]:
        from dask.distributed import as_completed

        futures = [self.client.submit(fn, item, *args, pure=False) for item in items]
        try:
            for fut in as_completed(futures):
                yield fut.result()
        finally:
            for fut in futures:
                fut.cancel()


def check_executor(kind: str, workers: int, scheduler: str | None) -> None:
    if kind not in EXECUTORS:
        raise InputError(f"executor must be one of {', '.join(EXECUTORS)}, got {kind!r}")
    if workers < 1:
        raise InputError(f"workers must be at least 1, got {workers}")
    if scheduler and kind != "dask":
        raise InputError("--scheduler only applies to --executor dask")


def make_executor(kind: str, workers: int, scheduler: str | None = None
                  ) -> Executor:
    check_executor(kind, workers, scheduler)
    if kind == "dask":
        return DaskExecutor(scheduler, workers)
    return InlineExecutor() if workers == 1 else LocalExecutor(workers)



Executor = InlineExecutor | LocalExecutor | DaskExecutor
