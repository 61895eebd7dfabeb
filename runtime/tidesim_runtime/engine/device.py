"""Which device plays the GPU: a CUDA GPU when asked for and present, else the CPU ("cpu-as-gpu").

On a machine without CUDA the whole runtime still runs: the "GPU" side (attention, shared
expert, gate, resident experts) runs on the CPU in the calling thread, copies are memcpy between
host buffers on a copy thread, and the CPU worker pool gets the remaining cores. Every result says
which mode produced it, so a CPU-as-GPU measurement is never mistaken for a GPU one.
"""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime

import torch

from tidesim.errors import InputError

CUDA, CPU_AS_GPU = "cuda", "cpu-as-gpu"
DEVICE_CHOICES = ("auto", "cuda", "cpu")


@dataclass(frozen=True)
class DeviceInfo:
    """The device that runs the GPU side, its compute dtype and memory, and the CPU split."""

    kind: str                     # "cuda" or "cpu-as-gpu"
    torch_device: torch.device
    dtype: torch.dtype            # dtype of GPU-side weights and activations
    name: str
    memory_bytes: int             # memory that holds GPU-side weights and expert slots
    gpu_threads: int              # CPU threads doing GPU-side work (cpu-as-gpu only; 0 on CUDA)
    cpu_workers: int              # CPU worker pool: experts computed at once
    cpu_threads_per_worker: int
    cpu_set: tuple[int, ...] = ()   # logical CPUs the runtime runs on: one per physical core, one NUMA node
    numa_node: int | None = None    # that node, where the host has several

    @property
    def index(self) -> int:
        """The CUDA device index (0 on the CPU-as-GPU path)."""
        return int(self.torch_device.index or 0)

    @property
    def is_cuda(self) -> bool:
        return self.kind == CUDA

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def describe(self) -> str:
        side = (f"{self.name} (cuda:{self.index})" if self.is_cuda
                else f"CPU as GPU ({self.gpu_threads} thread, {self.dtype_name})")
        node = f", NUMA node {self.numa_node}" if self.numa_node is not None else ""
        return (f"{side}; CPU pool {self.cpu_workers} worker(s) x {self.cpu_threads_per_worker} "
                f"thread(s){node}")


def cuda_available() -> bool:
    return bool(torch.cuda.is_available())


