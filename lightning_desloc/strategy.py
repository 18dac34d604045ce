"""``DeslocStrategy``: Lightning hooks wired to the schedule, the averaging and the ledger."""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies.launchers.multiprocessing import _disable_module_memory_sharing
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher, _WorkerOutput
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer

from lightning_desloc import checkpoint as desloc_checkpoint
from lightning_desloc import sharded_checkpoint, sharding
from lightning_desloc.adapters import (
    MeteredCollectives,
    build_core,
    close_process_group,
    close_process_group_at_exit,
    mark_failed,
    stop_watching_peers,
)
from lightning_desloc.compression import Compression
from lightning_desloc.config import DEFAULT_BUCKET_CAP_MB, ValidateOn, args_section
from lightning_desloc.ledger import CommLedger
from lightning_desloc.nonfinite import OnNonfinite
from lightning_desloc.schedule import StatePolicy, StateSyncEvery, SyncPlan
from lightning_desloc.sigterm import stop_on_rounds
from lightning_desloc.sync import averaged_state_keys

__all__ = ["DeslocStrategy", "averaged_state_keys"]

log = logging.getLogger(__name__)

#: the DES-LOC arguments of the signature, in order (their text: :data:`lightning_desloc.config.ARGUMENT_DOCS`)
DESLOC_ARGUMENTS = (
    "param_sync_every", "state_sync_every", "validate_on", "state_policy", "compression", "outer_lr",
    "outer_momentum", "outer_nesterov", "group_size", "group_param_sync_every", "group_state_sync_every",
    "shard_within_group", "comm_budget", "min_param_syncs", "max_drift", "drift_check_every", "bucket_cap_mb", "log_comm",
    "allow_consensus_fallback", "overlap_steps", "overlap_local_weight", "ddp_warmup_steps", "fragments", "peer_timeout_s",
    "on_nonfinite",
)


def _stash(t: Tensor) -> Tensor:
    """A copy of ``t`` kept off the accelerator while consensus validation runs: pinned host memory for a
    GPU tensor (the device keeps no extra 1P), a plain clone on the CPU."""
    if t.device.type == "cpu":
        return t.detach().clone()
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=True)
    host.copy_(t.detach())  # blocking: a checkpoint saved during validation reads it from the host
    return host


def _storage_key(t: Tensor) -> tuple[int, int, torch.dtype, tuple[int, ...]]:
    """Which live tensor ``t`` is: a state dict's detached alias has the same data pointer and shape."""
    return (t.data_ptr(), t.numel(), t.dtype, tuple(t.shape))


class _LedgerReturningLauncher(_MultiProcessingLauncher):
    """Spawn/fork launcher that also brings rank 0's ledger and step counters back to the main process."""

    def _collect_rank_zero_results(self, trainer: "pl.Trainer", results: Any) -> Optional[_WorkerOutput]:
        strategy = self._strategy
        if not (isinstance(strategy, DeslocStrategy) and strategy.config.shard_within_group):
            return super()._collect_rank_zero_results(trainer, results)
        # shards cannot load into the main process's unsharded module: hand it the whole (consensus) tensors,
        # gathered inside each group on every rank (a best checkpoint is a directory of shards: not handed over)
        state_dict = sharding.full_state_dict(trainer.lightning_module)
        if strategy.local_rank != 0:
            return None
        weights_path = None
        if trainer.state.fn == TrainerFn.FITTING:
            weights_path = os.path.join(tempfile.mkdtemp(), ".temp.ckpt")
            strategy.checkpoint_io.save_checkpoint(state_dict, weights_path)
        return _WorkerOutput(None, weights_path, trainer.state, results, self.get_extra_results(trainer))

    def get_extra_results(self, trainer: "pl.Trainer") -> dict[str, Any]:
        extra = super().get_extra_results(trainer)
        strategy = trainer.strategy
        assert isinstance(strategy, DeslocStrategy)
        extra["desloc"] = {"ledger": strategy.ledger.state_dict(), "optimizer_steps": list(strategy.optimizer_steps)}
        extra["desloc"]["group_ledger"] = strategy.group_ledger.state_dict()
        return extra

    def _wrapping_function(self, process_idx: int, trainer: Optional["pl.Trainer"], function: Callable,
                           args: Any, kwargs: Any, *rest: Any, **extra: Any) -> None:
        if self._start_method == "forkserver" and isinstance(self._strategy.accelerator, CPUAccelerator):
            # tensors handed to the workers arrive in shared memory; Lightning copies them out for "spawn"
            # only, so with "forkserver" every rank would train the same CPU parameters
            args, kwargs = _disable_module_memory_sharing((args, kwargs))
        super()._wrapping_function(process_idx, trainer, function, args, kwargs, *rest, **extra)
        close_process_group()  # the worker exits next; a new fit spawns new workers and a new group

    def update_main_process_results(self, trainer: "pl.Trainer", extra: dict[str, Any]) -> None:
        super().update_main_process_results(trainer, extra)
        strategy = trainer.strategy
        assert isinstance(strategy, DeslocStrategy)
        strategy.ledger.load_state_dict(extra["desloc"]["ledger"])
        strategy.optimizer_steps = extra["desloc"]["optimizer_steps"]
        strategy.group_ledger.load_state_dict(extra["desloc"]["group_ledger"])


