"""Hierarchical synchronisation: DDP inside groups of ranks, DES-LOC across groups.

With ``group_size = g`` the world of ``M`` ranks is cut into ``M / g`` groups of consecutive ranks
(typically one group per node, ``g`` = devices per node, where links are fast). Inside a group the
gradients are all-reduced every step, as DDP does, so all ranks of a group hold the same parameters
and optimizer states. Across groups DES-LOC's schedule runs between the ranks that have the same
position in their group (rank ``i``, ``i + g``, ``i + 2g``, ...): since every group is internally
equal, averaging over those ranks is averaging over all groups, and each slow link carries one
group's share.

Example: 4 ranks, ``g = 2``::

    gradient groups (every step):   {0, 1}  {2, 3}
    DES-LOC groups (on the schedule): {0, 2}  {1, 3}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch.distributed as dist
from torch.optim import Optimizer

from lightning_desloc.averaging import average_
from lightning_desloc.ledger import CommLedger


def group_ranks(world_size: int, group_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """The gradient groups and the DES-LOC groups as lists of ranks.

    >>> group_ranks(6, 3)
    ([[0, 1, 2], [3, 4, 5]], [[0, 3], [1, 4], [2, 5]])
    """
    if group_size < 1 or world_size % group_size:
        raise ValueError(
            f"group_size={group_size} must divide the number of processes ({world_size}); "
            f"use the number of devices per node, or a divisor of {world_size}"
        )
    gradient = [list(range(start, start + group_size)) for start in range(0, world_size, group_size)]
    desloc = [list(range(i, world_size, group_size)) for i in range(group_size)]
    return gradient, desloc


@dataclass
class HierarchicalGroups:
    """The two process groups this rank belongs to and the ledger of the gradient level."""

    gradient_group: Any
    desloc_group: Any
    ledger: CommLedger

    @classmethod
    def create(cls, group_size: int, ledger: CommLedger) -> "HierarchicalGroups":
        """Make the groups; every rank must call this, in the same order (``new_group`` is collective)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        gradient, desloc = group_ranks(world, group_size)
        mine: dict[str, Any] = {}
        for kind, groups in (("gradient", gradient), ("desloc", desloc)):
            for ranks in groups:
                handle = dist.new_group(ranks)
                if rank in ranks:
                    mine[kind] = handle
        return cls(mine["gradient"], mine["desloc"], ledger)

    def average_gradients(self, optimizer: Optimizer, bucket_cap_bytes: int) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        average_({"grads": grads}, self.ledger, group=self.gradient_group, bucket_cap_bytes=bucket_cap_bytes)

    def wrap_closure(self, closure: Callable[[], Any], optimizer: Optimizer, bucket_cap_bytes: int) -> Callable[[], Any]:
        """The training closure followed by the group's gradient average, before clipping and the step."""

        def closure_then_average() -> Any:
            out = closure()
            self.average_gradients(optimizer, bucket_cap_bytes)
            return out

        return closure_then_average


def desloc_group(groups: Optional[HierarchicalGroups]) -> Any:
    """The process group DES-LOC's averages use: the whole world without hierarchy."""
    return None if groups is None else groups.desloc_group
