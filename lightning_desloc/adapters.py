"""What the two Lightning adapters (Trainer and Fabric strategies) share, kept out of the core.

* :func:`build_core`: the flat, typed arguments of a strategy's signature -> a
  :class:`~lightning_desloc.config.DeslocConfig` -> a :class:`~lightning_desloc.sync.DeslocSync`;
* :class:`MeteredCollectives`: every collective Lightning or the user asks the strategy for goes into
  the core's ledger (through its :class:`~lightning_desloc.comm.Comm`);
* closing gloo when a worker ends (:func:`close_process_group`, :func:`close_process_group_at_exit`);
* the liveness watch of :mod:`lightning_desloc.liveness` (``peer_timeout_s``): started with the process
  group (``setup_environment``), stopped by :func:`stop_watching_peers` (teardown) or at the exit.
"""

from __future__ import annotations

import atexit
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any, Optional

import torch.distributed as dist
from lightning.fabric.utilities.rank_zero import rank_zero_info
from torch import Tensor

from lightning_desloc import liveness
from lightning_desloc.config import DeslocConfig
from lightning_desloc.ledger import CommLedger
from lightning_desloc.sync import DeslocSync


def build_core(arguments: dict[str, Any], **runtime: Any) -> DeslocSync:
    """The core from a strategy's own arguments (those :meth:`DeslocConfig.from_arguments` takes) and
    the runtime objects (``buffers``, ``log``, ``total_steps``)."""
    config = DeslocConfig.from_arguments(**arguments)
    return DeslocSync(config, info=rank_zero_info, **runtime)


class MeteredCollectives:
    """Mixin for a Lightning or Fabric strategy with a ``core``: every collective Lightning or the user
    asks the strategy for is recorded. Gathers and reductions count under the current category
    (``metrics`` unless :meth:`_metered_as` says otherwise), barriers, broadcasts and boolean decisions
    under ``control``. Put it before the strategy's base class."""

    core: DeslocSync
    _collective_category = "metrics"

    @property
    def ledger(self) -> CommLedger:
        """Bytes per category of every collective this strategy issued, and DDP's bytes for the same steps."""
        return self.core.ledger

    @property
    def schedule(self) -> Any:
        """The :class:`~lightning_desloc.schedule.SyncSchedule` in force (replaced once by ``"auto"``)."""
        return self.core.schedule

    @property
    def optimizer_steps(self) -> list[int]:
        """Completed optimizer steps, one counter per optimizer."""
        return self.core.optimizer_steps

    @optimizer_steps.setter
    def optimizer_steps(self, steps: list[int]) -> None:
        self.core.optimizer_steps = list(steps)

    @property
    def early_syncs(self) -> int:
        """Parameter averages the drift trigger (``max_drift``) added to the schedule."""
        from lightning_desloc.adaptive import DriftTrigger

        drift = self.core.option(DriftTrigger)
        return 0 if drift is None else drift.early_syncs

    def setup_environment(self) -> None:
        super().setup_environment()  # type: ignore[misc]
        # Lightning broadcasts before the strategy's setup (ModelCheckpoint.setup, the log dir): the
        # control tensors must already be on the rank's device, NCCL rejects CPU tensors
        self.core.comm.device = self.root_device  # type: ignore[attr-defined]
        # here rather than in setup: the user's setup hooks run in between, and a rank dying there must
        # not leave the others waiting in their first collective
        liveness.watch_process_group(self.core.config.peer_timeout_s)

    def _meter(self, tensor: Any) -> None:
        if isinstance(tensor, Tensor):
            self.core.comm.meter(self._collective_category, tensor.numel() * tensor.element_size())

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
        self.core.comm.meter("control", 0)
        super().barrier(*args, **kwargs)  # type: ignore[misc]

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        # Our own pickled broadcast (size, then payload) so that the bytes are known exactly.
        return self.core.comm.broadcast_object(obj, src, "control")


def close_process_group(timeout_s: float = 30.0) -> None:
    """End of a spawned/forked worker: wait (at most ``timeout_s`` seconds) for every rank, then close
    gloo. Without it gloo's background threads can abort the interpreter at exit ("terminate called
    without an active exception")."""
    liveness.stop_watching(left=True)  # a normal end: peers must not take this rank's silence for a death
    if dist.is_available() and dist.is_initialized():
        with suppress(Exception):
            _wait_for_every_rank(timeout_s)
        dist.destroy_process_group()


_exit_hook_registered = False
_failed = False


def mark_failed() -> None:
    """This process is going down on an error (the strategy's ``on_exception``): its exit must not wait
    for the other ranks, one of which may be blocked in a collective this rank will never join."""
    global _failed
    _failed = True


def stop_watching_peers() -> None:
    """End of a strategy's stage (its ``teardown``): stop the liveness watch of
    :mod:`lightning_desloc.liveness`. After a normal end this rank says ``left``; after
    :func:`mark_failed` it stays silent, so that its peers stop waiting for it within ``peer_timeout_s``."""
    liveness.stop_watching(left=not _failed)


def close_process_group_at_exit(timeout_s: float = 30.0) -> None:
    """Close the default process group when the interpreter exits, as :func:`close_process_group` does
    for spawned workers. For processes that live on after ``fit`` (the script launched by the Trainer's
    default launcher, ``torchrun`` workers). Registered once per process.

    A healthy exit first waits, at most ``timeout_s`` seconds, until every rank has reached its own exit,
    through the rendezvous store rather than a collective: a collective (even gloo's monitored barrier)
    could pair with a peer's pending one and block for the process group's timeout. A process exiting on
    an error (:func:`mark_failed`, or an uncaught exception) does not wait at all."""
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_close_at_exit, timeout_s)
        _exit_hook_registered = True


def _close_at_exit(timeout_s: float) -> None:
    failing = _failed or getattr(sys, "last_value", None) is not None  # set by an uncaught exception
    # a watch still running (Fabric has no teardown) ends before the wait below, which it would otherwise
    # see as this rank's silence; its last store request comes before this rank counts itself out
    liveness.stop_watching(left=not failing)
    if not (dist.is_available() and dist.is_initialized()):
        return  # never initialised, or already closed (spawned workers)
    if not failing:
        with suppress(Exception):  # a peer gone (its store with it) or stuck: close this rank's side anyway
            _wait_for_every_rank(timeout_s)
    with suppress(Exception):
        dist.destroy_process_group()


def _wait_for_every_rank(timeout_s: float) -> None:
    """Count this rank in at the store and poll until every rank is in or ``timeout_s`` seconds passed.

    Rank 0 (which hosts the store under the Trainer's launchers) then also waits until every rank has
    made its last store request, so no rank finds the store gone (a noisy C++ warning)."""
    store = dist.distributed_c10d._get_default_store()
    world, rank = dist.get_world_size(), dist.get_rank()
    deadline = time.monotonic() + timeout_s

    def count_in(key: str, wait: bool) -> None:
        store.add(key, 1)
        while wait and store.add(key, 0) < world and time.monotonic() < deadline:
            time.sleep(0.05)

    count_in("lightning_desloc/exit/arrived", wait=True)
    count_in("lightning_desloc/exit/left", wait=rank == 0)
