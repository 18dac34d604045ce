"""One rank of a DES-LOC test fit, launched as a plain process by ``gpu_harness.launch`` (see README.md).

    python tests/gpu/gpu_worker.py --scenario fit --out DIR --accelerator cuda --backend cuda:gloo

Under the harness's torchelastic-style environment (``TORCHELASTIC_RUN_ID``, ``RANK``, ``LOCAL_RANK=0``,
``WORLD_SIZE=2``, ``LOCAL_WORLD_SIZE=1``, ``GROUP_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) Lightning takes
each process for one "node" with one device: ``Trainer(devices=1, num_nodes=WORLD_SIZE)`` and root device
``cuda:0`` in both, so that two ranks share one GPU. Without that environment (``--devices 2``) the
Trainer's own launcher starts the second rank and each rank gets its own device (``cuda:0``, ``cuda:1``).

The backend (``--backend``) is what ``DeslocStrategy(process_group_backend=...)`` gets. ``cuda:gloo`` is a
process group with a backend for CUDA tensors only: a CPU tensor handed to any collective fails with "No
backend type associated with device type cpu", as under NCCL. ``--accelerator cpu --backend gloo`` runs the
same fits on CPU, which is how the harness itself is checked on a machine without a GPU.

Every rank writes ``DIR/rank<r>.pt``: what the test compares against its own expectations (the ledger,
step counters, devices and dtypes, the parameters after every local step and after DES-LOC's round of
that step). Nothing here asserts; the tests do.
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import timedelta
from typing import Any, Callable, Optional

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_desloc import DeslocStrategy

# the model's shape; the tests count its parameters by hand from the same three numbers
IN, HIDDEN, OUT = 8, 16, 4
#: a rank blocked in a collective its peer never joins gives up after this long (the harness kills earlier)
COLLECTIVE_TIMEOUT = timedelta(seconds=120)


class Tiny(L.LightningModule):
    """``Linear(IN, HIDDEN) - Tanh - Dropout - Linear(HIDDEN, OUT)`` regression on rank-dependent data."""

    def __init__(self, n_batches: int = 8, dtype: torch.dtype = torch.float32, dropout: float = 0.0,
                 lr: float = 1e-2) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Dropout(dropout),
                                       torch.nn.Linear(HIDDEN, OUT)).to(dtype)
        self.n_batches, self.data_dtype, self.lr = n_batches, dtype, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        # a reduction Lightning issues on the rank's device (ledger category "metrics")
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def _data(self, offset: int) -> DataLoader:
        rank = self.trainer.global_rank
        g = torch.Generator().manual_seed(1000 * rank + offset)  # CPU data; Lightning moves each batch
        x = torch.randn(self.n_batches * 4, IN, generator=g, dtype=self.data_dtype)
        return DataLoader(TensorDataset(x, torch.sin(x[:, :OUT]) * (1 + rank)), batch_size=4, shuffle=False)

    def train_dataloader(self):
        return self._data(0)

    def val_dataloader(self):
        return self._data(1)


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    """All parameters in one flat CPU copy, in their own dtype."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).cpu().clone()


def flat_state(optimizer: torch.optim.Optimizer, key: str) -> Optional[torch.Tensor]:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not all(key in optimizer.state.get(p, {}) for p in params):
        return None
    return torch.cat([optimizer.state[p][key].detach().reshape(-1) for p in params]).cpu().clone()


