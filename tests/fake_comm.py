"""A fake of :class:`lightning_desloc.comm.Comm` for single-process tests of the core: M ranks are M
threads of this process, and every collective is an exchange of Python objects between them.

Only the core's unit tests use it; every behaviour that depends on torch.distributed (the strategies,
the real averaging, checkpoints, launchers) is tested on real gloo processes. The fake is written
from what a collective means (sum in rank order, then divide; max; rank ``src``'s value), not from the
package's averaging code, and it records bytes as the documented ledger convention says
(``numel * element_size`` per tensor handed over, the encoded size for compressed categories), so the
tests can check the ledger against hand counts.
"""

from __future__ import annotations

import pickle
import threading
from collections import defaultdict
from typing import Any, Callable, Optional

import torch

from lightning_desloc.ledger import CommLedger

TIMEOUT_S = 60.0  # a bug that leaves one thread out of a collective fails the test instead of hanging it


class ThreadGroup:
    """The meeting point of ``size`` threads: :meth:`exchange` is an all-gather of Python objects."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._barrier = threading.Barrier(size, timeout=TIMEOUT_S)
        self._slots: list[Any] = [None] * size

    def exchange(self, member: int, value: Any) -> list[Any]:
        self._slots[member] = value
        self._barrier.wait()
        out = list(self._slots)
        self._barrier.wait()  # nobody overwrites a slot before everyone has read them
        return out


class FakeComm:
    """The :class:`~lightning_desloc.comm.Comm` interface for one thread-rank of a :class:`ThreadGroup`."""

    def __init__(self, group: ThreadGroup, member: int, ledger: Optional[CommLedger] = None,
                 global_ranks: Optional[list[int]] = None) -> None:
        self.group, self.member = group, member
        self.ledger = ledger if ledger is not None else CommLedger()
        self.global_ranks = global_ranks if global_ranks is not None else list(range(group.size))
        self.device = torch.device("cpu")
        #: every call, in order: (name, categories) — what the core asked for
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    @property
    def world_size(self) -> int:
        return self.group.size

    @property
    def rank(self) -> int:
        return self.member

    @property
    def distributed(self) -> bool:
        return self.group.size > 1

    def meter(self, category: str, nbytes: int) -> None:
        if self.distributed:
            self.ledger.record({category: int(nbytes)})

    def average_(self, tensors_by_category, *, bucket_cap_bytes: int = 0, compression=None, contribution=None) -> None:
        """``contribution`` (``on_nonfinite``): where its flag is False this rank hands over zeros for every
        tensor but the exempt ones (the control tensor)."""
        cats = tuple(c for c, ts in tensors_by_category.items() if ts)
        if not self.distributed or not cats:
            return
        self.calls.append(("average_", cats))
        sent: dict[str, int] = defaultdict(int)
        exact, coded, messages = [], [], []
        for cat in cats:
            ts = tensors_by_category[cat]
            memory = compression.for_category(cat) if compression is not None else None
            if memory is None:
                exact.extend(ts)
                sent[cat] += sum(t.numel() * t.element_size() for t in ts)
            else:
                m = memory.message(torch.cat([t.detach().reshape(-1) for t in ts]))
                coded.append((ts, memory, m))
                messages.append(memory.codec.encode(m))
                sent[cat] += memory.codec.nbytes(m.numel())
        mine = [t.detach().clone() for t in exact]
        if contribution is not None:
            mine = [m if id(t) in contribution.exempt else torch.where(contribution.drop, torch.zeros_like(m), m)
                    for t, m in zip(exact, mine)]
        everyone = self.group.exchange(self.member, (mine, messages))
        world = self.group.size
        with torch.no_grad():
            for i, t in enumerate(exact):
                total = everyone[0][0][i].clone()
                for other in everyone[1:]:
                    total += other[0][i]
                t.copy_(total / world)
            for j, (ts, memory, m) in enumerate(coded):
                decoded = [memory.codec.decode(other[1][j], m.numel()) for other in everyone]
                total = decoded[0].clone()
                for d in decoded[1:]:
                    total += d
                result = memory.finish(total / world)
                memory.remember(m, decoded[self.member], result)
                offset = 0
                for t in ts:
                    t.copy_(result[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()
        self.ledger.record(dict(sent))

    def start_average(self, tensors_by_category, *, bucket_cap_bytes: int = 0, contribution=None):
        """The overlapped round: the means arrive at once here (a thread exchange), which is one of the
        timings a real asynchronous round may have. One flat per category and dtype. ``contribution``: as
        in :meth:`average_` (a rank whose flag is False hands over zeros, and keeps them as its snapshot)."""
        cats = [c for c, ts in tensors_by_category.items() if ts]
        self.calls.append(("start_average", tuple(cats)))
        mine = {}
        for cat in cats:
            by_kind = defaultdict(list)
            for t in tensors_by_category[cat]:
                flat = t.detach().reshape(-1).clone()
                if contribution is not None and id(t) not in contribution.exempt:
                    flat = torch.where(contribution.drop, torch.zeros_like(flat), flat)
                by_kind[(t.dtype, t.device)].append(flat)
            mine[cat] = [torch.cat(ts) for ts in by_kind.values()]
        everyone = self.group.exchange(self.member, mine)
        buckets = {}
        for cat in cats:
            buckets[cat] = []
            for i, flat in enumerate(mine[cat]):
                total = everyone[0][cat][i].clone()
                for other in everyone[1:]:
                    total += other[cat][i]
                buckets[cat].append((flat, total / self.group.size))
        self.ledger.record({cat: sum(t.numel() * t.element_size() for t in tensors_by_category[cat]) for cat in cats})
        return buckets, []

    def broadcast_(self, tensors, src: int = 0, category: str = "setup", bucket_cap_bytes: int = 0) -> None:
        if not tensors or not self.distributed:
            return
        self.calls.append(("broadcast_", (category,)))
        values = self.group.exchange(self.member, [t.detach().clone() for t in tensors])[self.global_ranks.index(src)]
        with torch.no_grad():
            for t, v in zip(tensors, values):
                t.copy_(v)
        self.ledger.record({category: sum(t.numel() * t.element_size() for t in tensors)})

    def all_reduce_max(self, values: torch.Tensor, category: str = "control") -> torch.Tensor:
        out = values.detach().clone()
        if self.distributed:
            self.calls.append(("all_reduce_max", (category,)))
            for other in self.group.exchange(self.member, out.clone()):
                out = torch.maximum(out, other)
            self.ledger.record({category: out.numel() * out.element_size()})
        return out

    def broadcast_object(self, obj: Any, src: int = 0, category: str = "control") -> Any:
        if not self.distributed:
            return obj
        self.calls.append(("broadcast_object", (category,)))
        value = self.group.exchange(self.member, obj)[self.global_ranks.index(src)]
        self.ledger.record({category: 8 + len(pickle.dumps(value))})
        return value

    def all_gather_object(self, obj: Any, category: str = "control") -> list[Any]:
        if not self.distributed:
            return [obj]
        self.calls.append(("all_gather_object", (category,)))
        out = self.group.exchange(self.member, obj)
        self.ledger.record({category: len(pickle.dumps(obj)) * self.group.size})
        return out

    def split(self, group_size: int, inner_ledger: CommLedger) -> tuple["FakeComm", "FakeComm"]:
        """The two levels as :meth:`Comm.split <lightning_desloc.comm.Comm.split>` makes them: consecutive
        ranks inside, the same position across (member 0 makes the groups, everyone takes them)."""
        world = self.group.size
        made = None
        if self.member == 0:
            made = {"inner": [ThreadGroup(group_size) for _ in range(world // group_size)],
                    "outer": [ThreadGroup(world // group_size) for _ in range(group_size)]}
        made = self.group.exchange(self.member, made)[0]
        g, i = divmod(self.member, group_size)
        inner = FakeComm(made["inner"][g], i, inner_ledger, list(range(g * group_size, (g + 1) * group_size)))
        outer = FakeComm(made["outer"][i], g, self.ledger, list(range(i, world, group_size)))
        return inner, outer


def run_on_threads(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Call ``fn(rank, world_size, comm, *args)`` on ``world_size`` threads, each with its
    :class:`FakeComm`; returns their results in rank order and re-raises the first failure."""
    group = ThreadGroup(world_size)
    results: list[Any] = [None] * world_size
    errors: list[BaseException] = []

    def body(rank: int) -> None:
        try:
            results[rank] = fn(rank, world_size, FakeComm(group, rank), *args)
        except BaseException as err:  # noqa: BLE001 - re-raised below, in the test's thread
            errors.append(err)
            group._barrier.abort()  # the others stop waiting for this rank

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]
    return results
