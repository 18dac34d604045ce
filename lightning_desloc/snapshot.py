"""The consensus snapshot: the parameters as they were right after the last average.

Three mechanisms need "the parameters at the last average", which every rank holds equally: the
int8 delta coding of parameters (:mod:`lightning_desloc.compression` sends ``x_i - snapshot``), the
outer optimizer (:mod:`lightning_desloc.outer`: its pseudo-gradient is ``snapshot - mean_i x_i``) and
the drift trigger (:class:`~lightning_desloc.adaptive.DriftTrigger` measures ``||x_i - snapshot||``).
The core (:class:`~lightning_desloc.sync.DeslocSync`) keeps one snapshot for all of them and refreshes
it after every parameter average of the outermost level (after the outer step, so it is the new
global parameters), and only when one of them is on.

It is one flat tensor on the parameters' device, in float32 or the parameters' dtype when that is wider
(float64): at least float32 because the outer step adds updates smaller than half a bf16 ulp and delta
coding subtracts nearly equal numbers; on the device because
drift checks read it every few steps and each round reads it, so a host copy would cross the bus
(and synchronise) that often. Its memory is one model size in float32 (``4 * numel`` bytes).

Example::

    >>> w = torch.tensor([1.0, 2.0]); b = torch.tensor([3.0])
    >>> snap = ConsensusSnapshot()
    >>> snap.take([w, b]); snap.flat
    tensor([1., 2., 3.])
    >>> w.add_(1.0); snap.flat          # a copy: local steps do not move it
    tensor([2., 3.])
    tensor([1., 2., 3.])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor


def snapshot_dtype(params: Sequence[Tensor]) -> torch.dtype:
    """float32, or the widest floating dtype of ``params`` when wider (float64)."""
    dtype = torch.float32
    for p in params:
        dtype = torch.promote_types(dtype, p.dtype)
    return dtype


class ConsensusSnapshot:
    """A flat copy (float32 or wider) of the parameters at the last average (``flat`` is ``None`` until taken)."""

    def __init__(self) -> None:
        self.flat: Optional[Tensor] = None

    @torch.no_grad()
    def take(self, params: Sequence[Tensor]) -> None:
        """Copy ``params`` (equal on every rank) into the snapshot, reusing its memory when it fits."""
        numel = sum(p.numel() for p in params)
        dtype = snapshot_dtype(params)
        device = params[0].device if params else None
        if self.flat is None or self.flat.numel() != numel or self.flat.dtype != dtype or self.flat.device != device:
            self.flat = torch.empty(numel, dtype=dtype, device=device)
        offset = 0
        for p in params:
            self.flat[offset : offset + p.numel()].copy_(p.detach().reshape(-1))
            offset += p.numel()

    def state_dict(self) -> dict[str, Any]:
        return {"flat": None if self.flat is None else self.flat.detach().clone()}

    def load_state_dict(self, state: dict[str, Any], device: Optional[torch.device] = None) -> None:
        flat = state.get("flat")
        self.flat = None if flat is None else flat.to(device if device is not None else flat.device)
