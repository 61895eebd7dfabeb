"""Which device plays the GPU: a CUDA GPU when asked for and present, else the CPU ("cpu-as-gpu").

On a machine without CUDA the whole runtime still runs: the "GPU" side (attention, shared
expert, gate, resident experts) runs on the CPU in the calling thread, copies are memcpy between
host buffers on a copy thread, and the CPU worker pool gets the remaining cores. Every result says
which mode produced it, so a CPU-as-GPU measurement is never mistaken for a GPU one.
"""

from __future__ import annotations

import os
import platform
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

    @property
    def is_cuda(self) -> bool:
        return self.kind == CUDA

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def describe(self) -> str:
        side = self.name if self.is_cuda else f"CPU as GPU ({self.gpu_threads} thread, {self.dtype_name})"
        return (f"{side}; CPU pool {self.cpu_workers} worker(s) x {self.cpu_threads_per_worker} "
                f"thread(s)")


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
    cores = usable_cores()
    if requested == "cuda" or (requested == "auto" and cuda_available()):
        if not cuda_available():
            raise InputError("--device cuda was requested but no CUDA GPU is visible to torch "
                             f"(torch {torch.__version__}); use --device cpu, or run on a machine with a GPU")
        props = torch.cuda.get_device_properties(0)
        workers = cpu_workers or 1
        # One core keeps launching GPU work; the pool gets the rest.
        threads = max(1, (cores - 1) // workers)
        return DeviceInfo(CUDA, torch.device("cuda", 0), torch.bfloat16, props.name,
                          int(props.total_memory), 0, workers, threads)
    workers = cpu_workers or 1
    gpu_threads = 1
    threads = max(1, (cores - gpu_threads) // workers)
    return DeviceInfo(CPU_AS_GPU, torch.device("cpu"), torch.float32, cpu_model_name(),
                      host_memory_available(), gpu_threads, workers, threads)


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


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (bytes); 64 MiB when it cannot be read."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            if not entry.startswith("index"):
                continue
            with open(f"{base}/{entry}/size") as fh:
                text = fh.read().strip()
            mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(text[-1:], 1)
            value = int(text[:-1]) if text[-1:].isalpha() else int(text)
            best = max(best, value * mult)
    except (OSError, ValueError):
        pass
    return best or 64 * 1024**2


def provenance_fields(info: DeviceInfo) -> dict[str, str]:
    """Device, driver, torch and CPU facts for a measured profile's provenance."""
    driver = ""
    if info.is_cuda:
        driver = f"CUDA {torch.version.cuda}"
        try:
            import subprocess

            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10, check=False)
            if out.returncode == 0 and out.stdout.strip():
                driver += f", driver {out.stdout.strip().splitlines()[0]}"
        except (OSError, subprocess.SubprocessError):
            pass
    return {
        "device": info.describe(),
        "driver": driver or "none (no GPU)",
        "torch": torch.__version__,
        "cpu": f"{cpu_model_name()}, {usable_cores()} usable cores",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
    }