class StepRecorder(Callback):
    """Per optimizer step ``s``: ``pre[s]``, the rank's parameters and Adam moments right after its local
    step (before DES-LOC's round of step ``s``: an optimizer post-step hook runs inside ``optimizer.step``,
    and the strategy starts the round after it returns), and ``post[s]``, the parameters once the step,
    round included, is over (``on_train_batch_end``). Validation: the rank's own parameters just before
    it (``val_local``), the ones it evaluated (``val_evaluated``) and those it trains on afterwards
    (``after_val``)."""

    def __init__(self) -> None:
        self.initial: Optional[torch.Tensor] = None
        self.pre: dict[int, dict[str, Optional[torch.Tensor]]] = {}
        self.post: dict[int, torch.Tensor] = {}
        self.val_local: dict[int, torch.Tensor] = {}
        self.val_evaluated: dict[int, torch.Tensor] = {}
        self.after_val: dict[int, torch.Tensor] = {}
        self._awaiting_after_val: Optional[int] = None

    def on_train_start(self, trainer, pl_module):
        self.initial = flat_params(pl_module)
        optimizer = trainer.optimizers[0]
        strategy = trainer.strategy

        def after_local_step(opt, args, kwargs):
            step = strategy.optimizer_steps[0] + 1  # the core counts the step after optimizer.step returns
            self.pre[step] = {"params": flat_params(pl_module), "exp_avg": flat_state(opt, "exp_avg"),
                              "exp_avg_sq": flat_state(opt, "exp_avg_sq")}

        self._hook = optimizer.register_step_post_hook(after_local_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._awaiting_after_val is not None:
            self.after_val[self._awaiting_after_val] = flat_params(pl_module)
            self._awaiting_after_val = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.post[trainer.global_step] = flat_params(pl_module)

    def on_validation_start(self, trainer, pl_module):
        # callbacks run before the strategy's hook, which swaps in the consensus
        if trainer.state.fn == "fit":
            self.val_local[trainer.global_step] = flat_params(pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0 and trainer.state.fn == "fit":
            self.val_evaluated[trainer.global_step] = flat_params(pl_module)
            self._awaiting_after_val = trainer.global_step

    def on_train_end(self, trainer, pl_module):
        self._hook.remove()

    def as_dict(self) -> dict[str, Any]:
        return {"initial": self.initial, "pre": self.pre, "post": self.post, "val_local": self.val_local,
                "val_evaluated": self.val_evaluated, "after_val": self.after_val}


# ----------------------------------------------------------------------------------------------- one fit
def make_trainer(args: argparse.Namespace, out: str, strategy_kwargs: dict[str, Any], *, max_steps: int,
                 callbacks: list[Callback], **trainer_kwargs: Any) -> L.Trainer:
    elastic = "TORCHELASTIC_RUN_ID" in os.environ
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if elastic else args.devices
    num_nodes = int(os.environ["WORLD_SIZE"]) // per_node if elastic else 1
    defaults = dict(
        accelerator=args.accelerator, devices=per_node, num_nodes=num_nodes, max_steps=max_steps,
        default_root_dir=out, logger=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
    )
    defaults.update(trainer_kwargs)
    strategy = DeslocStrategy(process_group_backend=args.backend, timeout=COLLECTIVE_TIMEOUT, **strategy_kwargs)
    return L.Trainer(strategy=strategy, **defaults)


def describe(trainer: L.Trainer, module: L.LightningModule, recorder: Optional[StepRecorder]) -> dict[str, Any]:
    """What one rank knows after ``fit``: identity, devices, ledger, schedule and the recorder's tensors."""
    strategy = trainer.strategy
    optimizer = trainer.optimizers[0]
    state_devices: dict[str, set[str]] = {}
    for per_param in optimizer.state.values():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                state_devices.setdefault(key, set()).add(str(value.device))
    ledger = strategy.ledger
    schedule = strategy.schedule
    decision = strategy.resume_decision
    return {
        "global_rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "backend": dist.get_backend() if dist.is_initialized() else None,
        "root_device": str(strategy.root_device),
        "cuda_current_device": torch.cuda.current_device() if torch.cuda.is_available() else None,
        "param_devices": sorted({str(p.device) for p in module.parameters()}),
        "param_dtypes": sorted({str(p.dtype) for p in module.parameters()}),
        "state_devices": {k: sorted(v) for k, v in state_devices.items()},
        "state_dtypes": sorted({str(v.dtype) for st in optimizer.state.values() for k, v in st.items()
                                if isinstance(v, torch.Tensor) and k != "step"}),
        "ledger_bytes": dict(ledger.bytes),
        "ledger_rounds": ledger.rounds,
        "ddp_equivalent_bytes": ledger.ddp_equivalent_bytes,
        "optimizer_steps": list(strategy.optimizer_steps),
        "early_syncs": strategy.early_syncs,
        "schedule": {"param_sync_every": schedule.param_sync_every,
                     "state_sync_every": dict(schedule.state_sync_every)},
        "resume": None if decision is None else decision.path,
        "final": flat_params(module),
        "final_exp_avg": flat_state(optimizer, "exp_avg"),
        "final_exp_avg_sq": flat_state(optimizer, "exp_avg_sq"),
        **(recorder.as_dict() if recorder is not None else {}),
    }


def fit_once(args, out: str, strategy_kwargs: dict[str, Any], *, max_steps: int, module: Optional[Tiny] = None,
             checkpoint: Optional[ModelCheckpoint] = None, ckpt_path: Optional[str] = None,
             **trainer_kwargs: Any) -> dict[str, Any]:
    L.seed_everything(0)
    module = module if module is not None else Tiny(n_batches=max_steps)
    recorder = StepRecorder()
    callbacks: list[Callback] = [recorder] + ([checkpoint] if checkpoint is not None else [])
    trainer = make_trainer(args, out, strategy_kwargs, max_steps=max_steps, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(module, ckpt_path=ckpt_path)
    return describe(trainer, module, recorder)


# ----------------------------------------------------------------------------------------------- scenarios
# Each returns this rank's dict for rank<r>.pt; the expectations are in tests/gpu/test_gpu_*.py.
SCHEDULE = dict(param_sync_every=2, state_sync_every={"exp_avg": 4, "exp_avg_sq": 8})


def scenario_fit(args, out):
    """8 steps at K_x=2 (exp_avg 4, exp_avg_sq 8), consensus validation after steps 3 and 6, checkpoints
    after steps 4 and 8 (``ModelCheckpoint.setup`` broadcasts its directory before the strategy's setup)."""
    saver = ModelCheckpoint(dirpath=os.path.join(out, "ckpts"), every_n_train_steps=4, save_top_k=-1)
    return fit_once(args, out, dict(SCHEDULE, validate_on="consensus"), max_steps=8, checkpoint=saver,
                    val_check_interval=3, limit_val_batches=1)


def scenario_checkpoint(args, out):
    """A reference fit of 2 epochs x 5 steps (float64, dropout: the CUDA RNG matters) saving after every
    epoch, then in the same process a fit resumed from its epoch-0 checkpoint (step 5, between syncs)."""
    periods = dict(param_sync_every=3, state_sync_every={"exp_avg": 6, "exp_avg_sq": 12})

    def net():
        return Tiny(n_batches=5, dtype=torch.float64, dropout=0.2)

    ref_dir = os.path.join(out, "reference")
    saver = ModelCheckpoint(dirpath=os.path.join(ref_dir, "ckpts"), every_n_epochs=1, save_top_k=-1)
    # epoch-based (max_steps=-1): with max_steps set, Lightning resumes an end-of-epoch checkpoint as if
    # the epoch were unfinished (FitLoop._iteration_based_training) and stops after one step
    reference = fit_once(args, ref_dir, periods, max_steps=-1, module=net(), checkpoint=saver,
                         max_epochs=2, deterministic=True)
    resumed = fit_once(args, os.path.join(out, "resumed"), periods, max_steps=-1, module=net(),
                       ckpt_path=os.path.join(ref_dir, "ckpts", "epoch=0-step=5.ckpt"), max_epochs=2,
                       deterministic=True)
    return {"reference": reference, "resumed": resumed}


def scenario_drift(args, out):
    """K_x=64 never comes in 8 steps; max_drift far below any real drift, checked every 2 steps."""
    return fit_once(args, out, dict(param_sync_every=64, max_drift=1e-9, drift_check_every=2), max_steps=8)


def scenario_auto(args, out):
    """``"auto"``: 16 timed warm-up steps, the timed average after step 16, then the policy's periods."""
    return fit_once(args, out, dict(param_sync_every="auto"), max_steps=24)


def scenario_compression(args, out):
    return fit_once(args, out, dict(SCHEDULE, compression={"params": "bf16", "states": "int8"}), max_steps=8)


def scenario_outer(args, out):
    return fit_once(args, out, dict(param_sync_every=2, outer_lr=0.7, outer_momentum=0.9), max_steps=6)


def scenario_overlap(args, out):
    """Rounds after steps 4 and 8 (K_x=4; both Adam moments every 8) land one step later."""
    return fit_once(args, out, dict(param_sync_every=4, state_sync_every=8, overlap_steps=1), max_steps=10)


def scenario_overlap_lam(args, out):
    """As ``overlap`` with ``overlap_local_weight=0.5``: the round after step 8 mixes in the consensus's
    progress since the round after step 4 (the first round keeps lam = 1)."""
    return fit_once(args, out, dict(param_sync_every=4, state_sync_every=8, overlap_steps=1, overlap_local_weight=0.5),
                    max_steps=10)


def scenario_bf16(args, out):
    return fit_once(args, out, dict(param_sync_every=2, state_sync_every=4), max_steps=4, precision="bf16-true")


class ShardRecorder(Callback):
    """After every optimizer step: this rank's local shards (``local_tensor``: the whole tensor when
    unsharded) of the parameters and Adam moments, copied to the CPU."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, list[torch.Tensor]]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from lightning_desloc.sharding import local_tensor

        params = list(pl_module.parameters())
        opt = trainer.optimizers[0]
        self.steps[trainer.global_step] = {
            "params": [local_tensor(p).detach().cpu().clone() for p in params],
            **{k: [local_tensor(opt.state[p][k]).detach().cpu().clone() for p in params] for k in ("exp_avg", "exp_avg_sq")}}


def scenario_sharded(args, out):
    """4 ranks in 2 groups of 2 (``group_size=2``): 2 epochs x 3 steps with DDP inside the groups, then the
    same with FSDP2 inside them (``shard_within_group=True``) saving a checkpoint directory after every
    epoch, then a fit resumed from the epoch-0 one (step 3, same layout: the local path). Epoch-based, as
    ``scenario_checkpoint``: a plain loader resumed mid-epoch would start again at its first batch."""
    from lightning_desloc.sharding import local_tensor

    result: dict[str, Any] = {}
    ckpts = os.path.join(out, "ckpts")
    for tag, sharded in (("ddp", False), ("fsdp", True), ("resumed", True)):
        L.seed_everything(0)
        module, recorder = Tiny(n_batches=3), ShardRecorder()
        callbacks: list[Callback] = [recorder]
        if tag == "fsdp":  # each a directory: DCP's consensus and every rank's own shards
            callbacks.append(ModelCheckpoint(dirpath=ckpts, every_n_epochs=1, save_top_k=-1))
        trainer = make_trainer(args, out, dict(SCHEDULE, group_size=2, shard_within_group=sharded), max_steps=-1,
                               callbacks=callbacks, max_epochs=2)
        trainer.fit(module, ckpt_path=os.path.join(ckpts, "epoch=0-step=3.ckpt") if tag == "resumed" else None)
        decision = trainer.strategy.resume_decision
        result[tag] = {"steps": recorder.steps, "ledger_bytes": dict(trainer.strategy.ledger.bytes),
                       "types": sorted({type(p).__name__ for p in module.parameters()}),
                       "devices": sorted({str(local_tensor(p).device) for p in module.parameters()}),
                       "resume": None if decision is None else decision.path}
        result["global_rank"] = trainer.global_rank
    return result


def scenario_rejects_cpu(args, out):
    """The premise of the suite: under ``--backend`` a CPU tensor in a collective fails (and, with a GPU, a
    CUDA tensor works). Plain ``torch.distributed``, no Lightning."""
    dist.init_process_group(args.backend, timeout=COLLECTIVE_TIMEOUT)  # env:// from the harness
    rank = dist.get_rank()
    result: dict[str, Any] = {"global_rank": rank, "backend": dist.get_backend()}
    try:
        dist.all_reduce(torch.ones(1))
        result["cpu_error"] = None
    except RuntimeError as err:
        result["cpu_error"] = str(err)
    if torch.cuda.is_available():
        torch.cuda.set_device(0)
        value = torch.full((1,), float(rank + 1), device="cuda:0")
        dist.all_reduce(value)
        result["cuda_sum"] = float(value.item())
    # no collective left: a barrier would need a device this backend may not have
    dist.destroy_process_group()
    return result


SCENARIOS: dict[str, Callable[[argparse.Namespace, str], dict[str, Any]]] = {
    name[len("scenario_"):]: fn for name, fn in globals().items() if name.startswith("scenario_")
}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--accelerator", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--backend", default="cuda:gloo")
    parser.add_argument("--devices", type=int, default=1, help="devices of this process's Trainer (no torchelastic env)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    result = SCENARIOS[args.scenario](args, args.out)
    rank = int(result.get("global_rank", result.get("reference", {}).get("global_rank", 0)))
    torch.save(result, os.path.join(args.out, f"rank{rank}.pt"))


if __name__ == "__main__":
    sys.exit(main())
