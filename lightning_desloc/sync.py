"""The DES-LOC core: what happens after optimizer step ``s``, independent of Lightning.

:class:`DeslocSync` is what :class:`~lightning_desloc.DeslocStrategy` (Trainer) and
:class:`~lightning_desloc.fabric.DeslocFabricStrategy` (Fabric) share. It is built once from a
:class:`~lightning_desloc.config.DeslocConfig` and the runtime objects (a :class:`~lightning_desloc.comm.Comm`,
the buffers to average, a logging callable), is given the optimizers, and is told when one of them
stepped. :meth:`DeslocSync.after_step` then runs, top to bottom:

1. count step ``s``: every optimizer step the adapter attempted counts, also one whose update an AMP
   grad scaler skipped on this rank (found through ``register_step_post_hook`` and counted in
   :attr:`DeslocSync.skipped_steps`), because a scaler skips on each rank's own gradients and the
   schedule must stay identical on every rank without a collective per step (it is also what
   Lightning's ``global_step`` counts); add DDP's bytes for it (the optimizer's trainable parameter
   bytes) to the ledger;
2. ask each level's :class:`~lightning_desloc.schedule.SyncSchedule` what is due (the parameters when
   ``s % K_x == 0``, state ``k`` when ``s % K_k == 0``);
3. let the options adjust the outermost plan (:mod:`lightning_desloc.options`: the drift trigger,
   ``"auto"``'s timing);
4. run the rounds, innermost level first, each one coalesced round through its level's ``Comm``
   (:mod:`lightning_desloc.averaging`); a level also carries what the levels above it have due, so
   that the outermost round gives the mean over all ranks; the options with control slots frame the
   outermost round (``on_nonfinite``: each rank's finiteness flag, the masking, the correction) and
   read their slots on the host one step later, where the signals are read;
5. let the options act on the outermost round (the outer step, the ``reset`` baseline, ``"auto"``'s
   choice) and refresh the consensus snapshot (:mod:`lightning_desloc.snapshot`);
6. log the ledger.

Hierarchy is data: :attr:`DeslocSync.levels` is a list of :class:`Level` (a group, a schedule, a
ledger), innermost first; without ``group_size`` it holds one level, the world.

Example: with a single process (world size 1) nothing is sent and the schedule is still counted::

    >>> import torch
    >>> from lightning_desloc.config import DeslocConfig
    >>> core = DeslocSync(DeslocConfig(param_sync_every=2, state_sync_every={"exp_avg": 4, "exp_avg_sq": 4}))
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

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer

from lightning_desloc.adaptive import AutoPeriods, DriftTrigger, WarmupSchedule
from lightning_desloc.averaging import Contribution
from lightning_desloc.comm import Comm
from lightning_desloc.compression import CompressionOption, CompressionPlan
from lightning_desloc.config import DeslocConfig
from lightning_desloc.groups import check_group_keys, within_group_plan
from lightning_desloc.ledger import CommLedger
from lightning_desloc.nonfinite import NonfiniteGuard, all_finite
from lightning_desloc.options import (
    Metrics,
    ResetStates,
    Round,
    SyncOption,
    averaged_state_keys,
    is_averaged,
    optimizer_params,
)
from lightning_desloc.outer import OuterOptimizer
from lightning_desloc.overlap import BlockingRounds, OverlappedRounds
from lightning_desloc.schedule import SyncPlan, SyncSchedule, fragment_of
from lightning_desloc.sharding import local_tensors
from lightning_desloc.snapshot import ConsensusSnapshot

__all__ = ["SIGNALS", "DeslocSync", "Level", "averaged_state_keys", "is_averaged", "optimizer_params"]

#: yes/no signals the ranks agree on without a collective of their own (see :meth:`DeslocSync.raise_signal`):
#: ``"stop"``, some rank was asked to stop (a SIGTERM)
SIGNALS: tuple[str, ...] = ("stop",)

_log = logging.getLogger(__name__)


def _check_tensor_state(optimizer: Optimizer) -> None:
    """Raise when ``optimizer`` keeps history that is not per-parameter tensors (LBFGS's lists of past
    directions and steps): averaging the tensors and leaving the lists would mix one rank's curvature pairs
    with another's directions."""
    odd = sorted({key for p in optimizer_params(optimizer) for key, value in optimizer.state.get(p, {}).items()
                  if isinstance(value, (list, tuple, dict)) and _holds_tensors(value)})
    if odd:
        raise ValueError(
            f"{type(optimizer).__name__} keeps state that is not one tensor per parameter: {odd} hold lists of "
            "tensors (a history of past directions, as LBFGS keeps), which DES-LOC cannot average across ranks. "
            "Train it with strategy='ddp', or use an element-wise optimizer (Adam, AdamW, SGD, Adafactor, ...)."
        )


def _holds_tensors(value: Any) -> bool:
    items = value.values() if isinstance(value, dict) else value
    return any(isinstance(v, Tensor) or (isinstance(v, (list, tuple, dict)) and _holds_tensors(v)) for v in items)


def gradient_bytes(optimizer: Optimizer) -> int:
    """Bytes DDP would all-reduce for one step of ``optimizer``: its trainable parameters' sizes."""
    return sum(p.numel() * p.element_size() for p in optimizer_params(optimizer) if p.requires_grad)


class _GradientBytes:
    """:func:`gradient_bytes` without re-measuring every parameter each step: the sizes are kept per
    optimizer (taken again when its number of groups or of parameters changes: fine-tuning callbacks add
    a group when they unfreeze), while ``requires_grad`` is read at every call, so unfreezing inside an
    existing group (``requires_grad_(True)`` on parameters the optimizer already holds) counts at once."""

    def __init__(self) -> None:
        # id(optimizer) -> (number of groups, [(parameter, bytes)])
        self._cached: dict[int, tuple[int, list[tuple[Tensor, int]]]] = {}

    def __call__(self, optimizer: Optimizer) -> int:
        groups = len(optimizer.param_groups)
        cached = self._cached.get(id(optimizer))
        count = sum(len(group["params"]) for group in optimizer.param_groups)
        if cached is None or cached[0] != groups or len(cached[1]) != count:
            sizes = [(p, p.numel() * p.element_size()) for p in optimizer_params(optimizer)]
            cached = self._cached[id(optimizer)] = (groups, sizes)
        return sum(nbytes for p, nbytes in cached[1] if p.requires_grad)


