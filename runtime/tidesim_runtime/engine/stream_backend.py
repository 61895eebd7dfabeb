"""The `avx2-stream` CPU expert kernel: a weight-streaming GEMM in C++ (stream_gemm.cpp), built
on first use with the machine's C++ compiler and loaded with ctypes.

Why a kernel of our own: on a CPU without native bf16 GEMMs (AVX2 only: no AVX-512 bf16, no
AMX) torch's bf16 GEMM converts in its inner loop and streams a llada2-mini expert at 7-42% of
the read bandwidth, and its float32 GEMMs (MKL, oneDNN) at 2 to 8 tokens at 30-64%
(docs/performance.md). An expert at a few tokens only has to read each weight once: this kernel
walks the weight rows once for all tokens, widens bf16 weights to float32 in registers, and
accumulates in float32. Its sums have a fixed order (stream_gemm.cpp says which), so its output
is deterministic and a token's output does not depend on the other tokens of the call; it is
not bit-identical to `F.linear` (another accumulation order), so the lossless check's plain
decode runs the same kernel (measure/kernel_reference.py).

Optional by construction: it needs an x86-64 CPU with AVX2 and FMA and a C++ compiler (`$CXX`,
else g++ or c++) once; the library is cached in `$TIDESIM_CACHE_DIR` (else
`$XDG_CACHE_HOME/tidesim`, else `~/.cache/tidesim`) under a name that hashes the source, the
flags and the compiler's version. Where it cannot be built or loaded, `available()` says why
and `--cpu-kernel avx2-stream` exits 2 with that line; nothing else depends on it. ctypes
releases the GIL for the call, so the CPU pool's worker threads run it in parallel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tidesim_runtime.engine.kt_backend import cpu_flags

SOURCE = Path(__file__).with_name("stream_gemm.cpp")
ABI = 3
FLAGS = ("-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fPIC", "-shared", "-std=c++17")
NEEDED_FLAGS = ("avx2", "fma")
# Above this many tokens per call, `linear` runs instead: float32 MKL/oneDNN GEMMs reach more of
# the arithmetic peak once each weight serves many rows (at 64 tokens they were ahead on the
# project's AVX2 machine, at 32 behind; docs/performance.md).
# None: the kernel runs every count (bf16 on a CPU without native bf16 GEMMs, where torch's bf16
# GEMM is slower at every token count measured).
MAX_TOKENS: dict[torch.dtype, int | None] = {torch.float32: 32, torch.bfloat16: None}


def cache_dir() -> Path:
    explicit = os.environ.get("TIDESIM_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tidesim"


def find_compiler() -> str:
    """The C++ compiler to build with: $CXX, else g++, else c++ ('' when none is found)."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or ""
    return shutil.which("g++") or shutil.which("c++") or ""


def load_library(path: Path) -> ctypes.CDLL:
    """Load the library with its OpenMP runtime's threads sleeping, not spinning, between calls
    (OMP_WAIT_POLICY=passive, read once when that runtime loads; a value the user set is kept). A
    spinning team holds a core after every call, which starves torch's own threads and, on a
    2-vCPU VM shared with other jobs, made every two-thread OpenMP region 10x slower
    (docs/performance.md). The environment is restored after loading."""
    before = os.environ.get("OMP_WAIT_POLICY")
    if before is None:
        os.environ["OMP_WAIT_POLICY"] = "passive"
    try:
        return ctypes.CDLL(str(path))
    finally:
        if before is None:
            os.environ.pop("OMP_WAIT_POLICY", None)


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0][:200] if lines else "no output"


