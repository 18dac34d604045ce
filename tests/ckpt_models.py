"""Models and callbacks shared by the checkpoint tests and the torchrun worker (module level, so that
spawned processes can unpickle them)."""

import os
import sys

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

    def setup(self, trainer, pl_module, stage):
        # a worker process (not pytest's own, devices=1) writes its stderr to <out_dir>/rank<r>.err, so the
        # tests read the resume messages whatever start method the workers had (a forkserver's workers do
        # not share the test's stderr); setup runs before the checkpoint is read
        import multiprocessing

        if multiprocessing.parent_process() is not None:
            os.makedirs(self.out_dir, exist_ok=True)
            sys.stderr.flush()
            err = open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.err"), "w")
            os.dup2(err.fileno(), 2)

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


# ------------------------------------------------------------------ what a save sends (test_checkpoint_traffic)
class FrozenStemNet(L.LightningModule):
    """float32: a stem frozen from setup on (``requires_grad=False``, still given to Adam, which keeps no
    state for it) and a trained head, on rank-dependent data."""

    def __init__(self, n_batches: int = 8, hidden: int = 16):
        super().__init__()
        self.stem = torch.nn.Linear(IN, hidden)
        self.stem.requires_grad_(False)
        self.head = torch.nn.Sequential(torch.nn.Linear(hidden, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, OUT))
        self.n_batches = n_batches

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.head(self.stem(x)), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)

    def train_dataloader(self):
        rank = self.trainer.global_rank
        g = torch.Generator().manual_seed(200 + rank)
        x = torch.randn(self.n_batches * 4, IN, generator=g)
        return DataLoader(TensorDataset(x, torch.sin(x[:, :OUT]) * (1 + rank)), batch_size=4, shuffle=False)


#: torch.distributed calls a save may issue; wrapped only inside SaveProbe's saves
PROBED = ("reduce", "all_reduce", "broadcast", "all_gather", "all_gather_object", "barrier")


class SaveProbe(Callback):
    """Calls ``trainer.save_checkpoint(<out_dir>/step<s>.ckpt)`` after the optimizer steps in ``at_steps``,
    counting what the save sends twice, independently: the ledger's deltas, and every torch.distributed
    call in this process during the save (wrapped for the save only: the name, the tensor's dtype and
    payload bytes). Writes ``<out_dir>/probe<rank>.pt``."""

    def __init__(self, out_dir: str, at_steps=()):
        self.out_dir, self.at_steps, self.saves = out_dir, tuple(at_steps), {}

    def _save_counted(self, trainer, path):
        import torch.distributed as dist

        calls, original, depth = [], {name: getattr(dist, name) for name in PROBED}, [0]

        def wrap(name, fn):
            def counted(*args, **kwargs):
                if depth[0] == 0:  # all_gather_object calls all_gather inside: count the outer call only
                    t = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
                    calls.append((name, None if t is None else str(t.dtype),
                                  0 if t is None else t.numel() * t.element_size()))
                depth[0] += 1
                try:
                    return fn(*args, **kwargs)
                finally:
                    depth[0] -= 1
            return counted

        ledger = trainer.strategy.ledger
        before = (ledger.bytes.get("checkpoint", 0), ledger.rounds_by_category.get("checkpoint", 0), ledger.calls)
        for name, fn in original.items():
            setattr(dist, name, wrap(name, fn))
        try:
            trainer.save_checkpoint(path)
        finally:
            for name, fn in original.items():
                setattr(dist, name, fn)
        after = (ledger.bytes.get("checkpoint", 0), ledger.rounds_by_category.get("checkpoint", 0), ledger.calls)
        return {"ledger_bytes": after[0] - before[0], "ledger_rounds": after[1] - before[1],
                "ledger_calls": after[2] - before[2], "calls": calls}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step in self.at_steps:
            self.saves[step] = self._save_counted(trainer, os.path.join(self.out_dir, f"step{step}.ckpt"))

    def on_train_end(self, trainer, pl_module):
        os.makedirs(self.out_dir, exist_ok=True)
        torch.save({"saves": self.saves, "stem": {k: v.clone() for k, v in pl_module.stem.state_dict().items()}},
                   os.path.join(self.out_dir, f"probe{trainer.global_rank}.pt"))


class TiedLM(L.LightningModule):
    """A tiny float64 language model whose output head is its token embedding (``head.weight is
    tok_emb.weight``: two names in the state dict, one parameter), with a validation loss."""

    VOCAB, DIM, LENGTH = 24, 8, 6

    def __init__(self, n_batches: int = 5):
        super().__init__()
        self.tok_emb = torch.nn.Embedding(self.VOCAB, self.DIM).double()
        self.mix = torch.nn.Linear(self.DIM, self.DIM).double()
        self.head = torch.nn.Linear(self.DIM, self.VOCAB, bias=False).double()
        self.head.weight = self.tok_emb.weight
        self.n_batches = n_batches

    def _loss(self, tokens):
        logits = self.head(torch.tanh(self.mix(self.tok_emb(tokens[:, :-1]))))
        return torch.nn.functional.cross_entropy(logits.reshape(-1, self.VOCAB), tokens[:, 1:].reshape(-1))

    def training_step(self, batch, batch_idx):
        return self._loss(batch[0])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch[0]), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=5e-2)

    def _data(self, offset):
        g = torch.Generator().manual_seed(300 + 10 * self.trainer.global_rank + offset)
        tokens = torch.randint(0, self.VOCAB, (self.n_batches * 4, self.LENGTH), generator=g)
        return DataLoader(TensorDataset(tokens), batch_size=4, shuffle=False)

    def train_dataloader(self):
        return self._data(0)

    def val_dataloader(self):
        return self._data(1)
