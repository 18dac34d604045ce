"""Which tensors are due for averaging after optimizer step ``s``: a pure object, no processes.

DES-LOC gives the parameters and every optimizer state its own averaging period. Counting completed
optimizer steps ``s = 1, 2, ...``, right after local step ``s``

* the parameters are averaged when ``s % param_sync_every == 0``;
* optimizer state ``k`` (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``, ...) is averaged when
  ``s % state_sync_every[k] == 0``.

Example::

    >>> sched = SyncSchedule(param_sync_every=4)          # paper defaults for the states
    >>> sched.state_sync_every["exp_avg"], sched.state_sync_every["exp_avg_sq"]
    (12, 24)
    >>> sched.due(4)
    SyncPlan(step=4, params=True, states=(), reset_states=False)
    >>> sched.due(24, state_keys=["exp_avg", "exp_avg_sq"])
    SyncPlan(step=24, params=True, states=('exp_avg', 'exp_avg_sq'), reset_states=False)
    >>> sched.due(12, state_keys=["exp_avg", "exp_avg_sq"])
    SyncPlan(step=12, params=True, states=('exp_avg',), reset_states=False)
    >>> sched.due(5).empty
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

#: First-moment (momentum-like) state keys of torch's optimizers; default period ``3 * K_x``.
FIRST_MOMENT_KEYS: tuple[str, ...] = ("exp_avg", "momentum_buffer", "grad_avg")
#: Second-moment (variance/scale) state keys; default period ``6 * K_x``.
SECOND_MOMENT_KEYS: tuple[str, ...] = ("exp_avg_sq", "max_exp_avg_sq", "exp_inf", "square_avg", "acc_delta", "sum")
#: Keys that are never averaged, whatever their shape: counters are equal on every rank by construction.
NEVER_AVERAGED_KEYS: frozenset[str] = frozenset({"step", "mu_product"})

FIRST_MOMENT_FACTOR = 3
SECOND_MOMENT_FACTOR = 6

StateSyncEvery = Union[int, Mapping[str, int], None]
#: How optimizer states are treated: averaged on their periods (DES-LOC, Local Adam), never averaged
#: (``keep_local``, the DiLoCo-style heuristic), or zeroed after every parameter average (``reset``).
StatePolicy = Literal["average", "keep_local", "reset"]
STATE_POLICIES: tuple[str, ...] = ("average", "keep_local", "reset")


def _check_period(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{name} must be a positive integer number of optimizer steps, got {value!r}. "
            f"Pass e.g. {name}=256."
        )
    return value


#: parts of a state key's name that mark a second moment (Adafactor's ``row_var``/``col_var``, ``variance``)
_SECOND_MOMENT_HINTS: tuple[str, ...] = ("sq", "var", "square", "sum", "acc_delta", "exp_inf")


def suggested_period(key: str, param_sync_every: int) -> int:
    """The default rule applied to a key the defaults do not list: ``6 * K_x`` for what its name marks as a
    second moment, else ``3 * K_x``.

    >>> suggested_period("row_var", 8), suggested_period("momentum", 8)
    (48, 24)
    """
    second = key in SECOND_MOMENT_KEYS or any(hint in key for hint in _SECOND_MOMENT_HINTS)
    return (SECOND_MOMENT_FACTOR if second else FIRST_MOMENT_FACTOR) * param_sync_every


def default_state_periods(param_sync_every: int) -> dict[str, int]:
    """The paper's recommendation: first moments every ``3 * K_x`` steps, second moments every ``6 * K_x``."""
    periods = {key: FIRST_MOMENT_FACTOR * param_sync_every for key in FIRST_MOMENT_KEYS}
    periods.update({key: SECOND_MOMENT_FACTOR * param_sync_every for key in SECOND_MOMENT_KEYS})
    return periods


@dataclass(frozen=True)
class SyncPlan:
    """What is averaged right after optimizer step ``step``: the parameters and/or these state keys."""

    step: int
    params: bool
    states: tuple[str, ...] = ()
    reset_states: bool = False
    #: with ``fragments=F``: per due fragment ``(fragment, its parameters due, its state keys due)``;
    #: ``params`` and ``states`` are then their union. Empty: the plan is about the whole model.
    parts: tuple[tuple[int, bool, tuple[str, ...]], ...] = field(default=(), repr=False)

    @property
    def empty(self) -> bool:
        return not self.params and not self.states and not self.reset_states

    @property
    def whole_model(self) -> bool:
        """Whether what the plan averages covers every parameter (not one fragment of them)."""
        return not self.parts