class StreamBackend:
    """The compiled library (built and loaded once per process), or why it could not be."""

    def __init__(self, compiler: str | None = None, directory: Path | None = None,
                 flags_path: str = "/proc/cpuinfo") -> None:
        self._compiler = compiler
        self._directory = directory
        self._flags_path = flags_path
        self._lock = threading.Lock()
        self._loaded = False
        self.lib: ctypes.CDLL | None = None
        self.path = ""
        self.reason = ""

    def load(self) -> bool:
        if self.lib is not None:   # the per-call path: no lock once loaded
            return True
        with self._lock:
            if not self._loaded:
                self.lib, self.reason = self._build_and_load()
                self._loaded = True
        return self.lib is not None

    def _build_and_load(self) -> tuple[ctypes.CDLL | None, str]:
        flags = cpu_flags(self._flags_path)
        missing = [f for f in NEEDED_FLAGS if f not in flags]
        if missing:
            return None, f"the CPU lacks {', '.join(missing)} (the kernel is AVX2 + FMA code)"
        cxx = self._compiler if self._compiler is not None else find_compiler()
        if not cxx or not shutil.which(cxx):
            return None, "no C++ compiler found to build it (set CXX, or install g++)"
        try:
            version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
            source = SOURCE.read_bytes()
        except (OSError, subprocess.SubprocessError) as exc:
            return None, f"cannot run the compiler {cxx}: {exc}"
        directory = self._directory or cache_dir()
        last = ""
        for extra in (("-fopenmp",), ()):   # without OpenMP a call runs on one thread
            key = hashlib.sha256(source + repr((FLAGS, extra, version, ABI)).encode()).hexdigest()[:16]
            path = directory / f"stream_gemm-{key}.so"
            if not path.exists():
                last = self._compile(cxx, extra, path)
                if last:
                    continue
            try:
                lib = load_library(path)
                lib.tidesim_stream_abi.restype = ctypes.c_int
                if lib.tidesim_stream_abi() != ABI:
                    return None, f"{path} is not the interface this runtime expects (remove it)"
            except (OSError, AttributeError) as exc:
                last = f"cannot load {path}: {_first_line(str(exc))}"
                continue
            i64 = ctypes.c_int64
            lib.tidesim_stream_gemm.restype = ctypes.c_int
            ptr, c_int = ctypes.c_void_p, ctypes.c_int
            lib.tidesim_stream_gemm.argtypes = [ptr, i64, i64, ptr, c_int, i64, i64, i64, ptr, i64, c_int]
            lib.tidesim_stream_swiglu.restype = c_int
            lib.tidesim_stream_swiglu.argtypes = [ptr, c_int, i64, i64, ptr, i64, ptr, i64, c_int, i64, i64, ptr,
                                                  c_int, i64, c_int]
            lib.tidesim_stream_swiglu_batch.restype = c_int
            lib.tidesim_stream_swiglu_batch.argtypes = [i64, ptr, ptr, ptr, i64, ptr, i64, c_int, i64, i64, ptr,
                                                        c_int, i64, ptr, c_int, i64, c_int, ptr]
            self.path = str(path)
            return lib, ""
        return None, last

    @staticmethod
    def _compile(cxx: str, extra: tuple[str, ...], path: Path) -> str:
        """Build into a temporary file beside `path` and move it there ('' or why it failed);
        concurrent builders each write their own file, the last move wins with the same bytes."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".tmp.so", dir=path.parent)
            os.close(fd)
        except OSError as exc:
            return f"cannot write the library to {path.parent}: {exc}"
        try:
            done = subprocess.run([cxx, *FLAGS, *extra, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                                  timeout=300)
            if done.returncode != 0:
                return f"building it with {cxx} failed: {_first_line(done.stderr)}"
            os.replace(tmp, path)
            return ""
        except (OSError, subprocess.SubprocessError) as exc:
            return f"building it with {cxx} failed: {exc}"
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def gemm(self, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> None:
        """y[T, R] = x[T, K] @ w[R, K]^T; x and y float32 with unit column stride, w float32 or
        bf16 rows (unit column stride). Runs on torch's thread count of the calling thread."""
        lib = self.lib
        if lib is None:
            raise RuntimeError(f"avx2-stream is not available: {self.reason}")
        rc = lib.tidesim_stream_gemm(x.data_ptr(), x.shape[0], x.stride(0), w.data_ptr(),
                                     int(w.dtype == torch.bfloat16), w.shape[0], w.shape[1], w.stride(0),
                                     y.data_ptr(), y.stride(0), torch.get_num_threads())
        if rc:
            raise RuntimeError(f"avx2-stream GEMM failed (code {rc})")

    def swiglu(self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, out: torch.Tensor) -> None:
        """out[T, H] = down(silu(gate(x)) * up(x)) in one call (stream_gemm.cpp's
        tidesim_stream_swiglu); every operand with unit column stride, rows at any stride."""
        lib = self.lib
        if lib is None:
            raise RuntimeError(f"avx2-stream is not available: {self.reason}")
        bf16 = torch.bfloat16
        rc = lib.tidesim_stream_swiglu(x.data_ptr(), int(x.dtype == bf16), x.shape[0], x.stride(0),
                                       w13.data_ptr(), w13.stride(0), w2.data_ptr(), w2.stride(0),
                                       int(w13.dtype == bf16), w2.shape[0], w2.shape[1], out.data_ptr(),
                                       int(out.dtype == bf16), out.stride(0), torch.get_num_threads())
        if rc:
            raise RuntimeError(f"avx2-stream SwiGLU failed (code {rc})")


