"""``on_nonfinite``: a rank whose round is not finite does not spread it to the others.

Without it (``on_nonfinite=None``, the default) a NaN or inf on one rank reaches every rank at the
next averaging round, as with DDP's gradient all-reduce. With it, every outermost round is guarded by
:class:`NonfiniteGuard`, a :class:`~lightning_desloc.options.SyncOption` called at fixed points of the
step. For a round of ``M`` ranks that carries the tensors ``T`` (every due category):

1. before the round, each rank ``m`` computes on the device, without reading it on the host, one flag
   ``c_m = all(isfinite(t).all() for t in T)`` (one read of each tensor: its minimum and maximum, which
   are NaN or infinite exactly when the tensor holds a NaN or an inf, :func:`all_finite`), and writes
   ``c_m`` into its own slot ``m`` of ``M`` extra floats of the round's control tensor;
2. while packing the round's flat buckets, a rank with ``c_m = 0`` packs zeros instead of its values
   (``masked_fill``, not a product with the flag: ``NaN * 0`` is NaN); the control tensor is not masked;
3. the round runs as always: every rank gets ``sum_m c_m t_m / M`` and, in slot ``j`` of the control
   tensor, ``c_j / M``; so ``n = sum_j round(M * slot_j)`` is the number of finite ranks, on the device;
4. when the round has landed, every averaged tensor is multiplied by ``M / n`` (a 0-dim device tensor):
   ``t = sum_m c_m t_m / n``, the mean of the finite ranks. With ``n = M`` the factor is exactly ``1.0``
   and ``x * 1.0 == x`` for every float, so a healthy round is bit for bit the unguarded one, as long as
   the collective adds each element's ``M`` values in the same order: the control tensor is ``M`` floats
   longer, and when it shares a float32 bucket with the data a ring all-reduce of 3 or more ranks may cut
   that bucket into other chunks (2 ranks: ``a + b`` in any order; other dtypes: another bucket).
   Multiplying after the round (rather than dividing by ``n`` in place of ``M`` inside it) keeps the
   collectives unchanged: ``n`` travels in the round itself, so it is known only once the round is done;
5. one optimizer step later, where the core reads the round's signals (the device has long finished the
   round), the host reads the slots. Every rank reads the same values, so every rank decides alike:
   ``"raise"`` raises :class:`FloatingPointError` on every rank at the same step (no rank is left waiting
   in a collective); ``"heal"`` logs a warning on rank 0 naming the ranks and the step and, unless that
   round already carried the parameters and every averaged state key, makes the next round of that
   optimizer (at this very step) a full one: parameters and every averaged state key, itself guarded, so
   that the bad rank's states the first round did not carry are replaced by the finite ranks' mean too.
   With no finite rank (``n = 0``) the round leaves NaN everywhere, as without the guard, and both modes
   raise.

With ``overlap_steps=tau`` (:class:`~lightning_desloc.overlap.OverlappedRounds`) the round started after
step ``s`` lands after step ``s + tau``. Steps 1-3 happen when it starts (the flag is over the snapshot
``T_s``; a bad rank's snapshot and contribution are zeros). At landing, step 4 rescales the landed means
``mean_m(c_m t_m)`` by ``M / n`` first, so they are the finite ranks' mean ``g``; then the delayed rule
applies with ``g``: a rank with ``c_m = 1`` takes ``x <- g(x_s) + (x_{s+tau} - x_s)`` and
``k <- d * g(k_s) + (k_{s+tau} - d * k_s)`` as without the guard, a rank with ``c_m = 0`` takes
``x <- g(x_s)`` and ``k <- d * g(k_s)`` (its own progress since ``s`` is not finite; ``torch.where`` on its
0-dim device flag kept from the start, no host read). Step 5 happens where the signals are read after the
landing: at step ``s + tau + 1``, or at ``s + tau`` itself when a round starts there; "heal"'s full round
is then the round of step ``s + tau + 1``, overlapped like any other (it lands after step
``s + 2 tau + 1``, by the same rules). A healthy overlapped round is bit for bit the unguarded one (the
control tensor is a bucket of its own there).

Costs per guarded round: a read pass over the due tensors (the finiteness check), a masked fill of each
packed bucket (in place, no extra buffer), a multiply pass over the due tensors (the correction), and
``4 M`` control bytes (float32 slots) besides the ``4 * len(SIGNALS)`` the round always carries.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_desloc.options import Metrics, Round, SyncOption, averaged_state_keys
from lightning_desloc.schedule import SyncPlan

if TYPE_CHECKING:
    from lightning_desloc.sync import DeslocSync

__all__ = ["NONFINITE_MODES", "NonfiniteGuard", "OnNonfinite", "all_finite"]

OnNonfinite = Optional[Literal["heal", "raise"]]
#: the values of ``on_nonfinite`` that turn the guard on (``None``: off)
NONFINITE_MODES: tuple[str, ...] = ("heal", "raise")

_log = logging.getLogger(__name__)

_FIX = ("Lower the learning rate, clip the gradients (Trainer(gradient_clip_val=1.0), or "
        "clip_gradients in manual optimization)")


def all_finite(tensors: Sequence[Tensor], device: torch.device) -> Tensor:
    """A 0-dim bool tensor on ``device``: whether every element of every tensor is finite. Never read on
    the host here. One read of each tensor: its minimum and maximum (``torch.aminmax``, which propagates
    NaN) are finite exactly when the tensor is (nothing is summed or squared, so a large finite value
    never looks infinite); then one ``isfinite`` over the two values per tensor, per dtype. Empty
    tensors are skipped (they have no minimum). Measured on one CPU thread, ``aminmax`` reads at about
    the speed of a copy, where ``isfinite(t).all()`` and ``_foreach_norm(t, inf)`` were 5-7x slower."""
    by_kind: dict[tuple[torch.dtype, torch.device], list[Tensor]] = defaultdict(list)
    for t in tensors:
        if t.numel():
            by_kind[(t.dtype, t.device)].append(t.detach())
    if not by_kind:
        return torch.ones((), dtype=torch.bool, device=device)
    with torch.no_grad():
        flags = [torch.isfinite(torch.stack([v for t in same for v in torch.aminmax(t)])).all().to(device)
                 for same in by_kind.values()]
    return flags[0] if len(flags) == 1 else torch.stack(flags).all()


def _correction_factor(n_counted: Tensor, world: int, dtype: torch.dtype) -> Tensor:
    """``world / n_counted`` as a 0-dim tensor to multiply tensors of ``dtype`` by: float64 for float64
    tensors (so that the mean of e.g. 2 of 3 ranks is not rounded to float32 first), else float32 (a
    bfloat16/float16 tensor is then rounded once). ``n_counted == world`` gives exactly ``1.0``."""
    exact = torch.float64 if dtype == torch.float64 else torch.float32
    total = torch.full((), float(world), dtype=exact, device=n_counted.device)
    return torch.div(total, n_counted.to(exact))


def _averaged_keys(optimizer: Optimizer) -> tuple[str, ...]:
    """The optimizer's averaged state keys, sorted."""
    return tuple(sorted(averaged_state_keys(optimizer)))


