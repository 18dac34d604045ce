"""An independent simulator of M DES-LOC workers, written from the equations (no lightning_desloc, no torch.optim).

Everything is float64. The model is a two-layer tanh MLP written with explicit weight tensors::

    f(x; W1, b1, W2, b2) = tanh(x W1^T + b1) W2^T + b2,      loss = mean((f(x) - y)^2)

Gradients come from ``torch.autograd.grad`` on that function, on the same per-rank batches
(:func:`make_batch`) that the Lightning runs in ``test_equivalence.py`` train on.

One optimizer step ``s`` of worker ``m`` (``s = 1, 2, ...`` counts optimizer-step calls, equal on every
worker; a worker whose gradient is not finite skips its update, as an AMP grad scaler does: its
parameters, states and Adam counter ``t`` stay untouched, and the step still counts)::

    g      = sum_j grad(loss(batch_j) / A)                       A micro-batches (gradient accumulation)
    g     *= min(1, rho / (||g||_2 + 1e-6))                      optional clipping by the global norm
    lr_s   = lr * schedule(s)                                    optional learning-rate schedule
    x     <- optimizer update of x with g and its local state    (Adam, AdamW or SGD with momentum)
    xbar   = mean_m x        if s % K_x == 0                     parameters, over the workers
    kbar   = mean_m state_k  if s % K_k == 0                     each state key k on its own period

The step counter ``t`` of Adam is never averaged (it differs between workers only by their skips).
All workers start from the same parameters (the Lightning run broadcasts rank 0's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor

DTYPE = torch.float64
IN, HIDDEN, OUT = 5, 7, 3
BATCH = 6
N_PARAMS = HIDDEN * IN + HIDDEN + OUT * HIDDEN + OUT


# ----------------------------------------------------------------------------- data and model
def make_batch(rank: int, index: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Batch ``index`` of rank ``rank``: a deterministic function of (seed, rank, index); targets depend on the rank."""
    g = torch.Generator().manual_seed(1_000_003 * seed + 10_007 * rank + index)
    x = torch.randn(BATCH, IN, generator=g, dtype=DTYPE)
    y = (1.0 + rank) * torch.sin(x[:, :OUT]) + 0.1 * torch.randn(BATCH, OUT, generator=g, dtype=DTYPE)
    return x, y


def initial_params(seed: int = 0) -> list[Tensor]:
    """``[W1, b1, W2, b2]`` with shapes ``(HIDDEN, IN), (HIDDEN,), (OUT, HIDDEN), (OUT,)``."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(HIDDEN, IN), (HIDDEN,), (OUT, HIDDEN), (OUT,)]
    return [0.4 * torch.randn(s, generator=g, dtype=DTYPE) for s in shapes]


def perturbation(rank: int, seed: int = 0) -> list[Tensor]:
    """What rank ``rank`` adds to its initial weights before the strategy broadcasts rank 0's."""
    g = torch.Generator().manual_seed(7919 + 101 * seed + rank)
    return [0.05 * (rank + 1) * torch.randn(p.shape, generator=g, dtype=DTYPE) for p in initial_params(seed)]


def start_params(rank: int = 0, seed: int = 0) -> list[Tensor]:
    """Rank ``rank``'s weights after its perturbation: ``initial_params + perturbation(rank)``."""
    return [p + d for p, d in zip(initial_params(seed), perturbation(rank, seed))]


def forward(params: list[Tensor], x: Tensor) -> Tensor:
    w1, b1, w2, b2 = params
    return torch.tanh(x @ w1.T + b1) @ w2.T + b2


def loss_fn(params: list[Tensor], x: Tensor, y: Tensor) -> Tensor:
    return ((forward(params, x) - y) ** 2).mean()


def warmup_then_decay(step: int) -> float:
    """LR multiplier after ``step`` completed steps (used as a LambdaLR lambda): linear warm-up over 3, then 0.9^k."""
    return (step + 1) / 3 if step < 2 else 0.9 ** (step - 2)


# ----------------------------------------------------------------------------- configuration
@dataclass
class Config:
    """One DES-LOC run.

    ``lr_schedule``: ``None`` (constant), ``("lambda",)`` for ``lr * warmup_then_decay(s - 1)``, or
    ``("step", size, gamma)`` for ``lr * gamma ** ((s - 1) // size)`` (torch's StepLR stepped once per
    optimizer step). ``skip_calls``: 0-based optimizer-step calls whose gradient is made infinite, on the workers in
    ``skip_ranks`` (``None``: on every worker).
    """

    optimizer: str  # "adam" | "adamw" | "sgd"
    param_sync_every: int
    state_sync_every: dict[str, int]
    lr: float = 1e-2
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.9
    dampening: float = 0.0
    nesterov: bool = False
    accumulate: int = 1
    clip_norm: Optional[float] = None
    lr_schedule: Optional[tuple] = None
    skip_calls: frozenset = field(default_factory=frozenset)
    skip_ranks: Optional[frozenset] = None
    #: the first optimizer steps train as DDP: every worker steps on the mean gradient, nothing is averaged
    ddp_warmup_steps: int = 0
    #: F parameter fragments, fragment f averaged at offset f * K_x / F (see :func:`due_items`)
    fragments: int = 1
    seed: int = 0

    def skips(self, call: int, rank: int) -> bool:
        """Whether worker ``rank``'s gradient of optimizer-step call ``call`` is made infinite."""
        return call in self.skip_calls and (self.skip_ranks is None or rank in self.skip_ranks)

    def state_keys(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.optimizer == "sgd" else ("exp_avg", "exp_avg_sq")

    def lr_at(self, s: int) -> float:
        """Learning rate used by optimizer step ``s`` (1-based)."""
        if self.lr_schedule is None:
            return self.lr
        if self.lr_schedule[0] == "lambda":
            return self.lr * warmup_then_decay(s - 1)
        if self.lr_schedule[0] == "step":
            _, size, gamma = self.lr_schedule
            return self.lr * gamma ** ((s - 1) // size)
        raise ValueError(self.lr_schedule)


# ----------------------------------------------------------------------------- one worker
@dataclass
class Worker:
    params: list[Tensor]
    state: dict[str, list[Tensor]] = field(default_factory=dict)
    t: int = 0  # completed local optimizer steps

    def snapshot(self) -> dict:
        return {
            "params": [p.clone() for p in self.params],
            "state": {k: [v.clone() for v in vs] for k, vs in self.state.items()},
            "step": self.t,
        }


def gradient(cfg: Config, params: list[Tensor], rank: int, call: int) -> list[Tensor]:
    """Gradient of optimizer-step call ``call``: ``sum_j grad(loss_j / A)`` over its ``A`` micro-batches."""
    leaves = [p.detach().clone().requires_grad_(True) for p in params]
    total = [torch.zeros_like(p) for p in params]
    for j in range(cfg.accumulate):
        x, y = make_batch(rank, call * cfg.accumulate + j, cfg.seed)
        loss = loss_fn(leaves, x, y)
        if cfg.skips(call, rank):
            loss = loss * math.inf
        for acc, g in zip(total, torch.autograd.grad(loss / cfg.accumulate, leaves)):
            acc += g
    return total


def clip_(grads: list[Tensor], max_norm: float) -> None:
    """``coef = max_norm / (sqrt(sum_i ||g_i||^2) + 1e-6)``; multiply every gradient by it when ``coef < 1``."""
    total = math.sqrt(sum(float((g * g).sum()) for g in grads))
    coef = max_norm / (total + 1e-6)
    if coef < 1:
        for g in grads:
            g.mul_(coef)


def adam_update(cfg: Config, w: Worker, grads: list[Tensor], lr: float) -> None:
    """Adam (``optimizer="adam"``, L2 weight decay folded into g) or AdamW (decoupled decay), by hand::

        AdamW:  x <- x (1 - lr wd)          Adam: g <- g + wd x
        u <- b1 u + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        x <- x - lr (u / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
    """
    b1, b2 = cfg.betas
    if not w.state:
        w.state = {"exp_avg": [torch.zeros_like(p) for p in w.params],
                   "exp_avg_sq": [torch.zeros_like(p) for p in w.params]}
    w.t += 1
    t = w.t
    new_params = []
    for x, g, u, v in zip(w.params, grads, w.state["exp_avg"], w.state["exp_avg_sq"]):
        if cfg.optimizer == "adamw":
            x = x * (1 - lr * cfg.weight_decay)
        elif cfg.weight_decay:
            g = g + cfg.weight_decay * x
        u.copy_(b1 * u + (1 - b1) * g)
        v.copy_(b2 * v + (1 - b2) * g * g)
        u_hat = u / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        new_params.append(x - lr * u_hat / (torch.sqrt(v_hat) + cfg.eps))
    w.params = new_params


def sgd_update(cfg: Config, w: Worker, grads: list[Tensor], lr: float) -> None:
    """SGD with momentum, torch's conventions::

        d <- g + wd x
        buf <- d (first step) | mu buf + (1 - dampening) d
        x <- x - lr (d + mu buf)  (nesterov)  |  x - lr buf
    """
    mu = cfg.momentum
    first = not w.state
    if first:
        w.state = {"momentum_buffer": [None] * len(w.params)}
    w.t += 1
    new_params = []
    for i, (x, g) in enumerate(zip(w.params, grads)):
        d = g + cfg.weight_decay * x
        buf = d.clone() if first else mu * w.state["momentum_buffer"][i] + (1 - cfg.dampening) * d
        w.state["momentum_buffer"][i] = buf
        step = d + mu * buf if cfg.nesterov else buf
        new_params.append(x - lr * step)
    w.params = new_params


def _average(tensor_lists: list[list[Tensor]]) -> list[Tensor]:
    """Element-wise mean over workers of a list of tensors per worker."""
    return [torch.stack(ts).mean(dim=0) for ts in zip(*tensor_lists)]


# ----------------------------------------------------------------------------- the M-worker run

def local_step(cfg: Config, team: list[Worker], call: int, step: int) -> None:
    """Every worker's local optimizer step ``step`` on its gradient for batch ``call`` (clipped first
    when ``cfg.clip_norm`` is set). A worker whose gradient is not finite skips its update, as its AMP
    grad scaler does; the others step. During the DDP warm-up (``step <= cfg.ddp_warmup_steps``) every
    worker's gradient is first replaced by the mean over workers, as DDP's all-reduce does."""
    grads = [gradient(cfg, w.params, m, call) for m, w in enumerate(team)]
    if step <= cfg.ddp_warmup_steps:
        mean = _average(grads)
        grads = [[g.clone() for g in mean] for _ in team]  # own copies: clipping works in place
    lr = cfg.lr_at(step)
    for w, gs in zip(team, grads):
        if any(not torch.isfinite(g).all() for g in gs):
            continue
        if cfg.clip_norm is not None:
            clip_(gs, cfg.clip_norm)
        (sgd_update if cfg.optimizer == "sgd" else adam_update)(cfg, w, gs, lr)
    return True

def fragment_positions(cfg: Config) -> list[int]:
    """The fragment of each of ``[W1, b1, W2, b2]``: a parameter belongs where its middle element falls
    among ``F`` equal shares of all the elements, in order."""
    sizes = [HIDDEN * IN, HIDDEN, OUT * HIDDEN, OUT]
    total, start, out = sum(sizes), 0, []
    for n in sizes:
        out.append(min(cfg.fragments - 1, int(cfg.fragments * (start + n / 2) / total)))
        start += n
    return out


def due_items(cfg: Config, s: int) -> list[tuple[str, list[int]]]:
    """What is averaged right after step ``s`` (counted from the end of any warm-up): ``("params" or a state
    key, positions of the tensors)``. Fragment ``f`` has offset ``o = f * K_x / F``; its parameters are due
    when ``(s - o) % K_x == 0`` and its state ``k`` when ``(s - o) % K_k == 0``, for ``s >= o``. With
    ``F = 1``: the whole model when ``s % K_x == 0``, state ``k`` when ``s % K_k == 0``."""
    where = fragment_positions(cfg)
    spacing = cfg.param_sync_every // cfg.fragments
    items = []
    for f in range(cfg.fragments):
        local = s - f * spacing
        if local < 0:
            continue
        positions = [i for i, of in enumerate(where) if of == f]
        if local % cfg.param_sync_every == 0:
            items.append(("params", positions))
        items.extend((key, positions) for key in cfg.state_keys() if local % cfg.state_sync_every[key] == 0)
    return items


def _get(w: Worker, what: str) -> list[Tensor]:
    return w.params if what == "params" else w.state[what]


def simulate(cfg: Config, n_calls: int, workers: int = 2, init: Optional[list[Tensor]] = None) -> list[list[dict]]:
    """Run ``n_calls`` optimizer-step calls on ``workers`` workers.

    Returns ``history`` with ``history[c][m]`` the snapshot (params, state, step) of worker ``m`` right
    after call ``c`` and its averaging round; ``history[0]`` is the start, so ``len == n_calls + 1``.
    """
    def average_due(team: list[Worker], s: int) -> None:
        for what, positions in due_items(cfg, s):
            for i in positions:
                mean = torch.stack([_get(w, what)[i] for w in team]).mean(dim=0)
                for w in team:
                    _get(w, what)[i] = mean.clone()

    return _run(cfg, n_calls, workers, init, average_due)


def simulate_two_level(
    cfg: Config,
    n_calls: int,
    group_size: int,
    group_param_sync_every: int,
    group_state_sync_every: dict[str, int],
    workers: int = 4,
    init: Optional[list[Tensor]] = None,
) -> list[list[dict]]:
    """:func:`simulate` with hierarchical averaging: the workers form groups of ``group_size`` consecutive
    workers (``{0, 1}, {2, 3}`` for 4 and 2). Right after completed step ``s``, for the parameters (period
    ``K_x = cfg.param_sync_every`` across groups, ``k_in = group_param_sync_every`` inside groups) and for
    each state key ``k`` (``cfg.state_sync_every[k]`` across, ``group_state_sync_every[k]`` inside)::

        x_m  = mean of x over m's group        if s % k_in == 0      (inner level)
        x_m  = mean of x over all workers      if s % K_x == 0       (outer level: the world mean)

    When both are due the world mean wins (it is also the mean of the group means). Written from these
    rules alone, without the package's schedule or averaging code. Returns the history as :func:`simulate`.
    """
    groups = [list(range(start, start + group_size)) for start in range(0, workers, group_size)]

    def average_over(team: list[Worker], members: list[int], get, put) -> None:
        mean = _average([get(team[m]) for m in members])
        for m in members:
            put(team[m], [t.clone() for t in mean])

    def put_params(w: Worker, value: list[Tensor]) -> None:
        w.params = value

    def average_due(team: list[Worker], s: int) -> None:
        if s % group_param_sync_every == 0:
            for members in groups:
                average_over(team, members, lambda w: w.params, put_params)
        if s % cfg.param_sync_every == 0:
            average_over(team, list(range(workers)), lambda w: w.params, put_params)
        for key in cfg.state_keys():
            def get(w: Worker, key: str = key) -> list[Tensor]:
                return w.state[key]

            def put(w: Worker, value: list[Tensor], key: str = key) -> None:
                w.state[key] = value

            if s % group_state_sync_every[key] == 0:
                for members in groups:
                    average_over(team, members, get, put)
            if s % cfg.state_sync_every[key] == 0:
                average_over(team, list(range(workers)), get, put)

    return _run(cfg, n_calls, workers, init, average_due)


def simulate_overlapped(cfg: Config, n_calls: int, overlap_steps: int, workers: int = 2,
                        init: Optional[list[Tensor]] = None, local_weight: float = 1.0) -> list[list[dict]]:
    """:func:`simulate` with every average applied ``tau = overlap_steps`` completed steps after the step
    that made it due. Right after step ``s``, first what was due after ``s - tau`` lands, then what is
    due after ``s`` starts from the values at ``s``::

        x_m <- mean_j(x_j at s - tau) + (x_m - x_m at s - tau)                          parameters
        k_m <- d mean_j(k_j at s - tau) + (k_m - d k_m at s - tau),   d = beta_k ** tau    state k

    with ``beta`` = ``beta1`` for ``exp_avg``, ``beta2`` for ``exp_avg_sq`` (clamped at 0), ``momentum``
    for ``momentum_buffer``; ``tau >= 1``. With ``local_weight = lam < 1`` a worker keeps ``lam`` of its own
    parameter progress and adds ``1 - lam`` of the mean's progress between the previous average of the
    same parameters (at ``s - tau - P``) and this one, scaled to ``tau`` steps (not on the first average)::

        x_m <- mean(then) + lam (x_m - x_m at s - tau) + (1 - lam) (tau / P) (mean(then) - mean(before))

    History as :func:`simulate`."""
    decay = {"exp_avg": cfg.betas[0], "exp_avg_sq": cfg.betas[1], "momentum_buffer": cfg.momentum}
    # parameter positions -> (the step the last average of them was due, its mean)
    last_mean: dict[tuple[int, ...], tuple[int, list[Tensor]]] = {}
    # (apply at, what, positions, x_s per worker, mean)
    in_flight: list[tuple[int, str, list[int], list[list[Tensor]], list[Tensor]]] = []

    def average_due(team: list[Worker], s: int) -> None:
        for item in [i for i in in_flight if i[0] == s]:
            _, what, positions, then, mean = item
            d = 1.0 if what == "params" else decay[what] ** overlap_steps
            due_at = s - overlap_steps
            before = last_mean.get(tuple(positions)) if what == "params" else None
            for w, own_then in zip(team, then):
                for j, (i, m, old) in enumerate(zip(positions, mean, own_then)):
                    if before is None:
                        new = d * m + (_get(w, what)[i] - d * old)
                    else:  # only for parameters: d = 1
                        step_before, mean_before = before
                        drift = (m - mean_before[j]) * (overlap_steps / (due_at - step_before))
                        new = m + local_weight * (_get(w, what)[i] - old) + (1 - local_weight) * drift
                    _get(w, what)[i] = new.clamp(min=0) if what == "exp_avg_sq" else new
            if what == "params" and local_weight < 1:
                last_mean[tuple(positions)] = (due_at, mean)
            in_flight.remove(item)
        for what, positions in due_items(cfg, s):
            then = [[_get(w, what)[i].clone() for i in positions] for w in team]
            in_flight.append((s + overlap_steps, what, positions, then, _average(then)))

    return _run(cfg, n_calls, workers, init, average_due)


def _run(cfg: Config, n_calls: int, workers: int, init: Optional[list[Tensor]], average_due) -> list[list[dict]]:
    """The simulators' common loop: a local step on every worker, then ``average_due(team, s)`` after
    step ``s`` (a worker's skipped update still counts as the step)."""
    init = start_params(0, cfg.seed) if init is None else init
    team = [Worker(params=[p.clone() for p in init]) for _ in range(workers)]
    history = [[w.snapshot() for w in team]]
    for s in range(1, n_calls + 1):  # optimizer steps, equal on every worker
        local_step(cfg, team, s - 1, s)
        if s > cfg.ddp_warmup_steps:  # DES-LOC's schedule counts from the end of the warm-up
            average_due(team, s - cfg.ddp_warmup_steps)
        history.append([w.snapshot() for w in team])
    return history


def consensus(snapshots: list[dict]) -> list[Tensor]:
    """Mean over workers of the parameters in one row of ``history``."""
    return _average([snap["params"] for snap in snapshots])


def optimizer_steps(cfg: Config, n_calls: int) -> int:
    """Steps counted after ``n_calls`` optimizer-step calls: every call counts, skipped updates too."""
    return n_calls


#: float64 runs of the strategy and of this simulation agree to rounding
SNAPSHOT_TOL = dict(rtol=1e-10, atol=1e-12)


def assert_snapshot_matches(got: dict, want: dict, where: str) -> None:
    """Compare one rank's snapshot (params, averaged state, Adam's step) with the simulation's."""
    torch.testing.assert_close(got["params"], want["params"], **SNAPSHOT_TOL, msg=lambda m: f"{where}, params: {m}")
    assert set(got["state"]) == set(want["state"]), where
    for key in want["state"]:
        torch.testing.assert_close(got["state"][key], want["state"][key], **SNAPSHOT_TOL, msg=lambda m: f"{where}, {key}: {m}")
    if want["state"] and "exp_avg" in want["state"]:
        assert got["step"] == want["step"], f"{where}: Adam's step counter {got['step']} != {want['step']}"