class DeslocStrategy(MeteredCollectives, DDPStrategy):
    """DES-LOC: local optimizer steps, parameters and each optimizer state averaged on its own period.

    No gradient is ever all-reduced. Counting completed optimizer steps ``s = 1, 2, ...`` (gradient
    accumulation counts once; so does a step whose update this rank's AMP scaler skipped, as in
    ``global_step``: every rank stays on the same step of the schedule), right after local step
    ``s`` the parameters are averaged when ``s % param_sync_every == 0`` and optimizer state ``k`` when
    ``s % state_sync_every[k] == 0``, all in one coalesced all-reduce round. Scalar state (``step``)
    stays local. Rank 0's parameters and buffers are broadcast at setup.

    {args}

    The remaining arguments are those of :class:`~lightning.pytorch.strategies.DDPStrategy`.
    """

    strategy_name = "desloc"

    def __init__(
        self,
        param_sync_every: Union[int, Literal["auto"]] = 256,
        state_sync_every: StateSyncEvery = None,
        validate_on: ValidateOn = "consensus",
        state_policy: StatePolicy = "average",
        compression: Compression = None,
        outer_lr: Optional[float] = None,
        outer_momentum: float = 0.9,
        outer_nesterov: bool = True,
        group_size: Optional[int] = None,
        group_param_sync_every: int = 1,
        group_state_sync_every: StateSyncEvery = None,
        shard_within_group: bool = False,
        comm_budget: float = 0.05,
        min_param_syncs: int = 32,
        max_drift: Optional[float] = None,
        drift_check_every: int = 16,
        bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB,
        log_comm: bool = True,
        allow_consensus_fallback: bool = False,
        overlap_steps: int = 0,
        overlap_local_weight: float = 1.0,
        ddp_warmup_steps: int = 0,
        fragments: int = 1,
        peer_timeout_s: Optional[float] = 30.0,
        on_nonfinite: OnNonfinite = "raise",
        accelerator: Optional["pl.accelerators.Accelerator"] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        arguments = {name: value for name, value in locals().items() if name in DESLOC_ARGUMENTS}
        #: the framework-independent DES-LOC core: schedule, step counters, rounds, ledger
        self.core = build_core(arguments, buffers=self._float_buffers, log=self._log_metrics)
        self._stashed_local: Optional[list[Tensor]] = None
        self._warned_reduce = False
        #: the ledger metrics of the current batch's rounds, ``(step, metrics)``, logged as one row
        self._pending_log: Optional[tuple[int, dict[str, float]]] = None
        #: how the last ``fit(ckpt_path=...)`` resumed: local or consensus path, and why (None: no resume)
        self.resume_decision: Optional[desloc_checkpoint.ResumeDecision] = None
        self._device_mesh: Any = None

    @property
    def config(self) -> Any:
        """The :class:`~lightning_desloc.config.DeslocConfig` this strategy was built with."""
        return self.core.config

    @property
    def validate_on(self) -> ValidateOn:
        return self.core.config.validate_on

    @property
    def log_comm(self) -> bool:
        return self.core.config.log_comm

    @property
    def group_ledger(self) -> CommLedger:
        """Bytes of the level inside groups (hierarchical mode): gradient all-reduces, or the inner averages
        (an empty ledger without groups)."""
        level = self.core.group_level
        if level is None:
            if not hasattr(self, "_no_group_ledger"):
                self._no_group_ledger = CommLedger()
            return self._no_group_ledger
        return level.ledger

    @property
    def device_mesh(self) -> Any:
        """With ``shard_within_group=True``: the 2-D ``DeviceMesh`` ``(world // group_size, group_size)``, dims
        ``("replicate", "shard")``, from ``setup_environment`` on (also the LightningModule's
        ``device_mesh``, for ``configure_model``); ``None`` otherwise."""
        return self._device_mesh

    @property
    def group_schedule(self) -> Any:
        """The inner level's schedule (``group_param_sync_every > 1``), else ``None``."""
        level = self.core.group_level
        return level.schedule if level is not None else None

    # ------------------------------------------------------------------ validation of the setup
    def _configure_launcher(self) -> None:
        # Trainer sets _layer_sync just before this: fail before any process starts.
        if self._layer_sync is not None:
            raise ValueError(
                "DeslocStrategy does not support sync_batchnorm=True: there is no DDP wrapper and ranks hold "
                "different parameters between averages. Use Trainer(sync_batchnorm=False); BatchNorm running "
                "statistics are averaged with the parameters."
            )
        if self.config.shard_within_group:
            sharding.check_world(self.num_nodes * self.num_processes, self.config.hierarchy.group_size)
        super()._configure_launcher()
        if self._start_method != "popen":
            self._launcher = _LedgerReturningLauncher(self, start_method=self._start_method)

    # ------------------------------------------------------------------ setup
    def setup_environment(self) -> None:
        super().setup_environment()
        if self.config.shard_within_group:  # before configure_model, which may shard with it
            self._device_mesh = sharding.make_mesh(self.world_size, self.config.hierarchy.group_size, self.root_device)
            if self.lightning_module is not None:
                self.lightning_module._device_mesh = self._device_mesh

    def setup(self, trainer: "pl.Trainer") -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        self.precision_plugin.convert_module(self.model)
        if not (self.config.shard_within_group and sharding.has_meta_tensors(self.model)):
            self.model_to_device()  # a model on the meta device is materialised once sharded (_setup_shards)
        self.core.comm.device = self.root_device
        if self.config.shard_within_group:
            # FSDP2 inside the groups: shard unless configure_model did, the groups from the mesh, and group
            # 0's local shards to every group (a sharded model cannot be broadcast whole)
            close_process_group_at_exit()
            self._setup_shards(trainer)
        else:
            self.core.setup_groups()
            close_process_group_at_exit()  # this process may outlive fit (default launcher, torchrun)
            # No DDP wrapper, so no gradient hooks; start every rank from rank 0's weights instead.
            self.core.comm.broadcast_(self._module_tensors(), src=0, category="setup",
                                      bucket_cap_bytes=self.core.bucket_cap_bytes)
        self.core.note_frozen(self.model.parameters())
        self.core.params_in_sync = True
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)
            self.core.attach(self.optimizers)
            self.core.total_steps = lambda: float(trainer.estimated_stepping_batches)
            if self.world_size > 1:
                stop_on_rounds(trainer, self.core)  # no SIGTERM broadcast before every batch

    def _setup_shards(self, trainer: "pl.Trainer") -> None:
        """``shard_within_group=True`` (:mod:`lightning_desloc.sharding`): every rank raises the same error
        before its first collective here, so no rank waits for another."""
        assert self.model is not None and self._device_mesh is not None
        sharding.shard_module(self.model, self._device_mesh)
        sharding.check_sharded(self.model, self._device_mesh)
        if sharding.has_meta_tensors(self.model):
            # built on the meta device (configure_model): allocate the local shards and reset_parameters()
            from lightning.fabric.utilities.init import _materialize_distributed_module

            _materialize_distributed_module(self.model, self.root_device)
            self.model_to_device()  # what was left unsharded (buffers of modules without parameters)
        mesh = self._device_mesh
        self.core.setup_groups((mesh[sharding.SHARD].get_group(), mesh[sharding.REPLICATE].get_group()))
        sharding.broadcast_group_zero(self.core, self.model, self.config.hierarchy.group_size)

    def _module_tensors(self) -> list[Tensor]:
        assert self.model is not None
        return [*self.model.parameters(), *self.model.buffers()]

    def _float_buffers(self) -> list[Tensor]:
        assert self.model is not None
        return [b for b in self.model.buffers() if b.is_floating_point()]

    # ------------------------------------------------------------------ the local phase and the sync
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Optional[Union["pl.LightningModule", torch.nn.Module]] = None,
        **kwargs: Any,
    ) -> Any:
        index = self.core.index_of(optimizer)
        if index is None:
            raise RuntimeError(
                "DeslocStrategy was asked to step an optimizer that configure_optimizers did not return; "
                "every optimizer must come from configure_optimizers so that its steps can be scheduled."
            )
        self.core.begin_step(optimizer)
        closure = self.core.wrap_closure(closure, optimizer)
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        self.core.after_step(index, optimizer)  # counts the step (a scaler's skip too); runs what is due
        return output

    def sync(self, optimizer: Optimizer, plan: SyncPlan, with_buffers: bool = True) -> None:
        """Average what ``plan`` says is due for ``optimizer``'s parameters and states, in one round
        (:meth:`DeslocSync.sync <lightning_desloc.sync.DeslocSync.sync>`)."""
        self.core.sync(optimizer, plan, with_buffers=with_buffers)

    def average_parameters(self, category: str = "params") -> None:
        """Average every parameter and floating buffer now; bytes go to ``category`` (buffers to
        ``"buffers"`` when ``category`` is ``"params"``)."""
        assert self.model is not None
        self.core.average_parameters(self.model, category)

    def _log_metrics(self, metrics: dict[str, float]) -> None:
        """Keep the round's ledger metrics for the loggers, at the step Lightning logs the user's metrics of
        this batch at (``_batches_that_stepped``, once per batch: with two optimizers ``global_step`` moves
        twice per batch); the rounds of one batch go out as one row when the next batch starts."""
        trainer = self.lightning_module._trainer if self.lightning_module is not None else None
        if not self.log_comm or trainer is None or not trainer.loggers:
            return
        step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        if self._pending_log is not None and self._pending_log[0] != step:
            self._flush_log()
        previous = self._pending_log[1] if self._pending_log is not None else {}
        self._pending_log = (step, {**previous, **metrics})

    def _flush_log(self) -> None:
        trainer = self.lightning_module._trainer if self.lightning_module is not None else None
        pending, self._pending_log = self._pending_log, None
        if pending is None or trainer is None:
            return
        for logger in trainer.loggers:
            logger.log_metrics(pending[1], step=pending[0])

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._flush_log()  # the last batch's rounds, one row
        super().on_train_batch_start(batch, batch_idx)

    def on_train_start(self) -> None:
        super().on_train_start()
        self._warn_if_shorter_than_a_period()

    def _warn_if_shorter_than_a_period(self) -> None:
        """A run shorter than ``param_sync_every`` never averages before the end of fit: say so once."""
        trainer = self.lightning_module._trainer if self.lightning_module is not None else None
        k_x = self.core.config.param_sync_every
        if trainer is None or k_x == "auto" or self.world_size < 2:
            return
        total = trainer.estimated_stepping_batches  # the data is set up by now: cheap
        local = total - self.core.config.ddp_warmup_steps
        warmup = self.core.config.ddp_warmup_steps
        if math.isfinite(total) and 0 < local < k_x:
            rank_zero_warn(
                f"This fit has {int(total)} optimizer steps, fewer than param_sync_every={k_x}"
                + (f" after ddp_warmup_steps={warmup}" if warmup else "")
                + ": the ranks train apart and are averaged only once, at the end of fit. Set a shorter period "
                "for this run, e.g. "
                f"DeslocStrategy(param_sync_every={max(1, int(local) // 8)}), if you want averages during it."
            )

    # ------------------------------------------------------------------ validation and end of training
    def on_validation_start(self) -> None:
        super().on_validation_start()
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if self.validate_on != "consensus" or trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return
        if self.core.params_in_sync:
            return
        self.core.check_finite_now("consensus validation")  # on_nonfinite: raise, or heal, first
        if self.core.params_in_sync:  # healed: every rank holds the finite ranks' mean already
            return
        self._stashed_local = [_stash(t) for t in self._consensus_tensors()]
        self.average_parameters(category="eval")
        self.core.params_in_sync = False  # the local parameters come back after validation

    def on_validation_end(self) -> None:
        if self._stashed_local is not None:
            with torch.no_grad():
                for t, local in zip(self._consensus_tensors(), self._stashed_local):
                    t.copy_(local)
            self._stashed_local = None
        super().on_validation_end()

    def _consensus_tensors(self) -> list[Tensor]:
        """What consensus validation replaces by the mean: the parameters (not those frozen since setup,
        which are equal on every rank and not averaged) and the floating buffers."""
        assert self.model is not None
        # sharded parameters (shard_within_group): the local shards, views of them
        return sharding.local_tensors([*(p for p in self.model.parameters() if not self.core.is_frozen(p)),
                                       *self._float_buffers()])

    def on_train_end(self) -> None:
        # Leave every rank with the consensus, so the model the user saves or evaluates is the average.
        assert self.model is not None
        self.core.reach_consensus(self.model)
        self._flush_log()
        super().on_train_end()

    def teardown(self) -> None:
        stop_watching_peers()  # before Lightning's teardown: nothing after it needs the peers
        self.core.detach()
        super().teardown()

    def on_exception(self, exception: BaseException) -> None:
        mark_failed()  # this rank's exit must not wait for peers that may be blocked in a collective
        super().on_exception(exception)

    # ------------------------------------------------------------------ metered Lightning collectives
    def reduce(self, tensor: Any, group: Optional[Any] = None, reduce_op: Optional[Any] = "mean") -> Any:
        self._meter(tensor)
        self._warn_reduce_in_training(tensor)
        return super().reduce(tensor, group=group, reduce_op=reduce_op)

    def _warn_reduce_in_training(self, tensor: Any) -> None:
        """``self.log(..., sync_dist=True)`` in ``training_step`` all-reduces on every logging step: say
        once what that costs, from the ledger's own count."""
        trainer = self.lightning_module._trainer if self.lightning_module is not None else None
        if self._warned_reduce or trainer is None or not trainer.training or not isinstance(tensor, Tensor):
            return
        self._warned_reduce = True
        rank_zero_warn(
            f"self.log(..., sync_dist=True) during training all-reduces {tensor.numel() * tensor.element_size()} "
            "bytes on every logging step: one collective, so one round trip of the link, per step, which DES-LOC "
            "otherwise avoids (ledger category 'metrics', calls in comm/calls). Log each rank's own value "
            "(sync_dist=False), or reduce in validation, where the model is the consensus."
        )

    # ---- checkpointing: consensus main file + per-rank shards; the logic lives in checkpoint.py
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        # restore after setup's rank-0 broadcast, which would otherwise overwrite each rank's own state
        return True

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Optional[Any] = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                "DeslocStrategy writes checkpoints itself and takes no storage_options; got "
                f"{storage_options!r}. Save without storage_options."
            )
        if self.config.shard_within_group:
            assert self.model is not None
            with self._own_values_live():  # during consensus validation: the rank's own values, not the mean
                sharded_checkpoint.save(self.core, self.model, self.core.optimizers, checkpoint, filepath)
            return
        live = checkpoint["state_dict"]
        # during consensus validation the live tensors hold the mean over ranks: the main file takes them
        # as they are (nothing sent for them), the shard the rank's own stashed values
        means = {"state_dict": live} if self._stashed_local is not None else None
        checkpoint = {**checkpoint, "state_dict": self._local_state_dict(live)}
        desloc_checkpoint.save(self.core, checkpoint, filepath, modules=[self.model] if self.model is not None else [],
                               module_means=means)

    def _local_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """During consensus validation the live parameters are the consensus and the rank's own values are
        stashed; a shard must hold the rank's own values."""
        if self._stashed_local is None or self.model is None:
            return state_dict
        # by tensor identity, not by name: a tied weight (an LM head sharing the embedding) has two names
        # in the state dict and one in named_parameters(); both names must get the rank's own values
        own = {_storage_key(t): local for t, local in zip(self._consensus_tensors(), self._stashed_local)}
        return {name: own.get(_storage_key(value), value) if isinstance(value, Tensor) else value
                for name, value in state_dict.items()}

    @contextmanager
    def _own_values_live(self) -> Iterator[None]:
        """During consensus validation (the live tensors hold the mean, the rank's own values are stashed):
        put the own values back into the live tensors for the duration, then the mean again."""
        if self._stashed_local is None:
            yield
            return
        live = self._consensus_tensors()
        means = [t.detach().clone() for t in live]
        with torch.no_grad():
            for t, own in zip(live, self._stashed_local):
                t.copy_(own)
        try:
            yield
        finally:
            with torch.no_grad():
                for t, mean in zip(live, means):
                    t.copy_(mean)

    @property
    def lightning_restore_optimizer(self) -> bool:
        # sharded groups: load_checkpoint restores the optimizers itself (through DCP), as ModelParallelStrategy
        return not self.config.shard_within_group

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        if self.config.shard_within_group and "state_dict" not in checkpoint:
            return  # loaded by load_checkpoint, into the shards
        super().load_model_state_dict(checkpoint, strict=strict)

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: Optional[bool] = None) -> dict[str, Any]:
        if self.config.shard_within_group:
            module = self.lightning_module
            assert module is not None and self.model is not None
            trainer = module._trainer
            optimizers = self.core.optimizers if trainer is not None and trainer.state.fn == TrainerFn.FITTING else []
            checkpoint, decision = sharded_checkpoint.load(self.core, self.model, optimizers, checkpoint_path,
                                                           strict=module.strict_loading, info=rank_zero_info,
                                                           warn=rank_zero_warn)
            if optimizers:
                self.resume_decision = decision
            return checkpoint
        # when fitting, also restores the step counters, the ledger, the options' state and (local path)
        # the RNG, and sets resume_decision
        main, problem = desloc_checkpoint.read_main(
            checkpoint_path, desloc_checkpoint.main_loader(self.checkpoint_io, weights_only))
        module = self.lightning_module
        trainer = module._trainer if module is not None else None
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            if problem is not None:
                raise desloc_checkpoint.CheckpointShardError(problem)
            return main  # evaluation loads the consensus model: nothing per rank to restore
        desloc_checkpoint.check_main(self.core, problem)
        assert main is not None
        main, self.resume_decision = desloc_checkpoint.load(
            self.core, checkpoint_path, main, modules=[module], strict=module.strict_loading,
            allow_consensus_fallback=self.core.config.allow_consensus_fallback,
            info=rank_zero_info, warn=rank_zero_warn,
        )
        return main

    def remove_checkpoint(self, filepath: _PATH) -> None:
        if self.is_global_zero:
            (sharded_checkpoint if self.config.shard_within_group else desloc_checkpoint).remove(filepath)

    # ------------------------------------------------------------------ registration
    @classmethod
    def register_strategies(cls, strategy_registry: Any) -> None:
        entries: Mapping[str, str] = {
            "desloc": "popen",
            "desloc_spawn": "spawn",
            "desloc_fork": "fork",
            "desloc_notebook": "fork",
        }
        for name, start_method in entries.items():
            strategy_registry.register(
                name,
                cls,
                description=f"DES-LOC: desynced low-communication local training, start_method={start_method!r}",
                override=True,
                start_method=start_method,
            )


DeslocStrategy.__doc__ = (DeslocStrategy.__doc__ or "").replace("    {args}", args_section(DESLOC_ARGUMENTS))
