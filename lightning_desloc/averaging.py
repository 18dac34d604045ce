"""The one place DES-LOC's averaging collectives happen: flatten -> reduce -> mean -> unflatten.

Everything due in one step travels in one round, for a group of M ranks:

* **Exact categories** are grouped by dtype and device and packed into flat buckets of at most
  ``bucket_cap_bytes``. A float32/float64 bucket is all-reduced (a sum) and divided by M. A
  bfloat16/float16 bucket is summed in float32 instead: cut into M consecutive chunks of
  ``ceil(numel / M)`` elements (the last ones shorter or empty), one ``all_to_all_single`` hands rank
  ``j`` every rank's copy of chunk ``j`` (a reduce-scatter), rank ``j`` adds the M copies in float32 in
  rank order, divides by M and rounds once to the bucket's dtype, and an all-gather of the mean chunks
  (zero padded to whole chunks) gives every rank the whole mean. The wire bytes per rank are a ring
  all-reduce's, float16 cannot overflow before the division, the mean is rounded once (a bfloat16 sum
  over many ranks would be several ulp off) and every rank ends bit-identical (each chunk's mean is
  computed by one rank).
* **Compressed categories** (:mod:`lightning_desloc.compression`) travel in buckets too, each category's
  flat elements on their own (:func:`~lightning_desloc.compression.bucket_numels`: a float32 message of
  at most ``bucket_cap_bytes``, cut at whole int8 scale chunks per rank, so a bucket may end inside a
  tensor): per bucket one coded reduce-scatter (``all_to_all_single`` of encoded parts) and one
  all-gather of the encoded mean parts, the error feedback updated on the bucket's slice.

The round is pipelined: bucket ``i + 1`` is packed and issued before bucket ``i`` is waited for, copied
back and released, so at most two flat buckets exist at once (a bfloat16/float16 bucket also holds a
receive buffer of its size while its all-to-all is in flight); the compressed buckets come last, in
the same pipeline (a coded bucket in flight holds its encoded send and receive buffers). Each round is
recorded in a :class:`~lightning_desloc.ledger.CommLedger` by category: the payload averaged
(``numel * element_size`` of the tensors, the codec's encoded size of the message for a compressed
category, once per round, whatever collectives carry it: exactly what a rank hands to the all-reduce or
the reduce-scatter; for a compressed category the sum of its buckets' encodings, equal to
``codec.nbytes(numel)`` as the buckets are whole scale chunks) and the collectives issued (1 per
float32/float64 bucket, 2 per bfloat16/float16 bucket, 2 per compressed bucket).

Example, run on every rank of an initialised process group::

    ledger = CommLedger()
    average_({"params": list(model.parameters()),
              "state/exp_avg": [opt.state[p]["exp_avg"] for p in model.parameters()]}, ledger)
    ledger.bytes   # {'params': 4 * n_params, 'state/exp_avg': 4 * n_params} for float32

With one process nothing is sent and nothing is recorded.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_desloc.compression import CompressionPlan, bucket_numels, part_numels
from lightning_desloc.ledger import CommLedger

DEFAULT_BUCKET_CAP_BYTES = 64 * 2**20

#: dtypes whose buckets are summed in float32 (reduce-scatter + all-gather) rather than all-reduced
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _numel(tensors: Sequence[Tensor]) -> int:
    return sum(t.numel() for t in tensors)


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


def _chunk_numel(numel: int, world: int) -> int:
    """Elements of each rank's chunk of a bfloat16/float16 bucket (the last ranks' are shorter or empty)."""
    return -(-numel // world)


def _chunk_numels(numel: int, world: int) -> list[int]:
    """The elements of the ``world`` consecutive chunks of a ``numel``-element bucket, in rank order."""
    size = _chunk_numel(numel, world)
    return [max(0, min(size, numel - j * size)) for j in range(world)]


def _pack(bucket: Sequence[Tensor], world: int, contribution: Optional["Contribution"] = None) -> Tensor:
    """A new flat tensor holding ``bucket``'s values in order; for a bfloat16/float16 bucket with room
    (zeros) for ``world`` whole chunks, where the all-gather of the mean chunks lands. With a
    ``contribution`` whose flag is False, every tensor but its ``exempt`` ones is packed as zeros."""
    numel = _numel(bucket)
    padded = _chunk_numel(numel, world) * world if bucket[0].dtype in LOW_PRECISION else numel
    flat = torch.empty(padded, dtype=bucket[0].dtype, device=bucket[0].device)
    offset = 0
    for t in bucket:
        flat[offset : offset + t.numel()].view(t.shape).copy_(t.detach())
        offset += t.numel()
    flat[numel:].zero_()
    if contribution is not None:
        contribution.mask_(flat, bucket)
    return flat


class Contribution:
    """Whether this rank's values count in a round (``on_nonfinite``): ``counts`` is a 0-dim bool tensor
    computed on the device before the round (never read by the host during the step); where it is False
    the rank sends zeros for every tensor except ``exempt`` ones (the control tensor, which carries the
    flag itself). Masking is ``masked_fill`` on each packed flat bucket, not a multiplication by the flag:
    ``NaN * 0`` is NaN. The mean then holds ``sum over counted ranks / M``; the caller rescales it."""

    def __init__(self, counts: Tensor, exempt: Sequence[Tensor] = (),
                 scale: Optional[Callable[[], Tensor]] = None) -> None:
        self.drop = torch.logical_not(counts)
        self.exempt = {id(t) for t in exempt}
        #: for compressed categories: returns the 0-dim factor ``M / n`` (``n`` ranks counted) by which the
        #: float32 mean of each coded part is multiplied before it is encoded again; called only once the
        #: round's exact buckets (the control tensor, which carries the counts) have landed
        self.scale = scale

    def mask_(self, flat: Tensor, bucket: Sequence[Tensor]) -> None:
        """Zero ``flat``'s slices of ``bucket``'s non-exempt tensors where the rank does not count: one
        ``masked_fill_`` per run of consecutive non-exempt tensors (one per bucket, usually)."""
        # a bucket on another device than the flag's (rare: the round's tensors share the parameters'
        # device) needs the flag there: a device-to-device copy of one byte
        drop = self.drop if self.drop.device == flat.device else self.drop.to(flat.device)
        offset, start = 0, None
        for t in bucket:
            if id(t) in self.exempt:
                if start is not None and start < offset:
                    flat[start:offset].masked_fill_(drop, 0)
                start = None
            elif start is None:
                start = offset
            offset += t.numel()
        if start is not None and start < offset:
            flat[start:offset].masked_fill_(drop, 0)


def _unpadded(flat: Tensor, numel: int) -> Tensor:
    return flat if flat.numel() == numel else flat[:numel]


def _rank_order_mean(rows: Iterable[Tensor], world: int) -> Tensor:
    """The float32 mean of ``rows`` (one per rank), added one after another from rank 0: the order is
    fixed, so the result does not depend on which rank computes it or how the round was bucketed."""
    total: Optional[Tensor] = None
    for row in rows:
        if total is None:
            total = row.to(torch.float32, copy=True)
        else:
            total += row
    assert total is not None, "no rows to average"
    return total.div_(world)


def _all_gather_flat(output: Tensor, mine: Tensor, group: Optional[Any]) -> None:
    """``output`` <- every rank's equal-sized ``mine`` concatenated in rank order (blocking);
    ``all_gather_single`` where torch has it (2.14 deprecates its older name, ``all_gather_into_tensor``)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, mine, group=group)


