"""An optional outer optimizer on the parameter average (DiLoCo-style), off by default.

DES-LOC as analysed sets the parameters to their average. With an outer optimizer the average is
treated as a pseudo-gradient against the last global parameters, the consensus snapshot ``x_g``
(:mod:`lightning_desloc.snapshot`, equal on every rank)::

    g    = x_g - mean_i x_i                 # how far the ranks moved together, sign as a gradient
    b    = g                   (first round)     b = mu * b + g   (later rounds)
    x_g <- x_g - lr * (g + mu * b)          # Nesterov; x_g - lr * b without it
    x_i <- x_g                              # every rank

These are torch's SGD equations (no dampening, no weight decay), computed in the snapshot's precision
(float32 or wider) so that updates below a bf16 ulp are not lost. With ``lr=1`` and ``momentum=0`` it
is exactly the plain average. The momentum ``b`` is equal on every rank and saved in checkpoints.

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
from typing import Any, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_desloc.config import OuterConfig
from lightning_desloc.options import Metrics, Round, SyncOption, one_optimizer
from lightning_desloc.snapshot import ConsensusSnapshot


class OuterOptimizer(SyncOption):
    """Outer SGD (Nesterov by default) on the pseudo-gradient ``snapshot - average``; as an option of the
    core it steps after every parameter average of the outermost level and leaves the new global
    parameters in the snapshot.

    Args:
        lr, momentum, nesterov: as :class:`~lightning_desloc.config.OuterConfig`.
        snapshot: the global parameters to step from; the core's, or a new one (then call :meth:`prime`).
    """

    def __init__(self, lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True,
                 snapshot: Optional[ConsensusSnapshot] = None) -> None:
        OuterConfig(lr=lr, momentum=momentum, nesterov=nesterov)  # the same checks and messages
        self.lr, self.momentum, self.nesterov = lr, momentum, nesterov and momentum > 0
        self.snapshot = snapshot if snapshot is not None else ConsensusSnapshot()
        #: ``b``: the momentum buffer (``None`` before the first round or without momentum)
        self.momentum_buffer: Optional[Tensor] = None

    name = "outer"
    needs_snapshot = True

    def attach(self, core: Any, optimizers: Sequence[Optimizer]) -> None:
        one_optimizer(optimizers, "compression and outer_lr")

    def after_round(self, rnd: Round) -> Optional[Metrics]:
        if rnd.plan.params:
            self.step([p for g in rnd.optimizer.param_groups for p in g["params"]])
            rnd.snapshot_taken = True  # in full precision, not rounded back from the parameters
        return None

    def prime(self, params: Sequence[Tensor]) -> None:
        """Take the current parameters (equal on every rank) as the global parameters."""
        self.snapshot.take(params)

    @torch.no_grad()
    def step(self, params: Sequence[Tensor]) -> None:
        """``params`` hold the rank average; replace them (and the snapshot) by the new global parameters."""
        x_g = self.snapshot.flat
        assert x_g is not None, "take the snapshot (prime) when every rank holds the same parameters"
        grad = x_g.clone()
        offset = 0
        for p in params:
            grad[offset : offset + p.numel()].sub_(p.detach().reshape(-1))
            offset += p.numel()
        if self.momentum:
            if self.momentum_buffer is None:
                self.momentum_buffer = grad.clone()
            else:
                self.momentum_buffer.mul_(self.momentum).add_(grad)
            grad = grad.add(self.momentum_buffer, alpha=self.momentum) if self.nesterov else self.momentum_buffer
        x_g.add_(grad, alpha=-self.lr)
        offset = 0
        for p in params:
            p.copy_(x_g[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    @torch.no_grad()
    def peek(self, mean: Tensor, offset: int = 0) -> tuple[Tensor, Optional[Tensor]]:
        """What :meth:`step` would make of a slice of the parameters, changing nothing.

        ``mean`` holds the rank average of the flat parameters ``[offset, offset + mean.numel())`` (the
        optimizer's parameters in param-group order, flattened and concatenated, as in the snapshot).
        Returns ``(x_g, b)`` for that slice after the step: the new global parameters, in the snapshot's
        dtype (a parameter gets them rounded to its own dtype), and the new momentum buffer (``None``
        without momentum). The live snapshot and momentum buffer are not touched.

        The slice is computed with the same element-wise operations, in the same order, as :meth:`step`
        on the whole flat vector, so a checkpoint that peeks bucket by bucket gets the bits the outer
        step gives the live parameters (element-wise kernels do not depend on where a slice starts;
        ``tests/test_checkpoint_traffic.py`` checks it).

        >>> outer = OuterOptimizer(lr=0.7, momentum=0.9)
        >>> w = torch.tensor([1.0, 2.0, 3.0])
        >>> outer.prime([w])
        >>> mean = torch.tensor([0.5, 2.5, 3.0])
        >>> x_head, _ = outer.peek(mean[:2])
        >>> x_tail, _ = outer.peek(mean[2:], offset=2)
        >>> w.copy_(mean); outer.step([w])
        tensor([0.5000, 2.5000, 3.0000])
        >>> torch.equal(torch.cat([x_head, x_tail]), w)
        True
        """
        x_g = self.snapshot.flat
        assert x_g is not None, "take the snapshot (prime) when every rank holds the same parameters"
        x_old = x_g[offset : offset + mean.numel()]
        grad = x_old.sub(mean.reshape(-1))  # in the snapshot's dtype, as step's in-place sub_
        buffer: Optional[Tensor] = None
        if self.momentum:
            if self.momentum_buffer is None:
                buffer = grad.clone()
            else:
                buffer = self.momentum_buffer[offset : offset + mean.numel()].mul(self.momentum).add_(grad)
            grad = grad.add(buffer, alpha=self.momentum) if self.nesterov else buffer
        return x_old.add(grad, alpha=-self.lr), buffer

    def state_dict(self) -> dict[str, Any]:
        return {"momentum_buffer": None if self.momentum_buffer is None else self.momentum_buffer.clone()}

    def load_state_dict(self, state: Optional[dict[str, Any]], device: Optional[torch.device] = None) -> None:
        buf = (state or {}).get("momentum_buffer")
        self.momentum_buffer = None if buf is None else buf.to(device if device is not None else buf.device)
