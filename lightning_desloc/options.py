"""The extension interface: an optional mechanism is a :class:`SyncOption`, called at fixed points.

The core (:meth:`DeslocSync.after_step <lightning_desloc.sync.DeslocSync.after_step>`) runs each
completed optimizer step the same way, top to bottom::

    read last round's control values  ->  option.read_control(...)  (an option with control slots)
      ->  count the step  ->  ask each level's schedule what is due  ->  option.adjust(...)  (every option)
      ->  run the rounds, innermost level first: the outermost is framed by option.before_round(...)
      and option.round_landed(...)  ->  option.after_round(...)  (when the outermost level averaged
      something)  ->  refresh the consensus snapshot  ->  log the ledger

An option may put floats of its own on the control tensor that rides on every outermost round
(:meth:`SyncOption.control_slots`): it writes them on the device before the round
(:meth:`SyncOption.before_round`), sees their mean on the device when the round has landed
(:meth:`SyncOption.round_landed`) and reads them on the host one optimizer step later
(:meth:`SyncOption.read_control`), when the device has long finished the round: no host
synchronisation in the step and no collective of its own.

An option never runs a round of its own and the step never asks which options are on: the options
are chosen once, from the config, when the core is built. Each owns its state: :meth:`state_dict` is
saved in checkpoints, in the main file when :attr:`SyncOption.shared` (equal on every rank) or in each
rank's shard otherwise.

The options of this package: :class:`~lightning_desloc.adaptive.DriftTrigger` (adjust: an early
parameter average), :class:`~lightning_desloc.adaptive.AutoPeriods` (adjust: time the warm-up;
after_round: choose the periods), :class:`~lightning_desloc.outer.OuterStep` (after_round: the outer
SGD step), :class:`ResetStates` (after_round: the ``"reset"`` baseline),
:class:`~lightning_desloc.compression.CompressionOption` (the wire format of the outermost round, and
its error-feedback memory) and :class:`~lightning_desloc.nonfinite.NonfiniteGuard` (``on_nonfinite``:
control slots, before_round, round_landed, read_control, adjust). A new one subclasses
:class:`SyncOption` and overrides what it needs; :class:`ResetStates` below is a complete example.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch.optim import Optimizer

from lightning_desloc.schedule import NEVER_AVERAGED_KEYS, SyncPlan

if TYPE_CHECKING:
    from lightning_desloc.sync import DeslocSync

Metrics = dict[str, float]


@dataclass
class Round:
    """The outermost round of one step, as the options see it after it ran."""

    #: the optimizer step ``s`` it followed
    step: int
    optimizer: Optimizer
    #: what it averaged
    plan: SyncPlan
    #: the optimizer's averaged state keys
    state_keys: tuple[str, ...]
    #: wall time of the round, seconds
    seconds: float
    #: set by an option that wrote the new global parameters into the snapshot itself (the outer step)
    snapshot_taken: bool = False


class SyncOption:
    """An optional mechanism of the step. Every method has a do-nothing default."""

    #: key of its state in checkpoints
    name: str = "option"
    #: whether its state is equal on every rank (saved once, in the main file) or per rank (shards)
    shared: bool = True
    #: whether it reads the core's consensus snapshot (the core then keeps one)
    needs_snapshot: bool = False

    def attach(self, core: "DeslocSync", optimizers: Sequence[Optimizer]) -> None:
        """The core starts scheduling ``optimizers``; raise ``ValueError`` for what the option cannot do."""

    def adjust(self, step: int, plan: SyncPlan, optimizer: Optimizer) -> SyncPlan:
        """Before the rounds of step ``step``: return the outermost level's plan, changed or not."""
        return plan

    def after_round(self, rnd: Round) -> Optional[Metrics]:
        """After the outermost round: act on its result; metrics returned are logged with the ledger."""
        return None

    def control_slots(self, world: int) -> int:
        """Floats this option adds to the control tensor of every outermost round of ``world`` ranks."""
        return 0

    def before_round(self, plan: SyncPlan, optimizer: Optimizer, due: dict[str, list[torch.Tensor]],
                     slots: torch.Tensor) -> Optional[torch.Tensor]:
        """Right before the outermost round of ``plan`` carries ``due`` (by ledger category): write this
        option's ``slots`` (a view of the control tensor, zeroed) on the device. May return a 0-dim bool
        tensor, whether this rank's values count in the round (False: it sends zeros)."""
        return None

    def round_landed(self, due: dict[str, list[torch.Tensor]], slots: torch.Tensor) -> None:
        """The round's mean is in ``due``'s tensors and ``slots`` holds the mean over ranks of this option's
        control slots, on the device: act on them without reading them on the host."""

    def read_control(self, values: list[float]) -> None:
        """One optimizer step after a round (or at the end of fit): the host values of :meth:`round_landed`'s
        ``slots``; equal on every rank, so a decision taken here (an error) is taken by every rank."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Optional[dict[str, Any]], device: Optional[torch.device] = None) -> None:
        """Restore :meth:`state_dict`; ``None`` when there is none for this rank (a resume from the consensus)."""


def one_optimizer(optimizers: Sequence[Optimizer], what: str) -> None:
    """The options that keep one flat copy of the parameters support one optimizer."""
    if len(optimizers) > 1:
        raise ValueError(f"{what} support one optimizer; turn them off for several optimizers")


class ResetStates(SyncOption):
    """``state_policy="reset"``: zero every averaged tensor state right after each parameter average
    (the schedule marks those plans ``reset_states``); ``step`` is kept."""

    name = "reset"

    def after_round(self, rnd: Round) -> Optional[Metrics]:
        if rnd.plan.reset_states:
            for group in rnd.optimizer.param_groups:
                for p in group["params"]:
                    for key, value in rnd.optimizer.state.get(p, {}).items():
                        if is_averaged(key, value, p):
                            value.zero_()
        return None


def optimizer_params(optimizer: Optimizer) -> list[torch.Tensor]:
    """Every parameter of ``optimizer``, in param-group order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def averaged_state_keys(optimizer: Optimizer) -> set[str]:
    """State keys of ``optimizer`` that DES-LOC averages: per-parameter floating tensors, not counters."""
    return {key for p in optimizer_params(optimizer) for key, value in optimizer.state.get(p, {}).items()
            if is_averaged(key, value, p)}


def is_averaged(key: str, value: Any, param: Optional[torch.Tensor]) -> bool:
    """Whether state ``key`` = ``value`` of ``param`` is averaged: a floating tensor, not a counter, and not
    a scalar unless the parameter itself is one (``param=None``: unknown, so a scalar is not averaged)."""
    if key in NEVER_AVERAGED_KEYS or not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return False
    return value.dim() > 0 or (param is not None and param.dim() == 0)