class _DividingWork:
    """A pending all-reduce (a sum) of ``flat`` whose ``wait`` also turns the sum into the mean (once).
    One collective; the mean is in :attr:`result` (``flat``) after ``wait``."""

    calls = 1

    def __init__(self, work: Any, flat: Tensor, world: int) -> None:
        self.work, self.flat, self.world = work, flat, world
        self.result = flat

    def wait(self) -> None:
        if self.work is not None:
            self.work.wait()
            self.flat.div_(self.world)
            self.work = None


class _Float32SumWork:
    """The mean over ``world`` ranks of the first ``numel`` elements of a bfloat16/float16 ``flat``
    (with room for ``world`` whole chunks, :func:`_pack`), summed in float32. Two collectives:

    * the reduce-scatter, an ``all_to_all_single`` issued asynchronously here: chunk ``j`` of the
      ``numel`` values (:func:`_chunk_numels`, the last ones shorter) goes to rank ``j``, so a rank hands
      it exactly its payload and row ``i`` of the receive buffer is rank ``i``'s copy of this rank's chunk;
    * in :meth:`wait`, the float32 sum of those rows in rank order, the division, one rounding to the
      dtype and a blocking all-gather of the mean chunks (zero padded to whole chunks) into
      :attr:`result`. That all-gather is a collective issued at ``wait``: every rank must wait for its
      works in the same order (the round's callers do).

    :attr:`result` (``world`` whole chunks; the mean in its first ``numel`` elements) is ``flat`` itself
    with ``overwrite_flat`` (a blocking round: the sent values are not needed once they have arrived),
    else the receive buffer (an overlapped round keeps ``flat`` as the snapshot); either way no third
    buffer of the bucket's size is allocated."""

    calls = 2

    def __init__(self, flat: Tensor, numel: int, world: int, group: Optional[Any], overwrite_flat: bool) -> None:
        self.flat, self.world, self.group = flat, world, group
        chunks = _chunk_numels(numel, world)
        self.mine = chunks[dist.get_rank(group)]
        self.received: Optional[Tensor] = torch.empty_like(flat)
        self.result = flat if overwrite_flat else self.received
        self.work = dist.all_to_all_single(self.received[: world * self.mine], flat[:numel],
                                           output_split_sizes=[self.mine] * world, input_split_sizes=chunks,
                                           group=group, async_op=True)

    def wait(self) -> None:
        if self.work is None:
            return
        self.work.wait()
        assert self.received is not None
        rows = self.received[: self.world * self.mine].view(self.world, self.mine)
        mean_chunk = torch.zeros(self.flat.numel() // self.world, dtype=self.flat.dtype, device=self.flat.device)
        mean_chunk[: self.mine] = _rank_order_mean(rows, self.world)
        self.received = self.work = None  # the receive buffer lives on only as the result, if it is one
        _all_gather_flat(self.result, mean_chunk, self.group)


def _start_mean(flat: Tensor, numel: int, world: int, group: Optional[Any], keep_flat: bool) -> Any:
    """Issue the collectives of the mean of ``flat``'s first ``numel`` elements (:func:`_pack`); a work
    whose ``wait`` leaves it in the first ``numel`` elements of its ``result`` (``keep_flat``: never in
    ``flat`` itself)."""
    if flat.dtype in LOW_PRECISION:
        return _Float32SumWork(flat, numel, world, group, overwrite_flat=not keep_flat)
    summed = flat.clone() if keep_flat else flat
    return _DividingWork(dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group, async_op=True), summed, world)


