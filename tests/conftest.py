"""Shared test settings: no display, a fixed hypothesis profile that keeps the suite fast."""

import os
from collections.abc import Iterator

import matplotlib
import pytest
from hypothesis import HealthCheck, settings

matplotlib.use("Agg")
os.environ.setdefault("MPLBACKEND", "Agg")

settings.register_profile(
    "tidesim", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.load_profile("tidesim")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(request: pytest.FixtureRequest) -> Iterator[None]:
    """Runtime tests: tiny matmuls run fastest on one torch thread (and stay fast on a busy machine);
    the previous setting is restored after the module. Other tests never import torch."""
    if not request.module.__name__.startswith(("test_runtime", "test_cli_calibrate")):
        yield
        return
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