def float_buffers(modules: Iterable[Module]) -> list[Tensor]:
    """Floating buffers of ``modules`` (running statistics), each once; integer buffers are not averaged."""
    return _unique(b for module in modules for b in module.buffers() if b.is_floating_point())


def unique_parameters(modules: Iterable[Module]) -> list[Tensor]:
    """Parameters of ``modules``, each once (modules may share submodules)."""
    return _unique(p for module in modules for p in module.parameters())


def _unique(tensors: Iterable[Tensor]) -> list[Tensor]:
    seen: set[int] = set()
    return [t for t in tensors if not (id(t) in seen or seen.add(id(t)))]  # type: ignore[func-returns-value]


@dataclass
class Level:
    """One level of averaging: its ranks (``comm``, with the level's ledger) and its schedule.

    ``schedule is None`` means the ranks of the level never differ: something keeps them equal every
    step, as :attr:`every_step` says (the core all-reduces the gradients, or FSDP2 reduce-scatters them)."""

    #: ``"world"`` (the outermost level) or ``"group"`` (inside hierarchical groups)
    name: str
    ledger: CommLedger
    schedule: Optional[Union[SyncSchedule, WarmupSchedule]]
    #: the level's collectives; an inner level gets its group at :meth:`DeslocSync.setup_groups`
    comm: Optional[Comm] = None
    #: what the level's round averaged after the last step (``None``: no round)
    last_plan: Optional[SyncPlan] = None
    #: with ``schedule is None``, what keeps the level's ranks equal every step: ``"gradients"``, the core
    #: all-reduces the gradients inside the level (``group_param_sync_every=1``); ``"fsdp"``, FSDP2 shards the
    #: module over the level and reduce-scatters the gradients itself (``shard_within_group=True``), so the
    #: core sends nothing there and the level above averages each rank's local shards
    every_step: str = "gradients"

    def due(self, step: int, keys: Sequence[str]) -> SyncPlan:
        return SyncPlan(step, False) if self.schedule is None else self.schedule.due(step, keys)

    def check_keys(self, keys: Sequence[str]) -> None:
        """Raise naming the state keys without a period (the inner level's message names ``group_...``)."""
        if self.schedule is None:
            return
        if self.name == "group":
            check_group_keys(self.schedule, keys)  # type: ignore[arg-type]
        else:
            self.schedule.check_keys(keys)


def build_options(config: DeslocConfig, snapshot: ConsensusSnapshot, level: Level,
                  info: Optional[Callable[[str], None]]) -> list[SyncOption]:
    """The options the config turns on, in the order they are called (see :mod:`lightning_desloc.options`)."""
    options: list[SyncOption] = []
    if config.on_nonfinite is not None:  # first: its correction must land before any other option reads the round
        per_slot = config.hierarchy.group_size if config.hierarchy is not None else 1
        options.append(NonfiniteGuard(config.on_nonfinite, config.state_policy, ranks_per_slot=per_slot))
    if config.drift is not None:
        options.append(DriftTrigger(config.drift, snapshot, level))
    if config.is_auto:
        a = config.auto
        options.append(AutoPeriods(a.warmup_steps, a.comm_budget, a.min_param_syncs, level=level, info=info))
    if config.outer is not None:
        o = config.outer
        options.append(OuterOptimizer(o.lr, o.momentum, o.nesterov, snapshot=snapshot))
    if config.state_policy == "reset":
        options.append(ResetStates())
    if config.compression:
        options.append(CompressionOption(config.compression, snapshot))
    return options


