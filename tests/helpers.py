"""What the tests share, in one place: real processes joined by gloo (no mocks), free ports, quiet
trainers, the small models and the recorders. Test modules import from here, never from each other."""

import math
import os
import socket

import lightning as L
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

import reference as ref


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


#: how the tests start their worker processes. "forkserver": each worker is forked from a server process
#: that imported torch, Lightning and the package once (tests/conftest.py preloads them), so a worker
#: starts in a fraction of a second where a spawned one imports everything afresh (about 3 s on 2 cores);
#: the server itself holds no threads, no gloo group and no CUDA state, unlike the pytest process
#: (plain "fork" of that process deadlocked in the suite). The strategies' own "spawn" is tested too.
START_METHOD = "forkserver"


def run_on_processes(fn, world_size, *args):
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` new processes; raises if any fails."""
    mp.start_processes(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size,
                       start_method=START_METHOD)


# --------------------------------------------------------------------------- the regression MLP of the strategy tests
IN, HIDDEN, OUT = 64, 96, 8
N_PARAMS = IN * HIDDEN + HIDDEN + HIDDEN * OUT + OUT  # two Linear layers, counted by hand


def quiet_trainer(**kwargs):
    defaults = dict(
        accelerator="cpu",
        devices=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class Regression(L.LightningModule):
    """A two-layer MLP on rank-dependent synthetic data."""

    def __init__(self, n_batches=8, lr=1e-2, optimizer="adam", inf_batches=(), out_dir=None):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, OUT))
        self.n_batches, self.lr, self.optimizer, self.inf_batches, self.out_dir = n_batches, lr, optimizer, inf_batches, out_dir

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if batch_idx in self.inf_batches:
            loss = loss * float("inf")
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self):
        if self.optimizer == "adafactor":
            return torch.optim.Adafactor(self.parameters(), lr=self.lr)
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def _data(self, offset):
        rank = self.trainer.global_rank if self._trainer is not None else 0
        g = torch.Generator().manual_seed(1000 * rank + offset)
        x = torch.randn(self.n_batches * 4, IN, generator=g)
        return DataLoader(TensorDataset(x, x[:, :OUT] * (1 + rank)), batch_size=4)

    def train_dataloader(self):
        return self._data(0)

    def val_dataloader(self):
        return self._data(1)



# --------------------------------------------------------------------------- the reference simulator's model, in Lightning
class Mlp(L.LightningModule):
    """The model of ``reference.forward`` written with ``nn.Linear`` layers, trained per ``cfg``."""

    def __init__(self, cfg: ref.Config, n_calls: int, manual: bool = False):
        super().__init__()
        self.cfg, self.n_calls, self.manual = cfg, n_calls, manual
        self.automatic_optimization = not manual
        self.net = torch.nn.Sequential(
            torch.nn.Linear(ref.IN, ref.HIDDEN), torch.nn.Tanh(), torch.nn.Linear(ref.HIDDEN, ref.OUT)
        ).double()
        with torch.no_grad():
            for p, value in zip(self.net.parameters(), ref.initial_params(cfg.seed)):
                p.copy_(value)

    def setup(self, stage):
        # runs before the strategy's setup: every rank starts from different weights until rank 0's are broadcast
        with torch.no_grad():
            for p, delta in zip(self.net.parameters(), ref.perturbation(self.global_rank, self.cfg.seed)):
                p.add_(delta)
        self.perturbed = [p.detach().clone() for p in self.net.parameters()]

    def _loss(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        if self.cfg.skips(batch_idx, self.global_rank):
            loss = loss * math.inf
        return loss

    def training_step(self, batch, batch_idx):
        if not self.manual:
            return self._loss(batch, batch_idx)
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(self._loss(batch, batch_idx))
        if self.cfg.clip_norm is not None:
            self.clip_gradients(opt, gradient_clip_val=self.cfg.clip_norm, gradient_clip_algorithm="norm")
        opt.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def configure_optimizers(self):
        c = self.cfg
        if c.optimizer == "adam":
            opt = torch.optim.Adam(self.parameters(), lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay)
        elif c.optimizer == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=c.lr, momentum=c.momentum, dampening=c.dampening,
                                  weight_decay=c.weight_decay, nesterov=c.nesterov)
        if c.lr_schedule is None:
            return opt
        if c.lr_schedule[0] == "lambda":
            scheduler = torch.optim.lr_scheduler.LambdaLR(opt, ref.warmup_then_decay)
        else:
            _, size, gamma = c.lr_schedule
            scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=size, gamma=gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def train_dataloader(self):
        rank = self.trainer.global_rank
        batches = [ref.make_batch(rank, i, self.cfg.seed) for i in range(self.n_calls * self.cfg.accumulate)]
        return DataLoader(batches, batch_size=None)


class Recorder(Callback):
    """Saves, per rank, the state after every optimizer step and the weights the rank ends ``fit`` with."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    @staticmethod
    def _snapshot(trainer, module) -> dict:
        params = list(module.parameters())
        opt = trainer.optimizers[0]
        keys = sorted({k for p in params for k in opt.state.get(p, {})} - {"step"})
        steps = {int(opt.state[p]["step"]) for p in params if "step" in opt.state.get(p, {})}
        return {
            "global_step": trainer.global_step,
            "params": [p.detach().clone() for p in params],
            "state": {k: [opt.state[p][k].detach().clone() for p in params] for k in keys},
            "step": steps.pop() if len(steps) == 1 else (None if not steps else sorted(steps)),
        }

    def on_train_start(self, trainer, module):
        self.history = [self._snapshot(trainer, module)]

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step != self.history[-1]["global_step"]:  # once per optimizer step, not per micro-batch
            self.history.append(self._snapshot(trainer, module))

    def on_fit_end(self, trainer, module):  # after the strategy's on_train_end
        torch.save(
            {
                "perturbed": module.perturbed,
                "history": self.history,
                "final": [p.detach().clone() for p in module.parameters()],
                "optimizer_steps": list(trainer.strategy.optimizer_steps),
            },
            f"{self.out_dir}/rank{trainer.global_rank}.pt",
        )


