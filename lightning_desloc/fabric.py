"""DES-LOC for Lightning Fabric: ``Fabric(strategy="desloc")`` or ``strategy=DeslocFabricStrategy(...)``.

A thin adapter over :class:`~lightning_desloc.sync.DeslocSync`, the same schedule, averaging and ledger
as :class:`~lightning_desloc.DeslocStrategy` for the Trainer::

    import lightning as L
    import lightning_desloc  # registers "desloc", "desloc_spawn", ... with Fabric too

    fabric = L.Fabric(accelerator="cpu", devices=2,
                      strategy=lightning_desloc.DeslocFabricStrategy(param_sync_every=64))
    fabric.launch()
    model, optimizer = fabric.setup(model, optimizer)   # rank 0's weights are broadcast here
    for x, y in loader:
        fabric.backward(loss_fn(model(x), y))
        optimizer.step()                 # local step; averages whatever the schedule says is due
        optimizer.zero_grad()
    fabric.strategy.reach_consensus()    # every rank ends with the averaged parameters
    print(fabric.strategy.ledger)        # bytes sent, per category, and DDP's bytes for the same steps

``fabric.strategy.log_comm_with(fabric.log_dict)`` sends the ledger (``comm/...``) to the Fabric's loggers
after every round.

What it does differently from Fabric's ``DDPStrategy``:

* no ``DistributedDataParallel`` wrapper, so no gradient all-reduce: each rank steps on its own
  gradients; ``fabric.no_backward_sync`` is accepted and does nothing (there is nothing to skip);
* ``setup_module`` broadcasts rank 0's parameters and buffers (ledger category ``setup``);
* every optimizer set up through Fabric is scheduled; ``optimizer.step()`` (Fabric calls
  :meth:`optimizer_step`) counts a completed step unless the step was skipped (an AMP grad scaler
  that found inf/NaN gradients), then runs the round that is due;
* ``fabric.all_reduce`` / ``all_gather`` are metered as ``metrics``, ``barrier`` and ``broadcast``
  as ``control`` (the broadcast pickles once and sends ``8 + len(payload)`` bytes).

Not supported here (use the Trainer strategy): hierarchical groups (``group_size``), validation on the
consensus (call :meth:`DeslocFabricStrategy.average_parameters` yourself), per-rank checkpoint shards
(``fabric.save`` writes rank 0's objects; call :meth:`reach_consensus` first to save the average).
Floating buffers of every set-up module are averaged with the parameters of the first optimizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from typing import Any, Callable, Literal, Optional, Union

import torch
from lightning.fabric.accelerators import Accelerator
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment, Precision
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import DDPStrategy
from lightning.fabric.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.fabric.strategies.strategy import _BackwardSyncControl
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer

from lightning_desloc.averaging import DEFAULT_BUCKET_CAP_BYTES, broadcast_
from lightning_desloc.compression import Compression
from lightning_desloc.schedule import StatePolicy, StateSyncEvery, SyncPlan
from lightning_desloc.sync import (
    CoreAttribute,
    DeslocSync,
    MeteredCollectives,
    close_process_group,
    close_process_group_at_exit,
    float_buffers,
)

__all__ = ["DeslocFabricStrategy"]


class _NoGradientSync(_BackwardSyncControl):
    """DES-LOC never all-reduces gradients, so skipping the gradient sync is always a no-op."""

    def no_backward_sync(self, module: Module, enabled: bool) -> AbstractContextManager:
        return nullcontext()


class _ClosingLauncher(_MultiProcessingLauncher):
    """Spawn/fork launcher that closes gloo in each worker before it exits (see the Lightning strategy)."""

    def _wrapping_function(self, *args: Any, **kwargs: Any) -> None:
        super()._wrapping_function(*args, **kwargs)
        close_process_group()


class DeslocFabricStrategy(MeteredCollectives, DDPStrategy):
    """DES-LOC for Fabric: local optimizer steps; parameters and each optimizer state averaged on its period.

    Counting completed steps ``s = 1, 2, ...`` of each optimizer, right after local step ``s`` the
    parameters are averaged when ``s % param_sync_every == 0`` and state ``k`` when
    ``s % state_sync_every[k] == 0``, all in one coalesced all-reduce round; ``step`` stays local.

    Args:
        param_sync_every: ``K_x``, optimizer steps between parameter averages, or ``"auto"`` (time 16
            steps and one average, then choose the periods; see :mod:`lightning_desloc.adaptive`).
        state_sync_every: periods of the optimizer states, in optimizer steps. ``None``: first moments
            (``exp_avg``, ``momentum_buffer``) every ``3 * K_x``, second moments (``exp_avg_sq``, ...)
            every ``6 * K_x``; an ``int``: one period for all states; a dict ``{key: period}`` per key.
        state_policy: ``"average"`` (DES-LOC); baselines ``"keep_local"`` (states never averaged) and
            ``"reset"`` (tensor states zeroed after every parameter average).
        compression: wire format of the schedule's averages: ``"bf16"``, ``"int8"`` (1 byte per element
            plus a float32 scale per 256), or a dict per category (``{"params": "bf16", "states": "int8"}``);
            ``None``: exact. One optimizer only.
        outer_lr: the outer Nesterov SGD step on each parameter average (off when ``None``), with
            ``outer_momentum`` and ``outer_nesterov``. One optimizer only.
        comm_budget: with ``param_sync_every="auto"``, the fraction of step time communication may take.
        total_steps, min_param_syncs: with ``"auto"`` and ``total_steps`` (the run's optimizer steps)
            given, ``K_x`` is capped to leave at least ``min_param_syncs`` parameter averages in the run.
        max_drift: early parameter average when ``||x_i - xbar|| / ||xbar||`` (max over ranks, checked every
            ``drift_check_every`` steps, 4 bytes of ``control``) exceeds it; ``None``: off.
        drift_check_every: optimizer steps between drift checks.
        bucket_cap_mb: largest flat buffer of one all-reduce, in MiB.

    The remaining arguments are those of :class:`lightning.fabric.strategies.DDPStrategy` (without its
    DDP-wrapper keyword arguments: there is no wrapper).
    """

    strategy_name = "desloc"

    def __init__(
        self,
        param_sync_every: Union[int, Literal["auto"]] = 256,
        state_sync_every: StateSyncEvery = None,
        state_policy: StatePolicy = "average",
        compression: Compression = None,
        outer_lr: Optional[float] = None,
        outer_momentum: float = 0.9,
        outer_nesterov: bool = True,
        comm_budget: float = 0.05,
        total_steps: Optional[int] = None,
        min_param_syncs: int = 32,
        max_drift: Optional[float] = None,
        drift_check_every: int = 16,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_BYTES / 2**20,
        accelerator: Optional[Accelerator] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision=precision,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        #: the framework-independent DES-LOC core shared with the Trainer strategy
        self.core = DeslocSync(
            param_sync_every, state_sync_every, state_policy, compression, outer_lr, outer_momentum, outer_nesterov,
            None, comm_budget=comm_budget, max_drift=max_drift, drift_check_every=drift_check_every,
            bucket_cap_mb=bucket_cap_mb, buffers=self._float_buffers, min_param_syncs=min_param_syncs,
        )
        self.core.total_steps = total_steps
        self._backward_sync_control = _NoGradientSync()
        self._desloc_modules: list[Module] = []
        self._desloc_optimizers: list[Optimizer] = []

    #: bytes per category of every collective this strategy issued, and DDP's bytes for the same steps
    ledger = CoreAttribute()
    #: the :class:`~lightning_desloc.schedule.SyncSchedule` in force
    schedule = CoreAttribute()
    #: completed optimizer steps, one counter per optimizer in set-up order
    optimizer_steps = CoreAttribute()
    compression = CoreAttribute()
    outer = CoreAttribute()
    auto = CoreAttribute()
    drift = CoreAttribute()
    early_syncs = CoreAttribute()

    # ------------------------------------------------------------------ setup
    def setup_module(self, module: Module) -> Module:
        """No DDP wrapper: broadcast rank 0's parameters and buffers (ledger ``setup``) and return ``module``."""
        broadcast_([*module.parameters(), *module.buffers()], src=0, ledger=self.ledger, category="setup")
        close_process_group_at_exit()
        if not any(m is module for m in self._desloc_modules):
            self._desloc_modules.append(module)
        self.core.params_in_sync = True
        return module

    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        """Schedule ``optimizer``'s steps (set up every optimizer before the first step)."""
        if not any(o is optimizer for o in self._desloc_optimizers):
            self._desloc_optimizers.append(optimizer)
            self.core.attach(self._desloc_optimizers)
        return optimizer

    def _float_buffers(self) -> list[Tensor]:
        return float_buffers(self._desloc_modules)

    # ------------------------------------------------------------------ the local phase and the sync
    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        """The local step through the precision plugin, then the schedule's round when one is due."""
        index = self.core.index_of(optimizer)
        if index is None:
            raise RuntimeError(
                "DeslocFabricStrategy was asked to step an optimizer it has not set up; pass every optimizer to "
                "fabric.setup(model, optimizer) or fabric.setup_optimizers(optimizer) so its steps can be scheduled."
            )
        self.core.begin_step(optimizer)
        output = super().optimizer_step(optimizer, **kwargs)
        self.core.after_step(index, optimizer)  # counts the step unless it was skipped; runs what is due
        return output

    def sync(self, optimizer: Optimizer, plan: SyncPlan, with_buffers: bool = True) -> None:
        """Average what ``plan`` says is due for ``optimizer``'s parameters and states, in one round."""
        self.core.sync(optimizer, plan, with_buffers=with_buffers)

    def _modules(self, module: Optional[Union[Module, Sequence[Module]]]) -> list[Module]:
        if module is None:
            return list(self._desloc_modules)
        return [module] if isinstance(module, Module) else list(module)

    def average_parameters(self, module: Optional[Union[Module, Sequence[Module]]] = None,
                           category: str = "params") -> None:
        """Average every parameter and floating buffer of ``module`` (default: every set-up module) now,
        in one round; bytes go to ``category`` (buffers to ``"buffers"`` when it is ``"params"``)."""
        self.core.average_parameters(self._modules(module), category)

    def reach_consensus(self, module: Optional[Union[Module, Sequence[Module]]] = None) -> bool:
        """End of training: leave every rank with the consensus (the average, then the outer step when
        ``outer_lr`` is set); nothing is sent when the last step already averaged the parameters.
        Returns whether a round ran."""
        return self.core.reach_consensus(self._modules(module))

    def log_comm_with(self, log_dict: Callable[..., Any]) -> None:
        """After every averaging round, call ``log_dict(metrics, step=s)`` with the ledger's metrics
        (``comm/bytes/<category>``, ``comm/rounds``, ``comm/ratio_vs_ddp``, ... in bytes) and ``s`` the first
        optimizer's completed steps. Typically ``fabric.strategy.log_comm_with(fabric.log_dict)``, which sends
        them to the Fabric's loggers."""
        self.core.log = lambda metrics: log_dict(metrics, step=self.optimizer_steps[0] if self.optimizer_steps else 0)

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if self._start_method != "popen":
            self._launcher = _ClosingLauncher(self, start_method=self._start_method)

    def teardown(self) -> None:
        self.core.detach()
        super().teardown()

    # ------------------------------------------------------------------ metered Fabric collectives
    def all_reduce(self, tensor: Any, group: Optional[Any] = None, reduce_op: Optional[Any] = "mean") -> Any:
        self._meter(tensor)
        return super().all_reduce(tensor, group=group, reduce_op=reduce_op)

    # ------------------------------------------------------------------ registration
    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, start_method in (("desloc", "popen"), ("desloc_spawn", "spawn"), ("desloc_fork", "fork"),
                                   ("desloc_notebook", "fork")):
            strategy_registry.register(
                name,
                cls,
                description=f"DES-LOC for Fabric: desynced low-communication local training, start_method={start_method!r}",
                override=True,
                start_method=start_method,
            )
