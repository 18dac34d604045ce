"""The one metered communication object: every collective DES-LOC issues goes through a :class:`Comm`.

A :class:`Comm` is one process group (``None``: the default group) and one
:class:`~lightning_desloc.ledger.CommLedger`. It is the only place that asks whether a group is
initialised and has more than one rank (with one rank nothing is sent and nothing recorded), and the
only place that writes a ledger. The core (:class:`~lightning_desloc.sync.DeslocSync`) is given one,
so a unit test can hand it a fake that averages between threads of one process, while the
integration tests use real gloo groups.

Bytes recorded are payload bytes: ``numel * element_size`` of every buffer handed to a collective
(the encoded size for compressed categories).

Example: with no process group (or one process) every call is local and free::

    >>> import torch
    >>> comm = Comm()
    >>> x = torch.ones(3)
    >>> comm.average_({"params": [x]}, bucket_cap_bytes=2**20)
    >>> comm.all_reduce_max(torch.tensor([0.5])), comm.broadcast_object("id-7"), comm.ledger.rounds
    (tensor([0.5000]), 'id-7', 0)
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_desloc.averaging import (
    DEFAULT_BUCKET_CAP_BYTES,
    LOW_PRECISION,
    Contribution,
    average_round,
    broadcast_round,
    kind_buckets,
    start_average_round,
)
from lightning_desloc.compression import CompressionPlan
from lightning_desloc.ledger import CommLedger


def group_ranks(world_size: int, group_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """The inner groups (consecutive ranks) and the outer groups (same position in each inner group).

    >>> group_ranks(6, 3)
    ([[0, 1, 2], [3, 4, 5]], [[0, 3], [1, 4], [2, 5]])
    """
    if group_size < 1 or world_size % group_size:
        raise ValueError(
            f"group_size={group_size} must divide the number of processes ({world_size}); "
            f"use the number of devices per node, or a divisor of {world_size}"
        )
    inner = [list(range(start, start + group_size)) for start in range(0, world_size, group_size)]
    outer = [list(range(i, world_size, group_size)) for i in range(group_size)]
    return inner, outer


class Comm:
    """Collectives over ``group`` (``None``: the default group), metered in ``ledger``.

    Args:
        ledger: where every collective's payload bytes go, per category; a new ledger when ``None``.
        group: the process group; ``None`` for the default (world) group.
        device: where the small tensors of control collectives are made (NCCL needs the rank's GPU);
            the adapters set it to the rank's root device at setup.
    """

    def __init__(self, ledger: Optional[CommLedger] = None, group: Any = None,
                 device: Optional[torch.device] = None) -> None:
        self.ledger = ledger if ledger is not None else CommLedger()
        self.group = group
        self.device = torch.device("cpu") if device is None else device

    # ------------------------------------------------------------------ who is there
    @property
    def initialized(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if self.initialized else 1

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if self.initialized else 0

    @property
    def distributed(self) -> bool:
        """Whether a collective would reach another rank (a group is initialised and has more than one)."""
        return self.initialized and self.world_size > 1

    def meter(self, category: str, nbytes: int) -> None:
        """Record one collective of ``nbytes`` that someone else issued (Lightning's reductions, barriers)."""
        if self.distributed:
            self.ledger.record({category: int(nbytes)})

    # ------------------------------------------------------------------ the averaging rounds
    def average_(
        self,
        tensors_by_category: Mapping[str, Sequence[Tensor]],
        *,
        bucket_cap_bytes: int = DEFAULT_BUCKET_CAP_BYTES,
        compression: Optional[CompressionPlan] = None,
        contribution: Optional[Contribution] = None,
    ) -> None:
        """Replace every tensor by its mean over the group, in one coalesced round (see
        :func:`~lightning_desloc.averaging.average_round`); one ledger round, bytes per category.
        ``contribution``: this rank sends zeros (but for its exempt tensors) where its flag is False
        (:class:`~lightning_desloc.averaging.Contribution`, ``on_nonfinite``)."""
        if not self.distributed or not any(tensors_by_category.values()):
            return
        sent, calls = average_round(tensors_by_category, self.world_size, self.group, bucket_cap_bytes, compression,
                                    contribution)
        self.ledger.record(sent, calls)

    def start_average(self, tensors_by_category: Mapping[str, Sequence[Tensor]], *,
                      bucket_cap_bytes: int = DEFAULT_BUCKET_CAP_BYTES,
                      contribution: Optional[Contribution] = None) -> tuple[dict[str, list[tuple[Tensor, Tensor]]], list[Any]]:
        """Start averaging ``tensors_by_category`` asynchronously, leaving them untouched (see
        :func:`~lightning_desloc.averaging.start_average_round`): ``(buckets, works)``; the bytes are
        recorded now, as the round is issued. ``contribution``: as in :meth:`average_` (the snapshot of a
        rank whose flag is False holds zeros)."""
        buckets, works, sent, calls = start_average_round(tensors_by_category, self.world_size, self.group,
                                                          bucket_cap_bytes, contribution)
        if works:
            self.ledger.record(sent, calls)
        return buckets, works

    def broadcast_(self, tensors: Sequence[Tensor], src: int = 0, category: str = "setup",
                   bucket_cap_bytes: int = DEFAULT_BUCKET_CAP_BYTES) -> None:
        """Overwrite ``tensors`` with rank ``src``'s values (``src`` is a global rank), coalesced."""
        if not tensors or not self.distributed:
            return
        nbytes, calls = broadcast_round(tensors, src, self.group, bucket_cap_bytes)
        self.ledger.record({category: nbytes}, calls)

    def reduce_mean_to_(self, tensors: Sequence[Tensor], receive: Callable[[Sequence[Tensor], Tensor], None], *,
                        dst: int = 0, category: str = "checkpoint",
                        bucket_cap_bytes: int = DEFAULT_BUCKET_CAP_BYTES) -> None:
        """The mean over the group of ``tensors``, for rank ``dst`` (a global rank) alone, bucket by bucket.

        The tensors are grouped by dtype and device into flat buckets of at most ``bucket_cap_bytes``; each
        bucket is a flat copy reduced to ``dst`` (a sum) and divided there by the group size, then
        ``receive(bucket, mean)`` is called on ``dst`` with the bucket's tensors and their flat mean in
        their dtype, a buffer of its own that is not used after the call (keep it, or copy from it what you
        keep: on a GPU it is device memory). bfloat16/float16 buckets travel and are summed in float32
        (twice their bytes on the wire, counted as such): a low-precision sum over many ranks loses several
        ulp, and float16 overflows before the division; the mean is rounded to the dtype once, as a
        round's. The other
        ranks receive nothing. At most two buckets are in flight (the next one is issued before the
        previous one lands), so the extra memory is about two buckets, whatever the total. The tensors
        are not modified. One ledger round: the bytes handed to ``dist.reduce`` under ``category``, one call per bucket.
        With one process nothing is sent and ``receive`` is not called."""
        if not self.distributed or not tensors:
            return
        world, mine = self.world_size, dist.get_rank() == dst
        in_flight: Optional[tuple[Any, Tensor, list[Tensor]]] = None
        calls = 0

        sent = 0

        def land(work: Any, flat: Tensor, bucket: list[Tensor]) -> None:
            work.wait()
            if mine:
                flat.div_(world)
                receive(bucket, flat.to(bucket[0].dtype))  # no copy unless it travelled in float32

        with torch.no_grad():
            for bucket in kind_buckets(tensors, bucket_cap_bytes):
                flat = torch.cat([t.detach().reshape(-1) for t in bucket])
                if flat.dtype in LOW_PRECISION:
                    flat = flat.float()
                work = dist.reduce(flat, dst=dst, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
                calls += 1
                sent += flat.numel() * flat.element_size()
                if in_flight is not None:
                    land(*in_flight)
                in_flight = (work, flat, bucket)  # drops the landed bucket's buffer: two at most are alive
            if in_flight is not None:
                land(*in_flight)
        self.ledger.record({category: sent}, calls)

    # ------------------------------------------------------------------ small control collectives
    def all_reduce_max(self, values: Tensor, category: str = "control") -> Tensor:
        """The element-wise maximum of ``values`` over the group (a new tensor on :attr:`device`)."""
        out = values.detach().to(self.device, copy=True)
        if self.distributed:
            dist.all_reduce(out, op=dist.ReduceOp.MAX, group=self.group)
            self.ledger.record({category: out.numel() * out.element_size()})
        return out

    def broadcast_object(self, obj: Any, src: int = 0, category: str = "control") -> Any:
        """Pickle ``obj`` on rank ``src`` and broadcast it: an int64 size, then the payload as uint8.

        Two plain broadcasts rather than ``broadcast_object_list`` so that the bytes are known exactly:
        ``8 + len(pickle.dumps(obj))``. Call on every rank."""
        if not self.distributed:
            return obj
        mine = self.rank == src
        payload = pickle.dumps(obj) if mine else b""
        size = torch.tensor([len(payload)], dtype=torch.int64, device=self.device)
        dist.broadcast(size, src=src, group=self.group)
        n = int(size.item())
        buf = torch.empty(n, dtype=torch.uint8, device=self.device)
        if mine:
            buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
        dist.broadcast(buf, src=src, group=self.group)
        self.ledger.record({category: size.numel() * size.element_size() + n}, calls=2)
        return obj if mine else pickle.loads(buf.cpu().numpy().tobytes())

    def all_gather_object(self, obj: Any, category: str = "control") -> list[Any]:
        """Every rank's ``obj``, in rank order; bytes: this rank's pickled size times the group size."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        self.ledger.record({category: len(pickle.dumps(obj)) * self.world_size}, calls=2)  # sizes, then payloads
        return out

    # ------------------------------------------------------------------ hierarchy
    def split(self, group_size: int, inner_ledger: CommLedger) -> tuple["Comm", "Comm"]:
        """The two levels of hierarchical groups: ``(inner, outer)``.

        ``inner`` is this rank's group of ``group_size`` consecutive ranks, metered in ``inner_ledger``;
        ``outer`` joins the ranks with this rank's position in every group, metered in this ledger.
        Collective: every rank calls it once, in the same order (``new_group``)."""
        inner_ranks, outer_ranks = group_ranks(self.world_size, group_size)
        mine: dict[str, Any] = {}
        for kind, groups in (("inner", inner_ranks), ("outer", outer_ranks)):
            for ranks in groups:
                handle = dist.new_group(ranks)
                if self.rank in ranks:
                    mine[kind] = handle
        return Comm(inner_ledger, mine["inner"], self.device), Comm(self.ledger, mine["outer"], self.device)
