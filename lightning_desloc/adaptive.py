"""Adaptive periods: choose K_x from the measured link and step cost, the state periods from the
optimizer's decay rates, and optionally average early when the ranks drift apart.

**The policy.** Let ``t_round`` be the measured time of one parameter average (seconds) and
``t_step`` the measured time of one local optimizer step. Averaging every ``K_x`` steps spends a
fraction ``t_round / (K_x * t_step)`` of the time communicating; the policy takes the smallest power
of two that keeps that fraction under ``comm_budget``, within ``[min_period, max_period]``::

    K_x = clip(2 ** ceil(log2(t_round / (comm_budget * t_step))), min_period, max_period)

The time budget alone says nothing about quality: on a slow link it asks for periods so long that the
ranks' models drift too far apart for their average to be good (on the GPT example at batch 1 it chose
K_x = 256 for a 1200-step run and the averaged model's loss spiked). So when the run's length ``T``
(optimizer steps) is known, ``max_period`` is lowered to keep at least ``min_param_syncs`` parameter
averages in the run::

    max_period = min(max_period, max(min_period, 2 ** floor(log2(T / min_param_syncs))))

A moment with decay ``beta`` has a half-life ``tau(beta) = ln(0.5) / ln(beta)`` steps and changes
little within it, so averaging it more often buys little. Each state therefore gets the paper's
multiple of ``K_x`` or its half-life, whichever is longer, rounded up to a multiple of ``K_x`` so that
its averages ride along with a parameter average::

    K_k = K_x * ceil(max(m_k * K_x, tau(beta_k)) / K_x)     m = 3 for first, 6 for second moments

**Drift trigger.** Every ``check_every`` steps each rank measures how far it moved since the last
consensus (the core's snapshot), ``d_i = ||x_i - xbar_last|| / ||xbar_last||``, and the ranks all-reduce the maximum (one
float, ledger category ``control``). When it exceeds ``max_drift`` the parameters are averaged right
away (an extra round, counted as ``params``), without changing the schedule.

Example::

    >>> round(half_life(0.999), 1)
    692.8
    >>> choose_periods(step_time_s=0.1, round_time_s=2.0, betas={"exp_avg": 0.9, "exp_avg_sq": 0.999})
    (512, {'exp_avg': 1536, 'exp_avg_sq': 3072})
    >>> choose_periods(step_time_s=0.1, round_time_s=0.1, betas={"exp_avg": 0.9, "exp_avg_sq": 0.999})
    (32, {'exp_avg': 96, 'exp_avg_sq': 704})
    >>> period_cap(total_steps=1200, min_param_syncs=32)   # 1200 / 32 = 37.5 -> 32
    32
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor
from torch.optim import Optimizer

from lightning_desloc.comm import Comm
from lightning_desloc.config import AutoConfig, DriftConfig
from lightning_desloc.options import Metrics, Round, SyncOption
from lightning_desloc.schedule import FIRST_MOMENT_FACTOR, SECOND_MOMENT_FACTOR, SECOND_MOMENT_KEYS, SyncPlan, SyncSchedule
from lightning_desloc.snapshot import ConsensusSnapshot


def half_life(beta: float) -> float:
    """Steps after which a moment with decay ``beta`` keeps half the weight of a gradient."""
    if not 0 < beta < 1:
        return 0.0
    return math.log(0.5) / math.log(beta)


def optimizer_betas(optimizer: Optimizer, keys: Sequence[str]) -> dict[str, float]:
    """The decay rate behind each state key, read from the optimizer's hyper-parameters."""
    group = optimizer.param_groups[0]
    betas: dict[str, float] = {}
    for key in keys:
        if "betas" in group and key in ("exp_avg",):
            betas[key] = float(group["betas"][0])
        elif "betas" in group and key in SECOND_MOMENT_KEYS:
            betas[key] = float(group["betas"][1])
        elif key == "momentum_buffer":
            betas[key] = float(group.get("momentum", 0.0))
        elif key == "square_avg":
            betas[key] = float(group.get("alpha", 0.0))
        else:
            betas[key] = 0.0  # unknown decay: the multiple of K_x alone decides
    return betas