class DeslocSync:
    """The DES-LOC schedule run against live optimizers, with its communication ledger.

    Args:
        config: everything DES-LOC is told (:class:`~lightning_desloc.config.DeslocConfig`).
        comm: the world's collectives and the main ledger (a fake in single-process tests); a new
            :class:`~lightning_desloc.comm.Comm` over the default group when ``None``.
        buffers: returns the floating buffers averaged with the parameters of optimizer 0 (BatchNorm
            running statistics); ``None`` for none.
        log: called with the ledger's metrics (``comm/...``) after every round; ``None``: no logging.
        info: called with one-line messages for the user (rank 0's logger by default).
        total_steps: the run's length in optimizer steps, or a function returning it (called only when
            ``"auto"`` decides), or ``None``; with ``"auto"`` it caps ``K_x``.

    Attributes:
        levels: the levels of averaging, innermost first; the last is the world (or across groups).
        options: the mechanisms the config turned on, in call order.
        snapshot: the consensus parameters at the last average (kept when an option reads it).
        optimizer_steps: steps per attached optimizer, in attach order (see :meth:`after_step`).
        skipped_steps: of those, the steps whose update this rank's AMP grad scaler skipped.
        params_in_sync: whether every rank holds the same parameters right now (after setup's
            broadcast or a parameter average, until the next local step).
    """

    def __init__(
        self,
        config: Optional[DeslocConfig] = None,
        *,
        comm: Optional[Comm] = None,
        buffers: Optional[Callable[[], Sequence[Tensor]]] = None,
        log: Optional[Callable[[Metrics], None]] = None,
        info: Optional[Callable[[str], None]] = None,
        total_steps: Union[None, float, Callable[[], float]] = None,
    ) -> None:
        self.config = config if config is not None else DeslocConfig()
        self.comm = comm if comm is not None else Comm()
        self.buffers, self.log = buffers, log
        self.info = info if info is not None else self._info
        self.bucket_cap_bytes = self.config.bucket_cap_bytes
        world = Level("world", self.comm.ledger, self.config.schedule(), self.comm)
        if self.config.is_auto:
            world.schedule = WarmupSchedule(self.config.auto.warmup_steps, self.config.state_policy)
        inner = self.config.group_schedule()
        self.levels: list[Level] = [world]
        if self.config.hierarchy is not None:
            self.levels.insert(0, Level("group", CommLedger(), inner,
                                        every_step="fsdp" if self.config.shard_within_group else "gradients"))
        self.snapshot = ConsensusSnapshot()
        self.options = build_options(self.config, self.snapshot, world, self.info)
        #: how the outermost round's result reaches the tensors: at once, or ``overlap_steps`` later
        self.rounds = (OverlappedRounds(self.config.overlap_steps, self.config.overlap_local_weight)
                       if self.config.overlap_steps else BlockingRounds())
        self.total_steps = total_steps
        self._wire: Optional[CompressionPlan] = next(
            (o.plan for o in self.options if isinstance(o, CompressionOption)), None)
        self._needs_snapshot = any(o.needs_snapshot for o in self.options)
        self.optimizers: list[Optimizer] = []
        self.optimizer_steps: list[int] = []
        self.skipped_steps: list[int] = []
        self.params_in_sync = True
        #: per optimizer, the state keys equal on every rank right now (averaged by the last step's round)
        self._states_in_sync: list[set[str]] = []
        #: ids of the parameters frozen since setup: equal on every rank after the broadcast, never sent
        self._frozen_ids: set[int] = set()
        self._gradient_bytes = _GradientBytes()
        self._fragment_cache: dict[Optional[int], list[int]] = {}
        self._step_calls: list[int] = []
        self._calls_before: list[int] = []
        self._hooks: list[Any] = []
        self._state_keys: list[Optional[tuple[str, ...]]] = []
        self._raised: set[str] = set()
        self._signal_buffer: Optional[Tensor] = None
        #: the options' floats on the control tensor, after the signals: (option, its slice); set with the buffer
        self._control_slices: list[tuple[SyncOption, slice]] = []
        self._unread_signals = False
        #: the signals (:data:`SIGNALS`) some rank had raised by the last outermost round; equal on every
        #: rank, read one optimizer step after that round
        self.agreed: frozenset[str] = frozenset()

    def _info(self, message: str) -> None:
        if self.comm.rank == 0:
            _log.info(message)

    # ------------------------------------------------------------------ what the adapters read
    @property
    def ledger(self) -> CommLedger:
        """Bytes of the outermost level's rounds and of every collective the adapter meters."""
        return self.comm.ledger

    @property
    def schedule(self) -> Any:
        """The outermost level's schedule (replaced once by ``"auto"``)."""
        return self.levels[-1].schedule

    def use_schedule(self, schedule: SyncSchedule) -> None:
        """Put ``schedule`` in force on the outermost level (``"auto"``'s choice, or a resume's)."""
        self.levels[-1].schedule = schedule

    @property
    def group_level(self) -> Optional[Level]:
        """The level inside hierarchical groups, ``None`` without groups."""
        return self.levels[0] if len(self.levels) > 1 else None

    @property
    def keeps_snapshot(self) -> bool:
        """Whether an option reads the consensus snapshot (the core keeps one only then)."""
        return self._needs_snapshot

    def option(self, kind: type) -> Any:
        """The option of type ``kind`` if the config turned it on, else ``None``."""
        return next((o for o in self.options if isinstance(o, kind)), None)

    @property
    def total_steps(self) -> Union[None, float, Callable[[], float]]:
        return self._total_steps

    @total_steps.setter
    def total_steps(self, value: Union[None, float, Callable[[], float]]) -> None:
        self._total_steps = value
        auto = self.option(AutoPeriods) if hasattr(self, "options") else None
        if auto is not None:
            auto.total_steps = value

    # ------------------------------------------------------------------ setup
    def setup_groups(self, groups: Optional[tuple[Any, Any]] = None) -> None:
        """Create the hierarchical groups (collective: every rank, once) when ``group_size`` is set.
        ``groups``: this rank's ``(inner, outer)`` process groups when they exist already (a device mesh's
        ``"shard"`` and ``"replicate"`` groups), instead of new ones."""
        inner, outer = self.levels[0], self.levels[-1]
        if self.config.hierarchy is None or inner.comm is not None:
            return
        if groups is not None:
            inner.comm = Comm(inner.ledger, groups[0], self.comm.device)
            outer.comm = Comm(self.comm.ledger, groups[1], self.comm.device)
            return
        inner.comm, outer.comm = self.comm.split(self.config.hierarchy.group_size, inner.ledger)

    def attach(self, optimizers: Sequence[Optimizer]) -> None:
        """Start scheduling ``optimizers`` (all of them, again, when called a second time).

        Step counters are kept when their number does not change (a resume may have set them), else reset
        to zero. The current parameters are taken as the last consensus, so attach when every rank holds
        the same parameters.
        """
        self.detach()
        self.optimizers = list(optimizers)
        n = len(self.optimizers)
        self._step_calls, self._calls_before, self._state_keys = [0] * n, [0] * n, [None] * n
        self._states_in_sync = [set() for _ in range(n)]
        if len(self.optimizer_steps) != n:
            self.optimizer_steps = [0] * n
        if len(self.skipped_steps) != n:
            self.skipped_steps = [0] * n
        self._hooks = [opt.register_step_post_hook(self._make_step_hook(i)) for i, opt in enumerate(self.optimizers)]
        for option in self.options:
            option.attach(self, self.optimizers)
        if self._needs_snapshot:
            self.snapshot.take(optimizer_params(self.optimizers[0]))

    def note_frozen(self, params: Iterable[Tensor]) -> None:
        """Call right after setup's broadcast, when every rank holds rank 0's values: the parameters that do
        not require gradients now are equal on every rank and stay so while they remain frozen, so no
        round sends them (a frozen backbone costs nothing). One that is unfrozen later is averaged again
        from then on; one frozen later was never noted (it may differ between ranks) and is still averaged."""
        self._frozen_ids |= {id(p) for p in params if not p.requires_grad}  # Fabric: once per module

    def is_frozen(self, p: Tensor) -> bool:
        """Whether ``p`` has been frozen since setup (see :meth:`note_frozen`), so equal on every rank."""
        if id(p) not in self._frozen_ids:
            return False
        if p.requires_grad:  # unfrozen: from now on it trains locally
            self._frozen_ids.discard(id(p))
            return False
        return True

    def states_in_sync(self, index: int) -> frozenset[str]:
        """State keys of optimizer ``index`` equal on every rank right now: those the outermost round after
        the last step averaged (and applied at once). A checkpoint need not send them."""
        return frozenset(self._states_in_sync[index]) if index < len(self._states_in_sync) else frozenset()

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
        return next((i for i, opt in enumerate(self.optimizers) if opt is optimizer), None)

    # ------------------------------------------------------------------ signals
    def raise_signal(self, name: str) -> None:
        """Tell every rank ``name`` (one of :data:`SIGNALS`, e.g. ``"stop"`` on a SIGTERM) without a
        collective of its own: the flag rides on the next outermost averaging round, and one optimizer
        step after that round every rank finds it in :attr:`agreed`. Safe to call from a signal handler."""
        if name not in SIGNALS:
            raise ValueError(f"unknown signal {name!r}; the core carries {SIGNALS}")
        self._raised.add(name)

    def raised(self, name: str) -> bool:
        """Whether this rank has raised signal ``name``."""
        return name in self._raised

    def _signals_for_round(self, device: torch.device) -> Tensor:
        """The control tensor this rank sends: one float per signal, set with scalar fills (no host
        transfer), then the options' slots (:meth:`SyncOption.control_slots`: ``on_nonfinite``'s one flag
        per rank of the outermost level), zeroed here and written by the options before the round."""
        self._read_signals()  # a round that arrived at this very step must not be overwritten unread
        if self._signal_buffer is None or self._signal_buffer.device != device:
            outer = self.levels[-1].comm
            world = outer.world_size if outer is not None else 1
            start, self._control_slices = len(SIGNALS), []
            for option in self.options:
                n = option.control_slots(world)
                if n:
                    self._control_slices.append((option, slice(start, start + n)))
                    start += n
            self._signal_buffer = torch.zeros(start, dtype=torch.float32, device=device)
        buf = self._signal_buffer
        buf.zero_()
        for name in self._raised:
            buf[SIGNALS.index(name)] = 1.0
        return buf

    def _signals_arrived(self, mean: Tensor) -> None:
        """A round's signals arrived (``mean`` over ranks): read them one step later."""
        buf = self._signal_buffer
        if buf is not None and mean is not buf and mean.data_ptr() != buf.data_ptr():  # a view of it: in place
            buf[: mean.numel()].copy_(mean)
        self._unread_signals = True

    def _read_signals(self) -> None:
        # one step after the round, so that on a GPU the round has long finished when the host reads it
        if self._unread_signals and self._signal_buffer is not None:
            values = self._signal_buffer.tolist()
            self.agreed = frozenset(name for name, v in zip(SIGNALS, values) if v > 0)
            self._unread_signals = False
            for option, where in self._control_slices:  # may raise (on_nonfinite="raise"): on every rank alike
                option.read_control(values[where])

    def settle_control(self) -> None:
        """Read the last round's control values now instead of at the next step, and run the round they
        call for (``on_nonfinite="heal"``'s full round) at once: before a checkpoint save and at the end of
        fit, so that what is saved or kept is settled. Collective: call on every rank. Does nothing when
        no option puts values on the control tensor (the signals keep their one-step timing)."""
        if not self._control_slices:
            return
        self._read_signals()  # a host read: outside the step, where waiting for the device is fine
        for index, optimizer in enumerate(self.optimizers):
            step = self.optimizer_steps[index] - self.config.ddp_warmup_steps
            plan = SyncPlan(step, False)
            for option, _ in self._control_slices:
                plan = option.adjust(step, plan, optimizer)
            if not plan.empty:
                # overlap_steps: rounds in flight land first, so the healing round's snapshot is what every
                # rank holds now (it carries everything, so their rules are kept in its mean)
                self._apply_all_rounds()
                keys = self._state_keys[index] or tuple(sorted(averaged_state_keys(optimizer)))
                plans = [SyncPlan(step, False)] * (len(self.levels) - 1) + [plan]
                self._run_rounds(optimizer, plans, keys, with_buffers=index == 0)
                self._apply_all_rounds()  # overlap_steps: this round lands now, not tau steps later

    def check_finite_now(self, before: str = "a checkpoint save") -> None:
        """``on_nonfinite``, before a checkpoint save or consensus validation: a rank may have gone
        non-finite since the last round, and the save (or the validation's average) would take it into the
        main file (or into every rank's evaluated model). Each rank flags its parameters and every averaged
        state in one slot of a world-sized float32 tensor, averaged in one round (category ``control``: 4
        bytes per rank; a host read, outside the step). ``"raise"``: every rank raises before anything is
        written or averaged, so the last checkpoint stays the last good one. ``"heal"``: a full guarded round
        (parameters and every averaged state, over the finite ranks) first. ``before`` names what follows,
        for the message. Collective: call on every rank. Nothing happens without the guard."""
        guard = self.option(NonfiniteGuard)
        if guard is None or not self.optimizers:
            return
        if self.params_in_sync and all(set(averaged_state_keys(opt)) <= self._states_in_sync[i]
                                       for i, opt in enumerate(self.optimizers)):
            return  # right after a guarded round of everything (or setup): every rank holds finite means
        tensors = local_tensors([t for opt in self.optimizers for p in optimizer_params(opt)
                                 for t in [p, *(v for k, v in opt.state.get(p, {}).items() if is_averaged(k, v, p))]])
        device = optimizer_params(self.optimizers[0])[0].device
        world = self.comm.world_size if self.comm.distributed else 1
        flags = torch.zeros(world, dtype=torch.float32, device=device)
        flags[self.comm.rank if self.comm.distributed else 0].copy_(all_finite(tensors, device))
        if world > 1:
            self.comm.average_({"control": [flags]})
        values = flags.tolist()
        bad = [j for j, v in enumerate(values) if round(v * world) < 1]
        if not bad:
            return
        steps = self.optimizer_steps[0] if self.optimizer_steps else 0
        guard.found_before(before, bad, world, steps)  # raises with "raise", or with no finite rank
        self._apply_all_rounds()  # overlap_steps: rounds in flight land before the healing rounds' snapshot
        for index, optimizer in enumerate(self.optimizers):
            step = self.optimizer_steps[index] - self.config.ddp_warmup_steps
            keys = () if self.config.state_policy == "keep_local" else tuple(sorted(averaged_state_keys(optimizer)))
            self.sync(optimizer, SyncPlan(step, True, keys), with_buffers=index == 0)
        self._apply_all_rounds()  # overlap_steps: the healing rounds land now
        self.settle_control()

    def _before_round(self, plan: SyncPlan, optimizer: Optimizer, due: dict[str, list[Tensor]],
                      control: Tensor) -> Optional[Contribution]:
        """The options with control slots write them for the outermost round; a flag from any of them
        (a 0-dim bool device tensor) says whether this rank's values count in it."""
        flags = [flag for option, where in self._control_slices
                 if (flag := option.before_round(plan, optimizer, due, control[where])) is not None]
        if not flags:
            return None
        guard = next(((o, where) for o, where in self._control_slices if isinstance(o, NonfiniteGuard)), None)

        def scale() -> Tensor:  # compressed categories: M / n inside the coded round, once the control landed
            return guard[0].correction(control[guard[1]]) if guard is not None else torch.ones((), device=control.device)

        return Contribution(flags[0] if len(flags) == 1 else torch.stack(flags).all(), exempt=[control], scale=scale)

    def _round_landed(self, due: dict[str, list[Tensor]], control: Tensor) -> None:
        """A round's means have arrived (blocking: in ``due``'s tensors; ``overlap_steps``: in its flat
        mean buffers, before the delayed rule applies them) with ``control``, the mean control tensor."""
        for option, where in self._control_slices:
            option.round_landed(due, control[where])

    # ------------------------------------------------------------------ the step
    def begin_step(self, optimizer: Optimizer) -> int:
        """Call right before the optimizer step is attempted; returns the optimizer's index for
        :meth:`after_step`. Raises ``ValueError`` for an optimizer that was not attached."""
        index = self.index_of(optimizer)
        if index is None:
            raise ValueError("this optimizer is not attached to DES-LOC")
        self._calls_before[index] = self._step_calls[index]
        return index

    def wrap_closure(self, closure: Callable[[], Any], optimizer: Optimizer) -> Callable[[], Any]:
        """``closure`` followed by :meth:`average_gradients`, before clipping and the step (the Trainer's
        closure runs the backward pass)."""
        if not self.config.ddp_warmup_steps and not self._gradient_levels():
            return closure

        def closure_then_average_gradients() -> Any:
            out = closure()
            self.average_gradients(optimizer)
            return out

        return closure_then_average_gradients

    def _gradient_levels(self) -> list[Level]:
        return [lv for lv in self.levels[:-1]
                if lv.schedule is None and lv.comm is not None and lv.every_step == "gradients"]

    def in_warmup(self, optimizer: Optimizer) -> bool:
        """Whether the next step of ``optimizer`` is one of the first ``ddp_warmup_steps`` (trained as DDP)."""
        index = self.index_of(optimizer)
        return index is not None and self.optimizer_steps[index] < self.config.ddp_warmup_steps

    def average_gradients(self, optimizer: Optimizer) -> None:
        """The gradient all-reduce a step needs before it is taken, if any: over the world during the DDP
        warm-up (with the floating buffers, as DDP keeps them equal, and the signals, which have no other
        round to ride on then), else inside every level without a schedule (hierarchical groups with
        ``group_param_sync_every=1``). Call after the backward pass, before clipping and the step."""
        grads = [p.grad for p in optimizer_params(optimizer) if p.grad is not None]
        if self.in_warmup(optimizer):
            due: dict[str, list[Tensor]] = {"grads": grads}
            buffers = list(self.buffers()) if self.buffers is not None and self.index_of(optimizer) == 0 else []
            if buffers:
                due["buffers"] = buffers
            if grads:  # the signals only: the options' slots (on_nonfinite's flags) guard DES-LOC's rounds
                due["control"] = [self._signals_for_round(grads[0].device)[: len(SIGNALS)]]
            self.comm.average_(due, bucket_cap_bytes=self.bucket_cap_bytes)
            if grads and self.comm.distributed:
                self._signals_arrived(due["control"][0])
            return
        for level in self._gradient_levels():
            level.comm.average_({"grads": grads}, bucket_cap_bytes=self.bucket_cap_bytes)  # type: ignore[union-attr]

    def after_step(self, index: int, optimizer: Optimizer) -> Optional[SyncPlan]:
        """Call right after the step attempt begun by :meth:`begin_step`: everything that happens after
        optimizer step ``s``, in order.

        Every attempt counts as step ``s``, also one whose update this rank's AMP grad scaler skipped
        (counted in :attr:`skipped_steps`): the ranks' scalers decide on their own gradients, and counting
        only the updates that happened would put the ranks on different steps of the schedule, so that
        they enter different collectives. Returns ``None`` when the outermost level averaged nothing,
        else the plan of the outermost round (each level's plan is in ``level.last_plan``). Once the
        optimizer has state, its averaged state keys are checked against every level's schedule
        (``ValueError`` naming the keys without a period).
        """
        # 1. count the step, whether or not this rank's scaler let the update happen
        if self._step_calls[index] == self._calls_before[index]:
            self.skipped_steps[index] += 1
        self._calls_before[index] = self._step_calls[index]
        self._read_signals()
        self.optimizer_steps[index] += 1
        step = self.optimizer_steps[index]
        self.ledger.add_ddp_equivalent(self._gradient_bytes(optimizer))
        keys = self._keys_of(index, optimizer)
        warmup = self.config.ddp_warmup_steps
        if step <= warmup:  # a DDP step: the gradients were averaged, every rank took the same step
            return self._after_warmup_step(index, step, keys)
        self.params_in_sync = False
        self._states_in_sync[index] = set()
        local_step = step - warmup  # DES-LOC's schedule counts from the end of the warm-up
        # a round started overlap_steps ago lands now (never with overlap_steps=0)
        self.rounds.apply_due(index, local_step, optimizer, self._due_tensors_of, self._signals_arrived,
                              on_landed=self._round_landed)
        # 2. what each level's schedule has due
        plans = [level.due(local_step, keys) for level in self.levels]
        # 3. the options adjust the outermost plan (an early average, the auto warm-up's timing)
        for option in self.options:
            plans[-1] = option.adjust(local_step, plans[-1], optimizer)
        # 4.-6. the rounds, the options after them, the log
        return self._run_rounds(optimizer, plans, keys, with_buffers=index == 0)

    def _after_warmup_step(self, index: int, step: int, keys: tuple[str, ...]) -> None:
        self.params_in_sync = True
        self._states_in_sync[index] = set(keys)
        if step == self.config.ddp_warmup_steps and self._needs_snapshot:
            # the consensus the options measure from is where DES-LOC starts, not the setup weights
            self.snapshot.take(optimizer_params(self.optimizers[0]))
        return None

    def sync(self, optimizer: Optimizer, plan: SyncPlan, with_buffers: bool = True) -> None:
        """Average what ``plan`` says is due for ``optimizer`` now, outside the schedule: every inner level
        first averages the same, so the result is the mean over all ranks."""
        plans = [SyncPlan(plan.step, False)] * (len(self.levels) - 1) + [plan]
        self._run_rounds(optimizer, plans, tuple(sorted(averaged_state_keys(optimizer))), with_buffers)

    def _keys_of(self, index: int, optimizer: Optimizer) -> tuple[str, ...]:
        keys = self._state_keys[index]
        if keys is None:  # the optimizer's state exists from its first step on
            _check_tensor_state(optimizer)
            keys = self._state_keys[index] = tuple(sorted(averaged_state_keys(optimizer)))
            for level in self.levels:
                level.check_keys(keys)
            if all(k is not None for k in self._state_keys):  # every optimizer has stepped once
                self.config.check_state_keys(k for ks in self._state_keys for k in ks)  # type: ignore[union-attr]
        return keys

    def _run_rounds(self, optimizer: Optimizer, plans: list[SyncPlan], keys: tuple[str, ...],
                    with_buffers: bool) -> Optional[SyncPlan]:
        """One round per level, innermost first; a level's round also carries what every level above it
        has due. Then the options act on the outermost round, the snapshot is refreshed, the ledger logged."""
        carried = plans[-1]
        # the signals ride on the outermost round (and on the inner one before it, so that they reach
        # every rank): a mean over ranks, > 0 where any rank raised one
        signals = None if carried.empty else self._signals_for_round(optimizer_params(optimizer)[0].device)
        for level, plan in zip(self.levels[:-1], plans[:-1]):  # with two levels: the one inner level
            inner = within_group_plan(carried, plan)
            level.last_plan = None if inner.empty or level.schedule is None else inner
            if level.last_plan is not None and level.comm is not None:
                due = self._due_tensors(optimizer, inner, with_buffers)
                level.comm.average_({**due, "control": [signals]} if signals is not None else due,
                                    bucket_cap_bytes=self.bucket_cap_bytes)
        outer = self.levels[-1]
        outer.last_plan = None if carried.empty else carried
        if signals is None:
            return None
        start = time.perf_counter()
        assert outer.comm is not None
        due = self._due_tensors(optimizer, carried, with_buffers)
        contribution = self._before_round(carried, optimizer, due, signals)  # on_nonfinite: this rank's flag
        self.rounds.average(outer.comm, {**due, "control": [signals]},
                            index=self.index_of(optimizer) or 0, plan=carried, bucket_cap_bytes=self.bucket_cap_bytes,
                            on_control=self._signals_arrived, compression=self._wire, contribution=contribution,
                            on_landed=self._round_landed)  # on_nonfinite: the mean of the counted ranks, at landing
        for level in self.levels[:-1]:  # an inner level without a round now still has to hear them
            if level.last_plan is None and level.comm is not None:
                level.comm.average_({"control": [signals]})
        rnd = Round(carried.step, optimizer, carried, keys, time.perf_counter() - start)
        self._after_round(rnd)
        return carried

    def _after_round(self, rnd: Round, extra: Optional[Metrics] = None) -> None:
        metrics: Metrics = dict(extra or {})
        for option in self.options:
            metrics.update(option.after_round(rnd) or {})
        index = self.index_of(rnd.optimizer)
        if self.rounds.applies_now and index is not None and rnd.plan.whole_model:
            self._states_in_sync[index] |= set(rnd.plan.states)
        if rnd.plan.params and rnd.plan.whole_model:
            if self._needs_snapshot and not rnd.snapshot_taken:
                self.snapshot.take(optimizer_params(rnd.optimizer))
            if len(self.optimizers) == 1 and self.rounds.applies_now:
                self.params_in_sync = True
        self._emit({**self.ledger_metrics(), **metrics})

    def _due_tensors_of(self, index: int, plan: SyncPlan) -> dict[str, list[Tensor]]:
        return self._due_tensors(self.optimizers[index], plan, with_buffers=index == 0)

    def finish_rounds(self) -> None:
        """Wait for every round in flight (``overlap_steps``); each is still applied at its own step.
        Before anything that reads the consensus of all ranks (a checkpoint save, consensus validation)."""
        self.rounds.finish()

    def _apply_all_rounds(self) -> None:
        for index, optimizer in enumerate(self.optimizers):
            self.rounds.apply_due(index, self.optimizer_steps[index] - self.config.ddp_warmup_steps, optimizer, self._due_tensors_of,
                                  self._signals_arrived, everything=True, on_landed=self._round_landed)

    def _due_tensors(self, optimizer: Optimizer, plan: SyncPlan, with_buffers: bool) -> dict[str, list[Tensor]]:
        """The tensors ``plan`` says are due, by ledger category; this is where each state is averaged.
        With fragments, each due fragment adds its own parameters and states (floating buffers go with
        fragment 0)."""
        params = optimizer_params(optimizer)
        if plan.whole_model:
            return self._due_of(optimizer, params, plan.params, plan.states, with_buffers)
        fragment = self._fragments_of(optimizer)
        due: dict[str, list[Tensor]] = {}
        for f, params_due, states in plan.parts:
            part = [p for p, of in zip(params, fragment) if of == f]
            for cat, ts in self._due_of(optimizer, part, params_due, states, with_buffers and f == 0).items():
                due.setdefault(cat, []).extend(ts)
        return due

    def _due_of(self, optimizer: Optimizer, params: list[Tensor], params_due: bool, states: Sequence[str],
                with_buffers: bool) -> dict[str, list[Tensor]]:
        """The tensors due, each as this rank holds it: a DTensor (FSDP2, ``shard_within_group``) as its
        local shard, which the ranks at its position in the other groups hold too."""
        due: dict[str, list[Tensor]] = {}
        if params_due:
            # int8 parameters travel as the change since the snapshot of every parameter: keep them all
            delta_coded = self._wire is not None and self._wire.needs_snapshot
            due["params"] = params if delta_coded else [p for p in params if not self.is_frozen(p)]
            buffers = list(self.buffers()) if with_buffers and self.buffers is not None else []
            if buffers:
                due["buffers"] = buffers
        for key in states:
            due[f"state/{key}"] = [
                optimizer.state[p][key]
                for p in params
                if p in optimizer.state and is_averaged(key, optimizer.state[p].get(key), p)
            ]
        return {cat: local_tensors(ts) for cat, ts in due.items()}

    def _fragments_of(self, optimizer: Optimizer) -> list[int]:
        """The fragment of each of ``optimizer``'s parameters (:func:`~lightning_desloc.schedule.fragment_of`),
        computed once; raises when a fragment would hold no parameter."""
        index = self.index_of(optimizer)
        cached = self._fragment_cache.get(index)
        if cached is None:
            sizes = [p.numel() for p in optimizer_params(optimizer)]
            cached = fragment_of(sizes, self.config.fragments)
            empty = sorted(set(range(self.config.fragments)) - set(cached))
            if empty:
                raise ValueError(
                    f"fragments={self.config.fragments} leaves fragment(s) {empty} of optimizer {index} without "
                    f"parameters: its {len(sizes)} parameter tensors have sizes {sizes}, and a parameter is not split. "
                    "Use fewer fragments.")
            self._fragment_cache[index] = cached
        return cached

    # ------------------------------------------------------------------ rounds outside the schedule
    def average_parameters(self, modules: Union[Module, Sequence[Module]], category: str = "params") -> None:
        """Average every parameter and floating buffer of ``modules`` now, exactly (no compression, no
        outer step), through every level that can differ; bytes of the outermost go to ``category``
        (buffers to ``"buffers"`` when ``category`` is ``"params"``)."""
        self.finish_rounds()  # a round in flight has arrived before the consensus round goes out
        modules = [modules] if isinstance(modules, Module) else list(modules)
        tensors: dict[str, list[Tensor]] = {category: [p for p in unique_parameters(modules) if not self.is_frozen(p)]}
        buffers = float_buffers(modules)
        if buffers:
            tensors.setdefault("buffers" if category == "params" else category, []).extend(buffers)
        tensors = {cat: local_tensors(ts) for cat, ts in tensors.items()}  # DTensors: the local shards
        for level in self.levels:
            if level.comm is not None and (level.schedule is not None or level is self.levels[-1]):
                level.comm.average_(tensors, bucket_cap_bytes=self.bucket_cap_bytes)
        self.params_in_sync = True

    def reach_consensus(self, modules: Union[Module, Sequence[Module]]) -> bool:
        """Leave every rank with the consensus parameters, as at the end of training: average them unless
        they already are (then nothing is sent), then the options act as after a parameter average (the
        outer step when ``outer_lr`` is set). Returns whether a round ran. A round still in flight is
        applied first (the rules keep the mean, so the consensus is the same either way), and the last
        round's control values are settled (:meth:`settle_control`: ``on_nonfinite`` raises or heals here
        rather than at a step that will not come)."""
        self._apply_all_rounds()
        self.settle_control()
        if self.params_in_sync:
            return False
        if any(o.control_slots(1) for o in self.options) and self._one_optimizer_holds(modules):
            # on_nonfinite: the last average is a guarded round too (the parameters, the signals and the
            # flags), settled at once: a rank that went non-finite after the last scheduled round is left
            # out (and healed, or every rank raises) instead of spreading into the final model
            step = self.optimizer_steps[0] - self.config.ddp_warmup_steps
            keys = self._state_keys[0] or tuple(sorted(averaged_state_keys(self.optimizers[0])))
            plans = [SyncPlan(step, False)] * (len(self.levels) - 1) + [SyncPlan(step, True)]
            self._run_rounds(self.optimizers[0], plans, keys, with_buffers=True)
            self._apply_all_rounds()  # overlap_steps: the closing round lands now
            self.settle_control()
            return True
        self.average_parameters(modules)
        if self.optimizers:
            step = self.optimizer_steps[0]
            self._after_round(Round(step, self.optimizers[0], SyncPlan(step, params=True), (), 0.0))
        return True

    def _one_optimizer_holds(self, modules: Union[Module, Sequence[Module]]) -> bool:
        """Whether a round of optimizer 0's parameters (and the buffers) averages exactly what
        :meth:`average_parameters` would for ``modules``: one optimizer holding all their trained parameters."""
        if len(self.optimizers) != 1:
            return False
        modules = [modules] if isinstance(modules, Module) else list(modules)
        held = {id(p) for p in optimizer_params(self.optimizers[0]) if not self.is_frozen(p)}
        wanted = {id(p) for p in unique_parameters(modules) if not self.is_frozen(p)}
        buffers = {id(b) for b in self.buffers()} if self.buffers is not None else set()
        return held == wanted and buffers == {id(b) for b in float_buffers(modules)}

    # ------------------------------------------------------------------ metrics and state
    def ledger_metrics(self) -> Metrics:
        """The ledger as logger metrics (``comm/bytes/<category>``, totals, ratio); the inner level's, once
        its groups exist, under ``comm/group/``."""
        metrics = self.ledger.as_dict()
        for level in self.levels[:-1]:
            if level.comm is not None:
                metrics.update(level.ledger.as_dict(f"comm/{level.name}/"))
        return metrics

    def _emit(self, metrics: Metrics) -> None:
        if self.log is not None:
            self.log(metrics)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the core, in two parts.

        ``"shared"`` is equal on every rank (step counters, the schedule in force, the consensus snapshot,
        the shared options' state) and goes once into the main file, with rank 0's ledger; ``"local"`` is
        this rank's own (its ledgers, the per-rank options' state) and goes into its shard."""
        schedule = self.schedule
        shared = {
            "optimizer_steps": list(self.optimizer_steps),
            "schedule": {"param_sync_every": schedule.param_sync_every,
                         "state_sync_every": dict(schedule.state_sync_every),
                         "state_policy": schedule.state_policy},
            "snapshot": self.snapshot.state_dict() if self._needs_snapshot else None,
            "options": {o.name: o.state_dict() for o in self.options if o.shared},
            "ledger": self.ledger.state_dict(),
        }
        local = {
            "optimizer_steps": list(self.optimizer_steps),
            "skipped_steps": list(self.skipped_steps),
            "ledgers": {level.name: level.ledger.state_dict() for level in self.levels},
            "options": {o.name: o.state_dict() for o in self.options if not o.shared},
            "in_flight": self.rounds.state_dict(),
            "overlap_previous_means": self.rounds.progress_state_dict(),
        }
        return {"shared": shared, "local": local}

    def load_state_dict(self, state: dict[str, Any], device: Optional[torch.device] = None) -> None:
        """Restore :meth:`state_dict`. ``state["local"]`` is ``None`` when this rank has no state of its
        own (a resume from the consensus): the per-rank options start afresh and the ledger continues
        rank 0's. What this process has sent since it started (setup's broadcast) is kept on top.
        ``device``: where tensor state goes (the parameters' device; ``None``: where it was saved)."""
        shared, local = state["shared"], state.get("local")
        self.set_steps((local or shared)["optimizer_steps"])
        skipped = [int(k) for k in (local or {}).get("skipped_steps", [])][: len(self.optimizers)]
        self.skipped_steps = skipped + [0] * (len(self.optimizers) - len(skipped))
        self._states_in_sync = [set() for _ in self.optimizers]  # what a resume restored may differ by rank
        if local is not None:
            for level in self.levels:
                if level.name in local["ledgers"]:
                    level.ledger.load_state_dict(merge_ledgers(local["ledgers"][level.name], level.ledger.state_dict()))
        elif shared.get("ledger") is not None:
            self.ledger.load_state_dict(merge_ledgers(shared["ledger"], self.ledger.state_dict()))
        if shared.get("snapshot") is not None and self._needs_snapshot:
            self.snapshot.load_state_dict(shared["snapshot"], device)
        for option in self.options:
            part = shared if option.shared else (local or {})
            option.load_state_dict(part.get("options", {}).get(option.name), device)
        # rounds in flight belong to this rank's own state: a consensus resume starts without
        self.rounds.load_state_dict((local or {}).get("in_flight"), device)
        self.rounds.load_progress_state_dict((local or {}).get("overlap_previous_means"), device)

    def set_steps(self, steps: Sequence[int]) -> None:
        """Set the step counters (a resume), one per attached optimizer; missing ones start at 0."""
        n = len(self.optimizers)
        steps = [int(s) for s in steps][:n]
        self.optimizer_steps = steps + [0] * (n - len(steps))


def merge_ledgers(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """The saved ledger plus what this process has sent since it started (setup broadcast, control)."""
    out = {
        "bytes": dict(saved["bytes"]),
        "rounds_by_category": dict(saved["rounds_by_category"]),
        "rounds": saved["rounds"] + current["rounds"],
        "calls": saved.get("calls", saved["rounds"]) + current.get("calls", current["rounds"]),
        "ddp_equivalent_bytes": saved["ddp_equivalent_bytes"] + current["ddp_equivalent_bytes"],
        "largest_round_bytes": max(saved.get("largest_round_bytes", 0), current.get("largest_round_bytes", 0)),
    }
    for key in ("bytes", "rounds_by_category"):
        for cat, value in current[key].items():
            out[key][cat] = out[key].get(cat, 0) + value
    return out
