"""The what-if hardware of a sweep point: its base profile scaled by the point's PCIe, GPU, CPU and
memory settings, and the columns that record what it resolved to."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from tidesim.hardware import HardwareProfile, check_ranges, get_profile
from tidesim.sweep.grid import PCIE_GEN_GBS


@lru_cache(maxsize=16)
def _base_profile(name: str) -> HardwareProfile:
    return get_profile(name)


def pcie_factor(params: dict[str, Any], base: HardwareProfile) -> float:
    """Factor on the base profile's PCIe bandwidth from pcie_gbs, pcie_gen or pcie_scale."""
    if params.get("pcie_gbs") is not None:
        return float(params["pcie_gbs"]) / base.pcie.h2d_gbs
    if params.get("pcie_gen") is not None:
        return PCIE_GEN_GBS[int(params["pcie_gen"])] / base.pcie.h2d_gbs
    if params.get("pcie_scale") is not None:
        return float(params["pcie_scale"])
    return 1.0


def build_hardware(params: dict[str, Any]) -> HardwareProfile:
    """The what-if variant of the point's base profile."""
    base = _base_profile(params["hw"])
    hw = base.scaled(pcie=pcie_factor(params, base), gpu_speed=params["gpu_speed"],
                     cpu_cores=params["cpu_cores_scale"], cpu_mem_bw=params["cpu_mem_bw_scale"],
                     gpu_memory_gib=params["gpu_memory_gib"])
    check_ranges(hw, "the what-if hardware")            # out of the plausible ranges: an error row
    return hw


def hardware_columns(hw: HardwareProfile) -> dict[str, Any]:
    return {"hw_name": hw.name, "hw_h2d_gbs": hw.pcie.h2d_gbs, "hw_d2h_gbs": hw.pcie.d2h_gbs,
            "hw_gpu_memory_gib": hw.gpu.memory_gib, "hw_cpu_cores": hw.cpu.cores,
            "hw_cpu_workers": hw.cpu.workers}
