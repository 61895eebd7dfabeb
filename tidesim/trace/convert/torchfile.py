"""Read a torch.save file without running code from it (torch imported only when needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tidesim.errors import InputError

INSTALL_HINT = "pip install 'tidesim[runtime]' (or pip install torch)"


def load_torch_file(path: Path) -> Any:
    """The object in a torch.save file, loaded with weights_only=True (tensors, lists, dicts,
    numbers and strings only), on the CPU."""
    try:
        import torch
    except ImportError:
        raise InputError(f"{path}: reading a torch.save dump needs torch; install it with {INSTALL_HINT}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds (pickle, zip, weights-only refusals)
        why = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: not a readable torch.save dump ({why})") from None


def as_array(value: Any, where: str, dtype: Any = np.int64) -> np.ndarray:
    """A tensor, array or (nested) list as a numpy array of `dtype`; one line on anything else."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError):
        raise InputError(f"{where}: not an array") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise InputError(f"{where}: expected whole numbers, got {arr.dtype} values")
    return arr.astype(dtype, copy=False)
