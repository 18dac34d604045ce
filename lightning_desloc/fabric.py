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
  :meth:`optimizer_step`) counts a step, also one whose update this rank's AMP grad scaler skipped
  (the ranks' scalers decide on their own gradients; the schedule must not), then runs the round
  that is due;
* ``fabric.all_reduce`` / ``all_gather`` are metered as ``metrics``, ``barrier`` and ``broadcast``
  as ``control`` (the broadcast pickles once and sends ``8 + len(payload)`` bytes).

* ``fabric.save(path, state)`` writes what the Trainer strategy writes (see
  :mod:`lightning_desloc.checkpoint`): at ``path`` the consensus of every module and optimizer in
  ``state`` (loadable with plain ``torch.load``), beside it one shard per rank with that rank's own
  values, RNG and the core's state; ``fabric.load(path, state)`` resumes each rank's own state when the
  world size is the same and every shard is valid, else every rank from the consensus.

Not supported here (use the Trainer strategy): hierarchical groups (``group_size``) and validation on
the consensus (call :meth:`DeslocFabricStrategy.average_parameters` yourself). Floating buffers of every
set-up module are averaged with the parameters of the first optimizer. With ``ddp_warmup_steps`` the
warm-up's gradient all-reduce happens inside ``optimizer.step()``, so ``fabric.clip_gradients`` called
before it clips each rank's own gradients (the Trainer clips the averaged ones, as DDP).
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
from lightning.fabric.strategies.strategy import _BackwardSyncControl, _validate_keys_for_strict_loading
from lightning.fabric.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.fabric.utilities.types import _Stateful
from torch import Tensor
from torch.nn import Module
from torch.optim import Optimizer

from lightning_desloc import checkpoint as desloc_checkpoint
from lightning_desloc.adapters import (
    MeteredCollectives,
    build_core,
    close_process_group,
    close_process_group_at_exit,
    stop_watching_peers,
)
from lightning_desloc.compression import Compression
from lightning_desloc.config import DEFAULT_BUCKET_CAP_MB, args_section
from lightning_desloc.nonfinite import OnNonfinite
from lightning_desloc.schedule import StatePolicy, StateSyncEvery, SyncPlan
from lightning_desloc.sync import float_buffers

#: the DES-LOC arguments of the signature, in order (their text: :data:`lightning_desloc.config.ARGUMENT_DOCS`)
DESLOC_ARGUMENTS = (
    "param_sync_every", "state_sync_every", "state_policy", "compression", "outer_lr", "outer_momentum",
    "outer_nesterov", "comm_budget", "total_steps", "min_param_syncs", "max_drift", "drift_check_every",
    "bucket_cap_mb", "allow_consensus_fallback", "overlap_steps", "overlap_local_weight", "ddp_warmup_steps", "fragments", "peer_timeout_s",
    "on_nonfinite",
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

    {args}

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
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        allow_consensus_fallback: bool = False,
        overlap_steps: int = 0,
        overlap_local_weight: float = 1.0,
        ddp_warmup_steps: int = 0,
        fragments: int = 1,
        peer_timeout_s: Optional[float] = 30.0,
        on_nonfinite: OnNonfinite = "raise",
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
        arguments = {name: value for name, value in locals().items() if name in DESLOC_ARGUMENTS and name != "total_steps"}
        #: the framework-independent DES-LOC core shared with the Trainer strategy
        self.core = build_core(arguments, buffers=self._float_buffers, total_steps=total_steps)
        self._backward_sync_control = _NoGradientSync()
        self._desloc_modules: list[Module] = []
        self._desloc_optimizers: list[Optimizer] = []
        #: how the last ``fabric.load`` resumed: local or consensus path, and why (None: no resume)
        self.resume_decision: Optional[desloc_checkpoint.ResumeDecision] = None

    @property
    def config(self) -> Any:
        """The :class:`~lightning_desloc.config.DeslocConfig` this strategy was built with."""
        return self.core.config

    # ------------------------------------------------------------------ setup
    def setup_module(self, module: Module) -> Module:
        """No DDP wrapper: broadcast rank 0's parameters and buffers (ledger ``setup``) and return ``module``."""
        self.core.comm.device = self.root_device
        self.core.comm.broadcast_([*module.parameters(), *module.buffers()], src=0, category="setup",
                                  bucket_cap_bytes=self.core.bucket_cap_bytes)
        close_process_group_at_exit()
        if not any(m is module for m in self._desloc_modules):
            self._desloc_modules.append(module)
        self.core.note_frozen(module.parameters())
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
        if self.core.in_warmup(optimizer):  # ddp_warmup_steps: the gradients are averaged before the step
            self.core.average_gradients(optimizer)
        output = super().optimizer_step(optimizer, **kwargs)
        self.core.after_step(index, optimizer)  # counts the step (a scaler's skip too); runs what is due
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
        stop_watching_peers()  # Fabric calls no teardown itself: without one, the exit hook stops the watch
        self.core.detach()
        super().teardown()

    # ------------------------------------------------------------------ checkpoints: consensus file + per-rank shards
    def _layout(self, state: dict[str, Any]) -> desloc_checkpoint.Layout:
        """Which entries of a Fabric ``state`` are modules and which are (scheduled) optimizers."""
        modules = tuple(k for k, v in state.items() if isinstance(v, Module))
        optimizers = {k: i for k, v in state.items() if isinstance(v, Optimizer) and (i := self.core.index_of(v)) is not None}
        return desloc_checkpoint.Layout(modules=modules, optimizer_list=None, optimizers=optimizers)

    def save_checkpoint(self, path: Any, state: dict[str, Any], storage_options: Optional[Any] = None,
                        filter: Optional[dict[str, Callable[[str, Any], bool]]] = None) -> None:
        """``fabric.save``: the consensus of every module and optimizer in ``state`` at ``path`` (rank 0
        writes it) and each rank's own values in a shard beside it. Call on every rank."""
        if storage_options is not None:
            raise TypeError("DeslocFabricStrategy writes checkpoints itself and takes no storage_options; got "
                            f"{storage_options!r}. Save without storage_options.")
        layout = self._layout(state)
        converted = self._convert_stateful_objects_in_state(state, filter=filter or {})
        desloc_checkpoint.save(self.core, converted, path, layout, modules=[state[k] for k in layout.modules])

    def load_checkpoint(self, path: Any, state: Optional[Any] = None, strict: bool = True,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        """``fabric.load``: resume each rank's own state from its shard (same world size, valid shards) or
        every rank from the consensus, restoring the core's state too. Returns the entries of the file
        that ``state`` did not ask for (without DES-LOC's own metadata)."""
        if not isinstance(state, dict) or not state:
            return super().load_checkpoint(path, state, strict, weights_only=weights_only)  # the consensus
        layout = self._layout(state)
        main, problem = desloc_checkpoint.read_main(
            path, desloc_checkpoint.main_loader(self.checkpoint_io, weights_only))
        desloc_checkpoint.check_main(self.core, problem)
        assert main is not None
        main, self.resume_decision = desloc_checkpoint.load(
            self.core, path, main, modules=[state[k] for k in layout.modules], layout=layout, strict=strict,
            allow_consensus_fallback=self.core.config.allow_consensus_fallback, info=rank_zero_info, warn=rank_zero_warn,
        )
        main.pop(desloc_checkpoint.META_KEY, None)
        _validate_keys_for_strict_loading(state.keys(), main.keys(), strict=strict)
        for name, obj in list(state.items()):
            if name not in main:
                continue
            if isinstance(obj, Module):
                self.load_module_state_dict(module=obj, state_dict=main.pop(name), strict=strict)
            elif isinstance(obj, _Stateful):
                obj.load_state_dict(main.pop(name))
            else:
                state[name] = main.pop(name)
        return main

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


DeslocFabricStrategy.__doc__ = (DeslocFabricStrategy.__doc__ or "").replace("    {args}", args_section(DESLOC_ARGUMENTS))
