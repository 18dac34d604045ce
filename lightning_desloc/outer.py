"""An optional outer optimizer on the parameter average (DiLoCo-style), off by default.

DES-LOC as analysed sets the parameters to their average. With an outer optimizer the average is
treated as a pseudo-gradient against the last global parameters ``anchor`` (equal on every rank)::

    delta  = anchor - mean_i x_i          # how far the ranks moved together, sign as a gradient
    anchor <- SGD step on anchor with gradient delta (lr, momentum, Nesterov)
    x_i    <- anchor                      # every rank

With ``lr=1`` and ``momentum=0`` that is exactly the plain average. The step is torch's own
``torch.optim.SGD`` on a flat copy of the parameters, so its momentum buffer is an ordinary
optimizer state dict (saved in checkpoints).

Example::

    >>> w = torch.tensor([1.0, 1.0])
    >>> outer = OuterOptimizer(lr=1.0, momentum=0.0)
    >>> outer.prime([w])
    >>> w.copy_(torch.tensor([0.5, 1.5]))   # the average after a sync
    tensor([0.5000, 1.5000])
    >>> outer.step([w]); w
    tensor([0.5000, 1.5000])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


class OuterOptimizer:
    """Outer SGD (Nesterov by default) on the pseudo-gradient ``anchor - average``."""

    def __init__(self, lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True) -> None:
        if not lr > 0:
            raise ValueError(f"outer_lr must be a positive learning rate, got {lr!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"outer_momentum must be in [0, 1), got {momentum!r}")
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov and momentum > 0
        self.anchor: torch.nn.Parameter | None = None
        self.optimizer: torch.optim.SGD | None = None
        self._pending_state: dict | None = None

    def prime(self, params: Sequence[Tensor]) -> None:
        """Take the current parameters (equal on every rank) as the global parameters."""
        flat = torch.cat([p.detach().reshape(-1) for p in params]).clone()
        self.anchor = torch.nn.Parameter(flat, requires_grad=False)
        self.optimizer = torch.optim.SGD([self.anchor], lr=self.lr, momentum=self.momentum, nesterov=self.nesterov)
        if self._pending_state is not None:
            self.load_state_dict(self._pending_state)

    @torch.no_grad()
    def step(self, params: Sequence[Tensor]) -> None:
        """``params`` hold the rank average; replace them by the outer step's new global parameters."""
        assert self.anchor is not None and self.optimizer is not None, "call prime() at setup"
        average = torch.cat([p.detach().reshape(-1) for p in params])
        self.anchor.grad = self.anchor - average
        self.optimizer.step()
        self.anchor.grad = None
        offset = 0
        for p in params:
            p.copy_(self.anchor[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    def state_dict(self) -> dict:
        if self.optimizer is None or self.anchor is None:
            return self._pending_state or {}
        return {"anchor": self.anchor.detach().clone(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if self.optimizer is None or self.anchor is None:
            self._pending_state = state  # applied at prime()
            return
        with torch.no_grad():
            self.anchor.copy_(state["anchor"])
        self.optimizer.load_state_dict(state["optimizer"])
        self._pending_state = None