BACKEND = StreamBackend()


def runs_kernel(dtype: torch.dtype, tokens: int) -> bool:
    """Whether a call of `tokens` rows in `dtype` runs the library (stream_into), not `linear`."""
    if dtype not in MAX_TOKENS:
        return False
    limit = MAX_TOKENS[dtype]
    return limit is None or tokens <= limit


@dataclass
class ExpertBatch:
    """Several experts' SwiGLUs as one foreign call (stream_gemm.cpp's tidesim_stream_swiglu_batch):
    expert i on rows [starts[i], stops[i]) of x, written into the same rows of out, with the
    weights at w13s[i] and w2s[i] (addresses, rows ld13 and ld2 elements apart). Made once per
    layer job (expert_batch: from banks; expert_batch_of: from one tensor pair per expert): the
    experts need not be adjacent and nothing is copied, so a run costs one ctypes call however
    many experts it holds, against one wrapper call per expert (tensor views, checks, arguments:
    25-45 us each under load, docs/performance.md). Several threads calling run() share the list
    through one counter: each expert runs once, in list order as they free up. Every task's bits
    are stream_into's for the same rows: the same function runs it."""

    x: torch.Tensor
    out: torch.Tensor
    starts: np.ndarray
    stops: np.ndarray
    w13s: np.ndarray
    w2s: np.ndarray
    ld13: int
    ld2: int
    hidden: int
    inter: int
    keep: tuple[torch.Tensor, ...]   # the weights the addresses point into, kept alive with the list
    counter: np.ndarray = field(default_factory=lambda: np.zeros(1, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.starts.size)

    def reset(self) -> None:
        """Make the list runnable again (every expert untaken)."""
        self.counter[0] = 0

    def run(self, threads: int | None = None) -> None:
        """Take experts from the shared list until none is left (`threads`: OpenMP threads of this
        call, torch's count of the calling thread by default)."""
        lib = BACKEND.lib
        if lib is None:
            raise RuntimeError(f"avx2-stream is not available: {BACKEND.reason}")
        bf16 = torch.bfloat16
        rc = lib.tidesim_stream_swiglu_batch(
            len(self), self.starts.ctypes.data, self.stops.ctypes.data, self.w13s.ctypes.data, self.ld13,
            self.w2s.ctypes.data, self.ld2, int(self.x.dtype == bf16), self.hidden, self.inter, self.x.data_ptr(),
            int(self.x.dtype == bf16), self.x.stride(0), self.out.data_ptr(), int(self.out.dtype == bf16),
            self.out.stride(0), torch.get_num_threads() if threads is None else threads, self.counter.ctypes.data)
        if rc:
            raise RuntimeError(f"avx2-stream expert batch failed (code {rc})")


def _rows_and_buffers(x: torch.Tensor, out: torch.Tensor, dtypes: list[torch.dtype], hidden: int,
                      starts: list[int] | np.ndarray, stops: list[int] | np.ndarray, n: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The checks an expert list shares (ValueError, naming what): dtypes, devices, the token
    buffers' layout, and n row ranges inside both buffers."""
    dt = x.dtype
    if dt not in MAX_TOKENS or any(d != dt for d in [out.dtype, *dtypes]):
        raise ValueError(f"an expert batch needs float32 or bfloat16 tokens, output and weights of one dtype, got "
                         f"{x.dtype}, {out.dtype}, {', '.join(sorted({str(d) for d in dtypes}))}")
    if x.dim() != 2 or out.dim() != 2 or x.shape[1] != hidden or out.shape[1] != hidden:
        raise ValueError(f"an expert batch needs x and out [N, H] with H = {hidden}, the weights' hidden size; got "
                         f"{tuple(x.shape)}, {tuple(out.shape)}")
    if x.device.type != "cpu" or out.device.type != "cpu":
        raise ValueError("an expert batch runs on CPU tensors only")
    if x.stride(1) != 1 or out.stride(1) != 1 or x.stride(0) < hidden or out.stride(0) < hidden:
        raise ValueError("an expert batch needs rows with unit column stride that do not overlap")
    a = np.ascontiguousarray(starts, dtype=np.int64)
    b = np.ascontiguousarray(stops, dtype=np.int64)
    if not a.ndim == b.ndim == 1 or not a.size == b.size == n:
        raise ValueError(f"experts, starts and stops must be three lists of one length, got {n}, {a.shape}, "
                         f"{b.shape}")
    rows = min(x.shape[0], out.shape[0])
    if n and (int(a.min()) < 0 or bool((b < a).any()) or int(b.max()) > rows):
        raise ValueError(f"a row range lies outside 0..{rows} or ends before it starts")
    return a, b


def expert_batch(x: torch.Tensor, out: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                 experts: list[int] | np.ndarray, starts: list[int] | np.ndarray,
                 stops: list[int] | np.ndarray) -> ExpertBatch:
    """The ExpertBatch of experts[i] on rows [starts[i], stops[i]) of x [N, H] into out [N, H],
    weights from the banks w13 [E, 2I, H] and w2 [E, H, I] (one dtype for all four, float32 or
    bfloat16; every row with unit column stride). ValueError, naming what, for anything else:
    the library would read or write out of bounds. Runs the kernel at every token count: the
    caller keeps calls above MAX_TOKENS (runs_kernel) out of it, as stream_into would."""
    if not BACKEND.load():
        raise RuntimeError(f"avx2-stream is not available: {BACKEND.reason}")
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError("an expert batch needs x and out [N, H], w13 [E, 2I, H] and w2 [E, H, I]")
    n_exp, two_i, hidden = w13.shape
    inter = w2.shape[2]
    if two_i != 2 * inter or w2.shape[:2] != (n_exp, hidden):
        raise ValueError(f"shapes do not fit one SwiGLU: x {tuple(x.shape)}, out {tuple(out.shape)}, "
                         f"w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    if w13.device.type != "cpu" or w2.device.type != "cpu":
        raise ValueError("an expert batch runs on CPU tensors only")
    if w13.stride(2) != 1 or w2.stride(2) != 1 or w13.stride(1) < hidden or w2.stride(1) < inter:
        raise ValueError("an expert batch needs rows with unit column stride that do not overlap")
    e = np.ascontiguousarray(experts, dtype=np.int64)
    if e.ndim != 1:
        raise ValueError(f"experts, starts and stops must be three lists of one length, got {e.shape}")
    a, b = _rows_and_buffers(x, out, [w13.dtype, w2.dtype], hidden, starts, stops, int(e.size))
    if e.size and (int(e.min()) < 0 or int(e.max()) >= n_exp):
        raise ValueError(f"an expert id lies outside the bank's 0..{n_exp - 1}")
    size = w13.element_size()
    return ExpertBatch(x, out, a, b, w13.data_ptr() + e * (w13.stride(0) * size),
                       w2.data_ptr() + e * (w2.stride(0) * size), w13.stride(1), w2.stride(1), hidden, inter,
                       (w13, w2))


def expert_batch_or_none(x: torch.Tensor, out: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                         experts: list[int] | np.ndarray, starts: list[int] | np.ndarray,
                         stops: list[int] | np.ndarray) -> ExpertBatch | None:
    """expert_batch, or None for a layout the list cannot take (say, strided columns): the caller
    then runs one call per expert, as before the list existed."""
    try:
        return expert_batch(x, out, w13, w2, experts, starts, stops)
    except ValueError:
        return None


def expert_batch_of(x: torch.Tensor, out: torch.Tensor, weights: list[tuple[torch.Tensor, torch.Tensor]],
                    starts: list[int] | np.ndarray, stops: list[int] | np.ndarray) -> ExpertBatch:
    """The ExpertBatch of weights[i] = (w13 [2I, H], w2 [H, I]) on rows [starts[i], stops[i]):
    experts held as separate tensors (a model's own modules), all of one shape and row strides.
    The same checks as expert_batch (ValueError)."""
    if not BACKEND.load():
        raise RuntimeError(f"avx2-stream is not available: {BACKEND.reason}")
    if not weights:
        raise ValueError("an expert batch of separate weights needs at least one expert")
    w13, w2 = weights[0]
    if w13.dim() != 2 or w2.dim() != 2 or w13.shape[0] != 2 * w2.shape[1] or w13.shape[1] != w2.shape[0]:
        raise ValueError(f"shapes do not fit one SwiGLU: w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}")
    for g, d in weights:
        if g.shape != w13.shape or d.shape != w2.shape or g.stride() != w13.stride() or d.stride() != w2.stride():
            raise ValueError("every expert of a batch needs the first one's shapes and row strides")
        if g.device.type != "cpu" or d.device.type != "cpu":
            raise ValueError("an expert batch runs on CPU tensors only")
    hidden, inter = w2.shape
    if w13.stride(1) != 1 or w2.stride(1) != 1 or w13.stride(0) < hidden or w2.stride(0) < inter:
        raise ValueError("an expert batch needs rows with unit column stride that do not overlap")
    a, b = _rows_and_buffers(x, out, [t.dtype for pair in weights for t in pair], hidden, starts, stops,
                             len(weights))
    keep = tuple(t for pair in weights for t in pair)
    return ExpertBatch(x, out, a, b, np.array([g.data_ptr() for g, _ in weights], dtype=np.int64),
                       np.array([d.data_ptr() for _, d in weights], dtype=np.int64), w13.stride(0), w2.stride(0),
                       hidden, inter, keep)


def available() -> tuple[bool, str]:
    """(usable, why not): builds and loads the library on first call."""
    return BACKEND.load(), BACKEND.reason


def _rows(t: torch.Tensor) -> torch.Tensor:
    """`t` with unit column stride (a copy only where it has none)."""
    if t.is_contiguous() or (t.stride(-1) == 1 and t.stride(0) >= t.shape[1]):
        return t
    return t.contiguous()


def stream_into(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)) written into `out` [T, H] (rows at any stride): one call into
    the library, both projections by the streaming GEMM in float32 (bf16 weights and tokens
    widened in registers), SiLU and product in float32, a bf16 output rounded once at the end.
    Above MAX_TOKENS: `linear`."""
    limit = MAX_TOKENS.get(x.dtype)
    if x.dtype not in MAX_TOKENS or any(t.dtype != x.dtype for t in (w13, w2, out)):
        raise RuntimeError(f"avx2-stream runs float32 or bfloat16 tokens with weights and output of the same "
                           f"dtype, got {x.dtype}, {w13.dtype}, {w2.dtype}, {out.dtype}")
    if limit is not None and x.shape[0] > limit:
        gu = F.linear(x, w13)
        inter = w2.shape[1]
        return torch.matmul(F.silu(gu[:, :inter]) * gu[:, inter:], w2.t(), out=out)
    if not BACKEND.load():
        raise RuntimeError(f"avx2-stream is not available: {BACKEND.reason}")
    if out.stride(-1) == 1:
        BACKEND.swiglu(_rows(x), _rows(w13), _rows(w2), out)
        return out
    y = torch.empty(out.shape, dtype=out.dtype)
    BACKEND.swiglu(_rows(x), _rows(w13), _rows(w2), y)
    return out.copy_(y)


def stream_swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    out = torch.empty((x.shape[0], w2.shape[0]), dtype=x.dtype)
    return stream_into(x, w13, w2, out)