@dataclass(frozen=True)
class SyncSchedule:
    """Averaging periods, in optimizer steps, for the parameters and for each optimizer state key.

    Args:
        param_sync_every: ``K_x``, steps between parameter averages.
        state_sync_every: ``None`` for the paper's defaults (first moments every ``3 * K_x``, second
            moments every ``6 * K_x``); an ``int`` to use one period for every state (``K_x`` gives
            Local Adam); or a ``{key: period}`` dict whose entries override the defaults.
        state_policy: ``"average"`` (the above), or one of the baselines DES-LOC is compared with:
            ``"keep_local"`` (states are never averaged) and ``"reset"`` (tensor states are zeroed right
            after every parameter average). The baselines take no ``state_sync_every``.
    """

    param_sync_every: int = 256
    state_sync_every: Mapping[str, int] = field(default_factory=dict)
    state_policy: StatePolicy = "average"

    def __init__(
        self, param_sync_every: int = 256, state_sync_every: StateSyncEvery = None, state_policy: StatePolicy = "average"
    ) -> None:
        k_x = _check_period("param_sync_every", param_sync_every)
        if state_policy not in STATE_POLICIES:
            raise ValueError(f"state_policy must be one of {STATE_POLICIES}, got {state_policy!r}")
        if state_policy != "average" and state_sync_every is not None:
            raise ValueError(
                f"state_policy={state_policy!r} never averages optimizer states, so state_sync_every must be None "
                f"(got {state_sync_every!r}). Use state_policy='average' to average states on periods."
            )
        object.__setattr__(self, "state_policy", state_policy)
        periods = default_state_periods(k_x)
        if isinstance(state_sync_every, Mapping):
            for key, period in state_sync_every.items():
                if key in NEVER_AVERAGED_KEYS:
                    raise ValueError(f"state_sync_every[{key!r}]: {key!r} is a counter and is never averaged; remove it.")
                periods[str(key)] = _check_period(f"state_sync_every[{key!r}]", period)
        elif state_sync_every is not None:
            one = _check_period("state_sync_every", state_sync_every)
            periods = {key: one for key in periods}
            # an int means "this period for every state", including keys we have no default for
            object.__setattr__(self, "_uniform_state_period", one)
        object.__setattr__(self, "param_sync_every", k_x)
        object.__setattr__(self, "state_sync_every", dict(sorted(periods.items())))

    @property
    def uniform_state_period(self) -> Optional[int]:
        """The single period given for all states as an int, or ``None`` when periods are per key."""
        return getattr(self, "_uniform_state_period", None)

    def period_of(self, key: str) -> Optional[int]:
        """Period of state ``key`` in optimizer steps, or ``None`` when the schedule has none for it."""
        if self.state_policy != "average":
            return None
        if key in self.state_sync_every:
            return self.state_sync_every[key]
        return self.uniform_state_period

    def check_keys(self, keys: Iterable[str]) -> None:
        """Raise a ``ValueError`` naming every averaged state key that has no period."""
        if self.state_policy != "average":
            return
        missing = sorted({k for k in keys if self.period_of(k) is None})
        if missing:
            example = ", ".join(f"{k!r}: {suggested_period(k, self.param_sync_every)}" for k in missing)
            raise ValueError(
                f"The optimizer keeps per-parameter state {missing} but DES-LOC has no averaging period for it. "
                f"Set one with DeslocStrategy(state_sync_every={{{example}}}) (the default rule: 3 * K_x for "
                f"first moments, 6 * K_x for second moments such as variances) "
                f"or give a single int period for every state."
            )

    def due(self, step: int, state_keys: Optional[Iterable[str]] = None) -> SyncPlan:
        """What is averaged right after completed optimizer step ``step`` (1-based).

        ``state_keys`` restricts the states to those an optimizer actually holds; by default every key
        with a period is considered.
        """
        if step < 1:
            raise ValueError(f"optimizer steps are counted from 1, got {step}")
        keys = self.state_sync_every.keys() if state_keys is None else state_keys
        states = tuple(sorted(k for k in set(keys) if (p := self.period_of(k)) is not None and step % p == 0))
        params = step % self.param_sync_every == 0
        return SyncPlan(step=step, params=params, states=states, reset_states=params and self.state_policy == "reset")

    def count(self, steps: int, state_keys: Iterable[str]) -> dict[str, int]:
        """How many times each of params and ``state_keys`` is averaged in steps ``1..steps``."""
        counts = {"params": steps // self.param_sync_every}
        for key in state_keys:
            period = self.period_of(key)
            counts[key] = 0 if period is None else steps // period
        return counts


@dataclass(frozen=True, init=False)
class FragmentedSchedule(SyncSchedule):
    """``fragments=F``: the parameters in ``F`` fragments, each averaged on the period ``K_x`` at its own
    offset, so that each round carries about ``1/F`` of the model (streaming DiLoCo's idea).

    Fragment ``f`` (``0 <= f < F``, offset ``o_f = f * K_x / F``) has its parameters averaged right after
    the steps ``s`` with ``(s - o_f) % K_x == 0`` and its state ``k`` when ``(s - o_f) % K_k == 0``;
    ``F`` must divide ``K_x``. Total bytes per ``K_x`` steps are those of the whole model, as without
    fragments. Which parameters form fragment ``f``: see :func:`fragment_of`.

    >>> sched = FragmentedSchedule(4, {"exp_avg": 8}, fragments=2)   # offsets 0 and 2
    >>> [(s, sched.due(s, ["exp_avg"]).parts) for s in range(1, 11) if sched.due(s, ["exp_avg"]).parts]
    [(2, ((1, True, ('exp_avg',)),)), (4, ((0, True, ()),)), (6, ((1, True, ()),)), (8, ((0, True, ('exp_avg',)),)), (10, ((1, True, ('exp_avg',)),))]
    """

    fragments: int = 1

    def __init__(self, param_sync_every: int = 256, state_sync_every: StateSyncEvery = None,
                 state_policy: StatePolicy = "average", *, fragments: int = 1) -> None:
        super().__init__(param_sync_every, state_sync_every, state_policy)
        if isinstance(fragments, bool) or not isinstance(fragments, int) or fragments < 1:
            raise ValueError(f"fragments must be a positive number of parameter fragments, got {fragments!r}")
        if self.param_sync_every % fragments:
            raise ValueError(f"fragments={fragments} must divide param_sync_every={self.param_sync_every}, so that "
                             "the fragments' rounds are evenly spaced; e.g. fragments=4 with param_sync_every=256")
        if state_policy == "reset":
            raise ValueError("fragments cannot be combined with state_policy='reset' (it resets every state at a "
                             "whole-model average); use state_policy='average' or fragments=1")
        object.__setattr__(self, "fragments", fragments)

    def due(self, step: int, state_keys: Optional[Iterable[str]] = None) -> SyncPlan:
        if step < 1:
            raise ValueError(f"optimizer steps are counted from 1, got {step}")
        keys = sorted(set(self.state_sync_every.keys() if state_keys is None else state_keys))
        spacing = self.param_sync_every // self.fragments
        parts = []
        for f in range(self.fragments):
            local = step - f * spacing  # >= 0 is when fragment f's rounds begin
            if local < 0:
                continue
            params = local % self.param_sync_every == 0
            states = tuple(k for k in keys if (p := self.period_of(k)) is not None and local % p == 0)
            if params or states:
                parts.append((f, params, states))
        return SyncPlan(step=step, params=any(p for _, p, _ in parts),
                        states=tuple(sorted({k for _, _, ks in parts for k in ks})), parts=tuple(parts))


def fragment_of(sizes: Sequence[int], fragments: int) -> list[int]:
    """Which fragment each parameter belongs to, in module order, balanced by size: parameter ``i`` goes to
    ``floor(F * (its first element + half its size) / total)`` (where its middle element falls), so a
    fragment is a run of consecutive parameters of about ``1/F`` of the elements.

    >>> fragment_of([35, 7, 21, 3], 2)
    [0, 1, 1, 1]
    >>> fragment_of([10, 10, 10, 10], 4)
    [0, 1, 2, 3]
    """
    total = sum(sizes)
    out, start = [], 0
    for n in sizes:
        out.append(min(fragments - 1, (fragments * (2 * start + n)) // (2 * total)) if total else 0)
        start += n
    return out
