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
consensus, ``d_i = ||x_i - xbar_last|| / ||xbar_last||``, and the ranks all-reduce the maximum (one
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
from collections.abc import Mapping, Sequence
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from lightning_desloc.ledger import CommLedger
from lightning_desloc.schedule import FIRST_MOMENT_FACTOR, SECOND_MOMENT_FACTOR, SECOND_MOMENT_KEYS


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


class DriftMonitor:
    """Relative distance of this rank's parameters from the last consensus; max over ranks."""

    def __init__(self, max_drift: float, check_every: int) -> None:
        if not max_drift > 0:
            raise ValueError(f"max_drift must be a positive relative distance, got {max_drift!r}")
        if check_every < 1:
            raise ValueError(f"drift_check_every must be a positive number of steps, got {check_every!r}")
        self.max_drift, self.check_every = max_drift, check_every
        self.anchor: Optional[Tensor] = None
        self.last_drift = 0.0

    def remember(self, params: Sequence[Tensor]) -> None:
        """Call after every parameter average: the consensus to measure drift from."""
        self.anchor = torch.cat([p.detach().reshape(-1).float() for p in params]).clone()

    def exceeded(self, step: int, params: Sequence[Tensor], ledger: CommLedger, group=None) -> bool:
        """On check steps: all-reduce the max relative drift; True when it is above ``max_drift``."""
        if self.anchor is None or step % self.check_every:
            return False
        x = torch.cat([p.detach().reshape(-1).float() for p in params])
        drift = torch.tensor([float((x - self.anchor).norm() / self.anchor.norm().clamp(min=1e-12))])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(drift, op=dist.ReduceOp.MAX, group=group)
            ledger.record({"control": drift.numel() * drift.element_size()})
        self.last_drift = float(drift)
        return self.last_drift > self.max_drift


class AutoPeriods:
    """``param_sync_every="auto"``: time ``warmup_steps`` local steps and the parameter average after
    them, agree across ranks on the slowest measurements, then choose the periods by the policy."""

    def __init__(self, warmup_steps: int = 16, comm_budget: float = 0.05, min_param_syncs: int = 32) -> None:
        if warmup_steps < 2:
            raise ValueError(f"auto periods need at least 2 warm-up steps to time a step, got {warmup_steps}")
        if not 0 < comm_budget < 1:
            raise ValueError(f"comm_budget is a fraction of the step time in (0, 1), got {comm_budget!r}")
        if not (isinstance(min_param_syncs, int) and min_param_syncs >= 1):
            raise ValueError(f"min_param_syncs is a number of parameter averages per run (>= 1), got "
                             f"{min_param_syncs!r}; use 1 to let the time budget alone decide")
        self.warmup_steps, self.comm_budget, self.min_param_syncs = warmup_steps, comm_budget, min_param_syncs
        self._stamps: list[float] = []
        self.chosen: Optional[tuple[int, dict[str, int]]] = None
        self.measured: dict[str, float] = {}

    def stamp(self, now: float) -> None:
        self._stamps.append(now)

    def step_time(self) -> float:
        gaps = sorted(b - a for a, b in zip(self._stamps, self._stamps[1:]))
        return gaps[len(gaps) // 2] if gaps else 0.0

    def decide(self, round_time_s: float, betas: Mapping[str, float], ledger: CommLedger, group=None,
               total_steps: Optional[float] = None):
        """Agree on ``(K_x, periods)``: every rank uses the max step and round time over ranks.

        ``total_steps``: the run's length in optimizer steps, when known; it caps ``K_x`` (see the module)."""
        times = torch.tensor([self.step_time(), round_time_s], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)
            ledger.record({"control": times.numel() * times.element_size()})
        cap = period_cap(total_steps, self.min_param_syncs)
        self.measured = {"step_time_s": float(times[0]), "round_time_s": float(times[1]), "max_period": float(cap)}
        self.chosen = choose_periods(float(times[0]), float(times[1]), betas, self.comm_budget, max_period=cap)
        return self.chosen
