"""Models and callbacks shared by the checkpoint tests and the torchrun worker (module level, so that
spawned processes can unpickle them)."""

import os

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

IN, OUT = 8, 4


class Net(L.LightningModule):
    """A float64 MLP with dropout (so that the RNG matters) on fixed, rank-dependent data."""

    def __init__(self, n_batches: int = 5, hidden: int = 16, lr: float = 1e-2, dropout: float = 0.2):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(IN, hidden), torch.nn.Tanh(), torch.nn.Dropout(dropout), torch.nn.Linear(hidden, OUT)
        ).double()

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def train_dataloader(self):
        rank = self.trainer.global_rank
        g = torch.Generator().manual_seed(100 + rank)
        x = torch.randn(self.hparams.n_batches * 4, IN, generator=g, dtype=torch.float64)
        y = torch.sin(x[:, :OUT]) * (1 + rank)
        return DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()


def flat_state(optimizer: torch.optim.Optimizer, key: str) -> torch.Tensor:
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return torch.cat([optimizer.state[p][key].reshape(-1) for p in params]).clone()


class Recorder(Callback):
    """Writes ``<out_dir>/rank<r>.pt``: the state right after restore (``start``), the parameters after
    every optimizer step (``steps``), the final local state and the resume decision."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.record = {"steps": {}}

    def _state(self, trainer, pl_module):
        out = {"params": flat_params(pl_module), "optimizer_steps": list(trainer.strategy.optimizer_steps)}
        opt = trainer.optimizers[0]
        if any(opt.state.values()):
            out["exp_avg"] = flat_state(opt, "exp_avg")
            out["exp_avg_sq"] = flat_state(opt, "exp_avg_sq")
        return out

    def on_train_start(self, trainer, pl_module):
        self.record["start"] = self._state(trainer, pl_module)
        decision = getattr(trainer.strategy, "resume_decision", None)
        self.record["resume"] = None if decision is None else decision.path
        self.record["world_size"] = trainer.world_size

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.record["steps"][trainer.global_step] = flat_params(pl_module)

    def on_train_end(self, trainer, pl_module):
        self.record["end"] = self._state(trainer, pl_module)  # before the strategy's final average
        self.record["ledger"] = dict(trainer.strategy.ledger.bytes)
        os.makedirs(self.out_dir, exist_ok=True)
        torch.save(self.record, os.path.join(self.out_dir, f"rank{trainer.global_rank}.pt"))


class CrashDuringSave(Callback):
    """Kill this process (``os._exit``) halfway through writing the main file of save number ``nth``."""

    def __init__(self, nth: int = 2, exit_code: int = 17):
        self.nth, self.exit_code = nth, exit_code

    def setup(self, trainer, pl_module, stage):
        from lightning_desloc import checkpoint

        saves = {"main": 0}

        def fault(name, path):
            if name == "write" and path.endswith(".ckpt"):  # main files only (shards end in .pt)
                saves["main"] += 1
                if saves["main"] >= self.nth:
                    os._exit(self.exit_code)

        checkpoint._fault_point = fault