def start_average_round(
    tensors_by_category: Mapping[str, Sequence[Tensor]], world: int, group: Optional[Any], bucket_cap_bytes: int,
    contribution: Optional[Contribution] = None,
) -> tuple[dict[str, list[tuple[Tensor, Tensor]]], list[Any], dict[str, int], int]:
    """Start an asynchronous average without touching the tensors (``overlap_steps``): per category and
    bucket, a flat snapshot and the buffer its mean arrives in, the mean there by the time the returned
    works have been waited on.

    A float32/float64 bucket is all-reduced (a copy of the snapshot, in place) and the division is queued
    behind it at ``wait`` (on gloo after the all-reduce: see
    :class:`~lightning_desloc.overlap.OverlappedRounds`). A bfloat16/float16 bucket gets the same
    float32-accumulated mean as :func:`average_round`: its all-to-all (the reduce-scatter) is issued now
    and ``wait`` does the float32 sum and a blocking all-gather; its mean arrives in the all-to-all's
    receive buffer, so a bucket holds two buffers of its size in flight either way. Returns the buckets
    ``{category: [(snapshot, mean), ...]}``, the works, bytes per category and the number of collectives.
    ``contribution`` (``on_nonfinite``): where its flag is False the snapshot is packed (and sent) as zeros,
    but for its exempt tensors, as in :func:`average_round`.
    """
    buckets: dict[str, list[tuple[Tensor, Tensor]]] = {}
    works: list[Any] = []
    sent: dict[str, int] = {}
    calls = 0
    for cat, ts in tensors_by_category.items():
        if not ts:
            continue
        buckets[cat] = []
        sent[cat] = sum(_nbytes(t) for t in ts)
        for bucket in kind_buckets(ts, bucket_cap_bytes):
            numel = _numel(bucket)
            with torch.no_grad():
                mine = _pack(bucket, world, contribution)
            work = _start_mean(mine, numel, world, group, keep_flat=True)
            works.append(work)
            calls += work.calls
            buckets[cat].append((_unpadded(mine, numel), _unpadded(work.result, numel)))
    return buckets, works, sent, calls


