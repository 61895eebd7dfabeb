"""Device facts read from the host: CPU lists, physical cores, NUMA placement, PCI addresses and
PCIe generations, from a fake /sys tree (the logic is the same on any host)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tidesim_runtime.engine import device as device_mod  # noqa: E402
from tidesim_runtime.engine.device import (  # noqa: E402
    PinnedThreads,
    cpu_placement,
    generation_from_link_speed,
    gpu_numa_node,
    normalize_bus_id,
    numa_nodes,
    parse_cpu_list,
    physical_cores,
    select_device,
)


def fake_sys(root: Path, nodes: dict[int, str], siblings: dict[int, str], pci: dict[str, dict[str, str]]) -> str:
    for n, cpus in nodes.items():
        d = root / "devices/system/node" / f"node{n}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(cpus + "\n")
    for cpu, sib in siblings.items():
        d = root / "devices/system/cpu" / f"cpu{cpu}" / "topology"
        d.mkdir(parents=True)
        (d / "thread_siblings_list").write_text(sib + "\n")
    for bus, files in pci.items():
        d = root / "bus/pci/devices" / bus
        d.mkdir(parents=True)
        for name, text in files.items():
            (d / name).write_text(text + "\n")
    return str(root)


@pytest.fixture
def two_socket(tmp_path: Path) -> str:
    """2 nodes x 4 cores x 2 hyperthreads: cpu c and c+8 share a core; node 0 has cores 0-3."""
    siblings = {c: f"{c % 8},{c % 8 + 8}" for c in range(16)}
    return fake_sys(tmp_path, {0: "0-3,8-11", 1: "4-7,12-15"}, siblings,
                    {"0000:c1:00.0": {"numa_node": "1", "max_link_speed": "32.0 GT/s PCIe"},
                     "0000:19:00.0": {"numa_node": "-1", "max_link_speed": "16.0 GT/s PCIe"}})


def test_parse_cpu_list() -> None:
    assert parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpu_list("5") == [5] and parse_cpu_list("") == []


def test_hyperthreads_are_not_counted_as_cores(two_socket: str) -> None:
    assert physical_cores(list(range(16)), two_socket) == list(range(8))
    assert physical_cores([8, 9, 1], two_socket) == [1, 8]   # 1 and 9 share a core, 8 has its own


def test_placement_uses_the_gpus_numa_node(two_socket: str) -> None:
    assert numa_nodes(two_socket) == {0: [0, 1, 2, 3, 8, 9, 10, 11], 1: [4, 5, 6, 7, 12, 13, 14, 15]}
    p = cpu_placement("0000:c1:00.0", two_socket, usable=list(range(16)))
    assert p.node == 1 and p.cpus == (4, 5, 6, 7)
    # a GPU without a node (-1): the node with the most usable CPUs, the lowest on a tie
    assert gpu_numa_node("0000:19:00.0", two_socket) is None
    p = cpu_placement("0000:19:00.0", two_socket, usable=list(range(16)))
    assert p.node == 0 and p.cpus == (0, 1, 2, 3)
    p = cpu_placement(None, two_socket, usable=[5, 6, 13, 2])
    assert p.node == 1 and p.cpus == (5, 6)


def test_one_node_hosts_use_every_physical_core(tmp_path: Path) -> None:
    root = fake_sys(tmp_path, {0: "0-3"}, {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"}, {})
    p = cpu_placement(None, root, usable=[0, 1, 2, 3])
    assert p.node is None and p.cpus == (0, 1)


def test_unreadable_sysfs_falls_back_to_the_affinity(tmp_path: Path) -> None:
    p = cpu_placement(None, str(tmp_path / "none"), usable=[3, 1])
    assert p.node is None and p.cpus == (1, 3)


def test_pcie_generation_and_bus_ids() -> None:
    assert generation_from_link_speed("32.0 GT/s PCIe") == 5
    assert generation_from_link_speed("16.0 GT/s PCIe") == 4
    assert generation_from_link_speed("8.0 GT/s") == 3
    assert generation_from_link_speed("Unknown") is None
    assert normalize_bus_id("00000000:C1:00.0") == "0000:c1:00.0"


def test_pcie_generation_from_sysfs_when_nvidia_smi_is_missing(two_socket: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_mod, "nvidia_smi_query", lambda field, index: None)
    assert device_mod.pcie_generation(0, "0000:c1:00.0", two_socket) == 5
    assert device_mod.pcie_generation(0, "0000:19:00.0", two_socket) == 4
    assert device_mod.pcie_generation(0, None, two_socket) is None
    monkeypatch.setattr(device_mod, "nvidia_smi_query", lambda field, index: "6")
    assert device_mod.pcie_generation(0, "0000:c1:00.0", two_socket) == 6


def test_cpu_device_splits_physical_cores_between_the_gpu_side_and_the_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_mod, "cpu_placement",
                        lambda bus_id=None: device_mod.CpuPlacement((0, 2, 4, 6, 8), 1))
    dev = select_device("cpu", cpu_workers=2)
    assert dev.cpu_set == (0, 2, 4, 6, 8) and dev.numa_node == 1
    assert dev.gpu_threads == 1 and dev.cpu_threads_per_worker == 2
    assert "NUMA node 1" in dev.describe()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_pinned_threads_restrict_and_restore_the_affinity() -> None:
    before = os.sched_getaffinity(0)
    one = (min(before),)
    pin = PinnedThreads(one)
    try:
        assert os.sched_getaffinity(0) == set(one)
    finally:
        pin.restore()
    assert os.sched_getaffinity(0) == before
    PinnedThreads(()).restore()   # empty: nothing changes
    assert os.sched_getaffinity(0) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_device_uses_the_current_device_index() -> None:
    dev = select_device("cuda")
    assert dev.index == torch.cuda.current_device() and f"cuda:{dev.index}" in dev.describe()
    assert dev.cpu_set


def test_last_level_cache_counts_every_instance(tmp_path: Path) -> None:
    """Two L3 slices of 32 MiB (cpus 0-1 and 2-3): 64 MiB in all; instruction caches ignored."""
    base = tmp_path / "devices/system/cpu"
    for cpu in range(4):
        for idx, (level, size, kind, shared) in enumerate([(1, "32K", "Instruction", str(cpu)),
                                                           (2, "512K", "Unified", str(cpu)),
                                                           (3, "32768K", "Unified", "0-1" if cpu < 2 else "2-3")]):
            d = base / f"cpu{cpu}" / "cache" / f"index{idx}"
            d.mkdir(parents=True)
            for name, text in (("level", level), ("size", size), ("type", kind), ("shared_cpu_list", shared)):
                (d / name).write_text(f"{text}\n")
    assert device_mod.sysfs_cache_bytes(str(tmp_path)) == 64 * 2**20
    assert device_mod.last_level_cache_bytes(str(tmp_path)) == 64 * 2**20
    assert device_mod.last_level_cache_bytes(str(tmp_path / "none")) == 64 * 2**20   # the fallback


def test_lscpu_caches_give_the_highest_levels_total() -> None:
    text = ("LEVEL ALL-SIZE TYPE\n    1    65536 Data\n    1    65536 Instruction\n    2  1048576 Unified\n"
            "    3 268435456 Unified\n")
    assert device_mod.parse_lscpu_caches(text) == 256 * 2**20
    assert device_mod.parse_lscpu_caches("LEVEL ALL-SIZE TYPE\n") == 0
