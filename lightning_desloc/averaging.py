"""The one place DES-LOC's averaging collectives happen: flatten -> all-reduce -> mean -> unflatten.

Everything due in one step travels in one coalesced round: the tensors are grouped by dtype and
device, packed into flat buckets of at most ``bucket_cap_bytes``, all buckets are all-reduced
asynchronously, and the mean is copied back in place. Each round is recorded in a
:class:`~lightning_desloc.ledger.CommLedger` by category.

Example, run on every rank of an initialised process group::

    ledger = CommLedger()
    average_({"params": list(model.parameters()),
              "state/exp_avg": [opt.state[p]["exp_avg"] for p in model.parameters()]}, ledger)
    ledger.bytes   # {'params': 4 * n_params, 'state/exp_avg': 4 * n_params} for float32

With one process nothing is sent and nothing is recorded.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_desloc.compression import CompressionPlan
from lightning_desloc.ledger import CommLedger

DEFAULT_BUCKET_CAP_BYTES = 64 * 2**20


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _buckets(tensors: Sequence[Tensor], cap: int) -> list[list[Tensor]]:
    """Split same-dtype tensors, in order, into lists of at most ``cap`` bytes (a larger tensor goes alone)."""
    out: list[list[Tensor]] = [[]]
    size = 0
    for t in tensors:
        if out[-1] and size + _nbytes(t) > cap:
            out.append([])
            size = 0
        out[-1].append(t)
        size += _nbytes(t)
    return [b for b in out if b]


def kind_buckets(tensors: Sequence[Tensor], cap: int) -> list[list[Tensor]]:
    """``tensors`` grouped by dtype and device (in order of first appearance), each group split into
    buckets of at most ``cap`` bytes: the flat buffers a round hands to its collectives."""
    by_kind: dict[tuple[torch.dtype, torch.device], list[Tensor]] = defaultdict(list)
    for t in tensors:
        by_kind[(t.dtype, t.device)].append(t)
    return [bucket for same in by_kind.values() for bucket in _buckets(same, cap)]


def start_average_round(
    tensors_by_category: Mapping[str, Sequence[Tensor]], world: int, group: Optional[Any], bucket_cap_bytes: int,
) -> tuple[dict[str, list[tuple[Tensor, Tensor]]], list[Any], dict[str, int], int]:
    """Start an asynchronous average without touching the tensors (``overlap_steps``): per category and
    bucket, a flat snapshot and a copy of it all-reduced in place; divided by ``world`` by the time the
    returned works have been waited on (the division is queued behind the all-reduce on the same stream,
    on gloo after ``wait``: see :class:`~lightning_desloc.overlap.OverlappedRounds`). Returns the buckets
    ``{category: [(snapshot, mean), ...]}``, the works, bytes per category and the number of calls."""
    buckets: dict[str, list[tuple[Tensor, Tensor]]] = {}
    works: list[Any] = []
    sent: dict[str, int] = {}
    for cat, ts in tensors_by_category.items():
        if not ts:
            continue
        buckets[cat] = []
        sent[cat] = sum(_nbytes(t) for t in ts)
        for bucket in kind_buckets(ts, bucket_cap_bytes):
            with torch.no_grad():
                mine = torch.cat([t.detach().reshape(-1) for t in bucket])
                flat = mine.clone()
            works.append(_DividingWork(dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=True),
                                       flat, world))
            buckets[cat].append((mine, flat))
    return buckets, works, sent, len(works)


class _DividingWork:
    """A pending all-reduce whose ``wait`` also turns the sum into the mean (once)."""

    def __init__(self, work: Any, flat: Tensor, world: int) -> None:
        self.work, self.flat, self.world = work, flat, world

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.flat.div_(self.world)
            self.work = None


def unflatten_into(flat: Tensor, bucket: Sequence[Tensor]) -> None:
    """Copy consecutive slices of ``flat`` into the tensors of ``bucket``."""
    _unflatten_into(flat, bucket)


def _unflatten_into(flat: Tensor, bucket: Sequence[Tensor]) -> None:
    offset = 0
    for t in bucket:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def average_(
    tensors_by_category: Mapping[str, Sequence[Tensor]],
    ledger: Optional[CommLedger] = None,
    group: Optional[Any] = None,
    bucket_cap_bytes: int = DEFAULT_BUCKET_CAP_BYTES,
    compression: Optional[CompressionPlan] = None,
) -> None:
    """Replace every tensor by its mean over the ranks of ``group``, in one coalesced round, recording
    the bytes in ``ledger``: :meth:`Comm.average_ <lightning_desloc.comm.Comm.average_>` for callers
    that hold no :class:`~lightning_desloc.comm.Comm`.

    Args:
        tensors_by_category: tensors to average, keyed by ledger category (``"params"``,
            ``"state/exp_avg"``, ...). Integer tensors are not averaged; leave them out.
        ledger: where the round's payload bytes are recorded per category.
        group: process group; the default group when ``None``.
        bucket_cap_bytes: largest flat buffer handed to one all-reduce, in bytes.
        compression: categories it names travel encoded (see :mod:`lightning_desloc.compression`) in
            one all-gather issued with the round's all-reduces; the rest are all-reduced exactly.
    """
    from lightning_desloc.comm import Comm

    Comm(ledger, group).average_(tensors_by_category, bucket_cap_bytes=bucket_cap_bytes, compression=compression)


def average_round(
    tensors_by_category: Mapping[str, Sequence[Tensor]],
    world: int,
    group: Optional[Any],
    bucket_cap_bytes: int,
    compression: Optional[CompressionPlan] = None,
) -> tuple[dict[str, int], int]:
    """How a round averages, for a group of ``world`` ranks: returns the payload bytes per category and
    the number of collective calls issued.

    Exact categories are grouped by dtype and device, packed into flat buckets of at most
    ``bucket_cap_bytes``, all-reduced asynchronously (a sum) and divided by ``world``; compressed
    ones travel in one all-gather beside them. Called by :class:`~lightning_desloc.comm.Comm`, which
    checks the group and records the bytes.
    """
    exact: list[Tensor] = []
    coded: list[tuple[str, Sequence[Tensor], Any]] = []
    sent: dict[str, int] = defaultdict(int)
    for cat, ts in tensors_by_category.items():
        if not ts:
            continue
        memory = compression.for_category(cat) if compression is not None else None
        if memory is None:
            exact.extend(ts)
            sent[cat] += sum(_nbytes(t) for t in ts)
        else:
            coded.append((cat, ts, memory))
            sent[cat] += memory.codec.nbytes(sum(t.numel() for t in ts))

    for t in exact:
        if not t.is_floating_point():
            raise TypeError(f"only floating tensors can be averaged, got {t.dtype}")
    pending = []
    for bucket in kind_buckets(exact, bucket_cap_bytes):
        flat = torch.cat([t.detach().reshape(-1) for t in bucket])
        work = dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group, async_op=True)
        pending.append((work, flat, bucket))
    gathered = _start_coded_round(coded, world, group) if coded else None
    with torch.no_grad():
        for work, flat, bucket in pending:
            work.wait()
            flat.div_(world)
            _unflatten_into(flat, bucket)
        if gathered is not None:
            _finish_coded_round(coded, world, *gathered)
    return dict(sent), len(pending) + (gathered is not None)


def _start_coded_round(coded, world, group):
    messages, payloads = [], []
    for _, ts, memory in coded:
        m = memory.message(torch.cat([t.detach().reshape(-1) for t in ts]))
        messages.append(m)
        payloads.append(memory.codec.encode(m))
    mine = torch.cat(payloads)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    work = dist.all_gather(everyone, mine, group=group, async_op=True)
    return work, everyone, messages, [p.numel() for p in payloads], dist.get_rank(group)


def _finish_coded_round(coded, world, work, everyone, messages, sizes, rank) -> None:
    work.wait()
    offset = 0
    for (_, ts, memory), message, size in zip(coded, messages, sizes):
        numel = message.numel()
        decoded = [memory.codec.decode(buf[offset : offset + size], numel) for buf in everyone]
        total = decoded[0].clone()
        for d in decoded[1:]:  # rank order: every rank computes the same sum
            total += d
        result = memory.finish(total / world)
        memory.remember(message, decoded[rank], result)
        _unflatten_into(result, ts)
        offset += size


def average_stacked_(
    tensors_by_category: Mapping[str, Sequence[Tensor]],
    ledger: Optional[CommLedger] = None,
) -> None:
    """Simulated workers in one process: each tensor holds M workers along dim 0; replace every
    worker's slice by the mean over workers.

    Element-wise optimizers (SGD, Adam, ...) applied to a parameter of shape ``(M, *shape)`` are M
    independent optimizers, so this gives an exact M-worker simulation of the schedule for toy problems
    (the Rosenbrock reproduction). Bytes recorded are one worker's payload, as in :func:`average_`.

    Example::

        >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])   # 2 workers, 2 coordinates
        >>> average_stacked_({"params": [x]})
        >>> x
        tensor([[2., 3.],
                [2., 3.]])
    """
    per_cat: dict[str, int] = defaultdict(int)
    with torch.no_grad():
        for cat, tensors in tensors_by_category.items():
            for t in tensors:
                t.copy_(t.mean(dim=0, keepdim=True).expand_as(t))
                per_cat[cat] += _nbytes(t[0])
    if ledger is not None and per_cat:
        ledger.record(per_cat)


def broadcast_(
    tensors: Sequence[Tensor],
    src: int = 0,
    ledger: Optional[CommLedger] = None,
    category: str = "setup",
    group: Optional[Any] = None,
    bucket_cap_bytes: int = DEFAULT_BUCKET_CAP_BYTES,
) -> None:
    """Overwrite ``tensors`` on every rank with rank ``src``'s values, coalesced like :func:`average_`
    (:meth:`Comm.broadcast_ <lightning_desloc.comm.Comm.broadcast_>` for callers without a Comm)."""
    from lightning_desloc.comm import Comm

    Comm(ledger, group).broadcast_(tensors, src=src, category=category, bucket_cap_bytes=bucket_cap_bytes)


def broadcast_round(tensors: Sequence[Tensor], src: int, group: Optional[Any], bucket_cap_bytes: int) -> tuple[int, int]:
    """How a broadcast goes: same-kind tensors in flat buckets from rank ``src``; returns the payload bytes
    and the number of collective calls."""
    calls = 0
    with torch.no_grad():
        for bucket in kind_buckets(tensors, bucket_cap_bytes):
            flat = torch.cat([t.detach().reshape(-1) for t in bucket])
            dist.broadcast(flat, src=src, group=group)
            calls += 1
            _unflatten_into(flat, bucket)
    return sum(_nbytes(t) for t in tensors), calls