def unflatten_into(flat: Tensor, bucket: Sequence[Tensor]) -> None:
    """Copy consecutive slices of ``flat`` into the tensors of ``bucket`` (elements past them are ignored)."""
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
        bucket_cap_bytes: largest flat buffer handed to one bucket's collectives, in bytes (for a
            compressed category: of the bucket's float32 message, rounded down to whole int8 scale chunks
            per rank, at least ``chunk * M`` elements).
        compression: categories it names travel encoded (see :mod:`lightning_desloc.compression`),
            each in buckets of a coded reduce-scatter and an all-gather, the last stages of the round;
            the rest are averaged exactly (see the module docstring).
    """
    from lightning_desloc.comm import Comm

    Comm(ledger, group).average_(tensors_by_category, bucket_cap_bytes=bucket_cap_bytes, compression=compression)


def average_round(
    tensors_by_category: Mapping[str, Sequence[Tensor]],
    world: int,
    group: Optional[Any],
    bucket_cap_bytes: int,
    compression: Optional[CompressionPlan] = None,
    contribution: Optional[Contribution] = None,
) -> tuple[dict[str, int], int]:
    """How a round averages, for a group of ``world`` ranks: returns the payload bytes per category and
    the number of collective calls issued. ``contribution``: whether this rank's values count
    (:class:`Contribution`; exact categories only).

    Exact categories are grouped by dtype and device and packed into flat buckets of at most
    ``bucket_cap_bytes``; float32/float64 buckets are all-reduced (a sum) and divided by ``world``,
    bfloat16/float16 ones summed in float32 by a reduce-scatter and an all-gather. Compressed categories
    follow, each in buckets of a float32 message of at most ``bucket_cap_bytes`` (whole scale chunks per
    rank), a coded reduce-scatter and an all-gather per bucket. At most two buckets, exact or coded,
    are packed at once: each is issued before the previous one is waited for.
    Called by :class:`~lightning_desloc.comm.Comm`, which checks the group and records the bytes.
    """
    exact: list[Tensor] = []
    coded: list[tuple[Sequence[Tensor], Any]] = []
    sent: dict[str, int] = defaultdict(int)
    for cat, ts in tensors_by_category.items():
        if not ts:
            continue
        memory = compression.for_category(cat) if compression is not None else None
        if memory is None:
            exact.extend(ts)
            sent[cat] += sum(_nbytes(t) for t in ts)
        else:
            coded.append((ts, memory))
            sent[cat] += memory.codec.nbytes(_numel(ts))

    for t in exact:
        if not t.is_floating_point():
            raise TypeError(f"only floating tensors can be averaged, got {t.dtype}")
    if contribution is not None and coded and contribution.scale is None:
        raise ValueError("a masked contribution (on_nonfinite) to compressed categories needs its scale")
    with torch.no_grad():
        calls = _run_two_at_a_time(_stages(exact, coded, world, group, bucket_cap_bytes, contribution))
    return dict(sent), calls


def _stages(exact: Sequence[Tensor], coded: Sequence[tuple[Sequence[Tensor], Any]], world: int,
            group: Optional[Any], bucket_cap_bytes: int, contribution: Optional[Contribution] = None) -> Iterator[Any]:
    """The round's stages, each packed and issued only when the pipeline asks for it."""
    for bucket in kind_buckets(exact, bucket_cap_bytes):
        yield _BucketStage(bucket, world, group, contribution)
    for ts, memory in coded:
        offsets, total = _category_offsets(ts), _numel(ts)
        start = 0
        for numel in bucket_numels(memory.codec, total, bucket_cap_bytes, world):
            yield _CodedBucket(ts, offsets, memory, start, numel, total, world, group, contribution)
            start += numel