def choose_periods(
    step_time_s: float,
    round_time_s: float,
    betas: Mapping[str, float],
    comm_budget: float = 0.05,
    min_period: int = 8,
    max_period: int = 1024,
) -> tuple[int, dict[str, int]]:
    """``(K_x, {key: K_k})`` by the policy in the module docstring."""
    ideal = round_time_s / max(comm_budget * step_time_s, 1e-12)
    k_x = 2 ** max(0, math.ceil(math.log2(max(ideal, 1.0))))
    k_x = int(min(max(k_x, min_period), max_period))
    periods = {}
    for key, beta in betas.items():
        multiple = SECOND_MOMENT_FACTOR if key in SECOND_MOMENT_KEYS else FIRST_MOMENT_FACTOR
        periods[key] = k_x * math.ceil(max(multiple * k_x, half_life(beta)) / k_x)
    return k_x, periods


def period_cap(total_steps: Optional[float], min_param_syncs: int, min_period: int = 8,
               max_period: int = 1024) -> int:
    """The longest ``K_x`` (a power of two, steps) that leaves ``min_param_syncs`` averages in a run of
    ``total_steps`` optimizer steps; ``max_period`` when the length is unknown (``None`` or infinite)."""
    if total_steps is None or not math.isfinite(total_steps) or total_steps <= 0:
        return max_period
    fit = 2 ** math.floor(math.log2(max(total_steps / min_param_syncs, 1.0)))
    return int(min(max_period, max(min_period, fit)))


class DriftTrigger(SyncOption):
    """``max_drift``: an early parameter average when this rank's distance from the last consensus (the
    core's snapshot), max over ranks, exceeds ``max_drift``; checked every ``check_every`` steps."""

    name = "drift"
    needs_snapshot = True

    def __init__(self, config: DriftConfig, snapshot: ConsensusSnapshot, level: Any = None) -> None:
        self.max_drift, self.check_every = config.max_drift, config.check_every
        self.snapshot = snapshot
        #: the level whose ranks compare their drift (the outermost; its ``comm`` is set up with the groups)
        self.level = level
        self.last_drift = 0.0
        #: parameter averages the trigger added to the schedule
        self.early_syncs = 0

    def attach(self, core: Any, optimizers: Sequence[Optimizer]) -> None:
        if len(optimizers) > 1:
            raise ValueError("max_drift supports one optimizer; set max_drift=None for several optimizers")

    def adjust(self, step: int, plan: SyncPlan, optimizer: Optimizer) -> SyncPlan:
        if plan.params or not self.exceeded(step, [p for g in optimizer.param_groups for p in g["params"]]):
            return plan
        self.early_syncs += 1
        return SyncPlan(step, True, plan.states, plan.reset_states)

    @torch.no_grad()
    def exceeded(self, step: int, params: Sequence[Tensor]) -> bool:
        """On check steps: all-reduce the max relative drift (one float, ``control``); above ``max_drift``?"""
        anchor = self.snapshot.flat
        if anchor is None or step % self.check_every:
            return False
        x = torch.cat([p.detach().reshape(-1).to(anchor.dtype) for p in params])
        drift = ((x - anchor).norm() / anchor.norm().clamp(min=1e-12)).reshape(1).float()
        comm = self.level.comm if self.level is not None else Comm()
        self.last_drift = float(comm.all_reduce_max(drift))  # the decision is a branch: it needs the value
        return self.last_drift > self.max_drift

    def state_dict(self) -> dict[str, Any]:
        return {"early_syncs": self.early_syncs}

    def load_state_dict(self, state: Optional[dict[str, Any]], device: Optional[torch.device] = None) -> None:
        if state:
            self.early_syncs = int(state.get("early_syncs", 0))


@dataclass(frozen=True)
class WarmupSchedule:
    """The schedule of ``"auto"`` before it has chosen: one parameter average, after step ``warmup_steps``;
    every state key is accepted (the policy will give each a period)."""

    param_sync_every: int
    state_policy: str = "average"
    state_sync_every: Mapping[str, int] = field(default_factory=dict)

    def due(self, step: int, state_keys: Optional[Sequence[str]] = None) -> SyncPlan:
        return SyncPlan(step, params=step == self.param_sync_every)

    def check_keys(self, keys: Sequence[str]) -> None:
        return None


