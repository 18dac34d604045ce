"""``on_nonfinite``: a rank whose round is not finite does not spread it to the others.

With ``on_nonfinite=None`` a NaN or inf on one rank reaches every rank at the next averaging round, as
with DDP's gradient all-reduce. With ``"raise"`` (the default) or ``"heal"`` every outermost round is
guarded by :class:`NonfiniteGuard`, a :class:`~lightning_desloc.options.SyncOption` called at fixed points
of the step. For a round of ``M`` ranks that carries the tensors ``T`` (every due category):

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

With ``group_size`` the outermost round joins one rank per group (``M`` groups) and every slot stands for a
group: inside a group the ranks are kept equal (the gradients all-reduced every step, or DES-LOC rounds
of the group, which carry everything the outermost round carries right before it), so a NaN on one rank
reaches its whole group there, as in DDP, and the outermost round leaves the whole group out; the warning
names the group and its ranks. With ``shard_within_group`` each rank of a group holds a shard, flags only
its own and corrects by its own outer round's count; the control tensor is then averaged inside the group
too, so every rank reads ``sum_p c_{a,p} / (M g)`` for group ``a`` and decides alike.

Compressed categories (``compression``) are masked in the float32 message before it is encoded (a bad
rank's int8 error feedback becomes ``0 - Q(0) = 0``), and the float32 mean of each coded part is multiplied
by ``M / n`` before it is encoded again (the round's control tensor, an exact bucket, has landed by then):
the factor is applied once, inside the coded round, not to the decoded result.

``"heal"`` with ``state_policy="keep_local"`` (states never averaged): the bad rank zeroes its own tensor
states when the flags are read, and the extra round carries the parameters only. With ``"reset"`` a
parameter round zeroes the states on every rank anyway, so it heals the bad rank by itself.

Before a checkpoint save and consensus validation, :meth:`~lightning_desloc.sync.DeslocSync.check_finite_now`
checks every rank's parameters and states (a rank may have gone non-finite since the last round) in one
round of ``4 M`` bytes: ``"raise"`` raises before anything is written or averaged, ``"heal"`` runs a full
guarded round first.

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

from lightning_desloc.options import Metrics, Round, SyncOption, averaged_state_keys, is_averaged, optimizer_params
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

    def __init__(self, mode: str, state_policy: str = "average", ranks_per_slot: int = 1) -> None:
        if mode not in NONFINITE_MODES:
            raise ValueError(f"on_nonfinite must be None, 'heal' or 'raise', got {mode!r}")
        self.mode = mode
        #: ``"average"``: heal with a full round; ``"keep_local"``: states are never averaged, so a healed
        #: rank zeroes its own; ``"reset"``: every parameter round zeroes the states on every rank anyway
        self.state_policy = state_policy
        #: ranks behind one slot of the outermost round: 1, or with ``group_size`` the ranks of a group
        #: (slot ``a`` is group ``a``; a group's ranks hold the same values when the outermost round starts,
        #: or with ``shard_within_group`` each holds a shard and the slot is their mean after the round)
        self.ranks_per_slot = ranks_per_slot
        self.healed_ranks = 0
        self.pending_full_rounds: set[int] = set()
        self._core: Optional["DeslocSync"] = None
        self._optimizers: list[Optimizer] = []
        self._last: Optional[_GuardedRound] = None
        #: the guarded rounds started and not landed yet, oldest first (more than one with overlap_steps)
        self._started: list[_GuardedRound] = []
        self._keys: dict[int, tuple[str, ...]] = {}
        #: the optimizers whose next guarded round is the one ``adjust`` made a full round (heal)
        self._healing: set[int] = set()

    def attach(self, core: "DeslocSync", optimizers: Sequence[Optimizer]) -> None:
        self._core, self._optimizers = core, list(optimizers)
        self._keys = {}

    def _index(self, optimizer: Optimizer) -> int:
        return next((i for i, opt in enumerate(self._optimizers) if opt is optimizer), 0)

    def _slot(self) -> int:
        """This rank's slot: its rank in the outermost level (the world, or across groups: its group)."""
        if self._core is None:
            return 0
        outer = self._core.levels[-1].comm
        return (outer if outer is not None else self._core.comm).rank

    def _carries_everything(self, plan: SyncPlan, keys: Sequence[str]) -> bool:
        """Whether a round of ``plan`` leaves a left-out rank with nothing non-finite of its own: the
        parameters and every averaged state (``"reset"``: the parameters, the states being zeroed right
        after on every rank; ``"keep_local"``: never, its states are its own)."""
        if not (plan.whole_model and plan.params):
            return False
        if self.state_policy == "reset":
            return plan.reset_states or set(keys) <= set(plan.states)
        return self.state_policy == "average" and set(keys) <= set(plan.states)

    # ------------------------------------------------------------------ on the device, in the step
    def control_slots(self, world: int) -> int:
        return world  # slot m: rank m's flag

    def before_round(self, plan: SyncPlan, optimizer: Optimizer, due: dict[str, list[Tensor]],
                     slots: Tensor) -> Optional[Tensor]:
        index = self._index(optimizer)
        if index not in self._keys:  # the state keys exist from the first step on and do not change
            self._keys[index] = _averaged_keys(optimizer)
        # "keep_local": the healing round carries the parameters only, the left-out rank zeroed its states
        everything = self._carries_everything(plan, self._keys[index]) or (plan.params and index in self._healing)
        self._healing.discard(index)
        # the optimizer step, as Lightning's global_step counts it (the schedule counts from the DDP warm-up's end)
        step = plan.step + (self._core.config.ddp_warmup_steps if self._core is not None else 0)
        self._started.append(_GuardedRound(index, step, tuple(cat for cat, ts in due.items() if ts), everything))
        counts = all_finite([t for ts in due.values() for t in ts], slots.device)
        slots[self._slot()].copy_(counts)  # a device copy of the flag: 1.0 or 0.0, no host read
        return counts

    def correction(self, slots: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """``M / n`` on the device, for a landed round whose ``slots`` hold the mean of the ``M`` flags."""
        world = slots.numel()
        # slot j holds c_j / M: M * slot_j is 0 or 1 up to rounding, so round it before summing
        return _correction_factor(torch.round(slots * world).sum(), world, dtype)

    def round_landed(self, due: dict[str, list[Tensor]], slots: Tensor) -> None:
        # rounds land in the order they started (at once, or overlap_steps later)
        self._last = self._started.pop(0) if self._started else _GuardedRound(0, -1, (), False)
        wire = self._core._wire if self._core is not None else None
        by_dtype: dict[torch.dtype, list[Tensor]] = defaultdict(list)
        for cat, ts in due.items():
            if wire is not None and wire.for_category(cat) is not None:
                continue  # a compressed category was corrected inside its coded round, before re-encoding
            for t in ts:
                by_dtype[t.dtype].append(t)
        with torch.no_grad():
            for dtype, same in by_dtype.items():
                # M / n: exactly 1.0 in a healthy round (x * 1.0 == x), inf with no finite rank (NaN stays)
                torch._foreach_mul_(same, self.correction(slots, dtype))

    def adjust(self, step: int, plan: SyncPlan, optimizer: Optimizer) -> SyncPlan:
        index = self._index(optimizer)
        if index not in self.pending_full_rounds:
            return plan
        self.pending_full_rounds.discard(index)
        self._healing.add(index)
        keys = () if self.state_policy == "keep_local" else (self._keys.get(index) or _averaged_keys(optimizer))
        return SyncPlan(plan.step, True, tuple(sorted(set(keys) | set(plan.states))), plan.reset_states)

    # ------------------------------------------------------------------ on the host, a step later
    def _bad_slots(self, values: list[float]) -> list[int]:
        """The slots whose flag was 0 (with groups: on any rank of the group)."""
        world, per = len(values), self.ranks_per_slot
        return [j for j, v in enumerate(values) if round(v * world * per) < per]

    def _ranks(self, slots: Sequence[int], world: int) -> str:
        """``slots`` as the ranks they stand for: ``rank(s) [1] of 3``, or ``group(s) [1] (ranks [2, 3])``."""
        per = self.ranks_per_slot
        if per == 1:
            return f"rank(s) {list(slots)} of {world}"
        ranks = [r for a in slots for r in range(a * per, (a + 1) * per)]
        return f"group(s) {list(slots)} of {world} (ranks {ranks})"

    def read_control(self, values: list[float]) -> None:
        world = len(values)
        seen, self._last = self._last, None  # each landed round is read once
        bad = self._bad_slots(values)
        if not bad or seen is None:
            return
        good = [j for j in range(world) if j not in bad]
        what = ", ".join(seen.categories) or "nothing"
        found = (f"{self._ranks(bad, world)} sent non-finite values (NaN or inf) in the averaging round after "
                 f"optimizer step {seen.step} (it carried {what}; at least one of them was not finite there)")
        if self.mode == "raise" or not good:
            outcome = ("every rank took the mean of the finite " + self._ranks(good, world) if good else
                       "no rank was finite, so every rank now holds NaN")
            raise FloatingPointError(
                f"on_nonfinite={self.mode!r}: {found}; {outcome}, and every rank stops here, one optimizer step "
                f"later. {_FIX}, or pass on_nonfinite='heal' to average over the finite ranks and go on"
                + (" (it needs at least one finite rank)." if not good else "."))
        self.healed_ranks += len(bad) * self.ranks_per_slot
        if seen.carried_everything:
            then = {"average": "that round carried the parameters and every averaged state: they are healed",
                    "reset": "that round carried the parameters and the states were zeroed on every rank right after "
                             "(state_policy='reset'): they are healed",
                    "keep_local": "that round gave them the parameters, after they had zeroed their own states: they "
                                  "are healed"}[self.state_policy]
        elif self.state_policy == "keep_local":
            self.pending_full_rounds.add(seen.index)
            if self._slot() in bad:
                self._zero_states(seen.index)
            then = ("with state_policy='keep_local' their optimizer states are their own, so they were zeroed, and "
                    "this step averages the parameters once more over the finite ranks")
        else:
            self.pending_full_rounds.add(seen.index)
            then = ("their optimizer states that round did not carry may still be non-finite, so this step "
                    "averages the parameters and every state once more over the finite ranks")
        if self._core is None or self._core.comm.rank == 0:
            _log.warning(f"on_nonfinite='heal': {found}; they were left out and every rank took the mean of the "
                         f"finite {self._ranks(good, world)}; {then}. {_FIX} if it recurs.")

    def found_before(self, what: str, bad: Sequence[int], world: int, step: int) -> None:
        """Ranks ``bad`` (of ``world``) hold non-finite parameters or states as ``what`` begins (a checkpoint
        save, consensus validation: :meth:`~lightning_desloc.sync.DeslocSync.check_finite_now`): raise on
        every rank with ``"raise"`` (or when no rank is finite); with ``"heal"`` the core then runs a full
        guarded round."""
        good = [j for j in range(world) if j not in bad]
        if self.mode == "raise" or not good:
            nothing = ("nothing was saved (the last checkpoint is intact)" if "save" in what else
                       "nothing was averaged")
            raise FloatingPointError(
                f"on_nonfinite={self.mode!r}: rank(s) {list(bad)} of {world} hold non-finite values (NaN or inf) in their "
                f"parameters or optimizer states at optimizer step {step}, as {what} begins; {nothing} and "
                "every rank stops here. "
                + (f"{_FIX}, or pass on_nonfinite='heal' to average over the finite ranks and go on." if good else
                   f"No rank is finite. {_FIX}."))

    def _zero_states(self, index: int) -> None:
        """This rank was left out and keeps its states to itself (``"keep_local"``): start them afresh."""
        if index >= len(self._optimizers):
            return
        optimizer = self._optimizers[index]
        with torch.no_grad():
            for p in optimizer_params(optimizer):
                for key, value in optimizer.state.get(p, {}).items():
                    if is_averaged(key, value, p):
                        value.zero_()

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