def _run_two_at_a_time(stages: Iterator[Any]) -> int:
    """Issue every stage, finishing each one only after the next has been issued: the collectives
    overlap the packing and unpacking around them, and at most two stages hold buffers at once (a
    stage is released when the next-but-one is asked for). Returns the collectives issued."""
    calls, in_flight = 0, None
    for stage in stages:
        calls += stage.calls
        if in_flight is not None:
            in_flight.finish()
        in_flight = stage
    if in_flight is not None:
        in_flight.finish()
    return calls


class _BucketStage:
    """One exact bucket of a blocking round: packed and its collectives issued at construction, the mean
    copied back into the tensors by :meth:`finish`, which also drops the flat buffer."""

    def __init__(self, bucket: Sequence[Tensor], world: int, group: Optional[Any],
                 contribution: Optional[Contribution] = None) -> None:
        self.bucket = bucket
        self.work = _start_mean(_pack(bucket, world, contribution), _numel(bucket), world, group, keep_flat=False)
        self.calls = self.work.calls

    def finish(self) -> None:
        self.work.wait()
        _unflatten_into(self.work.result, self.bucket)
        self.work = None


def _category_offsets(tensors: Sequence[Tensor]) -> list[int]:
    """Where each tensor's elements begin in the concatenation of ``tensors``."""
    out, start = [], 0
    for t in tensors:
        out.append(start)
        start += t.numel()
    return out


def _overlaps(tensors: Sequence[Tensor], offsets: Sequence[int], start: int,
              numel: int) -> Iterator[tuple[Tensor, int, int, int]]:
    """Per tensor overlapping elements ``[start, start + numel)`` of the concatenation of ``tensors``:
    ``(tensor, first element in it, first element in the range, elements)``."""
    stop = start + numel
    for t, begin in zip(tensors, offsets):
        lo, hi = max(start, begin), min(stop, begin + t.numel())
        if lo < hi:
            yield t, lo - begin, lo - start, hi - lo


def _pack_range(tensors: Sequence[Tensor], offsets: Sequence[int], start: int, numel: int,
                device: torch.device) -> Tensor:
    """A new float32 tensor holding elements ``[start, start + numel)`` of the concatenation of
    ``tensors`` (a bucket may begin or end inside a tensor)."""
    flat = torch.empty(numel, dtype=torch.float32, device=device)
    for t, src, dst, n in _overlaps(tensors, offsets, start, numel):
        flat[dst : dst + n].copy_(t.detach().reshape(-1)[src : src + n])
    return flat


def _write_range(tensors: Sequence[Tensor], offsets: Sequence[int], start: int, values: Tensor) -> None:
    """Copy ``values`` into elements ``[start, start + values.numel())`` of the concatenation of ``tensors``."""
    for t, dst, src, n in _overlaps(tensors, offsets, start, values.numel()):
        if t.is_contiguous():
            t.view(-1)[dst : dst + n].copy_(values[src : src + n])
        else:  # rare (parameters and states are contiguous): through a flat copy of the whole tensor
            whole = t.reshape(-1).clone()
            whole[dst : dst + n].copy_(values[src : src + n])
            t.copy_(whole.view_as(t))