class AutoPeriods(SyncOption):
    """``param_sync_every="auto"``: time ``warmup_steps`` local steps and the parameter average after
    them, agree across ranks on the slowest measurements, then choose the periods by the policy and put
    the schedule in force on the core's outermost level.

    Args:
        warmup_steps, comm_budget, min_param_syncs: as :class:`~lightning_desloc.config.AutoConfig`.
        level: whose ranks agree on the times (the core's outermost level; its ``comm`` is read when
            the policy decides, after the groups exist); ``None``: this process alone.
        total_steps: the run's length in optimizer steps, or a function returning it (read only when the
            policy decides: the Trainer's estimated_stepping_batches builds the dataloader), or ``None``.
    """

    name = "auto"

    def __init__(self, warmup_steps: int = 16, comm_budget: float = 0.05, min_param_syncs: int = 32,
                 level: Any = None, total_steps: Union[None, float, Callable[[], float]] = None,
                 info: Optional[Callable[[str], None]] = None) -> None:
        AutoConfig(warmup_steps=warmup_steps, comm_budget=comm_budget, min_param_syncs=min_param_syncs)
        self.warmup_steps, self.comm_budget, self.min_param_syncs = warmup_steps, comm_budget, min_param_syncs
        self.level = level
        self.total_steps = total_steps
        self.info = info
        self._stamps: list[float] = []
        self.chosen: Optional[tuple[int, dict[str, int]]] = None
        self.measured: dict[str, float] = {}
        self._core: Any = None

    def attach(self, core: Any, optimizers: Sequence[Optimizer]) -> None:
        self._core = core

    def adjust(self, step: int, plan: SyncPlan, optimizer: Optimizer) -> SyncPlan:
        if self.chosen is None:
            self.stamp(time.perf_counter())
        return plan

    def after_round(self, rnd: Round) -> Optional[Metrics]:
        if self.chosen is not None or not rnd.plan.params or rnd.step < self.warmup_steps:
            return None
        total = self.total_steps() if callable(self.total_steps) else self.total_steps
        k_x, periods = self.decide(rnd.seconds, optimizer_betas(rnd.optimizer, rnd.state_keys), total_steps=total)
        if self._core is not None:
            self._core.use_schedule(self.schedule_for(self._core.schedule.state_policy))
        if self.info is not None:
            self.info(
                f"DES-LOC auto periods: step {self.measured['step_time_s'] * 1e3:.1f} ms, average "
                f"{self.measured['round_time_s'] * 1e3:.1f} ms, budget {self.comm_budget:.0%}, "
                f"longest period {self.measured['max_period']:.0f} -> "
                f"param_sync_every={k_x}, state_sync_every={periods}"
            )
        return {"comm/auto/param_sync_every": float(k_x),
                "comm/auto/step_time_s": self.measured["step_time_s"],
                "comm/auto/round_time_s": self.measured["round_time_s"],
                "comm/auto/max_period": self.measured["max_period"],
                **{f"comm/auto/state_sync_every/{k}": float(v) for k, v in periods.items()}}

    def schedule_for(self, state_policy: str) -> SyncSchedule:
        """The schedule of the chosen periods (only ``K_x`` for the baselines, which average no state)."""
        assert self.chosen is not None
        k_x, periods = self.chosen
        return SyncSchedule(k_x, dict(periods) if state_policy == "average" else None, state_policy)  # type: ignore[arg-type]

    def stamp(self, now: float) -> None:
        self._stamps.append(now)

    def step_time(self) -> float:
        gaps = sorted(b - a for a, b in zip(self._stamps, self._stamps[1:]))
        return gaps[len(gaps) // 2] if gaps else 0.0

    def decide(self, round_time_s: float, betas: Mapping[str, float], comm: Optional[Comm] = None,
               total_steps: Optional[float] = None) -> tuple[int, dict[str, int]]:
        """Agree on ``(K_x, periods)``: every rank uses the max step and round time over ranks.

        ``total_steps``: the run's length in optimizer steps, when known; it caps ``K_x`` (see the module)."""
        if comm is None:
            comm = self.level.comm if self.level is not None else Comm()
        times = comm.all_reduce_max(torch.tensor([self.step_time(), round_time_s], dtype=torch.float64,
                                                 device=comm.device)).cpu()
        cap = period_cap(total_steps, self.min_param_syncs)
        self.measured = {"step_time_s": float(times[0]), "round_time_s": float(times[1]), "max_period": float(cap)}
        self.chosen = choose_periods(float(times[0]), float(times[1]), betas, self.comm_budget, max_period=cap)
        return self.chosen

    def state_dict(self) -> dict[str, Any]:
        return {"chosen": None if self.chosen is None else [self.chosen[0], dict(self.chosen[1])]}

    def load_state_dict(self, state: Optional[dict[str, Any]], device: Optional[torch.device] = None) -> None:
        if state and state.get("chosen"):
            k_x, periods = state["chosen"]
            self.chosen = (int(k_x), {k: int(v) for k, v in periods.items()})
            if self._core is not None:
                self._core.use_schedule(self.schedule_for(self._core.schedule.state_policy))
