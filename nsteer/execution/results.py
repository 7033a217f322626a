"""What comes back from a trace is checked against what the trace computes before anything uses it.

Locally a trace's saved values are nsteer's own; from NDIF they are whatever the server sent (loaded as data only, see
:func:`nsteer.execution.ndif.load_result`). Either way extraction, generation and job collection take a saved value
only once it is the type, dtype and shape the trace produces and holds finite numbers (or token ids in range), so
an integer where per-layer sums belong, a wrong shape or a NaN never becomes a vector file or an answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from nsteer.errors import RemoteError


def expect_tensor(
    value: Any,
    name: str,
    *,
    dtype: torch.dtype,
    shape: Sequence[int | None],
    value_range: tuple[int, int] | None = None,
) -> torch.Tensor:
    """``value`` if it is a tensor of ``dtype`` whose shape matches ``shape`` (None: any size there), finite (floats)
    or within ``value_range`` = [low, high) (integers); else a RemoteError saying what came back instead."""
    where = f"The result '{name}'"
    if not isinstance(value, torch.Tensor):
        raise RemoteError(f"{where} is a {type(value).__name__}, not a tensor: {_refused()}")
    if value.dtype != dtype:
        raise RemoteError(f"{where} is {_name(value.dtype)}, not {_name(dtype)}: {_refused()}")
    if value.dim() != len(shape) or any(want is not None and got != want for got, want in zip(value.shape, shape)):
        expected = "[" + ", ".join("*" if size is None else str(size) for size in shape) + "]"
        raise RemoteError(f"{where} has shape {list(value.shape)}, not {expected}: {_refused()}")
    value = value.detach()  # a remote result can arrive requiring grad; nothing here differentiates it
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise RemoteError(f"{where} holds NaN or infinite values: {_refused()}")
    if value_range is not None and value.numel():
        low, high = value_range
        if int(value.min()) < low or int(value.max()) >= high:
            raise RemoteError(f"{where} holds values outside [{low}, {high}): {_refused()}")
    return value


def expect_list(value: Any, name: str, length: int) -> list[Any]:
    """``value`` if it is a list (or tuple) of ``length`` items; else a RemoteError."""
    if not isinstance(value, (list, tuple)):
        raise RemoteError(f"The result '{name}' is a {type(value).__name__}, not a list: {_refused()}")
    if len(value) != length:
        raise RemoteError(f"The result '{name}' holds {len(value)} items, not {length}: {_refused()}")
    return list(value)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _refused() -> str:
    return (
        "it is not what the trace computes, so nothing was written. If the model runs on NDIF, check that NDIF_HOST "
        "names NDIF (a server that answers something else cannot be trusted); run it again."
    )