def select_device(requested: str = "auto", cpu_workers: int | None = None) -> DeviceInfo:
    """The device for `requested` ("auto", "cuda" or "cpu"); InputError when CUDA is asked for
    and absent (before any work is done).

    Dtypes: bf16 on CUDA, as the checkpoints; float32 in cpu-as-gpu mode, because CPUs without
    native bf16 arithmetic run bf16 matmuls several times slower than fp32 (which would misstate the
    GPU side's share); the cost model then sees fp32 bytes per parameter as "effective bandwidth",
    which `tidesim calibrate` records in model (bf16) bytes.
    """
    if requested not in DEVICE_CHOICES:
        raise InputError(f"--device must be one of {', '.join(DEVICE_CHOICES)}, got {requested!r}")
    want_cuda = requested == "cuda" or (requested == "auto" and cuda_available())
    if want_cuda and not cuda_available():
        raise InputError("--device cuda was requested but no CUDA GPU is visible to torch "
                         f"(torch {torch.__version__}); use --device cpu, or run on a machine with a GPU")
    index = int(torch.cuda.current_device()) if want_cuda else None
    placement = cpu_placement(pci_bus_id(index) if index is not None else None)
    cores = len(placement.cpus)
    workers = cpu_workers or 1
    if want_cuda:
        assert index is not None
        props = torch.cuda.get_device_properties(index)
        # One core keeps launching GPU work; the pool gets the rest.
        threads = max(1, (cores - 1) // workers)
        return DeviceInfo(CUDA, torch.device("cuda", index), torch.bfloat16, props.name,
                          int(props.total_memory), 0, workers, threads, placement.cpus, placement.node)
    gpu_threads = 1
    threads = max(1, (cores - gpu_threads) // workers)
    return DeviceInfo(CPU_AS_GPU, torch.device("cpu"), torch.float32, cpu_model_name(),
                      host_memory_available(), gpu_threads, workers, threads, placement.cpus, placement.node)


# ----- CPU placement: physical cores of one NUMA node ----------------------------------------------
@dataclass(frozen=True)
class CpuPlacement:
    """Where the runtime's threads run: one logical CPU per physical core (hyperthreads share a
    core's FMA units and cache, so counting them as cores overstates the pool), all on one NUMA
    node when there are several (node-local DRAM for the expert banks, first-touch)."""

    cpus: tuple[int, ...]
    node: int | None        # None when the host has one node


def parse_cpu_list(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11] (the kernel's cpulist format)."""
    out: list[int] = []
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def _read(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return None


def numa_nodes(root: str = "/sys") -> dict[int, list[int]]:
    """NUMA node -> its logical CPUs, from /sys/devices/system/node (empty when unreadable)."""
    base = f"{root}/devices/system/node"
    nodes: dict[int, list[int]] = {}
    try:
        entries = os.listdir(base)
    except OSError:
        return nodes
    for entry in entries:
        if entry.startswith("node") and entry[4:].isdigit():
            text = _read(f"{base}/{entry}/cpulist")
            if text:
                nodes[int(entry[4:])] = parse_cpu_list(text)
    return dict(sorted(nodes.items()))


def physical_cores(cpus: list[int], root: str = "/sys") -> list[int]:
    """One logical CPU per physical core among `cpus` (the lowest-numbered sibling present)."""
    chosen: list[int] = []
    seen: set[tuple[int, ...]] = set()
    for cpu in sorted(cpus):
        text = (_read(f"{root}/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
                or _read(f"{root}/devices/system/cpu/cpu{cpu}/topology/core_cpus_list"))
        siblings = tuple(sorted(parse_cpu_list(text))) if text else (cpu,)
        if siblings not in seen:
            seen.add(siblings)
            chosen.append(cpu)
    return chosen


def cpu_placement(gpu_bus_id: str | None = None, root: str = "/sys",
                  usable: list[int] | None = None) -> CpuPlacement:
    """The CPUs the runtime uses: physical cores of the GPU's NUMA node (or of the node with the
    most usable CPUs when the GPU's is unknown), or of the whole machine when it has one node."""
    allowed = sorted(usable if usable is not None else _affinity())
    nodes = {n: [c for c in cpus if c in set(allowed)] for n, cpus in numa_nodes(root).items()}
    nodes = {n: cpus for n, cpus in nodes.items() if cpus}
    node: int | None = None
    cpus = allowed
    if len(nodes) > 1:
        local = gpu_numa_node(gpu_bus_id, root) if gpu_bus_id else None
        node = local if local in nodes else max(nodes, key=lambda n: (len(nodes[n]), -n))
        cpus = nodes[node]
    return CpuPlacement(tuple(physical_cores(cpus, root)) or tuple(allowed), node)


def gpu_numa_node(bus_id: str, root: str = "/sys") -> int | None:
    """The NUMA node of a PCI device ('0000:19:00.0'), or None (-1 or unreadable)."""
    text = _read(f"{root}/bus/pci/devices/{bus_id.lower()}/numa_node")
    try:
        value = int(text) if text is not None else -1
    except ValueError:
        return None
    return value if value >= 0 else None


def pci_bus_id(index: int) -> str | None:
    """The CUDA device's PCI address as sysfs names it ('0000:19:00.0'), from torch or nvidia-smi."""
    try:
        props = torch.cuda.get_device_properties(index)
        if hasattr(props, "pci_bus_id"):
            return (f"{int(getattr(props, 'pci_domain_id', 0)):04x}:{int(props.pci_bus_id):02x}:"
                    f"{int(getattr(props, 'pci_device_id', 0)):02x}.0")
    except (RuntimeError, AssertionError):
        pass
    out = nvidia_smi_query("pci.bus_id", index)
    return normalize_bus_id(out) if out else None


def normalize_bus_id(text: str) -> str:
    """nvidia-smi's '00000000:19:00.0' -> sysfs's '0000:19:00.0'."""
    domain, rest = text.strip().split(":", 1)
    return f"{int(domain, 16):04x}:{rest.lower()}"


def nvidia_smi_query(field: str, index: int) -> str | None:
    """One --query-gpu field of GPU `index`, or None when nvidia-smi is missing or fails."""
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader,nounits",
                              "-i", str(index)], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    text = out.stdout.strip().splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else ""
    return text if text and "N/A" not in text and "not supported" not in text.lower() else None


PCIE_GT_PER_LANE = {2.5: 1, 5.0: 2, 8.0: 3, 16.0: 4, 32.0: 5, 64.0: 6}


def pcie_generation(index: int, bus_id: str | None, root: str = "/sys") -> int | None:
    """The link's PCIe generation: nvidia-smi's pcie.link.gen.max, else sysfs max_link_speed."""
    text = nvidia_smi_query("pcie.link.gen.max", index)
    if text and text.isdigit():
        return int(text)
    if bus_id:
        speed = _read(f"{root}/bus/pci/devices/{bus_id.lower()}/max_link_speed")
        return generation_from_link_speed(speed) if speed else None
    return None


def generation_from_link_speed(text: str) -> int | None:
    """'32.0 GT/s PCIe' -> 5."""
    try:
        return PCIE_GT_PER_LANE.get(float(text.split()[0]))
    except (ValueError, IndexError):
        return None


def _affinity() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


class PinnedThreads:
    """Runs the calling thread (and every thread it starts afterwards: the CPU pool, torch's
    intra-op threads) on `cpus`; restore() puts the old affinity back. A no-op off Linux, and when
    the set is empty or already the current one."""

    def __init__(self, cpus: tuple[int, ...]) -> None:
        self.before: set[int] | None = None
        if not cpus or not hasattr(os, "sched_setaffinity"):
            return
        current = os.sched_getaffinity(0)
        if set(cpus) != current:
            try:
                os.sched_setaffinity(0, set(cpus))
                self.before = current
            except OSError:  # a container may forbid it; run unpinned
                self.before = None

    def restore(self) -> None:
        if self.before is not None:
            os.sched_setaffinity(0, self.before)
            self.before = None


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def host_memory_available() -> int:
    """Bytes of host memory available now (MemAvailable), without psutil."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def host_memory_total() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 0


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def last_level_cache_bytes(root: str = "/sys") -> int:
    """Bytes of last-level cache over all its instances (several L3 slices on multi-die CPUs):
    lscpu's ALL-SIZE of the highest level, else sysfs (size of cpu0's highest cache times its
    distinct instances), else 64 MiB."""
    text = _lscpu_caches() if root == "/sys" else None
    if text:
        best = parse_lscpu_caches(text)
        if best:
            return best
    return sysfs_cache_bytes(root) or 64 * 1024**2


def _lscpu_caches() -> str | None:
    try:
        out = subprocess.run(["lscpu", "-B", "-C=LEVEL,ALL-SIZE,TYPE"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def parse_lscpu_caches(text: str) -> int:
    """The ALL-SIZE of the highest non-instruction cache level in `lscpu -B -C=LEVEL,ALL-SIZE,TYPE`."""
    best: tuple[int, int] = (0, 0)
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit() and "Instruction" not in parts[2:]:
            best = max(best, (int(parts[0]), int(parts[1])))
    return best[1]


def _size(text: str) -> int:
    mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
    return (int(text[:-1]) if text[-1:].isalpha() else int(text)) * mult


def sysfs_cache_bytes(root: str = "/sys") -> int:
    """cpu0's highest cache level: one instance's size times the distinct instances of that level
    (cpus sharing one instance list the same shared_cpu_list); 0 when unreadable."""
    base = f"{root}/devices/system/cpu"
    try:
        entries = [e for e in os.listdir(f"{base}/cpu0/cache") if e.startswith("index")]
        cpus = [e for e in os.listdir(base) if e.startswith("cpu") and e[3:].isdigit()]
    except OSError:
        return 0
    best: tuple[int, int, str] = (0, 0, "")
    for entry in entries:
        level, size, kind = (_read(f"{base}/cpu0/cache/{entry}/{f}") for f in ("level", "size", "type"))
        if level and size and kind != "Instruction":
            try:
                best = max(best, (int(level), _size(size), entry))
            except ValueError:
                continue
    if not best[1]:
        return 0
    shared = {_read(f"{base}/{cpu}/cache/{best[2]}/shared_cpu_list") for cpu in cpus}
    return best[1] * max(1, len(shared - {None}))


def provenance_fields(info: DeviceInfo) -> dict[str, str]:
    """Device, driver, torch and CPU facts for a measured profile's provenance."""
    driver = ""
    if info.is_cuda:
        driver = f"CUDA {torch.version.cuda}"
        version = nvidia_smi_query("driver_version", info.index)
        if version:
            driver += f", driver {version}"
    cores = len(info.cpu_set) or usable_cores()
    node = f" of NUMA node {info.numa_node}" if info.numa_node is not None else ""
    return {
        "device": info.describe(),
        "driver": driver or "none (no GPU)",
        "torch": torch.__version__,
        "cpu": f"{cpu_model_name()}, {cores} physical cores{node} used",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }
