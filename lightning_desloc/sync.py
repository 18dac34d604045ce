"""The framework-independent DES-LOC core: step counting, the schedule's rounds, the ledger.

:class:`DeslocSync` is what :class:`~lightning_desloc.DeslocStrategy` (Lightning Trainer) and
:class:`~lightning_desloc.fabric.DeslocFabricStrategy` (Lightning Fabric) share. It knows nothing of
either: it is given the optimizers, is told when one of them was stepped, and then

1. counts the completed step ``s`` of that optimizer (``s = 1, 2, ...``; a call of
   ``optimizer.step`` that did not happen, e.g. skipped by an AMP grad scaler, is not a step: the core
   counts the calls through a ``register_step_post_hook`` and compares around the step);
2. adds the DDP-equivalent bytes of the step to the ledger: ``sum_p numel(p) * element_size(p)`` over
   the optimizer's trainable parameters, the bytes DDP would all-reduce for one step;
3. asks the :class:`~lightning_desloc.schedule.SyncSchedule` what is due after step ``s``
   (parameters when ``s % K_x == 0``, state key ``k`` when ``s % K_k == 0``) and averages all of it in
   one coalesced round (:func:`~lightning_desloc.averaging.average_`), recording the bytes sent per
   category (``params``, ``buffers``, ``state/<key>``) in :attr:`DeslocSync.ledger`.

Scalar state (``step``) is never averaged. The optional parts (compression, outer optimizer, drift
trigger, ``param_sync_every="auto"``, hierarchical groups) live here too, so both adapters get them.
With hierarchical groups and ``group_param_sync_every > 1`` step 3 is preceded by the inner level's
round inside the group (:mod:`lightning_desloc.groups`), recorded in :attr:`DeslocSync.group_ledger`.

Example: two workers simulated in one process need a process group; with a single process (world
size 1) nothing is sent and the schedule is still counted::

    >>> import torch
    >>> core = DeslocSync(param_sync_every=2, state_sync_every={"exp_avg": 4, "exp_avg_sq": 4})
    >>> model = torch.nn.Linear(3, 1)
    >>> opt = torch.optim.Adam(model.parameters(), lr=0.1)
    >>> core.attach([opt])
    >>> plans = []
    >>> for _ in range(4):
    ...     model(torch.randn(8, 3)).pow(2).mean().backward()
    ...     i = core.begin_step(opt)
    ...     opt.step()
    ...     plans.append(core.after_step(i, opt))
    >>> core.optimizer_steps
    [4]
    >>> [p if p is None else (p.step, p.params, p.states) for p in plans]
    [None, (2, True, ()), None, (4, True, ('exp_avg', 'exp_avg_sq'))]
    >>> core.ledger.ddp_equivalent_bytes   # 4 steps x 4 float32 parameters
    64
"""

from __future__ import annotations

import atexit
import pickle
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Literal, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer

from lightning_desloc.adaptive import AutoPeriods, DriftMonitor, optimizer_betas
from lightning_desloc.averaging import DEFAULT_BUCKET_CAP_BYTES, average_
from lightning_desloc.compression import Compression, CompressionPlan, parse_compression
from lightning_desloc.groups import (
    GRADIENTS_EVERY_STEP,
    HierarchicalGroups,
    check_group_keys,
    desloc_group,
    make_group_schedule,
    within_group_plan,
)
from lightning_desloc.ledger import CommLedger
from lightning_desloc.outer import OuterOptimizer
from lightning_desloc.schedule import NEVER_AVERAGED_KEYS, StatePolicy, StateSyncEvery, SyncPlan, SyncSchedule

Metrics = dict[str, float]


def averaged_state_keys(optimizer: Optimizer) -> set[str]:
    """State keys of ``optimizer`` that DES-LOC averages: per-parameter floating tensors, not counters."""
    keys: set[str] = set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if is_averaged(key, value, p):
                    keys.add(key)
    return keys


def is_averaged(key: str, value: Any, param: Tensor) -> bool:
    """Whether state ``key`` = ``value`` of ``param`` is averaged: a floating tensor, not a counter, and not
    a scalar unless the parameter itself is one."""
    if key in NEVER_AVERAGED_KEYS or not isinstance(value, Tensor) or not value.is_floating_point():
        return False
    return value.dim() > 0 or param.dim() == 0


def optimizer_params(optimizer: Optimizer) -> list[Tensor]:
    """Every parameter of ``optimizer``, in param-group order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def gradient_bytes(optimizer: Optimizer) -> int:
    """Bytes DDP would all-reduce for one step of ``optimizer``: its trainable parameters' sizes."""
    return sum(p.numel() * p.element_size() for p in optimizer_params(optimizer) if p.requires_grad)


def float_buffers(modules: Iterable[Module]) -> list[Tensor]:
    """Floating buffers of ``modules`` (running statistics), each once; integer buffers are not averaged."""
    seen: set[int] = set()
    out = []
    for module in modules:
        for b in module.buffers():
            if b.is_floating_point() and id(b) not in seen:
                seen.add(id(b))
                out.append(b)
    return out


def unique_parameters(modules: Iterable[Module]) -> list[Tensor]:
    """Parameters of ``modules``, each once (modules may share submodules)."""
    seen: set[int] = set()
    out = []
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def broadcast_object(obj: Any, src: int, ledger: CommLedger, category: str = "control", group: Any = None) -> Any:
    """Pickle ``obj`` on rank ``src`` and broadcast it: an int64 size, then the payload as uint8.

    Our own two broadcasts instead of ``broadcast_object_list`` so that the bytes are known exactly:
    ``8 + len(pickle.dumps(obj))`` are recorded under ``category``. Call on every rank.
    """
    rank = dist.get_rank(group)
    payload = pickle.dumps(obj) if rank == src else b""
    size = torch.tensor([len(payload)], dtype=torch.int64)
    dist.broadcast(size, src=src, group=group)
    buf = torch.empty(int(size.item()), dtype=torch.uint8)
    if rank == src:
        buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    dist.broadcast(buf, src=src, group=group)
    ledger.record({category: size.numel() * size.element_size() + buf.numel()})
    return obj if rank == src else pickle.loads(buf.numpy().tobytes())


class MeteredCollectives:
    """Mixin for a Lightning or Fabric strategy with a ``ledger``: every collective Lightning or the user
    asks the strategy for is recorded. Gathers and reductions count under the current category
    (``metrics`` unless :meth:`_metered_as` says otherwise), barriers, broadcasts and boolean decisions
    under ``control``. Put it before the strategy's base class."""

    ledger: CommLedger
    world_size: int
    _collective_category = "metrics"

    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and self.world_size > 1

    def _meter(self, tensor: Any) -> None:
        if isinstance(tensor, Tensor) and self._distributed():
            self.ledger.record({self._collective_category: tensor.numel() * tensor.element_size()})

    @contextmanager
    def _metered_as(self, category: str) -> Iterator[None]:
        previous, self._collective_category = self._collective_category, category
        try:
            yield
        finally:
            self._collective_category = previous

    def all_gather(self, tensor: Tensor, group: Optional[Any] = None, sync_grads: bool = False) -> Tensor:
        self._meter(tensor)
        return super().all_gather(tensor, group=group, sync_grads=sync_grads)  # type: ignore[misc]

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        with self._metered_as("control"):
            return super().reduce_boolean_decision(decision, all=all)  # type: ignore[misc]

    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if self._distributed():
            self.ledger.record({"control": 0})
        super().barrier(*args, **kwargs)  # type: ignore[misc]

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        if not self._distributed():
            return obj
        # Our own pickled broadcast (size, then payload) so that the bytes are known exactly.
        return broadcast_object(obj, src, self.ledger, "control")


def close_process_group() -> None:
    """End of a spawned/forked worker: wait for every rank, then close gloo. Without it gloo's
    background threads can abort the interpreter at exit ("terminate called without an active
    exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


_exit_hook_registered = False


def close_process_group_at_exit(timeout_s: float = 30.0) -> None:
    """Close the default process group when the interpreter exits, as :func:`close_process_group` does
    for spawned workers. For processes that live on after ``fit`` (the script launched by the Trainer's
    default launcher, ``torchrun`` workers). Registered once per process; the wait for the other ranks
    is bounded by ``timeout_s`` seconds (gloo's monitored barrier), so a rank whose peer crashed still
    exits."""
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_close_at_exit, timeout_s)
        _exit_hook_registered = True


def _close_at_exit(timeout_s: float) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        return  # never initialised, or already closed (spawned workers)
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=timedelta(seconds=timeout_s))
        else:
            dist.barrier()
    except Exception:  # a peer is gone or stuck: close this rank's side anyway
        pass
    dist.destroy_process_group()


class CoreAttribute:
    """A strategy attribute that lives on the strategy's :class:`DeslocSync` (``self.core``): reads and
    assignments go to ``self.core.<name>``, so ``strategy.schedule = ...`` keeps working."""

    def __init__(self, name: Optional[str] = None) -> None:
        self.name = name

    def __set_name__(self, owner: type, name: str) -> None:
        if self.name is None:
            self.name = name

    def __get__(self, obj: Any, objtype: Optional[type] = None) -> Any:
        if obj is None:
            return self
        return getattr(obj.core, self.name)  # type: ignore[arg-type]

    def __set__(self, obj: Any, value: Any) -> None:
        setattr(obj.core, self.name, value)  # type: ignore[arg-type]


class DeslocSync:
    """The DES-LOC schedule run against live optimizers, with its communication ledger.

    Args:
        param_sync_every: ``K_x``, optimizer steps between parameter averages, or ``"auto"`` (the first
            ``16`` local steps and the parameter average after them are timed, then ``K_x`` and the
            state periods are chosen by :mod:`lightning_desloc.adaptive`).
        state_sync_every: periods of the optimizer states in optimizer steps (``None``: first moments
            ``3 * K_x``, second moments ``6 * K_x``; an ``int``: one period for all; a dict per key).
        state_policy: ``"average"`` (DES-LOC), ``"keep_local"`` or ``"reset"`` (baselines).
        compression: wire format per category (``"bf16"``, ``"int8"``, or a dict), ``None`` for exact.
        outer_lr, outer_momentum, outer_nesterov: the optional outer SGD step on each parameter average.
        group_size: ranks per group for hierarchical synchronisation (``None``: off).
        group_param_sync_every: the inner level, inside each group: ``1`` all-reduces gradients every step;
            ``k_in > 1`` averages parameters within the group every ``k_in`` steps instead (DES-LOC inside
            the group; see :mod:`lightning_desloc.groups`).
        group_state_sync_every: state periods of the inner level, as ``state_sync_every`` (``None``: the
            defaults from ``k_in``); only with ``group_param_sync_every > 1``.
        comm_budget: with ``"auto"``, the fraction of step time communication may take.
        min_param_syncs: with ``"auto"`` and a known run length (:attr:`total_steps`), ``K_x`` leaves at
            least this many parameter averages in the run (power-of-two periods, never below 8 steps).
        max_drift, drift_check_every: early parameter average when the relative drift from the last
            consensus exceeds ``max_drift``, checked every ``drift_check_every`` steps.
        bucket_cap_mb: largest flat buffer of one all-reduce, in MiB (``2**20`` bytes).
        buffers: returns the floating buffers averaged with the parameters of optimizer 0 (e.g. BatchNorm
            running statistics); ``None`` for none.
        log: called with the ledger's metrics (``comm/...``) after every round; ``None`` for no logging.

    Attributes:
        ledger: bytes of the DES-LOC rounds (and whatever the adapter meters), per category.
        group_ledger: bytes of the inner level (hierarchical mode): the gradient all-reduces (``grads``),
            or with ``group_param_sync_every > 1`` the averages within groups (``params``, ``state/<key>``).
        group_schedule: the inner level's :class:`SyncSchedule`, ``None`` unless ``group_param_sync_every > 1``.
        last_group_plan: what the inner round of the last step averaged (``None``: no inner round).
        optimizer_steps: completed steps per attached optimizer, in attach order.
        params_in_sync: whether every rank holds the same parameters right now (after setup's
            broadcast or a parameter average, until the next local step).
    """

    def __init__(
        self,
        param_sync_every: Union[int, Literal["auto"]] = 256,
        state_sync_every: StateSyncEvery = None,
        state_policy: StatePolicy = "average",
        compression: Compression = None,
        outer_lr: Optional[float] = None,
        outer_momentum: float = 0.9,
        outer_nesterov: bool = True,
        group_size: Optional[int] = None,
        group_param_sync_every: int = GRADIENTS_EVERY_STEP,
        group_state_sync_every: StateSyncEvery = None,
        comm_budget: float = 0.05,
        max_drift: Optional[float] = None,
        drift_check_every: int = 16,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_BYTES / 2**20,
        buffers: Optional[Callable[[], Sequence[Tensor]]] = None,
        min_param_syncs: int = 32,
        log: Optional[Callable[[Metrics], None]] = None,
    ) -> None:
        self.auto: Optional[AutoPeriods] = None
        #: the run's length in optimizer steps when known, or a function returning it, called only when
        #: ``"auto"`` decides (the Trainer's ``estimated_stepping_batches``: asked for at setup it builds the
        #: train dataloader there, drawing from the RNG a resumed run has just restored); with ``"auto"`` it
        #: caps ``K_x`` to leave ``min_param_syncs`` averages in the run
        self.total_steps: Union[None, float, Callable[[], float]] = None
        if param_sync_every == "auto":
            if state_sync_every is not None:
                raise ValueError("param_sync_every='auto' chooses the state periods too; leave state_sync_every=None")
            self.auto = AutoPeriods(comm_budget=comm_budget, min_param_syncs=min_param_syncs)
            param_sync_every = self.auto.warmup_steps  # the timed first average; the policy decides the rest
        self.schedule = SyncSchedule(param_sync_every, state_sync_every, state_policy)
        self.drift = DriftMonitor(max_drift, drift_check_every) if max_drift is not None else None
        #: parameter averages the drift trigger added to the schedule
        self.early_syncs = 0
        wires = parse_compression(compression)
        self.compression: Optional[CompressionPlan] = CompressionPlan(wires) if wires else None
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
            raise ValueError(f"group_size must be a positive number of ranks per group, got {group_size!r}")
        self.group_size = group_size
        self.group_schedule: Optional[SyncSchedule] = make_group_schedule(
            group_size, group_param_sync_every, group_state_sync_every, state_policy, self.auto is not None, max_drift
        )
        self.last_group_plan: Optional[SyncPlan] = None
        self._group_round_done = False  # after_step's inner round already covers the plan sync() is given
        self.groups: Optional[HierarchicalGroups] = None
        self.group_ledger = CommLedger()
        self.outer: Optional[OuterOptimizer] = None
        if outer_lr is not None:
            self.outer = OuterOptimizer(outer_lr, outer_momentum, outer_nesterov)
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be a positive size in MiB, got {bucket_cap_mb!r}")
        self.bucket_cap_bytes = int(bucket_cap_mb * 2**20)
        self.ledger = CommLedger()
        self.buffers = buffers
        self.log = log
        self.optimizers: list[Optimizer] = []
        self.optimizer_steps: list[int] = []
        self.params_in_sync = True
        self._step_calls: list[int] = []
        self._calls_before: list[int] = []
        self._hooks: list[Any] = []
        self._state_keys: list[Optional[tuple[str, ...]]] = []

    # ------------------------------------------------------------------ setup
    @property
    def group(self) -> Any:
        """The process group of DES-LOC's averages: the world, or this rank's cross-group group."""
        return desloc_group(self.groups)

    def setup_groups(self) -> None:
        """Create the hierarchical process groups (collective: every rank, once) when ``group_size`` is set."""
        if self.group_size is not None and self.groups is None:
            self.groups = HierarchicalGroups.create(self.group_size, self.group_ledger)

    def attach(self, optimizers: Sequence[Optimizer]) -> None:
        """Start scheduling ``optimizers`` (all of them, again, when called a second time).

        Step counters are kept when their number does not change (a resume may have set them), else reset
        to zero. The current parameters are taken as the last consensus (compression, outer optimizer,
        drift), so attach when every rank holds the same parameters.
        """
        self.detach()
        self.optimizers = list(optimizers)
        n = len(self.optimizers)
        self._step_calls = [0] * n
        self._calls_before = [0] * n
        if len(self.optimizer_steps) != n:
            self.optimizer_steps = [0] * n
        self._state_keys = [None] * n
        self._hooks = [opt.register_step_post_hook(self._make_step_hook(i)) for i, opt in enumerate(self.optimizers)]
        if (self.compression is not None or self.outer is not None) and n > 1:
            raise ValueError("compression and outer_lr support one optimizer; turn them off for several optimizers")
        if self.compression is not None:
            self.compression.prime("params", optimizer_params(self.optimizers[0]))
        if self.outer is not None:
            self.outer.prime(optimizer_params(self.optimizers[0]))
        if self.drift is not None:
            if n > 1:
                raise ValueError("max_drift supports one optimizer; set max_drift=None for several optimizers")
            self.drift.remember(optimizer_params(self.optimizers[0]))

    def detach(self) -> None:
        """Remove the step hooks from the optimizers (at teardown)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def _make_step_hook(self, index: int) -> Callable:
        def hook(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
            self._step_calls[index] += 1

        return hook

    def index_of(self, optimizer: Optimizer) -> Optional[int]:
        """Position of ``optimizer`` among the attached ones, ``None`` when it is not attached."""
        for i, opt in enumerate(self.optimizers):
            if opt is optimizer:
                return i
        return None

    # ------------------------------------------------------------------ the local phase and the sync
    def begin_step(self, optimizer: Optimizer) -> int:
        """Call right before the optimizer step is attempted; returns the optimizer's index for
        :meth:`after_step`. Raises ``ValueError`` for an optimizer that was not attached."""
        index = self.index_of(optimizer)
        if index is None:
            raise ValueError("this optimizer is not attached to DES-LOC")
        self._calls_before[index] = self._step_calls[index]
        return index

    def wrap_closure(self, closure: Callable[[], Any], optimizer: Optimizer) -> Callable[[], Any]:
        """``closure`` followed by the gradient all-reduce inside the group (hierarchical mode with
        ``group_param_sync_every=1`` only)."""
        if self.groups is None or self.group_schedule is not None:
            return closure
        return self.groups.wrap_closure(closure, optimizer, self.bucket_cap_bytes)

    def after_step(self, index: int, optimizer: Optimizer) -> Optional[SyncPlan]:
        """Call right after the step attempt begun by :meth:`begin_step`.

        Returns ``None`` when the step did not happen (not counted) or nothing was due, else the plan of
        the round that ran (the outer round with hierarchical groups: a step with only an inner round
        returns ``None`` and leaves its plan in :attr:`last_group_plan`). On the first step, the
        optimizer's averaged state keys are checked against the schedule(s) (``ValueError`` naming keys
        without a period).
        """
        if self._step_calls[index] == self._calls_before[index]:
            return None  # skipped (e.g. AMP found inf gradients): not a step
        self._calls_before[index] = self._step_calls[index]
        self.optimizer_steps[index] += 1
        step = self.optimizer_steps[index]
        self.ledger.add_ddp_equivalent(gradient_bytes(optimizer))
        keys = self._state_keys[index]
        if keys is None:  # the optimizer's state exists from its first step on
            keys = self._state_keys[index] = tuple(sorted(averaged_state_keys(optimizer)))
            if self.auto is None:
                self.schedule.check_keys(keys)
            if self.group_schedule is not None:
                check_group_keys(self.group_schedule, keys)
        self.params_in_sync = False
        self.last_group_plan = None
        if self.auto is not None and self.auto.chosen is None:
            return self._auto_warmup_step(optimizer, step, keys)
        plan = self.schedule.due(step, keys)
        if self.drift is not None and not plan.params and self.drift.exceeded(
            step, optimizer_params(optimizer), self.ledger, self.group
        ):
            plan = SyncPlan(step, True, plan.states, plan.reset_states)
            self.early_syncs += 1
        if self.has_inner_level:
            assert self.group_schedule is not None
            # the inner round: what the inner level has due, and what the outer round is about to average
            inner = within_group_plan(plan, self.group_schedule.due(step, keys))
            self._group_round(optimizer, inner, with_buffers=index == 0)
            self._group_round_done = True
        try:
            if plan.empty:
                return None
            self.sync(optimizer, plan, with_buffers=index == 0)
            return plan
        finally:
            self._group_round_done = False

    def _auto_warmup_step(self, optimizer: Optimizer, step: int, keys: tuple[str, ...]) -> Optional[SyncPlan]:
        """Local steps are timed until the warm-up ends with a timed parameter average; then the periods
        are chosen and the schedule replaced."""
        assert self.auto is not None
        self.auto.stamp(time.perf_counter())
        if step < self.auto.warmup_steps:
            return None
        plan = SyncPlan(step, params=True)
        start = time.perf_counter()
        self.sync(optimizer, plan)
        total_steps = self.total_steps() if callable(self.total_steps) else self.total_steps
        k_x, periods = self.auto.decide(time.perf_counter() - start, optimizer_betas(optimizer, keys), self.ledger,
                                        self.group, total_steps=total_steps)
        policy = self.schedule.state_policy
        self.schedule = SyncSchedule(k_x, periods if policy == "average" else None, policy)
        from lightning.fabric.utilities.rank_zero import rank_zero_info

        rank_zero_info(
            f"DES-LOC auto periods: step {self.auto.measured['step_time_s'] * 1e3:.1f} ms, average "
            f"{self.auto.measured['round_time_s'] * 1e3:.1f} ms, budget {self.auto.comm_budget:.0%}, "
            f"longest period {self.auto.measured['max_period']:.0f} -> "
            f"param_sync_every={k_x}, state_sync_every={periods}"
        )
        self._emit({"comm/auto/param_sync_every": float(k_x),
                    "comm/auto/step_time_s": self.auto.measured["step_time_s"],
                    "comm/auto/round_time_s": self.auto.measured["round_time_s"],
                    "comm/auto/max_period": self.auto.measured["max_period"],
                    **{f"comm/auto/state_sync_every/{k}": float(v) for k, v in periods.items()}})
        return plan

    def _due_tensors(self, optimizer: Optimizer, plan: SyncPlan, with_buffers: bool) -> dict[str, list[Tensor]]:
        """The tensors ``plan`` says are due, by ledger category."""
        params = optimizer_params(optimizer)
        due: dict[str, list[Tensor]] = {}
        if plan.params:
            due["params"] = params
            buffers = list(self.buffers()) if with_buffers and self.buffers is not None else []
            if buffers:
                due["buffers"] = buffers
        for key in plan.states:
            due[f"state/{key}"] = [
                optimizer.state[p][key]
                for p in params
                if p in optimizer.state and is_averaged(key, optimizer.state[p].get(key), p)
            ]
        return due

    @property
    def has_inner_level(self) -> bool:
        """Whether ranks inside a group can differ and are averaged by an inner round before every outer
        round (hierarchical groups with ``group_param_sync_every > 1``, once the groups exist)."""
        return self.group_schedule is not None and self.groups is not None

    def _group_round(self, optimizer: Optimizer, plan: SyncPlan, with_buffers: bool) -> None:
        """The inner level's round: what ``plan`` names, averaged exactly within this rank's group in one
        coalesced round, bytes in :attr:`group_ledger`. Nothing is sent for an empty plan."""
        assert self.groups is not None
        self.last_group_plan = None if plan.empty else plan
        if not plan.empty:
            self.groups.average_within(self._due_tensors(optimizer, plan, with_buffers), self.bucket_cap_bytes)

    def sync(self, optimizer: Optimizer, plan: SyncPlan, with_buffers: bool = True) -> None:
        """Average what ``plan`` says is due for ``optimizer``'s parameters and states, in one round.

        Ledger categories: ``params``, ``buffers`` (the ``buffers`` callable's tensors, with the
        parameters when ``with_buffers``), ``state/<key>``; bytes are the payload one rank sends
        (``numel * element_size``, or the encoded size under compression).

        With an inner level (``group_param_sync_every > 1``) the categories of ``plan`` are averaged
        within the group first, so that this round across groups gives the world mean: by
        :meth:`after_step` in the step's inner round (with what the inner schedule has due), else here,
        in a round of their own (bytes in :attr:`group_ledger`).
        """
        params = optimizer_params(optimizer)
        if self.has_inner_level and not self._group_round_done:
            self._group_round(optimizer, plan, with_buffers)
        self._group_round_done = False
        due = self._due_tensors(optimizer, plan, with_buffers)
        average_(due, self.ledger, group=self.group, bucket_cap_bytes=self.bucket_cap_bytes,
                 compression=self.compression)
        if plan.params and self.outer is not None:
            self.outer.step(params)
            if self.compression is not None:  # int8 deltas are taken against the new global parameters
                self.compression.prime("params", params)
        if plan.reset_states:
            for p in params:
                for key, value in optimizer.state.get(p, {}).items():
                    if is_averaged(key, value, p):
                        value.zero_()
        if plan.params and self.drift is not None:
            self.drift.remember(params)
        if plan.params and len(self.optimizers) == 1:
            self.params_in_sync = True
        self._emit(self.ledger_metrics())

    def average_parameters(self, modules: Union[Module, Sequence[Module]], category: str = "params") -> None:
        """Average every parameter and floating buffer of ``modules`` now, exactly (no compression, no
        outer step); bytes go to ``category`` (buffers to ``"buffers"`` when ``category`` is ``"params"``).
        With an inner level, a round inside the group (bytes in :attr:`group_ledger`) comes first, so the
        result is the world mean."""
        modules = [modules] if isinstance(modules, Module) else list(modules)
        tensors: dict[str, list[Tensor]] = {category: unique_parameters(modules)}
        buffers = float_buffers(modules)
        if buffers:
            tensors.setdefault("buffers" if category == "params" else category, []).extend(buffers)
        if self.has_inner_level:
            assert self.groups is not None
            self.groups.average_within(tensors, self.bucket_cap_bytes)
        average_(tensors, self.ledger, group=self.group, bucket_cap_bytes=self.bucket_cap_bytes)
        self.params_in_sync = True

    def reach_consensus(self, modules: Union[Module, Sequence[Module]]) -> bool:
        """Leave every rank with the consensus parameters, as at the end of training: average them unless
        they already are (then nothing is sent), followed by the outer step when ``outer_lr`` is set.
        Returns whether a round ran."""
        if self.params_in_sync:
            return False
        self.average_parameters(modules)
        if self.outer is not None:
            self.outer.step(optimizer_params(self.optimizers[0]))
        self._emit(self.ledger_metrics())
        return True

    def ledger_metrics(self) -> Metrics:
        """The ledger as logger metrics (``comm/bytes/<category>``, totals, ratio); with groups, the inner
        level's ledger too, under ``comm/group/``."""
        metrics = self.ledger.as_dict()
        if self.groups is not None:
            metrics.update(self.group_ledger.as_dict("comm/group/"))
        return metrics

    def _emit(self, metrics: Metrics) -> None:
        if self.log is not None:
            self.log(metrics)
