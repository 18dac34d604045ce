"""Fault injection for the failure tests: end one rank at a chosen optimizer step, in a chosen phase.

A :class:`Fault` says which rank, when and how; a worker reads it from the environment
(:meth:`Fault.from_env`, variable :data:`ENV`, JSON) and adds :class:`FaultInjector` to its Trainer's
callbacks. The phases:

* ``"local"``: in a local step, right after optimizer step ``step`` (``on_train_batch_end``);
* ``"round"``: inside an averaging round: the ``call``-th ``torch.distributed.all_reduce`` issued since
  the start of the batch that makes optimizer step ``step`` (the parameter round after step ``s`` runs
  inside that step, so ``step`` should be a multiple of ``param_sync_every``). The fault hits right after
  the call was issued, so the peers are inside the same collective. The wrapper is installed in the
  faulting rank only, and only in the test's worker;
* ``"save"``: inside a checkpoint save: the ``call``-th call of
  :func:`lightning_desloc.checkpoint._fault_point` named ``point`` (``"write"``: while a file is written;
  ``"shard_written"``, ``"committed"``) whose path ends with ``path_endswith``, at or after step ``step``.

The actions:

* ``"kill"``: ``SIGKILL`` to itself. The kernel closes the process's sockets, so on one machine its gloo
  peers get "Connection closed by peer" at their next collective;
* ``"vanish"``: ``SIGKILL`` to itself while a forked child keeps every socket of the process open for
  ``hold_s`` seconds: its peers see neither a close nor a reset, as when a machine is lost or cut off
  (power, network). Only a liveness signal tells them;
* ``"lose_host"``: ``"vanish"`` and the torchrun agent (the parent process) killed with it, as when the
  whole machine is lost (under torchrun only);
* ``"raise"``: a ``RuntimeError`` naming the fault.

With ``record`` set, the faulting rank first creates that file (exclusively, so a restarted attempt or a
replacement machine running the same command never fires again) with what it did, ``time.time()`` just
before the act (the tests measure from it; every process of a test runs on one machine, one clock) and
the holder's pid.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal, Optional

import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

#: the environment variable a worker reads its fault from
ENV = "DESLOC_TEST_FAULT"

Phase = Literal["local", "round", "save"]
Action = Literal["kill", "vanish", "lose_host", "raise"]


@dataclass(frozen=True)
class Fault:
    """One injected fault (see the module docstring)."""

    rank: int
    step: int
    phase: Phase = "local"
    action: Action = "kill"
    #: round: which ``all_reduce`` call since the start of step ``step``'s batch; save: which matching fault point
    call: int = 1
    #: save: the :func:`~lightning_desloc.checkpoint._fault_point` name
    point: str = "write"
    #: save: only fault points whose path ends with this
    path_endswith: str = ""
    #: file the faulting rank creates before acting (JSON); its existence stops any later firing
    record: str = ""
    #: vanish, lose_host: seconds the holder keeps the dead process's sockets open
    hold_s: float = 90.0

    def __post_init__(self) -> None:
        if self.phase not in ("local", "round", "save"):
            raise ValueError(f"unknown fault phase {self.phase!r}")
        if self.action not in ("kill", "vanish", "lose_host", "raise"):
            raise ValueError(f"unknown fault action {self.action!r}")

    def to_env(self) -> dict[str, str]:
        return {ENV: json.dumps(asdict(self))}

    @classmethod
    def from_env(cls) -> Optional["Fault"]:
        text = os.environ.get(ENV)
        return cls(**json.loads(text)) if text else None


def read_record(path: Any) -> Optional[dict[str, Any]]:
    """What the faulting rank wrote before acting, or ``None`` (not fired, or not written yet)."""
    try:
        with open(path) as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def _sha256(path: str) -> Optional[str]:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def _hold_sockets(hold_s: float) -> int:
    """Fork a child that keeps this process's descriptors open for ``hold_s`` seconds; returns its pid."""
    pid = os.fork()
    if pid == 0:  # the holder: nothing but sleeping runs here (the parent's threads do not exist in it)
        try:
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):  # but not the output pipes: a reader waiting for their end would wait too
                os.dup2(devnull, fd)
            time.sleep(hold_s)
        finally:
            os._exit(0)
    return pid


class FaultInjector(Callback):
    """Fires ``fault`` in this process when it is rank ``fault.rank`` (add it on every rank)."""

    def __init__(self, fault: Optional[Fault]) -> None:
        self.fault = fault
        self._trainer: Any = None
        self._armed = False
        self._calls = 0
        self._restore: list[tuple[Any, str, Any]] = []

    def _mine(self, trainer: Any) -> bool:
        f = self.fault
        return f is not None and trainer.global_rank == f.rank and not (f.record and os.path.exists(f.record))

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if not self._mine(trainer):
            return
        self._trainer = trainer
        assert self.fault is not None
        if self.fault.phase == "round":
            self._patch(dist, "all_reduce", self._wrap_all_reduce(dist.all_reduce))
        elif self.fault.phase == "save":
            from lightning_desloc import checkpoint

            self._patch(checkpoint, "_fault_point", self._wrap_fault_point(checkpoint._fault_point))

    def _patch(self, owner: Any, name: str, replacement: Any) -> None:
        self._restore.append((owner, name, getattr(owner, name)))
        setattr(owner, name, replacement)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        for owner, name, original in reversed(self._restore):
            setattr(owner, name, original)
        self._restore.clear()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.fault is not None and self.fault.phase == "round" and trainer.global_step == self.fault.step - 1:
            self._armed = True

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        f = self.fault
        if f is not None and f.phase == "local" and trainer.global_step == f.step and self._mine(trainer):
            self.fire()

    def _wrap_all_reduce(self, original: Any) -> Any:
        def all_reduce(*args: Any, **kwargs: Any) -> Any:
            if not self._armed:
                return original(*args, **kwargs)
            self._calls += 1
            work = original(*args, **kwargs)  # issued: the peers are now inside this collective
            if self._calls == self.fault.call:  # type: ignore[union-attr]
                self.fire()
            return work

        return all_reduce

    def _wrap_fault_point(self, original: Any) -> Any:
        def fault_point(name: str, path: str) -> None:
            f = self.fault
            assert f is not None
            if name == f.point and str(path).endswith(f.path_endswith) and self._trainer.global_step >= f.step:
                self._calls += 1
                if self._calls == f.call:
                    # what the interrupted write would replace: a test checks that it survives unchanged
                    self.fire(path=str(path), replaced_sha256=_sha256(str(path)))
            original(name, path)

        return fault_point

    def fire(self, **details: Any) -> None:
        """Act now (once, see ``record``)."""
        f = self.fault
        assert f is not None
        holder = None
        if f.action in ("vanish", "lose_host"):
            holder = _hold_sockets(f.hold_s)
        step = self._trainer.global_step if self._trainer is not None else None
        if f.record:
            entry = dict(asdict(f), pid=os.getpid(), holder_pid=holder, global_step=step, **details)
            fd = os.open(f.record, os.O_WRONLY | os.O_CREAT | os.O_EXCL)  # raises if another firing won
            with os.fdopen(fd, "w") as out:
                json.dump(dict(entry, time=time.time()), out)  # the last thing before the act
        if f.action == "raise":
            raise RuntimeError(f"injected fault on rank {f.rank}: {f.phase} phase, step {step}")
        if f.action == "lose_host":
            if "TORCHELASTIC_RUN_ID" not in os.environ:
                raise RuntimeError("lose_host kills the torchrun agent, the parent process: run under torchrun")
            os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
