"""Worker processes that end with the process that started them.

A pool's workers outlive a parent killed with SIGKILL (no cleanup runs), and each holds hundreds
of MB. `die_with_parent` is the pool initializer that prevents it: on Linux the kernel sends the
worker SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG); everywhere, a watchdog thread ends
the worker within WATCH_INTERVAL_S once its parent is gone (it is re-parented, so getppid changes).

A Ctrl-C reaches the whole process group: the parent says "interrupted" once (tidesim.cli), and a
worker ends at once and silently (exit 130) instead of printing its own traceback.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1          # from <linux/prctl.h>
WATCH_INTERVAL_S = 0.5


def die_with_parent(parent: int) -> None:
    """Pool initializer: end this worker when process `parent` (the one that made the pool) dies, and
    silently on Ctrl-C."""
    signal.signal(signal.SIGINT, _interrupted)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:          # the parent died before the line above took effect
        os._exit(1)
    threading.Thread(target=_watch, args=(parent,), name="die-with-parent", daemon=True).start()


def _interrupted(signum: int, frame: object) -> None:
    os._exit(130)


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_INTERVAL_S)
    os._exit(1)
