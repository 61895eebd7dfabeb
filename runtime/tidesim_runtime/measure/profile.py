"""The profile `tidesim calibrate` writes: a Calibration's measurements, with the device's facts
(name, memory, PCIe generation read from the device, physical cores) and their provenance."""

from __future__ import annotations

import torch

from tidesim import __version__
from tidesim.hardware import CPUProfile, GPUProfile, HardwareProfile, PCIeProfile, Provenance
from tidesim.models import ModelSpec
from tidesim_runtime.engine import cpu_kernels
from tidesim_runtime.engine.device import host_memory_total, pci_bus_id, pcie_generation, provenance_fields
from tidesim_runtime.measure.resources import Calibration

GIB = 2**30


def build_profile(cal: Calibration, name: str, models: list[ModelSpec]) -> HardwareProfile:
    dev = cal.device
    facts = provenance_fields(dev)
    assert cal.h2d is not None and cal.d2h is not None
    big_h2d = cal.h2d.x[-1] / (cal.h2d.time_us[-1] * 1e-6) / 1e9
    big_d2h = cal.d2h.x[-1] / (cal.d2h.time_us[-1] * 1e-6) / 1e9
    cpu_curve = cal.cpu_curves[0].curve
    spec0 = models[0]
    cpu_gflops = cpu_curve.x[-1] * spec0.expert_flops_per_token / (cpu_curve.time_us[-1] * 1e-6) / 1e9
    cpu_gflops *= max(dev.cpu_workers, 1)
    generation, gen_note = 1, ""
    if dev.is_cuda:
        memory_gib = float(torch.cuda.get_device_properties(dev.index).total_memory) / GIB
        read = pcie_generation(dev.index, pci_bus_id(dev.index))
        generation = read if read else generation_from_bandwidth(big_h2d)
        gen_note = "" if read else "; PCIe generation inferred from the measured H2D bandwidth (not readable)"
        gpu_name = dev.name
        description = f"{dev.name} + {facts['cpu']}, measured with tidesim calibrate"
    else:
        memory_gib = host_memory_total() / GIB
        gpu_name = f"CPU as GPU ({facts['cpu']}; {dev.gpu_threads} thread, float32)"
        description = (f"{facts['cpu']} with NO GPU: the 'GPU' side is this CPU ({dev.gpu_threads} thread, "
                       "float32) and 'PCIe' copies are memcpy between host buffers; measured with tidesim "
                       "calibrate for validating the simulator on this machine, not a GPU profile")
    notes = (f"driver {facts['driver']}; torch {facts['torch']}; CPU {facts['cpu']}; "
             f"GPU side {dev.describe()}; repeats {cal.grid.repeats}; spread = half the inter-quartile range"
             + gen_note
             + ("" if dev.is_cuda else "; cpu-as-gpu: sizes and bandwidths in model (bf16) bytes, buffers float32; "
                "memory_gib is host memory"))
    prov = Provenance(kind="measured", source="tidesim calibrate (runtime kernels)", date=facts["date"],
                      tool_version=__version__, device=facts["device"], repeats=cal.grid.repeats, notes=notes)
    gpu = GPUProfile(name=gpu_name, memory_gib=round(memory_gib, 3), mem_bandwidth_gbs=round(cal.mem_gbs, 3),
                     bf16_tflops=round(max(cal.tflops, 1e-6), 6), mem_efficiency=1.0, compute_efficiency=1.0,
                     launch_overhead_us=round(cal.launch_us, 3), layer_overhead_us=round(cal.layer_overhead_us, 3),
                     expert_ffn=cal.gpu_curves, attention=cal.attention,
                     layer_fixed=cal.layer_fixed)
    pcie = PCIeProfile(generation=generation, h2d_gbs=round(big_h2d, 3), d2h_gbs=round(big_d2h, 3),
                       copy_overhead_us=round(cal.h2d.time_us[0], 3), copy_engines=2 if dev.is_cuda else 1,
                       copy_slows_compute=round(cal.copy_slows, 4), copy_slows_cpu=round(cal.copy_slows_cpu, 4),
                       h2d=cal.h2d, d2h=cal.d2h)
    cpu = CPUProfile(name=facts["cpu"], cores=max(1, len(dev.cpu_set)), workers=dev.cpu_workers,
                     mem_bandwidth_gbs=round(max(cal.cpu_mem_gbs, 1e-3), 3), gflops=round(max(cpu_gflops, 1e-3), 3),
                     mem_efficiency=1.0, compute_efficiency=1.0, task_overhead_us=round(cal.task_overhead_us, 3),
                     expert_ffn=cal.cpu_curves, gpu_contention=round(cal.contention, 4),
                     pool_contention=round(cal.pool_contention, 4),
                     kernel=cpu_kernels.current().name)
    # without a GPU there is no PCIe link: generation 1 is a placeholder the schema requires (see description)
    return HardwareProfile(name=name, description=description, provenance=prov, gpu=gpu, pcie=pcie, cpu=cpu)


X16_GBS = {3: 15.75, 4: 31.5, 5: 63.0, 6: 126.0}   # raw x16 bandwidth per direction, GB/s


def generation_from_bandwidth(h2d_gbs: float) -> int:
    """The oldest PCIe generation whose x16 link carries `h2d_gbs` (a copy never beats its link)."""
    for gen, gbs in X16_GBS.items():
        if h2d_gbs <= gbs:
            return gen
    return max(X16_GBS)


