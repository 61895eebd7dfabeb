"""The CPU expert kernels: SwiGLU of one expert from host weights, in several selectable forms.

A routed expert at a few tokens is bound by streaming its weights from DRAM, so the form of the
GEMMs matters: torch's `F.linear` (x @ W^T) is the reference model's own arithmetic, but on the
CPU its small-M path does not stream the weights at the memory's rate. Kernels (all take x
[T, H], w13 [2I, H] (gate rows then up rows, the bank layout) and w2 [H, I], and return [T, H]):

- `linear`: `F.linear` with gate/up fused in w13, SiLU, product, `F.linear` (the reference
  model's numbers: bit-identical to its separate gate/up/down `nn.Linear`s);
- `weights-left`: the same GEMMs with the weight as the left operand (W @ x^T, the result
  written transposed), which oneDNN and MKL run as a weight-streaming kernel at few tokens;
- `onednn-packed`: bfloat16 and float32, oneDNN's GEMM (`F.linear`'s own for bf16) on weights
  reordered once into oneDNN's blocked layout (`torch.ops.mkldnn._reorder_linear_weight`) and
  kept in a cache, so no call reorders them again; the cache holds a packed copy of every expert
  it has run, and repacks a weight that a copy rewrote (its version counter moved). In float32 it
  replaces MKL's sgemm, whose few-row path streams the weights at a fraction of the read rate
  (docs/performance.md), and changes the last bits; one float32 token runs `linear` (MKL's
  matrix-vector product is at the read rate already);
- `compiled`: `linear` through `torch.compile` (inductor's CPU code for SiLU and product);
- `kt-kernel`: bfloat16 only, kTransformers' AMX MoE operator (engine/kt_backend.py), where the
  optional package kt-kernel is installed and the CPU has AMX;
- `avx2-stream`: the project's own weight-streaming GEMM (engine/stream_backend.py, AVX2 + FMA,
  built on first use with the machine's C++ compiler): each weight row read once for all tokens,
  bf16 widened to float32 in registers, float32 sums in a fixed order (deterministic, a token's
  output independent of the other tokens of the call); `linear` above its token limit.

Which kernel is bit-identical to `linear` in which dtype is a property of the kernel
(`identical_to_linear`), tested in tests/test_runtime_cpu_kernels.py. The runtime uses one kernel
per process (`use`, `current`): the CPU worker pool and every CPU-side SwiGLU of the executor run
it, so a reference decode with the same kernel (`same_kernel_runner`) reproduces the live run
bit for bit even where the kernel's accumulation order differs from `F.linear`'s.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from tidesim.errors import InputError
from tidesim_runtime.engine import kt_backend, stream_backend

Swiglu = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
SwigluInto = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def linear_swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) with `F.linear`: the reference model's arithmetic."""
    gu = F.linear(x, w13)
    inter = w2.shape[1]
    return F.linear(F.silu(gu[:, :inter]) * gu[:, inter:], w2)


