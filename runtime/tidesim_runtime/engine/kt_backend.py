"""The optional kt-kernel backend: kTransformers' AMX bf16 MoE kernel as a CPU expert kernel.

kt-kernel (PyPI `kt-kernel`, github.com/kvcache-ai/ktransformers, directory kt-kernel) ships its
CPU MoE operators as a compiled extension per instruction set (`_kt_kernel_ext_amx`,
`_kt_kernel_ext_avx512_bf16`, ...), each exporting `PyInit_kt_kernel_ext` and linking no libtorch.
Its wheel pins torch==2.9.1 and its package `__init__` imports gguf, typer and others, so the
project installs it with `pip install --no-deps kt-kernel` (docs/runtime.md) and loads only the
extension, from the installed package folder, without running that `__init__`.

The extension's operator is a whole MoE layer (`AMXBF16_MOE`: experts' weight pointers in a
`MOEConfig`, a forward over tokens with expert ids and weights, run on its own worker pool,
`CPUInfer`). One expert is a one-expert layer with top-1 routing at weight 1.0; the operator
repacks the weights on load, so each expert it has run holds a packed copy (kept with the weights,
like onednn-packed's: for weights that never change). Calls are serialised by a lock: the
extension's worker pool is its own threads.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import threading
from types import ModuleType
from typing import Any

import torch

# kt-kernel's extension variants, best first, with the /proc/cpuinfo flags each needs
VARIANTS = (("amx", ("amx_bf16", "amx_tile", "avx512_bf16")), ("avx512_bf16", ("avx512_bf16", "avx512bw")))
MAX_TOKENS = 1024   # the operator's buffers are sized for this many tokens per call; longer calls are split


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


class KtBackend:
    """The loaded extension (or why it could not be loaded), its worker pool and the per-expert
    operators."""

    def __init__(self) -> None:
        self.ext: ModuleType | None = None
        self.variant = ""
        self.reason = ""
        self._lock = threading.Lock()
        self._loaded = False
        self._infer: Any = None
        self._ops: dict[tuple[int, int, int], tuple[Any, tuple[torch.Tensor, ...]]] = {}

    def load(self) -> bool:
        """Find and load the extension once; `reason` says why not."""
        with self._lock:
            if not self._loaded:
                self._loaded = True
                self.ext, self.variant, self.reason = load_extension(cpu_flags())
        return self.ext is not None

    def _pool(self) -> Any:
        if self._infer is None:
            assert self.ext is not None
            cfg = self.ext.WorkerPoolConfig()
            cfg.subpool_count = 1
            cfg.subpool_numa_map = [0]
            cfg.subpool_thread_count = [max(1, torch.get_num_threads())]
            self._infer = self.ext.CPUInfer(cfg)
        return self._infer

    def _op(self, w13: torch.Tensor, w2: torch.Tensor) -> Any:
        key = (w13.data_ptr(), w2.data_ptr(), int(w2.shape[1]))
        found = self._ops.get(key)
        if found is not None:
            return found[0]
        assert self.ext is not None
        hidden, inter = int(w2.shape[0]), int(w2.shape[1])
        mask = torch.zeros(1, dtype=torch.bool)   # no expert of this one-expert layer is on a GPU
        cfg = self.ext.moe.MOEConfig(1, 1, hidden, inter, mask.data_ptr())
        cfg.layer_idx = 0
        cfg.pool = self._pool().backend_
        cfg.max_len = MAX_TOKENS
        cfg.gate_projs = [[w13[:inter].data_ptr()]]
        cfg.up_projs = [[w13[inter:].data_ptr()]]
        cfg.down_projs = [[w2.data_ptr()]]
        cfg.gate_scales = cfg.up_scales = cfg.down_scales = [[0]]
        op = self.ext.moe.AMXBF16_MOE(cfg)
        mapping = torch.zeros(1, dtype=torch.long)
        self._infer.submit(op.load_weights_task(mapping.data_ptr()))
        self._infer.sync()
        self._ops[key] = (op, (mask, mapping, w13, w2))   # the weights held: their addresses stay theirs
        return op

    def swiglu(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        """One expert's SwiGLU (bf16, contiguous weights) through the extension's MoE operator."""
        if not self.load():
            raise RuntimeError(f"kt-kernel is not usable here: {self.reason}")
        x = x.contiguous()
        out = torch.empty((x.shape[0], w2.shape[0]), dtype=torch.bfloat16)
        with self._lock:
            op = self._op(w13, w2)
            for a in range(0, x.shape[0], MAX_TOKENS):
                b = min(a + MAX_TOKENS, x.shape[0])
                n = b - a
                ids = torch.zeros((n, 1), dtype=torch.long)
                weights = torch.ones((n, 1), dtype=torch.float32)
                bsz = torch.full((1,), n, dtype=torch.int32)
                xs, ys = x[a:b], out[a:b]
                self._infer.submit(op.forward_task(bsz.data_ptr(), 1, ids.data_ptr(), weights.data_ptr(),
                                                   xs.data_ptr(), ys.data_ptr(), False))
                self._infer.sync()
        return out

    def clear(self) -> None:
        with self._lock:
            self._ops.clear()


def denormals_kept() -> bool:
    """Whether this thread computes with subnormal floats (no flush-to-zero / denormals-are-zero)."""
    return bool((torch.tensor([1e-39], dtype=torch.float32) * 1.0).item() != 0.0)


def find_extension(flags: set[str]) -> tuple[str, str, str]:
    """(file, variant, reason it is missing) of the best extension variant this CPU's flags
    allow, without loading anything."""
    spec = importlib.util.find_spec("kt_kernel")
    if spec is None or not spec.submodule_search_locations:
        return "", "", "kt-kernel is not installed (pip install --no-deps kt-kernel)"
    folder = list(spec.submodule_search_locations)[0]
    for variant, needs in VARIANTS:
        if not set(needs) <= flags:
            continue
        files = sorted(glob.glob(os.path.join(folder, f"_kt_kernel_ext_{variant}.*.so")))
        if files:
            return files[0], variant, ""
    return "", "", ("this CPU lacks the instruction sets of kt-kernel's bf16 MoE kernels "
                    "(amx_bf16 + amx_tile, or avx512_bf16), or the package has no extension for them")


def load_extension(flags: set[str]) -> tuple[ModuleType | None, str, str]:
    """(extension, variant, reason it is missing). Loading it runs its fast-math start-up, which
    sets flush-to-zero in the loading thread; where denormals were kept before, they are again."""
    path, variant, reason = find_extension(flags)
    ext_spec = importlib.util.spec_from_file_location("kt_kernel_ext", path) if path else None
    if ext_spec is None or ext_spec.loader is None:
        return None, variant, reason or "kt-kernel's extension could not be located"
    ieee = denormals_kept()
    try:
        module = importlib.util.module_from_spec(ext_spec)
        ext_spec.loader.exec_module(module)
    except (ImportError, OSError) as exc:
        return None, variant, f"kt-kernel's {variant} extension does not load: {exc}"
    finally:
        if ieee and not denormals_kept():   # the extension's fast-math start-up set flush-to-zero
            torch.set_flush_denormal(False)
    if not hasattr(module, "moe") or not hasattr(module.moe, "AMXBF16_MOE"):
        return None, variant, "kt-kernel's extension has no AMXBF16_MOE operator"
    return module, variant, ""


BACKEND = KtBackend()


def kt_swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return BACKEND.swiglu(x, w13, w2)


def available() -> tuple[bool, str]:
    """(installed with an extension for this CPU, why not), without loading it: loading changes
    the thread's floating-point state (see load_extension), so only running the kernel loads it."""
    if BACKEND.ext is not None:
        return True, ""
    path, _, reason = find_extension(cpu_flags())
    return bool(path), reason
