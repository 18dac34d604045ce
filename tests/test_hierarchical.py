"""Hierarchical sync on 4 real processes in 2 groups, against a 2-process DES-LOC run whose workers
each see both batches of a group (the gradient average of a group is the gradient of the joined batch)."""

import csv

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_desloc import DeslocStrategy
from lightning_desloc.comm import group_ranks
from helpers import START_METHOD, quiet_trainer

STEPS, K_X, BATCH = 6, 3, 4


def batch_for(rank, step):
    g = torch.Generator().manual_seed(10_000 * rank + step)
    x = torch.randn(BATCH, 5, generator=g, dtype=torch.float64)
    return x, x.sum(1, keepdim=True) * (1 + rank)


class GroupProbe(L.LightningModule):
    """``joined=True``: rank g trains on the batches of ranks 2g and 2g+1 together."""

    def __init__(self, out_dir, joined):
        super().__init__()
        torch.manual_seed(0)  # both runs start from the same weights
        self.net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1)).double()
        self.out_dir, self.joined = out_dir, joined

    def train_dataloader(self):
        rank = self.trainer.global_rank
        parts = [[batch_for(r, s) for s in range(STEPS)] for r in ((2 * rank, 2 * rank + 1) if self.joined else (rank,))]
        x = torch.cat([torch.cat([p[s][0] for p in parts]) for s in range(STEPS)])
        y = torch.cat([torch.cat([p[s][1] for p in parts]) for s in range(STEPS)])
        return DataLoader(TensorDataset(x, y), batch_size=BATCH * len(parts))

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.mse_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        torch.save([p.detach().clone() for p in self.parameters()],
                   f"{self.out_dir}/{'joined' if self.joined else 'hier'}{self.global_rank}_{self.global_step}.pt")


def test_group_ranks_and_bad_sizes():
    assert group_ranks(4, 2) == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    with pytest.raises(ValueError, match="must divide the number of processes"):
        group_ranks(4, 3)
    with pytest.raises(ValueError, match="group_size must be a positive"):
        DeslocStrategy(group_size=0)


def test_four_processes_in_two_groups_equal_two_joined_workers(tmp_path):
    periods = dict(param_sync_every=K_X, state_sync_every={"exp_avg": 3, "exp_avg_sq": 6})
    from lightning.pytorch.loggers import CSVLogger

    hier = DeslocStrategy(group_size=2, start_method=START_METHOD, **periods)
    logger = CSVLogger(tmp_path, name="hier", version=0)
    quiet_trainer(strategy=hier, devices=4, max_steps=STEPS, limit_val_batches=0, logger=logger,
                  log_every_n_steps=1).fit(GroupProbe(str(tmp_path), False))
    flat = DeslocStrategy(start_method=START_METHOD, **periods)
    quiet_trainer(strategy=flat, devices=2, max_steps=STEPS, limit_val_batches=0).fit(GroupProbe(str(tmp_path), True))

    for step in range(1, STEPS + 1):
        for rank in range(4):
            got = torch.load(tmp_path / f"hier{rank}_{step}.pt")
            expected = torch.load(tmp_path / f"joined{rank // 2}_{step}.pt")
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    n_params = 5 * 7 + 7 + 7 + 1
    # gradient level: every step, one model's gradients; DES-LOC level: the schedule, as without groups
    # (and, after each outer round at steps 3 and 6, the signals within the group: one float32)
    # (the control tensor: the signal and on_nonfinite's flag per group, 3 float32)
    assert hier.group_ledger.bytes == {"grads": STEPS * n_params * 8, "control": 2 * (1 + 2) * 4}
    assert hier.ledger.bytes["params"] == flat.ledger.bytes["params"] == (STEPS // K_X) * n_params * 8
    assert hier.ledger.bytes["state/exp_avg_sq"] == n_params * 8
    # both levels reach the logger at each outer round; the last one, after step 6, has seen every step
    rows = [r for r in csv.DictReader(open(tmp_path / "hier" / "version_0" / "metrics.csv")) if r.get("comm/group/bytes/grads")]
    assert [float(r["comm/group/bytes/grads"]) for r in rows] == [K_X * n_params * 8, STEPS * n_params * 8]
    assert float(rows[-1]["comm/bytes/params"]) == (STEPS // K_X) * n_params * 8
