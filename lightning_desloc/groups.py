"""Hierarchical synchronisation: a fast level inside groups of ranks, DES-LOC across groups.

With ``group_size = g`` the world of ``M`` ranks is cut into ``G = M / g`` groups of consecutive ranks
(typically one group per node, ``g`` = devices per node, where links are fast). Across groups
DES-LOC's schedule (``param_sync_every``, ``state_sync_every``) runs between the ranks that have the
same position in their group (rank ``i``, ``i + g``, ``i + 2g``, ...), so each slow link carries one
group's share. What happens inside a group is chosen by ``group_param_sync_every``:

* ``1`` (default): the gradients are all-reduced inside the group every step, as DDP does, so all
  ranks of a group hold the same parameters and optimizer states at all times;
* ``k_in > 1``: no gradient is all-reduced. The ranks of a group run DES-LOC among themselves with
  their own schedule, the *inner level*: parameters averaged within the group when
  ``s % k_in == 0``, state ``k`` when ``s % group_state_sync_every[k] == 0`` (``None``: the same
  per-key defaults as the outer level, derived from ``k_in``: first moments ``3 k_in``, second
  moments ``6 k_in``). The outer level keeps its own periods and timing.

**The math of the two levels.** Write ``x[a, i]`` for the copy of a tensor (parameters or one
optimizer state) on the rank at position ``i`` of group ``a``, ``a = 0..G-1``, ``i = 0..g-1``. The
inner average replaces ``x[a, i]`` by the group mean ``m[a] = (1/g) sum_j x[a, j]``; the outer
average replaces ``x[a, i]`` by the mean over its position, ``(1/G) sum_b x[b, i]``. On its own the
outer average is the mean of position ``i`` only, and positions would disagree. But right after an
inner average every ``x[b, i] = m[b]``, so the outer average gives

    (1/G) sum_b m[b] = (1/(G g)) sum_{b, j} x[b, j],

the world mean, the same on every rank. Hence, right after completed step ``s``, for each category
(the parameters, with the floating buffers, or one state key):

1. *inner round* (one coalesced all-reduce inside the group): every category due at the inner level
   **or** at the outer level;
2. *outer round* (one coalesced all-reduce across groups): every category due at the outer level,
   now the world mean.

With ``k_in = 1`` step 1 is implicit: the per-step gradient all-reduce keeps each group equal, so the
outer round alone already gives the world mean. Scalar state (``step``) is never averaged. The inner
rounds are exact and plain; compression and the outer optimizer (``outer_lr``) act on the outer round.

The groups themselves are made by :meth:`Comm.split <lightning_desloc.comm.Comm.split>` (ranks by
:func:`~lightning_desloc.comm.group_ranks`), and the core holds the two levels as data
(:attr:`DeslocSync.levels <lightning_desloc.sync.DeslocSync.levels>`); this module says what the inner
level's schedule is and what its round carries.

Example: 4 ranks, ``g = 2``::

    inner groups (gradients every step, or DES-LOC with k_in):  {0, 1}  {2, 3}
    outer groups (DES-LOC on param_sync_every/state_sync_every): {0, 2}  {1, 3}

and with ``k_in = 2, K_x = 3`` the parameters are averaged within the groups after steps 2, 4, 8,
10, ..., within and then across groups after steps 3, 6, 9, ... (step 6 is due at both levels and
still takes one inner and one outer round).

    >>> within_group_plan(SyncPlan(3, params=True), SyncPlan(3, params=False, states=("exp_avg",)))
    SyncPlan(step=3, params=True, states=('exp_avg',), reset_states=False)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Optional

from lightning_desloc.schedule import StatePolicy, StateSyncEvery, SyncPlan, SyncSchedule

#: ``group_param_sync_every`` of plain hierarchical mode: gradients all-reduced inside the group every step
GRADIENTS_EVERY_STEP = 1


def make_group_schedule(
    group_size: Optional[int],
    group_param_sync_every: int = GRADIENTS_EVERY_STEP,
    group_state_sync_every: StateSyncEvery = None,
    state_policy: StatePolicy = "average",
    auto: bool = False,
    max_drift: Optional[float] = None,
) -> Optional[SyncSchedule]:
    """The schedule of the inner level, or ``None`` when there is none (no groups, or gradients all-reduced
    every step). Raises ``ValueError`` naming the fix for settings that cannot work together.

    >>> inner = make_group_schedule(group_size=4, group_param_sync_every=2)   # default state periods from k_in
    >>> inner.param_sync_every, inner.state_sync_every["exp_avg"], inner.state_sync_every["exp_avg_sq"]
    (2, 6, 12)
    >>> make_group_schedule(4, 2, {"exp_avg_sq": 8}).state_sync_every["exp_avg_sq"]
    8
    >>> make_group_schedule(4) is None and make_group_schedule(None) is None
    True
    """
    k_in = group_param_sync_every
    if isinstance(k_in, bool) or not isinstance(k_in, int) or k_in < 1:
        raise ValueError(
            f"group_param_sync_every must be a positive integer number of optimizer steps, got {k_in!r}. "
            "Use 1 (the default) to all-reduce gradients inside each group every step, or e.g. 8 to average "
            "parameters inside each group every 8 steps."
        )
    if group_size is None:
        if k_in != GRADIENTS_EVERY_STEP or group_state_sync_every is not None:
            raise ValueError(
                "group_param_sync_every and group_state_sync_every set the periods inside hierarchical groups, "
                "but group_size is None (no groups). Set group_size (e.g. the devices per node), or leave "
                "group_param_sync_every=1 and group_state_sync_every=None."
            )
        return None
    if k_in == GRADIENTS_EVERY_STEP:
        if group_state_sync_every is not None:
            raise ValueError(
                f"group_state_sync_every={group_state_sync_every!r} needs group_param_sync_every > 1: with "
                "group_param_sync_every=1 the gradients are all-reduced inside each group every step and the "
                "optimizer states of a group are always equal. Set group_param_sync_every to a period > 1, or "
                "group_state_sync_every=None."
            )
        return None
    unsupported = []
    if state_policy != "average":
        unsupported.append(f"state_policy={state_policy!r} (use state_policy='average')")
    if auto:
        unsupported.append("param_sync_every='auto' (give param_sync_every as an int)")
    if max_drift is not None:
        unsupported.append("max_drift (use max_drift=None)")
    if unsupported:
        raise ValueError(
            f"group_param_sync_every={k_in} (DES-LOC inside the groups) does not support "
            f"{'; '.join(unsupported)}. Otherwise set group_param_sync_every=1 to all-reduce gradients inside "
            "the groups every step."
        )
    try:
        return SyncSchedule(k_in, group_state_sync_every)
    except ValueError as err:  # the schedule names its own arguments; say which ones the user passed
        raise ValueError(_inner_names(str(err))) from None


def _inner_names(message: str) -> str:
    """``state_sync_every`` -> ``group_state_sync_every`` (and the same for params) in an error message."""
    return re.sub(r"(?<![\w.])(param_sync_every|state_sync_every)", r"group_\1", message)


def check_group_keys(schedule: SyncSchedule, keys: Sequence[str]) -> None:
    """:meth:`SyncSchedule.check_keys` for the inner level: the error names ``group_state_sync_every``."""
    try:
        schedule.check_keys(keys)
    except ValueError as err:
        raise ValueError(_inner_names(str(err))) from None


def within_group_plan(outer: SyncPlan, inner: Optional[SyncPlan]) -> SyncPlan:
    """What the inner round averages after a step: what the inner level has due (``inner``) and, so that
    the outer round then gives the world mean, everything the outer level has due (``outer``)."""
    states = set(outer.states) | set(inner.states if inner is not None else ())
    return SyncPlan(outer.step, params=outer.params or (inner is not None and inner.params), states=tuple(sorted(states)))