@dataclass(frozen=True)
class _GuardedRound:
    """What the host needs to know about a guarded round when it reads the round's flags a step later."""

    #: the optimizer's position among the attached ones
    index: int
    #: the optimizer step the round followed
    step: int
    #: its ledger categories, in round order
    categories: tuple[str, ...]
    #: whether it carried the parameters and every averaged state key of the whole model
    carried_everything: bool


class NonfiniteGuard(SyncOption):
    """``on_nonfinite="heal"`` or ``"raise"`` (the module docstring has the equations).

    Attributes:
        mode: ``"heal"`` or ``"raise"``.
        healed_ranks: how many times a rank was left out of a round (a rank left out of two rounds counts
            twice); logged as ``comm/healed_ranks``.
        pending_full_rounds: the optimizers whose next round is a full one (heal).
    """

    name = "nonfinite"
    shared = True

    def __init__(self, mode: str) -> None:
        if mode not in NONFINITE_MODES:
            raise ValueError(f"on_nonfinite must be None, 'heal' or 'raise', got {mode!r}")
        self.mode = mode
        self.healed_ranks = 0
        self.pending_full_rounds: set[int] = set()
        self._core: Optional["DeslocSync"] = None
        self._optimizers: list[Optimizer] = []
        self._last: Optional[_GuardedRound] = None
        #: the guarded rounds started and not landed yet, oldest first (more than one with overlap_steps)
        self._started: list[_GuardedRound] = []
        self._keys: dict[int, tuple[str, ...]] = {}

    def attach(self, core: "DeslocSync", optimizers: Sequence[Optimizer]) -> None:
        self._core, self._optimizers = core, list(optimizers)
        self._keys = {}

    def _index(self, optimizer: Optimizer) -> int:
        return next((i for i, opt in enumerate(self._optimizers) if opt is optimizer), 0)

    # ------------------------------------------------------------------ on the device, in the step
    def control_slots(self, world: int) -> int:
        return world  # slot m: rank m's flag

    def before_round(self, plan: SyncPlan, optimizer: Optimizer, due: dict[str, list[Tensor]],
                     slots: Tensor) -> Optional[Tensor]:
        index = self._index(optimizer)
        if index not in self._keys:  # the state keys exist from the first step on and do not change
            self._keys[index] = _averaged_keys(optimizer)
        everything = plan.whole_model and plan.params and set(self._keys[index]) <= set(plan.states)
        self._started.append(_GuardedRound(index, plan.step, tuple(cat for cat, ts in due.items() if ts), everything))
        counts = all_finite([t for ts in due.values() for t in ts], slots.device)
        rank = self._core.comm.rank if self._core is not None else 0
        slots[rank].copy_(counts)  # a device copy of the flag: 1.0 or 0.0, no host read
        return counts

    def round_landed(self, due: dict[str, list[Tensor]], slots: Tensor) -> None:
        # rounds land in the order they started (at once, or overlap_steps later)
        self._last = self._started.pop(0) if self._started else _GuardedRound(0, -1, (), False)
        world = slots.numel()
        # slot j holds c_j / M: M * slot_j is 0 or 1 up to rounding, so round it before summing
        n_counted = torch.round(slots * world).sum()
        by_dtype: dict[torch.dtype, list[Tensor]] = defaultdict(list)
        for ts in due.values():
            for t in ts:
                by_dtype[t.dtype].append(t)
        with torch.no_grad():
            for dtype, same in by_dtype.items():
                # M / n: exactly 1.0 in a healthy round (x * 1.0 == x), inf with no finite rank (NaN stays)
                torch._foreach_mul_(same, _correction_factor(n_counted, world, dtype))

    def adjust(self, step: int, plan: SyncPlan, optimizer: Optimizer) -> SyncPlan:
        index = self._index(optimizer)
        if index not in self.pending_full_rounds:
            return plan
        self.pending_full_rounds.discard(index)
        keys = self._keys.get(index) or _averaged_keys(optimizer)
        return SyncPlan(plan.step, True, tuple(sorted(set(keys) | set(plan.states))), plan.reset_states)

    # ------------------------------------------------------------------ on the host, a step later
    def read_control(self, values: list[float]) -> None:
        world = len(values)
        bad = [j for j, v in enumerate(values) if round(v * world) < 1]
        if not bad or self._last is None:
            return
        good = [j for j in range(world) if j not in bad]
        seen = self._last
        what = ", ".join(seen.categories) or "nothing"
        found = (f"rank(s) {bad} of {world} sent non-finite values (NaN or inf) in the averaging round after "
                 f"optimizer step {seen.step} (it carried {what}; at least one of them was not finite there)")
        if self.mode == "raise" or not good:
            outcome = ("every rank took the mean of the finite rank(s) " + str(good) if good else
                       "no rank was finite, so every rank now holds NaN")
            raise FloatingPointError(
                f"on_nonfinite={self.mode!r}: {found}; {outcome}, and every rank stops here, one optimizer step "
                f"later. {_FIX}, or pass on_nonfinite='heal' to average over the finite ranks and go on"
                + (" (it needs at least one finite rank)." if not good else "."))
        self.healed_ranks += len(bad)
        if not seen.carried_everything:
            self.pending_full_rounds.add(seen.index)
            then = ("their optimizer states that round did not carry may still be non-finite, so this step "
                    "averages the parameters and every state once more over the finite ranks")
        else:
            then = "that round carried the parameters and every averaged state: they are healed"
        if self._core is None or self._core.comm.rank == 0:
            _log.warning(f"on_nonfinite='heal': {found}; they were left out and every rank took the mean of the "
                         f"finite rank(s) {good}; {then}. {_FIX} if it recurs.")

    def after_round(self, rnd: Round) -> Optional[Metrics]:
        return {"comm/healed_ranks": float(self.healed_ranks)}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"healed_ranks": self.healed_ranks, "pending_full_rounds": sorted(self.pending_full_rounds),
                "in_flight": [[r.index, r.step, list(r.categories), r.carried_everything] for r in self._started]}

    def load_state_dict(self, state: Optional[dict[str, Any]], device: Optional[torch.device] = None) -> None:
        state = state or {}
        self.healed_ranks = int(state.get("healed_ranks", 0))
        self.pending_full_rounds = {int(i) for i in state.get("pending_full_rounds", [])}
        self._started = [_GuardedRound(int(i), int(step), tuple(cats), bool(every))
                         for i, step, cats, every in state.get("in_flight", [])]