class _CodedBucket:
    """One bucket of a compressed category: its elements ``[start, start + numel)`` (of ``total``),
    averaged by a coded reduce-scatter and an all-gather (the protocol of
    :mod:`lightning_desloc.compression`).

    At construction the bucket's float32 message is packed, cut into ``world`` parts and each part
    encoded into its slice of the send buffer, part ``j`` going to rank ``j`` in one asynchronous
    ``all_to_all_single`` (the parts' lengths add up to the bucket's encoded size); error feedback
    (``memory.remember``, delta coding) takes this rank's own first encoding of each part right away, so
    the message is dropped before the collective is issued. :meth:`finish` decodes the ``world``
    received encodings of this rank's part, takes their float32 mean in rank order, encodes it again and
    all-gathers the encoded mean parts (padded to the longest part); every rank decodes the same bytes
    part by part into the tensors, so all results are bit-identical. Held in flight: the send and
    receive buffers (each about the bucket's encoded size); during :meth:`finish` the gathered buffer
    (the same size) and one part's decoded float32 values at a time."""

    calls = 2

    def __init__(self, tensors: Sequence[Tensor], offsets: Sequence[int], memory: Any, start: int, numel: int,
                 total: int, world: int, group: Optional[Any], contribution: Optional[Contribution] = None) -> None:
        self.tensors, self.offsets, self.memory, self.start = tensors, offsets, memory, start
        self.world, self.group, self.rank = world, group, dist.get_rank(group)
        self.contribution = contribution
        codec = memory.codec
        device = tensors[0].device
        message = memory.message_(_pack_range(tensors, offsets, start, numel, device), start)
        if contribution is not None:
            # a rank that does not count sends zeros (they encode and decode to exact zeros), and its
            # error feedback becomes 0 - Q(0) = 0: nothing non-finite stays in its residual either
            message.masked_fill_(contribution.drop.to(message.device), 0)
        self.part_numels = part_numels(codec, numel, world)
        self.part_bytes = [codec.nbytes(n) if n else 0 for n in self.part_numels]
        self.sent: Optional[Tensor] = torch.empty(sum(self.part_bytes), dtype=torch.uint8, device=device)
        element, byte = 0, 0
        for n, nbytes in zip(self.part_numels, self.part_bytes):
            if n:
                part = message[element : element + n]
                encoding = self.sent[byte : byte + nbytes]
                encoding.copy_(codec.encode(part))
                if memory.delta:
                    memory.remember(part, codec.decode(encoding, n), start=start + element, total=total)
            element, byte = element + n, byte + nbytes
        del message
        mine = self.part_bytes[self.rank]
        self.received: Optional[Tensor] = torch.empty(world * mine, dtype=torch.uint8, device=device)
        self.work = dist.all_to_all_single(self.received, self.sent, output_split_sizes=[mine] * world,
                                           input_split_sizes=self.part_bytes, group=group, async_op=True)

    def finish(self) -> None:
        self.work.wait()
        assert self.received is not None and self.sent is not None
        self.sent = None
        codec, device = self.memory.codec, self.received.device
        numel, mine, widest = self.part_numels[self.rank], self.part_bytes[self.rank], max(self.part_bytes)
        mean_part = torch.zeros(widest, dtype=torch.uint8, device=device)
        if numel:
            decoded = (codec.decode(self.received[i * mine : (i + 1) * mine], numel) for i in range(self.world))
            mean = _rank_order_mean(decoded, self.world)
            if self.contribution is not None:  # on_nonfinite: sum over the counted ranks / M -> their mean
                assert self.contribution.scale is not None
                mean.mul_(self.contribution.scale())
            mean_part[:mine].copy_(codec.encode(mean))
        self.received = self.work = None
        gathered = torch.empty(self.world * widest, dtype=torch.uint8, device=device)
        _all_gather_flat(gathered, mean_part, self.group)
        del mean_part
        element = self.start
        for j, n in enumerate(self.part_numels):
            if n:
                mean = codec.decode(gathered[j * widest : j * widest + self.part_bytes[j]], n)
                _write_range(self.tensors, self.offsets, element, self.memory.finish(mean, element))
            element += n


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
