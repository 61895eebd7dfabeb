"""The execution engine: carries out a tidesim Schedule on a CUDA GPU (or the CPU playing it) and
a CPU worker pool: the device choice, the compute kernels (also what calibrate times), copy
streams and events, pinned host memory, the expert slots and their plan, the worker pool and the
executor that drives them phase by phase as the simulator charges them. It uses only the router
of the reference model; nothing is imported here, so importing the package stays cheap.
"""

__all__: list[str] = []
