"""--cpu-kernel, shared by the commands that run the runtime (calibrate, validate, generate):
which CPU expert kernel (tidesim_runtime.engine.cpu_kernels) the CPU worker pool runs.

The names are listed here so that --help needs no torch; a test checks them against the
runtime's table. The default is the runtime's default kernel; a command given a profile uses the
kernel that profile was calibrated with unless told otherwise (`linear` for a profile that
records none: profiles from before the choice existed measured that path).
"""

from __future__ import annotations

import argparse
from typing import Any

from tidesim.errors import InputError

CPU_KERNEL_NAMES = ("linear", "weights-left", "onednn-packed", "compiled", "kt-kernel", "avx2-stream")
DEFAULT_CPU_KERNEL = "linear"
UNRECORDED = "linear"   # the kernel of a profile calibrated before profiles recorded one


def profile_kernel(profile: Any) -> str:
    """The kernel a profile's CPU curves were measured with."""
    return str(profile.cpu.kernel or UNRECORDED)


def add_cpu_kernel_arg(parser: argparse.ArgumentParser, auto: bool = False) -> None:
    """`auto` (calibrate): also accept 'auto', the fastest kernel measured on this machine."""
    names = CPU_KERNEL_NAMES + (("auto",) if auto else ())
    default = f"{DEFAULT_CPU_KERNEL}" if auto else f"the profile's, else {DEFAULT_CPU_KERNEL}"
    parser.add_argument("--cpu-kernel", default=None, metavar="NAME",
                        help=f"CPU expert kernel: {', '.join(names)} (default: {default}; docs/runtime.md)")


def chosen_kernel(asked: str | None, profile_kernel: str = "") -> str:
    """The kernel name a command runs: --cpu-kernel, else the profile's, else the default."""
    name = asked or profile_kernel or DEFAULT_CPU_KERNEL
    if name not in CPU_KERNEL_NAMES:
        raise InputError(f"--cpu-kernel must be one of {', '.join(CPU_KERNEL_NAMES)}, got {name!r}")
    return name


def use_cpu_kernel(asked: str | None, dtype: Any, profile_kernel: str = "") -> str:
    """Check the kernel against this machine and the run's dtype (InputError) and make it the
    runtime's; returns its name. Imports torch."""
    from tidesim_runtime.engine import cpu_kernels

    name = chosen_kernel(asked, profile_kernel)
    cpu_kernels.check_kernel(name, dtype)
    cpu_kernels.use(name)
    return name
