"""The communication ledger: bytes and rounds of every collective the strategy issues, per category.

Bytes are payload bytes (``numel * element_size`` of each buffer handed to a collective), the
convention under which DDP's cost is "one gradient's worth per step". A ring all-reduce moves about
``2 (M - 1) / M`` times that per worker for every scheme alike, so ratios do not depend on it.

Categories:

* ``params``, ``buffers``: the parameter (and floating buffer) averages of the schedule;
* ``state/<key>``: the average of optimizer state ``key`` (``state/exp_avg``, ...);
* ``setup``: rank 0's initial weights broadcast at setup (DDP pays the same);
* ``eval``: parameters averaged for consensus validation;
* ``checkpoint``: the consensus round of a checkpoint save;
* ``metrics``: ``reduce``/``all_gather`` asked for by logging (``self.log(..., sync_dist=True)``);
* ``control``: barriers, broadcasts and yes/no decisions Lightning asks the strategy for, and the
  core's own signals (a few floats riding on each averaging round, e.g. a SIGTERM on some rank).

Besides bytes the ledger counts **calls**: the ``torch.distributed`` collectives issued (a coalesced
round of three buckets is one round and three calls). On a link with latency every call costs at least
a round trip, so a local step should issue none.

Example::

    >>> ledger = CommLedger()
    >>> ledger.record({"params": 400, "state/exp_avg": 400})
    >>> ledger.add_ddp_equivalent(gradient_bytes=400, steps=4)
    >>> ledger.bytes["params"], ledger.rounds, ledger.calls, ledger.ratio_vs_ddp
    (400, 1, 1, 2.0)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

SYNC_CATEGORIES_PREFIX = ("params", "buffers", "state/")
#: Categories left out of the DDP comparison because DDP pays exactly the same.
NOT_COMPARED = frozenset({"setup"})


class CommLedger:
    """Bytes and rounds per category, and the comparison with DDP.

    Attributes:
        bytes: payload bytes sent per category.
        rounds_by_category: collective rounds that carried each category.
        rounds: collective rounds in all (one coalesced averaging round counts once).
        calls: ``torch.distributed`` collective calls in all (one per bucket of a round).
        ddp_equivalent_bytes: what DDP would have all-reduced for the same optimizer steps
            (gradient bytes per step times steps).
        largest_round_bytes: the payload of the largest single round, bytes: what one round puts on the
            link at once, and about what it holds in flight (``fragments=F`` divides it by ``F``).
    """

    def __init__(self) -> None:
        self.bytes: dict[str, int] = defaultdict(int)
        self.rounds_by_category: dict[str, int] = defaultdict(int)
        self.rounds = 0
        self.calls = 0
        self.ddp_equivalent_bytes = 0
        self.largest_round_bytes = 0

    def record(self, nbytes_by_category: Mapping[str, int], calls: int = 1) -> None:
        """Record one collective round that carried ``nbytes_by_category`` in ``calls`` collective calls."""
        self.rounds += 1
        self.calls += int(calls)
        self.largest_round_bytes = max(self.largest_round_bytes, sum(int(n) for n in nbytes_by_category.values()))
        for category, nbytes in nbytes_by_category.items():
            self.bytes[category] += int(nbytes)
            self.rounds_by_category[category] += 1

    def add_ddp_equivalent(self, gradient_bytes: int, steps: int = 1) -> None:
        self.ddp_equivalent_bytes += int(gradient_bytes) * int(steps)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    @property
    def sync_bytes(self) -> int:
        """Bytes of the schedule's averages (parameters, buffers, optimizer states)."""
        return sum(v for k, v in self.bytes.items() if k.startswith(SYNC_CATEGORIES_PREFIX))

    @property
    def compared_bytes(self) -> int:
        """Every byte DDP would not also have sent: all categories except ``setup``."""
        return sum(v for k, v in self.bytes.items() if k not in NOT_COMPARED)

    @property
    def ratio_vs_ddp(self) -> float:
        """``ddp_equivalent_bytes / compared_bytes``: how many times fewer bytes than DDP (inf if none sent)."""
        sent = self.compared_bytes
        return float("inf") if sent == 0 else self.ddp_equivalent_bytes / sent

    @property
    def bytes_saved(self) -> int:
        return self.ddp_equivalent_bytes - self.compared_bytes

    def as_dict(self, prefix: str = "comm/") -> dict[str, float]:
        """Flat metrics for a logger: ``comm/bytes/<category>``, totals, rounds, ratio."""
        out: dict[str, float] = {f"{prefix}bytes/{k}": float(v) for k, v in sorted(self.bytes.items())}
        out[f"{prefix}bytes_total"] = float(self.total_bytes)
        out[f"{prefix}bytes_ddp_equivalent"] = float(self.ddp_equivalent_bytes)
        out[f"{prefix}bytes_saved"] = float(self.bytes_saved)
        out[f"{prefix}rounds"] = float(self.rounds)
        out[f"{prefix}calls"] = float(self.calls)
        out[f"{prefix}largest_round_bytes"] = float(self.largest_round_bytes)
        ratio = self.ratio_vs_ddp
        if ratio != float("inf"):
            out[f"{prefix}ratio_vs_ddp"] = ratio
        return out

    def state_dict(self) -> dict:
        return {
            "bytes": dict(self.bytes),
            "rounds_by_category": dict(self.rounds_by_category),
            "rounds": self.rounds,
            "calls": self.calls,
            "ddp_equivalent_bytes": self.ddp_equivalent_bytes,
            "largest_round_bytes": self.largest_round_bytes,
        }

    def load_state_dict(self, state: Mapping) -> None:
        self.bytes = defaultdict(int, state["bytes"])
        self.rounds_by_category = defaultdict(int, state["rounds_by_category"])
        self.rounds = int(state["rounds"])
        self.calls = int(state.get("calls", state["rounds"]))  # older checkpoints counted rounds only
        self.ddp_equivalent_bytes = int(state["ddp_equivalent_bytes"])
        self.largest_round_bytes = int(state.get("largest_round_bytes", 0))  # older checkpoints: unknown

    def __repr__(self) -> str:
        cats = ", ".join(f"{k}={v}" for k, v in sorted(self.bytes.items()))
        return f"CommLedger(rounds={self.rounds}, calls={self.calls}, {cats}, ddp_equivalent={self.ddp_equivalent_bytes})"