def linear_into(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """linear_swiglu written into `out` (contiguous rows): four kernels (gate/up GEMM, SiLU,
    product, down GEMM) and no copy; bit-identical to linear_swiglu."""
    gu = F.linear(x, w13)
    inter = w2.shape[1]
    return torch.matmul(F.silu(gu[:, :inter]) * gu[:, inter:], w2.t(), out=out)


def weights_left_into(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """SwiGLU with the weights as the left GEMM operand, written into `out` [T, H] (contiguous
    rows): gu^T = w13 @ x^T, h^T = silu(g^T) * u^T, out^T = w2 @ h^T. Four kernels, no copy."""
    inter = w2.shape[1]
    gu = torch.mm(w13, x.t())
    h = F.silu(gu[:inter]) * gu[inter:]
    torch.mm(w2, h, out=out.t())
    return out


def weights_left(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    out = torch.empty((x.shape[0], w2.shape[0]), dtype=x.dtype, device=x.device)
    return weights_left_into(x, w13, w2, out)


def reorder(w: torch.Tensor) -> torch.Tensor:
    """`w` reordered into oneDNN's blocked layout for `_linear_pointwise` (bf16 or float32)."""
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), None)


@functools.cache
def onednn_unusable(dtype: torch.dtype) -> str:
    """'' where oneDNN packs `dtype` weights on this CPU, else why not (its bf16 path needs
    avx512bw/vl/dq or avx_ne_convert: an AVX2-only CPU runs onednn-packed in float32 only)."""
    try:
        reorder(torch.zeros(16, 16, dtype=dtype))
    except Exception as exc:   # a build without the op raises other errors than RuntimeError
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        return f"oneDNN cannot pack {str(dtype).replace('torch.', '')} weights on this CPU ({first})"
    return ""


class PackedWeights:
    """oneDNN-reordered copies of weights, made on first use and kept with the weights themselves
    (keyed by address, shape and strides; holding the weights keeps the address from being
    reused). Each entry records the weight's version counter, which torch bumps on every in-place
    write through any view of its memory, so a weight rewritten in place (a GPU-side slot on the
    cpu-as-gpu path, refilled by a copy) is packed again at its next use instead of being served
    stale numbers. Inference tensors keep no version counter: `get(w, fixed=False)` packs those on
    every call (always correct, slow); `fixed=True` promises they never change. A write through a
    tensor that aliases the memory with a counter of its own (a parameter whose `.data` was set to
    a bank's view) is not seen: the runtime rewrites experts only through banks and slots. Reading
    the same memory through both (the plain decode through the model's bound parameters, then the
    pool through the bank) only repacks it once more: the counters differ."""

    def __init__(self) -> None:
        self._packed: dict[tuple[int, tuple[int, ...], tuple[int, ...]], tuple[torch.Tensor, int, torch.Tensor]] = {}
        self._lock = threading.Lock()
        self.packs = 0   # reorders made (tests and benches read it)

    def get(self, w: torch.Tensor, fixed: bool = True) -> torch.Tensor:
        if w.is_inference():
            if not fixed:
                self.packs += 1
                return reorder(w)
            version = -1
        else:
            version = w._version
        key = (w.data_ptr(), tuple(w.shape), tuple(w.stride()))
        found = self._packed.get(key)
        if found is None or found[1] != version:
            found = (w, version, reorder(w))
            with self._lock:
                self._packed[key] = found
                self.packs += 1
        return found[2]

    def __len__(self) -> int:
        return len(self._packed)

    def clear(self) -> None:
        with self._lock:
            self._packed.clear()


PACKED = PackedWeights()


def _packed_swiglu(x: torch.Tensor, w13p: torch.Tensor, w2p: torch.Tensor, inter: int) -> torch.Tensor:
    gu = torch.ops.mkldnn._linear_pointwise(x, w13p, None, "none", [], "")
    h = F.silu(gu[:, :inter]) * gu[:, inter:]
    return torch.ops.mkldnn._linear_pointwise(h, w2p, None, "none", [], "")


def gemv_row(x: torch.Tensor) -> bool:
    """One float32 token: MKL's matrix-vector product (`F.linear` at one row) already streams
    the weights at the read rate, ahead of oneDNN's GEMM (docs/performance.md), so onednn-packed
    runs `linear` there and packs nothing for it."""
    return x.shape[0] == 1 and x.dtype == torch.float32


def onednn_packed(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """`linear`'s GEMMs run by oneDNN on weights packed once per expert (bf16 or float32; one
    float32 token: `linear`)."""
    if gemv_row(x):
        return linear_swiglu(x, w13, w2)
    return _packed_swiglu(x, PACKED.get(w13), PACKED.get(w2), w2.shape[1])


def onednn_packed_mutable(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """onednn_packed on weights that copies may rewrite (GPU-side slots): the same arithmetic,
    packed again whenever the weights' version counter moved (see PackedWeights)."""
    if gemv_row(x):
        return linear_swiglu(x, w13, w2)
    return _packed_swiglu(x, PACKED.get(w13, fixed=False), PACKED.get(w2, fixed=False), w2.shape[1])


class Compiled:
    """`linear` through torch.compile, compiled on first call (dynamic token count)."""

    def __init__(self) -> None:
        self._fn: Swiglu | None = None
        self._lock = threading.Lock()

    def __call__(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        if self._fn is None:
            with self._lock:
                if self._fn is None:
                    self._fn = torch.compile(linear_swiglu, dynamic=True)
        return self._fn(x, w13, w2)


@dataclass(frozen=True)
class CpuKernel:
    """One CPU expert kernel: its function, the dtypes it runs, and those in which its output is
    bit-identical to `linear` (the reference model's arithmetic)."""

    name: str
    run: Swiglu
    dtypes: frozenset[torch.dtype]
    identical_to_linear: frozenset[torch.dtype]
    summary: str
    run_into: SwigluInto | None = None   # writes into rows of an output buffer without a copy
    usable: Callable[[], tuple[bool, str]] | None = None   # an optional package: (loaded, why not)
    caches_weights: bool = False   # keeps a packed copy per weight
    # the same arithmetic on weights that copies may rewrite (repacked when they change); None:
    # a kernel that caches runs only on weights that never change, `linear` runs the others
    run_mutable: Swiglu | None = None
    dtype_unusable: Callable[[torch.dtype], str] | None = None   # '' or why this CPU cannot run a dtype
    # dtypes of identical_to_linear that hold only where oneDNN runs bf16 natively (asked on first use,
    # not at import, so a CPU or torch build without that path cannot break importing the runtime)
    needs_native_bf16: bool = False

    def identical(self, dtype: torch.dtype) -> bool:
        """Whether this kernel's output is bit-identical to `linear`'s in `dtype` on this CPU."""
        if dtype not in self.identical_to_linear:
            return False
        return not (self.needs_native_bf16 and dtype == torch.bfloat16 and onednn_unusable(torch.bfloat16))

    def supports(self, dtype: torch.dtype) -> bool:
        return dtype in self.dtypes and not self.why_not_dtype(dtype)

    def why_not_dtype(self, dtype: torch.dtype) -> str:
        """'' when the kernel runs `dtype` on this CPU (or does not run it at all), else why not."""
        if dtype not in self.dtypes or self.dtype_unusable is None:
            return ""
        return self.dtype_unusable(dtype)

    def why_unusable(self) -> str:
        """'' when the kernel can run here, else why not (its optional package)."""
        if self.usable is None:
            return ""
        ok, reason = self.usable()
        return "" if ok else reason

    def into(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The kernel's output written into `out` (bit-identical to run)."""
        if self.run_into is not None:
            return self.run_into(x, w13, w2, out)
        out.copy_(self.run(x, w13, w2))
        return out


FLOATS = frozenset({torch.float32, torch.bfloat16})
BF16 = frozenset({torch.bfloat16})
# bf16 GEMMs run oneDNN's native bf16 kernels (F.linear's and W @ x^T's alike: the same bits) only
# where oneDNN packs bf16 (AVX-512 or avx_ne_convert); elsewhere torch's own bf16 GEMM runs them,
# whose sums depend on the operand order (measured on an AVX2-only AMD EPYC, docs/runtime.md):
# weights-left claims bf16 identity only there (CpuKernel.needs_native_bf16)
KERNELS: dict[str, CpuKernel] = {k.name: k for k in (
    CpuKernel("linear", linear_swiglu, FLOATS, FLOATS, "F.linear (x @ W^T): the reference model's arithmetic",
              linear_into),
    CpuKernel("weights-left", weights_left, FLOATS, BF16, "W @ x^T, weights as the left GEMM operand",
              weights_left_into, needs_native_bf16=True),
    CpuKernel("onednn-packed", onednn_packed, FLOATS, BF16, "oneDNN GEMM on weights packed once per expert",
              caches_weights=True, run_mutable=onednn_packed_mutable, dtype_unusable=onednn_unusable),
    CpuKernel("compiled", Compiled(), FLOATS, frozenset(), "linear through torch.compile (inductor)"),
    CpuKernel("kt-kernel", kt_backend.kt_swiglu, BF16, frozenset(),
              "kTransformers' AMX bf16 MoE operator (optional package kt-kernel)", usable=kt_backend.available,
              caches_weights=True),
    CpuKernel("avx2-stream", stream_backend.stream_swiglu, FLOATS, frozenset(),
              "weight-streaming AVX2 GEMM, each weight read once for all tokens (built on first use)",
              stream_backend.stream_into, usable=stream_backend.available),
)}
# The default stays the reference arithmetic: the one kernel measured faster per expert in both
# dtypes, onednn-packed, keeps a second copy of every expert it runs (no memory check counts it) and
# was not faster end to end in `tidesim generate` on the loaded machine (docs/performance.md);
# `calibrate --cpu-kernel auto` picks among the others by measurement.
# tidesim.cli.cpu_kernel_arg.DEFAULT_CPU_KERNEL names the same.
DEFAULT_KERNEL = "linear"
_current = [KERNELS[DEFAULT_KERNEL]]


def get_kernel(name: str) -> CpuKernel:
    """The kernel called `name`; InputError naming the choices otherwise."""
    if name not in KERNELS:
        raise InputError(f"--cpu-kernel must be one of {', '.join(KERNELS)}, got {name!r}")
    return KERNELS[name]


def check_kernel(name: str, dtype: torch.dtype) -> CpuKernel:
    """The kernel, refused (InputError) when it cannot run `dtype`."""
    kernel = get_kernel(name)
    why = kernel.why_unusable()
    if why:
        raise InputError(f"--cpu-kernel {name} cannot run here: {why}; pick another --cpu-kernel")
    why = kernel.why_not_dtype(dtype)
    if why:
        raise InputError(f"--cpu-kernel {name}: {why}; pick another --cpu-kernel")
    if not kernel.supports(dtype):
        dts = ", ".join(sorted(str(d).replace("torch.", "") for d in kernel.dtypes))
        raise InputError(f"--cpu-kernel {name} runs {dts} weights only, and this run computes in "
                         f"{str(dtype).replace('torch.', '')}; pick another --cpu-kernel")
    return kernel


def use(name: str) -> CpuKernel:
    """Make `name` the process's CPU expert kernel (the pool and CPU-side SwiGLU run it)."""
    kernel = get_kernel(name)
    _current[0] = kernel
    return kernel


def current() -> CpuKernel:
    return _current[0]


def for_weights(dtype: torch.dtype, fixed: bool) -> CpuKernel:
    """The current kernel for weights of `dtype`; `linear` where it cannot run the dtype. On
    weights that may change (`fixed` False: GPU-side slots on the cpu-as-gpu path) a kernel that
    caches packed weights runs its `run_mutable` form, or `linear` where it has none."""
    kernel = current()
    if not kernel.supports(dtype):
        return KERNELS["linear"]
    if kernel.caches_weights and not fixed:
        if kernel.run_mutable is None:
            return KERNELS["linear"]
        mutable = _MUTABLE.get(kernel.name)     # made once: this runs per expert call
        if mutable is None:
            mutable = _MUTABLE.setdefault(kernel.name, replace(kernel, run=kernel.run_mutable, run_into=None))
        return mutable
    return kernel


_MUTABLE: dict[str, CpuKernel] = {}


def cpu_swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, fixed: bool = False) -> torch.Tensor:
    """SwiGLU with the current kernel (see for_weights); `fixed`: the weights never change."""
    return for_weights(x.dtype, fixed).run(x, w13, w2)


def cpu_swiglu_into(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, out: torch.Tensor,
                    fixed: bool = False) -> torch.Tensor:
    """cpu_swiglu written into `out` (bit-identical to it)."""
    return for_weights(x.dtype, fixed).into(x, w13, w2, out)


def bit_identical(kernel: CpuKernel, dtype: torch.dtype) -> bool:
    """Whether `kernel` computes the reference model's bits in `dtype` (no same-kernel reference
    decode needed for a lossless check)."""
    return not kernel.supports(dtype) or kernel.identical(dtype)
